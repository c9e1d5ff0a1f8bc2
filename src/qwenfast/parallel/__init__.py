"""Decode strategies over tiles and ranks. The only package that imports torch.distributed
(lazily: importing it, or using single-device tiling, never initialises anything)."""
