"""Fused DiT blocks against the unmodified diffusers transformer, on small random configs.

Reference: diffusers' own `QwenImageTransformer2DModel`, deep-copied before fusing, same inputs.
fp32: max|Δ| ≤ 1e-4 (the fused ops compute in fp32 as diffusers does: only re-association differs).
bf16: both are judged against the fp32 model on the same weights (rounded to bf16); the fused
model's error may not exceed diffusers' own bf16 error by more than BF16_SLACK (the fused ops round
once per pass where diffusers rounds after every elementwise op, so they are usually closer).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock  # noqa: E402

from qwenfast.dit import FusedQwenImageTransformerBlock, fuse_modulation, is_fused, unfuse_modulation  # noqa: E402

from helpers import assert_regional_compile_finds_blocks, reloaded  # noqa: E402

BF16_SLACK = 1.5  # fused bf16 error ≤ BF16_SLACK x diffusers' bf16 error (+ one bf16 ulp of the output)

# heads x head dim = D = 32; rope axes sum to the head dim.
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def make_transformer(zero_cond_t: bool, seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY, **overrides}, zero_cond_t=zero_cond_t).eval()
    # Default init leaves the modulation small; make every parameter O(1/sqrt(fan_in)) and the
    # modulation rows large, so that a wrong set, gate or shift moves the output well past the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) / fan_in**0.5)
            if "_mod." in name:
                p.mul_(3.0)
    return model


def make_inputs(model, zero_cond_t: bool, batch: int = 2, h: int = 4, w: int = 6, txt: int = 7, seed: int = 1):
    """Packed latents, text embeddings with a padded mask, timesteps and img_shapes as the pipelines
    pass them. Edit: a generated image then a reference image of another size, so index is mixed."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, h, w)] + ([(1, h - 2, w + 2)] if zero_cond_t else [])
    img_len = sum(f * a * b for f, a, b in shapes)
    cfg = model.config
    mask = torch.ones(batch, txt, dtype=torch.long)
    mask[-1, txt - 2:] = 0  # padded text tokens in the last sample
    return dict(
        hidden_states=torch.randn(batch, img_len, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.rand(batch, generator=g),
        img_shapes=[shapes] * batch,
    )


def run(model, inputs, dtype=torch.float32):
    args = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**args, return_dict=False)[0].float()


@pytest.fixture(params=[False, True], ids=["t2i", "edit"])
def zero_cond_t(request):
    return request.param


launches: list[int] = []


def counted(launcher):
    def run(*args, **kwargs):  # so a test cannot pass on the PyTorch path by accident
        launches.append(1)
        return launcher(*args, **kwargs)

    return run


@pytest.fixture(params=["native", "triton"])
def backend(request, monkeypatch):
    """Which implementation the fused ops run: the PyTorch path, or the Triton kernels (on CPU
    tensors through TRITON_INTERPRET=1, set by tests/conftest.py; on CUDA as they are)."""
    launches.clear()
    if request.param == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # the models run on CPU tensors (a GPU machine too)
            pytest.skip("the models run on CPU tensors: the kernels take those under TRITON_INTERPRET=1 only")
        from qwenfast.ops import custom_op
        from qwenfast.ops.triton import modulate as kernels

        monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "cuda")
        for name in ("_norm_modulate_fwd", "gated_residual_fwd"):  # the launchers of the two kernels
            monkeypatch.setattr(kernels, name, counted(getattr(kernels, name)))
    yield request.param
    # 2 blocks x (2 streams x 3 ops) launches per transformer call; one block called thrice in the block test.
    assert (len(launches) >= 6) == (request.param == "triton")


def test_fused_matches_diffusers_fp32(zero_cond_t, backend):
    ref = make_transformer(zero_cond_t)
    fused = fuse_modulation(copy.deepcopy(ref))
    inputs = make_inputs(ref, zero_cond_t)
    expected, got = run(ref, inputs), run(fused, inputs)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4


