"""Training under torchrun: one process per GPU (NCCL), or per CPU process (gloo)."""

from __future__ import annotations

import os

import torch


def join_process_group(device: str) -> tuple[str, int]:
    """This process's device and rank; when torchrun started several (WORLD_SIZE > 1), joins their group first.

    On CUDA each process takes the GPU of its LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    return device, torch.distributed.get_rank()
