"""The class map (Labels.json, sorted WNIDs) and the shard manifest, the single source of truth."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import DataError

WNID_RE = re.compile(r"^n\d{8}$")
# a class folder and its Labels.json key are a WNID: ImageNet's own, or one made up for a class that is not ImageNet's
OWN_CLASSES = ("for classes of your own, name each class folder and its Labels.json key by a WNID of your own making "
               "(n00000001, n00000002, ...; the ImageNet-1k teacher cannot predict those: train one on your shards "
               "and pass train.py --teacher-ckpt)")
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = ".progress"  # pack_shards.py's record of each shard written, for a rerun to reuse


def no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DataError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def load_labels(path: str | Path) -> dict[str, str]:
    """Read and validate a Labels.json (WNID -> human-readable name)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder; pass --labels the JSON file itself (WNID -> name), e.g. "
                        f"--labels {path / 'Labels.json'}")
    if not path.is_file():
        raise DataError(f"{path}: Labels.json not found; pass --labels PATH (the WNID -> name JSON file; for "
                        f"ImageNet-100, the Labels.json at the top of the vitdeit repository).")
    try:
        # bytes: json reads UTF-8 (with a byte-order mark, as some Windows editors write) and UTF-16/32
        labels = json.loads(path.read_bytes(), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); save it as UTF-8, JSON's encoding.") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); it must be one object mapping WNID -> name.") from e
    except DataError as e:
        raise DataError(f"{path}: {e}; every WNID must appear once.") from e
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: must be a non-empty JSON object mapping WNID -> name.")
    for wnid, name in labels.items():
        if not WNID_RE.match(wnid):
            raise DataError(f"{path}: key {wnid!r} is not a WNID (expected 'n' + 8 digits, e.g. 'n01440764'); "
                            f"{OWN_CLASSES}.")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: the name of {wnid} must be a non-empty string, got {name!r}.")
    return labels


