"""The machine a benchmark or evaluation ran on, named so that figures from two machines are not mistaken for one."""

import platform
from pathlib import Path

import torch


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
