import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from vitdeit.demo import make_demo_dataset  # noqa: E402
from vitdeit.packing import PackOptions, pack  # noqa: E402

LABELS = ROOT / "Labels.json"


def checkpoint_state(classes: list[str], **keys) -> dict:
    """The smallest dict load_checkpoint takes as train.py's: a ViT-Tiny of len(classes) classes at 32 px, 8 px
    patches (its weights, its config), a best_top1 of 0 and epoch 0; `keys` added or replaced."""
    from vitdeit.config import Config
    from vitdeit.models import create_model

    net = create_model("vit_tiny", len(classes), 32, 8)
    return {"model": net.state_dict(), "best_top1": 0.0, "epoch": 0, "classes": list(classes),
            "config": Config(model="vit_tiny", img_size=32, patch_size=8).to_dict(), **keys}


def zip_record(path: Path, name_end: str):
    """(the ZipInfo, the offset of its first data byte) of the record of a torch.save file whose name ends in
    `name_end` ("/data.pkl", "/data/0"): its data starts after its local header, whose name and extra fields have
    lengths of their own (the central directory's extra field may differ)."""
    import struct
    import zipfile

    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(name_end))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name, extra = struct.unpack("<HH", f.read(4))
    return info, info.header_offset + 30 + name + extra


def free_port() -> int:
    """A port nobody listens on now: a rendezvous's, or one with nothing behind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """This process as torchrun's rank `rank` of `world`, each on a "node" of its own: RANK is the global rank,
    LOCAL_RANK 0 on both."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if Path("/sys/class/net/lo").exists():  # gloo on the loopback: a host whose name resolves nowhere still runs it
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


# spawn_two's processes fork from one server that imported these once (spawn imported torch, timm and the trainer
# again in each: 2-3 s of every two-rank test); a server, not a fork of the test process, which has run threads
SERVER_PRELOAD = ["torch", "torch.distributed", "timm", "torchvision", "vitdeit.trainer"]


def _server() -> None:
    """Start the fork server once, from the repository root: Python 3.11's imports its preloads from the folder it
    starts in (its sys.path is '' and the standard paths), which would otherwise be pytest's, and could hold
    another copy of vitdeit."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(SERVER_PRELOAD)  # (once the server runs, no change)
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        forkserver.ensure_running()
    finally:
        os.chdir(here)


def _in_env(rank: int, env: dict, fn, *args) -> None:
    """fn(rank, *args) under the test process's environment of now: a fork server's children inherit its own,
    from when it started."""
    import vitdeit

    assert Path(vitdeit.__file__).parent == ROOT / "vitdeit", f"the ranks import another vitdeit: {vitdeit.__file__}"
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def spawn_two(fn, *args, timeout: float = 120) -> list[dict]:
    """fn(rank, 2, port, out_dir, *args) in two processes; what each wrote to out_dir/RANK.json, in rank order.
    Past `timeout` s, both are killed and the test fails: a rank stuck in a collective would otherwise wait out
    gloo's 30-minute default."""
    import torch.multiprocessing as mp

    _server()
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_in_env, args=(dict(os.environ), fn, 2, free_port(), d, *args), nprocs=2, join=False,
                                 start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # (raises if a rank failed)
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                    p.join()
                pytest.fail(f"{fn.__name__}: its two ranks still running after {timeout} s")
        return [json.loads((Path(d) / f"{r}.json").read_text()) for r in range(2)]


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 ARGS` on a free port, from the repository root (which it can import from), one
    thread per process. Past `timeout` s, torchrun is stopped with SIGTERM, which it passes on to its workers (they
    run in sessions of their own: killing torchrun alone would leave them running), and the test fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=60)  # (torchrun waits up to 30 s for its workers, then kills them)
            pytest.fail(f"torchrun {' '.join(args)}: still running after {timeout} s; its stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def held_elsewhere(lock_file: Path):
    """The folder lock `lock_file` (made if missing) held for the block as another command would hold it: on a
    descriptor of its own (flock conflicts between two opens of the file, in one process too)."""
    import fcntl

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (lets go of it)


def lock_held(lock_file: Path) -> bool:
    """Whether some open file holds an flock on `lock_file` now: a try of our own, on a descriptor of its own (flock
    conflicts between two opens of the file, in one process too)."""
    import fcntl

    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (lets go of ours, if it got it)
    return False


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
    """Every test starts with Python's own Ctrl-C handler: a suite started in the background by a shell without job
    control (`cmd &` in a script) inherits SIGINT ignored, which the code keeps ignored (as it should), and the
    Ctrl-C tests would fail."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


_LOADER_ITERATORS = weakref.WeakSet()  # every DataLoader iterator with worker processes this session made


def _track_loader_iterators() -> None:
    from torch.utils.data import dataloader

    init = dataloader._MultiProcessingDataLoaderIter.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _LOADER_ITERATORS.add(self)

    dataloader._MultiProcessingDataLoaderIter.__init__ = tracked


_track_loader_iterators()


@pytest.fixture(autouse=True)
def loader_workers_end_with_their_test():
    """A test's DataLoader workers end with it. Ones it leaves alive (a kept traceback, `pytest.raises(...) as e`,
    holding its frame, which holds the loader) end in some later test's garbage collection, which closes their
    queues before the iterator can send them their end: 5 s of waiting per worker in an unrelated test."""
    before = {id(it) for it in _LOADER_ITERATORS}
    yield
    left = [it for it in _LOADER_ITERATORS if id(it) not in before and not it._shutdown]
    if left:
        pytest.fail(f"{len(left)} DataLoader iterator(s) this test made still have their workers: delete what holds "
                    f"them (an `as e` of pytest.raises around the loop holds the loader through its traceback)")


def small_dataset(path: Path, num_classes=4, train_per_class=24, val_per_class=6, seed=0) -> Path:
    return make_demo_dataset(path, LABELS, num_classes=num_classes, train_per_class=train_per_class,
                             val_per_class=val_per_class, seed=seed, min_size=40, max_size=64)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes, 24 train + 6 val images per class, in the ImageNet-100 layout."""
    return small_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_shards(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "shards"
    pack(tiny_data, out, opts=PackOptions(shard_size=30, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def learn_shards(tmp_path_factory) -> Path:
    """A quickly learnable demo set for short training runs: 4 classes (each its own shape and hue),
    160 train + 30 val per class."""
    base = tmp_path_factory.mktemp("learn")
    data = make_demo_dataset(base / "data", LABELS, num_classes=4, train_per_class=160, val_per_class=30,
                             seed=1, min_size=40, max_size=56, colour_cue=1.0)
    pack(data, base / "shards", opts=PackOptions(shard_size=200, workers=2), progress=False)
    return base / "shards"
