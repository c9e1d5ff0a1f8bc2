"""`qwenfast generate`: text-to-image from a local diffusers-format Qwen-Image or Qwen-Image-2.1 directory.

The directory's kind is told by model_index.json's `_class_name` (`MODELS`: one entry per kind, every
fact that differs between them in one place): diffusers' `QwenImagePipeline` (RGB) or
`QwenImage21Pipeline` (RGBA), accelerated (`qwenfast.integrations.diffusers.accelerate`): fused DiT
modulation and qwenfast's VAE with the `--vae-config.*` options. The VAE is loaded by qwenfast's own
loader on every rank (safetensors only, keys and shapes checked; never diffusers' `from_pretrained`,
which would fall back to a .bin pickle) and handed to the pipeline. Under `torchrun`, rank 0 runs the
text encoder and the denoising loop, broadcasts the latent (one source of truth), every rank joins the
(parallel) decode, and rank 0 writes the image. Every stage ends with the ranks agreeing whether one
failed, so a failure anywhere is told by every rank, in one line, instead of leaving them waiting.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .common import CLIError, add_dtype_device_args, add_overwrite_arg

# Rank 0 loads the pipeline and denoises while the others wait at the end of that stage: a long wait.
FIRST_WAIT_S = 2 * 3600
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_SUFFIXES = (".png", ".webp", ".tif", ".tiff")  # Pillow keeps RGBA's alpha in these (BMP drops it, JPEG fails)


@dataclass(frozen=True)
class Model:
    """Every fact `generate` needs of one kind of model directory (one entry of `MODELS`): checks,
    loading, the latent's shape between the ranks and the output's format follow from these alone."""

    name: str  # in messages and --help
    pipeline: str  # model_index.json's `_class_name`: the diffusers pipeline class that runs it
    components: dict[str, str]  # subfolder -> the class model_index.json must name for it
    vae: str  # qwenfast.vae's class for vae/ (its diffusers class is components["vae"])
    multiple: int  # height and width: multiples of this
    latent_patch: int  # latent pixels per token side: 2 (2x2 packed into channels) or 1 (unpatched)
    channels: int  # of the image: 3 (RGB) or 4 (RGBA)
    default_size: int
    default_steps: int
    default_true_cfg_scale: float


MODELS = {m.pipeline: m for m in (
    # 8x VAE x 2x2 packing of the latent into tokens: 16 px per token side.
    Model("Qwen-Image", "QwenImagePipeline",
          {"vae": "AutoencoderKLQwenImage", "transformer": "QwenImageTransformer2DModel",
           "scheduler": "FlowMatchEulerDiscreteScheduler"},
          vae="QwenImageVAE", multiple=16, latent_patch=2, channels=3,
          default_size=1328, default_steps=50, default_true_cfg_scale=4.0),
    # 16x VAE, unpatched tokens; the pipeline appends one mask slot per 2x2 group of latent pixels (and
    # silently rounds other sizes down to 32): 32. Sampled without guidance by design (diffusers' 1.0).
    Model("Qwen-Image-2.1", "QwenImage21Pipeline",
          {"vae": "AutoencoderKLQwenImage21", "transformer": "QwenImage21Transformer2DModel",
           "scheduler": "FlowMatchEulerDiscreteScheduler"},
          vae="QwenImage21VAE", multiple=32, latent_patch=1, channels=4,
          default_size=1024, default_steps=40, default_true_cfg_scale=1.0),
)}


def _per_model(fact) -> str:
    """`fact(model)` for every model, in words: "16 for Qwen-Image, 32 for Qwen-Image-2.1"."""
    return ", ".join(f"{fact(m)} for {m.name}" for m in MODELS.values())


def add_parser(subparsers) -> None:
    from ..config import VAEConfig

    names = " or ".join(m.name for m in MODELS.values())
    p = subparsers.add_parser(
        "generate",
        help=f"text-to-image with a local {names} model directory",
        description=f"Text-to-image with a local diffusers-format {names} directory (told apart by model_index.json: "
                    f"{' or '.join(MODELS)}), on the fused DiT and qwenfast's VAE. Qwen-Image-2.1 writes RGBA "
                    "images (.png, .webp or .tif keep the alpha channel). Under torchrun every rank joins the "
                    "decode; rank 0 writes the image.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help=f"diffusers-format {names} directory (model_index.json)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default: ' ')")
    p.add_argument("--true-cfg-scale", type=float, default=None,
                   help=f"true CFG scale; <= 1 turns CFG off (default: {_per_model(lambda m: m.default_true_cfg_scale)})")
    p.add_argument("-o", "--output", default="qwenfast.png", metavar="OUT", help="image file to write (default: qwenfast.png)")
    add_overwrite_arg(p)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="denoising steps (default: the model's own schedule: its model_index.json sample_sigmas "
                        f"if it has them, else {_per_model(lambda m: m.default_steps)})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the initial noise (default: 0)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, default=None, metavar=side[0].upper(),
                       help=f"image {side}, a multiple of {_per_model(lambda m: m.multiple)} "
                            f"(default: {_per_model(lambda m: m.default_size)})")
    p.add_argument("--no-fused-modulation", dest="fused_modulation", action="store_false",
                   help="run diffusers' own DiT blocks (decode still on qwenfast's VAE)")
    add_dtype_device_args(p)
    VAEConfig.add_cli_args(p)
    p.set_defaults(handler=run)


# -- checks: cheap, identical on every rank, before anything is loaded -------------------------


def read_model_index(path: str) -> tuple[Path, dict, Model]:
    """The directory, its model_index.json and the kind of model it names (`MODELS`)."""
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
    if cls not in MODELS:
        accepted = " or ".join(f"a {c} ({m.name} text-to-image)" for c, m in MODELS.items())
        raise CLIError(f"--model {path}: a {cls or 'unnamed'} pipeline, not {accepted}")
    return model, entries, MODELS[cls]


def with_model_defaults(args: argparse.Namespace, model: Model) -> argparse.Namespace:
    """`args` with the options left unset filled in from `model` (a copy; --steps stays None: see `_schedule`)."""
    defaults = dict(height=model.default_size, width=model.default_size, true_cfg_scale=model.default_true_cfg_scale)
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}})


def check_args(args: argparse.Namespace, model: Model) -> None:
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % model.multiple:
            raise CLIError(f"--{name} {v}: must be a positive multiple of {model.multiple} for {model.name}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps {args.steps}: must be at least 1")
    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise CLIError(f"-o {args.output}: give an image file name (.png, .jpg, .webp, ...)")
    if model.channels == 4 and suffix not in ALPHA_SUFFIXES:
        raise CLIError(f"-o {args.output}: {model.name} images are RGBA and {suffix} keeps no alpha channel; "
                       f"give {', '.join(ALPHA_SUFFIXES)}")
    if not out.resolve().parent.is_dir():
        raise CLIError(f"-o {args.output}: directory {out.resolve().parent} does not exist")


def check_components(path: Path, entries: dict, model: Model) -> None:
    """The component folders model_index.json names (and `model.components`, named with the classes
    they must hold) are all there and not empty: each model's config.json and .safetensors weights,
    the scheduler's scheduler_config.json, a tokenizer or processor file."""
    components = dict(model.components)
    for name, value in entries.items():  # "text_encoder": ["transformers", "Qwen2_5_VL..."]; not "sample_sigmas": [1.0, 0.5]
        if (not name.startswith("_") and isinstance(value, list) and len(value) == 2
                and all(isinstance(v, str) for v in value)):
            if name in components and value[1] != components[name]:
                raise CLIError(f"--model {path}: model_index.json names a {value[1]} for {name}/; "
                               f"a {model.pipeline}'s {name} is a {components[name]}")
            components.setdefault(name, str(value[1]))
    missing = [m for name, c in components.items() if (m := _missing_files(path / name, c))]
    if missing:
        raise CLIError(f"--model {path}: " + "; ".join(missing))


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
        path, entries, model = read_model_index(args.model)
        args = with_model_defaults(args, model)
        check_args(args, model)
        vae_config = vae_config_from_args(args, progress_default=rank0)
        device = resolve_device(args.device)
        if pg.get_world_size() > 1 and device.type == "cuda" and args.device is None:
            device = torch.device("cuda", torch.cuda.current_device())  # init_from_env set LOCAL_RANK's
        dtype = resolve_dtype(args.dtype, device)
        check_components(path, entries, model)
        schedule, steps = _schedule(args, entries, model)
        output = media.Output(Path(args.output), Path(args.output).suffix.lower()[1:])
        if rank0:  # rank 0 writes the image
            media.check_targets([output], overwrite=args.overwrite)
    with all_ranks_agree("loading the VAE"), out_of_memory_as_hint("loading the VAE"):
        vae = load_vae(path, model, vae_config, dtype, device)
    latents = None
    with all_ranks_agree("denoising"), out_of_memory_as_hint("denoising"):  # the others wait here
        if rank0:
            latents = _denoise(args, path, model, vae, vae_config, schedule, device, dtype)
    if pg.get_world_size() > 1:  # rank 0's latent, one source of truth; shapes from the arguments
        latents = pg.broadcast_tensor(latents if rank0 else torch.empty(_packed_shape(vae, model, args), dtype=dtype,
                                                                        device=device))
    with out_of_memory_as_hint(f"decoding {args.width}x{args.height}"), torch.no_grad():
        image = decode_packed_latents(vae, latents, args.height, args.width)  # (1, model.channels, H, W)
    with all_ranks_agree("writing the image"):
        if rank0:
            media.write_all([output], [media.writer(output, image[0])])  # RGBA keeps its alpha channel
            print(f"wrote {args.output} ({args.width}x{args.height}, {steps} steps, seed {args.seed})")
    return 0