def test_block_mixed_index_matches_and_matters(backend):
    # One block, called directly with a random per-token index (not only the contiguous layout the
    # transformer builds), B = 2. The comparison can only catch a wrong parameter set if the sets
    # give different outputs: check that an all-zero index moves the output well past the tolerance.
    ref = make_transformer(True).transformer_blocks[0]
    fused = fuse_modulation(make_transformer(True)).transformer_blocks[0]
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    B, L, T, D = 2, 20, 5, ref.dim
    args = dict(
        hidden_states=torch.randn(B, L, D, generator=g),
        encoder_hidden_states=torch.randn(B, T, D, generator=g),
        encoder_hidden_states_mask=torch.ones(B, T, dtype=torch.bool),
        temb=torch.randn(2 * B, D, generator=g),
        modulate_index=torch.randint(0, 2, (B, L), generator=g, dtype=torch.int32),
    )
    assert 0 < args["modulate_index"].sum() < B * L
    with torch.no_grad():
        txt_ref, img_ref = ref(**args)
        txt, img = fused(**args)
        _, img_zero = fused(**dict(args, modulate_index=torch.zeros_like(args["modulate_index"])))
    assert (img - img_ref).abs().max().item() <= 1e-4
    assert (txt - txt_ref).abs().max().item() <= 1e-4
    assert (img_zero - img).abs().max().item() > 0.1


def test_fused_bf16_error_within_diffusers_own(zero_cond_t, backend):
    ref32 = make_transformer(zero_cond_t).to(torch.bfloat16).float()  # same (bf16-representable) weights
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fused16 = fuse_modulation(copy.deepcopy(ref16))
    inputs = make_inputs(ref32, zero_cond_t)
    inputs = {k: (v.to(torch.bfloat16).float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    exact = run(ref32, inputs)
    err_diffusers = (run(ref16, inputs, torch.bfloat16) - exact).abs().max().item()
    err_fused = (run(fused16, inputs, torch.bfloat16) - exact).abs().max().item()
    ulp = exact.abs().max().item() * 2.0**-8
    assert err_fused <= BF16_SLACK * err_diffusers + ulp, (err_fused, err_diffusers)


def test_fused_path_writes_no_token_gate(monkeypatch, zero_cond_t):
    # diffusers' `_modulate` is what builds the [B, L, D] gate (torch.where per parameter): the
    # fused forward must never reach it.
    def boom(*a, **k):
        raise AssertionError("diffusers' _modulate was called on the fused path")

    ref = make_transformer(zero_cond_t)
    fused = fuse_modulation(copy.deepcopy(ref))
    monkeypatch.setattr(QwenImageTransformerBlock, "_modulate", boom)
    run(fused, make_inputs(ref, zero_cond_t))


def test_fuse_keeps_weights_tree_and_round_trips(tmp_path):
    ref = make_transformer(True)
    model = copy.deepcopy(ref)
    params_before = {n: p for n, p in model.named_parameters()}
    assert fuse_modulation(model) is model and fuse_modulation(model) is model  # idempotent
    assert is_fused(model) and all(type(b) is FusedQwenImageTransformerBlock for b in model.transformer_blocks)
    assert {n: p for n, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]

    loaded = reloaded(model, ref, tmp_path, QwenImageTransformer2DModel)
    inputs = make_inputs(ref, True)
    assert torch.equal(run(fuse_modulation(loaded), inputs), run(model, inputs))
    assert_regional_compile_finds_blocks(model)  # the fused classes, by name

    unfuse_modulation(model)
    assert model._repeated_blocks == ["QwenImageTransformerBlock"]
    assert not is_fused(model) and all(type(b) is QwenImageTransformerBlock for b in model.transformer_blocks)
    assert torch.equal(run(model, inputs), run(ref, inputs))


def test_fuse_rejects_other_modules():
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        fuse_modulation(torch.nn.Linear(2, 2))
