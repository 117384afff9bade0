"""What users look at: ViT vs DeiT prediction panels, training curves and the comparison report."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .checkpoint import check_class_map, ema_weights, load_checkpoint, saved_world, shards_change_text
from .config import (DISTILL_ONLY, HOW_IT_RUNS, INVOCATION_FIELDS, Config, distillation_of, flag,
                     run_files_here, saved_setting)
from .classes import (MANIFEST_NAME, ClassMap, load_manifest, manifest_class_map, val_copies_text,
                      without_images_text)
from .errors import DataError, MissingFile, SettingError, output_folder, save_output
from .data import shard_paths, upscale_warning
from .data.torch_loader import ShardSamples, TorchLoader, ValTransform
from .machine import machine_text
from .metrics import read_metrics
from .models import OUTSIDE_DATA, head_logits, model_from_checkpoint

RIGHT, WRONG = "#1a7f37", "#cf222e"  # green / red: right and wrong at a glance


@dataclass
class Predictions:
    """A model's predictions on the whole val split, in manifest order."""

    name: str
    labels: np.ndarray  # (N,) true class
    pred: np.ndarray  # (N,) predicted class
    conf: np.ndarray  # (N,) softmax probability of the prediction
    crop_pct: float  # the val centre crop's share the model was evaluated with (the panels' crop too)
    interpolation: str = Config.interpolation  # the val resize filter the model was evaluated with


def load_model(ckpt_path: str | Path, class_map: ClassMap | None, device: str = "cpu"):
    state = load_checkpoint(ckpt_path, class_map)
    return model_of(state, ckpt_path, device), state


def model_of(state: dict, path: str | Path, device: str = "cpu", ema: bool = False):
    """The checkpoint's network in eval mode on `device`: its trained weights, or with `ema` its EMA of them."""
    return model_from_checkpoint(ema_weights(state, path, "--ema") if ema else state).to(device).eval()


@torch.no_grad()
def predict(net, state: dict, shards: str | Path, manifest: dict, name: str, device: str = "cpu",
            workers: int = 2, batch_size: int = 100) -> Predictions:
    cfg = state["config"]
    interpolation = saved_setting(cfg, "interpolation")
    loader = TorchLoader(shards, manifest, "val", batch_size=batch_size, img_size=cfg["img_size"],
                         workers=workers, device=device, crop_pct=cfg["crop_pct"], interpolation=interpolation)
    labels, preds, confs = [], [], []
    for images, y in loader:
        logits = torch.stack(head_logits(net, images)).mean(0).float()  # DeiT: mean of both heads
        pred = logits.argmax(1)  # the first of tied classes, as evaluate() scores top-1
        conf = logits.softmax(1).gather(1, pred[:, None])[:, 0]
        labels.append(y.cpu()), preds.append(pred.cpu()), confs.append(conf.cpu())
    return Predictions(name, torch.cat(labels).numpy(), torch.cat(preds).numpy(), torch.cat(confs).numpy(),
                       cfg["crop_pct"], interpolation)


DEFAULT_PANELS = 10  # the picture's val images when --num-images is not given


def sample_indices(n_total: int, n: int, seed: int) -> list[int]:
    if not 1 <= n <= n_total:
        raise SettingError(f"--num-images {n}: must be between 1 and the {n_total} val images")
    return random.Random(seed).sample(range(n_total), n)


def val_keys(shards: str | Path, manifest: dict) -> list[str]:
    """Each val sample's key, in manifest order: its source file's name without the extension (unique in a split),
    so that an image in the picture can be found in the original folders."""
    return [key for _, _, index in shard_paths(shards, manifest, "val") for key, _ in index]


def panel_texts(class_map: ClassMap, idx: int, preds: list[Predictions]) -> list[tuple[str, str]]:
    """(text, colour) lines of one panel: the truth, then each model's prediction with its confidence."""
    truth = int(preds[0].labels[idx])
    lines = [(f"true: {class_map.short_name(truth)}", "black")]
    for p in preds:
        k = int(p.pred[idx])
        lines.append((f"{p.name}: {class_map.short_name(k)} ({100 * p.conf[idx]:.0f}%)",
                      RIGHT if k == truth else WRONG))
    return lines


