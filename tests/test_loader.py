import io
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from test_packing import read_tar
from vitdeit.classes import load_manifest
from vitdeit.errors import DataError
from vitdeit.data import torch_loader
from vitdeit.data.torch_loader import RankSampler, ShardSamples, TorchLoader, TrainTransform, ValTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def all_samples(shards, split):
    """Independent read: the split's (key, label, jpeg bytes) in shard order, via tarfile."""
    m = load_manifest(shards)
    out = []
    for s in m["splits"][split]["shards"]:
        for key, comp in read_tar(shards / s["file"]).items():
            out.append((key, int(comp["cls"]), comp["jpg"]))
    return out


def test_val_batches_are_normalised_channels_last_with_the_right_labels(tiny_shards):
    m = load_manifest(tiny_shards)
    loader = TorchLoader(tiny_shards, m, "val", batch_size=8, img_size=32, workers=0)
    images, labels = zip(*loader)
    assert [len(y) for y in labels] == [8, 8, 8]  # 24 val images, none dropped
    x = images[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = all_samples(tiny_shards, "val")
    assert torch.cat(labels).tolist() == [lab for _, lab, _ in expected]
    # the same image through torchvision's classic val transform (Resize + CenterCrop + Normalize)
    ref_tf = v2.Compose([v2.Resize(math.floor(32 / 0.875)), v2.CenterCrop(32), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    ref = torch.stack([ref_tf(Image.open(io.BytesIO(jpg)).convert("RGB")) for _, _, jpg in expected[:8]])
    # one bilinear resize of the crop box vs resize-then-crop: sub-pixel differences only
    assert (x - ref).abs().mean() < 0.06


def test_train_batches_have_fixed_shape_and_labels_from_the_shards(tiny_shards):
    m = load_manifest(tiny_shards)
    loader = TorchLoader(tiny_shards, m, "train", batch_size=10, img_size=24, workers=2)
    batches = list(loader)
    assert len(loader) == len(batches) == 96 // 10  # drop_last: every rank takes the same number of steps
    x, y = batches[0]
    assert x.shape == (10, 3, 24, 24) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    labels = [lab for _, lab, _ in all_samples(tiny_shards, "train")]
    drawn = loader.sampler.indices()[: 90]
    assert torch.cat([b[1] for b in batches]).tolist() == [labels[i] for i in drawn]


def test_num_samples_is_what_the_batches_hold_on_each_rank(tiny_shards):
    m = load_manifest(tiny_shards)  # 96 train, 24 val images
    seen = {"train": [], "val": []}
    for rank in (0, 1):
        for split in seen:
            loader = TorchLoader(tiny_shards, m, split, batch_size=10, img_size=16, workers=0, rank=rank, world=2)
            held = sum(len(labels) for _, labels in loader)
            assert loader.num_samples == held and len(loader) == math.ceil(held / 10)
            seen[split].append(held)
    assert seen == {"train": [40, 40], "val": [12, 12]}  # train: whole batches of a rank's 48; val: each image once


def test_same_epoch_same_batches_next_epoch_new_order(tiny_shards):
    m = load_manifest(tiny_shards)
    a = TorchLoader(tiny_shards, m, "train", batch_size=16, img_size=24, workers=0)
    b = TorchLoader(tiny_shards, m, "train", batch_size=16, img_size=24, workers=2)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # augmentation depends on (seed, epoch, index) only
    a.set_epoch(1)
    assert a.sampler.indices() != b.sampler.indices()
    xa1, ya1 = next(iter(a))  # and the loader reads in that order: other images first
    labels = [lab for _, lab, _ in all_samples(tiny_shards, "train")]
    assert ya1.tolist() == [labels[i] for i in a.sampler.indices()[:16]] and not torch.equal(xa1, xb)


def test_the_order_and_augmentation_seeds_follow_the_run_seed_and_each_sample_gets_its_own():
    a, b = RankSampler(50, 0, 1, shuffle=True, seed=0), RankSampler(50, 0, 1, shuffle=True, seed=1)
    assert a.indices() != b.indices()  # another --seed, another order
    seeds = [s for _, s in a]
    assert seeds == [((0 * 1000003 + 0) * 2654435761 + i) % 2**63 for i in a.indices()]  # as before --repeated-aug:
    # a run resumed across that change keeps its augmentation stream
    a.set_epoch(1)
    assert len(set(seeds)) == 50 and not set(seeds) & {s for _, s in a}  # per sample, and new each epoch
    # seed and epoch mixed, not added: --seed 1's epoch 0 is not --seed 0's epoch 1 (a seed sweep's runs would be
    # shifted copies of one another), in order or in augmentation seeds
    assert a.indices() != b.indices() and not {s for _, s in a} & {s for _, s in b}
    c = RankSampler(50, 0, 1, shuffle=True, seed=2)
    c.set_epoch(3)
    assert c.indices() == torch.randperm(50, generator=torch.Generator().manual_seed(2 * 1000003 + 3)).tolist()
    assert [s for _, s in c] == [((2 * 1000003 + 3) * 2654435761 + i) % 2**63 for i in c.indices()]


def test_the_normaliser_is_the_imagenet_statistics_in_rgb_order():
    from vitdeit.data import uint8_normalizer

    scale, shift = uint8_normalizer("cpu")
    x = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    literal = ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))  # R, G, B: (mean, std) on the 0..1 scale
    for c, (m, s) in enumerate(literal):
        assert torch.allclose(torch.addcmul(shift, x, scale)[0, c], (x[0, c] / 255 - m) / s, atol=1e-5)


def test_the_flip_is_horizontal_and_the_crop_box_lies_inside_the_image_within_scale_and_ratio():
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(jpg, "JPEG")
    kept, flipped = TrainTransform(24, hflip=0.0), TrainTransform(24, hflip=1.0)
    a, b = kept(jpg.getvalue(), random.Random(7)), flipped(jpg.getvalue(), random.Random(7))
    assert np.array_equal(b, a[:, ::-1]) and not np.array_equal(a, a[:, ::-1])  # columns reversed, rows not
    t, rng = TrainTransform(24, scale=(0.2, 0.9)), random.Random(0)
    for w, h in ((500, 120), (120, 500), (300, 300)):
        for _ in range(2000):
            left, top, cw, ch = t.crop_box(w, h, rng)
            assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
            fallback = (left, top) == ((w - cw) // 2, (h - ch) // 2)  # 10 misses: the centre crop
            assert fallback or (0.2 * w * h * 0.95 <= cw * ch <= 0.9 * w * h * 1.05
                                and 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1)
    # and where it lies is drawn too: on a square image the ratio and scale always fit, so no centre fallback
    boxes = [t.crop_box(300, 300, rng) for _ in range(2000)]
    assert sum((left, top) == ((300 - cw) // 2, (300 - ch) // 2) for left, top, cw, ch in boxes) < 20
    assert len({left for left, *_ in boxes}) > 150 and len({top for _, top, *_ in boxes}) > 150


def test_where_no_drawn_crop_fits_the_box_is_torchvisions_centred_fallback():
    from torchvision.transforms import RandomResizedCrop

    t = TrainTransform(24)  # scale (0.08, 1), ratio (3/4, 4/3): no crop of these strips fits, so all 10 tries miss
    for w, h in ((1000, 10), (10, 1000), (700, 12), (13, 600)):
        top, left, ch, cw = RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        assert t.crop_box(w, h, random.Random(w)) == (left, top, cw, ch)
        assert (left, top) != (0, 0)  # centred along the long side


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_train_loader_flips_half_the_images_and_crops_at_the_configured_scale(tmp_path, backend):
    """Built as train.py builds it (Config defaults but a whole-image crop): one left-right asymmetric picture,
    packed 64 times, comes out as itself or its mirror image, about half of each."""
    from conftest import small_dataset
    from vitdeit.config import Config
    from vitdeit.data import build_loader, dali_available
    from vitdeit.distributed import Dist
    from vitdeit.packing import PackOptions, pack

    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=32, val_per_class=2)
    yy, xx = np.mgrid[0:64, 0:64]
    picture = np.stack([xx * 4, yy * 4, 255 - (xx < 32) * 200], axis=-1).astype(np.uint8)  # square: scale 1 = whole
    jpg = io.BytesIO()
    Image.fromarray(picture).save(jpg, "JPEG", quality=95)
    for f in data.glob("train.X*/*/*.JPEG"):
        f.write_bytes(jpg.getvalue())
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    cfg = Config(data_path=str(tmp_path / "s"), img_size=32, batch_size=16, workers=1, crop_scale_min=1.0,
                 loader=backend)
    images = torch.cat([x.float() for x, _ in build_loader(cfg, load_manifest(tmp_path / "s"), "train", Dist())])
    assert len(images) == 64
    ref = images[0]
    gaps = torch.stack([(images - ref).abs().mean((1, 2, 3)), (images - ref.flip(-1)).abs().mean((1, 2, 3))], 1)
    assert gaps.min(1).values.max() < 0.05  # every crop the whole picture (in std units: a partial one is ~1 off)
    flipped = (gaps[:, 1] < gaps[:, 0]).float().mean().item()  # share mirrored like image 0 is not
    assert 0.3 < min(flipped, 1 - flipped) and max(flipped, 1 - flipped) < 0.7, flipped


@pytest.mark.parametrize("n,world", [(96, 1), (96, 3), (97, 4), (10, 8), (3, 8)])  # 3 < 8 / 2: wraps twice
def test_train_ranks_are_disjoint_equal_sized_and_cover_everything(n, world):
    parts = [RankSampler(n, r, world, shuffle=True, seed=3).indices() for r in range(world)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == math.ceil(n / world)
    drawn = [i for p in parts for i in p]
    assert set(drawn) == set(range(n))
    assert len(drawn) - n == math.ceil(n / world) * world - n  # repeats: only the documented padding
    seeds = [s for r in range(world) for _, s in RankSampler(n, r, world, shuffle=True, seed=3)]
    assert len(set(seeds)) == len(seeds)  # a padding copy is augmented anew, not a twin of its first draw


@pytest.mark.parametrize("n,world,r", [(96, 1, 3), (96, 4, 3), (97, 3, 3), (100, 8, 3), (60, 2, 2)])
def test_repeated_augmentation_deals_runs_of_copies_over_the_ranks_and_keeps_the_epoch_length(n, world, r):
    samplers = [RankSampler(n, rank, world, shuffle=True, seed=3, repeats=r) for rank in range(world)]
    per_rank = [list(s) for s in samplers]  # (index, augmentation seed)
    steps = math.ceil(n / world)
    assert all(len(p) == steps for p in per_rank)  # the epoch's usual length on every rank
    # the global sequence, as the ranks take it in turn: runs of r copies of one image, each run a new image
    seq = [per_rank[p % world][p // world] for p in range(steps * world)]
    runs = [seq[p : p + r] for p in range(0, len(seq) - len(seq) % r, r)]
    assert all(len({i for i, _ in run}) == 1 for run in runs)
    assert len({run[0][0] for run in runs}) == len(runs) and len(runs) >= steps * world // r
    assert all(len({s for _, s in run}) == r for run in runs)  # every copy augmented with its own seed
    draws = [d for p in per_rank for d in p]
    assert len({s for _, s in draws}) == len(draws)  # no two draws share a seed, across images either
    assert max(Counter(i for i, _ in draws).values()) <= r  # the epoch's padding repeats no image beyond r
    # one process: the copies of an image sit side by side in its batches
    assert world > 1 or [i for i, _ in per_rank[0][:6]] == [per_rank[0][0][0]] * 3 + [per_rank[0][3][0]] * 3


def test_build_loader_hands_repeated_aug_on_and_lets_auto_pick_dali_with_it(tiny_shards, monkeypatch):
    from vitdeit import data
    from vitdeit.config import Config
    from vitdeit.distributed import Dist

    calls, resolve = [], data.resolve_loader
    monkeypatch.setattr(data, "resolve_loader", lambda *a, **k: (calls.append(a), resolve(*a, **k))[1])
    cfg = Config(data_path=str(tiny_shards), workers=0, img_size=32, batch_size=12, repeated_aug=3)
    idx = data.build_loader(cfg, load_manifest(tiny_shards), "train", Dist()).sampler.indices()
    assert calls == [("auto", "cpu", False)]  # DALI has it too: auto may pick DALI on a GPU
    assert idx[0] == idx[1] == idx[2] != idx[3]


def test_repeated_copies_in_a_batch_share_the_label_but_not_the_crop(tiny_shards):
    loader = TorchLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=12, img_size=24, workers=0,
                         repeats=3)
    x, y = next(iter(loader))
    for k in range(0, 12, 3):
        assert y[k] == y[k + 1] == y[k + 2]
        assert not torch.equal(x[k], x[k + 1]) and not torch.equal(x[k + 1], x[k + 2])
    assert len(loader) == len(TorchLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=12, img_size=24,
                                          workers=0))


@pytest.mark.parametrize("n,world", [(24, 1), (24, 5), (7, 8), (25, 2)])
def test_val_ranks_see_each_image_exactly_once(n, world):
    drawn = [i for r in range(world) for i in RankSampler(n, r, world, shuffle=False).indices()]
    assert sorted(drawn) == list(range(n))
    # and each rank's length is its own share (rank r: images r, r + world, ...), not the largest rank's
    shares = [len([i for i in range(n) if i % world == r]) for r in range(world)]
    assert [len(RankSampler(n, r, world, shuffle=False)) for r in range(world)] == shares and sum(shares) == n


def test_train_transform_uses_reduced_dct_scale_and_matches_a_full_decode(monkeypatch):
    from PIL import JpegImagePlugin

    decoded_sizes, real_draft = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    rng = np.random.default_rng(0)
    big = Image.fromarray(np.kron(rng.integers(0, 255, (16, 16, 3)), np.ones((32, 32, 1))).astype(np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)  # 512 x 512
    tf = TrainTransform(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = tf(buf.getvalue(), random.Random(0))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert decoded_sizes == [(128, 128)]  # decoded at 1/4 scale: 2x the output size, not 512 px
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).resize((64, 64), Image.BILINEAR)).astype(float)
    assert np.abs(out.astype(float) - full).mean() < 3  # of 255


def test_a_crop_decoded_at_a_reduced_dct_scale_is_taken_where_the_full_image_has_it(monkeypatch):
    from PIL import JpegImagePlugin

    decoded_sizes, real_draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: (real_draft(self, *a), decoded_sizes.append(self.size))[0])
    rng = np.random.default_rng(0)  # 512 x 384 px of 16 px blocks, each its own colour: a crop a block off reads wrong
    buf = io.BytesIO()
    Image.fromarray(np.kron(rng.integers(0, 255, (24, 32, 3)), np.ones((16, 16, 1))).astype(np.uint8)).save(
        buf, format="JPEG", quality=95)
    tf = TrainTransform(32, scale=(0.2, 0.3), ratio=(1.0, 1.0), hflip=0.0)
    boxes = [tf.crop_box(512, 384, random.Random(seed)) for seed in range(10)]
    assert all(left > 0 and top > 0 for left, top, _, _ in boxes)  # (crops away from the corner: offsets count)
    for seed, (left, top, w, h) in enumerate(boxes):
        decoded_sizes.clear()
        out = tf(buf.getvalue(), random.Random(seed)).astype(float)
        assert decoded_sizes == [(256, 192)]  # a 205-241 px crop to 32 px: decoded at 1/2 scale
        full = Image.open(io.BytesIO(buf.getvalue())).crop((left, top, left + w, top + h))
        # the same box of the full-size decode: within a few grey levels (its offsets halved with the scale: kept at
        # full size, the crop would sit as far off as it is from the corner: ~65 levels away)
        assert np.abs(out - np.asarray(full.resize((32, 32), Image.BILINEAR)).astype(float)).mean() < 10


def test_val_transform_keeps_the_center(tmp_path):
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:, 40:80] = 255  # a white band in the middle third
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = ValTransform(32)(buf.getvalue())
    assert out.shape == (32, 32, 3) and out[:, 10:22].min() > 200 and out[:, :3].max() < 60


@pytest.mark.skipif(torch_loader.decode_image is None, reason="this torchvision has no decoders: PIL's decodes")
def test_a_torchvision_without_its_decoders_gives_the_same_pixels_through_pil(monkeypatch):
    from benchmarks.imageset import natural_like

    buf = io.BytesIO()
    natural_like(np.random.default_rng(0), 120, 90).save(buf, format="JPEG", quality=90)  # too small for a draft
    calls = []
    real = torch_loader.decode_image
    monkeypatch.setattr(torch_loader, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))

    def both():
        return (ValTransform(32)(buf.getvalue()),
                TrainTransform(24, scale=(0.5, 1.0), hflip=0.0)(buf.getvalue(), random.Random(0)))

    with_torchvision = both()
    assert len(calls) == 2  # the full-scale decodes were torchvision's
    monkeypatch.setattr(torch_loader, "decode_image", None)  # as where torchvision.io has no decode_image
    opens, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(1) or real_open(*a, **k))
    for a, b in zip(with_torchvision, both()):
        np.testing.assert_array_equal(a, b)
    assert len(opens) == 2  # PIL decoded the image each transform had opened for its size, not a second copy


