"""Distributed concerns in one place: torchrun set-up, rank helpers, exact metric sums, unwrapping."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import SettingError, alike_on_every_rank


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def resolve_device(pref: str) -> str:
    if pref == "cuda" and not torch.cuda.is_available():
        raise SettingError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto).")
    return "cuda" if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()) else "cpu"


def setup(device_pref: str = "auto") -> Dist:
    """Single process, or the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK)."""
    with alike_on_every_rank():  # (the flag's error: train.py says it once per node)
        kind = resolve_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                 device_id=device if kind == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def cleanup(finished: bool = False) -> None:
    """Leave the process group. finished: this rank got to the end without an error, or stops on one that every rank
    raised from one gathered decision (errors.together), and the others are expected there too: they first wait for
    each other (rank 0 may still be writing checkpoints). Without that wait, rank 1
    of the two-process torchrun test, which leaves first, aborted while Python shut down (SIGABRT, "terminate
    called without an active exception") in 2 of 339 runs on the 2-core VM, most beside two busy processes
    (2026-12-05). Our reading, not proven: a gloo worker thread still held the last collective's tensors, and
    releasing them took Python's lock after Python had begun to exit; the same abort ended rank 1 once (in a fresh
    clone's suite, 2026-12-06) after both ranks refused other teacher copies right after the gather that showed
    them. Not after another error: a rank that stopped early would keep the others waiting here (torchrun stops
    them when one fails)."""
    if tdist.is_initialized():
        if finished:
            tdist.barrier()
        tdist.destroy_process_group()


@contextmanager
def process_group(device_pref: str = "auto"):
    """`with process_group(cfg.device) as dist:` setup(), then cleanup(): with the ranks leaving together when the
    block ended without an error or with one every rank raised (errors.together), at once after any other."""
    dist = setup(device_pref)
    try:
        yield dist
    except BaseException as e:
        cleanup(finished=getattr(e, "every_rank_stops", False))
        raise
    cleanup(finished=True)


@contextmanager
def local_rank_zero_first(dist: Dist):
    """Each node's local rank 0 runs the block before the node's other ranks do: a download into the node's cache
    (torch.hub's) is then made once per node and read by the others, not made by every GPU's process at once. Every
    rank passes one barrier, local rank 0 even when the block raised: the others then run it themselves and stop at
    the same error (a missing file, no network), each printing it, rather than waiting in the barrier for a rank
    that left (NCCL would hold them there until its watchdog's timeout)."""
    if dist.world > 1 and dist.local_rank != 0:
        tdist.barrier()
        yield
        return
    try:
        yield
    except Exception:
        if dist.world > 1:
            tdist.barrier()
        raise
    if dist.world > 1:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); exact for integer counts held in float64 or int64."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP copies them from rank 0 before each
    training forward, and each rank then updates them with its own batch: without this, every rank would
    evaluate slightly different statistics from the ones the checkpoint (rank 0's) saves."""
    if tdist.is_initialized():
        for b in module.buffers():
            tdist.broadcast(b, src=0)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a small picklable object each)."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel around the (compiled) model when several processes train; the model itself for one."""
    if dist.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
