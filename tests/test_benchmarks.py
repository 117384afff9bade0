"""benchmarks/throughput.py end to end at tiny sizes: every part runs and the JSON keeps its documented schema."""

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, small_dataset
from vitdeit.data import dali_available
from vitdeit.errors import DataError, SettingError
from vitdeit.machine import describe


def documented_fields() -> dict[str, set[str]]:
    """The JSON's fields as benchmarks/README.md's JSON block lists them: each part's first {...} (a row's fields,
    or the machine's, the images' and the seconds'); `command`'s braces are the settings', which hold every flag."""
    text = (ROOT / "benchmarks/README.md").read_text().split("## JSON", 1)[1].split("```")[1]
    entries = re.split(r"^(\w+) ", text, flags=re.M)[1:]  # [name, its text up to the next entry, ...]
    return {name: set(re.findall(r"[\w.]+", re.search(r"\{(.*?)\}", body, re.S).group(1)))
            for name, body in zip(entries[::2], entries[1::2]) if name != "command" and "{" in body}


DOCUMENTED = documented_fields()


def test_the_benchmarks_image_set_is_imagenet_sized_jpegs(tmp_path):
    # what decode costs depend on: ~500 x 375 px (a quarter portrait), JPEG quality 90, tens of KB each
    from benchmarks import imageset

    out = imageset.make_imageset(tmp_path / "set", ROOT / "Labels.json", n_train=8, n_val=2, num_classes=2, workers=1)
    files = sorted(out.glob("*/*/*.JPEG"))
    assert len(files) == 10
    sizes = []
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size in ((500, 375), (375, 500))
            # quality 90: libjpeg scales the standard luminance table's first entry, 16, by (200 - 2 x 90) / 100
            assert im.quantization[0][0] == (16 * (200 - 2 * 90) + 50) // 100 == 3
            sizes.append(f.stat().st_size)
    assert all(15_000 < n < 200_000 for n in sizes)  # tens of KB to 150 KB, as ImageNet's


def test_the_readme_documents_every_part_with_its_fields():  # the parser above read the block as it is written
    assert set(DOCUMENTED) == {"machine", "images", "seconds", "packing", "loaders", "transforms", "model_step",
                               "end_to_end", "profile"}
    assert DOCUMENTED["images"] == {"path", "count", "mean_kb"}
    assert "cuda_device_max_connections" in DOCUMENTED["machine"]
    assert DOCUMENTED["profile"] >= {"unit", "other_kernels_per_step"} and "calls" not in DOCUMENTED["profile"]


def run_throughput(tmp_path, *flags) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/throughput.py at tiny sizes (24 images, 32 px, batch 4, one step and repeat, 1 worker) + flags:
    its run, and the JSON it wrote."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/throughput.py"), "--num-images", "24", "--img-size", "32",
           "--batch-size", "4", "--steps", "1", "--warmup-steps", "1", "--repeats", "1", "--workers", "1",
           *flags, "--work-dir", str(tmp_path / "w"), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


@pytest.mark.parametrize("e2e_unit,loader_workers,profile", [("steps", [1, 2], False), ("epoch", [1], True)])
def test_throughput_runs_every_part_and_writes_the_documented_json(tmp_path, e2e_unit, loader_workers, profile):
    start = time.perf_counter()
    run, r = run_throughput(tmp_path, "--e2e-unit", e2e_unit, "--loader-workers", ",".join(map(str, loader_workers)),
                            *(["--profile", str(tmp_path / "prof"), "--profile-steps", "2"] if profile else []))
    wall = time.perf_counter() - start
    assert set(r) == {"machine", "command", "date", "settings", "images", "seconds", "packing", "loaders", "transforms",
                      "model_step", "end_to_end"} | ({"dali_error"} if dali_available() else set()) | (
        {"profile"} if profile else set())
    # the parts that ran: with --profile, every part the README lists
    assert (set(r["seconds"]) == DOCUMENTED["seconds"]) if profile else (set(r["seconds"]) < DOCUMENTED["seconds"])
    for part in DOCUMENTED.keys() - {"seconds"}:  # every row of every part with the fields documented, no other
        part_rows = [r[part]] if isinstance(r.get(part), dict) else r.get(part, [])
        assert all(set(row) == DOCUMENTED[part] for row in part_rows)
    assert r["images"]["count"] == 24
    train = [f for d in Path(r["images"]["path"]).glob("train.X*") for f in d.rglob("*") if f.is_file()]
    kib = sum(f.stat().st_size for f in train) / 1024
    assert len(train) == 24 and r["images"]["mean_kb"] == pytest.approx(kib / 24)
    assert r["machine"] == describe("cpu", 1, dali=dali_available())  # this machine (tests/test_machine.py checks it)
    assert r["settings"]["compile_mode"] == "default"  # the mode that ran: --compile-mode auto is that on a CPU
    assert ("dali_error" in r) == dali_available() and r.get("dali_error") is None  # DALI's one-batch check passed
    n_val = 16  # max(16, 24 // 8)
    assert [(p["workers"], p["images"]) for p in r["packing"]] == [(1, 24 + n_val)]
    backends = ["torch", "dali_cpu"] if dali_available() else ["torch"]
    names = ["imagefolder"] + [f"shards_{b}" for b in backends] + [f"shards_{b}_resized" for b in backends]
    rows = sorted((x["name"], x["workers"]) for x in r["loaders"])
    assert rows == sorted((n, w) for n in names for w in loader_workers)
    for row in r["loaders"]:
        assert row["images_per_s"] > 0 and row["images_per_s_per_worker"] == row["images_per_s"] / row["workers"]
    assert len(r["model_step"]) == 3 * 2  # 3 models x (NCHW, channels-last), fp32 eager on a CPU by default
    assert len(r["end_to_end"]) == len(backends) * 2
    ceiling = r["end_to_end"][0]["ceiling_images_per_s"]  # timed in turns with the loaders: one for all of them
    alone = {x["name"]: x["images_per_s"] for x in r["loaders"] if x["workers"] == 1}  # the end-to-end runs' count
    for row in r["end_to_end"]:
        assert row["images_per_s"] > 0 and row["ceiling_images_per_s"] == ceiling > 0
        assert row["fraction_of_ceiling"] == pytest.approx(row["images_per_s"] / ceiling)
        assert 0 <= row["host_wait_frac"] < 1  # a share of the timed run, which also holds the (slow CPU) steps
        seconds_per_image = 1 / alone[row["loader"]] + 1 / ceiling  # loading, then the step, never at once
        assert row["fraction_if_serial"] == pytest.approx((1 / seconds_per_image) / ceiling)
        assert row["fraction_if_overlapped"] == pytest.approx(min(1.0, alone[row["loader"]] / ceiling))
    assert len(r["transforms"]) == 8 and all(t["ms_per_image"] > 0 for t in r["transforms"])
    lines = run.stdout.rstrip().splitlines()
    notes = [line for line in lines if line.startswith("note:")]  # after the table: a ceiling read low (a busy host)
    assert bool(notes) == any(row["fraction_of_ceiling"] > 1.10 for row in r["end_to_end"])
    last = [line for line in lines if not line.startswith("note:")][-1]  # the table comes last
    if profile:  # one more steps window per unit, even where whole epochs were timed, each in its own trace
        from benchmarks import traces

        assert [p["unit"] for p in r["profile"]] == ["ceiling"] + [row["loader"] for row in r["end_to_end"]]
        for p in r["profile"]:
            events = traces.load(p["trace"])
            window = [e for e in events if e.get("name") == traces.window_name(2)]  # --profile-steps, not --steps
            assert len(window) == 1 and p["steps"] == 2
            assert p["wall_ms_per_step"] == pytest.approx(window[0]["dur"] / 2000)
            t0, t1 = window[0]["ts"], window[0]["ts"] + window[0]["dur"]
            # the steps ran inside the window (the same convolutions each step: DeiT's patch embedding, the teacher's),
            # the warm-up outside it: --warmup-steps 1 (DALI's 2 batches decoded ahead are taken unused, no step)
            inside = [e for e in events if e.get("name") == "aten::conv2d" and t0 <= e["ts"] <= t1]
            outside = [e for e in events if e.get("name") == "aten::conv2d" and not t0 <= e["ts"] <= t1]
            assert len(inside) / 2 == len(outside) > 0
            assert p["gpu_busy_frac"] is None and p["gpu_events"] == 0  # a CPU run: no GPU rows
        assert sorted(f.name for f in (tmp_path / "prof").iterdir()) == sorted(p["unit"] + ".json.gz"
                                                                                 for p in r["profile"])
        assert all(Path(p["trace"]).parent == tmp_path / "prof" for p in r["profile"])
        assert last.startswith(r["profile"][-1]["unit"] + " ") and last.split()[2:] == ["-"] * 10
    else:
        assert "profile" not in r and last.startswith("end to end")
    # where the time went: each part once, within the whole, which is within the process's life as timed here
    seconds = r["seconds"]  # the profiled windows apart from the timed e2e part
    assert list(seconds) == ["data", "packing", "transforms", "loaders", "model", "e2e"] + ["profile"] * profile + [
        "total"]
    assert all(v >= 0 for v in seconds.values()) and seconds["loaders"] > 0 and seconds["e2e"] > 0
    parts = sum(v for k, v in seconds.items() if k != "total")
    assert parts <= seconds["total"] + 0.05 * (len(seconds) - 1) and seconds["total"] < wall  # (each part rounded)
    assert "seconds: data " in run.stdout


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_a_dali_failure_is_reported_not_raised(tiny_shards):
    import argparse

    import torch

    from benchmarks.throughput import dali_error

    ok = argparse.Namespace(img_size=32, batch_size=8, interpolation="bilinear", dali_hw_decoder_load=[0.65],
                            rand_augment="")
    assert dali_error(ok, tiny_shards, torch.device("cpu")) is None
    # more than the 96 train samples: a DataError
    too_big = argparse.Namespace(img_size=32, batch_size=1000, interpolation="bilinear", dali_hw_decoder_load=[0.65],
                                 rand_augment="")
    assert dali_error(too_big, tiny_shards, torch.device("cpu")).startswith("BatchTooLarge: train: 96 samples per rank")


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_the_benchmarks_dali_loader_decodes_as_far_ahead_as_asked(tiny_shards):
    """--dali-prefetch 2,4 compares two depths only if each loader is built with its own."""
    import argparse

    import torch

    from benchmarks.throughput import shard_loader

    a = argparse.Namespace(img_size=32, batch_size=8, interpolation="bilinear", rand_augment="")
    for depth in (1, 4):
        loader = shard_loader(a, tiny_shards, "dali", 1, torch.device("cpu"), prefetch=depth)
        assert loader.decoded_ahead == loader.pipe.prefetch_queue_depth == depth


