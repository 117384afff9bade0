"""Step / train_one_epoch / evaluate: AMP, CUDA graphs, exact metric sums across ranks, data-wait accounting."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .distributed import all_reduce_sum, unwrap
from .errors import NonFiniteLoss, SettingError, together
from .models import head_logits


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def compile_mode(choice: str, device: torch.device, world: int) -> str:
    """torch.compile's mode for --compile-mode CHOICE: auto is reduce-overhead (CUDA graphs) for a single process on a
    GPU, whose step Python cannot launch fast enough otherwise (an H200 ran the compiled DeiT step at 41 % GPU busy
    under the profiler; as graphs, 1.37x the images/s: BENCHMARKS.md, 2026-12-04), and default elsewhere: a CPU has
    no graphs, and under DDP they were never run here."""
    if choice != "auto":
        return choice
    return "reduce-overhead" if device.type == "cuda" and world == 1 else "default"


def compile_for_training(net, teacher, use_compile: bool, mode: str):
    """(model, teacher, graphs): the student and the teacher compiled in torch.compile's `mode` (or as they are), and
    whether the step runs as CUDA graphs (mode reduce-overhead; a CPU compiles the same, with no graphs, and the
    step's graph marker is only a counter there)."""
    if not use_compile:
        return net, teacher, False
    return (torch.compile(net, mode=mode), None if teacher is None else torch.compile(teacher, mode=mode),
            mode == "reduce-overhead")


@contextmanager
def step_stream(kind: str, device: torch.device):
    """The CUDA stream the training step runs on (--step-stream): PyTorch's default, CUDA's legacy NULL stream, which
    also waits for (and holds up) work on any blocking stream another library queues; 'side', a stream of PyTorch's
    pool (non-blocking); 'high', the same at CUDA's highest priority, so the GPU schedules the step's waiting thread
    blocks ahead of other streams' (a loader's); running blocks are not preempted. A loader that copies its batches
    on the current stream (DALI's iterator, pinned-memory copies) copies on this one."""
    if kind == "default":
        yield
        return
    if device.type != "cuda":
        raise SettingError(f"--step-stream {kind}: a CUDA stream, and this run is on {device.type}; drop it")
    stream = torch.cuda.Stream(device, priority=-100 if kind == "high" else 0)  # lower is higher; clamped to the range
    stream.wait_stream(torch.cuda.current_stream(device))  # after what was queued so far (the weights' set-up)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:  # (an error too: what the caller queues next comes after the run's work)
        torch.cuda.current_stream(device).wait_stream(stream)


@dataclass
class Step:
    """One optimisation step as train.py runs it (benchmarks/throughput.py times this very object): step(images,
    targets) runs the forward and loss under autocast, backward, gradient clipping and the optimiser step, and
    returns (loss, outputs), still on the device: nothing here synchronises."""
    model: torch.nn.Module  # as it runs: compiled, DDP-wrapped
    loss_fn: Callable  # loss_fn(images, outputs, targets): distill.DistillationLoss in train.py
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16's loss scaling; a disabled one passes through
    amp_dtype: torch.dtype | None = None  # autocast's dtype; None: float32
    clip_grad: float = 0.0  # the most the gradients' global norm may be; 0: not clipped
    graphs: bool = False  # the model runs as CUDA graphs (torch.compile's reduce-overhead)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        self.optimizer.zero_grad(set_to_none=True)  # before the forward: the last step's gradients are freed first
        if self.graphs:  # a new step: the graphs may now reuse the memory of the last step's outputs (only then: the
            # marker imports ~180 more of torch._inductor's modules, about 1 s, into a run that compiles nothing)
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(images.device, self.amp_dtype):
            outputs = self.model(images)
            loss = self.loss_fn(images, outputs, targets)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, outputs


def train_one_epoch(step: Step, loader, scheduler, epoch: int, dist, ema=None, augment=None, progress: bool = True,
                    log_every: int = 10) -> dict:
    """One pass over `loader`: the schedule (scheduler.step_update(global step)), the batch augmentations
    (augment(images, labels) -> (images, targets): Mixup/CutMix), the step, the EMA, the metric sums."""
    model, optimizer = step.model, step.optimizer
    model.train()
    device = dist.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n  (kept on device: no sync)
    steps = len(loader)
    wait = 0.0
    bar = tqdm(total=steps, desc=f"train {epoch}", disable=not (progress and dist.is_main), leave=False)
    t_start = t_last = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        wait += time.perf_counter() - t_last  # time blocked on the loader
        scheduler.step_update(epoch * steps + i)
        images, targets = augment(images, labels) if augment is not None else (images, labels)
        loss, outputs = step(images, targets)
        if ema is not None:
            # ModelEmaV3's step: the updates so far, this one included, as timm's train.py counts them; it copies the
            # weights at step 1 (decay 0) and averages from step 2 on
            ema.update(unwrap(model), step=epoch * steps + i + 1)
        # DeiT: the mean of its two heads, its prediction, as evaluate() scores it; under Mixup/CutMix the train top-1
        # is scored against the unmixed labels, so it reads low there
        logits = torch.stack(outputs).mean(0) if isinstance(outputs, tuple) else outputs
        n = labels.shape[0]
        sums[:2] += torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double()])
        sums[2] += n  # a Python number: no host-to-device copy, which would synchronise every step
        if (i + 1) % log_every == 0 or i + 1 == steps:
            loss_sum, correct, seen = sums.tolist()  # one sync per log_every steps, not per step
            # every rank stops together: a rank raising alone would leave the others waiting in backward()
            if all_reduce_sum(torch.tensor([0.0 if math.isfinite(loss_sum) else 1.0], device=device)).item() > 0:
                raise together(NonFiniteLoss(f"epoch {epoch} step {i}: the loss is not finite on some rank; "
                                             f"stopping. The last good checkpoint is kept. Lower --lr, raise "
                                             f"--warmup-epochs, or keep --clip-grad on."))
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", top1=f"{100 * correct / seen:.1f}",
                            img_s=f"{seen * dist.world / (time.perf_counter() - t_start):.0f}")
        bar.update(1)
        t_last = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    bar.close()
    all_reduce_sum(sums)
    loss_sum, correct, seen = sums.tolist()
    return {"train_loss": loss_sum / seen, "train_top1": 100 * correct / seen, "train_samples": int(seen),
            "images_per_s": seen / elapsed, "data_wait_frac": wait / elapsed, "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model, loader, dist, amp_dtype=None, progress: bool = True, desc: str = "val") -> dict:
    """Exact val metrics: per-rank sums of counts, summed over ranks; each val image counted once.

    For DeiT the prediction is the mean of its two heads; each head's own top-1 is reported too.
    """
    model.eval()
    device = dist.device
    n_heads = 2 if hasattr(model, "head_dist") else 1
    sums = torch.zeros(4 + n_heads, dtype=torch.float64, device=device)  # loss, top1, top5, n, per-head top1
    for images, labels in tqdm(loader, desc=desc, disable=not (progress and dist.is_main), leave=False):
        with autocast(device, amp_dtype):
            heads = head_logits(model, images)
        heads = [h.float() for h in heads]
        logits = torch.stack(heads).mean(0)
        # top-1 by argmax, the first of tied classes (ties are common in bf16 logits), as each head's top-1 and
        # report.py's predictions: topk orders tied classes as it likes, and its top-5 then counts the argmax too
        hit1 = logits.argmax(1) == labels
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hit1.sum()
        sums[2] += ((top5 == labels[:, None]).any(1) | hit1).sum()
        sums[3] += labels.shape[0]
        for k, h in enumerate(heads):
            sums[4 + k] += (h.argmax(1) == labels).sum()
    all_reduce_sum(sums)
    s = sums.tolist()
    n = max(s[3], 1)
    out = {"val_loss": s[0] / n, "val_top1": 100 * s[1] / n, "val_top5": 100 * s[2] / n, "val_samples": int(s[3])}
    if n_heads == 2:
        out["val_top1_cls_head"], out["val_top1_dist_head"] = 100 * s[4] / n, 100 * s[5] / n
    return out
