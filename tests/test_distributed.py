"""vitdeit.distributed with two real gloo processes: torchrun's environment read as torchrun sets it, the
collectives every rank relies on (gathered objects in rank order, rank 0's buffers, exact sums), and DDP's training
step against one process's."""

import contextlib
import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from conftest import spawn_two, torchrun_env
from vitdeit import distributed
from vitdeit.config import Config
from vitdeit.distributed import (Dist, all_gather_object, all_reduce_sum, broadcast_buffers, cleanup, process_group,
                                 setup, wrap)
from vitdeit.engine import Step, train_one_epoch
from vitdeit.errors import SettingError, VitdeitError, together
from vitdeit.models import create_model
from vitdeit.trainer import lr_schedule, make_loss, make_optimizer, to_device


def _as_rank(rank, world, port, out_dir):
    torchrun_env(rank, world, port)
    dist = setup("cpu")
    try:
        bn = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.running_mean.fill_(rank + 1.0)
            bn.weight.fill_(10.0 * (rank + 1))
        broadcast_buffers(bn)
        out = {"dist": [dist.rank, dist.world, dist.local_rank, dist.is_main],
               "gathered": all_gather_object({"rank": rank, "items": list(range(rank + 1))}),
               "running_mean": bn.running_mean.tolist(), "weight": bn.weight.tolist(),
               "sum": all_reduce_sum(torch.tensor([rank + 1.0, 2.0 ** 40 + rank], dtype=torch.float64)).tolist()}
    finally:
        cleanup()
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(out))


def test_two_processes_read_their_global_rank_gather_in_rank_order_and_share_rank_0s_buffers():
    outs = spawn_two(_as_rank)
    for rank, out in enumerate(outs):
        # RANK, not LOCAL_RANK, says which process writes checkpoints and prints: rank 1 is local rank 0 of its node
        assert out["dist"] == [rank, 2, 0, rank == 0]
        assert out["gathered"] == [{"rank": 0, "items": [0]}, {"rank": 1, "items": [0, 1]}]  # every rank's, in order
        assert out["running_mean"] == [1.0] * 3  # rank 0's running statistics on every rank...
        assert out["weight"] == [10.0 * (rank + 1)] * 3  # ...and only the buffers: parameters are DDP's to keep
        assert out["sum"] == [3.0, 2.0 * 2.0 ** 40 + 1]  # summed exactly, in float64


_G = torch.Generator().manual_seed(1)  # three global batches of 8 images (32 px) of 5 classes
GLOBAL_BATCHES = [(torch.randn(8, 3, 32, 32, generator=_G, dtype=torch.float64),
                   torch.randint(0, 5, (8,), generator=_G)) for _ in range(3)]


def _distilled_epoch(dist: Dist, batches) -> tuple[dict, dict]:
    """One epoch of DeiT-Tiny (32 px, 8 px patches) distilled (hard) from a ResNet-18 as train.py builds it: its
    optimiser, schedule, loss and Step, the model wrapped for `dist`, clipping on. In float64, so that where a sum's
    order differs (one process's batch against two ranks' halves averaged) is far below what is compared; so the
    teacher is a plain ResNet-18 in eval mode (models.frozen_teacher's float32 classifier takes no float64)."""
    cfg = Config(model="deit_tiny_distill", img_size=32, patch_size=8, drop_path=0.0, batch_size=len(batches[0][1]),
                 lr=0.5, warmup_epochs=0.0, epochs=2, clip_grad=0.5)  # (no drop-path: its draws are each rank's own)
    torch.manual_seed(0)  # the same initial weights, as train.py seeds them
    net = to_device(create_model(cfg.model, 5, cfg.img_size, cfg.patch_size, cfg.drop_path).double(), cfg,
                    dist.device)
    teacher = create_model("resnet18", 5).double().eval().requires_grad_(False)
    optimizer = make_optimizer(net, cfg, cfg.peak_lr(dist.world), dist.device)
    step = Step(wrap(net, dist), make_loss(cfg, teacher), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                clip_grad=cfg.clip_grad)
    metrics = train_one_epoch(step, batches, lr_schedule(optimizer, cfg, len(batches)), 0, dist, progress=False)
    return net.state_dict(), metrics


def _distilled_epoch_as_rank(rank, world, port, out_dir, save_dir):
    torchrun_env(rank, world, port)
    half = slice(rank * 4, rank * 4 + 4)  # rank 0 the first 4 images of every global batch, rank 1 the last 4
    with process_group("cpu") as dist:
        weights, metrics = _distilled_epoch(dist, [(x[half].contiguous(memory_format=torch.channels_last), y[half])
                                                   for x, y in GLOBAL_BATCHES])
    torch.save(weights, Path(save_dir) / f"{rank}.pt")
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(metrics))


