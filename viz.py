#!/usr/bin/env python
"""ViT vs DeiT in pictures: predictions on random val images, training curves and a comparison report.

    python viz.py                                   # runs/baseline_vit_tiny + runs/deit_tiny_distill
    python viz.py --num-images 20 --seed 3 --out more.png
    python viz.py --vit A/best.pth --deit B/best.pth --data-path SHARDS --no-report

Writes vit_vs_deit_random10.png, and runs/report/{report.md, report.json, curves.png}.
"""

import argparse
import sys
from pathlib import Path

from vitdeit.config import refuse_empty, resolve_workers, workers_problem, workers_warning
from vitdeit.distributed import resolve_device
from vitdeit.errors import VitdeitError, say_error
from vitdeit.report import make_all, paired_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit", default="runs/baseline_vit_tiny/best.pth", help="ViT checkpoint (default: %(default)s)")
    p.add_argument("--deit", default="runs/deit_tiny_distill/best.pth", help="DeiT checkpoint (default: %(default)s)")
    p.add_argument("--teacher-run", default=None, help="teacher run folder for the report (default: the folder of "
                   "the --teacher-ckpt the DeiT distilled from; none for --teacher-weights)")
    p.add_argument("--data-path", default=None, help="shards (default: the ViT checkpoint's data_path)")
    p.add_argument("--num-images", type=int, default=None, help="val images in the picture (default: 10, or every "
                   "val image where there are fewer)")
    p.add_argument("--seed", type=int, default=0, help="which random val images (default: %(default)s)")
    p.add_argument("--out", default="vit_vs_deit_random10.png", help="the picture (default: %(default)s)")
    p.add_argument("--report-dir", default="runs/report",
                   help="report.md, report.json and curves.png (default: %(default)s)")
    p.add_argument("--no-report", action="store_true", help="only the picture")
    p.add_argument("--ema", action="store_true", help="predict with each checkpoint's EMA of its weights (runs "
                   "trained with --model-ema) instead of the trained weights")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: a GPU where there is one")
    p.add_argument("--workers", type=int, default=2, help="val decode processes; -1: this node's share of its "
                   "cores, as train.py's (default: %(default)s)")
    a = p.parse_args(argv)
    if problem := workers_problem(a.workers):
        p.error(problem)
    refuse_empty(p, ("--vit", a.vit, "file"), ("--deit", a.deit, "file"), ("--data-path", a.data_path, "folder"),
                 ("--out", a.out, "file"), ("--report-dir", a.report_dir, "folder"),
                 ("--teacher-run", a.teacher_run, "folder"))
    if a.no_report and a.report_dir != p.get_default("report_dir"):
        p.error(f"--no-report with --report-dir {a.report_dir}: --no-report writes no report; drop one of them")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()  # checked now, not after the whole val pass
    if Path(a.out).is_dir():
        p.error(f"--out {a.out}: a folder; name the picture file, e.g. --out "
                f"{Path(a.out) / 'vit_vs_deit_random10.png'}")
    if Path(a.out).suffix.lower().lstrip(".") not in kinds:
        p.error(f"--out {a.out}: end it in one of matplotlib's picture formats, e.g. {Path(a.out).stem}.png "
                f"({', '.join(sorted(kinds))})")
    if text := workers_warning(a.workers):  # (the arguments' errors first: then the slow part)
        print(f"warning: {text}")
    try:
        w = make_all(a.vit, a.deit, a.data_path, a.teacher_run, a.num_images, a.seed, a.out,
                     None if a.no_report else a.report_dir, resolve_device(a.device),
                     resolve_workers(a.workers), ema=a.ema)
    except VitdeitError as e:  # the user's to fix; anything else keeps its traceback
        say_error(e)
        return 1
    for note in w["notes"]:
        print(f"note: {note}")
    print(f"wrote {w['figure']}")
    if "report" in w:
        print(f"wrote {w['report']} and {w['curves']}")
        for s in w["summaries"]:
            print(f"  {s['run']:8s} best val top-1 {s['val_top1']:6.2f}%  top-5 {s['val_top5']:6.2f}%"
                  + ("  (trained weights)" if a.ema else "") + (
                f"  (the checkpoint read is epoch {s['checkpoint_epoch']}'s, not the best epoch {s['best_epoch']}'s)"
                if s["checkpoint_epoch"] != s["best_epoch"] else ""))
        c = w["comparison"]
        print(f"  ViT and DeiT{' (EMA weights)' if a.ema else ''} agree on {c['agreement']:.1f}% of "
              f"{c['val_images']} val images")
        print(f"  {paired_line(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
