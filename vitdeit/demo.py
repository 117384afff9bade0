"""A small synthetic dataset in the exact ImageNet-100 layout, for CPU demos and tests.

It is synthetic, and says so: each class is a geometric shape (disk, ring, triangle, cross, ...)
drawn at a random position, size, rotation and colour over a textured, cluttered background,
and the class names are real ImageNet WNIDs only so that the layout matches. Half of the shapes are
filled with their class's own hue, the others with a random colour: colour is a cue a ViT from
scratch learns quickly, and it gets about half of the images right. The rest needs the shape, local
structure at a random position, which a convolution's translation equivariance picks up in a few
epochs while a ViT has to learn it from data: the gap a distilled DeiT is meant to close.

Layout written: OUT/train.X1..X4/WNID/WNID_N.JPEG, OUT/val.X/WNID/ILSVRC2012_val_NNNNNNNN.JPEG,
OUT/Labels.json (only the chosen classes). A later generation replaces them where OUT/Labels.json is one the
demo writes, and refuses any other dataset.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .classes import load_labels
from .config import refuse_below, usable_cores
from .errors import SettingError, VitdeitError, first_line, say_error
from .packing import SPLIT_DIR_PATTERNS

SHAPES = ("disk", "ring", "square", "triangle", "cross", "arrow", "diamond", "star", "bars", "hourglass",
          "frame", "arc")


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[list[tuple[float, float]]]:
    """Polygons (lists of points) making up a shape of radius r px centred at (cx, cy)."""

    def rotated(pts):
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]

    def regular(n, rad, phase=0.0):
        return [(rad * math.cos(phase + 2 * math.pi * k / n), rad * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    t = r * 0.32  # stroke half-width
    if kind == "square":
        return [rotated(regular(4, r, math.pi / 4))]
    if kind == "triangle":
        return [rotated(regular(3, r, -math.pi / 2))]
    if kind == "diamond":
        return [rotated([(0, -r), (r * 0.55, 0), (0, r), (-r * 0.55, 0)])]
    if kind == "star":
        pts = [((r if k % 2 == 0 else r * 0.42) * math.cos(math.pi * k / 5 - math.pi / 2),
                (r if k % 2 == 0 else r * 0.42) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        return [rotated(pts)]
    if kind == "cross":
        return [rotated([(-r, -t), (r, -t), (r, t), (-r, t)]), rotated([(-t, -r), (t, -r), (t, r), (-t, r)])]
    if kind == "arrow":
        return [rotated([(-r, -t * 0.8), (0, -t * 0.8), (0, -r * 0.7), (r, 0), (0, r * 0.7), (0, t * 0.8),
                         (-r, t * 0.8)])]
    if kind == "bars":
        return [rotated([(-r, y0), (r, y0), (r, y0 + 0.4 * r), (-r, y0 + 0.4 * r)]) for y0 in (-r, -0.2 * r, 0.6 * r)]
    if kind == "hourglass":
        return [rotated([(-r, -r), (r, -r), (-r, r), (r, r)])]
    if kind == "frame":
        return [rotated([(-r, -r), (r, -r), (r, -r + t), (-r, -r + t)]),  # top, bottom, left, right
                rotated([(-r, r - t), (r, r - t), (r, r), (-r, r)]),
                rotated([(-r, -r), (-r + t, -r), (-r + t, r), (-r, r)]),
                rotated([(r - t, -r), (r, -r), (r, r), (r - t, r)])]
    if kind == "arc":
        outer = [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, math.pi, 12)]
        inner = [((r - 1.6 * t) * math.cos(a), (r - 1.6 * t) * math.sin(a)) for a in np.linspace(math.pi, 0, 12)]
        return [rotated(outer + inner)]
    raise ValueError(kind)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _class_colour(rng: np.random.Generator, hue: float, width: float) -> tuple[int, int, int]:
    """A saturated colour whose hue lies within +-width/2 of `hue` (both in turns, 0..1)."""
    h = (hue + rng.uniform(-width / 2, width / 2)) % 1.0
    return tuple(int(255 * v) for v in colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))


def draw_sample(shape: str, rng: np.random.Generator, size: tuple[int, int],
                hue: float | None = None, hue_width: float = 0.05) -> Image.Image:
    """One image of `shape`; its fill colour has the class's `hue` when given, else a random colour."""
    w, h = size
    # Background: a smooth random two-colour gradient plus grain, so that no pixel statistic gives the class.
    a, b = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h) + 1) / 2
    bg = a * ramp[..., None] + b * (1 - ramp[..., None]) + rng.normal(0, 8, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # clutter: thin random strokes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.line([(x0, y0), (x0 + rng.uniform(-w / 3, w / 3), y0 + rng.uniform(-h / 3, h / 3))],
                  fill=_random_colour(rng), width=1)
    short = min(w, h)
    r = rng.uniform(0.28, 0.42) * short
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = _class_colour(rng, hue, hue_width) if hue is not None else _random_colour(rng)
    if shape in ("disk", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":
            ri = r * 0.55
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=tuple(int(v) for v in (a + b) / 2))
    else:
        for poly in _polygon(shape, cx, cy, r, rng.uniform(-0.35, 0.35)):  # +-20 degrees
            draw.polygon(poly, fill=fill)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def demo_classes(all_labels: dict[str, str], num_classes: int) -> dict[str, str]:
    """The classes a demo of `num_classes` uses: spread over the sorted list (varied, real class names)."""
    wnids = sorted(all_labels)
    step = len(wnids) / num_classes
    return {w: all_labels[w] for w in (wnids[int(i * step)] for i in range(num_classes))}


