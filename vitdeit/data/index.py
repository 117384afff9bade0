"""DALI's wds2idx index (v1.2) of a tar shard, the one place that knows its format: a header `v1.2 COUNT`, then a
line per sample, `ext offset size name` for each of its files, offset and size in bytes of the file's data (after
its 512-byte tar header), as DALI's own wds2idx tool writes them. The packer writes one beside each tar; DALI
reads it, and so does the PyTorch loader, for random access into the tar."""

from __future__ import annotations

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


def index_lines(idx_path: Path) -> list[str]:
    """The sample lines of an index, once its header is checked against them."""
    lines = idx_path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if header != ["v1.2", str(len(lines) - 1)]:
        raise DataError(f"{idx_path}: not a whole wds2idx v1.2 index (header {' '.join(header)!r} for "
                        f"{max(len(lines) - 1, 0)} sample lines); re-run pack_shards.py (it rewrites the shards "
                        f"that differ).")
    return lines[1:]


def index_count(idx_path: Path) -> int:
    """The samples a whole index lists; -1 for one cut short or damaged."""
    try:
        return len(index_lines(idx_path))
    except DataError:
        return -1


def read_index(idx_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Per sample, (key, {ext: (data offset, size)})."""
    samples = []
    for line in index_lines(idx_path):
        try:
            f = line.split()
            samples.append((f[3].split(".", 1)[0], {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}))
        except (ValueError, IndexError) as e:
            raise DataError(f"{idx_path}: not a wds2idx v1.2 index (line {line!r}: {e}); re-run pack_shards.py.") from e
    return samples
