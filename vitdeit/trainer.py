"""One run: loaders, model, teacher, loss, optimiser, schedule; the epoch loop; checkpoints and metrics."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import random
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import (checkpoint_file, ema_weights, load_checkpoint, save_checkpoint, saved_loader_states,
                         saved_world, shards_change_text, signals_held)
from .classes import (MANIFEST_NAME, load_manifest, manifest_class_map, pack_fingerprint,
                      val_copies_text, without_images_text)
from .config import (DISTILL_ONLY, HOW_IT_RUNS, NODE_OWN, Config, checkpoint_named, dali_threads, flag,
                     saved_setting, workers_warning)
from .data import build_loader, upscale_warning
from .distill import DistillationLoss
from .distributed import (Dist, all_gather_object, broadcast_buffers, local_rank_zero_first, numbers_text, on_rank_0,
                          process_group, read_on_every_node, refuse_differing, wrap)
from .engine import Step, compile_for_training, compile_mode, evaluate, step_stream, train_one_epoch
from .errors import (BatchTooLarge, DataError, MissingFile, SettingError, VitdeitError, alike_on_every_rank,
                     first_line, together, write_failed)
from .machine import describe, hardware
from .metrics import MetricsLog, read_metrics
from .models import OUTSIDE_DATA, check_weights_file, create_model, load_teacher, model_from_checkpoint
from .runs import (SAME_FILE, adopt_history, best_behind, check_rewind, check_run_dir, read_run_files, resumes_in,
                   run_lock, start_run_dir)


AMP_NAME = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as --amp spells them


def resolve_amp(choice: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, else fp16 (+ GradScaler); off on CPU (slow there)."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def last_amp(state: dict | None) -> str | None:
    """The precision a checkpoint's run trained with last (amp_trained); None where it was not kept."""
    return (state or {}).get("amp", "").rpartition(", then ")[2] or None


def amp_trained(resumed: dict | None, now: str) -> str:
    """The precision a run's checkpoint says it trained with: this stretch's (--amp as resolved here), after those
    of the run it resumes where they differ (--amp auto on another device, or another --amp: "off, then bf16"); a
    checkpoint saved before the precision was kept (2026-12-06) adds nothing."""
    before = last_amp(resumed)
    return now if before is None else resumed["amp"] if before == now else f"{resumed['amp']}, then {now}"


def pace_text(took: float, epochs_left: int, compiling: bool = False) -> str:
    """An epoch's wall time (train, val, checkpoints) and the run's time left at its pace, as h:mm:ss or m:ss.
    compiling: the epoch also compiled the model (a compiled run's first, after each start): no pace to go by (on
    a GPU compiling can take minutes, an ImageNet-100 epoch seconds)."""
    def clock(seconds: float) -> str:
        s = round(seconds)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    if compiling:
        return f"{clock(took)} this epoch, torch.compile's compiling included"
    return f"{clock(took)} this epoch" + (f", {clock(took * epochs_left)} left at its pace" if epochs_left else "")


