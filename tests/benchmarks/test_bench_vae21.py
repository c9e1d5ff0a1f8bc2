"""benchmarks/bench_vae21.py --levels runs end to end (--dry-run: a tiny 2.1 VAE on the CPU): a row per
stage of the decode with the FLOPs of its 3x3 convs, and the kernels of one decode by kind; and the
kernel categories that the table is made of."""

import json

from helpers import load_benchmark
from qwenfast.benchmarking import kernel_breakdown
from qwenfast.vae.bands import level_flops


def load():
    return load_benchmark("bench_vae21")


def test_levels_dry_run_times_every_stage(tmp_path):
    bench = load()
    out = tmp_path / "levels.json"
    bench.main(["--dry-run", "--levels", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    stages = [r["stage"] for r in result["levels"]]
    n = len(bench.QwenImage21VAE(**bench.DRY_ARCH).topology.levels)
    assert stages[:3] == ["head (post_quant, conv_in, ResBlock)", "attention", "tail ResBlock"]
    assert len(stages) == 3 + n and stages[-1] == f"level {n - 1} + head"
    assert abs(sum(r["share"] for r in result["levels"]) - 1) < 1e-9
    assert all(r["conv_tflop"] > 0 for r in result["levels"][3:])
    kinds = {r["category"] for r in result["kernels"]}
    assert "conv (cuDNN)" in kinds  # the CPU's convolutions, by their aten names


def test_level_flops_count_each_conv_at_its_resolution():
    from qwenfast.vae.surface import Level

    lv = Level(scale=1, channels=4, convs=2, upsample=True, convs_after_up=1)
    # two 4->4 convs on 3x5 pixels, then one at 6x10 after the upsample
    assert level_flops((lv,), 1, 3, 5) == 2 * 9 * 16 * (2 * 15 + 60)


def test_kernel_breakdown_sorts_kinds_and_shares():
    kernels = [("sm90_xmma_fprop_implicit_gemm_bf16", 3000.0, 10), ("_rms_norm_kernel", 500.0, 20),
               ("Memcpy DtoD (Device -> Device)", 250.0, 4), ("void at::native::elementwise_kernel<4>", 250.0, 7),
               ("sm90_xmma_fprop_implicit_gemm_other", 1000.0, 2), ("mystery", 1000.0, 1)]
    rows = kernel_breakdown(kernels)
    assert [r["category"] for r in rows] == ["conv (cuDNN)", "other", "RMS norm (ours)", "copy / pad / layout",
                                             "elementwise / reduce (PyTorch)"]
    conv = rows[0]
    assert conv["ms"] == 4.0 and conv["calls"] == 12 and conv["top"] == "sm90_xmma_fprop_implicit_gemm_bf16"
    assert abs(conv["share"] - 4 / 6) < 1e-12 and abs(sum(r["share"] for r in rows) - 1) < 1e-12
