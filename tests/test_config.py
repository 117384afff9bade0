import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from vitdeit.config import Config, flag, from_dict, parse_args
from vitdeit.errors import SettingError


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.01, "epochs": 3, "model": "resnet18"}))
    cfg = parse_args(["--config", str(f), "--epochs", "7", "--model-ema"])
    assert (cfg.lr, cfg.epochs, cfg.model, cfg.model_ema, cfg.batch_size) == (
        0.01, 7, "resnet18", True, Config().batch_size)


def test_the_settings_given_are_those_typed_or_for_a_config_made_in_code_those_off_their_defaults(tmp_path):
    import dataclasses

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": Config.lr, "seed": 3}))
    typed = parse_args(["--config", str(f), "--epochs", str(Config.epochs)])  # (at their defaults, but typed)
    assert (typed.given, typed.inherited) == ({"lr", "seed", "epochs"}, set())
    made = Config(epochs=Config.epochs, seed=3, img_size=64)
    assert (made.given, made.inherited) == ({"seed", "img_size", "data_path"}, set())  # (its caller names the shards)
    assert dataclasses.replace(made, seed=0).given == {"img_size", "data_path"}


def test_resume_auto_continues_run_dir_last_pth_where_there_is_one_and_else_starts_a_new_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--resume", "auto", "--lr", "0.002"])  # runs/vit_tiny/: the default --output-dir and name
    assert (cfg.resume, cfg.auto_resume, cfg.inherited, cfg.lr) == ("", True, set(), 0.002)
    saved = Config(model="deit_tiny_distill", lr=0.01, epochs=8, output_dir="out", run_name="d").to_dict()
    last = tmp_path / "out" / "d" / "last.pth"
    last.parent.mkdir(parents=True)
    torch.save({"config": saved}, last)
    (tmp_path / "c.json").write_text(json.dumps({"output_dir": "out", "run_name": "d"}))
    for typed in (["--output-dir", "out", "--run-name", "d"], ["--config", "c.json"]):
        cfg = parse_args([*typed, "--resume", "auto", "--epochs", "9"])  # its saved settings, but those given
        assert (cfg.resume, cfg.auto_resume, cfg.model, cfg.lr, cfg.epochs) == (
            str(Path("out") / "d" / "last.pth"), True, "deit_tiny_distill", 0.01, 9)
    (tmp_path / "out" / "resnet18").mkdir()
    torch.save({"config": {**saved, "run_name": "", "model": "resnet18"}}, tmp_path / "out" / "resnet18" / "last.pth")
    assert parse_args(["--output-dir", "out", "--model", "resnet18", "--resume", "auto"]).resume == str(
        Path("out") / "resnet18" / "last.pth")  # (the run name defaults to the model's)
    assert parse_args(["--output-dir", "out", "--run-name", "e", "--resume", "auto"]).resume == ""
    assert not parse_args(["--resume", str(last)]).auto_resume


