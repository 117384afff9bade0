import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, held_elsewhere, lock_held, small_dataset
from vitdeit import packing
from vitdeit.classes import load_manifest
from vitdeit.errors import DataError
from vitdeit.packing import PackOptions, pack


OFF_BLOCKS = "does not lie on 512-byte blocks inside the {size}-byte tar"
SIZE_CHANGED = "its tar has another size than written"
NOT_WRITTEN = "its index is not the one written"
NOT_ITS_INDEX = "its index is not its tar's"  # (a record from before index_sha1: every header of the tar read)
OPTIONS_CHANGED = "its inputs or options changed (or how this vitdeit encodes them)"


def reused(k: int, n: int) -> str:
    """The line a pack prints for the k of its n shards it took from an earlier run as they were."""
    return f"reused {k} of this pack's {n} shards: an earlier run wrote them (same inputs and options)"


def again(k: int, n: int, why: str) -> str:
    """The line a pack prints for the k of its n shards it wrote over an earlier run's, and why."""
    return f"wrote again {k} of this pack's {n} shards, which an earlier run had written: {why}"


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Independent reader: key -> {ext: bytes}, with tarfile."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tf.extractfile(m).read()
    return samples


def input_files(data: Path) -> dict[str, tuple[str, int, Path]]:
    """stem -> (split, class index, path), straight from the folders."""
    wnids = sorted(json.loads((data / "Labels.json").read_text()))
    out = {}
    for split_dir in data.iterdir():
        if split_dir.is_dir():
            split = "val" if split_dir.name.startswith("val") else "train"
            for f in split_dir.glob("*/*"):
                out[f.stem] = (split, wnids.index(f.parent.name), f)
    return out


def test_round_trip_every_image_once_with_its_label(tiny_data, tiny_shards):
    m = load_manifest(tiny_shards)
    expected = input_files(tiny_data)
    seen = {}
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            for key, comp in read_tar(tiny_shards / shard["file"]).items():
                assert key not in seen, f"{key} packed twice"
                seen[key] = (split, int(comp["cls"]), comp)
    assert set(seen) == set(expected)
    for key, (split, label, comp) in seen.items():
        assert (split, label) == expected[key][:2]
        assert struct.unpack("<i", comp["lbl"])[0] == label
        assert comp["jpg"] == expected[key][2].read_bytes()  # RGB JPEGs are kept byte for byte


def test_manifest_counts_equal_input_counts(tiny_data, tiny_shards):
    m = load_manifest(tiny_shards)
    expected = input_files(tiny_data)
    assert m["classes"] == sorted(json.loads((tiny_data / "Labels.json").read_text()))
    for split in ("train", "val"):
        by_class = Counter(m["classes"][lab] for s, lab, _ in expected.values() if s == split)
        assert m["splits"][split]["class_counts"] == dict(by_class)
        assert m["splits"][split]["num_samples"] == sum(by_class.values()) == m["splits"][split]["input_files"]
        assert sum(s["num_samples"] for s in m["splits"][split]["shards"]) == sum(by_class.values())
    assert m["skipped"] == [] and m["options"]["seed"] == 0


def test_every_train_shard_mixes_all_classes(tiny_shards):
    m = load_manifest(tiny_shards)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) == 4  # 96 images cut into near-equal shards of at most 30
    assert sorted(s["num_samples"] for s in shards) == [24, 24, 24, 24]
    for s in shards:
        labels = {int(c["cls"]) for c in read_tar(tiny_shards / s["file"]).values()}
        assert labels == set(range(len(m["classes"])))


def test_index_files_match_dalis_wds2idx_and_the_tar(tiny_shards):
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own index tool, shipped with nvidia-dali
    assert len(list(tiny_shards.glob("*.idx"))) == 4 + 1  # 96 train images in shards of at most 30, 24 val
    for idx in sorted(tiny_shards.glob("*.idx")):
        tar = idx.with_suffix(".tar")
        ref = tiny_shards / (idx.name + ".ref")
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as creator:
            creator.create_index()
        assert idx.read_text() == ref.read_text()
        ref.unlink()
        data, contents = tar.read_bytes(), read_tar(tar)
        for line in idx.read_text().splitlines()[1:]:
            f = line.split()
            for i in range(0, len(f), 4):
                ext, off, size, name = f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]
                assert data[off: off + size] == contents[name.split(".")[0]][ext]


def test_same_seed_same_shards_other_seed_other_order(tiny_data, tiny_shards, tmp_path):
    pack(tiny_data, tmp_path / "again", opts=PackOptions(shard_size=30, workers=2), progress=False)
    for f in sorted(tiny_shards.glob("*.tar")):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    pack(tiny_data, tmp_path / "other", opts=PackOptions(shard_size=30, seed=1, workers=1), progress=False)
    assert list(read_tar(tmp_path / "other" / "train-000000.tar")) != list(read_tar(tiny_shards / "train-000000.tar"))


def test_workers_started_by_spawn_write_the_same_shards(tiny_data, tiny_shards, tmp_path, monkeypatch):
    # macOS and Windows start the pool's workers by spawn: each task and result must pickle, nothing may rely on
    # what a fork would have inherited. The same shards as the serial packer's (tiny_shards), and so as a forked
    # pool's (test_same_seed_same_shards_other_seed_other_order)
    import vitdeit.packing as packing

    monkeypatch.setattr(packing, "START_METHOD", "spawn")
    started = []
    monkeypatch.setattr(packing, "get_context", lambda method: started.append(method) or get_context(method))
    pack(tiny_data, tmp_path / "spawned", opts=PackOptions(shard_size=30, workers=2), progress=False)
    shards = sorted(f.name for f in tiny_shards.iterdir() if f.suffix in (".tar", ".idx"))
    assert shards == sorted(f.name for f in (tmp_path / "spawned").iterdir() if f.suffix in (".tar", ".idx"))
    for name in shards:
        assert (tmp_path / "spawned" / name).read_bytes() == (tiny_shards / name).read_bytes()
    assert started == ["spawn"]


def test_the_shards_and_options_do_not_depend_on_the_worker_count_or_which_train_folder_holds_an_image(
        tiny_data, tiny_shards, tmp_path):
    from vitdeit.classes import pack_fingerprint

    moved = tmp_path / "moved"  # the same images, train.X2's moved into train.X1's class folders (another scan order)
    shutil.copytree(tiny_data, moved)
    for f in sorted((moved / "train.X2").rglob("*.*")):
        f.rename(moved / "train.X1" / f.parent.name / f.name)
    m = pack(moved, tmp_path / "s", opts=PackOptions(shard_size=30, workers=2), progress=False)
    tars = sorted(f.name for f in tiny_shards.glob("*.tar"))
    assert sorted(f.name for f in (tmp_path / "s").glob("*.tar")) == tars and len(tars) > 2
    for name in tars:
        assert (tmp_path / "s" / name).read_bytes() == (tiny_shards / name).read_bytes()
    # the options recorded are what shapes the shards (not the worker count, which does not): the same here
    first = load_manifest(tiny_shards)
    assert m["options"] == first["options"] and "workers" not in m["options"] and m["options"]["skip_bad"] is False
    assert pack_fingerprint({**m, "source": first["source"]}) == pack_fingerprint(first)


def test_the_manifest_lists_the_shards_in_name_order_whatever_order_they_were_finished_in(tiny_data, tmp_path,
                                                                                          monkeypatch):
    from contextlib import contextmanager

    real = packing._shards

    @contextmanager
    def last_first(tasks, workers):  # as workers finishing the later shards first would hand them over
        with real(tasks, workers) as shards:
            yield reversed(list(shards))

    monkeypatch.setattr(packing, "_shards", last_first)
    m = pack(tiny_data, tmp_path / "s", opts=PackOptions(shard_size=30, workers=1), progress=False)
    files = [s["file"] for s in m["splits"]["train"]["shards"]]
    assert files == [f"train-{i:06d}.tar" for i in range(len(files))] and len(files) > 1


def test_resize_short_is_an_upper_bound_smaller_images_are_kept_byte_for_byte(tiny_data, tmp_path):
    m = pack(tiny_data, tmp_path / "s", opts=PackOptions(resize_short=48, workers=1), progress=False)
    originals = {stem: path for stem, (_, _, path) in input_files(tiny_data).items()}
    kept = resized = 0
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            for key, comp in read_tar(tmp_path / "s" / sh["file"]).items():
                with Image.open(originals[key]) as im:
                    short = min(im.size)
                if short <= 48:
                    assert comp["jpg"] == originals[key].read_bytes()
                    kept += 1
                else:
                    with Image.open(io.BytesIO(comp["jpg"])) as im:
                        assert min(im.size) == 48
                    resized += 1
    assert kept > 0 and resized > 0 and len(m["converted"]) == resized  # sides from 40 to 64 px: both kinds


def test_resize_short_bounds_the_shorter_side(tiny_data, tmp_path):
    m = pack(tiny_data, tmp_path / "s", opts=PackOptions(resize_short=32, workers=1), progress=False)
    sizes = []
    for s in m["splits"]["val"]["shards"]:
        for comp in read_tar(tmp_path / "s" / s["file"]).values():
            with Image.open(io.BytesIO(comp["jpg"])) as im:
                sizes.append(im.size)
    assert min(min(s) for s in sizes) == 32 and max(min(s) for s in sizes) == 32  # all inputs are >= 40 px
    assert m["options"]["resize_short"] == 32
    assert len(m["converted"]) == m["splits"]["train"]["num_samples"] + len(sizes)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def data(tmp_path):
    return small_dataset(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=2)


def first_image(data: Path, split="train.X1") -> Path:
    return sorted((data / split).glob("*/*.JPEG"))[0]


def test_cmyk_grayscale_and_png_bytes_are_converted_and_kept(data, tmp_path):
    files = sorted((data / "train.X2").glob("*/*.JPEG"))
    Image.open(files[0]).convert("CMYK").save(files[0], format="JPEG")
    Image.open(files[1]).convert("L").save(files[1], format="JPEG")
    Image.open(files[2]).save(files[2], format="PNG")  # PNG bytes under a .JPEG name, as in ImageNet
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["train"]["num_samples"] == 16
    changes = {Path(c["path"]).name: c["change"] for c in m["converted"]}
    assert changes == {files[0].name: "CMYK -> RGB", files[1].name: "L -> RGB", files[2].name: "PNG bytes -> JPEG"}
    packed = {}
    for s in m["splits"]["train"]["shards"]:
        packed.update(read_tar(tmp_path / "s" / s["file"]))
    for f in files[:3]:
        with Image.open(io.BytesIO(packed[f.stem]["jpg"])) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")


