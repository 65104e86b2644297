"""Dataset validation: report every problem of a dataset at once.

A site operator fixing data wants the whole list in one run, not one error
per attempt; and training must refuse bad data rather than silently drop
items. ``check_dataset`` collects indexing problems (from ``formats``) and
pixel problems (decoding every image and mask once); ``ensure_valid`` raises
a ``DataError`` with the same messages. ``SegDataset`` applies the same
per-pair rules (``pair_problems``) when it loads an item.

Problem kinds: ``unknown-format``, ``missing-split``, ``empty-split``,
``malformed-annotation``, ``malformed-prompts``, ``missing-image``,
``missing-mask``, ``no-prompt``, ``duplicate-id``, ``split-overlap``,
``unreadable-image``, ``unreadable-mask``, ``size-mismatch``,
``non-binary-mask``.

Binary masks have at most two levels, {0, 1} or {0, 255}. JPEG masks (lossy;
Kvasir-SEG ships them) are accepted when at most ``LOSSY_GREY_FRACTION`` of
their pixels lie in the grey band (``LOSSY_GREY_BAND``); they are read with
the >127 threshold of ``formats.binarize_mask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .formats import (
    LOSSY_EXTS,
    DataError,
    Item,
    Problem,
    available_splits,
    detect_format,
    file_ext,
    format_problems,
    read_image,
    read_mask,
    scan_split,
)

__all__ = ["Problem", "check_dataset", "ensure_valid", "pair_problems", "mask_level_error"]

LOSSY_GREY_BAND = (32, 223)  # exclusive bounds of "neither black nor white" in 8-bit JPEG masks
LOSSY_GREY_FRACTION = 0.02


def mask_level_error(raw: np.ndarray, mask_path: Path) -> str | None:
    """Why the stored mask values are not binary, or None when they are."""
    values = np.unique(raw)
    if np.isin(values, (0, 1)).all() or np.isin(values, (0, 255)).all():
        return None
    if file_ext(mask_path) in LOSSY_EXTS and raw.dtype == np.uint8:
        lo, hi = LOSSY_GREY_BAND
        grey = float(np.mean((raw > lo) & (raw < hi)))
        if grey <= LOSSY_GREY_FRACTION:
            return None
        return (
            f"{mask_path}: JPEG mask is not near-binary: {grey:.1%} of pixels are grey "
            f"({lo} < v < {hi}; at most {LOSSY_GREY_FRACTION:.0%} allowed)"
        )
    shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
    return f"{mask_path}: mask has {values.size} distinct values ({shown}); expected two levels {{0, 1}} or {{0, 255}}"


def pair_problems(image_path: Path, image: np.ndarray, mask_path: Path, raw_mask: np.ndarray) -> list[Problem]:
    """Problems of one decoded (image, mask) pair: size mismatch, non-binary mask."""
    problems = []
    if image.shape[:2] != raw_mask.shape[:2]:
        h, w = raw_mask.shape[:2]
        ih, iw = image.shape[:2]
        problems.append(
            Problem(mask_path, "size-mismatch", f"{mask_path}: mask is {h}x{w} (HxW) but its image {image_path} is {ih}x{iw}")
        )
    error = mask_level_error(raw_mask, mask_path)
    if error:
        problems.append(Problem(mask_path, "non-binary-mask", error))
    return problems


def _file_problems(item: Item) -> list[Problem]:
    problems = []
    image = mask = None
    try:
        image = read_image(item.image)
    except DataError as exc:
        problems.append(Problem(item.image, "unreadable-image", str(exc)))
    try:
        mask = read_mask(item.mask)
    except DataError as exc:
        problems.append(Problem(item.mask, "unreadable-mask", str(exc)))
    if image is not None and mask is not None:
        problems += pair_problems(item.image, image, item.mask, mask)
    return problems


def _overlap_problems(by_split: dict[str, list[Item]]) -> list[Problem]:
    first_split: dict[Path, str] = {}
    problems = []
    for split, items in by_split.items():
        for image in dict.fromkeys(i.image for i in items):
            other = first_split.setdefault(image, split)
            if other != split:
                problems.append(Problem(image, "split-overlap", f"{image}: in both split '{other}' and split '{split}'"))
    return problems


def check_dataset(root: str | Path, splits: Sequence[str] | None = None) -> list[Problem]:
    """Every problem of the dataset at ``root`` (all splits by default), in a stable order.

    Indexing problems first (per split), then cross-split overlap, then one
    decode of each distinct (image, mask) pair. An empty list means clean.
    """
    root = Path(root)
    try:
        detect_format(root)
    except DataError as exc:
        return [Problem(root, "unknown-format", str(exc))]
    names = list(splits) if splits is not None else available_splits(root)
    problems: list[Problem] = []
    by_split: dict[str, list[Item]] = {}
    for split in names:
        items, split_problems = scan_split(root, split)
        by_split[split] = items
        problems += split_problems
    problems += _overlap_problems(by_split)
    pairs = {(i.image, i.mask): i for items in by_split.values() for i in items}
    for item in pairs.values():
        problems += _file_problems(item)
    return _dedupe(problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def ensure_valid(root: str | Path, splits: Sequence[str] = ("train", "val", "test")) -> None:
    """Raise ``DataError`` listing every problem of ``splits`` of ``root``; return quietly if clean."""
    problems = check_dataset(root, splits=splits)
    if problems:
        raise DataError(format_problems(problems, str(root)))