def test_rand_augment_reaches_every_loader_of_the_comparison(tiny_shards):
    import argparse

    import torch
    from timm.data.auto_augment import RandAugment, rand_augment_transform

    from benchmarks.throughput import classic_transform, shard_loader

    spec = "rand-m9-mstd0.5-inc1"
    a = argparse.Namespace(img_size=32, batch_size=8, interpolation="bilinear", rand_augment=spec)
    assert any(isinstance(t, RandAugment) for t in classic_transform(32, "bilinear", spec).transforms)
    assert not any(isinstance(t, RandAugment) for t in classic_transform(32, "bilinear").transforms)
    torch_loader = shard_loader(a, tiny_shards, "torch", 0, torch.device("cpu"))
    ra = torch_loader.dataset.transform.aa
    policy = lambda t: (t.num_layers, [(o.name, o.prob, o.magnitude, o.magnitude_std) for o in t.ops])  # noqa: E731
    assert policy(ra) == policy(rand_augment_transform(spec, {})) == (2, policy(ra)[1])  # timm's, of this spec
    assert {m for _, _, m, _ in policy(ra)[1]} == {9} and len(ra.ops) == 15  # m9, and the 15 ops of timm's "inc" set
    pytest.importorskip("nvidia.dali")
    assert shard_loader(a, tiny_shards, "dali", 1, torch.device("cpu")).settings["rand_augment"] == spec


def test_a_hardware_decoder_executor_or_prefetch_sweep_gives_one_named_dali_loader_per_value_on_cuda(monkeypatch):
    import argparse

    import torch

    from benchmarks import throughput

    built = []
    monkeypatch.setattr(throughput, "dali_available", lambda: True)
    monkeypatch.setattr(throughput, "shard_loader", lambda a, sdir, backend, workers, device, hw=0.65, ex="dynamic",
                        pf=2: built.append((sdir, backend, hw, ex) + ((pf,) if pf != 2 else ())) or len(built))
    dynamic, two = [throughput.Config.dali_executor], [throughput.Config.dali_prefetch]
    a = argparse.Namespace(dali=True, dali_hw_decoder_load=throughput.fractions("0,1"), dali_executor=dynamic,
                           dali_prefetch=two)
    dirs = {"original": "o", "resize_short=256": "r"}
    names = [name for name, _, _ in throughput.shard_loaders(a, dirs, 4, torch.device("cuda"))]
    assert names == ["shards_torch", "shards_dali@hw0", "shards_dali@hw1",
                     "shards_torch_resized", "shards_dali_resized@hw0", "shards_dali_resized@hw1"]
    assert built == [("o", "torch", 0.65, "dynamic"), ("o", "dali", 0.0, "dynamic"), ("o", "dali", 1.0, "dynamic"),
                     ("r", "torch", 0.65, "dynamic"), ("r", "dali", 0.0, "dynamic"), ("r", "dali", 1.0, "dynamic")]
    built.clear()  # the executors: in the order given, a repeated one once
    ex = argparse.Namespace(dali=True, dali_hw_decoder_load=[1.0], dali_prefetch=two,
                            dali_executor=throughput.executors("legacy,dynamic,legacy"))
    assert [n for n, _, _ in throughput.shard_loaders(ex, {"original": "o"}, 4, torch.device("cuda"))] == [
        "shards_torch", "shards_dali@legacy", "shards_dali@dynamic"]
    assert built == [("o", "torch", 0.65, "dynamic"), ("o", "dali", 1.0, "legacy"), ("o", "dali", 1.0, "dynamic")]
    built.clear()  # the prefetch depths likewise
    pf = argparse.Namespace(dali=True, dali_hw_decoder_load=[1.0], dali_executor=dynamic,
                            dali_prefetch=throughput.depths("4,2,4"))
    assert [n for n, _, _ in throughput.shard_loaders(pf, {"original": "o"}, 4, torch.device("cuda"))] == [
        "shards_torch", "shards_dali@pf4", "shards_dali@pf2"]
    assert built == [("o", "torch", 0.65, "dynamic"), ("o", "dali", 1.0, "dynamic", 4), ("o", "dali", 1.0, "dynamic")]
    one = argparse.Namespace(dali=True, dali_hw_decoder_load=[throughput.Config.dali_hw_decoder_load],
                             dali_executor=dynamic, dali_prefetch=two)  # one value of each: the plain names
    assert [n for n, _, _ in throughput.shard_loaders(one, dirs, 4, torch.device("cuda"))] == [
        "shards_torch", "shards_dali", "shards_torch_resized", "shards_dali_resized"]
    assert throughput.fractions("0.65,0.65,1") == [0.65, 1.0]  # a repeated value would name two loaders alike
    for bad in ("1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated numbers in"):
            throughput.fractions(bad)
    for bad in ("exec2", "dynamic,", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated names from dynamic, legacy"):
            throughput.executors(bad)
    for bad in ("0", "2,x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated whole numbers >= 1"):
            throughput.depths(bad)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_train.sh", "gpu_session.sh"])
def test_the_gpu_scripts_print_their_header_for_help_and_name_an_interpreter_without_torch(tmp_path, script):
    import os

    lines = (ROOT / "benchmarks" / script).read_text().splitlines()[1:]  # after the #! line, up to the code
    header = [line[2:] if line.startswith("# ") else line[1:] for line in itertools.takewhile(
        lambda line: line.startswith("#"), lines)]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    for flag in ("--help", "-h"):
        run = subprocess.run(["bash", str(ROOT / "benchmarks" / script), flag], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert (run.returncode, run.stdout.splitlines(), run.stderr) == (0, header, "")
    assert len(header) > 8 and not (tmp_path / "out").exists()  # nothing run, nothing written
    if script != "gpu_session.sh":  # (which runs the other two, each saying so)
        run = subprocess.run(["bash", str(ROOT / "benchmarks" / script), "--dry-run"], capture_output=True,
                             text=True, env={**env, "PYTHON": "false"}, cwd=tmp_path)
        assert run.returncode == 1 and run.stdout.splitlines()[-1] == (
            "false has no torch: set PYTHON to the interpreter that has it, e.g. PYTHON=.venv/bin/python")


def test_dali_parts_and_pick_setting_print_their_use_for_help_and_start_nothing(tmp_path):
    import os

    lines = (ROOT / "benchmarks/dali_parts.sh").read_text().splitlines()[1:]
    header = [line[2:] if line.startswith("# ") else line[1:] for line in itertools.takewhile(
        lambda line: line.startswith("#"), lines)]
    env = {**os.environ, "PIP": "false"}  # a download it started would fail: exit 1 (set -e), before any rm
    for argv, rc in ((["--help"], 0), (["-h"], 0), (["--dry-run"], 2)):
        run = subprocess.run(["bash", str(ROOT / "benchmarks/dali_parts.sh"), *argv], capture_output=True, text=True,
                             env=env)
        assert run.returncode == rc and (run.stdout.splitlines() == header if rc == 0 else run.stderr == (
            "dali_parts.sh takes no arguments (got: --dry-run); --help prints its use\n"))
    assert len(header) > 5
    from benchmarks import pick_setting

    for argv, rc in (([], 2), (["--help"], 0), (["-h"], 0)):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks/pick_setting.py"), *argv], capture_output=True,
                             text=True)
        assert run.returncode == rc and (run.stdout if rc == 0 else run.stderr) == pick_setting.__doc__.strip() + "\n"


def test_the_gpu_train_check_dry_run_trains_both_runs_and_prints_their_epochs(tmp_path):
    import os

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "BENCH_DIR": str(tmp_path / "bench"), "TRAIN_DIR": str(tmp_path / "train")}
    (tmp_path / "bench").mkdir()  # gpu_check.sh's JSON, as it leaves it there: its end-to-end ceiling, its settings
    (tmp_path / "bench/throughput.json").write_text(json.dumps({
        "end_to_end": [{"ceiling_images_per_s": 250.0}], "settings": {"compile_mode": "reduce-overhead"}}))
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_train.sh"), "--dry-run", "--step-stream", "default",
                          "--patch-size", "8"],  # (16 tokens, not 64: what is checked is what it prints)
                         capture_output=True, text=True, env=env, cwd=tmp_path)  # (train.py's default, as a flag)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    table = run.stdout.rstrip().splitlines()[-4:]  # printed last: teacher epoch 0, DeiT epochs 0-2
    assert [line.split()[:2] for line in table] == [["teacher", "0"], ["deit", "0"], ["deit", "1"], ["deit", "2"]]
    assert ("(the step's ceiling was timed with compile-mode reduce-overhead, step-stream default; train.py ran with "
            "compile-mode default, step-stream default)") in run.stdout.splitlines()  # (auto: default on a CPU)
    for name, epochs in (("teacher", 1), ("deit", 3)):
        lines = (tmp_path / "out/runs" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(epochs))
        if name == "deit":  # each DeiT epoch's img/s over the ceiling, to the table's 2 decimals
            assert [float(line.split()[-1]) for line in table[1:]] == [
                round(json.loads(line)["images_per_s"] / 250.0, 2) for line in lines]
        assert json.loads((tmp_path / "out/runs" / name / "config.json").read_text())["model"] == (
            "resnet18" if name == "teacher" else "deit_tiny_distill")
    assert not list((tmp_path / "out").rglob("*.pth"))  # checkpoints stay out of $OUT