@dataclass(frozen=True)
class ClassMap:
    """WNIDs in sorted order; a WNID's class index is its position in that list."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> "ClassMap":
        wnids = tuple(sorted(labels))
        return cls(wnids, tuple(labels[w] for w in wnids))

    @classmethod
    def from_file(cls, path: str | Path) -> "ClassMap":
        return cls.from_labels(load_labels(path))

    def __len__(self) -> int:
        return len(self.wnids)

    @cached_property
    def index(self) -> dict[str, int]:
        """WNID -> class index."""
        return {w: i for i, w in enumerate(self.wnids)}

    def short_name(self, index: int, max_len: int = 22) -> str:
        """First synonym of the class name, cut to max_len characters ('tench, Tinca tinca' -> 'tench')."""
        name = self.names[index].split(",")[0].strip()
        return name if len(name) <= max_len else name[: max_len - 1] + "…"


def holds_folders_named(d: Path, named) -> bool:
    """d holds a folder whose name named(name) accepts (an unreadable d, or a file, holds none). The name is matched
    first: a folder of images is read without a stat per file."""
    try:
        with os.scandir(d) as entries:
            return any(named(e.name) and e.is_dir() for e in entries)
    except OSError:  # e.g. a volume's root-only lost+found: not ours to read, not a split
        return False


def holds_class_folders(d: Path) -> bool:
    """d holds WNID-named folders: a split folder of an ImageNet-style dataset."""
    return holds_folders_named(d, WNID_RE.match)


def shards_dir_for(data_path: Path) -> Path:
    """Where to suggest packing image folders to: a folder of its own beside them."""
    d = data_path.resolve()
    return d.parent / f"{d.name}-shards"


def load_manifest(shards_dir: str | Path) -> dict:
    """Read SHARDS_DIR/manifest.json, the description of a packed dataset."""
    path = Path(shards_dir) / MANIFEST_NAME
    if Path(shards_dir).is_file():  # (its manifest.json, or a shard, given for the folder)
        raise DataError(f"{shards_dir}: a file, not a folder; pass the shards' folder (pack_shards.py's --out"
                        + (f", here {Path(shards_dir).parent})" if Path(shards_dir).name == MANIFEST_NAME or
                           Path(shards_dir).suffix in (".tar", ".idx") else ")"))
    if not path.is_file():
        d = Path(shards_dir).resolve()
        if holds_class_folders(d):
            d = d.parent  # a split folder (train.X1): the image folders are its parent
        if d.is_dir() and ((d / "Labels.json").is_file() or any(c.name.startswith(("train", "val")) and c.is_dir()
                                                                for c in d.iterdir())):
            out = shards_dir_for(d)  # the image folders: shards go elsewhere
            raise DataError(f"{path} not found: {shards_dir} holds image folders, not packed shards. Pack them "
                            f"once: python pack_shards.py --data-path {d} --out {out}, then pass --data-path {out}")
        if (Path(shards_dir) / PROGRESS_DIR).is_dir():  # shards, but no manifest: written last, once all are
            raise DataError(f"{path} not found: {shards_dir} holds a pack that has not finished (pack_shards.py writes "
                            f"its manifest last, once every shard is written and checked): it was stopped, or failed, "
                            f"or is running now. Run the same pack_shards.py command again (after mending what its "
                            f"error said, if it failed): it reuses the shards already written")
        seen = "" if Path(shards_dir).is_absolute() else f" (a relative path: seen from {Path.cwd()})"
        raise DataError(
            f"{path} not found{seen}: {shards_dir} is not a packed dataset. "
            f"Create it with: python pack_shards.py --data-path IMAGENET_DIR --out {shards_dir}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a damaged or foreign file)
        raise DataError(f"{path}: not valid JSON ({e}); re-run pack_shards.py to rewrite it.") from e
    if not isinstance(manifest, dict):
        kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(manifest),
                                                                                              "a number")
        raise DataError(f"{path}: its JSON is {kind}, not the object pack_shards.py writes; re-run pack_shards.py to "
                        f"rewrite it.")
    for key in ("classes", "labels", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}; re-run pack_shards.py to rewrite it.")
    if problem := manifest_problem(manifest):  # the shards' labels index `classes`: a list out of step with them
        raise DataError(f"{path}: {problem}: edited by hand, or not this pack's; re-run pack_shards.py to rewrite it.")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What in a manifest contradicts itself (the classes against the labels and each split's class counts, a split's
    sample count against its shards'), or None."""
    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(isinstance(w, str) for w in classes):
        return "'classes' is not a list of WNIDs"
    if twice := sorted(w for w, n in Counter(classes).items() if n > 1):
        return f"'classes' lists {some(twice)} more than once"
    if missing := [w for w in classes if w not in manifest["labels"]]:
        return f"'labels' has no name for {len(missing)} of its classes ({some(missing)})"
    if not isinstance(manifest["splits"], dict) or (missing := {"train", "val"} - set(manifest["splits"])):
        return "'splits' lacks " + (" and ".join(sorted(missing)) if isinstance(manifest["splits"], dict) else
                                    "its {split: ...} object")
    if not isinstance(manifest.get("options", {}), dict):
        return "'options' is not an object"
    files = []
    for split, info in manifest["splits"].items():
        try:
            counted, total = info["class_counts"], info["num_samples"]
            counts = [("num_samples", total), ("input_files", info.get("input_files", 0))]
            counts += [(f"shards[{i}].{k}", x[k]) for i, x in enumerate(info["shards"])
                       for k in ("num_samples", "bytes")]
            counts += [(f"class_counts[{w}]", n) for w, n in counted.items()]
            names = [(f"shards[{i}].{k}", x[k]) for i, x in enumerate(info["shards"]) for k in ("file", "index")]
        except (KeyError, TypeError, AttributeError) as e:
            return f"split {split!r} lacks its counts ({type(e).__name__}: {e})"
        if wrong := next(((k, v) for k, v in counts if type(v) is not int), None):  # ("192" would read as 192 below)
            return f"split {split!r}: {wrong[0]} is {wrong[1]!r}, not a whole number"
        if wrong := next(((k, v) for k, v in names if not isinstance(v, str) or not v), None):
            return f"split {split!r}: {wrong[0]} is {wrong[1]!r}, not a file name"
        files += [v for _, v in names]
        in_shards, in_classes = sum(s["num_samples"] for s in info["shards"]), sum(counted.values())
        if list(counted) != classes:
            if set(counted) == set(classes):  # (neither holds a WNID twice: dict keys, and checked above)
                return f"split {split!r} counts its classes in another order"
            what = (f"{len(counted)} classes, but 'classes' lists {len(classes)}" if len(counted) != len(classes)
                    else "other classes than 'classes' lists")
            return (f"split {split!r} counts {what}: " + class_difference(counted, classes, "counted but not in "
                                                                          "'classes'", "in 'classes' but not counted"))
        if total != in_shards or total != in_classes:
            return (f"split {split!r} says {total} samples, but its shards hold {in_shards} and its class counts "
                    f"add up to {in_classes}")
        # every image file the packer found is packed or skipped: a shard left out with the counts made to agree
        if not isinstance(listed := manifest.get("skipped", []), list):
            return f"'skipped' is {type(listed).__name__}, not a list"
        skipped = sum(1 for x in listed if isinstance(x, dict) and x.get("split") == split)
        if "input_files" in info and total + skipped != info["input_files"]:
            return (f"split {split!r} packed {total} samples and skipped {skipped}, but {info['input_files']} image "
                    f"files were found: its shards are not the ones the packer wrote")
    if twice := sorted(f for f, n in Counter(files).items() if n > 1):  # one shard read as two
        return f"it lists {some(twice)} more than once"
    both = manifest.get("train_val_same_bytes", [])  # (--allow-train-val-copies; read by val_copies_text)
    if not isinstance(both, list) or not all(isinstance(g, dict) and isinstance(g.get("val"), list)
                                             and isinstance(g.get("train"), list) for g in both):
        return "'train_val_same_bytes' is not a list of {train, val, classes} entries"
    return None


def some(wnids, at_most: int = 3) -> str:
    """A few WNIDs of a list, to name in a message: 'n01440764, n01443537 and 5 more'."""
    wnids = list(wnids)
    shown = ", ".join(wnids[:at_most])
    return shown if len(wnids) <= at_most else f"{shown} and {len(wnids) - at_most} more"


