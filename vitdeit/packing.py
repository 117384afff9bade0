"""ImageNet-style folders -> globally shuffled WebDataset shards + DALI index files + manifest.json.

Input layout (the ImageNet-100 download):
    DATA/train.X1 .. train.X4/WNID/*.JPEG   (or a plain DATA/train/)
    DATA/val.X/WNID/*.JPEG                  (or DATA/val/)
    DATA/Labels.json                        WNID -> name; class index = position in the sorted WNIDs

Output (SHARDS_DIR):
    train-000000.tar + train-000000.idx, ..., val-000000.tar + .idx, manifest.json

Each sample is `KEY.jpg` (JPEG bytes), `KEY.cls` (class index as ASCII, WebDataset's convention) and
`KEY.lbl` (the same index as a little-endian int32, so DALI reads labels without Python). KEY is the
source file's stem, so every sample traces back to its file.

Safe to interrupt: a shard is written under a temporary name and renamed when complete; a record of
each finished shard lets a rerun with the same inputs and options skip it. manifest.json is written
last, and only when every check passed: its presence means the output is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import struct
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path

import webdataset
import numpy as np
from PIL import Image, ImageOps

from .classes import (MANIFEST_NAME, OWN_CLASSES, PROGRESS_DIR, WNID_RE, ClassMap, classes_without_images,
                      holds_class_folders, holds_folders_named, load_labels, shards_dir_for, some,
                      val_copies_text)
from .config import below, usable_cores
from .data.index import index_matches, index_sha1, index_text, read_index, tar_agrees
from .errors import DataError, SettingError, WriteFailed, image_failure, output_folder, write_failed
from .lock import folder_lock

FORMAT_VERSION = 1
# in every shard's fingerprint: raise it when the same input and options would be written differently, so that
# shards an earlier packer wrote are rewritten, not reused (2: EXIF orientation applied, 16-bit pixels scaled)
ENCODING_VERSION = 2
SPLIT_DIR_PATTERNS = {"train": re.compile(r"^train(\.X\d*)?$"), "val": re.compile(r"^val(\.X\d*)?$")}
# names a split folder was surely meant to have (case, "_" or "-" for ".", a lower-case x): an error, not a gap
NEAR_MISS = {split: re.compile(rf"^{split}([._-]?x\d*)?$", re.IGNORECASE) for split in SPLIT_DIR_PATTERNS}
# the files a run writes per shard NAME: NAME.tar, NAME.idx(.tmp), .NAME.tar.tmp, .progress/NAME.json(.tmp)
SHARD_FILE = re.compile(r"^\.?((?:train|val)-\d{6})\.(?:tar|idx|tar\.tmp|idx\.tmp|json|json\.tmp)$")
SKIP_FLAG = "--skip-bad"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".jpe"}  # files that are surely images: loose in a split folder, misplaced
ALLOW_MISSING_FLAG = "--allow-missing-classes"
SUBSET_FLAG = "--subset"
VAL_COPIES_FLAG = "--allow-train-val-copies"
NOT_A_WNID = "class folders are named by WNID ('n' + 8 digits, e.g. n01440764), as Labels.json's keys"
# how the pool starts its workers: fork on Linux (nothing to re-import); macOS and Windows fork unsafely or not at all
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


@dataclass(frozen=True)
class PackOptions:
    seed: int = 0
    shard_size: int = 1000  # samples per shard (at most); ~110 MB shards on original ImageNet JPEGs
    resize_short: int | None = None  # re-encode so the shorter side is at most this many px (None: keep)
    jpeg_quality: int = 90  # only for images that are re-encoded (converted or resized)
    skip_bad: bool = False
    allow_missing_classes: bool = False  # a class of Labels.json with no train or no val images: packed, not refused
    subset: bool = False  # only Labels.json's classes: class folders of other WNIDs are not read (listed), not refused
    allow_train_val_copies: bool = False  # val images whose bytes are also in train: packed and listed, not refused
    workers: int = max(1, min(8, usable_cores()))

    def __post_init__(self):  # (pack_shards.py makes this argparse's usage error; pack()'s other callers meet it too)
        if problem := below(("--shard-size", self.shard_size, 1), ("--workers", self.workers, 1),
                            ("--resize-short", self.resize_short, 8)):
            raise SettingError(problem)
        if not 1 <= self.jpeg_quality <= 100:  # PIL takes any number (-1: its default 75; above 100: 100) silently
            raise SettingError(f"--jpeg-quality {self.jpeg_quality}: must be in 1..100")


@dataclass(frozen=True)
class Source:
    path: str
    key: str
    label: int


@dataclass
class ShardResult:
    split: str
    name: str
    fingerprint: str
    num_inputs: int = 0
    num_samples: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted: list[tuple[str, str]] = field(default_factory=list)  # (path, what was done)
    hashes: list[tuple[str, str]] = field(default_factory=list)  # (sha1 of source bytes, path)
    # (path, message): what Pillow warned of while decoding it (corrupt EXIF data, a decompression-bomb size)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    index_sha1: str = ""  # of the index written (a record before 2026-12-07 has none: its index is read against
    # its tar, then this kept)
    reused: bool = False  # this run found the shard written by an earlier one (same inputs and options)
    rewritten: str = ""  # why this run wrote again a shard an earlier one had written ("": it had not)


RUN_ONLY = {"reused", "rewritten"}  # what one run did with a shard: not kept in its record


# ---------------------------------------------------------------- scanning


def find_split_dirs(data_path: Path) -> dict[str, list[Path]]:
    if not data_path.is_dir():
        what = f"is {what_is(data_path)}, not a folder" if data_path.exists() or data_path.is_symlink() else \
            "does not exist"
        raise DataError(f"{data_path}: {what}; pass --data-path DIR with train.X*/ and val.X/ in it.")
    found: dict[str, list[Path]] = {"train": [], "val": []}
    targets = {d.resolve() for d in data_path.iterdir() if d.is_symlink()}  # val.X -> val_real: val_real is fine
    for d in sorted(data_path.iterdir()):
        for split, pattern in SPLIT_DIR_PATTERNS.items():
            if pattern.match(d.name):
                if not d.is_dir():  # a split left out would be a quarter of the data lost without a word
                    raise DataError(f"{d}: {what_is(d)}, not a folder; it is named like a {split} split folder: fix "
                                    f"it, or move it out of {data_path}.")
                found[split].append(d)
            elif d.is_dir() and NEAR_MISS[split].match(d.name) and d.resolve() not in targets:  # train.x2, VAL.X
                raise DataError(f"{d}: a folder named almost like a {split} split folder ({split}.X<digits> or "
                                f"{split}); it would be left out. Rename it (e.g. {split}.X2), or move it out of "
                                f"{data_path}.")
        if (d.is_dir() and not d.name.startswith(".") and d.resolve() not in targets and not split_dir_name(d.name)
                and holds_class_folders(d)):
            # train.X4 (copy), train4, old_val: class folders a run would leave out without a word
            raise DataError(f"{d}: holds WNID class folders but is not named like a split folder (train.X<digits>, "
                            f"train, val.X<digits> or val); they would be left out. Move it out of {data_path}, or, "
                            f"if its images belong to a split, rename it to that split's pattern.")
    seen: dict[Path, Path] = {}
    for d in found["train"] + found["val"]:  # val -> val.X beside val.X: each image twice (a duplicate stem each)
        if (real := d.resolve()) in seen:
            raise DataError(f"{seen[real]} and {d}: the same folder ({real}), one a link to it, both named like split "
                            f"folders: its images would be read twice. Remove the link, or move it out of "
                            f"{data_path}.")
        seen[real] = d
    for split, dirs in found.items():
        if not dirs:
            hint = ""
            if holds_shards(data_path):  # pack_shards.py's output given for the images (train.py's --data-path)
                hint = f" {data_path} holds shards, pack_shards.py's output: {packed_from_text(data_path)}."
            elif any(p.match(data_path.name) for p in NEAR_MISS.values()):  # train.X1, val, ... given itself
                hint = (f" {data_path} itself looks like a split folder: pass its parent, --data-path "
                        f"{data_path.parent}.")
            elif inner := folders_holding_splits(data_path):  # one level too high: an archive's own top folder
                hint = (f" {inner[0]} holds split folders: pass --data-path {inner[0]}." if len(inner) == 1 else
                        f" Folders in it hold split folders ({', '.join(map(str, inner))}): pass one as --data-path.")
            elif holds_class_folders(data_path):
                hint = (f" {data_path} holds the WNID class folders itself (torchvision's ImageFolder layout): move "
                        f"them into {data_path / 'train'}/ and the val images' class folders into "
                        f"{data_path / 'val'}/.")
            raise DataError(
                f"{data_path}: no {split} split found (expected a folder {split}.X* or {split}/ with WNID "
                f"class folders inside). Both splits are required: train to learn from, val to compare runs." + hint)
    return found


def holds_shards(folder: Path) -> bool:
    """folder holds pack_shards.py's shard files (a finished pack, or one stopped before its manifest); a
    manifest.json alone is not taken for one (a download may have its own). False for a missing folder (named by
    find_split_dirs' own error)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return any(SHARD_FILE.match(e.name) for e in entries)


def packed_source(folder: Path) -> str | None:
    """The dataset folder the manifest in `folder` was packed from (source_of's); None where there is no manifest,
    a damaged one, or one that names no source (another tool's)."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("source", {}).get("data_path")
    except (OSError, ValueError, AttributeError):
        return None


def packed_from_text(shards: Path) -> str:
    """What to pass instead of a shards folder given where the image folders go: the folder its manifest names as
    the source, and train.py for the shards themselves (where the pack finished: its manifest is there)."""
    if not (source := packed_source(shards)):  # a pack stopped before its manifest, or a damaged one
        return "pass the image folders they were packed from"
    return f"pass the image folders they were packed from, --data-path {source}, or train on these: train.py " \
           f"--data-path {shards}"


def folders_holding_splits(data_path: Path) -> list[Path]:
    """data_path's folders that hold a split folder (train.X1, val.X, ...): the dataset one level down, as an archive
    unpacks it (imagenet100/train.X1/...), for the hint of a --data-path given one level too high."""
    with os.scandir(data_path) as entries:  # (is_dir: the entry's type as listed, no stat per file)
        folders = sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())
    return [d for d in folders if holds_folders_named(d, split_dir_name)]


def split_dir_name(name: str) -> bool:
    """A name a split folder has: train.X1, train, val.X, val, ..."""
    return any(pattern.match(name) for pattern in SPLIT_DIR_PATTERNS.values())


def what_is(path: Path) -> str:
    """What a path that is not what it should be is, for an error message."""
    if path.is_symlink() and not path.exists():
        return f"a broken symlink (to {os.readlink(path)}, which does not exist)"
    return "a folder" if path.is_dir() else "a file"


def misnamed_file(f: Path, class_dir: Path) -> str | None:
    """Why the shards cannot hold the entry f of a class folder under its name (one line, the fix in it), or None."""
    if not f.is_file():
        return f"{f}: expected image files in {class_dir}, found {what_is(f)}; fix it or move it away"
    try:
        f.name.encode("utf-8")
    except UnicodeEncodeError:  # tar member names and DALI's index are UTF-8
        return f"{f}: the file name is not valid UTF-8 (bytes {os.fsencode(f.name)!r}); rename the file"
    if "." in f.stem:
        return (f"{f}: the file stem {f.stem!r} contains '.', which WebDataset reserves to separate a sample's key "
                f"from its extension; rename the file")
    if re.search(r"\s", f.name):
        return (f"{f}: the file name contains whitespace, which DALI's index format (fields separated by spaces) "
                f"cannot hold; rename the file")
    return None


def scan_split(dirs: list[Path], class_map: ClassMap, labels_path: Path, hidden: list[str] | None = None,
               misnamed: list[str] | None = None, unlisted: list[dict] | None = None,
               misnamed_in: Counter | None = None) -> list[Source]:
    """The split's image files as samples. Names starting with "." are not read (macOS's ._NAME and .DS_Store
    files, an editor's backups): they go to `hidden`, which the manifest counts. A file or class folder whose name
    the shards cannot hold goes to `misnamed` (one line each), for pack() to list them all at once: a camera's
    `IMG 0001.JPG` names thousands; raised here when no list is passed. Class folders of WNIDs not in Labels.json
    go to `unlisted` ({path, files}: --subset's, left unread) where a list is passed, else to `misnamed`, one line
    per split folder. misnamed_in counts the misnamed entries of each class folder, by class index."""
    sources, hidden = [], [] if hidden is None else hidden
    problems = [] if misnamed is None else misnamed
    for d in dirs:
        other_wnids = []  # class folders of WNIDs Labels.json does not list
        for class_dir in sorted(d.iterdir()):
            if class_dir.name.startswith("."):
                hidden.append(str(class_dir))
                continue
            if not class_dir.is_dir():
                if class_dir.suffix.lower() in IMAGE_SUFFIXES:  # ILSVRC's val as downloaded: 50,000 in one folder
                    loose = [f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
                    raise DataError(f"{d}: {len(loose)} file(s) directly in the split folder (e.g. {class_dir.name});"
                                    f" its images go in WNID class folders ({d}/WNID/NAME.JPEG). ILSVRC's val images "
                                    f"come unsorted: move each into its class's folder (the download's "
                                    f"LOC_val_solution.csv gives each image's WNID).")
                raise DataError(f"{class_dir}: {what_is(class_dir)}; expected only WNID class folders in {d}: "
                                f"fix it or move it away.")
            if class_dir.name not in class_map.index and any(p.match(class_dir.name) for p in NEAR_MISS.values()):
                raise DataError(f"{class_dir}: a split folder inside the split folder {d} (an archive unpacked one "
                                f"level too deep?); move its class folders up into {d} and remove it.")
            if class_dir.name not in class_map.index and WNID_RE.match(class_dir.name):
                other_wnids.append(class_dir)
                continue
            if class_dir.name not in class_map.index:
                problems.append(f"{class_dir}: class folder {class_dir.name!r} is not in {labels_path}; {NOT_A_WNID}: "
                                f"rename it to its class's WNID (and add that to Labels.json), or remove it")
                continue
            label = class_map.index[class_dir.name]
            for f in sorted(class_dir.iterdir()):
                if f.name.startswith("."):
                    hidden.append(str(f))
                elif why := misnamed_file(f, class_dir):
                    problems.append(why)
                    if misnamed_in is not None and f.is_file():  # (its class has images, once it is renamed)
                        misnamed_in[label] += 1
                else:
                    sources.append(Source(str(f), f.stem, label))
        if unlisted is not None:  # (scandir: a file's type without a stat, for up to 1,300 files a folder)
            unlisted += [{"path": str(c), "files": sum(e.is_file() and not e.name.startswith(".") for e in
                                                       os.scandir(c))} for c in other_wnids]
        elif other_wnids:  # one line per split folder: a partial Labels.json leaves out dozens
            only = (f"or pass {SUBSET_FLAG} to pack only its {len(class_map)} classes (the others are then listed in "
                    f"the manifest, not read)")
            problems.append(f"{other_wnids[0]}: class folder {other_wnids[0].name!r} is not in {labels_path}; add it "
                            f"there (WNID -> name), remove the folder, {only}" if len(other_wnids) == 1 else
                            f"{d}: {len(other_wnids)} class folders whose WNIDs are not in {labels_path} "
                            f"({some([c.name for c in other_wnids], at_most=5)}): add them there (WNID -> name), "
                            f"remove them, {only}")
    if misnamed is None:
        check_names(problems)
    return sources


def check_names(problems: list[str]) -> None:
    """All of scan_split's misnamed files and folders in one error: the first 50 named, the rest counted."""
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        own = f"\n{OWN_CLASSES[0].upper()}{OWN_CLASSES[1:]}." if any(NOT_A_WNID in p for p in problems) else ""
        raise DataError(f"{len(problems)} problem(s) with file or class folder names; nothing was written. Fix each "
                        f"and run again:\n" + "\n".join(f"  {p}" for p in problems[:50]) + more + own)


def check_unique_keys(sources: list[Source]) -> None:
    first: dict[str, str] = {}
    dups = []
    for s in sources:
        if s.key in first:
            dups.append(f"  {s.path}  (same stem as {first[s.key]})")
        else:
            first[s.key] = s.path
    if dups:
        raise DataError(
            f"{len(dups)} duplicate file stem(s): the stem is each sample's key and must be unique across "
            f"all splits. Rename or remove:\n" + "\n".join(dups[:50])
        )


def plan_shards(sources: list[Source], shard_size: int, seed: int, split: str) -> list[list[Source]]:
    """Globally shuffle (seeded, independent of file-system order), then cut into near-equal shards."""
    order = sorted(sources, key=lambda s: s.key)
    random.Random(f"{seed}-{split}").shuffle(order)
    n_shards = max(1, math.ceil(len(order) / shard_size))
    bounds = [round(i * len(order) / n_shards) for i in range(n_shards + 1)]
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_shards)]