@pytest.mark.parametrize("flags, said", [
    (["--eval-only"], "--resume auto with --eval-only: --resume auto continues the training of the run in RUN; "
                      "--eval-only without --resume scores its best.pth: drop --resume auto"),
    (["--overwrite"], "--resume auto with --overwrite: one continues the run in RUN, the other replaces it; drop one"),
])
def test_resume_auto_with_eval_only_or_overwrite_is_refused_naming_the_run_folder(flags, said, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--run-name", "r", "--resume", "auto", *flags])
    assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: {said.replace('RUN', 'runs/r')}\n")
    with pytest.raises(SettingError, match="resume='auto': parse_args"):  # a Config made in code names its file
        Config(resume="auto")


def test_every_setting_the_field_groups_name_is_a_config_field():
    from dataclasses import fields

    from vitdeit import config
    from vitdeit.report import NOT_THE_RECIPE

    names = {f.name for f in fields(config.Config)}
    groups = ("INVOCATION_FIELDS", "HOW_IT_RUNS", "DISTILL_ONLY", "NODE_OWN")
    assert {g: sorted(set(getattr(config, g)) - names) for g in groups} == {g: [] for g in groups}
    assert set(NOT_THE_RECIPE) <= names  # (a field renamed would leave its old name in a group, matching nothing)


def test_a_resume_goes_on_with_its_checkpoints_settings_where_no_flag_or_config_file_says_otherwise(tmp_path,
                                                                                                      capsys,
                                                                                                      monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir()
    saved = Config(data_path=str(shards), output_dir=str(tmp_path / "runs"), run_name="int8d",
                   model="deit_tiny_distill", lr=0.01, mixup=0.8, epochs=8, workers=3, device="cpu", loader="torch",
                   compile="off", teacher_ckpt="t/best.pth").to_dict()
    ckpt = tmp_path / "runs" / "int8d" / "last.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save({"config": saved, "data_dir": str(shards)}, ckpt)
    cfg = parse_args(["--resume", str(ckpt), "--epochs", "11"])
    assert cfg.run_dir == ckpt.parent and cfg.epochs == 11 and cfg.given == {"resume", "epochs"}
    recipe = ("data_path", "model", "lr", "mixup", "teacher_ckpt", "batch_size", "seed")
    assert {k: getattr(cfg, k) for k in recipe} == {k: saved[k] for k in recipe}
    # how this machine runs it is this machine's: its cores, devices and packages may differ
    assert (cfg.workers, cfg.device, cfg.loader, cfg.compile) == (-1, "auto", "auto", "auto")
    (tmp_path / "cfg.json").write_text(json.dumps({"lr": 0.002}))
    cfg = parse_args(["--config", str(tmp_path / "cfg.json"), "--resume", str(ckpt), "--run-name", "branch"])
    assert (cfg.lr, cfg.run_dir, cfg.mixup) == (0.002, tmp_path / "runs" / "branch", 0.8)  # file, flag, checkpoint
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the run folder and shards typed relative to tmp_path:
    torch.save({"config": {**saved, "data_path": "shards", "output_dir": "runs"}, "data_dir": str(shards)}, ckpt)
    cfg = parse_args(["--resume", str(ckpt)])  # the folders they were then
    assert (cfg.data_path, cfg.run_dir, cfg.inherited >= {"data_path", "lr"}) == (str(shards), ckpt.parent, True)
    assert cfg.teacher_ckpt == "t/best.pth"  # (no such file where it was typed: as typed, named when the run reads it)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "best.pth").write_bytes(b"")
    assert parse_args(["--resume", str(ckpt)]).teacher_ckpt == str(tmp_path / "t" / "best.pth")  # typed from there
    (shards / "manifest.json").write_text("{}")  # shards there: typed relative, seen from where the run started,
    monkeypatch.chdir(tmp_path)  # the path stays as typed (config.json keeps it so); from elsewhere, their folder
    torch.save({"config": {**saved, "data_path": "shards", "output_dir": "runs"}, "data_dir": str(shards)}, ckpt)
    assert parse_args(["--resume", str(ckpt)]).data_path == "shards"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert parse_args(["--resume", str(ckpt)]).data_path == str(shards)
    (tmp_path / "elsewhere" / "shards").mkdir()  # "shards" names another folder from here: not taken for them
    assert parse_args(["--resume", str(ckpt)]).data_path == str(shards)
    (tmp_path / "elsewhere" / "shards").rmdir()
    moved = tmp_path / "b" / "runs" / "int8d" / "last.pth"  # the run folder moved beside other shards: its own kept
    moved.parent.mkdir(parents=True), (tmp_path / "b" / "shards").mkdir(), shutil.copyfile(ckpt, moved)
    (tmp_path / "b" / "shards" / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert parse_args(["--resume", str(moved)]).data_path == "shards"  # tmp_path/shards, not b/shards
    monkeypatch.chdir(tmp_path / "elsewhere")
    (shards / "manifest.json").unlink()
    torch.save({"config": {**saved, "data_path": "shards", "output_dir": "runs"}}, ckpt)  # (saved before data_dir)
    assert parse_args(["--resume", str(ckpt)]).data_path == str(shards)
    for output_dir in ("./runs", "."):  # the run folder typed otherwise from tmp_path
        (tmp_path / output_dir / "int8d").mkdir(exist_ok=True)
        torch.save({"config": {**saved, "output_dir": output_dir}}, tmp_path / output_dir / "int8d" / "last.pth")
        assert parse_args(["--resume", str(tmp_path / output_dir / "int8d" / "last.pth")]).teacher_ckpt == str(
            tmp_path / "t" / "best.pth")
    torch.save({"config": {**saved, "output_dir": "../x/runs"}}, ckpt)  # (where it was typed from cannot be told)
    assert parse_args(["--resume", str(ckpt)]).teacher_ckpt == "t/best.pth"
    (tmp_path / "proj" / "t").mkdir(parents=True)  # proj/runs, a link to the runs above: typed from proj
    (tmp_path / "proj" / "t" / "best.pth").write_bytes(b"")  # (and tmp_path/t/best.pth, the links' target's, too)
    (tmp_path / "proj" / "runs").symlink_to(tmp_path / "runs")
    torch.save({"config": {**saved, "output_dir": "runs"}}, ckpt)
    assert parse_args(["--resume", str(tmp_path / "proj" / "runs" / "int8d" / "last.pth")]).teacher_ckpt == str(
        tmp_path / "proj" / "t" / "best.pth")
    torch.save({"config": {**saved, "output_dir": "runs"}, "data_dir": str(shards)}, ckpt)
    (tmp_path / "backup").mkdir()  # a copy outside its run folder: the run's folder, as typed
    torch.save({"config": {**saved, "output_dir": "runs"}, "data_dir": str(shards)}, tmp_path / "backup" / "l.pth")
    assert parse_args(["--resume", str(tmp_path / "backup" / "l.pth")]).run_dir == Path("runs") / "int8d"
    torch.save({"config": {**saved, "distillation_alpha": 0.0}}, ckpt)  # (refused since it was saved)
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(ckpt)])
    assert (f"the value is the one --resume {ckpt} was saved with: give the flag to override it)"
            in capsys.readouterr().err)
    assert parse_args(["--resume", str(ckpt), "--distillation-alpha", "0.5"]).lr == 0.01
    torch.save({"config": {**saved, "lr": "x"}}, ckpt)  # a saved value of the wrong type: the checkpoint's, too
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(ckpt)])
    assert capsys.readouterr().err.endswith(f"error: lr='x' should be of type float (the value is the one --resume "
                                            f"{ckpt} was saved with: give the flag to override it)\n")
    for unreadable in (tmp_path / "missing.pth", ckpt.parent):  # said with its fix as the run reads it
        assert parse_args(["--resume", str(unreadable)]) == Config(resume=str(unreadable))


