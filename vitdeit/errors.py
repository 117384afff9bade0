"""The project's errors: problems a user can fix, each message naming the file, value or flag and the fix.

Entry points (pack_shards.py, train.py, viz.py) print a VitdeitError as one line and exit 1 (a bad flag or
--config value is argparse's usage message and exit 2, as for any command-line tool). Anything else
(CUDA out of memory, NCCL, a bug) keeps its traceback: a one-line message would hide where it came from.
"""

import errno
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def first_line(e: Exception | str, limit: int = 160) -> str:
    """The start of an exception's message (or a text), for a one-line error that quotes it: torch's can run to a
    page."""
    line = (str(e).splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


class VitdeitError(Exception):
    """Base: bad input, a setting that cannot work, a missing file; the message says what to do."""


def together(e: BaseException) -> BaseException:
    """Mark an error every rank raises from one decision they gathered (the same values on every rank): the ranks
    then leave the process group together, as after a finished run (distributed.cleanup says why)."""
    e.every_rank_stops = True
    return e


@contextmanager
def alike_on_every_rank():
    """Mark the VitdeitErrors raised inside as ones every process of a node meets alike: from the flags, a file on
    the node's disk (the manifest, a checkpoint) or a decision gathered from all ranks. train.py prints those once
    per node under torchrun (quiet_rank); any other error, which can differ by rank, from every rank."""
    try:
        yield
    except VitdeitError as e:
        e.alike_on_every_rank = True
        raise


def quiet_rank() -> bool:
    """Under torchrun (which sets TORCHELASTIC_RUN_ID), a local rank other than 0: for an error every local rank
    meets alike, local rank 0 says it (the copy `torchrun --local-ranks-filter 0` shows)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0"


QUIET_RANK_WAIT_S = 60.0  # the most a quiet rank waits for local rank 0 to say the error both met


def wait_for_local_rank_0() -> None:
    """A quiet rank, before it exits: torchrun stops every process once one exits, and local rank 0 may still be
    importing (torchrun ends this wait as soon as local rank 0 has said the error and exited)."""
    time.sleep(QUIET_RANK_WAIT_S)


def say_error(e: Exception) -> None:
    """`error: MESSAGE` on stderr in one write: two processes' lines do not run together."""
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()


class DataError(VitdeitError, ValueError):
    """Bad input data: the message names the file or value and the fix."""


class BatchTooLarge(DataError):
    """A split has fewer train samples per process than --batch-size: not one step per epoch."""

    def __init__(self, split: str, per_rank: int, batch_size: int):
        self.split, self.per_rank, self.batch_size = split, per_rank, batch_size
        super().__init__(f"{split}: {per_rank} samples per rank < --batch-size {batch_size}; lower --batch-size (or "
                         f"use fewer processes).")

    def __reduce__(self):  # pickled with its arguments, not its message: a worker process can raise it too
        return type(self), (self.split, self.per_rank, self.batch_size)


class DamagedSample(DataError):
    """A packed image that does not decode. Raised in a DataLoader worker, it reaches the main process re-made from
    the worker's whole formatted traceback (torch's ExceptionWrapper calls the class with that text): the message
    keeps its own line of it."""

    def __init__(self, message: str):
        if message.startswith("Caught "):
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def image_failure(e: Exception) -> str:
    """Why image bytes did not decode: the exception's type and text, but Pillow's "cannot identify image file"
    names the in-memory file it read them from (<_io.BytesIO object at 0x...>), not the image."""
    from PIL import UnidentifiedImageError

    return f"{type(e).__name__}: " + ("not an image Pillow can identify" if isinstance(e, UnidentifiedImageError)
                                      else str(e))


def damaged_shard(where: str, cause: str, what: str = "does not decode") -> str:
    """The fix for a shard whose image does not decode, or whose label is no class (the same words for both
    loaders)."""
    return (f"{where} {what} ({cause}): the shard was damaged after packing (a copy cut short or changed?); "
            f"copy it again, or delete it and re-run pack_shards.py with the same flags (it writes the missing shards "
            f"again).")


class SettingError(VitdeitError, ValueError):
    """A flag or setting that cannot work here: the message names the flag and what to use instead."""


class MissingFile(VitdeitError, FileNotFoundError):
    """A file the command needs (checkpoint, weights, metrics) is not there: the message says how to make it."""


class WriteFailed(VitdeitError, OSError):
    """An output (a checkpoint) could not be written, usually a full disk: the message names the file and the
    space left."""


class RankFailed(VitdeitError, RuntimeError):
    """Another rank stopped on an error of its own (its traceback is in its output); this one stops with it."""


class NonFiniteLoss(VitdeitError, RuntimeError):
    """The training loss became NaN/inf: the run stops, its last good checkpoint is kept."""


def output_folder(path: Path, option: str, is_folder: bool, make: bool = True) -> None:
    """Make the folder an output goes in (path itself, or its parent for a file), before any slow work: a path that
    cannot take it is one error naming the option, not a traceback after minutes of work. make False: only checked
    (a command that may still refuse leaves no empty folder; save_output makes it)."""
    folder = path if is_folder else path.parent
    if not is_folder and path.is_dir():
        raise SettingError(f"{option} {path}: a folder; name a picture file, e.g. {option} "
                           f"{path / 'vit_vs_deit_random10.png'}")
    where = "" if is_folder else f" its folder {folder}"
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        elif not (there := next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())).is_dir():
            raise NotADirectoryError(f"{there} is {'a file' if there.exists() else 'a link to nowhere'}")
    except OSError as e:  # a file on the path (FileExistsError even with exist_ok), a folder it may not write in
        raise SettingError(f"{option} {path}:{where} cannot be made ({first_line(e)}); pass another {option}") from e
    if why := cannot_write_in(folder):
        raise SettingError(f"{option} {path}:{where} cannot be written in ({why}); pass another {option}")


