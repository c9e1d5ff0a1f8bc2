"""`RehearsalComm`: one rank of N, alone on one device, to time what that rank would execute.

Every collective keeps its shapes, its order and its byte counts (as `ProcessGroupComm` counts them),
but moves no data: what the other ranks would contribute is this rank's own buffer (all-gather,
gather) or zeros (halo rows). So rank r's share of a parallel decode runs with exactly the kernels and
shapes it would run among N real ranks — its numbers are wrong, its time is not (compute only: no
waiting for peers, no transfer). The one-GPU rehearsal (`benchmarks/bench_parallel_decode.py
--rehearse N`) times every rank this way and predicts the N-GPU time from the slowest rank's compute
plus its bytes at an assumed link bandwidth.

The plan comes from shapes alone, so a rehearsed rank takes the same tiles, bands and query shares as
the real rank would; only the values it receives differ.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["RehearsalComm"]


class RehearsalComm:
    """Rank `rank` of a pretend group of `world_size` ranks (the `comm` interface of parallel.comm)."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rehearsal needs 0 <= rank < world_size; got rank {rank} of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.collectives = 0

    @contextlib.contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        yield  # a failure is raised as it is: there is nobody to tell
        self.agree(None, None, stage)  # but the stage sync is counted, as the real group calls it

    def agree(self, values: torch.Tensor | None, error: BaseException | None, stage: str) -> torch.Tensor:
        """As if every rank held `values`: (2, k), their max and min."""
        k = 0 if values is None else values.numel()
        self._count(8 * (1 + 2 * k), 8 * (1 + 2 * k))  # one all-reduce of the flag, max and -min
        if error is not None:
            raise error
        if values is None:
            return torch.zeros(2, 0, dtype=torch.float64)
        v = values.detach().to(torch.float64).flatten().cpu()
        return torch.stack([v, v])

    def broadcast(self, buf: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `buf` on every rank: here, this rank's own."""
        nbytes = buf.numel() * buf.element_size()
        self._count(nbytes if self.rank == src else 0, 0 if self.rank == src else nbytes)
        return buf

    def all_gather(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `buf` in rank order: `world_size` views of this rank's own (same shapes)."""
        nbytes = buf.numel() * buf.element_size()
        self._count(nbytes, (self.world_size - 1) * nbytes)
        return [buf] * self.world_size

    def gather(self, buf: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        nbytes = buf.numel() * buf.element_size()
        if self.rank == dst:
            self._count(0, (self.world_size - 1) * nbytes)
            return [buf] * self.world_size
        self._count(nbytes, 0)
        return None

    def exchange_with_neighbours(self, send_up: torch.Tensor | None, send_down: torch.Tensor | None,
                                 above_shape: tuple[int, ...], below_shape: tuple[int, ...]):
        """Zeros of the neighbours' shapes where a neighbour would send (None where there is none)."""
        above = below = None
        for send, shape, peer in ((send_up, above_shape, self.rank - 1), (send_down, below_shape, self.rank + 1)):
            if send is None or not 0 <= peer < self.world_size:
                continue
            recv = send.new_zeros(shape)
            self._count(send.numel() * send.element_size(), recv.numel() * recv.element_size())
            if peer < self.rank:
                above = recv
            else:
                below = recv
        return above, below

    def _count(self, sent: int, received: int) -> None:
        self.collectives += 1
        if self.world_size > 1:
            self.bytes_sent += sent
            self.bytes_received += received

    def stats(self) -> dict[str, int]:
        return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                    collectives=self.collectives, world_size=self.world_size)
