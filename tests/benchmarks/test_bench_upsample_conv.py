"""benchmarks/bench_upsample_conv.py runs end to end (--dry-run: tiny configs on the CPU): a layer row
per upsampler and formulation, a decode row per formulation, and the formulations agree."""

import json

from helpers import load_benchmark


def test_dry_run_writes_every_row(tmp_path):
    bench = load_benchmark("bench_upsample_conv")
    out = tmp_path / "uc.json"
    assert bench.main(["--dry-run", "--repeats", "1", "--layer-repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["model"], r["mode"]) for r in result["decodes"]} == {
        (m, mode) for m in ("qwenimage", "qwenimage21") for mode in ("direct", "transposed", "subpixel")}
    assert all(r["fp32_max_err"] < 1e-5 for r in result["decodes"])  # fp32 on the CPU: the same map
    layers = {(r["model"], r["layer"]) for r in result["layers"]}
    assert len(layers) == 3 + 4 and len(result["layers"]) == 3 * len(layers)  # 3 + 4 upsamplers
