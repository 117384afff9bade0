#!/usr/bin/env python
"""Throughput in images/s: loaders, model step, end to end, packing; side by side, on one machine.

    python benchmarks/throughput.py                      # CPU-sized defaults, a few minutes on 2 cores
    python benchmarks/throughput.py --device cuda --batch-size 256 --json bench.json
    python benchmarks/throughput.py --data-path DIR      # your own ImageNet-style folders

Without --data-path it makes its own ImageNet-sized JPEG set (benchmarks/imageset.py says how), packs
it twice (originals and --resize-short), and measures every loader on the same images, same output
size and batch size. Loader, model-step and end-to-end figures are medians of --repeats timed runs after
warm-up (packing: one timed run per worker count; transforms: one pass); CUDA timings synchronise. The JSON
schema is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vitdeit  # noqa: E402

vitdeit.use_cuda_connections()  # as train.py: before torch can touch the GPU

import torch  # noqa: E402

from vitdeit.classes import ClassMap, load_manifest  # noqa: E402
from vitdeit.config import (COMPILE_MODES, DALI_EXECUTORS, INTERPOLATIONS, STEP_STREAMS, Config,  # noqa: E402
                            rand_augment_problem, refuse_below, usable_cores)
from vitdeit.data import MEAN, STD, build_loader, dali_available, val_resize  # noqa: E402
from vitdeit.distributed import Dist, resolve_device  # noqa: E402
from vitdeit.engine import Step, compile_for_training, compile_mode, step_stream  # noqa: E402
from vitdeit.machine import describe  # noqa: E402
from vitdeit.models import create_model, frozen_teacher  # noqa: E402
from vitdeit.errors import (DataError, SettingError, VitdeitError, first_line, output_folder, say_error,  # noqa: E402
                            save_output)
from vitdeit.packing import SKIP_FLAG, PackOptions, find_split_dirs, holds_shards, pack, scan_split  # noqa: E402
from vitdeit.trainer import (AMP_NAME, batch_augmentation, lr_schedule, make_loss, make_optimizer,  # noqa: E402
                             resolve_amp, to_device)

from benchmarks import traces  # noqa: E402


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of fn() over `repeats` runs (fn does its own warm-up if it needs one)."""
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def few_batches(n_train: int, a, fix: str, where: str = "") -> None:
    """Refuse, before any work, a run whose loaders would time nothing: every loader drops a last partial batch, and
    DALI's fresh_epoch skips the batches it decoded ahead (its deepest --dali-prefetch)."""
    if n_train < a.batch_size:
        raise SettingError(f"--batch-size {a.batch_size}: more than the {n_train} train images{where}; {fix}")
    ahead = max(a.dali_prefetch) if a.dali and dali_available() else 0
    if n_train // a.batch_size <= ahead:
        raise SettingError(f"{n_train // a.batch_size} batches per epoch ({n_train} train images{where} / --batch-size "
                           f"{a.batch_size}): DALI decodes the first {ahead} of each ahead, so none would be timed; "
                           f"{fix} (more than {ahead} batches), or pass --no-dali")


def fresh_epoch(loader):
    """A new epoch's iterator, past the batches the loader decoded before the epoch was asked for: DALI's iterator
    decodes its next epoch's first `decoded_ahead` batches as soon as one ends, while other units are timed. Those
    are taken here, outside any timed window, and not counted; the PyTorch loader's workers wait for iter()."""
    ahead = getattr(loader, "decoded_ahead", 0)
    if ahead and len(loader) <= ahead:  # (a newly built DALI iterator holds one more: the warm-up epoch takes it)
        raise SettingError(f"{len(loader)} batches per epoch: DALI decodes the first {ahead} of each ahead, so none "
                           f"would be timed; give more images per batch size (train images / --batch-size > {ahead})")
    it = iter(loader)
    for _ in range(ahead):
        next(it)
    return it


def epoch_seconds(loader, sync) -> tuple[int, float]:
    """(images, seconds) of one whole epoch of `loader` from a fresh iterator (less any batches decoded before it:
    fresh_epoch)."""
    it = fresh_epoch(loader) if getattr(loader, "decoded_ahead", 0) else None
    sync()
    t = time.perf_counter()
    images = sum(len(batch[1]) for batch in it or iter(loader))  # the PyTorch loader's iter() starts its workers
    sync()
    return images, time.perf_counter() - t


def shard_loader(a, sdir: Path, backend: str, workers: int, device,
                 hw_decoder_load: float = Config.dali_hw_decoder_load, executor: str = Config.dali_executor,
                 prefetch: int = Config.dali_prefetch):
    """The project's train loader on the shards in `sdir`, as train.py builds it, at the benchmark's sizes."""
    cfg = Config(data_path=str(sdir), img_size=a.img_size, batch_size=a.batch_size, workers=workers,
                 loader=backend, progress=False, dali_hw_decoder_load=hw_decoder_load, interpolation=a.interpolation,
                 rand_augment=a.rand_augment, dali_executor=executor, dali_prefetch=prefetch)
    return build_loader(cfg, load_manifest(sdir), "train", Dist(device=device))


def shard_loaders(a, shard_dirs: dict, workers: int, device):
    """(name, shard-set label, loader) for every shard set x backend: shards_torch, shards_dali(_cpu), each +
    _resized; DALI once per --dali-hw-decoder-load value (on a GPU), --dali-executor and --dali-prefetch, named with
    "@hwVALUE", "@EXECUTOR" and "@pfDEPTH" where there are several."""
    # the CPU decoder has no hardware share
    loads = a.dali_hw_decoder_load if device.type == "cuda" else [Config.dali_hw_decoder_load]
    for label, sdir in shard_dirs.items():
        suffix = "_resized" if label != "original" else ""
        yield "shards_torch" + suffix, label, shard_loader(a, sdir, "torch", workers, device)
        variants = itertools.product(loads, a.dali_executor, a.dali_prefetch) if dali_available() and a.dali else []
        for hw, ex, pf in variants:
            name = "shards_dali" + ("_cpu" if device.type == "cpu" else "") + suffix
            yield (name + (f"@hw{hw:g}" if len(loads) > 1 else "") + (f"@{ex}" if len(a.dali_executor) > 1 else "")
                   + (f"@pf{pf}" if len(a.dali_prefetch) > 1 else ""), label,
                   shard_loader(a, sdir, "dali", workers, device, hw, ex, pf))


