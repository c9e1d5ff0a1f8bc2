"""Fused Qwen-Image-2.1 DiT blocks against the unmodified diffusers transformer, on small random configs.

Reference: diffusers' own `QwenImage21Transformer2DModel` (0.42.1), deep-copied before fusing, same
inputs: a joint sequence of text, a condition image and the target image (so with `causal_condition`
the target mask is mixed: text and condition tokens on the shared t = 0 row), B = 2, a padded prompt.
fp32: max|Δ| ≤ 1e-4. bf16: both judged against the fp32 model on the same (bf16-representable)
weights; the fused error may not exceed diffusers' own bf16 error by more than BF16_SLACK.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("diffusers")
tq21 = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage21")
from diffusers import QwenImage21Transformer2DModel  # noqa: E402

from qwenfast.dit import fuse_modulation, is_fused, unfuse_modulation  # noqa: E402
from qwenfast.dit.qwen_image21 import (  # noqa: E402
    FusedQwenImage21AdaLayerNormContinuous,
    FusedQwenImage21TransformerBlock,
    split_modulation,
)

from helpers import assert_regional_compile_finds_blocks, count_calls, reloaded  # noqa: E402

BF16_SLACK = 1.5  # fused bf16 error ≤ BF16_SLACK x diffusers' bf16 error (+ one bf16 ulp of the output)
Block = tq21.QwenImage21TransformerBlock
KERNEL_LAUNCHERS = ("layer_norm_scale_fwd", "residual_layer_norm_scale_fwd", "tanh_gated_residual_fwd")

# heads x head dim = D = 32; rope axes sum to the head dim; latents unpatched (patch_size 1).
TINY = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, context_in_dim=24, mlp_ratio=3, axes_dims_rope=(4, 6, 6))


def make_transformer(causal_condition: bool = True, seed: int = 0) -> QwenImage21Transformer2DModel:
    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(**TINY, causal_condition=causal_condition).eval()
    # Every parameter O(1/sqrt(fan_in)), the modulation large: a wrong row, gate or a missing tanh
    # moves the output well past the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) / fan_in**0.5)
            if name.startswith(("modulation.", "norm_out.linear")):
                p.mul_(3.0)
    return model


def make_inputs(model, batch: int = 2, seed: int = 1, condition: bool = True):
    """What the pipeline passes: the vision-language sequence has 3 text positions, the condition
    image's 2 slots (each 2x2 latent tokens: a 2 x 4 image), 4 text positions; then the target's 6
    slots (a 4 x 6 image). The last sample's prompt has 2 padded positions."""
    g = torch.Generator().manual_seed(seed)
    cond_slots, txt = (2, 7) if condition else (0, 7)
    vlm = [False] * 3 + [True] * cond_slots + [False] * (txt - 3)
    shapes = ([(1, 2, 4)] if condition else []) + [(1, 4, 6)]
    img_tokens = sum(f * h * w for f, h, w in shapes)
    img_mask = torch.tensor(vlm + [True] * 6).expand(batch, -1).clone()
    text_mask = torch.ones(batch, len(vlm), dtype=torch.bool)
    text_mask[-1, -2:] = False
    cfg = model.config
    return dict(
        hidden_states=torch.randn(batch, img_tokens, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, len(vlm), cfg.context_in_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_shapes=[shapes] * batch,
        img_mask=img_mask,
        encoder_hidden_states_mask=text_mask,
    )


def run(model, inputs, dtype=torch.float32, **kw):
    args = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**args, **kw, return_dict=False)[0].float()


@pytest.fixture(params=[True, False], ids=["causal", "no-causal"])
def causal_condition(request):
    return request.param


@pytest.fixture(params=["native", "triton"])
def backend(request, monkeypatch):
    """Which implementation the fused ops run: the PyTorch path, or the Triton kernels (on CPU tensors
    through TRITON_INTERPRET=1, set by tests/conftest.py; on CUDA as they are). The kernel launches
    are counted, so that the triton case cannot pass on the PyTorch path."""
    launches: list[str] = []
    if request.param == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # (tests/conftest.py sets it where there is no CUDA)
            pytest.skip("the models run on CPU tensors: the kernels take those under TRITON_INTERPRET=1 only")
        from qwenfast.ops import custom_op
        from qwenfast.ops.triton import modulate21 as kernels

        monkeypatch.setattr(custom_op, "choose_backend", lambda device, has_triton=None: "cuda")
        launches = count_calls(monkeypatch, kernels, KERNEL_LAUNCHERS)
    yield request.param
    # 3 launches a block, 1 for norm_out: 2 blocks -> 7 per transformer call (3 per block call).
    assert (len(launches) >= 3) == (request.param == "triton")


def test_fused_matches_diffusers_fp32(causal_condition, backend):
    ref = make_transformer(causal_condition)
    fused = fuse_modulation(copy.deepcopy(ref))
    inputs = make_inputs(ref)
    expected, got = run(ref, inputs), run(fused, inputs)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4


def test_block_mixed_mask_matches_and_matters(backend):
    # One block called directly with a random (L,) target mask (not only the layout the model
    # builds), B = 2. A wrong row could only be caught if the rows give different outputs: an
    # all-True mask must move the output well past the tolerance.
    ref = make_transformer().transformer_blocks[0]
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedQwenImage21TransformerBlock
    g = torch.Generator().manual_seed(2)
    B, L, D = 2, 20, 32
    mask = torch.rand(L, generator=g) > 0.5
    assert 0 < int(mask.sum()) < L
    args = dict(hidden_states=torch.randn(B, L, D, generator=g), modulation=3 * torch.randn(B + 1, 4 * D, generator=g),
                target_token_mask=mask)
    with torch.no_grad():
        want, got = ref(**args), fused(**args)
        got_all = fused(**dict(args, target_token_mask=torch.ones_like(mask)))
        got_plain = fused(**dict(args, modulation=args["modulation"][:B], target_token_mask=None))
        want_plain = ref(**dict(args, modulation=args["modulation"][:B], target_token_mask=None))
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_plain - want_plain).abs().max().item() <= 1e-4
    assert (got_all - got).abs().max().item() > 0.1


