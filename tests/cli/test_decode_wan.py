"""`qwenfast decode --vae DIR` on a Wan 2.1 VAE directory written by diffusers' `AutoencoderKLWan.
save_pretrained`, with a video latent of 3 latent frames: an MP4 of the 9 frames diffusers decodes.

MP4 is written through PyAV. Where PyAV is installed the file itself is read back; everywhere a
stand-in `av` module records what the writer hands PyAV (frames, codec, pixel format), so the
MP4 path is checked even on a machine without it (where a directory output is a GIF instead and
`-o NAME.mp4` is refused in one line: tests/cli/test_outputs.py)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import TINY, _perturb_gammas
from qwenfast.cli import main

SHAPE = (1, 4, 3, 5, 6)  # (B, z, T, h, w): 1 + 4·2 = 9 frames of 40 x 48 px


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = _perturb_gammas(AutoencoderKLWan(**TINY).eval())
    path = tmp_path_factory.mktemp("wan") / "vae"
    ref.save_pretrained(path)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = ref.decode(z).sample[0]  # (3, 9, 40, 48) in [-1, 1]
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return path, z, frames  # frames: (T, H, W, 3) uint8, as diffusers' decode gives them


def decode(capsys, tmp_path, z, vae, *argv):
    lat = tmp_path / "clip.safetensors"
    save_file({"latents": z}, lat)
    code = main(["decode", str(lat), "--vae", str(vae), "--device", "cpu", "--vae-config.progress", "false",
                 *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.split()


def fake_av(record: dict) -> types.ModuleType:
    """A stand-in for PyAV: `av.open(...)` gives a container whose stream records every picture."""

    class Stream:
        def __init__(self, codec, rate):
            record.update(codec=codec, rate=rate, pictures=[])

        def encode(self, picture=None):
            if picture is not None:
                record["pictures"].append(picture)
                record["size"], record["pix_fmt"] = (self.height, self.width), self.pix_fmt
            return []

    class Container:
        def __init__(self, path, mode, format):
            record.update(path=path, mode=mode, format=format)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_stream(self, codec, rate):
            return Stream(codec, rate)

        def mux(self, packets):
            pass

    av = types.ModuleType("av")
    av.open = Container
    av.VideoFrame = types.SimpleNamespace(from_ndarray=lambda a, format: (format, np.array(a)))
    return av


def test_wan21_dir_decodes_to_mp4_frames_equal_to_diffusers(wan_dir, tmp_path, capsys, monkeypatch):
    path, z, expected = wan_dir
    record: dict = {}
    monkeypatch.setitem(sys.modules, "av", fake_av(record))
    written = decode(capsys, tmp_path, z, path, "-o", tmp_path / "out")
    assert written == [str(tmp_path / "out" / "clip.mp4")]  # a directory output: NAME.mp4 with PyAV
    assert (tmp_path / "out" / "clip.mp4").is_file()
    assert (record["mode"], record["format"], record["codec"], record["rate"]) == ("w", "mp4", "libx264", 16)
    assert record["pix_fmt"] == "yuv420p" and record["size"] == (40, 48)
    assert [fmt for fmt, _ in record["pictures"]] == ["rgb24"] * 9
    got = np.stack([a for _, a in record["pictures"]]).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1  # qwenfast's decode = diffusers', frame for frame


def test_wan21_dir_writes_a_real_mp4(wan_dir, tmp_path, capsys):
    av = pytest.importorskip("av", reason="PyAV is not installed: the stand-in test above covers the writer")
    path, z, expected = wan_dir
    written = decode(capsys, tmp_path, z, path, "-o", tmp_path / "clip.mp4")
    assert written == [str(tmp_path / "clip.mp4")]
    with av.open(written[0]) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)
    assert frames.shape == (9, 40, 48, 3)
    # H.264 is lossy: each frame near its own (measured <= 12; black frames are off by ~128, the video
    # shifted by one frame by up to 42)
    assert np.abs(frames - expected.astype(int)).mean(axis=(1, 2, 3)).max() <= 20


def test_wan22_dir_is_refused_in_one_line(tmp_path, capsys):
    from diffusers import AutoencoderKLWan

    wan22 = dict(decoder_base_dim=16, z_dim=8, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                 latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_spatial=16)
    AutoencoderKLWan(**{**TINY, **wan22}).save_pretrained(tmp_path / "vae")
    save_file({"latents": torch.zeros(1, 8, 2, 2, 2)}, tmp_path / "lat.safetensors")
    code = main(["decode", str(tmp_path / "lat.safetensors"), "--vae", str(tmp_path / "vae"),
                 "-o", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "a Wan 2.2 VAE (decoder_base_dim=16, is_residual=True" in err and "the Wan 2.1 design" in err
    assert not (tmp_path / "out").exists()
