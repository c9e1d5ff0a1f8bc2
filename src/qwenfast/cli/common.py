"""Pieces shared by the subcommands: the error type and its one-line report, dtype and device
parsing, and failing together under torchrun."""

from __future__ import annotations

import contextlib
import re

import torch


class CLIError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, no traceback."""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_dtype_device_args(parser, default_dtype: str | None = None) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default_dtype,
                        help="compute dtype (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, mps, cpu (default: cuda if available, else cpu)")


def add_overwrite_arg(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (without it they are refused; "
                             "an input file is never written over)")


def resolve_device(name: str | None) -> torch.device:
    """The `--device`, checked to exist on this machine before anything is loaded on it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {name}: MPS (Apple silicon) is not available on this machine")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise CLIError(f"--device {name}: {device.type} is not available on this machine")
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


# -- one line per failure -----------------------------------------------------------------------

# How the CPU allocator and CUDA say "out of memory" (the CPU one is a plain RuntimeError).
_OOM = re.compile(r"out of memory|not enough memory|DefaultCPUAllocator: can't allocate|Cannot allocate memory")
# How a collective reports a rank that died or stopped answering (gloo, NCCL, the store).
_LOST_RANK = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|"
                        r"NCCL (?:error|communicator was aborted)|Timed out|timed out|ProcessGroup\w*")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and bool(_OOM.search(str(e))))


def out_of_memory_hint(e: BaseException, what: str) -> CLIError:
    return CLIError(f"out of memory while {what} ({_first_line(e)}); "
                    "try --vae-config.use-tiling, a smaller size, or --dtype bf16")


@contextlib.contextmanager
def out_of_memory_as_hint(what: str):
    """Out of memory (CPU or GPU) inside the block becomes one line naming `what` and the way out."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are replaced
        if is_out_of_memory(e):
            raise out_of_memory_hint(e, what) from None
        raise


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)  # gloo/c10d prefix "[pair.cc:534] "


def is_lost_rank(e: BaseException) -> bool:
    """A collective failed because another rank died or hung (not a bad input on this rank)."""
    dist_error = any(c.__name__ == "DistError" for c in type(e).__mro__)  # torch.distributed's errors
    return dist_error or (isinstance(e, RuntimeError) and bool(_LOST_RANK.search(_first_line(e))))


def one_line_error(e: BaseException) -> str | None:
    """The one line `main` prints for a failure it knows, or None for a bug (left as a traceback).
    Known: CLIError, out of memory (CPU or GPU), another rank's failure (RemoteRankError), latents
    that differ between ranks (LatentMismatchError), a lost rank (gloo/NCCL), a file-system error."""
    from ..parallel.comm import RemoteRankError

    if isinstance(e, CLIError):
        return str(e)
    if is_out_of_memory(e):
        return out_of_memory_hint(e, "running").args[0]
    if isinstance(e, RemoteRankError) or type(e).__name__ == "LatentMismatchError":
        return _first_line(e)
    if is_lost_rank(e):
        return (f"lost contact with another rank ({_first_line(e)}); "
                "it died or hung: its own error, if any, is printed there")
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    return None


def reading_error(e: BaseException) -> str:
    """What went wrong reading an input, in words: a file we may not read is "unreadable" (not
    "No such file"), a missing one is named, anything else is its own message."""
    if isinstance(e, PermissionError) and e.filename:
        return f"{e.filename} is unreadable ({e.strerror})"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


# -- torchrun -----------------------------------------------------------------------------------

_MESSAGE_BYTES = 1024  # one status byte + the failing rank's error line, UTF-8


@contextlib.contextmanager
def all_ranks_agree(stage: str):
    """Under torchrun: when any rank raises inside the block, every rank raises — its own error where
    it failed, a `CLIError` carrying the first failing rank's own line on the others — so that a bad
    input seen by one rank (rank 0's output directory, say) never leaves the others waiting in a
    collective, and every rank says what went wrong. One all-gather of a small byte tensor (no
    pickling). Without a process group: just the block."""
    from ..parallel import group as pg

    if not pg.is_initialized():
        yield
        return
    error = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
        error = e
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = (one_line_error(error) or f"{type(error).__name__}: {_first_line(error)}").encode()[:_MESSAGE_BYTES - 1]
        buf[0] = 1
        buf[1:1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    messages = pg.ProcessGroupComm().all_gather(buf)
    failed = [(rank, bytes(m[1:].cpu().tolist()).rstrip(b"\0").decode(errors="ignore"))
              for rank, m in enumerate(messages) if m[0].item()]
    if not failed:
        return
    # Every rank prints its line now, at the same moment: torchrun stops the other ranks as soon as
    # one exits, so a line printed later (in `main`) could be lost.
    if error is not None:
        line = one_line_error(error)
        if line is None:  # a bug: its traceback is printed by `main`
            raise error
        _report_together(line)
        raise Reported(line) from error
    rank, text = failed[0]
    line = f"rank {rank} failed while {stage}: {text}"
    _report_together(line)
    raise Reported(line)


class Reported(CLIError):
    """A `CLIError` whose line has been printed already (`main` only sets the exit status)."""


COMMAND = "qwenfast"  # `main` sets "qwenfast decode", ...


def report(line: str) -> None:
    """Print `COMMAND: error: line` on stderr in one write: under torchrun every rank shares one
    stderr pipe, and `print` writes the text and its newline separately, so two ranks' lines could
    run together. One `os.write` of at most PIPE_BUF (4096) bytes to a pipe is atomic."""
    import io
    import os
    import sys

    text = f"{COMMAND}: error: {line}\n"
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # a captured / replaced stderr
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = text.encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    while data:
        data = data[os.write(fd, data):]


def _report_together(line: str) -> None:
    """`report`, then a moment for the other ranks to print theirs before this one exits."""
    import time

    report(line)
    time.sleep(0.5)


def distributed(run):
    """Wrap a subcommand: join torchrun's process group when WORLD_SIZE > 1 (and set this rank's
    CUDA device) with `--vae-config.collective-timeout-s` as its timeout, destroy it afterwards if
    this call created it (`owned_group`)."""
    import functools

    @functools.wraps(run)
    def wrapper(args):
        from ..config import VAEConfig

        given = vars(args).get("vae_config__collective_timeout_s", VAEConfig.collective_timeout_s)
        try:
            timeout_s = VAEConfig(collective_timeout_s=given).collective_timeout_s
        except ValueError:  # the subcommand's own config check refuses it (one line), after the group exists
            timeout_s = VAEConfig.collective_timeout_s
        with owned_group(timeout_s):
            return run(args)

    return wrapper


@contextlib.contextmanager
def owned_group(timeout_s: float):
    """Under torchrun: join the process group (collective timeout `timeout_s`) for the block and
    destroy it after, if this created it. When the block ends with every rank in step (it returned,
    or raised `Reported` from an agreement) the ranks first meet at a draining barrier (see
    `destroy_if_owned`), so that no rank exits with gloo still releasing its last collective."""
    from ..parallel import group as pg

    pg.init_from_env(timeout_s=timeout_s)
    in_step = False
    try:
        yield
        in_step = True
    except Reported:
        in_step = True  # every rank raised from the same agreement (a bug's rank excepted: it left)
        raise
    finally:
        pg.destroy_if_owned(drain=in_step)
