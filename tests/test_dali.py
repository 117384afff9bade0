"""The DALI loader in CPU mode (device_id=None): the same pipeline definition the GPU runs with `mixed`."""

import os
import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from test_loader import all_samples  # noqa: E402
from vitdeit.classes import load_manifest  # noqa: E402
from vitdeit.errors import DataError
from vitdeit.config import Config  # noqa: E402
from vitdeit.data import build_loader  # noqa: E402
from vitdeit.data.dali_loader import DaliLoader  # noqa: E402
from vitdeit.data.torch_loader import TorchLoader  # noqa: E402
from vitdeit.distributed import Dist  # noqa: E402
from vitdeit.trainer import train  # noqa: E402


def test_val_matches_the_pytorch_loader(tiny_shards):
    m = load_manifest(tiny_shards)
    dali = DaliLoader(tiny_shards, m, "val", batch_size=10, img_size=32, workers=1, with_keys=True)
    torch_ = TorchLoader(tiny_shards, m, "val", batch_size=10, img_size=32, workers=0)
    xd, yd, keys = zip(*dali)
    xt, yt = zip(*torch_)
    assert [k for batch in keys for k in batch] == [key for key, _, _ in all_samples(tiny_shards, "val")]
    assert torch.equal(torch.cat(yd), torch.cat(yt)) and {y.dtype for y in yd + yt} == {torch.int64}  # (the loss's)
    xd, xt = torch.cat(xd), torch.cat(xt)
    assert xd.shape == xt.shape == (24, 3, 32, 32) and xd.dtype == torch.float32
    # the same resized size and crop offset (torchvision's), two antialiased bilinear resamplers: measured 0.0029 in
    # std units (~0.17 grey levels; 1/255 is 0.017 here); 0.028 when DALI's crop sat a pixel off on odd margins
    assert (xd - xt).abs().mean() < 0.01


def test_a_train_crop_is_resized_antialiased_as_the_pytorch_loader_resizes_it(tmp_path):
    """Whole-image train crops (scale 1, ratio 1, square pictures) of grey noise, downscaled 8x: DALI's pixels are
    the PyTorch loader's, up to the flip. Measured: 0.011-0.012 std units from the same picture, 0.17 or more from
    any other; a resize without antialiasing (antialias=False) reads 0.18-0.20 from the same picture."""
    from PIL import Image

    from conftest import small_dataset
    from vitdeit.packing import PackOptions, pack

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=8, val_per_class=1)
    for i, f in enumerate(sorted(data.glob("train.X*/*/*.JPEG"))):  # 16 train pictures, 256 x 256, grey (no
        # chroma for the decoders' upsampling to tell apart): noise of 0-96 grey levels over 10 * i, which tells them
        noise = np.random.default_rng(i).integers(0, 97, (256, 256))
        Image.fromarray((10 * i + noise).astype(np.uint8)).convert("RGB").save(f, quality=95)
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    m = load_manifest(tmp_path / "s")
    kw = dict(batch_size=16, img_size=32, workers=1, seed=1, scale=(1.0, 1.0))
    xd = next(iter(DaliLoader(tmp_path / "s", m, "train", ratio=(1.0, 1.0), **kw)))[0]
    xt = next(iter(TorchLoader(tmp_path / "s", m, "train", **kw)))[0]  # (a square image's only crop at scale 1)
    # the same 16 pictures in other orders: each DALI image against every PyTorch one, either way round
    gaps = torch.stack([torch.minimum((xt - x).abs().mean((1, 2, 3)), (xt - x.flip(-1)).abs().mean((1, 2, 3)))
                        for x in xd])
    assert sorted(gaps.argmin(1).tolist()) == list(range(16))  # each DALI image nearest its own picture
    assert gaps.min(1).values.max() < 0.05  # std units


def test_a_train_epoch_is_the_same_whatever_the_decode_thread_count(tiny_shards):
    """Why a saved reader state leaves --workers out (a resume on another machine takes its own cores' share): DALI
    draws each sample's crop, flip and RandAugment ops from per-sample generators, not per thread."""
    m = load_manifest(tiny_shards)
    epochs = [list(DaliLoader(tiny_shards, m, "train", batch_size=8, img_size=24, workers=workers, seed=3,
                              with_keys=True, rand_augment="rand-m9-mstd0.5-inc1")) for workers in (1, 2)]
    assert len(epochs[0]) == len(epochs[1]) > 1
    for (x1, y1, k1), (x2, y2, k2) in zip(*epochs):
        assert k1 == k2 and torch.equal(y1, y2) and torch.equal(x1, x2)


