"""Weights: diffusers-format directories (safetensors only) and live diffusers modules, for every VAE.

A diffusers VAE directory holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards
listed in `diffusion_pytorch_model.safetensors.index.json`; with a variant such as "fp16",
`diffusion_pytorch_model.fp16.safetensors` / `diffusion_pytorch_model.safetensors.index.fp16.json`,
diffusers' naming); a pipeline directory holds one in `vae/`. Nothing is built or assigned before
the config, the files and every key, dtype and shape have been checked; every error is one line
naming what broke and what is allowed.

The loader knows no model. A model class tells it, through three class attributes:

    diffusers_class_names: tuple[str, ...]   the diffusers classes (config.json `_class_name`) it loads
    arch_keys: tuple[str, ...]               the config keys its constructor takes
    validate_arch(arch: dict) -> None        (classmethod) raises ValueError naming the key and the
                                             allowed values; `arch` holds every key of the config
                                             (not the `_private` ones), so that the model can refuse
                                             keys of other designs it cannot build
and optionally `checked_keys` (keys beyond `arch_keys` that `validate_arch` checks, so they are not
reported as ignored).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import VAEConfig

logger = logging.getLogger(__name__)

__all__ = ["load_pretrained", "load_from_diffusers", "resolve_vae_dir", "read_config", "read_arch_config",
           "check_device", "vae_class_for", "PretrainedVAE", "WeightsError", "KNOWN_DIFFUSERS_CLASSES", "WEIGHT_DTYPES"]

# Every diffusers VAE class of the family, what it is and the qwenfast class that loads it. A table
# of names (not of classes), so that a directory is redirected correctly even where the class that
# loads it lives in a module not imported (or not written) yet.
KNOWN_DIFFUSERS_CLASSES: dict[str, tuple[str, str]] = {
    "AutoencoderKLQwenImage": ("a Qwen-Image VAE", "QwenImageVAE"),
    "AutoencoderKLWan": ("a Wan VAE", "QwenImageVAE"),  # the Wan 2.1 config; QwenImageVAE refuses Wan 2.2's
    "AutoencoderKLQwenImage21": ("a Qwen-Image-2.1 VAE", "QwenImage21VAE"),
}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# safetensors dtype names of the weights a VAE can run on (integers, bools and fp8 cannot be conv weights)
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_VARIANT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class WeightsError(ValueError):
    """The weights or their config do not fit the model (missing, unexpected, mis-shaped, absent)."""


# --------------------------------------------------------------------------------------------------
# Files: read, named, never "No such file" for a file that is there but unreadable
# --------------------------------------------------------------------------------------------------


def _read_text(file: Path) -> str:
    try:
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {file}") from None
    except OSError as e:
        raise WeightsError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{file} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}): "
                           f"expected a JSON file") from None


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file} must hold a JSON object ({what}); got a JSON {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def resolve_vae_dir(path: str | Path) -> Path:
    """`path` itself if it holds a VAE config.json, else `path/vae`; a clear error otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such VAE directory: {path}")
    if not path.is_dir():
        raise WeightsError(f"{path} is a file; expected a diffusers-format VAE directory "
                           f"(config.json + {WEIGHTS_NAME}) or a model directory with vae/")
    for candidate in (path, path / "vae"):
        file = candidate / "config.json"
        try:
            file.stat()
        except FileNotFoundError:
            continue
        except OSError as e:  # e.g. a directory without the x bit: there, but unreadable
            raise WeightsError(f"cannot read {file}: {e.strerror or e}") from None
        if file.is_file() and _looks_like_vae_config(file):
            return candidate
    raise WeightsError(f"{path} holds no VAE: expected config.json of one of "
                       f"{', '.join(KNOWN_DIFFUSERS_CLASSES)} there or in {path / 'vae'}")


def _looks_like_vae_config(file: Path) -> bool:
    try:
        cfg = _read_json_object(file, "a VAE config")
    except (OSError, WeightsError):
        return True  # let read_config report the real problem
    return "z_dim" in cfg or cfg.get("_class_name") in KNOWN_DIFFUSERS_CLASSES


def read_config(vae_dir: Path) -> dict[str, Any]:
    """config.json of a VAE directory, as a dict (errors named)."""
    return _read_json_object(vae_dir / "config.json", "a diffusers VAE config")