def test_loader_rows_name_their_shard_set_with_or_without_a_hardware_decoder_or_executor_suffix(monkeypatch):
    import argparse

    import torch

    from benchmarks import throughput

    one_batch = [(None, [0] * 4)]
    monkeypatch.setattr(throughput, "imagefolder_loader", lambda *args: one_batch)
    monkeypatch.setattr(throughput, "dali_available", lambda: True)
    monkeypatch.setattr(throughput, "shard_loader", lambda *args: one_batch)
    dirs = {"original": "o", "resize_short=256": "r"}  # as main() labels the two shard sets
    data = {}
    # sweeps (names with "@hw", "@EXECUTOR" or both), and the defaults (names without)
    for loads, executors in (([0.0, 1.0], ["dynamic"]), ([0.65], ["dynamic", "legacy"]), ([0.0, 1.0], ["legacy",
                                                                                                          "dynamic"]),
                             ([0.65], ["legacy"])):
        a = argparse.Namespace(loader_workers="4", workers=4, img_size=32, batch_size=4, interpolation="bilinear",
                               rand_augment="", repeats=1, resize_short=256, dali=True, dali_hw_decoder_load=loads,
                               dali_executor=executors, dali_prefetch=[2])
        data.update((r["name"], r["data"]) for r in throughput.bench_loaders(a, Path("unused"), dirs,
                                                                               torch.device("cuda"), lambda: None))
    names = [f"shards_dali{s}" for s in ("@hw0", "@hw1", "@dynamic", "@legacy", "@hw0@legacy", "@hw0@dynamic",
                                          "@hw1@legacy", "@hw1@dynamic", "")]
    assert data == {"imagefolder": "original JPEGs", "shards_torch": "original",
                    "shards_torch_resized": "resize_short=256", **{n: "original" for n in names},
                    **{n.replace("dali", "dali_resized", 1): "resize_short=256" for n in names}}


def test_an_end_to_end_run_without_the_model_part_times_only_its_own_ceiling(tmp_path):
    _, r = run_throughput(tmp_path, "--parts", "e2e", "--no-dali")
    # the DeiT + teacher step at the end-to-end setting of a CPU (eager, fp32, channels-last), nothing else
    assert [(m["model"], m["compile"], m["dtype"], m["layout"]) for m in r["model_step"]] == [
        ("deit_tiny_distill + resnet18 teacher", False, "fp32", "channels_last")]
    assert [e["loader"] for e in r["end_to_end"]] == ["shards_torch", "shards_torch_resized"]
    for e in r["end_to_end"]:
        assert e["fraction_if_serial"] is None and e["fraction_if_overlapped"] is None  # no loaders part ran


@pytest.mark.parametrize("unit", ["steps", "epoch"])
def test_end_to_end_times_the_ceiling_in_turns_with_the_loaders(monkeypatch, unit):
    import argparse

    import torch

    from benchmarks import throughput

    class FakeLoader:  # epochs of 4 batches of 2 images at 4 px (the ceiling's are 8 px); labels: tag, then index
        def __init__(self, tag):
            self.tag, self.epochs, self.served = tag, 0, 0

        def __iter__(self):
            self.epochs += 1
            for i in range(4):
                self.served += 1
                yield torch.zeros(2, 3, 4, 4), torch.tensor([self.tag, i])

    loaders = [FakeLoader(0), FakeLoader(1)]
    monkeypatch.setattr(throughput, "shard_loaders", lambda a, dirs, workers, device: iter(
        [("shards_a", "original", loaders[0]), ("shards_b", "original", loaders[1])]))
    seen = []
    step = lambda x, y: seen.append("c" if x.shape[-1] == 8 else "ab"[int(y[0])] + str(int(y[1])))  # noqa: E731
    a = argparse.Namespace(e2e_unit=unit, batch_size=2, img_size=8, workers=1, steps=2, warmup_steps=1, repeats=2,
                           profile=None)
    rows, windows = throughput.bench_end_to_end(a, torch.device("cpu"), {}, [], step, lambda: None)
    assert list(windows) == ["ceiling", "shards_a", "shards_b"]  # what --profile would run once more, in this order
    # 2 rounds, each: the ceiling (1 untimed + 2 timed steps), then each loader's unit from a fresh epoch: a whole
    # one (4 batches), or 1 untimed + 2 timed steps with the 4th batch drained unused; whole epochs after one
    # untimed round (their start-up is timed, so the first one's must not be)
    per_loader = {"epoch": "0123", "steps": "012"}[unit]
    one_round = "ccc" + "".join(tag + i for tag in "ab" for i in per_loader)
    rounds = {"epoch": 3, "steps": 2}[unit]
    assert "".join(seen) == one_round * rounds
    assert [(ld.epochs, ld.served) for ld in loaders] == [(rounds, 4 * rounds)] * 2  # one whole epoch per unit
    assert [r["loader"] for r in rows] == ["shards_a", "shards_b"]
    assert rows[0]["ceiling_images_per_s"] == rows[1]["ceiling_images_per_s"] > 0
    seen.clear()  # a window of 3 steps (--profile-steps), whatever --steps: 1 untimed + 3, from a fresh epoch
    windows["shards_b"](3)
    windows["ceiling"](1)
    assert "".join(seen) == "b0b1b2b3" + "cc"
    assert all(r["fraction_of_ceiling"] == r["images_per_s"] / r["ceiling_images_per_s"] for r in rows)
    seen.clear()  # a loader's window once more, as --profile runs it: from a fresh epoch, 1 untimed + 2 timed steps
    windows["shards_a"]()
    assert "".join(seen) == "a0a1a2" and loaders[0].served == 4 * rounds + 4  # (the 4th batch drained)


def test_gpu_step_switches_are_refused_where_they_would_do_nothing_and_named_in_the_header(capsys):
    from benchmarks import throughput

    for flags, message in ((["--step-stream", "side"], "--step-stream side: a CUDA stream; use it with --device cuda"),
                           (["--step-stream", "high"], "--step-stream high: a CUDA stream; use it with --device cuda"),
                           (["--compile-mode", "reduce-overhead"], "nothing is compiled on a CPU without --compile")):
        with pytest.raises(SystemExit):
            throughput.main(flags)
        assert message in capsys.readouterr().err
    result = {"machine": {"cpu": "c", "cpu_count": 1, "gpu": "g", "torch": "t", "timm": "m", "nvidia.dali": None,
                          "git_commit": None, "cuda_device_max_connections": "32"},
              "images": {"count": 1, "mean_kb": 1.0},
              "settings": {"img_size": 224, "batch_size": 256, "compile_mode": "reduce-overhead",
                           "step_stream": "default"}}
    throughput.print_tables(result)
    header = capsys.readouterr().out.strip()
    # the step's switches that are not at their defaults, then (on a GPU) CUDA's hardware queues
    assert header.endswith("batch 256, compile-mode reduce-overhead, CUDA connections 32")
    row = {"model": "m", "workers": 1, "ceiling_images_per_s": 2.2, "host_wait_frac": 0.0}
    throughput.print_tables({**result, "end_to_end": [  # a ceiling slowed by a busy machine (a helper's run: 19.5)
        {**row, "loader": "shards_a", "images_per_s": 2.4, "fraction_of_ceiling": 2.4 / 2.2},
        {**row, "loader": "shards_b", "images_per_s": 42.7, "fraction_of_ceiling": 42.7 / 2.2}]})
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: shards_b ran over 1.10 of the step alone, which no loader can: the ceiling's rounds were "
                     "slowed (a busy machine, or too few --steps and --repeats). Read no fraction of this run; rerun "
                     "on an idle machine."]
    throughput.print_tables({**result, "settings": {**result["settings"], "steps": 1, "repeats": 1},  # a dry run's
                             "end_to_end": [{**row, "loader": "shards_b", "images_per_s": 2.6, "fraction_of_ceiling":
                                             2.6 / 2.2}]})
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "rerun on an idle machine, with more --steps and --repeats than its 1 and 1.")


def test_loader_and_end_to_end_rates_are_the_median_round_not_the_last_best_or_mean(monkeypatch, capsys):
    import argparse
    import types

    import torch

    from benchmarks import throughput

    # loaders: 4 images per epoch; after an untimed warm-up epoch, rounds of 4, 1 and 10 s: median 4 s, 1 img/s
    # (the mean 5 s, the last and the slowest 10 s, the fastest 1 s)
    durations = iter([100.0, 4.0, 1.0, 10.0])
    monkeypatch.setattr(throughput, "imagefolder_loader", lambda *args: "loader")
    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([]))
    monkeypatch.setattr(throughput, "epoch_seconds", lambda loader, sync: (4, next(durations)))
    a = argparse.Namespace(loader_workers="1", workers=1, img_size=8, batch_size=4, interpolation="bilinear", repeats=3,
                           rand_augment="")
    rows = throughput.bench_loaders(a, Path("unused"), {}, torch.device("cpu"), lambda: None)
    assert [(r["name"], r["images_per_s"]) for r in rows] == [("imagefolder", 1.0)]

    # end to end on a fake clock: the ceiling's step takes 1 s; the loader's 1, 4 and 10 s in rounds 1, 2 and 3
    clock = [0.0]
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Loader:
        epochs = 0

        def __iter__(self):
            self.epochs += 1
            for i in range(4):
                yield torch.zeros(2, 3, 4, 4), torch.tensor([0, i])

    loader = Loader()
    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([("shards_a", "original", loader)]))

    def step(x, y):
        clock[0] += 1.0 if x.shape[-1] == 8 else [1.0, 4.0, 10.0][loader.epochs - 1]

    a = argparse.Namespace(e2e_unit="steps", batch_size=2, img_size=8, workers=1, steps=2, warmup_steps=1, repeats=3,
                           profile=None)
    (row,), _ = throughput.bench_end_to_end(a, torch.device("cpu"), {}, [], step, lambda: None)
    assert (row["ceiling_images_per_s"], row["images_per_s"], row["fraction_of_ceiling"]) == (2.0, 0.5, 0.25)
    # the line printed as it ran (what a log keeps of a run stopped before its tables) says the same
    assert "end to end shards_a" in (said := capsys.readouterr().out) and "0.5 img/s = 0.25 of the step's 2.0" in said


