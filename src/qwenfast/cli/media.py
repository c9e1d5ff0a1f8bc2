"""Reading latents, planning output files and writing them: every file of one command or none.

The rules every subcommand's outputs follow:
- Plan first (`plan_outputs`, `check_targets`), before anything is loaded or decoded: the names, no
  name that is a directory, no existing file unless `--overwrite`, never the input (not even with
  `--overwrite`), a writable directory (its nearest existing ancestor when it is still to be made)
  and roughly enough free space. Nothing is created while checking.
- Write last (`write_all`): each file to a temporary name in its own directory
  (`NAME.XXXXXXXX.tmp`, visible, so that a killed process leaves nothing hidden), then rename them
  all; on any failure or interrupt every temporary file, every renamed file and every directory the
  call made are removed again. Files get the mode the umask gives (mkstemp's 0600 is widened).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .common import CLIError

# `-o NAME.SUFFIX` names one file of that kind; any other name is a directory.
IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4", ".gif")
# suffixes that look like a media file we do not write: refused rather than made into a directory
OTHER_MEDIA_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avi", ".mov", ".mkv", ".webm")


def load_latents(path: str | Path, z_dim: int, allow_nonfinite: bool = False) -> torch.Tensor:
    """The tensor named `latents` (or the only tensor) of a .safetensors file, checked:
    `[B, z_dim, T, h, w]` or `[B, z_dim, h, w]`, floating point, finite unless allowed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as e:  # e.g. a directory on the way that may not be searched
        raise CLIError(f"latents file {path} is unreadable: {e.strerror or e}") from None
    if not exists:
        raise CLIError(f"latents file not found: {path}")
    if not is_file:
        raise CLIError(f"latents file {path} is not a file")
    try:
        tensors = load_file(str(path))
    except OSError as e:
        raise CLIError(f"latents file {path} is unreadable: {e.strerror or e}") from None
    except SafetensorError as e:
        raise CLIError(f"cannot read {path} as safetensors: {e}") from None
    if "latents" in tensors:
        z = tensors["latents"]
    elif len(tensors) == 1:
        z = next(iter(tensors.values()))
    elif not tensors:
        raise CLIError(f"{path} holds no tensor")
    else:
        names = ", ".join(sorted(tensors)[:8])
        raise CLIError(f"{path} holds {len(tensors)} tensors and none is named 'latents' ({names})")
    if z.dim() not in (4, 5):
        raise CLIError(f"latents must be [B, {z_dim}, T, h, w] or [B, {z_dim}, h, w]; got shape {tuple(z.shape)}")
    if z.shape[1] != z_dim:
        raise CLIError(f"latents have {z.shape[1]} channels (dim 1) but the VAE expects {z_dim}; "
                       f"shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise CLIError(f"latents are empty: shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise CLIError(f"latents must be floating point; got {z.dtype}")
    if not allow_nonfinite:
        bad = (~torch.isfinite(z)).sum().item()
        if bad:
            raise CLIError(f"latents hold {bad} non-finite values (NaN/inf); pass --allow-nonfinite to decode anyway")
    return z


# -- planning: names and checks, nothing created ------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One file to write: where, in which format, and roughly how many bytes it will take."""

    path: Path
    kind: str  # "png" | "gif" | "mp4" (or another Pillow image format for `generate`)
    estimated_bytes: int = 0


def names_a_file(output: Path) -> bool:
    """`-o` names a file (not a directory) when it ends in a media suffix and is not a directory."""
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES + OTHER_MEDIA_SUFFIXES
    return output.suffix.lower() in suffixes and not output.is_dir()


def plan_outputs(latents: Path, shape: tuple[int, ...], output: Path) -> list[Output]:
    """The files a decode of latents of `shape` writes for `-o output`: `output` itself when it names
    a file (one image: .png; one video: .mp4 or .gif), else `output/<latents stem>[_NNN].<ext>`.
    Image latents and one-frame video latents give PNGs; videos MP4 (GIF without PyAV)."""
    count = shape[0]
    video = len(shape) == 5 and shape[2] > 1
    frames = 1 + (shape[2] - 1) * 4 if video else 1  # 4x temporal compression after the first frame
    pixels = frames * shape[-2] * 8 * shape[-1] * 8
    what = "video" if video else "image"
    if names_a_file(output):
        suffix = output.suffix.lower()
        if count != 1:
            raise CLIError(f"-o {output} names one file, but the latents {tuple(shape)} hold {count} {what}s; "
                           "give a directory")
        allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
        if suffix not in allowed:
            raise CLIError(f"-o {output}: the latents {tuple(shape)} decode to one {what}, written as "
                           f"{' or '.join(allowed)}; give such a file name or a directory")
        if suffix == ".mp4" and video_encoder() != "mp4":
            raise CLIError(f"-o {output}: writing MP4 needs PyAV (pip install av); use .gif or a directory")
        return [Output(output, suffix[1:], _estimate(suffix[1:], pixels))]
    kind = video_encoder() if video else "png"
    stems = [latents.stem] if count == 1 else [f"{latents.stem}_{i:03d}" for i in range(count)]
    return [Output(output / f"{stem}.{kind}", kind, _estimate(kind, pixels)) for stem in stems]


def _estimate(kind: str, pixels: int) -> int:
    """Rough bytes of one output file: PNG ~ raw RGB, GIF ~ one byte per pixel, H.264 far less."""
    return {"png": 3 * pixels, "gif": pixels, "mp4": pixels // 20}.get(kind, 3 * pixels)


def check_targets(outputs: list[Output], inputs: list[Path] = (), overwrite: bool = False) -> None:
    """Refuse, before any work, what writing `outputs` would get wrong (see the module docstring).
    Free space is checked loosely: only a disk clearly too small (< half the estimate) is refused."""
    for out in outputs:
        path = out.path
        for source in inputs:
            if _same_file(path, source):
                raise CLIError(f"output {path} is the input {source}; refusing to write over it "
                               "(choose another -o)")
        if path.is_dir():
            raise CLIError(f"output {path} is a directory; remove it or choose another -o")
        if path.exists() and not overwrite:
            raise CLIError(f"output {path} exists; pass --overwrite to replace it")
    by_dir: dict[Path, int] = {}
    for out in outputs:
        by_dir[out.path.parent] = by_dir.get(out.path.parent, 0) + out.estimated_bytes
    for directory, needed in by_dir.items():
        existing = _check_directory(directory)
        free = shutil.disk_usage(existing).free
        if free < needed // 2:
            raise CLIError(f"not enough free space in {existing}: the outputs need about {_mib(needed)}, "
                           f"{_mib(free)} free")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_directory(directory: Path) -> Path:
    """The nearest existing ancestor of `directory` (itself if it exists), checked to be a directory
    this process may create files in. Creates nothing."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write to output directory {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(existing) else "permission denied"
        raise CLIError(f"cannot write to output directory {directory}: {existing} is not writable ({reason})")
    return existing


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- writing: all or nothing --------------------------------------------------------------------


def write_all(outputs: list[Output], writers: list[Callable[[str], None]]) -> list[Path]:
    """Run `writers[i](tmp_name)` for every output, then rename every temporary file into place.
    Any failure (an OSError such as ENOSPC or EFBIG becomes one `CLIError` line) or interrupt removes
    every file and directory this call made, so the file system is as it was before."""
    made_dirs: list[Path] = []
    temps: list[str] = []
    placed: list[Path] = []
    current = None
    mode = 0o666 & ~_umask()
    try:
        for out in outputs:
            current = out.path
            made_dirs += _make_parents(out.path.parent)
        for out, write in zip(outputs, writers):
            current = out.path
            fd, tmp = tempfile.mkstemp(dir=out.path.parent, prefix=f"{out.path.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(tmp)
            write(tmp)
            os.chmod(tmp, mode)  # mkstemp makes 0600; a plain open() would honour the umask
        for out, tmp in zip(outputs, temps):
            current = out.path
            existed = out.path.exists()
            os.replace(tmp, out.path)
            if not existed:
                placed.append(out.path)
    except BaseException as e:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                d.rmdir()
        if isinstance(e, OSError):
            what = os.strerror(e.errno) if e.errno else str(e)
            hint = "; nothing was written" + (" (the disk is full)" if e.errno == errno.ENOSPC else "")
            raise CLIError(f"cannot write {current}: {what}{hint}") from None
        raise
    return [out.path for out in outputs]


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing = []
    d = Path(os.path.abspath(directory))
    while not d.exists():
        missing.append(d)
        d = d.parent
    made = []
    for d in reversed(missing):
        d.mkdir()
        made.append(d)
    return made


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- formats ------------------------------------------------------------------------------------


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) or (C, H, W) in [-1, 1] → (T, H, W, C) or (H, W, C) uint8, as diffusers' postprocess;
    C = 3 (RGB) or 4 (RGBA: PIL writes the alpha channel into the PNG)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(0, -1).cpu().numpy()


def video_encoder() -> str:
    """'mp4' when PyAV is installed, else 'gif' (Pillow)."""
    try:
        import av  # noqa: F401

        return "mp4"
    except ImportError:
        return "gif"


def write_image(image: np.ndarray, tmp: str, kind: str = "png") -> None:
    """(H, W, 3) uint8 → an image file in Pillow's format `kind` (png, jpeg, webp, ...)."""
    from PIL import Image

    Image.fromarray(image).save(tmp, format={"jpg": "jpeg", "tif": "tiff"}.get(kind, kind))


def write_gif(frames: np.ndarray, tmp: str, fps: int = 16) -> None:
    """(T, H, W, 3) uint8 → an animated GIF (Pillow)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)


def write_mp4(frames: np.ndarray, tmp: str, fps: int = 16) -> None:
    """(T, H, W, 3) uint8 → H.264 MP4 through PyAV (even sizes: a last odd row/column is dropped)."""
    import av

    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def writer(out: Output, pixels: torch.Tensor) -> Callable[[str], None]:
    """The writer of one decoded sample, (3, H, W) or (3, T, H, W) in [-1, 1], into `out`'s format.
    The module's write_* functions are looked up when called (tests replace them)."""
    if out.kind == "gif":
        return lambda tmp: write_gif(to_uint8(pixels), tmp)
    if out.kind == "mp4":
        return lambda tmp: write_mp4(to_uint8(pixels), tmp)
    if pixels.dim() == 4:  # a video of one frame is an image
        pixels = pixels[:, 0]
    return lambda tmp: write_image(to_uint8(pixels), tmp, out.kind)