def test_two_ranks_on_halves_of_each_batch_train_the_weights_one_process_trains_on_the_whole_batches(tmp_path,
                                                                                                      monkeypatch):
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **k: norms.append(float(clip(*a, **k))) or norms[-1])
    torch.manual_seed(0)
    start = create_model("deit_tiny_distill", 5, 32, 8).double().state_dict()
    weights, metrics = _distilled_epoch(Dist(), [(x.contiguous(memory_format=torch.channels_last), y)
                                                 for x, y in GLOBAL_BATCHES])
    assert len(norms) == 3 and min(norms) > 0.5  # clipping scaled every step's gradients (by their global norm)
    outs = spawn_two(_distilled_epoch_as_rank, str(tmp_path))
    for rank, out in enumerate(outs):
        ranks = torch.load(tmp_path / f"{rank}.pt")
        # the lr is per global batch (8 images here, 4 per rank), DDP averages the ranks' gradients, and clipping
        # sees their global norm: the same update, to float64's rounding, where the weights moved by 1e-3 or more
        assert max((ranks[k] - weights[k]).abs().max().item() for k in weights) < 1e-10
        assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 1e-3
        assert out["train_samples"] == 24 and out["train_top1"] == metrics["train_top1"]  # every rank's images counted
        assert abs(out["train_loss"] - metrics["train_loss"]) < 1e-12 and out["lr"] == metrics["lr"]


def test_one_process_without_torchrun_is_rank_0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = setup("cpu")
    assert dist == Dist(0, 1, 0, torch.device("cpu")) and dist.is_main
    assert all_gather_object("x") == ["x"] and all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    assert not Dist(rank=2, world=4, local_rank=0).is_main  # another node's first process


def _leave(rank, world, port, out_dir, fail):
    torchrun_env(rank, world, port)
    barriers, real = [], distributed.tdist.barrier
    distributed.tdist.barrier = lambda *a, **k: barriers.append(1) or real(*a, **k)
    destroys, real_destroy = [], distributed.tdist.destroy_process_group
    distributed.tdist.destroy_process_group = lambda *a, **k: destroys.append(1) or real_destroy(*a, **k)
    try:
        with distributed.process_group("cpu"):
            if fail in (False, "decided"):  # (a rank failing alone has no collective to finish: it would leave at once)
                all_reduce_sum(torch.ones(1000))
            time.sleep(1.0 if rank == 0 else 0.0)  # rank 0 ends its block a second after rank 1 (checkpoints)
            body_end = time.time()
            if fail:
                raise (KeyboardInterrupt() if fail == "ctrl-c" else together(SettingError("both")) if fail == "decided"
                       else RuntimeError("stop"))
    except (RuntimeError, KeyboardInterrupt, SettingError):
        pass
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps({"body_end": body_end, "left": time.time(),
                                                            "barriers": len(barriers), "destroys": len(destroys)}))


def _download(rank, world, port, out_dir, local_ranks, fail):
    torchrun_env(rank, world, port)
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    out = {}
    try:
        with distributed.process_group("cpu") as dist:
            with distributed.local_rank_zero_first(dist):
                out["start"] = time.time()
                time.sleep(1.0 if rank == 0 else 0.0)  # rank 0's "download" takes a second
                out["end"] = time.time()
                if fail:
                    raise OSError("no network")  # each rank that runs the block meets it
    except OSError as e:
        out["error"] = str(e)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(out))


@pytest.mark.parametrize("local_ranks", [(0, 1), (0, 0)])  # one node of two GPUs; two nodes of one
@pytest.mark.parametrize("fail", [False, True])
def test_each_nodes_local_rank_0_runs_the_download_before_that_nodes_other_ranks(local_ranks, fail):
    zero, one = spawn_two(_download, local_ranks, fail)  # (a rank left waiting would fail it: spawn_two's timeout)
    if local_ranks == (0, 1):  # rank 1 began only once its node's local rank 0 was done
        assert one["start"] >= zero["end"]
    else:  # each its node's local rank 0: neither waited for the other (rank 1 was done while rank 0 slept)
        assert one["end"] < zero["end"]
    assert zero.get("error") == one.get("error") == ("no network" if fail else None)  # each rank raised it itself


def test_train_py_loads_its_teacher_inside_local_rank_zero_first(monkeypatch):
    from contextlib import contextmanager

    from vitdeit import trainer
    from vitdeit.config import Config

    seen, cfg = [], Config(model="deit_tiny_distill")

    @contextmanager
    def first(dist):
        seen.append("enter")
        yield
        seen.append("exit")

    def load(*args):
        seen.append("load")
        net = torch.nn.Identity()
        net.interpolation, net.img_size = cfg.interpolation, cfg.img_size
        return net

    class Scored(Exception):
        pass

    monkeypatch.setattr(trainer, "local_rank_zero_first", first)
    monkeypatch.setattr(trainer, "load_teacher", load)
    monkeypatch.setattr(trainer, "to_device", lambda net, *a: seen.append("to_device") or net)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (_ for _ in ()).throw(Scored()))
    with pytest.raises(Scored):  # (the teacher is scored on val next: not this test's business)
        trainer.prepare_teacher(cfg, None, {}, None, Dist(), None)
    assert seen == ["enter", "load", "exit", "to_device"]  # loaded (downloaded) inside; moved to the GPU after


