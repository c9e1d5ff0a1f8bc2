"""Loading: state-dict round trips with strict=True, directories written by diffusers' save_pretrained,
and an error that names what broke for every way a directory can be wrong."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import ARCHS, TINY, diffusers_vae, max_diff, pair
from qwenfast import QwenImageVAE, VAEConfig
from qwenfast.vae.qwen_image import WAN21_KEYS
from qwenfast.vae.weights import WeightsError


@pytest.mark.parametrize("arch", sorted(ARCHS) + ["attn"])
def test_state_dict_round_trip_strict_both_ways(arch):
    arch = dict(TINY, attn_scales=[1.0, 0.5]) if arch == "attn" else ARCHS[arch]
    ref = diffusers_vae(arch)
    ours = QwenImageVAE(**arch)
    ours.load_state_dict(ref.state_dict(), strict=True)
    fresh = diffusers_vae(arch, seed=1)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, ref.state_dict()[name]), name


def test_from_diffusers_shares_dtype_device_and_weights():
    ref = diffusers_vae().to(torch.float64)
    ours = QwenImageVAE.from_diffusers(ref, vae_config=VAEConfig(use_tiling=True))
    assert ours.dtype == torch.float64 and ours.vae_config.use_tiling
    assert ours.decoder.conv_in.weight.data_ptr() == ref.decoder.conv_in.weight.data_ptr()
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


def test_from_diffusers_refuses_other_modules():
    with pytest.raises(TypeError, match="AutoencoderKLQwenImage"):
        QwenImageVAE.from_diffusers(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A diffusers VAE and the directory its save_pretrained wrote."""
    ref = diffusers_vae()
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path)
    return ref, path


@torch.no_grad()
def test_from_pretrained_decodes_like_diffusers(saved):
    ref, path = saved
    vae = QwenImageVAE.from_pretrained(path)
    z = torch.randn(1, 4, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    assert max_diff(vae.decode(z), ref.decode(z).sample) <= 1e-4
    assert vae.config["latents_std"] == TINY["latents_std"]


def test_from_pretrained_dtype_and_model_dir_with_vae_subfolder(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    vae = QwenImageVAE.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert vae.dtype == torch.bfloat16 and vae.device.type == "cpu"


def test_from_pretrained_sharded(tmp_path):
    ref = diffusers_vae()
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    vae = QwenImageVAE.from_pretrained(tmp_path)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[name], tensor), name


def _copy(saved, tmp_path):
    shutil.copytree(saved[1], tmp_path / "v")
    return tmp_path / "v"


def _edit_config(d, **changes):
    """config.json of directory `d` with `changes` over its keys."""
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, **changes)))


