#!/usr/bin/env bash
# The GPU measurements of issues 10-14, one step per device call (each fits the 10-minute limit of one
# call). The rounds of 2026-12-01 (benchmarks/results/gpu_round_2026-12-01.md) ran every step once; the
# 16:10 round ran vae21, parallel and rest; the 18:14 round ran parallel, found the level path's
# torch.cat(out=) into channels-last (a third of a level share's time; fixed), then levelfix + video and
# relevel; the 19:45 round found a 24-second cuDNN fallback in the 2.1 level shares at 4096² (fixed)
# and ran firstcall, levelprofile, pieces, tests, headconvs and level21. Still open, in order of value:
#   1. tests: the whole suite on a GPU within one call (cut at 420 s at ~78%: it has 500 s now)
#   2. vae21 again: every size with the direct upsamplers beside the transposed default, and cuDNN's
#      benchmark mode on against off in one process (on looked 5-19% faster across processes)
#
#   bash benchmarks/gpu_round.sh STEP        results under $OUT (default /tmp/gpu_round)
#
#   tests     the whole test suite on the GPU, in 6 processes (pytest-xdist is on the GPU machine; one
#             process needs more than 330 s), then the host cost per eager call against a bare launch
#             of the same kernel (issues 10, 13)                                            ~6 min
#   vae21     the 2.1 VAE: encode 1328², untiled + exact-tiled (the default 1024 px tiles) decode at
#             1024-2048² with fidelity and steady peaks, against diffusers, beside the two-pass
#             shortcut and the direct upsamplers; then 4096² untiled both ways (issue 11)     ~7 min
#   parallel  the one-GPU rehearsal of N = 2, 4, 8 with per-rank CUDA graphs: the Qwen-Image VAE
#             (1328²-4096² and the 81x720p video) and the 2.1 VAE (1328², 2048²) (issue 14) ~9 min
#   video     81-frame decodes (720p, 480p) and the 480p encode: the old path (.before, carried),
#             the streamed path with its variants, diffusers (issue 12; re-run after a change) ~6 min
#   graphs    qwenfast bench with CUDA graphs (its default on a GPU) and without (issue 14)  ~3 min
#   rest      the 2.1 rehearsal at 4096², merged into its table (issue 14)                  ~10 min
#   levelfix  one rank's level share (2.1 2048² N=2, QI 4096² N=4) with each way of joining the halo
#             rows, with and without cudnn.deterministic, profiled (issue 14)                ~1 min
#   firstcall why the first call of a 2.1 level share at 4096² takes minutes (the first three calls of a
#             level share, a mid share and the single decode, the first profiled on the host, stacks
#             every 30 s), the small level shares with and without cudnn.deterministic, then the 2.1
#             rehearsal at 4096² of the modes that finish (mid, exact tiles) (issue 14)     ~9 min
#   levelprofile  the 2.1 level share at 4096² on 2 ranks (24 s a call in firstcall): its CUDA kernels,
#             then without cudnn.deterministic (issue 14)                                   ~3 min
#   pieces    after the row-piece convs (qwen_image.conv_in_row_pieces): the first calls and kernels of
#             the 2.1 level share at 4096² again, the 2.1 rehearsal's level rows at 4096², then the
#             direct upsamplers beside the transposed default at 1328² and 2048² (issues 11, 14) ~6 min
#   headconvs (ran at d54cd56; its script, dropped with the two forms it measured, is in that commit)
#             the decoders' 1x1 convs as matmuls and narrow heads padded with zero filters, then the
#             VAE and parallel test files on the GPU                                         ~7 min
#   level21   the 2.1 rehearsal's level rows again (1328²-4096²) after its level shares were banded
#             like the single decode's local part (issue 14)                                 ~3 min
#   multi     (issue 15; a machine of several GPUs: nvidia-h200-x2/-x4/-x8) every mode under torchrun on
#             all its GPUs: the Qwen-Image VAE at 1328²-4096² and 81 frames at 1280x720 and 832x480, the
#             2.1 VAE at 1328²-4096², each rank's collectives profiled; then the scaling report of
#             every run so far, with the one-GPU rehearsal's predictions beside it          ~9 min
#   relevel   the rehearsal of the level rows again after the join fix (the other rows kept from the
#             ce6084c run), the 2.1 rehearsal at 4096² (every mode), the CUDA-graph tests  ~6 min
#
# On the device: carry [".whl", ".before"]; .whl holds diffusers 0.42.1 + importlib_metadata for
# Python 3.12 (pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata). Set QWENFAST_COMMIT:
# the device checkout's own git HEAD is stale.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
tests | vae21 | video | parallel | graphs | rest | levelfix | relevel | firstcall | levelprofile | pieces | level21 | multi) ;;
*) sed -n '2,/^# On the device/p' "$0"; exit 2 ;;
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
    PYTHONPATH=$NEW step pytest_gpu 500 python3 -m pytest -q -p no:cacheprovider -ra --tb=short -n 6
    PYTHONPATH=$NEW step host_cost 90 python3 benchmarks/bench_host_cost.py --breakdown --json "$OUT/host_cost_h200.json"
    ;;
