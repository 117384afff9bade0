"""train.py on CPU: learning, checkpoints, exact resume, eval-only, torchrun with 2 processes."""

import dataclasses
import json
import math
import os
import random
import re
import sys

import numpy as np
import pytest
import torch

from conftest import held_elsewhere, lock_held, small_dataset, torchrun, zip_record
from vitdeit import distill, runs, trainer
from vitdeit.classes import load_manifest
from vitdeit.errors import DataError, SettingError
from vitdeit.packing import PackOptions, pack
from vitdeit.config import Config
from vitdeit.data import build_loader, dali_available
from vitdeit.machine import describe
from vitdeit.trainer import ema_warning, evaluate_checkpoint, lr_schedule, train


def autocast_spy(monkeypatch) -> list:
    """The autocast dtype in force inside each of engine.autocast's contexts (None: autocast off), read from torch's
    own state, not from the argument: a context that does nothing reads None."""
    import contextlib

    from vitdeit import engine

    states, real = [], engine.autocast

    @contextlib.contextmanager
    def spy(device, dtype):
        with real(device, dtype):
            on = torch.is_autocast_enabled(device.type)
            states.append(torch.get_autocast_dtype(device.type) if on else None)
            yield

    monkeypatch.setattr(engine, "autocast", spy)
    return states

A_CPU = {"cpu": "Some CPU", "cpu_count": 2, "gpu": None, "processes": 1, "torch": "2.0"}  # (machine.describe's)
FAST = dict(img_size=32, patch_size=8, batch_size=32, workers=1, progress=False, warmup_epochs=0.5,
            crop_scale_min=0.5, drop_path=0.0)


class Stopped(Exception):
    """What a stubbed step of train() raises: the set-up before it ran, nothing after it."""


def stop_before_the_first_epoch(monkeypatch) -> None:
    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(trainer, "train_one_epoch", stop)


def cfg_for(shards, out, **kw) -> Config:
    return Config(data_path=str(shards), output_dir=str(out), **{**FAST, **kw})


def test_the_lr_warms_up_to_its_peak_then_follows_a_cosine_to_min_lr_over_the_steps_left():
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.8)
    cfg = Config(epochs=5, warmup_epochs=1.0, min_lr=1e-3)
    sched = lr_schedule(opt, cfg, steps=10)  # 50 steps: 10 of warm-up, 40 of cosine
    lrs = []
    for t in range(50):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    warm = [0.8e-3 + t * (0.8 - 0.8e-3) / 10 for t in range(10)]  # linear from lr/1000
    cos = [1e-3 + 0.5 * (0.8 - 1e-3) * (1 + math.cos(math.pi * t / 40)) for t in range(40)]
    assert lrs == pytest.approx(warm + cos, rel=1e-12)
    assert lrs[10] == max(lrs) == 0.8  # the peak, reached when the warm-up ends


def test_an_ema_that_would_still_be_mostly_its_starting_weights_is_warned_of_with_a_decay_that_fits():
    assert "leaves 37% of the EMA" in ema_warning(0.9998, 5000)  # 0.9998 ** 5000 = 0.3678
    assert ema_warning(0.99, 1000) is None  # 0.99 ** 1000: 4e-5 left
    assert 0.05 < 0.99 ** 290 < 0.055 and 0.045 < 0.99 ** 300 < 0.05  # the 5 % bar, from either side:
    assert "leaves 5% of the EMA" in ema_warning(0.99, 290) and ema_warning(0.99, 300) is None
    msg = ema_warning(0.9998, 1000)  # 0.9998 ** 1000 = 0.8187
    assert "leaves 82% of the EMA at its starting weights" in msg
    decay = float(msg.rsplit(" ", 1)[1])
    assert decay ** 1000 == pytest.approx(0.01, rel=0.01)  # the decay printed to 5 decimals


@pytest.fixture(scope="module")
def teacher_run(learn_shards, tmp_path_factory):
    """A ResNet-18 teacher trained on the learnable demo set (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = cfg_for(learn_shards, out, model="resnet18", epochs=3, lr=0.005, run_name="teacher")
    return cfg, train(cfg)


def test_teacher_learns_and_writes_its_run_folder(teacher_run, learn_shards):
    cfg, last = teacher_run
    run = os.path.join(cfg.output_dir, "teacher")
    assert sorted(os.listdir(run)) == [".lock", "best.pth", "config.json", "last.pth", "metrics.jsonl"]
    chance = 100 / len(load_manifest(learn_shards)["classes"])
    assert last["val_top1"] > 2 * chance  # 4 classes: well above 25 %
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_samples", "lr",
                "images_per_s", "data_wait_frac"):
        assert key in lines[-1]
    assert all(r["val_samples"] == 120 for r in lines)  # every val image, once
    # --lr per 512 images (0.005 * 32 / 512), warm-up 0.5 epoch (10 of 20 steps), then cosine to min_lr over the
    # 50 steps left; each line logs the rate of its epoch's last step
    peak = 0.005 * 32 / 512
    for r in lines:
        t = 20 * (r["epoch"] + 1) - 1
        assert r["lr"] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (t - 10) / 50)), rel=1e-9)
    assert Config(**json.load(open(os.path.join(run, "config.json")))) == cfg


def test_checkpoints_hold_plain_weights_config_and_training_state(teacher_run, learn_shards):
    cfg, _ = teacher_run
    run = os.path.join(cfg.output_dir, "teacher")
    last = torch.load(os.path.join(run, "last.pth"), weights_only=True)
    best = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    for key in ("model", "best_top1", "epoch", "config", "classes", "optimizer", "scheduler", "scaler", "ema"):
        assert key in last
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    assert last["epoch"] == 2 and last["config"] == cfg.to_dict()
    assert last["classes"] == load_manifest(learn_shards)["classes"]
    metrics = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    top = max(metrics, key=lambda r: r["val_top1"])
    assert best["best_top1"] == last["best_top1"] == top["val_top1"] and best["epoch"] == top["epoch"]


def test_eval_only_reproduces_best_top1(teacher_run, tmp_path):
    import shutil

    cfg, _ = teacher_run
    run = tmp_path / "teacher"
    shutil.copytree(os.path.join(cfg.output_dir, "teacher"), run)
    best = torch.load(run / "best.pth", weights_only=True)
    last = torch.load(run / "last.pth", weights_only=True)  # its best epoch is its last: make last.pth another one
    last["model"]["fc.weight"].zero_(), last["model"]["fc.bias"].zero_()  # every logit 0: it names class 0
    torch.save(last, run / "last.pth")
    out = evaluate_checkpoint(cfg_for(cfg.data_path, tmp_path, run_name="teacher", eval_only=True))
    assert out["val_top1"] == pytest.approx(best["best_top1"], abs=1e-9) and out["val_samples"] == 120
    zeroed = evaluate_checkpoint(cfg_for(cfg.data_path, tmp_path, eval_only=True, resume=str(run / "last.pth")))
    assert zeroed["val_top1"] == 25.0 != best["best_top1"]  # 4 balanced classes: class 0's share


def test_eval_only_of_a_run_by_its_name_reads_the_shards_it_was_trained_on(teacher_run, tmp_path, monkeypatch, capsys):
    """`--run-name NAME --eval-only` takes RUN_DIR/best.pth's settings as `--resume PATH --eval-only` does: its
    --data-path, not the default demo_shards (here none), nor another run's; a flag still overrides them."""
    import shutil

    from vitdeit.config import parse_args

    cfg, _ = teacher_run
    best = torch.load(os.path.join(cfg.output_dir, "teacher", "best.pth"), weights_only=True)
    monkeypatch.chdir(tmp_path)  # no demo_shards here
    flags = ["--output-dir", cfg.output_dir, "--run-name", "teacher", "--eval-only", "--workers", "0"]
    assert parse_args(flags).data_path == cfg.data_path
    assert parse_args(flags + ["--model", "vit_tiny"]).data_path == cfg.data_path  # the run named, not runs/vit_tiny
    capsys.readouterr()
    out = evaluate_checkpoint(parse_args(flags))
    assert out["val_top1"] == pytest.approx(best["best_top1"], abs=1e-9) and out["val_samples"] == 120
    assert f"images of {cfg.data_path} resized" in capsys.readouterr().out
    with pytest.raises(DataError, match="elsewhere/manifest.json not found"):
        evaluate_checkpoint(parse_args(flags + ["--data-path", "elsewhere"]))
    saved = dict(best["config"], data_path="moved_shards")  # shards since moved: the message names whose path it is
    torch.save({**best, "config": saved, "data_dir": str(tmp_path / "moved_shards")}, tmp_path / "best.pth")
    os.mkdir("r"), os.replace(tmp_path / "best.pth", "r/best.pth")
    with pytest.raises(SettingError, match=r"^--data-path not given, and the one r/best.pth was trained on, "
                                           r"moved_shards, holds no manifest.json"):
        evaluate_checkpoint(parse_args(["--output-dir", ".", "--run-name", "r", "--eval-only"]))
    with pytest.raises(SettingError, match=r"^--data-path not given, and the one --resume r/best.pth was trained on"):
        evaluate_checkpoint(parse_args(["--resume", "r/best.pth", "--eval-only"]))
    os.mkdir("t")  # a saved setting no longer valid: the error says whose value it is, by the file evaluated
    torch.save({**best, "config": {**best["config"], "distillation_tau": 0}}, "t/best.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", ".", "--run-name", "t", "--eval-only"])
    assert "(the value is the one t/best.pth was saved with: give the flag to override it)" in capsys.readouterr().err
    # a copy, its config still naming the teacher's folder: the copy is the one evaluated (a zeroed head: class 0)
    zeroed = {**best, "model": {k: v.zero_() if k.startswith("fc.") else v for k, v in best["model"].items()}}
    torch.save(zeroed, "r/best.pth")
    os.makedirs("runs/vit_tiny"), shutil.copyfile("r/best.pth", "runs/vit_tiny/best.pth")  # (the default run)
    for folder, flags in (("r", ["--output-dir", ".", "--run-name", "r"]), ("runs/vit_tiny", [])):
        assert evaluate_checkpoint(parse_args(flags + ["--eval-only", "--workers", "0"]))["val_top1"] == 25.0
        assert f"{folder}/best.pth: val top-1 25.00%" in capsys.readouterr().out


def test_eval_only_says_which_asked_for_settings_it_replaces_with_the_checkpoints(teacher_run, capsys, monkeypatch):
    cfg, _ = teacher_run
    best = torch.load(os.path.join(cfg.output_dir, "teacher", "best.pth"), weights_only=True)
    checked = []  # the geometry the shards' --resize-short is checked against: the one evaluated, the trained one
    monkeypatch.setattr(trainer, "upscale_warning", lambda path, m, size, crop: checked.append((size, crop)))
    capsys.readouterr()
    out = evaluate_checkpoint(cfg_for(cfg.data_path, cfg.output_dir, run_name="teacher", eval_only=True, img_size=64,
                                      crop_pct=0.5, interpolation="bicubic"))
    assert out["val_top1"] == pytest.approx(best["best_top1"], abs=1e-9)  # the trained geometry all the same
    assert ("with the settings " + os.path.join(cfg.output_dir, "teacher", "best.pth") + " was trained with (--model "
            "resnet18, --img-size 32, --patch-size 8, --crop-pct 0.875, --interpolation bilinear), not --img-size 64, "
            "--crop-pct 0.5, --interpolation bicubic\n") in capsys.readouterr().out
    assert checked == [(32, 0.875)]


def test_eval_only_names_a_flag_it_replaces_even_at_its_default(teacher_run, capsys):
    from vitdeit.config import parse_args

    cfg, _ = teacher_run  # trained at 32 px; 224 is the default
    capsys.readouterr()
    evaluate_checkpoint(parse_args(["--data-path", cfg.data_path, "--output-dir", cfg.output_dir, "--run-name",
                                    "teacher", "--eval-only", "--img-size", "224", "--workers", "0"]))
    assert "was trained with (--model resnet18, --img-size 32, --patch-size 8, --crop-pct 0.875, --interpolation " \
           "bilinear), not --img-size 224\n" in capsys.readouterr().out
    capsys.readouterr()
    evaluate_checkpoint(parse_args(["--config", os.path.join(cfg.output_dir, "teacher", "config.json"),
                                    "--eval-only", "--workers", "0"]))
    assert "note:" not in capsys.readouterr().out  # its own recipe: nothing replaced
    evaluate_checkpoint(parse_args(["--config", os.path.join(cfg.output_dir, "teacher", "config.json"),
                                    "--eval-only", "--workers", "0", "--lr", "0.1", "--epochs", "7", "--batch-size",
                                    "8", "--compile", "on", "--overwrite"]))  # (--batch-size: evaluation's too)
    assert [n for n in capsys.readouterr().out.splitlines() if n.startswith("note:")] == [
        "note: --eval-only: --compile on, --epochs 7, --lr 0.1, --overwrite True set training, not evaluation: not "
        "used here"]


def test_eval_only_warns_of_more_workers_than_cores_once(teacher_run, capsys, monkeypatch):
    import warnings

    cfg, _ = teacher_run
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # PyTorch's count too
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_checkpoint(cfg_for(cfg.data_path, cfg.output_dir, run_name="teacher", eval_only=True, workers=3))
    said = capsys.readouterr().out.splitlines()
    assert [line for line in said if "worker" in line] == [
        "warning: --workers 3: 3 decode processes on this node, more than its 1 usable core: they take turns and slow "
        "each other; --workers -1 takes this node's share (1 here)"]
    assert not [w for w in caught if "worker" in str(w.message)]


def test_eval_only_says_the_checkpoints_own_score_and_the_runs_best_apart(teacher_run, tmp_path, capsys):
    cfg, _ = teacher_run
    last = torch.load(os.path.join(cfg.output_dir, "teacher", "last.pth"), weights_only=True)
    last["metrics"]["val_top1"] = last["best_top1"] - 5  # as when the run's best epoch was an earlier one
    torch.save(last, tmp_path / "last.pth")
    capsys.readouterr()
    evaluate_checkpoint(cfg_for(cfg.data_path, cfg.output_dir, run_name="teacher", eval_only=True,
                                resume=str(tmp_path / "last.pth")))
    said = capsys.readouterr().out
    assert (f"(its epoch 2 scored {last['best_top1'] - 5:.2f}% when saved; the run's best.pth "
            f"{last['best_top1']:.2f}%)") in said


def test_eval_only_and_a_teacher_use_the_filter_their_run_trained_with_and_bilinear_for_runs_saved_before_it(
        tiny_shards, tmp_path, monkeypatch, capsys):
    import vitdeit.trainer as trainer
    from vitdeit.classes import manifest_class_map
    from vitdeit.models import load_teacher

    train(cfg_for(tiny_shards, tmp_path, model="resnet18", epochs=1, interpolation="bicubic", run_name="cubic"))
    assert json.loads((tmp_path / "cubic" / "config.json").read_text())["interpolation"] == "bicubic"
    used, build = [], trainer.build_loader  # the filter of the transform each built loader really resizes with
    monkeypatch.setattr(trainer, "build_loader", lambda *a, **k: (used.append(build(*a, **k)), used[-1])[1])
    best = torch.load(tmp_path / "cubic" / "best.pth", weights_only=True)
    out = evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, run_name="cubic", eval_only=True))  # flags: bilinear
    assert [u.dataset.transform.mode for u in used] == ["bicubic"]
    assert out["val_top1"] == pytest.approx(best["best_top1"], abs=1e-9)
    assert "resized with its bicubic filter" in capsys.readouterr().out
    del best["config"]["interpolation"]  # as checkpoints written before --interpolation existed
    torch.save(best, tmp_path / "old.pth")
    evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, resume=str(tmp_path / "old.pth"), eval_only=True,
                                interpolation="bicubic"))
    assert [u.dataset.transform.mode for u in used] == ["bicubic", "bilinear"]
    class_map = manifest_class_map(load_manifest(tiny_shards))
    for ckpt, filt in ((tmp_path / "cubic" / "best.pth", "bicubic"), (tmp_path / "old.pth", "bilinear")):
        t = load_teacher(str(ckpt), "", class_map)
        assert (t.interpolation, t.img_size) == (filt, 32)  # FAST's --img-size
    # a student resized otherwise than its teacher's images, and at another size: each said once, training goes on
    train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", epochs=1, run_name="deit", allow_weak_teacher=True,
                  teacher_ckpt=str(tmp_path / "cubic" / "best.pth"), distillation_type="hard", img_size=48))
    out = capsys.readouterr().out
    assert out.count("trained on images resized with --interpolation bicubic; this run resizes with bilinear") == 1
    assert out.count("the teacher was trained on 32 px crops; this run feeds it 48 px ones (--img-size)") == 1
    # a teacher trained larger than the student's crops is said too; one of the student's own size is not
    for size, said in ((48, 1), (32, 0)):
        state = torch.load(tmp_path / "cubic" / "best.pth", weights_only=True)
        state["config"].update(img_size=size, interpolation="bilinear")  # (a CNN's weights fit any size)
        torch.save(state, tmp_path / f"t{size}.pth")
        stop_before_the_first_epoch(monkeypatch)  # the teacher is checked before the first epoch
        with pytest.raises(Stopped):
            train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", run_name=f"d{size}",
                          allow_weak_teacher=True, teacher_ckpt=str(tmp_path / f"t{size}.pth")))
        out = capsys.readouterr().out
        assert out.count("the teacher was trained on 48 px crops; this run feeds it 32 px ones") == said
        assert out.count("the teacher was trained on") == said  # (its filter is the run's: no other warning)


def test_vit_learns(learn_shards, tmp_path):
    last = train(cfg_for(learn_shards, tmp_path, model="vit_tiny", epochs=2, lr=0.003))
    assert last["val_top1"] > 40  # chance is 25 %


