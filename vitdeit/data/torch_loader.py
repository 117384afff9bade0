"""The PyTorch shard loader: the CPU path, and the fallback where DALI is not wanted.

Random access into the packed tars through the DALI index files the packer wrote (the same index serves both
backends): each sample is a (JPEG bytes, int32 label) slice of an mmap, so an epoch is a true global permutation,
ranks read disjoint index sets (but for --repeated-aug's copies), and validation visits every image exactly once.
Workers decode to uint8 only (the crop is drawn from the JPEG header, then libjpeg-turbo decodes, at a reduced DCT
scale when the crop allows, and torch's uint8 antialiased bilinear or bicubic resize does crop + resize); the float
work (normalisation) happens on the device.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import random
import signal
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

try:  # torchvision's decoders: deprecated since 0.29 (for TorchCodec's), to be removed in a later release
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without them: decode_rgb falls back to PIL
    decode_image = None

from ..config import Config
from ..errors import BatchTooLarge, DamagedSample, damaged_shard, first_line, image_failure, no_class
from . import MEAN, STD, shard_paths, timm_rand_augment, uint8_normalizer, val_resize
from .index import read_index

DRAFT_GAP = 2.0  # a reduced-scale decode keeps >= 2x the output resolution (see decode_resize)


class QuietDataLoader(DataLoader):
    """PyTorch's DataLoader without its warning of more workers than cores, which it raises as it is made and again
    at its first iteration (train and val: four times a run): train.py (--eval-only too) and viz.py say it once,
    counting every rank on the node and DALI's threads too (config.workers_warning)."""

    def check_worker_number_rationality(self) -> None:
        pass


class ShardSamples(Dataset):
    """Sample i of a split = (uint8 HWC image, label); `transform` maps JPEG bytes to the uint8 array."""

    def __init__(self, shards_dir: str | Path, manifest: dict, split: str, transform=None):
        self.transform, self.classes = transform, len(manifest["classes"])
        paths = shard_paths(shards_dir, manifest, split)
        self.files = [str(tar) for tar, _, _ in paths]
        rows = []
        for shard_id, (_, _, index) in enumerate(paths):  # (shard_paths checked each index's count and offsets)
            for _key, e in index:
                rows.append((shard_id, *e["jpg"], e["lbl"][0]))
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 4)  # shard, jpg offset, jpg size, label offset
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is None:  # opened lazily, so each DataLoader worker has its own maps
            with open(self.files[shard], "rb") as f:
                m = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def raw(self, i: int) -> tuple[bytes, int]:
        shard, off, size, lbl_off = (int(v) for v in self.rows[i])
        m = self._map(shard)
        return m[off : off + size], struct.unpack_from("<i", m, lbl_off)[0]

    def __getitem__(self, item):
        """item: an index, or (index, seed) from RankSampler: the augmentation of a sample is a function
        of (run seed, epoch, index) alone, so a resumed run sees exactly the batches it would have seen."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        data, label = self.raw(i)
        if not 0 <= label < self.classes:
            raise DamagedSample(no_class(self.where(i), label, self.classes))
        try:
            return self.transform(data, random.Random(seed)), label
        except Exception as e:
            try:  # the image alone, read as the transforms read it: a transform that fails on an image that reads is
                # a bug, with its own traceback. PIL's header first: a damaged one can claim a size past PIL's limit
                # (DecompressionBombError), which torchvision's decoder would fill in as grey (65,500 px square: 12 GB)
                Image.open(io.BytesIO(data))
                decode_rgb(data)
            except Exception:  # PIL and torchvision raise many kinds (UnidentifiedImageError, OSError, RuntimeError)
                pass
            else:
                raise
            raise DamagedSample(damaged_shard(self.where(i), first_line(image_failure(e)))) from e

    def where(self, i: int) -> str:
        """Sample i's shard and key, for its error."""
        shard, off = int(self.rows[i][0]), int(self.rows[i][1])
        index = read_index(Path(self.files[shard]).with_suffix(".idx"))
        key = next((k for k, entry in index if entry["jpg"][0] == off), f"at byte {off}")
        return f"{self.files[shard]}: the image {key}"

    def __getstate__(self):  # mmaps don't pickle (spawned workers); they reopen lazily
        return {**self.__dict__, "_maps": {}}


# ---------------------------------------------------------------- transforms (uint8 in workers)