def test_batches_a_loader_decoded_before_its_window_are_neither_timed_nor_counted(monkeypatch):
    """DALI decodes its next epoch's first batches as soon as an epoch ends, while other units are timed: a window
    that took them would count work done outside it."""
    import argparse
    import types

    import torch

    from benchmarks import throughput

    clock = [0.0]
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Loader:  # 5 batches of 3 images; the first 2 decoded ahead (free), each other one takes 1 s
        decoded_ahead = 2

        def __init__(self, n=5):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            for i in range(self.n):
                clock[0] += 0.0 if i < self.decoded_ahead else 1.0
                yield torch.zeros(3, 3, 4, 4), torch.full((3,), i)

    assert throughput.epoch_seconds(Loader(), lambda: None) == (9, 3.0)  # batches 2, 3, 4
    with pytest.raises(SettingError, match=r"2 batches per epoch: DALI decodes the first 2 of each ahead, so none "
                                           r"would be timed; .*train images / --batch-size > 2"):
        throughput.epoch_seconds(Loader(2), lambda: None)
    taken = []

    def step(x, y):  # the ceiling's step (8 px) 1 s; on the loader's batches 2 s, noted
        clock[0] += 1.0 if x.shape[-1] == 8 else 2.0
        if x.shape[-1] != 8:
            taken.append(int(y[0]))

    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([("shards_dali", "original", Loader())]))
    a = argparse.Namespace(e2e_unit="steps", batch_size=3, img_size=8, workers=1, steps=2, warmup_steps=0, repeats=1,
                           profile=None)
    (row,), _ = throughput.bench_end_to_end(a, torch.device("cpu"), {}, [], step, lambda: None)
    assert taken == [2, 3]  # the 2 batches decoded ahead taken unused, then 2 timed steps (then batch 4 drained)
    assert row["images_per_s"] == 6 / (2 * (1.0 + 2.0))  # batches 2 and 3: 1 s to load, 2 s to step, each


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("load_s, rate", [(1.25, 1 / 1.25), (0.5, 1.0)])  # the loader the limit, or the step
def test_a_window_times_the_steady_rate_whatever_the_loaders_queue_banked_while_it_rested(monkeypatch, depth, load_s,
                                                                                         rate):
    """A loader like DALI decodes in the background up to `depth` batches ahead of the one in use, also while the
    ceiling and the other loaders are timed: a window must not time that banked work as its own. Simulated: batch k
    is ready load_s after both batch k - 1 was ready and batch k - depth was taken (one decoder, a queue of depth);
    a step takes 1 s. Steady state: a batch per max(1, load_s) s, whatever the depth."""
    import argparse
    import types

    import torch

    from benchmarks import throughput

    clock = [0.0]
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Queued:
        decoded_ahead = depth

        def __init__(self):
            self.ready, self.taken = [], []  # per batch since the start, across epochs (DALI's pipeline lives on)

        def __len__(self):
            return 50

        def __iter__(self):
            for _ in range(len(self)):
                k = len(self.ready)
                freed = self.taken[k - depth] if k >= depth else 0.0
                self.ready.append(max(self.ready[-1] if self.ready else 0.0, freed) + load_s)
                clock[0] = max(clock[0], self.ready[k])  # next() waits for it
                self.taken.append(clock[0])
                yield torch.zeros(2, 3, 4, 4), torch.zeros(2)

    def step(x, y):
        clock[0] += 1.0

    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([("shards_dali", "original", Queued())]))
    a = argparse.Namespace(e2e_unit="steps", batch_size=2, img_size=8, workers=1, steps=8, warmup_steps=3, repeats=3,
                           profile=None)
    (row,), _ = throughput.bench_end_to_end(a, torch.device("cpu"), {}, [], step, lambda: None)
    assert row["ceiling_images_per_s"] == 2.0
    assert row["images_per_s"] == pytest.approx(2 * rate)  # (windows that stepped on the banked batches read
    # 1.08x that at depth 2, 1.25x at depth 4, where the loader is the limit)


def test_on_users_folders_every_loader_reads_the_images_the_packer_packs(tmp_path):
    import shutil

    from vitdeit.packing import PackOptions, pack

    from benchmarks import throughput

    data = small_dataset(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=2)
    first = sorted((data / "train.X1").iterdir())[0]
    (first / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # macOS's, in a class folder: not an image
    (first / f"._{first.name}_1.JPEG").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble file: an image's name
    moved = sorted((data / "train.X2").glob("*/*"))  # train.X2 keeps its class folders, empty: allowed when packing
    for f in moved:
        shutil.move(f, data / "train.X1" / f.parent.name / f.name)
    files = throughput.train_files(data)
    assert len(files) == 16 and not [f for f in files if f.name.startswith(".")]
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["train"]["num_samples"] == 16
    baseline = throughput.imagefolder_loader(data, 32, 4, 0, "bilinear")
    assert len(baseline.dataset) == 16 and sum(len(y) for _, y in baseline) == 16
    assert len(throughput.bench_transforms(files, 32, n=4)) > 0
    files[1].write_bytes(b"not a JPEG")
    with pytest.raises(DataError, match=re.escape(f"{files[1]}: not a readable image")):
        throughput.bench_transforms(files, 32, n=4)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/throughput.py"), "--data-path", str(tmp_path / "no"),
                          "--parts", "transforms"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and run.stderr == f"error: {tmp_path / 'no'}: does not exist; pass --data-path DIR " \
                                                 f"with train.X*/ and val.X/ in it.\n"


@pytest.mark.parametrize("flags, said", [
    (["--parts", "transforms,modle"], "--parts 'transforms,modle': no part modle; choose from transforms, loaders"),
    (["--parts", "transforms, modle"], "--parts 'transforms, modle': no part modle; choose"),  # a space: the typo
    (["--parts", ""], "--parts '': no part ''; choose from transforms"),
    (["--num-images", "0"], "--num-images 0: must be >= 1"), (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--img-size", "0"], "--img-size 0: must be >= 8"), (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--repeats", "0"], "--repeats 0: must be >= 1"), (["--workers", "-1"], "--workers -1: must be >= 1"),
    (["--resize-short", "0"], "--resize-short 0: must be >= 8"),  # (0 packed the originals, labelled resized)
    (["--loader-workers", "a,1"], "'a,1': give comma-separated worker counts >= 0"),
    (["--img-size", "40", "--parts", "model"],
     "--img-size 40: train.py's ViT/DeiT need --patch-size (16 here, its default) to divide"),
    (["--json", "{tmp}/no/b.json"], "--json {tmp}/no/b.json: its folder {tmp}/no does not exist"),
    (["--json", "{tmp}"], "--json {tmp}: a folder; name a file in it"),
    (["--work-dir", "{tmp}/file"], "--work-dir {tmp}/file: a file, not a folder"),
    (["--profile", "{tmp}/p", "--parts", "loaders"], "--profile {tmp}/p: profiles the end-to-end windows; add e2e"),
    (["--profile", "{tmp}/p", "--profile-steps", "0"], "--profile-steps 0: must be >= 1"),
    (["--rand-augment", "foo"], "--rand-augment 'foo': not a timm RandAugment spec; e.g. 'rand-m9-mstd0.5-inc1'")])
def test_throughput_refuses_a_flag_it_cannot_use_before_any_work(flags, said, tmp_path, monkeypatch, capsys):
    from benchmarks import throughput

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(throughput, "train_files", lambda *a: pytest.fail("went to work before checking its flags"))
    with pytest.raises(SystemExit) as e:
        throughput.main([f.format(tmp=tmp_path) for f in flags])
    assert e.value.code == 2 and said.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_throughput_on_cuda_without_a_gpu_is_one_error_before_any_work(monkeypatch):
    from benchmarks import throughput

    monkeypatch.setattr(throughput, "train_files", lambda *a: pytest.fail("went to work without a GPU"))
    with pytest.raises(SettingError, match="--device cuda: no CUDA GPU"):
        throughput.main(["--device", "cuda", "--parts", "transforms", "--data-path", "x"])


def test_throughput_given_packed_shards_asks_for_the_image_folders(tiny_shards):
    from benchmarks import throughput

    with pytest.raises(DataError, match=re.escape(f"{tiny_shards}: holds packed shards; --data-path here takes the "
                                                  f"ImageNet-style JPEG folders")):
        throughput.main(["--data-path", str(tiny_shards), "--parts", "transforms"])


def test_throughput_given_folders_without_labels_json_says_to_copy_it_there_not_a_flag_it_lacks(tmp_path):
    from benchmarks import throughput

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    (data / "Labels.json").unlink()
    with pytest.raises(DataError) as e:
        throughput.main(["--data-path", str(data), "--parts", "transforms"])
    assert str(e.value).startswith(f"{data / 'Labels.json'}: not found; --data-path's folders need their Labels.json")
    assert "copy this repository's Labels.json there" in str(e.value) and "--labels" not in str(e.value)


def test_too_few_batches_for_dali_are_refused_before_any_image_is_made_or_packed(tmp_path, monkeypatch):
    from benchmarks import throughput

    monkeypatch.setattr(throughput, "dali_available", lambda: True)  # (the check needs no DALI run)
    real_pack = throughput.pack
    monkeypatch.setattr(throughput, "pack", lambda *a, **k: pytest.fail("packed first"))
    work = tmp_path / "w"
    with pytest.raises(SettingError, match=re.escape("2 batches per epoch (64 train images / --batch-size 32): DALI "
                                                     "decodes the first 2 of each ahead, so none would be timed; raise "
                                                     "--num-images or lower --batch-size (more than 2 batches), or "
                                                     "pass --no-dali")):
        throughput.main(["--work-dir", str(work), "--num-images", "64", "--batch-size", "32", "--parts", "loaders"])
    assert not (work / "images").exists()  # refused before the images were made
    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=8, val_per_class=1)  # 16 train images
    with pytest.raises(SettingError, match=re.escape(f"4 batches per epoch (16 train images in {data} / --batch-size "
                                                     f"4): DALI decodes the first 4 of each ahead, so none would be "
                                                     f"timed; lower --batch-size (more than 4 batches), or pass")):
        throughput.main(["--data-path", str(data), "--work-dir", str(work), "--batch-size", "4", "--parts", "e2e",
                         "--dali-prefetch", "2,4"])  # the deepest depth counts; no --num-images advice here
    monkeypatch.setattr(throughput, "pack", real_pack)
    assert throughput.main(["--data-path", str(data), "--work-dir", str(work), "--batch-size", "4", "--parts", "data",
                            "--dali-prefetch", "2,4", "--no-dali", "--workers", "1"]) == 0  # no loader: no check