def vae_class_for(path: str | Path):
    """The qwenfast VAE class for a diffusers VAE directory (or a model directory with `vae/`), told by
    config.json's `_class_name` (none: the Qwen-Image VAE): what the CLI loads a `--vae DIR` with."""
    from . import QwenImage21VAE, QwenImageVAE

    vae_dir = resolve_vae_dir(path)
    name = read_config(vae_dir).get("_class_name") or "AutoencoderKLQwenImage"
    for model_cls in (QwenImageVAE, QwenImage21VAE):
        if name in model_cls.diffusers_class_names:
            return model_cls
    raise WeightsError(f"{vae_dir / 'config.json'} describes a {name}; qwenfast loads "
                       f"{', '.join(KNOWN_DIFFUSERS_CLASSES)}")


# --------------------------------------------------------------------------------------------------
# Architecture: the class name, then the model's own validation, before anything is built
# --------------------------------------------------------------------------------------------------


def _check_class_name(cls, class_name: str | None, source: str, error: type[Exception] = WeightsError) -> None:
    """Refuse a diffusers class `cls` does not load; one that another qwenfast class loads is named."""
    if class_name is None or class_name in cls.diffusers_class_names:
        return
    known = KNOWN_DIFFUSERS_CLASSES.get(class_name)
    if known is not None:
        what, loader = known
        raise error(f"{source} is {what} ({class_name}): load it with qwenfast.{loader}, not {cls.__name__}")
    raise error(f"{source} describes a {class_name}, not one of {', '.join(cls.diffusers_class_names)} "
                f"(what {cls.__name__} loads)")


def arch_from_config(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
    """The constructor arguments of `cls` from a diffusers config (validated by the model)."""
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        cls.validate_arch(params)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: {e}") from None
    ignored = sorted(set(params) - set(cls.arch_keys) - set(getattr(cls, "checked_keys", ())))
    if ignored:
        logger.warning("%s: ignoring config keys %s does not use: %s", source, cls.__name__, ", ".join(ignored))
    return {k: params[k] for k in cls.arch_keys if k in params}


def read_arch_config(vae_dir: Path, cls) -> dict[str, Any]:
    """The architecture arguments of `cls` from a directory's config.json (class and values checked)."""
    file = vae_dir / "config.json"
    config = read_config(vae_dir)
    _check_class_name(cls, config.get("_class_name"), str(file))
    return arch_from_config(cls, config, str(file))


# Building blocks of a model's `validate_arch`: each names the key, the value and what is allowed.


def arch_int(arch: dict[str, Any], key: str, lo: int, hi: int, default: Any = None) -> int:
    value = arch.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WeightsError(f"{key} must be an integer in [{lo}, {hi}]; got {value!r}")
    return value


def arch_number(arch: dict[str, Any], key: str, lo: float, hi: float, default: Any = None,
                value: Any = None, hi_open: bool = False) -> float:
    value = arch.get(key, default) if value is None else value
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and lo <= value and (value < hi if hi_open else value <= hi))
    if not ok:
        raise WeightsError(f"{key} must be a number in [{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")
    return float(value)


def arch_list(arch: dict[str, Any], key: str, item: str, min_len: int, max_len: int, default: Any = None,
              lo: float | None = None, hi: float | None = None) -> list:
    """A list (or tuple) of `min_len`..`max_len` items, each an `item` ('int', 'bool' or 'number'),
    ints and numbers within [lo, hi] when given."""
    value = arch.get(key, default)
    what = f"a list of {min_len}..{max_len} {item}s" if min_len != max_len else f"a list of {min_len} {item}s"
    bounds = f" in [{lo}, {hi}]" if lo is not None else ""
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        raise WeightsError(f"{key} must be {what}{bounds}; got {value!r}")
    for i, v in enumerate(value):
        if item == "bool":
            ok = isinstance(v, bool)
        elif isinstance(v, bool):
            ok = False
        elif item == "int":
            ok = isinstance(v, int)
        else:
            ok = isinstance(v, (int, float)) and math.isfinite(v)
        if ok and lo is not None:
            ok = lo <= v <= hi
        if not ok:
            raise WeightsError(f"{key}[{i}] must be {'a' if item != 'int' else 'an'} {item}{bounds}; got {v!r} "
                               f"(in {key} = {value!r})")
    return list(value)


# --------------------------------------------------------------------------------------------------
# Weight files: the single file or the index, followed exactly, inside the model directory
# --------------------------------------------------------------------------------------------------


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last suffix (`a.safetensors` -> `a.fp16.safetensors`,
    `a.safetensors.index.json` -> `a.safetensors.index.fp16.json`)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _check_variant(variant: Any) -> None:
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.fullmatch(variant)):
        raise ValueError(f"variant must be a name such as 'fp16' (letters, digits, '_', '-', '.'); got {variant!r}")