def clear_demo_dataset(out: Path, all_labels: dict[str, str]) -> None:
    """Remove what an earlier generation wrote to `out` (another class count leaves class folders the new Labels.json
    lacks). Only a demo dataset: its Labels.json is one the demo writes; a real one has its own classes."""
    made = [p for p in sorted(out.iterdir()) if p.name == "Labels.json" or any(
        pattern.match(p.name) for pattern in SPLIT_DIR_PATTERNS.values())] if out.is_dir() else []
    if not made:
        return
    try:
        ours = json.loads((out / "Labels.json").read_text()) in [demo_classes(all_labels, k)
                                                                  for k in range(2, len(SHAPES) + 1)]
    except (OSError, ValueError):  # missing or not JSON
        ours = False
    if not ours:
        raise SettingError(f"{out} holds {made[0].name} of a dataset the demo did not write (its Labels.json is not "
                           f"one the demo writes); move it away, or run the demo with another --out.")
    for p in made:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def make_demo_dataset(out: str | Path, labels_path: str | Path, num_classes: int = 10,
                      train_per_class: int = 240, val_per_class: int = 50, seed: int = 0,
                      min_size: int = 56, max_size: int = 88, colour_cue: float = 0.5) -> Path:
    """Write the demo dataset to `out`; return it. Image sides are random in [min_size, max_size] px.

    With probability `colour_cue` a shape is filled with its class's own hue (class i: hue i / classes),
    otherwise with a random colour: colour alone caps accuracy near colour_cue + (1 - colour_cue) / classes,
    which a ViT finds quickly; the rest takes the shape, which a convolution finds first."""
    out = Path(out)
    all_labels = load_labels(labels_path)
    if not 2 <= num_classes <= min(len(all_labels), len(SHAPES)):
        raise SettingError(f"num_classes={num_classes}: the demo supports 2..{min(len(all_labels), len(SHAPES))}.")
    chosen = demo_classes(all_labels, num_classes)
    clear_demo_dataset(out, all_labels)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on its path, a folder it may not write in
        raise SettingError(f"{out}: cannot be made ({first_line(e)}); run the demo with another --out.") from e
    (out / "Labels.json").write_text(json.dumps(chosen, indent=1))
    rng = np.random.default_rng(seed)
    val_counter = 0
    for ci, wnid in enumerate(chosen):
        train_counter = 0
        for split_dir, count in [(f"train.X{k + 1}", train_per_class // 4 + (k < train_per_class % 4))
                                 for k in range(4)] + [("val.X", val_per_class)]:
            d = out / split_dir / wnid
            d.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                size = tuple(int(v) for v in rng.integers(min_size, max_size + 1, 2))
                hue = ci / num_classes if rng.random() < colour_cue else None
                img = draw_sample(SHAPES[ci], rng, size, hue, hue_width=0.5 / num_classes)
                if split_dir == "val.X":
                    val_counter += 1
                    name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
                else:
                    train_counter += 1
                    name = f"{wnid}_{train_counter}.JPEG"
                img.save(d / name, format="JPEG", quality=90)
    return out


# ---------------------------------------------------------------- the README's main command

ROOT = Path(__file__).resolve().parents[1]
# CPU-sized settings: 64 px images with the standard 16 px patches (16 tokens), batch 32. --lr is per
# 512 images of global batch (train.py scales it), so 0.005 means an effective AdamW lr of 3.1e-4 here.
DEMO_TRAIN = ["--img-size", "64", "--patch-size", "16", "--batch-size", "32", "--lr", "0.005",
              "--warmup-epochs", "0.5", "--crop-scale-min", "0.35", "--drop-path", "0.0"]


RUN_NAMES = ("teacher_resnet18", "baseline_vit_tiny", "deit_tiny_distill")


def check_demo_runs(out: Path) -> None:
    """The demo replaces its own runs (train.py --overwrite), never a run on other data (the README's ImageNet-100
    commands use the same run names, under ./runs rather than ./demo_runs, so that neither refuses the other's)."""
    shards = (out / "demo_shards").resolve()
    for name in RUN_NAMES:
        run = out / "demo_runs" / name
        if not (run / "last.pth").is_file():
            continue
        try:
            data = Path(json.loads((run / "config.json").read_text())["data_path"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            data = None
        if data != shards:
            raise SettingError(f"{run} holds a run on {data or 'unknown data'}, not on the demo's {shards}: the demo "
                               f"would replace it. Move it away, or run the demo with another --out.")


def demo_commands(out: Path, epochs: dict[str, int], workers: int, quick: bool) -> list[list[str]]:
    py = sys.executable
    teacher, vit, deit = RUN_NAMES
    data, shards, runs = out / "demo_data", out / "demo_shards", out / "demo_runs"
    recipe = list(DEMO_TRAIN)
    if quick:  # a smoke run on smaller images; each flag once in the printed commands
        for flag, value in (("--img-size", "32"), ("--patch-size", "8")):
            recipe[recipe.index(flag) + 1] = value
    common = ["--data-path", str(shards), "--output-dir", str(runs), "--workers", str(workers), "--overwrite",
              *recipe]  # an earlier demo's runs are replaced (check_demo_runs: only those)
    gen = [py, "-m", "vitdeit.demo", "--generate-only", "--out", str(out)] + (["--quick"] if quick else [])
    return [
        gen,
        [py, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out", str(shards), "--workers", str(workers)],
        [py, str(ROOT / "train.py"), "--model", "resnet18", "--epochs", str(epochs["resnet18"]),
         "--run-name", teacher, *common],
        [py, str(ROOT / "train.py"), "--model", "vit_tiny", "--epochs", str(epochs["vit"]),
         "--run-name", vit, *common],
        # hard distillation, the DeiT paper's better variant: with the reference's soft-loss normalisation
        # (KL / classes) and alpha 0.5, a soft run on this demo hardly differs from the ViT baseline
        [py, str(ROOT / "train.py"), "--model", "deit_tiny_distill", "--teacher", "resnet18", "--teacher-ckpt",
         str(runs / teacher / "best.pth"), "--distillation-type", "hard", "--epochs", str(epochs["vit"]),
         "--run-name", deit, *common] + (["--allow-weak-teacher"] if quick else []),
        [py, str(ROOT / "viz.py"), "--vit", str(runs / vit / "best.pth"), "--deit",
         str(runs / deit / "best.pth"), "--out", str(out / "vit_vs_deit_random10.png"),
         "--report-dir", str(runs / "report"), "--workers", str(workers)],  # the teacher row: the DeiT's teacher run
    ]


def main(argv=None) -> int:
    import argparse
    import shlex
    import subprocess
    import time

    p = argparse.ArgumentParser(description="The whole comparison on the synthetic demo data: generate -> pack -> "
                                            "train teacher, ViT, DeiT -> pictures and report.")
    p.add_argument("--out", default=".", help="where demo_data/, demo_shards/ and demo_runs/ go (default: here)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs for ViT and DeiT (the teacher gets half; default: 8, with --quick 1)")
    workers = max(1, min(4, usable_cores() - 1))
    p.add_argument("--workers", type=int, default=None,  # None: not given (--generate-only refuses a given one)
                   help=f"processes (DALI: threads) that pack and decode, for every step (default: the usable cores "
                        f"less one, 1 to 4: {workers} here)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (tests, CI): minutes become seconds")
    p.add_argument("--generate-only", action="store_true", help="only write the demo dataset, to --out/demo_data")
    a = p.parse_args(argv)
    if a.generate_only and a.epochs is not None:  # (not taken without a word)
        p.error(f"--generate-only writes the images and trains nothing: drop --epochs {a.epochs}")
    if a.generate_only and a.workers is not None:
        p.error(f"--generate-only writes the images in this one process: drop --workers {a.workers}")
    a.workers = workers if a.workers is None else a.workers
    refuse_below(p, ("--epochs", a.epochs, 1), ("--workers", a.workers, 1))  # before minutes of data and packing
    if Path(a.out).exists() and not Path(a.out).is_dir():
        print(f"error: --out {a.out}: a file, not a folder; pass a folder (it is made if missing).", file=sys.stderr)
        return 1
    if a.generate_only:
        kw = dict(num_classes=4, train_per_class=48, val_per_class=12) if a.quick else {}
        data = Path(a.out) / "demo_data"
        try:
            make_demo_dataset(data, ROOT / "Labels.json", **kw)
        except VitdeitError as e:
            say_error(e)
            return 1
        print(f"wrote the synthetic demo dataset to {data}")
        return 0
    out = Path(a.out).resolve()  # the runs' saved data_path then names the shards from any folder (check_demo_runs)
    n = a.epochs or (1 if a.quick else 8)  # (--quick with --epochs: the given count, on the small images)
    epochs = {"vit": n, "resnet18": max(1, n // 2)}
    try:
        check_demo_runs(out)
    except VitdeitError as e:
        say_error(e)
        return 1
    t0 = time.time()
    for cmd in demo_commands(out, epochs, a.workers, a.quick):
        print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        step = subprocess.Popen(cmd)
        try:
            failed = step.wait() != 0
        except KeyboardInterrupt:  # Ctrl-C reaches the step too (one terminal): let it stop and say where it stopped
            try:  # (subprocess.run would kill it 0.25 s later, before its own line)
                step.wait(timeout=30)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or a step that hangs
                step.kill()
            print("demo: interrupted; the same command runs the demo again from its first step (or finish the step "
                  "above by hand, as it says).", file=sys.stderr)
            return 130
        if failed:
            print("demo: this step failed; see the error above.", file=sys.stderr)
            return 1
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Look at:\n  {out / 'vit_vs_deit_random10.png'}\n"
          f"  {out / 'demo_runs' / 'report' / 'report.md'} and curves.png\n  {out / 'demo_runs'}/*/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
