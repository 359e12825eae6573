"""Training in several processes, on one machine or many, as ``torchrun`` starts them (PyTorch's distributed
data parallelism).

torchrun tells each process its number (``RANK``), how many there are (``WORLD_SIZE``) and its number on its
machine (``LOCAL_RANK``); a process started otherwise is alone, and the functions here then change nothing.
The processes hold the same weights: each computes the gradients of its own batch, and they average them
before every step, so that all take the same step. Process 0, the main one, alone writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import SettingsError

# How long the processes wait for one another: the others wait while the main process resamples the
# training cases into the cache, which for hundreds of scans takes far longer than torch's default.
WAIT_LIMIT = datetime.timedelta(hours=2)


def rank() -> int:
    """This process's number among those torchrun started (0: the main one); 0 when alone."""
    return int(os.environ.get("RANK", 0))


def process_count() -> int:
    """How many processes torchrun started; 1 when alone."""
    return int(os.environ.get("WORLD_SIZE", 1))


def device_of_this_process(device: str) -> torch.device:
    """``device``, where each of several processes on a machine gets a GPU of its own (cuda:LOCAL_RANK)."""
    device = torch.device(device)
    if process_count() > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The processes joined for the block (gloo on CPUs, NCCL on CUDA GPUs), and meeting at its end, so that
    what the main process wrote is there for all when the block ends."""
    if process_count() == 1:
        yield
        return
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"training in several processes runs on CPUs or CUDA GPUs, not on {device.type}; "
                            "train in one process (without torchrun), or with --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT_LIMIT,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block before the others do, so that they find what it wrote (the cache)."""
    if dist.is_initialized() and rank() != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and rank() == 0:
        dist.barrier()


def copy_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in every process with the main process's (as DistributedDataParallel does with
    the weights when it starts)."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def main_value(value: Any) -> Any:
    """The main process's ``value`` (anything a checkpoint can hold) in every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(parameters: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Set each parameter's gradient to its mean over the processes, and return the mean of their ``loss``.

    The mean of gradients of mean losses over batches of one size is the gradient of the mean loss over all
    their samples: the step of one process given every process's batch. This is what DistributedDataParallel
    computes, done here after the backward pass because the recipes call parts of the model (its
    ``denoise``, its ``segment``), not ``model(...)``, where DistributedDataParallel hooks its averaging in,
    and because stages train different parts. One all-reduce of every gradient and the loss together.
    """
    if not dist.is_initialized():
        return loss
    # A parameter this process's loss did not reach has no gradient (None): it sends zeros, as all must send the
    # same tensors, and with them whether it had one.
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    had_gradient = torch.tensor([float(p.grad is not None) for p in parameters], device=loss.device)
    flat = torch.cat([gradient.flatten() for gradient in gradients] + [had_gradient, loss.detach().float().reshape(1)])
    dist.all_reduce(flat)
    flat /= process_count()
    count = len(parameters)
    means = flat[:-1 - count].split([p.numel() for p in parameters])
    reached = (flat[-1 - count:-1] > 0).tolist()
    for parameter, gradient, mean, reached_anywhere in zip(parameters, gradients, means, reached):
        # one that no process's loss reached keeps no gradient, and AdamW leaves it alone, as in one process
        parameter.grad = gradient.copy_(mean.view_as(gradient)) if reached_anywhere else None
    return flat[-1]
