"""A run's files: the folder it writes (whose it is, who writes it now, the history a --resume goes on from, kept
whole) and the files it reads (the manifest, a checkpoint, its settings), the same on every node."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from .checkpoint import save_checkpoint, saved_state
from .classes import pack_identity
from .config import NODE_OWN, Config, flag
from .distributed import Dist, all_gather_object, hosts_of, ranks_by, ranks_text, read_on_every_node, refuse_differing
from .errors import SettingError, cannot_write_in, together
from .lock import folder_lock


def resumes_in(run_dir: Path, cfg: Config) -> bool:
    """--resume names a checkpoint in run_dir itself: the run there goes on (else a new one starts, or one resumed
    from another folder, whose history adopt_history brings)."""
    return bool(cfg.resume) and Path(cfg.resume).parent.resolve() == run_dir.resolve()


def run_held_in(run_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint that makes run_dir a run's: its last.pth; for a new run (no --resume) a best.pth alone too (a
    run whose last.pth was deleted). A --resume from another folder replaces a lone best.pth (adopt_history): more
    likely an earlier try of that same resume, stopped before its first epoch."""
    names = ("last.pth",) if cfg.resume else ("last.pth", "best.pth")
    return next((run_dir / n for n in names if (run_dir / n).is_file()), None)


def check_run_dir(run_dir: Path, cfg: Config, dist: Dist, writes: bool = True) -> None:
    """A run folder that holds a run (run_held_in) is another run's, unless --resume continues it from there: refused
    without --overwrite, so that forgetting --resume loses nothing; so is a file where the folder would be, or, for
    a run that `writes` (not a resumed one with nothing left to do), a folder another train.py is training in now
    (lock_busy: not resumed from under it either) or that this user cannot write in. Rank 0, which alone writes
    there, looks (before the set-up's minutes); every rank stops on what it found."""
    problem = None
    file = dist.is_main and next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if file:
        name = "--run-name" if file == run_dir else "--output-dir"
        problem = (f"{name} {cfg.name if file == run_dir else cfg.output_dir}: {file} is a file, not a folder; pass "
                   f"another {name} (the run goes to --output-dir/--run-name, here {run_dir})")
    elif writes and dist.is_main and (busy := lock_busy(run_dir)):
        problem = busy
    elif dist.is_main and (held := run_held_in(run_dir, cfg)) and not resumes_in(run_dir, cfg) and not cfg.overwrite:
        other = (f" (--resume {cfg.resume} is another folder's checkpoint: a run writes to --output-dir/--run-name, "
                 f"here {run_dir}, wherever it resumes from)" if cfg.resume else "")
        # (a lone best.pth: its last.pth deleted, or a --resume into this folder stopped before its first epoch)
        alone = "" if held.name == "last.pth" else ", without a last.pth"
        problem = (f"{run_dir} already holds a run ({held.name}{alone}){other}: continue it with --resume {held}, "
                   f"choose another --run-name, or pass --overwrite to replace it" + (
                       " (in place of --resume auto, which continues a last.pth only)." if cfg.auto_resume else "."))
    elif writes and dist.is_main and (why := cannot_write_in(run_dir)):
        given = ("" if "output_dir" not in cfg.inherited else
                 f" (the run folder of --resume {cfg.resume}, where it goes on)")
        problem = (f"--output-dir {cfg.output_dir}: the run folder {run_dir}{given} cannot be written ({why}); pass "
                   f"another --output-dir")
    if problem := all_gather_object(problem)[0]:  # (rank 0's)
        raise together(SettingError(problem))


def lock_busy(run_dir: Path) -> str | None:
    """run_lock's refusal where another train.py holds the folder's lock now, else None: a look before the set-up's
    minutes (the lock itself is taken once the set-up has passed its checks: start_run_dir)."""
    if not (run_dir / ".lock").is_file():
        return None
    try:
        with run_lock(run_dir):
            return None
    except SettingError as e:
        return str(e)


