"""`qwenfast decode` and `qwenfast bench` unchanged under torchrun (2 CPU ranks, gloo): rank 0 writes
and prints, parallel decode equals the single-device decode, and a bad input seen by one rank only
(rank 0's output directory) stops every rank with a clear line instead of a hang."""

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import diffusers_vae, torchrun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    diffusers_vae().save_pretrained(root / "vae")
    z = torch.randn(1, 4, 13, 21, generator=torch.Generator().manual_seed(0))
    save_file({"latents": z}, root / "lat.safetensors")
    return root


def test_decode_patch_on_two_ranks_writes_once_and_equals_single(setup, capsys):
    from qwenfast.cli import main

    root = setup
    # on the CPU in fp32 on a GPU machine too: there the default is bf16, where the patch decode is not the
    # untiled one to the bit (cuDNN picks its algorithm per shape; an H200 showed 5 levels of 255)
    cpu = ["--device", "cpu", "--dtype", "fp32"]
    assert main(["decode", str(root / "lat.safetensors"), "--vae", str(root / "vae"), "-o", str(root / "single"),
                 *cpu]) == 0
    capsys.readouterr()
    done = torchrun(["decode", root / "lat.safetensors", "--vae", root / "vae", "-o", root / "par", *cpu,
                     "--vae-config.use-parallel-decode", "--vae-config.parallel-decode-mode", "patch"])
    assert done.returncode == 0, "stdout: " + done.stdout[-1000:] + "\nstderr: " + done.stderr[-3000:]
    assert done.stdout.split() == [str(root / "par" / "lat.png")]  # printed once: rank 0
    single = np.asarray(Image.open(root / "single" / "lat.png")).astype(int)
    par = np.asarray(Image.open(root / "par" / "lat.png")).astype(int)
    assert np.abs(single - par).max() <= 1


def test_decode_bad_output_on_rank0_stops_every_rank(setup, tmp_path):
    (tmp_path / "afile").write_text("x")
    done = torchrun(["decode", setup / "lat.safetensors", "--vae", setup / "vae", "-o", tmp_path / "afile" / "o",
                     "--vae-config.use-parallel-decode"], timeout=240)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("qwenfast decode: error: ")]
    # one line from each rank; torchrun stops the other rank as soon as one exits, which now and then
    # cuts rank 1 off before it prints (both print right after the agreement and wait 0.5 s)
    assert 1 <= len(ours) <= 2, done.stderr[-3000:]
    assert any("cannot write to output directory" in line for line in ours)  # rank 0's own error
    # rank 1, when it got to print, tells rank 0's own error, not only that some rank failed
    assert all(line.startswith("qwenfast decode: error: cannot write to output directory") or
               line.startswith("qwenfast decode: error: rank 0 failed while checking the inputs: cannot write to "
                               "output directory") for line in ours)
    # torchrun's launcher prints its own traceback for failed children; none comes from our code
    assert "/qwenfast/" not in done.stderr


def test_bench_on_two_ranks_reports_per_rank(setup, tmp_path):
    out = tmp_path / "b.json"
    done = torchrun(["bench", "--vae", setup / "vae", "--sizes", "104x64", "--modes", "untiled,patch,tiled,auto",
                     "--repeats", "1", "--json", out, "--vae-config.exact-tile-sample-size", "32"])
    assert done.returncode == 0, "stdout: " + done.stdout[-1000:] + "\nstderr: " + done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["untiled", "patch", "tiled", "auto"]
    for r in rows:
        assert r["ranks"] == 2 and len(r["peak_gib_per_rank"]) == 2 and len(r["bytes_sent_per_rank"]) == 2
        assert (r["max_abs_diff"] is None) if r["mode"] == "untiled" else (r["max_abs_diff"] <= 1e-4)
    assert rows[1]["parallel_mode"] == "patch" and min(rows[1]["bytes_sent_per_rank"]) > 0
    assert done.stdout.count("median ms") == 1  # the table, from rank 0 only


@pytest.mark.parametrize("raised,drains", [(None, True), ("reported", True), ("bug", False)])
def test_owned_group_drains_only_when_every_rank_is_in_step(monkeypatch, raised, drains):
    # The draining barrier before destroy (gloo workers drop their last tensors while Python is
    # alive) runs when the block returned or raised Reported from an agreement, never after a
    # failure that may have left the other ranks elsewhere (it would wait for them).
    from qwenfast.cli import common
    from qwenfast.parallel import group as pg

    calls = []
    monkeypatch.setattr(pg, "init_from_env", lambda timeout_s: None)
    monkeypatch.setattr(pg, "destroy_if_owned", lambda drain=False: calls.append(drain))
    error = {"reported": common.Reported("rank 1 failed"), "bug": ValueError("bug")}.get(raised)
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with common.owned_group(5.0):
            if error:
                raise error
    assert calls == [drains]
