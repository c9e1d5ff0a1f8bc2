"""The one-device rehearsal of rank r of N runs what rank r runs in a real group: the same output
shape and, collective by collective, the same bytes sent and received (gloo, 2 and 3 ranks)."""

from __future__ import annotations

import os
import sys

import pytest

from parallel_harness import run_ranks
from qwenfast.parallel.rehearsal import RehearsalComm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from rehearsal_cases import CASES, stats_of_every_case  # noqa: E402


@pytest.mark.parametrize("world", [2, 3])
def test_rehearsal_moves_the_bytes_of_the_real_group(world):
    real = run_ranks(world, f"{os.path.join(HERE, 'rehearsal_scenarios.py')}:real_stats")
    for rank in range(world):
        rehearsed = stats_of_every_case(lambda: RehearsalComm(rank, world))
        for name, *_ in CASES:
            assert rehearsed[name] == real[rank][name], (rank, name, rehearsed[name], real[rank][name])


def test_rehearsal_rank_is_checked():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        RehearsalComm(3, 3)
