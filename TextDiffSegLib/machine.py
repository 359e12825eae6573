"""The device a model runs on, chosen by one vocabulary everywhere (the command line, the Slicer module and
its worker); and the machine a benchmark or evaluation ran on, named so that figures from two machines are not
mistaken for one."""

import platform
from pathlib import Path

import torch

from .errors import TextDiffSegError


DEVICES = ("auto", "cpu", "cuda", "mps")  # mps: Apple GPUs, where torch has them


def resolve_device(name: str) -> str:
    """The torch device for ``name`` (one of ``DEVICES``, or ``cuda:N``; any case): ``auto`` is a CUDA GPU where
    torch has one, else the CPU. The automatic choice happens only here, at the edge."""
    name = str(name).lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in DEVICES and not name.startswith("cuda:"):
        raise TextDiffSegError(f"unknown device {name!r}; use {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TextDiffSegError("the cuda device was asked for but no CUDA GPU is available to PyTorch; use the cpu "
                               "(--device cpu), or install a CUDA build of PyTorch (in Slicer: the PyTorch Utils module)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TextDiffSegError("the mps device was asked for but this Mac's GPU is not available to PyTorch; use the cpu")
    return name


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device; otherwise the CPU's model name (``/proc/cpuinfo`` on Linux)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