@pytest.mark.parametrize("mode,other", [("bilinear", "bicubic"), ("bicubic", "bilinear")])
def test_both_transforms_resize_with_the_chosen_filter_as_pil_does(mode, other):
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    rng = np.random.default_rng(0)
    arr = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((3, 3, 1))).astype(np.uint8)  # 120 x 90, 3 px blocks
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless: only the resize filters differ
    src = Image.fromarray(arr)
    # val: shorter side 90 -> floor(32 / 0.8) = 40, so 120 x 90 -> 53 x 40, then the centre 32 x 32 (left 10, top 4)
    val = ValTransform(32, crop_pct=0.8, interpolation=mode)(buf.getvalue()).astype(int)
    # train: a crop of the whole image (scale 1, its own aspect ratio allowed), unflipped, to 24 x 24
    train = TrainTransform(24, scale=(1.0, 1.0), ratio=(0.5, 2.0), hflip=0.0, interpolation=mode)(
        buf.getvalue(), random.Random(0)).astype(int)
    for out, pil in ((val, lambda f: np.asarray(src.resize((53, 40), f))[4:36, 10:42]),
                     (train, lambda f: np.asarray(src.resize((24, 24), f)))):
        same, diff = (np.abs(out - pil(filters[m]).astype(int)) for m in (mode, other))
        assert same.max() <= 1  # torch's uint8 antialiased kernels match PIL's to a grey level
        assert diff.mean() > 10 * max(same.mean(), 0.05)  # and the other filter is measurably different


