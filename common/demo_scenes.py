"""Synthetic "open-domain" scenes for pretraining and checking the demo base.

The demo base (``common/assets/demo-base``) stands in for CLIPSeg, a model
pretrained on natural images with free-text prompts. Everything must run
offline, so it is pretrained from scratch on these scenes instead: a few
coloured geometric objects (circle, square, triangle, star, ring, ellipse;
red, green, blue, yellow, white; small or large) on smooth, noisy
backgrounds. Each example pairs a scene with a prompt naming *one* object by
some of its attributes ("red circle", "the small blue square", "a yellow star
in the top left") and the mask of every object matching that description.

Why these scenes:
- The text must matter. Scenes hold 2-4 objects and deliberately share
  attributes between them (same colour, different shape and vice versa), so
  that a model ignoring the prompt cannot do well: the evaluation compares
  Dice with the correct prompts against Dice with prompts shuffled within
  the batch (always scored against the correct prompt's mask).
- They differ from the synthetic medical sites (``common/data/synth.py``:
  lesion-like blobs on speckle/stripe/cell textures with medical prompts):
  the adapters trained later have a real domain gap to close, as with the
  real CLIPSeg on medical images.
- Position phrases reuse the wording of the medical prompts ("located in the
  top left of the image"), as general language knowledge would.

Everything is drawn from ``numpy.random.default_rng(seed)`` with ``seed`` an
int or a sequence of ints, so a batch is identical for a given seed. Images
are normalised with the ImageNet mean/std, exactly as ``SegDataset`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.data.dataset import IMAGENET_MEAN, IMAGENET_STD

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "ellipse")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.78, 0.20),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.96, 0.96, 0.96),
}
# Object radius as a fraction of the image side, by size word; the two ranges
# are well apart so "small" and "large" are unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.14, 0.20)}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
ARTICLES: tuple[str, ...] = ("", "a ", "the ")  # "a" becomes "an" before a vowel


@dataclass(frozen=True)
class SceneObject:
    """One painted object and its attributes (what a prompt may mention)."""

    shape: str
    colour: str
    size: str
    row: str  # top | middle | bottom (by centre, in thirds)
    col: str  # left | center | right
    mask: np.ndarray  # bool (S, S): the object's visible pixels


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # float32 (S, S, 3) in [0, 1]
    objects: list[SceneObject]


@dataclass(frozen=True)
class DemoBatch:
    """Model-ready tensors for a batch of scenes."""

    pixel_values: torch.Tensor  # float32 (B, 3, S, S), ImageNet-normalised
    masks: torch.Tensor  # float32 (B, 1, S, S) in {0, 1}: objects matching the prompt
    all_objects: torch.Tensor  # float32 (B, 1, S, S): every object (a text-blind upper bound)
    prompts: list[str]


# ------------------------------------------------------------------ painting
def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random cells x cells grid, bilinearly upsampled."""
    grid = rng.random((cells, cells)).astype(np.float32)
    pos = np.linspace(0, cells - 1, size, dtype=np.float32)
    lo = np.minimum(pos.astype(int), cells - 2)
    w = pos - lo
    interp = np.zeros((size, cells), np.float32)
    interp[np.arange(size), lo] = 1 - w
    interp[np.arange(size), lo + 1] = w
    return interp @ grid @ interp.T


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two muted colours blended by smooth noise, plus a gradient and grain."""
    grey = rng.uniform(0.08, 0.55)
    tints = (grey + rng.uniform(-0.12, 0.12, size=(2, 3))).astype(np.float32)
    blend = _smooth(rng, size, int(rng.integers(2, 6)))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    strength = np.float32(rng.uniform(0.0, 0.15))
    shade = strength * (ramp[None, :] * np.float32(np.cos(angle)) + ramp[:, None] * np.float32(np.sin(angle)) - 0.5)
    if rng.random() < 0.5:  # blotchy texture
        shade += np.float32(rng.uniform(0.05, 0.15)) * (_smooth(rng, size, int(rng.integers(8, 17))) - 0.5)
    img = tints[0] + blend[..., None] * (tints[1] - tints[0]) + shade[..., None]
    return img.astype(np.float32, copy=False)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside test in object coordinates (u, v: offsets rotated into the object's frame)."""
    rho = np.sqrt(u**2 + v**2)
    if shape == "circle":
        return rho < r
    if shape == "ring":
        return (rho < r) & (rho > 0.58 * r)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 < 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.85 * r
    if shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes at distance r/2 from the centre
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) < 0.5 * r
        return inside & (rho < 1.05 * r)
    if shape == "star":
        phi = np.arctan2(v, u)
        frac = (5 * phi / (2 * np.pi)) % 1.0  # 0 at a tip, 0.5 between tips
        spoke = 1 - 2 * np.abs(frac - 0.5)  # 1 between tips ... 0 at a tip
        return rho < r * (1.0 - 0.55 * spoke) * 1.1
    raise ValueError(f"unknown shape {shape!r}")