def _edit_weights(d, edit):
    """The single safetensors file of `d`, rewritten after `edit(state)` (in place)."""
    from safetensors.torch import load_file, save_file

    file = d / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such VAE directory"):
        QwenImageVAE.from_pretrained(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(WeightsError, match="is a file"):
        QwenImageVAE.from_pretrained(tmp_path / "f")
    with pytest.raises(WeightsError, match="holds no VAE"):
        QwenImageVAE.from_pretrained(tmp_path)


def test_safetensors_only(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, d / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        QwenImageVAE.from_pretrained(d)


def test_weights_that_do_not_fit_the_config_are_named(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_config(d, base_dim=16)
    with pytest.raises(WeightsError, match=r"wrong shapes .*decoder\.conv_in\.weight"):
        QwenImageVAE.from_pretrained(d)


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    def edit(state):
        del state["decoder.conv_out.bias"]
        state["decoder.extra.weight"] = torch.zeros(1)

    d = _copy(saved, tmp_path)
    _edit_weights(d, edit)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder\.conv_out\.bias.*unexpected keys \(1\): decoder\.extra\.weight"):
        QwenImageVAE.from_pretrained(d)


def test_wrong_model_class_and_bad_json(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_config(d, _class_name="AutoencoderKL")
    with pytest.raises(WeightsError, match="describes a AutoencoderKL"):
        QwenImageVAE.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        QwenImageVAE.from_pretrained(d)


def test_corrupt_safetensors(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read"):
        QwenImageVAE.from_pretrained(d)


# --------------------------------------------------------------------------------------------------
# The sharded index, followed exactly (issue 9, item 5)
# --------------------------------------------------------------------------------------------------

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_saved(tmp_path_factory):
    """A directory written by diffusers' save_pretrained with several shards."""
    ref = diffusers_vae()
    path = tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(path, max_shard_size="200KB")
    return ref, path


def _sharded_copy(sharded_saved, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(sharded_saved[1], d)
    index = json.loads((d / INDEX).read_text())
    return d, index


def _write_index(d, index):
    (d / INDEX).write_text(json.dumps(index))


def _two_shards(index):
    """(a key, its shard, another shard)."""
    weight_map = index["weight_map"]
    key = sorted(weight_map)[0]
    other = sorted(set(weight_map.values()) - {weight_map[key]})[0]
    return key, weight_map[key], other


def test_sharded_index_loads_each_key_from_its_own_shard(sharded_saved, tmp_path):
    """A stray zero-filled copy of a key in another shard is refused, not loaded (it used to win)."""
    from safetensors.torch import load_file, save_file

    d, index = _sharded_copy(sharded_saved, tmp_path)
    key, _, other = _two_shards(index)
    assert len(set(index["weight_map"].values())) >= 3
    state = load_file(d / other)
    state[key] = torch.zeros_like(sharded_saved[0].state_dict()[key])
    save_file(state, d / other)
    with pytest.raises(WeightsError, match=rf"{other} holds {key}, which {INDEX} does not map to it"):
        QwenImageVAE.from_pretrained(d)


def test_sharded_index_key_mapped_to_a_shard_without_it(sharded_saved, tmp_path):
    d, index = _sharded_copy(sharded_saved, tmp_path)
    key, _, other = _two_shards(index)
    index["weight_map"][key] = other
    _write_index(d, index)
    with pytest.raises(WeightsError, match=rf"maps {key} to {other}, which does not hold it"):
        QwenImageVAE.from_pretrained(d)


def test_sharded_index_key_absent_from_the_map(sharded_saved, tmp_path):
    d, index = _sharded_copy(sharded_saved, tmp_path)
    key, shard, _ = _two_shards(index)
    del index["weight_map"][key]
    _write_index(d, index)
    with pytest.raises(WeightsError, match=rf"{shard} holds {key}, which"):
        QwenImageVAE.from_pretrained(d)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "sub/../.."])
def test_sharded_index_refuses_shards_outside_the_directory(sharded_saved, tmp_path, where):
    d, index = _sharded_copy(sharded_saved, tmp_path)
    key, shard, _ = _two_shards(index)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / shard, outside)  # a complete, valid shard: only its place is wrong
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors",
            "sub/../..": "sub/../../outside.safetensors"}[where]
    if where == "symlink":
        (d / name).symlink_to(outside)
    (d / "sub").mkdir()
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    _write_index(d, index)
    with pytest.raises(WeightsError, match="outside|absolute path"):
        QwenImageVAE.from_pretrained(d)


def test_sharded_index_in_a_hugging_face_cache_layout_loads(sharded_saved, tmp_path):
    """Hub snapshots are symlinks into the repository's blobs/: that is inside, not outside."""
    src = sharded_saved[1]
    repo = tmp_path / "models--Qwen--Qwen-Image"
    (repo / "blobs").mkdir(parents=True)
    vae = repo / "snapshots" / "0123abcd" / "vae"
    vae.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (vae / f.name).symlink_to(Path("../../../blobs") / blob.name)
    loaded = QwenImageVAE.from_pretrained(vae.parent)
    for name, tensor in sharded_saved[0].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("text,match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object .*; got a JSON list"),
    ('{"metadata": {}}', "weight_map must be a JSON object .*; got nothing"),
    ('{"weight_map": ["a.safetensors"]}', "weight_map must be a JSON object .*; got a JSON list"),
    ('{"weight_map": "a.safetensors"}', "weight_map must be a JSON object .*; got a JSON string"),
    ('{"weight_map": {}}', "lists no weights"),
    ('{"weight_map": {"decoder.conv_in.weight": 1}}', r"weight_map\['decoder.conv_in.weight'\] must be a shard file name .*; got 1"),
    ('{"weight_map": {"decoder.conv_in.weight": ["a"]}}', r"must be a shard file name .*; got \['a'\]"),
    ('{"weight_map": {"decoder.conv_in.weight": null}}', r"must be a shard file name .*; got None"),
])
def test_malformed_index_is_one_weights_error(sharded_saved, tmp_path, text, match):
    d, _ = _sharded_copy(sharded_saved, tmp_path)
    (d / INDEX).write_text(text)
    with pytest.raises(WeightsError, match=match):
        QwenImageVAE.from_pretrained(d)