@pytest.mark.parametrize("w,h", [(120, 90), (90, 120)])
def test_val_resizes_the_shorter_side_to_floor_size_over_crop_pct_then_takes_the_centre(w, h):
    # timm's eval transform: 32 / 0.875 = 36.57 -> 36 px (not 37), the longer side int(36 * 4 / 3) = 48, then the
    # centre 32 x 32: 2 px off the shorter side's start, 8 px off the longer's
    rng = np.random.default_rng(1)
    arr = np.kron(rng.integers(0, 256, (h // 3, w // 3, 3)), np.ones((3, 3, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless: only the resize and the crop decide the pixels
    out = ValTransform(32, crop_pct=0.875)(buf.getvalue()).astype(int)
    resized = np.asarray(Image.fromarray(arr).resize((48, 36) if w > h else (36, 48), Image.BILINEAR)).astype(int)
    centre = resized[2:34, 8:40] if w > h else resized[8:40, 2:34]
    assert out.shape == (32, 32, 3) and np.abs(out - centre).max() <= 1


@pytest.mark.parametrize("w,h", [(103, 72), (72, 103)])
def test_val_truncates_the_long_side_and_rounds_the_centre_as_torchvisions_resize_and_centercrop(w, h):
    # shorter side 72 -> 36: the long side 36 * 103 / 72 = 51.5 -> 51 (truncated, not rounded to 52), then a margin of
    # 19 px: round(9.5) = 10 px off its start (not floor's 9)
    rng = np.random.default_rng(2)
    arr = np.kron(rng.integers(0, 256, (h // 3 + 1, w // 3 + 1, 3)), np.ones((3, 3, 1)))[:h, :w].astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless: a pixel's shift shows in the blocks
    out = ValTransform(32, crop_pct=0.875)(buf.getvalue()).astype(int)
    ref = v2.Compose([v2.Resize(36), v2.CenterCrop(32)])(Image.fromarray(arr))  # torchvision's, on PIL
    assert out.shape == (32, 32, 3) and np.abs(out - np.asarray(ref).astype(int)).max() <= 1


def test_val_keeps_a_last_partial_batch(tiny_shards):
    loader = TorchLoader(tiny_shards, load_manifest(tiny_shards), "val", batch_size=7, img_size=32, workers=0)
    assert [len(y) for _, y in loader] == [7, 7, 7, 3] and len(loader) == 4  # 24 val images, none dropped


@pytest.mark.parametrize("split", ["train", "val"])
def test_build_loader_hands_the_runs_filter_and_crops_to_the_pytorch_loaders_transforms(tiny_shards, split):
    from vitdeit.config import Config
    from vitdeit.data import build_loader
    from vitdeit.distributed import Dist

    for mode, crop_pct, scale_min in (("bicubic", 0.5, 0.3), ("bilinear", 0.875, 0.08)):
        cfg = Config(data_path=str(tiny_shards), loader="torch", workers=0, img_size=32, batch_size=8,
                     interpolation=mode, crop_pct=crop_pct, crop_scale_min=scale_min)
        t = build_loader(cfg, load_manifest(tiny_shards), split, Dist()).dataset.transform
        assert t.mode == mode
        assert (t.crop_pct == crop_pct) if split == "val" else (t.scale == (scale_min, 1.0))


def test_too_few_samples_for_a_batch_is_a_clear_error(tiny_shards):
    with pytest.raises(DataError, match="--batch-size"):
        TorchLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=500, img_size=24, workers=0)


@pytest.mark.parametrize("gone", ["val-000000.idx", "val-000000.tar"])
def test_a_missing_shard_or_index_file_is_named_with_the_fix_before_any_worker_starts(tiny_shards, tmp_path, gone):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(tiny_shards, copy)
    (copy / gone).unlink()
    with pytest.raises(DataError, match=f"{gone}: listed in .*manifest.json but missing; re-run pack_shards.py"):
        ShardSamples(copy, load_manifest(copy), "val")


def test_auto_picks_dali_only_on_cuda_and_a_missing_dali_is_a_clear_error(monkeypatch):
    from vitdeit import data

    monkeypatch.setattr(data, "dali_available", lambda: True)
    assert data.resolve_loader("auto", "cuda") == "dali" and data.resolve_loader("auto", "cpu") == "torch"
    assert data.resolve_loader("auto", "cuda", torch_only=True) == "torch"  # e.g. RandAugment's -t op sets
    monkeypatch.setattr(data, "dali_available", lambda: False)
    assert data.resolve_loader("auto", "cuda") == "torch"
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError, match="pip install nvidia-dali-cuda120.*--loader torch"):
        data.resolve_loader("dali", "cpu")


def test_workers_started_by_spawn_give_the_main_processs_batches(tiny_shards):
    """macOS and Windows start DataLoader workers with 'spawn' (Linux forks): all a worker holds must pickle (the
    shards' mmaps reopen), and its batches must not depend on how it started."""
    import torch.multiprocessing as mp
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=16, img_size=24, rand_augment="rand-m9-mstd0.5-inc1", repeats=2)
    x0, y0 = next(iter(TorchLoader(tiny_shards, m, "train", workers=0, **kw)))
    before = mp.get_start_method(allow_none=True)
    mp.set_start_method("spawn", force=True)
    try:
        spawned = TorchLoader(tiny_shards, m, "train", workers=1, **kw)  # (the first batch: worker 0's)
        spawned.dataset.raw(0)  # its shards now mapped here, in the main process, as when it read one itself
        x1, y1 = next(iter(spawned))
        xv, yv = next(iter(TorchLoader(tiny_shards, m, "val", workers=1, batch_size=16, img_size=24)))
    finally:
        mp.set_start_method(before, force=True)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    xv0, yv0 = next(iter(TorchLoader(tiny_shards, m, "val", workers=0, batch_size=16, img_size=24)))
    assert torch.equal(xv, xv0) and torch.equal(yv, yv0)


def test_a_worker_sent_sigterm_by_another_process_ends_quietly_not_by_the_signal(tiny_shards):
    """A scheduler's cancel sends SIGTERM to every process of the job: a worker dead by the signal is reported by
    its main process as a crash of its own (PyTorch's handler ends it quietly only for its parent's SIGTERM)."""
    import subprocess
    import sys

    loader = TorchLoader(tiny_shards, load_manifest(tiny_shards), "train", workers=1, batch_size=16, img_size=24)
    next(iter(loader))
    worker = loader.loader._iterator._workers[0]  # (persistent: kept between epochs)
    subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"],
                   check=True)  # from another process, as a scheduler's
    worker.join(timeout=10)
    assert worker.exitcode == 0  # -15 had it died by the signal
    loader.loader._iterator._shutdown_workers()


def test_rand_augment_is_applied_and_reproducible_per_sample_seed(tiny_shards):
    data, _ = ShardSamples(tiny_shards, load_manifest(tiny_shards), "train").raw(0)
    plain = TrainTransform(32)
    aug = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1")
    outs = [aug(data, random.Random(s)) for s in range(20)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert all(np.array_equal(o, aug(data, random.Random(s))) for s, o in enumerate(outs))
    # same crop and flip as without RandAugment (same draws), then 2 ops, each applied with p = 0.5 (some,
    # like a small rotation of a flat region, barely change a 32 px image): a quarter of the samples or more
    assert sum(not np.array_equal(o, plain(data, random.Random(s))) for s, o in enumerate(outs)) >= 5


def test_rand_augment_draws_its_ops_anew_for_each_sample(tiny_shards):
    """timm picks the ops with np.random.choice: the per-sample seed must reach numpy too, or every sample of a
    process gets the same pair of ops (which were drawn, recorded by wrapping each of timm's ops)."""
    data, _ = ShardSamples(tiny_shards, load_manifest(tiny_shards), "train").raw(0)
    aug, drawn = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1"), []

    class Recorded:
        def __init__(self, op):
            self.op = op

        def __call__(self, img):
            drawn[-1].append(self.op.name)
            return self.op(img)

    aug.aa.ops = [Recorded(op) for op in aug.aa.ops]
    for s in range(50):
        drawn.append([])
        aug(data, random.Random(s))
    assert len(aug.aa.ops) == 15 and all(len(d) == 2 for d in drawn)  # 2 ops a sample (n=2), of 15
    # 50 draws of 225 ordered pairs (with replacement): about 45 distinct expected; in 100 picks each of the 15 ops
    # is missed with probability (14/15)^100 = 0.1 %: 13 or more of them drawn
    assert len({tuple(d) for d in drawn}) >= 35 and len({name for d in drawn for name in d}) >= 13


def test_rand_augment_leaves_the_global_generators_as_it_found_them(tiny_shards):
    """With --workers 0 the transform runs in the main process, where Mixup, CutMix and erasing draw from the global
    `random` and `np.random` that seed_everything seeds per epoch: the next draws are those of that seed."""
    data, _ = ShardSamples(tiny_shards, load_manifest(tiny_shards), "train").raw(0)
    aug = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1")
    random.seed(7)
    np.random.seed(7)
    want = random.random(), np.random.beta(0.8, 0.8)
    random.seed(7)
    np.random.seed(7)
    aug(data, random.Random(1))
    assert (random.random(), np.random.beta(0.8, 0.8)) == want


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_rand_augments_warps_resample_with_the_runs_filter_as_timms_create_transform_does(mode):
    from PIL import Image
    from timm.data import create_transform

    from benchmarks.throughput import classic_transform

    want = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    ours = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1", interpolation=mode).aa.ops
    (baseline,) = [t for t in classic_transform(32, mode, "rand-m9-mstd0.5-inc1").transforms if hasattr(t, "ops")]
    (timms,) = [t for t in create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                            interpolation=mode).transforms if hasattr(t, "ops")]
    warps = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    for ops in (ours, baseline.ops, timms.ops):
        assert {op.name: op.kwargs["resample"] for op in ops if op.name in warps} == dict.fromkeys(warps, want)


def test_rand_augments_strongest_posterize_blacks_the_image_out_instead_of_crashing(tiny_shards):
    # timm's PosterizeIncreasing keeps 4 - int(m / 10 * 4) bits: 0 at magnitude 10, which rand-m9-mstd0.5 reaches for
    # 2 % of its calls; Pillow 13 refuses 0 bits (ValueError), and a run with the DeiT recipe died in its first epoch
    from PIL import Image

    aug = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1")
    (op,) = [op for op in aug.aa.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert not np.asarray(op(image)).any()
    op.magnitude = 5  # 2 bits kept: 200 = 0b11001000 -> 0b11000000
    assert (np.asarray(op(image)) == 192).all()


def test_crop_areas_and_aspect_ratios_are_drawn_as_torchvisions_random_resized_crop_draws_them():
    """Not only inside the bounds: spread over them as torchvision's sampler spreads them (area uniform in
    scale, aspect ratio log-uniform, 10 tries then the centre), compared on 4,000 boxes of a 400 x 300 image."""
    from torchvision.transforms import RandomResizedCrop

    t, rng = TrainTransform(24, scale=(0.2, 0.9)), random.Random(0)
    ours = [t.crop_box(400, 300, rng)[2:] for _ in range(4000)]  # (width, height)
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.zeros(3, 300, 400), [0.2, 0.9], [3 / 4, 4 / 3])[:1:-1]
              for _ in range(4000)]  # (top, left, height, width) -> (width, height)
    stats = [(np.array([w * h for w, h in boxes]) / (400 * 300), np.log([w / h for w, h in boxes]))
             for boxes in (ours, theirs)]
    (area, log_ratio), (ref_area, ref_log_ratio) = stats
    assert abs(area.mean() - ref_area.mean()) < 0.015  # 0.49 here; always the smallest crop: 0.2
    assert abs(np.quantile(area, 0.9) - np.quantile(ref_area, 0.9)) < 0.03
    assert abs(log_ratio.mean() - ref_log_ratio.mean()) < 0.012  # ratio drawn uniformly (not its log): +0.027
    assert abs(log_ratio.std() - ref_log_ratio.std()) < 0.01



def damage(shards, nth: int = 4, header: bool = False) -> str:
    """Overwrite the JPEG bytes of train-000000.tar's nth image (the tar keeps its size, as a bit-flipped copy
    would), or (header) only its frame header's height and width, to 65,500 px each: its key."""
    from vitdeit.data.index import read_index

    key, entry = read_index(shards / "train-000000.idx")[nth]
    off, size = entry["jpg"]
    with open(shards / "train-000000.tar", "r+b") as f:
        f.seek(off)
        jpeg = bytearray(f.read(size))
        if header:  # walk the markers (FF xx, then a 2-byte big-endian length) to the start of frame
            at = 2
            while jpeg[at + 1] not in (0xC0, 0xC1, 0xC2):
                at += 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
            jpeg[at + 5 : at + 9] = (65_500).to_bytes(2, "big") * 2  # after length and precision: height, width
        f.seek(off)
        f.write(jpeg if header else b"A" * size)
    return key


def relabel(shards, label: int, nth: int = 4) -> str:
    """Overwrite the int32 label of train-000000.tar's nth image (as damage to that byte would): its key."""
    import struct

    from vitdeit.data.index import read_index

    key, entry = read_index(shards / "train-000000.idx")[nth]
    with open(shards / "train-000000.tar", "r+b") as f:
        f.seek(entry["lbl"][0])
        f.write(struct.pack("<i", label))
    return key


@pytest.mark.parametrize("label", [-100, -1, 4])
def test_a_label_that_is_no_class_is_named_with_its_shard_not_left_to_the_loss(tiny_shards, tmp_path, label):
    import shutil

    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    m = load_manifest(shards)
    assert len(m["classes"]) == 4
    key = relabel(shards, label)  # -100: cross-entropy's ignore_index, which would leave the image out silently
    with pytest.raises(DataError) as e:
        for _ in TorchLoader(shards, m, "train", batch_size=8, img_size=32, workers=0):
            pass
    assert str(e.value) == (f"{shards / 'train-000000.tar'}: the image {key} has label {label} (not one of the "
                            f"manifest's 4 classes, 0-3): the shard was damaged after packing (a copy cut short or "
                            f"changed?); copy it again, or delete it and re-run pack_shards.py with the same flags (it "
                            f"writes the missing shards again).")


@pytest.mark.parametrize("workers, header", [(0, False), (1, False), (0, True)])
def test_an_image_damaged_after_packing_is_named_with_its_shard_and_the_fix(tiny_shards, tmp_path, workers, header):
    import shutil

    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    key = damage(shards, header=header)
    loader = TorchLoader(shards, load_manifest(shards), "train", batch_size=8, img_size=32, workers=workers)
    with pytest.raises(DataError) as e:  # in a worker or not: one line, not the worker's traceback
        for _ in loader:
            pass
    # 65,500**2 px, over PIL's limit (twice its warning's 2**30 // 4 // 3)
    cause = (re.escape("DecompressionBombError: Image size (4290250000 pixels) exceeds limit of 178956970 pixels, "
                       "could be decompression bomb DOS attack.") if header else
             re.escape("UnidentifiedImageError: not an image Pillow can identify"))
    assert re.fullmatch(re.escape(f"{shards / 'train-000000.tar'}: the image {key} does not decode (") + cause
                        + re.escape("): the shard was damaged after packing (a copy cut short or changed?); copy it "
                                    "again, or delete it and re-run pack_shards.py with the same flags (it writes the "
                                    "missing shards again)."), str(e.value))
    if workers:  # the worker's error, raised again here, is in a reference cycle with its frames, which hold the
        # iterator: its worker would end in a later test's garbage collection, which closes its queues before the
        # iterator can send it its end, then waits 5 s for it (gc.collect() alone: 5.2 s). End it now.
        loader.loader._iterator._shutdown_workers()


def test_a_damaged_sample_keeps_its_own_line_when_a_dataloader_worker_re_raises_it():
    from torch.utils.data._utils import ExceptionWrapper

    from vitdeit.errors import DamagedSample

    try:
        raise DamagedSample("s/train-000000.tar: the image k does not decode (x)")
    except DamagedSample:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what torch sends to the main process
    with pytest.raises(DamagedSample) as e:
        wrapped.reraise()
    assert str(e.value) == "s/train-000000.tar: the image k does not decode (x)"


def test_a_transform_that_fails_on_an_image_that_decodes_keeps_its_own_error(tiny_shards, monkeypatch):
    def crop_box(self, w, h, rng):  # a bug in the transform, not a damaged image
        raise ZeroDivisionError("a bug in crop_box")

    monkeypatch.setattr(TrainTransform, "crop_box", crop_box)
    loader = TorchLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=8, img_size=32, workers=0)
    with pytest.raises(ZeroDivisionError, match="a bug in crop_box"):
        next(iter(loader))


