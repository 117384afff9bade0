"""timm's RandAugment in a DALI pipeline: the policy `--rand-augment SPEC` builds in the PyTorch loader (timm's
parser reads the spec), run with DALI's automatic-augmentation operations, on the GPU with the rest of the pipeline.

timm applies N layers to each train crop; each layer picks one of its ops uniformly (with replacement), applies it
with probability p (0.5), at a magnitude drawn per call from N(m, mstd) clipped to [0, mmax] (mstd > 100: uniform
in [0, m]), and a random sign where the op has one. Here each op's argument comes from a table over magnitude
steps of 0.1 (DALI picks arguments from tables; timm computes them from the float), filled by the same formulas as
timm's level functions (tests compare the two, and each DALI op with timm's PIL op at the same argument).

Where this differs from timm (the README says so too): geometric ops fill with one grey (115, the mean of timm's
per-channel fill (124, 116, 104): DALI's warps take a scalar fill) and interpolate bilinearly (timm's use the
run's --interpolation, bilinear or bicubic); Equalize follows OpenCV's histogram formula, Color DALI's saturation;
a noisy magnitude takes the 0.1 step at or below it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np

from ..errors import SettingError
from . import RA_FILL, timm_rand_augment

LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is an op's full strength (its arguments scale with magnitude / 10)
STEPS = 10  # magnitude steps per unit: arguments are tabulated at magnitudes 0, 0.1, ..., mmax
GREY = round(sum(RA_FILL) / 3)  # DALI's warp_affine / rotate take one fill value for all channels


@dataclass(frozen=True)
class RandAugmentSpec:
    """What timm's rand_augment_transform builds from a spec string, in numbers."""

    ops: tuple[str, ...]  # timm's op names, in its order
    layers: int  # ops applied in sequence per image (n)
    prob: float  # probability of applying each layer's op (p)
    magnitude: float  # m, out of LEVEL
    std: float  # mstd: 0 = fixed magnitude; inf = uniform in [0, m]
    max: float  # mmax: magnitudes are clipped to [0, max]

    @classmethod
    def parse(cls, spec: str) -> RandAugmentSpec:
        if not dali_runs(spec):
            raise SettingError(f"--rand-augment {spec!r}: other op sets and weights (-t...) are in the PyTorch loader "
                               f"only; use --loader torch, or drop the -t section.")
        ra = timm_rand_augment(spec)
        assert ra.choice_weights is None and {op.name for op in ra.ops} <= set(ARGUMENTS) | set(UNSCALED)
        op = ra.ops[0]  # timm gives every op the same prob, magnitude and hparams
        std = float(op.magnitude_std) if op.magnitude > 0 else 0.0  # uniform in [0, 0]: DALI refuses the empty range
        return cls(tuple(o.name for o in ra.ops), ra.num_layers, min(1.0, op.prob), float(op.magnitude), std,
                   float(op.magnitude_max or LEVEL))  # p > 1 applies always in timm; DALI's coin takes <= 1


def dali_runs(spec: str) -> bool:
    """Whether RandAugmentSpec runs `spec` (a valid timm spec): timm's two default op sets, uniform choice; a -t
    section picks other sets (weighted, or with ops such as blur) that only timm's own has."""
    return not any(section.startswith("t") for section in spec.split("-")[1:])


def _enhance(factor) -> np.float32:
    return np.float32(max(0.1, factor))  # timm keeps enhancement factors >= 0.1


def _keep_bits(bits) -> np.uint8:
    """posterize's AND mask keeping the `bits` most significant bits (PIL: 0 bits keeps none)."""
    bits = int(min(8, max(0, bits)))
    return np.uint8(0xFF ^ (2 ** (8 - bits) - 1))


def _sharpen(factor) -> np.ndarray:
    """PIL's Sharpness blend at `factor` (>= 0.1, as timm keeps it) as DALI's 3x3 kernel, which takes factor - 1."""
    from nvidia.dali.auto_aug.augmentations import sharpness_kernel

    return sharpness_kernel(np.float32(max(0.1, factor)) - 1)


def _shift(axis: int):
    """translate's [x, y] offset in px from a signed shift along `axis`, in the sign of PIL's affine (see ShearX)."""
    return lambda px: np.array([-px, 0] if axis == 0 else [0, -px], np.float32)


