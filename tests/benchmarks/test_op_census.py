"""benchmarks/op_census.py on tiny configs: every op it can count (decode, encode, one rank's patch
share) gives a table; the conv FLOPs are the convs' own (a known conv counted exactly, a transposed one
too); a rank outside the world is refused."""

import argparse

import pytest
import torch

from helpers import load_benchmark

def load():
    return load_benchmark("op_census")


@pytest.mark.parametrize("argv", [
    ["decode", "--tiny", "--size", "64"], ["decode", "--tiny", "--video", "9", "64", "48"],
    ["encode", "--tiny", "--video", "9", "64", "48"], ["decode", "--tiny", "--model", "qwenimage21", "--size", "64"],
    ["patch", "--tiny", "--size", "320", "--world", "3", "--rank", "1", "--halo", "level"],
])
def test_every_op_gives_a_table(argv, capsys):
    assert load().main(argv) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head.startswith("convs: ") and "TFLOP" in head and "GiB" in out
    assert int(head.split()[1].rstrip(",")) > 0


def test_conv_breakdown_sums_to_the_total(capsys):
    census = load()
    assert census.main(["decode", "--tiny", "--video", "9", "64", "48", "--convs"]) == 0
    out = capsys.readouterr().out
    assert "C in C out" in out and "3x3x3" in out
    args = argparse.Namespace(op="decode", model="qwenimage", exact_tile=None)
    c = census.run(args, census.build("qwenimage", True), 9, 64, 48)
    assert c.conv_flop_by and abs(sum(c.conv_flop_by.values()) - c.conv_flop) <= 1e-6 * c.conv_flop


def test_conv_flops_are_counted_per_multiply_add():
    census = load()
    x = torch.empty(1, 8, 10, 12, device="meta")
    with census.Census() as c:
        torch.nn.functional.conv2d(x, torch.empty(16, 8, 3, 3, device="meta"), padding=1)
        torch.nn.functional.conv_transpose2d(x, torch.empty(8, 4, 4, 4, device="meta"), stride=2, padding=1)
    assert c.conv_flop == 2 * (16 * 10 * 12) * (8 * 9) + 2 * (8 * 10 * 12) * (4 * 16)
    assert c.convs == 2 and c.convs_not_channels_last == [(1, 8, 10, 12)] * 2  # NCHW inputs, both flagged


def test_a_rank_outside_the_world_is_refused(capsys):
    with pytest.raises(SystemExit):
        load().main(["patch", "--tiny", "--world", "2", "--rank", "2"])
    assert "--rank must be in [0, 2); got 2" in capsys.readouterr().err


@pytest.mark.parametrize("argv, got", [(["--size", "100"], "1 frames of 100x100"),
                                       (["--video", "0", "64", "48"], "0 frames of 64x48"),
                                       (["--video", "6", "64", "48"], "6 frames of 64x48")])
def test_shapes_the_model_cannot_take_are_refused_in_one_line(argv, got, capsys):
    with pytest.raises(SystemExit):
        load().main(["decode", "--tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"positive multiples of 8 for qwenimage; got {got}")
