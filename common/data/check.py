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
``non-binary-mask``, ``all-empty-masks`` (every mask of a split has no
foreground: nothing to learn or measure), and the warning ``unused-images``
(files in ``images/`` that no split uses; reported with their count, only
by a full check - ``splits=None`` - and never a reason to refuse training).

A multi-site root (``fedvlsm data synth`` output with ``sites.json``, or any
folder of dataset folders) is not a dataset; ``check_sites`` checks it site
by site. ``site_data_check`` is the site-side summary the federation sends
to the server: problem kinds and counts only, cached per data fingerprint.

Binary masks have two levels, {0, 1}, {0, 255} or, 16-bit, {0, 65535}
(all read as "nonzero = foreground"). JPEG masks (lossy;
Kvasir-SEG ships them) are accepted when at most ``LOSSY_GREY_FRACTION`` of
their pixels lie in the grey band (``LOSSY_GREY_BAND``); they are read with
the >127 threshold of ``formats.binarize_mask`` ({0, 1} JPEG masks, all
below the band: nonzero = foreground).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from common.atomic import write_json_atomic

from .formats import (
    LOSSY_EXTS,
    STANDARD_SPLITS,
    SUPPORTED_EXTS,
    WARNING_KINDS,
    DataError,
    Item,
    Problem,
    available_splits,
    binarize_mask,
    detect_format,
    file_ext,
    format_problems,
    is_supported,
    read_image,
    read_mask,
    scan_split,
)

__all__ = [
    "Problem", "SiteCheck", "check_dataset", "check_sites", "ensure_valid", "find_sites", "mask_level_error",
    "pair_problems", "site_data_check",
]

LOSSY_GREY_BAND = (32, 223)  # exclusive bounds of "neither black nor white" in 8-bit JPEG masks
LOSSY_GREY_FRACTION = 0.02
# Accepted two-level masks: 8-bit {0, 1} / {0, 255} and 16-bit {0, 65535}
# (16-bit PNG masks from some annotation tools; binarize_mask reads them).
BINARY_LEVELS = ((0, 1), (0, 255), (0, 65535))


def mask_level_error(raw: np.ndarray, mask_path: Path) -> str | None:
    """Why the stored mask values are not binary, or None when they are."""
    values = np.unique(raw)
    if any(np.isin(values, levels).all() for levels in BINARY_LEVELS):
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
    return f"{mask_path}: mask has {values.size} distinct values ({shown}); expected two levels {{0, 1}}, {{0, 255}} or {{0, 65535}}"


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


def _file_problems(item: Item) -> tuple[list[Problem], bool | None]:
    """Problems of one item's files, and whether its mask has foreground (None: mask unreadable)."""
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
    foreground = None if mask is None else bool(binarize_mask(mask).any())
    return problems, foreground


def _empty_mask_problems(root: Path, by_split: dict[str, list[Item]], foreground: dict[Path, bool | None]) -> list[Problem]:
    """One ``all-empty-masks`` per split whose readable masks all lack foreground."""
    problems = []
    for split, items in by_split.items():
        known = [foreground[i.mask] for i in items if foreground.get(i.mask) is not None]
        if known and not any(known):
            problems.append(Problem(
                root, "all-empty-masks",
                f"{root}: all {len(known)} mask(s) of split '{split}' are empty (no foreground pixel); "
                "nothing can be learned or measured from them - check the mask files or their value levels",
                split=split, count=len(known),
            ))
    return problems


def _unused_image_problems(root: Path, by_split: dict[str, list[Item]], reported: list[Problem]) -> list[Problem]:
    """A warning counting files in images/ that no split uses (they are silently never trained on).

    An image a split lists but could not take (e.g. ``no-prompt``) already has
    its error in `reported`: it is not also "in no split".
    """
    images_dir = root / "images"
    if not images_dir.is_dir():
        return []
    used = {i.image.resolve() for items in by_split.values() for i in items}
    used |= {p.path.resolve() for p in reported if p.path.parent.resolve() == images_dir.resolve()}
    unused = sorted(p.name for p in images_dir.iterdir() if p.is_file() and is_supported(p) and p.resolve() not in used)
    if not unused:
        return []
    shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
    return [Problem(
        images_dir, "unused-images",
        f"{images_dir}: {len(unused)} image(s) in no split ({shown}); they are never used. "
        "Add them to a split or move them out (a warning: training goes on)",
        count=len(unused),
    )]


