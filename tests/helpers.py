"""What the tests share: the tiny model configs (the only place they are written), diffusers'
AutoencoderKLQwenImage (the reference) and ours over the same weights, ours alone in float64 for the
exactness tests, and small process helpers. Gammas are perturbed so
that a wrong norm scale cannot hide behind all-ones."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.5, 2.0, 1.0])
# The full-size Qwen-Image decoder's topology (dim_mult, res blocks, up/downsamples) at a tiny width:
# a receptive field of 13 latent px, as the released model.
QWEN_TOPOLOGY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
# The smallest decoder with the family's structure (2 up blocks, 4x spatial, 2x temporal, one ResBlock a
# level): a receptive field of 5 latent px, so that float64 exactness checks with real tile windows
# take well under a second.
EXACT_ARCH = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=0, temperal_downsample=[False, True],
                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
# Other architectures diffusers accepts: 4x spatial / 2x temporal, more res blocks, odd z_dim.
ARCHS = {
    "tiny": TINY,
    "shallow": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 3], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[True, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "wide-z": dict(base_dim=4, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, False, True], latents_mean=[0.0] * 6, latents_std=[1.0] * 6),
}


# The Qwen-Image-2.1 VAE (AutoencoderKLQwenImage21): 8x/4x tiny versions of the released design,
# with and without the residual blocks, a patch size, a decoder wider than the encoder.
TINY21 = dict(base_dim=4, decoder_base_dim=6, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True], latents_mean=[0.0] * 6, latents_std=[1.0] * 6,
              scale_factor_spatial=8)
ARCHS21 = {
    "tiny": TINY21,
    "released-shape": dict(base_dim=4, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                           temperal_downsample=[False, True, True, True], latents_mean=[0.0] * 8,
                           latents_std=[1.0] * 8),
    "not-residual": dict(base_dim=4, decoder_base_dim=None, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2,
                         temperal_downsample=[True, False], is_residual=False, in_channels=3, out_channels=3,
                         latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=4),
    "patch2": dict(base_dim=4, decoder_base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True], in_channels=16, out_channels=16, patch_size=2,
                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=8),
}


def _perturb_gammas(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def diffusers_vae(arch: dict | None = None, seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return _perturb_gammas(AutoencoderKLQwenImage(**(arch or TINY)).eval())


def diffusers_vae21(arch: dict | None = None, seed: int = 0, dtype=torch.float32):
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    model = _perturb_gammas(AutoencoderKLQwenImage21(**(arch or TINY21)).eval())
    return model if dtype == torch.float32 else model.to(dtype)


def pair21(arch: dict | None = None, seed: int = 0, vae_config=None, dtype=torch.float32):
    """(diffusers' AutoencoderKLQwenImage21, our QwenImage21VAE over the same tensors)."""
    from qwenfast import QwenImage21VAE

    ref = diffusers_vae21(arch, seed, dtype)
    return ref, QwenImage21VAE.from_diffusers(ref, vae_config=vae_config)


def tiny_vae(arch: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Ours alone (no diffusers), seeded, in `dtype`: float64 by default, where exact paths agree to
    ~1e-14 and a margin one pixel short shows at >1e-6 (in fp32 both hide under re-association noise)."""
    from qwenfast import QwenImageVAE

    torch.manual_seed(seed)
    return _perturb_gammas(QwenImageVAE(**(arch or TINY)).eval()).to(dtype)


def latent(shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded random latent (B, z, T, h, w) (CPU)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def frame(shape: tuple[int, ...], channels_last: bool = False, dtype: torch.dtype = torch.float64,
          seed: int = 4) -> torch.Tensor:
    """A seeded random frame (B, C, H, W) (CPU), drawn in float64 then cast; channels-last on request."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pair(arch: dict | None = None, seed: int = 0, vae_config=None):
    """(diffusers reference, ours over the same tensors)."""
    from qwenfast import QwenImageVAE

    ref = diffusers_vae(arch, seed)
    return ref, QwenImageVAE.from_diffusers(ref, vae_config=vae_config)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def free_port() -> int:
    """A free TCP port on the loopback, for one test's process group."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list, nproc: int = 2, timeout: float = 300, script=None):
    """`torchrun --nproc-per-node nproc -m qwenfast ARGV` on CPU ranks (gloo), on a free port; the
    finished process (returncode, stdout, stderr). One thread per rank: the machine has two cores.
    `script`: a Python file that each rank runs instead of `-m qwenfast`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           *(["-m", "qwenfast"] if script is None else [str(script)]), *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def decoding_with(vae, **fields):
    """`vae.vae_config = VAEConfig(**fields)` for the block; the previous config is restored after."""
    from qwenfast import VAEConfig

    previous, vae.vae_config = vae.vae_config, VAEConfig(**fields)
    try:
        yield vae
    finally:
        vae.vae_config = previous


@contextlib.contextmanager
def diffusers_tiling(ref):
    """diffusers' `enable_tiling()` for the block, `disable_tiling()` after."""
    ref.enable_tiling()
    try:
        yield ref
    finally:
        ref.disable_tiling()


def count_calls(monkeypatch, module, names) -> list:
    """Wrap `module.<name>` for each name so that every call is recorded (its name) in the returned
    list: a test that must run a kernel can then prove it did, not pass on a fallback by accident."""
    calls: list = []
    for name in names:
        original = getattr(module, name)

        def counted(*a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(*a, **k)

        monkeypatch.setattr(module, name, counted)
    return calls


def reloaded(model, ref, tmp_path, cls):
    """`model.save_pretrained` then `cls.from_pretrained`: the state dict saved must equal `ref`'s."""
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    for (n, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), n
    return loaded


def assert_regional_compile_finds_blocks(model) -> None:
    """diffusers' `compile_repeated_blocks()` finds blocks by class name: it must find every block
    (only discovery is checked; the compiled call is dropped again, compiling is the benchmarks' job)."""
    model.compile_repeated_blocks()
    assert all(b._compiled_call_impl is not None for b in model.transformer_blocks)
    for b in model.transformer_blocks:
        b._compiled_call_impl = None


# -- a tiny Qwen-Image-2.1 text side (Qwen3-VL), built here: nothing is downloaded ------------------


def byte_level_vocab() -> dict[str, int]:
    """The GPT-2 byte-to-unicode table as a vocabulary: with no merges, every byte is one token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: i for i, c in enumerate(chars[b] for b in range(256))}


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@contextlib.contextmanager
def text_only_qwen3vl():
    """For the block: transformers' `Qwen3VLProcessor` can be built, saved and loaded with a bare
    `VideoProcessorMixin` standing in for its video processor (the real one needs torchvision, which
    the test machines lack; text-to-image never calls it). transformers checks a sub-processor's class
    by a name it looks up on its own module, where this one is not exported: it is set there. Where
    torchvision is installed (the GPU machine) the real video processor loads: nothing is stood in."""
    if HAS_TORCHVISION:
        yield
        return
    from transformers import processing_utils, video_processing_utils

    module, name = processing_utils.transformers_module, "VideoProcessorMixin"
    missing = object()
    previous = module.__dict__.get(name, missing)
    setattr(module, name, video_processing_utils.VideoProcessorMixin)
    try:
        yield
    finally:
        if previous is missing:
            delattr(module, name)
        else:
            setattr(module, name, previous)


# Qwen3-VL's special tokens that the Qwen-Image-2.1 pipeline's prompt templates use.
QWEN3VL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>")


def tiny_qwen3vl_processor():
    """A Qwen3VLProcessor: a byte-level tokenizer with Qwen3-VL's special tokens, the image processor's
    defaults, a chat template that renders `messages` as Qwen's `<|im_start|>role\\ntext<|im_end|>\\n`.
    Build (and save, load) it inside `text_only_qwen3vl()`."""
    import transformers
    from transformers import video_processing_utils

    tokenizer = transformers.Qwen2Tokenizer(vocab=byte_level_vocab(), merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN3VL_SPECIAL_TOKENS)})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}"
                "{% endfor %}<|im_end|>\n{% endfor %}")
    video = (transformers.Qwen3VLVideoProcessor() if HAS_TORCHVISION else video_processing_utils.VideoProcessorMixin())
    # the PIL image processor where transformers has one (5.2x); older releases name only the other
    image = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)()
    return transformers.Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer,
                                         video_processor=video,
                                         chat_template=template)


def tiny_qwen3vl_text_encoder(processor, hidden_size: int, seed: int = 0):
    """A one-layer Qwen3VLForConditionalGeneration whose hidden states are `hidden_size` wide (the
    DiT's `context_in_dim`), its token ids those of `processor`'s tokenizer."""
    import transformers

    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=12, intermediate_size=32, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=hidden_size, num_heads=2, intermediate_size=16,
                           deepstack_visual_indexes=[0], num_position_embeddings=16),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, loaded once and kept in sys.modules under `name` (the scripts
    import their siblings by name: `import memory_model`); the benchmarks folder is on sys.path while
    it loads."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
