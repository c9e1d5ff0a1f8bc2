"""`qwenfast generate`: bad input gets one clear line on stderr and exit status 2, before anything
is loaded (each case here returns in well under a second)."""

from __future__ import annotations

import json

import pytest

from qwenfast.cli import main


def qwen_image_dir(tmp_path, cls="QwenImagePipeline", subfolders=("vae", "transformer", "scheduler")):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    for sub in subfolders:
        (model / sub).mkdir()
    return model


def fails(capsys, *argv) -> str:
    assert main(["generate", "--prompt", "a cat", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qwenfast generate: error: "), err  # one line, no traceback
    return err


def test_missing_model_dir(tmp_path, capsys):
    assert "no such directory" in fails(capsys, "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png"))


def test_directory_without_model_index(tmp_path, capsys):
    assert "no model_index.json" in fails(capsys, "--model", str(tmp_path), "-o", str(tmp_path / "a.png"))


def test_other_pipeline_class(tmp_path, capsys):
    model = qwen_image_dir(tmp_path, cls="StableDiffusionPipeline")
    err = fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"))
    assert "StableDiffusionPipeline" in err and "QwenImagePipeline" in err and "QwenImage21Pipeline" in err


def test_broken_model_index(tmp_path, capsys):
    model = qwen_image_dir(tmp_path)
    (model / "model_index.json").write_text("{not json")
    assert "not readable JSON" in fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"))


def test_missing_component(tmp_path, capsys):
    model = qwen_image_dir(tmp_path, subfolders=("vae", "scheduler"))
    assert "transformer/" in fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"))


@pytest.mark.parametrize("flag,value", [("--height", "1000"), ("--width", "1336"), ("--height", "0"), ("--width", "-16")])
def test_size_not_a_multiple_of_16(tmp_path, capsys, flag, value):
    model = qwen_image_dir(tmp_path)
    err = fails(capsys, "--model", str(model), flag, value, "-o", str(tmp_path / "a.png"))
    assert f"{flag} {value}" in err and "multiple of 16" in err


def test_bad_steps_output_and_vae_config(tmp_path, capsys):
    model = qwen_image_dir(tmp_path)
    assert "--steps 0" in fails(capsys, "--model", str(model), "--steps", "0", "-o", str(tmp_path / "a.png"))
    assert "does not exist" in fails(capsys, "--model", str(model), "-o", str(tmp_path / "no" / "a.png"))
    assert "image file" in fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.txt"))
    err = fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"), "--vae-config.exact-tile-sample-size", "12")
    assert "exact_tile_sample_size" in err


# -- end to end: a tiny random Qwen-Image directory written here (tokenizer and text encoder too) ---


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    import torch
    from diffusers import QwenImagePipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    from test_diffusers import tiny_pipeline

    from helpers import byte_level_vocab

    tok = transformers.Qwen2Tokenizer(vocab=byte_level_vocab(), merges=[])
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=len(tok), max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=24, num_heads=2, intermediate_size=16,
                           fullatt_block_indexes=[0]),
    )
    torch.manual_seed(0)
    parts = tiny_pipeline().components
    pipe = QwenImagePipeline(**{**parts, "tokenizer": tok,
                                "text_encoder": transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()})
    path = tmp_path_factory.mktemp("qwen-image-tiny")
    pipe.save_pretrained(path)
    return path


def reference_image(model_dir, seed, steps, height, width):
    """diffusers' own pipeline, unaccelerated, as uint8 (H, W, 3)."""
    import numpy as np
    import torch
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a cat", negative_prompt=" ", true_cfg_scale=4.0, height=height, width=width,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def test_generate_writes_diffusers_image(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    out = tmp_path / "cat.png"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "-o", str(out), "--steps", "2",
            "--seed", "7", "--height", "32", "--width", "48", "--device", "cpu"]
    assert main(argv + ["--vae-config.use-tiling", "--vae-config.exact-tile-sample-size", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == (32, 48, 3)
    expected = reference_image(tiny_model_dir, seed=7, steps=2, height=32, width=48)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # one uint8 step of rounding


def test_generate_under_torchrun_two_ranks(tiny_model_dir, tmp_path):
    # Two CPU ranks (gloo): rank 0 denoises and broadcasts, both decode, rank 0 writes.
    import numpy as np
    from PIL import Image

    from helpers import torchrun

    out = tmp_path / "cat.png"
    done = torchrun(["generate", "--model", tiny_model_dir, "--prompt", "a cat", "-o", out, "--steps", "2",
                     "--seed", "7", "--height", "32", "--width", "48", "--device", "cpu"])
    assert done.returncode == 0, "stdout: " + done.stdout[-1000:] + "\nstderr: " + done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # rank 0 only
    expected = reference_image(tiny_model_dir, seed=7, steps=2, height=32, width=48)
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_empty_component_folders_are_named(tmp_path, capsys):
    model = qwen_image_dir(tmp_path)  # vae/, transformer/, scheduler/ all empty
    err = fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"))
    assert "the vae/ subfolder is empty" in err and "the transformer/ subfolder is empty" in err
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (model / "vae" / "config.json").write_text("{}")
    assert "vae/ holds no .safetensors weights" in fails(capsys, "--model", str(model), "-o", str(tmp_path / "a.png"))


def test_existing_output_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    out.write_bytes(b"keep me")
    err = fails(capsys, "--model", str(tiny_model_dir), "-o", str(out), "--device", "cpu")
    assert "exists; pass --overwrite" in err and out.read_bytes() == b"keep me"


def test_generate_loads_the_vae_through_qwenfast_only(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKLQwenImage

    def refuse(*a, **k):
        raise AssertionError("diffusers' from_pretrained loaded the VAE (it may fall back to .bin pickles)")

    monkeypatch.setattr(AutoencoderKLQwenImage, "from_pretrained", classmethod(refuse))
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "-o", str(out), "--steps", "1",
                 "--height", "32", "--width", "32", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert out.is_file()


def test_vae_load_failure_is_told_by_every_rank(tiny_model_dir, tmp_path):
    import shutil

    from helpers import torchrun

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    done = torchrun(["generate", "--model", model, "--prompt", "a cat", "-o", tmp_path / "cat.png", "--steps", "1",
                     "--height", "32", "--width", "32", "--device", "cpu"], timeout=240)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("qwenfast generate: error: ")]
    assert len(ours) == 2 and all("the VAE: cannot read" in line for line in ours), done.stderr[-3000:]
    assert "UnboundLocalError" not in done.stderr and "/qwenfast/" not in done.stderr
    assert not (tmp_path / "cat.png").exists()


def test_only_qwenfast_parallel_imports_torch_distributed():
    # issue 10: the process group is handled in one place (qwenfast.parallel.group)
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "qwenfast"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "parallel" not in p.relative_to(src).parts[:1]
                 and re.search(r"^\s*(import torch\.distributed|from torch\.distributed|from torch import distributed)",
                               p.read_text(), re.M)]
    assert offenders == []
