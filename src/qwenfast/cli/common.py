"""Pieces shared by the subcommands: the error type, dtype and device parsing."""

from __future__ import annotations

import contextlib

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


def vae_config_from_args(args, progress_default: bool = True):
    """`VAEConfig` from the `--vae-config.*` flags; the CLI shows progress bars unless told not to."""
    from ..config import VAEConfig

    try:
        cfg = VAEConfig.from_cli_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if "vae_config__progress" not in vars(args):
        cfg = cfg.replace(progress=progress_default)
    return cfg


def out_of_memory_hint(e: BaseException, what: str) -> CLIError:
    return CLIError(f"out of memory while {what} ({str(e).splitlines()[0]}); "
                    "try --vae-config.use-tiling, a smaller size, or --dtype bf16")


@contextlib.contextmanager
def all_ranks_agree(stage: str):
    """Under torchrun: when any rank raises inside the block, every rank raises (a `CLIError` on the
    others), so that a bad input seen by one rank (rank 0's output directory, say) never leaves the
    others waiting in a collective. Without a process group: just the block."""
    from ..parallel import group as pg

    if not pg.is_initialized():
        yield
        return
    from ..parallel.comm import RemoteRankError

    try:
        with pg.ProcessGroupComm().guard(stage):
            yield
    except RemoteRankError:
        raise CLIError(f"another rank failed while {stage} (its error is printed there)") from None


def distributed(run):
    """Wrap a subcommand: join torchrun's process group when WORLD_SIZE > 1 (and set this rank's
    CUDA device) with `--vae-config.collective-timeout-s` as its timeout, destroy it afterwards if
    this call created it."""
    import functools

    @functools.wraps(run)
    def wrapper(args):
        from ..config import VAEConfig
        from ..parallel import group as pg

        given = vars(args).get("vae_config__collective_timeout_s", VAEConfig.collective_timeout_s)
        try:
            timeout_s = VAEConfig(collective_timeout_s=given).collective_timeout_s
        except ValueError:  # the subcommand's own config check refuses it (one line), after the group exists
            timeout_s = VAEConfig.collective_timeout_s
        pg.init_from_env(timeout_s=timeout_s)
        try:
            return run(args)
        finally:
            pg.destroy_if_owned()

    return wrapper
