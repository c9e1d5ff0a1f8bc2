"""Decode strategies over tiles and ranks. The only package that imports torch.distributed
(lazily: importing it, or using single-device tiling, never initialises anything).

    base.py      ParallelTiledVAE: tiled_decode (one device), parallel_tiled_decode,
                 parallel_patch_decode, and the one gather step _process_parallel_tiled_outputs
    plan.py      pure planning from shapes: tiles, bands / 2-D grids, LPT balancing, the cost
                 model, halo costs, auto's decision (choose_decode)
    dispatch.py  decode_parallel(vae, z): the latent check on every rank, the mode, the stats
    mid.py       the global part split over ranks (each rank's share of the attention queries)
    halo.py      patch_halo="level": halo rows exchanged with the neighbours at each level
    comm.py      the collectives interface; SingleRankComm (one rank, no torch.distributed)
    group.py     ProcessGroupComm, and helpers for scripts and the CLI under torchrun:
                 init_from_env, destroy_if_owned, is_rank0, print0, get_rank, get_world_size
"""