def test_a_resumes_saved_settings_leave_out_what_one_command_does_and_fields_no_longer_known(tmp_path, capsys):
    import torch

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # (what makes a folder shards here: not read)
    ckpt = tmp_path / "runs" / "r" / "last.pth"
    ckpt.parent.mkdir(parents=True)
    saved = {**Config(data_path=str(shards), output_dir=str(tmp_path / "runs"), run_name="r", lr=0.01).to_dict(),
             "eval_only": True, "overwrite": True, "resume": "runs/x/last.pth",  # (an earlier vitdeit saved them)
             "backend": "dali"}  # a setting this vitdeit no longer has
    torch.save({"config": saved, "data_dir": str(shards)}, ckpt)
    cfg = parse_args(["--resume", str(ckpt)])
    assert (cfg.eval_only, cfg.overwrite, cfg.resume, cfg.lr) == (False, False, str(ckpt), 0.01)
    with pytest.raises(SystemExit):  # a bad flag given with it is the flag's, not the checkpoint's
        parse_args(["--resume", str(ckpt), "--epochs", "0"])
    err = capsys.readouterr().err
    assert "--epochs 0: must be >= 1" in err and "was saved with" not in err
    other = tmp_path / "copy"  # the shards' resolved folder wins over a path, as typed, that names another here
    other.mkdir()
    torch.save({"config": {**saved, "data_path": str(other)}, "data_dir": str(shards)}, ckpt)
    assert parse_args(["--resume", str(ckpt)]).data_path == str(shards)
    (shards / "manifest.json").unlink()  # no shards there now (moved, or being packed again): the path as typed
    assert parse_args(["--resume", str(ckpt)]).data_path == str(other)


def test_an_old_deit_trained_with_alpha_0_or_1_can_still_be_evaluated():
    for alpha in (0.0, 1.0):  # refused for training since 2026-12-06; --eval-only does not read it
        assert from_dict({"model": "deit_tiny_distill", "distillation_alpha": alpha, "eval_only": True}).eval_only


