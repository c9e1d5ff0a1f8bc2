"""The scaling report of the multi-GPU issue, on synthetic runs: speed-ups, targets, table."""

import json

import pytest

from helpers import load_benchmark

scaling = load_benchmark("plot_parallel_scaling")


def run(n, patch_ms, tiled_ms, auto_ms, peak):
    row = lambda mode, ms, p=peak: dict(case="4096x4096", mode=mode, ms=ms, peak_gib=[p] * n)  # noqa: E731
    return {"provenance": {"gpus": n, "device": "H200", "torch": "2.11", "commit": "abc", "date_utc": "today"},
            "results": [row("single untiled", 400.0, 12.0), row("single tiled (exact)", 480.0, 1.5),
                        row("patch", patch_ms), row("tiled (exact)", tiled_ms), row("auto", auto_ms)]}


@pytest.fixture
def runs(tmp_path):
    files = []
    for n, args in [(1, (400, 480, 400, 12.0)), (2, (220, 250, 230, 6.0)), (4, (150, 140, 150, 4.0))]:
        path = tmp_path / f"parallel_decode_{n}gpu.json"
        path.write_text(json.dumps(run(n, *args)))
        files.append(str(path))
    return scaling.load(files)


def test_speedups_and_targets(runs):
    rows = {(r["mode"], r["n"]): r for r in scaling.scaling_rows(runs)}
    patch2, patch4 = rows[("patch", 2)], rows[("patch", 4)]
    assert patch2["speedup"] == pytest.approx(400 / 220)
    assert dict(scaling.check_targets(patch2))["speed-up >= 1.70"] is True
    assert dict(scaling.check_targets(patch4))["speed-up >= 3.40"] is False  # 400/150 = 2.67
    tiled4 = rows[("tiled (exact)", 4)]
    assert tiled4["speedup_vs_tiled"] == pytest.approx(480 / 140)
    assert dict(scaling.check_targets(tiled4))["vs tiled >= 3.20"] is True
    out = scaling.output_gib("4096x4096")
    assert patch2["peak_limit_gib"] == pytest.approx(1.2 / 2 * 12.0 + out)
    assert rows[("auto", 2)]["vs_best"] == pytest.approx(230 / 220)  # within 10% of patch
    assert scaling.check_targets(rows[("patch", 1)]) == []  # one GPU is not a scaling run


def test_markdown_lists_every_count_and_verdict(runs):
    text = scaling.markdown(runs, scaling.scaling_rows(runs))
    assert "| 4096x4096 | patch | 1.00x (400 ms) | 1.82x (220 ms) | 2.67x (150 ms) |" in text
    assert "**missed**" in text and "N=2: speed-up >= 1.70 met" in text


def test_video_case_has_no_output_size():
    assert scaling.output_gib("720p video, 21 frames") is None
