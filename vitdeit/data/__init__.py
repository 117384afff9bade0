"""Data backends behind one interface: build_loader(cfg, manifest, split, dist).

A loader yields (images, labels) on the run's device, images normalised and channels-last, and has:
- `len(loader)`: batches per epoch on this rank; `num_samples`: the samples they hold (train: whole batches,
  padding included; val: this rank's share of the images, each counted once over the ranks);
- `set_epoch(e)`, before each train epoch;
- `name` ("torch" or "dali") and `state()`: what a checkpoint keeps to resume the sample stream exactly (DALI's
  reader position and generators; None for the PyTorch loader, whose epoch follows from (seed, epoch)); a DALI
  loader built with a saved state says in `restored` whether it fitted, and in `not_restored` why not.
DALI is imported only when chosen.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..classes import MANIFEST_NAME
from ..errors import DataError, SettingError
from .index import index_sha1, read_index, tar_agrees

# ImageNet channel statistics (0..1 scale), shared by both loaders and the benchmark's baseline
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RA_FILL = (124, 116, 104)  # RandAugment's fill for geometric ops: MEAN in grey levels, as timm's img_mean


def timm_rand_augment(spec: str, interpolation: str | None = None):
    """timm's RandAugment transform of `spec` (PIL image in and out), its Posterize ops mended (posterize below):
    the one place that builds it, for the PyTorch loader, the DALI loader (which reads its numbers), the config
    check and the benchmark's baseline. interpolation: the run's filter for its Rotate/Shear/Translate ops, as timm's
    create_transform (and so the DeiT reference) passes it; None leaves timm's random pick per call."""
    from timm.data import auto_augment
    from timm.data.transforms import str_to_pil_interp

    hparams = {"img_mean": RA_FILL, **({"interpolation": str_to_pil_interp(interpolation)} if interpolation else {})}
    ra = auto_augment.rand_augment_transform(spec, hparams)
    for op in ra.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return ra


def posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, but keeping 0 bits makes a black image, as Pillow did before it refused 0 (Pillow 13 raises
    ValueError): timm's PosterizeIncreasing asks for 0 bits at magnitude 10, which the DeiT recipe's magnitude noise
    (rand-m9-mstd0.5) reaches for 2 % of its calls, and the run crashed within its first batches."""
    from PIL import Image
    from timm.data import auto_augment

    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else auto_augment.posterize(img, bits_to_keep, **kwargs)


def val_resize(img_size: int, crop_pct: float) -> int:
    """Val: the shorter side (px) images are resized to before the centre crop of img_size (timm's crop_pct)."""
    return math.floor(img_size / crop_pct)


def upscale_warning(data_path, manifest: dict, img_size: int, crop_pct: float) -> str | None:
    """The warning for shards packed with a --resize-short under the shorter side val resizes to (their images are
    upscaled), or None."""
    packed, val_short = manifest.get("options", {}).get("resize_short"), val_resize(img_size, crop_pct)
    if packed and packed < val_short:
        return (f"{data_path} was packed with --resize-short {packed}, under the {val_short} px shorter side val "
                f"resizes to (--img-size {img_size} / --crop-pct {crop_pct}): images are upscaled. Repack with "
                f"--resize-short {val_short} or more, or lower --img-size.")
    return None


def uint8_normalizer(device, mean=MEAN, std=STD):
    """(scale, shift), each (1, 3, 1, 1) on `device`, with x * scale + shift == (x - 255 mean) / (255 std) for
    0..255 pixels x: one fused torch.addcmul, a pass over the batch fewer than a sub_ and a div_ (on a CPU that
    pass is main-process time)."""
    import torch

    std255 = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    return 1 / std255, -torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255 / std255


def shard_paths(shards_dir, manifest: dict, split: str) -> list[tuple[Path, Path, list]]:
    """(tar, DALI index, the index read: read_index's samples) of each shard of `split`, in the manifest's order; a
    missing tar or index, a tar of another size than the manifest's, an index that read_index refuses, that counts
    other samples or (where the manifest keeps its SHA-1) is another, or a tar whose first and last samples' headers
    are not the index's (tar_agrees), is a DataError now, not a worker crash at its first sample, nor samples read
    twice or other bytes read as a label."""
    d = Path(shards_dir)
    out = [(d / s["file"], d / s["index"]) for s in manifest["splits"][split]["shards"]]
    for path in (p for pair in out for p in pair):
        if not path.is_file():
            raise DataError(f"{path}: listed in {d / MANIFEST_NAME} but missing; re-run pack_shards.py on the source "
                            f"folders (it writes every shard, an .idx beside each, and the manifest).")
    for (tar, _), shard in zip(out, manifest["splits"][split]["shards"]):
        size = tar.stat().st_size
        if size != shard["bytes"]:  # a copy cut short (or another run's tar): its samples' offsets would be wrong
            raise DataError(f"{tar}: {size} bytes, but {d / MANIFEST_NAME} says {shard['bytes']}; the file is cut "
                            f"short or not this pack's. Copy it again from where it was packed, or re-run "
                            f"pack_shards.py (it rewrites only the shards that differ).")
    indexes = []
    for (tar, idx), shard in zip(out, manifest["splits"][split]["shards"]):
        data = idx.read_bytes()  # read once: the samples taken are those of the bytes whose SHA-1 is checked
        indexes.append(read_index(idx, shard["bytes"], data))  # DALI trusts an index: one cut short or from another
        # pack drops samples, one whose offsets are off reads other bytes (or crashes it)
        if len(indexes[-1]) != shard["num_samples"]:
            raise DataError(f"{idx}: {len(indexes[-1])} samples, but {d / MANIFEST_NAME} says {shard['num_samples']}; "
                            f"the index is not this pack's. Re-run pack_shards.py (it rewrites the shards that "
                            f"differ).")
        # any other change (in a manifest since 2026-12-07): an offset moved within the tar's blocks, or a shard
        # copied over another with its index
        if shard.get("index_sha1") and index_sha1(idx, data) != shard["index_sha1"]:
            raise DataError(f"{idx}: not the index pack_shards.py wrote for {tar.name} (its SHA-1 is not the one in "
                            f"{d / MANIFEST_NAME}): edited, damaged, or another shard's with its tar. Re-run "
                            f"pack_shards.py (it writes again each shard whose index is not the one it wrote).")
        if not tar_agrees(tar, indexes[-1]):  # a tar copied over another of the same size, without its index
            raise DataError(f"{tar}: not the tar {idx.name} describes (the headers of its first and last samples' "
                            f"files differ); another shard's copied over it? Copy it again from where it was packed, "
                            f"or re-run pack_shards.py (it writes again each shard whose tar is not its index's).")
    return [(tar, idx, index) for (tar, idx), index in zip(out, indexes)]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader(choice: str, device_type: str, torch_only: bool = False) -> str:
    """auto = DALI on CUDA when installed (and no setting only the PyTorch loader has: Config.torch_only), else
    torch."""
    if choice == "auto":
        return "dali" if device_type == "cuda" and dali_available() and not torch_only else "torch"
    if choice == "dali" and not dali_available():
        raise SettingError("--loader dali: NVIDIA DALI is not installed; pip install nvidia-dali-cuda120 "
                           "(or use --loader torch).")
    return choice


def build_loader(cfg, manifest: dict, split: str, dist, state=None):
    """state: the `state()` this rank's train loader returned in an earlier run (only DALI has one)."""
    backend = resolve_loader(cfg.loader, dist.device.type, bool(cfg.torch_only))
    if backend == "dali" and split == "val" and manifest["splits"]["val"]["num_samples"] < dist.world:
        backend = "torch"  # DALI needs a sample per shard; the PyTorch loader gives empty ranks no batches
    kwargs = dict(batch_size=cfg.batch_size, img_size=cfg.img_size, rank=dist.rank, world=dist.world,
                  workers=cfg.decode_workers, device=dist.device, seed=cfg.seed, rand_augment=cfg.rand_augment or None,
                  repeats=cfg.repeated_aug, crop_pct=cfg.crop_pct, scale=(cfg.crop_scale_min, 1.0),
                  interpolation=cfg.interpolation)
    if backend == "dali":
        from .dali_loader import DaliLoader

        # float16 straight out of DALI where autocast will run the model in 16 bits anyway; float32 otherwise
        half = dist.device.type == "cuda" and cfg.amp != "off"
        return DaliLoader(cfg.data_path, manifest, split, half=half, state=state,
                          hw_decoder_load=cfg.dali_hw_decoder_load, executor=cfg.dali_executor,
                          prefetch=cfg.dali_prefetch, **kwargs)
    from .torch_loader import TorchLoader

    return TorchLoader(cfg.data_path, manifest, split, **kwargs)
