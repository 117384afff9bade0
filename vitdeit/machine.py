"""The machine a figure was measured on: its CPU and GPU, the software's versions and the code's commit. Recorded
with every run (metrics.jsonl: the first epoch of each start and resume, rank 0's node's) and every benchmark
result, and named beside the images/s they print. A label, never a reason to stop: whatever cannot be read is None."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from pathlib import Path

import torch

from .config import usable_cores

ROOT = Path(__file__).resolve().parents[1]  # the checkout the code runs from (its git commit, where it is one)
VERSIONS = ("torch", "torchvision", "timm", "PIL", "nvidia.dali")


def cpu_model() -> str:
    try:  # (Linux: platform.processor() gives only the architecture there)
        with open("/proc/cpuinfo", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration, IndexError):
        return platform.processor() or platform.machine()


def git(*args: str) -> str | None:
    """git's output in ROOT, None where it failed (no git, not a checkout, a repository git refuses, too slow).
    --no-optional-locks: `status` would take the index's lock, which a user's own git command may need meanwhile."""
    try:
        r = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                           errors="replace", timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def version(name: str) -> str | None:
    try:
        v = getattr(importlib.import_module(name), "__version__", None)
    except Exception:  # not installed, or failing to import: a label, not a reason to stop the run
        return None
    return str(v) if v else None  # (str: torch's is a str subclass, which a weights-only torch.load refuses)


def describe(device: torch.device | str = "cpu", processes: int = 1, dali: bool = False) -> dict:
    """device: the one the figures ran on (a GPU is named); processes: how many ran together (DDP's world); dali:
    whether DALI ran (its version is recorded then, None otherwise). cpu_count is the cores this process may use (a
    scheduler's or container's share), not the host's."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {"cpu": cpu_model(), "cpu_count": usable_cores(), "gpu": gpu, "processes": processes,
            "python": platform.python_version()}
    info.update({name: version(name) if dali or name != "nvidia.dali" else None for name in VERSIONS})
    info["cuda_device_max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") if gpu else None
    # the commit of this checkout itself, not of a repository some folder above a copy of it belongs to
    top, commit = ((git("rev-parse", "--show-toplevel", "HEAD") or "").split("\n") + ["", ""])[:2]
    info["git_commit"] = commit if commit and Path(top).resolve() == ROOT else None
    status = git("status", "--porcelain", "--untracked-files=no") if info["git_commit"] else None
    # True: the code that ran is not that commit (edits, or a copy of a newer tree under older git metadata)
    info["git_dirty"] = bool(status) if status is not None else None
    return info


def hardware(m: dict) -> str:
    """What the figures ran on: the GPU's name, else the CPU's and its cores."""
    return m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} core{'s' * (m['cpu_count'] != 1)}"


def machine_text(m: dict) -> str:
    """For a table: 'NVIDIA H100 80GB HBM3 x 8; torch 2.11.0' or 'AMD EPYC 7B13, 2 cores; torch 2.14.1'."""
    n = m.get("processes", 1)
    return f"{hardware(m)}{(f' x {n}' if m.get('gpu') else f', {n} processes') if n > 1 else ''}; torch {m['torch']}"