def _allowed_roots(vae_dir: Path) -> list[Path]:
    """Where a shard may live once symlinks are followed: the directory itself and, in a Hugging Face
    cache (`models--ORG--NAME/snapshots/REV/...`, whose files are links into `models--ORG--NAME/blobs/`),
    that repository's blobs."""
    root = vae_dir.resolve()
    roots = [root]
    for parent in vae_dir.absolute().parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            roots.append((parent.parent / "blobs").resolve())
            break
    return roots


def _shard_path(vae_dir: Path, shard: str, index: Path) -> Path:
    """`vae_dir / shard`, refused when the name or its link target leads outside the directory."""
    if Path(shard).is_absolute() or Path(shard).drive:
        raise WeightsError(f"{index} names the shard {shard!r}, an absolute path: shards must be files "
                           f"inside {vae_dir}")
    file = vae_dir / shard
    if ".." in Path(shard).parts:
        raise WeightsError(f"{index} names the shard {shard!r}, outside {vae_dir}: shards must be files inside it")
    target = file.resolve()
    if not any(target.is_relative_to(r) for r in _allowed_roots(vae_dir)):
        raise WeightsError(f"{index} names the shard {shard!r}, a link to {target} outside {vae_dir}: "
                           f"shards must be files inside it")
    return file