def test_val_crops_imagenet_sized_images_where_torchvision_does(tmp_path):
    """500 x 375 and 375 x 500 JPEGs at 224 px: resized to 341 x 256 (a 58.5 px margin, torchvision rounds it to 58)
    or 256 x 341. A crop a pixel off differs by ~6 grey levels on these textured images (measured before the mend)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2 as T

    from benchmarks.imageset import make_imageset
    from conftest import LABELS
    from vitdeit.data import MEAN, STD
    from vitdeit.packing import PackOptions, pack

    data = make_imageset(tmp_path / "d", LABELS, n_train=4, n_val=12, num_classes=2, workers=1)
    shards = tmp_path / "s"
    pack(data, shards, opts=PackOptions(workers=1), progress=False)
    m = load_manifest(shards)
    xd, yd, keys = zip(*DaliLoader(shards, m, "val", batch_size=6, img_size=224, workers=1, with_keys=True))
    xt = torch.cat([x for x, _ in TorchLoader(shards, m, "val", batch_size=6, img_size=224, workers=0)])
    xd, keys = torch.cat(xd), [k for batch in keys for k in batch]
    grey = torch.tensor(STD).view(1, 3, 1, 1) * 255  # std units -> grey levels
    assert ((xd - xt).abs() * grey).mean() < 0.5  # measured 0.14 (two resamplers); 5.6 with the crop a pixel off
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])  # torchvision's eval transform, PIL's resize
    sizes = set()
    for x, key in zip(xd, keys):
        path = next(data.glob(f"val.X/*/{key}.JPEG"))
        sizes.add(Image.open(path).size)
        ref = torch.from_numpy(np.array(reference(Image.open(path).convert("RGB")))).permute(2, 0, 1).float()
        pixels = x * grey[0] + torch.tensor(MEAN).view(3, 1, 1) * 255
        assert (pixels - ref).abs().mean() < 0.5, key  # measured at most 0.17 (the PyTorch loader's: 0.00)
    assert sizes == {(500, 375), (375, 500)}  # an odd margin across, then down


def test_build_loader_hands_the_runs_val_crop_and_train_scale_to_dali(tiny_shards):
    m = load_manifest(tiny_shards)
    for split, field, values, kwarg in (("val", "crop_pct", (0.5, 0.875), "crop_pct"),
                                        ("train", "crop_scale_min", (0.5, 0.08), "scale")):
        direct = {v: next(iter(DaliLoader(tiny_shards, m, split, batch_size=8, img_size=32, workers=1,
                                          **{kwarg: v if kwarg == "crop_pct" else (v, 1.0)})))[0] for v in values}
        assert not torch.equal(*direct.values())  # the two settings give other pixels
        for v in values:
            cfg = Config(data_path=str(tiny_shards), loader="dali", workers=1, img_size=32, batch_size=8, **{field: v})
            assert torch.equal(next(iter(build_loader(cfg, m, split, Dist())))[0], direct[v])


def test_dali_resizes_with_the_chosen_filter_as_the_pytorch_loader_does(tiny_shards):
    m = load_manifest(tiny_shards)
    dali, torch_ = {}, {}
    for mode in ("bilinear", "bicubic"):
        dali[mode] = torch.cat([x for x, _ in DaliLoader(tiny_shards, m, "val", batch_size=24, img_size=32, workers=1,
                                                          interpolation=mode)])
        torch_[mode] = torch.cat([x for x, _ in TorchLoader(tiny_shards, m, "val", batch_size=24, img_size=32,
                                                             workers=0, interpolation=mode)])
    # the two loaders differ by ~0.003 (see above), the filters by ~0.012 on these smooth images; what each
    # loader's switch from bilinear to bicubic changes must agree: measured correlation 0.76, sizes 0.012 each
    dd, dt = (dali["bicubic"] - dali["bilinear"]).flatten(), (torch_["bicubic"] - torch_["bilinear"]).flatten()
    assert torch.corrcoef(torch.stack([dd, dt]))[0, 1] > 0.5
    assert 0.5 < dd.abs().mean() / dt.abs().mean() < 2
    # build_loader hands the run's filter on: its val batches are the ones just read with that filter
    for mode in ("bilinear", "bicubic"):
        cfg = Config(data_path=str(tiny_shards), loader="dali", workers=1, img_size=32, batch_size=24,
                     interpolation=mode)
        assert torch.equal(next(iter(build_loader(cfg, m, "val", Dist())))[0], dali[mode])
    # train: the same seed draws the same crops and flips, so only the filter tells the two batches apart (0.013)
    first = {mode: next(iter(DaliLoader(tiny_shards, m, "train", batch_size=16, img_size=24, workers=1,
                                        interpolation=mode)))[0] for mode in ("bilinear", "bicubic")}
    assert 0.002 < (first["bicubic"] - first["bilinear"]).abs().mean() < 0.05


def test_rand_augments_other_op_sets_are_refused_not_ignored(tiny_shards):
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError, match="PyTorch loader only; use --loader torch"):
        DaliLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=8, img_size=24, workers=1,
                   rand_augment="rand-m9-tweights")


@pytest.mark.parametrize("batch", [15, 16])  # 5 reads x 3 copies; 6 reads x 3, the last 2 copies trimmed
def test_repeated_aug_makes_copies_of_each_read_with_their_own_crops_and_keeps_the_epochs_steps(tiny_shards, batch):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=batch, img_size=24, workers=1, with_keys=True)
    loader = DaliLoader(tiny_shards, m, "train", repeats=3, **kw)
    assert len(loader) == len(DaliLoader(tiny_shards, m, "train", **kw)) == 96 // batch
    reads = -(-batch // 3)
    labels = {key: label for key, label, _ in all_samples(tiny_shards, "train")}
    stream = []
    for epoch in range(4):  # both batches cross the end of a pass: 16 reads of 6 a pass, 19 of 5 and a part
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y, keys in batches:
            assert x.shape == (batch, 3, 24, 24) and len(keys) == batch
            assert [labels[k] for k in keys] == y.tolist()  # each copy keeps its image's label
            for i in range(reads):  # copy k of read i at k * reads + i: same image, its own crop and flip
                at = list(range(i, batch, reads))
                assert len({keys[j] for j in at}) == 1 and len(at) == (3 if i < batch - 2 * reads else 2)
                assert all(not torch.equal(x[at[0]], x[j]) for j in at[1:])
            stream += keys[:reads]
    # the reads run on through the reader's pass over the epochs: a pass's full batches hold each image once
    per_pass = 96 // reads * reads
    assert len(stream) == 4 * len(loader) * reads and len(set(stream[:per_pass])) == per_pass
    # whole images (crop area 1, any aspect; DALI's crop may miss a pixel row): every copy of an image, in any
    # batch, is that image or its mirror; another image is ~0.5 away (std units)
    whole = DaliLoader(tiny_shards, m, "train", repeats=3, scale=(1.0, 1.0), ratio=(0.25, 4.0), **kw)
    seen, gaps = {}, []
    for x, _, keys in [b for _ in range(2) for b in whole]:
        for image, key in zip(x, keys):
            first = seen.setdefault(key, image)
            gaps.append(min((image - first).abs().mean(), (image - first.flip(-1)).abs().mean()))
    others = [(a - b).abs().mean() for a, b in zip(list(seen.values())[:-1], list(seen.values())[1:])]
    assert max(gaps) < 0.1 < min(others), (max(gaps), min(others))
    cfg = Config(data_path=str(tiny_shards), loader="dali", workers=1, img_size=24, patch_size=8, batch_size=batch,
                 repeated_aug=3)  # build_loader hands it on
    assert build_loader(cfg, m, "train", Dist()).copies == 3 and build_loader(cfg, m, "val", Dist()).copies == 1


def test_rand_augment_runs_in_the_train_pipeline_seeded_and_not_in_val(tiny_shards):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=16, img_size=24, workers=1, seed=2)
    spec = "rand-m9-mstd0.5-inc1"
    plain, ra, again = (list(DaliLoader(tiny_shards, m, "train", rand_augment=r, **kw)) for r in ("", spec, spec))
    assert all(torch.equal(y, y2) for (_, y), (_, y2) in zip(plain, ra))  # the same samples...
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(ra, again))  # ...augmented the same way every run
    changed = (torch.cat([x for x, _ in plain]) - torch.cat([x for x, _ in ra])).abs().flatten(1).amax(1) > 0.1
    assert changed.float().mean() > 0.5
    val = [list(DaliLoader(tiny_shards, m, "val", rand_augment=r, **kw)) for r in ("", spec)]
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(*val))  # val is never augmented
    cfg = Config(data_path=str(tiny_shards), loader="dali", workers=1, img_size=24, patch_size=8, batch_size=16, seed=2,
                 rand_augment=spec)  # build_loader hands the spec on
    assert torch.equal(next(iter(build_loader(cfg, m, "train", Dist())))[0], ra[0][0])


@pytest.mark.parametrize("world,batch", [(1, 10), (3, 5), (5, 4), (3, 4), (5, 5)])  # 24 images: 5 ranks hold 4 or 5
def test_val_counts_each_image_once_across_ranks_every_epoch(tiny_shards, world, batch):
    m = load_manifest(tiny_shards)
    loaders = [DaliLoader(tiny_shards, m, "val", batch_size=batch, img_size=32, rank=rank, world=world, workers=1,
                          with_keys=True) for rank in range(world)]
    for epoch in range(3):  # (3, 4) and (5, 5): a slice that divides into batches, where DALI moved ranks on a slice
        keys = []
        for loader in loaders:
            ks = [k for _, _, b in loader for k in b]
            assert len(ks) == loader.num_samples  # DALI's padding removed
            keys += ks
        assert sorted(keys) == sorted(key for key, _, _ in all_samples(tiny_shards, "val")), epoch


def test_train_epoch_across_ranks_draws_every_sample_once(tiny_shards):
    m = load_manifest(tiny_shards)  # 96 train samples: 3 ranks x 4 steps x 8 leaves nothing undrawn
    keys, steps = [], set()
    for rank in range(3):
        loader = DaliLoader(tiny_shards, m, "train", batch_size=8, img_size=24, rank=rank, world=3, workers=1,
                            with_keys=True)
        batches = list(loader)
        steps.add(len(batches))
        x, y, _ = batches[0]
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        keys += [k for _, _, b in batches for k in b]
    assert steps == {4} and sorted(keys) == sorted(key for key, _, _ in all_samples(tiny_shards, "train"))


@pytest.mark.parametrize("world,batch", [(1, 10), (2, 10), (3, 7), (5, 19), (5, 4)])
def test_every_epoch_is_one_pass_no_sample_twice(tiny_shards, world, batch):
    # 96 samples leave a remainder on every rank (6, 8, 4; with 5 ranks one slice holds 20, the others 19, one
    # batch): it is dropped, not carried into the next epoch, where it would make that epoch span two
    # independently shuffled passes and draw some samples twice; every rank takes as many whole batches as the
    # smallest slice holds (5 ranks, batches of 4: 19 // 4 = 4, not the largest slice's 20 // 4 = 5)
    m = load_manifest(tiny_shards)
    loaders = [DaliLoader(tiny_shards, m, "train", batch_size=batch, img_size=16, rank=r, world=world, workers=1,
                          with_keys=True) for r in range(world)]
    steps = 96 // world // batch
    per_epoch = world * steps * batch
    assert [len(loader) for loader in loaders] == [steps] * world
    for _ in range(5):
        batches = [b for loader in loaders for _, _, b in loader]
        keys = [k for b in batches for k in b]
        assert len(keys) == len(set(keys)) == per_epoch and {len(b) for b in batches} == {batch}


def test_one_train_tar_for_several_ranks_is_a_warning_naming_the_repack(tiny_data, tiny_shards, tmp_path):
    from vitdeit.packing import PackOptions, pack

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 tars for 5 ranks: each rank's slice still changes every epoch
        DaliLoader(tiny_shards, load_manifest(tiny_shards), "train", batch_size=4, img_size=16, world=5, workers=1)
    pack(tiny_data, tmp_path / "one", opts=PackOptions(workers=1), progress=False)  # 96 samples, one tar
    said = f"python pack_shards.py --data-path {tiny_data.resolve()} --out {tmp_path / 'one'} --shard-size 12 (with "
    with pytest.warns(UserWarning, match=re.escape(said + "the --labels and options its manifest.json records)")):
        DaliLoader(tmp_path / "one", load_manifest(tmp_path / "one"), "train", batch_size=4, img_size=16, world=2,
                   workers=1)
    manifest = {k: v for k, v in load_manifest(tmp_path / "one").items() if k != "source"}  # one that names none
    with pytest.warns(UserWarning, match=re.escape("python pack_shards.py --data-path DATASET_DIR --out ")):
        DaliLoader(tmp_path / "one", manifest, "train", batch_size=4, img_size=16, world=2, workers=1)


def state_after_a_batch(shards, manifest, **kw) -> dict:
    """The train loader's state() after its first batch: what a checkpoint saved mid-pass holds."""
    first = DaliLoader(shards, manifest, "train", **kw)
    next(iter(first))
    return first.state()


