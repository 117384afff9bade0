#!/usr/bin/env python
"""Train ViT-Tiny, the ResNet-18 teacher, or DeiT-Tiny distilled from it, on packed shards.

    python train.py --data-path SHARDS --model resnet18 --run-name teacher_resnet18
    python train.py --data-path SHARDS --model vit_tiny --epochs 5 --batch-size 128 --lr 5e-4 \\
        --run-name baseline_vit_tiny
    python train.py --data-path SHARDS --model deit_tiny_distill --teacher resnet18 \\
        --teacher-ckpt runs/teacher_resnet18/best.pth --run-name deit_tiny_distill
    torchrun --nproc_per_node=8 train.py ...       # same flags; --batch-size is per GPU
    torchrun --max-restarts=3 ... train.py ... --resume auto   # a restart (or requeue) goes on from last.pth
    python train.py --config runs/deit_tiny_distill/config.json --eval-only

Each run writes OUTPUT_DIR/RUN_NAME/{config.json, metrics.jsonl, last.pth, best.pth}.
"""

import os
import signal
import sys
import traceback
from pathlib import Path

import vitdeit

vitdeit.use_cuda_connections()  # before any import can reach CUDA (vitdeit.CUDA_CONNECTIONS says why)

from vitdeit.config import parse_args  # noqa: E402
from vitdeit.errors import VitdeitError, out_of_memory, quiet_rank, say_error, wait_for_local_rank_0  # noqa: E402
from vitdeit.trainer import evaluate_checkpoint, train  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM: a cluster scheduler's cancel, pre-emption or time limit (torchrun passes it to every process).
    Raised as Ctrl-C is, so that it stops the run the same way and says how to go on."""


def _terminated(signum, frame):
    # once: a second SIGTERM (Slurm sends one to every process, then torchrun its own) must not stop the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def main(argv=None) -> int:
    cfg = parse_args(argv, description=__doc__)
    last = cfg.run_dir / "last.pth"
    found = last.stat().st_mtime_ns if last.is_file() else None  # another run's, unless this one resumes from it
    before = signal.signal(signal.SIGTERM, _terminated)

    def go_on(first: str = "") -> str:  # how to continue, where this node sees the epochs this run has written
        ours = last.is_file() and (last.stat().st_mtime_ns != found  # this run wrote it (an epoch finished)
                                   or bool(cfg.resume) and Path(cfg.resume).resolve() == last.resolve())
        again = " (its --resume auto continues from it)" if cfg.auto_resume else f" and --resume {last}"
        return (f"; the epochs finished so far are in {last}: {first}go on with the same command{again}"
                if ours and not cfg.eval_only else "")

    try:
        evaluate_checkpoint(cfg) if cfg.eval_only else train(cfg)
    except VitdeitError as e:  # the user's to fix; anything else (CUDA OOM, NCCL, a bug) keeps its traceback
        if getattr(e, "alike_on_every_rank", False) and quiet_rank():  # local rank 0 says it for the node
            # torchrun ends this wait with a SIGTERM once local rank 0 has said it and exited: end by the signal, as
            # before this process handled it, not with a traceback from inside the wait
            signal.signal(signal.SIGTERM, before)
            wait_for_local_rank_0()
            say_error(e)  # still running: local rank 0 did not stop the run with it (a cause of this rank's own)
            return 1
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, as the node's others stop: not while it says it
        say_error(e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (torchrun passes either to every process: one says it)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (after a Ctrl-C too: a SIGTERM now would cut the line below)
        if not quiet_rank():  # each node's local rank 0 (another node's has no line of its own otherwise)
            # (under torchrun, its SIGTERM also ends the other ranks when one has failed: the cause is then above)
            why = ("terminated (SIGTERM: a scheduler's cancel or time limit, or torchrun ending this process after "
                   "another failed: see above)" if isinstance(e, Terminated) else "interrupted")
            print(f"\n{why}{go_on()}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)  # a shell's code for the signal
    except Exception as e:  # CUDA OOM, a lost connection to another process, a bug: its traceback, then how to go on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, as the node's others stop: not while it says it
        traceback.print_exc()
        # said by the rank that ran out, under its traceback
        if hint := out_of_memory(e, cfg.batch_size, cfg.img_size, bool(cfg.resume), cfg.eval_only):
            print(f"\n{hint}", file=sys.stderr)
        if not quiet_rank() and (then := go_on("once its cause is mended, ")):
            peers = (" (if it is a lost connection, another process stopped first: its own output says why)"
                     if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
            print(f"\nstopped by the error above{peers}{then}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