def _schedule(args: argparse.Namespace, entries: dict, model: Model) -> tuple[dict, int]:
    """The pipeline call's schedule arguments and the number of steps they give. A pipeline whose
    model_index.json has `sample_sigmas` (Qwen-Image-2.1's may) runs those and ignores
    `num_inference_steps`: kept when --steps is not given; for --steps N, N steps on the linear grid
    the pipeline uses without them."""
    configured = entries.get("sample_sigmas")
    if args.steps is None and configured:
        return {}, len(configured)
    steps = args.steps or model.default_steps
    if not configured:
        return {"num_inference_steps": steps}, steps
    import numpy as np

    return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist()}, steps


def load_vae(path: Path, model: Model, vae_config, dtype, device):
    """The model's VAE through qwenfast's loader (safetensors only, checked), as the diffusers VAE the
    pipeline expects, over the same tensors (no copy), its decode routed to qwenfast's VAE with
    `vae_config`."""
    import diffusers
    import torch

    from .. import vae as qwenfast_vae
    from ..integrations.diffusers import route_vae_decode
    from ..vae.weights import WeightsError
    from .common import reading_error

    try:
        ours = getattr(qwenfast_vae, model.vae).from_pretrained(path / "vae", dtype=dtype, device=device)
    except (OSError, WeightsError) as e:
        raise CLIError(f"--model {path}: the VAE: {reading_error(e)}") from None
    with torch.device("meta"):  # no init: every tensor comes from ours
        vae = getattr(diffusers, model.components["vae"])(**ours.config)
    vae.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return route_vae_decode(vae.eval().requires_grad_(False), vae_config)