def test_deit_distils_from_the_frozen_teacher_and_reports_each_head(teacher_run, learn_shards, tmp_path, monkeypatch):
    from vitdeit import distill, trainer

    tcfg, tlast = teacher_run
    ckpt = os.path.join(tcfg.output_dir, "teacher", "best.pth")
    calls, hard = [], distill.hard_distillation

    def spy(student_logits, teacher_logits):
        calls.append(teacher_logits.requires_grad)
        return hard(student_logits, teacher_logits)

    monkeypatch.setattr(distill, "hard_distillation", spy)
    held, real = [], trainer.load_teacher
    monkeypatch.setattr(trainer, "load_teacher", lambda *a: held.append(real(*a)) or held[0])
    last = train(cfg_for(learn_shards, tmp_path, model="deit_tiny_distill", teacher_ckpt=ckpt, epochs=2,
                         lr=0.003, distillation_type="hard"))
    assert calls == [False] * (2 * 640 // 32)  # every step of both epochs, the teacher without gradients
    assert last["val_top1"] > 40
    assert last["teacher_val_top1"] == pytest.approx(torch.load(ckpt, weights_only=True)["best_top1"])
    assert {"val_top1_cls_head", "val_top1_dist_head"} <= set(last)
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert not held[0].training  # the teacher stayed frozen, BatchNorm statistics included: nothing of it moved
    assert all(torch.equal(v, saved[k]) for k, v in held[0].state_dict().items())


def test_chance_is_the_most_common_val_class_share():
    from vitdeit.distributed import Dist
    from vitdeit.trainer import check_teacher

    counts = {"n1": 10, "n2": 10, "n3": 10, "n4": 0}  # a Labels.json class without val images: chance 1/3, not 1/4
    check_teacher({"val_top1": 67.0, "val_samples": 30}, counts, Config(), Dist())
    with pytest.raises(SettingError, match=r"under twice chance \(66\.67%\)"):
        check_teacher({"val_top1": 60.0, "val_samples": 30}, counts, Config(), Dist())
    check_teacher({"val_top1": 60.0, "val_samples": 30}, counts, Config(allow_weak_teacher=True), Dist())
    skewed = {"n1": 80, "n2": 10, "n3": 10}  # chance 80 %: the bar is halfway to 100 %, not an unreachable 160 %
    check_teacher({"val_top1": 91.0, "val_samples": 100}, skewed, Config(), Dist())
    with pytest.raises(SettingError, match=r"under halfway from chance to 100% \(90\.00%\)"):
        check_teacher({"val_top1": 85.0, "val_samples": 100}, skewed, Config(), Dist())
    five = {f"n{i}": 10 for i in range(5)}  # chance 20 %: the bar is 40 %, which itself passes (only under it fails)
    check_teacher({"val_top1": 40.0, "val_samples": 50}, five, Config(), Dist())
    with pytest.raises(SettingError, match=r"under twice chance \(40\.00%\)"):
        check_teacher({"val_top1": 38.0, "val_samples": 50}, five, Config(), Dist())


def test_a_chance_level_teacher_is_refused(teacher_run, tiny_shards, tmp_path):
    cfg, _ = teacher_run  # (trained on learn_shards: the same 4 classes as tiny_shards)
    weak = torch.load(os.path.join(cfg.output_dir, "teacher", "best.pth"), weights_only=True)
    weak["model"]["fc.weight"].zero_(), weak["model"]["fc.bias"].zero_()  # every logit 0: it names class 0
    torch.save(weak, tmp_path / "weak.pth")
    with pytest.raises(SettingError, match=re.escape("the teacher's val top-1 is 25.00%, under twice chance (50.00%): "
                                                     "it has learnt too little of these classes to teach them.")):
        train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", epochs=1,
                      teacher_ckpt=str(tmp_path / "weak.pth")))
    assert not (tmp_path / "deit_tiny_distill").exists()  # refused in the set-up


@pytest.mark.parametrize("loader, amp", [("torch", "bf16"), ("dali", "off")])  # fp16's GradScaler: the next test
def test_resume_after_an_interruption_reaches_the_same_weights(tiny_shards, tmp_path, loader, amp, capsys):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    # drop-path on: its masks come from the global CPU generator, which nothing else may draw from differently in a
    # resumed process (a DataLoader's first iterator did, with persistent workers)
    kw = dict(model="vit_tiny", epochs=2, lr=0.003, model_ema=True, batch_size=16, workers=2, loader=loader, amp=amp,
              drop_path=0.1, random_erasing=0.5,  # erasing too: its draws come from the global generators
              rand_augment="rand-m9-mstd0.5-inc1",  # each loader's own: timm's in workers, DALI's in its pipeline
              repeated_aug=3)  # DALI: an epoch reads a third of a pass, so the run is saved in mid-pass
    train(cfg_for(tiny_shards, tmp_path / "a", **kw))
    assert ("note: --rand-augment rand-m9-mstd0.5-inc1: timm's policy run with DALI's ops" in capsys.readouterr().out
            ) == (loader == "dali")

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch, record):
        raise Killed

    with pytest.raises(Killed):
        train(cfg_for(tiny_shards, tmp_path / "b", **kw), on_epoch_end=kill_after_first_epoch)
    epoch0 = (tmp_path / "b" / "vit_tiny" / "metrics.jsonl").read_text()  # with its own measured images/s
    trained = []  # a resume that started over would reach the same weights: these runs are seeded
    train(cfg_for(tiny_shards, tmp_path / "b", resume=str(tmp_path / "b" / "vit_tiny" / "last.pth"), **kw),
          on_epoch_end=lambda epoch, record: trained.append(epoch))
    assert trained == [1]
    assert (tmp_path / "b" / "vit_tiny" / "metrics.jsonl").read_text().startswith(epoch0)
    a = torch.load(tmp_path / "a" / "vit_tiny" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "vit_tiny" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["scaler"] == b["scaler"] == {}  # (no GradScaler without fp16)
    metrics_b = [json.loads(x) for x in open(tmp_path / "b" / "vit_tiny" / "metrics.jsonl")]
    assert [r["epoch"] for r in metrics_b] == [0, 1]
    assert all(r["machine"]["processes"] == 1 for r in metrics_b)  # each start's, a resume that changed nothing too


def test_a_resumed_fp16_run_goes_on_from_the_saved_loss_scale(tiny_shards, tmp_path):
    """fp16's GradScaler state is saved and restored: a scale of 1024 (no overflow) 5 steps after its last growth
    goes on to 5 + an epoch's steps. At 16 px (4 patches): PyTorch's float16 CPU kernels are ~10x slower than fp32's."""
    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0, amp="fp16")
    train(cfg_for(tiny_shards, tmp_path, epochs=1, **kw))
    last = tmp_path / "vit_tiny" / "last.pth"
    saved = torch.load(last, weights_only=True)
    steps = load_manifest(tiny_shards)["splits"]["train"]["num_samples"] // 16
    assert (saved["scaler"]["scale"], saved["scaler"]["_growth_tracker"]) == (65536.0, steps)  # GradScaler's start
    saved["scaler"].update(scale=1024.0, _growth_tracker=5)
    torch.save(saved, last)
    train(cfg_for(tiny_shards, tmp_path, epochs=2, resume=str(last), **kw))
    scaler = torch.load(last, weights_only=True)["scaler"]
    assert (scaler["scale"], scaler["_growth_tracker"]) == (1024.0, 5 + steps)  # an epoch more, no step skipped


@pytest.mark.parametrize("change, named", [(dict(model="vit_tiny"), "--model resnet18 (this run: vit_tiny)"),
                                           (dict(model="vit_tiny", patch_size=4),  # no patches in a ResNet: not named
                                            "saved with --model resnet18 (this run: vit_tiny); resume with"),
                                           (dict(img_size=48), "--img-size 32 (this run: 48)"),
                                           # (a batch larger than the set: the image size is named first)
                                           (dict(img_size=48, batch_size=1024), "--img-size 32 (this run: 48)"),
                                           (dict(weight_decay=0.0), "was trained with --weight-decay 0.05, this run "
                                                                    "has 0.0: a weight decay of 0 keeps")])
def test_resuming_with_another_recipe_is_a_setting_error_naming_it(teacher_run, tmp_path, change, named):
    from vitdeit.errors import SettingError

    cfg, _ = teacher_run
    last = os.path.join(cfg.output_dir, "teacher", "last.pth")
    with pytest.raises(SettingError, match=re.escape(named)):
        train(cfg_for(cfg.data_path, tmp_path, **{"model": "resnet18", "lr": 0.005, **change}, resume=last))


@pytest.mark.parametrize("saved, now, advice", [(0.0, 0.05, "Resume with --weight-decay 0.0, or drop --resume"),
                                                 (0.1, 0.0, "Resume with a non-zero --weight-decay (the run's: 0.1)")])
def test_a_resume_to_or_from_no_weight_decay_is_refused_with_the_way_back(saved, now, advice):
    from vitdeit.errors import SettingError
    from vitdeit.trainer import check_resumable

    cfg = Config(model="vit_tiny", weight_decay=now, resume="runs/x/last.pth")
    expected = f"runs/x/last.pth was trained with --weight-decay {saved}, this run has {now}: a weight decay of 0 keeps"
    with pytest.raises(SettingError, match=re.escape(expected) + ".*" + re.escape(advice)):
        check_resumable({**cfg.to_dict(), "weight_decay": saved}, cfg)
    check_resumable({**cfg.to_dict(), "weight_decay": 0.3 if now else 0.0}, cfg)  # either side of 0: fine


def test_a_resume_with_another_patch_size_is_refused_for_a_transformer():
    from vitdeit.errors import SettingError
    from vitdeit.trainer import check_resumable

    cfg = Config(model="vit_tiny", img_size=32, patch_size=4, resume="runs/x/last.pth")
    with pytest.raises(SettingError, match=re.escape("runs/x/last.pth was saved with --patch-size 8 (this run: 4)")):
        check_resumable({**cfg.to_dict(), "patch_size": 8}, cfg)  # (its weights: another patch embedding)
    check_resumable(cfg.to_dict(), cfg)


def test_a_resume_whose_batch_no_longer_fits_the_data_names_the_saved_batch(teacher_run, tmp_path):
    cfg, _ = teacher_run
    last = os.path.join(cfg.output_dir, "teacher", "last.pth")
    with pytest.raises(DataError, match=re.escape("train: 640 samples per rank < --batch-size 1024; lower --batch-size"
                                                  f" (or use fewer processes); --resume {last} was trained with "
                                                  "--batch-size 32 (drop --batch-size, from --config too: train.py "
                                                  "--resume goes on")):
        train(cfg_for(cfg.data_path, tmp_path, model="resnet18", lr=0.005, batch_size=1024, resume=last))


def test_resuming_with_other_settings_names_each_one_that_changed(teacher_run, tmp_path, capsys, monkeypatch):
    cfg, _ = teacher_run
    last = os.path.join(cfg.output_dir, "teacher", "last.pth")
    same = dict(model="resnet18", epochs=4, lr=0.005, resume=last)  # the teacher's recipe, one epoch more

    stop_before_the_first_epoch(monkeypatch)  # the notes come before it
    with pytest.raises(Stopped):
        train(cfg_for(cfg.data_path, tmp_path / "a", **same, workers=0))  # where and how fast: not the recipe
    assert (f"note: --resume: settings differ from {last}'s: --epochs 3 -> 4; the run goes on with this "
            f"invocation's (without those flags and --config values, train.py --resume goes on with the saved ones)"
            ) in capsys.readouterr().out
    with pytest.raises(Stopped):
        train(cfg_for(cfg.data_path, tmp_path / "b", **same, interpolation="bicubic", random_erasing=0.25))
    out = capsys.readouterr().out
    assert (f"note: --resume: settings differ from {last}'s: --interpolation 'bilinear' -> 'bicubic', --epochs 3 "
            f"-> 4, --random-erasing 0.0 -> 0.25; the run goes on with this invocation's") in out
    assert "was trained with the" not in out
    pytest.importorskip("nvidia.dali")  # the same recipe on the other loader (auto picks DALI on a GPU)
    with pytest.raises(Stopped):
        train(cfg_for(cfg.data_path, tmp_path / "c", **same, loader="dali"))
    assert (f"note: --resume: {last} was trained with the torch loader, this run reads with dali (--loader dali): "
            f"crops and augmentations are drawn the new loader's way from here on (--loader torch keeps the old)"
            ) in capsys.readouterr().out


def test_a_resume_keeps_the_saved_moments_under_this_invocations_weight_decay(teacher_run, tmp_path):
    cfg, _ = teacher_run
    last = os.path.join(cfg.output_dir, "teacher", "last.pth")
    saved = torch.load(last, weights_only=True)["optimizer"]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.0, cfg.weight_decay]
    train(cfg_for(cfg.data_path, tmp_path, model="resnet18", epochs=4, lr=0.005, resume=last, weight_decay=0.2))
    now = torch.load(tmp_path / "resnet18" / "last.pth", weights_only=True)["optimizer"]
    assert [g["weight_decay"] for g in now["param_groups"]] == [0.0, 0.2]  # the note says this run's settings apply
    per_epoch = {float(s["step"]) for s in saved["state"].values()}.pop() / 3  # the teacher ran 3 epochs
    assert {float(s["step"]) for s in now["state"].values()} == {per_epoch * 4}  # the moments went on counting


def test_a_run_killed_while_writing_an_epochs_outputs_resumes_with_every_epoch_logged_once(tiny_shards, tmp_path,
                                                                                        monkeypatch):
    from vitdeit.metrics import MetricsLog

    kw = dict(model="vit_tiny", img_size=16, epochs=3, lr=0.005, batch_size=16, workers=0)
    write = MetricsLog.write

    def killed_at_epoch_1(self, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # after that epoch's checkpoints were (or were not yet) written
        write(self, record)

    monkeypatch.setattr(MetricsLog, "write", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_shards, tmp_path, **kw))
    monkeypatch.undo()
    run = tmp_path / "vit_tiny"
    trained = []
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "last.pth"), **kw),
          on_epoch_end=lambda epoch, record: trained.append(epoch))
    assert trained == [1, 2]  # epoch 1 again (its outputs were cut short), not epoch 0
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["epoch"] for r in metrics] == [0, 1, 2]
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["best_top1"] == max(r["val_top1"] for r in metrics)


@pytest.mark.parametrize("killed_at", ["last.pth", "best.pth"])
def test_a_run_killed_between_an_epochs_checkpoints_resumes_with_its_best_weights_kept(tiny_shards, tmp_path,
                                                                                     monkeypatch, killed_at):

    kw = dict(model="resnet18", epochs=3, lr=0.005, batch_size=16, workers=0)
    save = trainer.save_checkpoint
    saved = {}  # epoch -> the state each checkpoint got

    def killed(path, state):  # SIGKILL, or the power gone, as epoch 1 (a best) writes `killed_at`
        if state["epoch"] == 1 and path.name == killed_at:
            raise SystemExit("killed")
        saved.setdefault(path.name, {})[state["epoch"]] = state["model"]
        save(path, state)

    fake_val(monkeypatch, [20.0, 30.0])  # epochs 0 and 1 are each the best so far
    monkeypatch.setattr(trainer, "save_checkpoint", killed)
    with pytest.raises(SystemExit):
        train(cfg_for(tiny_shards, tmp_path, **kw))
    run = tmp_path / "resnet18"
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["epoch"] == 0 and best["best_top1"] == 20.0  # the last best, whole, whichever write was cut
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pth", "config.json", "last.pth", "metrics.jsonl"]
    monkeypatch.undo()
    fake_val(monkeypatch, [25.0] if killed_at == "best.pth" else [30.0, 25.0])  # the epochs the resume trains
    trained = []
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "last.pth"), **kw),
          on_epoch_end=lambda epoch, record: trained.append(epoch))
    assert trained == ([2] if killed_at == "best.pth" else [1, 2])  # killed after last.pth: epoch 1 is done
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["best_top1"] == 30.0
    if killed_at == "best.pth":  # made from last.pth at the resume: epoch 1's own weights
        assert all(torch.equal(best["model"][k], v) for k, v in saved["last.pth"][1].items())


def test_ctrl_c_while_an_epochs_checkpoints_are_written_stops_once_they_are(tiny_shards, tmp_path, monkeypatch,
                                                                            capsys):
    import signal


    kw = dict(model="vit_tiny", img_size=16, epochs=3, lr=0.005, batch_size=16, workers=0)
    save = trainer.save_checkpoint

    def interrupted(path, state):  # Ctrl-C as epoch 1's last.pth starts
        if state["epoch"] == 1 and path.name == "last.pth":
            signal.raise_signal(signal.SIGINT)
        save(path, state)

    fake_val(monkeypatch, [20.0, 30.0])
    monkeypatch.setattr(trainer, "save_checkpoint", interrupted)
    trained = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tiny_shards, tmp_path, **kw), on_epoch_end=lambda epoch, record: trained.append(epoch))
    run = tmp_path / "vit_tiny"
    assert trained == [0, 1]  # stopped once epoch 1's files were written and its line said, not before
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    assert torch.load(run / "best.pth", weights_only=True)["epoch"] == 1  # (30 %: a best)
    assert not list(run.glob("*.tmp"))
    assert "SIGINT: stopping once this epoch's checkpoint is written (Ctrl-C again stops now" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are as they were