def dali_error(a, sdir: Path, device) -> str | None:
    """None if a DALI train loader on `device` builds and yields a batch; else the error, so that a DALI failure
    (a new GPU's decoder, a partial install) costs its rows, not the whole (GPU) run."""
    try:
        # with the most hardware decoding asked for: the engines are what a new GPU may lack
        next(iter(shard_loader(a, sdir, "dali", 1, device, max(a.dali_hw_decoder_load))))
    except Exception as e:  # noqa: BLE001 -- any failure: report it, go on without DALI
        return f"{type(e).__name__}: {e}"
    return None


def classic_transform(img_size: int, interpolation: str, rand_augment: str = ""):
    """The baseline's train transform: what users start from (PIL in, normalised float tensor out), with timm's
    RandAugment after the flip where asked, as in the DeiT reference's transform."""
    from torchvision import transforms as T

    from vitdeit.data import timm_rand_augment

    crop = T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode(interpolation))
    ra = [timm_rand_augment(rand_augment, interpolation)] if rand_augment else []  # timm's, as train.py's
    return T.Compose([crop, T.RandomHorizontalFlip(), *ra, T.ToTensor(), T.Normalize(MEAN, STD)])


def imagefolder_loader(data_dir: Path, img_size: int, batch_size: int, workers: int, interpolation: str,
                       rand_augment: str = ""):
    """The baseline users start from: ImageFolder (one per train folder) + classic PIL transforms + DataLoader."""
    import torchvision

    tf = classic_transform(img_size, interpolation, rand_augment)
    packed = {os.path.abspath(f) for f in train_files(data_dir)}  # the packer's images, no more (._x.JPEG) or less
    ds = torch.utils.data.ConcatDataset([
        torchvision.datasets.ImageFolder(str(d), tf, is_valid_file=lambda f: os.path.abspath(f) in packed,
                                         allow_empty=True) for d in find_split_dirs(data_dir)["train"]])
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def bench_loaders(a, data_dir: Path, shard_dirs: dict, device, sync) -> list[dict]:
    """images/s of each loader over whole epochs, each from a fresh iterator: a window of a few batches would
    mostly drain what workers x prefetch_factor batches had decoded ahead (an epoch includes its start-up, each
    worker's first batch, which weighs more on a small image set than on a real epoch). One warm-up epoch each
    (workers started, files mapped), then --repeats rounds in which every loader runs one epoch in turn, so that
    a busy moment of a shared machine hits them all alike; the median epoch per loader."""
    rows = []
    for w in sorted({int(w) for w in (a.loader_workers or f"1,{a.workers}").split(",")}):
        baseline = imagefolder_loader(data_dir, a.img_size, a.batch_size, w, a.interpolation, a.rand_augment)
        loaders = {"imagefolder": (baseline, lambda: None)}
        data = {"imagefolder": "original JPEGs"}
        for name, label, loader in shard_loaders(a, shard_dirs, w, device):
            loaders[name], data[name] = (loader, sync), label
        images = {name: epoch_seconds(*ls)[0] for name, ls in loaders.items()}  # warm-up
        secs = {name: [] for name in loaders}
        for _ in range(a.repeats):
            for name, ls in loaders.items():
                secs[name].append(epoch_seconds(*ls)[1])
        for name in loaders:
            rows.append({"name": name, "images_per_s": images[name] / statistics.median(secs[name]), "workers": w,
                         "data": data[name]})
        del loaders
    for r in rows:
        r["images_per_s_per_worker"] = r["images_per_s"] / max(1, r["workers"])
    return rows


def train_files(data_dir: Path) -> list[Path]:
    """The train images of ImageNet-style folders, found as pack_shards.py finds them (dotfiles skipped, a stray
    file or folder a DataError naming it), so that every loader measures the same images."""
    if holds_shards(data_dir):  # train.py's and viz.py's --data-path: the packed shards
        raise DataError(f"{data_dir}: holds packed shards; --data-path here takes the ImageNet-style JPEG folders "
                        f"(train.X*/, val.X/, Labels.json) they were packed from: the benchmark packs them itself.")
    labels, split_dirs = data_dir / "Labels.json", find_split_dirs(data_dir)  # (a wrong --data-path named first)
    if not labels.is_file():  # (the packer's own advice, --labels PATH, is pack_shards.py's flag: not one here)
        raise DataError(f"{labels}: not found; --data-path's folders need their Labels.json (WNID -> name) beside "
                        f"train.X*/ and val.X/, as pack_shards.py's do: copy this repository's Labels.json there "
                        f"(ImageNet-100's classes), or write one for yours.")
    files = [Path(s.path) for s in scan_split(split_dirs["train"], ClassMap.from_file(labels), labels)]
    if not files:
        raise DataError(f"{data_dir}: its train folders hold no images; --data-path needs ImageNet-style folders.")
    return files


