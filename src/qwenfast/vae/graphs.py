"""CUDA-graph replays of a decode: one captured graph per input signature, replayed on later calls.

A decode launches a few hundred kernels; at 1024² on one H200 the GPU idles between them for about a
fifth of the time (15.3 ms eager, 12.0 ms as a graph, DESIGN.md §4). A graph replays the same kernels
with no host work between them. Replays are bit for bit the eager decode: the same kernels on the same
shapes, in the same order (cuDNN picks its algorithms at the warm-up run, which precedes the capture).

The rules a captured function must keep (every decode path of this package does, on one device):
no host synchronisation (`.item()`, `.cpu()`, printing tensors) and no shape that depends on values.

Memory: a graph keeps its whole working set (its private pool) alive between replays, about the
eager decode's peak. `DecodeGraphs` keeps at most `max_graphs` of them (least recently used first
out) and `release()` frees them all. `capture_call=2` ("when the shapes repeat") captures a signature
only on its second call: a one-off decode runs eagerly, pays no capture (a warm-up run, the capture, a
replay) and evicts no graph; only the signatures counted so far (at most `max_seen`) are remembered.

What a graph may replay is `fn(x)` for one tensor `x`, returning a tensor or a tuple/list of tensors
(the parallel strategies capture each rank's compute between two collectives this way: the collectives
stay outside, so NCCL and gloo behave as eagerly).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

__all__ = ["DecodeGraphs", "graph_key"]

Tensor = torch.Tensor
Output = Any  # a Tensor, or a tuple / list of Tensors


def graph_key(x: Tensor, *context: Hashable) -> tuple:
    """What a captured graph is valid for: the input's shape, dtype, device and strides, plus the
    caller's `context` (e.g. the decode options, which change the kernels that run)."""
    return (tuple(x.shape), x.stride(), x.dtype, x.device, *context)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph (or a stand-in with .replay())
    static_in: Tensor
    static_out: Output


def _check_output(out: Output) -> Output:
    if isinstance(out, Tensor) or (isinstance(out, (tuple, list)) and all(isinstance(t, Tensor) for t in out)):
        return out
    raise TypeError(f"a CUDA-graph decode must return a tensor or a tuple/list of tensors; got {type(out).__name__}")


def _clone(out: Output) -> Output:
    """A caller's own copy of a graph's static output (the next replay overwrites the static one)."""
    return out.clone() if isinstance(out, Tensor) else type(out)(t.clone() for t in out)


class DecodeGraphs:
    """Run `fn(x)` through a CUDA graph captured for `x`'s signature (and `context`).

    The call that captures a signature (its `capture_call`-th: by default the first) runs `fn` eagerly
    `warmup` times on a side stream, captures one run and replays it; calls before it run `fn` eagerly;
    later calls copy the input into the graph's static input, replay, and return a clone of the static
    output (the next replay would overwrite it).
    """

    def __init__(self, max_graphs: int = 2, warmup: int = 1, max_seen: int = 64) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1; got {max_graphs}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.max_seen = max_seen
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # signature -> eager calls so far (not captured)
        self.captures = 0  # how many graphs were captured (a changed shape re-captures)
        self.eager_calls = 0  # calls that ran eagerly while their signature waited for its capture call
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def applies(self, x: Tensor) -> bool:
        """Whether `x` can go through a graph here: a CUDA tensor (the caller decodes others eagerly)."""
        return x.device.type == "cuda"

    def __call__(self, fn: Callable[[Tensor], Output], x: Tensor, context: tuple = (), capture_call: int = 1) -> Output:
        if not self.applies(x):
            raise ValueError(f"CUDA-graph decode needs a CUDA tensor; got one on {x.device}")
        if capture_call < 1:
            raise ValueError(f"capture_call must be >= 1; got {capture_call}")
        key = graph_key(x, *context)
        entry = self._graphs.get(key)
        if entry is None:
            calls = self._seen.pop(key, 0) + 1
            if calls < capture_call:  # not repeated often enough yet: eager, nothing held, nothing evicted
                self._seen[key] = calls
                while len(self._seen) > self.max_seen:
                    self._seen.popitem(last=False)
                self.eager_calls += 1
                return fn(x)
            entry = self._capture(fn, x)
            _check_output(entry.static_out)  # before the first replay
            self.captures += 1
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # least recently used: its pool is freed with it
        else:
            self._graphs.move_to_end(key)
        entry.static_in.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return _clone(entry.static_out)

    def release(self) -> None:
        """Drop every graph (and the call counts) and return their memory to the caching allocator
        (and the device)."""
        self._graphs.clear()
        self._seen.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _capture(self, fn: Callable[[Tensor], Output], x: Tensor) -> _Captured:
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
        return _Captured(graph, static_in, static_out)