@pytest.mark.parametrize("fail", [False, "decided", "error", "ctrl-c"])
def test_ranks_leave_the_process_group_together_after_a_run_and_at_once_after_an_error_or_ctrl_c(fail):
    zero, one = spawn_two(_leave, fail)
    if fail in (False, "decided"):  # rank 1 waited for rank 0's block to end: it did not exit right after its last
        # collective (after a run, or an error every rank raised from one gathered decision: errors.together)
        assert zero["barriers"] == one["barriers"] == 1 and one["left"] >= zero["body_end"]
    else:  # nothing to wait for: a rank that raised must not keep the others waiting, nor wait for them
        assert zero["barriers"] == one["barriers"] == 0 and one["left"] < zero["body_end"]
    assert zero["destroys"] == one["destroys"] == 1  # each leaves the group, Ctrl-C (no Exception) included


def test_auto_picks_cuda_where_torch_sees_a_gpu_and_cpu_where_it_sees_none(monkeypatch):
    from vitdeit.distributed import resolve_device

    for visible in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
        assert resolve_device("auto") == ("cuda" if visible else "cpu") and resolve_device("cpu") == "cpu"


def test_a_process_on_a_gpu_node_takes_the_gpu_of_its_local_rank_not_its_global_one(monkeypatch):
    # rank 3 of a job, the second process on its node: cuda:1 (a node's GPUs are numbered from 0); WORLD_SIZE 1 here
    # so that no process group starts
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for key, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist = setup("auto")
    assert chosen == [1] and dist.device == torch.device("cuda", 1) and (dist.rank, dist.local_rank) == (3, 1)


def test_a_process_whose_local_rank_has_no_gpu_on_its_node_is_told_how_many_it_sees(monkeypatch):
    chosen = []  # torchrun --nproc_per_node=4 on a node that shows 2 GPUs: local ranks 2 and 3 have none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for key, value in {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": "4,5"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingError) as e:
        setup("auto")
    assert str(e.value) == ("LOCAL_RANK 2: this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=4,5), and each process "
                            "needs its own: start at most 2 per node (torchrun --nproc_per_node=2), or show each its "
                            "node's GPUs") and chosen == []
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup("auto").device == torch.device("cuda", 1) and chosen == [1]


def test_unwrap_finds_the_plain_module_under_ddp_and_compile_either_way_round():
    from types import SimpleNamespace

    from vitdeit.distributed import unwrap

    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net
    assert unwrap(SimpleNamespace(module=SimpleNamespace(_orig_mod=net))) is net  # DDP around a compiled model
    assert unwrap(SimpleNamespace(_orig_mod=SimpleNamespace(module=net))) is net  # compile around DDP


def test_a_teacher_that_does_not_load_is_an_error_every_rank_meets_alike(monkeypatch):
    from vitdeit import trainer
    from vitdeit.config import Config
    from vitdeit.errors import MissingFile

    def load(*args):
        raise MissingFile("--teacher-ckpt t.pth: not found")  # the same file on every rank of a node

    monkeypatch.setattr(trainer, "load_teacher", load)
    with pytest.raises(MissingFile) as e:
        trainer.prepare_teacher(Config(model="deit_tiny_distill"), None, {}, None, Dist(), None)
    assert e.value.alike_on_every_rank  # train.py: said once per node under torchrun


@pytest.mark.parametrize("teacher_px", [32, 48])
def test_the_weak_teacher_refusal_is_alike_on_every_rank_and_names_a_size_mismatch_first(monkeypatch, teacher_px):
    from vitdeit import trainer
    from vitdeit.config import Config
    from vitdeit.errors import SettingError

    teacher = torch.nn.Linear(2, 2)
    teacher.interpolation, teacher.img_size = "bilinear", teacher_px
    monkeypatch.setattr(trainer, "load_teacher", lambda *args: teacher)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_top1": 30.0, "val_samples": 40})  # all ranks'
    manifest = {"splits": {"val": {"class_counts": {"n0": 10, "n1": 10, "n2": 10, "n3": 10}}}}  # chance 25 %
    with pytest.raises(SettingError) as e:
        trainer.prepare_teacher(Config(model="deit_tiny_distill", img_size=48), None, manifest, None, Dist(), None)
    assert e.value.alike_on_every_rank  # the score every rank gathered: one verdict, said once per node
    assert e.value.every_rank_stops  # and every rank raises it: they leave the process group together
    fix = "It was trained on 32 px crops and is fed 48 px ones here: distil at --img-size 32 first. Train one"
    assert (fix in str(e.value)) == (teacher_px == 32) and "too little of these classes to teach them." in str(e.value)


def test_device_cuda_without_a_gpu_is_an_error_every_rank_meets_alike(monkeypatch):
    from vitdeit.errors import SettingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match="--device cuda: no CUDA GPU is visible") as e:
        setup("cuda")
    assert e.value.alike_on_every_rank