vae21)
    # (the per-level profile ran on 2026-12-01: results/vae21_levels_h200.*; the 4096² exact row too:
    # vae21_4096_exact_h200.*). Every size with the deterministic transposed upsamplers against the
    # direct ones; 4096² apart so that a cut keeps the rest.
    PYTHONPATH=$NEW step vae21 300 python3 benchmarks/bench_vae21.py --sizes 1024,1328,2048 --encode-sizes 1328 \
        --exact-tile 1024 --json "$OUT/vae21_h200.json"
    PYTHONPATH=$NEW step vae21_4096 200 python3 benchmarks/bench_vae21.py --sizes 4096 --encode-sizes "" \
        --modes untiled --modes "untiled, direct upsamplers" --json "$OUT/vae21_4096_h200.json"
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
    PYTHONPATH=$NEW step rehearsal21 220 python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 --rehearse 2 4 8 \
        --graphs --sizes 1328 2048 --video-frames 0 --reps 2 --check-size 0 --out "$OUT" --tag _h200
    ;;
rest)
    # the 2.1 rehearsal at 4096², with most of the call (the CUDA-graph tests ran in relevel): the
    # mode auto picks (level) at every N first, then mid and exact tiles; every finished row is kept
    P="python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 --rehearse 2 4 8 --graphs --sizes 4096 \
        --video-frames 0 --reps 2 --check-size 0 --out $OUT --tag _h200"
    # first (<= 60 s): why the 2.1 level shares at 1328² on 4 and 8 ranks are slower than at 45b96ef (36.8 /
    # 35.0 against 31.0 / 22.0 ms): cudnn.deterministic on small band shapes?
    PYTHONPATH=$NEW:$PWD/benchmarks step level_small 60 python3 benchmarks/diag_level_halo.py --out "$OUT" \
        --case qwenimage21:1328:8:3 --case qwenimage21:1328:4:1 --no-profile
    PYTHONPATH=$NEW step rehearsal21_4096_level 270 $P --modes "patch (level)" \
        --keep benchmarks/results/parallel_rehearsal_qwenimage21_h200.json
    cp "$OUT/parallel_rehearsal_qwenimage21_h200.json" /tmp/rehearsal21_level.json 2>/dev/null ||
        cp benchmarks/results/parallel_rehearsal_qwenimage21_h200.json /tmp/rehearsal21_level.json  # no level row finished
    PYTHONPATH=$NEW step rehearsal21_4096_rest 240 $P --modes patch --modes "tiled (exact)" --keep /tmp/rehearsal21_level.json
    ;;
levelfix)
    PYTHONPATH=$NEW:$PWD/benchmarks step levelfix 150 python3 benchmarks/diag_level_halo.py --out "$OUT"
    ;;
relevel)
    R=benchmarks/results
    P="python3 benchmarks/bench_parallel_decode.py --rehearse 2 4 8 --graphs --reps 2 --check-size 0 --out $OUT --tag _h200"
    PYTHONPATH=$NEW step relevel 200 $P --sizes 1328 2048 4096 --video-frames 21 --video-reps 1 \
        --modes "patch (level)" --keep $R/parallel_rehearsal_ce6084c_h200.json
    PYTHONPATH=$NEW step relevel21 90 $P --vae qwenimage21 --sizes 1328 2048 --video-frames 0 \
        --modes "patch (level)" --keep $R/parallel_rehearsal_qwenimage21_ce6084c_h200.json
    cp "$OUT/parallel_rehearsal_qwenimage21_h200.json" /tmp/rehearsal21_small.json 2>/dev/null ||
        cp benchmarks/results/parallel_rehearsal_qwenimage21_ce6084c_h200.json /tmp/rehearsal21_small.json
    PYTHONPATH=$NEW step rehearsal21_4096 240 $P --vae qwenimage21 --sizes 4096 --video-frames 0 \
        --keep /tmp/rehearsal21_small.json
    PYTHONPATH=$NEW step graph_tests 60 python3 -m pytest -q -p no:cacheprovider -ra --tb=short tests/vae/test_graphs.py
    ;;