def test_a_work_dir_reused_with_other_images_measures_the_images_asked_for(tmp_path, monkeypatch):
    from benchmarks import imageset, throughput

    work, json_path = tmp_path / "w", tmp_path / "b.json"
    a = small_dataset(tmp_path / "a", num_classes=2, train_per_class=8, val_per_class=2)
    b = small_dataset(tmp_path / "b", num_classes=2, train_per_class=12, val_per_class=2, seed=1)
    for data, n in ((a, 16), (b, 24)):  # the shards of a, kept in --work-dir, were read as b's
        throughput.main(["--data-path", str(data), "--work-dir", str(work), "--parts", "data", "--no-dali",
                         "--workers", "1", "--batch-size", "4", "--json", str(json_path)])
        assert json.loads(json_path.read_text())["images"]["count"] == n
        for shards in ("shards", "shards_256"):
            m = json.loads((work / shards / "manifest.json").read_text())
            assert m["source"]["data_path"] == str(data.resolve()) and m["splits"]["train"]["num_samples"] == n
    # the synthetic set: one of another size, kept in --work-dir, is named, not measured as --num-images
    synthetic = work / "images"
    small_dataset(synthetic, num_classes=2, train_per_class=8, val_per_class=2)
    with pytest.raises(SettingError, match=f"--work-dir {work} holds 16 synthetic train images from an earlier run, "
                                           f"not --num-images 24; pass --num-images 16"):
        throughput.main(["--work-dir", str(work), "--num-images", "24", "--parts", "transforms"])
    with pytest.raises(SettingError, match=re.escape("--batch-size 32: more than the 16 train images; raise "
                                                     "--num-images or lower --batch-size")):
        throughput.main(["--work-dir", str(work), "--num-images", "16", "--parts", "loaders", "--batch-size", "32"])
    # --parts data loads no batch (gpu_train.sh's first step): any batch size; and a set without its Labels.json (a
    # killed run's) is made again from nothing, not topped up: exactly --num-images train images
    (synthetic / "Labels.json").unlink()
    assert throughput.main(["--work-dir", str(work), "--num-images", "8", "--parts", "data", "--batch-size", "32",
                            "--no-dali", "--workers", "1", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["images"]["count"] == 8 == len(list(synthetic.glob("train.X1/*/*")))

    class Killed:  # Ctrl-C while the images are written: no Labels.json, so the next run makes the set again
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def map(self, *a, **k):
            raise KeyboardInterrupt

    monkeypatch.setattr(imageset, "Pool", Killed)
    with pytest.raises(KeyboardInterrupt):
        imageset.make_imageset(tmp_path / "killed", ROOT / "Labels.json", n_train=4, n_val=2)
    assert not (tmp_path / "killed" / "Labels.json").exists()


def test_a_json_that_cannot_be_written_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path as P

    from benchmarks import throughput
    from vitdeit.errors import WriteFailed

    data = small_dataset(tmp_path / "a", num_classes=2, train_per_class=4, val_per_class=2)
    json_path = tmp_path / "b.json"
    write_text = P.write_text

    def full_disk(self, *a, **k):
        if self == json_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *a, **k)

    monkeypatch.setattr(P, "write_text", full_disk)
    monkeypatch.setattr(throughput, "train_files", lambda *a: pytest.fail("read the images before the --json"))
    before = "; nothing was measured: the run stops before any work. "
    with pytest.raises(WriteFailed, match=re.escape(f"could not write {json_path}: [Errno 28] No space left on "
                                                    f"device (") + r".*" + re.escape(before) + "Free space there or "
                                                                                               "pass another --json"):
        throughput.main(["--data-path", str(data), "--parts", "transforms", "--json", str(json_path)])
    json_path.write_bytes(b"{}")  # an earlier run's, that this user may no longer write (another's, read-only)

    def refused(path, mode="r", *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(throughput, "open", refused, raising=False)  # (the module's own open, not the builtin)
    with pytest.raises(WriteFailed, match=re.escape(f"could not write {json_path}: [Errno 13] Permission denied")
                       + r".*" + re.escape(before) + "Pass another --json"):
        throughput.main(["--data-path", str(data), "--parts", "transforms", "--json", str(json_path)])
    monkeypatch.undo()  # a disk that fills later: after the images are made, or after the first part
    for fails, kept in ((2, "nothing was measured yet"), (3, "the figures measured so far are in the lines printed "
                                                              "above")):
        saves = []

        def fills_up(self, *a, **k):
            if self == json_path:
                saves.append(self)
                if len(saves) == fails:  # (the first: the run's start, before any work)
                    raise OSError(errno.ENOSPC, "No space left on device")
            return write_text(self, *a, **k)

        json_path.unlink(missing_ok=True)
        monkeypatch.setattr(P, "write_text", fills_up)
        capsys.readouterr()
        with pytest.raises(WriteFailed, match=re.escape(f"could not write {json_path}: [Errno 28] No space left on "
                                                        f"device (") + r".*" + re.escape(f"; {kept}. Free ")):
            throughput.main(["--data-path", str(data), "--parts", "transforms", "--json", str(json_path)])
        said = re.findall(r"^  train_transform \(this project's worker, decode included\) +[0-9.]+ ms/image$",
                          capsys.readouterr().out, re.M)  # the part's figures: said once measured
        assert len(saves) == fails and len(said) == fails - 2


def test_a_run_refused_for_its_data_keeps_an_earlier_runs_json(tmp_path):
    from benchmarks import throughput
    from vitdeit.errors import DataError

    earlier = tmp_path / "t.json"
    earlier.write_text('{"loaders": []}')  # an earlier run's figures
    with pytest.raises(DataError, match="nope: does not exist"):
        throughput.main(["--data-path", str(tmp_path / "nope"), "--json", str(earlier)])
    assert earlier.read_text() == '{"loaders": []}' and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def synthetic_trace(window_tid=5):
    """A Chrome trace as torch.profiler writes it on a GPU, made by hand: a 2-step window over [1000, 2000] us on the
    host's thread 5; kernels on the step's stream 7 and on a loader's stream 20, one copy, three CUDA API calls."""
    from benchmarks import traces

    def x(cat, name, ts, dur, **kw):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **kw}

    def kernel(stream, ts, dur):
        return x("kernel", "k", ts, dur, pid=0, tid=stream, args={"stream": stream, "device": 0})

    return [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "python"}},
            x("user_annotation", traces.window_name(2), 1000, 1000, tid=window_tid),
            x("gpu_user_annotation", traces.window_name(2), 1000, 1100, pid=0, tid=7),  # its GPU mirror: not a window
            kernel(7, 1000, 300), kernel(7, 1250, 150), kernel(7, 1900, 200),  # the last one runs past the window
            kernel(20, 1350, 150), kernel(20, 500, 600),  # the second began before the window
            kernel(7, 3000, 100),  # after the window: not counted
            x("gpu_memcpy", "Memcpy DtoD", 1600, 100, tid=7, args={"stream": 7}),
            x("cuda_runtime", "cudaStreamSynchronize", 1950, 50, tid=5),
            x("cuda_runtime", "cudaLaunchKernel", 1010, 5, tid=5),
            x("cuda_runtime", "cudaEventSynchronize", 1200, 100, tid=9)]  # another thread's wait (DALI's)


def test_a_traces_summary_clips_to_the_window_and_splits_the_steps_streams_from_the_others():
    from benchmarks import traces

    events = synthetic_trace()
    s = traces.summary(events, step_streams={7})
    # by hand, in us over the 1000-us window of 2 steps: step stream [1000, 1400] + [1900, 2000] = 500; other stream
    # [1000, 1100] + [1350, 1500] = 250; both at once [1000, 1100] + [1350, 1400] = 150; anything on the GPU
    # [1000, 1500] + [1600, 1700] + [1900, 2000] = 700; the window's thread waiting: 50 (thread 9's 100 is not its)
    assert s["steps"] == 2 and s["wall_ms_per_step"] == 0.5 and s["gpu_events"] == 6
    assert s["step_streams"] == [7] and s["gpu_busy_frac"] == pytest.approx(0.7)
    assert (s["step_kernel_ms_per_step"], s["other_kernel_ms_per_step"], s["overlap_ms_per_step"]) == pytest.approx(
        (0.25, 0.125, 0.075))
    assert s["copy_ms_per_step"] == pytest.approx(0.05) and s["host_sync_ms_per_step"] == pytest.approx(0.025)
    assert [(c["name"], c["calls"], c["ms_per_step"], c["window_thread_ms_per_step"]) for c in s["host_calls"]] == [
        ("cudaEventSynchronize", 1, 0.05, 0.0), ("cudaStreamSynchronize", 1, 0.025, 0.025),
        ("cudaLaunchKernel", 1, 0.0025, 0.0025)]
    # the step stream idle in [1400, 1900]: one stretch of 500 us, a wait; stream 20's two kernels in the window
    assert s["step_idle_ms_per_step"] == pytest.approx({"under_15us": 0, "15_to_200us": 0, "200us_and_over": 0.25})
    assert s["other_kernels_per_step"] == 1.0
    alone = traces.summary(events)  # no ceiling given: every stream with a kernel is the step's
    assert alone["step_streams"] == [7, 20] and alone["other_kernel_ms_per_step"] == alone["overlap_ms_per_step"] == 0
    assert alone["step_kernel_ms_per_step"] == pytest.approx((500 + 100) / 1000 / 2)  # [1000, 1500] + [1900, 2000]
    assert alone["step_idle_ms_per_step"]["200us_and_over"] == pytest.approx(0.2) and not alone[
        "other_kernels_per_step"]  # [1500, 1900]
    with pytest.raises(ValueError, match="2 events named"):  # two windows in one trace: which one is meant?
        traces.summary(events + [events[1]])


def test_the_steps_idle_time_is_split_by_the_length_of_each_stretch_and_adds_up_to_the_wall():
    from benchmarks import traces

    # a window [0, 1000] us: kernels [20, 100], [110, 200], [250, 400], [405, 700]; idle 20 at the start (a kernel
    # held up), then 10 and 5 (a graph's gaps), 50 (held up), 300 at the end (a wait)
    busy = traces.merged([(20, 100), (110, 200), (250, 400), (405, 700), (150, 180)])  # the last inside another
    assert busy == [[20, 100], [110, 200], [250, 400], [405, 700]]
    assert traces.idle_by_length(busy, 0, 1000) == [15.0, 70.0, 300.0]
    assert traces.idle_by_length([[0, 1000]], 0, 1000) == [0.0, 0.0, 0.0]  # never idle
    assert traces.idle_by_length([], 0, 199) == [0.0, 199.0, 0.0]  # no kernel at all: one stretch, the window
    assert traces.idle_by_length([[0, 100]], 0, 300) == [0.0, 0.0, 200.0]  # 200 us and over: a wait
    events = [{"ph": "X", "cat": "user_annotation", "name": traces.window_name(1), "ts": 0, "dur": 1000, "tid": 5}]
    assert traces.summary(events)["step_idle_ms_per_step"] is None  # no GPU work (a CPU run): not all "waiting"
    events += [{"ph": "X", "cat": "kernel", "name": "k", "ts": s, "dur": e - s, "args": {"stream": 7}} for s, e in busy]
    s = traces.summary(events)  # the same kernels in a trace: each class under its name, and in that order printed
    assert s["step_idle_ms_per_step"] == pytest.approx({"under_15us": 0.015, "15_to_200us": 0.07,
                                                        "200us_and_over": 0.3})
    assert traces.row("unit", s).split()[-4:] == [f"{0.015:.2f}", "0.07", "0.30", "0.0"]