def test_eval_onlys_manifest_and_checkpoint_errors_are_alike_on_every_rank(tiny_shards, tmp_path):
    from vitdeit.config import Config
    from vitdeit.errors import DataError, MissingFile
    from vitdeit.trainer import evaluate_checkpoint

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "best.pth").write_bytes(b"")  # found: the shards are read next
    for cfg, kind in ((Config(data_path=str(tmp_path / "nowhere"), output_dir=str(tmp_path), run_name="r",
                              eval_only=True), DataError),
                      (Config(data_path=str(tiny_shards), output_dir=str(tmp_path), run_name="none", eval_only=True),
                       MissingFile)):
        with pytest.raises(kind) as e:
            evaluate_checkpoint(cfg)
        assert e.value.alike_on_every_rank


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_train_share_under_the_batch_is_alike_on_every_rank(tiny_shards, loader):
    from vitdeit.classes import load_manifest
    from vitdeit.config import Config
    from vitdeit.errors import BatchTooLarge
    from vitdeit.trainer import build_loaders

    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    shares = []
    for rank in range(7):  # 96 train images over 7 ranks: slices of 13 or 14, but every rank's share one count
        with pytest.raises(BatchTooLarge) as e:
            build_loaders(Config(data_path=str(tiny_shards), batch_size=40, loader=loader, workers=0),
                          load_manifest(tiny_shards), Dist(rank=rank, world=7), None)
        assert e.value.alike_on_every_rank
        shares.append(e.value.per_rank)
    assert shares == [14] * 7 if loader == "torch" else [13] * 7  # ceil(96 / 7) (padded), floor (whole slices)


def _on_its_own_node(rank, world, port, out_dir, cfgs):
    """train.py's training (or --eval-only) on rank `rank`, with that rank's node's files: what it raised."""
    from vitdeit.config import Config
    from vitdeit.trainer import evaluate_checkpoint, train

    torchrun_env(rank, world, port)
    cfg = Config(**cfgs[rank])
    try:
        evaluate_checkpoint(cfg) if cfg.eval_only else train(cfg)
        out = {"error": None}
    except Exception as e:  # noqa: BLE001 (the test reads its type and text)
        out = {"error": type(e).__name__, "text": str(e), "alike": getattr(e, "alike_on_every_rank", False),
               "together": getattr(e, "every_rank_stops", False)}
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(out))


def _save_raises_on_rank_0(rank, world, port, out_dir, cfgs, kind):
    import errno

    from vitdeit import trainer
    from vitdeit.errors import write_failed

    def save(path, state):  # rank 0's first save: its disk full, or an error that is no VitdeitError (a bug)
        if kind == "disk full":
            raise write_failed(Path(path), OSError(errno.ENOSPC, "No space left on device"), "nothing kept")
        raise RuntimeError("cannot pickle 'generator' object\nmore of the message")

    if rank == 0:
        trainer.save_checkpoint = save
    _on_its_own_node(rank, world, port, out_dir, cfgs)


def save_raises_on_rank_0(kind: str, shards: Path, tmp_path: Path) -> list[dict]:
    """What each of two ranks raised when rank 0's first checkpoint save raised (a tiny ViT, two epochs)."""
    common = dict(model="vit_tiny", img_size=32, patch_size=8, batch_size=16, workers=0, progress=False, epochs=2,
                  data_path=str(shards))
    return spawn_two(_save_raises_on_rank_0, [dict(common, output_dir=str(tmp_path / f"runs{r}")) for r in (0, 1)],
                     kind)


def test_a_write_that_fails_on_rank_0_stops_every_rank_with_its_message(tiny_shards, tmp_path):
    # (else the other nodes' ranks went on to the next epoch's collectives and waited there: spawn_two's timeout)
    zero, one = save_raises_on_rank_0("disk full", tiny_shards, tmp_path)
    assert zero["error"] == one["error"] == "WriteFailed" and zero["text"] == one["text"]
    last = tmp_path / "runs0" / "vit_tiny" / "last.pth"  # (an epoch's first checkpoint: best.pth follows it)
    assert zero["text"].startswith(f"could not write {last}: [Errno 28] No space left")
    assert zero["alike"] and one["alike"] and zero["together"] and one["together"]
    assert not (tmp_path / "runs1").exists()  # (rank 0 alone writes)


def test_any_other_error_of_rank_0_while_it_writes_stops_every_rank_naming_it(tiny_shards, tmp_path):
    # (else rank 1 stopped on gloo's "Connection closed by peer" as rank 0 left, a traceback naming nothing; rank 0's
    # error was not `together`, so neither rank waited for the other to leave)
    zero, one = save_raises_on_rank_0("bug", tiny_shards, tmp_path)
    # rank 0 raises its own error (train.py prints its traceback there); the others name it, once per node
    assert zero == {"error": "RuntimeError", "text": "cannot pickle 'generator' object\nmore of the message",
                    "alike": False, "together": True}
    assert one == {"error": "RankFailed", "text": "rank 0 stopped while writing the run's files (RuntimeError: cannot "
                   "pickle 'generator' object); its traceback is in rank 0's output", "alike": True, "together": True}