@pytest.mark.parametrize("values, read", [
    ({}, ""),  # a new run reads no checkpoint
    ({"resume": "elsewhere/last.pth"}, "elsewhere/last.pth"),
    ({"resume": "elsewhere/last.pth", "eval_only": True}, "elsewhere/last.pth"),  # --eval-only of the one named
    ({"eval_only": True}, "runs/vit_tiny/best.pth"),  # the model's run folder, under the default --output-dir
    ({"eval_only": True, "model": "resnet18", "output_dir": "/o"}, "/o/resnet18/best.pth"),
    ({"eval_only": True, "run_name": "a/b", "output_dir": "o"}, "o/a/b/best.pth"),  # a nested --run-name
])
def test_the_checkpoint_a_command_reads_is_resume_else_the_eval_only_runs_best(values, read):
    from vitdeit.config import settings_source

    assert Config(**values).checkpoint_read == read  # as the run reads it
    assert settings_source(values) == read  # as parse_args takes its settings, before a Config exists


def test_a_saved_config_round_trips():
    cfg = Config(model="deit_tiny_distill", img_size=32, patch_size=4, teacher_ckpt="x.pth")
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_resumed_runs_saved_config_trains_its_recipe_not_another_resume(tmp_path):
    resumed = Config(model="resnet18", epochs=9, resume="runs/resnet18/last.pth")
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(resumed.to_dict()))
    again = parse_args(["--config", str(saved)])
    assert (again.model, again.epochs, again.resume, again.eval_only) == ("resnet18", 9, "", False)
    assert parse_args(["--config", str(saved), "--eval-only"]).resume == ""  # -> RUN_DIR/best.pth, not last.pth


