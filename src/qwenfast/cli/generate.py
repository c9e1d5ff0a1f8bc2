"""`qwenfast generate`: text-to-image from a local diffusers-format Qwen-Image directory.

The diffusers `QwenImagePipeline`, accelerated (`qwenfast.integrations.diffusers.accelerate`): fused
DiT modulation and qwenfast's VAE with the `--vae-config.*` options. The VAE is loaded by qwenfast's
own loader on every rank (safetensors only, keys and shapes checked; never diffusers' `from_pretrained`,
which would fall back to a .bin pickle) and handed to the pipeline. Under `torchrun`, rank 0 runs the
text encoder and the denoising loop, broadcasts the latent (one source of truth), every rank joins the
(parallel) decode, and rank 0 writes the image. Every stage ends with the ranks agreeing whether one
failed, so a failure anywhere is told by every rank, in one line, instead of leaving them waiting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, add_dtype_device_args, add_overwrite_arg

# Rank 0 loads the pipeline and denoises while the others wait at the end of that stage: a long wait.
FIRST_WAIT_S = 2 * 3600
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

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
    add_overwrite_arg(p)
    p.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default: 50)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the initial noise (default: 0)")
    p.add_argument("--height", type=int, default=1328, metavar="H", help=f"image height, a multiple of {MULTIPLE} (default: 1328)")
    p.add_argument("--width", type=int, default=1328, metavar="W", help=f"image width, a multiple of {MULTIPLE} (default: 1328)")
    p.add_argument("--no-fused-modulation", dest="fused_modulation", action="store_false",
                   help="run diffusers' own DiT blocks (decode still on qwenfast's VAE)")
    add_dtype_device_args(p)
    VAEConfig.add_cli_args(p)
    p.set_defaults(handler=run)


# -- checks: cheap, identical on every rank, before anything is loaded -------------------------


def check_model_dir(path: str) -> Path:
    """The directory must hold a diffusers `QwenImagePipeline` (model_index.json) whose component
    folders are all there and not empty: each model's config.json and .safetensors weights, the
    scheduler's scheduler_config.json, a tokenizer file."""
    model = Path(path)
    if not model.is_dir():
        raise CLIError(f"--model {path}: no such directory")
    index = model / "model_index.json"
    if not index.is_file():
        raise CLIError(f"--model {path}: not a diffusers pipeline directory (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
        cls = entries.get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise CLIError(f"--model {path}: model_index.json is not readable JSON ({e})") from None
    if cls != PIPELINE_CLASS:
        raise CLIError(f"--model {path}: a {cls or 'unnamed'} pipeline, not a {PIPELINE_CLASS} (text-to-image)")
    components = {"vae": "AutoencoderKLQwenImage", "transformer": "QwenImageTransformer2DModel",
                  "scheduler": "FlowMatchEulerDiscreteScheduler"}
    for name, value in entries.items():  # "text_encoder": ["transformers", "Qwen2_5_VL..."]
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]:
            components.setdefault(name, str(value[1]))
    missing = [m for name, c in components.items() if (m := _missing_files(model / name, c))]
    if missing:
        raise CLIError(f"--model {path}: " + "; ".join(missing))
    return model


def _missing_files(folder: Path, cls: str) -> str | None:
    """What a component folder lacks, in words, or None."""
    if not folder.is_dir():
        return f"missing the {folder.name}/ subfolder"
    try:
        files = [p.name for p in folder.iterdir()]
    except OSError as e:
        return f"{folder.name}/ is unreadable ({e.strerror})"
    if not files:
        return f"the {folder.name}/ subfolder is empty (it should hold the {cls})"
    if cls.endswith("Scheduler"):
        need = ["scheduler_config.json"]
    elif "Tokenizer" in cls or "Processor" in cls:
        need = []
    else:
        need = ["config.json"]
        if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
            others = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f" (found {', '.join(sorted(others))}: qwenfast loads safetensors only)" if others else ""
            return f"{folder.name}/ holds no .safetensors weights for the {cls}{hint}"
    absent = [f for f in need if f not in files]
    return f"{folder.name}/ has no {', '.join(absent)}" if absent else None


