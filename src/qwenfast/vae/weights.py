"""Weights: diffusers-format directories (safetensors only) and live diffusers modules.

A diffusers VAE directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards
listed in `diffusion_pytorch_model.safetensors.index.json`); a Qwen-Image model directory holds one
in `vae/`. Keys and shapes are checked before anything is assigned, and every error names what broke.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import VAEConfig

logger = logging.getLogger(__name__)

__all__ = ["load_pretrained", "load_from_diffusers", "resolve_vae_dir", "read_arch_config", "vae_class_for", "WeightsError"]

ARCH_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
             "dropout", "input_channels", "latents_mean", "latents_std")
ACCEPTED_CLASSES = ("AutoencoderKLQwenImage",)
# diffusers class name -> the qwenfast class that loads it (named in errors; `vae_class_for` picks it)
KNOWN_CLASSES = {"AutoencoderKLQwenImage": "QwenImageVAE", "AutoencoderKLQwenImage21": "QwenImage21VAE"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class WeightsError(ValueError):
    """The weights or their config do not fit the model (missing, unexpected, mis-shaped, absent)."""


def resolve_vae_dir(path: str | Path) -> Path:
    """`path` itself if it holds a VAE config.json, else `path/vae`; a clear error otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such VAE directory: {path}")
    if not path.is_dir():
        raise WeightsError(f"{path} is a file; expected a diffusers-format VAE directory "
                           f"(config.json + {WEIGHTS_NAME}) or a Qwen-Image model directory with vae/")
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file() and _looks_like_vae_config(candidate / "config.json"):
            return candidate
    raise WeightsError(f"{path} holds no VAE: expected config.json of an "
                       f"{' or '.join(KNOWN_CLASSES)} there or in {path / 'vae'}")


def _looks_like_vae_config(file: Path) -> bool:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # let read_arch_config report the real problem
    return isinstance(cfg, dict) and ("z_dim" in cfg or cfg.get("_class_name") in KNOWN_CLASSES)


def _accepted(model_cls) -> tuple[str, ...]:
    return tuple(getattr(model_cls, "diffusers_class_names", ACCEPTED_CLASSES))


def _arch_keys(model_cls) -> tuple[str, ...]:
    return tuple(getattr(model_cls, "arch_keys", ARCH_KEYS))


def _wrong_class(what: str, name: str, model_cls) -> str:
    """`what` holds a `name`; the one line that says which qwenfast class loads it."""
    ours = getattr(model_cls, "__name__", "this class")
    hint = f": load it with qwenfast.{KNOWN_CLASSES[name]}" if name in KNOWN_CLASSES else ""
    return f"{what} describes a {name}, which {ours} does not load (it takes {' or '.join(_accepted(model_cls))}){hint}"


def _read_config(vae_dir: Path) -> dict[str, Any]:
    file = vae_dir / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{file} must hold a JSON object")
    return cfg


def read_arch_config(vae_dir: Path, model_cls=None) -> dict[str, Any]:
    """The architecture arguments of `model_cls` (default `QwenImageVAE`'s) from a diffusers config.json."""
    file = vae_dir / "config.json"
    cfg = _read_config(vae_dir)
    cls = cfg.get("_class_name")
    if cls is not None and cls not in _accepted(model_cls):
        raise WeightsError(_wrong_class(str(file), cls, model_cls))
    keys = _arch_keys(model_cls)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in keys)
    if unknown:
        logger.warning("ignoring config keys qwenfast does not use: %s", ", ".join(unknown))
    return {k: cfg[k] for k in keys if k in cfg}


def vae_class_for(path: str | Path):
    """The qwenfast VAE class for a diffusers VAE directory (or a model directory with `vae/`), told by
    config.json's `_class_name` (none: the Qwen-Image VAE)."""
    from . import QwenImage21VAE, QwenImageVAE

    vae_dir = resolve_vae_dir(path)
    name = _read_config(vae_dir).get("_class_name") or "AutoencoderKLQwenImage"
    for model_cls in (QwenImageVAE, QwenImage21VAE):
        if name in _accepted(model_cls):
            return model_cls
    raise WeightsError(f"{vae_dir / 'config.json'} describes a {name}; qwenfast loads {', '.join(KNOWN_CLASSES)}")


def _weight_files(vae_dir: Path) -> list[Path]:
    single, index = vae_dir / WEIGHTS_NAME, vae_dir / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (vae_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        if not shards:
            raise WeightsError(f"{index} lists no shards")
        return [vae_dir / s for s in shards]
    others = sorted(p.name for p in vae_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(others)}: qwenfast loads safetensors only)" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {vae_dir}{hint}")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise `WeightsError` naming every missing, unexpected or mis-shaped key (up to a few each)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} in {source}, {tuple(v.shape)} in the model"
                    for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{what} ({len(items)}): {', '.join(items[:8])}{more}")
    if problems:
        raise WeightsError(f"weights from {source} do not fit the VAE config: " + "; ".join(problems))


def _build(cls, arch: dict[str, Any], vae_config: VAEConfig | None) -> nn.Module:
    validate = getattr(cls, "validate_arch", None)
    if validate is not None:
        try:
            validate(arch)
        except ValueError as e:
            raise WeightsError(f"VAE config cannot build the model: {e}") from None
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        try:
            return cls(**arch, vae_config=vae_config)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"VAE config cannot build the model: {e}") from None


def _finish(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_pretrained(cls, path, vae_config: VAEConfig | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    vae_dir = resolve_vae_dir(path)
    model = _build(cls, read_arch_config(vae_dir, cls), vae_config)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(vae_dir):
        try:
            state.update(load_file(str(file), device=str(device or "cpu")))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"cannot read {file}: {e}") from None
    model = _finish(model, state, str(vae_dir))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def load_from_diffusers(cls, module: nn.Module, vae_config: VAEConfig | None = None) -> nn.Module:
    """Our VAE over the same parameter tensors as a diffusers `AutoencoderKLQwenImage` (no copy)."""
    name = type(module).__name__
    if name not in _accepted(cls) or not hasattr(module, "config"):
        raise TypeError(f"from_diffusers expects a diffusers {' or '.join(_accepted(cls))}; got {name}"
                        + (f" (load it with qwenfast.{KNOWN_CLASSES[name]}.from_diffusers)" if name in KNOWN_CLASSES else ""))
    arch = {k: module.config[k] for k in _arch_keys(cls) if k in module.config}
    model = _build(cls, arch, vae_config)
    return _finish(model, dict(module.state_dict()), f"the diffusers {name}")
