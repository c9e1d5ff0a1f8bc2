"""Decode strategies over ranks, written once over the decode surface (`qwenfast.vae.surface`).
The only package that imports torch.distributed (lazily: importing it, or using single-device
tiling, never initialises anything). Strategies are functions of (vae, latent, comm, config) that
return the output; they use only the surface's public methods and its topology. Each rank's compute
between two collectives goes through `vae.run_graphed` (a CUDA graph with `VAEConfig.cuda_graph`).

    dispatch.py   decode_parallel(vae, z): the latent check on every rank, the mode, the stats
    tiled.py      parallel_tiled_decode: exact or blend tiles balanced over ranks; the exact-tiles
                  core shared with patch; replicated_decode (auto's "no parallel")
    patch.py      parallel_patch_decode: one region per rank (patch_halo "mid" or "level"; "auto" picks)
    attention.py  split_attention: each rank's share of the attention queries (vae.attend(a, queries=...));
                  tail_on_region: the mid block's last ResBlock on a rank's box
    halo.py       patch_halo="level": halo rows exchanged with the neighbours at each level
                  (vae.decode_level inside vae.stream)
    gather.py     gather_pieces: the one gather step of every strategy
    plan.py       pure planning from shapes: tiles, bands / 2-D grids, LPT balancing, the cost
                  model (levels from a DecoderTopology), halo costs, the halo (choose_patch_halo),
                  auto's decision (choose_decode)
    base.py       ParallelTiledVAE: the seed's names as a thin façade over the functions above
    comm.py       the collectives interface; SingleRankComm (one rank, no torch.distributed)
    group.py      ProcessGroupComm, and helpers for scripts and the CLI under torchrun:
                  init_from_env, destroy_if_owned, is_rank0, print0, get_rank, get_world_size
"""
