"""Distributed concerns in one place: torchrun set-up, rank helpers, exact metric sums, what every node read
(gathered and compared), rank 0's writes (their errors raised on every rank), unwrapping."""

from __future__ import annotations

import os
import pickle
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import RankFailed, SettingError, VitdeitError, alike_on_every_rank, first_line, together


GLOO_RELEASE_S = 0.05  # (gloo's worker needs the GIL for microseconds: cleanup says why)


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
        if local_rank >= (n := torch.cuda.device_count()):  # (else CUDA's "invalid device ordinal", a traceback)
            shown = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise SettingError(f"LOCAL_RANK {local_rank}: this process sees {n} GPU(s)" + (
                f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "") + f", and each process needs its "
                f"own: start at most {n} per node (torchrun --nproc_per_node={n}), or show each its node's GPUs")
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
    raised from one gathered decision (errors.together), so the others are on their way here too: they first wait
    for each other (rank 0 may still be writing checkpoints). Not after another error: a rank that stopped early
    would keep the others waiting here (torchrun stops them when one fails).

    Then a pause of GLOO_RELEASE_S with the GIL released. gloo's worker thread frees each finished collective after
    the caller has moved on, and a barrier's work holds the collectives before it, all_gather_object's among them,
    whose tensors Python made: freeing those takes the GIL. Taken while Python shuts down, that ends the thread,
    which C++ cannot unwind: SIGABRT, "terminate called without an active exception" (a core dump's stacks:
    ProcessGroupGloo::runLoop in ~AsyncBarrierWork -> ~AsyncAllgatherWork -> take_gil -> pthread_exit, the main
    thread in Py_FinalizeEx). Seen at exit in 2 of 339 two-process runs with no barrier here, and with the barrier in
    5 of 55 runs of the two tests that stop every rank from rank 0's write (2-core VM); with the pause, in none of
    30."""
    if tdist.is_initialized():
        if finished:
            tdist.barrier()
        tdist.destroy_process_group()
        time.sleep(GLOO_RELEASE_S)


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


def picklable(e: BaseException) -> bool:
    """Whether e goes through all_gather_object and comes back as itself: one that does not (an error class whose
    arguments are not its message) would be raised inside the gather, with no rank told why."""
    try:
        back = pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 (either way: sent as text)
        return False
    return type(back) is type(e) and str(back) == str(e)


def on_rank_0(dist: Dist, write):
    """write() on rank 0 alone (the run folder's files), any error of it raised on every rank: the others would
    otherwise go on to their next collective and wait there (on other nodes until the process group's timeout, with
    the message on rank 0's node alone), or stop on a lost connection once rank 0 has left (gloo's "Connection
    closed by peer", naming nothing). A VitdeitError (a full disk's WriteFailed) is raised alike everywhere; any other
    (a bug, a library's error) keeps its traceback on rank 0 and is named on the others. Returns write()'s value on
    rank 0, None on the others."""
    value, error = None, None
    if dist.is_main:
        try:
            value = write()
        except Exception as e:  # noqa: BLE001 (raised again below, on every rank)
            error = e
    if dist.world > 1:  # rank 0's error, pickled (its message and type); a string for one that may not pickle
        told = all_gather_object(error if error is None or isinstance(error, VitdeitError) and picklable(error)
                                 else ": ".join(filter(None, (type(error).__name__, first_line(error)))))[0]
        if not dist.is_main:
            error = RankFailed(f"rank 0 stopped while writing the run's files ({told}); its traceback is in rank 0's "
                               f"output") if isinstance(told, str) else told
    if error is not None:
        raise together(error)
    return value


def numbers_text(numbers: list[int]) -> str:
    """'3', '0-7', '0, 2 and 5': sorted numbers (ranks, epochs), to name in a message."""
    if len(numbers) == 1:
        return str(numbers[0])
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return f"{', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


def ranks_text(ranks: list[int]) -> str:
    """'rank 3', 'ranks 0-7', 'ranks 0, 2 and 5': a group of processes, to name in a message."""
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {numbers_text(ranks)}"


def hosts_of(ranks: list[int], seen: list) -> str:
    return ", ".join(sorted({seen[r][0] for r in ranks}))


def ranks_by(values: list) -> dict:
    """values[rank] -> {value: the ranks that hold it}, in the order of their first rank."""
    groups: dict = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    return groups


def read_on_every_node(read, identify) -> tuple[list, object]:
    """(every rank's (host, identify(value), None), read()'s value here): read() runs on every rank, on its own node's
    files, and what each read is gathered before any other collective. A rank whose read raised (a copy missing or
    damaged) stops every rank alike: the others name its ranks, hosts and error, where they would otherwise wait for
    it in their next collective. identify(value): a small picklable identity of what was read, for
    refuse_differing."""
    host = socket.gethostname()
    try:
        value = read()
        mine = (host, identify(value), None)
    except Exception as e:  # (its traceback is kept where it is not a VitdeitError: train.py prints it)
        all_gather_object((host, None, str(e) if isinstance(e, VitdeitError) else f"{type(e).__name__}: {e}"))
        raise together(e)
    seen = all_gather_object(mine)
    if stopped := {error: ranks for error, ranks in ranks_by([got[2] for got in seen]).items() if error is not None}:
        raise together(SettingError("; ".join(
            f"{ranks_text(ranks)} on {hosts_of(ranks, seen)} stopped reading this run's files: {error}"
            for error, ranks in stopped.items())))
    return seen, value


def refuse_differing(seen: list, what: str, fix: str, item=lambda identity: identity) -> None:
    """seen: read_on_every_node's; item(identity), an (id, description), must have one id on every rank: else a
    SettingError naming each group of ranks, its hosts and what it read (its ranks' descriptions). Other shards
    would give the ranks sample lists that overlap (an epoch sees some images twice and others never; val scores a
    wrong mix); another checkpoint, other weights from another epoch, whose collectives then wait on each other until
    they time out; another teacher, other targets on some ranks."""
    items = [item(identity) for _, identity, _ in seen]  # each rank's (id, description)
    groups = ranks_by([ident for ident, _ in items])  # id -> ranks
    if len(groups) > 1:
        # a group's description: its ranks' (each node's path to the same file may differ)
        desc = {ident: " / ".join(dict.fromkeys(items[r][1] for r in ranks)) for ident, ranks in groups.items()}
        said = list(desc.values())  # (alike descriptions of different files: told apart by their id)
        where = "; ".join(f"{ranks_text(ranks)} on {hosts_of(ranks, seen)}: {desc[ident]}"
                          + (f" ({ident[:8]})" if said.count(desc[ident]) > 1 else "")
                          for ident, ranks in groups.items())
        raise together(SettingError(f"{what} between nodes ({where}); {fix}."))


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
