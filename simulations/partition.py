"""Simulated sites: which items each of K simulated hospitals holds.

Schemes (run config ``partition``; ``partition-alpha`` is the Dirichlet
concentration of the two skewed ones, smaller = more skewed):

- ``natural``: one dataset folder per site (``<data>/site-*`` or any
  sub-folder that is a dataset, sorted by name); K must equal the number of
  folders. The synthetic demo sites are natural sites.
- ``iid``: all items pooled (``<data>`` itself if it is one dataset, else the
  union of its site folders), shuffled, dealt round-robin to K sites.
- ``quantity-skew``: pooled and shuffled like iid, but site k gets a share
  p_k of every split, p ~ Dirichlet(alpha * 1_K).
- ``dirichlet``: a Dirichlet mix of the source folders' *styles* (domains):
  for each source folder s, q_s ~ Dirichlet(alpha * 1_K) gives the share of
  s's items that each of the K sites receives. Small alpha: each site is
  dominated by one or two styles; large alpha: every site sees a similar mix.

The same shares are used for train, val and test, so a site is evaluated on
data distributed like its training data. Every split of every site gets at
least one item (one is moved from the largest site if a draw leaves a site
empty). Everything is drawn from ``numpy.random.default_rng([seed, ...])``:
the same seed, data and K give the same partition in every process, which
is what lets each simulated ClientApp compute its own share independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from common.data.formats import (
    STANDARD_SPLITS,
    Item,
    available_splits,
    detect_format,
    load_items,
)

SCHEMES = ("natural", "iid", "quantity-skew", "dirichlet")


class PartitionError(ValueError):
    """A partition that cannot be made from the data as asked."""


@dataclass(frozen=True)
class Sourced:
    """An item and the source folder (style) it came from."""

    item: Item
    source: int


def is_dataset(path: Path) -> bool:
    try:
        detect_format(path)
    except (ValueError, OSError):
        return False
    return True


def site_folders(root: Path) -> list[Path]:
    """Sub-folders of `root` that are datasets, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise PartitionError(f"data folder {root} does not exist (run config 'data')")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_dataset(p))


def _sources(root: Path) -> list[Path]:
    folders = site_folders(root)
    if folders:
        return folders
    if is_dataset(root):
        return [root]
    raise PartitionError(f"{root}: neither a dataset nor a folder of site datasets (run config 'data')")


def _pooled(sources: list[Path], split: str) -> list[Sourced]:
    out = []
    for s, folder in enumerate(sources):
        if split in available_splits(folder):
            out.extend(Sourced(item, s) for item in load_items(folder, split))
    return out


def _shares_to_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of n * shares to integers that sum to n."""
    raw = n * shares
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _ensure_nonempty(parts: list[list[Sourced]], split: str) -> None:
    for k, part in enumerate(parts):
        if not part:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            if len(parts[donor]) < 2:
                raise PartitionError(
                    f"split '{split}' has too few items for {len(parts)} sites (site {k} would be empty)"
                )
            part.append(parts[donor].pop())


def partition(
    root: str | Path,
    scheme: str,
    num_partitions: int,
    seed: int = 0,
    alpha: float = 0.5,
    splits: tuple[str, ...] = STANDARD_SPLITS,
) -> list[dict[str, list[Item]]]:
    """For each of `num_partitions` sites: split name -> its items."""
    if scheme not in SCHEMES:
        raise PartitionError(f"run config 'partition': unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if num_partitions < 1:
        raise PartitionError(f"need at least one site, got {num_partitions}")
    root = Path(root)
    if scheme == "natural":
        folders = site_folders(root)
        if len(folders) != num_partitions:
            raise PartitionError(
                f"natural partition of {root}: {len(folders)} site folder(s) "
                f"({', '.join(f.name for f in folders) or 'none'}) but {num_partitions} simulated site(s); "
                f"run with --federation-config \"num-supernodes={len(folders) or 'N'}\" "
                "or choose partition = 'iid' / 'quantity-skew' / 'dirichlet'"
            )
        return [{split: load_items(f, split) for split in splits} for f in folders]

    sources = _sources(root)
    rng = np.random.default_rng([seed, num_partitions, SCHEMES.index(scheme)])
    if scheme == "dirichlet":
        # One share vector per style, drawn once: every split follows it.
        style_shares = rng.dirichlet(np.full(num_partitions, alpha), size=len(sources))
    elif scheme == "quantity-skew":
        site_shares = rng.dirichlet(np.full(num_partitions, alpha))
    out: list[dict[str, list[Item]]] = [{} for _ in range(num_partitions)]
    for split_index, split in enumerate(splits):
        pool = _pooled(sources, split)
        order = np.random.default_rng([seed, num_partitions, split_index]).permutation(len(pool))
        pool = [pool[i] for i in order]
        parts: list[list[Sourced]] = [[] for _ in range(num_partitions)]
        if scheme == "iid":
            for i, x in enumerate(pool):
                parts[i % num_partitions].append(x)
        elif scheme == "quantity-skew":
            bounds = np.cumsum([0, *_shares_to_counts(len(pool), site_shares)])
            parts = [pool[lo:hi] for lo, hi in pairwise(bounds)]
        else:
            for s in range(len(sources)):
                of_style = [x for x in pool if x.source == s]
                bounds = np.cumsum([0, *_shares_to_counts(len(of_style), style_shares[s])])
                for k, (lo, hi) in enumerate(pairwise(bounds)):
                    parts[k].extend(of_style[lo:hi])
        _ensure_nonempty(parts, split)
        for k in range(num_partitions):
            out[k][split] = [x.item for x in parts[k]]
    return out


def site_items(
    root: str | Path, scheme: str, partition_id: int, num_partitions: int, seed: int = 0, alpha: float = 0.5
) -> dict[str, list[Item]]:
    """The share of one simulated site (what a ClientApp calls with its partition-id)."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    if scheme == "natural":
        # A natural site is one folder: read only it (partition() would scan
        # every site's folders, on every message of every site).
        folders = site_folders(Path(root))
        if len(folders) == num_partitions:
            return {split: load_items(folders[partition_id], split) for split in STANDARD_SPLITS}
    return partition(root, scheme, num_partitions, seed, alpha)[partition_id]


def describe(parts: list[dict[str, list[Item]]], root: str | Path) -> str:
    """A small table: items per site and split, and (skewed schemes) per source folder."""
    sources = {str(p.resolve()): p.name for p in _sources(Path(root))}
    lines = []
    for k, part in enumerate(parts):
        counts = ", ".join(f"{split} {len(items)}" for split, items in part.items())
        styles: dict[str, int] = {}
        for item in part.get("train", []):
            for path, name in sources.items():
                if str(Path(item.image).resolve()).startswith(path + "/"):
                    styles[name] = styles.get(name, 0) + 1
        mix = ", ".join(f"{name} {n}" for name, n in sorted(styles.items()))
        lines.append(f"site-{k}: {counts}" + (f" | train by source: {mix}" if len(sources) > 1 else ""))
    return "\n".join(lines)
