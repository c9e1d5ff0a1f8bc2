#!/usr/bin/env bash
# The GPU measurements that the CPU-only work of 2026-12-01 (afternoon) left open, one step per device
# call (each fits the 10-minute limit of one call; together about 30 minutes of one H200):
#
#   bash benchmarks/gpu_round.sh STEP        results under $OUT (default /tmp/gpu_round)
#
#   tests     the whole test suite on the GPU (issue 10: "run it on a GPU once"; the ops' new None
#             arguments compiled by Triton for the first time), then the host cost per eager call
#             against a bare launch of the same kernel (issues 10, 13)
#   vae21     the 2.1 VAE: the upsampler formulations (direct / transposed / subpixel) per layer and
#             per decode, then untiled + exact-tiled decode at 1024-4096², encode 1328², fidelity,
#             steady peaks, against diffusers (issue 11; the banded local part and the 4-D SDPA call
#             are new since the last measurement)
#   video     81-frame decodes (720p, 480p) and the 480p encode: the old path (.before, carried),
#             the new streamed path with its variants, diffusers (issue 12)
#   parallel  the one-GPU rehearsal of N = 2, 4, 8 with per-rank CUDA graphs: the Qwen-Image VAE
#             (1328²-4096² and the 81x720p video) and the 2.1 VAE (1328²-4096²) (issue 14)
#   graphs    qwenfast bench with CUDA graphs (its default on a GPU) and without (issue 14's targets)
#
# In that order of value when device time is short (about 8 + 9 + 10 + 9 + 4 minutes).
#
# On the device: carry [".whl", ".before"]; .whl holds diffusers 0.42.1 + importlib_metadata for
# Python 3.12 (pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata). Set QWENFAST_COMMIT:
# the device checkout's own git HEAD is stale.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
tests | vae21 | video | parallel | graphs) ;;
*) sed -n '2,26p' "$0"; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_round}
mkdir -p "$OUT"
export QWENFAST_COMMIT=${QWENFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d "$SITE/diffusers" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
NEW="$SITE:$PWD/src"

# step NAME SECONDS CMD...: one measurement under its own time limit, its log kept (warnings dropped)
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (<= ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | grep -v -i -E "warn|deprecat" > "$OUT/$name.log"
    echo "   exit ${PIPESTATUS[0]}"
    tail -n 30 "$OUT/$name.log"
}

case "${1:-}" in
tests)
    PYTHONPATH=$NEW step pytest_gpu 330 python3 -m pytest -q -p no:cacheprovider -ra
    PYTHONPATH=$NEW step host_cost 90 python3 benchmarks/bench_host_cost.py --breakdown --json "$OUT/host_cost_h200.json"
    ;;
vae21)
    PYTHONPATH=$NEW step upsample_conv 150 python3 benchmarks/bench_upsample_conv.py --sizes 1328,2048 \
        --json "$OUT/upsample_conv_h200.json"
    PYTHONPATH=$NEW step vae21 420 python3 benchmarks/bench_vae21.py --sizes 1024,1328,2048,4096 --encode-sizes 1328 \
        --json "$OUT/vae21_h200.json"
    ;;
video)
    B=benchmarks/bench_video.py
    PYTHONPATH=$SITE:$PWD/.before/src step video_old 150 python3 $B --impl qwenfast --label old --repeats 2 \
        --skip-tiling --json /tmp/video_old.json
    PYTHONPATH=$NEW step video_new 300 python3 $B --impl qwenfast --label new --repeats 3 --variants \
        --compare /tmp/video_old.json --json /tmp/video_new.json
    PYTHONPATH=$NEW step video_diffusers 120 python3 $B --impl diffusers --label diffusers --repeats 2 \
        --json /tmp/video_diffusers.json
    PYTHONPATH=$NEW step video_report 30 python3 $B --report /tmp/video_old.json /tmp/video_new.json \
        /tmp/video_diffusers.json --out "$OUT/video_h200"
    ;;
parallel)
    PYTHONPATH=$NEW step rehearsal 360 python3 benchmarks/bench_parallel_decode.py --rehearse 2 4 8 --graphs \
        --sizes 1328 2048 4096 --video-frames 21 --reps 2 --video-reps 1 --check-size 0 --out "$OUT" --tag _h200
    PYTHONPATH=$NEW step rehearsal21 200 python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 --rehearse 2 4 8 \
        --graphs --sizes 1328 2048 4096 --video-frames 0 --reps 2 --check-size 0 --out "$OUT" --tag _h200
    ;;
graphs)
    PYTHONPATH=$NEW step bench_graphs 75 python3 -m qwenfast bench --sizes 1024,1328,2048 --modes untiled,exact \
        --json "$OUT/bench_graphs_h200.json"
    PYTHONPATH=$NEW step bench_eager 75 python3 -m qwenfast bench --sizes 1024,1328,2048 --modes untiled,exact \
        --no-cuda-graph --json "$OUT/bench_eager_h200.json"
    ;;
esac
