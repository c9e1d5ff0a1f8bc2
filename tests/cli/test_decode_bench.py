"""The CLI end to end on a tiny VAE written by diffusers' save_pretrained: outputs, and every bad
input as one line on stderr with a non-zero exit, no traceback, nothing half-written."""

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import diffusers_vae
from qwenfast.cli import main


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    ref = diffusers_vae()
    path = tmp_path_factory.mktemp("model") / "vae"
    ref.save_pretrained(path)
    return ref, path


def latents_file(tmp_path, name="lat.safetensors", **tensors):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_decode_images_writes_pngs_equal_to_diffusers(vae_dir, tmp_path, capsys):
    ref, path = vae_dir
    z = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    lat = latents_file(tmp_path, latents=z, other=torch.zeros(1))
    code, out, err = run_cli(capsys, "decode", lat, "--vae", path.parent, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["lat_000.png", "lat_001.png"]
    with torch.no_grad():
        expected = ref.decode(z.unsqueeze(2)).sample[:, :, 0]
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for f, e in zip(files, expected):
        got = np.asarray(Image.open(f))
        assert got.shape == (48, 56, 3)
        assert np.abs(got.astype(int) - e.astype(int)).max() <= 1


def test_decode_normalized_and_video_gif(vae_dir, tmp_path, capsys):
    _, path = vae_dir
    z = torch.randn(1, 4, 2, 5, 6, generator=torch.Generator().manual_seed(1))
    lat = latents_file(tmp_path, clip=z)  # the only tensor: its name does not matter
    code, out, err = run_cli(capsys, "decode", lat, "--vae", path, "-o", tmp_path, "--normalized",
                             "--vae-config.use-tiling", "--vae-config.progress", "false")
    assert code == 0, err
    written = out.split()
    assert len(written) == 1 and written[0].endswith((".gif", ".mp4"))
    if written[0].endswith(".gif"):
        assert Image.open(written[0]).n_frames == 5


def test_denormalize_is_the_pipelines_inverse():
    from qwenfast.cli.decode import denormalize

    z = torch.randn(1, 4, 1, 2, 2)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    back = denormalize(z, mean, std)
    # the pipelines normalise as (x - mean) * (1 / std)
    renorm = (back - torch.tensor(mean).view(1, -1, 1, 1, 1)) * (1 / torch.tensor(std)).view(1, -1, 1, 1, 1)
    assert torch.allclose(renorm, z, atol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("missing", "latents file not found"),
    ("several", "holds 2 tensors and none is named 'latents'"),
    ("channels", "latents have 5 channels"),
    ("ndim", r"latents must be \[B, 4, T, h, w\] or \[B, 4, h, w\]; got shape \(1, 4, 8\)"),
    ("nonfinite", "non-finite values.*--allow-nonfinite"),
    ("not-safetensors", "cannot read .* as safetensors"),
    ("unwritable", "cannot write to output directory"),
    ("weights", "do not fit the VAE config"),
    ("no-vae", "no such VAE directory"),
    ("bad-config", "tile_sample_stride_height .* must not exceed"),
])
def test_decode_bad_input_is_one_line(vae_dir, tmp_path, capsys, case, match):
    _, path = vae_dir
    z = torch.randn(1, 4, 1, 4, 4)
    argv_extra = []
    out_dir = tmp_path / "out"
    vae = path
    lat = tmp_path / "lat.safetensors"
    if case == "missing":
        lat = tmp_path / "nope.safetensors"
    elif case == "several":
        latents_file(tmp_path, a=z, b=z.clone())
    elif case == "channels":
        latents_file(tmp_path, latents=torch.randn(1, 5, 4, 4))
    elif case == "ndim":
        latents_file(tmp_path, latents=torch.randn(1, 4, 8))
    elif case == "nonfinite":
        bad = z.clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        latents_file(tmp_path, latents=bad)
    elif case == "not-safetensors":
        lat.write_bytes(b"not a safetensors file")
    elif case == "unwritable":
        latents_file(tmp_path, latents=z)
        (tmp_path / "afile").write_text("x")
        out_dir = tmp_path / "afile" / "sub"
    elif case == "weights":
        latents_file(tmp_path, latents=z)
        import shutil

        vae = tmp_path / "vae"
        shutil.copytree(path, vae)
        cfg = json.loads((vae / "config.json").read_text())
        (vae / "config.json").write_text(json.dumps(dict(cfg, base_dim=16)))
    elif case == "no-vae":
        latents_file(tmp_path, latents=z)
        vae = tmp_path / "missing"
    elif case == "bad-config":
        latents_file(tmp_path, latents=z)
        argv_extra = ["--vae-config.tile-sample-stride-height", "512"]
    code, out, err = run_cli(capsys, "decode", lat, "--vae", vae, "-o", out_dir, *argv_extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qwenfast decode: error: ")
    import re

    assert re.search(match, lines[0]), lines[0]
    if out_dir.is_dir():
        assert list(out_dir.iterdir()) == []  # nothing half-written


def test_decode_allow_nonfinite(vae_dir, tmp_path, capsys):
    _, path = vae_dir
    z = torch.randn(1, 4, 4, 4)
    z[0, 0, 0, 0] = float("inf")
    lat = latents_file(tmp_path, latents=z)
    code, _, err = run_cli(capsys, "decode", lat, "--vae", path, "-o", tmp_path / "o", "--allow-nonfinite")
    assert code == 0, err


def test_bench_prints_table_and_writes_json(vae_dir, tmp_path, capsys):
    _, path = vae_dir
    out = tmp_path / "b.json"
    code, stdout, err = run_cli(capsys, "bench", "--vae", path, "--sizes", "64,48x32", "--modes", "untiled,exact,blend",
                                "--repeats", "1", "--json", out, "--vae-config.exact-tile-sample-size", "16")
    assert code == 0, err
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(r["size"], r["mode"]) for r in rows] == [(s, m) for s in ("64x64", "48x32") for m in ("untiled", "exact", "blend")]
    assert all(r["max_abs_diff"] is None for r in rows if r["mode"] == "untiled")  # the reference itself
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows if r["mode"] == "exact")
    assert result["provenance"]["torch"] == torch.__version__
    assert "median ms" in stdout and "qwenfast decode" in stdout