def test_sharded_index_naming_a_missing_shard(sharded_saved, tmp_path):
    d, index = _sharded_copy(sharded_saved, tmp_path)
    _, shard, _ = _two_shards(index)
    (d / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shards that are missing: {shard}"):
        QwenImageVAE.from_pretrained(d)


# --------------------------------------------------------------------------------------------------
# The architecture config, validated before anything is built (item 9)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,match", [
    (dict(num_res_blocks=100000000), r"num_res_blocks must be an integer in \[0, 32\]; got 100000000"),
    (dict(num_res_blocks=True), r"num_res_blocks must be an integer in \[0, 32\]; got True"),
    (dict(base_dim=-8), r"base_dim must be an integer in \[1, 1024\]; got -8"),
    (dict(base_dim=1e9), r"base_dim must be an integer in \[1, 1024\]; got 1000000000.0"),
    (dict(base_dim="96"), r"base_dim must be an integer .*; got '96'"),
    (dict(z_dim=None), r"z_dim must be an integer in \[1, 1024\]; got None"),
    (dict(dim_mult=4), r"dim_mult must be a list of 1..8 ints in \[1, 64\]; got 4"),
    (dict(dim_mult=[1, True, 2, 2]), r"dim_mult\[1\] must be an int in \[1, 64\]; got True"),
    (dict(dim_mult=[1, 2, 0, 2]), r"dim_mult\[2\] must be an int in \[1, 64\]; got 0"),
    (dict(base_dim=1024, dim_mult=[1, 2, 4, 64]), r"base_dim \* max\(dim_mult\) = 1024 \* 64 = 65536 channels; at most 8192"),
    (dict(temperal_downsample=[False, True]), r"temperal_downsample must be a list of 3 bools; got \[False, True\]"),
    (dict(temperal_downsample=[0, 1, 1]), r"temperal_downsample\[0\] must be a bool; got 0"),
    (dict(attn_scales="none"), r"attn_scales must be a list of 0..8 numbers"),
    (dict(dropout=2), r"dropout must be a number in \[0, 1\); got 2"),
    (dict(input_channels=0), r"input_channels must be an integer in \[1, 64\]; got 0"),
    (dict(latents_mean=[0.0] * 3), r"latents_mean must be a list of 4 numbers; got \[0.0, 0.0, 0.0\]"),
    (dict(latents_std=[1.0, 1.0, "x", 1.0]), r"latents_std\[2\] must be a number; got 'x'"),
])
def test_bad_architecture_is_refused_by_name_before_building(saved, tmp_path, monkeypatch, edit, match):
    import time

    d = _copy(saved, tmp_path)
    _edit_config(d, **edit)

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before its config was validated")

    monkeypatch.setattr(QwenImageVAE, "__init__", no_build)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=match):
        QwenImageVAE.from_pretrained(d)
    assert time.perf_counter() - start < 1.0


def test_constructor_validates_the_architecture_too():
    with pytest.raises(WeightsError, match=r"num_res_blocks must be an integer in \[0, 32\]; got 100000000"):
        QwenImageVAE(num_res_blocks=100000000)


# --------------------------------------------------------------------------------------------------
# Unreadable and wrong files, devices, dtypes (items 12, 13)
# --------------------------------------------------------------------------------------------------


def test_config_that_is_not_utf8(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "config.json").write_bytes(b'{"z_dim": 4, "base_dim": "\xff\xfe"}')
    with pytest.raises(WeightsError, match=r"config.json is not UTF-8 text \(byte \d+ is 0xff\)"):
        QwenImageVAE.from_pretrained(d)


def _unreadable(monkeypatch, name):
    """open() of files called `name` fails as a chmod 000 file does for a user who is not root."""
    import builtins

    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if Path(str(file)).name == name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("name", ["config.json", "diffusion_pytorch_model.safetensors"])
