"""benchmarks/bench_dit21.py runs end to end (--dry-run: tiny dims on the CPU) and writes what the
table and the README read: a block row per step and size, an op row per op and L, host rows."""

import json

import pytest

from helpers import load_benchmark

pytest.importorskip("diffusers.models.transformers.transformer_qwenimage21")


def test_dry_run_writes_every_row(tmp_path, capsys):
    bench = load_benchmark("bench_dit21")
    out = tmp_path / "dit21.json"
    assert bench.main(["--dry-run", "--no-compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    blocks = [r for r in rows if r["kind"] == "block"]
    assert {(r["step"], r["side"]) for r in blocks} == {(s, side) for s in ("prefill", "cached") for side in (64, 96)}
    assert all(r["check_rel"] < 1e-5 for r in blocks)  # fp32 on the CPU: the fused block is diffusers'
    assert blocks[0]["tokens"] == 8 + 16 and blocks[1]["tokens"] == 16  # text + image; cached: image only
    ops = [r for r in rows if r["kind"] == "op"]
    assert len(ops) == 3 * 2 and all(r["check_rel"] < 1e-6 and r["ours_us"] > 0 for r in ops)
    assert {r["op"] for r in rows if r["kind"] == "host"} >= {"layer_norm_scale", "bare triton launch"}
    assert "| block | tokens |" in capsys.readouterr().out
