"""One configuration object: defaults <- a --resume checkpoint's saved settings <- JSON config file <- command-line
flags; validated; saved with every run.

Every field is a flag (`lr` -> `--lr`, `eval_only` -> `--eval-only`); a config file is a JSON object of
the same names (a run's own `config.json` works: `--config runs/NAME/config.json`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import get_type_hints

from .classes import MANIFEST_NAME, no_duplicate_keys
from .errors import DataError, SettingError, quiet_rank, wait_for_local_rank_0

MODELS = ("vit_tiny", "deit_tiny_distill", "resnet18")
INTERPOLATIONS = ("bilinear", "bicubic")
COMPILE_MODES = ("auto", "default", "reduce-overhead")  # torch.compile's modes offered (engine.compile_mode)
DALI_EXECUTORS = ("dynamic", "legacy")  # DALI's execution models (Config.dali_executor)
STEP_STREAMS = ("default", "side", "high")  # the CUDA stream the training step runs on (engine.step_stream)
# what one command does, not the run's recipe: left out of saved configs, so `--config runs/NAME/config.json` of a
# resumed run neither resumes it again nor replaces it: add --resume, --eval-only, --overwrite or another --run-name
INVOCATION_FIELDS = ("resume", "eval_only", "eval_ema", "overwrite")
AUTO = "auto"  # --resume auto: RUN_DIR/last.pth where there is one, else a new run (auto_resume)
# how a run runs, not what it computes: where it writes, its progress bars, its device and speed switches, the loader
# (whose change a resume notes on its own): a resume may change them without a note, and viz.py does not list them
# among two runs' differences
HOW_IT_RUNS = ("workers", "progress", "output_dir", "run_name", "device", "compile", "compile_mode", "channels_last",
               "step_stream", "dali_executor", "dali_prefetch", "dali_hw_decoder_load", "loader")
# how this machine runs a run, not taken from a --resume checkpoint's saved settings: the machine resuming it may
# have other cores, devices or packages (the run folder, also in HOW_IT_RUNS, is taken: the run goes on there)
THIS_MACHINE = tuple(k for k in HOW_IT_RUNS if k not in ("output_dir", "run_name"))
# the settings only a run with a teacher reads
DISTILL_ONLY = ("teacher_ckpt", "teacher_weights", "distillation_alpha", "distillation_tau", "allow_weak_teacher")
# the settings each node of a multi-node run may set for itself: its own files' paths (what they hold is compared),
# its cores, its output (rank 0's alone is written); the others must be alike on every node
NODE_OWN = ("data_path", "resume", "teacher_ckpt", "teacher_weights", "workers", "progress", "output_dir", "run_name")


def sizes_fit(model: str, img_size: int, patch_size: int) -> bool:
    """Whether a `model` can be made at these sizes (px): a transformer's image is whole patches; a CNN has none.
    The one rule for a run's flags (Config.validate) and a checkpoint's config (checkpoint.contents_problem)."""
    return model == "resnet18" or img_size % patch_size == 0


def flag(name: str) -> str:
    """The command-line flag of a Config field: img_size -> --img-size (every message that names a setting)."""
    return "--" + name.replace("_", "-")


def below(*checks: tuple[str, int | None, int]) -> str | None:
    """What is wrong with the first (flag, value, least) whose value is below least (None: unset), or None."""
    return next((f"{name} {value}: must be >= {least}" for name, value, least in checks
                 if value is not None and value < least), None)


def refuse_below(parser: argparse.ArgumentParser, *checks: tuple[str, int | None, int]) -> None:
    """argparse's usage error (exit 2) for below(*checks): the entry points' counts and sizes, checked before any
    work."""
    if problem := below(*checks):
        parser.error(problem)


def refuse_empty(parser: argparse.ArgumentParser, *checks: tuple[str, str | None, str]) -> None:
    """argparse's usage error (exit 2) for the first (flag, value, what it names) whose value is empty or blank
    (None: unset): "" is the working folder to pathlib, where a command would read or write among whatever is there."""
    for name, value, what in checks:
        if value is not None and not value.strip():
            parser.error(f"{name} {value!r}: empty; name a {what}")


def usable_cores() -> int:
    """The cores this process may run on: a job scheduler's or container's share, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes() -> int:
    """The training processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun): they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def default_workers() -> int:
    """1 to 8 per rank: the usable cores split over the ranks on this node, less one for each rank's main process."""
    return max(1, min(8, usable_cores() // local_processes() - 1))


def workers_problem(workers: int) -> str | None:
    """What is wrong with a --workers value (train.py and viz.py), or None."""
    if workers < -1:
        return (f"--workers {workers}: must be >= 0 (0: load in the main process), or -1 for this node's share of its "
                f"cores")
    return None


def resolve_workers(workers: int) -> int:
    """A --workers value as it runs here: -1 is default_workers(), resolved on this machine (train.py and viz.py)."""
    return default_workers() if workers == -1 else workers


def dali_threads(workers: int) -> int:
    """DALI's decode threads for a resolved --workers value: one at the least (0 too)."""
    return max(1, workers)


def workers_warning(workers: int, dali: bool = False) -> str | None:
    """A warning where --workers (as given: -1 is resolved here) asks for more decode processes (DALI: threads) on
    this node, every rank's together, than it has usable cores: they then take turns on them, and with each rank's
    main process slow the step they feed (train.py, --eval-only and viz.py; in place of PyTorch's own DataLoader
    warning, which counts one process's workers, raised by each loader and again at its first iteration); None
    otherwise. Rank 0's node speaks for all of them, as default_workers does."""
    share, local, cores = default_workers(), local_processes(), usable_cores()
    each = resolve_workers(workers)
    each = dali_threads(each) if dali else each
    if each * local <= cores:
        return None
    fix = (f"--workers -1 takes this node's share ({share} here)" if each > share else
           "start fewer processes on this node" + ("" if dali else ", or --workers 0 (each decodes its own batches)"))
    return (f"--workers {workers}: {each * local} decode {'threads' if dali else 'processes'} on this node"
            + (f" ({each} for each of its {local} processes)" if local > 1 else "")
            + f", more than its {cores} usable core{'s' * (cores != 1)}: they take turns and slow each other; {fix}")


@dataclass
class Config:
    # --- data
    data_path: str = "demo_shards"  # a folder written by pack_shards.py (holds manifest.json)
    loader: str = "auto"  # auto | dali | torch; auto = DALI on CUDA when installed, else the PyTorch loader
    workers: int = -1  # decode processes (DALI: threads) per rank; -1: this node's share of its cores, 1 to 8
    img_size: int = 224  # px, square, train and val
    crop_pct: float = 0.875  # val: resize shorter side to img_size / crop_pct, centre-crop img_size
    crop_scale_min: float = 0.08  # train RandomResizedCrop area range [crop_scale_min, 1]
    # bilinear: the fastest antialiased filter of each loader; bicubic: the DeiT recipe's (timm's), sharper
    interpolation: str = "bilinear"  # bilinear | bicubic: the antialiased resize filter of train crops and val images
    rand_augment: str = ""  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1"; "" = off
    # DeiT's RASampler: an epoch keeps its length (and step count) but draws about 1/N of the images, each N times,
    # augmented anew each time; the PyTorch loader deals the copies to neighbouring ranks, DALI keeps them in a batch
    repeated_aug: int = 1  # train: repeated augmentation, N copies of each drawn image (DeiT: 3); 1 = off
    # the share not given to the JPEG engines goes to nvJPEG on the CUDA cores, which the training step needs too.
    # 1.0, not DALI's own 0.65: on an H200 (BENCHMARKS.md) it gave the highest rate alone and end to end (0.72 of
    # the step, against 0.64 and 0.54 at 0.65 and 0); DALI decodes on the CUDA cores where a GPU has no such engines
    dali_hw_decoder_load: float = 1.0  # DALI on a GPU: share of JPEGs for the hardware JPEG engines (A100/H100/H200)
    # dynamic, DALI 2's default, hands its outputs to PyTorch without a copy (DLPack), and frees each one in a DALI
    # thread after a cudaDeviceSynchronize; legacy copies each batch into PyTorch's own tensors on the step's stream
    # (~77 MB at 256 x 224 px, fp16) instead. On an H200 legacy was no faster (0.67-0.91 of the step against
    # 0.69-0.93, BENCHMARKS.md, 2026-12-04): what held DALI back beside CUDA graphs was CUDA's hardware queues
    dali_executor: str = "dynamic"  # DALI's execution model: dynamic (zero-copy) | legacy (a copy on the step's stream)
    # batches DALI prepares ahead of the one in use (DALI's prefetch_queue_depth), each a batch of decoded images in
    # GPU memory (~77 MB at 256 x 224 px, fp16); more can absorb uneven decode times (not measured yet to help)
    dali_prefetch: int = 2  # DALI: batches decoded ahead (DALI's default, 2)
    # --- model
    model: str = "vit_tiny"  # vit_tiny | deit_tiny_distill | resnet18 (the teacher, trained here)
    patch_size: int = 16  # px; ViT/DeiT only (small images want small patches: 32 px -> 4)
    drop_path: float = 0.1  # stochastic depth rate (ViT/DeiT)
    # --- teacher (deit_tiny_distill only)
    teacher: str = "resnet18"  # the teacher architecture (resnet18 only)
    teacher_ckpt: str = ""  # a best.pth from `train.py --model resnet18` on the same class map
    teacher_weights: str = ""  # imagenet1k (torchvision's, cut to the WNIDs; "" = it if no --teacher-ckpt) or its .pth
    allow_weak_teacher: bool = False  # distil even from a teacher whose val top-1 is near chance
    distillation_type: str = "hard"  # hard (the DeiT paper's better one) | soft | none
    distillation_alpha: float = 0.5  # total = (1 - alpha) * CE(labels) + alpha * distillation
    distillation_tau: float = 1.0  # soft-distillation temperature
    # --- optimisation (the DeiT recipe, shortened)
    epochs: int = 5  # training epochs
    batch_size: int = 128  # per process; global batch = batch_size * world size
    lr: float = 5e-4  # per 512 images of global batch: effective lr = lr * global_batch / 512 (DeiT; peak_lr)
    min_lr: float = 1e-6  # cosine floor (absolute)
    warmup_epochs: float = 1.0  # per-step linear warm-up from peak lr / 1000 to the peak lr
    weight_decay: float = 0.05  # not applied to norms, biases, position embeddings and tokens
    label_smoothing: float = 0.1  # of the label cross-entropy
    mixup: float = 0.0  # timm Mixup alpha (DeiT: 0.8); 0 = off
    cutmix: float = 0.0  # timm CutMix alpha (DeiT: 1.0); 0 = off
    random_erasing: float = 0.0  # timm RandomErasing probability per train image, per-pixel noise (DeiT: 0.25); 0 = off
    clip_grad: float = 1.0  # max global grad norm; 0 = off
    model_ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3); its val top-1 is logged
    model_ema_decay: float = 0.9998  # per step: the starting weights keep decay**steps of the EMA (warned above 5 %)
    # --- system
    device: str = "auto"  # auto | cuda | cpu
    amp: str = "auto"  # auto (bf16 where supported, else fp16 + GradScaler; off on CPU) | bf16 | fp16 | off
    compile: str = "auto"  # auto (on for CUDA) | on | off
    # reduce-overhead: torch.compile captures the model's (and teacher's) kernels as CUDA graphs, each replayed with one
    # launch instead of one Python call per kernel; the optimiser, clipping and metrics stay eager. On an H200, as
    # graphs the DeiT step ran 1.37x as fast, and 1.27x fed by DALI (BENCHMARKS.md, 2026-12-04)
    compile_mode: str = "auto"  # auto (reduce-overhead: one process on CUDA; else default) | default | reduce-overhead
    # PyTorch's default stream is CUDA's legacy NULL stream, which waits for, and holds up, work on any blocking stream
    step_stream: str = "default"  # CUDA: the stream training runs on: default | side | high (side, highest priority)
    channels_last: bool = True  # model weights in channels-last memory (inputs always are)
    seed: int = 0  # weights, data order and augmentation all follow from it
    output_dir: str = "runs"  # runs go to OUTPUT_DIR/RUN_NAME/
    run_name: str = ""  # default: the model name; the run writes OUTPUT_DIR/RUN_NAME/
    # auto, for a job restarted with the command it started with (torchrun --max-restarts, a Slurm requeue): the run
    # goes on from its last finished epoch, or starts as a new one where it has none; another command is refused
    resume: str = ""  # a last.pth to continue exactly from (its settings the defaults); auto: RUN_DIR/last.pth, if any
    overwrite: bool = False  # replace the run in OUTPUT_DIR/RUN_NAME (a folder holding last.pth is refused without)
    eval_only: bool = False  # evaluate --resume (or RUN_DIR/best.pth; its saved settings the defaults) on val, exit
    eval_ema: bool = False  # --eval-only: score the checkpoint's EMA of the weights (--model-ema), not the weights
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        self.validate()
        # not fields (neither flags nor saved), for messages: parse_args sets them from what it read. A Config made in
        # code counts as given the settings it sets off their defaults, and its data_path (its caller names the
        # shards); so does one made by dataclasses.replace (copy.copy keeps them)
        self.given = frozenset({"data_path", *(f.name for f in fields(self) if getattr(self, f.name) != f.default)})
        self.inherited = frozenset()  # the settings the --resume (or --eval-only) checkpoint set, not given
        self.auto_resume = False  # --resume auto was typed (resume: what it found, or "")

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise SettingError(msg)

        for f in fields(self):  # argparse reads "inf" and "nan" as floats: no setting here means either
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v),
                 f"{flag(f.name)} {v}: must be a finite number")
        need(self.model in MODELS, f"--model {self.model!r}: choose one of {', '.join(MODELS)}")
        need(self.loader in ("auto", "dali", "torch"), f"--loader {self.loader!r}: choose auto, dali or torch")
        need(self.device in ("auto", "cuda", "cpu"), f"--device {self.device!r}: choose auto, cuda or cpu")
        need(self.amp in ("auto", "bf16", "fp16", "off"), f"--amp {self.amp!r}: choose auto, bf16, fp16 or off")
        need(self.interpolation in INTERPOLATIONS,
             f"--interpolation {self.interpolation!r}: choose {' or '.join(INTERPOLATIONS)}")
        need(self.compile in ("auto", "on", "off"), f"--compile {self.compile!r}: choose auto, on or off")
        need(self.compile_mode in COMPILE_MODES,
             f"--compile-mode {self.compile_mode!r}: choose {', '.join(COMPILE_MODES)}")
        need(self.compile_mode != "reduce-overhead" or self.compile != "off",
             f"--compile-mode {self.compile_mode} with --compile off: nothing is compiled; drop one of them")
        need(self.step_stream in STEP_STREAMS, f"--step-stream {self.step_stream!r}: choose {', '.join(STEP_STREAMS)}")
        need(self.step_stream == "default" or self.device != "cpu",
             f"--step-stream {self.step_stream} with --device cpu: a CUDA stream; drop it on a CPU")
        need(self.distillation_type in ("soft", "hard", "none"),
             f"--distillation-type {self.distillation_type!r}: choose soft, hard or none")
        need(self.teacher == "resnet18", f"--teacher {self.teacher!r}: only resnet18 is supported")
        need(0 <= self.distillation_alpha <= 1, f"--distillation-alpha {self.distillation_alpha}: must be in [0, 1]")
        need(self.distillation_tau > 0, f"--distillation-tau {self.distillation_tau}: must be > 0")
        need(self.resume != AUTO, "resume='auto': parse_args (train.py --resume auto) looks for RUN_DIR/last.pth; a "
             "Config made in code takes the checkpoint's path, or '' for a new run")
        need(self.eval_only or not self.eval_ema, "--eval-ema: scores a checkpoint's EMA with --eval-only (training "
             "with --model-ema scores it every epoch); add --eval-only, or drop --eval-ema")
        alpha = self.distillation_alpha  # (a DeiT that distils: at 0 or 1, one of its two heads learns nothing)
        need(self.distillation == "none" or 0 < alpha < 1 or self.eval_only,  # (--eval-only: not read)
             f"--distillation-alpha {alpha:g} with --distillation-type {self.distillation_type}: the "
             f"{'distillation' if alpha == 0 else 'class'} head then learns nothing, yet the DeiT predicts with the "
             f"mean of its two heads; choose a value between 0 and 1 (DeiT: 0.5), or --distillation-type none for a "
             f"DeiT without a teacher (both heads then learn the labels)")
        need(self.img_size >= 8, f"--img-size {self.img_size}: must be >= 8")
        need(self.patch_size >= 1 and sizes_fit(self.model, self.img_size, self.patch_size),
             f"--patch-size {self.patch_size} must divide --img-size {self.img_size}")  # ViT/DeiT only
        need(self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1")
        # (31 bits: what every generator the run seeds takes; the PyTorch loader's epoch seed, seed * 1000003 +
        # epoch, overflowed 64 bits past 9e12 with a traceback after the run folder was made)
        need(0 <= self.seed < 2**31, f"--seed {self.seed}: must be in 0..{2**31 - 1}")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1 (images per process)")
        need(self.lr > 0, f"--lr {self.lr}: must be > 0")
        need(workers_problem(self.workers) is None, workers_problem(self.workers))
        # ResNet-18 halves the image 5 times: at <= 32 px its last BatchNorm sees one value per channel and image (in
        # training; evaluation uses its running statistics)
        need(self.model != "resnet18" or self.batch_size >= 2 or self.img_size > 32 or self.eval_only,
             f"--model resnet18 --batch-size 1 --img-size {self.img_size}: its last BatchNorm would see one value per "
             f"channel (a 1x1 map of one image) and cannot train; use --batch-size >= 2 or --img-size > 32")
        need(self.dali_executor in DALI_EXECUTORS,
             f"--dali-executor {self.dali_executor!r}: choose {' or '.join(DALI_EXECUTORS)}")
        need(self.dali_prefetch >= 1, f"--dali-prefetch {self.dali_prefetch}: must be >= 1 (DALI's default: 2)")
        need(0 <= self.dali_hw_decoder_load <= 1,
             f"--dali-hw-decoder-load {self.dali_hw_decoder_load}: must be in [0, 1]")
        for name in ("crop_scale_min", "crop_pct"):  # fractions of the image: its area, its side
            need(0 < getattr(self, name) <= 1, f"{flag(name)} {getattr(self, name)}: must be in (0, 1]")
        for name in ("random_erasing", "drop_path"):  # per image; the deepest block's (timm spreads it linearly)
            need(0 <= getattr(self, name) <= 1, f"{flag(name)} {getattr(self, name)}: must be in [0, 1]")
        for name in ("label_smoothing", "model_ema_decay"):  # 1 would make the targets uniform, freeze the EMA
            need(0 <= getattr(self, name) < 1, f"{flag(name)} {getattr(self, name)}: must be in [0, 1)")
        for name in ("mixup", "cutmix", "clip_grad", "warmup_epochs", "min_lr", "weight_decay"):
            need(getattr(self, name) >= 0, f"{flag(name)} {getattr(self, name)}: must be >= 0")
        need(self.batch_size % 2 == 0 or (self.mixup == 0 and self.cutmix == 0),
             f"--batch-size {self.batch_size}: Mixup/CutMix pair images, so it must be even")
        problem = self.rand_augment and rand_augment_problem(self.rand_augment)
        need(not problem, f"--rand-augment {self.rand_augment!r}: {problem}; e.g. 'rand-m9-mstd0.5-inc1' (rand, then "
                          f"-m magnitude, -n ops, -mstd magnitude std, -inc 0/1), or '' for none")
        need(self.repeated_aug >= 1, f"--repeated-aug {self.repeated_aug}: must be >= 1 (1 = off; DeiT: 3)")
        need(not (self.loader == "dali" and self.torch_only),
             f"{' and '.join(self.torch_only)}: PyTorch loader only, not in DALI's pipeline: use --loader torch (or "
             f"auto, which picks it then), or drop it")
        need(not (self.teacher_ckpt and self.teacher_weights),
             "give either --teacher-ckpt or --teacher-weights, not both")
        name = Path(self.run_name)
        need(not self.run_name or (self.run_name.strip() and name.parts and not name.is_absolute()
                                   and ".." not in name.parts),
             f"--run-name {self.run_name!r}: a folder inside --output-dir (no absolute path, no '..': the run goes to "
             f"--output-dir/RUN_NAME; set --output-dir for another place)")
        need(self.output_dir.strip() != "", f"--output-dir {self.output_dir!r}: name a folder (the default: runs)")
        need(self.data_path.strip() != "", f"--data-path {self.data_path!r}: name the shards' folder (pack_shards.py "
                                           f"--out; the default: demo_shards)")

    @property
    def torch_only(self) -> list[str]:
        """The train settings only the PyTorch loader implements, as flags, where set."""
        from .data.dali_augment import dali_runs

        ra = self.rand_augment
        return [f"--rand-augment {ra!r}"] if ra and not dali_runs(ra) else []

    @property
    def mixes(self) -> bool:
        """Mixup or CutMix on: the targets are soft (mixed, smoothed) label vectors."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def decode_workers(self) -> int:
        """--workers, -1 resolved on this machine: a saved config keeps -1, so `--config` of a run from a laptop
        does not hold a 16-core node to the laptop's 1 worker."""
        return resolve_workers(self.workers)

    @property
    def name(self) -> str:
        return self.run_name or self.model

    @property
    def distillation(self) -> str:
        """The distillation this run does (distillation_of)."""
        return distillation_of(self.model, self.distillation_type)

    def global_batch(self, world: int) -> int:
        """Images per optimiser step: --batch-size per process x `world` processes."""
        return self.batch_size * world

    def peak_lr(self, world: int) -> float:
        """The lr the schedule peaks at: --lr is per 512 images of global batch (DeiT's linear scaling)."""
        return self.lr * self.global_batch(world) / 512

    @property
    def run_dir(self) -> Path:
        """Where the run writes: OUTPUT_DIR/RUN_NAME (relative to the folder the command runs in)."""
        return Path(self.output_dir) / self.name

    @property
    def checkpoint_read(self) -> str:
        """The checkpoint this command reads, whose saved settings are its defaults: --resume, or for --eval-only
        RUN_DIR/best.pth; "" for a new run (settings_source, which parse_args asks before a Config exists)."""
        return settings_source(asdict(self))

    def to_dict(self) -> dict:
        """The run's recipe, as saved in config.json and in checkpoints: every field but INVOCATION_FIELDS."""
        return {k: v for k, v in asdict(self).items() if k not in INVOCATION_FIELDS}


def distillation_of(model: str, distillation_type: str) -> str:
    """The distillation a run (this one, or a checkpoint's) does: --distillation-type for DeiT, none for the others."""
    return distillation_type if model == "deit_tiny_distill" else "none"


def saved_setting(config: dict, key: str):
    """A field of a run's saved config; runs saved before the field existed ran with its default."""
    if key in config:
        return config[key]
    f = next(f for f in fields(Config) if f.name == key)
    return f.default


def rand_augment_problem(spec: str) -> str | None:
    """What is wrong with a timm RandAugment spec, or None. timm itself fails on some mistakes with a bare assert
    when the loader builds the transform, and lets others pass without a word: a part with no number (it skips
    it), a magnitude above the maximum (it clips it to mmax, 10 by default), no op per image (n0)."""
    from .data import timm_rand_augment

    try:
        timm_rand_augment(spec)
    except (AssertionError, ValueError, KeyError, IndexError):
        return "not a timm RandAugment spec"
    numbers = {}
    for part in spec.split("-")[1:]:
        if not part:
            return "it has an empty part ('--')"
        if part.startswith("t"):  # the op set's name (tweights, ...): timm checked it above
            continue
        key, value = re.match(r"(\D*)(\d.*)?$", part).groups()
        if value is None:
            return f"the part {part!r} has no number, and timm would skip it"
        numbers[key] = float(value)
    magnitude, mmax = numbers.get("m", 10), numbers.get("mmax") or 10  # timm's defaults (mmax0: its default too)
    if magnitude > mmax:
        return (f"magnitude {magnitude:g}{'' if 'm' in numbers else ' (timm default)'} is above the maximum (mmax) "
                f"{mmax:g}, to which timm would clip it")
    if numbers.get("n", 2) < 1:
        return "n0 applies no op to any image"
    if numbers.get("p", 0.5) <= 0:
        return "p0 applies no op to any image"
    return None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def from_dict(values: dict, source: str = "config") -> Config:
    """Build a Config from a dict, rejecting unknown keys and wrong types."""
    hints = get_type_hints(Config)
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingError(f"{source}: unknown key(s) {unknown}; valid keys are the flags' names, e.g. 'batch_size'")
    for k, v in values.items():
        if not _type_ok(hints[k], v):
            raise SettingError(f"{source}: {k}={v!r} should be of type {hints[k].__name__}")
    return Config(**{k: float(v) if hints[k] is float else v for k, v in values.items()})


def _type_ok(t: type, v) -> bool:
    if t is bool or isinstance(v, bool):
        return t is bool and isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float))
    return isinstance(v, t)


