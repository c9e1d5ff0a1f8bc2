"""Scaling of parallel decode over N GPUs: a table, the targets checked, the one-GPU rehearsal's
prediction beside each measurement, and a plot.

Reads the JSON files that `bench_parallel_decode.py` writes for ONE VAE (one per GPU count, each with
its own single-GPU baseline taken in the same run) and, with --rehearsal, the JSON of that VAE's
one-GPU rehearsal (`--rehearse`); writes a markdown table of speed-ups (predicted beside measured,
with the gap and each rank's measured time in collectives where the run profiled them), the issue's
targets checked row by row, and a PNG (speed-up against N per case and mode; needs matplotlib).

    python benchmarks/plot_parallel_scaling.py benchmarks/results/parallel_decode_*gpu_qwenimage21*.json \
        --rehearsal benchmarks/results/parallel_rehearsal_qwenimage21_h200.json \
        --out benchmarks/results/parallel_scaling_qwenimage21

Targets (the multi-GPU issue): `patch` >= 0.85·N over the single-GPU untiled decode at 2048², 4096²
and the 81-frame 720p video, >= 0.7·N at 1328²; exact `tiled` >= 0.8·N over single-GPU exact tiling at
4096²; per-rank peak <= 1.2/N of the single-GPU peak plus the output (on every rank with
`parallel_output="all"`); `auto` within 10% of the best fixed mode; the rehearsal's prediction within
15% of the measured speed-up.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BASELINE, BASELINE_TILED = "single untiled", "single tiled (exact)"
# the `patch` speed-up targets, as shares of N, by case label (bench_parallel_decode's labels)
PATCH_TARGETS = {"1328x1328": 0.7, "2048x2048": 0.85, "4096x4096": 0.85, "720p video, 81 frames": 0.85}
PARALLEL_MODES = ("patch", "patch (level)", "tiled (exact)", "tiled (blend)", "auto")


def read_results(path: str, what: str) -> dict:
    """A JSON file of bench_parallel_decode.py (`what` it should be, for the error) with its "results";
    a missing, unreadable or foreign file is one line of error, not a traceback."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise SystemExit(f"{path}: not {what} (no \"results\" list)")
    return data


def load(paths: list[str]) -> dict[int, dict]:
    """{N: the run's JSON} keyed by the GPU count the run recorded; the runs must be of one VAE and one
    run per GPU count (else which baseline a row has would be a guess)."""
    runs: dict[int, dict] = {}
    vaes = set()
    for path in paths:
        run = read_results(path, "a run of bench_parallel_decode.py")
        n = int(run.get("provenance", {}).get("gpus", 0))
        if n < 1:
            raise SystemExit(f"{path}: no GPU count in its provenance: not a multi-GPU run's file")
        if n in runs:
            raise SystemExit(f"two runs of {n} GPUs given ({path} and an earlier file): one per GPU count")
        runs[n] = run
        vaes.add(run["provenance"].get("vae", "qwenimage"))
    if len(vaes) > 1:
        raise SystemExit(f"runs of different VAEs given ({', '.join(sorted(vaes))}): one report per VAE")
    return dict(sorted(runs.items()))


def load_rehearsal(path: str | None) -> dict[tuple[str, str, int], float]:
    """{(case, mode, N): predicted speed-up} of a rehearsal's JSON (its CUDA-graph prediction where the
    measured run used graphs is not known here: the eager one)."""
    if path is None:
        return {}
    what = "a rehearsal (bench_parallel_decode.py --rehearse)"
    rows = read_results(path, what)["results"]
    if not all(isinstance(r, dict) and {"case", "mode", "world", "predicted_speedup"} <= r.keys() for r in rows):
        raise SystemExit(f"{path}: not {what}: its rows lack case, mode, world or predicted_speedup")
    return {(r["case"], r["mode"], int(r["world"])): r["predicted_speedup"] for r in rows}


def output_gib(case: str) -> float | None:
    """The decoded image's size in GiB (3 channels, bf16) for an `HxW` case, for runs that did not
    record their output's size; None for other cases."""
    m = re.fullmatch(r"(\d+)x(\d+)", case)
    return None if m is None else 3 * int(m.group(1)) * int(m.group(2)) * 2 / 2**30


def scaling_rows(runs: dict[int, dict], predicted: dict | None = None) -> list[dict]:
    """One row per (case, mode, N): ms, speed-up over that run's single-GPU untiled decode (and, for
    `tiled`, over its single-GPU exact tiling), the largest per-rank peak and its target, the
    rehearsal's predicted speed-up (`predicted`, from `load_rehearsal`) and the slowest rank's time
    in collectives where the run profiled them."""
    predicted = predicted or {}
    rows = []
    for n, run in runs.items():
        by_case: dict[str, dict[str, dict]] = {}
        for r in run["results"]:
            by_case.setdefault(r["case"], {})[r["mode"]] = r
        for case, modes in by_case.items():
            base, base_tiled = modes.get(BASELINE), modes.get(BASELINE_TILED)
            if base is None:
                continue
            best = min((modes[m]["ms"] for m in PARALLEL_MODES if m in modes and m != "auto"), default=None)
            for mode in PARALLEL_MODES:
                r = modes.get(mode)
                if r is None:
                    continue
                out = r.get("output_gib", output_gib(case))
                peak_limit = None if out is None else 1.2 / n * max(base["peak_gib"]) + out
                rows.append(dict(
                    case=case, mode=mode, n=n, ms=r["ms"], ran=r.get("ran"),
                    speedup=base["ms"] / r["ms"],
                    speedup_vs_tiled=(base_tiled["ms"] / r["ms"]) if base_tiled and mode.startswith("tiled") else None,
                    peak_gib=max(r["peak_gib"]), peak_limit_gib=peak_limit,
                    vs_best=(r["ms"] / best) if (mode == "auto" and best) else None,
                    predicted=predicted.get((case, mode, n)),
                    collective_ms=max(r["collective_ms"]) if r.get("collective_ms") else None,
                ))
    return rows