def run_lock(run_dir: Path):
    """Rank 0's lock on its run folder (OUT/RUN/.lock) while it writes there: another train.py into the same folder
    is refused, not mixed in (srun or mpirun starting train.py once per GPU, without torchrun, starts that many
    separate one-process runs)."""
    return folder_lock(run_dir / ".lock", f"{run_dir}: another train.py is training in this folder now; wait for it "
                                          f"to end, or choose another --run-name. (srun or mpirun starting train.py "
                                          f"once per GPU, without torchrun, starts that many separate one-process "
                                          f"runs: start torchrun once per node instead, as the README shows)")


SAME_FILE = "give every node the same file: a shared filesystem, or a copy of the run folder rank 0 writes"


def run_files_identity(value: tuple, data_path: str = "", ckpt: str = "") -> tuple:
    """(manifest, checkpoint or None) -> their identities, each (id, description), for refuse_differing; each
    description names the path this node read it from (data_path, ckpt) where given."""
    manifest, state = value
    splits = manifest["splits"]
    pack = (pack_identity(manifest), f"{f'{data_path}: ' if data_path else ''}--seed "
            f"{(manifest.get('options') or {}).get('seed')}, {splits['train']['num_samples']:,} train + "
            f"{splits['val']['num_samples']:,} val images")
    # an epoch's checkpoint, told apart from another run's of that epoch by the epoch's own figures
    saved = ("", "no checkpoint") if state is None else (
        hashlib.sha1(repr((state["epoch"], state.get("best_top1"), state.get("pack"),
                           sorted(state.get("metrics", {}).items()))).encode()).hexdigest(),
        f"{f'{ckpt}: ' if ckpt else ''}epoch {state['epoch']}")
    return pack, saved


def refuse_other_settings(seen: list, item) -> None:
    """seen: read_on_every_node's; item(identity): a rank's settings, every one not in NODE_OWN alike on every rank
    (another --epochs, --loader or --allow-weak-teacher on one node would put its collectives out of step with the
    others')."""
    settings = [item(identity) for _, identity, _ in seen]
    keys = sorted({k for s in settings for k in s})  # (a node's older vitdeit may lack a later setting)
    said = []
    for k in keys:
        if len(groups := ranks_by([repr(s.get(k)) for s in settings])) > 1:
            said.append(f"{flag(k)} " + ", ".join(f"{v} on {ranks_text(r)} ({hosts_of(r, seen)})"
                                                  for v, r in groups.items()))
    if said:
        raise together(SettingError(f"the nodes' commands differ ({'; '.join(said)}); run the same command on every "
                                    f"node (only the paths of its files may differ, and --workers)."))


