"""Synthetic multi-site segmentation data with a distinct domain shift per site.

Federated experiments need several clients whose data differ the way real
hospitals' data differ (scanner, colour, texture, lesion appearance, image
size), available offline and in seconds. ``synthesize`` writes one folder
per site in the medvlsm annotation format (``images/*.png``, ``masks/*.png``
with values {0, 255}, ``anns/{train,val,test}.json`` with prompts p0..p9 of
growing detail, as in the VLSM-Adapter datasets), plus ``sites.json`` and
``README.txt`` describing the sites.

Site styles cycle through three base domains, each a different imaging look:

- ``ultrasound``: grey speckled background, dark (hypoechoic) round/oval
  lesions, strong noise, native size = image_size;
- ``endoscopy``: pink-red shaded tissue with vessel-like stripes, bright
  yellow-white round lesions, low noise, native size = 1.25 x image_size;
- ``dermoscopy``: beige cell-like (Voronoi) texture, dark brown irregular
  lesions of larger size, medium noise, native size = 0.875 x image_size.

Sites beyond the third reuse a base style with a seeded perturbation of
colours, contrast, noise and size range, so every site differs. A model
trained on one site transfers imperfectly to the others (lesion polarity
and texture change), which is what makes federation worth testing.

Everything is derived from ``numpy.random.default_rng([seed, site, image])``,
so the output is byte-identical for a given seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .formats import STANDARD_SPLITS

# What synthesize() accepts (the federation's demo-image-size and demo-images are checked against these).
IMAGE_SIZE_RANGE = (32, 512)
MIN_PER_SITE = len(STANDARD_SPLITS)  # one item in every split

NOUN = "lesion"
SIZE_WORDS = ((0.04, "small"), (0.12, "medium"), (1.01, "large"))  # by mask area fraction
COUNT_WORDS = {1: "one", 2: "two"}
TEXTURE_WORDS = {"speckle": "speckled", "stripes": "striped", "cells": "cellular"}
DEFINITIONS = (
    "a {colour} region unlike the surrounding tissue",
    "an abnormal {colour} area on a {texture} background",
    "a {tone} spot with a soft boundary",
)


@dataclass(frozen=True)
class SiteStyle:
    """The look of one site: every field is a knob of the domain shift."""

    name: str
    texture: str  # speckle | stripes | cells
    background: tuple[float, float, float]  # RGB in [0, 1]
    lesion: tuple[float, float, float]
    tone: str  # "bright" or "dark": lesion brightness relative to the background
    colour: str  # colour word used in the prompts
    noise: float  # std of additive Gaussian noise
    texture_strength: float
    size_range: tuple[float, float]  # lesion radius as a fraction of the image side
    shapes: tuple[str, ...]  # drawn from: round | oval | irregular
    scale: float  # native image side = scale * image_size
    description: str


BASE_STYLES = (
    SiteStyle(
        "ultrasound", "speckle", (0.50, 0.50, 0.50), (0.16, 0.16, 0.16), "dark", "dark grey",
        0.07, 0.45, (0.08, 0.16), ("round", "oval"), 1.0,
        "grey speckled background, dark round or oval lesions, strong noise",
    ),
    SiteStyle(
        "endoscopy", "stripes", (0.78, 0.36, 0.36), (0.97, 0.88, 0.62), "bright", "yellow",
        0.02, 0.25, (0.06, 0.13), ("round", "round", "oval"), 1.25,
        "pink-red shaded tissue with vessel-like stripes, bright yellow round lesions, low noise",
    ),
    SiteStyle(
        "dermoscopy", "cells", (0.82, 0.68, 0.56), (0.36, 0.21, 0.13), "dark", "brown",
        0.04, 0.30, (0.12, 0.22), ("irregular", "irregular", "oval"), 0.875,
        "beige cell-like texture, large dark brown irregular lesions, medium noise",
    ),
)


def site_style(site: int, seed: int) -> SiteStyle:
    """Style of site ``site``: a base style, perturbed (seeded) for sites >= 3."""
    base = BASE_STYLES[site % len(BASE_STYLES)]
    if site < len(BASE_STYLES):
        return base
    rng = np.random.default_rng([seed, site, 999_983])
    gain = rng.uniform(0.75, 1.15, size=3)
    lo, hi = base.size_range
    shrink = rng.uniform(0.7, 1.2)
    return replace(
        base,
        name=f"{base.name}-v{site // len(BASE_STYLES)}",
        background=tuple(float(np.clip(c * g, 0.05, 0.95)) for c, g in zip(base.background, gain)),
        noise=float(base.noise * rng.uniform(0.6, 1.6)),
        texture_strength=float(base.texture_strength * rng.uniform(0.7, 1.3)),
        size_range=(lo * shrink, hi * shrink),
        description=base.description + " (perturbed colours, noise and lesion size)",
    )


# --------------------------------------------------------------------------
# Image generation
# --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(up, 0.0, 1.0)


def _texture(rng: np.random.Generator, kind: str, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Background texture in about [-1, 1]."""
    if kind == "speckle":
        speckle = rng.rayleigh(0.6, size=(size, size)).astype(np.float32) - 0.75
        return 0.6 * speckle + 0.8 * (_smooth_noise(rng, size, 6) - 0.5)
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(4.0, 8.0)
        warp = 2.5 * _smooth_noise(rng, size, 4)
        phase = xx * np.cos(theta) + yy * np.sin(theta)
        vessels = np.sin(2 * np.pi * freq * phase + warp) ** 8
        shading = 1.0 - 1.6 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)  # endoscope vignetting
        return 1.2 * vessels - 0.6 + 0.6 * (shading - 0.7)
    if kind == "cells":
        n = int(rng.integers(25, 45))
        pts = rng.random((n, 2)).astype(np.float32)
        d = np.sqrt((yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2)
        d.sort(axis=0)
        membrane = np.exp(-((d[1] - d[0]) * size / 2.5) ** 2)  # dark cell borders
        return 0.3 - 1.3 * membrane + 0.5 * (_smooth_noise(rng, size, 8) - 0.5)
    raise ValueError(f"unknown texture {kind!r}")


@dataclass(frozen=True)
class _Blob:
    cy: float
    cx: float
    radius: float
    shape: str


def _blob_field(rng: np.random.Generator, blob: _Blob, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Signed distance-like field (image-side units): > 0 inside the lesion."""
    angle = rng.uniform(0, np.pi)
    aspect = {"round": rng.uniform(1.0, 1.15), "oval": rng.uniform(1.5, 2.0), "irregular": rng.uniform(1.0, 1.4)}[blob.shape]
    dy, dx = yy - blob.cy, xx - blob.cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / np.sqrt(aspect)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) * np.sqrt(aspect)
    r = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    wobble = 0.04 if blob.shape != "irregular" else 0.22
    boundary = np.ones_like(r)
    for k in (2, 3, 5):
        boundary += rng.uniform(0.3, 1.0) * wobble * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) / (k / 2)
    return blob.radius * boundary - r


def _place_blobs(rng: np.random.Generator, style: SiteStyle) -> list[_Blob]:
    count = 2 if rng.random() < 0.25 else 1
    blobs: list[_Blob] = []
    for _ in range(count):
        for _attempt in range(20):  # keep two lesions apart so the count word stays true
            radius = float(rng.uniform(*style.size_range)) / (1.3 if count == 2 else 1.0)
            cy, cx = rng.uniform(0.22, 0.78, size=2)
            clear = all(np.hypot(cy - b.cy, cx - b.cx) > 1.6 * (radius + b.radius) for b in blobs)
            if clear:
                blobs.append(_Blob(float(cy), float(cx), radius, str(rng.choice(style.shapes))))
                break
    return blobs


@dataclass(frozen=True)
class _Sample:
    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray  # uint8 HxW {0, 255}
    objects: list[tuple[np.ndarray, _Blob]]  # per-lesion mask and its blob


def make_sample(rng: np.random.Generator, style: SiteStyle, size: int) -> _Sample:
    """One image with 1-2 soft-edged lesions on the site's textured background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = _texture(rng, style.texture, size, yy, xx)
    bg = np.asarray(style.background, np.float32)[None, None, :] * (1.0 + style.texture_strength * texture[..., None])
    alpha = np.zeros((size, size), np.float32)
    objects = []
    softness = rng.uniform(0.012, 0.03)
    for blob in _place_blobs(rng, style):
        field = _blob_field(rng, blob, yy, xx)
        objects.append(((field > 0), blob))
        alpha = np.maximum(alpha, np.clip(0.5 + field / softness, 0.0, 1.0))
    inner = 1.0 + 0.12 * (_smooth_noise(rng, size, 5)[..., None] - 0.5)
    lesion = np.asarray(style.lesion, np.float32)[None, None, :] * inner
    img = bg * (1.0 - alpha[..., None]) + lesion * alpha[..., None]
    img = img + rng.normal(0.0, style.noise, size=img.shape).astype(np.float32)
    image = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    mask = (alpha > 0.5).astype(np.uint8) * 255
    objects = [(m & (mask > 0), b) for m, b in objects]
    return _Sample(image, mask, objects)


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def _position_word(obj_mask: np.ndarray) -> str:
    ys, xs = np.nonzero(obj_mask)
    h, w = obj_mask.shape
    row = ("top", "", "bottom")[min(2, int(3 * ys.mean() / h))]
    col = ("left", "", "right")[min(2, int(3 * xs.mean() / w))]
    return " ".join(p for p in (row, col) if p) or "center"


def make_prompts(sample: _Sample, style: SiteStyle) -> dict[str, str | list[str]]:
    """p0..p9 of growing detail, medvlsm style; p7..p9 are lists of variants."""
    objects = [(m, b) for m, b in sample.objects if m.any()]
    area = float((sample.mask > 0).mean())
    size_word = next(word for bound, word in SIZE_WORDS if area < bound)
    shape = max(objects, key=lambda o: o[0].sum())[1].shape
    count = len(objects)
    noun = NOUN if count == 1 else NOUN + "s"
    positions = ", ".join(dict.fromkeys(_position_word(m) for m, _ in objects))
    located = f"located in the {positions} of the image"
    p5 = f"{COUNT_WORDS[count]} {size_word} {style.tone} {shape} {noun}"
    definitions = [d.format(colour=style.colour, texture=TEXTURE_WORDS[style.texture], tone=style.tone) for d in DEFINITIONS]
    verb = "is" if count == 1 else "are"
    plural_defs = definitions if count == 1 else [_pluralise(d) for d in definitions]
    return {
        "p0": "",
        "p1": NOUN,
        "p2": f"{shape} {NOUN}",
        "p3": f"{style.tone} {shape} {NOUN}",
        "p4": f"{size_word} {style.tone} {shape} {NOUN}",
        "p5": p5,
        "p6": f"{p5}, {located}",
        "p7": [f"{NOUN} which is {d}" for d in definitions],
        "p8": [f"{p5} which {verb} {d}" for d in plural_defs],
        "p9": [f"{p5} which {verb} {d} {located}" for d in plural_defs],
    }


def _pluralise(definition: str) -> str:
    """'a dark region ...' -> 'dark regions ...' (first noun phrase only)."""
    words = definition.split(" ")
    article, rest = words[0], words[1:]
    if article not in ("a", "an"):
        return definition
    for i, w in enumerate(rest):
        if w in ("region", "area", "spot"):
            rest[i] = w + "s"
            break
    return " ".join(rest)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    counts = [int(round(f * n)) for f in fractions[:-1]]
    counts = [max(1, c) for c in counts]
    counts.append(n - sum(counts))
    while counts[-1] < 1:  # small n: take from the largest split
        counts[int(np.argmax(counts[:-1]))] -= 1
        counts[-1] += 1
    return counts


def _validate(sites: int, per_site: int, image_size: int, splits: Sequence[float]) -> None:
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if per_site < MIN_PER_SITE:
        raise ValueError(f"per_site must be >= {MIN_PER_SITE} so every split has an item, got {per_site}")
    low, high = IMAGE_SIZE_RANGE
    if not low <= image_size <= high:
        raise ValueError(f"image_size must be in [{low}, {high}], got {image_size}")
    if len(splits) != len(STANDARD_SPLITS) or any(f <= 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three positive fractions (train, val, test) summing to 1, got {tuple(splits)}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        marker = out / "sites.json"
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite to replace a synthetic dataset)")
        if not marker.is_file():
            raise FileExistsError(f"{out}: not a synthetic dataset (no sites.json); refusing to overwrite")
        for site in json.loads(marker.read_text(encoding="utf-8")).get("sites", []):
            target = (out / site["path"]).resolve()
            if target.parent == out.resolve() and target.is_dir():
                shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)


def _write_site(site_dir: Path, site: int, style: SiteStyle, seed: int, per_site: int, size: int, fractions: Sequence[float]) -> dict:
    (site_dir / "images").mkdir(parents=True)
    (site_dir / "masks").mkdir()
    (site_dir / "anns").mkdir()
    records = []
    for i in range(per_site):
        rng = np.random.default_rng([seed, site, i])
        sample = make_sample(rng, style, size)
        name = f"s{site}_{i:04d}.png"
        Image.fromarray(sample.image).save(site_dir / "images" / name)
        Image.fromarray(sample.mask).save(site_dir / "masks" / name)
        records.append(
            {
                "img_name": name,
                "mask_name": name,
                "segment_id": Path(name).stem,
                "bbox": _bbox(sample.mask),
                "cat": 0,
                "prompts": make_prompts(sample, style),
            }
        )
    order = np.random.default_rng([seed, site, -1 % 2**32]).permutation(per_site)
    counts = _split_counts(per_site, fractions)
    bounds = np.cumsum([0] + counts)
    for split, lo, hi in zip(STANDARD_SPLITS, bounds[:-1], bounds[1:]):
        chosen = [records[j] for j in sorted(order[lo:hi])]
        (site_dir / "anns" / f"{split}.json").write_text(json.dumps(chosen, indent=1) + "\n", encoding="utf-8")
    return dict(zip(STANDARD_SPLITS, counts))


def synthesize(
    out: str | Path,
    sites: int = 3,
    per_site: int = 60,
    seed: int = 0,
    image_size: int = 128,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
) -> list[Path]:
    """Write ``sites`` synthetic sites under ``out`` (``out/site-<k>/``); return their folders.

    ``image_size`` is the base native side; sites scale it by their style
    (1.0, 1.25, 0.875 for the three base styles), rounded to a multiple of 8.
    ``splits`` are the train/val/test fractions. Refuses a non-empty ``out``
    unless ``overwrite`` and ``out`` holds an earlier synthetic dataset.
    """
    _validate(sites, per_site, image_size, splits)
    out = Path(out)
    _prepare_out(out, overwrite)
    described, paths = [], []
    for k in range(sites):
        style = site_style(k, seed)
        size = max(32, int(round(image_size * style.scale / 8)) * 8)
        site_dir = out / f"site-{k}"
        counts = _write_site(site_dir, k, style, seed, per_site, size, splits)
        paths.append(site_dir)
        described.append({"name": f"site-{k}", "path": f"site-{k}", "native_size": size, "items": per_site, "splits": counts, "style": asdict(style)})
    meta = {"generator": "fedvlsm.common.data.synth", "seed": seed, "image_size": image_size, "format": "medvlsm", "sites": described}
    (out / "sites.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / "README.txt").write_text(_readme(meta), encoding="utf-8")
    return paths


def _readme(meta: dict) -> str:
    lines = [
        "Synthetic multi-site lesion segmentation data (fedvlsm data synth).",
        f"seed={meta['seed']} image_size={meta['image_size']}; regenerate with: fedvlsm data synth OUT "
        f"--sites {len(meta['sites'])} --per-site {meta['sites'][0]['items']} --seed {meta['seed']} --image-size {meta['image_size']}",
        "",
        "Each site-<k>/ folder is one client in the medvlsm format: images/*.png (RGB), masks/*.png",
        "(0 = background, 255 = lesion), anns/{train,val,test}.json (records with img_name, mask_name,",
        "prompts p0..p9 of growing detail; p7..p9 are lists of variants).",
        "",
        "Sites (each a different domain):",
    ]
    for site in meta["sites"]:
        style = site["style"]
        lines.append(
            f"  {site['name']}: {style['name']}, {site['native_size']}x{site['native_size']} px, "
            f"{style['description']}; splits {site['splits']}"
        )
    return "\n".join(lines) + "\n"