def test_signals_held_defer_ctrl_c_and_sigterm_to_the_blocks_end_and_a_second_ctrl_c_acts_at_once():
    import signal

    from vitdeit.checkpoint import signals_held

    got, term = [], signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append("SIGTERM handled"))
    try:
        with signals_held(say=False):
            signal.raise_signal(signal.SIGTERM)
            got.append("block ended")
        assert got == ["block ended", "SIGTERM handled"]
        with pytest.raises(KeyboardInterrupt), signals_held(say=False):
            signal.raise_signal(signal.SIGINT)
            got.append("block ended again")
        assert got[-1] == "block ended again"
        with pytest.raises(KeyboardInterrupt), signals_held(say=False):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            got.append("not reached")
        assert got[-1] == "block ended again" and signal.getsignal(signal.SIGTERM) is not None
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"  # the SIGTERM handler as it was, too
        with pytest.raises(ValueError, match="the block's own"), signals_held(say=False):
            signal.raise_signal(signal.SIGTERM)  # held, then dropped: the block's error is what stops it
            raise ValueError("the block's own")
        assert got[-1] == "block ended again"
        with signals_held(say=False):  # nothing caught: nothing raised after
            got.append("quiet")
        assert got[-1] == "quiet" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process started in the background: Ctrl-C stays ignored
        with signals_held(say=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            got.append("ignored")
        assert got[-1] == "ignored" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_ctrl_c_while_signals_held_changes_the_handlers_waits_for_the_block(monkeypatch):
    import signal

    from vitdeit.checkpoint import signals_held

    term, real, got = signal.getsignal(signal.SIGTERM), signal.signal, []

    def racing(signum, handler):  # a Ctrl-C just after the first handler is changed (SIGTERM's), before SIGINT's
        before = real(signum, handler)
        if not got:
            got.append("first change")
            signal.raise_signal(signal.SIGINT)
        return before

    monkeypatch.setattr(signal, "signal", racing)
    with pytest.raises(KeyboardInterrupt), signals_held(say=False):
        got.append("block ran")
    monkeypatch.undo()
    assert got == ["first change", "block ran"]  # held, then raised as the block ended
    assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signals_held_says_it_waits_once_and_offers_a_second_ctrl_c_only_for_ctrl_c(capsys):
    import signal

    from vitdeit.checkpoint import signals_held

    term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with signals_held(say=True):
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # (Slurm, then torchrun: held too, and said once)
    finally:
        signal.signal(signal.SIGTERM, term)
    assert capsys.readouterr().err == "\nSIGTERM: stopping once this epoch's checkpoint is written\n"
    with pytest.raises(KeyboardInterrupt), signals_held(say=True):
        signal.raise_signal(signal.SIGINT)
    assert capsys.readouterr().err == ("\nSIGINT: stopping once this epoch's checkpoint is written (Ctrl-C again "
                                       "stops now, without it)\n")


def test_signals_held_outside_the_main_thread_runs_the_block_and_leaves_the_handlers_alone():
    import signal
    import threading

    from vitdeit.checkpoint import signals_held

    before, got = signal.getsignal(signal.SIGINT), []

    def in_thread():
        try:
            with signals_held(say=False):  # (signal.signal raises ValueError outside the main thread)
                got.append(signal.getsignal(signal.SIGINT))
        except Exception as e:  # noqa: BLE001 (said in the assertion below)
            got.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert got == [before] and signal.getsignal(signal.SIGINT) is before


def test_a_checkpoint_write_cut_by_ctrl_c_leaves_no_tmp_and_the_last_one_whole(tmp_path, monkeypatch):
    from vitdeit import checkpoint

    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint(path, {"epoch": 0})
    before = path.read_bytes()
    save = torch.save

    def cut(state, f):  # a second Ctrl-C halfway through the write
        save(state, f)
        with open(f, "r+b") as part:
            part.truncate(len(before) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"epoch": 1})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_a_second_train_py_into_a_folder_being_trained_in_is_refused_before_it_writes(tiny_shards, tmp_path,
                                                                                       monkeypatch):
    run = tmp_path / "vit_tiny"
    run.mkdir()
    build_loaders = trainer.build_loaders

    def set_up(*args):
        raise AssertionError("the set-up began")

    monkeypatch.setattr(trainer, "build_loaders", set_up)  # refused before the set-up's minutes, not after them
    with held_elsewhere(run / ".lock"):  # as another train.py holds it (srun starting one per GPU)
        with pytest.raises(SettingError, match=re.escape(
                f"{run}: another train.py is training in this folder now; wait for it to end, or choose another "
                f"--run-name. (srun or mpirun starting train.py once per GPU, without torchrun, starts that many "
                f"separate one-process runs: start torchrun once per node instead, as the README shows)")):
            train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", img_size=16, epochs=1, batch_size=16, workers=0))
        assert [p.name for p in run.iterdir()] == [".lock"]  # not even config.json
    monkeypatch.setattr(trainer, "build_loaders", build_loaders)
    held_while = []  # the lock as the epoch ends: the run holds it for all of its work, and lets go as it ends
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", img_size=16, epochs=1, batch_size=16, workers=0),
          on_epoch_end=lambda epoch, record: held_while.append(lock_held(run / ".lock")))  # once it has ended
    assert held_while == [True] and not lock_held(run / ".lock")
    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=1,  # (a forked decode worker)
              resume=str(run / "last.pth"))

    def fails(epoch, record):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError) as kept:  # its traceback keeps the run's frame, its loader and worker alive
        train(cfg_for(tiny_shards, tmp_path, epochs=2, **kw), on_epoch_end=fails)
    train(cfg_for(tiny_shards, tmp_path, epochs=3, **kw))  # the worker's copy of the lock went as it forked
    assert kept.value.args == ("a bug",)
    del kept  # the run's loaders go as the test ends, not in a later test's garbage collection (which closes their
    # workers' queues first, then waits 5 s for each worker to see its end)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite_and_a_failed_start_leaves_it_as_it_was(
        teacher_run, tmp_path, monkeypatch, capsys):
    import shutil

    from vitdeit.errors import MissingFile, SettingError

    cfg, _ = teacher_run
    run = tmp_path / "teacher"
    shutil.copytree(os.path.join(cfg.output_dir, "teacher"), run)
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir()}  # noqa: E731
    before = files()
    with pytest.raises(SettingError, match=re.escape(f"{run} already holds a run (last.pth): continue it with "
                                                     f"--resume {run / 'last.pth'}")) as e:
        train(dataclasses.replace(cfg, epochs=9))  # a rerun that forgot --resume
    assert e.value.every_rank_stops  # rank 0's finding, gathered: every rank raises it and they leave together
    elsewhere = os.path.join(teacher_run[0].output_dir, "teacher", "last.pth")  # another folder's run, resumed here
    with pytest.raises(SettingError, match=re.escape(f"{run} already holds a run (last.pth) (--resume {elsewhere} is "
                                                     f"another folder's checkpoint: a run writes to --output-dir/"
                                                     f"--run-name, here {run}, wherever it resumes from)")):
        train(dataclasses.replace(cfg, epochs=9, resume=elsewhere))
    missing = tmp_path / "nope" / "last.pth"  # a typo: named as missing, not as another folder's checkpoint
    with pytest.raises(MissingFile, match=re.escape(f"--resume {missing}: file not found; pass the right path, or "
                                                    f"leave --resume out to start a new run.")):
        train(dataclasses.replace(cfg, epochs=9, resume=str(missing)))
    with pytest.raises(MissingFile, match="nothere.pth"):  # --overwrite, but a flag fails the set-up
        train(dataclasses.replace(cfg, model="deit_tiny_distill", teacher_ckpt=str(tmp_path / "nothere.pth"),
                                  overwrite=True))
    assert files() == before  # config.json too: it is written once the set-up has passed
    kept = tmp_path / "kept"  # a run whose last.pth is gone (deleted to save space): its best.pth is still a run
    kept.mkdir()
    shutil.copyfile(run / "best.pth", kept / "best.pth")
    with pytest.raises(SettingError, match=re.escape(f"{kept} already holds a run (best.pth, without a last.pth): "
                                                     f"continue it with --resume {kept / 'best.pth'}, choose another "
                                                     f"--run-name, or pass --overwrite to replace it.")):
        train(dataclasses.replace(cfg, epochs=9, run_name="kept"))
    assert [p.name for p in kept.iterdir()] == ["best.pth"]
    for epochs in (3, 2):  # all 3 epochs trained, or more than asked: nothing to do, and config.json stays the run's
        train(dataclasses.replace(cfg, epochs=epochs, lr=0.001, resume=str(run / "last.pth")))
        assert files() == before
    assert f"{run / 'last.pth'} has trained 3 epoch(s), --epochs 2: nothing to do, nothing written" in (
        capsys.readouterr().out)

    stop_before_the_first_epoch(monkeypatch)
    other = tmp_path / "other"  # --overwrite, resuming another folder's run: none of this folder's old run stays
    shutil.copytree(run, other)
    torch.save({"stale": True}, other / "last.pth")
    with pytest.raises(Stopped):  # (stopped in the resumed run's first epoch, once the folder is set up)
        train(dataclasses.replace(cfg, epochs=4, run_name="other", resume=str(run / "last.pth"), overwrite=True))
    assert (other / "best.pth").read_bytes() == before["best.pth"] and not (other / "last.pth").exists()
    for name in ("last.pth.tmp", "best.pth.tmp"):
        (run / name).write_bytes(b"PK\x03\x04 a killed run's part-written checkpoint")
    with pytest.raises(Stopped):  # --overwrite: a replacing run stopped in its first epoch
        train(dataclasses.replace(cfg, epochs=9, overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json", "metrics.jsonl"]  # none of the old run
    assert json.loads((run / "config.json").read_text())["epochs"] == 9 and (run / "metrics.jsonl").read_text() == ""
    assert "overwrite" not in json.loads((run / "config.json").read_text())  # an invocation flag, not the recipe


def test_a_run_on_shards_packed_with_classes_missing_names_them_before_training(tmp_path, monkeypatch, capsys):
    import shutil

    data = small_dataset(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=2)
    gone = sorted(p.name for p in (data / "val.X").iterdir())[1]
    for d in data.glob("train.X*"):
        shutil.rmtree(d / gone, ignore_errors=True)
    pack(data, tmp_path / "shards", opts=PackOptions(workers=1, allow_missing_classes=True), progress=False)

    stop_before_the_first_epoch(monkeypatch)  # the warnings come before it
    with pytest.raises(Stopped):
        train(cfg_for(tmp_path / "shards", tmp_path / "runs", batch_size=4))
    out = capsys.readouterr().out
    assert (f"warning: 1 of the 3 classes has no train images in {tmp_path / 'shards'} ({gone}): the model has "
            f"outputs for them that it never learns; 2 of the 6 val images are of those classes, which it gets right "
            f"only by chance: val top-1 tops out near 66.7 %") in out.splitlines()  # (its 2 val images of 3 x 2)
    assert "no val images" not in out


def test_checkpoint_from_another_class_map_is_refused(teacher_run, tmp_path):
    cfg, _ = teacher_run
    other = tmp_path / "shards"
    pack(small_dataset(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=2), other,
         opts=PackOptions(workers=1), progress=False)
    with pytest.raises(DataError, match="another class map"):
        evaluate_checkpoint(cfg_for(other, cfg.output_dir, run_name="teacher", eval_only=True))


def test_torchrun_two_processes_evaluate_each_val_image_once_with_the_saved_weights(tiny_shards, tmp_path):
    r = torchrun("train.py", "--data-path", str(tiny_shards), "--output-dir", str(tmp_path), "--model", "resnet18",
                 "--epochs", "1", "--img-size", "32", "--batch-size", "16", "--workers", "0", "--lr", "0.005",
                 "--progress", "false", "--device", "cpu", timeout=600)  # (cpu: the machine recorded, on any host)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 0:") == 1  # only rank 0 prints
    assert f"global batch 32, lr {0.005 * 32 / 512:.3g}" in r.stdout  # --lr per 512 images of the global batch
    rec = json.loads(open(tmp_path / "resnet18" / "metrics.jsonl").read())
    assert rec["val_samples"] == 24 and rec["train_samples"] == 2 * (48 // 16) * 16  # 96 images / 2 ranks
    assert rec["machine"] == describe("cpu", 2)  # the img/s of 2 processes (rank 0's node)
    saved = torch.load(tmp_path / "resnet18" / "last.pth", weights_only=True)["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in saved)  # DDP's wrapper left out
    # one process evaluating the saved weights (rank 0's, BatchNorm statistics included) gets what both ranks logged
    alone = evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, model="resnet18", img_size=32, workers=0,
                                        resume=str(tmp_path / "resnet18" / "last.pth"), eval_only=True))
    assert alone["val_loss"] == pytest.approx(rec["val_loss"], rel=1e-5) and alone["val_top1"] == rec["val_top1"]


def test_the_same_command_with_resume_auto_starts_the_run_goes_on_and_refuses_another_command(tiny_data, tiny_shards,
                                                                                                tmp_path, monkeypatch,
                                                                                                capsys):
    import train as train_py

    last = tmp_path / "r" / "last.pth"
    cmd = ["--data-path", str(tiny_shards), "--output-dir", str(tmp_path), "--run-name", "r", "--img-size", "32",
           "--patch-size", "8", "--batch-size", "16", "--workers", "0", "--progress", "false", "--device", "cpu",
           "--epochs", "2", "--resume", "auto"]

    def stopped_after_epoch_0(epoch, record):
        raise KeyboardInterrupt  # (a pre-emption: its epoch is written, then it stops)

    with monkeypatch.context() as m:
        m.setattr(train_py, "train", lambda cfg: train(cfg, on_epoch_end=stopped_after_epoch_0))
        assert train_py.main(cmd) == 130
    said = capsys.readouterr()
    assert f"note: --resume auto: no {last} yet: a new run" in said.out and "resumed from" not in said.out
    assert said.err.strip().endswith("go on with the same command (its --resume auto continues from it)")
    assert train_py.main(cmd) == 0  # the requeued job
    out = capsys.readouterr().out
    assert f"resumed from {last} after epoch 0" in out and "--resume auto: no" not in out and "differ" not in out
    assert [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert train_py.main(cmd) == 0  # once more, finished: nothing to do, nothing written
    assert (f"{last} has trained 2 epoch(s), --epochs 2: nothing to do, nothing written (--resume {last} with --epochs "
            f"above 2 goes on)") in capsys.readouterr().out
    import shutil

    copy = shutil.copytree(tiny_shards, tmp_path / "copy")  # a node's own copy of the shards: its path is its own
    assert train_py.main([*cmd, "--data-path", str(copy)]) == 0 and "nothing to do" in capsys.readouterr().out
    before = last.read_bytes()
    # another experiment under the same --run-name: refused, not run on from this one (nor called done)
    for other, named in ((["--lr", "0.001"], "(--lr 0.0005 -> 0.001)"), (["--epochs", "3"], "(--epochs 2 -> 3)")):
        assert train_py.main([*cmd, *other]) == 1
        assert capsys.readouterr().err.strip() == (
            f"error: --resume auto: {last} was saved by another command than this one {named}; --resume auto goes on "
            f"only with the command its run started with. Pass another --run-name for a new run, or --resume {last} "
            f"to continue that run with this command's settings.")
    assert train_py.main([c for c in cmd if c not in ("--patch-size", "8")]) == 1  # left out: the default is not 8
    assert "(--patch-size 8 -> not given (16))" in capsys.readouterr().err
    other = tmp_path / "seed1"  # another pack of the same images: the path is the node's own, the pack is not
    pack(tiny_data, other, opts=PackOptions(shard_size=30, workers=1, seed=1), progress=False)
    assert train_py.main([*cmd, "--data-path", str(other)]) == 1
    assert (f"(other shards: {last} was trained and scored on {tiny_shards.resolve()}, other shards than {other}); "
            f"--resume auto goes on only") in capsys.readouterr().err
    assert last.read_bytes() == before  # (each refused before any write)
    damaged = bytearray(before)  # a byte of a tensor's data changed since: named as the file --resume auto found
    damaged[zip_record(last, "/data/0")[1]] ^= 0xFF
    last.write_bytes(damaged)
    assert train_py.main(cmd) == 1 and capsys.readouterr().err.startswith(f"error: --resume auto: {last}: its record ")
    last.write_bytes(before)
    last.unlink()  # a best.pth alone: --resume auto takes a last.pth only, and says how to go on
    assert train_py.main(cmd) == 1
    assert capsys.readouterr().err.strip().endswith(f"continue it with --resume {tmp_path / 'r' / 'best.pth'}, choose "
                                                    f"another --run-name, or pass --overwrite to replace it (in place "
                                                    f"of --resume auto, which continues a last.pth only).")


def processes_under(pid: int) -> dict[int, str]:
    """The child processes of `pid`, each with its RANK (torchrun's workers)."""
    import pathlib

    out = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # (after the command's name, which may hold spaces)
            if int(fields[1]) == pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                out[int(stat.parent.name)] = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), "")
        except (OSError, IndexError, ValueError):  # (a process that ended meanwhile)
            continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's processes in /proc")
def test_resume_auto_refuses_its_folder_packed_again_and_a_pack_it_cannot_place_not_a_pack_from_before_fingerprints(
        tmp_path):
    from vitdeit.classes import pack_fingerprint
    from vitdeit.trainer import check_same_command

    def manifest(seed: int) -> dict:
        rows = [{"file": "train-000000.tar", "num_samples": 8, "bytes": 1000}]
        return {"options": {"seed": seed, "shard_size": 30}, "source": {"data_path": "/data/imagenet100"},
                "classes": ["n1", "n2"], "splits": {"train": {"shards": rows}, "val": {"shards": rows}}}

    shards = tmp_path / "shards"
    shards.mkdir()
    cfg = dataclasses.replace(Config(data_path=str(shards)), resume=str(tmp_path / "runs" / "vit_tiny" / "last.pth"))
    cfg.auto_resume = True
    now, saved = manifest(seed=1), pack_fingerprint(manifest(seed=0))  # the folder packed again, with another --seed
    assert saved != pack_fingerprint(now)
    base = {"config": cfg.to_dict(), "pack": saved}
    check_same_command({**base, "pack": pack_fingerprint(now), "data_dir": str(shards.resolve())}, cfg, now)  # same
    for resumed, said in (({**base, "data_dir": str(shards.resolve())}, f"{shards} was packed again since"),
                          (base, f"the shards at {shards} are not those"),  # saved before data_dir was kept
                          ({**base, "data_dir": "/elsewhere"}, "other shards than")):
        with pytest.raises(SettingError, match=re.escape("(other shards: ") + ".*" + re.escape(said)):
            check_same_command(resumed, cfg, now)
    check_same_command({"config": cfg.to_dict()}, cfg, now)  # saved before packs had fingerprints: cannot tell


def test_torchrun_restarts_a_run_whose_process_was_killed_and_resume_auto_ends_it_with_the_same_weights(
        tiny_shards, tmp_path):
    import signal
    import subprocess
    import time

    from conftest import ROOT, free_port

    flags = ["--data-path", str(tiny_shards), "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
             "--batch-size", "16", "--workers", "0", "--progress", "false", "--device", "cpu", "--epochs", "3"]
    whole = torchrun("train.py", *flags, "--output-dir", str(tmp_path / "whole"), timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # torchrun as a cluster job restarts it (README): a c10d rendezvous, each try its own store
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "train.py", *flags, "--output-dir",
           str(tmp_path / "killed"), "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    last = tmp_path / "killed" / "vit_tiny" / "last.pth"
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) as proc:
        try:
            deadline = time.monotonic() + 300
            while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            ranks = processes_under(proc.pid)
            assert last.exists() and sorted(ranks.values()) == ["0", "1"], (ranks, proc.poll())
            os.kill(next(pid for pid, rank in ranks.items() if rank == "1"), signal.SIGKILL)  # after epoch 0
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.terminate()  # (torchrun passes it on to its workers, in sessions of their own)
                proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    # (killed during epoch 1, unless that epoch ended first: an epoch of 96 images takes seconds here)
    assert out.count("note: --resume auto: no") == 1 and len(re.findall(f"resumed from {re.escape(str(last))} after "
                                                                      f"epoch [01] ", out)) == 1, out
    epochs = [json.loads(line)["epoch"] for line in (last.parent / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
    weights = [torch.load(folder / "vit_tiny" / "last.pth", weights_only=True)["model"]
               for folder in (tmp_path / "whole", tmp_path / "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, monkeypatch):
    from vitdeit import distill
    from vitdeit.engine import NonFiniteLoss

    kw = dict(model="vit_tiny", img_size=16, epochs=2, lr=0.005, batch_size=16, workers=0)
    cfg = cfg_for(tiny_shards, tmp_path, **kw)

    def poison_after_first_epoch(epoch, record):
        real = distill.DistillationLoss.forward
        monkeypatch.setattr(distill.DistillationLoss, "forward", lambda *a: real(*a) * float("nan"))

    with pytest.raises(NonFiniteLoss, match="last good checkpoint") as e:
        train(cfg, on_epoch_end=poison_after_first_epoch)
    assert e.value.every_rank_stops  # summed over the ranks: every rank stops on it, together
    last = torch.load(tmp_path / "vit_tiny" / "last.pth", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_mixup_cutmix_and_randaugment_train_end_to_end(tiny_shards, tmp_path, monkeypatch):
    import timm.data
    from timm.data import auto_augment, random_erasing

    mixed, augmenters, mix, make_ra = [], [], timm.data.Mixup.__call__, auto_augment.rand_augment_transform
    order, erase = [], random_erasing.RandomErasing.__call__  # order: ("erase", tensor out) and ("mix", tensor in)
    monkeypatch.setattr(timm.data.Mixup, "__call__",
                        lambda self, x, y: (order.append(("mix", x)), mixed.append(len(x)), mix(self, x, y))[-1])
    monkeypatch.setattr(random_erasing.RandomErasing, "__call__",
                        lambda self, x: (order.append(("erase", erase(self, x))), order[-1][1])[-1])
    monkeypatch.setattr(auto_augment, "rand_augment_transform",
                        lambda *a, **k: augmenters.append(a[0]) or make_ra(*a, **k))
    last = train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", distillation_type="none", epochs=1,
                         batch_size=16, workers=0, mixup=0.8, cutmix=1.0, rand_augment="rand-m9-mstd0.5-inc1",
                         random_erasing=0.25, repeated_aug=3))
    assert last["val_samples"] == 24 and last["train_samples"] == 96 and math.isfinite(last["train_loss"])
    # every step mixed; RandAugment built by the loader (and once before, when Config checked the spec)
    assert mixed == [16] * 6 and augmenters == ["rand-m9-mstd0.5-inc1"] * 2
    # DeiT's order: each image erased, then the batch mixed: Mixup gets the very tensor erasing returned
    assert [name for name, _ in order] == ["erase", "mix"] * 6
    assert all(order[k][1] is order[k + 1][1] for k in range(0, 12, 2))


def test_mixup_targets_carry_the_runs_label_smoothing():
    from vitdeit.trainer import batch_augmentation

    torch.manual_seed(0)
    _, targets = batch_augmentation(Config(mixup=0.8, label_smoothing=0.2), 10, torch.device("cpu"))(
        torch.zeros(8, 3, 8, 8), torch.arange(8))
    assert torch.allclose(targets.min(1).values, torch.full((8,), 0.2 / 10))  # off-class share: smoothing / classes


def test_a_setting_missing_from_an_older_saved_config_counts_as_its_default_not_as_a_change():
    from vitdeit.trainer import recipe_changes

    saved = Config().to_dict()
    del saved["interpolation"], saved["random_erasing"]  # a run saved before these existed
    assert recipe_changes(saved, Config()) == []
    assert recipe_changes(saved, Config(interpolation="bicubic")) == ["--interpolation 'bilinear' -> 'bicubic'"]


def test_the_speed_switches_are_no_change_of_recipe_on_resume():
    from vitdeit.trainer import recipe_changes

    saved = Config().to_dict()
    del saved["compile_mode"]  # saved before it existed: compiled in torch.compile's default mode, not "auto"'s
    switched = Config(compile_mode="default", step_stream="high", dali_executor="legacy", dali_prefetch=4, workers=3,
                      compile="off", channels_last=False, dali_hw_decoder_load=0.5, loader="torch", lr=1e-3)
    assert recipe_changes(saved, switched) == ["--lr 0.0005 -> 0.001"]  # what it computes, not how fast it runs


def test_a_path_a_resumes_checkpoint_gave_rebased_to_here_is_no_change_but_one_typed_is():
    from vitdeit.trainer import recipe_changes

    saved = Config(teacher_ckpt="runs/resnet18/best.pth").to_dict()
    cfg = Config(teacher_ckpt="/home/u/proj/runs/resnet18/best.pth")  # the same file, from another working folder
    assert recipe_changes(saved, cfg) == ["--teacher-ckpt 'runs/resnet18/best.pth' -> "
                                          "'/home/u/proj/runs/resnet18/best.pth'"]  # typed: it may be another file
    cfg.inherited = frozenset({"teacher_ckpt"})  # (as parse_args sets it)
    assert recipe_changes(saved, cfg) == []


def test_a_resume_names_a_change_of_every_setting_that_changes_what_the_run_computes_and_of_no_other():
    from vitdeit.config import flag
    from vitdeit.trainer import recipe_changes

    other = dict(data_path="other_shards", img_size=160, crop_pct=0.9, crop_scale_min=0.35, interpolation="bicubic",
                 rand_augment="rand-m9-mstd0.5-inc1", repeated_aug=3, model="deit_tiny_distill", patch_size=8,
                 drop_path=0.0, teacher_ckpt="t.pth", teacher_weights="imagenet1k", allow_weak_teacher=True,
                 distillation_type="soft", distillation_alpha=0.3, distillation_tau=3.0, epochs=10, batch_size=64,
                 lr=1e-3, min_lr=1e-5, warmup_epochs=2.0, weight_decay=0.1, label_smoothing=0.0, mixup=0.8, cutmix=1.0,
                 random_erasing=0.25, clip_grad=0.0, model_ema=True, model_ema_decay=0.9999, amp="off", seed=1)
    # where the run writes, what it shows, where and how fast it runs (the loader's change has a note of its own)
    quiet = dict(workers=3, progress=False, output_dir="elsewhere", run_name="x", device="cpu", compile="off",
                 compile_mode="default", channels_last=False, step_stream="high", dali_executor="legacy",
                 dali_prefetch=4, dali_hw_decoder_load=0.5, loader="torch")
    saved = Config().to_dict()
    assert set(other) | set(quiet) | {"teacher"} == set(saved)  # (--teacher has one choice); a new setting: add it
    for key, value in {**other, **quiet}.items():
        named = [] if key in quiet else [f"{flag(key)} {saved[key]!r} -> {value!r}"]
        assert recipe_changes(saved, Config(**{key: value})) == named, key


def test_random_erasing_replaces_one_rectangle_per_image_with_noise_and_leaves_the_labels():
    from vitdeit.trainer import batch_augmentation

    assert batch_augmentation(Config(), 10, torch.device("cpu")) is None  # nothing on: no pass over the batch
    augment = batch_augmentation(Config(random_erasing=1.0), 10, torch.device("cpu"))
    images = torch.zeros(32, 40, 60, 3).permute(0, 3, 1, 2)  # NCHW in channels-last memory, as both loaders give
    labels = torch.arange(32) % 10
    random.seed(0)  # timm's RandomErasing draws from the global generator
    out, targets = augment(images, labels)
    assert out is images and torch.equal(targets, labels)  # in place: what the model then reads
    for img in out:
        rows, cols = (img != 0).any(0).any(1).nonzero()[:, 0], (img != 0).any(0).any(0).nonzero()[:, 0]
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert (img[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1] != 0).all()  # one solid rectangle
        assert int((img != 0).any(0).sum()) == h * w  # and nothing outside it
        assert 0.02 * 0.8 <= h * w / (40 * 60) <= 1 / 3 * 1.2 and 0.3 * 0.8 <= h / w <= 1 / 0.3 * 1.2  # timm's ranges
        assert 0.5 < img[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1].std() < 1.5  # N(0, 1) per pixel
    random.seed(0)
    half, _ = batch_augmentation(Config(random_erasing=0.5), 10, torch.device("cpu"))(torch.zeros(400, 3, 8, 8),
                                                                                       torch.zeros(400))
    assert 160 <= int((half != 0).flatten(1).any(1).sum()) <= 240  # about half the images (binomial: 200 +- 10)


def test_an_offline_imagenet1k_teacher_names_the_local_file_option(monkeypatch):
    from vitdeit.classes import ClassMap
    from vitdeit.models import load_teacher

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    from vitdeit.errors import MissingFile

    with pytest.raises(MissingFile, match="could not download.*--teacher-weights /path/to/it"):
        load_teacher("", "imagenet1k", ClassMap(("n01440764",), ("tench",)))


def test_the_ema_warning_counts_all_the_runs_updates_for_a_kept_ema_and_those_left_for_a_new_one(capsys):
    from vitdeit.distributed import Dist
    from vitdeit.trainer import make_ema

    net = torch.nn.Linear(2, 2)
    cfg = Config(model_ema=True, model_ema_decay=0.7, epochs=2)  # 0.7 ** 6 = 12 % > 5 %, 0.7 ** 12 = 1.4 % <= 5 %
    kept = {"ema": {k: v.clone() for k, v in net.state_dict().items()}}  # the resumed run kept its EMA
    make_ema(net, cfg, kept, start_epoch=1, steps=6, dist=Dist())
    assert "over this run's" not in capsys.readouterr().out  # its 12 updates in all: 1.4 % left, no warning
    make_ema(net, cfg, {"ema": None}, start_epoch=1, steps=6, dist=Dist())  # an EMA that starts here: 6 updates
    assert "--model-ema-decay 0.7 over this run's 6 steps leaves 12% of the EMA" in capsys.readouterr().out


def test_an_ema_turned_on_at_resume_starts_from_the_resumed_weights(tiny_shards, tmp_path, capsys):
    kw = dict(model="vit_tiny", epochs=2, lr=0.003, batch_size=16, workers=0)

    class Killed(Exception):
        pass

    def kill(epoch, record):
        raise Killed

    with pytest.raises(Killed):
        train(cfg_for(tiny_shards, tmp_path, **kw), on_epoch_end=kill)  # saved without an EMA
    w0 = torch.load(tmp_path / "vit_tiny" / "last.pth", weights_only=True)["model"]
    capsys.readouterr()
    train(cfg_for(tiny_shards, tmp_path, resume=str(tmp_path / "vit_tiny" / "last.pth"), model_ema=True, **kw))
    # its warning counts the updates it will have: the 6 steps of the epoch left, not the run's 12
    assert "--model-ema-decay 0.9998 over this run's 6 steps leaves 100% of the EMA" in capsys.readouterr().out
    last = torch.load(tmp_path / "vit_tiny" / "last.pth", weights_only=True)
    dist = lambda a, b: sum((a[k].float() - b[k].float()).norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
    # decay 0.9998 over the 6 steps of one epoch: the EMA moves ~0.1 % of the way from where it started
    assert dist(last["ema"], w0) < 0.01 * dist(last["model"], w0)


def test_a_checkpoint_keeps_each_precision_amp_auto_resolved_to_across_a_resume(tiny_shards, tmp_path, capsys):
    kw = dict(model="vit_tiny", epochs=2, batch_size=16, workers=0)

    class Killed(Exception):
        pass

    def kill(epoch, record):
        raise Killed

    with pytest.raises(Killed):
        train(cfg_for(tiny_shards, tmp_path, **kw), on_epoch_end=kill)
    last = tmp_path / "vit_tiny" / "last.pth"
    state = torch.load(last, weights_only=True)
    assert state["amp"] == "off"  # --amp auto on this CPU
    torch.save({**state, "amp": "bf16"}, last)  # as if its first epoch had trained on a GPU
    capsys.readouterr()
    train(cfg_for(tiny_shards, tmp_path, resume=str(last), **kw))
    assert (f"note: --resume: {last} trained with --amp bf16, as --amp auto resolved on its device; on cpu here it "
            f"trains with off from here on") in capsys.readouterr().out.splitlines()
    assert torch.load(last, weights_only=True)["amp"] == "bf16, then off"


def test_best_pth_is_written_even_when_val_top1_stays_at_zero(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_loss": 9.0, "val_top1": 0.0, "val_top5": 0.0,
                                                              "val_samples": 24})
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=1, batch_size=16, workers=0))
    best = torch.load(tmp_path / "vit_tiny" / "best.pth", weights_only=True)
    assert best["epoch"] == 0 and best["best_top1"] == 0.0


@pytest.mark.parametrize("saved_best", ["its own", "none", "another run's"])
def test_resuming_into_another_run_folder_brings_its_history_along(tiny_shards, tmp_path, monkeypatch, saved_best):
    top1 = iter([50.0, 10.0])  # epoch 0 stays the best: the resumed run writes no best.pth of its own
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_top1": next(top1),
                                                              "val_top5": 90.0, "val_samples": 24})
    kw = dict(model="vit_tiny", batch_size=16, workers=0)
    train(cfg_for(tiny_shards, tmp_path, epochs=1, **kw))
    saved = tmp_path / "vit_tiny" / "best.pth"
    if saved_best == "none":  # only last.pth was kept: it holds the best epoch, so it becomes best.pth
        saved.unlink()
    elif saved_best == "another run's":  # e.g. a later attempt's, beside a copied last.pth: not this run's best
        other = torch.load(saved, weights_only=True)
        other["best_top1"] = 99.0
        torch.save(other, saved)
    (tmp_path / "longer").mkdir()
    torch.save({"stale": True}, tmp_path / "longer" / "best.pth")  # left by an earlier attempt: replaced or removed
    train(cfg_for(tiny_shards, tmp_path, epochs=2, run_name="longer",
                  resume=str(tmp_path / "vit_tiny" / "last.pth"), **kw))
    best = torch.load(tmp_path / "longer" / "best.pth", weights_only=True)
    assert (best["epoch"], best["best_top1"]) == (0, 50.0)  # its own, or else the resumed epoch 0, the best one
    assert torch.load(tmp_path / "longer" / "last.pth", weights_only=True)["best_top1"] == best["best_top1"]
    rows = [json.loads(x) for x in open(tmp_path / "longer" / "metrics.jsonl")]
    assert [(r["epoch"], r["val_top1"]) for r in rows] == [(0, 50.0), (1, 10.0)]  # the whole run, as report reads it


