"""Reading latents and writing images and videos, each refused with one clear line when wrong, and
written atomically (a temporary file renamed into place) so that nothing is ever half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import CLIError


def load_latents(path: str | Path, z_dim: int, allow_nonfinite: bool = False) -> torch.Tensor:
    """The tensor named `latents` (or the only tensor) of a .safetensors file, checked:
    `[B, z_dim, T, h, w]` or `[B, z_dim, h, w]`, floating point, finite unless allowed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"latents file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
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


def check_writable(directory: Path) -> None:
    """Fail before the (long) decode, not after it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".qwenfast-probe-"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write to output directory {directory}: {e.strerror or e}") from None


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) or (C, H, W) in [-1, 1] → (T, H, W, C) or (H, W, C) uint8, as diffusers' postprocess;
    C = 3 (RGB) or 4 (RGBA: PIL writes the alpha channel into the PNG)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(0, -1).cpu().numpy()


def _atomic_write(path: Path, write) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_image(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    return _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def video_encoder() -> str:
    """'mp4' when PyAV is installed, else 'gif' (Pillow)."""
    try:
        import av  # noqa: F401

        return "mp4"
    except ImportError:
        return "gif"


def save_video(frames: np.ndarray, path_stem: Path, fps: int = 16) -> Path:
    """(T, H, W, 3) uint8 → `<stem>.mp4` (H.264 through PyAV) or `<stem>.gif` without a video encoder."""
    if video_encoder() == "mp4":
        def write(tmp):
            import av

            with av.open(tmp, mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
                stream.pix_fmt = "yuv420p"
                for frame in frames:
                    picture = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
                    container.mux(stream.encode(picture))
                container.mux(stream.encode())

        return _atomic_write(path_stem.with_suffix(".mp4"), write)

    from PIL import Image

    def write_gif(tmp):
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)

    return _atomic_write(path_stem.with_suffix(".gif"), write_gif)
