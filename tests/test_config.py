"""VAEConfig: validation names the field, the value and what is allowed; every CLI flag form."""

import argparse
import dataclasses

import pytest

from qwenfast import VAEConfig


def parse(*argv):
    parser = VAEConfig.add_cli_args(argparse.ArgumentParser())
    return VAEConfig.from_cli_args(parser.parse_args(list(argv)))


def test_defaults_are_diffusers_and_single_device():
    cfg = VAEConfig()
    assert (cfg.use_parallel_decode, cfg.parallel_decode_mode, cfg.use_tiling, cfg.tiling) == (False, "tiled", False, "exact")
    assert (cfg.tile_sample_min_height, cfg.tile_sample_stride_height) == (256, 192)
    assert (cfg.tile_sample_min_num_frames, cfg.tile_sample_stride_num_frames) == (16, 12)
    assert parse() == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(parallel_decode_mode="rows"), r"parallel_decode_mode must be one of 'tiled', 'patch', 'auto'; got 'rows'"),
    (dict(tiling="fancy"), r"tiling must be one of 'exact', 'blend'; got 'fancy'"),
    (dict(parallel_output="rank1"), r"parallel_output must be one of"),
    (dict(tile_sample_min_height=0), r"tile_sample_min_height must be positive; got 0"),
    (dict(tile_sample_stride_width=-8), r"tile_sample_stride_width must be positive; got -8"),
    (dict(tile_sample_stride_height=264), r"tile_sample_stride_height \(264\) must not exceed VAEConfig.tile_sample_min_height \(256\)"),
    (dict(tile_sample_stride_num_frames=20), r"tile_sample_stride_num_frames \(20\) must not exceed"),
    (dict(exact_tile_sample_size=100), r"exact_tile_sample_size must be a multiple of 8 .*; got 100"),
    (dict(tile_margin=-1), r"tile_margin must be non-negative; got -1"),
    (dict(use_tiling="yes"), r"use_tiling must be a bool"),
])
def test_validation_names_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


@pytest.mark.parametrize("argv,expected", [
    (["--vae-config.use-parallel-decode"], True),
    (["--vae-config.use-parallel-decode", "true"], True),
    (["--vae-config.use-parallel-decode", "1"], True),
    (["--vae-config.use-parallel-decode", "yes"], True),
    (["--vae-config.use-parallel-decode", "false"], False),
    (["--vae-config.use-parallel-decode", "0"], False),
    (["--vae-config.use-parallel-decode", "No"], False),
    (["--vae-config.use-parallel-decode=true"], True),
])
def test_bool_flag_forms(argv, expected):
    assert parse(*argv).use_parallel_decode is expected


def test_bool_flag_rejects_garbage(capsys):
    with pytest.raises(SystemExit):
        parse("--vae-config.use-parallel-decode", "maybe")
    assert "expected a boolean" in capsys.readouterr().err


def test_choice_int_and_optional_flags():
    cfg = parse("--vae-config.parallel-decode-mode", "patch", "--vae-config.use-tiling",
                "--vae-config.tiling", "blend", "--vae-config.tile-sample-min-height", "512",
                "--vae-config.tile-margin", "16")
    assert (cfg.parallel_decode_mode, cfg.use_tiling, cfg.tiling, cfg.tile_sample_min_height, cfg.tile_margin) == \
        ("patch", True, "blend", 512, 16)
    assert parse("--vae-config.tile-margin", "auto").tile_margin is None
    with pytest.raises(SystemExit):
        parse("--vae-config.parallel-decode-mode", "rows")


def test_cli_validation_error_is_a_value_error():
    with pytest.raises(ValueError, match="tile_sample_stride_height"):
        parse("--vae-config.tile-sample-stride-height", "512")


def test_every_field_has_a_flag_with_help():
    help_text = VAEConfig.add_cli_args(argparse.ArgumentParser()).format_help()
    for f in dataclasses.fields(VAEConfig):
        assert "--vae-config." + f.name.replace("_", "-") in help_text
    assert "receptive field" in " ".join(help_text.split())  # the field docstrings are the help


def test_collective_timeout_default_flag_and_validation():
    assert VAEConfig().collective_timeout_s == 300.0
    assert parse("--vae-config.collective-timeout-s", "2.5").collective_timeout_s == 2.5
    assert parse("--vae-config.collective-timeout-s=45").collective_timeout_s == 45.0
    with pytest.raises(SystemExit):
        parse("--vae-config.collective-timeout-s", "soon")
    for bad in (0, -1.0, float("nan"), float("inf"), True, "300"):
        with pytest.raises(ValueError, match=r"collective_timeout_s must be a positive, finite number of seconds"):
            VAEConfig(collective_timeout_s=bad)
    assert VAEConfig(collective_timeout_s=5).collective_timeout_s == 5  # an int is a number of seconds too


@pytest.mark.parametrize("field,value,match", [
    ("tiling", "fuzzy", r"tiling must be one of 'exact', 'blend'; got 'fuzzy'"),
    ("use_tiling", "yes", r"use_tiling must be a bool"),
    ("tile_sample_stride_height", 512, r"tile_sample_stride_height \(512\) must not exceed"),
    ("exact_tile_sample_size", 100, r"exact_tile_sample_size must be a multiple of 8"),
    ("tile_margin", -1, r"tile_margin must be non-negative; got -1"),
])
def test_assignment_after_construction_is_validated_and_leaves_the_config_unchanged(field, value, match):
    cfg = VAEConfig()
    with pytest.raises(ValueError, match=match):
        setattr(cfg, field, value)
    assert cfg == VAEConfig()  # the bad value was never stored


def test_valid_assignment_and_copies_still_work():
    import copy
    import pickle

    cfg = VAEConfig()
    cfg.tiling = "blend"
    cfg.tile_margin = None
    cfg.use_tiling = True
    assert (cfg.tiling, cfg.use_tiling) == ("blend", True)
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), cfg.replace(progress=True)):
        assert other.tiling == "blend"
        with pytest.raises(ValueError, match="tiling must be one of"):
            other.tiling = "fuzzy"


def test_assigning_an_unknown_field_is_refused():
    cfg = VAEConfig()
    with pytest.raises(AttributeError, match=r"VAEConfig has no field 'use_tilling'"):
        cfg.use_tilling = True