@pytest.mark.parametrize("values,fragment", [
    ({"learning_rate": 0.1}, "unknown key"),
    ({"epochs": "5"}, "should be of type int"),
    ({"model_ema": 1}, "should be of type bool"),
    ({"epochs": True}, "epochs=True should be of type int"),  # JSON's true is no number of epochs
    ({"mixup": True}, "mixup=True should be of type float"),
    ({"loader": "DALI"}, "--loader 'DALI': choose auto, dali or torch"),
    ({"device": "gpu"}, "--device 'gpu': choose auto, cuda or cpu"),
    ({"amp": "fp8"}, "--amp 'fp8': choose auto, bf16, fp16 or off"),
    ({"compile": "yes"}, "--compile 'yes': choose auto, on or off"),
    ({"teacher": "vit"}, "--teacher 'vit': only resnet18 is supported"),
    ({"distillation_type": "feature"}, "--distillation-type 'feature': choose soft, hard or none"),
    ({"model": "vit_huge"}, "--model 'vit_huge'"),
    ({"img_size": 32, "patch_size": 5}, "--patch-size 5 must divide --img-size 32"),
    ({"distillation_type": "medium"}, "--distillation-type 'medium': choose soft, hard or none"),
    ({"teacher_ckpt": "a", "teacher_weights": "imagenet1k"}, "not both"),
    ({"mixup": 0.8, "batch_size": 31}, "--batch-size 31: Mixup/CutMix pair images"),
    ({"cutmix": 1.0, "batch_size": 31}, "--batch-size 31: Mixup/CutMix pair images"),  # CutMix alone too
    ({"interpolation": "lanczos"}, "--interpolation 'lanczos': choose bilinear or bicubic"),
    ({"dali_hw_decoder_load": 1.5}, r"--dali-hw-decoder-load 1\.5: must be in \[0, 1\]"),
    ({"label_smoothing": 1.0}, r"--label-smoothing 1\.0: must be in \[0, 1\)"),
    ({"drop_path": 1.5}, r"--drop-path 1\.5: must be in \[0, 1\]"),
    ({"warmup_epochs": float("inf")}, r"--warmup-epochs inf: must be a finite number"),
    ({"lr": float("nan")}, r"--lr nan: must be a finite number"),
    ({"mixup": float("inf")}, r"--mixup inf: must be a finite number"),
    ({"random_erasing": 1.5}, r"--random-erasing 1\.5: must be in \[0, 1\]"),
    ({"mixup": -0.8}, r"--mixup -0\.8: must be >= 0"),
    ({"warmup_epochs": -1.0}, r"--warmup-epochs -1\.0: must be >= 0"),
    ({"distillation_alpha": 1.5}, r"--distillation-alpha 1\.5: must be in \[0, 1\]"),
    ({"model": "deit_tiny_distill", "distillation_alpha": 0.0},
     r"--distillation-alpha 0 with --distillation-type hard: the distillation head then learns nothing, yet the DeiT "
     r"predicts with the mean of its two heads; choose a value between 0 and 1 \(DeiT: 0\.5\), or "
     r"--distillation-type none"),
    ({"model": "deit_tiny_distill", "distillation_type": "soft", "distillation_alpha": 1.0},
     "--distillation-alpha 1 with --distillation-type soft: the class head then learns nothing"),
    ({"distillation_tau": 0.0}, r"--distillation-tau 0\.0: must be > 0"),
    ({"crop_pct": 1.2}, r"--crop-pct 1\.2: must be in \(0, 1\]"),
    ({"crop_scale_min": 0.0}, r"--crop-scale-min 0\.0: must be in \(0, 1\]"),
    ({"epochs": 0}, r"--epochs 0: must be >= 1"),
    ({"seed": -1}, r"--seed -1: must be in 0\.\.2147483647"),
    ({"seed": 2**31}, r"--seed 2147483648: must be in 0\.\.2147483647"),
    ({"batch_size": 0}, r"--batch-size 0: must be >= 1"),
    ({"lr": -0.1}, r"--lr -0\.1: must be > 0"),
    ({"workers": -2}, r"--workers -2: must be >= 0 \(0: load in the main process\), or -1 for this node's share"),
    ({"model": "resnet18", "batch_size": 1, "img_size": 32}, r"--model resnet18 --batch-size 1 --img-size 32: its last "
     r"BatchNorm"),
    ({"model_ema_decay": 1.0}, r"--model-ema-decay 1\.0: must be in \[0, 1\)"),
    ({"clip_grad": -1.0}, r"--clip-grad -1\.0: must be >= 0"),
    ({"cutmix": -1.0}, r"--cutmix -1\.0: must be >= 0"),
    ({"min_lr": -1e-6}, r"--min-lr -1e-06: must be >= 0"),
    ({"weight_decay": -0.05}, r"--weight-decay -0\.05: must be >= 0"),
    ({"img_size": 4, "patch_size": 2}, r"--img-size 4: must be >= 8"),
    ({"dali_hw_decoder_load": -0.1}, r"--dali-hw-decoder-load -0\.1: must be in \[0, 1\]"),
    ({"rand_augment": "bogus"}, "--rand-augment 'bogus': not a timm RandAugment spec"),
    ({"rand_augment": "rand-q9"}, "--rand-augment 'rand-q9': not a timm RandAugment spec"),
    # what timm lets pass without a word: a part it skips, a magnitude it clips, no op at all
    ({"rand_augment": "rand-mX-foo"}, "--rand-augment 'rand-mX-foo': the part 'mX' has no number, and timm would "
     "skip it"),
    ({"rand_augment": "rand-m100"}, r"--rand-augment 'rand-m100': magnitude 100 is above the maximum \(mmax\) 10"),
    ({"rand_augment": "rand-mmax5"}, r"magnitude 10 \(timm default\) is above the maximum \(mmax\) 5"),
    ({"rand_augment": "rand-m9-n0"}, "--rand-augment 'rand-m9-n0': n0 applies no op to any image"),
    ({"run_name": ".."}, r"--run-name '\.\.': a folder inside --output-dir \(no absolute path, no '\.\.'"),
    ({"run_name": "a/../../b"}, "--run-name 'a/../../b': a folder inside --output-dir"),
    ({"run_name": "/tmp/x"}, "--run-name '/tmp/x': a folder inside --output-dir"),
    ({"run_name": " "}, "--run-name ' ': a folder inside --output-dir"),  # (was a run folder named ' ')
    ({"run_name": "."}, r"--run-name '\.': a folder inside --output-dir"),  # --output-dir itself
    ({"rand_augment": "rand-m9-p0"}, "--rand-augment 'rand-m9-p0': p0 applies no op to any image"),
    ({"rand_augment": "rand--m9"}, r"--rand-augment 'rand--m9': it has an empty part \('--'\)"),
    ({"output_dir": " "}, "--output-dir ' ': name a folder"),
    ({"data_path": ""}, "--data-path '': name the shards' folder"),
    ({"loader": "dali", "rand_augment": "rand-m9-tweights"}, "--rand-augment 'rand-m9-tweights': PyTorch loader only"),
    ({"repeated_aug": 0}, r"--repeated-aug 0: must be >= 1"),
    ({"compile_mode": "max-autotune"}, "--compile-mode 'max-autotune': choose auto, default, reduce-overhead"),
    ({"compile_mode": "reduce-overhead", "compile": "off"}, "--compile-mode reduce-overhead with --compile off: "
     "nothing is compiled"),
    ({"dali_executor": "exec2"}, "--dali-executor 'exec2': choose dynamic or legacy"),
    ({"dali_prefetch": 0}, r"--dali-prefetch 0: must be >= 1 \(DALI's default: 2\)"),
    ({"step_stream": "low"}, "--step-stream 'low': choose default, side, high"),
    ({"step_stream": "high", "device": "cpu"}, "--step-stream high with --device cpu: a CUDA stream"),
])
def test_bad_values_are_errors_that_name_them(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        from_dict(values)


@pytest.mark.parametrize("name, accepted, refused", [
    ("distillation_alpha", (0.0, 1.0), (-0.01, 1.01)), ("dali_hw_decoder_load", (0.0, 1.0), (-0.01, 1.01)),
    ("random_erasing", (0.0, 1.0), (-0.01, 1.01)), ("drop_path", (0.0, 1.0), (-0.01, 1.01)),
    ("crop_scale_min", (0.01, 1.0), (0.0, 1.01)), ("crop_pct", (0.01, 1.0), (0.0, 1.01)),
    ("label_smoothing", (0.0, 0.99), (-0.01, 1.0)), ("model_ema_decay", (0.0, 0.99999), (-0.01, 1.0)),
    *[(name, (0.0, 3.0), (-0.01,)) for name in ("mixup", "cutmix", "clip_grad", "warmup_epochs", "min_lr",
                                                 "weight_decay")],
    ("distillation_tau", (0.01, 10.0), (0.0, -1.0)), ("lr", (1e-9,), (0.0,)), ("epochs", (1,), (0,)),
    ("batch_size", (2,), (0,)), ("dali_prefetch", (1,), (0,)), ("repeated_aug", (1,), (0,))])
def test_each_range_accepts_its_bounds_and_refuses_just_past_them(name, accepted, refused):
    for value in accepted:
        assert getattr(Config(**{name: value}), name) == value
    for value in refused:
        with pytest.raises(SettingError, match=re.escape(f"{flag(name)} {value}: must be")):
            Config(**{name: value})


def test_a_nested_run_name_and_timms_own_spellings_are_accepted():
    assert Config(run_name="ablation/vit").run_dir == Path("runs/ablation/vit")  # inside --output-dir: as before
    for spec in ("rand-m9-mstd0.5-inc1", "rand-m7-n4-mstd0.5", "rand-mstd101-m9", "rand-m10-mmax10", "rand",
                 "rand-m12-mmax15", "rand-m9-mmax0"):  # (mmax0: timm's default maximum, 10)
        assert Config(rand_augment=spec).rand_augment == spec


def test_rand_augment_runs_in_either_loader_but_weighted_op_choice_only_in_the_pytorch_one():
    assert from_dict({"loader": "dali", "rand_augment": "rand-m9-mstd0.5-inc1", "repeated_aug": 3}).torch_only == []
    assert from_dict({"rand_augment": "rand-m9-tweights"}).torch_only == ["--rand-augment 'rand-m9-tweights'"]


def test_either_mixup_or_cutmix_makes_the_targets_soft():
    assert Config(mixup=0.8).mixes and Config(cutmix=1.0).mixes and not Config().mixes


def test_the_patch_size_binds_only_the_transformers():
    assert from_dict({"model": "resnet18", "img_size": 100}).img_size == 100  # no patches in a ResNet
    with pytest.raises(ValueError, match="--patch-size 16 must divide --img-size 100"):
        from_dict({"model": "vit_tiny", "img_size": 100})


def test_bad_flag_value_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--amp", "fp8"])
    assert e.value.code == 2  # argparse's usage error
    assert "--amp 'fp8'" in capsys.readouterr().err


def test_a_bad_value_from_a_config_file_says_it_came_from_there(tmp_path, capsys):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"model_ema_decay": 1.0, "lr": 0.1}))  # e.g. an older run's saved config
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])
    assert capsys.readouterr().err.strip().endswith(
        f"error: --model-ema-decay 1.0: must be in [0, 1) (the value comes from --config {f}: give the flag to "
        f"override it)")
    assert parse_args(["--config", str(f), "--model-ema-decay", "0.999"]).lr == 0.1
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f), "--model-ema-decay", "2"])  # the flag's own value: no such hint
    assert capsys.readouterr().err.strip().endswith("error: --model-ema-decay 2.0: must be in [0, 1)")


