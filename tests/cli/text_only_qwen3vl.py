"""`python text_only_qwen3vl.py ARGV` = `qwenfast ARGV`, with transformers' Qwen3VLProcessor loadable
without torchvision (`helpers.text_only_qwen3vl`): how test_generate21.py runs a tiny Qwen-Image-2.1
directory under torchrun."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import text_only_qwen3vl  # noqa: E402

from qwenfast.cli import main  # noqa: E402

torch.set_num_threads(1)
with text_only_qwen3vl():
    code = main(sys.argv[1:])
raise SystemExit(code)