def test_the_traces_command_reads_gzipped_traces_and_scales_each_step_by_the_first(tmp_path, capsys):
    import gzip

    from benchmarks import traces

    ceiling = [e for e in synthetic_trace() if e.get("tid") != 20]  # the step alone: its stream's kernels only
    for name, events in (("ceiling", ceiling), ("loader", synthetic_trace())):
        with gzip.open(tmp_path / f"{name}.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
    assert traces.main([str(tmp_path / "ceiling.json.gz"), str(tmp_path / "loader.json.gz")]) == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header == traces.HEADER
    # the ceiling's step stream (7) is the loader's step stream too: 0.25 ms/step both, so x1.00; stream 20 is other
    # then the step stream's idle (the 500 us in [1400, 1900]: 0.25 ms/step, a wait) and stream 20's launches
    assert first.split() == ["ceiling", "0.50", "60", "%", "0.25", "0.00", "0.00", "0.05", "0.03", "0.00", "0.00",
                             "0.25", "0.0"]
    assert second.split() == ["loader", "0.50", "70", "%", "0.25", "x1.00", "0.12", "0.07", "0.05", "0.03", "0.00",
                              "0.00", "0.25", "1.0"]


def test_the_traces_command_names_a_path_that_is_no_trace_in_one_line_before_any_table(tmp_path, capsys):
    from benchmarks import traces

    (tmp_path / "b.json").write_text(json.dumps({"machine": {}}))  # throughput.py's --json, passed by mistake
    (tmp_path / "t.json.gz").write_bytes(b"not gzip")
    for path, why in ((tmp_path / "nope.json.gz", "FileNotFoundError"), (tmp_path / "b.json", "no traceEvents"),
                      (tmp_path / "t.json.gz", "BadGzipFile")):
        assert traces.main([str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {path}: not a trace ({why}") and err.count("\n") == 1
        assert err.rstrip().endswith("pass the .json.gz files throughput.py --profile DIR wrote in DIR")


@pytest.mark.parametrize("argv,rc", [([], 2), (["--help"], 0), (["-h"], 0)])
def test_the_traces_command_with_no_trace_prints_its_usage(argv, rc):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/traces.py"), *argv], capture_output=True, text=True)
    assert run.returncode == rc and "python benchmarks/traces.py DIR/ceiling.json.gz" in (run.stdout + run.stderr)
    assert "Traceback" not in run.stderr and (run.stdout.count("\n") > 10) == bool(argv)  # --help: the whole text


def test_the_ceilings_step_streams_are_those_its_own_thread_launched_kernels_on():
    from benchmarks import traces

    events = synthetic_trace()
    for i, e in enumerate(events):  # each kernel linked to its launch: stream 7's from thread 5, stream 20's from 9
        if e.get("cat") == "kernel":
            e["args"]["correlation"] = 100 + i
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": e["ts"] - 10, "dur": 1,
                           "tid": 5 if e["args"]["stream"] == 7 else 9, "args": {"correlation": 100 + i}})
    s = traces.summary(events)  # a DALI pipeline still decoding from its threads in the ceiling's window
    assert s["step_streams"] == [7] and s["other_kernel_ms_per_step"] == pytest.approx(0.125)
    assert traces.summary(events, step_streams={7, 20})["other_kernel_ms_per_step"] == 0  # given: taken as given


def test_profiling_writes_a_trace_per_window_and_stops_at_a_failure_without_raising(tmp_path, monkeypatch):
    import torch

    from benchmarks import throughput, traces

    ran = []

    def window(name, fail=False):
        def run(n):
            ran.append(name)
            with torch.profiler.record_function(traces.window_name(n)):
                torch.ones(4).add_(1)
            if fail:
                raise RuntimeError("CUPTI went away\nsecond line")
        return run

    windows = {"ceiling": window("ceiling"), "shards_dali@hw0.65": window("dali"), "broken": window("broken", True),
               "after": window("after")}
    rows = []
    for row in throughput.profile_windows(windows, torch.device("cpu"), tmp_path, steps=2):
        rows.append(row)  # main() saves the JSON after each
    assert ran == ["ceiling", "dali", "broken"]  # nothing after the failure
    assert [r["unit"] for r in rows] == ["ceiling", "shards_dali@hw0.65", "broken"]
    assert rows[2] == {"unit": "broken", "error": "RuntimeError: CUPTI went away"}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ceiling.json.gz", "shards_dali_hw0.65.json.gz"]
    assert rows[1]["trace"] == str(tmp_path / "shards_dali_hw0.65.json.gz") and rows[1]["steps"] == 2


def test_the_gpu_sessions_train_setting_is_the_fastest_dali_feed_if_3_percent_faster_than_the_defaults(tmp_path):
    from benchmarks import pick_setting

    def write(step, rows):
        (tmp_path / step).mkdir()
        (tmp_path / step / "throughput.json").write_text(json.dumps(
            {"end_to_end": [{"loader": name, "images_per_s": rate} for name, rate in rows]}))

    write("profile", [("shards_torch", 5000.0), ("shards_dali@pf2", 9500.0), ("shards_dali@pf4", 9700.0),
                      ("shards_dali_resized@pf4", 20000.0)])  # pre-resized shards: not what train.py reads
    write("launches", [("shards_dali@pf2", 8000.0), ("shards_dali@pf4", 9800.0)])
    write("cpu", [("shards_dali_cpu", 50.0)])  # one depth: no suffix, and no settings: DALI's default, 2
    write("deep", [("shards_dali", 60.0)])  # one depth, the one its settings name
    json_path = tmp_path / "deep" / "throughput.json"
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "settings": {"dali_prefetch": [4]}}))
    assert pick_setting.rates(tmp_path, ["deep"]) == {"deep:pf4": 60.0}
    (tmp_path / "failed").mkdir()  # a step that wrote no JSON
    (tmp_path / "cut").mkdir()  # a step stopped by the budget before its end-to-end part: a JSON without one
    (tmp_path / "cut" / "throughput.json").write_text(json.dumps({"loaders": [], "model_step": []}))
    found = pick_setting.rates(tmp_path, ["profile", "launches", "cpu", "failed", "skipped", "cut"])
    assert found == {"profile:pf2": 9500.0, "profile:pf4": 9700.0, "launches:pf2": 8000.0,
                     "launches:pf4": 9800.0, "cpu:pf2": 50.0}
    assert pick_setting.pick(found) == "launches:pf4"  # 9,800 > 1.03 x 9,500 = 9,785
    assert pick_setting.pick({**found, "launches:pf4": 9780.0}) == "profile:pf2"  # within 3 %: the defaults
    assert pick_setting.pick({}) == "profile:pf2"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/pick_setting.py"), str(tmp_path)],
                         capture_output=True, text=True)  # as gpu_session.sh reads it: the choice, then the rates
    assert run.stdout.split()[:3] == ["launches:pf4", "profile:pf2", "9500"] and run.returncode == 0


@pytest.mark.parametrize("budget, python, setting", [("1", sys.executable, ""), ("900", "false", ""),
                                                     ("900", "false", "launches:pf4"),
                                                     ("900", "false", "launches:legacy")])  # the form of 2026-12-04
def test_the_gpu_session_skips_what_no_longer_fits_and_goes_on_past_a_failed_step(tmp_path, budget, python, setting):
    import os
    import tarfile

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": python, "BUDGET": budget,
           "SESSION_DIR": str(tmp_path / "session"), "BENCH_DIR": str(tmp_path / "bench"),
           "TRAIN_DIR": str(tmp_path / "train"), "TRAIN_SETTING": setting}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_session.sh"), "--dry-run"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    log = (tmp_path / "out/session.log").read_text()
    steps = ["profile", "launches", "train", "side"]
    switched = setting == "launches:pf4"  # another form: refused, so train.py's defaults
    assert (f"== TRAIN_SETTING '{setting}' is not STEP:pfDEPTH" in log) == (setting == "launches:legacy")
    if budget == "1":  # 1 s: no step fits, each says so
        assert re.findall(r"^== (\w+): skipped \(\d+ s of BUDGET 1 s left", log, re.M) == steps
    else:  # a python that fails at once (`false`): every step runs, in order, fails, and the next one still runs;
        # a train run with a switched setting that fails is followed by one with train.py's defaults
        assert re.findall(r"^== (\w+): exit (\d+) after", log, re.M) == [(s, "1") for s in (
            steps[:3] + ["train"] * switched + steps[3:])]
        assert (f"train.py runs with the setting of '{setting if switched else 'profile:pf2'}' ("
                f"{'--compile-mode default --dali-prefetch 4' if switched else 'its defaults'})") in log
    assert sorted(os.listdir(tmp_path / "out")) == ["session.log", "session.tar"]  # no traces: no profile.tar
    with tarfile.open(tmp_path / "out/session.tar") as tar:
        names = sorted(n.strip("./") for n in tar.getnames() if n.strip("./"))  # each run step's own folder
        assert names == ([] if budget == "1" else sorted(steps + (["train-launches-pf4"] if switched else [])))