def test_warnings_follow_the_run_line_small_shards_a_loaders_own_and_an_unused_teacher(tiny_data, tmp_path, capsys,
                                                                                        monkeypatch):
    import warnings


    build = trainer.build_loader
    monkeypatch.setattr(trainer, "build_loader", lambda *a, **k: (warnings.warn("one train shard"), build(*a, **k))[1])
    pack(tiny_data, tmp_path / "s", opts=PackOptions(resize_short=32, shard_size=200, workers=1), progress=False)
    train(cfg_for(tmp_path / "s", tmp_path, model="resnet18", epochs=1, batch_size=16, workers=0,
                  teacher_ckpt="t.pth", warmup_epochs=1.0, min_lr=1e-4, repeated_aug=20))
    lines = capsys.readouterr().out.splitlines()
    # the first line names the loader and its workers (0: the main process)
    assert lines[0].startswith("run ") and ", loader torch (0 workers), amp off, " in lines[0]
    assert lines[1:3] == ["warning: one train shard"] * 2  # the train and the val loader's, after it
    assert lines[3] == "warning: --teacher-ckpt is for --model deit_tiny_distill with a --distillation-type other " \
                       "than none; this run trains without a teacher"
    assert lines[4].startswith("warning: --warmup-epochs 1.0 >= --epochs 1: the whole run warms up")
    assert lines[5] == ("warning: --min-lr 0.0001 >= the peak lr 1.56e-05 (--lr 0.0005 x global batch 16 / 512): "
                        "the cosine cannot decay to it; lower --min-lr (e.g. 1.56e-07)")  # 5e-4 * 16 / 512
    assert lines[6] == ("warning: --repeated-aug 20 >= --batch-size 16: the global batch of 16 holds copies of about 1 "
                        "image(s) (DeiT: 3 copies, in batches of 64 and more)")
    assert "packed with --resize-short 32, under the 36 px" in lines[7]  # floor(32 / 0.875)


class StepsOnly:  # a torch loader's name, steps per epoch and train images per rank (tiny_shards: 96), for run_notes
    name = "torch"

    def __init__(self, steps, per_rank=96):
        self.steps, self.per_rank = steps, per_rank

    def __len__(self):
        return self.steps


def notes_for(shards, out, world=1, **kw):
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_notes

    cfg = cfg_for(shards, out, **kw)
    manifest = load_manifest(shards)
    loader = build_loader(cfg, manifest, "train", Dist(world=world))  # rank 0's, which prints the notes
    return run_notes(cfg, manifest, Dist(world=world), loader, None, 1e-3)


def test_distillation_settings_on_a_run_without_a_teacher_are_named(tiny_shards, tmp_path):
    said = lambda **kw: [n for n in notes_for(tiny_shards, tmp_path, **kw) if "this run trains without" in n]  # noqa
    assert said(model="vit_tiny", distillation_tau=5.0, allow_weak_teacher=True) == [
        "warning: --allow-weak-teacher and --distillation-tau are for --model deit_tiny_distill with a "
        "--distillation-type other than none; this run trains without a teacher"]
    assert said(model="deit_tiny_distill", distillation_type="none", distillation_alpha=0.9) == [
        "warning: --distillation-alpha is for --model deit_tiny_distill with a --distillation-type other than none; "
        "this run trains without a teacher"]
    assert said(model="vit_tiny") == said(model="deit_tiny_distill", distillation_alpha=0.9) == []
    tau = lambda **kw: [n for n in notes_for(tiny_shards, tmp_path, **kw) if "--distillation-tau" in n]  # noqa: E731
    assert tau(model="deit_tiny_distill", distillation_tau=4.0) == [
        "warning: --distillation-tau is for --distillation-type soft; hard distillation learns the teacher's top "
        "class, which no temperature changes: this run ignores it"]
    assert tau(model="deit_tiny_distill", distillation_type="soft", distillation_tau=4.0) == tau(
        model="deit_tiny_distill") == []
    assert not [n for n in tau(model="vit_tiny", distillation_tau=4.0) if "hard distillation" in n]  # (no teacher)


def test_distilling_from_torchvisions_imagenet1k_teacher_says_that_it_learnt_from_more_data(tiny_shards, tmp_path):
    from vitdeit.models import OUTSIDE_DATA

    said = lambda **kw: [n for n in notes_for(tiny_shards, tmp_path, **kw) if OUTSIDE_DATA in n]  # noqa
    assert said(model="deit_tiny_distill") == said(model="deit_tiny_distill", teacher_weights="imagenet1k") == [
        f"note: {OUTSIDE_DATA}"]
    assert "learnt from ImageNet-1k's 1.28M train images of 1,000 classes, the students only from" in said(
        model="deit_tiny_distill")[0]
    assert said(model="deit_tiny_distill", teacher_ckpt="runs/teacher_resnet18/best.pth") == []  # trained here
    assert said(model="deit_tiny_distill", distillation_type="none") == said(model="vit_tiny") == []


def test_the_min_lr_and_repeated_aug_warnings_start_at_their_bounds(tiny_shards, tmp_path):
    said = lambda text, **kw: [n for n in notes_for(tiny_shards, tmp_path, **kw) if text in n]  # noqa
    # notes_for's peak lr is 1e-3: a --min-lr equal to it leaves the cosine flat at the peak, one just under it does not
    assert len(said("the cosine cannot decay", min_lr=1e-3)) == 1 and said("the cosine cannot", min_lr=9.9e-4) == []
    # a batch of 16 that --repeated-aug 16 fills with copies of one image; 8 gives two images; and with the 16
    # copies dealt over 2 processes of 16 each (or DALI's 2 batches of copies), the global batch of 32 holds 2
    assert said("batch of", batch_size=16, repeated_aug=16) == [
        "warning: --repeated-aug 16 >= --batch-size 16: the global batch of 16 holds copies of about 1 image(s) "
        "(DeiT: 3 copies, in batches of 64 and more)"]
    assert "the global batch of 32 holds copies of about 2 image(s)" in said("batch of", world=2, batch_size=16,
                                                                             repeated_aug=16)[0]
    assert said("batch of", batch_size=16, repeated_aug=8) == []
    assert said("--repeated-aug", model="vit_tiny", batch_size=1) == []  # --repeated-aug 1 is off: no copies


