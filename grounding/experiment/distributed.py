"""Data parallel runs under torchrun: the process group, and the gathering of per-rank evaluation rows.

Under `torchrun --nproc_per_node N` every process sees WORLD_SIZE / RANK; the group uses gloo on CPU and nccl on CUDA.
A plain `python train.py` (or evaluate.py) is world size 1 and touches torch.distributed not at all. train.py sums
its per-rank gradients itself (an all-reduce in the tuning loop); evaluate.py shards the pairs and gathers the rows.
"""
import os

import torch
import torch.distributed as dist


def setup(device):
    """(rank, world_size); under torchrun the process group is created (once) for `device` ("cpu" | "cuda").

    On CUDA each process takes the GPU torchrun assigns it (LOCAL_RANK) as its current device, so "cuda" means a
    different GPU on every rank (an explicit "cuda:N" would put every rank on one GPU, so it is refused).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.startswith("cuda") and device != "cuda":
        raise ValueError(f"config key 'device': {device!r} under torchrun would put every rank on one GPU; "
                         "use device=cuda (each rank takes its LOCAL_RANK GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config key 'device': {device!r}, but this torch sees no CUDA device; use device=cpu")
    if world > 1 and device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def teardown(world):
    if world > 1:
        dist.destroy_process_group()


def gather_rows(rows, world):
    """Every rank's list of rows, concatenated in rank order (the same list on every rank); as is for one process."""
    if world == 1:
        return rows
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part]