def class_difference(theirs, ours, only_theirs: str, only_ours: str) -> str:
    """The WNIDs two class lists do not share, counted and named: '1 <only_theirs> (n1), 2 <only_ours> (n2, n3)'."""
    extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    return ", ".join(f"{len(w)} {phrase} ({some(w)})"
                     for w, phrase in ((extra, only_theirs), (missing, only_ours)) if w)


# packing options added after the first packs, at the value that packs as before: a manifest an earlier packer wrote
# lacks them, and the same shards packed again by this one have them
LATER_OPTIONS = {"allow_missing_classes": False}
# packing options that leave every shard as it is (--subset: which classes are read is the classes' and shards' own;
# --allow-train-val-copies: it only lets a pack that holds them finish)
UNFINGERPRINTED = {"subset", "allow_train_val_copies"}


def shard_rows(manifest: dict) -> dict[str, list]:
    """{split: [[file, sample count, bytes] of each shard]}: what the shards themselves are, in the manifest's order."""
    return {split: [[s["file"], s["num_samples"], s["bytes"]] for s in info["shards"]]
            for split, info in sorted(manifest["splits"].items())}


def pack_fingerprint(manifest: dict, options: dict | None = None) -> str:
    """What a repack changes: the packing options (seed: the global shuffle), the source folder and each shard's
    file, sample count and size. Saved in every checkpoint: a --resume on shards repacked since says so.
    options: in place of the manifest's."""
    options = manifest.get("options") if options is None else options
    what = {"options": options and {k: v for k, v in options.items() if k not in UNFINGERPRINTED},
            "source": manifest.get("source", {}).get("data_path"), "shards": shard_rows(manifest)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pack_identity(manifest: dict) -> str:
    """What fixes the samples a rank is dealt: the shuffle's seed, the classes and each shard's file, count and size;
    not, as pack_fingerprint, the folder packed from nor options that leave these as they are. Nodes compare it:
    one pack copied to each, or packed on each node from its own copy of the images with the same --seed, is one."""
    seed = (manifest.get("options") or {}).get("seed")
    return hashlib.sha1(json.dumps([seed, manifest["classes"], shard_rows(manifest)]).encode()).hexdigest()


def same_pack(fingerprint: str, manifest: dict) -> bool:
    """A fingerprint saved with a checkpoint (or a DALI state) is of these shards: this manifest's, or that of the
    same shards described by an earlier or a later packer, without or with the LATER_OPTIONS at their old value
    (a checkpoint of shards packed again since, read on an older copy of them, too)."""
    options = manifest.get("options") or {}
    earlier = {k: v for k, v in options.items() if not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
    return fingerprint in {pack_fingerprint(manifest), pack_fingerprint(manifest, earlier),
                           pack_fingerprint(manifest, {**LATER_OPTIONS, **earlier})}


def classes_without_images(manifest: dict, split: str) -> list[str]:
    """The WNIDs of the split with no images (shards packed with --allow-missing-classes), in class order."""
    return [w for w, n in manifest["splits"][split]["class_counts"].items() if n == 0]


def without_images_text(manifest: dict, split: str, data_path) -> str | None:
    """What a model trained on these shards makes of the classes with no `split` images (--allow-missing-classes),
    for train.py's warning and viz.py's report; None where there are none. Val images of classes with no train
    images are scored, and nothing teaches the model those classes: the val top-1 the others leave is said."""
    if not (empty := classes_without_images(manifest, split)):
        return None
    text = (f"{len(empty)} of the {len(manifest['classes'])} classes {'has' if len(empty) == 1 else 'have'} no "
            f"{split} images in {data_path} ({some(empty, at_most=5)}): the model has outputs for them that it "
            + ("never learns" if split == "train" else "is never scored on"))
    val = manifest["splits"]["val"]["class_counts"]
    if split == "train" and (unlearnt := sum(val[w] for w in empty)):
        total = sum(val.values())
        top = -(-1000 * (total - unlearnt) // total) / 10  # the share of the others, rounded up (in integers)
        text += (f"; {unlearnt:,} of the {total:,} val images {'is' if unlearnt == 1 else 'are'} of those classes, "
                 f"which it gets right only by chance: val top-1 tops out near {top:.1f} %")
    return text


def val_copies_text(manifest: dict) -> str | None:
    """How many val images have byte-identical copies in train (shards packed with --allow-train-val-copies), for
    the warnings of pack_shards.py, train.py (training and --eval-only) and viz.py's report; None where none do."""
    if not (both := manifest.get("train_val_same_bytes")):  # (earlier packers refused them: no such field)
        return None
    n = sum(len(g["val"]) for g in both)
    return (f"{n:,} of the {manifest['splits']['val']['num_samples']:,} val images {'has' if n == 1 else 'have'} "
            f"byte-identical copies in train")


def manifest_class_map(manifest: dict) -> ClassMap:
    return ClassMap(tuple(manifest["classes"]), tuple(manifest["labels"][w] for w in manifest["classes"]))
