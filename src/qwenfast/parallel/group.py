"""Process-group helpers: the one place (with `dispatch`) that touches torch.distributed.

For the CLI and scripts run under `torchrun`:

    group = init_from_env()          # None when WORLD_SIZE is 1 or unset: the plain single-GPU run
    vae.set_process_group(group)     # optional: the VAE defaults to the world group
    ...
    print0("decoded", path)          # rank 0 prints; `is_rank0()` guards file writes
    vae.last_parallel_stats          # mode, bytes sent/received, collectives of the last decode
    destroy_if_owned()               # destroys only what `init_from_env` created

Nothing here creates or destroys a group unless asked.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .comm import CollectiveTimeoutError, RemoteRankError

__all__ = ["init_from_env", "destroy_if_owned", "is_initialized", "get_rank", "get_world_size",
           "is_rank0", "print0", "barrier", "gather_floats", "ProcessGroupComm"]

_OWNED = False  # whether init_from_env created the default group


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> Any | None:
    """Initialise the default group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...)
    when WORLD_SIZE > 1 and no group exists yet; return the world group, or None for one process.

    NCCL when CUDA is available (and each rank's device set to LOCAL_RANK), gloo otherwise.
    `timeout_s` bounds how long a collective may wait for a rank that died (the CLI passes
    `VAEConfig.collective_timeout_s`). A group that exists already keeps its own timeout.
    """
    global _OWNED
    if is_initialized():
        return dist.group.WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    _OWNED = True
    return dist.group.WORLD


# How long the barrier of `destroy_if_owned(drain=True)` waits for the other ranks.
DRAIN_TIMEOUT_S = 30.0
DRAIN_SETTLE_S = 0.1  # after it, the GIL released: see destroy_if_owned


def destroy_if_owned(drain: bool = False) -> None:
    """Destroy the default group if `init_from_env` created it; leave a caller's group alone.

    `drain=True` when every rank is known to reach this call (the command finished, or all ranks
    raised from the same agreement): first a barrier, waited with the GIL released (at most
    `DRAIN_TIMEOUT_S`; a rank that left already only ends it early). Why: a gloo worker thread drops
    its reference to a collective's tensors just *after* `wait()` has returned on this thread, and
    with PyTorch's PyObject preservation that drop takes the GIL. Exiting right after the last
    collective lets a worker reach it while the interpreter finalizes: the worker is killed inside a
    noexcept destructor and the process aborts ("terminate called without an active exception",
    SIGABRT) after its work was done. The barrier gives the workers that moment while Python is alive.
    """
    global _OWNED
    if _OWNED and is_initialized():
        if drain:
            with contextlib.suppress(RuntimeError):  # a peer gone or late: nothing to wait for
                dist.barrier(async_op=True).wait(timeout=timedelta(seconds=DRAIN_TIMEOUT_S))
            # The barrier completes once every earlier collective has: the worker thread that ran the
            # last one may still be about to drop it (its tensors, under the GIL). A short sleep hands
            # it the GIL before the group and the interpreter go (one CI run in ~40 aborted there).
            time.sleep(DRAIN_SETTLE_S)
        dist.destroy_process_group()
    _OWNED = False


def get_rank(group: Any | None = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Any | None = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def is_rank0(group: Any | None = None) -> bool:
    return get_rank(group) == 0


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only (every process when there is no group)."""
    if is_rank0():
        print(*args, **kwargs)


def barrier(group: Any | None = None) -> None:
    if is_initialized():
        dist.barrier(group)


def gather_floats(values: list[float], group: Any | None = None) -> list[list[float]]:
    """Every rank's `values` (the same count on every rank), in rank order, on every rank: one
    all-gather of a float64 tensor. Without a group: `[values]`."""
    if not is_initialized():
        return [list(values)]
    comm = ProcessGroupComm(group)
    parts = comm.all_gather(torch.tensor(values, dtype=torch.float64, device=comm.device))
    return [p.cpu().tolist() for p in parts]


class ProcessGroupComm:
    """The `comm` interface of `qwenfast.parallel.comm` over a torch.distributed process group.

    Collective tensors live on `device`: the current CUDA device for NCCL, the CPU for gloo.
    `timeout_s` (None: the group's own timeout only) bounds each wait: see `_wait`.
    """

    def __init__(self, group: Any | None = None, timeout_s: float | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.timeout_s = timeout_s
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        backend = dist.get_backend(self.group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
        self.bytes_sent = 0
        self.bytes_received = 0
        self.collectives = 0

    # -- failing together ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        """Run the block; then every rank learns whether any rank raised in it, and all raise."""
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            self.agree(None, e, stage)
            raise
        self.agree(None, None, stage)

    def agree(self, values: torch.Tensor | None, error: BaseException | None, stage: str) -> torch.Tensor:
        """One all-reduce carrying a failure flag and (k,) float64 `values`: returns (2, k), the max and
        the min of `values` over ranks. Raises `error` on its own rank and `RemoteRankError` on the others
        when any rank failed. Every rank passes `values` of the same size (zeros where it failed)."""
        k = 0 if values is None else values.numel()
        msg = torch.zeros(1 + 2 * k, dtype=torch.float64, device=self.device)
        msg[0] = 1.0 if error is not None else 0.0
        if values is not None and error is None:
            v = values.to(device=self.device, dtype=torch.float64).flatten()
            msg[1:1 + k] = v
            msg[1 + k:] = -v
        self._count(msg, msg)
        self._wait(dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
                   f"flag all-reduce of stage {stage!r}", flag=True)
        if error is not None:
            raise error
        if msg[0].item() > 0:
            raise RemoteRankError(f"parallel decode aborted at stage {stage!r}: another rank of the group failed "
                                  "(its own exception is raised there)")
        return torch.stack([msg[1:1 + k], -msg[1 + k:]]).cpu()

    # -- data ---------------------------------------------------------------------------------------
    def all_gather(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D `buf` (the same size on every rank), in rank order, on every rank."""
        if buf.numel() == 0:  # the same size everywhere: every rank skips together
            return [buf] * self.world_size
        src = buf.to(self.device).contiguous()
        out = torch.empty(self.world_size * src.numel(), dtype=src.dtype, device=self.device)
        self._count(src, out[src.numel():])
        self._wait(dist.all_gather_into_tensor(out, src, group=self.group, async_op=True), "all-gather")
        return [p.to(buf.device) for p in out.chunk(self.world_size)]

    def broadcast(self, buf: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s 1-D `buf` (the same size and dtype on every rank) on every rank."""
        if self.rank == src:
            out = buf.to(self.device).contiguous()
        else:  # never written into the caller's tensor
            out = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
        src_global = dist.get_global_rank(self.group, src) if self.group is not dist.group.WORLD else src
        sent, received = (out, out[:0]) if self.rank == src else (out[:0], out)
        self._count(sent, received)
        self._wait(dist.broadcast(out, src=src_global, group=self.group, async_op=True), "broadcast")
        return out.to(buf.device)

    def gather(self, buf: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's 1-D `buf` (the same size on every rank) on rank `dst`, None on the others."""
        if buf.numel() == 0:
            return [buf] * self.world_size if self.rank == dst else None
        src = buf.to(self.device).contiguous()
        dst_global = dist.get_global_rank(self.group, dst) if self.group is not dist.group.WORLD else dst
        if self.rank == dst:
            parts = [torch.empty_like(src) for _ in range(self.world_size)]
            self._count(src[:0], src.new_empty((self.world_size - 1) * src.numel()))
            self._wait(dist.gather(src, parts, dst=dst_global, group=self.group, async_op=True), "gather")
            return [p.to(buf.device) for p in parts]
        self._count(src, src[:0])
        self._wait(dist.gather(src, None, dst=dst_global, group=self.group, async_op=True), "gather")
        return None

    def exchange_with_neighbours(self, send_up: torch.Tensor | None, send_down: torch.Tensor | None,
                                 above_shape: tuple[int, ...], below_shape: tuple[int, ...]):
        """Send `send_up` to rank - 1 and `send_down` to rank + 1 (None: no such neighbour), receive
        tensors of `above_shape` from rank - 1 and `below_shape` from rank + 1, in one batch of
        point-to-point ops. Returns (from above, from below), None where there is no neighbour."""
        ops, above, below = [], None, None
        for send, shape, peer in ((send_up, above_shape, self.rank - 1), (send_down, below_shape, self.rank + 1)):
            if send is None:
                continue
            send = send.to(self.device).contiguous()
            recv = torch.empty(shape, dtype=send.dtype, device=self.device)
            glob = dist.get_global_rank(self.group, peer) if self.group is not dist.group.WORLD else peer
            ops += [dist.P2POp(dist.isend, send, glob, self.group), dist.P2POp(dist.irecv, recv, glob, self.group)]
            self._count(send, recv)
            if peer < self.rank:
                above = recv
            else:
                below = recv
        if ops:
            for req in dist.batch_isend_irecv(ops):
                self._wait(req, "halo exchange with the neighbours")
        return above, below

    def _wait(self, work, what: str, flag: bool = False) -> None:
        """Wait for an async collective; past `timeout_s` raise `CollectiveTimeoutError` (one line).

        gloo: every collective waits with the timeout (each blocks the CPU anyway). NCCL: only the
        flag all-reduces (`flag=True`), whose verdict the CPU reads at once; a data collective is
        ordered on the stream, so a hang in it holds up the next flag all-reduce, whose timed wait then
        fires (and a timed wait would make the CPU block on every data collective).
        A timed-out collective stays pending: the group cannot be used again."""
        if self.timeout_s is None or not (flag or self.device.type == "cpu"):
            work.wait()
            return
        t0 = time.monotonic()
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            if time.monotonic() - t0 < 0.99 * self.timeout_s:  # failed early: a peer closed, not a timeout
                raise
            raise CollectiveTimeoutError(
                f"parallel decode: no answer from the other ranks within {self.timeout_s:g} s "
                f"(VAEConfig.collective_timeout_s) in the {what}: a rank is hung, died or did not call decode; "
                "this process group cannot be used again") from None

    def _count(self, sent: torch.Tensor, received: torch.Tensor) -> None:
        self.collectives += 1
        if self.world_size > 1:  # alone, nothing leaves the rank
            self.bytes_sent += sent.numel() * sent.element_size()
        self.bytes_received += received.numel() * received.element_size()

    def stats(self) -> dict[str, int]:
        return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                    collectives=self.collectives, world_size=self.world_size)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0, group: Any | None = None) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank (every rank passes one of the same shape and dtype: its
    values are ignored off `src`), returned on `tensor`'s device. Without a group: `tensor`."""
    if not is_initialized():
        return tensor
    comm = ProcessGroupComm(group)
    buf = tensor.to(comm.device).contiguous()
    src_global = dist.get_global_rank(comm.group, src) if comm.group is not dist.group.WORLD else src
    dist.broadcast(buf, src=src_global, group=comm.group)
    return buf.to(tensor.device)
