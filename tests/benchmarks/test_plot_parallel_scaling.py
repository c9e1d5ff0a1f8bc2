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


def test_the_rehearsal_sits_beside_the_measurement_and_is_checked(runs, tmp_path):
    rehearsal = tmp_path / "rehearsal.json"
    rehearsal.write_text(json.dumps({"results": [
        dict(case="4096x4096", mode="patch", world=2, predicted_speedup=1.90),  # measured 400/220 = 1.82
        dict(case="4096x4096", mode="patch", world=4, predicted_speedup=3.60)]}))  # measured 2.67: 35% off
    rows = {(r["mode"], r["n"]): r for r in scaling.scaling_rows(runs, scaling.load_rehearsal(str(rehearsal)))}
    assert rows[("patch", 2)]["predicted"] == 1.90 and rows[("tiled (exact)", 2)]["predicted"] is None
    assert dict(scaling.check_targets(rows[("patch", 2)]))["rehearsal within 15%"] is True
    assert dict(scaling.check_targets(rows[("patch", 4)]))["rehearsal within 15%"] is False
    text = scaling.markdown(runs, list(rows.values()))
    assert "1.82x (220 ms); predicted 1.90x" in text


def test_targets_by_case_and_recorded_output_sizes(tmp_path):
    def one(n, case, ms, peak, output=None):
        rows = [dict(case=case, mode="single untiled", ms=100.0, peak_gib=[peak]),
                dict(case=case, mode="patch", ms=ms, peak_gib=[peak / n] * n, collective_ms=[0.5, 1.5][:n],
                     **({} if output is None else {"output_gib": output}))]
        return {"provenance": {"gpus": n, "vae": "qwenimage", "torch": "2.11", "commit": "c", "date_utc": "d"},
                "results": rows}

    for n in (1, 2):
        ms = 100.0 / 1.5 if n > 1 else 100.0  # 1.5x on 2 GPUs
        (tmp_path / f"r{n}.json").write_text(json.dumps(one(n, "1328x1328", ms, 6.0)))
        (tmp_path / f"v{n}.json").write_text(json.dumps(one(n, "720p video, 81 frames", ms, 6.0, output=0.4)))
    image = {r["n"]: r for r in scaling.scaling_rows(scaling.load([str(tmp_path / "r1.json"), str(tmp_path / "r2.json")]))}
    assert dict(scaling.check_targets(image[2]))["speed-up >= 1.40"] is True  # 1328²: 0.7·N
    assert image[2]["collective_ms"] == 1.5  # the slowest rank's
    video = {r["n"]: r for r in scaling.scaling_rows(scaling.load([str(tmp_path / "v1.json"), str(tmp_path / "v2.json")]))}
    assert dict(scaling.check_targets(video[2]))["speed-up >= 1.70"] is False  # 0.85·N
    assert video[2]["peak_limit_gib"] == pytest.approx(1.2 / 2 * 6.0 + 0.4)  # the recorded output size


def test_runs_of_two_vaes_or_two_of_one_count_are_refused(tmp_path):
    a = {"provenance": {"gpus": 2, "vae": "qwenimage"}, "results": []}
    b = {"provenance": {"gpus": 4, "vae": "qwenimage21"}, "results": []}
    for name, run in (("a", a), ("b", b), ("c", a)):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="different VAEs"):
        scaling.load([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="two runs of 2 GPUs"):
        scaling.load([str(tmp_path / "a.json"), str(tmp_path / "c.json")])


def test_a_missing_or_foreign_file_is_one_line_of_error(tmp_path):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"provenance": {"gpus": 2}, "results": [dict(case="4096x4096", mode="patch")]}))
    (tmp_path / "broken.json").write_text("{")
    for call, match in [(lambda: scaling.load([str(tmp_path / "nowhere.json")]), "cannot read a run"),
                        (lambda: scaling.load([str(tmp_path / "broken.json")]), "cannot read a run"),
                        (lambda: scaling.load_rehearsal(str(measured)), "not a rehearsal"),
                        (lambda: scaling.load_rehearsal(str(tmp_path / "nowhere.json")), "cannot read a rehearsal")]:
        with pytest.raises(SystemExit, match=match) as e:
            call()
        assert "\n" not in str(e.value)
