"""Spawn `world` CPU processes in a gloo group, run one function on every rank, collect the results.

Each test gets a free port; a rank's exception is returned as a result (so the parent asserts for
all ranks at once); a rank that does not finish by the deadline is killed and the run fails as a
hang. Tiny shapes, one thread per rank: the whole tests/parallel stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

from helpers import free_port  # noqa: F401 - re-exported for the parallel tests

EXACT_TOL = 1e-12  # float64: exact modes land at ~1e-15
CAUGHT = 1e-11  # a margin one latent pixel short lands at >1e-6


def _worker(rank: int, world: int, port: int, target: str, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)
    result: object
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        path, name = target.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(f"_rank_target_{rank}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = getattr(module, name)(rank, world, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts
        result = {"harness_error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(world: int, target: str, *args, timeout_s: float = 240.0) -> list:
    """`target` ("/path/to/file.py:function", called as `f(rank, world, *args)`) on `world` gloo ranks; returns
    the per-rank results. Raises if a rank hangs past `timeout_s` or dies without a result."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, target, args, out_dir)) for r in range(world)]
        for p in procs:
            p.start()
        hung = []
        for p in procs:
            p.join(timeout_s)
            if p.is_alive():
                hung.append(p)
        for p in hung:
            p.kill()
            p.join()
        if hung:
            raise TimeoutError(f"{len(hung)} of {world} ranks still running after {timeout_s}s: a hang")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            results.append(torch.load(path, weights_only=False))
    for r, res in enumerate(results):
        if isinstance(res, dict) and "harness_error" in res:
            raise AssertionError(f"rank {r} failed outside the scenarios:\n{res['harness_error']}")
    return results


def assert_exact_or_caught(res: dict, rank: int, mutated: bool) -> None:
    """One rank's decode result (`parallel_scenarios.parallel_result`): equal to its reference
    (re-association only), or, for a mutation the exactness check must catch, off by more than CAUGHT."""
    if mutated:
        assert res["max_abs"] > CAUGHT, f"rank {rank}: the mutation went unnoticed, max|Δ| = {res['max_abs']:.3g}"
    else:
        assert res["max_abs"] <= EXACT_TOL, f"rank {rank}: max|Δ| = {res['max_abs']:.3g}"


def case_results_fixture(scenarios: str, worlds: list[int]):
    """A module-scoped fixture, parametrised by world size, that runs `scenarios:run_cases` once per
    world on spawned gloo ranks and gives (world, the per-rank results) to every test of the module."""
    import pytest

    @pytest.fixture(scope="module", params=worlds, ids=lambda w: f"world{w}")
    def case_results(request):
        return request.param, run_ranks(request.param, f"{scenarios}:run_cases")

    return case_results
