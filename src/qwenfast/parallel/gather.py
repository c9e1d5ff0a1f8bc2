"""The one gather step of every parallel strategy: decoded pieces from their ranks, once, to every
rank (`parallel_output="all"`) or to rank 0 (`"rank0"`)."""

from __future__ import annotations

import math

import torch

__all__ = ["gather_pieces"]


def gather_pieces(pieces: list[torch.Tensor], assignment: list[list[int]], shapes: list[tuple[int, ...]],
                  like: torch.Tensor, comm, output: str = "all") -> list[torch.Tensor] | None:
    """This rank's decoded `pieces` (its items `assignment[rank]`, in order) packed into one flat buffer,
    padded to the longest rank's (sizes from `shapes`, the same on every rank: no sizes are exchanged),
    sent once to every rank (`output="all"`) or to rank 0 (`"rank0"`), unpacked into all items'
    pieces in item order. Returns None on a rank that receives nothing. `like`: dtype and device."""
    numels = [math.prod(shape) for shape in shapes]
    lengths = [sum(numels[i] for i in a) for a in assignment]
    pad = max(lengths) - lengths[comm.rank]
    flat = [p.reshape(-1) for p in pieces] + [like.new_zeros(pad)]
    buf = torch.cat(flat) if len(flat) > 1 else flat[0]  # (max(lengths),)
    parts = comm.all_gather(buf) if output == "all" else comm.gather(buf, dst=0)
    if parts is None:
        return None
    out: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
    for rank, indices in enumerate(assignment):
        offset = 0
        for i in indices:
            out[i] = parts[rank][offset:offset + numels[i]].view(shapes[i])
            offset += numels[i]
    return out
