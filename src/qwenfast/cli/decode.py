"""`qwenfast decode`: latents (.safetensors) → PNG images / MP4 (or GIF) videos."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import VAEConfig
from .common import (
    CLIError,
    add_dtype_device_args,
    add_overwrite_arg,
    all_ranks_agree,
    distributed,
    out_of_memory_as_hint,
    reading_error,
    resolve_device,
    resolve_dtype,
    vae_config_from_args,
)

DESCRIPTION = """\
Decode Qwen-Image latents to images (PNG, one per batch entry) or videos (MP4, or GIF when no video
encoder is installed). The VAE's kind is read from its config.json: a Qwen-Image-2.1 VAE
(AutoencoderKLQwenImage21, 64 latent channels, RGBA) writes RGBA PNGs; a Wan 2.1 VAE
(AutoencoderKLWan, e.g. a Wan2.1-T2V model's vae/) is the Qwen-Image VAE and decodes Wan video
latents (Wan 2.2's 48-channel VAE is refused).

LATENTS is a .safetensors file holding the tensor named `latents` (or a single tensor), unscaled as
diffusers' vae.decode takes it: [B, 16, T, h, w] or [B, 16, h, w]. Pass --normalized for latents still
in the DiT's normalised space (they are mapped back with the VAE's latents_mean / latents_std first).
"""

EPILOG = """\
examples:
  qwenfast decode latents.safetensors --vae /models/Qwen-Image -o out/
  qwenfast decode big.safetensors --vae /models/Qwen-Image/vae --vae-config.use-tiling
  torchrun --nproc-per-node 4 -m qwenfast decode big.safetensors --vae /models/Qwen-Image \\
      --vae-config.use-parallel-decode --vae-config.parallel-decode-mode patch
"""


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="decode latents to PNG images / MP4 videos", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("latents", help="a .safetensors file of latents")
    p.add_argument("--vae", required=True, metavar="PATH",
                   help="a diffusers-format VAE directory, or a Qwen-Image model directory with vae/")
    p.add_argument("-o", "--output", default="decoded", metavar="OUT",
                   help="output directory (default: ./decoded; made when the files are written), files named "
                        "after LATENTS (NAME.png, NAME_000.png, ... NAME.mp4); or, for one image or video, "
                        "the file itself: OUT.png, OUT.mp4 or OUT.gif")
    add_overwrite_arg(p)
    add_dtype_device_args(p)
    p.add_argument("--normalized", action="store_true",
                   help="latents are normalised: decode latents * latents_std + latents_mean")
    p.add_argument("--allow-nonfinite", action="store_true", help="decode latents holding NaN or inf anyway")
    VAEConfig.add_cli_args(p)
    p.set_defaults(handler=run)


def denormalize(z: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The inverse of the pipelines' normalisation: z · std + mean, per channel (dim 1)."""
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return z.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


@distributed
def run(args) -> int:
    from ..parallel import group as pg
    from ..vae.weights import WeightsError, vae_class_for
    from . import media

    with all_ranks_agree("checking the inputs"):
        cfg = vae_config_from_args(args, progress_default=pg.is_rank0())
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        try:
            with out_of_memory_as_hint(f"loading --vae {args.vae}"):
                # the model (Qwen-Image or Qwen-Image-2.1 VAE) from config.json's _class_name
                vae = vae_class_for(args.vae).from_pretrained(args.vae, vae_config=cfg, dtype=dtype, device=device)
        except (OSError, WeightsError) as e:
            raise CLIError(f"--vae {args.vae}: {reading_error(e)}") from None
        z = media.load_latents(args.latents, vae.z_dim, allow_nonfinite=args.allow_nonfinite)
        if args.normalized:
            z = denormalize(z, vae.config["latents_mean"], vae.config["latents_std"])
        outputs = None
        if pg.is_rank0():  # only rank 0 writes: its checks, before the (long) decode
            outputs = media.plan_outputs(Path(args.latents), tuple(z.shape), Path(args.output))
            media.check_targets(outputs, inputs=[Path(args.latents)], overwrite=args.overwrite)
        z = z.to(device=device, dtype=dtype)
    with out_of_memory_as_hint(f"decoding {tuple(z.shape)}"), torch.inference_mode():
        x = vae.decode(z)
    with all_ranks_agree("writing the outputs"):  # rank 0 writes; a failure there fails every rank
        if outputs is not None and x is not None:
            written = media.write_all(outputs, [media.writer(out, sample) for out, sample in zip(outputs, x)])
            for path in written:
                print(path)
    return 0

