"""A synthetic image set sized like ImageNet's, for loader and packing benchmarks (no download needed).

How it is made: each image is 1/f ("pink") noise in colour, the power spectrum natural photographs
have, so JPEG sees the same kind of texture and edges at every scale, overlaid with a few blurred
random ellipses and polygons (objects with edges), at ImageNet's typical 500 x 375 (or 375 x 500)
px, saved as JPEG quality 90: 28 to 107 KB each, 56 KB on average (measured on the first 200 of the default
set), about half of ImageNet's ~110 KB average, so each loader decodes these somewhat faster than real images (all
alike: compare loaders within a run). Its pixels are not photographs: use real data for accuracy.
"""

from __future__ import annotations

import json
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vitdeit.classes import load_labels
from vitdeit.config import usable_cores


def pink_noise(rng: np.random.Generator, h: int, w: int, alpha: float) -> np.ndarray:
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(h, w // 2 + 1)) + 1j * rng.normal(size=(h, w // 2 + 1))) / f**alpha
    img = np.fft.irfft2(spectrum, s=(h, w))
    return (img - img.mean()) / (img.std() + 1e-8)


def natural_like(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    alpha = rng.uniform(0.9, 1.3)  # spectral slope: natural images are close to 1
    mix = rng.normal(size=(3, 3)) * 0.35 + np.eye(3)  # correlated colour channels
    planes = np.stack([pink_noise(rng, h, w, alpha) for _ in range(3)], -1) @ mix
    base = rng.uniform(60, 190, 3)
    img = Image.fromarray(np.clip(base + 38 * planes, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(20, 140)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r * rng.uniform(0.4, 1)], fill=colour)
        else:
            draw.polygon([(x + r * np.cos(a), y + r * np.sin(a)) for a in np.sort(rng.uniform(0, 6.3, 5))], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def make_imageset(out: str | Path, labels_path: str | Path, n_train: int = 512, n_val: int = 64,
                  num_classes: int = 10, seed: int = 0, workers: int | None = None) -> Path:
    """OUT/train.X1/WNID/WNID_N.JPEG and OUT/val.X/..., OUT/Labels.json: packable and ImageFolder-readable."""
    out = Path(out)
    labels = load_labels(labels_path)
    wnids = sorted(labels)[:num_classes]
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, n in (("train.X1", n_train), ("val.X", n_val)):
        for i in range(n):
            wnid = wnids[i % num_classes]
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            name = f"{wnid}_{i}.JPEG" if split != "val.X" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            jobs.append((str(out / split / wnid / name), seed * 10**7 + len(jobs)))
    with Pool(workers or usable_cores()) as pool:  # ~0.1 s per image: use every core this process may
        pool.map(_write_one, jobs, chunksize=16)
    # last: a set whose Labels.json is there is whole (throughput.py reuses it; a killed run's is made again)
    (out / "Labels.json").write_text(json.dumps({w: labels[w] for w in wnids}))
    return out


def _write_one(job: tuple[str, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    size = (500, 375) if rng.random() < 0.75 else (375, 500)
    natural_like(rng, *size).save(path, format="JPEG", quality=90)