def test_fused_bf16_error_within_diffusers_own(causal_condition, backend):
    ref32 = make_transformer(causal_condition).to(torch.bfloat16).float()  # bf16-representable weights
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    fused16 = fuse_modulation(copy.deepcopy(ref16))
    inputs = make_inputs(ref32)
    inputs = {k: (v.to(torch.bfloat16).float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    exact = run(ref32, inputs)
    err_diffusers = (run(ref16, inputs, torch.bfloat16) - exact).abs().max().item()
    err_fused = (run(fused16, inputs, torch.bfloat16) - exact).abs().max().item()
    ulp = exact.abs().max().item() * 2.0**-8
    assert err_diffusers > 0  # bf16 is really in use
    assert err_fused <= BF16_SLACK * err_diffusers + ulp, (err_fused, err_diffusers)


def test_kv_cache_steps_match(backend):
    # The pipeline's KV-cache steps: "extract" (the whole sequence) then "cached" (only the target
    # tokens, the mask sliced to all-True, the first block's input a slice of the joint sequence).
    ref = make_transformer(True)
    fused = fuse_modulation(copy.deepcopy(ref))
    inputs = make_inputs(ref)
    outs = []
    for model in (ref, fused):
        cache = tq21.QwenImage21KVCache(len(model.transformer_blocks))
        first = run(model, inputs, kv_cache=cache, kv_cache_mode="extract")
        later = run(model, dict(inputs, timestep=inputs["timestep"] * 0.5), kv_cache=cache, kv_cache_mode="cached")
        outs.append((first, later))
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() <= 1e-4


def test_diffusers_modulation_helpers_are_not_called_after_fusing(monkeypatch, causal_condition):
    # diffusers' `_modulate` and `_select_modulation_rows` are what build the (B, L, D) scale and
    # gate tensors: the fused forwards (blocks and norm_out) must never reach them.
    calls = []

    def spy(original):
        def wrapped(*a, **k):
            calls.append(original.__name__)
            return original(*a, **k)
        return wrapped

    monkeypatch.setattr(Block, "_modulate", spy(Block._modulate))
    monkeypatch.setattr(tq21, "_select_modulation_rows", spy(tq21._select_modulation_rows))
    ref = make_transformer(causal_condition)
    inputs = make_inputs(ref)
    run(ref, inputs)
    assert "_modulate" in calls and "_select_modulation_rows" in calls  # the spy sees diffusers' path
    calls.clear()
    run(fuse_modulation(ref), inputs)
    assert calls == []


def test_fuse_keeps_weights_tree_and_round_trips(tmp_path):
    ref = make_transformer(True)
    model = copy.deepcopy(ref)
    params_before = dict(model.named_parameters())
    assert fuse_modulation(model) is model and fuse_modulation(model) is model  # idempotent
    assert is_fused(model)
    assert all(type(b) is FusedQwenImage21TransformerBlock for b in model.transformer_blocks)
    assert type(model.norm_out) is FusedQwenImage21AdaLayerNormContinuous
    assert dict(model.named_parameters()) == params_before  # the same Parameter objects
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]

    loaded = reloaded(model, ref, tmp_path, QwenImage21Transformer2DModel)
    inputs = make_inputs(ref)
    assert torch.equal(run(fuse_modulation(loaded), inputs), run(model, inputs))
    assert_regional_compile_finds_blocks(model)  # the fused classes, by name

    unfuse_modulation(model)
    assert model._repeated_blocks == ["QwenImage21TransformerBlock"]
    assert not is_fused(model) and all(type(b) is Block for b in model.transformer_blocks)
    assert type(model.norm_out) is tq21.QwenImage21AdaLayerNormContinuous
    assert torch.equal(run(model, inputs), run(ref, inputs))


def test_a_subclass_keeps_its_overrides():
    class MyBlock(Block):
        marker = "mine"

    model = make_transformer(False)
    model.transformer_blocks[1].__class__ = MyBlock
    fuse_modulation(model)
    fused = type(model.transformer_blocks[1])
    assert issubclass(fused, MyBlock) and fused.marker == "mine" and fused.__name__ == "FusedMyBlock"
    assert "FusedMyBlock" in model._repeated_blocks
    unfuse_modulation(model)
    assert type(model.transformer_blocks[1]) is MyBlock


def test_bad_modulation_and_models_are_refused():
    mod = torch.zeros(3, 4 * 8)
    with pytest.raises(ValueError, match=r"modulation must be \(2, 4\*D\) for a batch of 2 without"):
        split_modulation(mod, None, 2)
    assert all(r.shared is not None for r in split_modulation(mod, torch.ones(5, dtype=torch.bool), 2))
    with pytest.raises(TypeError, match="QwenImage21Transformer2DModel"):
        fuse_modulation(torch.nn.Linear(2, 2))
    model = make_transformer(False)
    model.transformer_blocks[0].img_norm1 = torch.nn.LayerNorm(32, eps=1e-6)  # with an affine
    with pytest.raises(ValueError, match=r"transformer_blocks.0.img_norm1 has an elementwise affine"):
        fuse_modulation(model)
