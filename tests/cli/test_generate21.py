"""`qwenfast generate` on a Qwen-Image-2.1 directory (`QwenImage21Pipeline`): a tiny random one saved
here with diffusers' `save_pretrained` (VAE, DiT, a one-layer Qwen3-VL text encoder, a byte-level
Qwen3VLProcessor; `helpers`), run through the CLI in-process and on two torchrun ranks. The RGBA PNG
it writes must equal, within one uint8 step, what diffusers' pipeline (plain and accelerated) gives
for the same seed; sizes that are not multiples of 32 are refused in one line before anything loads.

transformers' Qwen3VLProcessor needs torchvision for its video processor, which the test machines
lack: a stand-in takes its place (`helpers.text_only_qwen3vl`; text-to-image never calls it).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers.pipelines.qwenimage21")
pytest.importorskip("transformers")

from helpers import text_only_qwen3vl, tiny_qwen3vl_processor, tiny_qwen3vl_text_encoder, torchrun  # noqa: E402

from qwenfast.cli import main  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("integrations", "dit")]
from test_diffusers21 import tiny_vae  # noqa: E402  (16x, z_dim 8, latents_mean/std not trivial)
from test_qwen_image21 import TINY, make_transformer  # noqa: E402

H, W = 32, 64  # a 2 x 4 latent (16x): 8 target tokens, 2 mask slots of 2x2
TEXT_ONLY_QWEN3VL = Path(__file__).with_name("text_only_qwen3vl.py")


@pytest.fixture(scope="module")
def tiny21_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    with text_only_qwen3vl():
        processor = tiny_qwen3vl_processor()
        pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                                   text_encoder=tiny_qwen3vl_text_encoder(processor, TINY["context_in_dim"]),
                                   processor=processor, transformer=make_transformer())
        path = tmp_path_factory.mktemp("qwen-image-21-tiny")
        pipe.save_pretrained(path)
    return path


@pytest.fixture
def text_only():
    with text_only_qwen3vl():
        yield


def reference_images(model_dir, seed, steps, true_cfg_scale):
    """diffusers' own pipeline, plain and accelerated, as uint8 (H, W, 4) each."""
    import numpy as np
    import torch
    from diffusers import QwenImage21Pipeline

    from qwenfast.integrations.diffusers import accelerate

    with text_only_qwen3vl():
        pipe = QwenImage21Pipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for _ in ("plain", "accelerated"):
        out = pipe(prompt="a cat", negative_prompt=" " if true_cfg_scale > 1 else None, true_cfg_scale=true_cfg_scale,
                   height=H, width=W, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
        images.append((out * 255).round().astype(np.uint8))
        accelerate(pipe)
    return images


def read_rgba(path):
    import numpy as np
    from PIL import Image

    image = Image.open(path)
    assert image.mode == "RGBA", image.mode  # the alpha channel was kept
    return np.asarray(image)


def assert_within_one_step(got, expected):
    import numpy as np

    assert got.shape == expected.shape == (H, W, 4)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # one uint8 step of rounding
    assert expected[..., 3].min() < 250  # a real alpha channel: an opaque 255 everywhere would hide a dropped one


def argv(model_dir, out, *more):
    return ["generate", "--model", str(model_dir), "--prompt", "a cat", "-o", str(out), "--seed", "7",
            "--height", str(H), "--width", str(W), "--device", "cpu", *map(str, more)]


def test_generate21_writes_the_pipelines_rgba_image(tiny21_dir, tmp_path, capsys, text_only, monkeypatch):
    from diffusers import AutoencoderKLQwenImage21

    def refuse(*a, **k):
        raise AssertionError("diffusers' from_pretrained loaded the VAE (it may fall back to .bin pickles)")

    monkeypatch.setattr(AutoencoderKLQwenImage21, "from_pretrained", classmethod(refuse))
    out = tmp_path / "cat.png"
    assert main(argv(tiny21_dir, out, "--steps", 2)) == 0, capsys.readouterr().err  # no CFG: 2.1's default
    assert f"wrote {out} ({W}x{H}, 2 steps, seed 7)" in capsys.readouterr().out
    monkeypatch.undo()  # the references load the pipeline as diffusers does
    plain, accelerated = reference_images(tiny21_dir, seed=7, steps=2, true_cfg_scale=1.0)
    got = read_rgba(out)
    assert_within_one_step(got, accelerated)
    assert_within_one_step(got, plain)


def test_generate21_runs_the_models_own_schedule(tiny21_dir, tmp_path, capsys, text_only):
    # model_index.json's sample_sigmas make the pipeline ignore num_inference_steps: without --steps
    # they run (2 steps: [1, 0.5], the linear grid of 2); with --steps 2 the same grid is asked for.
    model = tmp_path / "model"
    shutil.copytree(tiny21_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "sample_sigmas": [1.0, 0.5]}))
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(argv(model, first)) == 0, capsys.readouterr().err
    assert "2 steps" in capsys.readouterr().out
    assert main(argv(model, second, "--steps", 2)) == 0
    _, accelerated = reference_images(tiny21_dir, seed=7, steps=2, true_cfg_scale=1.0)
    assert_within_one_step(read_rgba(first), accelerated)
    assert (read_rgba(second) == read_rgba(first)).all()


