"""`ParallelTiledVAE`: the seed's names for the parallel strategies, kept as a thin façade.

The models no longer inherit from it: a VAE of the family is a plain `DecodeSurface`
(qwenfast.vae.surface), and the strategies are functions over that surface (tiled.py, patch.py,
gather.py, dispatch.py). This class wraps one model and forwards the seed's entry points to them,
so code written against the seed keeps working:

    ParallelTiledVAE(vae).parallel_tiled_decode(z, comm)      # = tiled.parallel_tiled_decode(vae, z, comm, cfg)
    ParallelTiledVAE(vae).parallel_patch_decode(z, comm)      # = patch.parallel_patch_decode(vae, z, comm, cfg)
    ParallelTiledVAE(vae)._process_parallel_tiled_outputs(...)  # = gather.gather_pieces(...)
    vae._decode_with_parallel_dispatch(z)                     # = dispatch.decode_parallel(vae, z)

`z` is (B, z_dim, T, h, w) as `vae.check_latent` returns it; `comm` a qwenfast.parallel.comm object.
Importing this module imports no torch.distributed.
"""

from __future__ import annotations

import torch

__all__ = ["ParallelTiledVAE"]


class ParallelTiledVAE:
    """The seed's parallel entry points over one `DecodeSurface` (`self.vae`), with its `vae_config`."""

    def __init__(self, vae) -> None:
        self.vae = vae

    def parallel_tiled_decode(self, z: torch.Tensor, comm,
                              exact_tile_sample_size: int | None = None) -> torch.Tensor | None:
        """Tiles of the configured flavour balanced over ranks, gathered once (see `tiled.py`)."""
        from .tiled import parallel_tiled_decode

        return parallel_tiled_decode(self.vae, z, comm, self.vae.vae_config, exact_tile_sample_size)

    def parallel_patch_decode(self, z: torch.Tensor, comm) -> torch.Tensor | None:
        """One region per rank, exact (see `patch.py`)."""
        from .patch import parallel_patch_decode

        return parallel_patch_decode(self.vae, z, comm, self.vae.vae_config)

    def _process_parallel_tiled_outputs(self, pieces: list[torch.Tensor], assignment: list[list[int]],
                                        shapes: list[tuple[int, ...]], like: torch.Tensor,
                                        comm) -> list[torch.Tensor] | None:
        """The one gather step, to the ranks `vae_config.parallel_output` names (see `gather.py`)."""
        from .gather import gather_pieces

        return gather_pieces(pieces, assignment, shapes, like, comm, self.vae.vae_config.parallel_output)

    def _decode_with_parallel_dispatch(self, z: torch.Tensor) -> torch.Tensor | None:
        """The whole parallel decode of `z` (checked on every rank together; see `dispatch.py`)."""
        from .dispatch import decode_parallel  # imports torch.distributed

        return decode_parallel(self.vae, z)