def test_fp16_on_a_cpu_is_a_note_after_the_run_line(tiny_shards, tmp_path):
    assert notes_for(tiny_shards, tmp_path, amp="fp16") == [
        "note: --amp fp16 on a CPU: many of PyTorch's CPU kernels run float16 far slower than float32; --amp off is "
        "the CPU's default"]
    assert notes_for(tiny_shards, tmp_path, amp="off") == notes_for(tiny_shards, tmp_path, amp="bf16") == []


@pytest.mark.parametrize("batch_size, world, loader, said", [
    (32, 1, "torch", None),
    (18, 1, "torch", "trains on 90 of each process's 96 train images, whole batches only; the other 6 (6 %)"),
    (64, 1, "torch", "trains on 64 of each process's 96 train images, whole batches only; the other 32 (33 %)"),
    (20, 2, "torch", "trains on 40 of each process's 48 train images, whole batches only; the other 8 (17 %)"),
    (16, 2, "torch", None),  # 96 train images; a remainder up to 5 % of a process's share is no warning
    # 96 over 5 ranks: the PyTorch sampler pads each rank's share to 20, DALI gives rank 0 the slice [0, 19)
    (8, 5, "torch", "trains on 16 of each process's 20 train images, whole batches only; the other 4 (20 %)"),
    pytest.param(8, 5, "dali", "trains on 16 of each process's 19 train images, whole batches only; the other 3 (16 %)",
                 marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))])
def test_a_batch_size_that_leaves_many_train_images_out_of_each_epoch_is_a_warning(tiny_shards, tmp_path, batch_size,
                                                                                  world, loader, said):
    notes = notes_for(tiny_shards, tmp_path, world=world, batch_size=batch_size, loader=loader)
    if said is None:
        assert notes == []
    else:
        share = re.search(r"process's (\d+) train images", said)[1]
        assert notes == [f"warning: --batch-size {batch_size}: an epoch {said} sit out each epoch (others each time: "
                         f"the order is reshuffled). A --batch-size that divides {share} more evenly trains on more of "
                         f"them"]


def test_more_workers_than_cores_are_warned_of_once_in_place_of_pytorchs_four_warnings(tiny_shards, tmp_path, capsys,
                                                                                       monkeypatch):
    """PyTorch's DataLoader warns of workers over the cores as it is made and again at its first iteration, for the
    train and the val loader each; the run says it once, with its notes."""
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # PyTorch's count too
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", img_size=16, epochs=1, batch_size=16, workers=2,
                      loader="torch"))
    out = capsys.readouterr().out
    assert ", 1 core), loader torch (2 workers), " in out.splitlines()[0]  # (one core: "core")
    assert out.splitlines()[1] == ("warning: --workers 2: 2 decode processes on this node, more than its 1 usable "
                                   "core: they take turns and slow each other; --workers -1 takes this node's share "
                                   "(1 here)")
    assert out.count("--workers 2:") == 1
    assert not [w for w in caught if "worker" in str(w.message)] and "This DataLoader will create" not in out


def test_each_epoch_says_how_long_it_took_and_the_time_left_at_its_pace(tiny_shards, tmp_path, capsys, monkeypatch):
    import time

    from vitdeit.trainer import pace_text

    assert pace_text(59.6, 0) == "1:00 this epoch"
    assert pace_text(754.4, 5) == "12:34 this epoch, 1:02:52 left at its pace"  # 3,772 s
    assert pace_text(3600, 1) == "1:00:00 this epoch, 1:00:00 left at its pace"
    assert pace_text(95, 9, compiling=True) == "1:35 this epoch, torch.compile's compiling included"
    asked = []
    monkeypatch.setattr(trainer, "pace_text", lambda took, left, compiling=False: asked.append(
        (took, left, compiling)) or pace_text(took, left, compiling))
    # a compiled run (torch.compile itself left out: not what this test is about) of 2 epochs, resumed to 4: each
    # start's first epoch compiles
    monkeypatch.setattr(trainer, "compile_for_training", lambda net, teacher, use, mode: (net, teacher, False))
    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0, compile="on")
    walls = []
    for epochs, resume in ((2, ""), (4, str(tmp_path / "vit_tiny" / "last.pth"))):
        t0 = time.perf_counter()
        train(cfg_for(tiny_shards, tmp_path, epochs=epochs, resume=resume, **kw))
        walls.append(time.perf_counter() - t0)
    assert [(left, compiling) for _, left, compiling in asked] == [(1, True), (0, False), (1, True), (0, False)]
    took = [t for t, _, _ in asked]
    assert all(t > 0 for t in took) and sum(took[:2]) < walls[0] and sum(took[2:]) < walls[1]  # within each run
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2", "epoch 3"]
    assert all(line.removesuffix(" *best").endswith(f"% | {pace_text(*a)}") for line, a in zip(lines, asked))


@pytest.mark.parametrize("loader, workers, said", [("torch", 0, "(0 workers)"), ("torch", 1, "(1 worker)"),
                                                   ("dali", 0, "(1 DALI thread)"), ("dali", 3, "(3 DALI threads)")])
def test_the_run_line_names_the_loaders_decoding_processes_or_threads(tiny_shards, loader, workers, said):
    from vitdeit.classes import load_manifest
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_line

    line = run_line(cfg_for(tiny_shards, "runs", workers=workers), load_manifest(tiny_shards), Dist(), loader, None,
                    False, "default", 1e-3, steps=6, machine=A_CPU)
    assert f", loader {loader} {said}, amp off, " in line  # DALI runs one thread at the least (--workers 0 too)


def test_a_resume_where_amp_auto_resolves_otherwise_is_noted_and_the_checkpoint_keeps_both():
    from vitdeit.trainer import amp_trained

    assert amp_trained(None, "bf16") == "bf16"  # a new run
    assert amp_trained({"amp": "bf16"}, "bf16") == "bf16"
    assert amp_trained({"amp": "bf16"}, "off") == "bf16, then off"  # resumed on a CPU
    assert amp_trained({"amp": "bf16, then off"}, "off") == "bf16, then off"
    assert amp_trained({"amp": "bf16, then off"}, "bf16") == "bf16, then off, then bf16"
    assert amp_trained({}, "off") == "off"  # a checkpoint from before it was kept: nothing to add


@pytest.mark.parametrize("saved_amp, flag, said", [
    ("bf16", "auto", "note: --resume: runs/r/last.pth trained with --amp bf16, as --amp auto resolved on its device; "
                     "on cpu here it trains with off from here on"),
    ("off", "auto", None), (None, "auto", None),  # the same precision; a checkpoint from before it was kept
    ("bf16", "off", None)])  # --amp changed by flag: the recipe change says so
def test_a_resume_on_a_device_where_amp_auto_resolves_otherwise_is_noted(tiny_shards, saved_amp, flag, said):
    from vitdeit.classes import load_manifest
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_notes

    cfg = cfg_for(tiny_shards, "runs", resume="runs/r/last.pth")  # (--amp auto, on this CPU: off)
    resumed = {"config": {**cfg.to_dict(), "amp": flag}, "epoch": 0, "loader": "torch", "loader_states": [None],
               **({"amp": saved_amp} if saved_amp else {})}
    if flag != "auto":
        cfg = cfg_for(tiny_shards, "runs", resume="runs/r/last.pth", amp="auto")
    notes = [n for n in run_notes(cfg, load_manifest(tiny_shards), Dist(), StepsOnly(6), resumed, 1e-3) if "amp" in n]
    assert notes == ([said] if said else [])


@pytest.mark.parametrize("batch_size, world, steps, repeated_aug, said", [
    (16, 2, 3, 1, ""), (20, 2, 2, 1, ", 80 images an epoch in whole batches"), (18, 1, 5, 1, ", 90 images an epoch "
     "in whole batches"), (20, 2, 2, 2, ", 80 samples an epoch in whole batches")])  # (--repeated-aug: copies too)
def test_the_run_line_says_how_many_train_images_an_epoch_takes_in_whole_batches(tiny_shards, batch_size, world, steps,
                                                                                 repeated_aug, said):
    from vitdeit.classes import load_manifest
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_line

    cfg = cfg_for(tiny_shards, "runs", batch_size=batch_size, repeated_aug=repeated_aug)
    line = run_line(cfg, load_manifest(tiny_shards), Dist(world=world), "torch", None, False, "default", 1e-3,
                    steps=steps, machine=A_CPU)  # 96 train images: the loader's steps per process x the global batch
    assert f"(4 classes, 96 train{said} / 24 val), {world} process(es) on cpu (Some CPU, 2 cores), loader" in line


@pytest.mark.parametrize("why, said", [("a state of another kind", "a state of another kind"),
                                       (None, "no DALI reader state")])  # (none given: a PyTorch-loader run's)
def test_a_dali_state_not_restored_is_said_with_the_loaders_reason(tiny_shards, why, said):
    from vitdeit.classes import load_manifest
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_notes

    class NotRestored:  # a DALI train loader whose saved state did not fit (test_dali: its reasons)
        name, restored, per_rank, not_restored = "dali", False, 96, why

        def __len__(self):
            return 6

    cfg = cfg_for(tiny_shards, "runs", loader="dali", resume="runs/r/last.pth")
    resumed = {"config": cfg.to_dict(), "epoch": 0, "loader": "dali", "loader_states": [None]}
    notes = run_notes(cfg, load_manifest(tiny_shards), Dist(), NotRestored(), resumed, 1e-3)
    assert f"note: --resume: runs/r/last.pth holds {said}: DALI's sample stream starts afresh (training goes on, " \
           f"not bit-exactly)." in notes


def test_the_run_line_says_how_many_train_images_an_epoch_trains_on_when_whole_batches_leave_some_out(
        tiny_shards, tmp_path, capsys, monkeypatch):
    from vitdeit.classes import load_manifest

    stop_before_the_first_epoch(monkeypatch)
    n_train = load_manifest(tiny_shards)["splits"]["train"]["num_samples"]
    for batch in (16, 20):  # 96 train images: 6 whole batches of 16; 4 of 20, 80 images an epoch
        with pytest.raises(Stopped):
            train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=1, batch_size=batch, workers=0,
                          run_name=f"b{batch}"))
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run "))
        whole = "" if n_train % batch == 0 else f", {n_train // batch * batch} images an epoch in whole batches"
        assert f"({len(load_manifest(tiny_shards)['classes'])} classes, {n_train} train{whole} / " in line
    assert n_train == 96


def test_resuming_with_another_process_count_says_what_changes(tiny_shards, tmp_path, capsys):
    kw = dict(model="vit_tiny", batch_size=16, workers=0)
    train(cfg_for(tiny_shards, tmp_path, epochs=1, **kw))
    last = tmp_path / "vit_tiny" / "last.pth"
    state = torch.load(last, weights_only=True)
    state["loader_states"] = state["loader_states"] * 4  # as saved by 4 processes
    torch.save(state, last)
    capsys.readouterr()
    train(cfg_for(tiny_shards, tmp_path, epochs=2, resume=str(last), **kw))
    assert (f"note: --resume: {last} was trained by 4 process(es), this run has 1: the global batch (64 -> 16), the lr "
            f"and the steps per epoch change from here on, and the sample order is not the uninterrupted run's"
            ) in capsys.readouterr().out.splitlines()


def test_the_gpu_recipe_compiled_bf16_with_a_compiled_teacher_and_ema_runs_on_cpu(teacher_run, tiny_shards, tmp_path,
                                                                                  monkeypatch, capsys):
    """What a GPU run does by default (compile, 16-bit autocast, the teacher compiled too), here on a CPU: 7-9 s with
    inductor's cache warm (a first run on a machine compiles for longer). The checkpoint must hold the plain module's
    weights, not the compiled wrapper's. In mode reduce-overhead (CUDA graphs on a GPU), which compiles the same on a
    CPU: its per-step marker runs too."""
    tcfg, _ = teacher_run  # (the same 4 classes as tiny_shards, but not their look: weak on them)
    kw = dict(model="deit_tiny_distill", compile="on", amp="bf16", compile_mode="reduce-overhead",
              allow_weak_teacher=True)
    marks, compiled, compile_ = [], [], torch.compile
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append((type(m).__name__, k)) or compile_(m, **k))
    casts, teacher_dtypes, hard = autocast_spy(monkeypatch), set(), distill.hard_distillation
    monkeypatch.setattr(distill, "hard_distillation", lambda s, t: teacher_dtypes.add(t.dtype) or hard(s, t))
    last = train(cfg_for(tiny_shards, tmp_path, teacher_ckpt=os.path.join(tcfg.output_dir, "teacher", "best.pth"),
                         epochs=1, lr=0.003, model_ema=True, **kw))
    assert teacher_dtypes == {torch.float32}  # the compiled teacher's logits, under bf16 autocast (FullPrecisionLinear)
    steps = load_manifest(tiny_shards)["splits"]["train"]["num_samples"] // 32  # batch 32, the last one dropped
    assert len(marks) == steps  # one new step for the graphs per training step
    assert compiled == [("VisionTransformerDistilled", {"mode": "reduce-overhead"}),
                        ("ResNet", {"mode": "reduce-overhead"})]  # the student and the teacher
    # under bf16 autocast: the teacher's check (24 val images: 1 batch of 32), every train step, the DeiT's and its
    # EMA's val passes
    assert steps == 3 and casts == [torch.bfloat16] * (1 + steps + 1 + 1)
    assert math.isfinite(last["train_loss"]) and last["val_samples"] == 24 and "val_top1_ema" in last
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 0: "))
    assert re.search(r"\| \d+:\d\d this epoch, torch\.compile's compiling included( \*best)?$", epoch_line)  # no pace
    saved = torch.load(tmp_path / "deit_tiny_distill" / "last.pth", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for part in ("model", "ema") for k in saved[part])
    # the saved weights, in a plain (eager) model, score what the compiled run logged, within an image or two
    out = evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, resume=str(tmp_path / "deit_tiny_distill" / "last.pth"),
                                      eval_only=True, **kw))
    assert out["val_top1"] == pytest.approx(last["val_top1"], abs=2 * 100 / 24)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without a GPU")
@pytest.mark.parametrize("kw, message", [
    (dict(step_stream="side"), "--step-stream side: a CUDA stream, and this run is on cpu; drop it"),
    (dict(step_stream="high"), "--step-stream high: a CUDA stream, and this run is on cpu; drop it"),
    (dict(compile_mode="reduce-overhead"), "--compile-mode reduce-overhead: nothing is compiled on cpu (--compile auto "
     "compiles on CUDA only); add --compile on or drop it")])
def test_gpu_step_settings_on_a_machine_without_a_gpu_are_refused_before_any_work(tiny_shards, tmp_path, kw, message):
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError, match=re.escape(message)):
        train(cfg_for(tiny_shards, tmp_path, **kw))  # --device auto
    assert not (tmp_path / "vit_tiny").exists()


def test_cuda_graphs_under_ddp_are_refused_before_any_work(tiny_shards, tmp_path, monkeypatch):
    from vitdeit import distributed
    from vitdeit.distributed import Dist
    from vitdeit.errors import SettingError

    monkeypatch.setattr(distributed, "setup", lambda device: Dist(rank=0, world=2))  # as torchrun's rank 0 of 2
    with pytest.raises(SettingError, match=re.escape("--compile-mode reduce-overhead with 2 processes: CUDA graphs "
                                                     "under DDP are not supported here")):
        train(cfg_for(tiny_shards, tmp_path, compile="on", compile_mode="reduce-overhead"))
    assert not (tmp_path / "vit_tiny").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_restores_its_own_train_loader_state(teacher_run, tmp_path, monkeypatch, rank):
    import shutil

    from vitdeit import distributed, trainer
    from vitdeit.distributed import Dist

    cfg, _ = teacher_run
    run = tmp_path / "teacher"
    shutil.copytree(os.path.join(cfg.output_dir, "teacher"), run)
    state = torch.load(run / "last.pth", weights_only=True)
    torch.save({**state, "loader_states": [{"of rank": 0}, {"of rank": 1}]}, run / "last.pth")  # a 2-process run's
    handed = {}

    def build_loader(cfg, manifest, split, dist, state=None):
        handed[split] = state
        raise Stopped

    monkeypatch.setattr(distributed, "setup", lambda device: Dist(rank=rank, world=2))  # as torchrun's rank of 2
    monkeypatch.setattr(trainer, "build_loader", build_loader)
    with pytest.raises(Stopped):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path), epochs=9, resume=str(run / "last.pth")))
    assert handed == {"train": {"of rank": rank}}


def fake_val(monkeypatch, values):
    it = iter(values)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_top1": next(it),
                                                              "val_top5": 90.0, "val_samples": 24})


@pytest.mark.parametrize("damage", ["cut short", "a byte changed"])
def test_a_resume_in_place_beside_a_last_pth_that_does_not_load_is_not_refused_as_a_rewind(tmp_path, damage):
    """A last.pth that does not load is no history to keep: --resume RUN/best.pth goes on (a loadable later one is
    refused, as a rewind)."""
    from vitdeit.distributed import Dist

    run = tmp_path / "vit_tiny"
    run.mkdir()
    cfg = Config(resume=str(run / "best.pth"))
    torch.save({"epoch": 2}, run / "last.pth")
    with pytest.raises(SettingError, match="has trained up to epoch 2"):
        runs.check_rewind(run, cfg, {"epoch": 0}, Dist())
    good = bytearray((run / "last.pth").read_bytes())
    if damage == "cut short":  # a disk that filled, a copy cut off
        del good[len(good) // 2:]
    else:  # in place, the first byte of its pickle: that record's CRC-32 no longer fits
        good[zip_record(run / "last.pth", "/data.pkl")[1]] ^= 0x41
    (run / "last.pth").write_bytes(bytes(good))
    runs.check_rewind(run, cfg, {"epoch": 0}, Dist())  # goes on from best.pth


def test_resuming_in_place_from_an_older_checkpoint_is_refused_without_overwrite(tiny_shards, tmp_path,
                                                                                   monkeypatch):
    import shutil

    kw = dict(model="vit_tiny", batch_size=16, workers=0, epochs=3)
    fake_val(monkeypatch, [50.0, 60.0, 10.0])
    run = tmp_path / "vit_tiny"
    train(cfg_for(tiny_shards, tmp_path, **kw),
          on_epoch_end=lambda e, r: e == 0 and shutil.copy(run / "last.pth", run / "ep0.pth"))
    files = {f.name: f.read_bytes() for f in run.iterdir()}
    with pytest.raises(SettingError) as e:  # e.g. "continue from the best": it would replace epochs 1 and 2
        train(cfg_for(tiny_shards, tmp_path, resume=str(run / "ep0.pth"), **{**kw, "epochs": 5}))
    assert str(e.value) == (
        f"--resume {run / 'ep0.pth'} is epoch 0's, and {run / 'last.pth'} has trained up to epoch 2: going on from it "
        f"here would replace epochs 1-2 (last.pth, best.pth, metrics.jsonl). Continue with --resume "
        f"{run / 'last.pth'}; or branch with another --run-name (it takes this run's history up to epoch 0); or pass "
        f"--overwrite to rewind this run.")
    assert e.value.every_rank_stops
    assert {f.name: f.read_bytes() for f in run.iterdir()} == files  # nothing written
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "ep0.pth"), **{**kw, "epochs": 1}))  # nothing to train:
    assert {f.name: f.read_bytes() for f in run.iterdir()} == files  # epoch 1's better best.pth is kept
    with pytest.raises(SettingError, match="is epoch 1's"):  # best.pth (epoch 1's) is older than last.pth too
        train(cfg_for(tiny_shards, tmp_path, resume=str(run / "best.pth"), **{**kw, "epochs": 5}))
    fake_val(monkeypatch, [10.0, 10.0])
    shutil.copy(run / "last.pth", run / "copy.pth")  # a copy of last.pth itself: nothing is rewound
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "copy.pth"), **{**kw, "epochs": 5}))
    assert [json.loads(x)["epoch"] for x in open(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_resuming_in_place_with_overwrite_keeps_the_best_and_cuts_the_later_epochs(tiny_shards, tmp_path,
                                                                                   monkeypatch):
    import shutil

    kw = dict(model="vit_tiny", batch_size=16, workers=0, epochs=3)
    fake_val(monkeypatch, [50.0, 50.0, 10.0, 10.0, 10.0])  # 3 epochs, then 2 resumed; a tie is not a new best
    run = tmp_path / "vit_tiny"
    train(cfg_for(tiny_shards, tmp_path, **kw),
          on_epoch_end=lambda e, r: e == 0 and shutil.copy(run / "last.pth", run / "ep0.pth"))
    best = run / "best.pth"
    assert torch.load(best, weights_only=True)["epoch"] == 0
    before = best.read_bytes()
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "ep0.pth"), overwrite=True, **kw))
    assert best.read_bytes() == before and torch.load(run / "last.pth", weights_only=True)["best_top1"] == 50.0
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [(r["epoch"], r["val_top1"]) for r in rows] == [(0, 50.0), (1, 10.0), (2, 10.0)]  # epochs 1, 2 redone