def test_every_flag_has_a_help_text_and_help_prints_each(capsys, monkeypatch):
    from dataclasses import fields

    from vitdeit.config import field_comments

    comments = field_comments()
    assert sorted(comments) == sorted(f.name for f in fields(Config))
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps to the terminal, at hyphens too ("centre- crop")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(" ".join(c.split()) in text for c in comments.values())  # a "%" in a comment printed as itself


def test_a_one_image_batch_trains_resnet18_where_its_last_feature_map_is_larger_than_one_pixel():
    import torch

    from vitdeit.models import create_model

    for size, ok in ((32, False), (33, True)):  # the config's line: above 32 px the last map is 2x2
        net = create_model("resnet18", num_classes=3).train()
        try:
            net(torch.zeros(1, 3, size, size))
        except ValueError:
            assert not ok
            with pytest.raises(ValueError, match="its last BatchNorm"):
                from_dict({"model": "resnet18", "batch_size": 1, "img_size": size})
            net.eval()(torch.zeros(1, 3, size, size))  # evaluation: the running statistics, any batch
            assert from_dict({"model": "resnet18", "batch_size": 1, "img_size": size, "eval_only": True}).eval_only
        else:
            assert ok
            assert from_dict({"model": "resnet18", "batch_size": 1, "img_size": size}).img_size == size