def check_targets(row: dict) -> list[tuple[str, bool]]:
    """The issue's targets that apply to this row, each (name, met). One GPU is not a scaling run."""
    n, checks = row["n"], []
    if n < 2:
        return checks
    if row["mode"].startswith("patch"):
        share = PATCH_TARGETS.get(row["case"])
        if share is not None:
            checks.append((f"speed-up >= {share * n:.2f}", row["speedup"] >= share * n))
    if row["mode"] == "tiled (exact)" and row["case"] == "4096x4096" and row["speedup_vs_tiled"] is not None:
        checks.append((f"vs tiled >= {0.8 * n:.2f}", row["speedup_vs_tiled"] >= 0.8 * n))
    if row["peak_limit_gib"] is not None and row["mode"] != "auto":
        checks.append((f"peak <= {row['peak_limit_gib']:.2f} GiB", row["peak_gib"] <= row["peak_limit_gib"]))
    if row["vs_best"] is not None:
        checks.append(("within 10% of best", row["vs_best"] <= 1.10))
    if row.get("predicted") is not None:
        checks.append(("rehearsal within 15%", abs(row["predicted"] / row["speedup"] - 1) <= 0.15))
    return checks


def markdown(runs: dict[int, dict], rows: list[dict]) -> str:
    counts = sorted(runs)
    lines = ["# Parallel decode: scaling", ""]
    for n, run in runs.items():
        p = run["provenance"]
        lines.append(f"- N = {n}: {p.get('device', p.get('gpu'))}, torch {p['torch']}, commit `{p['commit']}`, "
                     f"{p.get('date_utc', p.get('time_utc'))}")
    lines += ["", "Speed-up over the single-GPU untiled decode of the same run (ms in brackets); for `tiled`,"
              " also over single-GPU exact tiling; the slowest rank's time in collectives where profiled; the"
              " one-GPU rehearsal's PREDICTED speed-up beside it where given. Targets checked where they apply.", "",
              "| case | mode | " + " | ".join(f"N = {n}" for n in counts) + " | targets |",
              "|---|---|" + "---:|" * len(counts) + "---|"]
    keyed = {(r["case"], r["mode"], r["n"]): r for r in rows}
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        cells, verdicts = [], []
        for n in counts:
            r = keyed.get((case, mode, n))
            if r is None:
                cells.append("–")
                continue
            extra = f", {r['speedup_vs_tiled']:.2f}x vs tiled" if r["speedup_vs_tiled"] is not None else ""
            if r.get("collective_ms") is not None:
                extra += f", collectives {r['collective_ms']:.1f} ms"
            pred = f"; predicted {r['predicted']:.2f}x" if r.get("predicted") is not None else ""
            cells.append(f"{r['speedup']:.2f}x ({r['ms']:.0f} ms{extra}){pred}")
            verdicts += [f"N={n}: {name} {'met' if ok else '**missed**'}" for name, ok in check_targets(r)]
        lines.append(f"| {case} | {mode} | " + " | ".join(cells) + f" | {'; '.join(verdicts) or '–'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Speed-up against N, one panel per case, one line per mode, the ideal N dashed. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        ns = sorted({r["n"] for r in rows if r["case"] == case})
        ax.plot(ns, ns, "k--", lw=1, label="ideal")
        for mode in PARALLEL_MODES:
            pts = sorted((r["n"], r["speedup"]) for r in rows if r["case"] == case and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_title(case)
        ax.set_xlabel("GPUs")
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up vs 1-GPU untiled")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="JSON files of bench_parallel_decode.py, one per GPU count")
    p.add_argument("--out", default="benchmarks/results/parallel_scaling", help="writes OUT.md and OUT.png")
    p.add_argument("--rehearsal", default=None, metavar="JSON",
                   help="the same VAE's one-GPU rehearsal (bench_parallel_decode.py --rehearse): its predictions "
                        "beside the measurements")
    args = p.parse_args()
    runs = load(args.results)
    rows = scaling_rows(runs, load_rehearsal(args.rehearsal))
    Path(args.out + ".md").write_text(markdown(runs, rows))
    plotted = plot(rows, Path(args.out + ".png"))
    print(Path(args.out + ".md").read_text())
    print(f"plot: {args.out}.png" if plotted else "plot skipped: matplotlib is not installed")


if __name__ == "__main__":
    main()
