#!/usr/bin/env python
"""Pack ImageNet-style folders into globally shuffled WebDataset shards, DALI index files and a manifest.

    python pack_shards.py --data-path /data/imagenet100 --out /data/in100-shards
    python pack_shards.py --data-path /data/imagenet100 --out /data/in100-256 --resize-short 256  # smaller, faster

--resize-short S should stay at least train.py's --img-size / --crop-pct (256 for 224 px): val resizes the
shorter side to that, and a smaller S would upscale. It is not free for training: a small random-resized crop
(8 % of the area at the least) is then upscaled from fewer pixels than the original holds, so train crops are
softer than the reference's, which crops the full-size JPEGs.

Run once per dataset; train.py, viz.py and the benchmarks read SHARDS_DIR/manifest.json.
"""

import argparse
import sys

from vitdeit.config import refuse_empty
from vitdeit.errors import SettingError, VitdeitError, say_error
from vitdeit.packing import (ALLOW_MISSING_FLAG, SKIP_FLAG, SUBSET_FLAG, VAL_COPIES_FLAG, PackOptions, pack,
                             summary_lines)


def main(argv=None) -> int:
    d = PackOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True,
                   help="folder with train.X1..X4 (or train/), val.X (or val/), Labels.json")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--labels", default=None, help="WNID -> name JSON (default: DATA_PATH/Labels.json)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the global shuffle (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="samples per shard, at most (default: %(default)s)")
    p.add_argument("--resize-short", type=int, default=None, metavar="S",
                   help="re-encode images whose shorter side exceeds S px down to S (default: keep originals)")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality,
                   help="JPEG quality of re-encoded images (default: %(default)s)")
    p.add_argument(SKIP_FLAG, action="store_true",
                   help="skip files that are not readable images (listed in manifest.json)")
    p.add_argument(ALLOW_MISSING_FLAG, action="store_true",
                   help="pack even if some classes of Labels.json have no train or no val images (default: refused)")
    p.add_argument(SUBSET_FLAG, action="store_true",
                   help="pack only the classes of Labels.json (--labels): class folders of other WNIDs are not read "
                        "(listed in manifest.json; default: refused). For some classes, or a partial download")
    p.add_argument(VAL_COPIES_FLAG, action="store_true",
                   help="pack val images whose bytes are also in train as they are (listed in manifest.json; "
                        "default: refused). For a published split kept whole")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards in --out if another --data-path packed them (default: refused)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="parallel processes (default: %(default)s, the cores up to 8)")
    a = p.parse_args(argv)
    refuse_empty(p, ("--data-path", a.data_path, "folder"), ("--out", a.out, "folder"))
    try:  # (its counts and sizes checked: argparse's usage error, before any work)
        opts = PackOptions(seed=a.seed, shard_size=a.shard_size, resize_short=a.resize_short,
                           jpeg_quality=a.jpeg_quality, skip_bad=a.skip_bad, workers=a.workers,
                           allow_missing_classes=a.allow_missing_classes, subset=a.subset,
                           allow_train_val_copies=a.allow_train_val_copies)
    except SettingError as e:
        p.error(str(e))
    try:
        m = pack(a.data_path, a.out, a.labels, opts, overwrite=a.overwrite)
    except VitdeitError as e:
        say_error(e)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards in {a.out} are kept; run the same command again to go on",
              file=sys.stderr)
        return 130
    for line in summary_lines(m, a.out):
        print(line)
    print(f"wrote {a.out}/manifest.json ({len(m['classes'])} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