def check_args(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % MULTIPLE:
            raise CLIError(f"--{name} {v}: must be a positive multiple of {MULTIPLE}")
    if args.steps < 1:
        raise CLIError(f"--steps {args.steps}: must be at least 1")
    out = Path(args.output)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise CLIError(f"-o {args.output}: give an image file name (.png, .jpg, .webp, ...)")
    if not out.resolve().parent.is_dir():
        raise CLIError(f"-o {args.output}: directory {out.resolve().parent} does not exist")


def run(args: argparse.Namespace) -> int:
    from .common import owned_group

    with owned_group(FIRST_WAIT_S):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ..integrations.diffusers import decode_packed_latents
    from ..parallel import group as pg
    from . import media
    from .common import all_ranks_agree, out_of_memory_as_hint, resolve_device, resolve_dtype, vae_config_from_args

    rank0 = pg.is_rank0()
    with all_ranks_agree("checking the options"):
        check_args(args)
        vae_config = vae_config_from_args(args, progress_default=rank0)
        device = resolve_device(args.device)
        if pg.get_world_size() > 1 and device.type == "cuda" and args.device is None:
            device = torch.device("cuda", torch.cuda.current_device())  # init_from_env set LOCAL_RANK's
        dtype = resolve_dtype(args.dtype, device)
        model = check_model_dir(args.model)
        output = media.Output(Path(args.output), Path(args.output).suffix.lower()[1:])
        if rank0:  # rank 0 writes the image
            media.check_targets([output], overwrite=args.overwrite)
    with all_ranks_agree("loading the VAE"), out_of_memory_as_hint("loading the VAE"):
        vae = load_vae(model, vae_config, dtype, device)
    latents = None
    with all_ranks_agree("denoising"), out_of_memory_as_hint("denoising"):  # the others wait here
        if rank0:
            latents = _denoise(args, model, vae, vae_config, device, dtype)
    if pg.get_world_size() > 1:  # rank 0's latent, one source of truth; shapes from the arguments
        latents = pg.broadcast_tensor(latents if rank0 else torch.empty(_packed_shape(vae, args), dtype=dtype,
                                                                        device=device))
    with out_of_memory_as_hint(f"decoding {args.width}x{args.height}"), torch.no_grad():
        image = decode_packed_latents(vae, latents, args.height, args.width)
    with all_ranks_agree("writing the image"):
        if rank0:
            media.write_all([output], [media.writer(output, image[0])])
            print(f"wrote {args.output} ({args.width}x{args.height}, {args.steps} steps, seed {args.seed})")
    return 0


def load_vae(model: Path, vae_config, dtype, device):
    """The model's VAE through qwenfast's loader (safetensors only, checked), as the diffusers
    `AutoencoderKLQwenImage` the pipeline expects, over the same tensors (no copy), its decode
    routed to qwenfast's VAE with `vae_config`."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    from ..integrations.diffusers import route_vae_decode
    from ..vae import QwenImageVAE
    from ..vae.weights import WeightsError
    from .common import reading_error

    try:
        ours = QwenImageVAE.from_pretrained(model / "vae", dtype=dtype, device=device)
    except (OSError, WeightsError) as e:
        raise CLIError(f"--model {model}: the VAE: {reading_error(e)}") from None
    with torch.device("meta"):  # no init: every tensor comes from ours
        vae = AutoencoderKLQwenImage(**ours.config)
    vae.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return route_vae_decode(vae.eval().requires_grad_(False), vae_config)


def _packed_shape(vae, args) -> tuple[int, int, int]:
    """(1, tokens, 4·z_dim): the pipeline's latent, 2x2-packed into tokens."""
    scale = 2 ** len(vae.temperal_downsample)
    return 1, (args.height // (scale * 2)) * (args.width // (scale * 2)), 4 * vae.config.z_dim


def _denoise(args, model: Path, vae, vae_config, device, dtype):
    """Rank 0: the pipeline (text encoder, fused DiT, our VAE) up to the packed latent."""
    import torch
    from diffusers import QwenImagePipeline

    from ..integrations.diffusers import accelerate

    try:
        pipe = QwenImagePipeline.from_pretrained(str(model), vae=vae, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise CLIError(f"--model {model}: {str(e).strip().splitlines()[0]}") from None
    pipe = pipe.to(device)
    accelerate(pipe, vae_config=vae_config, fused_modulation=args.fused_modulation)
    pipe.set_progress_bar_config(desc="denoising")  # diffusers' bar, one tick per step
    latents = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
        true_cfg_scale=args.true_cfg_scale,
        height=args.height, width=args.width, num_inference_steps=args.steps,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        output_type="latent",
    ).images  # packed (1, (h/2)(w/2), 4·z_dim)
    shape = _packed_shape(vae, args)
    if tuple(latents.shape) != shape:
        raise RuntimeError(f"the pipeline's latent has shape {tuple(latents.shape)}, expected {shape}")
    return latents.to(device=device, dtype=dtype).contiguous()