def _third(x: float, names: tuple[str, str, str]) -> str:
    return names[min(2, int(3 * x))]


def _pick_attributes(rng: np.random.Generator, others: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    """(shape, colour, size); often copies one attribute of an earlier object (hard distractors)."""
    shape = str(rng.choice(SHAPES))
    colour = str(rng.choice(list(COLOURS)))
    size = str(rng.choice(list(SIZES)))
    if others and rng.random() < 0.6:
        ref = others[int(rng.integers(len(others)))]
        keep = int(rng.integers(3))
        shape, colour, size = (ref[0] if keep == 0 else shape, ref[1] if keep == 1 else colour, ref[2] if keep == 2 else size)
    return shape, colour, size


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """A scene of 2-4 non-overlapping coloured objects on a random background."""
    image = _background(rng, size)
    count = int(rng.choice([2, 3, 3, 4, 4]))
    placed: list[tuple[float, float, float]] = []
    attrs: list[tuple[str, str, str]] = []
    objects: list[SceneObject] = []
    for _ in range(count):
        shape, colour, size_word = _pick_attributes(rng, attrs)
        r = float(rng.uniform(*SIZES[size_word]))
        for _attempt in range(30):
            cy, cx = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            if all(np.hypot(cy - py, cx - px) > 1.1 * (r + pr) for py, px, pr in placed):
                break
        else:
            continue  # no room: fewer objects
        theta = rng.uniform(0, 2 * np.pi)
        # Paint inside the object's bounding box only (every shape fits in 1.15 r).
        y0, y1 = max(0, int((cy - 1.15 * r) * size)), min(size, int((cy + 1.15 * r) * size) + 2)
        x0, x1 = max(0, int((cx - 1.15 * r) * size)), min(size, int((cx + 1.15 * r) * size) + 2)
        dy = (np.arange(y0, y1, dtype=np.float32) / size - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) / size - cx)[None, :]
        cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        crop = _shape_mask(shape, u, v, r)
        if crop.sum() < 4:
            continue
        rgb = np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.05) + rng.uniform(-0.06, 0.06, 3)
        shade = 1 + np.float32(rng.uniform(0.0, 0.25)) * np.clip((u * cos + v * sin) / r, -1, 1)
        patch = image[y0:y1, x0:x1]
        patch[crop] = (np.clip(rgb, 0, 1).astype(np.float32)[None, None, :] * shade[..., None])[crop]
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = crop
        placed.append((float(cy), float(cx), r))
        attrs.append((shape, colour, size_word))
        objects.append(
            SceneObject(shape, colour, size_word, _third(cy, ("top", "middle", "bottom")), _third(cx, ("left", "center", "right")), mask)
        )
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.06))
    return Scene(np.clip(image, 0, 1, out=image), objects)


# ------------------------------------------------------------------- prompts
def _position_phrase(obj: SceneObject) -> str:
    parts = [p for p in (obj.row if obj.row != "middle" else "", obj.col if obj.col != "center" else "") if p]
    return " ".join(parts) or "center"


def _matches_position(obj: SceneObject, phrase: str) -> bool:
    if phrase == "center":
        return obj.row == "middle" and obj.col == "center"
    words = phrase.split()
    return all(w in (obj.row, obj.col) for w in words)


