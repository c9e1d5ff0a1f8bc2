"""benchmarks/modulate_variants.py: the measurement-only kernel variants compute what the package's
norm-modulate kernel computes (so that the sweep of bench_modulate.py times equal work)."""

import os

import pytest
import torch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as tests/ops/_device.py
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from helpers import load_benchmark  # noqa: E402
from qwenfast.ops.triton import modulate as T  # noqa: E402

variants = load_benchmark("modulate_variants")


# The interpreter runs both kernels' numpy ops in the same order: equal to the bit. Compiled for a GPU,
# the variants' different loads and branches let the compiler contract a multiply-add differently
# (seen on an H200: up to 4.8e-7 on values of about 5, i.e. 1-2 fp32 ulps): equal within a few ulps.
TOL = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", [dict(early=True), dict(hint=False), dict(pick="both"), {}])
@pytest.mark.parametrize("residual", [False, True])
def test_variant_equals_the_package_kernel(variant, residual):
    g = torch.Generator().manual_seed(0)
    B, L, C = 2, 5, 96
    x = torch.randn(B, L, C, generator=g).to(DEVICE)
    r = torch.randn(B, L, C, generator=g).to(DEVICE)
    mod = (0.5 * torch.randn(2 * B, 6 * C, generator=g)).to(DEVICE)
    s0, s1 = mod[:B].chunk(6, dim=1), mod[B:].chunk(6, dim=1)
    index = torch.randint(0, 2, (B, L), generator=g).to(DEVICE)
    y, rout = variants.variant_fwd(x, r if residual else None, s0[2], s1[2], s0[1], s0[0], s1[1], s1[0], index,
                                   **variant)
    if residual:
        want, want_r, _ = T.residual_layer_norm_modulate_fwd(x, r, s0[2], s1[2], None, None, s0[1], s0[0], None, s1[1],
                                                             s1[0], None, index, 1e-6)
        torch.testing.assert_close(rout, want_r, **TOL)
    else:
        want, _ = T.layer_norm_modulate_fwd(x, None, None, s0[1], s0[0], None, s1[1], s1[0], None, index, 1e-6)
    torch.testing.assert_close(y, want, **TOL)