def test_nodes_whose_shards_differ_are_refused_on_every_rank_naming_each_nodes_pack(tiny_shards, tmp_path):
    import shutil
    import socket

    other = tmp_path / "node1" / "shards"  # the second node's copy, packed again with another --seed
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["options"]["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(manifest))
    common = dict(model="vit_tiny", img_size=32, patch_size=8, batch_size=16, workers=0, progress=False, epochs=1)
    cfgs = [dict(common, data_path=str(path), output_dir=str(tmp_path / f"runs{r}"))
            for r, path in enumerate((tiny_shards, other))]
    zero, one = spawn_two(_on_its_own_node, cfgs)
    host = socket.gethostname()
    assert zero["error"] == one["error"] == "SettingError" and zero["alike"] and one["alike"]
    assert zero["together"] and one["together"]  # decided from one gather: the ranks leave the group together
    # every rank names each node's --data-path and pack, by rank and host
    assert zero["text"] == one["text"] == (
        f"the shards (--data-path) differ between nodes (rank 0 on {host}: {tiny_shards}: --seed 0, 96 train + 24 val "
        f"images; rank 1 on {host}: {other}: --seed 7, 96 train + 24 val images); give every node the same shards: "
        f"copy one pack_shards.py --out folder to each (or pack each node's copy of the images with the same options "
        f"and --seed).")
    assert not (tmp_path / "runs0").exists() and not (tmp_path / "runs1").exists()  # refused before anything is written
    manifest["options"]["seed"] = 0  # the same pack, packed from another folder
    manifest["source"]["data_path"] = "/elsewhere/imagenet100"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert spawn_two(_on_its_own_node, cfgs) == [{"error": None}] * 2


def test_nodes_run_with_other_settings_are_refused_on_every_rank_naming_them(tiny_shards, tmp_path):
    import socket

    common = dict(model="vit_tiny", img_size=32, patch_size=8, batch_size=16, progress=False, epochs=1,
                  data_path=str(tiny_shards))
    cfgs = [dict(common, workers=0, output_dir=str(tmp_path / "a")),  # its own --workers and --output-dir: fine
            dict(common, workers=1, output_dir=str(tmp_path / "b"), loader="torch", epochs=2)]
    zero, one = spawn_two(_on_its_own_node, cfgs)
    host = socket.gethostname()
    assert zero == one and zero["error"] == "SettingError" and zero["alike"] and zero["together"]
    assert zero["text"] == (f"the nodes' commands differ (--epochs 1 on rank 0 ({host}), 2 on rank 1 ({host}); "
                            f"--loader 'auto' on rank 0 ({host}), 'torch' on rank 1 ({host})); run the same command "
                            f"on every node (only the paths of its files may differ, and --workers).")
    assert not (tmp_path / "a").exists()


def test_nodes_that_resume_or_score_other_checkpoints_are_refused_on_every_rank_naming_each_nodes_epoch(
        tiny_shards, tmp_path):
    import shutil
    import socket

    from vitdeit.config import Config
    from vitdeit.trainer import train

    common = dict(model="vit_tiny", img_size=32, patch_size=8, batch_size=16, workers=0, progress=False,
                  data_path=str(tiny_shards))
    run = tmp_path / "runs" / "vit"
    keep = lambda epoch, record: epoch == 0 and shutil.copyfile(run / "last.pth", tmp_path / "epoch0.pth")  # noqa: E731
    train(Config(**common, epochs=2, output_dir=str(tmp_path / "runs"), run_name="vit"), on_epoch_end=keep)
    (tmp_path / "node1").mkdir()
    shutil.copyfile(run / "last.pth", tmp_path / "node1" / "epoch0.pth")  # the other node's copy: a newer file
    host = socket.gethostname()
    for extra in (dict(epochs=4), dict(eval_only=True)):  # a resume, and --eval-only of the same path
        flag = "--eval-only" if extra.get("eval_only") else "--resume"
        cfgs = [dict(common, **extra, resume=str(folder / "epoch0.pth"), output_dir=str(tmp_path / f"out{r}"))
                for r, folder in enumerate((tmp_path, tmp_path / "node1"))]
        zero, one = spawn_two(_on_its_own_node, cfgs)
        assert zero["error"] == one["error"] == "SettingError" and zero["alike"] and one["alike"]
        assert zero["together"] and one["together"]  # decided from one gather: the ranks leave the group together
        assert zero["text"] == one["text"] == (
            f"the checkpoint ({flag}) differs between nodes (rank 0 on {host}: {tmp_path / 'epoch0.pth'}: epoch 0; "
            f"rank 1 on {host}: {tmp_path / 'node1' / 'epoch0.pth'}: epoch 1); give every node the same file: a "
            f"shared filesystem, or a copy of the run folder rank 0 writes.")
        assert not (tmp_path / "out0").exists() and not (tmp_path / "out1").exists()
    # two runs' checkpoints of the same epoch: told apart by their figures
    shutil.copyfile(tmp_path / "epoch0.pth", tmp_path / "node1" / "epoch0.pth")
    state = torch.load(tmp_path / "node1" / "epoch0.pth", weights_only=False)
    state["metrics"]["val_top1"] += 1.0
    torch.save(state, tmp_path / "node1" / "epoch0.pth")
    zero, one = spawn_two(_on_its_own_node, cfgs)  # (each node's path names it here; alike paths: the unit test below)
    assert (f"(rank 0 on {host}: {tmp_path / 'epoch0.pth'}: epoch 0; rank 1 on {host}: "
            f"{tmp_path / 'node1' / 'epoch0.pth'}: epoch 0)") in zero["text"], zero["text"]


def test_ranks_are_named_as_runs_of_consecutive_numbers_or_listed():
    from vitdeit.distributed import numbers_text, ranks_text

    assert [ranks_text(r) for r in ([3], [0, 1, 2, 3], [8, 9], [0, 2, 5])] == [
        "rank 3", "ranks 0-3", "ranks 8-9", "ranks 0, 2 and 5"]
    assert [numbers_text(n) for n in ([0], [4, 5, 6], [1, 3])] == ["0", "4-6", "1 and 3"]  # (epochs, in a note)


def test_the_node_check_groups_ranks_by_what_they_read_and_names_a_node_that_could_not_read(tiny_shards,
                                                                                            monkeypatch):
    from vitdeit import distributed, runs
    from vitdeit.classes import load_manifest
    from vitdeit.config import Config
    from vitdeit.errors import MissingFile

    manifest = load_manifest(tiny_shards)
    moved = {**manifest, "source": {"data_path": "/elsewhere/imagenet100"},  # the same pack from another folder,
             "options": {**manifest["options"], "skip_bad": True}}  # asked to skip bad files (none were)
    resized = {**manifest, "splits": {**manifest["splits"], "train": {  # a shard of another size: same counts
        **manifest["splits"]["train"], "shards": [{**s, "bytes": s["bytes"] + 1} for s in
                                                  manifest["splits"]["train"]["shards"]]}}}
    cfg = Config(data_path=str(tiny_shards))

    def gathered(*ranks):  # all_gather_object over ranks of (host, manifest or error): each rank's own view
        def gather(_):
            views = []
            for host, m in ranks:
                monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
                monkeypatch.setattr(distributed.socket, "gethostname", lambda: host)
                with contextlib.suppress(Exception):  # (that rank's own error: raised there)
                    runs.read_run_files(lambda: (m, None) if isinstance(m, dict) else (_ for _ in ()).throw(m),
                                               cfg)
            monkeypatch.setattr(distributed, "all_gather_object", gather)
            return views
        return gather

    monkeypatch.setattr(distributed, "all_gather_object", gathered(("a", manifest), ("a", moved), ("b", manifest)))
    assert runs.read_run_files(lambda: (manifest, None), cfg) == (manifest, None)  # all one pack
    monkeypatch.setattr(distributed, "all_gather_object", gathered(("a", manifest), ("a", manifest), ("b", resized),
                                                               ("c", resized), ("c", manifest)))
    with pytest.raises(runs.SettingError) as e:
        runs.read_run_files(lambda: (manifest, None), cfg)
    said = re.escape(f"{tiny_shards}: --seed 0, 96 train + 24 val images")
    ids = re.search(rf"\(ranks 0, 1 and 4 on a, c: {said} \(([0-9a-f]{{8}})\); ranks 2-3 on b, c: {said} "
                    rf"\(([0-9a-f]{{8}})\)\); give every node the same shards", str(e.value))
    assert ids and ids[1] != ids[2], str(e.value)
    gone, cut = MissingFile("--resume /runs/vit/last.pth: no such file"), OSError(5, "Input/output error")
    monkeypatch.setattr(distributed, "all_gather_object", gathered(("a", manifest), ("b", gone), ("b", gone),
                                                               ("c", resized), ("d", cut)))
    with pytest.raises(runs.SettingError) as e:  # before comparing: the others would wait for them
        runs.read_run_files(lambda: (manifest, None), cfg)
    assert str(e.value) == ("ranks 1-2 on b stopped reading this run's files: --resume /runs/vit/last.pth: no such "
                            "file; rank 4 on d stopped reading this run's files: OSError: [Errno 5] Input/output error")
    with pytest.raises(OSError) as own:  # a rank's own error, not a VitdeitError: raised as it is, marked together
        runs.read_run_files(lambda: (_ for _ in ()).throw(cut), cfg)
    assert own.value is cut and cut.every_rank_stops
    other_flags = Config(data_path="/elsewhere", epochs=9, allow_weak_teacher=True, workers=3, output_dir="/o",
                         progress=False, run_name="x", teacher_weights="/w.pth", resume="/r/last.pth")
    views = []
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "d")
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
    runs.read_run_files(lambda: (manifest, None), other_flags)  # a third rank's view, as it gathers it
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "a")
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, obj, views[0]])
    with pytest.raises(runs.SettingError) as e:
        runs.read_run_files(lambda: (manifest, None), cfg)
    # the flags each node may set for itself (its paths, --workers, --output-dir) are not named
    assert str(e.value) == ("the nodes' commands differ (--allow-weak-teacher False on ranks 0-1 (a), True on rank 2 "
                            "(d); --epochs 5 on ranks 0-1 (a), 9 on rank 2 (d)); run the same command on every node "
                            "(only the paths of its files may differ, and --workers).")
    ema = [Config(data_path=str(tiny_shards), eval_only=True, eval_ema=on) for on in (False, True)]
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
    runs.read_run_files(lambda: (manifest, None), ema[1])  # --eval-ema on one node alone: named, as --epochs is
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, views[-1]])
    with pytest.raises(runs.SettingError, match=r"^the nodes' commands differ \(--eval-ema False on rank 0 \(a\), "
                                                   r"True on rank 1 \(a\)\)"):
        runs.read_run_files(lambda: (manifest, None), ema[0])
    host, (pack, saved, settings), error = views[0]  # a node whose older vitdeit has no --seed setting
    older = (host, (pack, saved, {k: v for k, v in settings.items() if k != "seed"}), error)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [older, obj])  # (rank 0's lacks it)
    with pytest.raises(runs.SettingError, match=r"--epochs 9 on rank 0 \(d\), 5 on rank 1 \(a\); --seed None on "
                                                   r"rank 0 \(d\), 0 on rank 1 \(a\)\)"):
        runs.read_run_files(lambda: (manifest, None), cfg)
    relabelled = {**manifest, "classes": manifest["classes"][::-1]}  # the same shards' files, counts and sizes
    monkeypatch.setattr(distributed, "all_gather_object", gathered(("a", manifest), ("b", relabelled)))
    with pytest.raises(runs.SettingError, match=r"the shards \(--data-path\) differ between nodes"):
        runs.read_run_files(lambda: (manifest, None), cfg)
    monkeypatch.setattr(distributed, "all_gather_object", gathered(("a", gone), ("b", manifest)))
    with pytest.raises(runs.SettingError) as e:
        runs.read_run_files(lambda: (manifest, None), cfg)
    assert str(e.value) == "rank 0 on a stopped reading this run's files: --resume /runs/vit/last.pth: no such file"


