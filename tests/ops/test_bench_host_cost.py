"""benchmarks/bench_host_cost.py --cpu runs anywhere (no GPU, no interpreter: launches recorded, not
run) and writes a row per op with our host time, its parts and the launch's argument counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_writes_every_op(tmp_path):
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real launch path, recorded
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_cost.py"), "--cpu", "--breakdown",
                    "--calls", "2", "--repeats", "1", "--json", str(out)], check=True, env=env, timeout=300,
                   capture_output=True)
    rows = {r["op"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 23 and rows["bare launch, 25 args"]["ptrs"] == 17
    ops = [r for name, r in rows.items() if not name.startswith("bare")]
    assert all(r["ours_us"] > 0 and r["check_us"] >= 0 and r["launcher_us"] > 0 and r["kernel"] for r in ops)
    # Only the tensors the kernel reads are handed to Triton (each costs its launcher a driver query).
    assert rows["layer_norm_modulate"]["ptrs"] == 4 and rows["layer_norm_scale (2.1)"]["ptrs"] == 3