@pytest.mark.parametrize("packed, warned", [(255, True), (256, False), (300, False), (None, False)])
def test_shards_packed_under_vals_shorter_side_and_only_those_are_warned_of(packed, warned):
    from vitdeit.data import upscale_warning

    # val at 224 px, crop_pct 0.875: shorter side floor(224 / 0.875) = 256 px, which 256 px shards give unscaled
    said = upscale_warning("S", {"options": {"resize_short": packed}}, 224, 0.875)
    assert said == ("S was packed with --resize-short 255, under the 256 px shorter side val resizes to (--img-size "
                    "224 / --crop-pct 0.875): images are upscaled. Repack with --resize-short 256 or more, or lower "
                    "--img-size." if warned else None)


def test_a_crop_spanning_a_whole_side_is_drawn_where_it_lands_not_centred():
    # a 100x200 image at scale 0.5 and ratio 1: every crop is 100x100, the image's whole height; torchvision's
    # RandomResizedCrop places it uniformly along the width (a centred fallback would put it at 50 every time)
    t = TrainTransform(24, scale=(0.5, 0.5), ratio=(1.0, 1.0))
    boxes = [t.crop_box(100, 200, random.Random(s)) for s in range(20)]
    assert all(b[0] == 0 and b[2:] == (100, 100) for b in boxes)
    assert len({b[1] for b in boxes}) > 5