def bench_args(*argv):
    import argparse

    from qwenfast.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("argv,gpu,expect", [
    ([], True, True),                                         # a GPU: graphs by default
    ([], False, False),                                       # a CPU: eager
    (["--no-cuda-graph"], True, False),
    (["--vae-config.cuda-graph", "false"], True, False),      # explicit: as given
    (["--vae-config.cuda-graph"], False, True),               # (a CPU then decodes eagerly and says so)
    (["--no-cuda-graph", "--vae-config.cuda-graph", "false"], True, False),
])
def test_bench_turns_cuda_graphs_on_by_default_only_on_a_gpu(argv, gpu, expect):
    from qwenfast import VAEConfig
    from qwenfast.cli.bench import bench_cuda_graph

    args = bench_args(*argv)
    assert bench_cuda_graph(VAEConfig.from_cli_args(args), args, gpu).cuda_graph is expect
    assert VAEConfig().cuda_graph is False  # direct VAE use: off


def test_bench_no_cuda_graph_contradicting_the_config_flag_is_refused(capsys):
    code, _, err = run_cli(capsys, "bench", "--no-cuda-graph", "--vae-config.cuda-graph", "true")
    assert code == 2 and "--no-cuda-graph contradicts --vae-config.cuda-graph true" in err


@pytest.mark.parametrize("flag", [[], ["--vae-config.cuda-graph"]])
def test_bench_on_a_cpu_decodes_eagerly_and_says_so(vae_dir, tmp_path, capsys, flag):
    _, path = vae_dir
    out = tmp_path / "b.json"
    code, stdout, err = run_cli(capsys, "bench", "--vae", path, "--sizes", "32", "--modes", "untiled",
                                "--repeats", "1", "--device", "cpu", "--json", out, *flag)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [(r["graph"], r["cuda_graph"]) for r in result["results"]] == [("off", False)]
    assert result["provenance"]["cuda_graph"] is False
    header = next(line for line in stdout.splitlines() if "median ms" in line)
    assert header.split()[:4] == ["size", "T", "mode", "graph"] and "eager decodes" in stdout
    assert ("CUDA graphs need a GPU: decoding eagerly on cpu" in stdout) == bool(flag)


