"""timm's RandAugment in DALI (vitdeit/data/dali_augment.py), in DALI's CPU mode: each op against timm's PIL op at
the same argument, then the policy's draws (op choice, layer probability, magnitude noise, sign) counted."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

import timm.data.auto_augment as timm_aa  # noqa: E402
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from benchmarks.imageset import natural_like  # noqa: E402
from vitdeit.data import RA_FILL  # noqa: E402
from vitdeit.data.dali_augment import ARGUMENTS, STEPS, UNSCALED, RandAugmentSpec, dali_ops, rand_augment  # noqa: E402
from vitdeit.errors import SettingError  # noqa: E402

SIZE = 64
IMAGE = np.asarray(natural_like(np.random.default_rng(0)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))

# mean |DALI - timm| in grey levels at the same argument, inside a 1-px border (PIL's Sharpness leaves the border
# as it was), measured on IMAGE at magnitudes 3.3 and 9: exact for the
# lookup ops; ~0.6 for the enhancements (float rounding); rotate, shear 1.7 (bilinear only, one grey fill for
# timm's per-channel one), translate 3.2 (45 % of the crop is fill at m 9); Equalize 9.1 (OpenCV's formula, not
# PIL's). Each bound is under a third of what the op changes, so a wrong argument or sign fails.
TOLERANCE = {"Rotate": 2.5, "ShearX": 2.5, "ShearY": 2.5, "TranslateXRel": 4.5, "TranslateYRel": 4.5,
             "Equalize": 12.0, **{op: 0.0 for op in ("Posterize", "PosterizeIncreasing", "Solarize",
                                                       "SolarizeIncreasing", "SolarizeAdd", "Invert")}}


def run(graph, batch=1, images=(IMAGE,), conditionals=False, seed=0):
    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=seed, enable_conditionals=conditionals)
    def pipe():
        return graph(fn.external_source(source=lambda: [images[i % len(images)] for i in range(batch)], batch=True,
                                        layout="HWC"))

    p = pipe()
    p.build()
    return np.stack([np.array(x) for x in p.run()[0]])


def timm_op(name, magnitude, negate, monkeypatch):
    monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                           hparams={"img_mean": RA_FILL, "interpolation": Image.BILINEAR})
    return np.asarray(op(Image.fromarray(IMAGE))).astype(float)


@pytest.mark.parametrize("name", list(ARGUMENTS) + list(UNSCALED))
def test_each_op_matches_timms_at_the_same_magnitude_and_sign(name, monkeypatch):
    spec = RandAugmentSpec((name,), 1, 1.0, 9.0, 0.0, 10.0)
    (op,) = dali_ops(spec, SIZE)
    signed = name in ARGUMENTS and ARGUMENTS[name][1]
    for magnitude in (3.3, 9.0):
        for negate in (False, True) if signed else (False,):
            row = 2 * round(magnitude * STEPS) + negate
            dali = run(lambda x: op(x, types.Constant(np.int32(row))))[0].astype(float)
            timm = timm_op(name, magnitude, negate, monkeypatch)
            diff, change = np.abs(dali - timm)[1:-1, 1:-1].mean(), np.abs(timm - IMAGE)[1:-1, 1:-1].mean()
            assert diff <= TOLERANCE.get(name, 1.0) and diff < change / 3, (name, magnitude, negate, diff, change)
            if signed:  # and the other sign is far
                other = timm_op(name, magnitude, not negate, monkeypatch)
                assert np.abs(dali - other)[1:-1, 1:-1].mean() > 3 * diff + 1


@pytest.mark.parametrize("name", list(ARGUMENTS))
def test_the_argument_at_every_tabulated_magnitude_is_timms(name, monkeypatch):
    # ARGUMENTS (what dali_ops tabulates, before any unit change) against timm's level function at every 0.1 step of
    # magnitude up to mmax 15, both signs (its random sign fixed); the enhancement tables themselves: the next test
    argument, signed, _ = ARGUMENTS[name]
    enhancement = name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize"))
    for negate in (False, True) if signed else (False,):
        monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
        for level in np.arange(151) / STEPS:
            (timm,) = timm_aa.LEVEL_TO_ARG[name](level, {"translate_pct": 0.45})
            ours = (-1 if negate else 1) * argument(level)
            assert (max(0.1, 1 + ours) if enhancement else ours) == pytest.approx(timm, abs=1e-9), (level, negate)


@pytest.mark.parametrize("name", [op + inc for op in ("Color", "Contrast", "Brightness") for inc in ("", "Increasing")])
def test_the_enhancement_factors_tabulated_are_timms_up_to_mmax(name, monkeypatch):
    # mmax 15: BrightnessIncreasing's factor 1 - 1.5 * 0.9 would be negative, which timm keeps at 0.1
    (op,) = dali_ops(RandAugmentSpec((name,), 1, 1.0, 9.0, 0.0, 15.0), SIZE)
    assert op.table.shape == (2 * 151,)
    for negate in (False, True):  # the table's second row of a step: the negated argument (the same where unsigned)
        monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
        for step in range(151):
            (factor,) = timm_aa.LEVEL_TO_ARG[name](step / STEPS, {})
            assert op.table[2 * step + negate] == pytest.approx(factor, abs=1e-6), (step, negate)


@pytest.mark.parametrize("name", ["Sharpness", "SharpnessIncreasing"])
def test_the_sharpness_kernels_tabulated_are_pils_blend_at_timms_factor_up_to_mmax(name, monkeypatch):
    # PIL's Sharpness blends the image with its SMOOTH filter: (1 - f) * smooth + f * identity, as one 3x3 kernel;
    # mmax 15: SharpnessIncreasing's negated factor 1 - 1.5 * 0.9 is below 0, which timm keeps at 0.1
    smooth, identity = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13, np.pad([[1.0]], 1)
    (op,) = dali_ops(RandAugmentSpec((name,), 1, 1.0, 9.0, 0.0, 15.0), SIZE)
    assert op.table.shape == (2 * 151, 3, 3)
    for negate in (False, True):
        monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
        for step in range(151):
            (factor,) = timm_aa.LEVEL_TO_ARG[name](step / STEPS, {})
            assert op.table[2 * step + negate] == pytest.approx((1 - factor) * smooth + factor * identity,
                                                                abs=1e-6), (step, negate)


def test_the_warps_fill_with_the_grey_nearest_timms_per_channel_fill():
    # DALI's warps take one fill value for all channels: the grey with the least squared distance to timm's (124,
    # 116, 104) is 115; its red channel (124) would be 20 grey levels off in blue
    (op,) = dali_ops(RandAugmentSpec(("Rotate",), 1, 1.0, 9.0, 0.0, 10.0), SIZE)
    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    corner = run(lambda x: op(x, types.Constant(np.int32(2 * 90))), images=(black,))[0, 0, 0]  # uncovered by 27 deg
    assert len(set(corner.tolist())) == 1
    distance = lambda g: sum((g - c) ** 2 for c in RA_FILL)  # noqa: E731
    assert distance(int(corner[0])) == min(distance(g) for g in range(256))


def test_the_spec_is_read_by_timms_parser():
    assert RandAugmentSpec.parse("rand-m9-mstd0.5-inc1") == RandAugmentSpec(
        tuple(timm_aa._RAND_INCREASING_TRANSFORMS), 2, 0.5, 9.0, 0.5, 10.0)
    spec = RandAugmentSpec.parse("rand-n3-m12-mmax15-p0.7-mstd101")
    assert (spec.ops, spec.layers, spec.prob, spec.magnitude, spec.std, spec.max) == (
        tuple(timm_aa._RAND_TRANSFORMS), 3, 0.7, 12.0, float("inf"), 15.0)
    # weighted choice; timm's 3-Augment set (blur...): the -t section first, between others, or last
    for other_ops in ("rand-m9-tweights", "rand-m9-t3a", "rand-tweights-m9", "rand-t3a-m9-mstd0.5", "rand-n3-t3a-m9"):
        with pytest.raises(SettingError, match=r"other op sets and weights \(-t\.\.\.\).*--loader torch"):
            RandAugmentSpec.parse(other_ops)
    # what timm accepts and DALI's random ops would not: p > 1 (timm: always), uniform noise over [0, 0]
    assert RandAugmentSpec.parse("rand-m9-p1.5").prob == 1.0 and RandAugmentSpec.parse("rand-m0-mstd101").std == 0


GREY = np.full((8, 8, 3), 100, np.uint8)  # flat: every op's effect is one number per image


def policy(spec, batch=2000, seed=0):
    """The first pixel of each of `batch` flat grey images after rand_augment."""
    return run(lambda x: rand_augment(x, spec, 8), batch, (GREY,), conditionals=True, seed=seed)[:, 0, 0, 0]


def test_each_layer_applies_with_probability_p():
    out = policy(RandAugmentSpec(("Invert",), 1, 0.3, 5.0, 0.0, 10.0))
    assert set(out) == {100, 155} and 0.27 < (out == 155).mean() < 0.33  # binomial sd 0.01
    out = policy(RandAugmentSpec(("Invert",), 2, 0.3, 5.0, 0.0, 10.0))  # inverted once: 2 p (1 - p) = 0.42
    assert 0.39 < (out == 155).mean() < 0.45


def test_ops_are_chosen_uniformly_and_signs_are_random():
    # Invert: 155; SolarizeAdd at m 5 adds int(0.5 * 110) = 55 below 128: 155 too, so use Posterize (m 5: 2 bits
    # kept: 64); BrightnessIncreasing at m 5: 1 +- 0.45, 145 or 55
    spec = RandAugmentSpec(("Invert", "PosterizeIncreasing", "BrightnessIncreasing"), 1, 1.0, 5.0, 0.0, 10.0)
    out = policy(spec)
    shares = {v: (out == v).mean() for v in (155, 64, 145, 55)}
    assert set(out) == set(shares)
    assert all(0.3 < shares[v] < 0.37 for v in (155, 64)) and 0.3 < shares[145] + shares[55] < 0.37
    assert 0.4 < shares[145] / (shares[145] + shares[55]) < 0.6


@pytest.mark.parametrize("std", [0.0, 1.5, float("inf")])
def test_magnitudes_follow_timms_noise(std):
    # SolarizeAdd adds int(m / 10 * 110) to grey 100: the added amount tells each image's magnitude
    out = policy(RandAugmentSpec(("SolarizeAdd",), 1, 1.0, 6.0, std, 10.0)).astype(float) - 100
    rng = np.random.default_rng(0)  # timm's draws for as many images, cut to DALI's 0.1 step at or below
    m = (np.full(out.size, 6.0) if std == 0 else rng.uniform(0, 6, out.size) if np.isinf(std)
         else rng.normal(6.0, std, out.size))
    expected = np.floor(np.floor(np.clip(m, 0, 10) * STEPS) / STEPS / 10 * 110)
    if std == 0:
        assert set(out) == {66}
    else:
        assert abs(out.mean() - expected.mean()) < 1.5 and abs(out.std() - expected.std()) < 1.5
        assert out.min() >= 0 and out.max() <= 110


def test_magnitudes_are_clipped_to_mmax():
    out = policy(RandAugmentSpec(("SolarizeAdd",), 1, 1.0, 10.0, 3.0, 10.0)).astype(float) - 100
    assert out.max() == 110 and 0.4 < (out == 110).mean() < 0.6  # half of N(10, 3) lies above 10
    # Brightness (not the increasing one): factor m / 10 * 1.8 + 0.1 on grey 100; mmax 15 lets m 12 through (2.26)
    assert set(policy(RandAugmentSpec(("Brightness",), 1, 1.0, 12.0, 0.0, 15.0), batch=8)) == {226}
    assert set(policy(RandAugmentSpec(("Brightness",), 1, 1.0, 12.0, 0.0, 10.0), batch=8)) == {190}


def test_a_noisy_magnitude_takes_the_table_step_at_or_below_as_timms_int_truncates():
    # SolarizeAdd adds int(m / 10 * 110): 109 at m 9.96 in timm; the 0.1 step below, 9.9, adds 108 (rounding to
    # 10.0 would add 110, moving every threshold of timm's int()s by 0.05)
    assert set(policy(RandAugmentSpec(("SolarizeAdd",), 1, 1.0, 9.96, 0.001, 10.0), batch=64) - 100) == {108}


def test_a_noisy_magnitude_is_clipped_to_mmax_not_to_10():
    # Brightness at m 12.05 +- 0.001 under mmax 15: the 0.1 step at or below is 12.0, factor 12 / 10 * 1.8 + 0.1 =
    # 2.26 on grey 100 (clipped to 10: 1.9, 190)
    assert set(policy(RandAugmentSpec(("Brightness",), 1, 1.0, 12.05, 0.001, 15.0), batch=8)) == {226}


def test_posterize_past_magnitude_10_keeps_no_bits_as_the_pytorch_loaders_does():
    # PosterizeIncreasing keeps 4 - int(m / 10 * 4) bits: 0 at m 10, -1 at m 12.5 and -2 at m 15 under mmax 15,
    # which the PyTorch loader's posterize makes a black image; the AND mask here: 0 for each (4 bits at m 0, 2 at m 5)
    (op,) = dali_ops(RandAugmentSpec(("PosterizeIncreasing",), 1, 1.0, 9.0, 0.5, 15.0), SIZE)
    assert [int(op.table[2 * step]) for step in (0, 50, 100, 125, 150)] == [0xF0, 0xC0, 0, 0, 0]