def test_a_state_of_the_earlier_fixed_size_epochs_is_not_restored(tiny_shards):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1)
    old = state_after_a_batch(tiny_shards, m, **kw)
    del old["settings"]["epoch"]  # what an earlier version saved; its iterator state lacks what this one reads
    again = DaliLoader(tiny_shards, m, "train", state=old, **kw)
    assert not again.restored and len(list(again)) == len(again)


EARLIER = "a DALI reader state of an earlier vitdeit, which this one does not restore"


@pytest.mark.parametrize("change, said", [
    ({}, None),  # it fits: restored
    ({"batch_size": 4}, "a DALI reader state saved with another --batch-size"),
    ({"world": 1}, "a DALI reader state saved with another process count"),
    ({"seed": 7, "img_size": 16}, "a DALI reader state saved with another --img-size and another --seed"),
    ({"pack": "0123", "gpu": True, "rand_augment": "rand-m9"},
     "a DALI reader state saved with other shards, another kind of device (GPU or CPU) and another "
     "--rand-augment"),
    ({"pack": None, "shards": [["train-000000.tar", 96, 1]]}, "a DALI reader state saved with other shards"),  # 12-02
    ({"epoch": None}, EARLIER),  # of the fixed-size epochs before 2026-12-02
    ({"pack": None, "epoch": None, "shards": [["train-000000.tar", 96, 1]]}, EARLIER),  # the same, keyed by its tars
    ("reader bytes", EARLIER),  # bare, older still
    (None, None)])  # none: a PyTorch-loader run's (the trainer says "no DALI reader state")
