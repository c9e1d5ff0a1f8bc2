"""CUDA-graph replays of a decode: one captured graph per input signature, replayed on later calls.

A decode launches a few hundred kernels; at 1024² on one H200 the GPU idles between them for about a
fifth of the time (15.3 ms eager, 12.0 ms as a graph, DESIGN.md §4). A graph replays the same kernels
with no host work between them. Replays are bit for bit the eager decode: the same kernels on the same
shapes, in the same order (cuDNN picks its algorithms at the warm-up run, which precedes the capture).

The rules a captured function must keep (every decode path of this package does, on one device):
no host synchronisation (`.item()`, `.cpu()`, printing tensors) and no shape that depends on values.

Memory: a graph keeps its whole working set (its private pool) alive between replays, about the
eager decode's peak. `DecodeGraphs` keeps at most `max_graphs` of them (least recently used first
out) and `release()` frees them all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

__all__ = ["DecodeGraphs", "graph_key"]

Tensor = torch.Tensor


def graph_key(x: Tensor, *context: Hashable) -> tuple:
    """What a captured graph is valid for: the input's shape, dtype, device and strides, plus the
    caller's `context` (e.g. the decode options, which change the kernels that run)."""
    return (tuple(x.shape), x.stride(), x.dtype, x.device, *context)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor


class DecodeGraphs:
    """Run `fn(x)` through a CUDA graph captured for `x`'s signature (and `context`).

    The first call with a new signature runs `fn` eagerly `warmup` times on a side stream, captures
    one run, and replays it; later calls copy the input into the graph's static input, replay, and
    return a clone of the static output (the next replay would overwrite it).
    """

    def __init__(self, max_graphs: int = 2, warmup: int = 1) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1; got {max_graphs}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0  # how many graphs were captured (a changed shape re-captures)

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor, context: tuple = ()) -> Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA-graph decode needs a CUDA tensor; got one on {x.device}")
        key = graph_key(x, *context)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(fn, x)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # least recently used: its pool is freed with it
        else:
            self._graphs.move_to_end(key)
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out.clone()

    def release(self) -> None:
        """Drop every graph and return its memory to the caching allocator (and the device)."""
        self._graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _capture(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> _Captured:
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad():  # inference only: no autograd state may be captured
            with torch.cuda.stream(side):  # warm-up: lazy inits, cuDNN algorithm choice, Triton compiles
                for _ in range(self.warmup):
                    fn(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(static_in)
        self.captures += 1
        return _Captured(graph, static_in, static_out)
