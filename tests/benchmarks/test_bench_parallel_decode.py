"""benchmarks/bench_parallel_decode.py's --keep: an earlier rehearsal's rows that this run does not redo
stay in the tables, each with the commit it ran at; the rows it redoes are replaced, not doubled, and
predicted against the kept run's single-GPU time of their case."""

import json

from helpers import load_benchmark


def row(case, mode, world, ms, single=20.0, **extra):
    return dict(case=case, mode=mode, world=world, slowest_ms=ms, single_ms=single, link_ms=0.0,
                predicted_speedup=single / ms, **extra)


def test_kept_rows_are_the_ones_not_redone_in_table_order(tmp_path):
    bench = load_benchmark("bench_parallel_decode")
    old = [row("2048x2048", m, n, 10.0) for m in ("patch", "patch (level)", "tiled (exact)") for n in (2, 4)]
    old.append(row("4096x4096", "patch", 2, 30.0, commit="abc"))
    path = tmp_path / "old.json"
    path.write_text(json.dumps(dict(provenance=dict(commit="old1"), results=old)))
    cases = [("2048x2048", 128, 128, 1, 2)]  # (label, h, w, t, reps) as cases_of gives them
    kept = bench.kept_rows(str(path), cases, {"patch (level)": {}}, [2, 4])
    assert {(r["case"], r["mode"], r["world"]) for r in kept} == {
        ("2048x2048", "patch", 2), ("2048x2048", "patch", 4), ("2048x2048", "tiled (exact)", 2),
        ("2048x2048", "tiled (exact)", 4), ("4096x4096", "patch", 2)}
    assert {r["commit"] for r in kept} == {"old1", "abc"}  # a row's own commit wins over its file's
    new = [row("2048x2048", "patch (level)", n, 5.0, single=22.0, commit="new") for n in (2, 4)]
    merged = bench.merge_kept(kept, new)
    level = [r for r in merged if r["mode"] == "patch (level)"]
    # one single-GPU reference per case: the kept run's, the new run's own kept beside it
    assert all(r["single_ms"] == 20.0 and r["single_ms_own"] == 22.0 and r["predicted_speedup"] == 4.0 for r in level)
    assert [(r["case"], r["world"], r["mode"]) for r in merged][:3] == [
        ("2048x2048", 2, "patch"), ("2048x2048", 2, "patch (level)"), ("2048x2048", 2, "tiled (exact)")]
    assert len(merged) == 7 and all(r["slowest_ms"] == 5.0 for r in merged if r["mode"] == "patch (level)")
    assert bench.kept_rows(None, cases, {}, [2]) == []


def test_rehearsal_writes_each_row_and_redoes_only_the_modes_asked(tmp_path, monkeypatch):
    """`--rehearse` on the CPU (full-size Qwen-Image VAE, a 64 px image, 2 ranks): every mode's row in the
    JSON and the table; then `--modes "patch (level)" --keep` redoes that row alone, on the kept single-GPU
    time (not timed again), every write whole (no .tmp file left)."""
    import sys

    bench = load_benchmark("bench_parallel_decode")
    common = ["bench_parallel_decode.py", "--rehearse", "2", "--sizes", "64", "--video-frames", "0", "--reps", "1",
              "--check-size", "0", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", common + ["--tag", "_all"])
    assert bench.main() == 0
    first = json.loads((tmp_path / "parallel_rehearsal_all.json").read_text())["results"]
    assert [r["mode"] for r in first] == ["patch", "patch (level)", "tiled (exact)"]
    monkeypatch.setattr(sys, "argv", common + ["--tag", "_level", "--modes", "patch (level)",
                                               "--keep", str(tmp_path / "parallel_rehearsal_all.json")])
    assert bench.main() == 0
    again = json.loads((tmp_path / "parallel_rehearsal_level.json").read_text())["results"]
    assert [r["mode"] for r in again] == ["patch", "patch (level)", "tiled (exact)"]
    assert again[0] == first[0] | {"commit": again[0]["commit"]} and again[2]["slowest_ms"] == first[2]["slowest_ms"]
    # the case's single-GPU time is the kept run's, not timed again
    assert again[1]["single_ms"] == first[0]["single_ms"] and again[1]["single_kept"] and "single_ms_own" not in again[1]
    assert "patch (level)" in (tmp_path / "parallel_rehearsal_level.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_two_rank_run_profiles_collectives_and_takes_video_sizes(tmp_path):
    """Under torchrun (2 gloo ranks, the full-size Qwen-Image VAE, tiny latents): an image and a
    `--video-sizes` video case, every parallel row with each rank's time in collectives
    (`--profile-collectives`) and the decoded output's size, and equal to the single-GPU decode."""
    from pathlib import Path

    from helpers import torchrun

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_parallel_decode.py"
    done = torchrun(["--sizes", "32", "--video-frames", "2", "--video-sizes", "32x24", "--reps", "1",
                     "--check-size", "0", "--profile-collectives", "--out", str(tmp_path), "--tag", "_t"],
                    nproc=2, timeout=240, script=script)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "parallel_decode_2gpu_t.json").read_text())["results"]
    assert [r["case"] for r in rows if r["mode"] == "patch"] == ["32x32", "24p video, 5 frames"]
    parallel = [r for r in rows if not r["mode"].startswith("single")]
    assert parallel and all(len(r["collective_ms"]) == 2 and min(r["collective_ms"]) > 0 for r in parallel)
    assert all(r["max_abs"] == 0.0 for r in parallel if r["mode"] != "auto")  # fp32 on the CPU: exact
    video = next(r for r in parallel if r["case"].endswith("frames"))
    assert video["output_gib"] == 3 * 5 * 24 * 32 * 4 / 2**30


def test_a_video_size_that_is_not_a_multiple_of_8_is_refused(monkeypatch, capsys):
    import sys

    import pytest

    bench = load_benchmark("bench_parallel_decode")
    monkeypatch.setattr(sys, "argv", ["bench_parallel_decode.py", "--rehearse", "2", "--sizes", "--video-sizes",
                                      "830x480", "--check-size", "0"])
    with pytest.raises(SystemExit, match="multiples of 8"):
        bench.main()