def test_generate21_under_torchrun_two_ranks(tiny21_dir, tmp_path):
    # Two CPU ranks (gloo): rank 0 encodes the prompt and denoises (true CFG), broadcasts the latent;
    # both ranks decode their patch of it; rank 0 writes.
    out = tmp_path / "cat.png"
    done = torchrun(argv(tiny21_dir, out, "--steps", 2, "--true-cfg-scale", 4, "--vae-config.use-parallel-decode",
                         "--vae-config.parallel-decode-mode", "patch"), script=TEXT_ONLY_QWEN3VL)
    assert done.returncode == 0, "stdout: " + done.stdout[-1000:] + "\nstderr: " + done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # rank 0 only
    plain, accelerated = reference_images(tiny21_dir, seed=7, steps=2, true_cfg_scale=4.0)
    got = read_rgba(out)
    assert_within_one_step(got, accelerated)
    assert_within_one_step(got, plain)


# -- bad input: one line, before anything is loaded ----------------------------------------------


def qwen_image21_dir(tmp_path, **entries):
    model = tmp_path / "model21"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline", **entries}))
    return model


def fails(capsys, *args) -> str:
    assert main(["generate", "--prompt", "a cat", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qwenfast generate: error: "), err  # one line, no traceback
    return err


@pytest.mark.parametrize("flag,value", [("--height", 48), ("--width", 1328), ("--height", 16), ("--width", 0)])
def test_generate21_size_not_a_multiple_of_32(tmp_path, capsys, flag, value):
    # 48 and 1328 are fine for Qwen-Image (16) and would be rounded down by the 2.1 pipeline itself.
    model = qwen_image21_dir(tmp_path)  # no component folders: the size is told first
    err = fails(capsys, "--model", model, flag, value, "-o", tmp_path / "a.png")
    assert f"{flag} {value}: must be a positive multiple of 32 for Qwen-Image-2.1" in err


def test_generate21_default_size_and_rgba_outputs(tmp_path, capsys):
    model = qwen_image21_dir(tmp_path)
    # the default size (1024) passes the size check: what fails next is the missing components
    assert "missing the vae/ subfolder" in fails(capsys, "--model", model, "-o", tmp_path / "a.png")
    for name in ("a.jpg", "a.bmp"):  # JPEG cannot hold RGBA, Pillow's BMP drops the alpha
        err = fails(capsys, "--model", model, "-o", tmp_path / name)
        assert "images are RGBA" in err and ".png" in err


def test_generate21_component_of_the_other_model(tmp_path, capsys):
    model = qwen_image21_dir(tmp_path, vae=["diffusers", "AutoencoderKLQwenImage"])
    err = fails(capsys, "--model", model, "-o", tmp_path / "a.png")
    assert "names a AutoencoderKLQwenImage for vae/" in err and "AutoencoderKLQwenImage21" in err


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is not None,
                    reason="torchvision is installed: the processor loads")
def test_generate21_without_torchvision_says_so(tiny21_dir, tmp_path, capsys):
    assert main(argv(tiny21_dir, tmp_path / "cat.png", "--steps", 1)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after diffusers' loading bar
    assert last.startswith("qwenfast generate: error: ") and "requires `torchvision`" in last, err
    assert "Traceback" not in err and not (tmp_path / "cat.png").exists()


def test_help_names_both_models(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "QwenImagePipeline or QwenImage21Pipeline" in text
    assert "a multiple of 16 for Qwen-Image, 32 for Qwen-Image-2.1" in text