def _read_index(index: Path, vae_dir: Path) -> dict[Path, list[str]]:
    """Shard file -> the keys the index maps to it, every shard name checked."""
    data = _read_json_object(index, 'a sharded index: {"weight_map": {key: shard file}}')
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: weight_map must be a JSON object mapping each key to its shard file; "
                           f"got {'nothing' if weight_map is None else 'a JSON ' + _json_type(weight_map)}")
    if not weight_map:
        raise WeightsError(f"{index} lists no weights (empty weight_map)")
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise WeightsError(f"{index}: weight_map[{key!r}] must be a shard file name (a string); got {shard!r}")
        shards.setdefault(_shard_path(vae_dir, shard, index), []).append(key)
    missing = [str(f.relative_to(vae_dir)) for f in shards if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return shards


def _weight_files(vae_dir: Path, variant: str | None = None) -> tuple[dict[Path, list[str] | None], Path | None]:
    """({file: the keys to take from it, None for all}, the index or None)."""
    single, index = vae_dir / _with_variant(WEIGHTS_NAME, variant), vae_dir / _with_variant(INDEX_NAME, variant)
    if single.is_file():
        return {single: None}, None
    if index.is_file():
        return _read_index(index, vae_dir), index
    raise FileNotFoundError(f"no {single.name} or {index.name} in {vae_dir}{_found_hint(vae_dir, variant)}")


def _variant_of(name: str) -> str | None:
    """The variant in a diffusers weight file name (`...fp16.safetensors`, `...fp16-00001-of-00002.safetensors`,
    `...safetensors.index.fp16.json`), None for the plain names."""
    m = re.fullmatch(r"diffusion_pytorch_model\.(?:safetensors\.index\.)?(.+?)(?:-\d+-of-\d+)?\.(?:safetensors|json)", name)
    return None if m is None or m.group(1) in ("safetensors", "safetensors.index") else m.group(1)


def _found_hint(vae_dir: Path, variant: str | None) -> str:
    """What weight files there are instead, and the variant that would load them."""
    try:
        names = sorted(p.name for p in vae_dir.iterdir() if p.is_file())
    except OSError:
        return ""
    weights = [n for n in names if n.endswith(".safetensors") or (".index" in n and n.endswith(".json"))]
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if weights:
        variants = sorted({v for v in map(_variant_of, weights) if v is not None and v != variant})
        offer = "; " + ", ".join(f"variant={v!r}" for v in variants) + " would load it" if variants else ""
        asked = f" for variant={variant!r}" if variant is not None else ""
        return f" (found {', '.join(weights[:6])}{'...' if len(weights) > 6 else ''}{asked}{offer})"
    if pickles:
        return f" (found {', '.join(pickles)}: qwenfast loads safetensors only)"
    return ""


def _load_safetensors(files: dict[Path, list[str] | None], index: Path | None, device: torch.device,
                      source: str) -> dict[str, torch.Tensor]:
    """Every tensor the files (or the index) name, each from its own file; dtypes checked before loading."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file, wanted in files.items():
        try:
            with open(file, "rb"):  # an unreadable file is reported as such, not as missing
                pass
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                held = list(f.keys())
                if wanted is not None:
                    _check_shard_keys(file, held, wanted, where, index)
                keys = held if wanted is None else wanted
                stored = {k: f.get_slice(k).get_dtype() for k in keys}  # from the header: nothing loaded yet
                bad = [(k, d) for k, d in stored.items() if d not in WEIGHT_DTYPES]
                if bad:
                    listed = ", ".join(f"{k} ({d})" for k, d in bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
                    raise WeightsError(f"{file} holds non-floating-point weights: {listed}; weights must be "
                                       f"floating point ({', '.join(WEIGHT_DTYPES)})")
                for k in keys:
                    if k in state:
                        raise WeightsError(f"{k} is in both {where[k]} and {file}")
                    state[k], where[k] = f.get_tensor(k), file
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None
    return state


def _check_shard_keys(file: Path, held: list[str], wanted: list[str], where: dict[str, Path],
                      index: Path) -> None:
    """A shard holds exactly the keys the index maps to it."""
    absent = sorted(set(wanted) - set(held))
    if absent:
        more = f" (+{len(absent) - 4} more)" if len(absent) > 4 else ""
        raise WeightsError(f"{index} maps {', '.join(absent[:4])}{more} to {file.name}, which does not hold "
                           f"{'it' if len(absent) == 1 else 'them'}")
    stray = sorted(set(held) - set(wanted))
    if stray:
        more = f" (+{len(stray) - 4} more)" if len(stray) > 4 else ""
        raise WeightsError(f"{file.name} holds {', '.join(stray[:4])}{more}, which {index.name} does not map "
                           f"to it: a shard must hold exactly the keys the index names for it")


# --------------------------------------------------------------------------------------------------
# Devices, checked before any file is read
# --------------------------------------------------------------------------------------------------


def check_device(device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device that this machine has (default: the CPU); one line otherwise."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    elif backend is not None and hasattr(backend, "is_available"):
        available = backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    else:
        raise ValueError(f"device {device!r}: qwenfast loads weights onto 'cpu', 'cuda' or 'mps' devices")
    if not available:
        raise ValueError(f"device {device!r} is not available on this machine (torch {torch.__version__}); "
                         f"use device='cpu'")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} {dev.type} device(s)")
    return dev


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


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
                    device: torch.device | str | None = None, variant: str | None = None) -> nn.Module:
    """`cls` with the weights of a diffusers-format directory; see the module doc."""
    dev = check_device(device)
    _check_variant(variant)
    if dtype is not None and dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(map(str, WEIGHT_DTYPES.values()))}; got {dtype!r}")
    vae_dir = resolve_vae_dir(path)
    arch = read_arch_config(vae_dir, cls)
    files, index = _weight_files(vae_dir, variant)
    state = _load_safetensors(files, index, dev, str(vae_dir))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    if dtype is None and len(dtypes) > 1:  # a model of mixed dtypes cannot run: say so now, not at decode
        raise WeightsError(f"weights in {vae_dir} mix dtypes ({', '.join(dtypes)}): pass dtype= to load them as one")
    model = _finish(_build(cls, arch, vae_config), state, str(vae_dir))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def load_from_diffusers(cls, module: nn.Module, vae_config: VAEConfig | None = None) -> nn.Module:
    """`cls` over the same parameter tensors as a diffusers module it loads (no copy)."""
    name = type(module).__name__
    if not hasattr(module, "config"):
        raise TypeError(f"from_diffusers expects a diffusers {' or '.join(cls.diffusers_class_names)}; got {name}")
    _check_class_name(cls, name, f"the diffusers module", error=TypeError)
    arch = arch_from_config(cls, dict(module.config), f"the diffusers {name}")
    return _finish(_build(cls, arch, vae_config), dict(module.state_dict()), f"the diffusers {name}")


class PretrainedVAE:
    """`from_pretrained` and `from_diffusers` for every VAE class of the package: a class that declares
    `diffusers_class_names`, `arch_keys` and `validate_arch` (the module docstring) inherits them."""

    @classmethod
    def from_pretrained(cls, path, vae_config: VAEConfig | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, variant: str | None = None):
        """Load a diffusers-format directory of one of `cls.diffusers_class_names` (config.json +
        safetensors, sharded or not), or a pipeline directory with a `vae/` subfolder. Safetensors only.

        `dtype`: None keeps the stored dtype (diffusers' `from_pretrained` loads fp32 unless told
        otherwise). `device`: where the weights are loaded (default the CPU), checked before any file
        is read. `variant`: e.g. "fp16" loads `diffusion_pytorch_model.fp16.safetensors` (or its
        sharded index `diffusion_pytorch_model.safetensors.index.fp16.json`), as diffusers names them.
        """
        return load_pretrained(cls, path, vae_config=vae_config, dtype=dtype, device=device, variant=variant)

    @classmethod
    def from_diffusers(cls, module: nn.Module, vae_config: VAEConfig | None = None):
        """Our VAE over the same parameter tensors (no copy: same dtype and device) as a diffusers module
        of one of `cls.diffusers_class_names`."""
        return load_from_diffusers(cls, module, vae_config=vae_config)