def bench_transforms(files: list[Path], img_size: int, n: int = 200) -> list[dict]:
    """Milliseconds per image on one core, in this process: where a loader's time goes (why the PyTorch
    loader decodes with torchvision and resizes with torch rather than PIL)."""
    import io
    import random

    import torch.nn.functional as F
    from PIL import Image

    from vitdeit.data.torch_loader import TrainTransform, decode_image, decode_rgb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    datas = [f.read_bytes() for f in files[:n]]
    decoded = []
    for f, d in zip(files, datas):
        try:
            decoded.append(Image.open(io.BytesIO(d)).convert("RGB"))
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds for a file that is no image
            raise DataError(f"{f}: not a readable image ({type(e).__name__}); move it out of --data-path") from None
    tensors = [decode_rgb(d) for d in datas]
    train_tf, rng = TrainTransform(img_size), random.Random(0)
    boxes = [train_tf.crop_box(*im.size, rng) for im in decoded]
    classic = classic_transform(img_size, "bilinear")

    def torch_resize(i, mode):
        x, (left, top, w, h) = tensors[i], boxes[i]
        crop = x[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=(img_size, img_size), mode=mode, antialias=True)

    def pil_resize(i, resample):
        left, top, w, h = boxes[i]
        return decoded[i].resize((img_size, img_size), resample, box=(left, top, left + w, top + h))

    cases = {
        "decode_pil": lambda i: Image.open(io.BytesIO(datas[i])).convert("RGB"),
        **({"decode_torchvision": lambda i: decode_rgb(datas[i])}  # (a torchvision with its decoders: 0.29 has)
           if decode_image is not None else {}),
        "crop_resize_pil": lambda i: pil_resize(i, Image.BILINEAR),
        "crop_resize_torch_uint8": lambda i: torch_resize(i, "bilinear"),
        "crop_resize_pil_bicubic": lambda i: pil_resize(i, Image.BICUBIC),  # --interpolation bicubic's costs
        "crop_resize_torch_uint8_bicubic": lambda i: torch_resize(i, "bicubic"),
        "baseline_transform (decode + classic PIL train transform)": lambda i: classic(
            Image.open(io.BytesIO(datas[i])).convert("RGB")),
        "train_transform (this project's worker, decode included)": lambda i: train_tf(datas[i], rng),
    }
    rows = []
    for name, fn in cases.items():
        for i in range(min(10, len(datas))):  # warm-up (a user's set may hold fewer images)
            fn(i)
        t = time.perf_counter()
        for i in range(len(datas)):
            fn(i)
        ms = (time.perf_counter() - t) / len(datas) * 1e3
        rows.append({"name": name, "ms_per_image": ms})
        print(f"  {name:60s} {ms:6.2f} ms/image", flush=True)
    torch.set_num_threads(threads)
    return rows


def train_step_fn(model_name: str, a, device, amp_dtype, channels_last: bool, compile_: bool):
    """A closure running one step of train.py's training at its defaults (engine.Step: forward, loss with the
    teacher's forward, backward, clipping, AdamW; before it the lr schedule and the batch augmentations, as
    engine.train_one_epoch), on a batch already on the device."""
    cfg = Config(model=model_name, img_size=a.img_size, batch_size=a.batch_size, channels_last=channels_last)
    net = to_device(create_model(cfg.model, 100, cfg.img_size, cfg.patch_size, cfg.drop_path), cfg, device).train()
    teacher = None
    if model_name == "deit_tiny_distill":
        teacher = to_device(frozen_teacher(create_model(cfg.teacher, 100)), cfg, device)
    optimizer = make_optimizer(net, cfg, cfg.peak_lr(world=1), device)  # train.py's lr for one process
    scheduler, count = lr_schedule(optimizer, cfg, steps=1000), itertools.count()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    augment = batch_augmentation(cfg, 100, device)  # (none at train.py's defaults)
    model, teacher, graphs = compile_for_training(net, teacher, compile_, a.compile_mode)  # as train.py compiles
    train_step = Step(model, make_loss(cfg, teacher), optimizer, scaler, amp_dtype, cfg.clip_grad, graphs)

    def step(x, y):
        scheduler.step_update(next(count))
        x, targets = augment(x, y) if augment is not None else (x, y)
        train_step(x, targets)

    return step, net, teacher


def e2e_setting(device) -> tuple[bool, torch.dtype | None, bool]:
    """(compile, autocast dtype, channels-last) of the end-to-end runs: train.py's default on `device`."""
    return device.type == "cuda", resolve_amp(Config.amp, device), True


