"""A stand-in for a Triton kernel that keeps each launch's arguments and runs nothing: what the
host-time tests inspect (how many tensors a launcher hands Triton)."""

from __future__ import annotations

import torch


class LaunchRecorder:
    """`kernel[grid](*args, **kwargs)` appends (args, kwargs) to `launches`."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))

    def tensors_passed(self) -> list[int]:
        """Per launch, the tensor arguments: each costs Triton's launcher a `data_ptr()` call and a driver
        query of the pointer, on every launch; a None (an absent optional tensor) is a constexpr."""
        return [sum(isinstance(a, torch.Tensor) for a in args) for args, _ in self.launches]
