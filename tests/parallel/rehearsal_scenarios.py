"""What every rank runs in the rehearsal test: the real parallel decode's counters, to compare with a
one-process rehearsal of the same rank (imported by file path in the spawned ranks)."""

from __future__ import annotations

from qwenfast.parallel.group import ProcessGroupComm

from rehearsal_cases import stats_of_every_case


def real_stats(rank: int, world: int) -> dict:
    return stats_of_every_case(ProcessGroupComm)