@pytest.mark.parametrize("cores, local_world, expected", [(2, None, 1), (16, None, 8), (16, "8", 1), (64, "8", 7),
                                                          (128, "8", 8), (1, None, 1),
                                                          # ranks x (workers + main) within the cores: 2 x 2 of 5,
                                                          # 4 x 2 of 10, 4 x 3 of 12 (not 2 x 3, 4 x 3, 4 x 4)
                                                          (5, "2", 1), (10, "4", 1), (12, "4", 2)])
def test_default_workers_share_the_usable_cores_among_the_ranks_on_a_node(monkeypatch, cores, local_world, expected):
    import os

    from vitdeit import config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4 * cores)  # the host's: more than this process may use
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert config.Config().decode_workers == expected  # cores / ranks - 1 for each rank's main process, in 1..8


@pytest.mark.parametrize("workers, cores, local_world, dali, said", [
    (2, 2, None, False, None), (0, 1, None, True, None),  # within the cores (DALI's 0: its one thread)
    (3, 2, None, False, "--workers 3: 3 decode processes on this node, more than its 2 usable cores: they take turns "
                        "and slow each other; --workers -1 takes this node's share (1 here)"),
    (2, 1, None, True, "--workers 2: 2 decode threads on this node, more than its 1 usable core: they take turns and "
                       "slow each other; --workers -1 takes this node's share (1 here)"),
    (2, 16, "8", False, None),  # 8 ranks x 2 = the node's 16
    (4, 16, "8", True, "--workers 4: 32 decode threads on this node (4 for each of its 8 processes), more than its 16 "
                       "usable cores: they take turns and slow each other; --workers -1 takes this node's share (1 "
                       "here)"),
    (-1, 16, None, False, None),  # its share: 8 of 16
    # more processes than cores: -1's one each is too many already; PyTorch's loader can decode in each process,
    # DALI runs a thread at the least (--workers 0 too)
    (-1, 4, "8", False, "--workers -1: 8 decode processes on this node (1 for each of its 8 processes), more than its "
                        "4 usable cores: they take turns and slow each other; start fewer processes on this node, or "
                        "--workers 0 (each decodes its own batches)"),
    (0, 4, "8", True, "--workers 0: 8 decode threads on this node (1 for each of its 8 processes), more than its 4 "
                      "usable cores: they take turns and slow each other; start fewer processes on this node"),
    (0, 4, "8", False, None)])