class TrainTransform:
    """RandomResizedCrop + horizontal flip (+ timm RandAugment) on JPEG bytes -> uint8 HWC array."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 rand_augment: str | None = None, interpolation: str = Config.interpolation):
        self.size, self.scale, self.ratio, self.hflip, self.mode = size, scale, ratio, hflip, interpolation
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.aa = None
        if rand_augment:
            self.aa = timm_rand_augment(rand_augment, interpolation)

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, width, height) in px, torchvision's RandomResizedCrop sampling (10 tries, then centre)."""
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(*self.log_ratio))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        im = Image.open(io.BytesIO(data))  # reads the header only: the crop is drawn before decoding
        w, h = im.size
        left, top, cw, ch = self.crop_box(w, h, rng)
        x = decode_resize(data, im, (left, top, left + cw, top + ch), (self.size, self.size), self.mode)
        if rng.random() < self.hflip:
            x = x.flip(1)
        if self.aa is None:
            return x.numpy()
        # timm's RandAugment works on PIL images and draws from the global `random` and `np.random`: seeded per sample,
        # and put back after, for --workers 0, where this runs in the main process, whose Mixup, CutMix and erasing
        # draw from them too (seed_everything's per-epoch seeds)
        saved = random.getstate(), np.random.get_state()
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        try:
            return np.asarray(self.aa(Image.fromarray(x.numpy())))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


class ValTransform:
    """Resize the shorter side to floor(size / crop_pct), centre-crop size x size (torchvision's
    Resize + CenterCrop, timm's eval transform) -> uint8 HWC array."""

    def __init__(self, size: int, crop_pct: float = Config.crop_pct, interpolation: str = Config.interpolation):
        self.size, self.crop_pct, self.mode = size, crop_pct, interpolation

    def __call__(self, data: bytes, rng: random.Random | None = None) -> np.ndarray:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        short = val_resize(self.size, self.crop_pct)
        rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        x = decode_resize(data, im, (0, 0, w, h), (rh, rw), self.mode)
        top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
        return x[top : top + self.size, left : left + self.size].contiguous().numpy()