def test_a_checkpoints_identity_is_its_epoch_its_figures_its_best_score_and_its_pack(tiny_shards):
    from vitdeit.classes import load_manifest
    from vitdeit.runs import run_files_identity

    manifest = load_manifest(tiny_shards)
    state = {"epoch": 3, "best_top1": 40.0, "pack": "ab12", "metrics": {"val_top1": 40.0, "train_loss": 1.25}}
    ident = run_files_identity((manifest, state))[1]
    assert ident[1] == "epoch 3"
    for other in ({"epoch": 4}, {"best_top1": 41.0}, {"pack": "cd34"}, {"metrics": {"val_top1": 40.0}}):
        assert run_files_identity((manifest, {**state, **other}))[1][0] != ident[0], other
    assert run_files_identity((manifest, dict(state)))[1] == ident  # (a copy of the same file: the same identity)


def test_nodes_whose_teacher_copies_differ_or_do_not_load_stop_every_rank(tiny_shards, tmp_path):
    import shutil
    import socket

    from vitdeit.config import Config
    from vitdeit.trainer import train

    common = dict(img_size=32, batch_size=16, workers=0, progress=False, data_path=str(tiny_shards))
    train(Config(**common, model="resnet18", epochs=1, output_dir=str(tmp_path / "runs"), run_name="t"))
    teacher = tmp_path / "runs" / "t" / "best.pth"
    (tmp_path / "node1").mkdir()
    other = tmp_path / "node1" / "best.pth"  # the other node's copy: another teacher's weights
    state = torch.load(teacher, weights_only=False)
    state["model"]["fc.bias"] += 1.0
    torch.save(state, other)
    cfgs = [dict(common, model="deit_tiny_distill", patch_size=8, epochs=1, teacher_ckpt=str(path),
                 allow_weak_teacher=True, output_dir=str(tmp_path / f"out{r}"))
            for r, path in enumerate((teacher, other))]
    zero, one = spawn_two(_on_its_own_node, cfgs)
    host = re.escape(socket.gethostname())
    assert zero["error"] == one["error"] == "SettingError" and zero["alike"] and one["alike"]
    assert zero["together"] and one["together"]  # decided from one gather: the ranks leave the group together
    assert re.fullmatch(rf"the teacher \(--teacher-ckpt {re.escape(str(teacher))}\) differs between nodes "
                        rf"\(rank 0 on {host}: its weights \(([0-9a-f]{{8}})\); rank 1 on {host}: its weights "
                        rf"\((?!\1)[0-9a-f]{{8}}\)\); give every node the same file: a shared filesystem, or a copy "
                        rf"of the run folder rank 0 writes\.", zero["text"]), zero["text"]
    assert not (tmp_path / "out0").exists()
    other.write_bytes(teacher.read_bytes()[:1000])  # a copy cut short on the other node
    zero, one = spawn_two(_on_its_own_node, cfgs)
    assert one["error"] == "DataError" and one["text"].startswith(f"--teacher-ckpt {other}: cannot be read")
    assert zero["together"] and one["together"]
    assert zero["error"] == "SettingError" and zero["text"] == f"rank 1 on {socket.gethostname()} stopped reading " \
                                                               f"this run's files: {one['text']}"
    shutil.copyfile(teacher, other)  # the same teacher: it trains
    assert spawn_two(_on_its_own_node, cfgs) == [{"error": None}] * 2