# timm op -> (unsigned argument at magnitude level, as timm's level function computes it; random sign?; the DALI
# op's parameter from the signed argument). Increasing ops are signed around "no change" (1.0 for enhancements).
# tests/test_dali_augment.py checks every row against timm's LEVEL_TO_ARG.
ARGUMENTS = {
    "Rotate": (lambda lv: lv / LEVEL * 30, True, np.float32),  # degrees
    # PIL's affine maps output to input px, DALI's input to output (inverse_map=False): the opposite sign
    "ShearX": (lambda lv: lv / LEVEL * 0.3, True, lambda s: np.array([-s, 0], np.float32)),
    "ShearY": (lambda lv: lv / LEVEL * 0.3, True, lambda s: np.array([0, -s], np.float32)),
    "TranslateXRel": (lambda lv: lv / LEVEL * 0.45, True, _shift(0)),  # a fraction of the side (dali_ops: px)
    "TranslateYRel": (lambda lv: lv / LEVEL * 0.45, True, _shift(1)),
    "PosterizeIncreasing": (lambda lv: 4 - int(lv / LEVEL * 4), False, _keep_bits),  # bits kept
    "Posterize": (lambda lv: int(lv / LEVEL * 4), False, _keep_bits),
    "SolarizeIncreasing": (lambda lv: 256 - min(256, int(lv / LEVEL * 256)), False, np.float32),  # threshold
    "Solarize": (lambda lv: min(256, int(lv / LEVEL * 256)), False, np.float32),
    "SolarizeAdd": (lambda lv: min(128, int(lv / LEVEL * 110)), False, np.uint8),  # added below 128
    **{f"{op}Increasing": (lambda lv: lv / LEVEL * 0.9, True, (lambda d: _sharpen(1 + d)) if op == "Sharpness"
                           else (lambda d: _enhance(1 + d)))
       for op in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{op: (lambda lv: lv / LEVEL * 1.8 + 0.1, False, _sharpen if op == "Sharpness" else _enhance)
       for op in ("Color", "Contrast", "Brightness", "Sharpness")},
}
UNSCALED = ("AutoContrast", "Equalize", "Invert")  # no magnitude


@dataclass(frozen=True)
class DaliOp:
    """One timm op as a DALI operation: `table[2 * step + negated]` is its parameter at magnitude step / STEPS.
    What DALI's own Augmentation.__call__ does with a magnitude bin, but with the table built once in numpy: DALI's
    maps each bin through autograph-converted Python, 13 s per pipeline here against 3 s."""

    name: str
    op: object  # the function under DALI's augmentation of that name: op(images, param, **options)
    table: np.ndarray | None  # None: no parameter
    param_device: str  # "cpu": the parameter is a named argument; "auto": with the images (a positional input)

    def __call__(self, images, index):
        from nvidia.dali import types

        if self.table is None:
            return self.op(images, None)
        device = images.device if self.param_device == "auto" else "cpu"
        param = types.Constant(self.table, device=device)[index]
        kw = {k: v for k, v in (("fill_value", GREY), ("interp_type", types.INTERP_LINEAR))
              if k in inspect.signature(self.op).parameters}
        return self.op(images, param, **kw)


def dali_ops(spec: RandAugmentSpec, img_size: int) -> list[DaliOp]:
    """One DALI operation per timm op of `spec`, its parameters tabulated at magnitudes 0, 0.1, ..., spec.max and
    both signs. Plain numpy: run it outside DALI's autograph (it converts every call: seconds per pipeline)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a

    def equalize(data, _):  # a.equalize and a.sharpness call these by their deprecated fn.experimental names
        return fn.equalize(data)

    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    base = {"AutoContrast": a.auto_contrast, "Equalize": a.equalize, "Invert": a.invert, "Rotate": a.rotate,
            "ShearX": a.shear_x, "ShearY": a.shear_y, "TranslateXRel": a.translate_x_no_shape,
            "TranslateYRel": a.translate_y_no_shape, "SolarizeAdd": a.solarize_add}
    for op in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
        base[op] = base[f"{op}Increasing"] = getattr(a, op.lower())
    levels = np.arange(round(spec.max * STEPS) + 1) / STEPS
    ops = []
    own = {"Equalize": equalize, "Sharpness": sharpness, "SharpnessIncreasing": sharpness}
    for name in spec.ops:
        aug = base[name]
        op = own.get(name, aug.op)
        if name in UNSCALED:
            ops.append(DaliOp(name, op, None, aug.param_device))
            continue
        argument, signed, param = ARGUMENTS[name]
        px = img_size if name.startswith("Translate") else 1  # the crop is img_size px square: timm's fraction, in px
        table = np.stack([param(sign * argument(lv) * px) for lv in levels for sign in (1, -1 if signed else 1)])
        ops.append(DaliOp(name, op, table, aug.param_device))
    return ops


def rand_augment(images, spec: RandAugmentSpec, img_size: int):
    """timm's RandAugment on a batch of uint8 HWC images (a DataNode, CPU or GPU) in a pipeline defined with
    enable_conditionals=True. Its random draws come from the pipeline's seed, so checkpoints restore them."""
    from nvidia.dali import fn, math as dmath, types
    from nvidia.dali.auto_aug.core import select
    from nvidia.dali.pipeline import do_not_convert

    ops = do_not_convert(dali_ops)(spec, img_size)
    for _ in range(spec.layers):
        op = fn.random.uniform(values=list(range(len(ops))), dtype=types.INT32)
        if spec.std > 0:  # timm draws one per op call: per image and layer
            level = (fn.random.uniform(range=[0.0, spec.magnitude]) if math.isinf(spec.std)
                     else fn.random.normal(mean=spec.magnitude, stddev=spec.std))
            # the table's step at or below: timm's level functions truncate (int()), so their thresholds on the
            # 0.1 grid (Posterize's bits at 2.5, 5, 7.5, 10) fall where timm's do (a rounding cast moved them 0.05)
            step = fn.cast(dmath.floor(dmath.clamp(level, 0.0, spec.max) * STEPS), dtype=types.INT32)
        else:  # timm's spec gives an integer m: on the grid
            step = round(min(max(spec.magnitude, 0.0), spec.max) * STEPS)
        index = step * 2 + fn.random.coin_flip(probability=0.5, dtype=types.INT32)  # the row: magnitude, sign
        if fn.random.coin_flip(probability=spec.prob, dtype=types.BOOL):
            images = select(ops, op, images, index)
    return images