def field_comments() -> dict[str, str]:
    """Each field's trailing comment in the Config source: one place documents a field, --help shows it."""
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors print once per torchrun node, not once per GPU: every local rank parses
    the same flags and --config file and stops at the same error, so local rank 0 alone says it (the one `torchrun
    --local-ranks-filter 0` shows); train.py does the same for the errors every rank meets alike
    (errors.alike_on_every_rank)."""

    def error(self, message: str):
        if not quiet_rank():
            super().error(message)  # argparse's usage and message, exit 2
        wait_for_local_rank_0()
        sys.exit(2)


def typed_from_now(output_dir: Path, found: Path) -> Path | None:
    """The working folder a run was started from, as seen from here: its --output-dir, typed relative to that
    folder, was found at `found` (moved, or seen from another working folder). None where that cannot be told (an
    absolute --output-dir, or `found` not ending in it: a folder's path here holds no '..')."""
    n = len(output_dir.parts)  # ("." has none)
    if output_dir.is_absolute() or (n and found.parts[-n:] != output_dir.parts):
        return None
    return found.parents[n - 1] if n else found


RUN_FILES = ("data_path", "teacher_ckpt", "teacher_weights")  # the settings that name a run's input files


def moved_run_folder(saved: dict, ckpt: str | Path) -> Path | None:
    """The run folder of a checkpoint saved with the config `saved`, where its --output-dir and --run-name as typed
    point elsewhere from here (moved, or seen from another working folder); None where they point at it, or where
    the checkpoint is not in its run's folder (a copy elsewhere, named otherwise)."""
    name = saved.get("run_name") or saved.get("model")  # (Config.name: the run folder's name)
    folder = Path(ckpt).resolve().parent
    moved = (Path(saved.get("output_dir", "runs")) / str(name)).resolve() != folder and folder.name == name
    return folder if moved else None


def run_files_here(state: dict, ckpt: str | Path) -> dict:
    """A checkpoint's RUN_FILES as seen from here (train.py --resume, viz.py): its shards as typed where that names,
    from here, the folder they resolved to then (data_dir), else at that folder where it still holds shards; a
    relative path, if its run folder has moved or is seen from another working folder, taken from the folder the run
    was started from, where it exists there."""
    saved = state["config"]
    files = {k: saved[k] for k in RUN_FILES if k in saved}
    settled = set()  # the files found as they are
    if isinstance(data_dir := state.get("data_dir"), str) and (Path(data_dir) / MANIFEST_NAME).is_file():
        typed = files.get("data_path")  # (kept: the resumed run's config.json then keeps the path as it was typed)
        if not (isinstance(typed, str) and typed and Path(typed).resolve() == Path(data_dir).resolve()):
            files["data_path"] = data_dir
        settled.add("data_path")
    if (folder := moved_run_folder(saved, ckpt)) is None:
        return files
    output_dir, typed_from = Path(saved.get("output_dir", "runs")), None
    for seen in (Path(os.path.abspath(ckpt)).parent.parent, folder.parent):  # through symlinks, then their targets
        typed_from = typed_from or typed_from_now(output_dir, seen)
    for key, value in files.items() if typed_from is not None else ():
        if (key not in settled and isinstance(value, str) and value not in ("", "imagenet1k")
                and not Path(value).is_absolute() and (typed_from / value).exists()):
            files[key] = str(typed_from / value)
    return files


def resumed_settings(resume: str) -> dict:
    """The settings the --resume checkpoint was saved with, but THIS_MACHINE's: what its run goes on with where
    neither --config nor a flag says otherwise (a bare `--resume runs/NAME/last.pth` continues that run, in its
    folder, with its recipe). {} where the file cannot be read: the run names its error as it reads it again."""
    import torch

    try:  # (mmap: the config without reading the weights; the run loads the whole file later)
        state = torch.load(resume, map_location="cpu", weights_only=True, mmap=True)
        saved = dict(state["config"])
    except Exception:  # (missing, a folder, not a checkpoint, cut short: each said later, with its fix)
        return {}
    saved.update(run_files_here(state, resume))
    if (folder := moved_run_folder(saved, resume)) is not None:
        # its run folder, seen from another working folder or moved: the run goes on there (a copy elsewhere, named
        # otherwise, goes on in its run's folder as typed, taking its history: README, branching)
        saved["output_dir"], saved["run_name"] = str(folder.parent), folder.name
    known = {f.name for f in fields(Config)}
    return {k: v for k, v in saved.items() if k in known and k not in THIS_MACHINE + INVOCATION_FIELDS}


def run_dir_of(values: dict) -> Path:
    """Config.run_dir of the settings given (flags and --config), before a Config exists."""
    name = values.get("run_name") or values.get("model") or Config.model  # (Config.name)
    return Path(str(values.get("output_dir") or Config.output_dir)) / str(name)  # (a wrong type: from_dict says it)


def settings_source(values: dict) -> str:
    """The checkpoint whose saved settings are the run's defaults: --resume's, or for a bare --eval-only the
    RUN_DIR/best.pth it evaluates (`--run-name NAME --eval-only` scores that run on its own shards); "" for none."""
    if values.get("resume") or not values.get("eval_only"):
        return values.get("resume") or ""
    return str(run_dir_of(values) / "best.pth")


def auto_resume(values: dict) -> str:
    """--resume auto's checkpoint: RUN_DIR/last.pth of the settings given, where it is a file; else "" (a new run).
    Each rank looks for itself, before any of them has written: a node that sees another last.pth than rank 0's (no
    shared file system) is refused with the others by the node check (runs.read_run_files)."""
    last = run_dir_of(values) / "last.pth"
    if values.get("eval_only"):
        raise SettingError(f"--resume auto with --eval-only: --resume auto continues the training of the run in "
                           f"{last.parent}; --eval-only without --resume scores its best.pth: drop --resume auto")
    if values.get("overwrite"):
        raise SettingError(f"--resume auto with --overwrite: one continues the run in {last.parent}, the other "
                           f"replaces it; drop one")
    return str(last) if last.is_file() else ""


def checkpoint_named(resume: str, source: str) -> str:
    """The checkpoint whose settings a run took (settings_source's), as messages name it: `--resume PATH`, or the
    --eval-only checkpoint's path."""
    return f"--resume {source}" if resume else source


def parse_args(argv=None, description: str = "") -> Config:
    """defaults <- a --resume checkpoint's saved settings <- --config FILE <- flags."""
    hints = get_type_hints(Config)
    comments = field_comments()
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of config values; flags override it")
    for f in fields(Config):
        t = hints[f.name]
        default = f.default
        kind = _parse_bool if t is bool else t
        p.add_argument(flag(f.name), type=kind, default=None, metavar=t.__name__.upper(),
                       nargs="?" if t is bool else None, const=True if t is bool else None,
                       help=f"{comments.get(f.name, '')} (default: {default!r})".replace("%", "%%"))
    ns = vars(p.parse_args(argv))
    values = {}
    path = ns.pop("config")
    if path:
        try:
            raw = Path(path).read_bytes()
            # JSON's encoding, whatever the locale's; a key twice is refused (json keeps the last without a word)
            values = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
        except (OSError, ValueError, DataError) as e:  # (ValueError: JSONDecodeError, UnicodeDecodeError)
            if isinstance(e, UnicodeDecodeError) and raw[:2] == b"PK":  # torch.save's zip archive
                p.error(f"--config {path}: a checkpoint, not a JSON config; pass its run's config.json (--config "
                        f"{Path(path).parent / 'config.json'}), or the checkpoint itself as --resume")
            p.error(f"--config {path}: {e}" + ("; keep one of them" if isinstance(e, DataError) else ""))
        if not isinstance(values, dict):
            p.error(f"--config {path}: must hold a JSON object")
    values.update({k: v for k, v in ns.items() if v is not None})
    if auto := values.get("resume") == AUTO:
        try:
            values["resume"] = auto_resume(values)
        except SettingError as e:
            p.error(str(e))
    source = settings_source(values)
    inherited = resumed_settings(source) if source else {}
    if inherited and not values.get("resume"):  # --eval-only's RUN_DIR/best.pth: evaluated there, whatever folder
        inherited.update(output_dir=str(Path(source).parent.parent), run_name=Path(source).parent.name)  # it names
    try:
        cfg = from_dict({**inherited, **values}, source=path or "arguments")
    except ValueError as e:
        typed = re.match(rf"{re.escape(path or 'arguments')}: ([a-z0-9_]+)=", str(e))  # from_dict's: a wrong type
        named = re.match(r"--([a-z0-9-]+) ", str(e)) or typed
        key = named[1].replace("-", "_") if named else None
        if key is not None and key not in values and key in inherited:
            said = str(e).removeprefix(f"{path or 'arguments'}: ") if typed else e  # (the checkpoint's, not theirs)
            p.error(f"{said} (the value is the one {checkpoint_named(values.get('resume'), source)} was saved with: "
                    f"give the flag to override it)")
        from_file = path and named and ns.get(key) is None  # not given on the command line
        p.error(f"{e}" + (f" (the value comes from --config {path}: give the flag to override it)" if from_file
                          else ""))
    cfg.given = frozenset(values)  # the settings a flag or --config set
    cfg.inherited = frozenset(inherited) - cfg.given
    cfg.auto_resume = auto
    return cfg
