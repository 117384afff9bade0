"""DALI's wds2idx index (v1.2) of a tar shard, the one place that knows its format: a header `v1.2 COUNT`, then a
line per sample, `ext offset size name` for each of its files, offset and size in bytes of the file's data (after
its 512-byte tar header), as DALI's own wds2idx tool writes them. The packer writes one beside each tar; DALI
reads it, and so does the PyTorch loader, for random access into the tar."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from ..errors import DataError


def index_text(tar_path: Path) -> tuple[str, int]:
    """(the index of the tar at tar_path, the samples it lists)."""
    samples: dict[str, list[str]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            key, ext = os.path.basename(m.name).split(".", 1)
            samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(c) + "\n" for c in samples.values()), len(samples)


def index_lines(idx_path: Path, data: bytes | None = None) -> list[str]:
    """The sample lines of an index (data: its bytes, where read already), once its header is checked against them."""
    lines = (idx_path.read_bytes() if data is None else data).decode("utf-8", errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if header != ["v1.2", str(len(lines) - 1)]:
        raise DataError(f"{idx_path}: not a whole wds2idx v1.2 index (header {' '.join(header)!r} for "
                        f"{max(len(lines) - 1, 0)} sample lines); re-run pack_shards.py (it rewrites the shards "
                        f"that differ).")
    return lines[1:]


def index_sha1(idx_path: Path, data: bytes | None = None) -> str:
    """The SHA-1 of an index file's bytes (data: those bytes, where read already; "" where they cannot be read):
    the manifest and each shard's record keep the one pack_shards.py wrote."""
    try:
        return hashlib.sha1(idx_path.read_bytes() if data is None else data).hexdigest()
    except OSError:
        return ""


def tar_agrees(tar_path: Path, samples: list) -> bool:
    """Whether the tar's headers before the first and the last sample's files (read_index's samples) name those
    files with those sizes: six 512-byte reads, which tell a tar copied over another of the same size (tarfile pads
    every tar to 10,240 bytes: same sizes are common), where the index alone cannot."""
    try:
        with open(tar_path, "rb") as f:
            for key, files in (samples[0], samples[-1]) if samples else ():
                for ext, (offset, size) in files.items():
                    f.seek(offset - 512)
                    member = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")  # (its checksum too)
                    if os.path.basename(member.name) != f"{key}.{ext}" or member.size != size:
                        return False
    except (OSError, tarfile.TarError):  # (TarError: no tar header there)
        return False
    return True


def index_matches(idx_path: Path, tar_path: Path) -> bool:
    """Whether the index at idx_path is the one index_text writes for the tar at tar_path (both readable). Reads
    the tar's headers only, one 512-byte block per file."""
    try:
        return idx_path.read_text(encoding="utf-8") == index_text(tar_path)[0]
    except (OSError, UnicodeDecodeError, ValueError, tarfile.TarError):  # (ValueError: a member named without .ext)
        return False


def read_index(idx_path: Path, tar_bytes: int | None = None,
               data: bytes | None = None) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Per sample, (key, {ext: (data offset, size)}), with a jpg and a 4-byte (int32) lbl, each file starting on a
    512-byte tar block after the first header and ending inside the tar (tar_bytes: its size; the .tar beside the
    index where not given). The loaders read at these offsets, DALI unchecked (a negative size crashes it). Not
    checked: that a header of that file precedes each (tar_agrees reads those of the first and last samples; only
    index_matches reads them all)."""
    if tar_bytes is None:
        tar_bytes = idx_path.with_suffix(".tar").stat().st_size
    samples = []
    for n, line in enumerate(index_lines(idx_path, data), 2):  # (line 1: the header)
        try:
            f = line.split()
            samples.append((f[3].split(".", 1)[0], {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}))
        except (ValueError, IndexError) as e:
            raise DataError(f"{idx_path}: not a wds2idx v1.2 index (line {line!r}: {e}); re-run pack_shards.py.") from e
        entry = samples[-1][1]
        problem = ("no jpg" if "jpg" not in entry else "no lbl" if "lbl" not in entry else
                   f"its lbl is {entry['lbl'][1]} bytes, not 4" if entry["lbl"][1] != 4 else
                   next((f"its {ext} ({size} bytes at byte {off}) does not lie on 512-byte blocks inside the "
                         f"{tar_bytes}-byte tar"
                         for ext, (off, size) in entry.items()
                         if off < 512 or off % 512 or size < 0 or off + size > tar_bytes), None))
        if problem:
            raise DataError(f"{idx_path} line {n}: {problem}; the index is damaged or not its tar's. Re-run "
                            f"pack_shards.py (it writes again each shard whose index is not the one it wrote).")
    return samples
