"""The NVIDIA DALI loader: reads the packed shards with fn.readers.webdataset and the packer's index files,
decodes and augments on the GPU (`mixed` decoder: nvJPEG, ROI decoding), or on the CPU with the very same
pipeline definition when there is no GPU (device_id=None; that is how CI tests it).

No Python runs per sample: labels are the shards' int32 `lbl` component, images leave
crop_mirror_normalize as normalised NHWC (float16 for 16-bit autocast on a GPU, else float32) and reach PyTorch as NCHW
tensors in channels-last memory: a permuted view, no copy (with --repeated-aug, one: the copies are concatenated).
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager

import torch

from ..classes import pack_fingerprint, same_pack
from ..config import Config, dali_threads
from ..errors import (DALI_OUT_OF_MEMORY, DALI_SAMPLE, BatchTooLarge, DamagedSample, damaged_shard, first_line,
                      no_class)
from . import MEAN, STD, shard_paths, val_resize
from .dali_augment import RandAugmentSpec, rand_augment as dali_rand_augment

KEY_BYTES = 512


def _pipeline(files, indexes, *, train: bool, img_size: int, crop_pct: float, scale, ratio, mean, std, shard_id: int,
              num_shards: int, seed: int, gpu: bool, fp16: bool, batch_size: int, num_threads: int, device_id,
              with_keys: bool = False, checkpoint: bytes | None = None, hw_decoder_load: float, sample_bytes: int,
              interpolation: str, executor: str, prefetch: int, rand_augment: RandAugmentSpec | None = None,
              copies: int = 1):  # (keywords only: 25 settings, several of one type)
    from nvidia.dali import fn, pipeline_def, types

    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[interpolation]

    # checkpointing (train): the readers' positions and every random generator's state, saved with the run's
    # checkpoint, so --resume continues the very sample and augmentation stream an uninterrupted run would see
    # DALI seeds every operator from the pipeline seed alone: one seed per rank, or every rank would draw the same
    # crops and flips for the same batch position (the reader's tar order keeps `seed` itself, set below)
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=(seed + 1_000_003 * shard_id) % 2**31,
                  prefetch_queue_depth=prefetch, enable_checkpointing=train, checkpoint=checkpoint,
                  exec_dynamic=executor == "dynamic",  # (Config.dali_executor says what the two do)
                  enable_conditionals=rand_augment is not None)  # RandAugment picks an op per image with `if`
    def pipe():
        jpegs, labels = fn.readers.webdataset(
            paths=files, index_paths=indexes, ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards, name="Reader",
            random_shuffle=train, initial_fill=4096 if train else 1,  # buffer shuffle on top of the global one
            shuffle_after_epoch=train,  # train: a new tar order every epoch
            stick_to_shard=not train,  # val: rank r reads slice r every pass (DALI moves a rank on a slice by default,
            # and slices differ by a sample, so a later pass skipped or repeated images: 16 of 17 over 2 ranks)
            # the last batch of a pass is padded, never topped up from the next pass: one epoch = one pass
            pad_last_batch=True, **({"shuffle_after_epoch_seed": seed} if train else {}),  # same order on all ranks
            # bytes DALI reserves per tensor (jpg, lbl) of a sample it reads ahead: the shards' mean, not its 1 MB
            # default, which a loader restored mid-pass reserves for every shuffle-buffer slot at once (+12 GB)
            tensor_init_bytes=sample_bytes)
        decoder = "mixed" if gpu else "cpu"  # the one-word difference between the GPU and the CPU pipeline
        hw = {"hw_decoder_load": hw_decoder_load} if gpu else {}  # the mixed decoder's split (hardware engines / CUDA)

        def normalize(images, mirror, **crop_pos):
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC", crop=(img_size, img_size),
                mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror, **crop_pos)

        if train:
            outputs = []
            for _ in range(copies):  # --repeated-aug: each copy decodes its own crop of the same JPEG, its own draws
                images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                       random_area=list(scale), random_aspect_ratio=list(ratio),
                                                       num_attempts=10, **hw)
                images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=interp, antialias=True)
                if rand_augment is not None:  # on the uint8 crop, as timm's in the PyTorch loader (flips commute)
                    images = dali_rand_augment(images, rand_augment, img_size)
                outputs.append(normalize(images, fn.random.coin_flip(probability=0.5)))
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **hw)
            size, pos = _val_geometry(fn.peek_image_shape(jpegs), val_resize(img_size, crop_pct), img_size)
            images = fn.resize(images, resize_x=size[1], resize_y=size[0], interp_type=interp, antialias=True)
            outputs = [normalize(images, 0, crop_pos_x=pos[1], crop_pos_y=pos[0])]
        outputs.append(labels.gpu() if gpu else labels)
        if with_keys:  # "tar:offset:KEY.jpg", zero-padded to a fixed length (tests: which samples were drawn)
            outputs.append(fn.pad(fn.get_property(jpegs, key="source_info"), axes=(0,), shape=(KEY_BYTES,)))
        return tuple(outputs)

    return pipe()


def _val_geometry(shape, short: int, crop: int):
    """torchvision's Resize(short) + CenterCrop(crop) to the pixel, as the PyTorch loader's ValTransform does, per
    sample from the JPEG's (H, W, C) header shape: ((height, width) to resize to, (y, x) crop positions for
    crop_mirror_normalize). DALI's own resize_shorter rounds the long side where torchvision truncates it, and its
    centre crop rounds a half-pixel margin up where torchvision rounds half to even: on ImageNet's 500 x 375 at 224
    px (resized to 341 x 256, a 58.5 px margin) the crops sat a pixel apart."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    h, w = shape[0], shape[1]
    size = (dmath.max(short, short * h // w), dmath.max(short, short * w // h))  # the shorter side -> short
    pos = []
    for side in size:
        margin = side - crop
        half = margin // 2
        offset = half + (margin - 2 * half) * (half % 2)  # margin / 2 rounded half to even, as Python's round()
        pos.append(fn.cast(offset, dtype=types.FLOAT) / fn.cast(dmath.max(margin, 1), dtype=types.FLOAT))
    return [fn.cast(x, dtype=types.FLOAT) for x in size], pos


# a train state's settings (DaliLoader.settings), as a note names those that differ
STATE_SETTINGS = {"pack": "other shards", "rank": "another process count", "world": "another process count",
                  "batch_size": "another --batch-size", "img_size": "another --img-size", "seed": "another --seed",
                  "scale": "another --crop-scale-min", "ratio": "other crop aspect ratios",
                  "gpu": "another kind of device (GPU or CPU)", "rand_augment": "another --rand-augment",
                  "repeats": "another --repeated-aug"}
_ABSENT = object()  # a setting one state has and the other lacks


class DaliLoader:
    """Same interface as TorchLoader: yields (images NCHW channels-last, int64 labels) on the run's device.

    Train: rank r reads slice r of `world` of the samples in tar order (contiguous; the tars hold the globally
    shuffled samples, and their order is reshuffled every epoch, the same on every rank, so a rank's slice
    holds other tars' samples each epoch; from a single tar a rank would keep the same samples). One epoch is
    one pass over that slice: every rank takes floor(N / world / batch) steps, each sample at most once, and
    the rest of its slice (at most one batch, with DALI's padding) is read and dropped, as drop_last. With
    repeats R, the same steps read about 1/R of that, R copies each, and the pass runs on over epochs. Val: no
    shuffle, the last batch padded by DALI and the padding removed here, so every image is counted exactly once.
    """

    name = "dali"

    def __init__(self, shards_dir, manifest, split: str, batch_size: int, img_size: int, rank: int = 0,
                 world: int = 1, workers: int = 4, device="cpu", seed: int = 0, rand_augment: str | None = None,
                 repeats: int = 1, crop_pct: float = 0.875, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mean=MEAN,
                 std=STD, with_keys: bool = False, half: bool | None = None, state: dict | None = None,
                 hw_decoder_load: float = Config.dali_hw_decoder_load, interpolation: str = Config.interpolation,
                 executor: str = Config.dali_executor, prefetch: int = Config.dali_prefetch):
        """half: float16 images (default: on CUDA); float32 otherwise. state: `state()` of the same rank's train
        loader in an earlier run: continue exactly where it stopped if it read the same shards with the same
        settings (`restored` says whether it did); otherwise the sample stream starts afresh (`not_restored` says
        why). hw_decoder_load: on a GPU, the share of JPEGs decoded by the hardware JPEG engines (see
        Config.dali_hw_decoder_load). executor: DALI's execution model, dynamic or legacy (Config.dali_executor).
        prefetch: batches DALI decodes ahead of the one in use, across the end of an epoch too (auto_reset;
        Config.dali_prefetch)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        spec = RandAugmentSpec.parse(rand_augment) if rand_augment and split == "train" else None
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        shards = manifest["splits"][split]["shards"]
        files, indexes = zip(*[(str(tar), str(idx)) for tar, idx, _ in shard_paths(shards_dir, manifest, split)])
        n = manifest["splits"][split]["num_samples"]
        self.train, self.where, self.classes = split == "train", f"{shards_dir} ({split})", len(manifest["classes"])
        if self.train and len(shards) == 1 and world > 1:
            source = manifest.get("source", {})  # (what the pack read: every packer since fd473e4 records it)
            warnings.warn(f"{shards_dir}: one train shard for {world} processes: DALI gives each process the same "
                          f"slice of it every epoch (only the order of several tars can change). Repack, 4 tars per "
                          f"process: python pack_shards.py --data-path {source.get('data_path', 'DATASET_DIR')} --out "
                          f"{shards_dir} --shard-size {max(1, n // (4 * world))} (with the --labels and options its "
                          f"manifest.json records), or use --loader torch.", stacklevel=2)
        # what a saved reader state depends on: the pack (its shards' names, samples and bytes, and its options: a
        # repack with another seed keeps the rest), every rank's slice of them, the batches and the random ops'
        # arguments; decode threads do not matter (per-sample generators)
        self.settings = {"pack": pack_fingerprint(manifest), "rank": rank, "world": world, "batch_size": batch_size,
                         "img_size": img_size, "seed": seed, "scale": list(scale), "ratio": list(ratio), "gpu": gpu,
                         "epoch": "reader pass",  # what an epoch is: states of the earlier fixed-size epochs don't fit
                         **({"rand_augment": rand_augment} if spec else {}),  # its draws are in the state too
                         **({"repeats": repeats} if self.train and repeats > 1 else {})}
        # (a dict: checkpoints of earlier versions held the bare reader bytes, without settings: not restored; the
        # pack: the same shards even where a later packer described their options with more keys)
        saved = state.get("settings") if isinstance(state, dict) else None
        if isinstance(saved, dict) and "shards" in saved:  # saved before 2026-12-05: the split's shard list named the
            # pack (beside its fingerprint, or in its place): the same list of names, samples and bytes is this pack
            same = saved["shards"] == [[s["file"], s["num_samples"], s["bytes"]] for s in shards]
            saved = {**{k: v for k, v in saved.items() if k != "shards"},
                     "pack": saved.get("pack", self.settings["pack"]) if same else ""}
        # why a given state does not fit (None: it fits, or none was given), and so whether it is restored
        self.not_restored = None if state is None else self._unfit(saved, manifest)
        self.restored = self.train and state is not None and self.not_restored is None
        self.batch_size = batch_size
        self.decoded_ahead = prefetch  # batches decoded ahead, also as soon as an epoch ends (the benchmark's windows)
        self.per_rank = (rank + 1) * n // world - rank * n // world  # this rank's slice: floor(n / world) or one more
        if self.train:
            self.steps = n // world // batch_size
            if self.steps == 0:
                raise BatchTooLarge(split, n // world, batch_size)
            self.num_samples = self.steps * batch_size
        else:  # DALI's shard r of `world` holds samples [floor(r n / world), floor((r + 1) n / world))
            self.num_samples = self.per_rank
            self.steps = math.ceil(self.num_samples / batch_size)
        # --repeated-aug R (train): each step reads ceil(batch / R) images and makes R copies of each (the last
        # copies trimmed to the batch), so an epoch keeps its steps and reads about 1/R of the rank's slice: the
        # reader's pass then runs on over R epochs (next_batch)
        self.copies = repeats if self.train else 1
        self.reads = -(-batch_size // self.copies)
        self.pipe = _pipeline(files, indexes, train=self.train, img_size=img_size, crop_pct=crop_pct, scale=scale,
                              ratio=ratio, mean=mean, std=std, shard_id=rank, num_shards=world, seed=seed, gpu=gpu,
                              fp16=gpu if half is None else half, batch_size=self.reads,
                              num_threads=dali_threads(workers),
                              device_id=(self.device.index or 0) if gpu else None, with_keys=with_keys,
                              checkpoint=state["checkpoint"] if self.restored else None,
                              hw_decoder_load=hw_decoder_load, interpolation=interpolation, rand_augment=spec,
                              copies=self.copies, executor=executor, prefetch=prefetch,
                              sample_bytes=-(-sum(s["bytes"] for s in shards) // max(1, n)))  # tar headers in: over
        self.pipe.build()
        self.outputs = [f"images{k}" for k in range(self.copies)] + ["labels"] + (["keys"] if with_keys else [])
        # the reader drives the epoch: a whole pass, the last batch padded (PARTIAL: padding removed), of which train
        # uses the first `steps` batches (__iter__). A fixed `size` would carry the rest into the next epoch, which
        # then spans two passes and draws up to a quarter of its samples twice; DROP leaves the padded last batch of
        # a pass in the pipeline when the smallest slice divides into batches (it ends the epoch on that slice).
        with self.decode_errors():
            self.it = DALIGenericIterator(self.pipe, self.outputs, reader_name="Reader", auto_reset=True,
                                          last_batch_policy=LastBatchPolicy.PARTIAL)

    def _unfit(self, saved, manifest: dict) -> str | None:
        """Why a saved state's settings do not fit this loader, or None where they do (the same pack, and every other
        setting present and equal): an earlier vitdeit's (of the fixed-size epochs before one reader pass made an
        epoch, 2026-12-02, or before that the bare reader bytes), or the settings it was saved with that differ."""
        if not (isinstance(saved, dict) and saved.get("epoch") == "reader pass"):
            return "a DALI reader state of an earlier vitdeit, which this one does not restore"
        differ = [k for k in (*STATE_SETTINGS, *sorted({*saved, *self.settings} - set(STATE_SETTINGS)))
                  if (not same_pack(saved.get("pack", ""), manifest) if k == "pack"
                      else saved.get(k, _ABSENT) != self.settings.get(k, _ABSENT))]
        if not differ:
            return None
        names = list(dict.fromkeys(STATE_SETTINGS.get(k, f"another {k}") for k in differ))  # (rank, world: one)
        return "a DALI reader state saved with " + (", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1
                                                     else names[0])

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass  # DALI's reader advances its own shuffle every epoch

    def state(self) -> dict | None:
        """Train: DALI's checkpoint of this rank's pipeline after the batches consumed so far (~0.5 KB), with the
        settings it is valid for."""
        return {"settings": self.settings, "checkpoint": self.it.checkpoints()[0]} if self.train else None

    def next_batch(self) -> dict:
        """--repeated-aug: the stream's next full batch of reads, running on into the reader's next pass (the tars
        reshuffled) when one ends; a pass's padded last batch is dropped, as drop_last."""
        while True:
            try:
                out = next(self.it)[0]
            except StopIteration:  # the pass ended; auto_reset has begun the next
                continue
            if len(out["labels"]) == self.reads:
                return out

    @contextmanager
    def decode_errors(self):
        """DALI's decoder failing on bytes the packer verified (a shard damaged since) as one DamagedSample, not
        DALI's page of pipeline traceback. The iterator decodes its first batches as it is made, then each next."""
        try:
            yield
        except RuntimeError as e:  # nvImageCodec's status 3 and 4: a codestream it cannot parse (not out of memory)
            if (not re.search(r"Failed to decode sample|nvImageCodec failure: '#[34]'", str(e))
                    or DALI_OUT_OF_MEMORY.search(str(e).lower())):  # (a sample it had no memory for: not damaged)
                raise
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            sample = DALI_SAMPLE.search(str(e))
            where = (f"{sample[1]}: the image {sample[3]}" if sample else f"an image of the shards in {self.where}")
            cause = next((line for line in lines if "Failed to decode" in line or "failure" in line), lines[-1])
            raise DamagedSample(damaged_shard(where, f"DALI: {first_line(cause)}" + (
                "" if sample else "; --loader torch names the shard and image"))) from e

    def __iter__(self):
        with self.decode_errors():
            yield from self._batches()

    def _batches(self):
        if self.copies == 1:
            outs = (out[0] for i, out in enumerate(self.it) if i < self.steps)  # the whole pass, of which train
            # uses the first `steps` batches and reads the rest (under a batch more than the smallest slice's)
        else:
            outs = (self.next_batch() for _ in range(self.steps))
        for out in outs:
            n = self.batch_size if self.train else len(out["labels"])
            images = out["images0"]
            if self.copies > 1:  # copy k of read i at k * reads + i, trimmed to the batch
                images = torch.cat([out[f"images{k}"] for k in range(self.copies)])[:n]
            labels = out["labels"].view(-1).long()
            if labels.device.type == "cpu" and not ((labels >= 0) & (labels < self.classes)).all():  # (on a GPU: not
                # checked: the pipeline moves them there; a CPU copy to check is untried without a GPU here)
                label = int(labels[(labels < 0) | (labels >= self.classes)][0])
                raise DamagedSample(no_class(f"an image of the shards in {self.where}", label, self.classes,
                                             "; --loader torch names the shard and image"))
            batch = (images.permute(0, 3, 1, 2), labels.repeat(self.copies)[:n])  # NHWC memory = channels-last NCHW
            if "keys" in out:
                keys = [bytes(k.cpu().numpy()).rstrip(b"\0").decode().rsplit(":", 1)[1].split(".")[0]
                        for k in out["keys"]]
                batch += ((keys * self.copies)[:n],)
            yield batch