def test_the_timed_model_step_is_train_pys_step_at_its_defaults(monkeypatch):
    """The ceiling every end-to-end fraction divides by is engine.Step with train.py's loss, optimiser,
    clipping and drop path, not a lighter copy of it: the step's arguments and objects, one step on a CPU."""
    import types

    import torch

    from benchmarks import throughput
    from vitdeit.config import Config

    calls, lrs, real = [], [], throughput.Step.__call__
    monkeypatch.setattr(throughput.Step, "__call__", lambda self, x, y: calls.append(self) or lrs.append(
        self.optimizer.param_groups[0]["lr"]) or real(self, x, y))
    a = types.SimpleNamespace(img_size=32, batch_size=4, compile_mode="default")
    step, net, teacher = throughput.train_step_fn("deit_tiny_distill", a, torch.device("cpu"), None, True, False)
    for _ in range(2):
        step(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 2, 3]))
    first = calls[0]  # (the Step object)
    model, loss_fn, optimizer = first.model, first.loss_fn, first.optimizer
    amp, clip, graphs = first.amp_dtype, first.clip_grad, first.graphs
    assert model is net and amp is None and clip == Config.clip_grad > 0 and not graphs
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, Config.weight_decay]
    # the schedule, set before each step: train.py's warm-up from peak / 1000, over its 1,000 steps (1 epoch)
    peak = Config.lr * 4 / 512
    assert lrs == pytest.approx([peak / 1000, peak / 1000 + (peak - peak / 1000) / 1000])
    assert loss_fn.kind == Config.distillation_type and loss_fn.teacher is teacher is not None
    assert loss_fn.base.label_smoothing == Config.label_smoothing
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(Config.drop_path)


def test_the_model_steps_rate_is_its_steps_images_over_the_median_timed_repeat(monkeypatch):
    """images/s of a model-step row: --steps x --batch-size images over the median of --repeats timed runs (the
    untimed warm-up steps left out), not the fastest run's or one step's."""
    import argparse
    import types

    import torch

    from benchmarks import throughput

    clock = [0.0]
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    # each step's seconds: 1 warm-up step (100 s, untimed), then 3 repeats of 2 steps: 4, 1 and 10 s a repeat
    step_seconds = iter([100.0, 2.0, 2.0, 0.5, 0.5, 5.0, 5.0])

    def step(x, y):
        clock[0] += next(step_seconds)

    monkeypatch.setattr(throughput, "train_step_fn", lambda *args: (step, None, "teacher"))
    a = argparse.Namespace(batch_size=4, img_size=16, steps=2, warmup_steps=1, repeats=3, amp=False, compile=False)
    (row,), e2e_step = throughput.bench_model_step(a, torch.device("cpu"), lambda: None, only_e2e=True)
    assert row["images_per_s"] == 2 * 4 / 4.0  # the median repeat, 4 s (fastest 1 s, mean 5 s)
    assert (row["model"], row["batch_size"], row["peak_mem_gb"]) == ("deit_tiny_distill + resnet18 teacher", 4, None)
    assert e2e_step is step and next(step_seconds, None) is None


def test_loader_runs_default_to_1_and_all_workers_and_the_main_process_alone_counts_as_one_worker(monkeypatch):
    import argparse

    import torch

    from benchmarks import throughput

    built = []
    monkeypatch.setattr(throughput, "imagefolder_loader", lambda data, size, batch, workers, *args: built.append(
        workers) or workers)
    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([]))
    # an epoch of 12 images in 2 s with w workers, 3 s with none: 6 img/s, 4 img/s in the main process alone
    monkeypatch.setattr(throughput, "epoch_seconds", lambda workers, sync: (12, 2.0 if workers else 3.0))
    a = argparse.Namespace(loader_workers=None, workers=3, img_size=8, batch_size=4, interpolation="bilinear",
                           repeats=1, rand_augment="")
    rows = throughput.bench_loaders(a, Path("unused"), {}, torch.device("cpu"), lambda: None)
    assert built == [1, 3]  # no --loader-workers: 1 and --workers, as README says
    assert [(r["workers"], r["images_per_s"], r["images_per_s_per_worker"]) for r in rows] == [(1, 6.0, 6.0),
                                                                                              (3, 6.0, 2.0)]
    a.loader_workers = "0,2"  # 0: decoded in the main process, one worker's work
    rows = throughput.bench_loaders(a, Path("unused"), {}, torch.device("cpu"), lambda: None)
    assert [(r["workers"], r["images_per_s"], r["images_per_s_per_worker"]) for r in rows] == [(0, 4.0, 4.0),
                                                                                              (2, 6.0, 3.0)]


def test_end_to_end_rows_take_the_loader_rate_at_their_own_worker_count_and_the_median_host_wait(monkeypatch):
    import argparse
    import types

    import torch

    from benchmarks import throughput

    clock = [0.0]
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    waits = [1.0, 0.0, 3.0]  # seconds the host waits in next() for each batch, in rounds 1, 2 and 3

    class Loader:  # 4 batches of 2 images an epoch; one epoch per round (a window of 1 + 2 steps, then drained)
        epochs = 0

        def __iter__(self):
            self.epochs += 1
            for i in range(4):
                clock[0] += waits[self.epochs - 1]
                yield torch.zeros(2, 3, 4, 4), torch.tensor([0, i])

    def step(x, y):  # 1 s, the ceiling's and the loader's
        clock[0] += 1.0

    monkeypatch.setattr(throughput, "shard_loaders", lambda *args: iter([("shards_a", "original", Loader())]))
    loader_rows = [{"name": "shards_a", "workers": 1, "images_per_s": 4.0},  # the loaders part at 1 and 2 workers
                   {"name": "shards_a", "workers": 2, "images_per_s": 1.0}]
    a = argparse.Namespace(e2e_unit="steps", batch_size=2, img_size=8, workers=2, steps=2, warmup_steps=1, repeats=3,
                           profile=None)
    (row,), _ = throughput.bench_end_to_end(a, torch.device("cpu"), {}, loader_rows, step, lambda: None)
    # each round's 2 timed steps: 2 x (wait + 1 s); the host waits 1/2, 0 and 3/4 of it: median 1/2 (mean 5/12)
    assert (row["ceiling_images_per_s"], row["images_per_s"], row["host_wait_frac"]) == (2.0, 1.0, 0.5)
    # against the loaders part's rate at --workers 2 (L = 1 img/s, S = 2 img/s), not at 1 worker
    assert (row["workers"], row["fraction_if_overlapped"], row["fraction_if_serial"]) == (2, 0.5, pytest.approx(1 / 3))


def test_packing_is_timed_with_1_and_all_workers_in_images_per_second_of_both_splits(monkeypatch, tmp_path):
    import types

    from benchmarks import throughput

    clock, packed = [0.0], []

    def pack(data, out, opts, progress):  # 10 train + 2 val images, 4 s with 1 worker, 1 s with 4
        packed.append(opts.workers)
        clock[0] += 4.0 / opts.workers
        return {"splits": {"train": {"num_samples": 10}, "val": {"num_samples": 2}}}

    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(throughput, "pack", pack)
    assert throughput.bench_packing(tmp_path, tmp_path, 4) == [{"workers": 1, "images": 12, "images_per_s": 3.0},
                                                              {"workers": 4, "images": 12, "images_per_s": 12.0}]
    assert packed == [1, 4] and [r["workers"] for r in throughput.bench_packing(tmp_path, tmp_path, 1)] == [1]


def test_a_transforms_cost_is_milliseconds_per_image_of_the_images_it_had(tiny_data, monkeypatch):
    import itertools
    import types

    from benchmarks import throughput

    ticks = itertools.count()  # each reading of the clock 1 s after the last: each stage's pass takes 1 s
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    files = throughput.train_files(tiny_data)[:4]
    rows = throughput.bench_transforms(files, 32)  # n=200 by default: 4 images here, not 200
    from vitdeit.data import torch_loader

    assert len(rows) == 7 + (torch_loader.decode_image is not None)  # (a torchvision with its decoders times them)
    assert {r["ms_per_image"] for r in rows} == {1000 / 4}


def test_the_tables_give_each_figure_in_its_column(capsys):
    from benchmarks import throughput

    result = {"machine": {"cpu": "c", "cpu_count": 2, "gpu": None, "torch": "t", "timm": "m", "nvidia.dali": None,
                          "git_commit": None},
              "images": {"count": 24, "mean_kb": 110.0}, "settings": {"img_size": 32, "batch_size": 4},
              "loaders": [{"name": n, "workers": w, "images_per_s": r, "images_per_s_per_worker": r / w}
                          for n, w, r in (("imagefolder", 1, 100.0), ("shards_torch", 1, 250.0),
                                          ("imagefolder", 2, 150.0), ("shards_torch", 2, 600.0))],
              "model_step": [{"model": "vit_tiny", "compile": False, "dtype": "fp32", "layout": "nchw",
                              "batch_size": 4, "images_per_s": 42.0, "peak_mem_gb": None}],
              "end_to_end": [{"loader": "shards_torch", "images_per_s": 50.0, "ceiling_images_per_s": 100.0,
                              "fraction_of_ceiling": 0.5, "host_wait_frac": 0.25, "fraction_if_serial": 0.75,
                              "fraction_if_overlapped": 1.0},
                             {"loader": "shards_torch_resized", "images_per_s": 110.0, "ceiling_images_per_s": 100.0,
                              "fraction_of_ceiling": 110.0 / 100.0, "host_wait_frac": 0.0, "fraction_if_serial": None,
                              "fraction_if_overlapped": None}]}
    throughput.print_tables(result)
    lines = capsys.readouterr().out.splitlines()
    # a loader row: img/s, img/s per worker, and img/s over the imagefolder baseline's at the same worker count
    assert [line.split() for line in lines if line.startswith("shards_torch ")] == [
        ["shards_torch", "1", "250.0", "250.0", "2.50"], ["shards_torch", "2", "600.0", "300.0", "4.00"]]
    assert [line.split() for line in lines if line.startswith("vit_tiny")] == [
        ["vit_tiny", "False", "fp32", "nchw", "42.0"]]
    assert [line for line in lines if line.startswith("end to end")] == [
        "end to end shards_torch                      50.0 img/s = 0.50 of 100.0, host waits 25 %  (from the "
        "rates alone: 0.75 if serial, 1.00 if overlapped)",
        "end to end shards_torch_resized             110.0 img/s = 1.10 of 100.0, host waits 0 %"]
    assert not [line for line in lines if line.startswith("note:")]  # 1.10 itself is not over 1.10


