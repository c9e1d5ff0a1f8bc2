"""`qwenfast generate`: text-to-image from a local diffusers-format Qwen-Image directory.

The diffusers `QwenImagePipeline`, accelerated (`qwenfast.integrations.diffusers.accelerate`): fused
DiT modulation and qwenfast's VAE with the `--vae-config.*` options. Under `torchrun`, rank 0 runs
the text encoder and the denoising loop, broadcasts the latent (one source of truth), every rank
joins the (parallel) decode, and rank 0 writes the image. Other ranks load the VAE only.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

from .common import CLIError, add_dtype_device_args

PIPELINE_CLASS = "QwenImagePipeline"
MULTIPLE = 16  # 8x VAE compression x 2x2 packing of the latent into tokens


def add_parser(subparsers) -> None:
    from ..config import VAEConfig

    p = subparsers.add_parser(
        "generate",
        help="text-to-image with a local Qwen-Image model directory",
        description="Text-to-image with a local diffusers-format Qwen-Image directory, on the fused DiT "
                    "and qwenfast's VAE. Under torchrun every rank joins the decode; rank 0 writes the image.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers-format Qwen-Image directory (model_index.json)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    p.add_argument("--true-cfg-scale", type=float, default=4.0, help="true CFG scale; <= 1 turns CFG off (default: 4.0)")
    p.add_argument("-o", "--output", default="qwenfast.png", metavar="OUT", help="image file to write (default: qwenfast.png)")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default: 50)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the initial noise (default: 0)")
    p.add_argument("--height", type=int, default=1328, metavar="H", help=f"image height, a multiple of {MULTIPLE} (default: 1328)")
    p.add_argument("--width", type=int, default=1328, metavar="W", help=f"image width, a multiple of {MULTIPLE} (default: 1328)")
    p.add_argument("--no-fused-modulation", dest="fused_modulation", action="store_false",
                   help="run diffusers' own DiT blocks (decode still on qwenfast's VAE)")
    add_dtype_device_args(p)
    VAEConfig.add_cli_args(p)
    p.set_defaults(handler=run)


# -- checks: cheap, identical on every rank, before anything is loaded or any collective ----------


def check_model_dir(path: str) -> Path:
    """The directory must exist and hold a diffusers `QwenImagePipeline` (model_index.json)."""
    model = Path(path)
    if not model.is_dir():
        raise CLIError(f"--model {path}: no such directory")
    index = model / "model_index.json"
    if not index.is_file():
        raise CLIError(f"--model {path}: not a diffusers pipeline directory (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise CLIError(f"--model {path}: model_index.json is not readable JSON ({e})") from None
    if cls != PIPELINE_CLASS:
        raise CLIError(f"--model {path}: a {cls or 'unnamed'} pipeline, not a {PIPELINE_CLASS} (text-to-image)")
    for sub in ("vae", "transformer", "scheduler"):
        if not (model / sub).is_dir():
            raise CLIError(f"--model {path}: missing the {sub}/ subfolder")
    return model


def check_args(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % MULTIPLE:
            raise CLIError(f"--{name} {v}: must be a positive multiple of {MULTIPLE}")
    if args.steps < 1:
        raise CLIError(f"--steps {args.steps}: must be at least 1")
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        raise CLIError(f"-o {args.output}: give an image file name (.png, .jpg, .webp, ...)")
    if not out.resolve().parent.is_dir():
        raise CLIError(f"-o {args.output}: directory {out.resolve().parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from ..config import VAEConfig

    check_args(args)
    model = check_model_dir(args.model)
    try:
        vae_config = VAEConfig.from_cli_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None

    import torch

    from .common import resolve_device, resolve_dtype

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda" and args.device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(args.dtype, device)
    rank = _init_distributed(world, device)
    try:
        return _generate(args, model, vae_config, device, dtype, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _init_distributed(world: int, device) -> int:
    if world <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 denoises while the others wait at the first broadcast: allow a long first wait.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank()


def _generate(args, model: Path, vae_config, device, dtype, rank: int, world: int) -> int:
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    from ..integrations.diffusers import accelerate, decode_packed_latents, route_vae_decode

    latents, failure = None, None
    if rank == 0:
        try:
            pipe = QwenImagePipeline.from_pretrained(str(model), torch_dtype=dtype).to(device)
            accelerate(pipe, vae_config=vae_config, fused_modulation=args.fused_modulation)
            pipe.set_progress_bar_config(desc="denoising")  # diffusers' bar, one tick per step
            vae = pipe.vae
            latents = pipe(
                prompt=args.prompt,
                negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
                true_cfg_scale=args.true_cfg_scale,
                height=args.height, width=args.width, num_inference_steps=args.steps,
                generator=torch.Generator(device=device).manual_seed(args.seed),
                output_type="latent",
            ).images  # packed (1, (h/2)(w/2), 4·z_dim)
        except Exception as e:  # noqa: BLE001  (told to the other ranks below, then re-raised)
            failure = e
    else:
        vae = AutoencoderKLQwenImage.from_pretrained(str(model), subfolder="vae", torch_dtype=dtype).to(device)
        route_vae_decode(vae, vae_config)

    if world > 1:  # every rank leaves here together: with the latent, or all raising
        latents = _broadcast_latents(latents, failure, vae, args, device, dtype)
    if failure is not None:
        raise failure

    with torch.no_grad():
        image = decode_packed_latents(vae, latents, args.height, args.width)
    if rank == 0:
        from PIL import Image

        pixels = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
        Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(args.output)
        print(f"wrote {args.output} ({args.width}x{args.height}, {args.steps} steps, seed {args.seed})")
    return 0


def _broadcast_latents(latents, failure, vae, args, device, dtype):
    """Rank 0's packed latent to every rank, after a status word, so that a failure on rank 0 ends
    every rank instead of leaving them waiting. Shapes come from the arguments: tensors only."""
    import torch
    import torch.distributed as dist

    ok = torch.tensor([0 if failure is not None else 1], device=device)
    dist.broadcast(ok, src=0)
    if not ok.item():
        if failure is not None:
            raise failure
        raise RuntimeError("rank 0 failed before the decode; see its log")
    scale = 2 ** len(vae.temperal_downsample)
    tokens = (args.height // (scale * 2)) * (args.width // (scale * 2))
    shape = (1, tokens, 4 * vae.config.z_dim)
    if latents is None:
        latents = torch.empty(shape, device=device, dtype=dtype)
    latents = latents.to(device=device, dtype=dtype).contiguous()
    if tuple(latents.shape) != shape:
        raise RuntimeError(f"rank 0's latent has shape {tuple(latents.shape)}, expected {shape}")
    dist.broadcast(latents, src=0)
    return latents
