"""What `qwenfast decode` and `qwenfast bench` write, and what they refuse to: no silent overwrite,
never the input, every file of one decode or none (full disk, file too large, interrupt), checks
before the decode, file modes from the umask, `-o NAME.png` as a file. Each refusal is one line on
stderr, exit status 2, and leaves the file system as it was."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from helpers import diffusers_vae
from qwenfast.cli import main, media


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "vae"
    diffusers_vae().save_pretrained(path)
    return path


def latents(path, batch=1, frames=None):
    shape = (batch, 4, 4, 5) if frames is None else (batch, 4, frames, 4, 5)
    save_file({"latents": torch.randn(shape, generator=torch.Generator().manual_seed(0))}, path)
    return path


def snapshot(directory):
    """Every path under `directory` with its bytes (directories as None): equal before and after."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (None if p.is_dir() else p.read_bytes()) for p in sorted(directory.rglob("*"))}


def decode(capsys, *argv):
    code = main(["decode", *map(str, argv), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err, pattern):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qwenfast "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def no_decode(monkeypatch):
    """Fail the test if a decode starts: the refusal must come first."""
    from qwenfast import QwenImageVAE

    def refuse(self, z):
        raise AssertionError("decoded before refusing")

    monkeypatch.setattr(QwenImageVAE, "decode", refuse)


# -- item 3: no silent overwrite, never the input -----------------------------------------------


def test_existing_output_is_refused_without_overwrite(vae_path, tmp_path, capsys):
    lat = latents(tmp_path / "lat.safetensors")
    out = tmp_path / "out"
    assert decode(capsys, lat, "--vae", vae_path, "-o", out)[0] == 0
    (out / "lat.png").write_bytes(b"keep me")
    one_line(*decode(capsys, lat, "--vae", vae_path, "-o", out)[::2], r"lat\.png exists; pass --overwrite")
    assert (out / "lat.png").read_bytes() == b"keep me"
    assert decode(capsys, lat, "--vae", vae_path, "-o", out, "--overwrite")[0] == 0
    assert (out / "lat.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("how", ["directory", "file"])
def test_input_is_never_written_over(vae_path, tmp_path, capsys, how, no_decode):
    lat = latents(tmp_path / "x.png")  # a latents file whose name is an output's name
    before = lat.read_bytes()
    out = tmp_path if how == "directory" else lat  # `-o .` next to it, or -o naming it
    code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", out, "--overwrite")
    one_line(code, err, r"is the input .*refusing to write over it")
    assert lat.read_bytes() == before


def test_output_name_that_is_a_directory_is_refused_before_decoding(vae_path, tmp_path, capsys, no_decode):
    lat = latents(tmp_path / "lat.safetensors", batch=2)
    (tmp_path / "out" / "lat_001.png").mkdir(parents=True)
    before = snapshot(tmp_path / "out")
    code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "out", "--overwrite")
    one_line(code, err, r"lat_001\.png is a directory")
    assert snapshot(tmp_path / "out") == before


# -- items 4 and 11: all or nothing, one line -----------------------------------------------------


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EFBIG, "interrupt"])
@pytest.mark.parametrize("out_exists", [True, False])
def test_a_failing_write_leaves_the_directory_unchanged(vae_path, tmp_path, capsys, monkeypatch, fault, out_exists):
    lat = latents(tmp_path / "lat.safetensors", batch=4)
    out = tmp_path / "out" / "new"
    if out_exists:
        out.mkdir(parents=True)
        (out / "other.txt").write_text("unrelated")
    before = snapshot(tmp_path)
    calls = []
    real = media.write_image

    def full_disk(image, tmp, kind="png"):
        calls.append(tmp)
        if len(calls) == 3:  # two files are written, the third fails
            with open(tmp, "wb") as f:
                f.write(b"half")
            if fault == "interrupt":
                raise KeyboardInterrupt
            raise OSError(fault, os.strerror(fault), tmp)
        real(image, tmp, kind)

    monkeypatch.setattr(media, "write_image", full_disk)
    code, out_text, err = decode(capsys, lat, "--vae", vae_path, "-o", out)
    if fault == "interrupt":
        assert code == 130 and err.strip() == "qwenfast decode: interrupted", err
    else:
        one_line(code, err, rf"cannot write .*lat_002\.png: {os.strerror(fault)}; nothing was written")
    assert out_text == ""  # no file is announced
    assert snapshot(tmp_path) == before  # no PNG, no temporary file, no directory made
    assert all(not name.startswith(".") and name.endswith(".tmp") for name in map(os.path.basename, calls))


def test_free_space_is_checked_before_decoding(vae_path, tmp_path, capsys, monkeypatch, no_decode):
    import shutil

    lat = latents(tmp_path / "lat.safetensors")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(media.shutil, "disk_usage", lambda p: usage._replace(free=100))
    code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "out")
    one_line(code, err, r"not enough free space in .*: the outputs need about .* MiB, 0\.0 MiB free")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["access", "chmod"])
