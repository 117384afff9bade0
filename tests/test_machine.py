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
    named = []  # the device whose name was asked for (a device object needs no GPU; its name would)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: named.append(device) or "Some GPU")
    m = describe(torch.device("cuda", 1), 4)
    assert named == [torch.device("cuda", 1)]
    assert m["cuda_device_max_connections"] == "32" and describe()["cuda_device_max_connections"] is None  # a CPU's
    assert m["cpu_count"] == len(os.sched_getaffinity(0)) and m["gpu"] == "Some GPU" and m["processes"] == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # a job given one core of many
    assert describe()["cpu_count"] == 1
    assert (m["python"], m["torch"], m["torchvision"], m["timm"], m["PIL"]) == (
        platform.python_version(), torch.__version__, torchvision.__version__, timm.__version__, PIL.__version__)
    assert m["nvidia.dali"] is None  # not run: not named, installed or not
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert m["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)  # (a copy without .git: None)
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


def test_the_commit_is_the_checkouts_own_and_dirty_when_a_tracked_file_differs(monkeypatch, tmp_path):
    from vitdeit import machine

    def git(*args, cwd=tmp_path / "repo"):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                       capture_output=True)

    (tmp_path / "repo" / "code").mkdir(parents=True)
    git("init", "-q")
    (tmp_path / "repo" / "code" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path / "repo", capture_output=True, text=True)
    monkeypatch.setattr(machine, "ROOT", tmp_path / "repo")
    assert machine.describe()["git_commit"] == head.stdout.strip()
    assert machine.describe()["git_dirty"] is False
    (tmp_path / "repo" / "untracked.txt").write_text("")  # (not the code that ran)
    assert machine.describe()["git_dirty"] is False
    (tmp_path / "repo" / "code" / "a.py").write_text("x = 2\n")
    assert machine.describe()["git_dirty"] is True
    monkeypatch.setattr(machine, "ROOT", tmp_path / "repo" / "code")  # a copy inside another repository's folder
    assert (machine.describe()["git_commit"], machine.describe()["git_dirty"]) == (None, None)
    monkeypatch.setattr(machine, "ROOT", tmp_path)  # not a checkout at all
    assert (machine.describe()["git_commit"], machine.describe()["git_dirty"]) == (None, None)
    monkeypatch.setattr(machine, "ROOT", tmp_path / "repo")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git on the machine
    assert (machine.describe()["git_commit"], machine.describe()["git_dirty"]) == (None, None)


def test_the_machine_is_named_by_its_gpu_and_their_count_or_its_cpu_and_cores():
    assert machine_text(GPU) == "NVIDIA H100 80GB HBM3 x 8; torch 2.11.0"
    assert machine_text({**GPU, "processes": 1}) == "NVIDIA H100 80GB HBM3; torch 2.11.0"
    assert machine_text(CPU) == "AMD EPYC 7B13, 2 cores; torch 2.14.1"
    assert machine_text({**CPU, "processes": 2}) == "AMD EPYC 7B13, 2 cores, 2 processes; torch 2.14.1"


def test_a_checkout_without_a_commit_yet_or_a_module_without_a_version_records_none(monkeypatch, tmp_path):
    import sys
    import types

    from vitdeit import machine

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # rev-parse prints "HEAD", then fails
    monkeypatch.setattr(machine, "ROOT", tmp_path.resolve())
    assert (machine.describe()["git_commit"], machine.describe()["git_dirty"]) == (None, None)
    monkeypatch.setitem(sys.modules, "no_version_here", types.ModuleType("no_version_here"))
    assert machine.version("no_version_here") is None and machine.version("torch") == torch.__version__


def test_one_core_is_named_in_the_singular():
    assert machine_text({**CPU, "cpu_count": 1}) == "AMD EPYC 7B13, 1 core; torch 2.14.1"