def decode_rgb(data: bytes, im: Image.Image | None = None) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor, CHW: torchvision's decoder (6-24 % faster than PIL's per 500 x 375 JPEG on
    one core in BENCHMARKS.md's runs), or PIL's `im` (opened on `data`) where given, or where this torchvision has
    no decoder left. Both are libjpeg-turbo: the same pixels (tests)."""
    if im is None and decode_image is not None:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return torch.from_numpy(np.array((im or Image.open(io.BytesIO(data))).convert("RGB"))).permute(2, 0, 1)


def decode_resize(data: bytes, im: Image.Image, box: tuple[int, int, int, int], out_hw: tuple[int, int],
                  mode: str) -> torch.Tensor:
    """Decode `data`, crop `box` (left, top, right, bottom in source px), resize to out_hw with the antialiased
    `mode` filter (bilinear or bicubic) -> uint8 HWC tensor.

    Costs per 500 x 375 JPEG on one core (BENCHMARKS.md, "per-image costs"; one run): decode ~1.3 ms, this
    resize ~0.37 ms, where PIL's resize takes ~1.14 ms. So: libjpeg-turbo through torchvision decodes, and torch's
    antialiased bilinear resize (AVX2 uint8 kernel, fast only on channels-last input) resizes: against PIL's
    decode + resize of the same box, 99.8 % of pixels within +-1 grey level (mean |diff| 0.01; measured on
    100 of the benchmark's JPEGs). Where the box is at least 2x out_hw at a reduced DCT scale (1/2, 1/4, 1/8),
    PIL `draft` decodes at that scale instead: a box filter for free, and the factor 2 (PIL's
    `reducing_gap=2`) leaves the antialiased resize the last word on quality. Bicubic: the same uint8 kernel family,
    within a grey level of PIL's BICUBIC too (tests), ~0.05 ms more per image (BENCHMARKS.md)."""
    w, h = im.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    im.draft("RGB", (math.ceil(DRAFT_GAP * w * out_hw[1] / bw), math.ceil(DRAFT_GAP * h * out_hw[0] / bh)))
    # a reduced scale is PIL's to decode; so is any scale where torchvision has no decoder (`im` is open already)
    x = decode_rgb(data, im if im.size != (w, h) or decode_image is None else None)
    sx, sy = x.shape[2] / w, x.shape[1] / h
    left, top = round(box[0] * sx), round(box[1] * sy)
    right, bottom = max(left + 1, round(box[2] * sx)), max(top + 1, round(box[3] * sy))
    crop = x[None, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=out_hw, mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous()  # HWC (a no-op where the kernel kept channels-last)


# ---------------------------------------------------------------- distribution over ranks


class RankSampler(Sampler):
    """Indices of one rank. Train: a fresh seeded permutation per epoch, padded (by wrapping) so every
    rank gets the same count. Val: in order, no padding, rank r takes r, r+world, ...: each index once.

    repeats = R > 1 (train; DeiT's repeated augmentation, its RASampler): each index of the permutation R times in
    a row, dealt out over the ranks in turn (so the copies of an image land on R neighbouring ranks, or in the same
    batch on one), and each rank's list cut to the epoch's usual length: an epoch draws about n / R images, each
    R times, every copy with its own augmentation seed."""

    def __init__(self, n: int, rank: int, world: int, shuffle: bool, seed: int = 0, repeats: int = 1):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.epoch = n, rank, world, shuffle, seed, 0
        self.repeats = repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws(self) -> list[tuple[int, int]]:
        """(index, copy) of each of this rank's samples this epoch: copy < repeats, or beyond for a sample the padding
        draws again (it wraps to the permutation's start: a copy of its own, augmented anew)."""
        if not self.shuffle:
            return [(i, 0) for i in range(self.rank, self.n, self.world)]
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = [(i, k) for i in torch.randperm(self.n, generator=g).tolist() for k in range(self.repeats)]
        total = math.ceil(len(order) / self.world) * self.world
        mine = range(self.rank, total, self.world)[: len(self)]  # positions past the order wrap to its start, as often
        # as fewer samples than ranks need
        return [(order[p % len(order)][0], order[p % len(order)][1] + self.repeats * (p // len(order))) for p in mine]

    def indices(self) -> list[int]:
        return [i for i, _ in self.draws()]

    def __iter__(self):
        base = (self.seed * 1000003 + self.epoch) * 2654435761  # per-sample augmentation seeds; a padding copy's
        r, n = self.repeats, self.n  # (copy >= repeats) lie past every first-pass seed, base + i * r + k < base + n * r
        return iter([(i, (base + (c // r * n + i) * r + c % r) % 2**63) for i, c in self.draws()])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) if self.shuffle else len(range(self.rank, self.n, self.world))


def end_quietly_on_sigterm(worker_id: int) -> None:
    """A worker's SIGTERM from anyone ends it quietly. A scheduler's cancel or time limit reaches every process of
    the job; PyTorch's own handler ends a worker quietly only for its parent's SIGTERM, and otherwise lets it die by
    the signal, which its main process then reports as a crash of its own ("DataLoader worker ... is killed by
    signal: Terminated", a traceback under train.py's line that says how to go on)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def collate_uint8(batch):
    images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, H, W, C) uint8
    return images, torch.tensor([b[1] for b in batch], dtype=torch.int64)


class TorchLoader:
    """Yields (images, labels) on `device`: images normalised, float32, NCHW shape in channels-last memory."""

    name = "torch"

    def __init__(self, shards_dir, manifest, split: str, batch_size: int, img_size: int, rank: int = 0,
                 world: int = 1, workers: int = 4, device: str | torch.device = "cpu", seed: int = 0,
                 rand_augment: str | None = None, crop_pct: float = 0.875, scale=(0.08, 1.0),
                 mean=MEAN, std=STD, interpolation: str = Config.interpolation, repeats: int = 1):
        train = split == "train"
        transform = (TrainTransform(img_size, scale=scale, rand_augment=rand_augment, interpolation=interpolation)
                     if train else ValTransform(img_size, crop_pct, interpolation))
        self.dataset = ShardSamples(shards_dir, manifest, split, transform)
        self.sampler = RankSampler(len(self.dataset), rank, world, shuffle=train, seed=seed, repeats=repeats)
        self.drop_last = train  # every rank takes the same number of train steps
        if self.drop_last and len(self.sampler) < batch_size:
            raise BatchTooLarge(split, len(self.sampler), batch_size)
        self.device = torch.device(device)
        self.loader = QuietDataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                      collate_fn=collate_uint8, pin_memory=self.device.type == "cuda",
                                      drop_last=self.drop_last, persistent_workers=workers > 0,
                                      prefetch_factor=4 if workers > 0 else None,
                                      worker_init_fn=end_quietly_on_sigterm,
                                      # its own generator for the workers' base seed (unused: samples carry their
                                      # seeds), which each new iterator otherwise draws from the global one; with
                                      # persistent workers only the first does, so a resumed run's drop-path masks
                                      # would differ
                                      generator=torch.Generator().manual_seed(seed))
        self.scale, self.shift = uint8_normalizer(self.device, mean, std)
        self.per_rank = len(self.sampler)  # samples this rank's epoch draws from: ceil(n / world) train (padded)
        self.num_samples = len(self.sampler) if not self.drop_last else len(self) * batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state(self) -> None:
        return None  # nothing to save: what an epoch draws is a function of (seed, epoch) alone

    def __iter__(self):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels-last NCHW
            yield torch.addcmul(self.shift, images.float(), self.scale), labels.to(self.device, non_blocking=True)
