"""metrics.jsonl: one JSON object per epoch, appended by rank 0, cut back to the resumed epoch on --resume, read
by viz.py's report and, on --resume, by the run's notes (epochs missing from it)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError, MissingFile, write_failed


class MetricsLog:
    """Appends one JSON line per epoch to RUN_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_epoch: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            # keep only epochs up to the one resumed from: a resumed run rewrites what followed
            # (read_metrics: a damaged line after the resumed epoch's is left out, one before it a DataError)
            keep = [] if resume_epoch is None else [r for r in read_metrics(run_dir, resumed_after=resume_epoch)
                                                    if r["epoch"] <= resume_epoch]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))  # as write() writes them

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: the epoch's last.pth is not written either, so --resume redoes it
                raise write_failed(self.path, e, "its earlier lines are kept") from e


def read_metrics(run_dir: str | Path, resumed_after: int | None = None, dropped: list[str] | None = None) -> list[dict]:
    """The run's records in order. resumed_after: the epoch a --resume continues from; a damaged line after that
    epoch's line (a partial write of the next epoch, whose last.pth was then not written) is left out, as the
    resumed run redoes that epoch; anywhere else it is a DataError naming the line. dropped: where a damaged last
    line is said and left out instead (viz.py's report: a run writing it now, or one stopped mid-write)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFile(f"{path}: no metrics; is {run_dir} a train.py run folder?")
    records, lines = [], path.read_text().splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # e.g. a partial last line: the disk filled up mid-write
                if resumed_after is not None and any(r.get("epoch") == resumed_after for r in records):
                    continue
                if dropped is not None and n == last:
                    dropped.append(f"{path} line {n} is cut short (a run writing it now, or stopped mid-write): "
                                   f"left out")
                    continue
                raise DataError(f"{path} line {n}: not a JSON object ({e}); if it is the last line (a partial "
                                f"write), train.py --resume RUN_DIR/last.pth drops it and redoes that epoch; else "
                                f"delete it.") from e
    return records
