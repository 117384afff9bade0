"""The machine record (vitdeit.machine) that runs and benchmarks save beside their figures."""

import io
import os
import platform
import subprocess

import torch

from conftest import ROOT
from vitdeit.machine import describe, machine_text

GPU = {"cpu": "Intel Xeon", "cpu_count": 16, "gpu": "NVIDIA H100 80GB HBM3", "processes": 8, "torch": "2.11.0"}
CPU = {"cpu": "AMD EPYC 7B13", "cpu_count": 2, "gpu": None, "processes": 1, "torch": "2.14.1"}


def test_the_record_is_this_process_s_cores_versions_and_commit_in_plain_values(monkeypatch):
    import PIL
    import timm
    import torchvision

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")  # (the entry points set it: vitdeit.use_cuda_connections)
    m = describe("Some GPU", 4)
    assert m["cuda_device_max_connections"] == "32" and describe()["cuda_device_max_connections"] is None  # a CPU's
    assert m["cpu_count"] == len(os.sched_getaffinity(0)) and m["gpu"] == "Some GPU" and m["processes"] == 4
    assert (m["python"], m["torch"], m["torchvision"], m["timm"], m["PIL"]) == (
        platform.python_version(), torch.__version__, torchvision.__version__, timm.__version__, PIL.__version__)
    assert m["nvidia.dali"] is None  # not run: not named, installed or not
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    assert m["git_commit"] == git("rev-parse", "HEAD") and len(m["git_commit"]) == 40
    assert m["git_dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))
    buf = io.BytesIO()  # saved in checkpoints' metrics: a weights-only load must take it (torch's version is a str
    torch.save({"machine": m}, buf)  # subclass, which it refuses)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["machine"] == m
    with open("/proc/cpuinfo") as f:  # (Linux's: the README's machines)
        assert f"model name\t: {m['cpu']}\n" in f.read()
    try:
        import nvidia.dali
    except ImportError:
        return
    assert describe(dali=True)["nvidia.dali"] == nvidia.dali.__version__


def test_a_copy_outside_git_records_no_commit(monkeypatch, tmp_path):
    from vitdeit import machine

    monkeypatch.setattr(machine, "ROOT", tmp_path)  # (not a checkout)
    m = machine.describe()
    assert m["git_commit"] is None and m["git_dirty"] is None and m["gpu"] is None and m["processes"] == 1


def test_the_machine_is_named_by_its_gpu_and_their_count_or_its_cpu_and_cores():
    assert machine_text(GPU) == "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"
    assert machine_text({**GPU, "processes": 1}) == "NVIDIA H100 80GB HBM3; torch 2.11.0"
    assert machine_text(CPU) == "AMD EPYC 7B13, 2 cores; torch 2.14.1"
    assert machine_text({**CPU, "processes": 2}) == "AMD EPYC 7B13, 2 cores, 2 processes; torch 2.14.1"
