"""Failures that are not bad input still end in one line on stderr and exit status 2, never a
traceback: out of memory (CPU or GPU), a device this machine lacks, unreadable files, and under
torchrun a latent that differs between ranks, another rank's failure, a rank that died. `--debug`
and QWENFAST_DEBUG=1 bring the traceback back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import diffusers_vae, free_port
from qwenfast import QwenImageVAE
from qwenfast.cli import main

FAULTY_RANK = Path(__file__).with_name("faulty_rank.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    diffusers_vae().save_pretrained(root / "vae")
    save_file({"latents": torch.randn(1, 4, 13, 21, generator=torch.Generator().manual_seed(0))}, root / "lat.safetensors")
    return root


def decode_fails(capsys, files, out, pattern, *extra):
    code = main(["decode", str(files / "lat.safetensors"), "--vae", str(files / "vae"), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("qwenfast decode: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    return lines[0]


def raising(error):
    def decode(self, z):
        raise error
    return decode


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12 "
                 "(Cannot allocate memory)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 8589934592 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_out_of_memory_is_one_line_with_the_tiling_hint(files, tmp_path, capsys, monkeypatch, error):
    monkeypatch.setattr(QwenImageVAE, "decode", raising(error))
    decode_fails(capsys, files, tmp_path / "o", r"out of memory while decoding \(1, 4, 13, 21\).*--vae-config\.use-tiling")


@pytest.mark.parametrize("error,pattern", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                  "[127.0.0.1]:40785"), r"lost contact with another rank \(Connection closed by peer \[127"),
    ("remote", r"another rank of the group failed"),
    ("mismatch", r"same latent on every rank"),
])
def test_multi_rank_failures_are_one_line(files, tmp_path, capsys, monkeypatch, error, pattern):
    if error == "remote":
        from qwenfast.parallel.comm import RemoteRankError

        error = RemoteRankError("parallel decode aborted at stage 'x': another rank of the group failed")
    elif error == "mismatch":
        from qwenfast.parallel.dispatch import LatentMismatchError

        error = LatentMismatchError("parallel decode needs the same latent on every rank; ranks differ in sum")
    monkeypatch.setattr(QwenImageVAE, "decode", raising(error))
    decode_fails(capsys, files, tmp_path / "o", pattern)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch, how):
    monkeypatch.setattr(QwenImageVAE, "decode", raising(MemoryError()))
    argv = ["decode", str(files / "lat.safetensors"), "--vae", str(files / "vae"), "-o", str(tmp_path / "o")]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("QWENFAST_DEBUG", "1")
    from qwenfast.cli.common import CLIError

    with pytest.raises((MemoryError, CLIError)) as info:
        main(argv)
    # the traceback printed shows the MemoryError (as the error, or as the one being handled)
    assert isinstance(info.value, MemoryError) or (isinstance(info.value.__context__, MemoryError)
                                                   and not info.value.__suppress_context__)


def test_a_missing_device_is_refused_before_loading(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(QwenImageVAE, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    if not torch.backends.mps.is_available():
        decode_fails(capsys, files, tmp_path / "o", r"--device mps: MPS .* is not available", "--device", "mps")
    if not torch.cuda.is_available():
        decode_fails(capsys, files, tmp_path / "o", r"--device cuda: CUDA is not available", "--device", "cuda")
    else:
        decode_fails(capsys, files, tmp_path / "o", r"--device cuda:99: this machine has", "--device", "cuda:99")


def test_unreadable_latents_are_reported_as_unreadable(files, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    lat = tmp_path / "lat.safetensors"
    lat.write_bytes((files / "lat.safetensors").read_bytes())
    if os.geteuid() != 0:  # as root every file is readable: simulate what open() says
        lat.chmod(0)
    else:
        real = safetensors.torch.load_file

        def denied(path, device="cpu"):
            if str(path) == str(lat):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, device=device)
        monkeypatch.setattr(safetensors.torch, "load_file", denied)
    code = main(["decode", str(lat), "--vae", str(files / "vae"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"latents file .* is unreadable: Permission denied", err), err
    assert "not found" not in err and "No such file" not in err


def test_unreadable_vae_config_is_reported_as_unreadable(files, tmp_path, capsys, monkeypatch):
    real = Path.read_text

    def denied(self, *a, **k):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    import builtins

    real_open = builtins.open

    def denied_open(file, *a, **k):  # the loader reads config.json through open()
        if Path(str(file)).name == "config.json":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    monkeypatch.setattr(builtins, "open", denied_open)
    decode_fails(capsys, files, tmp_path / "o", r"--vae .*(config\.json is unreadable \(|cannot read .*config\.json: )Permission denied")


# -- under torchrun: every rank prints one line --------------------------------------------------


def torchrun_faulty(fault: str, argv: list, timeout: float = 240):
    """`torchrun -m qwenfast ARGV` on two CPU ranks with `fault` injected on rank 1 (faulty_rank.py)."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "QWENFAST_FAULT": fault}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(FAULTY_RANK), *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("fault,rank1,rank0", [
    ("latent", r"same latent on every rank", r"same latent on every rank"),
    ("oom", r"out of memory while decoding .*--vae-config\.use-tiling", r"another rank of the group failed"),
])
def test_torchrun_failures_are_one_line_on_every_rank(files, tmp_path, fault, rank1, rank0):
    out = tmp_path / "out"
    done = torchrun_faulty(fault, ["decode", files / "lat.safetensors", "--vae", files / "vae", "-o", out,
                                   "--vae-config.use-parallel-decode", "--vae-config.parallel-decode-mode", "patch"])
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("qwenfast decode: error: ")]
    assert 1 <= len(ours) <= 2, done.stderr[-3000:]  # one line from each rank (torchrun may cut one off: see test_torchrun)
    assert all(re.search(rank1, line) or re.search(rank0, line) for line in ours), ours
    assert len(ours) == 1 or any(re.search(rank0, line) for line in ours), ours
    assert "/qwenfast/" not in done.stderr  # torchrun prints its own traceback; none comes from our code
    assert not out.exists()