def read_run_files(read, cfg: Config, ckpt_flag: str = "--resume", ckpt: str | None = None) -> tuple:
    """read() -> (manifest, checkpoint or None) on every rank (read_on_every_node): the same files, and the same
    settings, on every node."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NODE_OWN}
    seen, (manifest, state) = read_on_every_node(read, lambda value: (
        *run_files_identity(value, cfg.data_path, ckpt or cfg.resume), settings))
    refuse_differing(seen, "the shards (--data-path) differ", "give every node the same shards: copy one "
                     "pack_shards.py --out folder to each (or pack each node's copy of the images with the same "
                     "options and --seed)", item=lambda identity: identity[0])
    refuse_differing(seen, f"the checkpoint ({ckpt_flag}) differs", SAME_FILE, item=lambda identity: identity[1])
    # last: a --resume's saved settings are each node's defaults, so other copies would read as other commands
    refuse_other_settings(seen, item=lambda identity: identity[2])
    return manifest, state


def check_rewind(run_dir: Path, cfg: Config, resumed: dict, dist: Dist) -> None:
    """A --resume in the run's own folder from a checkpoint older than its last.pth (a best.pth, a copy) would
    rewind the run: the later epochs' last.pth, best.pth and metrics lines are replaced as it goes on. Refused
    without --overwrite (rank 0 looks, every rank stops). A last.pth that does not load is no history to keep."""
    last = run_dir / "last.pth"
    newer = None
    if dist.is_main and resumes_in(run_dir, cfg) and not cfg.overwrite and last.is_file() and (
            Path(cfg.resume).resolve() != last.resolve()):
        newer = saved_state(last, "last.pth").get("epoch")
        newer = newer if isinstance(newer, int) and newer > resumed["epoch"] else None
    if (newest := max((e for e in all_gather_object(newer) if e is not None), default=None)) is not None:
        e = resumed["epoch"]
        raise together(SettingError(
            f"--resume {cfg.resume} is epoch {e}'s, and {last} has trained up to epoch {newest}: going on from it "
            f"here would replace epochs {e + 1}-{newest} (last.pth, best.pth, metrics.jsonl). Continue with --resume "
            f"{last}; or branch with another --run-name (it takes this run's history up to epoch {e}); or pass "
            f"--overwrite to rewind this run."))


def start_run_dir(run_dir: Path, cfg: Config, held: ExitStack) -> None:
    """Rank 0, once the set-up has passed its checks: the folder's lock (run_lock, held in `held` until the run
    ends), config.json (a run that stopped at a bad flag leaves the folder as it was), and, for a run that replaces
    another (--overwrite, not resuming from this folder), the old checkpoints go, so that a folder never mixes two
    runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(run_lock(run_dir))  # before anything is written there
    if cfg.overwrite and not resumes_in(run_dir, cfg):
        for name in ("best.pth", "last.pth"):  # (a --resume from another folder brings its best.pth: adopt_history)
            (run_dir / name).unlink(missing_ok=True)
    for name in ("best.pth.tmp", "last.pth.tmp"):  # a killed run's part-written checkpoints: never read, only space
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))


def adopt_history(resume: Path, run_dir: Path, resumed: dict, in_place: bool) -> float:
    """--resume: leave run_dir with this run's history up to the resumed epoch. From another run folder (not
    in_place, as resumes_in tells), copy that run's metrics.jsonl (MetricsLog then cuts it back to the resumed
    epoch). Then best.pth: the resumed folder's if it is this history's (the resumed best_top1, from an epoch not
    after the resumed one; one written by abandoned later epochs is not), else the resumed checkpoint itself where
    its epoch was the best, else none (the best epoch's weights were not kept). Returns the best top-1 to go on
    from: -1 with no best.pth (the next epoch writes one)."""
    src, metrics, best = resume.parent, run_dir / "metrics.jsonl", run_dir / "best.pth"
    if not in_place and (src / "metrics.jsonl").is_file():
        shutil.copyfile(src / "metrics.jsonl", metrics)
    elif not in_place:
        metrics.unlink(missing_ok=True)
    saved = saved_state(src / "best.pth", "best.pth")
    if saved.get("best_top1") == resumed["best_top1"] and saved.get("epoch", math.inf) <= resumed["epoch"]:
        if not in_place:
            shutil.copyfile(src / "best.pth", best.with_name("best.pth.tmp"))
            os.replace(best.with_name("best.pth.tmp"), best)
        return resumed["best_top1"]
    if resumed.get("metrics", {}).get("val_top1") == resumed["best_top1"]:  # the resumed epoch was the best one
        save_checkpoint(best, resumed)
        return resumed["best_top1"]
    best.unlink(missing_ok=True)
    return -1.0


def best_behind(run_dir: Path, resumed: dict) -> bool:
    """A finished run stopped after its last epoch's last.pth (`resumed`), before its best.pth (that epoch the best):
    its best.pth is then to be written from last.pth's state, the same weights. Never over a best.pth as good or
    as late (one written, an earlier epoch's of the same top-1, which is_best keeps, or a later run's)."""
    if resumed.get("metrics", {}).get("val_top1") != resumed["best_top1"]:
        return False  # the last epoch was not the best: best.pth is an earlier one's
    saved = saved_state(run_dir / "best.pth", "best.pth")
    return saved.get("best_top1", -1.0) < resumed["best_top1"] and saved.get("epoch", -1) < resumed["epoch"]