_BLOCKS = np.kron(np.random.default_rng(0).integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
_OPAQUE = np.where(np.arange(64) < 32, 255, 0).astype(np.uint8)[None, :].repeat(48, 0)  # the right half transparent


@pytest.mark.parametrize("mode, fmt, change", [
    ("RGBA", "PNG", "PNG bytes -> JPEG; RGBA -> RGB"), ("LA", "PNG", "PNG bytes -> JPEG; LA -> RGB"),
    ("P", "GIF", "GIF bytes -> JPEG; P -> RGB"), ("RGB", "WEBP", "WEBP bytes -> JPEG"),
    ("CMYK", "JPEG", "CMYK -> RGB")])
def test_other_formats_and_modes_become_rgb_jpegs_of_the_same_picture_alpha_dropped_not_composited(mode, fmt,
                                                                                                  change):
    rgb = _BLOCKS if mode != "LA" else _BLOCKS[..., :1].repeat(3, 2)  # (LA: grey)
    im = {"RGBA": lambda: Image.fromarray(np.dstack([rgb, _OPAQUE])),
          "LA": lambda: Image.fromarray(np.dstack([rgb[..., 0], _OPAQUE]), "LA"),
          "P": lambda: Image.fromarray(rgb).quantize(64)}.get(mode, lambda: Image.fromarray(rgb).convert(mode))()
    raw = io.BytesIO()
    im.save(raw, format=fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}))
    out, said = packing.encode_image(raw.getvalue(), None, 90)
    assert said == change
    with Image.open(io.BytesIO(out)) as packed:
        assert (packed.format, packed.mode, packed.size) == ("JPEG", "RGB", (64, 48))
        diff = np.abs(np.asarray(packed).astype(float) - rgb)
    # the same colours, to JPEG's loss (quality 90 on 8 px blocks: ~8 levels of 255), in the half that was
    # transparent too: its colours kept, not black or white (over 100 levels away)
    assert diff.mean() < 12 and diff[:, 32:].mean() < 12


def test_exif_orientation_is_applied_and_16_bit_pixels_are_scaled(data, tmp_path):
    import numpy as np

    files = sorted((data / "train.X2").glob("*/*.JPEG"))
    with Image.open(files[0]) as im:
        pixels = np.asarray(im.convert("RGB"))
        exif = im.getexif()
        exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise (DALI's decoder applies it)
        im.save(files[0], format="JPEG", quality=95, exif=exif)
    ramp = (np.arange(40 * 48).reshape(40, 48) * 33).astype(np.uint16)  # 0 .. 63,327
    Image.fromarray(ramp).save(files[1], format="PNG")  # mode I;16
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, resize_short=32), progress=False)
    changes = {Path(c["path"]).name: c["change"] for c in m["converted"]}
    assert changes[files[0].name].startswith("EXIF orientation 6 applied")
    packed = {}
    for sh in m["splits"]["train"]["shards"]:
        packed.update(read_tar(tmp_path / "s" / sh["file"]))
    with Image.open(io.BytesIO(packed[files[0].stem]["jpg"])) as im:
        assert im.getexif().get(0x0112) is None  # upright pixels, no tag left to apply twice
        h, w = pixels.shape[:2]
        assert im.size == (32, round(w * 32 / h)) if h < w else im.size == (round(h * 32 / w), 32)
        upright = np.rot90(pixels, k=-1)  # rotated 90 degrees clockwise: the picture as a viewer shows it
        small = np.asarray(Image.fromarray(upright).resize(im.size, Image.BICUBIC), dtype=float)
        assert np.abs(np.asarray(im, dtype=float) - small).mean() < 5  # the same picture, the same way up (a mirror
        # of it, what orientation 5 or 7 gives, measured 8.9 here; the wrong rotation 13.8)
    with Image.open(io.BytesIO(packed[files[1].stem]["jpg"])) as im:
        grey = np.asarray(im.convert("L"), dtype=float)
        assert 100 < grey.mean() < 150 and grey.min() < 20  # the ramp's mid-grey average, not clipped to white


def break_two(data: Path) -> list[Path]:
    a, b = sorted((data / "train.X3").glob("*/*.JPEG"))[:2]
    a.write_bytes(a.read_bytes()[: len(a.read_bytes()) // 2])  # truncated
    b.write_bytes(b"not an image at all")
    return [a, b]


def test_unreadable_files_stop_the_packer_and_all_are_listed(data, tmp_path):
    bad = break_two(data)
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    msg = str(e.value)
    assert all(str(p) in msg for p in bad) and "--skip-bad" in msg and "2 file(s) that are not readable images" in msg
    assert "an earlier one" not in msg  # the first pack into this folder: there was no manifest to remove
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert msg.endswith(f"The shards that hold none are kept in {tmp_path / 's'}: the rerun writes only the others.")
    assert sorted(f.name for f in (tmp_path / "s").glob("*.tar")) == ["val-000000.tar"]  # train's held both


def test_skip_bad_skips_and_lists_them(data, tmp_path):
    bad = break_two(data)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True), progress=False)
    assert sorted(s["path"] for s in m["skipped"]) == sorted(map(str, bad))
    assert m["splits"]["train"]["input_files"] == 16 and m["splits"]["train"]["num_samples"] == 14
    assert load_manifest(tmp_path / "s") == m  # 14 packed + 2 skipped of 16 found: a manifest the readers take
    why = {s["path"]: s["reason"] for s in m["skipped"]}
    assert why[str(bad[0])].endswith("(the file is cut short: a download or copy that did not finish; fetch it again)")
    assert "cut short" not in why[str(bad[1])]


def test_an_empty_file_is_named_as_such(data, tmp_path):
    empty, text = first_image(data), first_image(data, "val.X")
    empty.write_bytes(b"")  # an interrupted copy
    text.write_bytes(b"not an image")
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True), progress=False)
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {
        str(empty): "an empty file (0 bytes)",
        str(text): "UnidentifiedImageError: not an image Pillow can identify"}


def test_the_rerun_a_bad_file_asks_for_rewrites_only_the_shards_that_hold_one(data, tmp_path, capsys):
    bad = break_two(data)
    with pytest.raises(DataError):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=4), progress=False)
    good = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (tmp_path / "s").glob("*.tar")}  # no bad file in them
    capsys.readouterr()
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=4, skip_bad=True))  # as the command line
    assert capsys.readouterr().out == reused(len(good), 5) + "\n"
    # 16 train and 4 val images in shards of 4: a shard that held a bad file is the one now short of 4
    whole = {s["file"] for split in ("train", "val") for s in m["splits"][split]["shards"] if s["num_samples"] == 4}
    assert {f.name for f in good} == whole and len(whole) < 5
    assert all((f.stat().st_ino, f.stat().st_mtime_ns) == t for f, t in good.items())  # reused, not rewritten
    assert sorted(x["path"] for x in m["skipped"]) == sorted(map(str, bad))
    pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=4, skip_bad=True))  # again: nothing to redo
    assert capsys.readouterr().out == reused(5, 5) + "\n"
    # without --skip-bad they are read again, and stop it; the manifest of the run before is gone
    with pytest.raises(DataError, match=r"2 file\(s\) that are not readable images.*manifest\.json \(an earlier one "
                                        r"went when this run began"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=4))
    # the 2 shards with a bad file were read again but not written: no "wrote again" for them
    assert capsys.readouterr().out == reused(3, 5) + "\n"
    # and they and their records are as before: asked again to skip, the packer reuses them all
    pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=4, skip_bad=True))
    assert capsys.readouterr().out == reused(5, 5) + "\n"


def test_a_file_that_failed_once_packs_when_it_reads_again_without_skip_bad(data, tmp_path, monkeypatch):
    flaky = first_image(data)  # unreadable for one run (permissions, a network file system), then fine, unchanged
    real = packing.encode_image

    def fail_once(raw, *a):
        if raw == flaky.read_bytes():
            raise PermissionError(f"[Errno 13] Permission denied: '{flaky}'")
        return real(raw, *a)

    monkeypatch.setattr(packing, "encode_image", fail_once)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True), progress=False)
    assert [x["path"] for x in m["skipped"]] == [str(flaky)]
    monkeypatch.setattr(packing, "encode_image", real)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)  # the record that skipped it: unused
    assert m["skipped"] == [] and m["splits"]["train"]["num_samples"] == 16