def device_batch(a, device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch (images, labels) already on `device`: what the model step is timed on."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(a.batch_size, 3, a.img_size, a.img_size, device=device).contiguous(memory_format=fmt)
    return x, torch.randint(0, 100, (a.batch_size,), device=device)


def bench_model_step(a, device, sync, only_e2e: bool = False):
    """Rows, and the DeiT + teacher step at the end-to-end setting (kept: compiling it again costs ~1 min).
    only_e2e: that step alone (the ceiling of an end-to-end run without the model part: minutes less on a GPU)."""
    rows, e2e_step = [], None
    amp16 = resolve_amp(Config.amp, device) or (torch.bfloat16 if a.amp else None)  # train.py's on a GPU; --amp: CPU
    # eager: fp32 / 16-bit x NCHW / channels-last; compiled: the production setting only (each compile costs ~1 min)
    variants = [(False, amp, cl) for amp in dict.fromkeys([None, amp16]) for cl in (False, True)]
    if device.type == "cuda" or a.compile:
        variants.append((True, amp16, True))
    models = ("vit_tiny", "resnet18", "deit_tiny_distill")
    if only_e2e:
        variants, models = [e2e_setting(device)], ("deit_tiny_distill",)
    # DeiT last: its end-to-end step (kept, with its teacher and optimiser state) would count in later rows' peak memory
    for model_name in models:
        for compile_, amp, cl in variants:
            step, net, teacher = train_step_fn(model_name, a, device, amp, cl, compile_)
            x, y = device_batch(a, device, cl)
            if device.type == "cuda":  # before the warm-up: CUDA graphs allocate the step's memory as they are
                torch.cuda.reset_peak_memory_stats()  # recorded there, and their replays allocate nothing
            for _ in range(a.warmup_steps):
                step(x, y)
            # (the step bound as a default: the loop deletes `step` after its row)
            secs = timed(lambda step=step: [step(x, y) for _ in range(a.steps)], a.repeats, sync)
            rows.append({"model": model_name + (" + resnet18 teacher" if teacher is not None else ""),
                         "compile": compile_, "dtype": AMP_NAME[amp] if amp else "fp32",
                         "layout": "channels_last" if cl else "nchw", "batch_size": a.batch_size,
                         "images_per_s": a.steps * a.batch_size / secs,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None})
            print(f"  model step {rows[-1]['model']:35s} compile={compile_!s:5s} {rows[-1]['dtype']} "
                  f"{rows[-1]['layout']:13s} {rows[-1]['images_per_s']:9.1f} img/s", flush=True)
            if model_name == "deit_tiny_distill" and (compile_, amp, cl) == e2e_setting(device):
                e2e_step = step
            del step, net, teacher
    return rows, e2e_step


def overlap_bounds(loader_alone: float | None, step_alone: float) -> dict:
    """Two reference points for end to end, from the loader's and the step's rates alone (images/s, L and S):
    min(1, L / S) of the step if loading and the step overlap completely (no loader can do better), L / (L + S)
    if they never overlap (each image costs 1/L + 1/S seconds, as when both need the same GPU and it runs one
    at a time). Not a lower bound: start-up and waits can cost more. A measured fraction near the second says
    the loader's work adds to the step's instead of hiding behind it. L comes from whole epochs (start-up
    included), so it reads slightly low against a steady-state end-to-end run."""
    if not loader_alone:
        return {"fraction_if_overlapped": None, "fraction_if_serial": None}
    return {"fraction_if_overlapped": min(1.0, loader_alone / step_alone),
            "fraction_if_serial": loader_alone / (loader_alone + step_alone)}


class EpochStream:
    """A loader's batches across epochs, with drain(): finish the current epoch without using its batches. A drained
    PyTorch loader decodes nothing ahead (its workers wait for the next iter()); DALI decodes the next epoch's first
    `decoded_ahead` batches, which the next window takes unused before its warm-up steps (bench_end_to_end)."""

    def __init__(self, loader):
        self.loader, self.it = loader, None

    def __next__(self):
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            batch = next(self.it, None)
            if batch is not None:
                return batch
            self.it = None  # the epoch ended: the next batch opens a new one

    def drain(self) -> None:
        if self.it is not None:
            for _ in self.it:
                pass
        self.it = None


def bench_end_to_end(a, device, shard_dirs: dict, loader_rows: list[dict], step, sync) -> tuple[list[dict], dict]:
    """The DeiT distillation `step` fed by each loader, against its ceiling: the same step on one batch already on
    the device (float32; DALI's float16 batches run the same model, compiled once more for that dtype), timed in
    turns with the loaders (every round times the ceiling, then each loader), so that the machine drifting between
    timings falls on both alike (on an H200 the compiled step alone moved between 9,400 and 12,800 img/s from one
    call to the next). Rates are medians over --repeats rounds. The timed unit (--e2e-unit auto: epoch on CUDA):
    - epoch: a whole epoch from a fresh iterator, start-up included, as training sees it every epoch;
    - steps: --steps steps after --warmup-steps untimed ones, from a fresh epoch past the batches a loader decoded
      before its turn (window(): DALI's queue, taken unused before the warm-up; crossing into the next epochs if the
      window is longer), then the rest of that epoch drained untimed, so the loader rests until its next turn. On a
      CPU, where the step is ~50x slower than any loader, whole epochs would take minutes each.
    Returns the rows, and each unit's window of --steps steps (name -> a function running one, the ceiling first),
    which --profile DIR runs once more under torch.profiler (profile_windows(), after the rows are saved)."""
    assert a.e2e_unit in ("epoch", "steps"), a.e2e_unit  # main() resolves auto
    whole_epochs = a.e2e_unit == "epoch"
    x, y = device_batch(a, device, channels_last=e2e_setting(device)[2])

    def steps(batches, n=None) -> tuple[int, float, float]:
        """(images, seconds, seconds the host spent blocked in next()) of n steps (None: to the end) on `batches`."""
        images, waited, done = 0, 0.0, 0
        sync()
        t0 = time.perf_counter()
        mark = torch.profiler.record_function(traces.window_name(n)) if n else contextlib.nullcontext()
        with mark:  # a window's span in a --profile trace (a no-op otherwise)
            while n is None or done < n:
                t = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - t
                if batch is None:
                    break
                step(batch[0], batch[1])
                images, done = images + len(batch[1]), done + 1
            sync()
        return images, time.perf_counter() - t0, waited

    def window(batches, drain=lambda: None, ahead: int = 0, n: int = a.steps):
        # the batches a loader decoded while it rested (DALI: its queue of `ahead`) are taken unused: stepped on, they
        # would leave the loader refilling its queue at its own pace while the warm-up steps ran, and a window
        # starting with banked batches times them as free (simulated at the GPU runs' sizes, DALI the limit at 0.89
        # of the step: 0.90 read with a queue of 2, 0.95 with 4; BENCHMARKS.md). Then the untimed warm-up steps bring
        # the queue to its steady level: empty where the loader is the limit, full where the step is.
        for _ in range(ahead):
            next(batches)
        for _ in range(a.warmup_steps):
            step(*next(batches)[:2])
        result = steps(batches, n)
        drain()
        return result

    windows = {"ceiling": lambda n=a.steps: window(itertools.repeat((x, y)), n=n)}  # name -> a window of n steps
    units = dict(windows)  # name -> one timed unit
    for name, _, loader in shard_loaders(a, shard_dirs, a.workers, device):
        stream = EpochStream(loader)
        windows[name] = lambda n=a.steps, stream=stream, ahead=getattr(loader, "decoded_ahead", 0): window(
            stream, stream.drain, ahead, n)
        units[name] = (lambda loader=loader: steps(fresh_epoch(loader))) if whole_epochs else windows[name]
    # whole epochs time their start-up, so one untimed round first (worker start, DALI's first batches, a recompile
    # for a dtype); a window of --e2e-unit steps has its own untimed lead-in for that
    if whole_epochs:
        for run in units.values():
            run()
    runs = {name: [] for name in units}
    for _ in range(a.repeats):
        for name, run in units.items():
            runs[name].append(run())
    rate = {name: statistics.median(n / secs for n, secs, _ in rs) for name, rs in runs.items()}
    ceiling = rate.pop("ceiling")
    alone = {r["name"]: r["images_per_s"] for r in loader_rows if r["workers"] == a.workers}  # same worker count
    rows = []
    for name, r in rate.items():
        wait = statistics.median(waited / secs for _, secs, waited in runs[name])
        rows.append({"loader": name, "model": "deit_tiny_distill + resnet18 teacher", "workers": a.workers,
                     "images_per_s": r, "ceiling_images_per_s": ceiling, "fraction_of_ceiling": r / ceiling,
                     "host_wait_frac": wait, **overlap_bounds(alone.get(name), ceiling)})
        print(f"  end to end {name:28s} {r:9.1f} img/s = {r / ceiling:.2f} of the step's {ceiling:.1f} in the same "
              f"rounds, host waits {100 * wait:.0f} % in next()", flush=True)
    return rows, windows


def trace_file(folder: Path, unit: str) -> Path:
    """folder/UNIT.json.gz, the unit's name kept to letters, digits, '.', '_' and '-' ('shards_dali@hw0.65' ->
    'shards_dali_hw0.65'): names that every copy and transfer tool takes as they are."""
    return folder / (re.sub(r"[^A-Za-z0-9._-]", "_", unit) + ".json.gz")


def profile_windows(windows: dict, device, folder: Path, steps: int):
    """--profile: one more window of `steps` steps of each unit (the ceiling first) under torch.profiler (its warm-up
    steps too, outside the summary's window), with the GPU's activity on CUDA; writes trace_file(folder, UNIT) (a
    Chrome trace) and yields each trace's traces.summary() as it is done (the caller saves each), the ceiling's
    streams counting as the step's. Profiling slows the host: these windows
    diagnose, the timed rounds measure. A failure is yielded as {unit, error} and ends the profiling, never the run
    (the figures measured before are saved by then)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ceiling = None
    for name, run in windows.items():
        path = trace_file(folder, name)
        try:
            with profile(activities=activities) as prof:
                run(steps)
            prof.export_chrome_trace(str(path))
            row = {"unit": name, "trace": str(path),
                   **traces.summary(traces.load(path), None if ceiling is None else set(ceiling["step_streams"]))}
        except Exception as e:  # noqa: BLE001 - a diagnosis must not cost the run it diagnoses
            row = {"unit": name, "error": f"{type(e).__name__}: {first_line(e)}"}
            print(f"  profile {name}: {row['error']} (profiling stops; the figures above stand)", flush=True)
            yield row
            return
        ceiling = ceiling or row
        print("  " + traces.row(name, row, ceiling), flush=True)
        if device.type == "cuda" and not row["gpu_events"]:
            print("  (no GPU activity in this trace: CUPTI recorded nothing, so its GPU columns are empty)", flush=True)
        yield row


def bench_packing(data_dir: Path, work: Path, workers: int) -> list[dict]:
    rows = []
    for w in sorted({1, workers}):
        out = work / f"pack_w{w}"
        shutil.rmtree(out, ignore_errors=True)  # a rerun would otherwise reuse the finished shards
        t = time.perf_counter()
        m = pack(data_dir, out, opts=PackOptions(workers=w, shard_size=256, allow_missing_classes=True),
                 progress=False)
        n = sum(split["num_samples"] for split in m["splits"].values())
        rows.append({"workers": w, "images": n, "images_per_s": n / (time.perf_counter() - t)})
    return rows


def comma_list(convert, ok, expect: str):
    """An argparse type: comma-separated values, each through `convert` and passing `ok`, a repeated one kept once
    (each value names a loader); otherwise an error asking for `expect`."""
    def parse(text: str) -> list:
        try:
            values = list(dict.fromkeys(convert(v) for v in text.split(",")))
        except ValueError:
            values = []
        if not values or not all(map(ok, values)):
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated {expect}")
        return values

    return parse


# --dali-hw-decoder-load, --dali-executor, --dali-prefetch (Config's dali_hw_decoder_load, dali_executor, dali_prefetch)
fractions = comma_list(float, lambda v: 0 <= v <= 1, "numbers in [0, 1], e.g. 0,0.65,1")
executors = comma_list(str, lambda v: v in DALI_EXECUTORS, f"names from {', '.join(DALI_EXECUTORS)}")
depths = comma_list(int, lambda v: v >= 1, "whole numbers >= 1, e.g. 2,4")


def worker_counts(text: str) -> str:
    """argparse type: comma-separated worker counts >= 0 (kept as given: the JSON's settings hold the text)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [-1]
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated worker counts >= 0, e.g. 1,4")
    return text


PARTS = ("transforms", "loaders", "model", "e2e", "packing", "data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="default cpu, on a GPU machine too; auto: cuda where a GPU is seen")
    p.add_argument("--data-path", default=None, help="ImageNet-style folders (default: make a synthetic set)")
    p.add_argument("--num-images", type=int, default=512, help="size of the synthetic train set (default 512)")
    p.add_argument("--work-dir", default=None,
                   help="where to put images and shards, kept for reruns (default: a temp dir, deleted at the end)")
    p.add_argument("--img-size", type=int, default=224,
                   help="px, the loaders' output and the models' input (default 224)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per batch: loaders, model step, end to end (default 16)")
    p.add_argument("--workers", type=int, default=usable_cores(), help="decode processes for the 'all' runs "
                   "(default: the cores this process may use)")
    p.add_argument("--loader-workers", type=worker_counts, default=None,
                   help="comma-separated worker counts of the loader runs (default: 1 and --workers)")
    p.add_argument("--resize-short", type=int, default=256,
                   help="px, the shorter side of the second, pre-resized shard set (default 256)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per model-step repeat and per end-to-end window (the ceiling's always, the "
                   "loaders' with --e2e-unit steps; default 2)")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed steps before each model step's timed repeats and each end-to-end window (default 1; "
                   "the loaders' own warm-up is an untimed epoch)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; each figure is their median (default 3)")
    p.add_argument("--parts", default="transforms,loaders,model,e2e,packing",
                   help="comma-separated subset of transforms, loaders, model, e2e, packing (the default: all five); "
                   "'data' alone makes the images and shards (in --work-dir) and, "
                   "where DALI is installed, runs its one-batch check, nothing else")
    p.add_argument("--e2e-unit", default="auto", choices=["auto", "epoch", "steps"],
                   help="end to end: time whole epochs or --steps steps (auto: epochs on CUDA)")
    p.add_argument("--compile", action="store_true", help="CPU: add torch.compile variants (always on CUDA)")
    p.add_argument("--amp", action="store_true", help="CPU: add bf16 variants (on CUDA always: bf16, or fp16 "
                   "where the GPU has no bf16)")
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled steps, as train.py's: reduce-overhead replays each step's "
                   "kernels as CUDA graphs, launched with a few calls instead of one per kernel from Python; auto: "
                   "that on a GPU, default on a CPU (the JSON's settings give the mode that ran)")
    p.add_argument("--step-stream", default="default", choices=STEP_STREAMS,
                   help="CUDA: run the model-step and end-to-end parts on a side stream instead of PyTorch's default "
                   "(the legacy NULL stream, which also waits for, and holds up, work on any blocking stream); high: "
                   "that stream at CUDA's highest priority, so the GPU schedules the step's waiting thread blocks "
                   "ahead of DALI's (running blocks are not preempted)")
    p.add_argument("--interpolation", default=Config.interpolation, choices=INTERPOLATIONS,
                   help="the loaders' resize filter: train.py's --interpolation, and the baseline's with it (default "
                   f"{Config.interpolation})")
    p.add_argument("--rand-augment", default="", metavar="SPEC",
                   help="train.py's --rand-augment in every loader (the baseline: timm's on PIL images), e.g. "
                        "rand-m9-mstd0.5-inc1; default off")
    p.add_argument("--no-dali", dest="dali", action="store_false", help="skip DALI even where installed")
    p.add_argument("--dali-hw-decoder-load", type=fractions, default=[Config.dali_hw_decoder_load], metavar="LOADS",
                   help="CUDA: comma-separated shares of JPEGs DALI sends to the GPU's hardware JPEG engines; one DALI "
                   f"row per value (e.g. 0,0.65,1; default {Config.dali_hw_decoder_load})")
    p.add_argument("--dali-executor", type=executors, default=[Config.dali_executor], metavar="EXECUTORS",
                   help="comma-separated DALI execution models (train.py's --dali-executor); one DALI row per value "
                   f"(e.g. dynamic,legacy; default {Config.dali_executor})")
    p.add_argument("--dali-prefetch", type=depths, default=[Config.dali_prefetch], metavar="DEPTHS",
                   help="comma-separated DALI prefetch depths, batches decoded ahead (train.py's --dali-prefetch); one "
                   f"DALI row per value (e.g. 2,4; default {Config.dali_prefetch})")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="end to end: after the timed rounds, one more window of --profile-steps steps per unit under "
                   "torch.profiler; a Chrome trace of each (DIR/UNIT.json.gz) and a per-step summary of what the "
                   "GPU did (benchmarks/traces.py)")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="--profile: steps per profiled window (default 10; a GPU trace holds an event per kernel and "
                   "per launch: thousands per step)")
    a = p.parse_args(argv)
    a.device = resolve_device(a.device)  # --device cuda without a GPU: one line, before any work
    if a.step_stream != "default" and a.device != "cuda":
        p.error(f"--step-stream {a.step_stream}: a CUDA stream; use it with --device cuda")
    if a.compile_mode == "reduce-overhead" and a.device != "cuda" and not a.compile:
        p.error(f"--compile-mode {a.compile_mode}: nothing is compiled on a CPU without --compile; add it")
    a.compile_mode = compile_mode(a.compile_mode, torch.device(a.device), world=1)  # the mode that runs
    if a.e2e_unit == "auto":  # the unit that runs, as the JSON's settings record it
        a.e2e_unit = "epoch" if a.device == "cuda" else "steps"
    refuse_below(p, ("--num-images", a.num_images, 1), ("--img-size", a.img_size, 8), ("--batch-size", a.batch_size, 1),
                 ("--workers", a.workers, 1), ("--resize-short", a.resize_short, 8), ("--steps", a.steps, 1),
                 ("--warmup-steps", a.warmup_steps, 0), ("--repeats", a.repeats, 1),
                 ("--profile-steps", a.profile_steps, 1))  # train.py's, pack_shards.py's
    parts = {part.strip() for part in a.parts.split(",")}  # "loaders, model" as typed with a space
    if parts - set(PARTS):
        unknown = ", ".join(repr(x) if not x else x for x in sorted(parts - set(PARTS)))  # ('' for an empty one)
        p.error(f"--parts {a.parts!r}: no part {unknown}; choose from {', '.join(PARTS)}")
    if parts & {"loaders", "e2e", "data"} and a.resize_short < val_resize(a.img_size, Config.crop_pct):
        print(f"note: --resize-short {a.resize_short} is under the {val_resize(a.img_size, Config.crop_pct)} px "
              f"shorter side train.py's val resizes to at --img-size {a.img_size}; train.py warns that shards packed "
              f"so are upscaled" + ("; the resized rows time them as packed." if parts & {"loaders", "e2e"} else
                                    "."), flush=True)
    if parts & {"model", "e2e"} and a.img_size % 16:  # the ViT/DeiT steps use train.py's default 16 px patches
        p.error(f"--img-size {a.img_size}: train.py's ViT/DeiT need --patch-size (16 here, its default) to divide "
                f"--img-size; use a multiple of 16")
    if a.json and (Path(a.json).is_dir() or not Path(a.json).parent.is_dir()):
        p.error(f"--json {a.json}: " + ("a folder; name a file in it" if Path(a.json).is_dir() else
                                        f"its folder {Path(a.json).parent} does not exist; create it or pass another"))
    if a.rand_augment and (problem := rand_augment_problem(a.rand_augment)):  # (timm's bare assert, after packing)
        p.error(f"--rand-augment {a.rand_augment!r}: {problem}; e.g. 'rand-m9-mstd0.5-inc1', as train.py takes it")
    if a.profile and "e2e" not in parts:
        p.error(f"--profile {a.profile}: profiles the end-to-end windows; add e2e to --parts")
    if a.work_dir and Path(a.work_dir).exists() and not Path(a.work_dir).is_dir():
        p.error(f"--work-dir {a.work_dir}: a file, not a folder; pass a folder (it is made if missing)")
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="vitdeit-bench-"))
    if not a.work_dir:  # a temp folder of images and shards (~30 MB at the defaults): gone when the run ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    output_folder(work, "--work-dir", is_folder=True)
    if a.profile:
        output_folder(Path(a.profile), "--profile", is_folder=True)
    result = {"machine": describe(device, dali=dali_available()),  # (DALI's version wherever it is installed)
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "settings": dict(vars(a)), "seconds": {}}  # a copy: a DALI failure turns a.dali off later
    start = time.perf_counter()

    @contextlib.contextmanager
    def part_seconds(part: str):  # wall-clock seconds of each part, for the JSON and the header: where time goes
        t = time.perf_counter()
        yield
        result["seconds"][part] = round(time.perf_counter() - t, 1)

    def save(write=lambda path: path.write_text(json.dumps(result, indent=1)),  # after every part: a run stopped
             kept="the figures measured so far are in the lines printed above"):  # at a time limit keeps them
        if a.json:
            save_output(Path(a.json), write, kept, flag="--json")

    # a --json that cannot be written stops the run before any work: a new one gets the machine and settings, an
    # earlier run's is opened to append, nothing written (its figures stay until this run has measured its own)
    before = "nothing was measured: the run stops before any work"
    if a.json and Path(a.json).exists():
        save(lambda path: open(path, "a").close(), kept=before)
    else:
        save(kept=before)

    if not a.data_path and parts & {"loaders", "e2e"}:  # the synthetic set's counts: known before it is made
        few_batches(a.num_images, a, "raise --num-images or lower --batch-size")
    data_dir = Path(a.data_path) if a.data_path else work / "images"
    with part_seconds("data"):  # the images, the shards and DALI's one-batch check
        if not a.data_path and not (data_dir / "Labels.json").exists():  # (written last: a killed run's set is redone)
            from benchmarks.imageset import make_imageset

            shutil.rmtree(data_dir, ignore_errors=True)  # a killed run's partial set, in the benchmark's own folder
            print(f"making {a.num_images} synthetic ImageNet-sized JPEGs in {data_dir} ...", flush=True)
            make_imageset(data_dir, ROOT / "Labels.json", n_train=a.num_images, n_val=max(16, a.num_images // 8))
        files = train_files(data_dir)
        if not a.data_path and len(files) != a.num_images:  # an earlier run's set, kept in --work-dir
            raise SettingError(f"--work-dir {work} holds {len(files)} synthetic train images from an earlier run, not "
                               f"--num-images {a.num_images}; pass --num-images {len(files)}, another --work-dir "
                               f"(gpu_check.sh: BENCH_DIR=DIR), or delete {data_dir}")
        if parts & {"loaders", "e2e"}:  # before the packing: --data-path's count, known now
            few_batches(len(files), a, "lower --batch-size" + ("" if a.data_path else " or raise --num-images"),
                        f" in {data_dir}")
        sizes = [f.stat().st_size for f in files]
        result["images"] = {"path": str(data_dir), "count": len(sizes), "mean_kb": sum(sizes) / len(sizes) / 1024}
        shard_dirs = {}
        if parts & {"loaders", "e2e", "data"}:  # "data" alone: make the images and shards, measure nothing
            for label, resize in (("original", None), (f"resize_short={a.resize_short}", a.resize_short)):
                sdir = work / ("shards" if resize is None else f"shards_{resize}")
                # every run: pack() reuses the shards of unchanged images and repacks any others (another --data-path
                # in the same --work-dir), so that every loader reads the images the baseline reads
                pack(data_dir, sdir, opts=PackOptions(workers=a.workers, resize_short=resize, shard_size=256,
                                                      allow_missing_classes=True),  # (a speed measurement)
                     progress=False, overwrite=True)  # the work dir's own shards, of whichever --data-path
                shard_dirs[label] = sdir
            if a.dali and dali_available():
                result["dali_error"] = dali_error(a, shard_dirs["original"], device)
                if result["dali_error"]:
                    print(f"DALI failed, its rows are skipped: {result['dali_error']}", flush=True)
                    a.dali = False

    save(kept="nothing was measured yet")  # the machine and the images, even when no part measures any (--parts data)
    if "packing" in parts:
        print("packing ...", flush=True)
        with part_seconds("packing"):
            result["packing"] = bench_packing(data_dir, work, a.workers)
        save()
    if "transforms" in parts:
        print("per-image costs on one core ...", flush=True)
        with part_seconds("transforms"):
            result["transforms"] = bench_transforms(files, a.img_size)
        save()
    if "loaders" in parts:
        print("loaders ...", flush=True)
        with part_seconds("loaders"):
            result["loaders"] = bench_loaders(a, data_dir, shard_dirs, device, sync)
        save()
        print_tables(result)  # early too: the loader table survives a later time-out in the log
    with step_stream(a.step_stream, device):  # train.py's --step-stream
        if parts & {"model", "e2e"}:
            print("model step ...", flush=True)
            with part_seconds("model"):
                result["model_step"], e2e_step = bench_model_step(a, device, sync, only_e2e="model" not in parts)
            save()
        if "e2e" in parts:
            print("end to end ...", flush=True)
            with part_seconds("e2e"):
                result["end_to_end"], windows = bench_end_to_end(a, device, shard_dirs, result.get("loaders", []),
                                                                 e2e_step, sync)
            save()  # the measured rows first: a crash or a time limit while profiling keeps them
            if a.profile:  # on the step's stream still (--step-stream)
                print("profiled windows ...", flush=True)
                with part_seconds("profile"):
                    result["profile"] = []
                    for row in profile_windows(windows, device, Path(a.profile), a.profile_steps):
                        result["profile"].append(row)
                        save()
    result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    save(**({} if parts - {"data"} else {"kept": "nothing was measured (--parts data)"}))
    print_tables(result)
    return 0


STEP_SWITCHES = ("compile_mode", "step_stream")  # settings that change how the GPU step runs


def step_switches(settings: dict) -> list[str]:
    """A run's GPU-step switches that are not at their defaults, e.g. ['compile-mode reduce-overhead']."""
    return [f"{k.replace('_', '-')} {settings[k]}" for k in STEP_SWITCHES if settings.get(k, "default") != "default"]


ABOVE_CEILING = 1.10  # an end-to-end rate this far over the step alone is noise in the ceiling, not a loader's speed


def print_tables(r: dict) -> None:
    m = r["machine"]
    print(f"\n{m['cpu']} x{m['cpu_count']}, GPU {m['gpu']}, torch {m['torch']}, timm {m['timm']}, "
          f"DALI {m['nvidia.dali']}, commit {str(m['git_commit'])[:10]}; {r['images']['count']} images, "
          f"mean {r['images']['mean_kb']:.0f} KB; img {r['settings']['img_size']} px, "
          f"batch {r['settings']['batch_size']}"
          + "".join(f", {s}" for s in step_switches(r["settings"]))
          + (f", CUDA connections {m.get('cuda_device_max_connections')}" if m["gpu"] else ""))
    if r.get("seconds"):
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    if "packing" in r:
        for row in r["packing"]:
            print(f"packing    workers={row['workers']:<2d} {row['images_per_s']:9.1f} img/s")
    if "transforms" in r:
        for row in r["transforms"]:
            print(f"{row['name']:60s} {row['ms_per_image']:6.2f} ms/image (1 core)")
    if "loaders" in r:
        base = {row["workers"]: row["images_per_s"] for row in r["loaders"] if row["name"] == "imagefolder"}
        print(f"{'loader':28s} {'workers':>7s} {'img/s':>9s} {'img/s/worker':>13s} {'x imagefolder':>14s}")
        for row in r["loaders"]:
            print(f"{row['name']:28s} {row['workers']:7d} {row['images_per_s']:9.1f} "
                  f"{row['images_per_s_per_worker']:13.1f} {row['images_per_s'] / base[row['workers']]:14.2f}")
    if "model_step" in r:
        print(f"{'model step':36s} {'compile':7s} {'dtype':5s} {'layout':13s} {'img/s':>9s}")
        for row in r["model_step"]:
            print(f"{row['model']:36s} {row['compile']!s:7s} {row['dtype']:5s} {row['layout']:13s} "
                  f"{row['images_per_s']:9.1f}"
                  + (f"  {row['peak_mem_gb']:.1f} GB" if row["peak_mem_gb"] else ""))
    if "end_to_end" in r:
        for row in r["end_to_end"]:
            bounds = ("" if row.get("fraction_if_serial") is None else
                      f"  (from the rates alone: {row['fraction_if_serial']:.2f} if serial, "
                      f"{row['fraction_if_overlapped']:.2f} if overlapped)")
            print(f"end to end {row['loader']:28s} {row['images_per_s']:9.1f} img/s = "
                  f"{row['fraction_of_ceiling']:.2f} of {row['ceiling_images_per_s']:.1f}, host waits "
                  f"{100 * row['host_wait_frac']:.0f} %" + bounds)
        above = [row["loader"] for row in r["end_to_end"] if row["fraction_of_ceiling"] > ABOVE_CEILING]
        if above:  # a loader cannot feed the step faster than the step runs alone: the ceiling read low
            steps, repeats = (r.get("settings", {}).get(k) for k in ("steps", "repeats"))  # (a dry run's: 1 and 1)
            more = f", with more --steps and --repeats than its {steps} and {repeats}" if steps and repeats else ""
            print(f"note: {', '.join(above)} ran over {ABOVE_CEILING:.2f} of the step alone, which no loader can: the "
                  f"ceiling's rounds were slowed (a busy machine, or too few --steps and --repeats). Read no fraction "
                  f"of this run; rerun on an idle machine{more}.")
    if r.get("profile"):
        print(traces.HEADER)
        for row in r["profile"]:
            print(traces.row(row["unit"], row, r["profile"][0]))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitdeitError as e:  # the user's to fix (a folder, a flag): one line; anything else keeps its traceback
        say_error(e)
        if SKIP_FLAG in str(e):  # the packer's advice; here every loader must read the same, readable images
            print(f"(throughput.py has no {SKIP_FLAG}: move the files named above out of --data-path and run it "
                  f"again)", file=sys.stderr)
        sys.exit(1)