def test_more_decoders_than_the_nodes_cores_are_warned_of_all_ranks_together(monkeypatch, workers, cores, local_world,
                                                                              dali, said):
    import os

    from vitdeit import config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert config.workers_warning(workers, dali=dali) == said


def test_without_an_affinity_call_the_host_count_is_used(monkeypatch):
    import os

    from vitdeit import config

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert config.usable_cores() == 6 and config.Config().decode_workers == 5


def test_a_saved_config_keeps_the_worker_choice_not_the_machines_count(monkeypatch):
    """A run on 2 cores saves -1, not its 1 worker: `--config` of it on a 16-core node decodes with 8 there; a
    number the user gave is kept as given."""
    import os

    from vitdeit import config

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    saved, given = config.Config().to_dict(), config.Config(workers=3).to_dict()
    assert (saved["workers"], config.Config().decode_workers) == (-1, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert config.from_dict(saved).decode_workers == 8 and config.from_dict(given).decode_workers == 3
    assert config.Config(workers=0).decode_workers == 0  # 0: the main process decodes, on any machine


@pytest.mark.parametrize("text, value", [("true", True), ("YES", True), ("1", True), ("on", True), ("false", False),
                                         ("No", False), ("0", False), ("off", False)])
def test_a_boolean_flag_takes_the_usual_spellings_of_true_and_false(text, value):
    assert parse_args(["--progress", text]).progress is value
    assert parse_args(["--overwrite"]).overwrite is True  # given alone: on


def test_a_boolean_flag_refuses_any_other_word(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--progress", "maybe"])
    assert e.value.code == 2 and "argument --progress: expected true/false, got 'maybe'" in capsys.readouterr().err


def test_a_checkpoint_passed_as_config_is_named_with_the_fix(tmp_path, capsys):
    import torch

    ckpt = tmp_path / "run" / "last.pth"
    ckpt.parent.mkdir()
    torch.save({"epoch": 0}, ckpt)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(ckpt), "--eval-only"])
    assert e.value.code == 2 and capsys.readouterr().err.endswith(
        f"error: --config {ckpt}: a checkpoint, not a JSON config; pass its run's config.json (--config "
        f"{tmp_path / 'run' / 'config.json'}), or the checkpoint itself as --resume\n")


def test_a_config_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    import os
    import subprocess
    import sys

    f = tmp_path / "config.json"
    f.write_text('{"run_name": "d\u00e9j\u00e0_vu"}', encoding="utf-8")  # a name typed by hand: JSON's UTF-8
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}  # the locale's encoding: ASCII
    code = (f"from vitdeit.config import parse_args; "
            f"print(ascii(parse_args(['--config', {str(f)!r}]).run_name))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == ascii("d\u00e9j\u00e0_vu"), r.stderr[-2000:]


@pytest.mark.parametrize("content, said", [(None, "No such file"), ("{lr: 1}", "Expecting property name"),
                                           ("[1, 2]", "must hold a JSON object"),
                                           ('{"lr": 1e-3, "lr": 5e-4}', "duplicate key 'lr'; keep one of them"),
                                           ('{"lr": 1}'.encode("utf-16"), "codec can't decode")])  # not UTF-8
def test_a_config_file_that_is_missing_or_not_a_json_object_is_a_usage_error_naming_it(content, said, tmp_path,
                                                                                        capsys):
    f = tmp_path / "config.json"
    if content is not None:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: --config {f}: " in err and said in err


def test_a_whole_number_in_a_config_file_for_a_real_setting_is_the_real_number_its_flag_gives(tmp_path):
    # JSON's 1 for --lr 1: saved and compared (between nodes, which compare the settings' repr) as the flag's 1.0
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 1, "min_lr": 0, "warmup_epochs": 2, "epochs": 3}))
    cfg = parse_args(["--config", str(f)])
    assert [repr(v) for v in (cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)] == ["1.0", "0.0", "2.0", "3"]
    flags = parse_args(["--lr", "1", "--min-lr", "0", "--warmup-epochs", "2", "--epochs", "3"])
    assert json.dumps(cfg.to_dict()) == json.dumps(flags.to_dict())
    assert repr(from_dict({"distillation_tau": 2}).distillation_tau) == "2.0"