def test_nodes_whose_checkpoint_copies_differ_are_told_so_before_the_settings_those_copies_gave(tiny_shards,
                                                                                              monkeypatch):
    from vitdeit import distributed, runs
    from vitdeit.classes import load_manifest
    from vitdeit.config import Config

    manifest = load_manifest(tiny_shards)
    cfg = Config(data_path=str(tiny_shards), resume="/r/last.pth")
    state = {"epoch": 3, "best_top1": 40.0, "pack": "ab", "metrics": {"val_top1": 40.0}}
    views = []
    for epoch, lr in ((3, 5e-4), (5, 1e-3)):  # copies from either side of a resume that changed --lr
        monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
        runs.read_run_files(lambda: (manifest, {**state, "epoch": epoch}), dataclasses.replace(cfg, lr=lr))
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views)
    with pytest.raises(runs.SettingError, match=r"^the checkpoint \(--resume\) differs between nodes "
                                                   r"\(rank 0 on .*: /r/last.pth: epoch 3; rank 1 on .*: /r/last.pth: "
                                                   r"epoch 5\)"):
        runs.read_run_files(lambda: (manifest, state), cfg)
    views.clear()  # the same path and epoch on both nodes, other figures (two runs' epoch 3): told apart by their id
    for top1 in (40.0, 41.0):
        monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
        runs.read_run_files(lambda: (manifest, {**state, "metrics": {"val_top1": top1}}), cfg)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views)
    with pytest.raises(runs.SettingError, match=r"\(rank 0 on .*: /r/last.pth: epoch 3 \(([0-9a-f]{8})\); rank 1 "
                                                   r"on .*: /r/last.pth: epoch 3 \((?!\1)[0-9a-f]{8}\)\)"):
        runs.read_run_files(lambda: (manifest, state), cfg)

    def gathered(*reads):  # each rank's view: (its --resume, or --eval-only's RUN_DIR/best.pth, and the epoch saved)
        views.clear()
        for (flag, path), epoch in reads:
            monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views.append(obj) or [obj])
            on = (dataclasses.replace(cfg, resume=path),) if flag == "--resume" else (
                dataclasses.replace(cfg, resume="", eval_only=True), flag, path)
            runs.read_run_files(lambda: (manifest, {**state, "epoch": epoch}), *on)
        monkeypatch.setattr(distributed, "all_gather_object", lambda obj: views)

    gathered((("--resume", "/x/last.pth"), 3), (("--resume", "/y/last.pth"), 3), (("--resume", "/x/last.pth"), 5))
    with pytest.raises(runs.SettingError, match=r"\(ranks 0-1 on .*: /x/last.pth: epoch 3 / /y/last.pth: epoch 3; "
                                                   r"rank 2 on .*: /x/last.pth: epoch 5\)"):  # each node's own path
        runs.read_run_files(lambda: (manifest, state), cfg)
    gathered((("--eval-only", "/r/best.pth"), 3), (("--eval-only", "/r/best.pth"), 5))  # by run name: no --resume
    with pytest.raises(runs.SettingError, match=r"^the checkpoint \(--eval-only\) differs between nodes \(rank 0 "
                                                   r"on .*: /r/best.pth: epoch 3; rank 1 on .*: /r/best.pth: epoch 5"):
        runs.read_run_files(lambda: (manifest, state), dataclasses.replace(cfg, resume="", eval_only=True),
                               "--eval-only", "/r/best.pth")


