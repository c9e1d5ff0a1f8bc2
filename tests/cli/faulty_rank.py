"""`python faulty_rank.py ARGV` = `qwenfast ARGV`, with the fault QWENFAST_FAULT injected on rank 1
only (run under torchrun by test_errors.py):
  latent  rank 1 reads a latent that differs from rank 0's by 1 everywhere
  oom     rank 1 runs out of CPU memory inside the parallel decode (at the VAE's first layer)
"""

import os
import sys

import torch

from qwenfast import QwenImageVAE
from qwenfast.cli import main, media

FAULT = os.environ.get("QWENFAST_FAULT", "")


def _out_of_memory(module, args):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes. "
                       "Error code 12 (Cannot allocate memory)")


if os.environ.get("RANK") == "1":
    if FAULT == "latent":
        _load = media.load_latents
        media.load_latents = lambda *a, **k: _load(*a, **k) + 1
    elif FAULT == "oom":
        _from_pretrained = QwenImageVAE.from_pretrained.__func__

        def from_pretrained(cls, *a, **k):
            vae = _from_pretrained(cls, *a, **k)
            vae.post_quant_conv.register_forward_pre_hook(_out_of_memory)
            return vae

        QwenImageVAE.from_pretrained = classmethod(from_pretrained)
    else:
        raise SystemExit(f"unknown QWENFAST_FAULT {FAULT!r}")

torch.set_num_threads(1)
raise SystemExit(main(sys.argv[1:]))
