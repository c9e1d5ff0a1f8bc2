"""What the parallel strategies need from a process group, as one small interface.

`SingleRankComm` is the one-rank case (no torch.distributed at all): the strategies run unchanged
on one device with it, which is what the single-GPU benchmark and the tile loop share.
`qwenfast.parallel.group.ProcessGroupComm` is the same interface over a real process group.

Rules every implementation keeps:
- Collectives move tensors only, and every rank calls them in the same order with the same sizes
  (sizes come from the plan, which every rank derives from shapes alone).
- `guard(stage)` brackets work that may raise on one rank only: at its end every rank learns
  whether any rank failed, so that all of them raise instead of some waiting forever in the next
  collective.
- `broadcast(buf, src)` returns rank `src`'s 1-D `buf` (same size and dtype everywhere) on every rank.
- A collective that waits longer than the comm's timeout raises `CollectiveTimeoutError` on the
  ranks that waited (a rank hung, died, or never called it); the group is unusable afterwards.
- Counters: `bytes_sent` is the payload this rank contributes to collectives (padding included),
  `bytes_received` what it gets from the other ranks, `collectives` how many it called.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["SingleRankComm", "RemoteRankError", "CollectiveTimeoutError"]


class RemoteRankError(RuntimeError):
    """Raised on the ranks that did not fail when another rank of the group failed."""


class CollectiveTimeoutError(RuntimeError):
    """Raised on a rank that waited longer than `VAEConfig.collective_timeout_s` in one collective."""


class SingleRankComm:
    """One rank: every collective is the identity, nothing is sent."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.collectives = 0

    @contextlib.contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        yield

    def agree(self, values: torch.Tensor | None, error: BaseException | None, stage: str) -> torch.Tensor:
        """(k,) float64 values → (2, k): their max and min over ranks; raises `error` if given."""
        if error is not None:
            raise error
        return torch.stack([values, values])

    def all_gather(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `buf` (equal sizes on all ranks), in rank order."""
        return [buf]

    def broadcast(self, buf: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `buf` on every rank: this rank's own."""
        return buf

    def gather(self, buf: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's `buf` on rank `dst` (None elsewhere)."""
        return [buf]

    def exchange_with_neighbours(self, send_up, send_down, above_shape, below_shape):
        """Rows to/from rank - 1 and rank + 1: none with one rank."""
        return None, None

    def stats(self) -> dict[str, int]:
        return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                    collectives=self.collectives, world_size=self.world_size)