def _overlap_problems(by_split: dict[str, list[Item]]) -> list[Problem]:
    first_split: dict[Path, str] = {}
    problems = []
    for split, items in by_split.items():
        for image in dict.fromkeys(i.image for i in items):
            other = first_split.setdefault(image, split)
            if other != split:
                problems.append(Problem(image, "split-overlap", f"{image}: in both split '{other}' and split '{split}'",
                                        split=split))
    return problems


def check_dataset(root: str | Path, splits: Sequence[str] | None = None) -> list[Problem]:
    """Every problem of the dataset at ``root`` (all splits by default), in a stable order.

    Indexing problems first (per split), then cross-split overlap, then one
    decode of each distinct (image, mask) pair, then per-split findings
    (``all-empty-masks``) and, for a full check (``splits=None``), the
    ``unused-images`` warning. An empty list means clean; a list of only
    warnings (``Problem.is_warning``) means usable.
    """
    root = Path(root)
    try:
        detect_format(root)
    except DataError as exc:
        sites = find_sites(root)
        if sites:
            names = ", ".join(s.name for s in sites[:4]) + (", ..." if len(sites) > 4 else "")
            msg = (f"{root}: a multi-site root ({len(sites)} site folders: {names}), not one dataset; "
                   f"`fedvlsm data check {root}` checks each site, training takes one site's folder")
            return [Problem(root, "unknown-format", msg)]
        return [Problem(root, "unknown-format", str(exc))]
    names = list(splits) if splits is not None else available_splits(root)
    problems: list[Problem] = []
    by_split: dict[str, list[Item]] = {}
    for split in names:
        items, split_problems = scan_split(root, split)
        by_split[split] = items
        problems += [replace(p, split=split) for p in split_problems]
    overlap = _overlap_problems(by_split)
    problems += overlap
    first_split = {}
    for split, items in by_split.items():
        for i in items:
            first_split.setdefault((i.image, i.mask), (split, i))
    foreground: dict[Path, bool | None] = {}
    for split, item in first_split.values():
        file_problems, foreground[item.mask] = _file_problems(item)
        problems += [replace(p, split=split) for p in file_problems]
    problems += _empty_mask_problems(root, by_split, foreground)
    if splits is None:
        problems += _unused_image_problems(root, by_split, problems)
    return _dedupe(problems)


def errors(problems: Sequence[Problem]) -> list[Problem]:
    """The problems that make a dataset unusable (everything but warnings)."""
    return [p for p in problems if not p.is_warning]