def test_a_train_loader_says_why_a_saved_state_was_not_restored(tiny_shards, change, said):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1, world=2)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    if isinstance(change, dict):
        settings = {k: v for k, v in {**saved["settings"], **change}.items() if v is not None}
        saved = {**saved, "settings": settings}
    else:
        saved = change if change is None else change.encode()
    loader = DaliLoader(tiny_shards, m, "train", state=saved, **kw)
    assert (loader.restored, loader.not_restored) == (change == {}, said)
    assert DaliLoader(tiny_shards, m, "val", **kw).not_restored is None  # (val: never a state)


def test_a_saved_setting_this_loader_lacks_does_not_fit_even_when_it_is_none(tiny_shards):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    saved = {**saved, "settings": {**saved["settings"], "rand_augment": None}}  # a key this loader's settings lack
    loader = DaliLoader(tiny_shards, m, "train", state=saved, **kw)
    assert (loader.restored, loader.not_restored) == (False, "a DALI reader state saved with another --rand-augment")


@pytest.mark.parametrize("rand_augment, repeats, batch, world, saved_after", [
    ("", 1, 8, 2, 1), ("rand-m9-mstd0.5-inc1", 1, 8, 2, 1),
    ("", 3, 8, 2, 1),  # an epoch reads a third of the rank's slice: saved in the middle of a reader pass
    ("", 3, 15, 1, 1),  # 19 full batches of 5 reads and a partial one a pass: the restored stream must drop it
    ("", 3, 12, 1, 3),  # 3 epochs of 8 steps of 4 reads: saved exactly where a pass ends
])
def test_a_restored_train_loader_continues_exactly_where_the_saved_one_was(tiny_shards, rand_augment, repeats, batch,
                                                                           world, saved_after):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=batch, img_size=24, rank=world - 1, world=world, workers=2, seed=3, with_keys=True,
              rand_augment=rand_augment, repeats=repeats)

    def epoch(loader):
        batches = list(loader)
        return [k for _, _, b in batches for k in b], torch.cat([x for x, _, _ in batches])

    first = DaliLoader(tiny_shards, m, "train", **kw)
    for _ in range(saved_after):
        epoch(first)
    saved = first.state()
    e1, e2 = epoch(first), epoch(first)
    restored = DaliLoader(tiny_shards, m, "train", state=saved, **kw)
    assert restored.restored
    r1, r2 = epoch(restored), epoch(restored)
    assert e1[0] != e2[0]  # a new order every epoch...
    assert r1[0] == e1[0] and r2[0] == e2[0]  # ...and the restored loader draws the same samples
    assert torch.equal(r1[1], e1[1]) and torch.equal(r2[1], e2[1])  # with the same crops and flips


