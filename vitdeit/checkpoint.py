"""Checkpoints: best.pth / last.pth with the plain module's weights, the resolved config and all training state.

Keys: model, best_top1, epoch (the last finished, 0-based), config, classes (the WNID list: the class map
the weights belong to), optimizer, scheduler, scaler, ema (or None), metrics (that epoch's), teacher_top1
(the teacher's val top-1 when distilling, else None), loader (torch or dali), loader_states (per rank: the
DALI loader's state(), its reader checkpoint and the settings it is valid for; None for the PyTorch loader,
whose epoch is a function of (seed, epoch) alone), amp (the precisions --amp resolved to, per device, over the
run), pack (classes.pack_fingerprint of the shards it trained on), data_dir (their folder, resolved). scheduler and
teacher_top1 are not restored: a resumed run sets the lr from its step count (scheduler is kept for inspection: nothing
reads it), and evaluates its teacher again (a --resume compares teacher_top1 with its score now).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import zipfile
from pathlib import Path

import torch

from .classes import ClassMap, class_difference, same_pack
from .errors import DataError, MissingFile, SettingError, first_line, write_failed

REQUIRED = ("model", "best_top1", "epoch", "config", "classes")


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # never a half-written checkpoint under the real name
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a truncated .tmp (a full disk, an interrupt) would only take space
        # a full disk surfaces as OSError or as a RuntimeError of torch's zip writer (inline_container.cc:
        # "PytorchStreamWriter failed writing file ...", "unexpected pos 704 vs 598"); any other RuntimeError (a
        # CUDA error while copying tensors to the host) keeps its traceback
        if not isinstance(e, OSError) and not (isinstance(e, RuntimeError) and any(
                m in str(e) for m in ("inline_container", "failed writing"))):
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise write_failed(path, e, kept) from e


@contextlib.contextmanager
def signals_held(say: bool = True):
    """Ctrl-C and SIGTERM wait for the block (an epoch's files, written together) to end, then act as they would
    have (train.py's handlers: stop, and say how to go on from the last.pth just written); a second Ctrl-C acts at
    once. A signal ignored (SIG_IGN: started in the background) stays ignored. say: print that it waits (rank 0).
    Only the main thread can set handlers: elsewhere, no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGINT last: restored last below, a Ctrl-C from then on meets its own handler, with every other one restored
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    held = [s for s, handler in before.items() if handler is not signal.SIG_IGN]
    caught, ending = [], []

    def hold(signum, frame):
        if caught and signum == signal.SIGINT and not ending:  # the second: now (save_checkpoint removes its .tmp)
            raise KeyboardInterrupt
        if not caught and say and not ending:
            again = " (Ctrl-C again stops now, without it)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name}: stopping once this epoch's checkpoint is written{again}",
                  file=sys.stderr, flush=True)
        caught.append(signum)

    try:
        with _blocked(held):  # a signal between two handlers' changes waits for both (one may raise)
            for s in held:
                signal.signal(s, hold)
        yield
    finally:
        ending.append(True)  # hold() no longer raises: the handlers are restored whole
        with _blocked(held):
            for s in held:
                signal.signal(s, signal.SIG_DFL if before[s] is None else before[s])  # (None: set outside Python)
    if caught:  # (not after an error in the block: it is raised instead)
        signal.raise_signal(caught[0])


@contextlib.contextmanager
def _blocked(signums: list):
    """The signals wait (pending) until the block ends, where the system can block them (not on Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def checkpoint_file(path: str | Path, what: str = "checkpoint") -> Path:
    """PATH, once it is a file: a folder (a run's) or a missing path is an error naming it and the fix. Called
    before a run's minutes of set-up for a file it reads later (--teacher-ckpt), and by load_checkpoint."""
    path = Path(path)
    if path.is_dir():  # a run folder
        inside = [f"{path / name}" for name in ("last.pth", "best.pth") if (path / name).is_file()]
        raise MissingFile(f"{what} {path}: a folder, not a checkpoint; pass a checkpoint file" + (
            f" in it: {' or '.join(inside)}." if inside else " (train.py writes OUTPUT_DIR/RUN_NAME/best.pth and "
                                                                "last.pth)."))
    if not path.is_file():
        fix = ("pass the right path, or leave --resume out to start a new run" if what == "--resume" else
               "train one with train.py (it writes OUTPUT_DIR/RUN_NAME/best.pth and last.pth) or pass the right path")
        raise MissingFile(f"{what} {path}: file not found; {fix}.")
    return path


def load_checkpoint(path: str | Path, class_map: ClassMap | None = None, what: str = "checkpoint") -> dict:
    path = checkpoint_file(path, what)
    state = torch_load(path, what)
    if not isinstance(state, dict):
        raise DataError(f"{what} {path}: not a vitdeit checkpoint (a {type(state).__name__}, not a dict).")
    missing = [k for k in REQUIRED if k not in state]
    # another tool's weights (no config or classes, which only train.py writes): a state dict (torchvision's), or one
    # under "model" (the DeiT reference's released weights) or "state_dict" (timm's train.py checkpoints)
    under = next((k for k in ("model", "state_dict") if isinstance(state.get(k), dict)), None)
    weights = state[under] if under else state
    if {"config", "classes"} <= set(missing) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
        # torchvision's ResNet-18: 2 blocks a stage, no 1x1 bottleneck conv3 (not a ResNet-34 or 50), a flat state
        # dict as --teacher-weights takes
        resnet18 = under is None and "layer4.1.conv2.weight" in weights and not any(
            k in weights for k in ("layer4.2.conv1.weight", "layer1.0.conv3.weight"))
        hint = ("a ResNet-18's weights (torchvision's) go to --teacher-weights" if resnet18 else
                "train a teacher with train.py --model resnet18" if what == "--teacher-ckpt" else
                "train.py writes its run's checkpoints, RUN_DIR/best.pth and last.pth")
        held = f"{len(weights)} tensors" + (f" under '{under}'" if under else "")
        raise DataError(f"{what} {path}: not a vitdeit checkpoint (a model's weights, {held}, without a run's "
                        f"{', '.join(k for k in missing if k != 'model')}); {hint}.")
    if missing:
        raise DataError(f"{what} {path}: not a vitdeit checkpoint (missing {missing}).")
    if problem := contents_problem(state):
        raise DataError(f"{what} {path}: {problem}: not what train.py writes (edited, made by another tool, or saved "
                        f"with a timm or torchvision whose models differ); pass another checkpoint.")
    if class_map is not None:
        check_class_map(state, class_map, path, what)
    return state


def contents_problem(state: dict) -> str | None:
    """What in a dict with every REQUIRED key does not fit what train.py writes, which the readers of a checkpoint
    take for granted: its config (a dict naming a model and sizes it can have), its classes (WNIDs), and its
    weights and EMA of them, against the state dict of the model its config and classes describe (made on the meta
    device: no memory, no RNG draw). None where all fit."""
    from .config import MODELS, saved_setting, sizes_fit
    from .models import create_model  # (models reads checkpoints: imported here, not at the top)

    cfg, classes = state["config"], state["classes"]
    if not isinstance(cfg, dict):
        return f"its config is a {type(cfg).__name__}, not a dict of settings"
    if (model := cfg.get("model")) not in MODELS:
        return f"its config's model is {model!r}, not one of {', '.join(MODELS)}"
    img_size, patch_size = (saved_setting(cfg, k) for k in ("img_size", "patch_size"))
    if not (all(type(v) is int and v > 0 for v in (img_size, patch_size)) and sizes_fit(model, img_size, patch_size)):
        return f"its config's img_size {img_size!r} and patch_size {patch_size!r} are not sizes a {model} can have"
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        kind = "an empty list" if classes == [] else f"a {type(classes).__name__}"
        return f"its classes are not a list of WNIDs ({kind})"
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_model(model, len(classes), img_size, patch_size)
                    .state_dict().items()}
    for key, name in (("model", "weights"), ("ema", "EMA weights")):
        weights = state.get(key)
        if key == "ema" and weights is None:  # (trained without --model-ema)
            continue
        if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
            return f"its {name} are not a state dict of tensors (a {type(weights).__name__})"
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        if shapes != expected:
            missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
            odd = (f"no {missing[0]}" if missing else f"an unexpected {unexpected[0]}" if unexpected else
                   next(f"{k} of shape {list(shapes[k])}, not {list(expected[k])}" for k in expected
                        if shapes[k] != expected[k]))
            sizes = f"{img_size} px" + (f", {patch_size} px patches" if model != "resnet18" else "")
            return (f"its {name} do not fit the {model} of {len(classes)} class{'es' * (len(classes) > 1)} ({sizes}) "
                    f"its config and classes describe: {odd}")
    return None


def torch_load(path: Path, what: str):
    """torch.load on the CPU, tensors and plain containers only; a file it cannot read is a DataError naming it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or the pickle of torch before 1.6
        raise DataError(f"{what} {path}: not a file torch.save wrote (it starts with {head!r}, not a zip archive or "
                        f"a pickle); pass a .pth checkpoint.")
    changed = ": the file changed after it was written (a damaged copy or disk); copy it again or pass another file."
    record = unread = None  # unread: a zip directory zipfile cannot read (torch.load's error says more if it fails)
    if head.startswith(b"PK"):  # before torch.load: it would unpickle damaged bytes, and fail in any way or none
        try:
            record = damaged_record(path)
        except ZIP_ERRORS as e:
            unread = e
    if record:
        raise DataError(f"{what} {path}: its record {record} does not match the CRC-32 torch.save wrote for "
                        f"it{changed}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise  # (not the file's fault: train.py's out-of-memory hint follows)
    # a copy cut short (RuntimeError, EOFError; OSError "Invalid argument" where the cut falls inside a tensor's record)
    # or pickled code and objects, or a pickle saved without CRCs and damaged since (anything: UnicodeDecodeError, ...)
    except Exception as e:
        why = load_failure(e)
        fix = ("pass a checkpoint train.py wrote (another tool's may pickle its settings: the DeiT reference's "
               "argparse.Namespace)" if why.startswith("it holds more than") else "copy it again or pass another file")
        raise DataError(f"{what} {path}: cannot be read by torch.load(weights_only=True) ({why}); {fix}.") from e
    if unread is not None:
        raise DataError(f"{what} {path}: its zip directory does not read ({type(unread).__name__}: "
                        f"{first_line(unread)}){changed}")
    return state


ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError)  # what zipfile raises on damage


def damaged_record(path: Path) -> str | None:
    """The first record of torch.save's zip whose bytes differ from their CRC-32, which torch.load never checks (a
    byte changed in place loads as other weights); None where all match. A CRC of 0 is not checked: torch.save
    writes 0 for every record with torch.serialization.set_crc32_options(False). A zip directory that does not read
    raises one of ZIP_ERRORS. Reads the file once (0.02 s for 60 MB: zlib's CRC-32)."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            try:
                if info.CRC:
                    with z.open(info) as f:
                        while f.read(2**24):  # (zipfile compares the CRC at the record's end)
                            pass
            except zipfile.BadZipFile:
                return info.filename
    return None


def saved_state(path: Path, what: str) -> dict:
    """The dict torch.save wrote at `path`, or {} where there is none, or it does not load, or is no dict: a run's own
    best.pth or last.pth read for what it says of the run's history, where a missing or damaged one says nothing."""
    try:
        state = torch_load(path, what) if path.is_file() else {}
    except DataError:
        return {}
    return state if isinstance(state, dict) else {}


def saved_loader_states(state: dict | None) -> list:
    """The checkpoint's train-loader states, one per rank of its run ([] for a new run, state None, or a checkpoint
    that kept none)."""
    return (state or {}).get("loader_states") or []


def saved_world(state: dict | None) -> int | None:
    """The process count the checkpoint's run trained with (a train-loader state per rank); None where it kept none."""
    return len(saved_loader_states(state)) or None


def load_failure(e: Exception) -> str:
    """The reason in torch.load's error: a weights-only refusal wraps its one line in a page of advice."""
    text = str(e)
    if text.startswith("Weights only load failed"):
        marker = "WeightsUnpickler error:"  # (torch 2.14 writes it before some reasons, not others)
        lines = text.split(marker, 1)[1].splitlines() if marker in text else text.splitlines()[1:]
        reason = [line.strip() for line in lines
                  if line.strip() and not line.strip().startswith(("Please file", "Check the doc", "(1)", "(2)"))]
        if reason:
            return f"it holds more than tensors and plain containers: {first_line(reason[0])}"
    return f"{type(e).__name__}: {first_line(e)}"


def ema_weights(state: dict, path: str | Path, flag: str) -> dict:
    """The checkpoint `state` with its EMA of the weights (--model-ema) in their place, for `flag` (train.py
    --eval-ema, viz.py --ema); a SettingError naming the file where it holds none."""
    if state.get("ema") is None:
        raise SettingError(f"{flag}: {path} holds no EMA of its weights (saved without --model-ema); drop {flag} to "
                           f"use its trained weights")
    return {**state, "model": state["ema"]}


def check_class_map(state: dict, class_map: ClassMap, path: str | Path, what: str = "checkpoint") -> None:
    """A clear error unless the checkpoint's classes are exactly `class_map`'s, in the same order."""
    if tuple(state["classes"]) != tuple(class_map.wnids):
        ours, theirs = set(class_map.wnids), set(state["classes"])
        which = ("the same classes in another order (class indices differ)" if ours == theirs else
                 f"another class map ({len(theirs)} classes, against these shards' {len(ours)}: "
                 + class_difference(theirs, ours, "of its classes not in these shards",
                                    "of these shards' classes not in it") + ")")
        raise DataError(
            f"{what} {path} was trained on {which}; use a checkpoint trained on these shards' manifest, or the shards "
            f"it was trained on (its config's data_path: {state['config'].get('data_path')})."
        )


def shards_change(state: dict, data_path: str | Path, manifest: dict) -> str | None:
    """How the shards at data_path (manifest: theirs) differ from those the checkpoint `state` was trained and scored
    on: None, the same pack wherever it now lies (a copy moved to a local disk is no change); "other", another
    folder's shards; "repacked", the same folder packed again since; "unknown", not the same pack, from a checkpoint
    saved before its folder was kept (its data_path, as typed, may have been relative to another working folder);
    "elsewhere", a checkpoint from before packs were fingerprinted whose data_path, as typed, names another folder
    (or the same one, typed relative to another working folder: its path is all it has); "untold", one whose
    data_path is this folder (or that names none): packed again since or not, it cannot tell."""
    if "pack" not in state:
        typed = state.get("config", {}).get("data_path")
        return "elsewhere" if typed and Path(typed).resolve() != Path(data_path).resolve() else "untold"
    if same_pack(state["pack"], manifest):
        return None
    if "data_dir" not in state:
        return "unknown"
    return "other" if state["data_dir"] != str(Path(data_path).resolve()) else "repacked"


def shards_change_text(state: dict, name: str | Path, data_path: str | Path,
                       manifest: dict) -> tuple[str, str] | None:
    """(shards_change, how to say it), or None for the same pack; name: the checkpoint, as its reader names it (a
    path, or the report's ViT and DeiT)."""
    change = shards_change(state, data_path, manifest)
    said = {"other": f"{name} was trained and scored on {state.get('data_dir')}, other shards than {data_path}",
            "repacked": f"{data_path} was packed again since {name} was saved (other options, seed or images)",
            "unknown": f"the shards at {data_path} are not those {name} was saved with (packed again, or other shards)",
            "elsewhere": f"{name} names {state.get('config', {}).get('data_path')} as its shards (it was saved before "
                         f"vitdeit kept the pack's fingerprint), not {data_path}",
            "untold": f"whether {data_path} was packed again since {name} was saved cannot be told (it was saved "
                      f"before vitdeit kept the pack's fingerprint, 2026-12-05)"}
    return None if change is None else (change, said[change])