@pytest.mark.parametrize("amp, device, half", [("auto", "cuda", True), ("fp16", "cuda", True), ("off", "cuda", False),
                                               ("auto", "cpu", False)])
def test_dali_gives_float16_images_only_on_a_gpu_where_autocast_runs_the_model_in_16_bits(monkeypatch, amp, device,
                                                                                          half):
    import sys
    import types

    from vitdeit import data
    from vitdeit.config import Config
    from vitdeit.distributed import Dist

    made = []
    monkeypatch.setitem(sys.modules, "vitdeit.data.dali_loader",
                        types.SimpleNamespace(DaliLoader=lambda *a, **k: made.append(k["half"]) or "dali"))
    monkeypatch.setattr(data, "dali_available", lambda: True)
    cfg = Config(data_path="/s", loader="dali", amp=amp)
    assert data.build_loader(cfg, {"splits": {"val": {"num_samples": 24}}}, "train",
                             Dist(device=torch.device(device))) == "dali"
    assert made == [half]


NO_DALI = """
import sys

class NoDali:  # as on macOS, Windows or an install without it: `import nvidia.dali` fails
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("no DALI here")

sys.meta_path.insert(0, NoDali())
import train
from vitdeit.data import dali_available

assert not dali_available()
sys.exit(train.main(sys.argv[1:]))
"""


