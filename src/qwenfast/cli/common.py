"""Pieces shared by the subcommands: the error type, dtype and device parsing."""

from __future__ import annotations

import torch


class CLIError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, no traceback."""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_dtype_device_args(parser, default_dtype: str | None = None) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default_dtype,
                        help="compute dtype (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
