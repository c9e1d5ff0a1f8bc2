"""Loading: state-dict round trips with strict=True, directories written by diffusers' save_pretrained,
and an error that names what broke for every way a directory can be wrong."""

import json
import shutil

import pytest
import torch

from helpers import ARCHS, TINY, diffusers_vae, max_diff
from qwenfast import QwenImageVAE, VAEConfig
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
    cfg = json.loads((d / "config.json").read_text())
    cfg["base_dim"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"wrong shapes .*decoder\.conv_in\.weight"):
        QwenImageVAE.from_pretrained(d)


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(saved, tmp_path)
    file = d / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, file)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder\.conv_out\.bias.*unexpected keys \(1\): decoder\.extra\.weight"):
        QwenImageVAE.from_pretrained(d)


def test_wrong_model_class_and_bad_json(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, _class_name="AutoencoderKL")))
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