@pytest.mark.parametrize("first, after, kept", [
    ([50.0, 60.0, 10.0], 0, (0, 50.0)),  # best.pth is abandoned epoch 1's; the resumed epoch 0 was the best: kept
    ([60.0, 50.0, 70.0], 1, (2, 10.0)),  # the best epoch 0's weights are gone (overwritten by epoch 2's): none is
])  # kept, and the redone epoch writes best.pth anew
def test_resuming_in_place_from_an_earlier_epoch_drops_a_best_pth_of_the_abandoned_ones(tiny_shards, tmp_path,
                                                                                        monkeypatch, first, after,
                                                                                        kept):
    import shutil

    kw = dict(model="vit_tiny", batch_size=16, workers=0, epochs=3)
    fake_val(monkeypatch, first + [10.0] * (2 - after))
    run = tmp_path / "vit_tiny"
    train(cfg_for(tiny_shards, tmp_path, **kw),
          on_epoch_end=lambda e, r: e == after and shutil.copy(run / "last.pth", run / "back.pth"))
    train(cfg_for(tiny_shards, tmp_path, resume=str(run / "back.pth"), overwrite=True, **kw))  # (a rewind)
    best = torch.load(run / "best.pth", weights_only=True)
    assert (best["epoch"], best["best_top1"]) == kept
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["val_top1"] for r in rows] == first[:after + 1] + [10.0] * (2 - after)


@pytest.mark.parametrize("in_place", [True, False])
def test_a_best_pth_from_after_the_resumed_epoch_is_not_adopted_even_at_the_same_score(tmp_path, in_place):
    # the score alone cannot tell: a best.pth written by a later epoch (of an abandoned history) at the resumed
    # run's best top-1 holds other weights than that history's best epoch
    from vitdeit.runs import adopt_history

    src, run = tmp_path / "src", tmp_path / ("src" if in_place else "run")
    src.mkdir(), run.mkdir(exist_ok=True)
    torch.save({"best_top1": 50.0, "epoch": 3}, src / "best.pth")
    resumed = {"best_top1": 50.0, "epoch": 2, "metrics": {"val_top1": 40.0}}  # its best epoch was before 2
    assert adopt_history(src / "last.pth", run, resumed, in_place=in_place) == -1.0
    assert not (run / "best.pth").exists()
    torch.save({"best_top1": 50.0, "epoch": 1}, src / "best.pth")  # that best epoch's own: adopted
    assert adopt_history(src / "last.pth", run, resumed, in_place=in_place) == 50.0
    assert torch.load(run / "best.pth", weights_only=True) == {"best_top1": 50.0, "epoch": 1}


def test_a_resume_from_another_folder_brings_its_metrics_or_none_never_the_destinations_old_lines(tmp_path):
    from vitdeit.runs import adopt_history

    src, run = tmp_path / "src", tmp_path / "run"
    src.mkdir(), run.mkdir()
    planted = '{"epoch": 0, "val_top1": 99.5}\n'  # another run's line, left in the folder (killed before last.pth)
    resumed = {"best_top1": 50.0, "epoch": 0, "metrics": {"val_top1": 40.0}}
    (run / "metrics.jsonl").write_text(planted)
    adopt_history(src / "last.pth", run, resumed, in_place=False)  # the source has no metrics.jsonl
    assert not (run / "metrics.jsonl").exists()
    (run / "metrics.jsonl").write_text(planted)
    (src / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 40.0}\n')
    adopt_history(src / "last.pth", run, resumed, in_place=False)
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 0, "val_top1": 40.0}\n'  # the resumed run's own


@pytest.mark.parametrize("in_place", [True, False])
def test_a_damaged_best_pth_beside_the_resumed_checkpoint_is_replaced_not_adopted(tmp_path, in_place):
    from vitdeit.runs import adopt_history

    src, run = tmp_path / "src", tmp_path / ("src" if in_place else "run")
    src.mkdir(), run.mkdir(exist_ok=True)
    (src / "best.pth").write_bytes(b"cut short")  # e.g. a disk that filled while it was written
    resumed = {"best_top1": 50.0, "epoch": 2, "metrics": {"val_top1": 40.0}}  # its best epoch was before 2
    assert adopt_history(src / "last.pth", run, resumed, in_place=in_place) == -1.0
    assert not (run / "best.pth").exists()  # the next epoch writes one
    (src / "best.pth").write_bytes(b"cut short")
    resumed["metrics"]["val_top1"] = 50.0  # the resumed epoch was the best: its own weights become best.pth
    assert adopt_history(src / "last.pth", run, resumed, in_place=in_place) == 50.0
    assert torch.load(run / "best.pth", weights_only=True) == resumed


def test_a_run_stopped_in_its_last_epoch_before_best_pth_gets_it_from_the_resume_with_nothing_to_train(
        tiny_shards, tmp_path, monkeypatch, capsys):
    from vitdeit.runs import best_behind

    kw = dict(model="vit_tiny", batch_size=16, workers=0, epochs=2)
    fake_val(monkeypatch, [10.0, 20.0])
    real = trainer.save_checkpoint

    def save(path, state):  # killed (no handler runs) as the last epoch, the best, writes best.pth
        if path.name == "best.pth" and state["epoch"] == 1:
            raise SystemExit("killed")
        real(path, state)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    with pytest.raises(SystemExit):
        train(cfg_for(tiny_shards, tmp_path, **kw))
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    run = tmp_path / "vit_tiny"
    assert torch.load(run / "best.pth", weights_only=True)["epoch"] == 0  # (the last best, until the resume)
    last = run / "last.pth"
    capsys.readouterr()
    never = dict(on_epoch_end=lambda e, r: pytest.fail("trained"))
    train(cfg_for(tiny_shards, tmp_path, resume=str(last), run_name="branch", **kw), **never)
    assert not (tmp_path / "branch").exists()  # another folder's last.pth: this run's best.pth is not made there
    assert "nothing to do, nothing written" in capsys.readouterr().out
    with held_elsewhere(run / ".lock"):  # another train.py writing in the folder now: best.pth waits for it
        with pytest.raises(SettingError, match=re.escape(f"{run}: another train.py is training in this folder now")):
            train(cfg_for(tiny_shards, tmp_path, resume=str(last), **kw), **never)
    assert torch.load(run / "best.pth", weights_only=True)["epoch"] == 0
    for _ in range(2):  # the second: best.pth is whole, nothing written
        assert not best_behind(run, {**torch.load(last, weights_only=True), "metrics": {"val_top1": 19.0}})
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        train(cfg_for(tiny_shards, tmp_path, resume=str(last), **kw), **never)
        best = torch.load(run / "best.pth", weights_only=True)
        assert (best["epoch"], best["best_top1"]) == (1, 20.0)
        assert all(torch.equal(best["model"][k], v) for k, v in torch.load(last, weights_only=True)["model"].items())
        changed = sorted(n for n, t in before.items() if (run / n).stat().st_mtime_ns != t)
        out = capsys.readouterr().out
        if _ == 0:
            assert changed == ["best.pth"] and (f"{last} has trained 2 epoch(s), --epochs 2: nothing to do, "
                                                f"{run / 'best.pth'} written from it (its epoch, the best, was "
                                                f"stopped before best.pth was), nothing else") in out
        else:
            assert changed == [] and "nothing to do, nothing written" in out


def test_a_best_pth_is_written_from_the_last_epoch_only_over_one_both_lower_and_earlier(tmp_path):
    from vitdeit.runs import best_behind

    last = {"epoch": 1, "best_top1": 20.0, "metrics": {"val_top1": 20.0}}  # the last epoch, the best: 20 %
    assert best_behind(tmp_path, last)  # no best.pth
    torch.save([1, 2], tmp_path / "best.pth")  # not a checkpoint: says nothing of the run
    assert best_behind(tmp_path, last)
    for top1, epoch, behind in ((10.0, 0, True),  # the earlier best: written over
                                (20.0, 0, False),  # a tie: the earlier epoch's is kept (is_best keeps it too)
                                (10.0, 1, False), (20.0, 1, False),  # as late: written already
                                (30.0, 0, False)):  # higher: another run's (the history disagrees), left alone
        torch.save({"best_top1": top1, "epoch": epoch}, tmp_path / "best.pth")
        assert best_behind(tmp_path, last) is behind, (top1, epoch)
    torch.save({"best_top1": 10.0, "epoch": 0}, tmp_path / "best.pth")
    assert not best_behind(tmp_path, {**last, "metrics": {"val_top1": 19.0}})  # the last epoch was not the best


def test_the_seed_sets_the_initial_weights(tiny_shards, tmp_path, monkeypatch):
    from vitdeit.models import create_model

    made = []

    def recorded(*args):
        net = create_model(*args)
        made.append({k: v.clone() for k, v in net.state_dict().items()})
        return net

    monkeypatch.setattr(trainer, "create_model", recorded)
    stop_before_the_first_epoch(monkeypatch)
    for seed in (7, 8):
        with pytest.raises(Stopped):
            train(cfg_for(tiny_shards, tmp_path / str(seed), model="vit_tiny", workers=0, seed=seed))
    for seed, weights in zip((7, 8), made):
        torch.manual_seed(seed)
        expected = create_model("vit_tiny", 4, FAST["img_size"], FAST["patch_size"], FAST["drop_path"]).state_dict()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not torch.equal(made[0]["pos_embed"], made[1]["pos_embed"])


@pytest.mark.parametrize("rank", [0, 1])
def test_each_epoch_seeds_from_seed_epoch_and_rank(tiny_shards, tmp_path, monkeypatch, rank):
    from vitdeit import distributed, trainer
    from vitdeit.distributed import Dist

    seeds, real = [], trainer.train_one_epoch

    def spy(*a, **k):  # the state of each generator the epoch draws from (timm's Mixup: numpy's and Python's)
        seeds.append((torch.initial_seed(), np.random.get_state()[1][:4].tolist(), random.getstate()))
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    # as torchrun's rank of 2, with no process group: DDP's wrapper left out (it needs one), collectives are no-ops
    monkeypatch.setattr(distributed, "setup", lambda device: Dist(rank=rank, world=2))
    monkeypatch.setattr(trainer, "wrap", lambda model, dist: model)
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", batch_size=16, workers=0, epochs=2, seed=3))
    expected = []
    for e in (0, 1):
        seed = hash((3, e, rank)) % 2**31
        np.random.seed(seed), random.seed(seed)
        expected.append((seed, np.random.get_state()[1][:4].tolist(), random.getstate()))
    assert seeds == expected and seeds[0][0] != seeds[1][0]


def test_label_smoothing_weight_decay_groups_both_heads_and_the_ema_reach_the_training_step(tiny_shards, tmp_path,
                                                                                           monkeypatch):
    """The wiring from Config to the step, against computations made here: the loss the step takes is the
    label-smoothed CE of DeiT's mean of heads (distillation none), and the saved EMA is the decay-weighted mean of
    the weights after each step, from those after the first."""
    import torch.nn.functional as F
    import timm.utils

    from vitdeit.distill import DistillationLoss

    eps, decay, seen, after_step = 0.3, 0.9, [], []
    loss_forward, ema_update = DistillationLoss.forward, timm.utils.ModelEmaV3.update

    def loss_spy(self, images, outputs, targets):
        loss = loss_forward(self, images, outputs, targets)
        seen.append((outputs.detach().clone() if torch.is_tensor(outputs) else outputs, targets, loss.detach()))
        return loss

    def ema_spy(self, model, step=None):
        if not after_step:  # the EMA's start: the initial weights
            after_step.append((None, {k: v.detach().clone() for k, v in self.module.state_dict().items()}))
        after_step.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return ema_update(self, model, step)

    import timm.optim

    made, make_optimizer = [], timm.optim.create_optimizer_v2
    monkeypatch.setattr(DistillationLoss, "forward", loss_spy)
    monkeypatch.setattr(timm.utils.ModelEmaV3, "update", ema_spy)
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda net, *a, **k: made.append(
        (net, make_optimizer(net, *a, **k))) or made[-1][1])
    train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", distillation_type="none", epochs=1,
                  batch_size=16, workers=0, label_smoothing=eps, model_ema=True, model_ema_decay=decay,
                  lr=0.003, weight_decay=0.05))
    # AdamW's weight decay on the weight matrices alone: not on norms, biases, the position embedding or the tokens
    (net, optimizer), = made
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = dict(net.named_parameters())
    exempt = {n for n, p in names.items() if p.ndim <= 1 or n in ("pos_embed", "cls_token", "dist_token")}
    assert {"pos_embed", "cls_token", "dist_token", "head.bias", "norm.weight"} <= exempt
    assert plain == {id(names[n]) for n in exempt} and decayed == {id(p) for n, p in names.items() if n not in exempt}
    assert len(seen) == 6
    for outputs, targets, loss in seen:
        assert torch.is_tensor(outputs)  # one tensor, the heads' mean: both heads learn the labels
        logp = F.log_softmax(outputs.float(), dim=1)
        smoothed = ((1 - eps) * -logp.gather(1, targets[:, None]).squeeze(1) - eps * logp.mean(1)).mean()
        assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    # every step, counted as timm's train.py counts updates: ModelEmaV3 copies the weights at the first (decay 0)
    assert [step for step, _ in after_step] == [None, 1, 2, 3, 4, 5, 6]
    ema = dict(after_step[1][1])
    for _, weights in after_step[2:]:
        ema = {k: decay * v + (1 - decay) * weights[k] if v.is_floating_point() else weights[k] for k, v in ema.items()}
    saved = torch.load(tmp_path / "deit_tiny_distill" / "last.pth", weights_only=True)["ema"]
    assert all(torch.allclose(saved[k].float(), v.float(), atol=1e-6) for k, v in ema.items())
    moved = sum((saved[k].float() - after_step[0][1][k].float()).norm() for k in saved if saved[k].is_floating_point())
    assert moved > 0


def test_clip_grad_drop_path_and_a_new_sample_order_each_epoch_reach_the_training_step(tiny_shards, tmp_path,
                                                                                      monkeypatch):
    """Config -> step wiring that the loss value does not show: every step clips at --clip-grad, ViT's blocks drop
    paths at timm's linear ramp up to --drop-path, and each epoch's sampler draws that epoch's permutation."""
    import timm.optim


    clips, orders, made = [], [], []
    clip, make_optimizer = torch.nn.utils.clip_grad_norm_, timm.optim.create_optimizer_v2
    epoch_fn = trainer.train_one_epoch
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm, *a, **k: clips.append(max_norm) or clip(
        p, max_norm, *a, **k))
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda net, *a, **k: made.append(net) or make_optimizer(
        net, *a, **k))
    monkeypatch.setattr(trainer, "train_one_epoch", lambda step, loader, *a, **k: orders.append(
        loader.sampler.indices()) or epoch_fn(step, loader, *a, **k))
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=2, batch_size=16, workers=0, seed=5, clip_grad=0.25,
                  drop_path=0.2))
    assert clips == [0.25] * (2 * 96 // 16)  # every step of both epochs, at the flag's norm
    (net,) = made
    ramp = [0.2 * k / (len(net.blocks) - 1) for k in range(len(net.blocks))]  # timm: linear from 0 to the rate
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in net.blocks] == pytest.approx(ramp, abs=1e-6)
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in net.blocks] == pytest.approx(ramp, abs=1e-6)
    expected = []
    for epoch in (0, 1):  # one rank of 96 images: that epoch's permutation under --seed 5
        g = torch.Generator().manual_seed(5 * 1000003 + epoch)
        expected.append(torch.randperm(96, generator=g).tolist())
    assert orders == expected and orders[0] != orders[1]