def test_the_gpu_session_trains_with_the_defaults_unless_another_setting_fed_the_step_3_percent_faster(tmp_path):
    from benchmarks.pick_setting import pick, rates

    def step(name, rows, **settings):
        (tmp_path / name).mkdir()
        (tmp_path / name / "throughput.json").write_text(json.dumps(
            {"settings": settings, "end_to_end": [{"loader": n, "images_per_s": r} for n, r in rows]}))

    step("profile", [("shards_dali@pf2", 1000.0), ("shards_dali@pf4", 1020.0), ("shards_dali_resized@pf4", 5000.0),
                     ("shards_torch", 9000.0)], dali_prefetch=[2, 4])
    step("launches", [("shards_dali", 1031.0), ("shards_dali@legacy", 8000.0)], dali_prefetch=[4])  # one depth: 4
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "throughput.json").write_text('{"end_to_end": [')  # cut short: a step killed mid-write
    found = rates(tmp_path, ["profile", "launches", "side", "train"])  # train: never ran
    assert found == {"profile:pf2": 1000.0, "profile:pf4": 1020.0, "launches:pf4": 1031.0}
    assert pick(found) == "launches:pf4"  # 3.1 % faster than the defaults
    assert pick({**found, "launches:pf4": 1030.0}) == "profile:pf2"  # 3.0 %: within the rounds' noise
    assert pick({"launches:pf4": 1.0}) == "launches:pf4"  # the defaults' step failed: whatever ran
    assert pick({}) == "profile:pf2"


def test_the_resized_rows_shards_hold_images_at_resize_short_one_under_val_resize_is_noted_and_the_json_says_so(
        tmp_path, capsys):
    import io

    from benchmarks import throughput
    from test_packing import read_tar

    def shorter_sides(shards: Path) -> list[int]:
        return [min(Image.open(io.BytesIO(sample["jpg"])).size) for path in sorted(shards.glob("train-*.tar"))
                for sample in read_tar(path).values()]

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)  # 40-64 px images
    json_path = tmp_path / "b.json"
    for size, resize, noted in ((32, 36, False), (32, 35, True)):  # val resizes 32 px crops from floor(32 / 0.875)
        assert throughput.main(["--data-path", str(data), "--work-dir", str(tmp_path / "w"), "--parts", "data",
                                "--no-dali", "--workers", "1", "--img-size", str(size), "--resize-short", str(resize),
                                "--json", str(json_path)]) == 0
        out = capsys.readouterr().out
        assert (f"note: --resize-short {resize} is under the 36 px shorter side train.py's val resizes to at "
                f"--img-size 32; train.py warns that shards packed so are upscaled.\n" in out) == noted
        settings = json.loads(json_path.read_text())["settings"]
        assert settings["e2e_unit"] == "steps" and settings["device"] == "cpu"  # auto, resolved as on a CPU
        # the *_resized rows' shards: every image at --resize-short; the other rows' the originals
        assert shorter_sides(tmp_path / "w" / f"shards_{resize}") == [resize] * 8
        assert len(originals := shorter_sides(tmp_path / "w" / "shards")) == 8 and min(originals) >= 40


def test_a_traces_copies_are_its_memcpys_and_its_memsets():
    from benchmarks import traces

    events = [{"ph": "X", "cat": "user_annotation", "name": traces.window_name(1), "ts": 0, "dur": 1000, "tid": 5},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 100, "dur": 40, "args": {"stream": 7}},
              {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 300, "dur": 20, "args": {"stream": 7}},
              {"ph": "X", "cat": "kernel", "name": "k", "ts": 500, "dur": 100, "args": {"stream": 7}}]
    s = traces.summary(events)
    assert s["copy_ms_per_step"] == pytest.approx(0.06) and s["gpu_busy_frac"] == pytest.approx(0.16)


def test_packing_is_timed_from_an_empty_folder_on_a_rerun_in_the_same_work_dir(tmp_path, monkeypatch):
    from benchmarks import throughput

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    real, found = throughput.pack, []  # (a pack into a finished one reuses its shards: 20x the images/s)
    monkeypatch.setattr(throughput, "pack", lambda d, out, **k: found.append(Path(out).exists()) or real(d, out, **k))
    for _ in range(2):  # a rerun in the same --work-dir, as gpu_check.sh's BENCH_DIR on a warm machine
        throughput.bench_packing(data, tmp_path / "w", 2)
    assert found == [False] * 4  # 1 worker and 2, twice


def test_transform_costs_are_timed_on_one_thread_after_the_warm_up_and_give_the_threads_back(tiny_data, monkeypatch):
    import types

    import torch

    from benchmarks import throughput

    clock, threads = [0.0], []
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def classic(*a, **k):  # the baseline's stage: 1 s a call, noting the threads it ran on
        def transform(img):
            threads.append(torch.get_num_threads())
            clock[0] += 1.0
        return transform

    monkeypatch.setattr(throughput, "classic_transform", classic)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # (not this 2-core VM's own count: a "restore" to the default would not pass)
    try:
        rows = {r["name"]: r["ms_per_image"] for r in throughput.bench_transforms(throughput.train_files(tiny_data)[:4],
                                                                                   32)}
        assert set(threads) == {1} and torch.get_num_threads() == 3  # the model part after it has its threads back
    finally:
        torch.set_num_threads(before)
    assert rows["baseline_transform (decode + classic PIL train transform)"] == 1000.0  # (warm-up calls untimed)


def test_the_loaders_take_turns_one_epoch_each_per_round(monkeypatch):
    import argparse

    import torch

    from benchmarks import throughput

    order = []
    monkeypatch.setattr(throughput, "imagefolder_loader", lambda *a: "imagefolder")
    monkeypatch.setattr(throughput, "shard_loaders", lambda *a: iter([("shards_a", "original", "shards_a")]))
    monkeypatch.setattr(throughput, "epoch_seconds", lambda loader, sync: order.append(loader) or (4, 1.0))
    a = argparse.Namespace(loader_workers="1", workers=1, img_size=8, batch_size=4, interpolation="bilinear",
                           repeats=2, rand_augment="")
    throughput.bench_loaders(a, Path("unused"), {}, torch.device("cpu"), lambda: None)
    assert order == ["imagefolder", "shards_a"] * 3  # a warm-up round, then the 2 timed rounds, in turn


def test_the_resize_filter_and_output_size_reach_every_loader_of_the_comparison(tiny_data, tiny_shards, monkeypatch):
    import argparse

    import torch
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    from benchmarks import throughput

    a = argparse.Namespace(img_size=32, batch_size=4, interpolation="bicubic", rand_augment="", dali=True,
                           dali_hw_decoder_load=[0.65], dali_executor=["dynamic"], dali_prefetch=[2])
    cfgs, built = [], []
    with monkeypatch.context() as m:
        m.setattr(throughput, "build_loader", lambda cfg, *r: cfgs.append(cfg) or [])
        m.setattr(throughput, "dali_available", lambda: True)
        list(throughput.shard_loaders(a, {"original": tiny_shards}, 1, torch.device("cpu")))
        m.setattr(throughput, "imagefolder_loader", lambda *args: built.append(args) or [])
        m.setattr(throughput, "shard_loaders", lambda *args: iter([]))
        a.loader_workers, a.workers, a.repeats = "1", 1, 1
        throughput.bench_loaders(a, Path("unused"), {}, torch.device("cpu"), lambda: None)
    assert {(c.loader, c.interpolation, c.img_size, c.batch_size) for c in cfgs} == {
        ("torch", "bicubic", 32, 4), ("dali", "bicubic", 32, 4)}
    assert built[0][1:5] == (32, 4, 1, "bicubic")  # the baseline's size, batch, workers and filter
    baseline = throughput.imagefolder_loader(tiny_data, 32, 4, 0, "bicubic")
    crop, = [t for t in baseline.dataset.datasets[0].transform.transforms if isinstance(t, RandomResizedCrop)]
    assert crop.interpolation == InterpolationMode.BICUBIC
    x, _ = next(iter(baseline))
    xs = next(iter(throughput.shard_loader(a, tiny_shards, "torch", 0, torch.device("cpu"))))[0]
    assert x.shape == xs.shape == (4, 3, 32, 32) and x.dtype == xs.dtype == torch.float32


def test_each_model_step_rows_layout_is_the_layout_its_timed_steps_ran(monkeypatch):
    import types

    import torch

    from benchmarks import throughput

    ran, marks, call = [], [], throughput.Step.__call__

    def spied(self, x, y):  # the input's memory format and the first convolution's weights'
        weight = next(p for p in self.model.parameters() if p.dim() == 4)
        ran.append((x.is_contiguous(memory_format=torch.channels_last),
                    weight.is_contiguous(memory_format=torch.channels_last)))
        return call(self, x, y)

    def timed(fn, repeats, sync):  # where each row's timed steps begin and end among the steps run
        marks.append(len(ran))
        fn()
        marks.append(len(ran))
        return 1.0

    monkeypatch.setattr(throughput.Step, "__call__", spied)
    monkeypatch.setattr(throughput, "timed", timed)
    a = types.SimpleNamespace(img_size=32, batch_size=2, compile_mode="default", amp=False, compile=False,
                              warmup_steps=1, steps=1, repeats=1)
    rows, _ = throughput.bench_model_step(a, torch.device("cpu"), lambda: None)
    assert [(r["model"], r["layout"]) for r in rows] == [(m, layout) for m in (
        "vit_tiny", "resnet18", "deit_tiny_distill + resnet18 teacher") for layout in ("nchw", "channels_last")]
    for row, start, end in zip(rows, marks[::2], marks[1::2]):  # the steps each row timed
        cl = row["layout"] == "channels_last"
        assert end > start and set(ran[start:end]) == {(cl, cl)}  # the input and the weights, as the row says


def test_gpu_train_divides_by_the_compiled_deit_row_where_no_end_to_end_part_ran(tmp_path):
    code = (ROOT / "benchmarks/gpu_train.sh").read_text().split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    runs = tmp_path / "runs"
    for run in ("teacher", "deit"):
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "images_per_s": 100.0,
                                                              "data_wait_frac": 0.0, "val_top1": 1.0}) + "\n")
    (runs / "deit" / "config.json").write_text(json.dumps({"compile_mode": "auto", "device": "cpu"}))
    bench = tmp_path / "b.json"  # gpu_check.sh --parts model: model-step rows only
    bench.write_text(json.dumps({"settings": {"compile_mode": "default"}, "model_step": [
        {"model": "vit_tiny", "compile": True, "images_per_s": 1000.0},
        {"model": "deit_tiny_distill + resnet18 teacher", "compile": False, "images_per_s": 50.0},
        {"model": "deit_tiny_distill + resnet18 teacher", "compile": True, "images_per_s": 400.0}]}))
    run = subprocess.run([sys.executable, "-", str(runs), str(bench)], input=code, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    deit = [line for line in run.stdout.splitlines() if line.startswith("deit")]
    assert [float(line.split()[-1]) for line in deit] == [0.25]  # 100 / 400: not the eager row's 50, nor the ViT's