@pytest.mark.parametrize("halo", ["auto", "mid", "level"])
def test_patch_halo_flag_takes_every_value(halo):
    from qwenfast import VAEConfig

    assert VAEConfig.from_cli_args(bench_args("--vae-config.patch-halo", halo)).patch_halo == halo


def test_patch_halo_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        bench_args("--vae-config.patch-halo", "wide")
    assert "invalid choice: 'wide'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--sizes", "100"], "multiples of 8"),
    (["--sizes", "abc"], "is not N or WxH"),
    (["--modes", "fast"], "unknown fast"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--frames", "0"], "CUDA is not available|must be >= 1"),
])
def test_bench_bad_input(capsys, argv, match):
    code, _, err = run_cli(capsys, "bench", *argv)
    assert code == 2 and "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_console_entry_points_help():
    cmds = [[sys.executable, "-m", "qwenfast", "decode", "--help"]]
    # the console script exists where the package is installed (CI: `pip install -e`), not where the
    # source is only on PYTHONPATH (the GPU machine)
    try:
        importlib.metadata.distribution("qwenfast")
        cmds.append(["qwenfast", "--help"])
    except importlib.metadata.PackageNotFoundError:
        pass
    for cmd in cmds:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "qwenfast" in result.stdout


# -- the Qwen-Image-2.1 VAE: told apart by config.json, RGBA PNGs ---------------------------------------


@pytest.fixture(scope="module")
def vae21_dir(tmp_path_factory):
    from helpers import diffusers_vae21

    ref = diffusers_vae21()
    path = tmp_path_factory.mktemp("model21") / "vae"
    ref.save_pretrained(path)
    return ref, path


def test_decode_qwenimage21_writes_rgba_pngs(vae21_dir, tmp_path, capsys):
    ref, path = vae21_dir
    z = torch.randn(1, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    lat = latents_file(tmp_path, latents=z)
    code, out, err = run_cli(capsys, "decode", lat, "--vae", path.parent, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    image = Image.open(tmp_path / "out" / "lat.png")
    assert image.mode == "RGBA" and image.size == (32, 24)
    with torch.no_grad():
        expected = ref.decode(z.unsqueeze(2)).sample[0, :, 0]
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1


def test_decode_wrong_latent_channels_for_qwenimage21(vae21_dir, tmp_path, capsys):
    _, path = vae21_dir
    lat = latents_file(tmp_path, latents=torch.zeros(1, 16, 3, 4))
    code, _, err = run_cli(capsys, "decode", lat, "--vae", path, "-o", tmp_path / "out", "--device", "cpu")
    assert code != 0 and "6" in err and len(err.strip().splitlines()) == 1, err


def test_bench_qwenimage21(vae21_dir, tmp_path, capsys):
    _, path = vae21_dir
    js = tmp_path / "b.json"
    code, out, err = run_cli(capsys, "bench", "--vae", path, "--sizes", "32,48x32", "--modes", "untiled,exact,blend",
                             "--repeats", "1", "--device", "cpu", "--json", js)
    assert code == 0, err
    rows = json.loads(js.read_text())["results"]
    assert [r["mode"] for r in rows] == ["untiled", "exact", "blend"] * 2
    assert rows[1]["max_abs_diff"] <= 1e-5  # exact tiling
    code, _, err = run_cli(capsys, "bench", "--model", "qwenimage21", "--frames", "2", "--device", "cpu", "--json", js)
    assert code != 0 and "image model" in err and len(err.strip().splitlines()) == 1