def _reserved_mb() -> int:
    """This process's private data mappings (VmData), MB: what fork copies and overcommit accounting charges."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmData")).split()[1]) // 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_loader_and_one_restored_mid_pass_reserve_the_shards_sample_size_not_a_megabyte_per_buffered_sample(
        tiny_shards):
    """DALI reserves tensor_init_bytes (1 MB by default) for each tensor of a sample it reads ahead: +4.1 GB of
    VmData for a train loader here, and restoring a checkpoint taken mid-pass does so for all 4096 slots of the
    shuffle buffer at once (VmData and Committed_AS +12.4 GB), which made forking the suite's later workers fail
    with ENOMEM in CI. The loader reserves the shards' mean sample size instead."""
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, rank=0, world=1, workers=2, seed=3, repeats=3)  # a third of a pass an epoch
    before = _reserved_mb()
    first = DaliLoader(tiny_shards, m, "train", **kw)
    list(first)
    assert _reserved_mb() - before < 1024  # measured: +45 MB with the shards' mean; +4.1 GB with DALI's default
    before = _reserved_mb()
    restored = DaliLoader(tiny_shards, m, "train", state=first.state(), **kw)
    assert restored.restored and len(list(restored)) == len(first)
    assert _reserved_mb() - before < 1024  # measured: +80 MB with the shards' mean; +12.4 GB with DALI's default


@pytest.mark.parametrize("how", [dict(executor="legacy"), dict(prefetch=1), dict(prefetch=4)])
def test_the_executor_and_prefetch_depth_change_neither_the_batches_nor_where_a_saved_state_goes_on(tiny_shards, how):
    """--dali-executor legacy and --dali-prefetch change how DALI runs and hands batches over, not what it draws: the
    same samples, crops and flips, and a run saved with the defaults resumes with either, and the other way round."""
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, rank=1, world=2, workers=2, seed=3, with_keys=True)

    def epoch(loader):
        batches = list(loader)
        return [k for _, _, b in batches for k in b], torch.cat([x for x, _, _ in batches])

    default, other = DaliLoader(tiny_shards, m, "train", **kw), DaliLoader(tiny_shards, m, "train", **how, **kw)
    assert default.pipe.exec_dynamic and other.pipe.exec_dynamic == (how.get("executor", "dynamic") == "dynamic")
    assert (default.pipe.prefetch_queue_depth, other.pipe.prefetch_queue_depth) == (2, how.get("prefetch", 2))
    assert other.decoded_ahead == how.get("prefetch", 2)  # what the benchmark's windows skip
    d1, o1 = epoch(default), epoch(other)
    assert d1[0] == o1[0] and torch.equal(d1[1], o1[1])
    next(iter(default))  # saved a batch into an epoch: the prefetched batches after it are not the state's
    saved = default.state()
    d2 = epoch(default)
    restored = DaliLoader(tiny_shards, m, "train", state=saved, **how, **kw)
    assert restored.restored
    r2 = epoch(restored)
    assert r2[0] == d2[0] != d1[0] and torch.equal(r2[1], d2[1])
    next(iter(other))  # and saved with the other setting, a batch into its second epoch, resumed with the defaults
    back = DaliLoader(tiny_shards, m, "train", state=other.state(), **kw)
    assert back.restored
    b2, o2 = epoch(back), epoch(other)
    assert b2[0] == o2[0] == d2[0] and torch.equal(b2[1], o2[1])


@pytest.mark.parametrize("change", [dict(seed=4), dict(world=3), dict(rank=0), dict(batch_size=4), dict(img_size=32),
                                    dict(rand_augment="rand-m9-mstd0.5-inc1"), dict(repeats=3),
                                    dict(scale=(0.5, 1.0)), dict(ratio=(0.5, 2.0))])
def test_a_state_saved_with_other_settings_is_not_restored(tiny_shards, change):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, rank=1, world=2, workers=1, seed=3)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    other = DaliLoader(tiny_shards, m, "train", state=saved, **{**kw, **change})
    assert not other.restored and len(list(other)) == len(other)  # a fresh stream, whole epochs


def test_a_state_saved_by_a_gpu_pipeline_is_not_restored_on_the_cpu(tiny_shards):
    # a GPU pipeline has other operators (the "mixed" decoder, the labels copied to the GPU): its checkpoint is not this
    # pipeline's to load
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1, seed=3)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    assert saved["settings"]["gpu"] is False  # the state says where its pipeline ran
    assert DaliLoader(tiny_shards, m, "train", state=saved, **kw).restored  # (as saved: restored)
    on_gpu = {**saved, "settings": {**saved["settings"], "gpu": True}}
    other = DaliLoader(tiny_shards, m, "train", state=on_gpu, **kw)
    assert not other.restored and len(list(other)) == len(other)


def test_a_state_saved_on_other_shards_of_the_same_images_is_not_restored(tiny_data, tiny_shards, tmp_path):
    from vitdeit.packing import PackOptions, pack

    kw = dict(batch_size=8, img_size=24, workers=1, seed=3)
    saved = state_after_a_batch(tiny_shards, load_manifest(tiny_shards), **kw)  # tars of 24 samples
    m = pack(tiny_data, tmp_path / "s", opts=PackOptions(shard_size=20, workers=1), progress=False)  # repacked
    other = DaliLoader(tmp_path / "s", m, "train", state=saved, **kw)
    assert not other.restored and len(list(other)) == len(other)
    again = DaliLoader(tiny_shards, load_manifest(tiny_shards), "train", state=saved, **kw)
    assert again.restored  # (the same shards: restored)


