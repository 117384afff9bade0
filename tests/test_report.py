"""viz.py: the prediction panels, the curves and the report, checked against checkpoints and metrics."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, small_dataset
from vitdeit.checkpoint import check_class_map
from vitdeit.classes import ClassMap, load_manifest, manifest_class_map
from vitdeit.errors import DataError, MissingFile, SettingError
from vitdeit.models import OUTSIDE_DATA, create_model
from vitdeit.config import Config
from vitdeit.data.torch_loader import ShardSamples, TorchLoader, ValTransform
from vitdeit.packing import PackOptions, pack
from vitdeit.report import (Predictions, comparison, load_model, make_all, mcnemar_exact_p, predict, prediction_figure,
                            report_markdown, sample_indices)
from vitdeit.trainer import train


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("vizruns")
    common = dict(data_path=str(tiny_shards), output_dir=str(out), img_size=32, patch_size=8, batch_size=16,
                  workers=0, progress=False, lr=0.005)
    train(Config(model="resnet18", epochs=1, run_name="teacher_resnet18", **common))
    train(Config(model="vit_tiny", epochs=2, run_name="baseline_vit_tiny", **common))
    train(Config(model="deit_tiny_distill", epochs=2, run_name="deit_tiny_distill", allow_weak_teacher=True,
                 teacher_ckpt=str(out / "teacher_resnet18" / "best.pth"), **common))
    return out


def test_panels_show_truth_and_both_predictions_by_name(runs, tiny_shards):
    manifest = load_manifest(tiny_shards)
    cm = manifest_class_map(manifest)
    preds = [predict(*load_model(runs / run / "best.pth", cm), tiny_shards, manifest, name, workers=0)
             for run, name in (("baseline_vit_tiny", "ViT"), ("deit_tiny_distill", "DeiT"))]
    indices = sample_indices(len(preds[0].labels), 7, seed=5)
    fig = prediction_figure(tiny_shards, manifest, preds, indices)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 7
    ds = ShardSamples(tiny_shards, manifest, "val")
    for ax, idx in zip(panels, indices):
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == 3  # the truth, then each model's prediction
        truth = ds.raw(idx)[1]  # the label stored in the shard, read independently of the predictions
        assert texts[0] == f"true: {cm.short_name(truth)}"
        for text, p, t in zip(texts[1:], preds, ax.texts[1:]):
            assert text == f"{p.name}: {cm.short_name(int(p.pred[idx]))} ({100 * p.conf[idx]:.0f}%)"
            assert t.get_color() == ("#1a7f37" if p.pred[idx] == truth else "#cf222e")
    assert not np.array_equal(preds[0].conf, preds[1].conf)  # two models, two sets of predictions
    for p, run in zip(preds, ("baseline_vit_tiny", "deit_tiny_distill")):  # predict() against training's evaluate()
        best = torch.load(runs / run / "best.pth", weights_only=True)["best_top1"]
        assert 100 * np.mean(p.pred == p.labels) == pytest.approx(best, abs=100 / 24 + 1e-9)  # within one image


def test_same_seed_same_images_other_seed_others():
    assert sample_indices(500, 10, 0) == sample_indices(500, 10, 0) != sample_indices(500, 10, 1)
    with pytest.raises(ValueError, match="--num-images"):
        sample_indices(5, 10, 0)
    assert sorted(sample_indices(5, 5, 0)) == [0, 1, 2, 3, 4]  # every val image, once each
    with pytest.raises(ValueError, match="--num-images 0: must be between 1 and the 5 val images"):
        sample_indices(5, 0, 0)


def test_viz_writes_the_picture_and_a_report_matching_metrics_and_checkpoints(runs, tiny_shards, tmp_path):
    out = tmp_path / "new_folder" / "pic.png"  # --out into a folder that does not exist yet
    w = make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"),
                 teacher_run=str(runs / "teacher_resnet18"), num_images=10, out=str(out),
                 report_dir=str(tmp_path / "report"), workers=0)
    assert Image.open(out).size[0] > 1000 and len(w["panels"]) == 10
    assert all([line.split(":")[0] for line in p["lines"]] == ["true", "ViT", "DeiT"] for p in w["panels"])
    # each panel's key: the val tars' sample names in order, read here with tarfile; the source file of that name
    # lies in the folder of the panel's true class
    manifest = load_manifest(tiny_shards)
    keys = []
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(tiny_shards / shard["file"]) as tar:
            keys += list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    source, cm = Path(manifest["source"]["data_path"]), manifest_class_map(manifest)
    for p in w["panels"]:
        assert p["key"] == keys[p["index"]]
        [wnid] = [f.parent.name for f in source.glob(f"val*/*/{p['key']}.*")]
        assert p["lines"][0] == f"true: {cm.short_name(cm.wnids.index(wnid))}"
    assert json.loads((tmp_path / "report" / "report.json").read_text())["panels"] == w["panels"]
    assert (tmp_path / "report" / "curves.png").is_file()
    md = (tmp_path / "report" / "report.md").read_text()
    assert (f"The images of pic.png, left to right and top to bottom, by val key (the source file's stem, its name "
            f"without the extension): {', '.join(p['key'] for p in w['panels'])}.") in md.splitlines()
    for run, name in (("teacher_resnet18", "teacher"), ("baseline_vit_tiny", "ViT"), ("deit_tiny_distill", "DeiT")):
        metrics = [json.loads(x) for x in open(runs / run / "metrics.jsonl")]
        ckpt = torch.load(runs / run / "best.pth", weights_only=True)
        best = max(metrics, key=lambda r: r["val_top1"])
        assert best["val_top1"] == ckpt["best_top1"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2] == f"{best['val_top1']:.2f}" and cells[3] == f"{best['val_top5']:.2f}"
        cfg = ckpt["config"]  # the architecture built anew, not the report's loading of the checkpoint
        params = sum(p.numel() for p in create_model(cfg["model"], 4, cfg["img_size"], cfg["patch_size"]).parameters())
        assert cells[4] == f"{best['epoch']} / {metrics[-1]['epoch']}" and cells[5] == f"{params / 1e6:.2f} M"
        steady = metrics[1:] if run != "teacher_resnet18" else metrics  # the teacher trained 1 epoch, the others 2
        assert cells[6] == f"{np.median([r['images_per_s'] for r in steady]):.0f}"
    deit_lines = (runs / "deit_tiny_distill" / "metrics.jsonl").read_text().splitlines()
    deit_best = max((json.loads(x) for x in deit_lines), key=lambda r: r["val_top1"])
    assert f"class head {deit_best['val_top1_cls_head']:.2f}%, distillation head " \
           f"{deit_best['val_top1_dist_head']:.2f}%, their mean (the prediction) {deit_best['val_top1']:.2f}%." in md
    deit_cfg = json.loads((runs / "deit_tiny_distill" / "config.json").read_text())
    assert (f"The teacher it distilled from: val top-1 {deit_best['teacher_val_top1']:.2f}%, as the DeiT run evaluated "
            f"it on {deit_cfg['data_path']} at {deit_cfg['img_size']} px.") in md.splitlines()  # = the teacher row
    comp = json.loads((tmp_path / "report" / "report.json").read_text())["comparison"]
    assert sum(r["images"] for r in comp["per_class"]) == comp["val_images"] == 24
    assert "With 4 classes, val top-5 is 100 % by construction." in md.splitlines()  # (4 classes: every top-5 hits)
    six = {**comp, "per_class": comp["per_class"] + [dict(comp["per_class"][0], **{"class": f"n{i}"}) for i in (1, 2)]}
    assert "by construction" not in report_markdown([], six, ("ViT", "DeiT"))
    five = {**comp, "per_class": six["per_class"][:5]}  # topk takes min(5, classes): still every true class
    assert "With 5 classes, val top-5 is 100 % by construction." in report_markdown([], five, ("ViT", "DeiT"))
    # 4 classes with val images, of 6 the models score: top-5 leaves a true class out
    assert "by construction" not in report_markdown([], {**comp, "classes_without_val_images": ["n7", "n8"]},
                                                    ("ViT", "DeiT"))


@pytest.mark.parametrize("no_report", [False, True])
def test_every_viz_flag_reaches_the_report(tmp_path, monkeypatch, capsys, no_report):
    import inspect

    import viz

    asked = []  # (every value below differs from its default: a flag dropped on the way shows)
    monkeypatch.setattr(viz, "make_all", lambda *a, **k: asked.append((a, k)) or {"notes": [], "figure": "p.png"})
    monkeypatch.setattr(viz, "resolve_device", lambda device: f"resolved {device}")  # (here auto is cpu too)
    report = ["--no-report"] if no_report else ["--report-dir", "R"]
    assert viz.main(["--vit", "V.pth", "--deit", "D.pth", "--teacher-run", "T", "--data-path", "S", "--num-images",
                     "4", "--seed", "3", "--out", str(tmp_path / "p.png"), *report, "--ema", "--device", "cpu",
                     "--workers", "1"]) == 0
    (args, kwargs), = asked  # each value by the name of the parameter it reached
    assert inspect.signature(make_all).bind(*args, **kwargs).arguments == {
        "vit_ckpt": "V.pth", "deit_ckpt": "D.pth", "data_path": "S", "teacher_run": "T", "num_images": 4, "seed": 3,
        "out": str(tmp_path / "p.png"), "report_dir": None if no_report else "R", "device": "resolved cpu",
        "workers": 1, "ema": True}
    assert capsys.readouterr().out == "wrote p.png\n"


def test_the_report_says_when_a_checkpoint_is_not_the_best_epochs(runs, tmp_path, capsys):
    import shutil

    import viz

    other = tmp_path / "vit"  # e.g. --vit RUN/last.pth, or a best.pth whose best epoch's weights were lost
    other.mkdir()
    shutil.copy(runs / "baseline_vit_tiny" / "metrics.jsonl", other)
    state = torch.load(runs / "baseline_vit_tiny" / "best.pth", weights_only=True)
    best = state["epoch"]
    state["epoch"] = best + 7
    torch.save(state, other / "last.pth")
    capsys.readouterr()
    assert viz.main(["--vit", str(other / "last.pth"), "--deit", str(runs / "deit_tiny_distill" / "best.pth"),
                     "--num-images", "2", "--out", str(tmp_path / "p.png"), "--report-dir", str(tmp_path / "report"),
                     "--workers", "0", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert f"(the checkpoint read is epoch {best + 7}'s, not the best epoch {best}'s)" in said.split("ViT")[1]
    assert "the checkpoint read" not in said.split("DeiT")[1]
    md = (tmp_path / "report" / "report.md").read_text()
    assert (f"ViT: the checkpoint read here is from epoch {best + 7}, not its best epoch {best}; its predictions "
            f"below are that epoch's.") in md.splitlines()
    assert "DeiT: the checkpoint read here" not in md
    rows = [json.loads(line) for line in open(other / "metrics.jsonl")]  # the best epoch, independently: metrics'
    best_in_metrics = max(rows, key=lambda r: r["val_top1"])["epoch"]
    assert best_in_metrics == best
    (vit_row,) = [line for line in md.splitlines() if line.startswith("| ViT |")]
    assert f"| {best} / {rows[-1]['epoch']} |" in vit_row  # the table's column: the best epoch, not the one read


def test_viz_ema_predicts_with_each_checkpoints_ema_and_the_report_says_so(runs, tiny_shards, tmp_path, capsys,
                                                                           monkeypatch):
    """--ema: the ViT copy's EMA says class 0 for every image, the DeiT copy's class 1 (their heads zeroed but a bias);
    a checkpoint without an EMA is refused before any val pass."""
    import math
    import shutil

    import viz
    from vitdeit import report

    copies = {}
    for run, name, cls in (("baseline_vit_tiny", "v", 0), ("deit_tiny_distill", "d", 1)):  # each EMA: one class
        shutil.copytree(runs / run, tmp_path / name)
        state = torch.load(tmp_path / name / "best.pth", weights_only=True)
        ema = {k: torch.zeros_like(v) if k.startswith("head") else v.clone() for k, v in state["model"].items()}
        for key in ("head.bias", "head_dist.bias"):  # (the DeiT's two heads): logits 1 for that class, 0 for others
            if key in ema:
                ema[key][cls] = 1.0
        torch.save({**state, "ema": ema}, tmp_path / name / "best.pth")
        copies[name] = str(tmp_path / name / "best.pth")
    cm = manifest_class_map(load_manifest(tiny_shards))
    kw = dict(num_images=24, workers=0, out=str(tmp_path / "p.png"))
    trained = make_all(copies["v"], copies["d"], report_dir=None, **kw)
    averaged = make_all(copies["v"], copies["d"], report_dir=str(tmp_path / "report"), ema=True, **kw)
    conf = round(100 * math.e / (math.e + 3))  # softmax of logits (1, 0, 0, 0) or (0, 1, 0, 0)
    for i, (name, cls) in enumerate((("ViT", 0), ("DeiT", 1)), start=1):
        assert [p["lines"][i] for p in averaged["panels"]] == [f"{name}: {cm.short_name(cls)} ({conf}%)"] * 24
        assert [p["lines"][i] for p in trained["panels"]] != [f"{name}: {cm.short_name(cls)} ({conf}%)"] * 24
    comp = averaged["comparison"]
    assert [(r["vit_top1"], r["deit_top1"]) for r in comp["per_class"]] == [(100, 0), (0, 100), (0, 0), (0, 0)]
    assert comp["ema"] and json.loads((tmp_path / "report" / "report.json").read_text())["comparison"]["ema"]
    said = ("--ema: the picture and the comparison are of each checkpoint's EMA of its weights (--model-ema), as of "
            "its epoch; the table and the curves are of the trained weights")
    assert said in averaged["notes"] and not any("--ema" in n for n in trained["notes"])
    alone = make_all(copies["v"], copies["d"], report_dir=None, ema=True, **kw)  # --no-report: no table to speak of
    assert ("--ema: the picture is of each checkpoint's EMA of its weights (--model-ema), as of its epoch"
            in alone["notes"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"Note: {said}." in md.splitlines()
    assert "(each run's `best.pth` unless `--vit`/`--deit` named others; the EMA of their weights, `--ema`)." in md
    capsys.readouterr()
    assert viz.main(["--vit", copies["v"], "--deit", copies["d"], "--ema", "--num-images", "2", "--out",
                     str(tmp_path / "r.png"), "--report-dir", str(tmp_path / "r"), "--workers", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "  ViT and DeiT (EMA weights) agree on 0.0% of 24 val images" in printed  # (class 0 against class 1)
    assert [line.split()[0] for line in printed if line.endswith("%  (trained weights)")] == ["teacher", "ViT", "DeiT"]
    monkeypatch.setattr(report, "predict", lambda *a, **k: pytest.fail("a val pass before the refusal"))
    for args in ([copies["v"], str(runs / "deit_tiny_distill" / "best.pth")],  # (one of two without: named)
                 [str(runs / "baseline_vit_tiny" / "best.pth"), copies["d"]]):
        without = next(a for a in args if a.startswith(str(runs)))
        assert viz.main(["--vit", args[0], "--deit", args[1], "--ema", "--out", str(tmp_path / "q.png"),
                         "--no-report", "--workers", "0", "--device", "cpu"]) == 1
        assert capsys.readouterr().err == (f"error: --ema: {without} holds no EMA of its weights (saved without "
                                           f"--model-ema); drop --ema to use its trained weights\n")
    assert not (tmp_path / "q.png").exists()  # refused before any val pass


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "viz.py"), "--vit", str(tmp_path / "nope.pth")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "nope.pth: checkpoint not found" in r.stderr and "--vit" in r.stderr
    from vitdeit.demo import demo_commands

    viz = demo_commands(Path("."), {"resnet18": 1, "vit": 1}, 1, quick=False)[-1]  # the demo's own viz.py command
    assert all(f"{flag} {viz[viz.index(flag) + 1]}" in r.stderr for flag in ("--vit", "--deit", "--report-dir"))


def test_viz_writes_its_report_in_utf8_and_prints_in_ascii_under_an_ascii_locale(runs, tmp_path):
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}  # Python's encoding: ASCII
    env.pop("PYTHONIOENCODING", None)
    r = subprocess.run([sys.executable, str(ROOT / "viz.py"), "--vit", str(runs / "baseline_vit_tiny" / "best.pth"),
                        "--deit", str(runs / "deit_tiny_distill" / "best.pth"), "--num-images", "2", "--out",
                        str(tmp_path / "p.png"), "--report-dir", str(tmp_path / "report"), "--workers", "0",
                        "--device", "cpu"], capture_output=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert b"DeiT - ViT: " in r.stdout and max(r.stdout) < 128  # every printed byte ASCII
    assert "| class | WNID | images | ViT top-1 (%) | DeiT top-1 (%) | Δ |" in (
        tmp_path / "report" / "report.md").read_text(encoding="utf-8")


def test_checkpoints_trained_at_other_sizes_are_compared_with_a_note_saying_so(runs, tiny_shards, tmp_path):
    train(Config(model="vit_tiny", epochs=1, img_size=16, patch_size=8, batch_size=16, workers=0, progress=False,
                 data_path=str(tiny_shards), output_dir=str(tmp_path), run_name="vit16"))
    deit = str(runs / "deit_tiny_distill" / "best.pth")
    w = make_all(str(tmp_path / "vit16" / "best.pth"), deit, num_images=2, out=str(tmp_path / "p.png"),
                 report_dir=None, workers=0)
    fixture = json.loads((runs / "deit_tiny_distill" / "config.json").read_text())  # (its recipe: 2 epochs, lr 0.005)
    assert w["notes"] == ["ViT was trained at 16 px, DeiT at 32 px: their scores are not like for like",
                          f"beside distillation, ViT and DeiT were trained with other settings (ViT's / DeiT's: "
                          f"--epochs 1 / {fixture['epochs']}, --lr 0.0005 / {fixture['lr']}): the gap between them is "
                          f"not distillation's alone"]
    md = report_markdown([], {"val_images": 2, "agreement": 50.0, "both_right": 0.0, "gains": [], "losses": [],
                              "per_class": [], "deit_only_right": 1, "vit_only_right": 0, "mcnemar_p": 1.0},
                         ("ViT", "DeiT"), w["notes"]).splitlines()
    assert md[md.index("|---|---|---:|---:|---:|---:|---:|---|") + 1:][:3] == [
        "", "Note: ViT was trained at 16 px, DeiT at 32 px: their scores are not like for like.",
        f"Note: {w['notes'][1]}."]  # under the table
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    w = make_all(str(runs / "baseline_vit_tiny" / "best.pth"), deit, num_images=2, out=str(tmp_path / "q.png"),
                 report_dir=str(tmp_path / "report"), workers=0)
    assert w["notes"] == []  # both at 32 px
    assert len(plt.get_fignums()) == open_before  # the picture and the curves closed once saved


def test_a_teacher_run_that_is_no_resnet_or_not_the_deits_own_is_refused_or_noted(runs, tmp_path):
    import shutil

    from vitdeit.errors import SettingError

    kw = dict(num_images=2, out=str(tmp_path / "p.png"), report_dir=str(tmp_path / "report"), workers=0)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    with pytest.raises(SettingError, match=re.escape(f"--teacher-run {runs / 'baseline_vit_tiny'}: a vit_tiny run, "
                                                     f"not a ResNet-18 teacher's")):
        make_all(vit, deit, teacher_run=str(runs / "baseline_vit_tiny"), **kw)
    other = tmp_path / "other_teacher"  # a ResNet-18 run, but not the one the DeiT distilled from
    shutil.copytree(runs / "teacher_resnet18", other)
    w = make_all(vit, deit, teacher_run=str(other), **kw)
    assert w["notes"] == [f"the teacher row is {other} (--teacher-run), not {runs / 'teacher_resnet18'}, the run the "
                          f"DeiT distilled from"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["notes"] == w["notes"]  # the JSON's too
    assert make_all(vit, deit, teacher_run=str(runs / "teacher_resnet18"), **kw)["notes"] == []  # its own: no note


def test_scoring_on_other_shards_or_shards_packed_too_small_is_noted(runs, tiny_shards, tmp_path):
    import json as json_

    data = tmp_path / "small"  # the same images, packed with a shorter side under val's 36 px (32 / 0.875)
    source = json_.loads((tiny_shards / "manifest.json").read_text())["source"]["data_path"]
    pack(Path(source), data, opts=PackOptions(shard_size=30, workers=1, resize_short=20), progress=False)
    state = torch.load(runs / "baseline_vit_tiny" / "best.pth", weights_only=True)  # its run typed a relative path:
    torch.save({**state, "config": {**state["config"], "data_path": tiny_shards.name}}, tmp_path / "vit.pth")
    w = make_all(str(tmp_path / "vit.pth"), str(runs / "deit_tiny_distill" / "best.pth"),  # the note names its folder
                 data_path=str(data), num_images=2, out=str(tmp_path / "p.png"), report_dir=None, workers=0)
    assert w["notes"] == [f"ViT was trained and scored on {tiny_shards.resolve()}, other shards than {data}",
                          f"{data} was packed with --resize-short 20, under the 36 px shorter side val resizes to "
                          f"(--img-size 32 / --crop-pct 0.875): images are upscaled. Repack with --resize-short 36 or "
                          f"more, or lower --img-size",
                          f"DeiT was trained and scored on {tiny_shards.resolve()}, other shards than {data}"]


def test_the_shards_a_run_was_trained_on_are_no_other_shards_when_named_from_another_folder(runs, tiny_shards,
                                                                                          tmp_path, monkeypatch):
    import shutil

    kw = dict(num_images=2, out=str(tmp_path / "p.png"), report_dir=None, workers=0)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the shards by a relative path typed from another folder: the same pack
    assert make_all(vit, deit, data_path=os.path.relpath(tiny_shards, elsewhere), **kw)["notes"] == []
    state = torch.load(vit, weights_only=True)  # a run started in the shards' parent folder, as `--data-path shards`
    state["config"]["data_path"] = tiny_shards.name
    torch.save(state, tmp_path / "relative.pth")
    assert make_all(str(tmp_path / "relative.pth"), deit, data_path=str(tiny_shards), **kw)["notes"] == []
    copy = tmp_path / "copy"  # a copy on another disk: the same pack too
    shutil.copytree(tiny_shards, copy)
    assert make_all(vit, deit, data_path=str(copy), **kw)["notes"] == []
    manifest = json.loads((copy / "manifest.json").read_text())  # packed again in place, with another seed
    manifest["options"]["seed"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (state := torch.load(vit, weights_only=False))["data_dir"] = str(copy.resolve())
    torch.save(state, tmp_path / "vit.pth")
    notes = make_all(str(tmp_path / "vit.pth"), deit, data_path=str(copy), **kw)["notes"]
    assert notes[0] == f"{copy} was packed again since ViT was saved (other options, seed or images)"
    assert notes[1] == f"DeiT was trained and scored on {tiny_shards.resolve()}, other shards than {copy}"
    del state["data_dir"]  # saved before the shards' folder was kept: not the same pack, but which change is unknown
    torch.save(state, tmp_path / "vit.pth")
    notes = make_all(str(tmp_path / "vit.pth"), deit, data_path=str(copy), **kw)["notes"]
    assert notes[0] == f"the shards at {copy} are not those ViT was saved with (packed again, or other shards)"
    old = {k: v for k, v in state.items() if k != "pack"}  # saved before packs were fingerprinted: its path alone
    torch.save({**old, "config": {**old["config"], "data_path": str(tiny_shards)}}, tmp_path / "old.pth")
    assert make_all(str(tmp_path / "old.pth"), deit, data_path=str(tiny_shards), **kw)["notes"] == [
        f"whether {tiny_shards} was packed again since ViT was saved cannot be told (it was saved before vitdeit kept "
        f"the pack's fingerprint, 2026-12-05)"]  # (its own folder: repacked there since or not, it holds no record)
    notes = make_all(str(tmp_path / "old.pth"), deit, data_path=str(copy), **kw)["notes"]
    assert notes[0] == (f"ViT names {tiny_shards} as its shards (it was saved before vitdeit kept the pack's "
                        f"fingerprint), not {copy}")


def test_how_the_shards_differ_from_a_checkpoints_by_fingerprint_folder_and_path_as_typed(tiny_shards, tmp_path,
                                                                                         monkeypatch):
    from vitdeit.checkpoint import shards_change
    from vitdeit.classes import LATER_OPTIONS, pack_fingerprint

    m = load_manifest(tiny_shards)
    state = {"pack": pack_fingerprint(m), "data_dir": str(tiny_shards.resolve()), "config": {"data_path": "x"}}
    assert shards_change(state, tiny_shards, m) is None
    earlier = {**m, "options": {k: v for k, v in m["options"].items() if k not in LATER_OPTIONS}}
    assert shards_change({**state, "pack": pack_fingerprint(earlier)}, tiny_shards, m) is None  # an earlier packer's
    seed = {**m, "options": {**m["options"], "seed": m["options"]["seed"] + 1}}  # packed again with another seed
    assert shards_change({**state, "pack": pack_fingerprint(seed)}, tiny_shards, m) == "repacked"
    elsewhere = {**state, "pack": pack_fingerprint(seed), "data_dir": str(tmp_path)}  # another folder's shards
    assert shards_change(elsewhere, tiny_shards, m) == "other"
    assert shards_change({"pack": pack_fingerprint(seed), "config": {}}, tiny_shards, m) == "unknown"  # no data_dir
    monkeypatch.chdir(tiny_shards.parent)  # before fingerprints: the path as its run typed it, from where it ran
    old = {"config": {"data_path": tiny_shards.name}}
    assert shards_change(old, str(tiny_shards.resolve()), m) == "untold"  # the same folder: packed again since?
    assert shards_change({"config": {}}, str(tiny_shards.resolve()), m) == "untold"  # (a config naming none)
    from vitdeit.trainer import other_shards_note

    assert other_shards_note(old, "old.pth", str(tiny_shards.resolve()), m) == (  # a --resume's and --eval-only's
        f"whether {tiny_shards.resolve()} was packed again since old.pth was saved cannot be told (it was saved before "
        f"vitdeit kept the pack's fingerprint, 2026-12-05)", "(if it was)")
    assert shards_change(old, str(tmp_path), m) == "elsewhere"


def test_shards_named_by_a_relative_path_are_the_checkpoints_own_folder_packed_again_not_other_shards(tiny_shards,
                                                                                                    monkeypatch):
    from vitdeit.checkpoint import shards_change_text
    from vitdeit.classes import pack_fingerprint

    m = load_manifest(tiny_shards)
    seed = {**m, "options": {**m["options"], "seed": m["options"]["seed"] + 1}}  # packed again with another seed
    state = {"pack": pack_fingerprint(seed), "data_dir": str(tiny_shards.resolve()), "config": {}}
    monkeypatch.chdir(tiny_shards.parent)  # --data-path typed relative to the working folder
    for typed in (tiny_shards.name, Path(tiny_shards.name)):
        assert shards_change_text(state, "ViT", typed, m) == (
            "repacked", f"{tiny_shards.name} was packed again since ViT was saved (other options, seed or images)")


def test_the_deits_own_teacher_run_named_by_another_path_gets_no_note(runs, tmp_path, monkeypatch):
    kw = dict(num_images=2, out=str(tmp_path / "p.png"), report_dir=str(tmp_path / "report"), workers=0)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    monkeypatch.chdir(runs)
    for spelled in ("teacher_resnet18", str(runs / "baseline_vit_tiny" / ".." / "teacher_resnet18")):
        assert make_all(vit, deit, teacher_run=spelled, **kw)["notes"] == []


def test_shards_with_a_class_of_no_train_images_or_val_copies_of_train_images_are_said(runs, tiny_shards, tmp_path,
                                                                                        capsys):
    import shutil

    from vitdeit.classes import pack_fingerprint

    data = tmp_path / "data"
    shutil.copytree(json.loads((tiny_shards / "manifest.json").read_text())["source"]["data_path"], data)
    gone = sorted(p.name for p in (data / "val.X").iterdir())[0]
    for d in data.glob("train.X*"):
        shutil.rmtree(d / gone)
    n_val, n_gone = len(list((data / "val.X").glob("*/*"))), len(list((data / "val.X" / gone).iterdir()))
    kept = sorted(data.glob("train.X*/*/*"))[0]  # a train image of a class that has some, copied into val
    shutil.copyfile(kept, data / "val.X" / kept.parent.name / "ILSVRC2012_val_99999999.JPEG")
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, allow_missing_classes=True, allow_train_val_copies=True),
             progress=False)
    kw = dict(data_path=str(tmp_path / "s"), num_images=2, out=str(tmp_path / "p.png"), report_dir=None, workers=0)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    elsewhere = make_all(vit, deit, **kw)["notes"]  # trained on all 4 classes, scored on their own val split
    assert not any("never learns" in n or "byte-identical" in n for n in elsewhere) and len(elsewhere) == 2
    for name, path in (("v.pth", vit), ("d.pth", deit)):  # the same runs, as if trained on these shards
        torch.save({**torch.load(path, weights_only=False), "pack": pack_fingerprint(m),
                    "data_dir": str((tmp_path / "s").resolve())}, tmp_path / name)
    w = make_all(str(tmp_path / "v.pth"), str(tmp_path / "d.pth"), **kw)
    assert (n_val, n_gone) == (24, 6) and w["notes"] == [
        f"1 of the 4 classes has no train images in {tmp_path / 's'} ({gone}): the model has outputs for them that it "
        f"never learns; 6 of the 25 val images are of those classes, which it gets right only by chance: val top-1 "
        f"tops out near 76.0 %",  # 19 / 25
        "1 of the 25 val images has byte-identical copies in train (--allow-train-val-copies): val top-1 counts images "
        "both models trained on"]
    for name in ("v.pth", "d.pth"):  # saved before packs were fingerprinted, on this folder: its images, said too
        old = torch.load(tmp_path / name, weights_only=False)
        del old["pack"], old["data_dir"]
        old["config"]["data_path"] = str(tmp_path / "s")
        torch.save(old, tmp_path / name)
    untold = make_all(str(tmp_path / "v.pth"), str(tmp_path / "d.pth"), **kw)["notes"]
    assert untold == [f"whether {tmp_path / 's'} was packed again since {label} was saved cannot be told (it was "
                      f"saved before vitdeit kept the pack's fingerprint, 2026-12-05)" for label in ("ViT", "DeiT")
                      ] + w["notes"]
    import train

    capsys.readouterr()
    assert train.main(["--eval-only", "--resume", str(tmp_path / "v.pth"), "--data-path", str(tmp_path / "s"),
                       "--device", "cpu", "--workers", "0"]) == 0  # train.py's score of it says so too
    assert ('warning: 1 of the 25 val images has byte-identical copies in train (the manifest\'s "train_val_same_bytes"'
            '): val top-1 counts images that a model trained on these shards has seen') in capsys.readouterr().out


def test_without_num_images_a_val_split_under_ten_images_is_shown_whole_with_a_note(runs, tiny_shards, tmp_path,
                                                                                    capsys):
    import shutil

    import viz

    source = Path(json.loads((tiny_shards / "manifest.json").read_text())["source"]["data_path"])
    data = tmp_path / "data"
    shutil.copytree(source, data)
    for class_dir in sorted((data / "val.X").iterdir()):
        for f in sorted(class_dir.iterdir())[2:]:  # 2 val images per class
            f.unlink()
    n_val = sum(1 for _ in (data / "val.X").glob("*/*"))
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    args = ["--vit", vit, "--deit", deit, "--data-path", str(tmp_path / "s"), "--out", str(tmp_path / "p.png"),
            "--no-report", "--workers", "0"]
    assert n_val < 10 and viz.main(args) == 0
    note = f"note: the val split holds {n_val} images: the picture shows all of them, not 10"
    assert note in capsys.readouterr().out.splitlines()
    w = make_all(vit, deit, data_path=str(tmp_path / "s"), out=str(tmp_path / "q.png"), report_dir=None, workers=0)
    assert len(w["panels"]) == n_val
    with pytest.raises(SettingError, match=f"--num-images 10: must be between 1 and the {n_val} val images"):
        make_all(vit, deit, data_path=str(tmp_path / "s"), num_images=10, report_dir=None, workers=0,
                 out=str(tmp_path / "r.png"))  # asked for: still refused


def test_a_checkpoint_from_another_class_map_is_refused(runs, tmp_path):
    other = tmp_path / "shards"
    pack(small_dataset(tmp_path / "d", num_classes=3, train_per_class=8, val_per_class=2), other,
         opts=PackOptions(workers=1), progress=False)
    with pytest.raises(DataError, match="another class map"):
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"),
                 data_path=str(other), out=str(tmp_path / "x.png"), report_dir=None, workers=0)


def test_the_teacher_row_comes_from_the_teacher_the_deit_distilled_from(runs, tmp_path):
    import shutil

    kw = dict(num_images=2, report_dir=str(tmp_path / "report"), workers=0, out=str(tmp_path / "p.png"))
    make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"), **kw)
    assert "| teacher |" in (tmp_path / "report" / "report.md").read_text()  # no --teacher-run: found from DeiT's
    # a DeiT whose teacher run is not here (moved, or torchvision's weights): no teacher row, not another run's
    moved = tmp_path / "deit"
    shutil.copytree(runs / "deit_tiny_distill", moved)
    state = torch.load(moved / "best.pth", weights_only=True)
    state["config"]["teacher_ckpt"] = str(tmp_path / "elsewhere" / "best.pth")
    torch.save(state, moved / "best.pth")
    w = make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(moved / "best.pth"), **kw)
    assert "| teacher |" not in (tmp_path / "report" / "report.md").read_text()
    assert w["notes"] == [f"no teacher row: the DeiT distilled from {tmp_path / 'elsewhere' / 'best.pth'}, whose run "
                          f"folder is not found from here ({Path.cwd()}); pass it with --teacher-run"]
    with pytest.raises(MissingFile, match=re.escape(f"--teacher-run {tmp_path}: no best.pth there")):
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(moved / "best.pth"), teacher_run=str(tmp_path),
                 **kw)
    state["config"]["teacher_ckpt"] = ""  # distilled from torchvision's ImageNet-1k weights: said, in report.md too
    torch.save(state, moved / "best.pth")
    w = make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(moved / "best.pth"), **kw)
    assert w["notes"] == [OUTSIDE_DATA] and OUTSIDE_DATA in (tmp_path / "report" / "report.md").read_text()
    w = make_all(str(moved / "best.pth"), str(moved / "best.pth"), **kw)  # what the picture compares comes first
    assert w["notes"] == [f"--vit and --deit are the same file, {moved / 'best.pth'}: the comparison is of one model "
                          f"with itself", f"--vit {moved / 'best.pth'} holds a deit_tiny_distill, labelled ViT here",
                          OUTSIDE_DATA]
    assert "the teacher is an ImageNet-1k ResNet-18 (torchvision's, unless --teacher-weights named another file)" in (
        tmp_path / "report" / "report.md").read_text()
    teacher_ckpt = runs / "teacher_resnet18" / "best.pth"  # the checkpoint, not its run folder
    with pytest.raises(MissingFile) as e:
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(moved / "best.pth"), teacher_run=str(teacher_ckpt),
                 **kw)
    assert str(e.value) == (f"--teacher-run {teacher_ckpt}: a file, not a run folder; pass a train.py run folder of "
                            f"the teacher (here {teacher_ckpt.parent}?).")


def test_a_run_resumed_with_other_settings_is_noted_with_which_of_them_the_checkpoint_trained_with():
    from vitdeit.report import resumed_changes_note

    rows = [{"epoch": 0}, {"epoch": 1, "resumed_with": ["--lr 0.005 -> 0.01"]}, {"epoch": 2},
            {"epoch": 3, "resumed_with": ["--epochs 4 -> 6", "--loader 'dali' -> 'torch'"]}, {"epoch": 4}]
    said = ("ViT's run was resumed with other settings (from epoch 1, --lr 0.005 -> 0.01; from epoch 3, --epochs 4 -> "
            "6, --loader 'dali' -> 'torch'); {}: the settings compared here are the ones it was saved with")
    note = lambda path, epoch: resumed_changes_note("ViT", path, {"epoch": epoch}, rows)  # noqa: E731
    assert note("b.pth", 0) == said.format("b.pth (epoch 0) was saved before them")
    assert note("b.pth", 2) == said.format("b.pth (epoch 2) was saved before those from epoch 3 on")
    assert note("l.pth", 4) == said.format("l.pth (epoch 4) was saved after them")
    assert note("e.pth", 3) == said.format("e.pth (epoch 3) was saved after them")  # (epoch 3 trained with them)
    rows = rows[:2] + [{"epoch": 2, "resumed_with": ["a"]}, {"epoch": 3, "resumed_with": ["b"]}]
    assert note("b.pth", 1).endswith("b.pth (epoch 1) was saved before those from epoch 2 on: the settings compared "
                                     "here are the ones it was saved with")
    assert resumed_changes_note("ViT", "l.pth", {"epoch": 4}, [{"epoch": e} for e in range(5)]) is None


def test_the_report_notes_the_settings_a_run_changed_when_resumed(runs, tmp_path):
    import shutil

    vit = tmp_path / "vit"
    shutil.copytree(runs / "baseline_vit_tiny", vit)
    rows = [json.loads(line) for line in (vit / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["resumed_with"] = ["--mixup 0.0 -> 0.2"]
    (vit / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = make_all(str(vit / "last.pth"), str(runs / "deit_tiny_distill" / "best.pth"), num_images=2, workers=0,
                 report_dir=str(tmp_path / "report"), out=str(tmp_path / "p.png"))
    assert f"ViT's run was resumed with other settings (from epoch {rows[-1]['epoch']}, --mixup 0.0 -> 0.2)" in (
        tmp_path / "report" / "report.md").read_text()
    assert sum("resumed with other settings" in n for n in w["notes"]) == 1  # (the DeiT's run was not)


@pytest.mark.parametrize("alpha, said", [
    (0.0, "the DeiT was trained with --distillation-alpha 0: the teacher's term had no weight, so nothing was "
          "distilled, and its distillation head, half of each prediction, never learnt"),
    (1.0, "the DeiT was trained with --distillation-alpha 1: the labels' term had no weight, so its class head, half "
          "of each prediction, never learnt"), (0.5, None)])
def test_a_deit_distilled_with_alpha_0_or_1_is_noted(runs, alpha, said):
    from vitdeit.report import comparison_notes

    vit, deit = (torch.load(runs / run / "best.pth", weights_only=True) for run in ("baseline_vit_tiny",
                                                                                      "deit_tiny_distill"))
    deit["config"]["distillation_alpha"] = alpha  # (a run saved before they were refused)
    data = deit["config"]["data_path"]
    notes = comparison_notes(("v.pth", vit), ("d.pth", deit), data, load_manifest(data), {})
    assert [n for n in notes if "--distillation-alpha" in n] == ([said] if said else [])


def comparison_states(tiny_shards, **deit):
    from vitdeit.classes import pack_fingerprint

    m = load_manifest(tiny_shards)
    base = {"epoch": 3, "pack": pack_fingerprint(m), "data_dir": str(tiny_shards.resolve())}
    vit = {**base, "config": Config(model="vit_tiny", data_path=str(tiny_shards)).to_dict()}
    deit = {**base, "config": Config(model="deit_tiny_distill", data_path=str(tiny_shards), **deit).to_dict()}
    return m, vit, deit


def test_the_deits_resumes_are_noted_and_a_vit_saved_with_distillation_none_is_no_deit_without_teacher(tiny_shards):
    from vitdeit.report import comparison_notes

    m, vit, deit = comparison_states(tiny_shards)
    rows = [{"epoch": 0}, {"epoch": 1, "resumed_with": ["--epochs 2 -> 4"]}]
    notes = comparison_notes(("v.pth", vit), ("d.pth", deit), str(tiny_shards), m, {"ViT": [], "DeiT": rows})
    assert [n for n in notes if "resumed" in n] == [
        "DeiT's run was resumed with other settings (from epoch 1, --epochs 2 -> 4); d.pth (epoch 3) was saved after "
        "them: the settings compared here are the ones it was saved with"]
    other = {**vit, "config": {**vit["config"], "distillation_type": "none"}}  # a ViT labelled DeiT
    assert not [n for n in comparison_notes(("v.pth", vit), ("d.pth", other), str(tiny_shards), m, {})
                if "--distillation-type none" in n]


def test_a_model_that_did_not_distil_gets_no_teacher_row_from_an_unused_teacher_ckpt(runs, tmp_path):
    import shutil

    vit = tmp_path / "vit"  # a ViT labelled DeiT here, trained with a --teacher-ckpt it had no token to use
    shutil.copytree(runs / "baseline_vit_tiny", vit)
    state = torch.load(vit / "best.pth", weights_only=True)
    state["config"].update(teacher_ckpt=str(runs / "teacher_resnet18" / "best.pth"), distillation_type="hard")
    torch.save(state, vit / "best.pth")
    w = make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(vit / "best.pth"), num_images=2, workers=0,
                 report_dir=str(tmp_path / "report"), out=str(tmp_path / "p.png"))
    assert "| teacher |" not in (tmp_path / "report" / "report.md").read_text()
    assert w["notes"] == [f"--deit {vit / 'best.pth'} holds a vit_tiny, labelled DeiT here"]


def test_too_many_images_is_refused_before_any_val_pass_and_swapped_or_repeated_checkpoints_are_named(
        runs, tmp_path, monkeypatch):
    from vitdeit import report
    from vitdeit.errors import SettingError

    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    kw = dict(report_dir=None, workers=0, out=str(tmp_path / "p.png"))
    predict = report.predict
    monkeypatch.setattr(report, "predict", lambda *a, **k: pytest.fail("predicted before checking --num-images"))
    with pytest.raises(SettingError, match="--num-images 25: must be between 1 and the 24 val images"):
        make_all(vit, deit, num_images=25, **kw)
    monkeypatch.setattr(report, "predict", predict)
    w = make_all(deit, vit, num_images=2, **kw)
    assert w["notes"] == [f"--vit {deit} holds a deit_tiny_distill, labelled ViT here",
                          f"--deit {vit} holds a vit_tiny, labelled DeiT here"]
    again = str(runs / "baseline_vit_tiny" / ".." / "baseline_vit_tiny" / "best.pth")  # the same file, spelt otherwise
    w = make_all(vit, again, num_images=2, **kw)
    assert w["notes"][:2] == [f"--vit and --deit are the same file, {vit}: the comparison is of one model with itself",
                              f"--deit {again} holds a vit_tiny, labelled DeiT here"]


def test_a_run_without_a_finished_epoch_is_an_error_naming_its_metrics(runs, tmp_path):
    import shutil

    vit = tmp_path / "vit"
    shutil.copytree(runs / "baseline_vit_tiny", vit)
    (vit / "metrics.jsonl").write_text("")  # a fresh run in this folder, killed in its first epoch
    with pytest.raises(DataError, match=f"{vit / 'metrics.jsonl'}: no finished epoch yet"):
        make_all(str(vit / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"), num_images=2,
                 report_dir=str(tmp_path / "report"), workers=0, out=str(tmp_path / "p.png"))


def test_the_cut_line_left_out_is_the_last_one_with_text_blank_lines_after_it_or_not(tmp_path):
    from vitdeit.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1, "tra\n\n  \n')  # (blank lines after: an editor's, say)
    notes = []
    assert read_metrics(tmp_path, dropped=notes) == [{"epoch": 0}]
    assert notes == [f"{path} line 2 is cut short (a run writing it now, or stopped mid-write): left out"]
    path.write_text('{"epoch": 0, "tra\n{"epoch": 1}\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: not a JSON object")):
        read_metrics(tmp_path, dropped=[])


def test_a_runs_last_metrics_line_cut_short_is_left_out_with_a_note_and_one_before_it_is_an_error(runs, tmp_path):
    import shutil

    vit = tmp_path / "vit"
    shutil.copytree(runs / "baseline_vit_tiny", vit)
    whole = (vit / "metrics.jsonl").read_text()
    (vit / "metrics.jsonl").write_text(whole + '{"epoch": 2, "train_loss": 1.2')  # the next epoch's, mid-write
    kw = dict(num_images=2, report_dir=str(tmp_path / "report"), workers=0, out=str(tmp_path / "p.png"))
    make_all(str(vit / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"), **kw)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert f"{vit / 'metrics.jsonl'} line 3 is cut short (a run writing it now, or stopped mid-write): left out" in (
        report["notes"])
    vit_row = next(r for r in report["runs"] if r["run"] == "ViT")
    assert (vit_row["epochs"], vit_row["last_epoch"]) == (2, 1)  # the two whole lines
    (vit / "metrics.jsonl").write_text('{"epoch": 0, "tr\n' + whole.splitlines()[1] + "\n")  # not the last line
    with pytest.raises(DataError, match=re.escape(f"{vit / 'metrics.jsonl'} line 1: not a JSON object")):
        make_all(str(vit / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"), **kw)


def test_shards_named_by_the_checkpoint_but_not_here_ask_for_data_path(runs, tmp_path, monkeypatch):
    from vitdeit.errors import MissingFile

    monkeypatch.chdir(tmp_path)  # the checkpoint's data_path is relative to where it trained, as the demo's is
    state = torch.load(runs / "baseline_vit_tiny" / "best.pth", weights_only=True)
    state["config"]["data_path"] = "demo_shards"
    state["data_dir"] = str(tmp_path / "gone")  # the folder they resolved to then: not here (another machine's)
    torch.save(state, tmp_path / "vit.pth")
    with pytest.raises(MissingFile, match=r"vit\.pth was trained on demo_shards, .*pass the shards with --data-path"):
        make_all(str(tmp_path / "vit.pth"), str(runs / "deit_tiny_distill" / "best.pth"), report_dir=None)


@pytest.mark.parametrize("data_dir", ["kept", "none", "emptied"])
def test_runs_started_in_another_folder_find_their_shards_and_teacher_from_here(runs, tiny_shards, tmp_path,
                                                                                 monkeypatch, data_dir):
    import shutil

    project = tmp_path / "project"  # where `train.py --data-path shards --output-dir runs` ran, paths typed relative
    shutil.copytree(runs, project / "runs")
    (project / "shards").symlink_to(tiny_shards)
    for run, extra in (("baseline_vit_tiny", {}), ("deit_tiny_distill",
                                                   {"teacher_ckpt": "runs/teacher_resnet18/best.pth"})):
        path = project / "runs" / run / "best.pth"
        state = torch.load(path, weights_only=True)
        state["config"].update(data_path="shards", output_dir="runs", **extra)
        if data_dir == "none":  # saved before the resolved folder was kept: the path as typed, from where it ran
            del state["data_dir"]
        elif data_dir == "emptied":  # a folder still, its shards gone (moved, a link pointed elsewhere)
            (tmp_path / "emptied").mkdir(exist_ok=True)
            state["data_dir"] = str(tmp_path / "emptied")
        torch.save(state, path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # viz.py run from another folder, no --data-path, no --teacher-run
    w = make_all("../project/runs/baseline_vit_tiny/best.pth", "../project/runs/deit_tiny_distill/best.pth",
                 num_images=2, out=str(tmp_path / "p.png"), report_dir=str(tmp_path / "report"), workers=0)
    assert w["comparison"]["data_path"] == str(tiny_shards.resolve() if data_dir == "kept" else project / "shards")
    assert [s["run"] for s in w["summaries"]] == ["teacher", "ViT", "DeiT"] and not w["notes"]


def test_the_comparison_counts_per_class_accuracy_gains_losses_agreement_and_both_right():
    cm = ClassMap.from_labels({"n00000001": "alpha, a", "n00000002": "beta", "n00000003": "gamma",
                               "n00000004": "delta"})  # the 4th class has no val image here: no row
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    vit = [0, 1, 2, 1, 1, 1, 0, 2, 2, 2, 2, 2]  # right: 1 of class 0, 2 of class 1, 4 of class 2
    deit = [0, 0, 0, 0, 1, 1, 1, 0, 2, 0, 1, 2]  # right: 4, 3, 2
    as_preds = lambda name, p: Predictions(name, np.array(labels), np.array(p), np.ones(12), 0.875)
    comp = comparison(cm, as_preds("ViT", vit), as_preds("DeiT", deit))
    rows = [(r["class"], r["name"], r["images"], r["vit_top1"], r["deit_top1"], r["delta"]) for r in comp["per_class"]]
    assert rows == [("n00000001", "alpha", 4, 25.0, 100.0, 75.0), ("n00000002", "beta", 4, 50.0, 75.0, 25.0),
                    ("n00000003", "gamma", 4, 100.0, 50.0, -50.0)]
    assert [r["class"] for r in comp["gains"]] == ["n00000001", "n00000002"]  # largest gain first
    assert [r["class"] for r in comp["losses"]] == ["n00000003"]
    assert [r["class"] for r in comparison(cm, as_preds("ViT", vit), as_preds("DeiT", deit), top=1)["gains"]] == [
        "n00000001"]
    same = sum(v == d for v, d in zip(vit, deit))  # images 0, 4, 5, 8, 11: 5 of 12
    both = sum(v == y == d for v, d, y in zip(vit, deit, labels))  # images 0, 4, 5, 8, 11: 5 of 12
    assert (same, both) == (5, 5)
    assert (comp["agreement"], comp["both_right"], comp["val_images"]) == (pytest.approx(100 * 5 / 12),
                                                                          pytest.approx(100 * 5 / 12), 12)
    assert comp["classes_without_val_images"] == ["n00000004"]
    # the paired counts, by hand: DeiT alone right on images 1, 2, 3 and 6, ViT alone on 9 and 10 (7: both wrong)
    only_deit = [i for i, (v, d, y) in enumerate(zip(vit, deit, labels)) if d == y != v]
    only_vit = [i for i, (v, d, y) in enumerate(zip(vit, deit, labels)) if v == y != d]
    assert (only_deit, only_vit) == ([1, 2, 3, 6], [9, 10])  # unequal: a swap of the two counts shows
    assert (comp["deit_only_right"], comp["vit_only_right"]) == (4, 2)
    assert comp["mcnemar_p"] == pytest.approx(2 * (1 + 6 + 15) / 2 ** 6)  # 2 of 6 discordant: 2 x P(X <= 2) = 0.6875


@pytest.mark.parametrize("b,c,p", [(7, 1, 2 * (1 + 8) / 2 ** 8), (1, 7, 2 * (1 + 8) / 2 ** 8), (10, 0, 2 / 2 ** 10),
                                   (3, 3, 1.0), (0, 0, 1.0), (4, 5, 1.0)])
def test_mcnemars_exact_p_is_the_two_sided_binomial_tail_of_the_discordant_split(b, c, p):
    assert mcnemar_exact_p(b, c) == pytest.approx(p)  # (3, 3): the two tails overlap (42 / 64 each): capped at 1


def test_mcnemars_exact_p_matches_a_binomial_by_enumeration_and_stays_finite_on_a_large_val_set():
    from itertools import product

    n = 10  # every split of 10 discordant images, each 1/2 ** 10 likely under the null
    for b in range(n + 1):
        at_least_as_uneven = sum(abs(sum(x) - n / 2) >= abs(b - n / 2) for x in product((0, 1), repeat=n))
        assert mcnemar_exact_p(b, n - b) == pytest.approx(at_least_as_uneven / 2 ** n)
    assert 0 < mcnemar_exact_p(2400, 2600) < 0.01 and mcnemar_exact_p(2500, 2500) == 1.0  # ImageNet-100's 5,000 val


def test_the_report_renders_the_comparison_gains_losses_and_classes_by_delta():
    cm = ClassMap.from_labels({"n00000001": "alpha, a", "n00000002": "beta", "n00000003": "gamma"})
    labels = np.array([0, 0, 1, 1, 2, 2])
    vit, deit = np.array([1, 1, 1, 0, 2, 2]), np.array([0, 0, 1, 0, 2, 1])  # DeiT: +100 alpha, 0 beta, -50 gamma
    comp = comparison(cm, Predictions("ViT", labels, vit, np.ones(6), 0.875),
                      Predictions("DeiT", labels, deit, np.ones(6), 0.875))
    run = {"run": "ViT", "model": "vit_tiny", "val_top1": 1.0, "val_top5": 2.0, "best_epoch": 0, "last_epoch": 0,
           "checkpoint_epoch": 0, "params": 1e6, "train_images_per_s": 1.0, "trained_on": [None], "data_path": "s",
           "img_size": 32}
    md = report_markdown([run], comp, ("ViT", "DeiT")).splitlines()
    section = md[md.index("## Where ViT and DeiT differ (6 val images)"):]
    # the same class on images 2, 3 and 4 (3 of 6); both right on 2 and 4 (2 of 6)
    assert section[2] == "They predict the same class on 50.0% of the val images; both are right on 33.3%."
    # DeiT alone right on images 0 and 1, ViT alone on 5: 4 of 6 against 3 of 6, and 2 * (1 + 3) / 2 ** 3 caps at 1
    assert section[4].startswith("DeiT - ViT: +16.7 points on these 6 images (DeiT alone right on 2, ViT alone on 1; "
                                 "McNemar's exact test p = 1). One val set and one seed each")
    assert "**Classes DeiT gains most:** alpha (0% → 100%)" in section
    assert "**Classes DeiT loses most:** gamma (100% → 50%)" in section
    assert section[-3:] == ["| alpha | n00000001 | 2 | 0.0 | 100.0 | +100.0 |",  # largest gain first
                            "| beta | n00000002 | 2 | 50.0 | 50.0 | +0.0 |",
                            "| gamma | n00000003 | 2 | 100.0 | 50.0 | -50.0 |"]
    assert comp["classes_without_val_images"] == []
    md = report_markdown([run], {**comp, "data_path": "/data/other", "classes_without_val_images": ["n00000009"]},
                         ("ViT", "DeiT")).splitlines()  # viz.py --data-path: the shards of this pass, named
    assert "## Where ViT and DeiT differ (6 val images of /data/other)" in md
    assert md[-1] == "No row for 1 class(es) with no val images here: n00000009."


def test_the_classes_deit_loses_most_come_biggest_loss_first_cut_to_top():
    cm = ClassMap.from_labels({f"n0000000{i}": f"c{i}" for i in range(1, 5)})
    labels = np.repeat(np.arange(4), 4)  # 4 images a class; ViT right on all 16
    deit = labels.copy()
    deit[[0]], deit[[4, 5, 6]], deit[[8, 9]] = 1, 0, 0  # DeiT: class 1 at 75 %, class 2 at 25 %, class 3 at 50 %
    p = lambda name, pred: Predictions(name, labels, pred, np.ones(16), 0.875)  # noqa: E731
    comp = comparison(cm, p("ViT", labels), p("DeiT", deit))
    assert [(r["class"], r["delta"]) for r in comp["losses"]] == [
        ("n00000002", -75.0), ("n00000003", -50.0), ("n00000001", -25.0)]  # (class 4: 100 % both, no loss)
    top2 = comparison(cm, p("ViT", labels), p("DeiT", deit), top=2)
    assert [r["class"] for r in top2["losses"]] == ["n00000002", "n00000003"]  # the two largest, not the smallest
    assert "**Classes DeiT loses most:** c2 (100% → 25%), c3 (100% → 50%)" in report_markdown([], top2,
                                                                                             ("ViT", "DeiT"))


def test_a_class_both_score_the_same_on_is_neither_a_gain_nor_a_loss():
    cm = ClassMap.from_labels({"n00000001": "a", "n00000002": "b", "n00000003": "c"})
    labels = np.array([0, 0, 1, 1, 2, 2])
    vit = np.array([0, 1, 1, 0, 2, 2])  # right: 1 of class 0, 1 of class 1, 2 of class 2
    deit = np.array([0, 0, 0, 1, 2, 2])  # right: 2, 1 (another image), 2
    comp = comparison(cm, Predictions("ViT", labels, vit, np.ones(6), 0.875),
                      Predictions("DeiT", labels, deit, np.ones(6), 0.875))
    assert [(r["class"], r["delta"]) for r in comp["per_class"]] == [("n00000001", 50.0), ("n00000002", 0.0),
                                                                      ("n00000003", 0.0)]
    assert [r["class"] for r in comp["gains"]] == ["n00000001"] and comp["losses"] == []


def test_runs_whose_best_epoch_is_not_their_last_have_their_last_epochs_top1_said_under_the_table():
    from vitdeit.report import report_markdown, run_summary

    comp = {"per_class": [], "gains": [], "losses": [], "agreement": 50.0, "both_right": 40.0, "val_images": 10,
            "deit_only_right": 1, "vit_only_right": 1, "mcnemar_p": 1.0}

    def summary(run, top1s):  # a run's val top-1 per epoch
        rows = [{"epoch": e, "val_top1": t, "val_top5": 90.0, "images_per_s": 1.0} for e, t in enumerate(top1s)]
        return run_summary(run, rows, {"config": {"model": "vit_tiny"}, "epoch": len(rows) - 1}, 1)

    vit, deit = summary("ViT", [30.0, 52.5, 48.25]), summary("DeiT", [30.0, 40.0, 50.0])
    assert (vit["val_top1"], vit["best_epoch"], vit["last_val_top1"]) == (52.5, 1, 48.25)
    note = ("Each best epoch is picked by the val top-1 it is scored on (ImageNet-100 has no other held-out split; the "
            "DeiT reference picks so too), which flatters it a little; the last epochs scored ")
    md = report_markdown([vit, deit], comp, ("ViT", "DeiT")).splitlines()
    assert [line for line in md if line.startswith(note)] == [note + "ViT 48.25%."]  # DeiT's best is its last
    md = report_markdown([vit, summary("DeiT", [60.0, 40.0, 50.0])], comp, ("ViT", "DeiT")).splitlines()
    assert [line for line in md if line.startswith(note)] == [note + "ViT 48.25%, DeiT 50.00%."]
    assert not any(line.startswith(note) for line in report_markdown([deit], comp, ("ViT", "DeiT")).splitlines())


def test_a_teacher_row_from_other_val_images_says_so_beside_the_deit_runs_figure():
    def summary(run, model, top1, data, size, **extra):
        return {"run": run, "model": model, "val_top1": top1, "val_top5": 90.0, "best_epoch": 1, "last_epoch": 1,
                "checkpoint_epoch": 1, "params": 1e6, "train_images_per_s": 1.0, "trained_on": [None],
                "data_path": data, "img_size": size, **extra}

    comp = {"val_images": 2, "agreement": 50.0, "both_right": 0.0, "gains": [], "losses": [], "per_class": [],
            "deit_only_right": 0, "vit_only_right": 1, "mcnemar_p": 1.0}
    deit = summary("DeiT", "deit_tiny_distill", 40.0, "b", 16, val_top1_cls_head=41.0, val_top1_dist_head=39.0,
                   teacher_val_top1=1.01)
    for data, size, said in (("a", 32, " The teacher row is its own run's best epoch, on a at 32 px."),
                             ("b", 32, " The teacher row is its own run's best epoch, on b at 32 px."),
                             ("a", 16, " The teacher row is its own run's best epoch, on a at 16 px."),
                             ("b", 16, "")):  # the same val images and size: the row and the figure agree, or
        # differ by an image or two evaluated again (another classifier precision or loader), not by other data
        md = report_markdown([summary("teacher", "resnet18", 2.5, data, size), deit], comp, ("ViT", "DeiT"))
        assert ("The teacher it distilled from: val top-1 1.01%, as the DeiT run evaluated it on b at 16 px."
                + said) in md.splitlines()


def test_a_tied_best_val_top1_is_the_earliest_epoch_the_one_best_pth_keeps():
    from vitdeit.report import run_summary

    rows = [{"epoch": 0, "val_top1": 10.0, "val_top5": 50.0, "images_per_s": 1.0},
            {"epoch": 1, "val_top1": 100.0, "val_top5": 100.0, "images_per_s": 2.0},  # best.pth is this epoch's
            {"epoch": 2, "val_top1": 100.0, "val_top5": 100.0, "images_per_s": 2.0},  # a tie: best.pth is kept
            {"epoch": 3, "val_top1": 90.0, "val_top5": 100.0, "images_per_s": 2.0}]
    s = run_summary("ViT", rows, {"config": {"model": "vit_tiny", "epochs": 4}, "epoch": 1}, 1)
    assert s["best_epoch"] == 1 == s["checkpoint_epoch"]
    comp = {"val_images": 2, "agreement": 50.0, "both_right": 0.0, "gains": [], "losses": [], "per_class": [],
            "deit_only_right": 1, "vit_only_right": 0, "mcnemar_p": 1.0}
    md = report_markdown([s], comp, ("ViT", "DeiT"))
    assert "| 1 / 3 |" in md and "the checkpoint read here is from epoch" not in md  # (no false "not the best")


def test_the_run_summary_is_the_best_val_epochs_with_the_median_speed_of_the_epochs_after_the_first():
    from vitdeit.report import run_summary

    rows = [{"epoch": 0, "val_top1": 20.0, "val_top5": 60.0, "images_per_s": 50.0},  # compiling: slow
            {"epoch": 1, "val_top1": 45.0, "val_top5": 80.0, "images_per_s": 400.0, "val_top1_cls_head": 44.0,
             "val_top1_dist_head": 43.0, "teacher_val_top1": 70.0},
            {"epoch": 2, "val_top1": 40.0, "val_top5": 85.0, "images_per_s": 420.0, "val_top1_cls_head": 41.0,
             "val_top1_dist_head": 42.0, "teacher_val_top1": 70.0}]
    s = run_summary("DeiT", rows, {"config": {"model": "deit_tiny_distill", "data_path": "s", "img_size": 32,
                                              "epochs": 3}, "epoch": 2}, 5_000_000)
    assert s == {"run": "DeiT", "model": "deit_tiny_distill", "best_epoch": 1, "val_top1": 45.0, "val_top5": 80.0,
                 "params": 5_000_000, "epochs": 3, "epochs_planned": 3, "last_epoch": 2, "last_val_top1": 40.0,
                 "checkpoint_epoch": 2,
                 "train_images_per_s": 410.0, "trained_on": [None],  # (rows of an earlier vitdeit: no machine)
                 "val_top1_cls_head": 44.0, "val_top1_dist_head": 43.0, "teacher_val_top1": 70.0, "data_path": "s",
                 "img_size": 32}
    assert run_summary("ViT", rows[:1], {"config": {"model": "vit_tiny"}, "epoch": 0}, 1)["train_images_per_s"] == 50.0


GPU = {"cpu": "Intel Xeon", "cpu_count": 16, "gpu": "NVIDIA H100 80GB HBM3", "processes": 8, "torch": "2.11.0"}
CPU = {"cpu": "AMD EPYC 7B13", "cpu_count": 2, "gpu": None, "processes": 1, "torch": "2.14.1"}


def test_a_runs_images_per_s_name_the_machines_its_timed_epochs_ran_on():
    from vitdeit.report import run_summary

    def rows(*machines):  # epoch e recorded machines[e] (None: nothing recorded on that line)
        return [{"epoch": e, "val_top1": 1.0, "val_top5": 1.0, "images_per_s": 1.0, **({"machine": m} if m else {})}
                for e, m in enumerate(machines)]

    ckpt = {"config": {"model": "vit_tiny"}, "epoch": 0}
    on = lambda *m: run_summary("ViT", rows(*m), ckpt, 1)["trained_on"]  # noqa: E731
    assert on(CPU, None, None) == ["AMD EPYC 7B13, 2 cores; torch 2.14.1"]  # epoch 0's, carried on
    assert on(CPU) == ["AMD EPYC 7B13, 2 cores; torch 2.14.1"]  # one epoch: it is the one timed
    # resumed on the GPUs at epoch 2: both; resumed there at epoch 1: the timed epochs (1-2) all ran there
    assert on(CPU, None, GPU) == ["AMD EPYC 7B13, 2 cores; torch 2.14.1", "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"]
    assert on(CPU, GPU, None) == ["NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"]
    assert on(None, None, GPU) == [None, "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"]  # an earlier vitdeit's, then
    # in turn: back on the CPU after the GPUs is a third stretch; staying on one machine through a resume, one
    cpu, gpu = "AMD EPYC 7B13, 2 cores; torch 2.14.1", "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"
    assert on(None, CPU, GPU, CPU) == [cpu, gpu, cpu] and on(None, CPU, None, CPU) == [cpu]


def test_the_report_names_each_runs_machine_and_says_when_they_differ():
    from vitdeit.report import report_markdown

    comp = {"per_class": [], "gains": [], "losses": [], "agreement": 50.0, "both_right": 40.0, "val_images": 10,
            "deit_only_right": 1, "vit_only_right": 1, "mcnemar_p": 1.0}

    def summary(run, trained_on):
        return {"run": run, "model": "vit_tiny", "val_top1": 50.0, "val_top5": 90.0, "best_epoch": 1, "last_epoch": 1,
                "checkpoint_epoch": 1, "params": 5e6, "train_images_per_s": 100.0, "trained_on": trained_on}

    cpu, gpu = "AMD EPYC 7B13, 2 cores; torch 2.14.1", "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"
    # a teacher trained elsewhere: its own model, no note (ViT's and DeiT's are the speeds compared)
    md = report_markdown([summary("teacher", [gpu]), summary("ViT", [cpu]), summary("DeiT", [cpu])], comp,
                         ("ViT", "DeiT")).splitlines()
    assert f"| ViT | vit_tiny | 50.00 | 90.00 | 1 / 1 | 5.00 M | 100 | {cpu} |" in md
    assert f"| teacher | vit_tiny | 50.00 | 90.00 | 1 / 1 | 5.00 M | 100 | {gpu} |" in md
    assert not any("different machines" in line or "stretches" in line for line in md)
    md = report_markdown([summary("ViT", [cpu]), summary("DeiT", [None, gpu])], comp, ("ViT", "DeiT")).splitlines()
    assert f"| DeiT | vit_tiny | 50.00 | 90.00 | 1 / 1 | 5.00 M | 100 | not recorded, then {gpu} |" in md
    assert ("ViT's and DeiT's images/s were measured on different machines or software (or not recorded for one): "
            "they compare those too, not only the models.") in md
    assert ("DeiT: its images/s are the median of epochs run in 2 stretches on the machines the table names in turn "
            "where recorded (not by an earlier vitdeit, nor where a start's line was lost).") in md  # (not "elsewhere")
    md = report_markdown([summary("ViT", [cpu]), summary("DeiT", [cpu, gpu])], comp, ("ViT", "DeiT")).splitlines()
    assert ("DeiT: its images/s are the median of epochs run in 2 stretches on the machines the table names in turn "
            "(resumed elsewhere): its `metrics.jsonl` records each start's.") in md
    md = report_markdown([summary("ViT", [gpu]), summary("DeiT", [cpu])], comp, ("ViT", "DeiT")).splitlines()
    assert sum("different machines" in line for line in md) == 1 and not any("stretches" in line for line in md)


def test_predictions_are_the_mean_of_deits_two_heads_with_its_softmax_confidence(tiny_shards):
    manifest = load_manifest(tiny_shards)
    c = len(manifest["classes"])
    cls_logits, dist_logits = torch.zeros(c), torch.zeros(c)
    cls_logits[0], dist_logits[1] = 2.0, 3.0  # class head says 0, distillation head 1, their mean [1, 1.5, 0..] 1
    seen = []  # the images predict() fed the model

    class TwoHeads(torch.nn.Module):  # what head_logits reads of a timm DeiT
        def forward_features(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 2, 1)

        def head(self, f):
            return f + cls_logits

        def head_dist(self, f):
            return f + dist_logits

    p = predict(TwoHeads(), {"config": {"img_size": 32, "crop_pct": 0.875}}, tiny_shards, manifest, "DeiT", workers=0)
    assert len(p.pred) == manifest["splits"]["val"]["num_samples"] and set(p.pred.tolist()) == {1}
    mean = [1.0, 1.5] + [0.0] * (c - 2)
    expected = np.exp(1.5) / sum(np.exp(v) for v in mean)
    assert np.allclose(p.conf, expected, rtol=1e-6)
    # the val images are resized with the run's filter
    assert p.interpolation == "bilinear"  # a checkpoint saved before --interpolation existed
    cubic = predict(TwoHeads(), {"config": {"img_size": 32, "crop_pct": 0.875, "interpolation": "bicubic"}},
                    tiny_shards, manifest, "DeiT", workers=0, batch_size=1000)
    expected_images = next(iter(TorchLoader(tiny_shards, manifest, "val", batch_size=1000, img_size=32, workers=0,
                                            interpolation="bicubic")))[0]
    assert cubic.interpolation == "bicubic" and torch.equal(seen[-1], expected_images)
    assert not torch.equal(seen[0], seen[-1])  # the first call's bilinear images: the filter changed what it saw
    cls_logits[:], dist_logits[:] = 0.0, 0.0  # every class tied: the first, as evaluate() scores top-1
    tied = predict(TwoHeads(), {"config": {"img_size": 32, "crop_pct": 0.875}}, tiny_shards, manifest, "DeiT",
                   workers=0)
    assert set(tied.pred.tolist()) == {0} and np.allclose(tied.conf, 1 / c, rtol=1e-6)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_the_figure_shows_each_image_resized_with_the_models_filter_and_crop(tiny_shards, crop_pct):
    manifest = load_manifest(tiny_shards)
    n = manifest["splits"]["val"]["num_samples"]
    p = Predictions("x", np.zeros(n, int), np.zeros(n, int), np.ones(n), crop_pct, "bicubic")
    fig = prediction_figure(tiny_shards, manifest, [p], [3, 0], display_px=48)
    for ax, idx in zip(fig.axes, [3, 0]):  # each panel its own image
        expected = ShardSamples(tiny_shards, manifest, "val", ValTransform(48, crop_pct, "bicubic"))[idx][0]
        assert np.array_equal(np.asarray(ax.images[0].get_array()), expected)
        bilinear = ShardSamples(tiny_shards, manifest, "val", ValTransform(48, crop_pct, "bilinear"))[idx][0]
        assert not np.array_equal(expected, bilinear)  # the two filters differ on this image
        other = ShardSamples(tiny_shards, manifest, "val", ValTransform(48, 1.875 - crop_pct, "bicubic"))[idx][0]
        assert not np.array_equal(expected, other)  # nor do the two crops
        assert not ax.axison  # a picture: no ticks, no frame


def test_a_checkpoint_with_the_same_classes_in_another_order_is_refused():
    cm = ClassMap.from_labels({"n00000001": "a", "n00000002": "b"})
    check_class_map({"classes": ["n00000001", "n00000002"], "config": {}}, cm, "x.pth")
    with pytest.raises(DataError, match="x.pth was trained on the same classes in another order"):
        check_class_map({"classes": ["n00000002", "n00000001"], "config": {}}, cm, "x.pth")


def test_the_curves_show_whole_epochs_numbered_as_metrics_and_say_what_each_loss_is():
    from vitdeit.report import curves_figure

    row = lambda e, **k: {"epoch": e, "train_loss": 2.0 - e, "val_loss": 2.1 - e, "train_top1": 10.0 * e,  # noqa
                          "val_top1": 11.0 * e, **k}
    # DeiT's history starts at epoch 1 (a resume from a folder without metrics.jsonl): drawn at its own epochs
    deit = [row(1, teacher_val_top1=60.0), row(2, teacher_val_top1=60.0)]
    fig = curves_figure({"ViT": [row(0), row(1)], "DeiT": deit})
    fig.canvas.draw()
    loss, top1 = fig.axes[:2]
    assert loss.get_title() == ("train (dashed): the loss as trained, with its label smoothing, Mixup/CutMix if any,\n"
                                "+ the distillation term for DeiT; val (solid): plain CE")
    for ax in (loss, top1):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # epochs 0 to 2, not 0.25, 0.5, ...
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[0, 1]] * 2 + [[1, 2]] * 2  # as metrics.jsonl
    for ax, what in ((loss, "loss"), (top1, "top1")):  # each line the metric its legend names, dashed for train
        assert all(line.get_marker() not in (None, "", "None") for line in ax.get_lines())  # one epoch: a point
        lines = {(line.get_label(), line.get_linestyle()): list(line.get_ydata()) for line in ax.get_lines()}
        assert lines == {(f"{name} {split}", "--" if split == "train" else "-"): [r[f"{split}_{what}"] for r in rows]
                         for name, rows in (("ViT", [row(0), row(1)]), ("DeiT", deit)) for split in ("train", "val")}
    for one in (curves_figure({"ViT": [row(0)]}), curves_figure({"ViT": [row(3)], "DeiT": [row(3)]})):  # a --quick
        for ax in one.axes[:2]:  # one epoch: its own tick, not -0.04 ... 0.04
            e = ax.get_lines()[0].get_xdata()[0]
            assert list(ax.get_xticks()) == [e] and ax.get_xlim() == (e - 0.5, e + 0.5)
    plain = curves_figure({"ViT": [row(0), row(1)]}).axes[0]
    assert plain.get_title() == ("train (dashed): the loss as trained, with its label smoothing, Mixup/CutMix if any; "
                                 "val (solid): plain CE")


@pytest.mark.parametrize("out, report, said", [
    ("{tmp}/file/p.png", None, "--out {tmp}/file/p.png: its folder {tmp}/file cannot be made ({tmp}/file is a file)"),
    ("{tmp}", None, "--out {tmp}: a folder; name a picture file, e.g. --out {tmp}/vit_vs_deit_random10.png"),
    ("{tmp}/p.png", "{tmp}/file", "--report-dir {tmp}/file: cannot be made ({tmp}/file is a file)"),
    ("{tmp}/p.png", "{tmp}/file/r", "--report-dir {tmp}/file/r: cannot be made ({tmp}/file is a file)"),
    ("{tmp}/gone/p.png", None, "--out {tmp}/gone/p.png: its folder {tmp}/gone cannot be made ({tmp}/gone is a link to "
                               "nowhere)"),
    ("{tmp}/link/p.png", None, "--out {tmp}/link/p.png: its folder {tmp}/link cannot be made ({tmp}/link is a file)"),
    # a folder that is there but takes no file (root too: tried, not asked)
    ("/proc/p.png", None, "--out /proc/p.png: its folder /proc cannot be written in (No such file or directory in "
                          "/proc); pass another --out")])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_val_pass(runs, tmp_path, monkeypatch, out,
                                                                              report, said):
    from vitdeit import report as rep
    from vitdeit.errors import SettingError

    (tmp_path / "file").write_text("x")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a link whose target was removed
    (tmp_path / "link").symlink_to(tmp_path / "file")  # a link to a file
    monkeypatch.setattr(rep, "predict", lambda *a, **k: pytest.fail("predicted before checking the outputs"))
    with pytest.raises(SettingError, match=re.escape(said.format(tmp=tmp_path))):
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"),
                 out=out.format(tmp=tmp_path), report_dir=report and report.format(tmp=tmp_path), workers=0)


def test_a_refused_comparison_leaves_no_empty_output_folders(runs, tmp_path):
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError, match="--num-images 0"):  # refused after the outputs' paths were checked
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"),
                 num_images=0, out=str(tmp_path / "new" / "sub" / "p.png"), report_dir=str(tmp_path / "rep" / "deep"),
                 workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_report_that_cannot_be_written_is_one_error_naming_the_file(runs, tmp_path, monkeypatch):
    import errno

    from vitdeit.errors import WriteFailed

    write_text = Path.write_text

    def full_disk(self, *a, **k):
        if self.name == "report.md":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteFailed, match=re.escape(f"could not write {tmp_path / 'r' / 'report.md'}: [Errno 28] No "
                                                    f"space left on device") + r".*pass another --report-dir"):
        make_all(str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth"),
                 num_images=2, out=str(tmp_path / "p.png"), report_dir=str(tmp_path / "r"), workers=0)
    assert (tmp_path / "p.png").is_file() and (tmp_path / "r" / "curves.png").is_file()  # what came before is kept


def test_a_run_folder_or_a_checkpoint_without_its_metrics_is_named_before_any_val_pass(runs, tmp_path, monkeypatch):
    import shutil

    from vitdeit import report as rep

    monkeypatch.setattr(rep, "predict", lambda *a, **k: pytest.fail("predicted before checking the report's runs"))
    deit = str(runs / "deit_tiny_distill" / "best.pth")
    with pytest.raises(MissingFile, match=re.escape(f"--vit {runs / 'baseline_vit_tiny'}: a folder, not a checkpoint; "
                                                    f"pass the checkpoint in it, e.g. --vit "
                                                    f"{runs / 'baseline_vit_tiny' / 'best.pth'}")):
        make_all(str(runs / "baseline_vit_tiny"), deit, report_dir=None, out=str(tmp_path / "p.png"))
    shutil.copy(runs / "baseline_vit_tiny" / "best.pth", tmp_path / "vit.pth")  # copied out of its run folder
    with pytest.raises(MissingFile, match=re.escape(f"{tmp_path / 'metrics.jsonl'}: no metrics; ") +
                       r".*metrics\.jsonl of each run: pass the ViT checkpoint in its train\.py run folder, or "
                       r"--no-report for the picture alone\."):
        make_all(str(tmp_path / "vit.pth"), deit, num_images=2, out=str(tmp_path / "p.png"),
                 report_dir=str(tmp_path / "r"), workers=0)


def test_the_picture_is_titled_with_each_models_score_on_its_images_and_sets_each_panels_lines_apart(tiny_shards):
    manifest = load_manifest(tiny_shards)
    n = manifest["splits"]["val"]["num_samples"]
    labels = np.arange(n) % 4
    vit_pred, deit_pred = labels.copy(), labels.copy()
    vit_pred[5], deit_pred[0], deit_pred[5] = (labels[5] + 1) % 4, (labels[0] + 1) % 4, (labels[5] + 1) % 4
    preds = [Predictions("ViT", labels, vit_pred, np.ones(n), 0.875),  # over all 24 images: right on 23 and 22,
             Predictions("DeiT", labels, deit_pred, np.ones(n), 0.875)]  # on images 3, 0 and 5: on 2 and 1
    fig = prediction_figure(tiny_shards, manifest, preds, [3, 0, 5])
    assert fig._suptitle.get_text() == ("ViT vs DeiT on 3 random val images (right here: ViT 67%, DeiT 33%; "
                                        "green = right, red = wrong)")
    assert len(fig.axes) == 3  # one column per image when there are fewer than 5, no empty ones
    for ax in fig.axes:
        truth, *predicted = ax.texts  # the truth in bold black, then each model's; each line below the last
        assert (truth.get_color(), truth.get_fontweight()) == ("black", "bold")
        assert [t.get_fontweight() for t in predicted] == ["normal", "normal"]
        heights = [t.get_position()[1] for t in ax.texts]
        assert heights == sorted(heights, reverse=True) and len(set(heights)) == 3


def test_each_run_keeps_one_colour_on_both_panels_named_in_one_legend_on_labelled_axes():
    from vitdeit.report import curves_figure

    row = lambda e: {"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "train_top1": 1.0, "val_top1": 1.0}  # noqa
    fig = curves_figure({"teacher": [row(0)], "ViT": [row(0), row(1)], "DeiT": [row(0), row(1)]})
    loss, top1 = fig.axes[:2]
    colours = {}
    for ax in (loss, top1):
        for line in ax.get_lines():  # "ViT train", "ViT val", ...: a run's two lines in its colour, on both panels
            colours.setdefault(line.get_label().split()[0], set()).add(line.get_color())
    assert list(colours) == ["teacher", "ViT", "DeiT"] and all(len(c) == 1 for c in colours.values())
    assert len(set.union(*colours.values())) == 3  # and three runs, three colours
    assert loss.get_legend() is None and [t.get_text() for t in top1.get_legend().get_texts()] == [
        f"{name} {split}" for name in colours for split in ("train", "val")]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in (loss, top1)] == [("epoch", "loss"), ("epoch", "top-1 (%)")]


def test_a_runs_speed_is_the_median_of_its_later_epochs_and_its_last_epoch_the_one_its_metrics_end_on():
    from vitdeit.report import run_summary

    # a run resumed from a checkpoint without its metrics.jsonl: its records start at epoch 3
    rows = [{"epoch": e, "val_top1": 10.0 * e, "val_top5": 50.0, "images_per_s": s}
            for e, s in ((3, 1.0), (4, 100.0), (5, 200.0), (6, 600.0))]
    s = run_summary("ViT", rows, {"config": {"model": "vit_tiny"}, "epoch": 6}, 1)
    assert s["train_images_per_s"] == 200.0  # epochs 4-6: median 200 (mean 300)
    assert (s["epochs"], s["best_epoch"], s["last_epoch"]) == (4, 6, 6)


def test_viz_prints_each_runs_best_scores_and_the_agreement_of_its_predictions(runs, tiny_shards, tmp_path, capsys):
    import shutil

    import viz

    # copies of the two runs whose metrics.jsonl hold other, distinct scores: the tiny runs' own read 33.33 % for
    # both and 100 % top-5 on 4 classes, which a line printing the wrong run's figure would match. ViT's best epoch
    # is its checkpoint's, DeiT's the other one (so viz.py's line says the checkpoint is not the best epoch's), and
    # DeiT's top-5 peaks in the epoch its top-1 does not.
    read = {run: torch.load(runs / run / "best.pth", weights_only=True)["epoch"]
            for run in ("baseline_vit_tiny", "deit_tiny_distill")}
    best = {"baseline_vit_tiny": read["baseline_vit_tiny"], "deit_tiny_distill": 1 - read["deit_tiny_distill"]}
    scores = {"baseline_vit_tiny": ((22.5, 62.75), (11.25, 61.5)), "deit_tiny_distill": ((43.75, 81.0), (33.0, 91.5))}
    for run, (top, other) in scores.items():
        shutil.copytree(runs / run, tmp_path / run)
        recs = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        assert [rec["epoch"] for rec in recs] == [0, 1]
        for rec in recs:
            rec["val_top1"], rec["val_top5"] = top if rec["epoch"] == best[run] else other
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    config = json.loads((tmp_path / "deit_tiny_distill" / "config.json").read_text())  # as a resume with --epochs 10,
    (tmp_path / "deit_tiny_distill" / "config.json").write_text(json.dumps({**config, "epochs": 10}))  # stopped
    capsys.readouterr()
    assert viz.main(["--vit", str(tmp_path / "baseline_vit_tiny" / "best.pth"), "--deit",
                     str(tmp_path / "deit_tiny_distill" / "best.pth"), "--num-images", "2", "--out",
                     str(tmp_path / "p.png"),
                     "--report-dir", str(tmp_path / "report"), "--workers", "0", "--device", "cpu"]) == 0
    said = capsys.readouterr().out.splitlines()
    teacher = json.loads((runs / "teacher_resnet18" / "metrics.jsonl").read_text().splitlines()[0])  # its 1 epoch
    assert [s for s in said if s.split()[:2] == ["teacher", "best"]] == [
        f"  teacher  best val top-1 {teacher['val_top1']:6.2f}%  top-5 {teacher['val_top5']:6.2f}%"]
    assert [s for s in said if s.split()[:2] == ["ViT", "best"]] == ["  ViT      best val top-1  22.50%  top-5  62.75%"]
    assert [s for s in said if s.split()[:2] == ["DeiT", "best"]] == [
        f"  DeiT     best val top-1  43.75%  top-5  81.00%  (the checkpoint read is epoch "
        f"{read['deit_tiny_distill']}'s, not the best epoch {best['deit_tiny_distill']}'s)"]
    md = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert [line for line in md if "stopped" in line] == [  # the run folder's latest --epochs, not its best.pth's 2
        "DeiT: its run stopped after 2 of its --epochs 10 (epochs 0-1; interrupted, or still going on): its lr "
        "schedule had not ended."]
    manifest = load_manifest(tiny_shards)
    preds = [predict(*load_model(runs / run / "best.pth", manifest_class_map(manifest)), tiny_shards, manifest, name,
                     workers=0) for run, name in (("baseline_vit_tiny", "ViT"), ("deit_tiny_distill", "DeiT"))]
    agree = 100 * np.mean(preds[0].pred == preds[1].pred)  # the two models' own predictions, image by image
    assert f"  ViT and DeiT agree on {agree:.1f}% of 24 val images" in said
    vit_right, deit_right = (p.pred == p.labels for p in preds)
    b, c = int(np.sum(deit_right & ~vit_right)), int(np.sum(vit_right & ~deit_right))
    assert b + c > 0 and [line for line in said if line.startswith("  DeiT - ViT")] == [
        f"  DeiT - ViT: {100 * (b - c) / 24:+.1f} points on these 24 images (DeiT alone right on {b}, ViT alone on "
        f"{c}; McNemar's exact test p = {mcnemar_exact_p(b, c):.2g})."]


def test_runs_trained_by_other_process_counts_or_loaders_are_noted(runs, tmp_path):
    vit, deit = runs / "baseline_vit_tiny" / "best.pth", str(runs / "deit_tiny_distill" / "best.pth")
    state = torch.load(vit, weights_only=True)
    assert state["loader"] == "torch" and len(state["loader_states"]) == 1  # the fixture's: one process
    torch.save({**state, "loader_states": state["loader_states"] * 8, "loader": "dali"}, tmp_path / "vit8.pth")
    notes = make_all(str(tmp_path / "vit8.pth"), deit, num_images=2, out=str(tmp_path / "p.png"), report_dir=None,
                     workers=0)["notes"]
    old = {k: v for k, v in state.items() if k not in ("loader_states", "loader")}  # saved before either was kept
    torch.save(old, tmp_path / "old.pth")
    assert make_all(str(tmp_path / "old.pth"), deit, num_images=2, out=str(tmp_path / "q.png"), report_dir=None,
                    workers=0)["notes"] == []  # nothing known, nothing said
    assert notes == ["ViT was trained by 8 process(es), DeiT by 1: global batches of 128 and 16 images (and the peak "
                     "lr with them: --lr is per 512)",
                     "ViT read its train batches with the dali loader, DeiT with the torch loader: crops and "
                     "augmentations drawn each loader's way (README: NVIDIA DALI says where they differ)"]


def test_a_deit_trained_without_distillation_is_noted(runs, tmp_path):
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), runs / "deit_tiny_distill" / "best.pth"
    state = torch.load(deit, weights_only=True)
    assert state["config"]["distillation_type"] == "hard"  # the fixture's: distilled, no note
    kw = dict(num_images=2, report_dir=None, workers=0)
    assert make_all(vit, str(deit), out=str(tmp_path / "p.png"), **kw)["notes"] == []
    torch.save({**state, "config": {**state["config"], "distillation_type": "none", "teacher_ckpt": None}},
               tmp_path / "none.pth")
    assert make_all(vit, str(tmp_path / "none.pth"), out=str(tmp_path / "q.png"), **kw)["notes"] == [
        "the DeiT was trained with --distillation-type none, without a teacher: both its heads learnt from the labels "
        "alone, so a gap to the ViT is not distillation's"]


def test_runs_whose_amp_auto_resolved_differently_are_noted_once(runs, tmp_path):
    vit, deit = runs / "baseline_vit_tiny" / "best.pth", str(runs / "deit_tiny_distill" / "best.pth")
    state = torch.load(vit, weights_only=True)
    assert (state["config"]["amp"], state["amp"]) == ("auto", "off")  # the fixture's: auto on a CPU
    kw = dict(num_images=2, report_dir=None, workers=0)
    torch.save({**state, "amp": "bf16"}, tmp_path / "gpu.pth")  # as on a GPU
    notes = make_all(str(tmp_path / "gpu.pth"), deit, out=str(tmp_path / "p.png"), **kw)["notes"]
    assert notes == ["ViT trained with --amp bf16 (as --amp auto resolved on its device), DeiT with --amp off (as "
                     "--amp auto resolved on its device): their arithmetic differs"]
    torch.save({**state, "amp": "fp16", "config": {**state["config"], "amp": "fp16"}}, tmp_path / "fp16.pth")
    notes = make_all(str(tmp_path / "fp16.pth"), deit, out=str(tmp_path / "s.png"), **kw)["notes"]
    assert notes == ["ViT trained with --amp fp16 (by flag), DeiT with --amp off (as --amp auto resolved on its "
                     "device): their arithmetic differs"]
    # both chosen by flag: the recipe's line names them, once
    torch.save({**state, "amp": "bf16", "config": {**state["config"], "amp": "bf16"}}, tmp_path / "bf16.pth")
    deit_state = torch.load(deit, weights_only=True)
    torch.save({**deit_state, "config": {**deit_state["config"], "amp": "off"}}, tmp_path / "off.pth")
    notes = make_all(str(tmp_path / "bf16.pth"), str(tmp_path / "off.pth"), out=str(tmp_path / "q.png"), **kw)["notes"]
    assert [n for n in notes if "amp" in n] == [
        "beside distillation, ViT and DeiT were trained with other settings (ViT's / DeiT's: --amp 'bf16' / 'off'): "
        "the gap between them is not distillation's alone"]
    old = {k: v for k, v in state.items() if k != "amp"}  # a checkpoint from before the resolved amp was kept
    torch.save(old, tmp_path / "old.pth")
    assert make_all(str(tmp_path / "old.pth"), deit, out=str(tmp_path / "r.png"), **kw)["notes"] == []  # unknown
    torch.save({**old, "config": {**old["config"], "amp": "bf16"}}, tmp_path / "old_bf16.pth")  # its flag says
    assert make_all(str(tmp_path / "old_bf16.pth"), deit, out=str(tmp_path / "t.png"), **kw)["notes"] == [
        "ViT trained with --amp bf16 (by flag), DeiT with --amp off (as --amp auto resolved on its device): their "
        "arithmetic differs"]


def test_the_recipe_differences_leave_out_how_the_runs_ran_and_what_makes_the_deit_a_deit():
    from vitdeit.report import recipe_differences

    vit = Config(model="vit_tiny").to_dict()
    deit = Config(model="deit_tiny_distill", distillation_type="soft", distillation_tau=3.0, teacher_ckpt="t.pth",
                  workers=4, loader="dali", compile="on", output_dir="elsewhere", data_path="other", img_size=160,
                  mixup=0.8, interpolation="bicubic").to_dict()
    assert recipe_differences(vit, deit) == ["--interpolation 'bilinear' / 'bicubic'", "--mixup 0.0 / 0.8"]
    imagenet = Config(model="deit_tiny_distill", teacher_weights="imagenet1k", distillation_alpha=0.7,
                      allow_weak_teacher=True).to_dict()  # the teacher's own settings make a DeiT, not its recipe
    assert recipe_differences(vit, imagenet) == []
    # the EMA (the report scores the trained weights), the device, and --amp where auto picks by device: not listed
    assert recipe_differences(vit, {**vit, "model_ema": True, "model_ema_decay": 0.99, "device": "cuda",
                                    "amp": "bf16"}) == []
    assert recipe_differences({**vit, "amp": "off"}, {**vit, "amp": "bf16"}) == ["--amp 'off' / 'bf16'"]
    assert recipe_differences(vit, vit) == []
    saved_before = {k: v for k, v in vit.items() if k != "rand_augment"}  # saved before --rand-augment: its default
    assert recipe_differences(saved_before, {**vit, "rand_augment": "rand-m9"}) == ["--rand-augment '' / 'rand-m9'"]


def test_the_report_gives_the_emas_best_val_top1_beside_the_trained_weights():
    from vitdeit.report import run_summary

    rows = [{"epoch": e, "val_top1": t, "val_top5": 90.0, "images_per_s": 10.0, "val_top1_ema": m}
            for e, t, m in ((0, 30.0, 20.0), (1, 50.0, 41.0), (2, 45.0, 44.5))]
    s = run_summary("ViT", rows, {"config": {"model": "vit_tiny"}, "epoch": 1}, 5_000_000)
    assert (s["val_top1"], s["best_epoch"], s["val_top1_ema"], s["best_epoch_ema"]) == (50.0, 1, 44.5, 2)
    comp = {"val_images": 2, "agreement": 50.0, "both_right": 0.0, "gains": [], "losses": [],
            "per_class": [{"class": f"n{i}", "name": "c", "images": 1, "vit_top1": 0.0, "deit_top1": 0.0, "delta": 0.0}
                          for i in range(6)], "deit_only_right": 1, "vit_only_right": 0,
            "mcnemar_p": 1.0}
    md = report_markdown([s], comp, ("ViT", "DeiT")).splitlines()
    said = "ViT: the EMA of its weights (--model-ema) scored up to 44.50% val top-1 (epoch 2); the table is of the "
    assert (said + "trained weights, and so are the figures below (the checkpoint read also holds its EMA, epoch 1's, "
            "41.00% then: viz.py --ema compares those).") in md  # (best.pth: the trained weights' best epoch, 1)
    assert (said + "trained weights, the figures below of the EMA in the checkpoint read (epoch 1's, 41.00% then; "
            "viz.py --ema).") in report_markdown([s], comp, ("ViT", "DeiT"), ema=True).splitlines()
    teacher = {**s, "run": "teacher"}  # in no figure: its sentence ends with the table
    assert ("teacher: the EMA of its weights (--model-ema) scored up to 44.50% val top-1 (epoch 2); the table is of "
            "the trained weights.") in report_markdown([teacher], comp, ("ViT", "DeiT"), ema=True).splitlines()
    assert not any("stopped" in line for line in md)  # (its config names no --epochs to fall short of)
    stopped = run_summary("ViT", rows, {"config": {"model": "vit_tiny", "epochs": 6}, "epoch": 1}, 5_000_000)
    assert ("ViT: its run stopped after 3 of its --epochs 6 (epochs 0-2; interrupted, or still going on): its lr "
            "schedule had not ended.") in report_markdown([stopped], comp, ("ViT", "DeiT")).splitlines()
    resumed = run_summary("ViT", rows, {"config": {"model": "vit_tiny", "epochs": 3}, "epoch": 1}, 5_000_000, 6)
    assert resumed["epochs_planned"] == 6  # a resume with more --epochs (its config.json), stopped at 3 of them
    done = run_summary("ViT", rows, {"config": {"model": "vit_tiny", "epochs": 3}, "epoch": 1}, 5_000_000)
    assert "stopped" not in report_markdown([done], comp, ("ViT", "DeiT"))
    # its checkpoint is of its last epoch (4), which metrics.jsonl lost with the epoch before: the run did end
    lost = run_summary("ViT", rows, {"config": {"model": "vit_tiny", "epochs": 5}, "epoch": 4}, 5_000_000)
    assert "stopped" not in report_markdown([lost], comp, ("ViT", "DeiT"))
    no_ema = run_summary("ViT", [{k: v for k, v in r.items() if k != "val_top1_ema"} for r in rows],
                         {"config": {"model": "vit_tiny"}, "epoch": 1}, 5_000_000)
    assert "val_top1_ema" not in no_ema and "EMA" not in report_markdown([no_ema], comp, ("ViT", "DeiT"))


def test_a_runs_planned_epochs_are_its_latest_invocations(tmp_path):
    from vitdeit.report import planned_epochs

    ckpt = {"config": {"epochs": 10}}  # best.pth of the first invocation, kept by a resume that asked for more
    assert planned_epochs(tmp_path, ckpt) == 10  # no config.json beside it (a checkpoint copied out): its own
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 20}))  # written by the resume with --epochs 20
    assert planned_epochs(tmp_path, ckpt) == 20
    (tmp_path / "config.json").write_text("{")
    assert planned_epochs(tmp_path, ckpt) == 10


def test_viz_warns_of_more_workers_than_cores_once_after_its_arguments_are_checked(runs, tiny_shards, tmp_path, capsys,
                                                                                   monkeypatch):
    import warnings

    import viz

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # PyTorch's count too
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    vit, deit = str(runs / "baseline_vit_tiny" / "best.pth"), str(runs / "deit_tiny_distill" / "best.pth")
    args = ["--vit", vit, "--deit", deit, "--data-path", str(tiny_shards), "--no-report", "--workers", "2"]
    with pytest.raises(SystemExit):  # a usage error first: no warning before it
        viz.main([*args, "--out", str(tmp_path / "p.nope")])
    assert "warning" not in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert viz.main([*args, "--out", str(tmp_path / "p.png")]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")] == [
        "warning: --workers 2: 2 decode processes on this node, more than its 1 usable core: they take turns and slow "
        "each other; --workers -1 takes this node's share (1 here)"]
    assert not [w for w in caught if "worker" in str(w.message)]