class TwoArgs(VitdeitError):  # an error whose arguments are not its message: unpickling it fails
    def __init__(self, path, why):
        super().__init__(f"{path}: {why}")


@pytest.mark.parametrize("error, sent", [
    (KeyError(), "KeyError"),  # (no message: its type alone, not "KeyError: ")
    (RuntimeError("out of memory\nat line 2"), "RuntimeError: out of memory"),
    (TwoArgs("/x/last.pth", "read-only"), "TwoArgs: /x/last.pth: read-only"),
])
def test_rank_0_sends_an_error_that_would_not_come_back_as_itself_as_its_type_and_first_line(monkeypatch, error,
                                                                                              sent):
    from vitdeit.distributed import on_rank_0, picklable
    from vitdeit.errors import BatchTooLarge

    gathered = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: gathered.append(obj) or [obj, None])

    def write():
        raise error

    with pytest.raises(type(error)) as raised:  # rank 0 raises its own, traceback and all
        on_rank_0(Dist(rank=0, world=2), write)
    assert raised.value is error and gathered == [sent]
    # what the other ranks raise from that text
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [sent, obj])
    with pytest.raises(distributed.RankFailed, match=re.escape(f"rank 0 stopped while writing the run's files "
                                                               f"({sent}); its traceback is in rank 0's output")):
        on_rank_0(Dist(rank=1, world=2), write)
    assert picklable(BatchTooLarge("train", 3, 16)) and not picklable(TwoArgs("a", "b"))


class Reformatted(VitdeitError):  # one argument, formatted into its message: unpickled, it formats that message again
    def __init__(self, epochs):
        super().__init__(f"{epochs} epochs left")


def test_an_error_that_comes_back_with_another_message_is_sent_as_its_type_and_first_line(monkeypatch):
    from vitdeit.distributed import on_rank_0, picklable

    assert not picklable(Reformatted(3))  # (it would come back as "3 epochs left epochs left")
    gathered = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: gathered.append(obj) or [obj, None])

    def write():
        raise Reformatted(3)

    with pytest.raises(Reformatted, match="^3 epochs left$"):
        on_rank_0(Dist(rank=0, world=2), write)
    assert gathered == ["Reformatted: 3 epochs left"]


def test_ddp_on_a_gpu_node_is_given_the_gpu_of_the_local_rank_not_the_global_one(monkeypatch):
    given = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: given.append(device_ids) or "ddp")
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, Dist(rank=5, world=8, local_rank=1, device=torch.device("cuda", 1))) == "ddp"
    assert distributed.wrap(model, Dist(rank=1, world=2, local_rank=1)) == "ddp"  # gloo on CPUs: no device ids
    assert distributed.wrap(model, Dist()) is model and given == [[1], None]