def source_of(split_dirs: dict[str, list[Path]]) -> str:
    """The dataset folder, as the manifest records it (the split folders' parent, links resolved)."""
    return str(Path(split_dirs["train"][0]).parent.resolve())


def check_same_source(out: Path, source: str) -> None:
    """--out holding shards of another dataset folder: refused, not replaced without a word (a rerun on the same
    folder goes on: it reuses the unchanged shards)."""
    earlier = packed_source(out)  # (none from a damaged manifest: load_manifest's advice is this rerun)
    if earlier and earlier != source:
        raise DataError(f"--out {out}: holds shards packed from {earlier}, not from {source}; pass another --out, "
                        f"or --overwrite to replace them.")
    if not earlier and not holds_shards(out):  # no shards: not a damaged one
        raise DataError(f"--out {out}: its {MANIFEST_NAME} is not a pack_shards.py manifest, and there are no shards "
                        f"beside it; pass another --out (a new or empty folder), or --overwrite to replace it.")


# ---------------------------------------------------------------- per image


def encode_image(raw: bytes, resize_short: int | None, quality: int) -> tuple[bytes, str | None]:
    """Verify by a full decode; return JPEG RGB bytes and what was changed (None: the original bytes)."""
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # a full decode: truncated or corrupt files raise here
        changes = []
        if im.format != "JPEG":
            changes.append(f"{im.format} bytes -> JPEG")
        if im.mode != "RGB":
            changes.append(f"{im.mode} -> RGB")
        # DALI's decoders apply an EXIF orientation, torchvision's and PIL's do not: apply it once, here, so that
        # every loader sees the picture upright (a re-encode drops the tag, which would lose it otherwise)
        orientation = im.getexif().get(0x0112, 1)  # the EXIF Orientation tag
        if orientation in range(2, 9):
            changes.append(f"EXIF orientation {orientation} applied")
            im = ImageOps.exif_transpose(im)
        # 16-bit grey: scale to 8 bits (convert("RGB") would clip nearly all to white). Pillow opens 16-bit PNGs as
        # I;16, or as I (32-bit) before version 10.x: I within 0..65535 is taken as 16-bit too
        lo, hi = im.getextrema() if im.mode == "I" else (0, 0)  # one pass over the pixels, for 32-bit only
        if im.mode.startswith("I;16") or (im.mode == "I" and 0 <= lo <= hi < 2**16):
            im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))
        elif im.mode in ("I", "F"):  # 32-bit: no range to scale from
            raise ValueError(f"{im.mode} (32-bit) pixels have no 8-bit range to convert to; save it as 8-bit")
        w, h = im.size
        if resize_short and min(w, h) > resize_short:
            scale = resize_short / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            changes.append(f"resized {w}x{h} -> {size[0]}x{size[1]}")
        if not changes:
            return raw, None
        out = im.convert("RGB")
        if resize_short and min(w, h) > resize_short:
            out = out.resize(size, Image.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "; ".join(changes)


def write_index(tar_path: Path, idx_path: Path) -> tuple[int, str]:
    """Write the tar's DALI index (data/index.py) beside it; (the samples it lists, its index_sha1)."""
    text, count = index_text(tar_path)
    write_text_atomic(idx_path, text)
    return count, index_sha1(idx_path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write PATH.tmp, then rename it to PATH: a killed run never leaves a half-written file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")  # (an index holds file names: not the locale's)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a part-written file only takes space (a full disk's)
        e.filename = e.filename or str(tmp)  # a failed write() names no file; the error message should
        raise
    os.replace(tmp, path)


def shard_fingerprint(sources: list[Source], opts: PackOptions) -> str:
    # not skip_bad: a shard without bad files is the same either way, so the rerun a bad file's error suggests
    # (--skip-bad) re-encodes only the shards that hold one (write_shard reuses a record with bad files only then)
    h = hashlib.sha1(json.dumps([FORMAT_VERSION, ENCODING_VERSION, opts.resize_short, opts.jpeg_quality]).encode())
    for s in sources:
        st = os.stat(s.path)  # size and modification time, as make and rsync judge a changed file
        h.update(os.fsencode(s.path) + f"\0{s.key}\0{s.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_STOP = None  # in a pool worker: set by the main process once a shard could not be written; the rest are skipped


def files_changed(done: dict, tar_path: Path, idx_path: Path) -> str:
    """Why a shard's tar and index are not those its record `done` says were written ("" where they are): a tar of
    another size (a copy cut short, a full disk), an index other than written (cut short, edited, another shard's:
    the loaders refuse or misread it), or a tar other than its index's (one copied over another of the same size).
    A record from before index_sha1 has none: its index is read against every header of the tar instead."""
    if tar_path.stat().st_size != done.get("bytes"):
        return "its tar has another size than written"
    if not done.get("index_sha1"):
        return "" if index_matches(idx_path, tar_path) else "its index is not its tar's"
    try:
        data = idx_path.read_bytes()  # read once: the index checked is the one parsed
    except OSError:
        return "its index is not the one written"
    if index_sha1(idx_path, data) != done["index_sha1"]:
        return "its index is not the one written"
    return "" if tar_agrees(tar_path, read_index(idx_path, data=data)) else "its tar is not the one its index describes"


def write_shard(task: tuple[str, str, list[Source], PackOptions, str]) -> ShardResult | WriteFailed | None:
    """The shard's result; a WriteFailed (returned, so that the pool ends cleanly: pack() raises it); None when
    skipped after another shard's write error."""
    if _STOP is not None and _STOP.is_set():
        return None
    split, name, sources, opts, out_dir = task
    out = Path(out_dir)
    result = ShardResult(split, name, shard_fingerprint(sources, opts), num_inputs=len(sources))
    record = out / PROGRESS_DIR / f"{name}.json"
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    if not record.is_file() and (tar_path.is_file() or idx_path.is_file()):
        result.rewritten = "its record is missing (a run stopped while writing it, or it was deleted)"
    elif record.is_file() and not (tar_path.is_file() and idx_path.is_file()):
        result.rewritten = "its tar or index is missing"
    elif record.is_file():
        try:
            done = json.loads(record.read_text())
        except json.JSONDecodeError:
            done = {}  # unreadable: write the shard again
        done = done if isinstance(done, dict) else {}
        # same inputs, same options: reuse the shard, unless one of these says why not (the first that holds)
        result.rewritten = (
            "its record is unreadable" if not done else
            # (a record from before decode warnings were recorded has no "warnings": read again, to list them; its
            # fingerprint may be an earlier formula's too, so this is said first: not as inputs that changed)
            "its record is an earlier vitdeit's, without the images' warnings" if "warnings" not in done else
            "its inputs or options changed (or how this vitdeit encodes them)"
            if done.get("fingerprint") != result.fingerprint else
            # one that skipped bad files is reused only where skipping is asked for (without --skip-bad they are
            # read again: a file fixed in place, e.g. its permissions, then packs)
            "its bad files are read again" if done.get("bad") and not opts.skip_bad else
            files_changed(done, tar_path, idx_path))
        if not result.rewritten:
            if not done.get("index_sha1"):  # an earlier record's index, found its tar's: kept, so the next reuse
                # compares a SHA-1, not every tar header (135,000 images on the 2-core VM: 14.4 s against 6.4)
                done["index_sha1"] = index_sha1(idx_path)
                with contextlib.suppress(OSError):  # (a full disk: the shard is fine, the record upgraded next time)
                    write_text_atomic(record, json.dumps(done))
            done["class_counts"] = {int(k): v for k, v in done["class_counts"].items()}
            kept = {f.name for f in fields(ShardResult)} - RUN_ONLY  # (a later packer's record may hold more)
            return ShardResult(**{k: v for k, v in done.items() if k in kept}, reused=True)
    tmp = out / f".{name}.tar.tmp"
    try:
        return _write_tar(tmp, tar_path, idx_path, record, sources, opts, result)
    except OSError as e:  # a full disk, a quota, a file-size limit (pack() removes the partial files)
        return write_failed(Path(e.filename) if e.filename else tmp, e,
                            "the shards already finished are kept and a rerun packs only the rest", flag="--out")


def _write_tar(tmp, tar_path, idx_path, record, sources, opts, result) -> ShardResult:
    counts: Counter = Counter()
    with open(tmp, "wb") as f:
        # mtime fixed: the same inputs and seed give byte-identical shards
        sink = webdataset.TarWriter(f, user="vitdeit", group="vitdeit", mtime=0)
        try:
            for s in sources:
                raw = None  # (a read error leaves it None: not an empty file, and not the last file's bytes)
                try:
                    raw = Path(s.path).read_bytes()
                    with warnings.catch_warnings(record=True) as warned:  # named with the file, not as stderr noise
                        warnings.simplefilter("always")
                        data, change = encode_image(raw, opts.resize_short, opts.jpeg_quality)
                except Exception as e:  # PIL raises many types for corrupt files
                    why = image_failure(e)
                    if "runcated" in why:  # Pillow's "Truncated File Read", "image file is truncated (...)"
                        why += " (the file is cut short: a download or copy that did not finish; fetch it again)"
                    result.bad.append((s.path, "an empty file (0 bytes)" if raw == b"" else why))
                    continue
                result.hashes.append((hashlib.sha1(raw).hexdigest(), s.path))
                result.warnings += [(s.path, f"{w.category.__name__}: {w.message}") for w in warned]
                if change:
                    result.converted.append((s.path, change))
                sink.write({"__key__": s.key, "jpg": data, "cls": s.label, "lbl": struct.pack("<i", s.label)})
                counts[s.label] += 1
        finally:
            sink.close()
    if result.bad and not opts.skip_bad:
        tmp.unlink()  # an incomplete shard never gets a real name
        result.rewritten = ""  # (nor was one written again)
        return result  # (the shard on disk and its record, if any, still pair: a --skip-bad rerun reuses them)
    # the record goes first: a run killed while the tar and index are replaced leaves no record that would pair
    # them with another run's inputs (until here the old tar, index and record still pair: a kill keeps them)
    record.unlink(missing_ok=True)
    os.replace(tmp, tar_path)
    result.num_samples, result.index_sha1 = write_index(tar_path, idx_path)
    assert result.num_samples == sum(counts.values()), f"{tar_path}: index disagrees with what was written"
    result.class_counts = dict(counts)
    result.bytes = tar_path.stat().st_size
    write_text_atomic(record, json.dumps({k: v for k, v in asdict(result).items() if k not in RUN_ONLY}))
    return result


# ---------------------------------------------------------------- the whole job


def pack(data_path: str | Path, out_dir: str | Path, labels_path: str | Path | None = None,
         opts: PackOptions = PackOptions(), progress: bool = True, overwrite: bool = False) -> dict:
    """Pack a dataset; return the manifest. Raises DataError on bad input (nothing is dropped silently).
    overwrite: replace the shards of another source folder in out_dir (else refused)."""
    from tqdm import tqdm

    # absolute (symlinks kept): every source path, record and message means the same file from any directory
    data_path, out = Path(data_path).absolute(), Path(out_dir)
    labels_path = Path(labels_path) if labels_path else data_path / "Labels.json"
    split_dirs = find_split_dirs(data_path)  # first: a wrong --data-path is named as such, not as a missing Labels.json
    inside = [d for d in [data_path, *split_dirs["train"], *split_dirs["val"]]
              if out.resolve() == d.resolve() or (d != data_path and d.resolve() in out.resolve().parents)]
    # data/train beside train.X1..4: the next pack would take it for a split
    split_named = out.resolve().parent == data_path.resolve() and any(p.match(out.name) for p in NEAR_MISS.values())
    if inside or split_named:  # its tars would sit among the images, or be scanned as them
        where = f"in the source folders ({inside[0]})" if inside else f"named like a split folder of {data_path}"
        raise DataError(f"--out {out}: {where}; pass a folder of its own, e.g. --out {shards_dir_for(data_path)}")
    class_map = ClassMap.from_labels(load_labels(labels_path))
    hidden: list[str] = []
    misnamed: list[str] = []  # every split's, in one error
    unlisted: list[dict] | None = [] if opts.subset else None  # --subset: the class folders left unread
    misnamed_in = {split: Counter() for split in split_dirs}  # a class's files the names error lists: it has them
    sources = {split: scan_split(dirs, class_map, labels_path, hidden, misnamed, unlisted, misnamed_in[split])
               for split, dirs in split_dirs.items()}

    def check_contents():
        if empty := [f"{', '.join(map(str, split_dirs[split]))}: the {split} split holds no image files."
                     for split, srcs in sources.items() if not srcs and not misnamed_in[split]]:
            raise DataError("\n".join(empty))  # (then every class would be said to have no images)
        renamed = (" (or, where a class folder above is named otherwise than by its WNID, rename it)"
                   if any(NOT_A_WNID in m for m in misnamed) else "")
        check_classes({split: Counter(s.label for s in srcs) + misnamed_in[split] for split, srcs in sources.items()},
                      class_map, split_dirs, labels_path, opts, found="found", fix="Add the missing split or class "
                      f"folders (a train.X* folder not unpacked?){renamed}", unread=unlisted or [])

    said = []  # every kind of problem at once, so that the dataset is mended in one round, not one round per kind
    for check in (lambda: check_names(misnamed), lambda: check_unique_keys(sources["train"] + sources["val"]),
                  check_contents):
        try:
            check()
        except DataError as e:
            said.append(str(e))
    if said:
        raise DataError("\n\n".join(said))

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: {what_is(out)}, not a folder; pass a folder (it is made if missing).")
    if (out / MANIFEST_NAME).is_dir():  # (the manifest is replaced as a file: a folder in its place would stop that)
        raise DataError(f"{out / MANIFEST_NAME}: a folder where the manifest goes; move it away, or pass another "
                        f"--out.")
    replaced = (out / MANIFEST_NAME).is_file()
    if replaced and not overwrite:  # (before anything is written there: a folder refused is left as it was)
        check_same_source(out, source_of(split_dirs))
    output_folder(out, "--out", is_folder=True)  # (a file on its path, a read-only disk: named, no traceback)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    # one pack_shards.py at a time here: two would rename each other's part-written shards away, and each then fail
    # on a file the other moved (held until the manifest is written)
    with folder_lock(out / PROGRESS_DIR / "lock", f"--out {out}: another pack_shards.py is packing into it now; "
                                                  f"wait for it to finish, or pass another --out"):
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # only a finished, checked run leaves a manifest
        tasks = []
        for split, srcs in sources.items():
            shards = plan_shards(srcs, opts.shard_size, opts.seed, split)
            tasks += [(split, f"{split}-{i:06d}", s, opts, str(out)) for i, s in enumerate(shards)]
        planned = {t[1] for t in tasks}
        for d in (out, out / PROGRESS_DIR):
            for stale in d.iterdir():
                # what an earlier run with other inputs wrote (a killed one's ".NAME.tar.tmp" too), and nothing else
                m = SHARD_FILE.match(stale.name)
                if m and m.group(1) not in planned:
                    stale.unlink()

        n_total = sum(len(s) for s in sources.values())
        results: list[ShardResult] = []
        bar = tqdm(total=n_total, unit="img", desc=f"packing {out}", disable=not progress, smoothing=0.05)
        try:
            with _shards(tasks, opts.workers) as shards, bar:
                for r in shards:
                    if isinstance(r, WriteFailed):
                        raise r
                    results.append(r)
                    bar.update(r.num_inputs)
        except WriteFailed:  # the pool has ended: every partial file goes, space a full disk needs
            for d in (out, out / PROGRESS_DIR):
                for partial in d.iterdir():
                    if SHARD_FILE.match(partial.name) and partial.name.endswith(".tmp"):
                        partial.unlink()
            raise
        results.sort(key=lambda r: r.name)
        if progress and any(r.reused for r in results):  # (the command line's: a rerun says what it did not redo)
            print(f"reused {sum(r.reused for r in results)} of this pack's {len(results)} shards: an earlier run wrote "
                  f"them (same inputs and options)")
        if progress and (why := Counter(r.rewritten for r in results if r.rewritten)):  # and what it redid, and why
            print(f"wrote again {sum(why.values())} of this pack's {len(results)} shards, which an earlier run had "
                  "written: " + "; ".join(f"{n} because {reason}" for reason, n in why.most_common()))
        return _finish(results, sources, split_dirs, class_map, labels_path, out, opts, replaced, hidden,
                       unlisted or [])


@contextmanager
def _shards(tasks, workers: int):
    """write_shard's results over the tasks, in `workers` processes. Ctrl-C (which the workers ignore) ends the
    pool at once. Any other error (a write error pack() raises) lets the shards in progress finish and skips the
    rest: Pool.terminate() can kill a worker holding the result queue's lock, and then wait on it forever."""
    if workers <= 1:
        yield map(write_shard, tasks)
        return
    ctx = get_context(START_METHOD)
    stop = ctx.Event()
    pool = ctx.Pool(workers, _init_worker, (stop,))
    try:
        yield pool.imap_unordered(write_shard, tasks)
    except KeyboardInterrupt:
        pool.terminate()
        raise
    except BaseException:
        stop.set()
        pool.close()
        try:
            pool.join()
        except KeyboardInterrupt:  # a second Ctrl-C while waiting
            pool.terminate()
            raise
        raise
    pool.close()
    pool.join()


def _init_worker(stop) -> None:
    """Ctrl-C goes to the main process alone, which ends the pool: not a traceback from every worker."""
    import signal

    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finish(results, sources, split_dirs, class_map, labels_path, out, opts, replaced: bool,
            hidden: list[str], unlisted: list[dict]) -> dict:
    bad = [(r.split, p, why) for r in results for p, why in r.bad]
    if bad and not opts.skip_bad:
        lines = "\n".join(f"  {p}: {why}" for _, p, why in bad)
        earlier = " (an earlier one went when this run began: its shards are being rewritten)" if replaced else ""
        raise DataError(
            f"{len(bad)} file(s) that are not readable images, so no {out / MANIFEST_NAME}{earlier}:\n{lines}\n"
            f"Fix or remove them, or re-run with {SKIP_FLAG} to skip them (they are then listed in the manifest). "
            f"The shards that hold none are kept in {out}: the rerun writes only the others."
        )
    copies: dict[str, dict[str, list[str]]] = {}  # source bytes' sha1 -> split -> the paths holding them
    for r in results:
        for digest, path in r.hashes:
            copies.setdefault(digest, {}).setdefault(r.split, []).append(path)
    overlap = [paths for paths in copies.values() if len(paths) > 1]
    if overlap and not opts.allow_train_val_copies:
        pairs = [(sorted(p["train"])[0], v) for p in overlap for v in sorted(p["val"])]  # every val copy, once
        lines = "\n".join(f"  {t}  ==  {v}" for t, v in pairs[:50])
        more = f"\n  ... and {len(pairs) - 50} more" if len(pairs) > 50 else ""
        raise DataError(
            f"{len(pairs)} val image(s) have byte-identical copies in train: val top-1 would count images the "
            f"model trained on. Remove each of those val files, or re-run with {VAL_COPIES_FLAG} to pack them as "
            f"they are (a published split you keep whole; listed in the manifest, and train.py says how many val "
            f"images it scores have copies in train). The shards are kept in {out}: a rerun reuses those that do "
            f"not change:\n{lines}{more}"
        )

    label_of = {s.path: s.label for srcs in sources.values() for s in srcs}
    wnids_of = lambda paths: sorted({class_map.wnids[label_of[p]] for p in paths})  # noqa: E731
    train_val = sorted(({"train": sorted(p["train"]), "val": sorted(p["val"]),
                         "classes": wnids_of(p["train"] + p["val"])} for p in overlap), key=lambda g: g["val"])
    same_bytes = sorted(({"split": split, "paths": sorted(paths),
                          "classes": wnids_of(paths)}
                         for by_split in copies.values() for split, paths in by_split.items() if len(paths) > 1),
                        key=lambda g: (g["split"], g["paths"]))

    manifest = {
        "format": "vitdeit-webdataset",
        "format_version": FORMAT_VERSION,
        "classes": list(class_map.wnids),
        "labels": dict(zip(class_map.wnids, class_map.names)),
        "sample_format": {"jpg": "JPEG bytes (RGB)", "cls": "class index, ASCII",
                          "lbl": "class index, int32 little-endian"},
        "source": {"data_path": source_of(split_dirs), "labels": str(labels_path)},
        "options": {k: v for k, v in asdict(opts).items() if k != "workers"},
        "splits": {},
        "skipped": [{"split": s, "path": p, "reason": why} for s, p, why in bad],
        "converted": [{"path": p, "change": c} for r in results for p, c in r.converted],
        # packed as they are: images Pillow warned of, and sets of byte-identical files within a split (one image
        # under two labels, or one weighed twice); pack_shards.py says how many
        "warnings": [{"path": p, "warning": w} for r in results for p, w in r.warnings],
        "same_bytes": same_bytes,
        # --allow-train-val-copies: val images whose bytes are also in train ({train, val: paths; classes: WNIDs})
        "train_val_same_bytes": train_val,
        # names starting with "." in the split folders, not read: counted, a few named (macOS leaves one per image)
        "hidden_not_read": {"count": len(hidden), "first": hidden[:20]},
        # --subset: the class folders of WNIDs not in Labels.json, not read ({path, files}: each, with its file count)
        "not_in_labels": unlisted,
    }
    for r in results:
        if r.num_samples == 0:  # every image of it skipped: DALI refuses an empty index, and it holds nothing
            (out / f"{r.name}.tar").unlink(missing_ok=True)
            (out / f"{r.name}.idx").unlink(missing_ok=True)
            # and its record: a rerun reads its images again (as unreadable), not "wrote again ... missing"
            (out / PROGRESS_DIR / f"{r.name}.json").unlink(missing_ok=True)
    packed = {}
    for split, srcs in sources.items():
        rs = [r for r in results if r.split == split and r.num_samples > 0]
        if not rs:
            raise DataError(f"{', '.join(map(str, split_dirs[split]))}: every image of the {split} split was "
                            f"unreadable and skipped; nothing to pack.")
        counts = Counter()
        for r in rs:
            counts.update(r.class_counts)
        n = sum(r.num_samples for r in rs)
        packed[split] = counts
        n_skipped = sum(len(r.bad) for r in results if r.split == split)  # empty shards' too
        assert n == len(srcs) - n_skipped, f"{split}: {n} packed != {len(srcs)} found - {n_skipped} skipped"
        manifest["splits"][split] = {
            "num_samples": n,
            "input_files": len(srcs),
            "source_dirs": [d.name for d in split_dirs[split]],
            "class_counts": {w: counts.get(i, 0) for i, w in enumerate(class_map.wnids)},
            "shards": [{"file": f"{r.name}.tar", "index": f"{r.name}.idx", "num_samples": r.num_samples,
                        "bytes": r.bytes, "index_sha1": r.index_sha1} for r in rs],
        }
    if bad:  # (only with --skip-bad: without it, unreadable files stopped the run above)
        check_classes(packed, class_map, split_dirs, labels_path, opts, found=f"left once unreadable files were "
                      f"skipped (no {out / MANIFEST_NAME}; the shards are kept for the rerun)", fix=f"Fix or replace "
                      f"the {len(bad)} unreadable file(s) (e.g. {bad[0][1]}: {bad[0][2]})")
    try:
        write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=1))
    except OSError as e:  # a full disk, last of all: every shard is written and kept
        raise write_failed(out / MANIFEST_NAME, e, "every shard is written and kept: a rerun reuses them and writes "
                           "only the manifest", flag="--out") from e
    return manifest


def check_classes(counts: dict[str, Counter], class_map: ClassMap, split_dirs, labels_path, opts: PackOptions,
                  found: str, fix: str, unread: list[dict] = ()) -> None:
    """Every class of Labels.json needs train images to be learnt and val images to be scored: one with none in a
    split is a split folder not unpacked or a class folder lost (train.X4 left out is 25 of ImageNet-100's classes),
    unless --allow-missing-classes says the subset is meant. counts: split -> class index -> images; unread: the
    class folders --subset left unread (a misspelt WNID among them is a class with no folder)."""
    missing = {split: [w for i, w in enumerate(class_map.wnids) if not c.get(i)] for split, c in counts.items()}
    if opts.allow_missing_classes or not any(missing.values()):
        return
    lines = [f"  {split} ({', '.join(d.name + '/' for d in split_dirs[split])}): {len(m)} of {len(class_map)} "
             f"classes, {some(m, at_most=10)}" for split, m in missing.items() if m]
    # a class folder that is there, but empty (or holds only hidden files): named, as it is no folder to add
    empty = [str(d / w) for split, m in missing.items() for d in split_dirs[split] for w in m
             if (d / w).is_dir() and not any(not f.name.startswith(".") for f in (d / w).iterdir())]
    if empty:
        lines.append(f"  empty class folder(s): {some(empty, at_most=5)}")
    if not opts.subset:
        route = (f"or, to pack only some classes (a partial download), pass --labels a Labels.json of those classes "
                 f"and {SUBSET_FLAG}")
    else:  # (already a subset: a class of it with no folder is a typo in Labels.json, or in a folder's name)
        unread_names = some([Path(u["path"]).name for u in unread], at_most=5)
        route = f"or mend {labels_path}" + (f" ({SUBSET_FLAG} left {len(unread)} class folder(s) of other WNIDs "
                                            f"unread: {unread_names}; one misspelt?)" if unread else "")
    raise DataError(f"classes of {labels_path} with no images {found}:\n" + "\n".join(lines) + "\n"
                    f"A model trained on these shards would keep outputs it never learns (no train images) or is "
                    f"never scored on (no val images). {fix}, pass {ALLOW_MISSING_FLAG} to pack them as they are, "
                    f"{route}.")


def summary_lines(m: dict, out_dir) -> list[str]:
    """What pack_shards.py says of a finished pack (m: its manifest), after the progress lines: each split's
    counts, then what was skipped, left unread, re-encoded, warned of or found twice."""
    out = []
    for split, s in m["splits"].items():
        n, dirs = len(s["shards"]), ", ".join(d + "/" for d in s["source_dirs"])
        out.append(f"{split}: {s['num_samples']} images of {s['input_files']} from {dirs} in {n} "
                   f"shard{'s' * (n != 1)}")
        if empty := classes_without_images(m, split):  # --allow-missing-classes (a subset on purpose): still said
            out.append(f"warning: {len(empty)} of the {len(m['classes'])} classes in Labels.json "
                       f"{'has' if len(empty) == 1 else 'have'} no {split} images: {some(empty, at_most=10)}")
    if m["skipped"]:
        out.append(f"skipped {len(m['skipped'])} file(s) that are not readable images (listed in "
                   f"{out_dir}/manifest.json)")
    if unread := m.get("not_in_labels"):  # --subset
        out.append(f"not read ({SUBSET_FLAG}): {len(unread)} class folder(s) of WNIDs not in {m['source']['labels']}, "
                   f"{sum(u['files'] for u in unread):,} file(s) (e.g. {unread[0]['path']}): listed in the manifest's "
                   f"\"not_in_labels\"")
    if m["hidden_not_read"]["count"]:
        h = m["hidden_not_read"]
        out.append(f"not read: {h['count']} file(s) or folder(s) in the split folders whose names start with '.' "
                   f"(macOS's ._NAME, .DS_Store; e.g. {h['first'][0]}): rename any that are images (counted in the "
                   f"manifest)")
    if m["converted"]:
        out.append(f"re-encoded {len(m['converted'])} images (CMYK/grayscale/PNG/EXIF-rotated/resized; listed in the "
                   f"manifest)")
    if m["warnings"]:
        w = m["warnings"][0]
        out.append(f"warning: Pillow warned of {len(m['warnings'])} image(s) as it decoded them; packed as they are, "
                   f"listed in the manifest's \"warnings\" (e.g. {w['path']}: {w['warning']})")
    if same := m["same_bytes"]:
        across = sum(len(g["classes"]) > 1 for g in same)
        out.append(f"warning: {len(same)} set(s) of byte-identical images within a split, packed as they are: "
                   f"{across} under more than one class (one image, two labels), {len(same) - across} within one "
                   f"class (one image weighed twice); listed in the manifest's \"same_bytes\" (e.g. "
                   f"{', '.join(same[0]['paths'])}): remove the extra copies, or keep them if meant")
    if both := m.get("train_val_same_bytes"):  # --allow-train-val-copies
        out.append(f"warning: {val_copies_text(m)}, packed as they are ({VAL_COPIES_FLAG}): listed in the manifest's "
                   f"\"train_val_same_bytes\" (e.g. {both[0]['val'][0]} == {both[0]['train'][0]})")
    return out
