"""QwenImage21VAE against diffusers' AutoencoderKLQwenImage21 on the CPU: parity (fp32 <= 1e-5),
the decoder split into its stages, the receptive field, tiling, weights and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ARCHS21, TINY21, decoding_with, diffusers_tiling, max_diff, pair21

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return pair21()


def latent(vae, b, h, w, seed=1, dtype=torch.float32, frames=True):
    g = torch.Generator().manual_seed(seed)
    shape = (b, vae.z_dim, 1, h, w) if frames else (b, vae.z_dim, h, w)
    return torch.randn(shape, generator=g).to(dtype)


def pixels(vae, b, h, w, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, vae.in_channels_pixels, 1, h, w, generator=g) * 2 - 1).to(dtype)


# -- parity with diffusers ---------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS21))
@pytest.mark.parametrize("b,h,w", [(2, 5, 7), (1, 3, 4)], ids=["B2-odd", "B1"])
def test_decode_matches_diffusers(arch, b, h, w):
    ref, ours = pair21(ARCHS21[arch])
    z = latent(ours, b, h, w)
    expected = ref.decode(z).sample
    out = ours.decode(z)
    assert out.shape == expected.shape == ours.output_shape(z)
    assert max_diff(out, expected) <= TOL
    assert out.abs().max() <= 1.0  # clamped


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(ARCHS21))
def test_encode_matches_diffusers(arch):
    ref, ours = pair21(ARCHS21[arch])
    s = ours.spatial_compression_ratio
    x = pixels(ours, 2, 3 * s, 5 * s)
    expected = ref.encode(x).latent_dist.mode()
    out = ours.encode(x)
    assert out.shape == expected.shape == (2, ours.z_dim, 1, 3, 5)
    assert max_diff(out, expected) <= TOL
    assert max_diff(ours.encode(x[:, :, 0]), expected[:, :, 0]) <= TOL  # 4-D in, 4-D out


@torch.no_grad()
def test_rgba_4d_latent_gives_4d_image(tiny):
    ref, ours = tiny
    z = latent(ours, 3, 4, 6, frames=False)
    out = ours.decode(z)
    assert out.shape == (3, 4, 32, 48)  # RGBA: the alpha channel kept
    assert max_diff(out, ref.decode(z.unsqueeze(2)).sample[:, :, 0]) <= TOL


def test_released_config_has_diffusers_keys_and_shapes():
    from diffusers import AutoencoderKLQwenImage21

    from qwenfast import QwenImage21VAE

    for kwargs in ({}, dict(is_residual=False), dict(patch_size=2, in_channels=16, out_channels=16),
                   dict(decoder_base_dim=None, num_res_blocks=1)):
        with torch.device("meta"):
            ref, ours = AutoencoderKLQwenImage21(**kwargs), QwenImage21VAE(**kwargs)
        shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}, kwargs
    assert ours.topology.receptive_field() == ours.decode_margin
    with torch.device("meta"):
        released = QwenImage21VAE()
    assert (released.z_dim, released.out_channels, released.spatial_compression_ratio) == (64, 4, 16)
    assert released.decode_margin == 13
    assert isinstance(released, __import__("qwenfast.vae.surface", fromlist=["DecodeSurface"]).DecodeSurface)


@pytest.mark.parametrize("in_dim,out_dim,factor_t", [(8, 8, 2), (8, 4, 2), (4, 2, 1), (6, 3, 1), (8, 6, 1), (3, 6, 1)])
def test_shortcuts_match_diffusers(in_dim, out_dim, factor_t):
    """The channel<->space shortcuts, affine (strided view) and general (index_select) alike."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import QwenImage21AvgDown3D, QwenImage21DupUp3D

    from qwenfast.vae.qwen_image21 import AvgDown3D, DupUp3D

    assert (DupUp3D(in_dim, out_dim, factor_t, 2)._affine is None) == ((in_dim, out_dim) in ((8, 6), (3, 6)))
    x = torch.randn(2, in_dim, 3, 5, dtype=torch.float64)
    ref = QwenImage21DupUp3D(in_dim, out_dim, factor_t, 2)(x.unsqueeze(2), first_chunk=True)[:, :, 0]
    assert torch.equal(DupUp3D(in_dim, out_dim, factor_t, 2)(x), ref)
    y = torch.randn_like(ref)
    assert torch.equal(DupUp3D(in_dim, out_dim, factor_t, 2).add_to(y.clone(), x), y + ref)
    # with the bias of the conv that made y, added first (the fused pass): (y + b) + shortcut
    b = torch.randn(out_dim, dtype=torch.float64)
    assert torch.equal(DupUp3D(in_dim, out_dim, factor_t, 2).add_to(y.clone(), x, bias=b), (y + b.view(-1, 1, 1)) + ref)
    if in_dim * 4 * factor_t % out_dim == 0:
        x = torch.randn(2, in_dim, 6, 4, dtype=torch.float64)
        ref = QwenImage21AvgDown3D(in_dim, out_dim, factor_t, 2)(x.unsqueeze(2))[:, :, 0]
        assert torch.allclose(AvgDown3D(in_dim, out_dim, factor_t, 2)(x), ref, rtol=0, atol=1e-15)