def test_cli_exits_nonzero_with_the_list(data, tmp_path):
    bad = break_two(data)
    r = subprocess.run([sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out",
                        str(tmp_path / "s"), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and all(str(p) in r.stderr for p in bad) and "--skip-bad" in r.stderr


@pytest.mark.parametrize("renamed", ["train.x2", "Train.X2", "train_X2", "VAL.X", "Val"])
def test_a_split_folder_named_almost_right_is_an_error_naming_it_not_a_silent_gap(data, tmp_path, renamed):
    (data / ("val.X" if renamed.lower().startswith("val") else "train.X2")).rename(data / renamed)
    with pytest.raises(DataError, match=re.escape(f"{data / renamed}: a folder named almost like a")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_folders_that_only_start_like_a_split_name_and_a_split_links_target_are_fine(data, tmp_path):
    for name in ("training_notes", "validation_old", "trainer_logs"):
        (data / name).mkdir()
    (data / "val.X").rename(data / "val_real")
    (data / "val.X").symlink_to(data / "val_real")
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["val"]["num_samples"] == 4 and m["splits"]["val"]["source_dirs"] == ["val.X"]


def test_classes_without_train_or_val_images_are_refused_naming_them_unless_allowed(data, tmp_path):
    labels = json.loads((data / "Labels.json").read_text())
    first = sorted(labels)[0]
    for d in data.glob("train.X*"):  # one class's train images gone (as 25 classes are with train.X4 not unpacked)
        shutil.rmtree(d / first, ignore_errors=True)
    (data / "Labels.json").write_text(json.dumps({**labels, "n99999998": "unseen"}))  # a class with no folder at all
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert str(e.value).splitlines()[1:3] == [
        f"  train (train.X1/, train.X2/, train.X3/, train.X4/): 2 of 3 classes, {first}, n99999998",
        "  val (val.X/): 1 of 3 classes, n99999998"]
    assert str(e.value).endswith("Add the missing split or class folders (a train.X* folder not unpacked?), pass "
                                 "--allow-missing-classes to pack them as they are, or, to pack only some classes (a "
                                 "partial download), pass --labels a Labels.json of those classes and --subset.")
    assert not (tmp_path / "s").exists()  # refused before any write
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, allow_missing_classes=True), progress=False)
    assert m["splits"]["train"]["class_counts"][first] == 0 and m["splits"]["val"]["class_counts"][first] == 2
    assert m["options"]["allow_missing_classes"] is True


def test_a_partial_download_packs_only_the_classes_of_its_labels_with_subset(tmp_path):
    data = small_dataset(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=2)
    wnids = sorted(json.loads((data / "Labels.json").read_text()))
    kept, gone = wnids[:2], wnids[2:]
    for d in data.glob("train.X*"):  # two classes' train images not downloaded; val.X holds all four
        for w in gone:
            shutil.rmtree(d / w)
    with pytest.raises(DataError, match=r"pass --labels a Labels.json of those classes and --subset\.$"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    stray = data / "train.X1" / "n09999999"  # and a class no Labels.json names, with a hidden file
    stray.mkdir()
    shutil.copy(first_image(data), stray / "n09999999_1.JPEG")
    (stray / ".DS_Store").write_bytes(b"")
    labels = tmp_path / "L2.json"
    labels.write_text(json.dumps({w: f"class {w}" for w in kept}))
    with pytest.raises(DataError) as e:  # the other classes' folders: a line for each split folder holding some
        pack(data, tmp_path / "s", labels, opts=PackOptions(workers=1), progress=False)
    subset = "or pass --subset to pack only its 2 classes (the others are then listed in the manifest, not read)"
    assert str(e.value).splitlines() == [
        "2 problem(s) with file or class folder names; nothing was written. Fix each and run again:",
        f"  {stray}: class folder 'n09999999' is not in {labels}; add it there (WNID -> name), remove the folder, "
        f"{subset}",
        f"  {data / 'val.X'}: 2 class folders whose WNIDs are not in {labels} ({gone[0]}, {gone[1]}): add them there "
        f"(WNID -> name), remove them, {subset}"]
    assert not (tmp_path / "s").exists()
    m = pack(data, tmp_path / "s", labels, opts=PackOptions(workers=1, subset=True), progress=False)
    assert m["classes"] == kept and m["labels"] == {w: f"class {w}" for w in kept} and m["options"]["subset"] is True
    assert {split: m["splits"][split]["class_counts"] for split in ("train", "val")} == {
        "train": {w: 8 for w in kept}, "val": {w: 2 for w in kept}}
    assert m["splits"]["train"]["num_samples"] == 16 and m["splits"]["val"]["num_samples"] == 4
    assert m["not_in_labels"] == [{"path": str(stray), "files": 1}] + [
        {"path": str(data / "val.X" / w), "files": 2} for w in gone]
    r = subprocess.run([sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out",
                        str(tmp_path / "s"), "--labels", str(labels), "--subset", "--workers", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (f"not read (--subset): 3 class folder(s) of WNIDs not in {labels}, 5 file(s) (e.g. {stray}): listed in "
            f"the manifest's \"not_in_labels\"") in r.stdout.splitlines()
    labels.write_text(json.dumps({w: f"class {w}" for w in kept + ["n09999998"]}))  # a typo for n09999999
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", labels, opts=PackOptions(workers=1, subset=True), progress=False)
    assert str(e.value).endswith(f"or mend {labels} (--subset left 3 class folder(s) of other WNIDs unread: "
                                 f"n09999999, {gone[0]}, {gone[1]}; one misspelt?).")


def test_every_kind_of_problem_found_before_writing_is_said_at_once(data, tmp_path):
    first, second = sorted(json.loads((data / "Labels.json").read_text()))
    image = first_image(data)  # train.X1/FIRST/...
    (image.parent / "extra").mkdir()  # a subfolder in a class folder
    shutil.copy(image, data / "train.X2" / first / image.name)  # the same stem twice
    for f in (data / "val.X" / second).iterdir():  # a class left without val images
        f.unlink()
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    parts = str(e.value).split("\n\n")
    assert [p.splitlines()[0] for p in parts] == [
        "1 problem(s) with file or class folder names; nothing was written. Fix each and run again:",
        "1 duplicate file stem(s): the stem is each sample's key and must be unique across all splits. Rename or "
        "remove:", f"classes of {data / 'Labels.json'} with no images found:"]
    assert parts[0].splitlines()[1].startswith(f"  {image.parent / 'extra'}: expected image files")
    assert parts[2].splitlines()[1:3] == [f"  val (val.X/): 1 of 2 classes, {second}",
                                          f"  empty class folder(s): {data / 'val.X' / second}"]
    assert not (tmp_path / "s").exists()


def test_an_out_folder_that_cannot_be_made_or_is_empty_is_named(data, tmp_path, capsys):
    import pack_shards
    from vitdeit.errors import SettingError

    (tmp_path / "afile").write_text("")
    with pytest.raises(SettingError, match=re.escape(f"--out {tmp_path / 'afile' / 'sub'}: cannot be made (")):
        pack(data, tmp_path / "afile" / "sub", opts=PackOptions(workers=1), progress=False)
    for args in (["--data-path", str(data), "--out", ""], ["--data-path", str(data), "--out", " "],
                 ["--data-path", "", "--out", str(tmp_path / "s")]):
        with pytest.raises(SystemExit):
            pack_shards.main(args)
        bad = args.index("") if "" in args else 3
        assert f"error: {args[bad - 1]} {args[bad]!r}: empty; name a folder" in capsys.readouterr().err


def test_a_class_whose_files_or_folder_are_misnamed_is_said_as_such_not_as_a_class_without_images(data, tmp_path):
    first, second = sorted(json.loads((data / "Labels.json").read_text()))
    for f in (data / "val.X" / second).iterdir():  # every val image of a class misnamed: it has images
        f.rename(f.with_name(f"IMG {f.name}"))
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert "\n\n" not in str(e.value) and str(e.value).startswith("2 problem(s) with file or class folder names")
    for f in (data / "val.X" / first).iterdir():  # and the other's: the split has images, all of them misnamed
        f.rename(f.with_name(f"IMG {f.name}"))
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert "\n\n" not in str(e.value) and str(e.value).startswith("4 problem(s) with file or class folder names")
    (data / "val.X" / second).rename(data / "val.X" / "tench")  # its folder misnamed: the class has none, and why
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    names, classes = str(e.value).split("\n\n")
    assert any(line.startswith(f"  {data / 'val.X' / 'tench'}: class folder 'tench' is not in")
               for line in names.splitlines())
    assert classes.splitlines()[1] == f"  val (val.X/): 1 of 2 classes, {second}"
    assert "(or, where a class folder above is named otherwise than by its WNID, rename it)" in classes
    shutil.rmtree(data / "val.X" / "tench")
    shutil.rmtree(data / "val.X" / first)  # no val images at all: said once, not as every class without any
    (data / "val.X" / first).mkdir()
    (data / "val.X" / first / "sub").mkdir()  # (a subfolder is no image: the split holds none)
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert str(e.value).endswith(f"\n\n{data / 'val.X'}: the val split holds no image files.")


def test_an_empty_class_folder_is_named_as_such(data, tmp_path):
    empty = data / "val.X" / sorted(json.loads((data / "Labels.json").read_text()))[0]
    for f in empty.iterdir():
        f.unlink()
    (empty / ".DS_Store").write_bytes(b"")  # hidden files are not read: still empty
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert str(e.value).splitlines()[1:3] == [f"  val (val.X/): 1 of 2 classes, {empty.name}",
                                              f"  empty class folder(s): {empty}"]


def test_many_classes_without_images_are_counted_and_the_first_ten_named(data, tmp_path):
    labels = json.loads((data / "Labels.json").read_text())
    unseen = [f"n9999990{i}" if i < 10 else f"n999999{i}" for i in range(12)]  # 12 classes with no folder (of 14)
    (data / "Labels.json").write_text(json.dumps({**labels, **{w: f"unseen {w}" for w in unseen}}))
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert str(e.value).splitlines()[2] == f"  val (val.X/): 12 of 14 classes, {', '.join(unseen[:10])} and 2 more"


def test_classes_left_without_images_by_skipped_files_are_refused_after_packing(data, tmp_path):
    val = data / "val.X" / sorted(json.loads((data / "Labels.json").read_text()))[0]
    for f in val.iterdir():
        f.write_bytes(b"not a jpeg")  # every val image of one class unreadable
    with pytest.raises(DataError, match=r"no images left once unreadable files were skipped .*\n  val \(val.X/\): 1 "
                       r"(.|\n)*Fix or replace the 2 unreadable file\(s\) \(e\.g\. .*UnidentifiedImageError"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True), progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True, allow_missing_classes=True),
             progress=False)
    assert m["splits"]["val"]["class_counts"][val.name] == 0 and len(m["skipped"]) == 2


def test_the_cli_names_the_split_folders_it_read_and_the_classes_without_images(data, tmp_path):
    shutil.rmtree(data / "val.X" / sorted(p.name for p in (data / "val.X").iterdir())[0])  # a class with no val
    labels = json.loads((data / "Labels.json").read_text())
    (data / "Labels.json").write_text(json.dumps({**labels, "n99999998": "unseen"}))  # a class with no folder
    cmd = [sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out", str(tmp_path / "s"),
           "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "error: classes of" in r.stderr and "--allow-missing-classes" in r.stderr
    r = subprocess.run(cmd + ["--allow-missing-classes"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "train: 16 images of 16 from train.X1/, train.X2/, train.X3/, train.X4/ in 1 shard" in lines
    no_val = sorted(labels)[0]
    assert "warning: 1 of the 3 classes in Labels.json has no train images: n99999998" in lines
    assert f"warning: 2 of the 3 classes in Labels.json have no val images: {no_val}, n99999998" in lines


def test_byte_identical_images_within_a_split_are_packed_and_listed_and_the_cli_counts_them(data, tmp_path):
    train, val = sorted((data / "train.X1").glob("*/*.JPEG")), sorted((data / "val.X").glob("*/*.JPEG"))
    other = next(d for d in (data / "train.X2").iterdir() if d.name != train[0].parent.name)  # another class
    cross, twice = other / "cross_1.JPEG", val[0].with_name("twice_1.JPEG")
    shutil.copy(train[0], cross)  # the same image under two classes
    shutil.copy(val[0], twice)  # the same image twice in one class
    cmd = [sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out", str(tmp_path / "s"),
           "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["same_bytes"] == [
        {"split": "train", "paths": sorted([str(cross), str(train[0])]),
         "classes": sorted([train[0].parent.name, other.name])},
        {"split": "val", "paths": sorted([str(twice), str(val[0])]), "classes": [val[0].parent.name]}]
    assert m["splits"]["train"]["num_samples"] == 17 and m["splits"]["val"]["num_samples"] == 5  # all packed
    assert ("warning: 2 set(s) of byte-identical images within a split, packed as they are: 1 under more than one "
            "class (one image, two labels), 1 within one class (one image weighed twice)") in r.stdout


def test_pillows_warnings_are_named_with_their_file_and_kept_when_a_shard_is_reused(data, tmp_path, monkeypatch,
                                                                                     capsys):
    big = first_image(data)
    Image.new("RGB", (200, 200), (90, 120, 30)).save(big, format="JPEG")  # 40,000 px; the others at most 64 x 64
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 25_000)  # over it: a DecompressionBombWarning (an error at 2x)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert [w["path"] for w in m["warnings"]] == [str(big)]
    assert m["warnings"][0]["warning"].startswith("DecompressionBombWarning: Image size (40000 pixels) exceeds limit")
    assert m["splits"]["train"]["num_samples"] == 16  # packed as it is
    repacked = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert repacked["warnings"] == m["warnings"]  # every shard reused: the record keeps them
    record = next((tmp_path / "s" / ".progress").glob("train-*.json"))
    old = json.loads(record.read_text())
    del old["warnings"]  # a record written before warnings were recorded (by a packer fingerprinting another way)
    old["fingerprint"] = "an earlier formula's"
    record.write_text(json.dumps(old))
    tar = tmp_path / "s" / f"{record.stem}.tar"
    before = tar.stat().st_ino
    capsys.readouterr()
    assert pack(data, tmp_path / "s", opts=PackOptions(workers=1))["warnings"] == m["warnings"]  # as the command line
    assert tar.stat().st_ino != before  # read again and written anew, not reused: and the command line says why
    n = len(list((tmp_path / "s").glob("*.tar")))
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [reused(n - 1, n),
                       again(1, n, "1 because its record is an earlier vitdeit's, without the images' warnings")]
    Image.new("RGB", (200, 200), (10, 20, 30)).save(big, format="JPEG")  # the image changed in place
    pack(data, tmp_path / "s", opts=PackOptions(workers=1))
    assert again(1, n, f"1 because {OPTIONS_CHANGED}") in capsys.readouterr().out.splitlines()
    assert not {"reused", "rewritten"} & set(json.loads(record.read_text()))  # one run's doings: not in the record
    record.write_text(json.dumps({**json.loads(record.read_text()), "a_later_field": 1}))  # a later packer's: reused
    next(p for p in (tmp_path / "s").glob("*.tar") if p.stem != record.stem).unlink()  # another shard's tar gone
    pack(data, tmp_path / "s", opts=PackOptions(workers=1))
    assert capsys.readouterr().out.splitlines()[:2] == [
        reused(n - 1, n),
        again(1, n, "1 because its tar or index is missing")]
    record.unlink()  # a run killed between replacing a shard and writing its record; or a record deleted
    pack(data, tmp_path / "s", opts=PackOptions(workers=1))
    assert capsys.readouterr().out.splitlines()[:2] == [
        reused(n - 1, n),
        again(1, n, "1 because its record is missing (a run stopped while writing it, or it was deleted)")]
    assert record.is_file()
    record.unlink()  # and its index: the tar alone left
    (record.parent.parent / f"{record.stem}.idx").unlink()
    pack(data, tmp_path / "s", opts=PackOptions(workers=1))
    assert capsys.readouterr().out.splitlines()[1].endswith("1 because its record is missing (a run stopped while "
                                                            "writing it, or it was deleted)")


def test_ctrl_c_stops_the_packer_with_one_line_and_the_rerun_finishes(tmp_path):
    import signal
    import time

    data = small_dataset(tmp_path / "d", num_classes=4, train_per_class=200, val_per_class=10)
    cmd = [sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out", str(tmp_path / "s"),
           "--workers", "2", "--shard-size", "1"]  # 840 shards
    # each image opened 10 ms slower (in the workers too: forked, or started with this PYTHONPATH), so that packing
    # lasts seconds: at full speed it ended in 1.1 s once, before a test process starved by other work sent Ctrl-C
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\nfrom PIL import Image\n_open = Image.open\n"
                                           "Image.open = lambda *a, **k: (time.sleep(0.01), _open(*a, **k))[1]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    # Ctrl-C's default action, as in a terminal: a suite started in the background by a shell without job control
    # (`cmd &` in a script) runs with SIGINT ignored, which the packer would inherit (and then finish, exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list((tmp_path / "s" / ".progress").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: to the whole process group, workers included
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted: the finished shards in" in err
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "train: 800 images of 800 from" in r.stdout


def test_unknown_wnid_folder_is_an_error_naming_it(data, tmp_path):
    (data / "val.X" / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"val\.X/n99999999.*not in .*Labels\.json"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_missing_val_split_is_an_error(data, tmp_path):
    shutil.rmtree(data / "val.X")
    with pytest.raises(DataError, match="no val split"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


@pytest.mark.parametrize("split", ["train.X4", "val.X"])  # the stem is the key in every split's shards
def test_duplicate_stems_are_an_error_naming_both(data, tmp_path, split):
    src = first_image(data)
    dst = data / split / src.parent.name / src.name
    Image.open(first_image(data, split)).save(dst)  # other pixels, same stem
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert "duplicate file stem" in str(e.value) and str(src) in str(e.value) and str(dst) in str(e.value)


def test_an_image_in_both_train_and_val_is_an_error_or_with_the_flag_packed_as_it_is_listed_and_warned_of(data,
                                                                                                      tmp_path):
    from vitdeit.classes import pack_fingerprint
    from vitdeit.config import Config
    from vitdeit.distributed import Dist
    from vitdeit.packing import summary_lines
    from vitdeit.trainer import run_notes

    src = first_image(data)
    copy = data / "val.X" / src.parent.name / "ILSVRC2012_val_99999999.JPEG"
    shutil.copyfile(src, copy)
    again = data / "val.X" / src.parent.name / "ILSVRC2012_val_99999998.JPEG"  # a second val copy: named as well
    shutil.copyfile(src, again)
    out = tmp_path / "s"
    with pytest.raises(DataError) as e:
        pack(data, out, opts=PackOptions(workers=1), progress=False)
    assert str(e.value).startswith("2 val image(s) have byte-identical copies in train")
    assert "re-run with --allow-train-val-copies" in str(e.value)
    assert str(e.value).endswith(f":\n  {src}  ==  {again}\n  {src}  ==  {copy}")
    assert not (out / "manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    m = pack(data, out, opts=PackOptions(workers=1, allow_train_val_copies=True), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == written and len(written) == 2  # reused
    assert m["train_val_same_bytes"] == [{"train": [str(src)], "val": [str(again), str(copy)],
                                          "classes": [src.parent.name]}]
    assert m["splits"]["val"]["num_samples"] == 2 * 2 + 2  # packed as they are, not dropped
    said = "2 of the 6 val images have byte-identical copies in train"
    assert (f'warning: {said}, packed as they are (--allow-train-val-copies): listed in the manifest\'s '
            f'"train_val_same_bytes" (e.g. {again} == {src})') in summary_lines(m, out)
    # the flag changes no shard: checkpoints of a pack without it (another copy removed since) are of these shards
    assert pack_fingerprint(m) == pack_fingerprint({**m, "options": {**m["options"], "allow_train_val_copies": False}})

    class Loader:  # run_notes reads a loader's name, its length and the train images each rank is dealt
        name, per_rank = "torch", 16

        def __len__(self):
            return 1

    cfg = Config(data_path=str(out), model="vit_tiny", device="cpu", img_size=16, batch_size=8)
    notes = run_notes(cfg, m, Dist(), Loader(), None, 1e-3)
    assert f'warning: {said} (the manifest\'s "train_val_same_bytes"): val top-1 counts images the model trained on' \
        in notes


def pack_killed_at_image(n: int, data, out, monkeypatch, shard_size: int = 4) -> None:
    """A pack run interrupted (as by Ctrl-C) when it reaches its n-th image; packing works again afterwards."""
    real, calls = packing.encode_image, [0]

    def dies_midway(*a):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(packing, "encode_image", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        pack(data, out, opts=PackOptions(shard_size=shard_size, workers=1), progress=False)
    monkeypatch.setattr(packing, "encode_image", real)


def test_a_rerun_after_a_kill_gives_the_complete_output(data, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    pack(data, clean, opts=PackOptions(shard_size=4, workers=1), progress=False)
    out = tmp_path / "killed"
    pack_killed_at_image(11, data, out, monkeypatch)  # in the third shard
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 2
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in clean.glob("*.tar"))
    for f in clean.glob("*.tar"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    a, b = load_manifest(out), load_manifest(clean)
    assert a["splits"] == b["splits"] and a["classes"] == b["classes"]


def test_a_rerun_with_another_plan_removes_what_the_killed_run_left(data, tmp_path, monkeypatch):
    out = tmp_path / "s"
    pack_killed_at_image(11, data, out, monkeypatch)  # in train-000002, a shard the second plan does not have
    assert [p.name for p in out.glob(".*.tmp")] == [".train-000002.tar.tmp"]
    (out / "train-000002.idx.tmp").write_text("v1.2 0\n")  # a kill in write_text_atomic leaves this
    m = pack(data, out, opts=PackOptions(shard_size=16, workers=1), progress=False)
    files = {s["file"] for split in m["splits"].values() for s in split["shards"]}
    files |= {s["index"] for split in m["splits"].values() for s in split["shards"]}
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(files | {"manifest.json"})


def test_a_rerun_repacks_an_image_changed_in_place_even_at_the_same_size(data, tmp_path):
    import os

    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(workers=1), progress=False)
    files = sorted((data / "train.X1").glob("*/*.JPEG"), key=lambda f: f.stat().st_size)
    small, big = files[0], files[-1]
    assert small.stat().st_size < big.stat().st_size
    new = small.read_bytes() + b"\0" * (big.stat().st_size - small.stat().st_size)  # decoders stop at EOI
    stat = big.stat()
    big.write_bytes(new)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # one second later, as a real rewrite
    m = pack(data, out, opts=PackOptions(workers=1), progress=False)
    packed = {}
    for s in m["splits"]["train"]["shards"]:
        packed.update(read_tar(out / s["file"]))
    assert packed[big.stem]["jpg"] == new


def test_a_file_name_with_whitespace_is_an_error_naming_it(data, tmp_path):
    f = first_image(data)
    spaced = f.with_name("my photo.JPEG")
    f.rename(spaced)
    with pytest.raises(DataError, match=r"my photo\.JPEG: the file name contains whitespace"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_every_misnamed_file_and_class_folder_is_listed_at_once_across_splits(data, tmp_path):
    train = sorted((data / "train.X1").glob("*/*.JPEG"))
    spaced, dotted = train[0].with_name("IMG 0001.JPEG"), train[1].with_name(f"{train[1].stem}.v2.JPEG")
    val_spaced = first_image(data, "val.X").with_name("val copy.JPEG")
    for src, dst in ((train[0], spaced), (train[1], dotted), (first_image(data, "val.X"), val_spaced)):
        src.rename(dst)
    nested = train[2].parent / "more"
    nested.mkdir()
    cats, stray = data / "train.X2" / "cats", data / "train.X2" / "n09999999"  # not a WNID; a WNID not in Labels
    for folder in (cats, stray):
        folder.mkdir()
        shutil.copy(train[3], folder / f"{folder.name}_1.JPEG")
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "6 problem(s) with file or class folder names; nothing was written. Fix each and run again:"
    named = {line.split(": ", 1)[0].strip(): line for line in lines[1:-1]}
    assert set(named) == {str(p) for p in (spaced, dotted, val_spaced, nested, cats, stray)}
    assert lines[-1] == ("For classes of your own, name each class folder and its Labels.json key by a WNID of your "
                         "own making (n00000001, n00000002, ...; the ImageNet-1k teacher cannot predict those: train "
                         "one on your shards and pass train.py --teacher-ckpt).")  # once, after the list
    assert "named by WNID ('n' + 8 digits" in named[str(cats)] and "add it there" in named[str(stray)]
    assert "contains whitespace" in named[str(val_spaced)] and "contains '.'" in named[str(dotted)]
    assert not (tmp_path / "s").exists()


def test_past_fifty_misnamed_files_the_rest_are_counted(data, tmp_path):
    src = first_image(data)
    for i in range(53):
        shutil.copy(src, src.with_name(f"IMG {i:04d}.JPEG"))
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("53 problem(s) with file or class folder names") and lines[-1] == "  ... and 3 more"
    assert len(lines) == 52 and all("contains whitespace" in line for line in lines[1:51])


@pytest.mark.parametrize("link", ["val", "train.X9"])
def test_a_split_folder_linked_under_another_split_name_is_named_not_read_twice(data, tmp_path, link):
    (data / link).symlink_to(data / "val.X", target_is_directory=True)
    with pytest.raises(DataError) as e:
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    first, second = sorted([data / link, data / "val.X"]) if link == "val" else (data / link, data / "val.X")
    assert str(e.value).startswith(f"{first} and {second}: the same folder ({(data / 'val.X').resolve()}), one a "
                                   f"link to it")


def test_a_shard_whose_images_were_all_skipped_is_left_out(data, tmp_path, capsys):
    bad = break_two(data)
    class_map = packing.ClassMap.from_labels(packing.load_labels(data / "Labels.json"))
    samples = packing.scan_split(packing.find_split_dirs(data)["train"], class_map, data / "Labels.json")
    plan = packing.plan_shards(samples, 1, 0, "train")
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True, shard_size=1), progress=False)
    shards = m["splits"]["train"]["shards"]
    assert len(plan) == 16 and len(shards) == 14 and all(s["num_samples"] == 1 for s in shards)
    assert sorted(p.name for p in (tmp_path / "s").glob("train-*.tar")) == sorted(s["file"] for s in shards)
    assert sorted(p.name for p in (tmp_path / "s").glob("train-*.idx")) == sorted(s["index"] for s in shards)
    assert sorted(s["path"] for s in m["skipped"]) == sorted(map(str, bad))
    # nor kept as a record: the rerun reuses the others and reads the bad files again, with nothing to write again
    assert sorted(p.stem for p in (tmp_path / "s" / ".progress").glob("train-*.json")) == sorted(
        s["file"].removesuffix(".tar") for s in shards)
    capsys.readouterr()
    repacked = pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True, shard_size=1))  # as the CLI does
    assert repacked["skipped"] == m["skipped"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == reused(18, 20)  # 14 train, 4 val
    assert not [line for line in out if line.startswith("wrote again")]


def test_a_damaged_progress_record_is_rewritten_not_fatal(data, tmp_path, capsys):
    out = tmp_path / "s"
    first = pack(data, out, opts=PackOptions(workers=1), progress=False)
    (out / ".progress" / "train-000000.json").write_text('{"fingerprint": "ab')  # killed mid-write
    capsys.readouterr()
    assert pack(data, out, opts=PackOptions(workers=1))["splits"] == first["splits"]  # as the command line
    assert again(1, 2, "1 because its record is unreadable") in (
        capsys.readouterr().out.splitlines())
    assert len(json.loads((out / ".progress" / "train-000000.json").read_text())["fingerprint"]) == 40  # rewritten


def test_only_the_packers_own_files_are_removed_from_the_output_folder(data, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    mine = out / "photo-123456.jpg"
    mine.write_bytes(b"the user's")
    pack(data, out, opts=PackOptions(workers=1), progress=False)
    assert mine.read_bytes() == b"the user's"


def test_a_run_killed_while_replacing_a_shard_leaves_nothing_a_later_run_would_reuse(data, tmp_path, monkeypatch):
    import os

    clean, out = tmp_path / "clean", tmp_path / "s"
    pack(data, clean, opts=PackOptions(workers=1), progress=False)
    pack(data, out, opts=PackOptions(workers=1), progress=False)
    f = first_image(data)
    original, stat = f.read_bytes(), f.stat()
    f.write_bytes(sorted((data / "train.X2").glob("*/*.JPEG"))[0].read_bytes())  # other inputs...

    def killed(*a, **k):
        raise KeyboardInterrupt  # ...and a run killed after its new tar replaced the old one, before its index

    monkeypatch.setattr(packing, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        pack(data, out, opts=PackOptions(workers=1), progress=False)
    monkeypatch.undo()
    f.write_bytes(original)  # back to the first inputs, to the nanosecond
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    pack(data, out, opts=PackOptions(workers=1), progress=False)
    for t in clean.glob("*.tar"):
        assert (out / t.name).read_bytes() == t.read_bytes()
        assert (out / t.with_suffix(".idx").name).read_text() == t.with_suffix(".idx").read_text()


@pytest.mark.parametrize("what", ["split", "class", "file"])
def test_a_broken_symlink_is_an_error_naming_it_not_a_silent_gap(data, tmp_path, what):
    target = tmp_path / "unmounted" / "gone"
    if what == "split":
        shutil.rmtree(data / "train.X2")
        link = data / "train.X2"
    elif what == "class":
        link = data / "train.X1" / "n09999999"
    else:
        link = first_image(data).with_name("n0_broken.JPEG")
    link.symlink_to(target)
    with pytest.raises(DataError, match=f"{link}: .*broken symlink"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_a_file_name_that_is_not_utf8_is_an_error_naming_it(data, tmp_path):
    import os

    src = first_image(data)
    bad = os.path.join(os.fsencode(src.parent), b"caf\xe9_2.JPEG")  # Latin-1, as old archives extract
    os.rename(os.fsencode(src), bad)
    with pytest.raises(DataError, match=r"not valid UTF-8 .*rename the file"):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_the_cli_refuses_a_jpeg_quality_outside_1_to_100(data, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out",
                        str(tmp_path / "s"), "--jpeg-quality", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--jpeg-quality 0: must be in 1..100" in r.stderr


@pytest.mark.parametrize("flags, said", [(["--jpeg-quality", "101"], "--jpeg-quality 101: must be in 1..100"),
                                         (["--resize-short", "7"], "--resize-short 7: must be >= 8"),
                                         (["--shard-size", "0"], "--shard-size 0: must be >= 1")])
def test_the_cli_refuses_a_value_just_past_its_bounds_and_accepts_the_bounds(data, tmp_path, capsys, flags, said):
    import pack_shards  # (the repository root is on sys.path: conftest)

    with pytest.raises(SystemExit) as e:
        pack_shards.main(["--data-path", str(data), "--out", str(tmp_path / "s"), *flags])
    assert e.value.code == 2 and said in capsys.readouterr().err and not (tmp_path / "s").exists()
    if flags[0] == "--jpeg-quality":  # the bounds themselves pack (quality 1 and 100, resized to a short side of 8)
        for quality in ("1", "100"):
            assert pack_shards.main(["--data-path", str(data), "--out", str(tmp_path / quality), "--workers", "1",
                                     "--resize-short", "8", "--shard-size", "1", "--jpeg-quality", quality]) == 0
            m = load_manifest(tmp_path / quality)
            assert (m["options"]["jpeg_quality"], m["options"]["resize_short"]) == (int(quality), 8)
            assert {s["num_samples"] for split in m["splits"].values() for s in split["shards"]} == {1}


@pytest.mark.parametrize("kw, said", [({"jpeg_quality": 0}, "--jpeg-quality 0: must be in 1..100"),
                                      ({"workers": 0}, "--workers 0: must be >= 1"),
                                      ({"resize_short": 7}, "--resize-short 7: must be >= 8"),
                                      ({"shard_size": 0}, "--shard-size 0: must be >= 1")])
def test_pack_options_refuse_what_no_pack_can_use_whoever_makes_them(kw, said):
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError) as e:  # (the demo and the benchmarks call pack() without pack_shards.py's flags)
        PackOptions(**kw)
    assert str(e.value) == said
    assert PackOptions(**{k: {"jpeg_quality": 100, "resize_short": 8}.get(k, 1) for k in kw})  # the bounds themselves


def test_16_bit_grey_is_scaled_however_pillow_opens_it_and_32_bit_is_refused():
    import numpy as np

    ramp = (np.arange(40 * 48).reshape(40, 48) * 33).astype(np.int32)  # 0 .. 63,327: 16-bit values
    for im in (Image.fromarray(ramp.astype(np.uint16)), Image.fromarray(ramp, mode="I")):  # I: older Pillow's PNG
        buf = io.BytesIO()
        im.save(buf, format="TIFF")
        data, change = packing.encode_image(buf.getvalue(), None, 90)
        with Image.open(io.BytesIO(data)) as out:
            grey = np.asarray(out.convert("L"), dtype=float)
        assert np.abs(grey - ramp // 256).mean() < 2, im.mode  # pixel by pixel: the top 8 bits, no wrap-around
    buf = io.BytesIO()
    Image.fromarray(ramp * 100, mode="I").save(buf, format="TIFF")  # beyond 16 bits: no range to scale from
    with pytest.raises(ValueError, match="32-bit"):
        packing.encode_image(buf.getvalue(), None, 90)


# EXIF 2.3's Orientation values (the tag says how to turn the stored pixels to show them upright): 2 mirror,
# 3 rotate 180, 4 flip, 5 mirror + rotate 270 clockwise, 6 rotate 90 clockwise, 7 mirror + rotate 90 clockwise, 8
# rotate 270 clockwise
UPRIGHT = {1: lambda x: x, 2: np.fliplr, 3: lambda x: np.rot90(x, 2), 4: np.flipud,
           5: lambda x: np.rot90(np.fliplr(x), 1), 6: lambda x: np.rot90(x, -1),
           7: lambda x: np.rot90(np.fliplr(x), -1), 8: lambda x: np.rot90(x, 1)}


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_applied_as_the_standard_says(orientation):
    yy, xx = np.mgrid[0:32, 0:48]
    pixels = np.stack([xx * 5, yy * 7, np.where((xx < 12) & (yy < 8), 250, 20)], -1).astype(np.uint8)  # no symmetry
    buf = io.BytesIO()
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(buf, format="JPEG", quality=95, exif=exif)
    data, change = packing.encode_image(buf.getvalue(), None, 95)
    assert change.startswith(f"EXIF orientation {orientation} applied")
    with Image.open(io.BytesIO(data)) as out:
        got = np.asarray(out.convert("RGB"), dtype=float)
    diffs = {o: np.abs(got - f(pixels)).mean() for o, f in UPRIGHT.items() if f(pixels).shape == got.shape}
    assert min(diffs, key=diffs.get) == orientation and diffs[orientation] < 3


def test_a_rerun_with_another_resize_short_re_encodes_every_image(tiny_data, tmp_path):
    pack(tiny_data, tmp_path / "s", opts=PackOptions(resize_short=48, workers=1), progress=False)
    m = pack(tiny_data, tmp_path / "s", opts=PackOptions(resize_short=32, workers=1), progress=False)
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            for comp in read_tar(tmp_path / "s" / sh["file"]).values():
                with Image.open(io.BytesIO(comp["jpg"])) as im:
                    assert min(im.size) == 32  # every input is over 32 px: none of the 48 px shards was reused


@pytest.mark.parametrize("name", ["train.X2 (copy)", "train4", "old_val"])
def test_a_folder_of_class_folders_named_unlike_a_split_stops_the_pack(data, tmp_path, name, monkeypatch):
    shutil.copytree(data / "train.X2", data / name)  # a quarter of train that no split pattern takes
    (data / "notes").mkdir()  # a folder without class folders is no split: it stays allowed
    (data / "notes" / "n01440764.txt").write_text("a file named like a WNID is no class folder")
    with pytest.raises(DataError, match=re.escape(f"{data / name}: holds WNID class folders but is not named like")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    scandir = os.scandir

    def locked(path):  # unreadable, as a volume's root-only lost+found: not a split, and no reason to stop
        if Path(path) == data / name:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["train"]["num_samples"] == 16
    monkeypatch.undo()
    shutil.rmtree(data / name)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["train"]["num_samples"] == 16


def test_out_inside_the_source_folders_is_refused_and_beside_them_allowed(data):
    for out in (data, data / "train.X1" / "shards", data / "val.X"):
        with pytest.raises(DataError, match=re.escape(f"--out {out}: in the source folders (")):
            pack(data, out, opts=PackOptions(workers=1), progress=False)
    for out in (data / "train", data / "val.X2"):  # not there yet, but the next pack would scan it as a split
        with pytest.raises(DataError, match=re.escape(f"--out {out}: named like a split folder of {data}")):
            pack(data, out, opts=PackOptions(workers=1), progress=False)
    assert not list(data.rglob("*.tar")) and not list(data.rglob("manifest.json"))  # nothing written among them
    m = pack(data, data / "shards", opts=PackOptions(workers=1), progress=False)  # a folder of its own in DATA: fine
    assert m["splits"]["train"]["num_samples"] == 16 and m["splits"]["val"]["num_samples"] == 4




@pytest.mark.parametrize("damage", ["shortened", "cut"])
def test_a_damaged_index_is_rewritten_by_the_next_pack(data, tmp_path, damage, capsys):
    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    idx = out / "train-000001.idx"
    whole = idx.read_text()
    lines = whole.splitlines()
    idx.write_text(f"v1.2 {len(lines) - 2}\n" + "\n".join(lines[1:-1]) + "\n" if damage == "shortened"
                   else "\n".join(lines[:-1]) + "\n")
    capsys.readouterr()
    pack(data, out, opts=PackOptions(shard_size=4, workers=1))  # as the command line
    assert idx.read_text() == whole
    assert (again(1, 5, f"1 because {NOT_WRITTEN}")
            in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("edit, problem", [
    (lambda f: f[:8], "no lbl"),  # (fields: cls, jpg, lbl, each `ext offset size name`)
    (lambda f: [*f[:4], *f[8:]], "no jpg"),
    (lambda f: [*f[:10], "2", f[11]], "its lbl is 2 bytes, not 4"),
    (lambda f: [*f[:9], "-4", *f[10:]], f"its lbl (4 bytes at byte -4) {OFF_BLOCKS}"),
    (lambda f: [*f[:9], str(int(f[9]) + 4), *f[10:]], f"its lbl (4 bytes at byte {{lbl}}) {OFF_BLOCKS}"),  # mid-block
    (lambda f: [*f[:9], "{size}", *f[10:]], f"its lbl (4 bytes at byte {{size}}) {OFF_BLOCKS}"),  # past the end
    (lambda f: [*f[:6], "-5", *f[7:]], f"its jpg (-5 bytes at byte {{jpg}}) {OFF_BLOCKS}")])
def test_an_index_line_off_its_tars_blocks_is_refused_and_rewritten_by_the_next_pack(
        data, tmp_path, capsys, edit, problem):
    from vitdeit.data import shard_paths

    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    idx, size = out / "train-000001.idx", (out / "train-000001.tar").stat().st_size
    whole = idx.read_text()
    lines = whole.splitlines()
    fields = lines[2].split()
    assert fields[0:9:4] == ["cls", "jpg", "lbl"]
    said = problem.format(size=size, jpg=fields[5], lbl=int(fields[9]) + 4)
    idx.write_text("\n".join([*lines[:2], " ".join(edit(fields)).format(size=size), *lines[3:]]) + "\n")
    with pytest.raises(DataError) as e:  # both loaders' first check of the shards, before DALI reads at the offsets
        shard_paths(out, load_manifest(out), "train")
    assert str(e.value) == (f"{idx} line 3: {said}; the index is damaged or not its tar's. Re-run pack_shards.py (it "
                            f"writes again each shard whose index is not the one it wrote).")
    capsys.readouterr()
    pack(data, out, opts=PackOptions(shard_size=4, workers=1))  # as the command line
    assert idx.read_text() == whole
    assert again(1, 5, f"1 because {NOT_WRITTEN}") in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("recorded", [True, False])  # False: records written before index_sha1 was kept
def test_another_shards_index_of_the_same_count_is_rewritten_by_the_next_pack(data, tmp_path, capsys, recorded):
    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    first, second = out / "train-000000.idx", out / "train-000001.idx"
    whole = {first: first.read_text(), second: second.read_text()}
    sha1 = [hashlib.sha1(whole[idx].encode()).hexdigest() for idx in (first, second)]
    records = sorted((out / ".progress").glob("train-*.json"))
    assert [json.loads(r.read_text())["index_sha1"] for r in records[:2]] == sha1
    if not recorded:
        for r in records:
            r.write_text(json.dumps({k: v for k, v in json.loads(r.read_text()).items() if k != "index_sha1"}))
    first.write_text(whole[second])  # 4 samples each: every count agrees, every offset lies in the tar
    second.write_text(whole[first])
    capsys.readouterr()
    pack(data, out, opts=PackOptions(shard_size=4, workers=1))
    assert {first: first.read_text(), second: second.read_text()} == whole
    said = capsys.readouterr().out.splitlines()
    assert again(2, 5, f"2 because {NOT_WRITTEN if recorded else NOT_ITS_INDEX}") in said
    assert [json.loads(r.read_text())["index_sha1"] for r in records[:2]] == sha1  # the ones written again


def test_an_earlier_records_index_read_against_its_tar_once_leaves_its_sha1_in_the_record_and_manifest(
        data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    m = pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    sha1 = {s["index"]: hashlib.sha1((out / s["index"]).read_bytes()).hexdigest()
            for split in ("train", "val") for s in m["splits"][split]["shards"]}
    assert {s["index"]: s["index_sha1"] for split in ("train", "val") for s in m["splits"][split]["shards"]} == sha1
    for split in ("train", "val"):  # a manifest and records as a packer before index_sha1 wrote them
        for s in m["splits"][split]["shards"]:
            del s["index_sha1"]
    (out / "manifest.json").write_text(json.dumps(m))
    for r in (out / ".progress").glob("*.json"):
        r.write_text(json.dumps({k: v for k, v in json.loads(r.read_text()).items() if k != "index_sha1"}))
    real = packing.write_text_atomic

    def full_disk(path, text):  # the records' upgrade is best effort: a full disk leaves them as they were
        if path.parent.name == ".progress":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(packing, "write_text_atomic", full_disk)
    again_m = pack(data, out, opts=PackOptions(shard_size=4, workers=1))
    assert capsys.readouterr().out.splitlines()[0] == reused(5, 5)
    assert {s["index"]: s["index_sha1"] for split in ("train", "val") for s in again_m["splits"][split]["shards"]} == (
        sha1)  # the manifest has them anyway
    assert not any("index_sha1" in json.loads(r.read_text()) for r in (out / ".progress").glob("*.json"))
    monkeypatch.setattr(packing, "write_text_atomic", real)
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    assert {f"{r.stem}.idx": json.loads(r.read_text())["index_sha1"] for r in (out / ".progress").glob("*.json")} == (
        sha1)
    assert load_manifest(out)["splits"]["train"]["shards"][0]["index_sha1"] == sha1["train-000000.idx"]


@pytest.mark.parametrize("with_index", [True, False])
def test_a_shard_copied_over_another_is_refused_and_rewritten_by_the_next_pack(data, tmp_path, capsys, with_index):
    from vitdeit.data import shard_paths

    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    whole = {f.name: f.read_bytes() for f in out.glob("train-*")}
    assert len(whole["train-000000.tar"]) == len(whole["train-000001.tar"])  # (tarfile pads to 10,240 bytes)
    for ext in (".tar", ".idx") if with_index else (".tar",):  # one shard read twice, the other never
        (out / f"train-000001{ext}").write_bytes(whole[f"train-000000{ext}"])
    with pytest.raises(DataError) as e:  # both loaders' first check
        shard_paths(out, load_manifest(out), "train")
    assert str(e.value) == (
        f"{out / 'train-000001.idx'}: not the index pack_shards.py wrote for train-000001.tar (its SHA-1 is not the "
        f"one in {out / 'manifest.json'}): edited, damaged, or another shard's with its tar. Re-run pack_shards.py (it "
        f"writes again each shard whose index is not the one it wrote)." if with_index else
        f"{out / 'train-000001.tar'}: not the tar train-000001.idx describes (the headers of its first and last "
        f"samples' files differ); another shard's copied over it? Copy it again from where it was packed, or re-run "
        f"pack_shards.py (it writes again each shard whose tar is not its index's).")
    capsys.readouterr()
    pack(data, out, opts=PackOptions(shard_size=4, workers=1))
    assert {f.name: f.read_bytes() for f in out.glob("train-*")} == whole
    why = NOT_WRITTEN if with_index else "its tar is not the one its index describes"
    assert again(1, 5, f"1 because {why}") in capsys.readouterr().out.splitlines()


def test_a_cut_short_tar_is_refused_by_the_loaders_and_rewritten_by_the_next_pack(data, tmp_path, capsys):
    from vitdeit.data import shard_paths

    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(workers=1, shard_size=4), progress=False)
    whole = {f.name: f.read_bytes() for f in out.glob("*.tar")}
    cut = out / "train-000001.tar"
    cut.write_bytes(whole[cut.name][:-1536])  # a copy that stopped early: the last member and the end blocks lost
    m = load_manifest(out)
    with pytest.raises(DataError, match=re.escape(f"{cut}: {len(whole[cut.name]) - 1536} bytes, but {out}")):
        shard_paths(out, m, "train")
    assert len(shard_paths(out, m, "val")) == 1  # the other split's shards are whole
    capsys.readouterr()
    pack(data, out, opts=PackOptions(workers=1, shard_size=4))  # same inputs: reuse all but the cut
    assert {f.name: f.read_bytes() for f in out.glob("*.tar")} == whole
    assert capsys.readouterr().out.splitlines()[:2] == [
        reused(4, 5),
        again(1, 5, f"1 because {SIZE_CHANGED}")]
    pack(data, out, opts=PackOptions(workers=1, shard_size=4, resize_short=20))  # every shard, for one reason
    assert (again(5, 5, f"5 because {OPTIONS_CHANGED}")
            in capsys.readouterr().out.splitlines())
    assert len(shard_paths(out, load_manifest(out), "train")) == 4


def test_a_split_folder_unpacked_inside_itself_is_named_as_such(data, tmp_path):
    nested = data / "train.X1" / "train.X1"
    nested.mkdir()
    for c in sorted((data / "train.X1").iterdir()):
        if c != nested:
            shutil.move(c, nested / c.name)
    with pytest.raises(DataError, match=re.escape(f"{nested}: a split folder inside the split folder")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)


def test_the_same_folders_named_relatively_reuse_every_shard(data, tmp_path, monkeypatch):
    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(workers=1, shard_size=8), progress=False)
    written = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("*.tar")}
    monkeypatch.chdir(data.parent)
    m = pack(Path(data.name), out, opts=PackOptions(workers=1, shard_size=8), progress=False)
    assert m["splits"]["train"]["num_samples"] == 16
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("*.tar")} == written  # none rewritten


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_the_pack_naming_the_file_and_out_and_the_rerun_finishes(data, tmp_path, monkeypatch,
                                                                                   workers):
    from vitdeit.errors import WriteFailed

    clean = tmp_path / "clean"
    pack(data, clean, opts=PackOptions(shard_size=4, workers=1), progress=False)
    real = packing.webdataset.TarWriter.write

    def fills_up(self, sample):  # the third shard's third image (in whichever process writes it)
        if self.stream.name.endswith(".train-000002.tar.tmp") and self.tarstream.offset > 3 * 1024:
            raise OSError(28, "No space left on device")
        return real(self, sample)

    monkeypatch.setattr(packing.webdataset.TarWriter, "write", fills_up)
    out = tmp_path / "full"
    with pytest.raises(WriteFailed, match=r"could not write .*/\.train-000002\.tar\.tmp: \[Errno 28\] No space left on "
                                          r"device \(.* GiB free on its disk\); the shards already finished are kept "
                                          r"and a rerun packs only the rest\. Free space there or pass another --out"):
        pack(data, out, opts=PackOptions(shard_size=4, workers=workers), progress=False)
    if workers == 1:  # (with 2, the other process may have finished later shards too: kept)
        assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(packing.webdataset.TarWriter, "write", real)
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    assert {f.name: f.read_bytes() for f in out.glob("*.tar")} == {f.name: f.read_bytes() for f in clean.glob("*.tar")}


def test_out_naming_a_file_or_holding_a_manifest_folder_is_an_error_naming_it(data, tmp_path):
    out = tmp_path / "shards"
    out.write_text("not a folder")
    with pytest.raises(DataError, match=r"--out .*/shards: a file, not a folder; pass a folder"):
        pack(data, out, opts=PackOptions(workers=1), progress=False)
    out.unlink()
    (out / "manifest.json").mkdir(parents=True)  # a folder where the manifest goes: it could not be replaced
    with pytest.raises(DataError) as e:
        pack(data, out, opts=PackOptions(workers=1), progress=False)
    assert str(e.value) == (f"{out / 'manifest.json'}: a folder where the manifest goes; move it away, or pass another "
                            f"--out.")
    assert os.listdir(out) == ["manifest.json"]  # nothing written


def test_after_a_write_error_the_queued_shards_are_skipped_and_those_in_progress_finish(data, tmp_path, monkeypatch):
    import time

    from vitdeit.errors import WriteFailed

    real = packing.webdataset.TarWriter.write

    def slow_then_full(self, sample):  # 1-image shards of >= 0.1 s each; the third cannot be written
        time.sleep(0.1)
        if self.stream.name.endswith(".train-000002.tar.tmp"):
            raise OSError(28, "No space left on device")
        return real(self, sample)

    monkeypatch.setattr(packing.webdataset.TarWriter, "write", slow_then_full)
    out = tmp_path / "s"
    with pytest.raises(WriteFailed, match=r"\.train-000002\.tar\.tmp: \[Errno 28\]"):
        pack(data, out, opts=PackOptions(shard_size=1, workers=2), progress=False)
    written = sorted(p.name for p in out.glob("*.tar"))
    # of 20 train shards: those done before the error and those the workers had started when it came back, whole
    # (tar, index, progress record); not the queued ones (without the skip, all 19 others)
    assert 2 <= len(written) <= 8 and "train-000002.tar" not in written, written
    for tar in written:
        name = tar.removesuffix(".tar")
        assert (out / f"{name}.idx").is_file() and (out / ".progress" / f"{name}.json").is_file()
    assert not list(out.rglob("*.tmp"))


def test_a_worker_told_to_stop_skips_its_shard():
    class Set:
        def is_set(self):
            return True

    packing._STOP = Set()
    try:
        assert packing.write_shard(("train", "train-000000", [], PackOptions(), "/nonexistent")) is None
    finally:
        packing._STOP = None


def test_an_index_that_cannot_be_written_is_named(data, tmp_path, monkeypatch):
    from vitdeit.errors import WriteFailed

    real = Path.write_text

    def full(self, text, *a, **k):
        if self.name == "train-000001.idx.tmp":
            raise OSError(28, "No space left on device")  # as a failed write(): no file name
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteFailed, match=r"could not write .*/train-000001\.idx\.tmp: \[Errno 28\]"):
        pack(data, tmp_path / "s", opts=PackOptions(shard_size=4, workers=1), progress=False)


def test_a_manifest_that_cannot_be_written_is_named_and_the_rerun_reuses_every_shard(data, tmp_path, monkeypatch,
                                                                                     capsys):
    from vitdeit.errors import WriteFailed

    real = Path.write_text

    def full(self, text, *a, **k):  # the disk fills up halfway through the manifest, the last file written
        if self.name == "manifest.json.tmp":
            real(self, text[: len(text) // 2], *a, **k)
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    out = tmp_path / "s"
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteFailed, match=re.escape(f"could not write {out / 'manifest.json'}: [Errno 28] No space "
                                                    f"left on device") + r".*\); every shard is written and kept: a "
                                                    r"rerun reuses them and writes only the manifest\. Free space "):
        pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    m = pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=True)
    n = sum(len(sp["shards"]) for sp in m["splits"].values())
    assert reused(n, n) in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text()) == m


def test_a_second_pack_into_an_out_folder_being_packed_is_refused_and_one_after_it_goes_on(data, tmp_path,
                                                                                         monkeypatch):
    from vitdeit.errors import SettingError

    out = tmp_path / "s"
    (out / ".progress").mkdir(parents=True)
    with held_elsewhere(out / ".progress" / "lock"):  # as a pack_shards.py running now holds it
        with pytest.raises(SettingError, match=re.escape(f"--out {out}: another pack_shards.py is packing into it "
                                                         f"now; wait for it to finish, or pass another --out")):
            pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
        assert sorted(p.name for p in out.rglob("*")) == [".progress", "lock"]  # nothing written
    held_while, write, finish = [], packing.write_shard, packing._finish  # the lock as shards and manifest are written

    def probed(real):
        return lambda *a: (held_while.append(lock_held(out / ".progress" / "lock")), real(*a))[1]

    monkeypatch.setattr(packing, "write_shard", probed(write))
    monkeypatch.setattr(packing, "_finish", probed(finish))
    m = pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)  # its pack has ended
    n = sum(len(sp["shards"]) for sp in m["splits"].values())
    assert m["splits"]["train"]["num_samples"] > 0 and held_while == [True] * (n + 1)  # every shard, the manifest
    assert not lock_held(out / ".progress" / "lock")
    monkeypatch.undo()
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)  # a pack lets go of it as it ends


def test_shards_of_a_pack_that_did_not_finish_are_named_as_such_and_the_same_command_finishes_it(data, tmp_path):
    from vitdeit.classes import load_manifest

    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    (out / "manifest.json").unlink()  # as a pack stopped before its last step leaves it
    with pytest.raises(DataError, match=re.escape(f"{out / 'manifest.json'} not found: {out} holds a pack that has not "
                                                  f"finished (pack_shards.py writes its manifest last, once every "
                                                  f"shard is written and checked): it was stopped, or failed, or is "
                                                  f"running now. Run the same pack_shards.py command again (after "
                                                  f"mending what its error said, if it failed): it reuses the shards "
                                                  f"already written")):
        load_manifest(out)
    pack(data, out, opts=PackOptions(shard_size=4, workers=1), progress=False)
    assert load_manifest(out)["splits"]["train"]["num_samples"] > 0


def jpeg_tables(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return {k: list(v) for k, v in im.quantization.items()}


def test_jpeg_quality_sets_the_re_encoded_images_quality_and_a_rerun_with_another_re_encodes_them(data, tmp_path):
    # Pillow's quantisation tables at quality q, from an image of its own: what a JPEG saved at q carries
    reference = {}
    for q in (30, 95):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG", quality=q)
        reference[q] = jpeg_tables(buf.getvalue())
    assert reference[30] != reference[95]
    out = tmp_path / "s"
    for q in (95, 30):  # the same folder: the second run must not reuse the first run's quality-95 shards
        m = pack(data, out, opts=PackOptions(resize_short=32, jpeg_quality=q, workers=1), progress=False)
        packed = {}
        for split in ("train", "val"):
            for sh in m["splits"][split]["shards"]:
                packed.update(read_tar(out / sh["file"]))
        assert len(packed) == 20 and len(m["converted"]) == 20  # every input is over 32 px: all re-encoded
        assert all(jpeg_tables(c["jpg"]) == reference[q] for c in packed.values()), q
        assert m["options"]["jpeg_quality"] == q


def test_hidden_files_and_folders_that_file_managers_leave_are_not_packed(data, tmp_path):
    image = first_image(data)
    cls = image.parent
    (cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # macOS Finder
    (cls / f"._{image.name}").write_bytes(b"\0\5\26\7AppleDouble")  # a resource fork, copied to FAT
    (data / "train.X2" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "val.X" / ".Trash-1000").mkdir()
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert (m["splits"]["train"]["num_samples"], m["splits"]["val"]["num_samples"]) == (16, 4)
    assert m["skipped"] == [] and m["converted"] == []
    assert m["hidden_not_read"] == {"count": 4, "first": [  # counted and named, not lost without a word
        str(cls / ".DS_Store"), str(cls / f"._{image.name}"), str(data / "train.X2" / ".DS_Store"),
        str(data / "val.X" / ".Trash-1000")]}
    r = subprocess.run([sys.executable, str(ROOT / "pack_shards.py"), "--data-path", str(data), "--out",
                        str(tmp_path / "s"), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (f"not read: 4 file(s) or folder(s) in the split folders whose names start with '.' (macOS's ._NAME, "
            f".DS_Store; e.g. {cls / '.DS_Store'}): rename any that are images (counted in the manifest)") in r.stdout


def test_more_hidden_files_than_the_manifest_names_are_all_counted(data, tmp_path):
    cls = first_image(data).parent
    for i in range(25):
        (cls / f"._IMG_{i:02d}.JPEG").write_bytes(b"\0\5\26\7AppleDouble")
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["hidden_not_read"]["count"] == 25 and len(m["hidden_not_read"]["first"]) == 20  # 20 named, 25 counted


def test_an_out_folder_holding_another_datasets_shards_is_refused_unless_overwrite(data, tmp_path):
    other = small_dataset(tmp_path / "other", num_classes=2, train_per_class=4, val_per_class=2, seed=3)
    out = tmp_path / "s"
    pack(data, out, opts=PackOptions(workers=1), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DataError, match=re.escape(f"--out {out}: holds shards packed from {data.resolve()}, not from "
                                                  f"{other.resolve()}; pass another --out, or --overwrite")):
        pack(other, out, opts=PackOptions(workers=1), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    assert pack(data, out, opts=PackOptions(workers=1), progress=False)["splits"]["train"]["num_samples"] == 16
    m = pack(other, out, opts=PackOptions(workers=1), progress=False, overwrite=True)
    assert m["source"]["data_path"] == str(other.resolve()) and m["splits"]["train"]["num_samples"] == 8
    (out / "manifest.json").write_text("{not json")  # damaged: load_manifest's advice is to pack again, so it goes on
    assert pack(data, out, opts=PackOptions(workers=1), progress=False)["source"]["data_path"] == str(data.resolve())


@pytest.mark.parametrize("text", ['{"name": "my-package"}', "{not json"])
def test_an_out_folder_with_another_tools_manifest_and_no_shards_is_refused_unless_overwrite(data, tmp_path, text):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "manifest.json").write_text(text)  # someone's own file, beside no shard: not a damaged one of ours
    with pytest.raises(DataError, match=re.escape(f"--out {out}: its manifest.json is not a pack_shards.py manifest, "
                                                  f"and there are no shards beside it; pass another --out")):
        pack(data, out, opts=PackOptions(workers=1), progress=False)
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == text
    m = pack(data, out, opts=PackOptions(workers=1), progress=False, overwrite=True)
    assert m["splits"]["train"]["num_samples"] == 16


def test_a_wrong_data_path_or_unsorted_val_images_are_named_with_the_fix(data, tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nothere'}: does not exist; pass --data-path DIR")):
        pack(tmp_path / "nothere", tmp_path / "s", progress=False)
    with pytest.raises(DataError, match=re.escape(f"{data / 'Labels.json'}: is a file, not a folder; pass")):
        pack(data / "Labels.json", tmp_path / "s", progress=False)
    with pytest.raises(DataError, match=re.escape(f"{data / 'train.X1'} itself looks like a split folder: pass its "
                                                  f"parent, --data-path {data}.")):
        pack(data / "train.X1", tmp_path / "s", progress=False)
    (tmp_path / "val.X").mkdir()  # named like a split, its class folders not there (yet): the parent, still
    with pytest.raises(DataError, match=re.escape(f"a split folder: pass its parent, --data-path {tmp_path}.")):
        pack(tmp_path / "val.X", tmp_path / "s", progress=False)
    top = tmp_path / "download"  # one level too high: the folder an archive unpacked the dataset into
    shutil.copytree(data, top / "imagenet100")
    with pytest.raises(DataError, match=re.escape(f"{top}: no train split found (expected a folder train.X* or train/ "
                                                  f"with WNID class folders inside). Both splits are required: train "
                                                  f"to learn from, val to compare runs. {top / 'imagenet100'} holds "
                                                  f"split folders: pass --data-path {top / 'imagenet100'}.")):
        pack(top, tmp_path / "s", progress=False)
    shutil.copytree(data, top / "copy")
    (top / "notes").mkdir()
    (top / "notes" / "train").write_text("")  # a file named like a split: no split folder
    shutil.copytree(data, top / ".snapshot")  # a hidden folder (a filer's snapshots): not offered
    with pytest.raises(DataError, match=re.escape(f"Folders in it hold split folders ({top / 'copy'}, "
                                                  f"{top / 'imagenet100'}): pass one as --data-path.")):
        pack(top, tmp_path / "s", progress=False)
    flat = tmp_path / "imagefolder"  # torchvision's layout: the class folders at the top
    shutil.copytree(data / "train.X1", flat)
    with pytest.raises(DataError, match=re.escape(f"{flat} holds the WNID class folders itself (torchvision's "
                                                  f"ImageFolder layout): move them into {flat / 'train'}/ and")):
        pack(flat, tmp_path / "s", progress=False)
    packed = tmp_path / "packed"  # the shards given for the images (train.py's --data-path, typed to the packer)
    pack(data, packed, opts=PackOptions(workers=1), progress=False)
    with pytest.raises(DataError, match=re.escape(f"{packed}: no train split found") + ".*" + re.escape(
            f"{packed} holds shards, pack_shards.py's output: pass the image folders they were packed from, "
            f"--data-path {data.resolve()}, or train on these: train.py --data-path {packed}.")):
        pack(packed, tmp_path / "s", progress=False)
    (packed / "manifest.json").unlink()  # a pack stopped before its manifest: shards, no source named
    with pytest.raises(DataError, match=re.escape(f"{packed} holds shards, pack_shards.py's output: pass the image "
                                                  f"folders they were packed from.")):
        pack(packed, tmp_path / "s", progress=False)
    shutil.rmtree(top / "imagenet100")
    (top / "manifest.json").write_text("{}")  # a download's own manifest: no shards beside it, so the usual hint
    with pytest.raises(DataError, match=re.escape(f"{top / 'copy'} holds split folders: pass --data-path "
                                                  f"{top / 'copy'}.")):
        pack(top, tmp_path / "s", progress=False)
    for f in list((data / "val.X").glob("*/*.JPEG")):  # ILSVRC's val as downloaded: every image in one folder
        shutil.move(f, data / "val.X" / f.name)
    for d in (data / "val.X").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(DataError, match=re.escape(f"{data / 'val.X'}: 4 file(s) directly in the split folder (e.g. ")
                       + r".*LOC_val_solution\.csv"):
        pack(data, tmp_path / "s", progress=False)


@pytest.mark.parametrize("repack", [False, True])
def test_a_class_index_counts_labels_classes_without_folders_too(data, tmp_path, repack):
    if repack:  # the same images packed before with the old Labels.json: no shard of it may be reused
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    labels = json.loads((data / "Labels.json").read_text())
    labels = {"n00000000": "first, no folder", **labels}  # sorts first: every packed class moves up by one
    (data / "Labels.json").write_text(json.dumps(labels))
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, allow_missing_classes=True), progress=False)
    assert m["splits"]["train"]["class_counts"]["n00000000"] == 0
    wnids = sorted(labels)
    packed = {}
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            packed.update(read_tar(tmp_path / "s" / sh["file"]))
    assert len(packed) == 20 and m["classes"] == wnids
    for key, sample in packed.items():
        index = wnids.index(input_files(data)[key][2].parent.name)  # the folder's WNID in the sorted Labels.json
        assert index >= 1 and int(sample["cls"]) == index and struct.unpack("<i", sample["lbl"])[0] == index


def test_a_file_that_cannot_be_read_is_listed_with_its_error_not_taken_for_an_empty_one(data, tmp_path, monkeypatch):
    from pathlib import Path as P

    files = sorted(data.glob("train.X*/*/*.JPEG"))
    files[0].write_bytes(b"")  # an empty file, then unreadable ones (the first of its shard among them, below)
    failing = {str(f) for f in files[1:3]}
    read = P.read_bytes

    def read_bytes(self):
        if str(self) in failing:
            raise OSError(5, "Input/output error", str(self))
        return read(self)

    monkeypatch.setattr(P, "read_bytes", read_bytes)
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1, shard_size=1, skip_bad=True), progress=False)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons[str(files[0])] == "an empty file (0 bytes)"
    assert all(reasons[f] == f"OSError: [Errno 5] Input/output error: '{f}'" for f in failing)


def test_every_pack_shards_flag_reaches_the_packer(tmp_path, monkeypatch, capsys):
    import pack_shards  # (the repository root is on sys.path: conftest)

    asked = []  # (every value below differs from its default: a flag dropped on the way shows)

    def fake_pack(*args, **kwargs):  # what pack() is given, then the error path (no manifest to print)
        asked.append((args, kwargs))
        raise DataError("stop here")

    monkeypatch.setattr(pack_shards, "pack", fake_pack)
    assert pack_shards.main(["--data-path", "D", "--out", "O", "--labels", "L.json", "--seed", "3", "--shard-size",
                             "5", "--resize-short", "32", "--jpeg-quality", "80", "--skip-bad",
                             "--allow-missing-classes", "--subset", "--allow-train-val-copies", "--overwrite",
                             "--workers", "11"]) == 1
    assert asked == [(("D", "O", "L.json", PackOptions(seed=3, shard_size=5, resize_short=32, jpeg_quality=80,
                                                         skip_bad=True, workers=11, allow_missing_classes=True,
                                                         subset=True, allow_train_val_copies=True)),
                      {"overwrite": True})]
    assert capsys.readouterr().err == "error: stop here\n"


def test_a_file_stem_with_a_dot_is_an_error_naming_it(data, tmp_path):
    f = first_image(data)
    dotted = f.with_name(f"{f.stem}.v2.JPEG")  # WebDataset would read "v2.JPEG" as the member's extension
    f.rename(dotted)
    with pytest.raises(DataError, match=re.escape(f"{dotted}: the file stem '{dotted.stem}' contains '.'")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert not (tmp_path / "s").exists()  # refused before any write


def test_a_split_without_image_files_is_an_error_naming_its_folders(data, tmp_path):
    for f in (data / "val.X").glob("*/*.JPEG"):
        f.unlink()  # the class folders stay, empty
    with pytest.raises(DataError, match=re.escape(f"{data / 'val.X'}: the val split holds no image files.")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1, allow_missing_classes=True), progress=False)


def test_a_split_whose_every_image_was_skipped_is_an_error_not_an_empty_split(data, tmp_path):
    for f in (data / "val.X").glob("*/*.JPEG"):
        f.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=re.escape(f"{data / 'val.X'}: every image of the val split was unreadable "
                                                  f"and skipped; nothing to pack.")):
        pack(data, tmp_path / "s", opts=PackOptions(workers=1, skip_bad=True, allow_missing_classes=True),
             progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_the_packers_summary_says_each_count_and_each_kind_of_file_it_did_not_pack_as_it_was():
    from vitdeit.packing import summary_lines

    split = lambda n, files, shards, dirs: {  # noqa: E731
        "num_samples": n, "input_files": files, "shards": [{}] * shards, "source_dirs": dirs,
        "class_counts": {"n01": n, "n02": 0}}
    m = {"classes": ["n01", "n02"], "splits": {"train": split(7, 9, 2, ["train.X1", "train.X2"]),
                                               "val": split(1, 1, 1, ["val.X"])},
         "skipped": [{"path": "a"}, {"path": "b"}], "hidden_not_read": {"count": 1, "first": ["/d/._x.JPEG"]},
         "source": {"labels": "/d/L.json"}, "not_in_labels": [{"path": "/d/val.X/n03", "files": 1200},
                                                             {"path": "/d/val.X/n04", "files": 3}],
         "converted": [{"path": "c"}], "warnings": [{"path": "/d/w.JPEG", "warning": "EXIF data corrupt"}],
         "same_bytes": [{"paths": ["/d/p.JPEG", "/d/q.JPEG"], "classes": ["n01", "n02"]},
                        {"paths": ["/d/r.JPEG", "/d/s.JPEG"], "classes": ["n01"]}]}
    assert summary_lines(m, "/out") == [
        "train: 7 images of 9 from train.X1/, train.X2/ in 2 shards",
        "warning: 1 of the 2 classes in Labels.json has no train images: n02",
        "val: 1 images of 1 from val.X/ in 1 shard",
        "warning: 1 of the 2 classes in Labels.json has no val images: n02",
        "skipped 2 file(s) that are not readable images (listed in /out/manifest.json)",
        "not read (--subset): 2 class folder(s) of WNIDs not in /d/L.json, 1,203 file(s) (e.g. /d/val.X/n03): listed "
        "in the manifest's \"not_in_labels\"",
        "not read: 1 file(s) or folder(s) in the split folders whose names start with '.' (macOS's ._NAME, "
        ".DS_Store; e.g. /d/._x.JPEG): rename any that are images (counted in the manifest)",
        "re-encoded 1 images (CMYK/grayscale/PNG/EXIF-rotated/resized; listed in the manifest)",
        "warning: Pillow warned of 1 image(s) as it decoded them; packed as they are, listed in the manifest's "
        "\"warnings\" (e.g. /d/w.JPEG: EXIF data corrupt)",
        "warning: 2 set(s) of byte-identical images within a split, packed as they are: 1 under more than one class "
        "(one image, two labels), 1 within one class (one image weighed twice); listed in the manifest's "
        "\"same_bytes\" (e.g. /d/p.JPEG, /d/q.JPEG): remove the extra copies, or keep them if meant"]
    clean = {**m, "splits": {"val": {**split(1, 1, 1, ["val.X"]), "class_counts": {"n01": 1, "n02": 1}}},
             "skipped": [], "hidden_not_read": {"count": 0, "first": []}, "converted": [], "warnings": [],
             "same_bytes": [], "not_in_labels": []}
    assert summary_lines(clean, "/out") == ["val: 1 images of 1 from val.X/ in 1 shard"]


def test_an_index_whose_header_miscounts_its_lines_is_refused(tmp_path):
    from vitdeit.data import shard_paths
    from vitdeit.data.index import index_matches

    pack(small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=2), tmp_path / "s",
         opts=PackOptions(workers=1), progress=False)
    idx = tmp_path / "s" / "val-000000.idx"
    lines = idx.read_text().splitlines(keepends=True)
    assert lines[0] == "v1.2 4\n" and len(lines) == 5  # 2 classes x 2 val images
    idx.write_text("v1.2 3\n" + "".join(lines[1:]))  # (hand-edited, or another tool's)
    assert not index_matches(idx, idx.with_suffix(".tar"))
    with pytest.raises(DataError, match="not a whole wds2idx"):
        shard_paths(tmp_path / "s", load_manifest(tmp_path / "s"), "val")