# Which attributes a prompt mentions, with their sampling weights.
TEMPLATES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("colour", "shape"), 0.26),
    (("shape",), 0.12),
    (("colour",), 0.10),
    (("size", "colour", "shape"), 0.12),
    (("size", "shape"), 0.08),
    (("colour", "shape", "position"), 0.14),
    (("shape", "position"), 0.08),
    (("size", "colour", "shape", "position"), 0.10),
)


def describe(rng: np.random.Generator, scene: Scene) -> tuple[str, np.ndarray]:
    """A prompt naming one object of `scene`, and the mask of all objects it describes."""
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    weights = np.asarray([w for _, w in TEMPLATES])
    used = TEMPLATES[int(rng.choice(len(TEMPLATES), p=weights / weights.sum()))][0]
    position = _position_phrase(target)
    matching = [
        o
        for o in scene.objects
        if ("shape" not in used or o.shape == target.shape)
        and ("colour" not in used or o.colour == target.colour)
        and ("size" not in used or o.size == target.size)
        and ("position" not in used or _matches_position(o, position))
    ]
    words = []
    if "size" in used:
        words.append(str(rng.choice(SIZE_SYNONYMS[target.size])))
    if "colour" in used:
        words.append(target.colour)
    words.append(target.shape if "shape" in used else str(rng.choice(["object", "shape"])))
    article = str(rng.choice(ARTICLES))
    if article == "a " and words[0][0] in "aeiou":
        article = "an "
    text = article + " ".join(words)
    if "position" in used:
        form = int(rng.integers(3))
        if form == 0:
            text += f" in the {position}"
        elif form == 1:
            text += f" located in the {position} of the image"
        else:
            text += f" at the {position}"
    mask = np.zeros(target.mask.shape, bool)
    for o in matching:
        mask |= o.mask
    return text, mask


def prompt_kind(prompt: str) -> str:
    """Which object attributes a prompt names: "colour", "shape", "colour+shape" or "neither"."""
    words = set(prompt.split())
    colour, shape = bool(words & set(COLOURS)), bool(words & set(SHAPES))
    return {(True, True): "colour+shape", (True, False): "colour", (False, True): "shape"}.get((colour, shape), "neither")


def vocabulary() -> list[str]:
    """Every word `describe` can produce (for the tokenizer)."""
    words = set(SHAPES) | set(COLOURS) | {"object", "shape", "a", "an", "the", "in", "at", "located", "of", "image"}
    words |= {w for syn in SIZE_SYNONYMS.values() for w in syn}
    words |= {"top", "bottom", "left", "right", "center"}
    return sorted(words)


# ------------------------------------------------------------------- batches
def sample_batch(seed: int | Sequence[int], n: int, size: int) -> DemoBatch:
    """`n` scenes with one prompt each, drawn from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    images, masks, alls, prompts = [], [], [], []
    for _ in range(n):
        scene = render_scene(rng, size)
        while not scene.objects:  # cannot happen with the sizes above; kept exact anyway
            scene = render_scene(rng, size)
        prompt, mask = describe(rng, scene)
        images.append(scene.image)
        masks.append(mask)
        alls.append(np.logical_or.reduce([o.mask for o in scene.objects]))
        prompts.append(prompt)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return DemoBatch(
        pixel_values=((pixels - mean) / std).contiguous(),
        masks=torch.from_numpy(np.stack(masks)[:, None]).float(),
        all_objects=torch.from_numpy(np.stack(alls)[:, None]).float(),
        prompts=prompts,
    )


def shuffled(prompts: Sequence[str]) -> list[str]:
    """The prompts rotated by one place: every scene gets another scene's prompt."""
    return list(prompts[1:]) + list(prompts[:1])


def dice_per_sample(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice of binary (B, 1, H, W) predictions against targets, per sample."""
    pred, target = pred.float().flatten(1), target.float().flatten(1)
    inter = (pred * target).sum(1)
    return (2 * inter + eps) / (pred.sum(1) + target.sum(1) + eps)