def find_sites(root: str | Path) -> list[Path]:
    """Site folders of a multi-site root; [] when ``root`` is not one.

    A root is multi-site when it is not a dataset itself and either has
    ``sites.json`` (``fedvlsm data synth``: its ``sites[].path`` entries, in
    order) or holds dataset folders (sorted by name).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    with contextlib.suppress(DataError):  # not a single dataset: look for a multi-site root below
        detect_format(root)
        return []
    meta = root / "sites.json"
    if meta.is_file():
        try:
            listed = [root / str(s["path"]) for s in json.loads(meta.read_text(encoding="utf-8"))["sites"]]
            if listed:
                return listed
        except (OSError, ValueError, KeyError, TypeError):
            pass  # fall back to looking at the folders
    sites = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            detect_format(sub)
            sites.append(sub)
        except DataError:
            continue
    return sites


def check_sites(root: str | Path, splits: Sequence[str] | None = None) -> dict[Path, list[Problem]]:
    """``check_dataset`` of every site of a multi-site root (see ``find_sites``), in order."""
    return {site: check_dataset(site, splits=splits) for site in find_sites(root)}


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # A file-level problem (e.g. a malformed prompts.json) is found once per
    # split scanned: report it once, under the first split.
    return list({(p.path, p.kind, p.message): p for p in reversed(problems)}.values())[::-1]


def ensure_valid(root: str | Path, splits: Sequence[str] = ("train", "val", "test")) -> None:
    """Raise ``DataError`` listing every problem of ``splits`` of ``root``; return quietly if clean."""
    problems = errors(check_dataset(root, splits=splits))
    if problems:
        raise DataError(format_problems(problems, str(root)))


# --------------------------------------------------------------------------
# Site-side summary for the federation (sent to the server: no paths)
# --------------------------------------------------------------------------

# Bump when the checks change so that cached verdicts of older rules are redone.
CHECK_VERSION = 4  # 3: JPEG {0, 1} masks have foreground (binarize_mask); 4: transparent mask pixels
CACHE_NAME = "data-check.json"
# Files whose content can change a verdict; caches (.npz) and logs are not.
_FINGERPRINT_EXTS = SUPPORTED_EXTS + (".json", ".csv")


@dataclass
class SiteCheck:
    """A site's data check, split in what may leave the site and what may not.

    ``ok``: no error (warnings allowed). ``counts``: problem kind -> split ->
    number of problems (files, for ``unused-images``); split names other than
    train/val/test show as ``other``, problems of no split as ``all``.
    ``summary``: one line of kinds and counts only - never a file name, path
    or exception text - safe to send to the server. ``details``: the full
    messages, for the site's own log only. ``fingerprint``: the
    ``data_fingerprint`` the verdict is for (set by ``site_data_check``).
    """

    ok: bool
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    summary: str = "data check: OK"
    details: list[str] = field(default_factory=list)
    fingerprint: str = ""


def _public_split(split: str | None) -> str:
    # Split names come from the site's files (anns/*.json, splits.json keys):
    # only the standard ones may appear in what is sent.
    if split is None:
        return "all"
    return split if split in STANDARD_SPLITS else "other"


def summarize(problems: Sequence[Problem]) -> SiteCheck:
    """A ``SiteCheck`` of a problem list (see ``SiteCheck`` for what may be sent)."""
    counts: dict[str, dict[str, int]] = {}
    for p in problems:
        per_split = counts.setdefault(p.kind, {})
        split = _public_split(p.split)
        per_split[split] = per_split.get(split, 0) + p.count
    ok = not errors(problems)
    parts = [
        f"{n} {kind}{' (warning)' if kind in WARNING_KINDS else ''} in {split}"
        for kind in sorted(counts, key=lambda k: (k in WARNING_KINDS, k))
        for split, n in sorted(counts[kind].items())
    ]
    listed = ", ".join(parts)
    summary = "data check: " + ("OK" + (f"; {listed}" if listed else "") if ok else listed)
    return SiteCheck(ok=ok, counts=counts, summary=summary, details=[str(p) for p in problems])


def data_fingerprint(data_path: str | Path, exclude: str | Path | None = None) -> str:
    """Hash of the relative names, sizes and mtimes of a dataset's files (not their content: cheap).

    ``exclude`` (a cache folder inside the dataset) is skipped, as are files
    that cannot change a verdict (only images, masks, .json and .csv count).
    """
    root = Path(data_path)
    skip = Path(exclude).resolve() if exclude is not None else None
    h = hashlib.sha256(f"fedvlsm-data-check-v{CHECK_VERSION}".encode())
    if root.is_dir():
        # One os.walk (file types come with the directory entries) and one
        # stat per counted file; paths are resolved per directory, and per
        # file only for symlinks. Runs at every message of every site, so it
        # must stay cheap; the hash is the same as rglob's walk gave.
        found: list[tuple[tuple[str, ...], os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if skip is not None and here.resolve().is_relative_to(skip):
                dirnames[:] = []
                continue
            rel = here.relative_to(root).parts
            for name in filenames:
                if file_ext(name) not in _FINGERPRINT_EXTS:
                    continue
                full = os.path.join(dirpath, name)  # strings, not Paths: this loop is the hot part
                if os.path.islink(full) and (not os.path.isfile(full) or (
                        skip is not None and Path(full).resolve().is_relative_to(skip))):
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                found.append(((*rel, name), st))
        for parts, st in sorted(found, key=lambda x: x[0]):
            h.update(f"{'/'.join(parts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def site_data_check(data_path: Path, cache_dir: Path) -> SiteCheck:
    """Check a site's dataset (all splits), reusing the verdict while its files are unchanged.

    The full check decodes every image and mask; its result is cached in
    ``cache_dir/data-check.json`` keyed by ``data_fingerprint`` (names,
    sizes, mtimes), so it runs once per data change, not once per round.
    """
    data_path, cache_dir = Path(data_path), Path(cache_dir)
    fingerprint = data_fingerprint(data_path, exclude=cache_dir)
    cache = cache_dir / CACHE_NAME
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == fingerprint:
            return replace(SiteCheck(**cached["result"]), fingerprint=fingerprint)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or an unreadable one: check again
    result = summarize(check_dataset(data_path))
    write_json_atomic(cache, {"fingerprint": fingerprint, "result": result.__dict__})
    return replace(result, fingerprint=fingerprint)