def test_a_state_saved_on_an_earlier_packers_manifest_of_these_shards_is_restored(tiny_shards):
    from vitdeit.classes import LATER_OPTIONS

    kw = dict(batch_size=8, img_size=24, workers=1, seed=3)
    m = load_manifest(tiny_shards)
    assert LATER_OPTIONS.items() <= m["options"].items()  # this packer's manifest has them
    earlier = {**m, "options": {k: v for k, v in m["options"].items() if k not in LATER_OPTIONS}}
    saved = state_after_a_batch(tiny_shards, earlier, **kw)  # a run on the shards as an earlier packer described them
    assert DaliLoader(tiny_shards, m, "train", state=saved, **kw).restored  # packed again since, unchanged


def test_a_state_saved_before_packs_were_fingerprinted_is_restored_where_its_shard_list_is_these_shards(tiny_shards):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1, seed=3)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    rows = [[s["file"], s["num_samples"], s["bytes"]] for s in m["splits"]["train"]["shards"]]
    settings = {k: v for k, v in saved["settings"].items() if k != "pack"}
    for old in ({**settings, "shards": rows},  # 2026-12-02 to -05's: the shard list in place of the pack's fingerprint
                {**saved["settings"], "shards": rows}):  # 2026-12-05's, for an hour: both
        assert DaliLoader(tiny_shards, m, "train", state={**saved, "settings": old}, **kw).restored
    reseeded = {**saved["settings"], "shards": rows, "pack": "another seed's"}  # the same tars' names and sizes
    assert not DaliLoader(tiny_shards, m, "train", state={**saved, "settings": reseeded}, **kw).restored
    moved = [[rows[0][0], rows[0][1], rows[0][2] + 512], *rows[1:]]  # a tar of another size: other shards
    other = DaliLoader(tiny_shards, m, "train", state={**saved, "settings": {**settings, "shards": moved}}, **kw)
    assert not other.restored and len(list(other)) == len(other)


def test_a_bare_reader_checkpoint_of_an_earlier_version_is_not_restored(tiny_shards):
    m = load_manifest(tiny_shards)
    kw = dict(batch_size=8, img_size=24, workers=1)
    saved = state_after_a_batch(tiny_shards, m, **kw)
    old = DaliLoader(tiny_shards, m, "train", state=saved["checkpoint"], **kw)  # bytes, no settings
    assert not old.restored and len(list(old)) == len(old)


@pytest.mark.filterwarnings("ignore:.*train shard")  # one tar for two ranks: this test is about augmentation
def test_each_rank_draws_its_own_crops_and_flips(tmp_path):
    from conftest import small_dataset
    from vitdeit.packing import PackOptions, pack

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=16, val_per_class=2)
    train_files = sorted(data.glob("train.X*/*/*.JPEG"))
    for f in train_files[1:]:  # every train image the same picture: only the augmentation can tell them apart
        f.write_bytes(train_files[0].read_bytes())
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    m = load_manifest(tmp_path / "s")
    first = [next(iter(DaliLoader(tmp_path / "s", m, "train", batch_size=8, img_size=24, rank=r, world=2,
                                  workers=1, seed=5)))[0] for r in (0, 1)]
    assert not torch.equal(first[0], first[1])


def test_train_flips_about_half_the_images_left_to_right_and_nothing_else_when_the_crop_is_the_whole_image(
        tmp_path):
    from PIL import Image

    from conftest import small_dataset
    from vitdeit.packing import PackOptions, pack

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=8, val_per_class=2)
    picture = np.zeros((32, 32, 3), np.uint8)  # square: a crop of area 1 and aspect 1 is the whole picture
    picture[:, :, 0], picture[:, :16, 1] = np.arange(32)[None, :] * 8, 200  # left and right differ
    for f in data.glob("train.X*/*/*.JPEG"):
        Image.fromarray(picture).save(f, quality=95)
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    x = next(iter(DaliLoader(tmp_path / "s", load_manifest(tmp_path / "s"), "train", batch_size=16, img_size=24,
                             workers=1, seed=5, scale=(1.0, 1.0), ratio=(1.0, 1.0))))[0]
    same = [torch.equal(i, x[0]) for i in x]
    mirrored = [torch.equal(i, x[0].flip(-1)) for i in x]
    assert all(a != b for a, b in zip(same, mirrored))  # each image the picture or its mirror image
    assert 4 <= sum(mirrored) <= 12  # a coin per image (16 draws: 8 with this seed)


def test_labels_come_from_the_shards(tiny_shards):
    m = load_manifest(tiny_shards)
    truth = {key: label for key, label, _ in all_samples(tiny_shards, "train")}
    loader = DaliLoader(tiny_shards, m, "train", batch_size=16, img_size=24, workers=1, with_keys=True)
    batches = list(loader)
    assert len(batches) == 96 // 16
    for _, y, keys in batches:
        assert y.tolist() == [truth[k] for k in keys]


