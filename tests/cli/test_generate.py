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
    assert "StableDiffusionPipeline" in err and "QwenImagePipeline" in err


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