def cannot_write_in(folder: Path) -> str | None:
    """Why no file can be made in `folder` (or, not there yet, in the nearest folder above it), e.g. "Permission
    denied in /data"; None if one can. Tried, not asked (os.access): root, read-only disks and network file
    systems answer access() wrongly. Leaves nothing behind."""
    here = next(p for p in (folder, *folder.parents) if p.exists())  # (a file on the path: the caller's to name)
    try:
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        return f"{e.strerror} in {here}" if e.strerror else first_line(e)
    return None


# DALI 2.4's failed allocations, as its libraries and nvImageCodec spell them ("Can't allocate N bytes on device D."
# / "on host.", "CUDA allocation failed", strerror's "Cannot allocate memory", C++'s std::bad_alloc, nvImageCodec's
# allocator statuses 5 and 15), lower-cased; read only inside DALI's own RuntimeError ("Critical error in pipeline",
# or "when building pipeline"): the same words elsewhere can mean another limit (NCCL's ibv_reg_mr failing on
# `ulimit -l`, a fork refused)
DALI_OUT_OF_MEMORY = re.compile(r"can't allocate \d+ bytes|cuda allocation failed|cannot allocate memory|bad_alloc|"
                                r"nvimagecodec failure: '#(?:5|15)'")
# how DALI's decoders name the sample they failed on (image_decoder.h: its source info, tar:offset:name)
DALI_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (.+):(\d+):([^.:\s]+)")


def out_of_memory(e: BaseException, batch_size: int, img_size: int, resume: bool, eval_only: bool) -> str | None:
    """What to change after running out of memory (torch's CUDA OutOfMemoryError, the CPU allocator's "can't
    allocate memory", Python's MemoryError, DALI's failed allocations: DALI_OUT_OF_MEMORY), said under its traceback;
    None for any other error. Memory grows with the images per step (batch x img_size**2): the settings to lower,
    where they can be (--eval-only evaluates at the checkpoint's own size, a --resume goes on at its run's). Where
    DALI's error names the image it was decoding, that image too: a damaged header can claim a size far past the
    image's, and the memory for it."""
    text = str(e).lower()
    if not (type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError) or "out of memory" in text
            or "can't allocate memory" in text
            or re.search(r"critical error (?:in|when building) pipeline", text) and DALI_OUT_OF_MEMORY.search(text)):
        return None
    from PIL import Image

    sample = DALI_SAMPLE.search(str(e))  # PIL's decompression-bomb limit: twice its warning's
    image = (f" (DALI ran out decoding {sample[1]}: the image {sample[3]}; if a lower --batch-size runs out on it "
             f"too, its header may be damaged: --loader torch refuses one claiming over "
             f"{2 * Image.MAX_IMAGE_PIXELS:,} px)" if sample else "")
    if eval_only:
        return f"out of memory at --batch-size {batch_size} (images per process): lower --batch-size{image}"
    lower = ("--batch-size (--lr is per 512 images of global batch, so the peak lr follows it)"
             + ("; a resumed run keeps its --img-size" if resume else " or --img-size"))
    at = f"--batch-size {batch_size} (images per process) and --img-size {img_size} px"
    return f"out of memory at {at}: lower {lower}{image}"


def no_class(where: str, label: int, classes: int, hint: str = "") -> str:
    """damaged_shard's words for a label outside 0..classes-1 (a label byte changed since packing: the loss would
    fail on it, or drop it silently at -100, cross-entropy's ignore_index)."""
    return damaged_shard(where, f"not one of the manifest's {classes} classes, 0-{classes - 1}{hint}",
                         f"has label {label}")


# what a full disk or a quota raises; torch.save's own write errors carry no errno
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_failed(path: Path, e: Exception, kept: str, flag: str = "--output-dir") -> WriteFailed:
    """The one-line error for an output that could not be written (usually a full disk): the file, the cause, the
    space left, what was kept, the fix (freeing space only where space can be the cause: not for a folder it may not
    write in, a read-only disk, a name that is a folder, or a file over a size limit)."""
    code = getattr(e, "errno", None)
    space = code in (None, *NO_SPACE)
    try:
        free = f" ({shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free on its disk)" if space else ""
    except OSError:
        free = " (its folder cannot be read)"
    fix = (f"Free space there or pass another {flag}" if space else
           f"The file is over a size limit (`ulimit -f`, or the file system's own, e.g. FAT32's 4 GiB): raise it or "
           f"pass another {flag}" if code == errno.EFBIG else f"Pass another {flag}")
    return WriteFailed(f"could not write {path}: {first_line(e)}{free}; {kept}. {fix}")


def save_output(path: Path, write, kept: str, flag: str = "--output-dir") -> None:
    """write(path), in its folder (made if missing); an OSError (a full disk, a folder it may not write in) becomes
    write_failed's one-line error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise write_failed(path, e, kept, flag=flag) from e