def test_missing_index_file_says_how_to_make_it(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(tiny_shards, copy)
    (copy / "train-000001.idx").unlink()
    with pytest.raises(DataError, match="re-run pack_shards.py"):
        DaliLoader(copy, load_manifest(copy), "train", batch_size=8, img_size=24, workers=1)


def test_train_py_with_the_dali_loader_learns_on_cpu(learn_shards, tmp_path):
    cfg = Config(data_path=str(learn_shards), output_dir=str(tmp_path), model="resnet18", loader="dali",
                 epochs=3, lr=0.005, img_size=32, batch_size=32, workers=1, progress=False, warmup_epochs=0.5,
                 crop_scale_min=0.5)
    last = train(cfg)
    assert last["val_top1"] > 50 and last["val_samples"] == 120  # chance: 25 %
    assert torch.load(tmp_path / "resnet18" / "last.pth", weights_only=True)["loader"] == "dali"


def test_half_precision_output_when_asked(tiny_shards):
    m = load_manifest(tiny_shards)
    x, _ = next(iter(DaliLoader(tiny_shards, m, "val", batch_size=8, img_size=24, workers=1, half=True)))
    full, _ = next(iter(DaliLoader(tiny_shards, m, "val", batch_size=8, img_size=24, workers=1, half=False)))
    assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    assert full.dtype == torch.float32 and torch.equal(x, full.half())  # the same pixels, rounded to float16


@pytest.mark.parametrize("device, amp, half", [("cuda", "auto", True), ("cuda", "bf16", True), ("cuda", "fp16", True),
                                               ("cuda", "off", False), ("cpu", "auto", False), ("cpu", "bf16", False)])
def test_build_loader_asks_dali_for_16_bit_images_only_where_autocast_runs_16_bit_on_a_gpu(tiny_shards, monkeypatch,
                                                                                          device, amp, half):
    """--amp off on a GPU: the model runs in float32 and a float16 batch would not fit its weights' dtype."""
    from vitdeit.data import dali_loader

    made = []
    monkeypatch.setattr(dali_loader, "DaliLoader", lambda *a, **k: made.append(k) or k)  # builds nothing: no GPU here
    cfg = Config(data_path=str(tiny_shards), loader="dali", workers=1, img_size=32, batch_size=8, amp=amp,
                 dali_executor="legacy", dali_prefetch=3)
    for split in ("train", "val"):
        build_loader(cfg, load_manifest(tiny_shards), split, Dist(device=torch.device(device)))
    assert [k["half"] for k in made] == [half, half]
    assert [k["executor"] for k in made] == ["legacy", "legacy"]  # --dali-executor reaches both
    assert [k["prefetch"] for k in made] == [3, 3]  # and --dali-prefetch


@pytest.mark.filterwarnings("ignore:.*train shard")
def test_each_ranks_train_slice_holds_other_samples_every_epoch_in_an_order_that_follows_the_seed(tiny_shards):
    """The tar order is reshuffled every epoch, the same on every rank and by --seed: a rank's slice of the samples
    changes, not only their order within it, and another seed deals other slices."""
    m = load_manifest(tiny_shards)  # 4 tars of 24 samples: a rank's slice spans some of them

    def slices(seed):  # per epoch, each rank's set of samples
        loaders = [DaliLoader(tiny_shards, m, "train", batch_size=8, img_size=16, rank=r, world=2, workers=1,
                              seed=seed, with_keys=True) for r in range(2)]
        return [[frozenset(k for _, _, b in loader for k in b) for loader in loaders] for _ in range(4)]

    three, four = slices(3), slices(4)
    for ranks in three + four:
        assert not ranks[0] & ranks[1]  # disjoint in every epoch
    assert len({ranks[0] for ranks in three}) > 1  # rank 0's set is not always the same
    assert [ranks[0] for ranks in three] != [ranks[0] for ranks in four]  # and the tar orders follow --seed


def test_train_reads_through_a_shuffle_buffer_not_each_tar_in_its_order(tiny_shards):
    from vitdeit.data import shard_paths
    from vitdeit.data.index import read_index

    m = load_manifest(tiny_shards)  # 4 tars of 24 samples
    where = {key: (tar, i) for tar, (_, idx, _) in enumerate(shard_paths(tiny_shards, m, "train"))
             for i, (key, _) in enumerate(read_index(idx))}  # each sample's tar and place in it
    loader = DaliLoader(tiny_shards, m, "train", batch_size=8, img_size=16, workers=1, seed=3, with_keys=True)
    for epoch in range(2):
        loader.set_epoch(epoch)
        drawn = [where[k] for _, _, keys in loader for k in keys]
        in_tar_order = sum(b == (a[0], a[1] + 1) for a, b in zip(drawn, drawn[1:]))
        assert len(drawn) == 96 and in_tar_order < 96 // 4  # without the buffer: 92 of the 95 pairs (1 with it)


def test_val_with_fewer_images_than_ranks_goes_to_the_pytorch_loader_which_gives_the_empty_ranks_nothing(tiny_shards):
    m = load_manifest(tiny_shards)  # 24 val images
    cfg = Config(data_path=str(tiny_shards), loader="dali", workers=0, img_size=32, batch_size=8)
    assert isinstance(build_loader(cfg, m, "val", Dist(rank=0, world=24)), DaliLoader)  # one image a rank
    for rank, n in ((0, 1), (24, 0)):  # rank 24 of 25: DALI would need a sample for it
        loader = build_loader(cfg, m, "val", Dist(rank=rank, world=25))
        assert isinstance(loader, TorchLoader) and sum(len(y) for _, y in loader) == n
    assert isinstance(build_loader(cfg, m, "train", Dist(rank=0, world=2)), DaliLoader)  # train: as asked


@pytest.mark.parametrize("header", [False, True])
def test_an_image_damaged_after_packing_is_one_error_with_the_fix_not_dalis_traceback(tiny_shards, tmp_path, header):
    import shutil

    from test_loader import damage

    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    key = damage(shards, header=header)  # header: 65,500 px square, past what its CPU decoders accept
    with pytest.raises(DataError) as e:  # DALI decodes ahead as the iterator is made: the error may come then
        for _ in DaliLoader(shards, load_manifest(shards), "train", batch_size=8, img_size=32, workers=1):
            pass
    tar = shards / "train-000000.tar"
    assert str(e.value).startswith(f"{tar}: the image {key} does not decode (DALI: Failed to decode sample #" if header
                                   else f"an image of the shards in {shards} (train) does not decode (DALI: ")
    assert str(e.value).endswith((f"{key}.jpg)" if header else "; --loader torch names the shard and image)")
                                 + ": the shard was damaged after packing (a copy cut short or changed?); copy it "
                                 "again, or delete it and re-run pack_shards.py with the same flags (it writes the "
                                 "missing shards again).")
    assert "\n" not in str(e.value)


def test_a_label_that_is_no_class_is_one_error_on_the_cpu(tiny_shards, tmp_path):
    import shutil

    from test_loader import relabel

    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    relabel(shards, 4)  # 4 classes: 0-3
    with pytest.raises(DataError) as e:
        for _ in DaliLoader(shards, load_manifest(shards), "train", batch_size=8, img_size=32, workers=1):
            pass
    assert str(e.value) == (f"an image of the shards in {shards} (train) has label 4 (not one of the manifest's 4 "
                            f"classes, 0-3; --loader torch names the shard and image): the shard was damaged after "
                            f"packing (a copy cut short or changed?); copy it again, or delete it and re-run "
                            f"pack_shards.py with the same flags (it writes the missing shards again).")


def test_dalis_failed_sample_message_names_the_shard_and_image():
    from types import SimpleNamespace

    # the other form of DALI's decoder error (image_decoder.h: the sample's source info, tar:offset:name)
    text = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image_random_crop`,\n"
            "encountered:\n\nFailed to decode sample #4 : /d/s/train-000003.tar:331776:n01930112_13.jpg\n"
            "Current pipeline object is no longer valid.")
    with pytest.raises(DataError) as e:
        with DaliLoader.decode_errors(SimpleNamespace(where="/d/s (train)")):
            raise RuntimeError(text)
    assert str(e.value).startswith("/d/s/train-000003.tar: the image n01930112_13 does not decode (DALI: Failed to "
                                   "decode sample #4 : /d/s/train-000003.tar:331776:n01930112_13.jpg): the shard")
    with pytest.raises(DataError, match=r"^an image of the shards in /d/s \(train\) does not decode \(DALI: "
                                        r"nvImageCodec failure: '#3'; --loader torch names the shard and image\)"):
        with DaliLoader.decode_errors(SimpleNamespace(where="/d/s (train)")):
            raise RuntimeError(text.replace("Failed to decode sample #4 : /d/s/train-000003.tar:331776:"
                                            "n01930112_13.jpg", "nvImageCodec failure: '#3'"))
    for other in ("Critical error in pipeline: CUDA out of memory",  # DALI's other errors keep their own traceback
                  text.replace("Failed to decode sample #4 : /d/s/train-000003.tar:331776:n01930112_13.jpg",
                               "nvImageCodec failure: '#5'"),  # the decoder's allocator failing: not the shard's
                  text.replace("Current pipeline", "Can't allocate 1073741824 bytes on device 0.\nCurrent pipeline")):
        with pytest.raises(RuntimeError, match="CUDA out of memory|failure: '#5'|Can't allocate"):
            with DaliLoader.decode_errors(SimpleNamespace(where="/d/s (train)")):
                raise RuntimeError(other)


@pytest.mark.parametrize("long_side, wrong", [(39, "truncated"), (37, "rounded half up")])
def test_val_centre_crop_rounds_a_half_pixel_margin_to_even_as_torchvisions_centercrop(tmp_path, long_side, wrong):
    """The 36 px shorter side kept (--img-size 32 at crop_pct 0.875: no resize), a long side of 39 or 37 px leaves
    a 7 or 5 px margin, whose half, 3.5 or 2.5, torchvision's CenterCrop rounds half to even: to 4 and 2. Truncating
    gives 3 for the first, rounding half up (DALI's own crop_pos=0.5) 3 for the second. Noise pictures: a pixel off
    is ~80 grey levels."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    from conftest import small_dataset
    from vitdeit.data import MEAN, STD
    from vitdeit.packing import PackOptions, pack

    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    rng = np.random.default_rng(0)
    pictures = {}
    for f, (w, h) in zip(sorted(data.glob("val.X/*/*.JPEG")), [(long_side, 36), (36, long_side)]):  # across, down
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f, quality=100, subsampling=0)
        pictures[f.stem] = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float()
    pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    (x,), _, (keys,) = zip(*DaliLoader(tmp_path / "s", load_manifest(tmp_path / "s"), "val", batch_size=2,
                                       img_size=32, workers=1, with_keys=True))
    pixels = x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    assert sorted(keys) == sorted(pictures)
    for got, key in zip(pixels, keys):
        picture = pictures[key]
        assert (got - T.CenterCrop(32)(picture)).abs().mean() < 0.5, key
        across = picture.shape[2] > picture.shape[1]
        off = picture[:, 2:34, 3:35] if across else picture[:, 3:35, 2:34]  # the long side's offset 3: wrongly rounded
        assert (got - off).abs().mean() > 20, (key, wrong)