def prediction_figure(shards: str | Path, manifest: dict, preds: list[Predictions], indices: list[int],
                      ncols: int = 5, display_px: int = 160):
    """One panel per val image: the image in true colours (the centre crop the models saw), the ground
    truth and each model's prediction, green when right and red when wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class_map = manifest_class_map(manifest)
    ds = ShardSamples(shards, manifest, "val", ValTransform(display_px, preds[0].crop_pct, preds[0].interpolation))
    ncols = min(ncols, len(indices))
    nrows = -(-len(indices) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 3.6 * nrows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, idx in zip(axes.flat, indices):
        image, _ = ds[idx]
        ax.imshow(image)
        for row, (text, colour) in enumerate(panel_texts(class_map, idx, preds)):
            ax.text(0.0, -0.04 - 0.1 * row, text, transform=ax.transAxes, ha="left", va="top", fontsize=9,
                    color=colour, fontweight="bold" if row == 0 else "normal")
    names = " vs ".join(p.name for p in preds)
    acc = ", ".join(f"{p.name} {100 * np.mean(p.pred[indices] == p.labels[indices]):.0f}%" for p in preds)
    fig.suptitle(f"{names} on {len(indices)} random val images (right here: {acc}; green = right, red = wrong)",
                 fontsize=11)
    # room under each image for its three text lines (~0.33 of an image's height)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.45 / fig.get_figheight(), bottom=0.85 / fig.get_figheight(),
                        hspace=0.42, wspace=0.1)
    return fig


# ---------------------------------------------------------------- curves and the report


def curves_figure(runs: dict[str, list[dict]]):
    """Train/val loss and top-1 per epoch, every run on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rows) in enumerate(runs.items()):
        colour = f"C{i}"
        ep = [r["epoch"] for r in rows]  # 0-based, as the console, metrics.jsonl and the checkpoints number them
        # markers on both: a run of one epoch is one point, which a line alone does not draw
        axes[0].plot(ep, [r["train_loss"] for r in rows], "--x", color=colour, ms=4, label=f"{name} train")
        axes[0].plot(ep, [r["val_loss"] for r in rows], "-o", color=colour, ms=3, label=f"{name} val")
        axes[1].plot(ep, [r["train_top1"] for r in rows], "--x", color=colour, ms=4, label=f"{name} train")
        axes[1].plot(ep, [r["val_top1"] for r in rows], "-o", color=colour, ms=3, label=f"{name} val")
    from matplotlib.ticker import MaxNLocator

    epochs = sorted({r["epoch"] for rows in runs.values() for r in rows})
    for ax, what in zip(axes, ("loss", "top-1 (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: 0, 1, 2, not 1.5
        if epochs and epochs[-1] - epochs[0] < 2:  # one or two epochs: the locator would tick between them
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
            ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")  # where it hides fewest points (one legend: the panels share names)
    distilled = [name for name, rows in runs.items() if rows and "teacher_val_top1" in rows[-1]]
    # train loss: against label-smoothed (or mixed) targets, + the distillation term; val: plain CE on the labels:
    # train can sit above val without any overfitting to read into it
    axes[0].set_title("train (dashed): the loss as trained, with its label smoothing, Mixup/CutMix if any" + (
        f",\n+ the distillation term for {', '.join(distilled)}" if distilled else "") + "; val (solid): plain CE",
        fontsize=8)  # (two lines with a distilled run: one would run past the panel)
    fig.tight_layout()
    return fig


def planned_epochs(run_dir: Path, ckpt: dict) -> int | None:
    """The --epochs of the run folder's latest invocation (its config.json: each start or resume writes it; a
    checkpoint keeps the config of the invocation that saved it, which a resume with more --epochs outlives)."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return ckpt["config"].get("epochs")


def run_summary(name: str, rows: list[dict], ckpt: dict, n_params: int, planned: int | None = None) -> dict:
    """rows: the run's metrics.jsonl records; planned: its --epochs (planned_epochs), else the checkpoint's."""
    best = max(rows, key=lambda r: r["val_top1"])
    timed = rows[1:] or rows  # the first epoch also compiles the model and starts the loader: steady speed is later
    out = {"run": name, "model": ckpt["config"]["model"], "best_epoch": best["epoch"], "val_top1": best["val_top1"],
           "val_top5": best["val_top5"], "params": n_params, "epochs": len(rows), "last_epoch": rows[-1]["epoch"],
           "last_val_top1": rows[-1]["val_top1"],  # unpicked: the best epoch is chosen on the val set it is scored on
           "checkpoint_epoch": ckpt["epoch"],  # of the checkpoint read here: the best epoch's, unless told otherwise
           "epochs_planned": planned or ckpt["config"].get("epochs"),  # its --epochs: more than it ran, if stopped
           "data_path": ckpt["config"].get("data_path"), "img_size": ckpt["config"].get("img_size"),
           "train_images_per_s": float(np.median([r["images_per_s"] for r in timed])),
           "trained_on": machines_of(timed, rows)}
    for key in ("val_top1_cls_head", "val_top1_dist_head", "teacher_val_top1"):
        if key in best:
            out[key] = best[key]
    if ema := [r for r in rows if "val_top1_ema" in r]:  # --model-ema: the average's own best, beside the weights'
        top = max(ema, key=lambda r: r["val_top1_ema"])
        out["val_top1_ema"], out["best_epoch_ema"] = top["val_top1_ema"], top["epoch"]
        # and the score of the EMA the checkpoint read holds (viz.py --ema predicts with it)
        out["checkpoint_val_top1_ema"] = next((r["val_top1_ema"] for r in ema if r["epoch"] == ckpt["epoch"]), None)
    return out


def machines_of(timed: list[dict], rows: list[dict]) -> list[str | None]:
    """The machines (machine_text; None: not recorded: an earlier vitdeit's run, or its start's line lost) the
    `timed` rows' images/s were measured on, in turn (A, B, A: three stretches): a row's is the one recorded on it or
    on the last row before it that recorded one (each start and resume records it on its first epoch)."""
    now, on = None, {}
    for r in rows:
        now = r.get("machine", now)
        on[id(r)] = machine_text(now) if now else None
    return [m for m, _ in itertools.groupby(on[id(r)] for r in timed)]


def save_figure(fig, path: Path, flag: str) -> None:
    """fig at 110 dpi, then closed, written or not: pyplot keeps every figure until it is closed (a library caller,
    a notebook, would pile them up)."""
    import matplotlib.pyplot as plt

    try:
        save_output(path, lambda p: fig.savefig(p, dpi=110), KEPT, flag=flag)
    finally:
        plt.close(fig)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the chance, if both models were equally good on these images, that the b + c
    images exactly one of them gets right split at least as unevenly as b : c (a binomial with p = 1/2)."""
    n, term, tail = b + c, 1, 0  # term: C(n, k), in exact integers: one rounding, in the last division
    for k in range(min(b, c) + 1):
        tail += term
        term = term * (n - k) // (k + 1)
    return min(1.0, 2 * tail / 2 ** n)


def comparison(class_map: ClassMap, vit: Predictions, deit: Predictions, top: int = 5) -> dict:
    """Per-class top-1 of both, the classes DeiT gains and loses most, how often the two agree, and the paired test:
    the images only DeiT gets right against those only ViT gets right (the same images, so their difference in
    top-1 is (b - c) / n, and McNemar's exact test says how likely so uneven a split is by chance)."""
    per_class, without = [], []
    for c in range(len(class_map)):
        mask = vit.labels == c
        if not mask.any():
            without.append(class_map.wnids[c])
        else:
            per_class.append({"class": class_map.wnids[c], "name": class_map.short_name(c), "images": int(mask.sum()),
                              "vit_top1": 100 * float(np.mean(vit.pred[mask] == c)),
                              "deit_top1": 100 * float(np.mean(deit.pred[mask] == c))})
    for row in per_class:
        row["delta"] = row["deit_top1"] - row["vit_top1"]
    by_delta = sorted(per_class, key=lambda r: r["delta"])
    vit_right, deit_right = vit.pred == vit.labels, deit.pred == deit.labels
    both_right = vit_right & deit_right
    b, c = int(np.sum(deit_right & ~vit_right)), int(np.sum(vit_right & ~deit_right))
    return {"per_class": per_class, "gains": [r for r in by_delta[::-1][:top] if r["delta"] > 0],
            "losses": [r for r in by_delta[:top] if r["delta"] < 0],
            "agreement": 100 * float(np.mean(vit.pred == deit.pred)), "both_right": 100 * float(np.mean(both_right)),
            "val_images": int(len(vit.labels)), "deit_only_right": b, "vit_only_right": c,
            "mcnemar_p": mcnemar_exact_p(b, c), "classes_without_val_images": without}


def report_markdown(summaries: list[dict], comp: dict, names: tuple[str, str], notes: list[str] = (),
                    picture: tuple[str, list[str]] | None = None, ema: bool = False) -> str:
    """notes: what viz.py printed as `note:` lines (a model under another label, other image sizes, no teacher row),
    kept with the report under its table. picture: the picture's file name and its images' val keys. ema: the
    comparison's predictions are of the checkpoints' EMA weights (viz.py --ema)."""
    v, d = names
    lines = ["# ViT vs DeiT: comparison report", "",
             "The table comes from each run's `metrics.jsonl` (written during training, on the machine that "
             "trained it; best epoch by val top-1; images/s as each run measured them, on the machine named beside "
             "them (rank 0's node), lower for a run that shared it with other work); the per-class figures below "
             "from `viz.py`'s own pass over val with the two checkpoints viz.py read (each run's `best.pth` unless "
             "`--vit`/`--deit` named others" + ("; the EMA of their weights, `--ema`" if ema else "") + ").", "",
             "| run | model | best val top-1 (%) | val top-5 (%) | best epoch / last (0-based) | params "
             "| train images/s (median of the epochs after the first, if any) | trained on |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        on = ", then ".join(m or "not recorded" for m in s["trained_on"])
        lines.append(f"| {s['run']} | {s['model']} | {s['val_top1']:.2f} | {s['val_top5']:.2f} | "
                     f"{s['best_epoch']} / {s['last_epoch']} | {s['params'] / 1e6:.2f} M | "
                     f"{s['train_images_per_s']:.0f} | {on} |")
    if picked := [s for s in summaries if s["best_epoch"] != s["last_epoch"]]:
        lines += ["", "Each best epoch is picked by the val top-1 it is scored on (ImageNet-100 has no other held-out "
                      "split; the DeiT reference picks so too), which flatters it a little; the last epochs scored "
                      + ", ".join(f"{s['run']} {s['last_val_top1']:.2f}%" for s in picked) + "."]
    if len({tuple(s["trained_on"]) for s in summaries if s["run"] != "teacher"}) > 1:  # (the teacher: its own model)
        lines += ["", f"{v}'s and {d}'s images/s were measured on different machines or software (or not recorded "
                      f"for one): they compare those too, not only the models."]
    for s in summaries:
        if len(s["trained_on"]) > 1:
            where = ("(resumed elsewhere): its `metrics.jsonl` records each start's" if None not in s["trained_on"]
                     else "where recorded (not by an earlier vitdeit, nor where a start's line was lost)")
            lines += ["", f"{s['run']}: its images/s are the median of epochs run in {len(s['trained_on'])} "
                          f"stretches on the machines the table names in turn {where}."]
    classes = len(comp["per_class"]) + len(comp.get("classes_without_val_images", []))
    if 0 < classes <= 5:  # (evaluate's topk takes min(5, classes): every true class is among them)
        lines += ["", f"With {classes} classes, val top-5 is 100 % by construction."]
    for s in summaries:
        if "val_top1_ema" in s:
            said = (f"{s['run']}: the EMA of its weights (--model-ema) scored up to {s['val_top1_ema']:.2f}% val top-1 "
                    f"(epoch {s['best_epoch_ema']}); the table is of the trained weights")
            then = s.get("checkpoint_val_top1_ema")  # (best.pth is the trained weights' best epoch: not the EMA's)
            read = f"epoch {s['checkpoint_epoch']}'s" + (f", {then:.2f}% then" if then is not None else "")
            lines += ["", said + ("." if s["run"] == "teacher" else  # (the teacher is in no figure below)
                                  f", the figures below of the EMA in the checkpoint read ({read}; viz.py --ema)."
                                  if ema else f", and so are the figures below (the checkpoint read also holds its "
                                  f"EMA, {read}: viz.py --ema compares those).")]
    for s in summaries:  # a run stopped before its schedule ended: its --epochs differ from what it trained
        done = max(s["last_epoch"], s["checkpoint_epoch"]) + 1  # (a metrics.jsonl may have lost its last lines)
        if done < (s.get("epochs_planned") or 0):
            lines += ["", f"{s['run']}: its run stopped after {done} of its --epochs {s['epochs_planned']} (epochs "
                          f"0-{done - 1}; interrupted, or still going on): its lr schedule had not ended."]
    for s in summaries:  # a checkpoint other than the best epoch's: last.pth, or a best.pth whose weights were lost
        if s["checkpoint_epoch"] != s["best_epoch"]:
            lines += ["", f"{s['run']}: the checkpoint read here is from epoch {s['checkpoint_epoch']}, not its best "
                          f"epoch {s['best_epoch']}" + ("." if s["run"] == "teacher" else
                                                         "; its predictions below are that epoch's.")]
    if notes:
        lines += [""] + [f"Note: {note}." for note in notes]
    deit = next((s for s in summaries if "val_top1_cls_head" in s), None)
    if deit:
        lines += ["", f"DeiT heads at its best epoch: class head {deit['val_top1_cls_head']:.2f}%, distillation head "
                      f"{deit['val_top1_dist_head']:.2f}%, their mean (the prediction) {deit['val_top1']:.2f}%."]
        if "teacher_val_top1" in deit:
            lines.append(f"The teacher it distilled from: val top-1 {deit['teacher_val_top1']:.2f}%, as the DeiT run "
                         f"evaluated it on {deit['data_path']} at {deit['img_size']} px.")
            teacher = next((s for s in summaries if s["run"] == "teacher"), None)
            elsewhere = teacher and (teacher["data_path"], teacher["img_size"]) != (deit["data_path"], deit["img_size"])
            if elsewhere:  # then the teacher row's figure is not this one: say why
                lines[-1] += (f" The teacher row is its own run's best epoch, on {teacher['data_path']} at "
                              f"{teacher['img_size']} px.")
    lines += ["", f"## Where {v} and {d} differ ({comp['val_images']} val images"
                  f"{' of ' + comp['data_path'] if comp.get('data_path') else ''})", "",
              f"They predict the same class on {comp['agreement']:.1f}% of the val images; both are right on "
              f"{comp['both_right']:.1f}%.", "", paired_line(comp, names) + " One val set and one seed each: whether "
              "these two checkpoints differ on these images, not whether distillation wins in general (another "
              "seed moves both runs).", ""]
    for title, rows in ((f"Classes {d} gains most", comp["gains"]), (f"Classes {d} loses most", comp["losses"])):
        lines += [f"**{title}:** " + (", ".join(f"{r['name']} ({r['vit_top1']:.0f}% → {r['deit_top1']:.0f}%)"
                                                 for r in rows) or "none"), ""]
    lines += [f"| class | WNID | images | {v} top-1 (%) | {d} top-1 (%) | Δ |", "|---|---|---:|---:|---:|---:|"]
    for r in sorted(comp["per_class"], key=lambda r: -r["delta"]):
        lines.append(f"| {r['name']} | {r['class']} | {r['images']} | {r['vit_top1']:.1f} | {r['deit_top1']:.1f} | "
                     f"{r['delta']:+.1f} |")
    if missing := comp.get("classes_without_val_images"):  # shards packed with --allow-missing-classes
        lines += ["", f"No row for {len(missing)} class(es) with no val images here: {', '.join(missing)}."]
    if picture:
        lines += ["", f"The images of {picture[0]}, left to right and top to bottom, by val key (the source file's "
                      f"stem, its name without the extension): {', '.join(picture[1])}."]
    return "\n".join(lines) + "\n"


def paired_line(comp: dict, names: tuple[str, str] = ("ViT", "DeiT")) -> str:
    """The paired comparison in one sentence (report.md; viz.py prints it: plain ASCII, for any console)."""
    v, d = names
    b, c, n = comp["deit_only_right"], comp["vit_only_right"], comp["val_images"]
    return (f"{d} - {v}: {100 * (b - c) / n:+.1f} points on these {n} images ({d} alone right on {b}, {v} alone on "
            f"{c}; McNemar's exact test p = {comp['mcnemar_p']:.2g}).")


def distilled_from(deit_state: dict, deit_ckpt: str | Path) -> str | None:
    """The train.py run folder of the teacher the DeiT checkpoint distilled from: its --teacher-ckpt's folder, if it is
    one here (None for torchvision's weights or no distillation: the report then shows no teacher row; the DeiT's
    metrics still hold the teacher's val top-1)."""
    ckpt = teacher_ckpt_of(deit_state, deit_ckpt)
    if ckpt is None:
        return None
    run_dir = Path(ckpt).parent
    return str(run_dir) if (run_dir / "metrics.jsonl").is_file() else None


def teacher_ckpt_of(deit_state: dict, deit_ckpt: str | Path) -> str | None:
    """The --teacher-ckpt the DeiT checkpoint `deit_ckpt` distilled from, as seen from here (None for torchvision's
    weights or no distillation: a --distillation-type none, or a model without a distillation token, whose
    --teacher-ckpt went unused)."""
    cfg = deit_state["config"]
    return None if distillation_of(cfg["model"], saved_setting(cfg, "distillation_type")) == "none" else (
        run_files_here(deit_state, deit_ckpt).get("teacher_ckpt") or None)


KEPT = "the files written before it are kept"  # what a failed write of the picture or the report leaves


# not listed among the two runs' other differences (beside HOW_IT_RUNS): what makes the DeiT a DeiT (its model,
# teacher, distillation), what notes of their own compare (the shards, the image size), the EMA (the report scores
# the trained weights)
DISTILLATION = ("model", "teacher", "distillation_type") + DISTILL_ONLY
NOT_THE_RECIPE = DISTILLATION + ("data_path", "img_size", "model_ema", "model_ema_decay")


def recipe_differences(vit_config: dict, deit_config: dict) -> list[str]:
    """The settings beside distillation the two runs were trained with differently, as "--flag ViT's / DeiT's"
    (a run saved before a setting existed had its default); how they ran (HOW_IT_RUNS) is left out, and --amp where
    either was auto (which picks by device)."""
    skip = set(HOW_IT_RUNS + INVOCATION_FIELDS + NOT_THE_RECIPE)
    if "auto" in (saved_setting(vit_config, "amp"), saved_setting(deit_config, "amp")):
        skip.add("amp")
    return [f"{flag(f.name)} {saved_setting(vit_config, f.name)!r} / {saved_setting(deit_config, f.name)!r}"
            for f in fields(Config) if f.name not in skip
            and saved_setting(vit_config, f.name) != saved_setting(deit_config, f.name)]


def resumed_changes_note(label: str, path: str, state: dict, rows: list[dict]) -> str | None:
    """The settings the run changed when resumed (metrics.jsonl's resumed_with, on the first epoch after each
    --resume that changed any), and which of them the checkpoint `path` was trained with: the settings the report
    compares are those it was saved with, not its whole run's."""
    history = [(r["epoch"], r["resumed_with"]) for r in rows if r.get("resumed_with")]
    if not history:
        return None
    said = "; ".join(f"from epoch {e}, {', '.join(changes)}" for e, changes in history)
    after = [e for e, _ in history if e > state["epoch"]]
    which = (f"{path} (epoch {state['epoch']}) was saved before " + ("them" if len(after) == len(history) else
             f"those from epoch {after[0]} on") if after else f"{path} (epoch {state['epoch']}) was saved after them")
    return (f"{label}'s run was resumed with other settings ({said}); {which}: the settings compared here are the "
            f"ones it was saved with")


def report_inputs(vit_ckpt: str, deit_ckpt: str, deit_state: dict, teacher_run: str | None, class_map: ClassMap):
    """What the report reads besides the two checkpoints: the runs (teacher, when its folder is found; ViT; DeiT) by
    run folder, their metrics.jsonl rows, the teacher's (net, state) and notes for the summary."""
    runs, notes = {}, []
    own = distilled_from(deit_state, deit_ckpt)
    teacher_run = teacher_run or own
    if teacher_run and (Path(teacher_run) / "best.pth").is_file():
        runs["teacher"] = Path(teacher_run)
    elif ckpt := teacher_ckpt_of(deit_state, deit_ckpt):
        notes.append(f"no teacher row: the DeiT distilled from {ckpt}, whose run "
                     f"folder is not found from here ({Path.cwd()}); pass it with --teacher-run")
    cfg = deit_state["config"]
    if distillation_of(cfg["model"], saved_setting(cfg, "distillation_type")) != "none" and not cfg.get("teacher_ckpt"):
        notes.append(OUTSIDE_DATA)  # it distilled from torchvision's weights
    runs["ViT"], runs["DeiT"] = Path(vit_ckpt).parent, Path(deit_ckpt).parent
    metrics = {}
    for name, run_dir in runs.items():
        try:
            metrics[name] = read_metrics(run_dir, dropped=notes)
        except MissingFile as e:  # a checkpoint copied out of its run folder
            fix = ("pass the teacher's train.py run folder with --teacher-run" if name == "teacher" else
                   f"pass the {name} checkpoint in its train.py run folder")
            raise MissingFile(f"{e} The report reads the metrics.jsonl of each run: {fix}, or --no-report for the "
                              f"picture alone.") from None
    for name, rows in metrics.items():
        if not rows:  # a run restarted in this folder, before its first epoch ended
            raise DataError(f"{runs[name] / 'metrics.jsonl'}: no finished epoch yet; wait for the run's first "
                            f"epoch, or pass another run's checkpoint.")
    teacher = load_model(runs["teacher"] / "best.pth", class_map) if "teacher" in runs else None
    if teacher is not None and (model := teacher[1]["config"]["model"]) != "resnet18":
        raise SettingError(f"--teacher-run {runs['teacher']}: a {model} run, not a ResNet-18 teacher's; pass the "
                           f"teacher's run folder, or leave --teacher-run out (the DeiT's own teacher is found)")
    if teacher is not None and own and Path(own).resolve() != runs["teacher"].resolve():
        notes.append(f"the teacher row is {runs['teacher']} (--teacher-run), not {own}, the run the DeiT distilled "
                     f"from")
    return runs, metrics, teacher, notes


def comparison_notes(vit: tuple[str, dict], deit: tuple[str, dict], data_path: str, manifest: dict,
                     metrics: dict) -> list[str]:
    """What else the two runs (each (checkpoint path, state)) did differently, so that a gap between them is not read
    as distillation's alone: a DeiT without a teacher, the shards and image sizes, process counts, loaders,
    precisions, settings changed at a resume (metrics: each run's metrics.jsonl rows, where read), every other
    setting."""
    (vit_ckpt, vit_state), (deit_ckpt, deit_state) = vit, deit
    notes = []
    deit_cfg = deit_state["config"]
    if deit_cfg["model"] == "deit_tiny_distill" and saved_setting(deit_cfg, "distillation_type") == "none":
        notes.append("the DeiT was trained with --distillation-type none, without a teacher: both its heads learnt "
                     "from the labels alone, so a gap to the ViT is not distillation's")
    alpha = saved_setting(deit_cfg, "distillation_alpha")  # 0 or 1: refused since 2026-12-06, not before
    if distillation_of(deit_cfg["model"], saved_setting(deit_cfg, "distillation_type")) != "none" and alpha in (0, 1):
        notes.append(f"the DeiT was trained with --distillation-alpha {alpha:g}: " + (
            "the teacher's term had no weight, so nothing was distilled, and its distillation head, half of each "
            "prediction, never learnt" if alpha == 0 else "the labels' term had no weight, so its class head, half "
            "of each prediction, never learnt"))
    trained_here = True  # both, on these shards
    for label, state in (("ViT", vit_state), ("DeiT", deit_state)):
        if found := shards_change_text(state, label, data_path, manifest):  # by the pack's fingerprint, not the path
            notes.append(found[1])
            trained_here = trained_here and found[0] == "untold"  # (its images are these: said below too)
        upscaled = (upscale_warning(data_path, manifest, state["config"]["img_size"],
                                    saved_setting(state["config"], "crop_pct")) or "").rstrip(".")
        if upscaled and upscaled not in notes:  # (once for both models where they share the size)
            notes.append(upscaled)
    if trained_here:  # what neither could learn (--allow-missing-classes; classes with no val images: the per-class
        # table says so) and the val images both trained on (--allow-train-val-copies)
        notes += [text] if (text := without_images_text(manifest, "train", data_path)) else []
        notes += [f"{text} (--allow-train-val-copies): val top-1 counts images both models trained on"] \
            if (text := val_copies_text(manifest)) else []
    sizes = vit_state["config"]["img_size"], deit_state["config"]["img_size"]
    if sizes[0] != sizes[1]:  # each is evaluated at its own size: a gap between them is partly the resolution's
        notes.append(f"ViT was trained at {sizes[0]} px, DeiT at {sizes[1]} px: their scores are not like for like")
    worlds = [saved_world(state) for state in (vit_state, deit_state)]
    if None not in worlds and worlds[0] != worlds[1]:  # the same --batch-size and --lr, but not the same global batch
        batches = [state["config"]["batch_size"] * w for state, w in zip((vit_state, deit_state), worlds)]
        notes.append(f"ViT was trained by {worlds[0]} process(es), DeiT by {worlds[1]}: global batches of {batches[0]} "
                     f"and {batches[1]} images (and the peak lr with them: --lr is per 512)")
    loaders = [state.get("loader") for state in (vit_state, deit_state)]
    if None not in loaders and loaders[0] != loaders[1]:
        notes.append(f"ViT read its train batches with the {loaders[0]} loader, DeiT with the {loaders[1]} loader: "
                     f"crops and augmentations drawn each loader's way (README: NVIDIA DALI says where they differ)")
    flags = [saved_setting(state["config"], "amp") for state in (vit_state, deit_state)]
    # what each trained with: as --amp auto resolved (kept since 2026-12-06), else the flag where it says so
    amps = [state.get("amp") or (f if f != "auto" else None) for state, f in zip((vit_state, deit_state), flags)]
    if None not in amps and amps[0] != amps[1] and "auto" in flags:  # (both by flag: recipe_differences lists them)
        how = [f"--amp {a} ({'as --amp auto resolved on its device' if f == 'auto' else 'by flag'})"
               for a, f in zip(amps, flags)]
        notes.append(f"ViT trained with {how[0]}, DeiT with {how[1]}: their arithmetic differs")
    for label, path, state in (("ViT", vit_ckpt, vit_state), ("DeiT", deit_ckpt, deit_state)):
        if note := resumed_changes_note(label, path, state, metrics.get(label, [])):
            notes.append(note)
    if differ := recipe_differences(vit_state["config"], deit_state["config"]):
        notes.append(f"beside distillation, ViT and DeiT were trained with other settings (ViT's / DeiT's: "
                     f"{', '.join(differ)}): the gap between them is not distillation's alone")
    return notes


def check_report_inputs(vit_ckpt: str, deit_ckpt: str, teacher_run: str | None, out: str,
                        report_dir: str | None) -> bool:
    """make_all's paths checked before anything is read: two checkpoint files, a teacher run folder with its
    best.pth, outputs that can be written. Returns whether --vit and --deit are one file."""
    for option, path in (("--vit", vit_ckpt), ("--deit", deit_ckpt)):
        if Path(path).is_dir():  # the run folder, not its checkpoint
            raise MissingFile(f"{option} {path}: a folder, not a checkpoint; pass the checkpoint in it, e.g. {option} "
                              f"{Path(path) / 'best.pth'}")
        if not Path(path).is_file():
            raise MissingFile(f"{path}: checkpoint not found. Train it first (train.py --run-name ...), or pass its "
                              f"path with --vit / --deit (the demo's: --vit demo_runs/baseline_vit_tiny/best.pth "
                              f"--deit demo_runs/deit_tiny_distill/best.pth --report-dir demo_runs/report).")
    one_file = Path(vit_ckpt).samefile(deit_ckpt)  # (both exist: now, not after minutes of val passes)
    if teacher_run is not None and not (Path(teacher_run) / "best.pth").is_file():
        fix = "pass a train.py run folder of the teacher"
        what = (f"a file, not a run folder; {fix} (here {Path(teacher_run).parent}?)" if Path(teacher_run).is_file()
                else f"no best.pth there; {fix}")
        raise MissingFile(f"--teacher-run {teacher_run}: {what}.")
    output_folder(Path(out), "--out", is_folder=False, make=False)  # (made as they are written: a refusal below
    if report_dir is not None:                                      # leaves no empty folder)
        output_folder(Path(report_dir), "--report-dir", is_folder=True, make=False)
    return one_file


def picture_notes(vit: tuple[str, dict], deit: tuple[str, dict], one_file: bool, ema: bool, report: bool,
                  shown: int, n_val: int, num_images: int | None) -> list[str]:
    """The notes on what the picture (and the report) compare: one file twice, EMA weights, fewer val images than
    panels, a checkpoint of another model than its flag names. vit, deit: (path, checkpoint)."""
    heads = [f"--vit and --deit are the same file, {vit[0]}: the comparison is of one model with itself"] * one_file
    heads += [f"--ema: the picture{' and the comparison are' if report else ' is'} of each checkpoint's EMA of its "
              f"weights (--model-ema), as of its epoch"
              + ("; the table and the curves are of the trained weights" if report else "")] * ema
    if num_images is None and shown < DEFAULT_PANELS:  # (an explicit --num-images over the count stopped above)
        heads.append(f"the val split holds {n_val} images: the picture shows all of them, not {DEFAULT_PANELS}")
    return heads + [f"--{option} {path} holds a {state['config']['model']}, labelled {label} here"
                    for option, (path, state), label, model in (("vit", vit, "ViT", "vit_tiny"),
                                                                ("deit", deit, "DeiT", "deit_tiny_distill"))
                    if state["config"]["model"] != model]


def write_report(rdir: Path, written: dict, runs: dict, metrics: dict, nets: dict, comp: dict, ema: bool) -> None:
    """curves.png, report.md and report.json in rdir; `written` (make_all's) gains their paths, the run summaries
    and the comparison. nets: name -> (network, checkpoint) of each run in `runs`."""
    summaries = [run_summary(name, metrics[name], nets[name][1], sum(p.numel() for p in nets[name][0].parameters()),
                             planned_epochs(runs[name], nets[name][1])) for name in runs]
    save_figure(curves_figure(metrics), rdir / "curves.png", "--report-dir")
    picture = (Path(written["figure"]).name, [p["key"] for p in written["panels"]])
    notes = written["notes"]
    for name, text in (("report.md", report_markdown(summaries, comp, ("ViT", "DeiT"), notes, picture, ema)),
                       ("report.json", json.dumps({"runs": summaries, "comparison": comp, "notes": notes,
                                                   "panels": written["panels"]}, indent=1))):
        save_output(rdir / name, lambda path: path.write_text(text, encoding="utf-8"), KEPT,  # (→, Δ: any locale)
                    flag="--report-dir")  # (the lambda is called at once)
    written.update(curves=str(rdir / "curves.png"), report=str(rdir / "report.md"), summaries=summaries,
                   comparison=comp)


def make_all(vit_ckpt: str, deit_ckpt: str, data_path: str | None = None, teacher_run: str | None = None,
             num_images: int | None = None, seed: int = 0, out: str = "vit_vs_deit_random10.png",
             report_dir: str | None = "runs/report", device: str = "cpu", workers: int = 2, ema: bool = False) -> dict:
    """The picture, and (unless report_dir is None) curves.png, report.md and report.json. Returns what was written.
    num_images None: 10, or every val image where there are fewer. ema: predict with each checkpoint's EMA of its
    weights (--model-ema) instead of the trained weights."""
    one_file = check_report_inputs(vit_ckpt, deit_ckpt, teacher_run, out, report_dir)
    vit_state = load_checkpoint(vit_ckpt)  # read once: it also names the default shards
    if data_path is None:
        data_path = run_files_here(vit_state, vit_ckpt)["data_path"]
        if not (Path(data_path) / MANIFEST_NAME).is_file():  # e.g. moved, or on another machine
            raise MissingFile(f"{vit_ckpt} was trained on {data_path}, which holds no {MANIFEST_NAME} seen from here "
                              f"({Path.cwd()}); pass the shards with --data-path.")
    manifest = load_manifest(data_path)
    class_map = manifest_class_map(manifest)
    check_class_map(vit_state, class_map, vit_ckpt)
    n_val = manifest["splits"]["val"]["num_samples"]
    shown = min(DEFAULT_PANELS, n_val) if num_images is None else num_images
    indices = sample_indices(n_val, shown, seed)  # before the val passes
    deit_state = load_checkpoint(deit_ckpt, class_map)
    vit_net, deit_net = model_of(vit_state, vit_ckpt, device, ema), model_of(deit_state, deit_ckpt, device, ema)
    # the report's runs, metrics and teacher before the val passes: their errors cost no minutes
    runs, metrics, teacher, notes = (report_inputs(vit_ckpt, deit_ckpt, deit_state, teacher_run, class_map)
                                     if report_dir is not None else ({}, {}, None, []))
    vit = predict(vit_net, vit_state, data_path, manifest, "ViT", device, workers)
    deit = predict(deit_net, deit_state, data_path, manifest, "DeiT", device, workers)
    save_figure(prediction_figure(data_path, manifest, [vit, deit], indices), Path(out), "--out")
    notes = (picture_notes((vit_ckpt, vit_state), (deit_ckpt, deit_state), one_file, ema, report_dir is not None,
                           shown, n_val, num_images)
             + notes + comparison_notes((vit_ckpt, vit_state), (deit_ckpt, deit_state), data_path, manifest, metrics))
    keys = val_keys(data_path, manifest)
    written = {"figure": out, "notes": notes,
               "panels": [{"index": i, "key": keys[i], "lines": [t for t, _ in panel_texts(class_map, i, [vit, deit])]}
                          for i in indices]}
    if report_dir is not None:
        comp = {**comparison(class_map, vit, deit), "data_path": str(data_path), "ema": ema}  # (ema: whose predictions)
        write_report(Path(report_dir), written, runs, metrics,
                     {"teacher": teacher, "ViT": (vit_net, vit_state), "DeiT": (deit_net, deit_state)}, comp, ema)
    return written