def test_unreadable_file_is_reported_as_unreadable(saved, tmp_path, monkeypatch, name):
    d = _copy(saved, tmp_path)
    _unreadable(monkeypatch, name)
    with pytest.raises(WeightsError, match=rf"cannot read .*{name}: Permission denied"):
        QwenImageVAE.from_pretrained(d)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_chmod_000_config_is_reported_as_unreadable(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "config.json").chmod(0)
    with pytest.raises(WeightsError, match="cannot read .*config.json"):
        QwenImageVAE.from_pretrained(d)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_non_floating_weights_are_refused(saved, tmp_path, dtype):
    d = _copy(saved, tmp_path)
    _edit_weights(d, lambda state: state.update({"decoder.conv_in.weight": state["decoder.conv_in.weight"].to(dtype)}))
    with pytest.raises(WeightsError, match=r"non-floating-point weights: decoder\.conv_in\.weight .*must be floating point"):
        QwenImageVAE.from_pretrained(d)


def test_mixed_dtype_weights_need_a_dtype(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_weights(d, lambda state: state.update({"decoder.conv_in.weight": state["decoder.conv_in.weight"].half()}))
    with pytest.raises(WeightsError, match=r"mix dtypes \(float16, float32\): pass dtype="):
        QwenImageVAE.from_pretrained(d)
    assert QwenImageVAE.from_pretrained(d, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:7", "xla", "nonsense"])
def test_unavailable_device_is_one_line_before_any_file_is_read(tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > int(device[5:] or 0):
        pytest.skip("this machine has the device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    with pytest.raises(ValueError, match=rf"device '{device}'( is not available| does not exist| is not a device name|: qwenfast loads)"):
        QwenImageVAE.from_pretrained(tmp_path / "does-not-exist", device=device)


def test_decode_refuses_fp8_latents():
    _, ours = pair()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int64):
        with pytest.raises(TypeError, match=rf"decode expects latents of dtype float16, bfloat16, float32, float64; got {dtype}"):
            ours.decode(torch.zeros(1, 4, 3, 3).to(dtype))


def test_encode_refuses_non_floating_pixels():
    _, ours = pair()
    with pytest.raises(TypeError, match=r"encode expects pixels as floats in \[-1, 1\] .*got torch.uint8 \(uint8 images: x.float\(\) / 127.5 - 1\)"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="pixels as floats in"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# variant= (item 15)
# --------------------------------------------------------------------------------------------------


def test_variant_fp16_single_file_keeps_the_stored_dtype(tmp_path):
    ref = diffusers_vae().half()
    ref.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    vae = QwenImageVAE.from_pretrained(tmp_path, variant="fp16")
    assert vae.dtype == torch.float16  # no dtype: the stored dtype is kept
    for name, tensor in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[name], tensor), name
    assert QwenImageVAE.from_pretrained(tmp_path, variant="fp16", dtype=torch.float32).dtype == torch.float32


def test_variant_fp16_sharded(tmp_path):
    ref = diffusers_vae().half()
    ref.save_pretrained(tmp_path, variant="fp16", max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    vae = QwenImageVAE.from_pretrained(tmp_path, variant="fp16")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[name], tensor), name


def test_missing_variant_names_the_files_found(saved, tmp_path):
    d = _copy(saved, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.fp16.safetensors or "
                       r"diffusion_pytorch_model.safetensors.index.fp16.json in .* \(found diffusion_pytorch_model.safetensors for variant='fp16'\)"):
        QwenImageVAE.from_pretrained(d, variant="fp16")
    (d / "diffusion_pytorch_model.safetensors").rename(d / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(FileNotFoundError, match=r"found diffusion_pytorch_model.fp16.safetensors; variant='fp16' would load it"):
        QwenImageVAE.from_pretrained(d)
    with pytest.raises(ValueError, match="variant must be a name such as 'fp16'"):
        QwenImageVAE.from_pretrained(d, variant="../fp16")


# --------------------------------------------------------------------------------------------------
# One loader for every model class; directories told apart by _class_name (point 7)
# --------------------------------------------------------------------------------------------------


def test_a_qwen_image_21_directory_is_redirected(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_config(d, _class_name="AutoencoderKLQwenImage21")
    with pytest.raises(WeightsError, match=r"is a Qwen-Image-2.1 VAE \(AutoencoderKLQwenImage21\): "
                                           r"load it with qwenfast.QwenImage21VAE"):
        QwenImageVAE.from_pretrained(d)


def test_from_diffusers_redirects_a_qwen_image_21_module():
    from diffusers import AutoencoderKLQwenImage21

    module = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2],
                                      temperal_downsample=[False, True, True], num_res_blocks=1,
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(TypeError, match=r"is a Qwen-Image-2.1 VAE \(AutoencoderKLQwenImage21\): "
                                        r"load it with qwenfast.QwenImage21VAE"):
        QwenImageVAE.from_diffusers(module)


class _Affine(torch.nn.Module):
    """A model class the loader has never heard of: it only declares the three attributes."""

    diffusers_class_names = ("AutoencoderKLQwenImage21",)
    arch_keys = ("width",)

    @classmethod
    def validate_arch(cls, arch):
        from qwenfast.vae.weights import arch_int

        arch_int(arch, "width", 1, 64)

    def __init__(self, width, vae_config=None):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)


def test_the_loader_serves_any_model_class(tmp_path):
    from safetensors.torch import save_file

    from qwenfast.vae.weights import load_pretrained

    src = _Affine(3)
    save_file(src.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage21", "width": 3, "z_dim": 4}))
    loaded = load_pretrained(_Affine, tmp_path)
    assert torch.equal(loaded.proj.weight, src.proj.weight) and not loaded.training
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage21", "width": 100}))
    with pytest.raises(WeightsError, match=r"width must be an integer in \[1, 64\]; got 100"):
        load_pretrained(_Affine, tmp_path)


def test_a_qwen_image_directory_is_redirected_from_another_class(saved):
    from qwenfast.vae.weights import load_pretrained

    with pytest.raises(WeightsError, match=r"is a Qwen-Image VAE \(AutoencoderKLQwenImage\): load it with qwenfast.QwenImageVAE, not _Affine"):
        load_pretrained(_Affine, saved[1])


# --------------------------------------------------------------------------------------------------
# Wan 2.1 through QwenImageVAE; Wan 2.2 refused (issue 12, item 3)
# --------------------------------------------------------------------------------------------------


def _wan(**overrides):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return model


WAN22 = dict(base_dim=8, decoder_base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], is_residual=True, patch_size=2,
             in_channels=12, out_channels=12, latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_spatial=16)


@torch.no_grad()
def test_wan21_vae_decodes_like_diffusers_through_both_loaders(tmp_path):
    ref = _wan()
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    g = torch.Generator().manual_seed(0)
    image, video = torch.randn(1, 4, 1, 5, 7, generator=g), torch.randn(1, 4, 3, 5, 7, generator=g)
    for vae in (QwenImageVAE.from_diffusers(ref), QwenImageVAE.from_pretrained(tmp_path)):
        assert max_diff(vae.decode(image[:, :, 0]), ref.decode(image).sample[:, :, 0]) <= 1e-5
        assert max_diff(vae.decode(video), ref.decode(video).sample) <= 1e-5
        x = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
        assert max_diff(vae.encode(x), ref.encode(x).latent_dist.mode()) <= 1e-5


def test_wan22_vae_is_refused_by_name_through_both_loaders(tmp_path):
    ref = _wan(**WAN22)
    match = (r"a Wan 2.2 VAE \(decoder_base_dim=16, is_residual=True, in_channels=12, out_channels=12, patch_size=2, "
             r"scale_factor_spatial=16, z_dim=8\) is not supported by QwenImageVAE, which is the Wan 2.1 design")
    with pytest.raises(WeightsError, match=match):
        QwenImageVAE.from_diffusers(ref)
    ref.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match=match):
        QwenImageVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (dict(in_channels=4, out_channels=4), r"QwenImageVAE cannot build in_channels=4, out_channels=4: it needs in_channels=input_channels"),
    (dict(scale_factor_spatial=16), r"cannot build scale_factor_spatial=16: it needs scale_factor_spatial=None or 2\*\*len"),
    (dict(is_residual=0), r"a Wan 2.2 VAE \(is_residual=0|cannot build is_residual=0"),
])
def test_wan_keys_other_than_wan21s_are_refused_by_name(tmp_path, edit, match):
    _wan().save_pretrained(tmp_path)
    _edit_config(tmp_path, **edit)
    with pytest.raises(WeightsError, match=match):
        QwenImageVAE.from_pretrained(tmp_path)


@torch.no_grad()
def test_wan21_config_without_the_wan22_keys_loads(tmp_path):
    """The released Wan 2.1 vae/config.json (written by diffusers 0.33) has none of the keys that came
    with Wan 2.2 (decoder_base_dim, is_residual, in/out_channels, patch_size, scale_factor_*): it loads."""
    ref = _wan()
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in WAN21_KEYS}))
    z = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert max_diff(QwenImageVAE.from_pretrained(tmp_path).decode(z), ref.decode(z).sample) <= 1e-5
