"""Small random models shared by the tests: diffusers' AutoencoderKLQwenImage (the reference) and ours
over the same weights. Gammas are perturbed so that a wrong norm scale cannot hide behind all-ones."""

from __future__ import annotations

import contextlib

import torch

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.5, 2.0, 1.0])
# Other architectures diffusers accepts: 4x spatial / 2x temporal, more res blocks, odd z_dim.
ARCHS = {
    "tiny": TINY,
    "shallow": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 3], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[True, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "wide-z": dict(base_dim=4, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, False, True], latents_mean=[0.0] * 6, latents_std=[1.0] * 6),
}


def diffusers_vae(arch: dict | None = None, seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    model = AutoencoderKLQwenImage(**(arch or TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return model


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


def torchrun(argv: list, nproc: int = 2, timeout: float = 300):
    """`torchrun --nproc-per-node nproc -m qwenfast ARGV` on CPU ranks (gloo), on a free port; the
    finished process (returncode, stdout, stderr). One thread per rank: the machine has two cores."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "qwenfast", *map(str, argv)]
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