def seed_everything(*parts: int) -> None:
    seed = hash(parts) % 2**31  # ints and tuples of ints hash the same in every process
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_augmentation(cfg: Config, num_classes: int, device: torch.device):
    """The train augmentations run on the device batch, in the DeiT reference's order: random erasing of each
    (normalised) image, then Mixup/CutMix across the batch. (images, labels) -> (images, targets), or None when
    neither is on. Both are timm's; they draw from the global generators that seed_everything seeds per epoch."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    erase = (RandomErasing(cfg.random_erasing, mode="pixel", max_count=1, device=device)
             if cfg.random_erasing > 0 else None)
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=num_classes) if cfg.mixes else None)
    if erase is None and mixup is None:
        return None

    def augment(images: torch.Tensor, labels: torch.Tensor):
        if erase is not None:
            images = erase(images)  # in place, per image (a Python loop over the batch)
        return mixup(images, labels) if mixup is not None else (images, labels)

    return augment


def make_optimizer(net: nn.Module, cfg: Config, peak_lr: float, device: torch.device) -> torch.optim.Optimizer:
    """timm's AdamW at `peak_lr`, with no weight decay on norms, biases and the model's no_weight_decay()
    (position embedding, cls/dist tokens); fused (one kernel per step) on CUDA."""
    import timm.optim

    return timm.optim.create_optimizer_v2(net, "adamw", lr=peak_lr, weight_decay=cfg.weight_decay,
                                          **({"fused": True} if device.type == "cuda" else {}))


def make_loss(cfg: Config, teacher: nn.Module | None) -> DistillationLoss:
    """The training loss: the label loss (soft-target cross-entropy of Mixup/CutMix's targets, else cross-entropy
    with label smoothing), with distillation from `teacher` (cfg.distillation_type; none without a teacher)."""
    from timm.loss import SoftTargetCrossEntropy

    base = SoftTargetCrossEntropy() if cfg.mixes else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    kind = cfg.distillation_type if teacher is not None else "none"
    return DistillationLoss(base, teacher, kind, cfg.distillation_alpha, cfg.distillation_tau)


def to_device(net: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    return net.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def lr_schedule(optimizer, cfg: Config, steps: int):
    """Per step: linear warm-up from lr/1000 to the peak (the optimiser's lr) over warmup_epochs, then a cosine from
    the peak down to min_lr over the steps left. warmup_prefix: the cosine starts when the warm-up ends, so the peak
    is reached (without it the cosine's clock runs during warm-up: a 1-of-5-epoch warm-up ends at 0.905 of it)."""
    from timm.scheduler import CosineLRScheduler

    total, warm, lr = cfg.epochs * steps, int(cfg.warmup_epochs * steps), optimizer.param_groups[0]["lr"]
    # a run no longer than its warm-up never reaches the peak (run_notes warns); 2: timm logs a warning for a 1-step
    # cosine, on every rank, that this one never reaches anyway
    return CosineLRScheduler(optimizer, t_initial=max(2, total - warm), lr_min=cfg.min_lr, warmup_t=warm,
                             warmup_lr_init=lr * 1e-3, warmup_prefix=True, t_in_epochs=False)


def ema_warning(decay: float, total_steps: int) -> str | None:
    """A warning when the EMA would still be mostly its starting weights at the end of the run: their share after n
    updates is decay**n (0.9998 keeps 37 % after 5,000 steps)."""
    kept = decay ** total_steps
    if kept <= 0.05:
        return None
    return (f"warning: --model-ema-decay {decay} over this run's {total_steps} steps leaves {100 * kept:.0f}% of the "
            f"EMA at its starting weights; for 1% use --model-ema-decay {0.01 ** (1 / total_steps):.8f}")


def check_teacher(metrics: dict, val_class_counts: dict[str, int], cfg: Config, dist: Dist,
                  first_fix: str = "") -> None:
    """Refuse a teacher at chance level: a randomly initialised head is not a teacher. Chance: the top-1 of always
    naming the most common val class (1 / classes on a balanced val split; more where classes have no val images).
    first_fix: a likelier cause to name before the usual advice (a teacher fed crops of another size)."""
    chance = 100.0 * max(val_class_counts.values()) / sum(val_class_counts.values())
    bar, which = 2 * chance, "twice chance"
    if (chance + 100) / 2 < bar:  # chance over a third: halfway to 100% is then the lower bar of the two
        bar, which = (chance + 100) / 2, "halfway from chance to 100%"
    dist.print(f"teacher val top-1 {metrics['val_top1']:.2f}% on {metrics['val_samples']} images "
               f"(chance {chance:.2f}%: the most common val class's share)")
    if metrics["val_top1"] < bar and not cfg.allow_weak_teacher:  # (metrics: summed over every rank)
        raise together(SettingError(
            f"the teacher's val top-1 is {metrics['val_top1']:.2f}%, under {which} ({bar:.2f}%): it has learnt "
            f"too little of these classes to teach them. {first_fix}Train one (train.py --model resnet18) and pass "
            f"--teacher-ckpt, or pass --allow-weak-teacher to distil anyway."
        ))


def check_resumable(saved: dict, cfg: Config) -> None:
    """The model, its input geometry and the optimiser's parameter groups must be the saved run's: a clear error
    here, not a page of missing keys (--model and, for ViT/DeiT, --img-size and --patch-size shape the weights; a
    CNN's weights fit any --img-size, but its learned features and BatchNorm statistics are of the saved size)."""
    patches = "resnet18" not in (saved.get("model"), cfg.model)  # the patch size shapes the transformers only
    diff = [f"{flag(k)} {saved.get(k)} (this run: {getattr(cfg, k)})"
            for k in ("model", "img_size", "patch_size")[: 3 if patches else 2] if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise SettingError(f"--resume {cfg.resume} was saved with {', '.join(diff)}; resume with its recipe (drop "
                           f"those flags, and their --config values: train.py --resume goes on with the saved "
                           f"settings), or drop --resume for a new run.")
    wd = saved_setting(saved, "weight_decay")
    if (wd == 0) != (cfg.weight_decay == 0):  # timm's optimiser: one parameter group without decay, else two
        raise SettingError(f"--resume {cfg.resume} was trained with --weight-decay {wd}, this run has "
                           f"{cfg.weight_decay}: a weight decay of 0 keeps the parameters in one group, any other in "
                           f"two (norms and biases undecayed), so its optimiser state does not fit. Resume with "
                           + (f"--weight-decay {wd}" if wd == 0 else f"a non-zero --weight-decay (the run's: {wd})")
                           + ", or drop --resume for a new run.")


def recipe_changes(saved: dict, cfg: Config, data_dir: str | None = None, skip: tuple = HOW_IT_RUNS) -> list[str]:
    """This invocation's settings that differ from the resumed run's, as flags (not those in `skip`); a run saved
    before a setting existed had its default. data_dir: the checkpoint's shards' folder, resolved: --data-path naming
    it otherwise (from another working folder) is no change, nor is a path the checkpoint gave, rebased to here."""
    def same(k, v) -> bool:
        return (saved_setting(saved, k) == v or k in cfg.inherited
                or k == "data_path" and str(Path(v).resolve()) == data_dir)

    return [f"{flag(k)} {saved_setting(saved, k)!r} -> {v!r}" for k, v in cfg.to_dict().items()
            if k not in skip and not same(k, v)]


def check_same_command(resumed: dict, cfg: Config, manifest: dict) -> None:
    """--resume auto goes on only with the command its run was started with (a restart's, a requeue's): a setting
    given otherwise than the saved run's, or left out where the run had another than the default, is another
    experiment in the same run folder, whose run it would take over (or, finished, call done): refused, naming them.
    Not the paths of its files, which each node may give its own (NODE_OWN; the nodes' other settings are alike
    here), but what the shards hold: another pack than the run's (its fingerprint) is refused too. (The teacher's
    val score may move with the loader or device, which a requeue may change: a note, as for any --resume.)"""
    saved = resumed["config"]
    skip = HOW_IT_RUNS + NODE_OWN
    differ = recipe_changes(saved, cfg, skip=skip) + [
        f"{flag(k)} {saved_setting(saved, k)!r} -> not given ({getattr(Config, k)!r})" for k in sorted(cfg.inherited)
        if k not in skip and saved_setting(saved, k) != getattr(Config, k)]
    found = shards_change_text(resumed, cfg.resume, cfg.data_path, manifest)
    if found and found[0] in ("other", "repacked", "unknown"):  # (not "elsewhere", "untold": it cannot tell)
        differ.append(f"other shards: {found[1]}")
    if differ:
        raise SettingError(f"--resume auto: {cfg.resume} was saved by another command than this one "
                           f"({'; '.join(differ)}); --resume auto goes on only with the command its run started "
                           f"with. Pass another --run-name for a new run, or --resume {cfg.resume} to continue that "
                           f"run with this command's settings.")


def train(cfg: Config, on_epoch_end=None) -> dict:
    """Train per `cfg`; return the last epoch's metrics ({} where a --resume has no epoch left to train).
    `on_epoch_end(epoch, record)` is called on every rank."""
    # the whole run, set-up to the last checkpoint, in the process group and on the step's stream
    with process_group(cfg.device) as dist, step_stream(cfg.step_stream, dist.device), ExitStack() as held:
        return _train(cfg, dist, on_epoch_end, held)


def resume_file_first(cfg: Config, path: str, what: str) -> None:
    """A --resume file missing, or one parse_args could not take the run's settings from (cut short, not a checkpoint),
    is named as such before the shards: its run's --data-path was to come from it, and the default in its place
    would be named instead."""
    checkpoint_file(path, what)
    if "data_path" not in cfg.given | cfg.inherited:
        load_checkpoint(path, what=what)  # (raises, but for torch's pre-1.6 pickle, which mmap cannot read)


def run_manifest(cfg: Config) -> dict:
    """cfg.data_path's manifest. --data-path left out on the command line and in --config means the --resume
    checkpoint's shards, or else the demo's: where there are none, that is the error, not a pack command aimed at
    that folder."""
    if "data_path" in cfg.inherited and not (Path(cfg.data_path) / MANIFEST_NAME).is_file():
        raise SettingError(f"--data-path not given, and the one {checkpoint_named(cfg.resume, cfg.checkpoint_read)} "
                           f"was trained on, {cfg.data_path}, holds no {MANIFEST_NAME} seen from {Path.cwd()} (moved, "
                           f"or another machine's path): pass --data-path with these shards' folder here")
    defaulted = "data_path" not in cfg.given
    if defaulted and not (Path(cfg.data_path) / MANIFEST_NAME).is_file():
        raise SettingError(f"--data-path not given, and its default, {cfg.data_path} (the folder python -m "
                           f"vitdeit.demo packs the demo data into), holds no {MANIFEST_NAME} seen from {Path.cwd()}: "
                           f"pass --data-path with the --out folder of pack_shards.py")
    return load_manifest(cfg.data_path)


def other_shards_note(state: dict, ckpt: str | Path, data_path: str, manifest: dict) -> tuple[str, str] | None:
    """How the shards the checkpoint `ckpt` was trained and scored on differ from data_path's, and what that does to
    a resumed run; None: the same pack (checkpoint.shards_change)."""
    if (found := shards_change_text(state, ckpt, data_path, manifest)) is None:
        return None
    change, said = found
    return said, {"elsewhere": "(if those are other shards)", "untold": "(if it was)", "unknown": "(another pack)",
                  "repacked": "(another sample order)", "other": "(other shards), and best.pth is picked by val scores "
                  "of both shards' val splits"}[change]


def run_notes(cfg: Config, manifest: dict, dist: Dist, train_loader, resumed: dict | None, peak_lr: float) -> list[str]:
    """The warnings and notes a run prints after its first line: settings that work, but maybe not as meant (a
    resume's last: resume_notes)."""
    out, global_batch = [], cfg.global_batch(dist.world)
    if cfg.auto_resume and resumed is None:
        out.append(f"note: --resume auto: no {cfg.run_dir / 'last.pth'} yet: a new run")
    if text := workers_warning(cfg.workers, dali=train_loader.name == "dali"):
        out.append(f"warning: {text}")
    out += [f"warning: {text}" for split in ("train", "val")  # --allow-missing-classes
            if (text := without_images_text(manifest, split, cfg.data_path))]
    if text := val_copies_text(manifest):  # --allow-train-val-copies
        out.append(f"warning: {text} (the manifest's \"train_val_same_bytes\"): val top-1 counts images the model "
                   f"trained on")
    if cfg.rand_augment and train_loader.name == "dali":
        out.append(f"note: --rand-augment {cfg.rand_augment}: timm's policy run with DALI's ops (README: NVIDIA DALI "
                   f"says where they differ from timm's); --loader torch runs timm's own")
    unused = [flag(f.name) for f in dataclasses.fields(Config) if f.name in DISTILL_ONLY
              and getattr(cfg, f.name) != f.default]
    if cfg.distillation == "none" and unused:
        out.append(f"warning: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} for --model "
                   f"deit_tiny_distill with a --distillation-type other than none; this run trains without a teacher")
    if cfg.distillation == "hard" and cfg.distillation_tau != Config.distillation_tau:
        out.append("warning: --distillation-tau is for --distillation-type soft; hard distillation learns the "
                   "teacher's top class, which no temperature changes: this run ignores it")
    if cfg.distillation != "none" and not cfg.teacher_ckpt:
        out.append(f"note: {OUTSIDE_DATA}")
    if cfg.warmup_epochs >= cfg.epochs:
        out.append(f"warning: --warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the whole run warms up "
                   f"and never reaches the peak lr {peak_lr:.3g}")
    if cfg.min_lr >= peak_lr:  # --min-lr is absolute, the peak scales with the global batch
        out.append(f"warning: --min-lr {cfg.min_lr:.3g} >= the peak lr {peak_lr:.3g} (--lr {cfg.lr:.3g} x global batch "
                   f"{global_batch} / 512): the cosine cannot decay to it; lower --min-lr (e.g. {peak_lr / 100:.3g})")
    per_rank = train_loader.per_rank  # the PyTorch sampler pads to ceil(n / world), DALI slices floor or one more
    trained = len(train_loader) * cfg.batch_size  # whole batches only (drop_last, as the DeiT reference)
    if per_rank - trained > 0.05 * per_rank:
        out.append(f"warning: --batch-size {cfg.batch_size}: an epoch trains on {trained} of each process's "
                   f"{per_rank} train images, whole batches only; the other {per_rank - trained} "
                   f"({100 * (per_rank - trained) / per_rank:.0f} %) sit out each epoch (others each time: the order "
                   f"is reshuffled). A --batch-size that divides {per_rank} more evenly trains on more of them")
    if cfg.amp == "fp16" and dist.device.type == "cpu":  # --amp auto is off on a CPU
        out.append("note: --amp fp16 on a CPU: many of PyTorch's CPU kernels run float16 far slower than float32; "
                   "--amp off is the CPU's default")
    if 1 < cfg.repeated_aug >= cfg.batch_size:  # copies of an image in one batch (DALI), or on neighbouring ranks
        out.append(f"warning: --repeated-aug {cfg.repeated_aug} >= --batch-size {cfg.batch_size}: the global batch of "
                   f"{global_batch} holds copies of about {-(-global_batch // cfg.repeated_aug)} image(s) (DeiT: 3 "
                   f"copies, in batches of 64 and more)")
    if upscaled := upscale_warning(cfg.data_path, manifest, cfg.img_size, cfg.crop_pct):
        out.append(f"warning: {upscaled}")
    return out + (resume_notes(cfg, dist, manifest, train_loader, resumed) if resumed is not None else [])


SCHEDULE = ("epochs", "lr", "batch_size", "warmup_epochs", "min_lr")  # the settings lr_schedule's lr depends on


def lr_jump(cfg: Config, dist: Dist, steps: int, resumed: dict) -> str | None:
    """A note where the resumed run's next step trains at another lr than the saved run's own schedule would have:
    the schedule is a function of the step count and this run's --epochs, lr, global batch, warm-up and --min-lr
    (as timm's train.py resumes; the DeiT reference restores the saved schedule, which keeps more --epochs at
    --min-lr), so more --epochs after a run's cosine ended take the lr back up; also where the saved run's last step
    trained at another lr than its own settings give it under this vitdeit's schedule (an earlier vitdeit's). None
    where the process count changed (resume_notes says so: the steps are other steps) and where nothing is left to
    train."""
    step = (resumed["epoch"] + 1) * steps
    if saved_world(resumed) not in (None, dist.world) or step >= cfg.epochs * steps:
        return None

    def lr_at(c: Config, t: int, per_epoch: int = steps) -> float:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.peak_lr(dist.world))  # (a throwaway)
        lr_schedule(probe, c, per_epoch).step_update(t)
        return probe.param_groups[0]["lr"]

    saved = resumed["config"]
    then = copy.copy(cfg)  # (not dataclasses.replace, whose validation a mix of saved and new settings may fail)
    vars(then).update({k: saved_setting(saved, k) for k in SCHEDULE})
    # the lr the saved run's last step trained at (metrics' lr), against what its settings give that step under this
    # schedule, at its own steps per epoch (its train images / its global batch: another loader or --batch-size may
    # give this run others): another where an earlier vitdeit's schedule trained it (before 2026-12-02 its cosine
    # ran during the warm-up)
    metrics = resumed.get("metrics", {})
    seen, batch = metrics.get("train_samples"), saved_setting(saved, "batch_size") * dist.world
    then_steps = seen // batch if isinstance(seen, int) and seen >= batch else steps
    was, ended = metrics.get("lr"), lr_at(then, (resumed["epoch"] + 1) * then_steps - 1, then_steps)
    other = isinstance(was, float) and not math.isclose(was, ended, rel_tol=1e-6) and f"{was:.3g}" != f"{ended:.3g}"
    if math.isclose(now := lr_at(cfg, step), lr_at(then, step), rel_tol=1e-6) and not other:
        return None
    return (f"note: --resume: the lr goes from {f'{was:.3g}' if isinstance(was, float) else 'its saved value'} (the "
            f"last step of epoch {resumed['epoch']}) to {now:.3g} at the next step: the schedule (warm-up, then a "
            f"cosine to --min-lr) is this run's, {cfg.epochs} epochs of {steps} steps at a peak lr of "
            f"{cfg.peak_lr(dist.world):.3g}, taken up at step {step}"
            + (f"; the saved run's last step trained at {was:.3g}, not the {ended:.3g} its own settings give it under "
               f"this vitdeit's schedule: it trained under an earlier vitdeit's (before 2026-12-02, whose cosine ran "
               f"during the warm-up)" if other else ""))


def resume_notes(cfg: Config, dist: Dist, manifest: dict, train_loader, resumed: dict) -> list[str]:
    """What a --resume goes on from otherwise than the uninterrupted run would: another process count, metrics lines
    missing, other shards, another loader, a DALI stream that starts afresh, another precision."""
    out, global_batch = [], cfg.global_batch(dist.world)
    if (then := saved_world(resumed)) not in (None, dist.world):
        saved_batch = saved_setting(resumed["config"], "batch_size") * then
        out.append(f"note: --resume: {cfg.resume} was trained by {then} process(es), this run has {dist.world}: "
                   f"the global batch ({saved_batch} -> {global_batch}), the lr and the steps per epoch change from "
                   f"here on, and the sample order is not the uninterrupted run's")
    src = Path(cfg.resume).parent  # the history the resumed run goes on from: metrics.jsonl beside its checkpoint
    try:
        logged = {r.get("epoch") for r in read_metrics(src, resumed_after=resumed["epoch"])}
    except (MissingFile, DataError):
        logged = set()
    if missing := [e for e in range(resumed["epoch"] + 1) if e not in logged]:
        out.append(f"note: --resume: {src / 'metrics.jsonl'} has no line for epoch(s) {numbers_text(missing)}: "
                   f"the run goes on, and its curves and viz.py's report lack them")
    if other := other_shards_note(resumed, cfg.resume, cfg.data_path, manifest):
        out.append(f"note: --resume: {other[0]}: training goes on, not as the uninterrupted run would have {other[1]}")
    if resumed.get("loader", train_loader.name) != train_loader.name:
        out.append(f"note: --resume: {cfg.resume} was trained with the {resumed['loader']} loader, this run reads with "
                   f"{train_loader.name} (--loader {cfg.loader}): crops and augmentations are drawn the new loader's "
                   f"way from here on (--loader {resumed['loader']} keeps the old)")
    if train_loader.name == "dali" and not train_loader.restored:  # (rank 0's state: every rank's is one version's)
        out.append(f"note: --resume: {cfg.resume} holds {train_loader.not_restored or 'no DALI reader state'}: "
                   f"DALI's sample stream starts afresh (training goes on, not bit-exactly).")
    if jump := lr_jump(cfg, dist, len(train_loader), resumed):
        out.append(jump)
    now = AMP_NAME[resolve_amp(cfg.amp, dist.device)]
    if (last := last_amp(resumed)) not in (None, now) and saved_setting(resumed["config"], "amp") == cfg.amp:
        # (the same --amp resolved otherwise; another --amp is a recipe change, noted as such)
        out.append(f"note: --resume: {cfg.resume} trained with --amp {last}, as --amp {cfg.amp} resolved on its "
                   f"device; on {dist.device.type} here it trains with {now} from here on")
    return out


def restore(resumed: dict, cfg: Config, net: nn.Module, optimizer, scaler, dist: Dist) -> list[str]:
    """--resume: the weights, the optimiser's moments and step counts (with this invocation's hyper-parameters),
    the loss scaler; a note of the settings that differ from the saved run's, which it returns. The schedule is not
    restored: step_update() recomputes the lr from the step count every step, and a restored one would keep the old
    run's epochs and global batch if those changed."""
    changed = recipe_changes(resumed["config"], cfg, resumed.get("data_dir"))
    if changed:  # legitimate (more --epochs, another --data-path copy), or a flag given by mistake: said, not refused
        dist.print(f"note: --resume: settings differ from {cfg.resume}'s: {', '.join(changed)}; the run goes on "
                   f"with this invocation's (without those flags and --config values, train.py --resume goes on with "
                   f"the saved ones)")
    net.load_state_dict(resumed["model"])
    saved = resumed["optimizer"]
    if len(saved["param_groups"]) == len(optimizer.param_groups):  # else load_state_dict names the mismatch
        # the saved moments and step counts, this invocation's hyper-parameters: load_state_dict would bring
        # back the saved run's weight decay (and its `fused`, which decides where the step counts live)
        saved = {**saved, "param_groups": [{**fresh, "params": old["params"]} for old, fresh in
                                           zip(saved["param_groups"], optimizer.state_dict()["param_groups"])]}
    try:
        optimizer.load_state_dict(saved)
    except ValueError as e:  # other parameter groups (a change to or from weight decay 0 is refused earlier)
        raise SettingError(f"--resume {cfg.resume}: its optimiser state does not fit this run's ({first_line(e)}); "
                           f"resume with the saved recipe (drop the flags and --config values that change it: "
                           f"train.py --resume goes on with the saved settings)") from e
    if resumed["scaler"]:  # empty when the saved run did not use fp16
        scaler.load_state_dict(resumed["scaler"])
    return changed


def make_ema(net: nn.Module, cfg: Config, resumed: dict | None, start_epoch: int, steps: int, dist: Dist):
    """timm's EMA of `net`'s weights, made after the resume: the saved run's EMA where it kept one, else it starts
    from the (resumed) weights, not the random init. Warns when the run is too short for --model-ema-decay."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(net, decay=cfg.model_ema_decay)
    kept = resumed is not None and resumed.get("ema") is not None
    if kept:
        ema.module.load_state_dict(resumed["ema"])
    # the updates the EMA will have had at the end: all the run's, or those left, for one that starts here
    if warning := ema_warning(cfg.model_ema_decay, (cfg.epochs - (0 if kept else start_epoch)) * steps):
        dist.print(warning)
    return ema


def compile_setting(cfg: Config, device: torch.device, world: int) -> tuple[bool, str]:
    """(compile or not, torch.compile's mode) for this device and process count: --compile auto compiles on CUDA
    only, and --compile-mode auto picks CUDA graphs for one GPU (engine.compile_mode)."""
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    if cfg.compile_mode == "reduce-overhead" and not use_compile:
        raise SettingError(f"--compile-mode {cfg.compile_mode}: nothing is compiled on {device.type} (--compile auto "
                           f"compiles on CUDA only); add --compile on or drop it")
    if cfg.compile_mode == "reduce-overhead" and world > 1:
        raise SettingError(f"--compile-mode reduce-overhead with {world} processes: CUDA graphs under DDP are "
                           f"not supported here (never run); drop it, or train one process per run")
    return use_compile, compile_mode(cfg.compile_mode, device, world)


def build_loaders(cfg: Config, manifest: dict, dist: Dist, resumed: dict | None):
    """(train loader, val loader, the warnings they and the libraries raised meanwhile: printed after the run line,
    by rank 0 alone). The train loader goes on from this rank's saved reader state where the resumed run kept one."""
    states = saved_loader_states(resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train_loader = build_loader(cfg, manifest, "train", dist,
                                        state=states[dist.rank] if dist.rank < len(states) else None)
            val_loader = build_loader(cfg, manifest, "val", dist)
        except BatchTooLarge as e:
            e.alike_on_every_rank = True  # every rank's train share has one count (N / processes, rounded alike)
            saved = saved_setting(resumed["config"], "batch_size") if resumed is not None else cfg.batch_size
            if saved == cfg.batch_size:
                raise
            with alike_on_every_rank():
                raise DataError(f"{str(e).rstrip('.')}; --resume {cfg.resume} was trained with --batch-size {saved} "
                                f"(drop --batch-size, from --config too: train.py --resume goes on with the saved "
                                f"settings)") from e
    return train_loader, val_loader, caught


def run_line(cfg: Config, manifest: dict, dist: Dist, loader_name: str, amp_dtype, use_compile: bool, mode: str,
             peak_lr: float, steps: int, machine: dict) -> str:
    """The run's first line: what trains on what, on which devices, with which loader and speed settings.
    steps: the train loader's batches an epoch (each process's): the line says how many images that trains on, all
    processes together, when whole batches leave some out. machine: this node's (machine.describe), named beside
    the device: the img/s the epochs print were measured on it."""
    workers, connections = cfg.decode_workers, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8 (CUDA's default)")
    splits = manifest["splits"]
    n_train = splits["train"]["num_samples"]
    per_epoch = steps * cfg.global_batch(dist.world)
    whole = (f", {per_epoch} {'samples' if cfg.repeated_aug > 1 else 'images'} an epoch in whole batches"
             if per_epoch < n_train else "")  # (--repeated-aug N: samples, N augmented copies of each image)
    return (f"run {cfg.run_dir}: {cfg.model} on {cfg.data_path} ({len(manifest['classes'])} classes, "
            f"{n_train} train{whole} / {splits['val']['num_samples']} val), "
            f"{dist.world} process(es) on {dist.device.type} ({hardware(machine)}), loader {loader_name} "
            + (f"({dali_threads(workers)} DALI thread{'s' * (workers > 1)}), " if loader_name == "dali" else
               f"({workers} worker{'s' * (workers != 1)}), ") + f"amp {AMP_NAME[amp_dtype]}, "
            f"compile {use_compile}{f' ({mode})' if use_compile and mode != 'default' else ''}"
            f"{f', step stream {cfg.step_stream}' if cfg.step_stream != 'default' else ''}"
            f"{f', CUDA connections {connections}' if dist.device.type == 'cuda' else ''}, global batch "
            f"{cfg.global_batch(dist.world)}, lr {peak_lr:.3g}")


def prepare_teacher(cfg: Config, class_map, manifest: dict, val_loader, dist: Dist, amp_dtype):
    """(teacher on the device, its val top-1), or (None, None) when the run does not distil. The teacher is scored
    on the val split first: one at chance level is refused (check_teacher)."""
    if cfg.distillation == "none":
        return None, None
    def load():
        with local_rank_zero_first(dist):  # torchvision's weights: one download per node
            return load_teacher(cfg.teacher_ckpt, cfg.teacher_weights, class_map)

    def weights(net) -> tuple:  # (on the CPU: ~45 MB, a fraction of a second)
        h = hashlib.sha1()
        for t in net.state_dict().values():
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest(), "its weights"

    with alike_on_every_rank():  # each node's copy of its file: other weights would teach some ranks otherwise
        seen, teacher = read_on_every_node(load, weights)
        source = (f"--teacher-ckpt {cfg.teacher_ckpt}" if cfg.teacher_ckpt else
                  f"--teacher-weights {cfg.teacher_weights or 'imagenet1k'}")
        cached = (f"give every node the same file: delete the downloaded one on the nodes that differ (under "
                  f"{Path(torch.hub.get_dir()) / 'checkpoints'}) so that it downloads again"
                  if (cfg.teacher_weights or "imagenet1k") == "imagenet1k" and not cfg.teacher_ckpt else SAME_FILE)
        refuse_differing(seen, f"the teacher ({source}) differs", cached)
    teacher = to_device(teacher, cfg, dist.device)
    if teacher.interpolation != cfg.interpolation:
        dist.print(f"warning: the teacher was trained on images resized with --interpolation "
                   f"{teacher.interpolation}; this run resizes with {cfg.interpolation}, so the teacher sees (and "
                   f"is scored on) slightly other images than in its own run")
    if teacher.img_size != cfg.img_size:  # a CNN runs at any size, but its accuracy is its training size's
        dist.print(f"warning: the teacher was trained on {teacher.img_size} px crops; this run feeds it "
                   f"{cfg.img_size} px ones (--img-size), so its logits, and its val top-1 below, are those of a "
                   f"network at a size it never saw: distil at --img-size {teacher.img_size}, or train the "
                   f"teacher at {cfg.img_size}")
    metrics = evaluate(teacher, val_loader, dist, amp_dtype, progress=cfg.progress, desc="teacher val")
    resized = (f"It was trained on {teacher.img_size} px crops and is fed {cfg.img_size} px ones here: distil at "
               f"--img-size {teacher.img_size} first. " if teacher.img_size != cfg.img_size else "")
    with alike_on_every_rank():  # the score gathered from every rank: one verdict, said once per node
        check_teacher(metrics, manifest["splits"]["val"]["class_counts"], cfg, dist, resized)
    return teacher, metrics["val_top1"]


def read_inputs(cfg: Config) -> tuple[dict, dict | None]:
    """(the manifest, the --resume checkpoint or None) as this node reads them, its teacher's file checked (read after
    the loaders and notes); read_run_files compares what each node read."""
    what = "--resume auto:" if cfg.auto_resume else "--resume"  # (its errors name the last.pth it found)
    if cfg.resume:  # a missing file is named as such: not by the shards it would have named (parse_args), nor as
        resume_file_first(cfg, cfg.resume, what)  # another folder's checkpoint by check_run_dir
    manifest = run_manifest(cfg)
    try:
        if cfg.distillation != "none" and cfg.teacher_ckpt:
            checkpoint_file(cfg.teacher_ckpt, "--teacher-ckpt")
        elif cfg.distillation != "none":
            check_weights_file(cfg.teacher_weights)
    except MissingFile as e:
        key = "teacher_ckpt" if cfg.teacher_ckpt else "teacher_weights"
        if key in cfg.inherited:
            raise MissingFile(f"{e} (the path --resume {cfg.resume} was saved with, seen from {Path.cwd()}: give "
                              f"{flag(key)} with the teacher's path here)") from None
        raise
    resumed = load_checkpoint(cfg.resume, manifest_class_map(manifest), what=what) if cfg.resume else None
    return manifest, resumed


def nothing_left(cfg: Config, dist: Dist, resumed: dict) -> None:
    """A --resume of a run that has trained its --epochs: said, with nothing written but, where its own last.pth's
    epoch was the best and was stopped before best.pth was, that best.pth (under the folder's lock)."""
    run_dir = cfg.run_dir
    own = Path(cfg.resume).resolve() == (run_dir / "last.pth").resolve()  # (not an older copy)

    def complete():  # rank 0's
        if not (own and best_behind(run_dir, resumed)):
            return False
        with run_lock(run_dir):  # not while another train.py writes there
            save_checkpoint(run_dir / "best.pth", resumed)
        return True

    written = (f"{run_dir / 'best.pth'} written from it (its epoch, the best, was stopped before best.pth was), "
               f"nothing else" if on_rank_0(dist, complete) else "nothing written")
    more = (f"--resume {cfg.resume} with --epochs above {resumed['epoch'] + 1} goes on" if cfg.auto_resume else
            f"raise --epochs above {resumed['epoch'] + 1} to go on")  # (--resume auto: the same command only)
    dist.print(f"{cfg.resume} has trained {resumed['epoch'] + 1} epoch(s), --epochs {cfg.epochs}: nothing to do, "
               f"{written} ({more})")


def begin_run(cfg: Config, held: ExitStack, resumed: dict | None, best_top1: float) -> tuple[float, MetricsLog]:
    """Rank 0's start: the run folder (config.json, the lock, held by `held`) and, for a --resume, the history it
    goes on from (its best.pth and metrics.jsonl, brought along from another folder); (best val top-1, the log)."""
    run_dir = cfg.run_dir
    try:
        start_run_dir(run_dir, cfg, held)
        best = (best_top1 if resumed is None else
                adopt_history(Path(cfg.resume), run_dir, resumed, in_place=resumes_in(run_dir, cfg)))
        return best, MetricsLog(run_dir, True, resume_epoch=resumed["epoch"] if resumed is not None else None)
    except VitdeitError:  # (WriteFailed is an OSError too: said already)
        raise
    except OSError as e:  # (after check_run_dir's test: a disk that filled up, or went read-only, since)
        name = Path(e.filename or run_dir)
        if run_dir not in (name, *name.parents):  # one of the --resume folder's files, read
            raise DataError(f"could not read {name}, of the run --resume {cfg.resume} goes on from: "
                            f"{first_line(e)}; make it readable by this user") from e
        raise write_failed(name, e, "the run stopped before its first epoch") from e


def _train(cfg: Config, dist: Dist, on_epoch_end, held: ExitStack) -> dict:
    """train(), in its process group: set-up, the epochs, their checkpoints. held: what the run holds until it
    ends (rank 0's lock on its run folder)."""
    device, run_dir = dist.device, cfg.run_dir
    with alike_on_every_rank():  # the flags, the manifest, a checkpoint, gathered decisions: train.py says it once
        manifest, resumed = read_run_files(lambda: read_inputs(cfg), cfg)
        class_map = manifest_class_map(manifest)
        num_classes = len(class_map)
        done = resumed is not None and resumed["epoch"] + 1 >= cfg.epochs  # a resumed run with nothing left to do
        check_run_dir(run_dir, cfg, dist, writes=not done)
        amp_dtype = resolve_amp(cfg.amp, device)
        use_compile, mode = compile_setting(cfg, device, dist.world)
        if resumed is not None:  # before the loaders: another --model or size is named as such, not by its batch
            if cfg.auto_resume:
                check_same_command(resumed, cfg, manifest)
            check_resumable(resumed["config"], cfg)
            if done:  # before anything is written: config.json keeps the run's recipe
                nothing_left(cfg, dist, resumed)
                return {}
            check_rewind(run_dir, cfg, resumed, dist)
    train_loader, val_loader, caught = build_loaders(cfg, manifest, dist, resumed)
    peak_lr = cfg.peak_lr(dist.world)
    machine = describe(device, dist.world, dali=train_loader.name == "dali")
    dist.print(run_line(cfg, manifest, dist, train_loader.name, amp_dtype, use_compile, mode, peak_lr,
                        steps=len(train_loader), machine=machine))
    for w in caught:
        dist.print(f"warning: {w.message}")
    for line in run_notes(cfg, manifest, dist, train_loader, resumed, peak_lr):
        dist.print(line)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = to_device(create_model(cfg.model, num_classes, cfg.img_size, cfg.patch_size, cfg.drop_path), cfg, device)
    if cfg.model == "deit_tiny_distill" and cfg.distillation == "none":
        net.set_distilled_training(False)  # no teacher: both heads learn the labels (their mean), as in timm
    teacher, teacher_top1 = prepare_teacher(cfg, class_map, manifest, val_loader, dist, amp_dtype)
    if (saved := (resumed or {}).get("teacher_top1")) is not None and teacher_top1 not in (None, saved):
        dist.print(f"note: --resume: the teacher scores {teacher_top1:.2f}% on val now, {saved:.2f}% when {cfg.resume} "
                   f"was saved: not the teacher this run distilled from so far (its file replaced or retrained?), or "
                   f"the val images read another way (loader, device); the run goes on with this one")

    augment = batch_augmentation(cfg, num_classes, device)
    optimizer = make_optimizer(net, cfg, peak_lr, device)
    steps = len(train_loader)
    scheduler = lr_schedule(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_top1, changed = 0, -1.0, []  # (-1: below any accuracy: the first epoch writes best.pth)
    if resumed is not None:
        changed = restore(resumed, cfg, net, optimizer, scaler, dist)
        if resumed.get("loader", train_loader.name) != train_loader.name:  # (noted as the run starts)
            changed.append(f"--loader {resumed['loader']!r} -> {train_loader.name!r}")
        start_epoch, best_top1 = resumed["epoch"] + 1, resumed["best_top1"]

    with alike_on_every_rank():  # rank 0's: the run folder, and the history a resumed run goes on from
        best_top1, log = (on_rank_0(dist, lambda: begin_run(cfg, held, resumed, best_top1))
                          or (best_top1, MetricsLog(run_dir, False)))  # (rank 0's best counts)
    if resumed is not None:
        dist.print(f"resumed from {cfg.resume} after epoch {resumed['epoch']} " + (
            f"(best val top-1 {best_top1:.2f}%)" if best_top1 >= 0 else f"(no best.pth of its epochs up to "
            f"{resumed['epoch']} was kept: the next epoch writes one)"))
    ema = make_ema(net, cfg, resumed, start_epoch, steps, dist) if cfg.model_ema else None

    model, teacher, graphs = compile_for_training(net, teacher, use_compile, mode)
    step = Step(wrap(model, dist), make_loss(cfg, teacher), optimizer, scaler, amp_dtype, cfg.clip_grad, graphs)

    record, pack = {}, pack_fingerprint(manifest)  # (the pack's, saved with every checkpoint)
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        seed_everything(cfg.seed, epoch, dist.rank)  # drop-path/erasing/mixup draws: a function of (seed, epoch, rank)
        train_loader.set_epoch(epoch)
        tr = train_one_epoch(step, train_loader, scheduler, epoch, dist, ema, augment, cfg.progress)
        broadcast_buffers(net)  # evaluate (and save) rank 0's BatchNorm statistics on every rank
        va = evaluate(net, val_loader, dist, amp_dtype, progress=cfg.progress)
        record = {"epoch": epoch, **tr, **va}
        if epoch == start_epoch:  # the run's history, for viz.py's report: the machine this start's img/s are
            record["machine"] = machine  # measured on (rank 0's node), and the settings a resume changed
            if changed:
                record["resumed_with"] = changed
        if ema is not None:
            broadcast_buffers(ema.module)
            record["val_top1_ema"] = evaluate(ema.module, val_loader, dist, amp_dtype, progress=False)["val_top1"]
        if teacher_top1 is not None:
            record["teacher_val_top1"] = teacher_top1
        is_best = va["val_top1"] > best_top1
        best_top1 = max(best_top1, va["val_top1"])
        loader_states = all_gather_object(train_loader.state())  # DALI: each rank's reader position and RNGs

        def save():  # rank 0's
            state = {
                "model": net.state_dict(), "best_top1": best_top1, "epoch": epoch, "config": cfg.to_dict(),
                "classes": list(class_map.wnids), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None, "metrics": record,
                "teacher_top1": teacher_top1, "loader": train_loader.name, "loader_states": loader_states,
                "amp": amp_trained(resumed, AMP_NAME[amp_dtype]),  # as --amp auto resolved on each device
                "pack": pack, "data_dir": str(Path(cfg.data_path).resolve())}  # (config's data_path: as typed)
            # the metrics line, then last.pth (the resume point), then best.pth: a run killed before last.pth redoes
            # this epoch (--resume cuts metrics.jsonl back) with the last best.pth kept; killed before best.pth,
            # it resumes after this epoch, whose best.pth adopt_history (or, the last epoch, best_behind) writes
            # from last.pth, the same state (best.pth first would lose the last best: this epoch's, not in
            # last.pth's history, is dropped at the resume)
            log.write(record)
            save_checkpoint(run_dir / "last.pth", state)
            if is_best:
                save_checkpoint(run_dir / "best.pth", state)

        with signals_held(say=dist.is_main):  # Ctrl-C and SIGTERM: once the epoch is written and said
            with alike_on_every_rank():  # (a full disk: every rank stops, saying it)
                on_rank_0(dist, save)
            ema_top1 = f", EMA top-1 {record['val_top1_ema']:.2f}%" if ema is not None else ""
            pace = pace_text(time.perf_counter() - t_epoch, cfg.epochs - 1 - epoch,  # (rank 0's clock)
                             compiling=use_compile and epoch == start_epoch)
            dist.print(f"epoch {epoch}: train loss {tr['train_loss']:.4f} top-1 {tr['train_top1']:.2f}% | val loss "
                       f"{va['val_loss']:.4f} top-1 {va['val_top1']:.2f}% top-5 {va['val_top5']:.2f}% "
                       f"({va['val_samples']} images){ema_top1} | {tr['images_per_s']:.0f} img/s, data wait "
                       f"{100 * tr['data_wait_frac']:.0f}% | {pace}" + (" *best" if is_best else ""))
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    return record


# the settings --eval-only reads (with the checkpoint's geometry): the val loader's and the device's, the checkpoint's
# path; rand_augment too, as one DALI cannot run makes --loader auto the PyTorch loader's, for val as well
EVAL_READS = ("data_path", "batch_size", "amp", "loader", "workers", "progress", "device", "channels_last",
              "dali_executor", "dali_prefetch", "dali_hw_decoder_load", "rand_augment", "output_dir", "run_name",
              "resume", "eval_only", "eval_ema")


def evaluate_checkpoint(cfg: Config) -> dict:
    """--eval-only: evaluate --resume (default RUN_DIR/best.pth) on cfg.data_path's val split: its trained weights,
    or with --eval-ema the EMA of them it holds (--model-ema), as timm's validate.py --use-ema."""
    with process_group(cfg.device) as dist:
        with alike_on_every_rank():  # the manifest and the checkpoint: train.py says their errors once per node
            path = cfg.checkpoint_read

            def read():  # (each node's own files)
                # a missing file named first (as _train's read does): its settings were the defaults
                resume_file_first(cfg, path, "--eval-only checkpoint")
                manifest = run_manifest(cfg)
                return manifest, load_checkpoint(path, manifest_class_map(manifest), what="--eval-only checkpoint")

            manifest, state = read_run_files(read, cfg, "--eval-only", path)
            try:  # (after the nodes' flags and files are found alike: every rank meets it)
                weights = ema_weights(state, path, "--eval-ema") if cfg.eval_ema else state
            except SettingError as e:
                raise together(e) from None
        trained = state["config"]
        # the geometry the weights were trained with; data and system settings from this invocation
        geometry = {k: saved_setting(trained, k) for k in ("model", "img_size", "patch_size", "crop_pct",
                                                             "interpolation")}
        flags = lambda values: ", ".join(f"{flag(k)} {v}" for k, v in values.items())  # noqa: E731
        # set to something else by a flag or --config (an API call's Config: off its default)
        asked = {k: getattr(cfg, k) for k, v in geometry.items() if k in cfg.given and getattr(cfg, k) != v}
        if asked:
            dist.print(f"note: --eval-only evaluates with the settings {path} was trained with ({flags(geometry)}), "
                       f"not {flags(asked)}")
        # a training setting given otherwise than the checkpoint's (parse_args' `given`): nothing here reads it
        reads = {*geometry, *EVAL_READS}
        if unread := {k: getattr(cfg, k) for k in sorted(cfg.given) if k not in reads
                      and getattr(cfg, k) != saved_setting(trained, k)}:
            dist.print(f"note: --eval-only: {flags(unread)} set{'s' * (len(unread) == 1)} training, not evaluation: "
                       f"not used here")
        ecfg = dataclasses.replace(cfg, **geometry)
        if upscaled := upscale_warning(cfg.data_path, manifest, ecfg.img_size, ecfg.crop_pct):
            dist.print(f"warning: {upscaled}")
        net = to_device(model_from_checkpoint(weights), ecfg, dist.device)
        loader = build_loader(ecfg, manifest, "val", dist)
        if text := workers_warning(cfg.workers, dali=loader.name == "dali"):
            dist.print(f"warning: {text}")
        out = evaluate(net, loader, dist, resolve_amp(ecfg.amp, dist.device), progress=cfg.progress)
        scores = state.get("metrics", {})  # this checkpoint's own scores when it was saved
        saved = scores.get("val_top1_ema" if cfg.eval_ema else "val_top1")
        then = (f"its epoch {state['epoch']} scored {saved:.2f}% when saved" if saved is not None
                else f"saved after epoch {state['epoch']}")
        if cfg.eval_ema:  # (best.pth is picked by the trained weights' score)
            then += f"; its trained weights {scores['val_top1']:.2f}%" if "val_top1" in scores else ""
        elif saved != state["best_top1"]:
            then += f"; the run's best.pth {state['best_top1']:.2f}%"
        if other := other_shards_note(state, path, cfg.data_path, manifest):
            then += f"; {other[0]}"
        if text := val_copies_text(manifest):  # --allow-train-val-copies
            dist.print(f"warning: {text} (the manifest's \"train_val_same_bytes\"): val top-1 counts images that a "
                       f"model trained on these shards has seen")
        dist.print(f"{path}{' (its EMA weights)' if cfg.eval_ema else ''}: val top-1 {out['val_top1']:.2f}% top-5 "
                   f"{out['val_top5']:.2f}% on {out['val_samples']} images of {cfg.data_path} resized with its "
                   f"{ecfg.interpolation} filter ({then})")
        return out