def _packed_shape(vae, model: Model, args) -> tuple[int, int, int]:
    """(1, tokens, latent_patch²·z_dim): the pipeline's latent, packed into tokens of
    latent_patch x latent_patch latent pixels."""
    from ..integrations.diffusers import qwenfast_vae

    side = qwenfast_vae(vae).spatial_compression_ratio * model.latent_patch  # pixels per token side
    return 1, (args.height // side) * (args.width // side), model.latent_patch ** 2 * vae.config.z_dim


def _denoise(args, path: Path, model: Model, vae, vae_config, schedule: dict, device, dtype):
    """Rank 0: the pipeline (text encoder, fused DiT, our VAE) up to the packed latent."""
    import diffusers
    import torch

    from ..integrations.diffusers import accelerate

    try:
        pipe = getattr(diffusers, model.pipeline).from_pretrained(str(path), vae=vae, torch_dtype=dtype,
                                                                  use_safetensors=True)
    except (OSError, ValueError) as e:  # e.g. "processor requires `torchvision`" (Qwen-Image-2.1's Qwen3VLProcessor)
        raise CLIError(f"--model {path}: {str(e).strip().splitlines()[0]}") from None
    pipe = pipe.to(device)
    accelerate(pipe, vae_config=vae_config, fused_modulation=args.fused_modulation)
    pipe.set_progress_bar_config(desc="denoising")  # diffusers' bar, one tick per step
    latents = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt if args.true_cfg_scale > 1 else None,
        true_cfg_scale=args.true_cfg_scale,
        height=args.height, width=args.width, **schedule,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        output_type="latent",
    ).images  # packed (1, tokens, latent_patch²·z_dim)
    shape = _packed_shape(vae, model, args)
    if tuple(latents.shape) != shape:
        raise RuntimeError(f"the pipeline's latent has shape {tuple(latents.shape)}, expected {shape}")
    return latents.to(device=device, dtype=dtype).contiguous()