def test_without_dali_train_py_runs_on_the_pytorch_loader_with_randaugment_and_repeated_aug(tiny_shards, tmp_path):
    """DALI is imported only when chosen: with it missing, a whole train.py run goes through (its exit status is the
    check), the settings DALI's pipeline also has (RandAugment, repeated augmentation) importing nothing of it."""
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run([sys.executable, "-c", NO_DALI, "--data-path", str(tiny_shards), "--output-dir", str(tmp_path),
                          "--model", "vit_tiny", "--img-size", "16", "--patch-size", "4", "--epochs", "1",
                          "--batch-size", "8", "--workers", "1", "--rand-augment", "rand-m9-mstd0.5-inc1",
                          "--repeated-aug", "2", "--progress", "false"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loader torch" in run.stdout and (tmp_path / "vit_tiny" / "best.pth").is_file()


def test_the_pytorch_loaders_randaugment_fills_its_warps_with_timms_imagenet_mean():
    from timm.data import create_transform

    warps = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    ours = TrainTransform(32, rand_augment="rand-m9-mstd0.5-inc1").aa.ops
    timms, = [t for t in create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1").transforms
              if hasattr(t, "ops")]  # (the DeiT reference's: timm's transform for this spec)
    fill = {op.name: op.kwargs["fillcolor"] for op in timms.ops if op.name in warps}
    assert fill == dict.fromkeys(warps, (124, 116, 104))  # ImageNet's mean in grey levels, not timm's default 128
    assert {op.name: op.kwargs["fillcolor"] for op in ours if op.name in warps} == fill
