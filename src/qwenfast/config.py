"""Runtime options of decoding, and their command-line flags.

`VAEConfig` holds *how* to decode (tiling, parallel decode, output placement), never the
architecture (that lives in the model's own config.json). It is a plain dataclass: validation in
`__post_init__` (run again for every assignment after construction), no other logic. Every field
is a CLI flag `--vae-config.<field-with-dashes>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields

__all__ = ["VAEConfig", "parse_bool"]

PARALLEL_DECODE_MODES = ("tiled", "patch", "auto")
TILING_FLAVOURS = ("exact", "blend")
PARALLEL_OUTPUTS = ("all", "rank0")
PATCH_HALOS = ("auto", "mid", "level")

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def parse_bool(value: str | bool) -> bool:
    """`true/false/1/0/yes/no/on/off` (any case) to a bool; anything else is an error."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (one of {', '.join(_TRUE + _FALSE)}), got {value!r}")


def _choices(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"VAEConfig.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass
class VAEConfig:
    """How the VAE decodes. The defaults decode exactly as diffusers does, on one device, untiled."""

    use_tiling: bool = False
    """Decode in spatial tiles so that memory stays bounded at any size."""

    tiling: str = "exact"
    """`exact`: run the global part of the decoder (post_quant_conv, conv_in, mid block with its
    attention) once on the whole latent, then the local part on tiles with a margin of at least its
    receptive field, cropped: equal to the untiled decode. `blend`: diffusers' overlapping tiles with a
    linear blend of the overlap (each tile decoded whole, with its own attention): not exact, equal to
    diffusers' `enable_tiling()` output."""

    tile_sample_min_height: int = 256
    """`blend` tiling: tile height in output pixels (diffusers' default)."""

    tile_sample_min_width: int = 256
    """`blend` tiling: tile width in output pixels (diffusers' default)."""

    tile_sample_stride_height: int = 192
    """`blend` tiling: vertical stride between tiles in output pixels; tile minus stride is blended."""

    tile_sample_stride_width: int = 192
    """`blend` tiling: horizontal stride between tiles in output pixels."""

    tile_sample_min_num_frames: int = 16
    """Temporal tile length in frames (Wan-family API parity). The Qwen-Image VAE streams frames
    through its causal frame cache, which bounds memory in time already, so it does not tile time."""

    tile_sample_stride_num_frames: int = 12
    """Temporal tile stride in frames (Wan-family API parity; see `tile_sample_min_num_frames`)."""

    exact_tile_sample_size: int = 1024
    """`exact` tiling: side of a tile's kept centre in output pixels (a multiple of 8). Each tile also
    decodes a margin of `tile_margin` latent pixels on every inner side, so larger tiles waste less."""

    tile_margin: int | None = None
    """`exact` tiling and `patch` decode: margin in latent pixels around each tile or patch. None
    takes the decoder's receptive field, derived from its architecture (13 for Qwen-Image)."""

    image_fast_path: bool = True
    """For a single frame (T = 1): skip the frame cache and run every causal conv, whose past frames
    are all zero padding, as the equivalent 2D conv. Same numbers, a fraction of the work."""

    cuda_graph: bool = False
    """Replay the decode as a CUDA graph, captured per latent shape, dtype, device and decode options (no
    launch gaps: 1024² 13.0 -> 12.4 ms on an H200, bit for bit the eager decode). On one device the whole
    decode is one graph; in the parallel modes each rank captures its compute between collectives
    (the collectives run outside the graphs, so NCCL and gloo work alike). A graph keeps its working
    memory between calls (at most two whole decodes, or four parallel segments;
    `vae.release_cuda_graphs()` frees them). CUDA latents only (others decode eagerly). Off by default;
    `qwenfast bench` and `accelerate(pipe)` turn it on, capturing from the second call of a signature
    (`cuda_graph_capture_call=2`)."""

    cuda_graph_capture_call: int = 1
    """With `cuda_graph`: capture on the N-th call of the same (shape, dtype, device, options); the calls
    before it decode eagerly. 1 captures on the first call; 2 only when a shape repeats, so a one-off
    decode never pays the capture (a warm-up, the capture, a replay) nor holds graph memory."""

    use_parallel_decode: bool = False
    """Spread the decode over the ranks of a torch.distributed process group (world by default).
    Off, or with one rank, decode is the single-device decode, bit for bit."""

    parallel_decode_mode: str = "tiled"
    """`tiled`: tiles (of the `tiling` flavour) balanced over ranks by cost. `patch`: one region per
    rank, exact. `auto`: chosen from the latent shape, world size, dtype and free memory."""

    parallel_output: str = "all"
    """Where the parallel decode's output goes: `all` ranks, or `rank0` only (others get None)."""

    patch_halo: str = "auto"
    """`patch` decode, how neighbour data is fetched: `mid` = one exchange of the mid-block output
    with a margin >= the receptive field (no messages until the gather); `level` = an exchange at
    each resolution level with a narrower margin (less redundant compute, more messages); `auto`
    (default) = `level` for video latents (T > 1) and for images on at least the model's
    `patch_level_image_world` ranks (Qwen-Image 4, Qwen-Image-2.1 2), `mid` for images on fewer, as the
    one-GPU rehearsal predicted fastest (`parallel.plan.choose_patch_halo`, docs/parallel.md)."""

    progress: bool = False
    """Show a progress bar over frames and tiles."""

    collective_timeout_s: float = 300.0
    """Parallel decode: seconds a rank waits in one collective for the other ranks before it raises
    `CollectiveTimeoutError` (a rank hung, died, or never called decode); the process group cannot be
    used again after that. A collective waits for the slowest rank's previous stage: 300 s is far
    above any stage of a GPU decode (whole single-GPU decodes on one H100: 0.45 s for a 4096² image,
    0.9 s for an 81-frame 720p video) and bounds a hang at 5 minutes instead of torch's 10 to 30.
    Raise it for very large decodes on the CPU. Applied to every collective on gloo, and to each
    stage's flag all-reduce on NCCL (a hang in a data collective holds up the next flag all-reduce on
    the stream; the last gather is bounded by the group's own timeout). The CLI creates its torchrun
    group with this timeout; a group you create keeps its own `init_process_group(timeout=...)`,
    which bounds every wait too."""

    def __post_init__(self) -> None:
        _choices("tiling", self.tiling, TILING_FLAVOURS)
        _choices("parallel_decode_mode", self.parallel_decode_mode, PARALLEL_DECODE_MODES)
        _choices("parallel_output", self.parallel_output, PARALLEL_OUTPUTS)
        _choices("patch_halo", self.patch_halo, PATCH_HALOS)
        for f in fields(self):
            value = getattr(self, f.name)
            if _base_type(f) is int and value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"VAEConfig.{f.name} must be an int; got {value!r}")
                lowest = 0 if f.name == "tile_margin" else 1
                if value < lowest:
                    what = "non-negative" if lowest == 0 else "positive"
                    raise ValueError(f"VAEConfig.{f.name} must be {what}; got {value}")
            if _base_type(f) is bool and not isinstance(value, bool):
                raise ValueError(f"VAEConfig.{f.name} must be a bool; got {value!r}")
            if _base_type(f) is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not 0 < value < float("inf")):
                raise ValueError(f"VAEConfig.{f.name} must be a positive, finite number of seconds; got {value!r}")
        for tile, stride in (
            ("tile_sample_min_height", "tile_sample_stride_height"),
            ("tile_sample_min_width", "tile_sample_stride_width"),
            ("tile_sample_min_num_frames", "tile_sample_stride_num_frames"),
        ):
            if getattr(self, stride) > getattr(self, tile):
                raise ValueError(
                    f"VAEConfig.{stride} ({getattr(self, stride)}) must not exceed "
                    f"VAEConfig.{tile} ({getattr(self, tile)}): tiles would leave gaps"
                )
        for name in ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                     "tile_sample_stride_width", "exact_tile_sample_size"):
            if getattr(self, name) % 8:
                raise ValueError(
                    f"VAEConfig.{name} must be a multiple of 8 (the VAE's spatial compression); got {getattr(self, name)}"
                )
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: typing.Any) -> None:
        # Once built, a config takes a new value only if the config it makes passes __post_init__
        # (the one validation): `cfg.tiling = "fuzzy"` raises, and the bad value is never stored.
        if self.__dict__.get("_validated") and not name.startswith("_"):
            if name not in {f.name for f in fields(self)}:
                raise AttributeError(f"VAEConfig has no field {name!r}")
            dataclasses.replace(self, **{name: value})
        object.__setattr__(self, name, value)

    # -- command line ---------------------------------------------------------------------------
    PREFIX: typing.ClassVar[str] = "vae-config."

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Register one `--vae-config.<field>` flag per field. Flags not given keep the defaults."""
        group = parser.add_argument_group("VAE decode options (qwenfast.VAEConfig)")
        for f in fields(cls):
            flag = "--" + cls.PREFIX + f.name.replace("_", "-")
            dest = "vae_config__" + f.name
            doc = " ".join((_field_doc(cls, f.name) or "").split())
            kind = _base_type(f)
            help_ = f"{doc} (default: {f.default})"
            if kind is bool:
                group.add_argument(flag, dest=dest, nargs="?", const=True, type=parse_bool,
                                   default=argparse.SUPPRESS, metavar="BOOL", help=help_)
            elif kind is int:
                group.add_argument(flag, dest=dest, type=_int_or_none if _optional(f) else int,
                                   default=argparse.SUPPRESS, metavar="N", help=help_)
            elif kind is float:
                group.add_argument(flag, dest=dest, type=float, default=argparse.SUPPRESS, metavar="X", help=help_)
            else:
                group.add_argument(flag, dest=dest, choices=_CHOICES.get(f.name),
                                   default=argparse.SUPPRESS, help=help_)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "VAEConfig":
        """Build a config from parsed args: the given flags over the dataclass defaults."""
        given = {k[len("vae_config__"):]: v for k, v in vars(args).items() if k.startswith("vae_config__")}
        return cls(**given)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)


_CHOICES = {
    "tiling": TILING_FLAVOURS,
    "parallel_decode_mode": PARALLEL_DECODE_MODES,
    "parallel_output": PARALLEL_OUTPUTS,
    "patch_halo": PATCH_HALOS,
}


def _int_or_none(value: str) -> int | None:
    return None if value.strip().lower() in ("none", "auto") else int(value)


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _base_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    for kind in (bool, int, float):
        if t.startswith(kind.__name__):
            return kind
    return str


def _field_doc(cls: type, name: str) -> str | None:
    """The string literal under a field (attribute docstring), read from the source once."""
    docs = _FIELD_DOCS.get(cls)
    if docs is None:
        import ast
        import inspect
        import textwrap

        docs = {}
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            body = tree.body[0].body
            for node, nxt in zip(body, body[1:]):
                if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    docs[node.target.id] = nxt.value.value
        except (OSError, TypeError):  # no source (frozen app): flags still work, help is shorter
            pass
        _FIELD_DOCS[cls] = docs
    return docs.get(name)


_FIELD_DOCS: dict[type, dict[str, str]] = {}
