"""The CLI creates its torchrun group with `--vae-config.collective-timeout-s` (issue 9, item 8)."""

import argparse

import pytest

from qwenfast.cli.common import distributed
from qwenfast.parallel import group as pg


@pytest.mark.parametrize("given,expected", [({}, 300.0), ({"vae_config__collective_timeout_s": 7.5}, 7.5),
                                            ({"vae_config__collective_timeout_s": -1.0}, 300.0)])
def test_distributed_passes_the_collective_timeout(monkeypatch, given, expected):
    seen = {}
    monkeypatch.setattr(pg, "init_from_env", lambda **kw: seen.update(kw))
    monkeypatch.setattr(pg, "destroy_if_owned", lambda drain=False: None)
    assert distributed(lambda args: 0)(argparse.Namespace(**given)) == 0
    # a bad value is refused by the subcommand's own config check (one line); the group still starts
    assert seen == {"timeout_s": expected}