firstcall)
    PYTHONPATH=$NEW:$PWD/benchmarks step first_call 200 python3 benchmarks/diag_first_call.py --out "$OUT"
    PYTHONPATH=$NEW:$PWD/benchmarks step level_small 60 python3 benchmarks/diag_level_halo.py --out "$OUT" \
        --case qwenimage21:1328:8:3 --case qwenimage21:1328:4:1 --no-profile
    PYTHONPATH=$NEW step rehearsal21_4096_rest 270 python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 \
        --rehearse 2 4 8 --graphs --sizes 4096 --video-frames 0 --reps 2 --check-size 0 --out "$OUT" --tag _h200 \
        --modes patch --modes "tiled (exact)" --keep benchmarks/results/parallel_rehearsal_qwenimage21_h200.json
    ;;
levelprofile)
    C="python3 benchmarks/diag_first_call.py --case qwenimage21:4096:2:0:level --calls 2"
    PYTHONPATH=$NEW:$PWD/benchmarks step level_profile 150 $C --cuda-profile --out "$OUT"
    PYTHONPATH=$NEW:$PWD/benchmarks step level_nodet 150 $C --no-deterministic --out "$OUT"
    ;;
pieces)
    PYTHONPATH=$NEW:$PWD/benchmarks step first_call 120 python3 benchmarks/diag_first_call.py --calls 3 --cuda-profile \
        --out "$OUT"
    PYTHONPATH=$NEW step rehearsal21_4096_level 240 python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 \
        --rehearse 2 4 8 --graphs --sizes 4096 --video-frames 0 --reps 2 --check-size 0 --out "$OUT" --tag _h200 \
        --modes "patch (level)" --keep benchmarks/results/parallel_rehearsal_qwenimage21_h200.json
    PYTHONPATH=$NEW step vae21_direct 150 python3 benchmarks/bench_vae21.py --sizes 1328,2048 --encode-sizes "" \
        --modes untiled --modes "untiled, direct upsamplers" --diffusers-max 0 --fp32-max 0 --json "$OUT/vae21_direct_h200.json"
    ;;
level21)
    PYTHONPATH=$NEW step rehearsal21_level 200 python3 benchmarks/bench_parallel_decode.py --vae qwenimage21 \
        --rehearse 2 4 8 --graphs --sizes 4096 2048 1328 --video-frames 0 --reps 2 --check-size 0 --out "$OUT" \
        --tag _h200 --modes "patch (level)" --keep benchmarks/results/parallel_rehearsal_qwenimage21_h200.json
    ;;
multi)
    N=$(nvidia-smi -L | wc -l)
    R=benchmarks/results
    T="torchrun --nproc-per-node $N benchmarks/bench_parallel_decode.py --blend --profile-collectives --reps 3 \
        --out $OUT --tag _${N}xh200"
    PYTHONPATH=$NEW step multi_qwenimage 300 $T --sizes 1328 2048 4096 --video-frames 21 --video-sizes 1280x720 832x480
    PYTHONPATH=$NEW step multi_qwenimage21 200 $T --vae qwenimage21 --sizes 1328 2048 4096 --video-frames 0
    for v in "" _qwenimage21; do  # the report: this run beside the kept runs of the other GPU counts
        mine=$OUT/parallel_decode_${N}gpu${v}_${N}xh200.json
        kept=$(ls $R/parallel_decode_*gpu${v}_*xh200.json 2>/dev/null | grep -v "/parallel_decode_${N}gpu" |
            { [ -z "$v" ] && grep -v qwenimage21 || cat; })
        PYTHONPATH=$NEW step "scaling$v" 30 python3 benchmarks/plot_parallel_scaling.py $kept "$mine" \
            --rehearsal $R/parallel_rehearsal${v}_h200.json --out "$OUT/parallel_scaling$v"
    done
    ;;
graphs)
    PYTHONPATH=$NEW step bench_graphs 75 python3 -m qwenfast bench --sizes 1024,1328,2048 --modes untiled,exact \
        --json "$OUT/bench_graphs_h200.json"
    PYTHONPATH=$NEW step bench_eager 75 python3 -m qwenfast bench --sizes 1024,1328,2048 --modes untiled,exact \
        --no-cuda-graph --json "$OUT/bench_eager_h200.json"
    ;;
esac