def test_cutmix_alone_trains_on_its_soft_targets_smoothed_once(tiny_shards, tmp_path, monkeypatch):
    """Either Mixup or CutMix makes the targets soft (and already label-smoothed, by timm's Mixup): the loss is then
    the soft-target cross-entropy of those targets, not a cross-entropy that smooths them a second time."""
    import torch.nn.functional as F

    from vitdeit.distill import DistillationLoss

    seen, forward = [], DistillationLoss.forward
    monkeypatch.setattr(DistillationLoss, "forward", lambda self, images, outputs, targets: (
        seen.append((outputs.detach(), targets, forward(self, images, outputs, targets))), seen[-1][2])[1])
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=1, batch_size=16, workers=0, cutmix=1.0, mixup=0.0,
                  label_smoothing=0.2))
    assert len(seen) == 6
    for outputs, targets, loss in seen:
        assert targets.shape == (16, 4) and torch.allclose(targets.sum(1), torch.ones(16))
        assert targets.min() == pytest.approx(0.2 / 4)  # smoothed once, by Mixup: the off-class share
        expected = -(targets * F.log_softmax(outputs.double(), dim=1)).sum(1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_blends_each_image_with_its_pair_and_cutmix_pastes_a_box_of_it_each_weighted_as_its_pixels(kind):
    from vitdeit.trainer import batch_augmentation

    trainer.seed_everything(0, 0, 0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).clone()  # image i: the value i everywhere
    augment = batch_augmentation(Config(mixup=0.8 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0,
                                        label_smoothing=0.0), 8, torch.device("cpu"))
    out, targets = augment(images, torch.arange(8))  # (label i: image i's own class)
    for i in range(8):
        pair = 7 - i  # timm's batch mode pairs image i with the batch flipped
        if kind == "cutmix":  # every pixel i's or its pair's; the label weight is the share of the pixels that are i's
            assert torch.isin(out[i], torch.tensor([float(i), float(pair)])).all()
            own = (out[i] == i).double().mean().item()
            assert 0.0 < own < 1.0
        else:  # one blend everywhere: own * i + (1 - own) * pair, off the integers
            value = out[i, 0, 0, 0]
            assert torch.equal(out[i], value.expand_as(out[i])) and value != value.round()
            own = ((value - pair) / (i - pair)).item()
        assert targets[i, i].item() == pytest.approx(own, abs=1e-6)
        assert targets[i, pair].item() == pytest.approx(1 - own, abs=1e-6)


def test_the_ema_val_top1_scores_the_ema_weights_and_val_top1_the_models(tiny_shards, tmp_path, monkeypatch, capsys):
    def fingerprint(state):  # a number that tells two sets of weights apart
        return sum(float(v.double().sum()) for v in state.values() if v.is_floating_point())

    monkeypatch.setattr(trainer, "evaluate", lambda model, *a, **k: {
        "val_loss": 1.0, "val_top1": fingerprint(model.state_dict()), "val_top5": 0.0, "val_samples": 24})
    last = train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=1, batch_size=16, workers=0, lr=0.003,
                         model_ema=True, model_ema_decay=0.5))
    saved = torch.load(tmp_path / "vit_tiny" / "last.pth", weights_only=True)
    assert last["val_top1"] == pytest.approx(fingerprint(saved["model"]), rel=1e-12)
    assert last["val_top1_ema"] == pytest.approx(fingerprint(saved["ema"]), rel=1e-12)
    assert last["val_top1_ema"] != pytest.approx(last["val_top1"], rel=1e-9)  # the two weights differ
    assert f"(24 images), EMA top-1 {last['val_top1_ema']:.2f}% | " in capsys.readouterr().out  # the epoch's line


def test_with_an_ema_best_pth_is_still_the_epoch_whose_trained_weights_score_best(tiny_shards, tmp_path, monkeypatch):
    scores = iter([50.0, 10.0, 40.0, 90.0])  # epoch 0: the weights 50, their EMA 10; epoch 1: 40, the EMA 90
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_top1": next(scores),
                                                              "val_top5": 0.0, "val_samples": 24})
    train(cfg_for(tiny_shards, tmp_path, **{**TWO_EPOCHS, "model_ema": True}))
    best = torch.load(tmp_path / "vit_tiny" / "best.pth", weights_only=True)
    assert (best["epoch"], best["best_top1"], best["metrics"]["val_top1_ema"]) == (0, 50.0, 10.0)  # as in DeiT
    assert torch.load(tmp_path / "vit_tiny" / "last.pth", weights_only=True)["best_top1"] == 50.0


def test_a_teacher_from_a_checkpoint_with_an_ema_has_the_trained_weights(tiny_shards, tmp_path):
    from vitdeit.classes import manifest_class_map
    from vitdeit.models import load_teacher

    train(cfg_for(tiny_shards, tmp_path, model="resnet18", img_size=16, batch_size=16, workers=0, epochs=1,
                  model_ema=True, model_ema_decay=0.5))
    path = tmp_path / "resnet18" / "best.pth"
    saved = torch.load(path, weights_only=True)
    teacher = load_teacher(str(path), "", manifest_class_map(load_manifest(tiny_shards))).state_dict()
    assert teacher.keys() == saved["model"].keys()  # (its float32 classifier keeps nn.Linear's names)
    assert all(torch.equal(teacher[k], saved["model"][k]) for k in teacher)
    assert not all(torch.equal(saved["ema"][k], saved["model"][k]) for k in teacher)  # the EMA: other weights


@pytest.mark.parametrize("model", ["vit_tiny", "resnet18"])  # (ResNet-18: the EMA's BatchNorm statistics too)
def test_eval_ema_scores_the_checkpoints_ema_as_training_did_and_is_refused_where_there_is_none(
        two_epoch_run, tiny_shards, tmp_path, capsys, model):
    kw = dict(model=model, img_size=16, batch_size=16, workers=0, epochs=1, model_ema=True, model_ema_decay=0.5)
    train(cfg_for(tiny_shards, tmp_path, **kw))
    best = tmp_path / model / "best.pth"
    scores = torch.load(best, weights_only=True)["metrics"]
    capsys.readouterr()
    ema = evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, **kw, eval_only=True, eval_ema=True))
    trained = evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, **kw, eval_only=True))
    assert (ema["val_top1"], trained["val_top1"]) == (scores["val_top1_ema"], scores["val_top1"])  # as training scored
    assert ema["val_loss"] != trained["val_loss"]  # other weights (EMA decay 0.5 over 6 steps)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{best} (its EMA weights): val top-1 {ema['val_top1']:.2f}% ")
    assert out[0].endswith(f"(its epoch 0 scored {scores['val_top1_ema']:.2f}% when saved; its trained weights "
                           f"{scores['val_top1']:.2f}%)")
    assert out[1].startswith(f"{best}: val top-1 {trained['val_top1']:.2f}% ")
    without = two_epoch_run / "best.pth"  # trained without --model-ema
    with pytest.raises(SettingError, match=re.escape(f"--eval-ema: {without} holds no EMA of its weights (saved "
                                                     f"without --model-ema); drop --eval-ema to use its")) as e:
        evaluate_checkpoint(cfg_for(tiny_shards, tmp_path, **TWO_EPOCHS, resume=str(without), eval_only=True,
                                    eval_ema=True))
    assert e.value.every_rank_stops  # every rank read the same file: they leave the process group together
    with pytest.raises(SettingError, match=r"^--eval-ema: scores a checkpoint's EMA with --eval-only"):
        cfg_for(tiny_shards, tmp_path, **kw, eval_ema=True)


def test_the_distillation_alpha_and_tau_reach_the_loss(teacher_run, tiny_shards, tmp_path, monkeypatch):
    """The loss of each DeiT step, recomputed here: (1 - alpha) * label-smoothed CE of the class head + alpha * tau^2
    KL(teacher_tau || dist head_tau) / numel, with the teacher's logits from its checkpoint's weights."""
    import torch.nn.functional as F
    import torchvision

    from vitdeit.distill import DistillationLoss

    ckpt = os.path.join(teacher_run[0].output_dir, "teacher", "best.pth")  # (the same 4 classes as tiny_shards)
    teacher = torchvision.models.resnet18(num_classes=4)
    teacher.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    teacher.eval()
    seen, forward = [], DistillationLoss.forward

    def spy(self, images, outputs, targets):
        loss = forward(self, images, outputs, targets)
        seen.append((images.clone(), tuple(o.detach() for o in outputs), targets, loss.detach()))
        return loss

    monkeypatch.setattr(DistillationLoss, "forward", spy)
    alpha, tau, eps = 0.3, 2.0, 0.1
    train(cfg_for(tiny_shards, tmp_path, model="deit_tiny_distill", epochs=1, batch_size=16, workers=0, lr=0.003,
                  teacher_ckpt=ckpt, allow_weak_teacher=True, distillation_type="soft", distillation_alpha=alpha,
                  distillation_tau=tau, label_smoothing=eps))
    assert len(seen) == 6
    for images, (cls, dist), y, loss in seen:
        logp = F.log_softmax(cls.double(), dim=1)
        ce = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(1)).mean()
        with torch.no_grad():
            p = F.softmax(teacher(images).double() / tau, dim=1)
        kd = (p * (p.log() - F.log_softmax(dist.double() / tau, dim=1))).sum() * tau * tau / dist.numel()
        assert loss.item() == pytest.approx(((1 - alpha) * ce + alpha * kd).item(), rel=1e-4)


def test_amp_choices_resolve_to_their_dtypes_and_channels_last_sets_the_weights_memory_format(monkeypatch):
    from vitdeit.trainer import resolve_amp, to_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # (a device object: no GPU needed)
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("off", cuda) is None and resolve_amp("auto", cpu) is None  # no autocast on a CPU by default
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, ok=bf16: ok)
        assert resolve_amp("auto", cuda) is dtype
    for channels_last in (True, False):  # --channels-last: the weights' memory format
        w = to_device(torch.nn.Conv2d(3, 8, 3), Config(channels_last=channels_last), cpu).weight
        assert w.is_contiguous(memory_format=torch.channels_last) == channels_last != w.is_contiguous()


@pytest.mark.parametrize("amp, dtype, scaled", [("bf16", torch.bfloat16, False), ("fp16", torch.float16, True),
                                                ("off", None, False)])
def test_the_runs_amp_sets_the_autocast_dtype_of_every_step_and_the_grad_scaler(tiny_shards, tmp_path, monkeypatch,
                                                                                amp, dtype, scaled):
    casts, scalers, scaler = autocast_spy(monkeypatch), [], torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scalers.append(k.get("enabled")) or scaler(*a, **k))
    train(cfg_for(tiny_shards, tmp_path, model="vit_tiny", epochs=1, batch_size=16, workers=0, amp=amp, compile="off",
                  img_size=16))  # (4 patches: PyTorch's float16 CPU kernels are ~10x slower than fp32's)
    assert casts == [dtype] * (6 + 2)  # 6 train steps, then 2 val batches (tiny_shards' 24 val images: 16 and 8)
    assert scalers == [scaled]  # a GradScaler for fp16 only: bf16 has fp32's range


def test_a_resumed_distillation_whose_teacher_now_scores_otherwise_says_so(teacher_run, tiny_shards, tmp_path, capsys,
                                                                           monkeypatch):
    cfg, _ = teacher_run  # (trained on learn_shards: the same 4 classes as tiny_shards)
    ckpt = os.path.join(cfg.output_dir, "teacher", "best.pth")
    kw = dict(model="deit_tiny_distill", teacher_ckpt=ckpt, allow_weak_teacher=True, run_name="deit")
    fake_val(monkeypatch, [50.0, 40.0, 50.0, 45.0])  # the teacher, epoch 0; resumed: the teacher again, epoch 1
    train(cfg_for(tiny_shards, tmp_path, epochs=1, **kw))
    last = tmp_path / "deit" / "last.pth"
    assert torch.load(last, weights_only=True)["teacher_top1"] == 50.0
    capsys.readouterr()
    train(cfg_for(tiny_shards, tmp_path, epochs=2, resume=str(last), **kw))  # the same teacher: no note
    assert "the teacher scores" not in capsys.readouterr().out
    fake_val(monkeypatch, [60.0, 45.0])  # as if another teacher had been copied over best.pth
    stop_before_the_first_epoch(monkeypatch)  # (the note comes before it)
    with pytest.raises(Stopped):
        train(cfg_for(tiny_shards, tmp_path, epochs=3, resume=str(last), **kw))
    assert (f"note: --resume: the teacher scores 60.00% on val now, 50.00% when {last} was saved: not the teacher "
            f"this run distilled from so far (its file replaced or retrained?), or the val images read another way "
            f"(loader, device); the run goes on with this one") in capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def two_epoch_run(tiny_shards, tmp_path_factory):
    """A finished 2-epoch run (ViT-Tiny at 16 px: the cheapest), for tests that resume a copy of it."""
    out = tmp_path_factory.mktemp("two")
    train(cfg_for(tiny_shards, out, **TWO_EPOCHS))
    return out / "vit_tiny"


TWO_EPOCHS = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0, epochs=2)


@pytest.mark.parametrize("lines_kept, said", [(None, "0-1"), ([1], "0"), ([0], "1"), ([0, 1], None)])
def test_a_resume_whose_metrics_lack_epochs_says_which(two_epoch_run, tiny_shards, tmp_path, capsys, monkeypatch,
                                                       lines_kept, said):
    import shutil

    run = tmp_path / "vit_tiny"
    shutil.copytree(two_epoch_run, run)
    metrics = run / "metrics.jsonl"
    if lines_kept is None:
        metrics.unlink()  # deleted by hand
    else:
        rows = metrics.read_text().splitlines()
        assert len(rows) == 2
        metrics.write_text("".join(rows[i] + "\n" for i in lines_kept))
    capsys.readouterr()
    stop_before_the_first_epoch(monkeypatch)  # (the notes come before it)
    with pytest.raises(Stopped):
        train(cfg_for(tiny_shards, tmp_path, **{**TWO_EPOCHS, "epochs": 3}, resume=str(run / "last.pth")))
    out = capsys.readouterr().out
    note = (f"note: --resume: {metrics} has no line for epoch(s) {said}: the run goes on, and its curves and viz.py's "
            f"report lack them")
    assert f"resumed from {run / 'last.pth'} after epoch 1" in out  # (said after the notes)
    assert note in out.splitlines() if said else "has no line for epoch" not in out


def test_the_lr_note_of_a_resume_compares_each_schedule_setting_with_the_saved_runs():
    from types import SimpleNamespace

    from vitdeit.trainer import lr_jump

    base = dict(lr=1e-3, min_lr=1e-5, epochs=4, warmup_epochs=0.0, batch_size=16)
    cosine = lambda t: 1e-5 + (1e-3 * 16 / 512 - 1e-5) * (1 + math.cos(math.pi * t / 40)) / 2  # noqa: E731
    was = cosine(19)  # the saved run's last step (10 steps an epoch, a 40-step cosine): what its metrics.jsonl logs
    resumed = {"epoch": 1, "config": Config(**base).to_dict(), "metrics": {"lr": was}}
    note = lambda **kw: lr_jump(Config(**{**base, **kw}), SimpleNamespace(world=1), 10, resumed)  # noqa: E731
    halfway = lambda lr, floor: floor + (lr * 16 / 512 - floor) / 2  # noqa: E731  (step 20 of a 40-step cosine)
    assert note() is None and note(warmup_epochs=0.0, batch_size=16) is None  # the saved schedule, as it was
    said = (f"note: --resume: the lr goes from {was:.3g} (the last step of epoch 1) to {halfway(2e-3, 1e-5):.3g} at "
            f"the next step: the schedule (warm-up, then a cosine to --min-lr) is this run's, 4 epochs of 10 steps at "
            f"a peak lr of 6.25e-05, taken up at step 20")
    assert note(lr=2e-3) == said
    # a run whose last step trained at another lr than this schedule gives it (an earlier vitdeit's schedule): said,
    # with its settings unchanged too
    resumed["metrics"]["lr"] = 0.25
    assert note() == (f"note: --resume: the lr goes from 0.25 (the last step of epoch 1) to {halfway(1e-3, 1e-5):.3g} "
                      f"at the next step: the schedule (warm-up, then a cosine to --min-lr) is this run's, 4 epochs of "
                      f"10 steps at a peak lr of 3.13e-05, taken up at step 20; the saved run's last step trained at "
                      f"0.25, not the {was:.3g} its own settings give it under this vitdeit's schedule: it trained "
                      f"under an earlier vitdeit's (before 2026-12-02, whose cosine ran during the warm-up)")
    resumed["metrics"]["lr"] = was
    # a run of this vitdeit resumed with another --batch-size (5 steps an epoch now): its last step's lr is taken at
    # its own 10 steps (160 images of 16), not as if by an earlier schedule
    resumed["metrics"]["train_samples"] = 160
    other = lr_jump(Config(**{**base, "batch_size": 32}), SimpleNamespace(world=1), 5, resumed)
    assert other.startswith(f"note: --resume: the lr goes from {was:.3g}") and "earlier vitdeit" not in other
    assert f"to {halfway(1e-3, 1e-4):.3g} at the next step" in note(min_lr=1e-4)  # each setting of the schedule
    assert f"to {halfway(1.05e-3, 1e-5):.3g} at the next step" in note(lr=1.05e-3)  # a 5 % change is still said


def test_no_lr_note_where_the_process_count_changed_its_steps_are_other_steps():
    from types import SimpleNamespace

    from vitdeit.trainer import lr_jump

    base = dict(lr=1e-3, min_lr=1e-5, epochs=4, warmup_epochs=0.0, batch_size=16)
    cosine = lambda t: 1e-5 + (1e-3 * 16 / 512 - 1e-5) * (1 + math.cos(math.pi * t / 40)) / 2  # noqa: E731
    # saved by 4 processes (a train-loader state each), 10 steps an epoch of 640 images; resumed with --lr 2e-3
    resumed = {"epoch": 1, "config": Config(**base).to_dict(), "loader_states": [None] * 4,
               "metrics": {"lr": cosine(19), "train_samples": 640}}
    assert lr_jump(Config(**{**base, "lr": 2e-3}), SimpleNamespace(world=1), 10, resumed) is None  # (resume_notes
    # says the process count changed)
    assert lr_jump(Config(**{**base, "lr": 2e-3}), SimpleNamespace(world=4), 10, resumed) is not None  # the same 4


def test_a_resume_with_more_epochs_says_where_its_lr_goes(two_epoch_run, tiny_shards, tmp_path, capsys, monkeypatch):
    """The schedule is the resuming run's (DeiT's and timm's way): 2 epochs ended at --min-lr; with --epochs 4 the
    cosine is stretched, and its next step trains at the middle of it, which the note says with both figures; a
    resume that keeps its schedule says nothing of it."""
    import shutil

    run = tmp_path / "vit_tiny"
    shutil.copytree(two_epoch_run, run)
    saved = torch.load(run / "last.pth", weights_only=True)
    steps = saved["metrics"]["train_samples"] // TWO_EPOCHS["batch_size"]  # whole batches of one process
    was, peak, floor = saved["metrics"]["lr"], Config.lr * TWO_EPOCHS["batch_size"] / 512, Config.min_lr
    warm = int(FAST["warmup_epochs"] * steps)
    cosine = lambda t, total: floor + (peak - floor) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2  # noqa
    assert was == pytest.approx(cosine(2 * steps - 1, 2 * steps))  # the 2-epoch cosine's last step, near its floor
    t = 2 * steps
    now = cosine(t, 4 * steps)
    capsys.readouterr()
    stopped = []

    def stop_after_this_epoch(epoch, record):
        stopped.append(record["lr"])
        raise Stopped

    with pytest.raises(Stopped):
        train(cfg_for(tiny_shards, tmp_path, **{**TWO_EPOCHS, "epochs": 4}, resume=str(run / "last.pth")),
              on_epoch_end=stop_after_this_epoch)
    assert (f"note: --resume: the lr goes from {was:.3g} (the last step of epoch 1) to {now:.3g} at the next step: "
            f"the schedule (warm-up, then a cosine to --min-lr) is this run's, 4 epochs of {steps} steps at a peak lr "
            f"of {peak:.3g}, taken up at step {t}\n") in capsys.readouterr().out
    assert stopped[0] < now  # (epoch 2 trained on down the new cosine)
    stop_before_the_first_epoch(monkeypatch)
    with pytest.raises(Stopped):  # epoch 2's last.pth, resumed with its own 4 epochs: no jump
        train(cfg_for(tiny_shards, tmp_path, **{**TWO_EPOCHS, "epochs": 4}, resume=str(run / "last.pth")))
    out = capsys.readouterr().out
    assert "resumed from" in out and "the lr goes from" not in out
    # nor one stopped at the end of its warm-up, whose next step's lr is 1.5x its last (3 steps an epoch, 3 of warm-up)
    monkeypatch.undo()
    kw = {**TWO_EPOCHS, "batch_size": 32, "warmup_epochs": 1.0, "epochs": 3}
    with pytest.raises(Stopped):
        train(cfg_for(tiny_shards, tmp_path / "w", **kw), on_epoch_end=stop_after_this_epoch)
    assert stopped[-1] == pytest.approx(Config.lr * 32 / 512 * (1e-3 + (1 - 1e-3) * 2 / 3))  # warm-up step 2 of 3
    stop_before_the_first_epoch(monkeypatch)
    with pytest.raises(Stopped):
        train(cfg_for(tiny_shards, tmp_path / "w", **kw, resume=str(tmp_path / "w" / "vit_tiny" / "last.pth")))
    out = capsys.readouterr().out
    assert "resumed from" in out and "the lr goes from" not in out