def test_unwritable_output_directory_is_refused_before_decoding(vae_path, tmp_path, capsys, monkeypatch, how, no_decode):
    lat = latents(tmp_path / "lat.safetensors")
    locked = tmp_path / "locked"
    locked.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        locked.chmod(0o555)
    else:  # as root, or a read-only mount: what os.access reports
        monkeypatch.setattr(media.os, "access", lambda p, mode: False)
    try:
        code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", locked / "sub" / "out")
    finally:
        locked.chmod(0o755)
    one_line(code, err, r"cannot write to output directory .*locked is not writable")
    assert list(locked.iterdir()) == []


# -- item 13: modes from the umask; no directory made for a refused input ------------------------


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_honour_the_umask(vae_path, tmp_path, capsys, mask, mode):
    lat = latents(tmp_path / "lat.safetensors")
    old = os.umask(mask)
    try:
        code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "out" / "lat.png").stat().st_mode & 0o777 == mode


def test_no_output_directory_is_made_for_a_refused_input(vae_path, tmp_path, capsys):
    save_file({"latents": torch.randn(1, 5, 4, 4)}, tmp_path / "bad.safetensors")  # 5 channels, not 4
    code, _, err = decode(capsys, tmp_path / "bad.safetensors", "--vae", vae_path, "-o", tmp_path / "a" / "b")
    one_line(code, err, "latents have 5 channels")
    assert not (tmp_path / "a").exists()


# -- item 14: -o NAME.png for one image, NAME.gif / NAME.mp4 for one video -----------------------


def test_o_png_writes_that_file_for_one_image(vae_path, tmp_path, capsys):
    lat = latents(tmp_path / "lat.safetensors")
    code, out, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "new" / "out.png")
    assert code == 0, err
    assert (tmp_path / "new" / "out.png").is_file() and out.split() == [str(tmp_path / "new" / "out.png")]


def test_o_gif_writes_that_file_for_one_video(vae_path, tmp_path, capsys):
    from PIL import Image

    lat = latents(tmp_path / "lat.safetensors", frames=2)
    code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "clip.gif")
    assert code == 0, err
    assert Image.open(tmp_path / "clip.gif").n_frames == 5


@pytest.mark.parametrize("batch,frames,name,pattern", [
    (2, None, "out.png", r"names one file, but the latents \(2, 4, 4, 5\) hold 2 images; give a directory"),
    (1, 2, "out.png", r"decode to one video, written as \.mp4 or \.gif"),
    (1, None, "out.gif", r"decode to one image, written as \.png"),
    (1, None, "out.jpg", r"decode to one image, written as \.png"),
])
def test_o_file_that_does_not_fit_is_refused(vae_path, tmp_path, capsys, batch, frames, name, pattern, no_decode):
    lat = latents(tmp_path / "lat.safetensors", batch=batch, frames=frames)
    code, _, err = decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / name)
    one_line(code, err, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.safetensors"]


def test_o_mp4_without_pyav_is_refused(vae_path, tmp_path, capsys, monkeypatch, no_decode):
    monkeypatch.setattr(media, "video_encoder", lambda: "gif")
    lat = latents(tmp_path / "lat.safetensors", frames=2)
    one_line(*decode(capsys, lat, "--vae", vae_path, "-o", tmp_path / "c.mp4")[::2], r"MP4 needs PyAV")


# -- bench --json: checked before the benchmark, no leftover -------------------------------------


@pytest.fixture
def no_bench(monkeypatch):
    from qwenfast.cli import bench

    def refuse(*a, **k):
        raise AssertionError("benchmarked before refusing")

    monkeypatch.setattr(bench, "_bench", refuse)


def test_bench_json_that_is_a_directory_fails_before_the_benchmark(tmp_path, capsys, no_bench):
    (tmp_path / "bj").mkdir()
    code = main(["bench", "--sizes", "32", "--json", str(tmp_path / "bj")])
    one_line(code, capsys.readouterr().err, r"bj is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["bj"] and list((tmp_path / "bj").iterdir()) == []


def test_bench_json_in_a_read_only_place_fails_before_the_benchmark(tmp_path, capsys, monkeypatch, no_bench):
    monkeypatch.setattr(media.os, "access", lambda p, mode: False)
    code = main(["bench", "--sizes", "32", "--json", str(tmp_path / "ro" / "b.json")])
    one_line(code, capsys.readouterr().err, r"cannot write to output directory .* is not writable")
    assert list(tmp_path.iterdir()) == []


def test_bench_json_write_failure_leaves_no_tmp(vae_path, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    def full(self, text, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    code = main(["bench", "--vae", str(vae_path), "--sizes", "32", "--modes", "untiled", "--repeats", "1",
                 "--json", str(tmp_path / "b.json")])
    one_line(code, capsys.readouterr().err, r"cannot write .*b\.json: No space left on device")
    assert list(tmp_path.iterdir()) == []