@torch.no_grad()
def test_bf16_decode_and_encode_keep_dtype():
    ref, ours = pair21(dtype=torch.bfloat16)
    z = latent(ours, 1, 3, 4, dtype=torch.bfloat16)
    out = ours.decode(z)
    assert out.dtype == torch.bfloat16
    assert max_diff(out, ref.decode(z).sample) < 0.1  # bf16 roundings in different places
    assert ours.encode(pixels(ours, 1, 16, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- the decoder's stages ---------------------------------------------------------------------------


@torch.no_grad()
def test_stages_compose_to_the_untiled_decode():
    _, ours = pair21(dtype=torch.float64)
    z = latent(ours, 2, 5, 6, dtype=torch.float64)
    a = ours.decode_head(z)
    o = ours.attend(a)
    h = ours.decode_tail(o)
    assert torch.equal(h, ours.decode_global(z))
    x = ours.decode_local(h)
    assert torch.equal(x, ours.decode_untiled(z))

    def chain(frame, cache):
        for i in range(len(ours.topology.levels)):
            frame = ours.decode_level(i, frame, cache)
        return frame

    assert torch.equal(ours.stream(chain, h), x)
    # queries=(n0, n1): the rows of those tokens, against all keys
    rows = ours.attend(a, queries=(7, 19))  # (B, T, 12, C)
    full = o.flatten(3).permute(0, 2, 3, 1)  # (B, T, N, C)
    assert rows.shape == (2, 1, 12, a.shape[1])
    assert max_diff(rows, full[:, :, 7:19]) < 1e-12


@torch.no_grad()
@pytest.mark.parametrize("arch", ["tiny", "patch2"])
def test_receptive_field_by_impulse(arch):
    """An impulse at one latent pixel of the mid-block output changes exactly the output pixels
    within `topology.receptive_field()` latent px of it, in float64."""
    _, ours = pair21(ARCHS21[arch], dtype=torch.float64)
    r, s = ours.decode_margin, ours.spatial_compression_ratio
    n = 2 * r + 3
    c = n // 2
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, ours.decoder.mid_block.dim, 1, n, n, generator=g, dtype=torch.float64)
    bumped = h.clone()
    bumped[..., c, c] += 1.0
    changed = (ours.decode_local(bumped) - ours.decode_local(h)).abs().amax(dim=(0, 1, 2)) > 0  # (s·n, s·n)
    rows = changed.any(dim=1).nonzero().flatten() // s
    cols = changed.any(dim=0).nonzero().flatten() // s
    assert (rows.min().item(), rows.max().item()) == (c - r, c + r)
    assert (cols.min().item(), cols.max().item()) == (c - r, c + r)


# -- tiling -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("arch", ["tiny", "patch2"])
def test_exact_tiling_equals_untiled_in_float64(arch):
    _, ours = pair21(ARCHS21[arch], dtype=torch.float64)
    z = latent(ours, 2, 9, 8, dtype=torch.float64)
    untiled = ours.decode(z)
    with decoding_with(ours, use_tiling=True, exact_tile_sample_size=4 * ours.spatial_compression_ratio):
        from qwenfast.vae.tiling import exact_tiles

        assert len(exact_tiles(ours, 9, 8)) == 6
        tiled = ours.decode(z)
    assert max_diff(tiled, untiled) <= 1e-12


@torch.no_grad()
@pytest.mark.parametrize("arch", ["tiny", "patch2"])
def test_blend_tiling_equals_diffusers_tiling(arch):
    ref, ours = pair21(ARCHS21[arch])
    s = ours.spatial_compression_ratio
    tile, stride = 4 * s, 3 * s
    z = latent(ours, 1, 7, 6)
    with diffusers_tiling(ref):
        ref.enable_tiling(tile, tile, stride, stride)
        expected = ref.decode(z).sample
    with decoding_with(ours, use_tiling=True, tiling="blend", tile_sample_min_height=tile,
                       tile_sample_min_width=tile, tile_sample_stride_height=stride, tile_sample_stride_width=stride):
        out = ours.decode(z)
    assert max_diff(out, expected) <= TOL
    assert max_diff(out, ours.decode(z)) > 1e-3  # blending really happened


@torch.no_grad()
def test_tiled_encode_equals_diffusers_tiled_encode(tiny):
    ref, ours = tiny
    x = pixels(ours, 1, 80, 72)
    with diffusers_tiling(ref):
        ref.enable_tiling(32, 32, 24, 24)
        expected = ref.encode(x).latent_dist.mode()
    with decoding_with(ours, use_tiling=True, tile_sample_min_height=32, tile_sample_min_width=32,
                       tile_sample_stride_height=24, tile_sample_stride_width=24):
        out = ours.encode(x)
    assert max_diff(out, expected) <= TOL


# -- weights ----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("arch", ["tiny", "patch2"])
def test_weights_round_trip(tmp_path, arch):
    from diffusers import AutoencoderKLQwenImage21

    from qwenfast import QwenImage21VAE

    ref, _ = pair21(ARCHS21[arch])
    ref.save_pretrained(tmp_path / "model" / "vae")
    for path in (tmp_path / "model", tmp_path / "model" / "vae"):
        ours = QwenImage21VAE.from_pretrained(path)
        z = latent(ours, 1, 3, 5)
        assert max_diff(ours.decode(z), ref.decode(z).sample) <= TOL
    back = AutoencoderKLQwenImage21(**ARCHS21[arch])
    back.load_state_dict(ours.state_dict(), strict=True)  # ours → diffusers
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


def test_directories_name_their_class(tmp_path):
    from helpers import diffusers_vae

    from qwenfast import QwenImage21VAE, QwenImageVAE
    from qwenfast.vae.weights import WeightsError, vae_class_for

    pair21()[0].save_pretrained(tmp_path / "v21")
    diffusers_vae().save_pretrained(tmp_path / "v1")
    assert vae_class_for(tmp_path / "v21") is QwenImage21VAE
    assert vae_class_for(tmp_path / "v1") is QwenImageVAE
    with pytest.raises(WeightsError, match=r"AutoencoderKLQwenImage21.*load it with qwenfast\.QwenImage21VAE"):
        QwenImageVAE.from_pretrained(tmp_path / "v21")
    with pytest.raises(WeightsError, match=r"\(AutoencoderKLQwenImage\): load it with qwenfast\.QwenImageVAE, not QwenImage21VAE"):
        QwenImage21VAE.from_pretrained(tmp_path / "v1")
    with pytest.raises(TypeError, match=r"QwenImage21VAE"):
        QwenImageVAE.from_diffusers(pair21()[0])


def test_bad_config_is_one_clear_line(tmp_path):
    from qwenfast import QwenImage21VAE
    from qwenfast.vae.weights import WeightsError

    pair21()[0].save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in (("num_res_blocks", 0), ("dim_mult", []), ("patch_size", 3), ("temperal_downsample", [True])):
        bad = dict(cfg, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(WeightsError, match=key) as info:
            QwenImage21VAE.from_pretrained(tmp_path)
        assert "\n" not in str(info.value)


# -- bad inputs ------------------------------------------------------------------------------------


def test_bad_inputs_are_one_clear_line():
    from qwenfast import QwenImage21VAE

    with torch.device("meta"):
        vae = QwenImage21VAE()  # the released architecture, no weights needed to refuse
    cases = [
        (vae.decode, torch.zeros(1, 16, 8, 8), r"expects 64 latent channels .*\(1, 16, 8, 8\)"),
        (vae.decode, torch.zeros(1, 64, 2, 8, 8), r"image model, T must be 1; got shape \(1, 64, 2, 8, 8\)"),
        (vae.decode, torch.zeros(64, 8, 8), r"got shape \(64, 8, 8\)"),
        (vae.decode, torch.zeros(1, 64, 0, 8), "empty"),
        (vae.encode, torch.zeros(1, 3, 32, 32), r"expects 4 channels .*\(1, 3, 32, 32\)"),
        (vae.encode, torch.zeros(1, 4, 40, 32), r"multiples of 16; got shape \(1, 4, 40, 32\)"),
    ]
    for fn, x, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn(x)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="out_channels"):
        QwenImage21VAE.validate_arch(dict(patch_size=2, out_channels=6))
    with pytest.raises(ValueError, match="attend: queries"):
        vae.attend(torch.zeros(1, 1152, 1, 2, 2, device="meta"), queries=(3, 9))


def test_top_level_export():
    import qwenfast

    assert qwenfast.QwenImage21VAE.diffusers_class_names == ("AutoencoderKLQwenImage21",)
    assert set(qwenfast.QwenImage21VAE.arch_keys) >= set(TINY21)


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_fused_shortcut_add_decodes_the_same(monkeypatch, dtype, tol):
    """qwen_image21.FUSED_SHORTCUT_ADD: the residual up blocks' upsampler bias and shortcut in one pass
    (here the op's PyTorch path; its kernel against it: tests/ops/test_elementwise.py) — same decode."""
    from qwenfast.vae import qwen_image21

    _, ours = pair21(ARCHS21["released-shape"], dtype=torch.float32)
    ours = ours.to(dtype)
    with torch.no_grad():  # biases large enough that one lost or added twice shows
        for name, p in ours.named_parameters():
            if name.endswith("resample.1.bias"):
                p.add_(0.5)
    z = torch.randn(1, ours.z_dim, 1, 3, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    monkeypatch.setattr(qwen_image21, "FUSED_SHORTCUT_ADD", False)
    plain = ours.decode(z)
    monkeypatch.setattr(qwen_image21, "FUSED_SHORTCUT_ADD", True)
    assert (plain - ours.decode(z)).abs().max().item() <= tol