def test_a_resume_on_shards_packed_again_since_says_so(tiny_data, tmp_path, capsys, monkeypatch):
    from vitdeit.classes import pack_fingerprint

    shards = tmp_path / "s"
    pack(tiny_data, shards, opts=PackOptions(shard_size=30, workers=1), progress=False)
    first = pack_fingerprint(load_manifest(shards))
    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0)
    train(cfg_for(shards, tmp_path, epochs=1, **kw))
    last = tmp_path / "vit_tiny" / "last.pth"
    saved = torch.load(last, weights_only=True)
    assert saved["pack"] == first and saved["data_dir"] == str(shards.resolve())
    pack(tiny_data, shards, opts=PackOptions(shard_size=30, workers=1), progress=False)  # the same pack again
    assert pack_fingerprint(load_manifest(shards)) == first
    capsys.readouterr()
    train(cfg_for(shards, tmp_path, epochs=2, resume=str(last), **kw))
    assert "was packed again" not in capsys.readouterr().out
    pack(tiny_data, shards, opts=PackOptions(shard_size=30, workers=1, seed=1), progress=False)  # another shuffle:
    assert pack_fingerprint(load_manifest(shards)) != first  # the same file names, counts and sizes
    train(cfg_for(shards, tmp_path, epochs=3, resume=str(last), **kw))
    assert (f"note: --resume: {shards} was packed again since {last} was saved (other options, seed or images): "
            f"training goes on, not as the uninterrupted run would have (another sample order)"
            ) in capsys.readouterr().out.splitlines()
    # other shards: named as such, not as a repack of the new ones; --eval-only says its saved score is of those
    other = tmp_path / "other"
    pack(tiny_data, other, opts=PackOptions(shard_size=30, workers=1, seed=2), progress=False)
    train(cfg_for(other, tmp_path, epochs=4, resume=str(last), **kw))
    assert (f"note: --resume: {last} was trained and scored on {shards}, other shards than {other}: training goes on, "
            f"not as the uninterrupted run would have (other shards), and best.pth is picked by val scores of both "
            f"shards' val splits") in capsys.readouterr().out.splitlines()
    evaluate_checkpoint(cfg_for(shards, tmp_path, resume=str(last), eval_only=True, **kw))  # (last.pth: other's)
    assert f"; {last} was trained and scored on {other}, other shards than {shards})" in capsys.readouterr().out
    evaluate_checkpoint(cfg_for(other, tmp_path, resume=str(last), eval_only=True, **kw))  # the shards it last read
    assert "other shards than" not in capsys.readouterr().out
    # a run given its shards as a relative path, those shards packed again, then read from another folder: judged by
    # the folder saved (data_dir), not by the typed path resolved from today's folder
    monkeypatch.chdir(tmp_path)
    train(cfg_for("other", tmp_path, epochs=5, resume=str(last), **kw))
    pack(tiny_data, other, opts=PackOptions(shard_size=30, workers=1, seed=3), progress=False)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    capsys.readouterr()
    evaluate_checkpoint(cfg_for("../other", tmp_path, resume=str(last), eval_only=True, **kw))
    out = capsys.readouterr().out
    assert f"; ../other was packed again since {last} was saved" in out and "other shards than" not in out
    old = torch.load(last, weights_only=True)
    del old["data_dir"]  # a checkpoint saved before the folder was: neither cause is claimed
    torch.save(old, tmp_path / "old.pth")
    evaluate_checkpoint(cfg_for(shards, tmp_path, resume=str(tmp_path / "old.pth"), eval_only=True, **kw))
    assert (f"; the shards at {shards} are not those {tmp_path / 'old.pth'} was saved with (packed again, or other "
            f"shards))") in capsys.readouterr().out
    del old["pack"]  # saved before packs were fingerprinted: the path its run named, as typed, is all it has
    old["config"]["data_path"] = str(other)
    torch.save(old, tmp_path / "older.pth")
    evaluate_checkpoint(cfg_for(shards, tmp_path, resume=str(tmp_path / "older.pth"), eval_only=True, **kw))
    assert (f"; {tmp_path / 'older.pth'} names {other} as its shards (it was saved before vitdeit kept the pack's "
            f"fingerprint), not {shards})") in capsys.readouterr().out
    old["config"]["data_path"] = str(shards)
    torch.save(old, tmp_path / "older.pth")
    evaluate_checkpoint(cfg_for(shards, tmp_path, resume=str(tmp_path / "older.pth"), eval_only=True, **kw))
    assert "names" not in capsys.readouterr().out  # its own shards: nothing to say


def test_a_bare_resume_goes_on_in_its_runs_folder_with_its_saved_recipe(tiny_shards, tmp_path, monkeypatch, capsys):
    import train as train_py
    from vitdeit.metrics import read_metrics

    (tmp_path / "data").symlink_to(tiny_shards)
    monkeypatch.chdir(tmp_path)  # the first run's paths typed relative to here
    first = ["--data-path", "data", "--output-dir", "out", "--run-name", "r", "--img-size", "32", "--patch-size", "8",
             "--batch-size", "16", "--lr", "0.003", "--mixup", "0.2", "--epochs", "1", "--workers", "0", "--progress",
             "false", "--device", "cpu"]
    assert train_py.main(first) == 0
    capsys.readouterr()
    last = tmp_path / "out" / "r" / "last.pth"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where "data" is no folder, and a default runs/vit_tiny would go
    assert train_py.main(["--resume", str(last), "--epochs", "2", "--workers", "0", "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {tmp_path / 'out' / 'r'}: vit_tiny on {tiny_shards.resolve()} ")  # (--device: here)
    assert "settings differ from" in out and "'s: --epochs 1 -> 2; the run goes on" in out  # the one change given
    assert [r["epoch"] for r in read_metrics(tmp_path / "out" / "r")] == [0, 1]
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert train_py.main(["--resume", "out/r/lats.pth", "--workers", "0"]) == 1  # named itself, not its shards
    assert "error: --resume out/r/lats.pth: file not found; pass the right path" in capsys.readouterr().err
    cut = tmp_path / "out" / "r" / "cut.pth"  # a copy cut short, or a file that is no checkpoint: named as such, not by
    cut.write_bytes(last.read_bytes()[:5000])  # the default --data-path its unread settings left in place
    config_json = str(tmp_path / "out" / "r" / "config.json")
    for args, said in [(["--resume", str(cut)], f"--resume {cut}: cannot be read by torch.load"),
                       (["--resume", str(cut), "--eval-only"], f"--eval-only checkpoint {cut}: cannot be read by"),
                       (["--resume", config_json], f"--resume {config_json}: not a file torch.save wrote")]:
        assert train_py.main([*args, "--workers", "0"]) == 1
        assert capsys.readouterr().err.startswith(f"error: {said}")
    saved = torch.load(last, weights_only=True)["config"]
    assert (saved["lr"], saved["mixup"], saved["batch_size"], saved["epochs"]) == (0.003, 0.2, 16, 2)


def test_a_bare_resumes_teacher_is_the_one_typed_where_its_run_began_and_one_gone_is_named_as_the_checkpoints(
        tiny_shards, tmp_path, monkeypatch, capsys):
    import train as train_py

    run = tmp_path / "runs" / "deit_tiny_distill"
    run.mkdir(parents=True)
    saved = Config(data_path=str(tiny_shards), model="deit_tiny_distill", teacher_ckpt="runs/resnet18/best.pth",
                   img_size=32, patch_size=8).to_dict()  # typed from tmp_path, as the README's commands are
    torch.save({"config": saved, "data_dir": str(tiny_shards)}, run / "last.pth")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train_py.main(["--resume", str(run / "last.pth"), "--workers", "0"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"error: --teacher-ckpt runs/resnet18/best.pth: file not found; train one with train.py (it writes "
        f"OUTPUT_DIR/RUN_NAME/best.pth and last.pth) or pass the right path. (the path --resume {run / 'last.pth'} "
        f"was saved with, seen from {tmp_path / 'elsewhere'}: give --teacher-ckpt with the teacher's path here)")
    (tmp_path / "runs" / "resnet18").mkdir()
    (tmp_path / "runs" / "resnet18" / "best.pth").write_bytes(b"")  # found where it was typed: the run goes on to
    assert train_py.main(["--resume", str(run / "last.pth"), "--workers", "0"]) == 1  # read --resume (a stub here)
    err = capsys.readouterr().err
    assert "--teacher-ckpt" not in err and "last.pth: not a vitdeit checkpoint (missing" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_a_run_folder_no_file_can_be_made_in_is_refused_before_the_set_up_naming_the_flag(tiny_shards, tmp_path):
    from vitdeit.errors import cannot_write_in

    with pytest.raises(SettingError) as e:
        train(cfg_for(tiny_shards, "/proc/runs"))  # (root too: it is tried, not asked)
    assert str(e.value) == ("--output-dir /proc/runs: the run folder /proc/runs/vit_tiny cannot be written (No such "
                            "file or directory in /proc); pass another --output-dir")
    (tmp_path / "a").mkdir()
    assert cannot_write_in(tmp_path / "a" / "b" / "c") is None and list(tmp_path.rglob("*")) == [tmp_path / "a"]


def test_a_run_folder_that_cannot_be_written_is_no_matter_to_a_resume_with_nothing_left_to_do(tiny_shards, tmp_path,
                                                                                                 monkeypatch, capsys):
    import train as train_py

    assert train_py.main(["--data-path", str(tiny_shards), "--output-dir", str(tmp_path), "--img-size", "32",
                          "--patch-size", "8", "--batch-size", "16", "--epochs", "1", "--workers", "0", "--progress",
                          "false", "--device", "cpu"]) == 0
    monkeypatch.setattr(runs, "cannot_write_in", lambda folder: "Read-only file system in /archive")
    last = tmp_path / "vit_tiny" / "last.pth"
    capsys.readouterr()
    assert train_py.main(["--resume", str(last), "--workers", "0"]) == 0  # (a finished run, kept read-only)
    assert "has trained 1 epoch(s), --epochs 1: nothing to do" in capsys.readouterr().out
    assert train_py.main(["--resume", str(last), "--workers", "0", "--epochs", "2"]) == 1
    assert capsys.readouterr().err == (f"error: --output-dir {tmp_path}: the run folder {tmp_path / 'vit_tiny'} (the "
                                       f"run folder of --resume {last}, where it goes on) cannot be written "
                                       f"(Read-only file system in /archive); pass another --output-dir\n")


def test_a_resumed_runs_file_that_cannot_be_read_is_named_as_read_not_written(tiny_shards, tmp_path, monkeypatch):
    import shutil

    train(cfg_for(tiny_shards, tmp_path, epochs=1, workers=0, run_name="a"))
    src = tmp_path / "a" / "metrics.jsonl"

    def unreadable(a, b):
        raise PermissionError(13, "Permission denied", str(a))

    monkeypatch.setattr(shutil, "copyfile", unreadable)
    with pytest.raises(DataError) as e:  # resumed into another run folder: its metrics.jsonl is copied there
        train(cfg_for(tiny_shards, tmp_path, epochs=2, workers=0, run_name="b",
                      resume=str(tmp_path / "a" / "last.pth")))
    assert str(e.value) == (f"could not read {src}, of the run --resume {tmp_path / 'a' / 'last.pth'} goes on from: "
                            f"[Errno 13] Permission denied: '{src}'; make it readable by this user")


def test_a_run_folder_write_that_fails_after_the_checks_is_one_line_naming_the_file(tiny_shards, tmp_path):
    from vitdeit.errors import WriteFailed

    (tmp_path / "vit_tiny" / "config.json").mkdir(parents=True)  # where the run writes its config: a folder
    with pytest.raises(WriteFailed) as e:
        train(cfg_for(tiny_shards, tmp_path, workers=0))
    assert str(e.value).startswith(f"could not write {tmp_path / 'vit_tiny' / 'config.json'}: [Errno 21] Is a "
                                   f"directory") and str(e.value).endswith(
        "; the run stopped before its first epoch. Pass another --output-dir")


def test_a_resume_that_changes_settings_writes_them_into_its_first_epochs_metrics_line(tiny_shards, tmp_path):
    from vitdeit.metrics import read_metrics

    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0, run_name="r",
              device="cpu")  # (cpu: the machine recorded)
    train(cfg_for(tiny_shards, tmp_path, epochs=1, lr=0.005, **kw))
    last = str(tmp_path / "r" / "last.pth")
    train(cfg_for(tiny_shards, tmp_path, epochs=3, lr=0.002, resume=last, **kw))  # two epochs: the first says it
    train(cfg_for(tiny_shards, tmp_path, epochs=4, lr=0.002, resume=last, progress=True, **kw))  # (how it runs)
    rows = read_metrics(tmp_path / "r")
    assert [r.get("resumed_with") for r in rows] == [None, ["--epochs 1 -> 3", "--lr 0.005 -> 0.002"], None,
                                                     ["--epochs 3 -> 4"]]
    # the machine each start's img/s were measured on, on its first epoch (a resume without changes: the
    # interruption test)
    assert [r.get("machine") for r in rows] == [describe("cpu", 1), describe("cpu", 1), None, describe("cpu", 1)]
    assert torch.load(last, weights_only=True)["metrics"]["resumed_with"] == ["--epochs 3 -> 4"]


def test_a_resumes_shards_that_are_gone_are_named_as_the_ones_it_was_trained_on(tmp_path, monkeypatch):
    from vitdeit.config import parse_args
    from vitdeit.trainer import run_manifest

    monkeypatch.chdir(tmp_path)
    torch.save({"config": Config(data_path="/moved/shards").to_dict(), "data_dir": "/moved/shards"}, "last.pth")
    with pytest.raises(SettingError) as e:
        run_manifest(parse_args(["--resume", "last.pth"]))
    assert str(e.value) == (f"--data-path not given, and the one --resume last.pth was trained on, /moved/shards, "
                            f"holds no manifest.json seen from {tmp_path} (moved, or another machine's path): pass "
                            f"--data-path with these shards' folder here")


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_a_resume_on_another_loader_writes_it_into_its_first_epochs_metrics_line(tiny_shards, tmp_path):
    from vitdeit.metrics import read_metrics

    kw = dict(model="vit_tiny", img_size=16, batch_size=16, workers=0, run_name="r")
    train(cfg_for(tiny_shards, tmp_path, epochs=1, loader="torch", **kw))
    train(cfg_for(tiny_shards, tmp_path, epochs=2, loader="dali", resume=str(tmp_path / "r" / "last.pth"), **kw))
    assert read_metrics(tmp_path / "r")[1]["resumed_with"] == ["--epochs 1 -> 2", "--loader 'torch' -> 'dali'"]


def test_a_resumes_notes_come_after_the_others_and_an_older_checkpoint_gets_none_it_cannot_back(tiny_shards):
    from vitdeit.classes import load_manifest
    from vitdeit.distributed import Dist
    from vitdeit.trainer import run_notes

    cfg = cfg_for(tiny_shards, "runs", resume="runs/r/last.pth", amp="fp16")
    resumed = {"config": cfg.to_dict(), "epoch": 0, "loader": "dali", "loader_states": [None, None]}
    notes = run_notes(cfg, load_manifest(tiny_shards), Dist(), StepsOnly(6), resumed, 1e-3)
    resume = [i for i, n in enumerate(notes) if n.startswith("note: --resume:")]
    assert len(resume) >= 2 and resume == list(range(len(notes) - len(resume), len(notes))) and resume[0] > 0
    # saved before checkpoints kept the loader and its states: no note on a loader or process count it did not save
    notes = run_notes(cfg, load_manifest(tiny_shards), Dist(), StepsOnly(6), {"config": cfg.to_dict(), "epoch": 0},
                      1e-3)
    assert not [n for n in notes if "loader" in n or "process(es)" in n], notes


def test_a_resume_on_shards_it_cannot_tell_says_what_that_may_change(tiny_shards):
    from vitdeit.classes import load_manifest
    from vitdeit.trainer import other_shards_note

    m = load_manifest(tiny_shards)
    assert other_shards_note({"pack": "0" * 16, "config": {}}, "old.pth", str(tiny_shards), m)[1] == "(another pack)"
    assert other_shards_note({"config": {"data_path": "/elsewhere"}}, "older.pth", str(tiny_shards), m)[1] == (
        "(if those are other shards)")


def test_a_damaged_metrics_line_is_dropped_only_after_the_resumed_epochs_line(tmp_path):
    from vitdeit.metrics import read_metrics

    rows = [json.dumps({"epoch": e}) for e in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join([rows[0], '{"epoch": 1, "val', rows[2]]) + "\n")
    with pytest.raises(DataError, match="line 2"):  # before the resumed epoch's: history, not to be dropped
        read_metrics(tmp_path, resumed_after=2)
    (tmp_path / "metrics.jsonl").write_text("\n".join([*rows, '{"epoch": 3, "val']) + "\n")
    assert [r["epoch"] for r in read_metrics(tmp_path, resumed_after=2)] == [0, 1, 2]  # a partial write after it


def test_a_resume_typed_relative_to_the_working_folder_goes_on_in_its_own_run_folder(tmp_path, monkeypatch):
    # `--resume runs/NAME/last.pth` with the default --output-dir runs: the run folder's own checkpoint, however
    # either path is typed (else check_run_dir would call the folder another run's, and --overwrite would delete it)
    from pathlib import Path

    from vitdeit.runs import resumes_in

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "vit_tiny").mkdir(parents=True)
    relative = Config(resume="runs/vit_tiny/last.pth")
    absolute = Config(resume=str(tmp_path / "runs" / "vit_tiny" / "last.pth"))
    assert resumes_in(Path("runs") / "vit_tiny", relative)
    assert resumes_in(tmp_path / "runs" / "vit_tiny", relative)
    assert resumes_in(Path("runs") / "vit_tiny", absolute)
    assert resumes_in(Path("./runs/../runs/vit_tiny"), relative)
    assert not resumes_in(Path("runs") / "other", relative)
    assert not resumes_in(Path("runs") / "vit_tiny", Config())  # a new run
