"""A site's own privacy terms: set by the hospital in its node config, not by a run.

`fedvlsm site start --dp-require / --dp-site-budget EPS / --dp-site-delta D /
--min-figure-images N` put them in the SuperNode's node config; the train
handler refuses any run that is not sample-level DP when either of the first
two is set, `common.privacy.fit_private` keeps the epsilon of all the site's
runs together within the budget, and a deployed site serves no split with
fewer than N images. No torch here: the site launcher checks the values
before it starts anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SitePolicyError(ValueError):
    """A site privacy setting that cannot be used (the message names the node-config key)."""


# Node-config keys (`fedvlsm site start --dp-require / --dp-site-budget / --dp-site-delta`):
# set by the hospital, not by the run, so a server cannot switch them off.
NODE_DP_REQUIRE = "dp-require"
NODE_DP_SITE_BUDGET = "dp-site-budget"
NODE_DP_SITE_DELTA = "dp-site-delta"
# `fedvlsm site start --min-figure-images N`: the fewest images any figure a deployed site sends
# (a split's Dice or loss) may cover. A mean over one image is that image's value.
NODE_MIN_FIGURE_IMAGES = "min-figure-images"
# The default, as small-number suppression in health statistics (cells under 5 withheld); 2 is the
# floor: below it a figure is one image's own value, whatever the hospital sets.
DEFAULT_MIN_FIGURE_IMAGES = 5
MIN_FIGURE_IMAGES_FLOOR = 2
MIN_FIGURE_IMAGES_CEILING = 1_000_000


def small_splits(data: Path, minimum: int) -> list[str]:
    """`split (n image(s))` for each of the data's splits that lists fewer than `minimum` images:
    the splits a deployed site with that `min-figure-images` refuses to serve (client/site.py).

    Said by `fedvlsm site start` before it starts (rather than by a refusal in round 1) and noted by
    `fedvlsm data check`. Splits that cannot be listed are left to the data check, which says what is
    wrong with them.
    """
    from common.data.formats import scan_split  # numpy and PIL, not torch: the launcher stays light

    small = []
    for split in ("train", "val", "test"):
        items, problems = scan_split(data, split)
        if not problems and len(items) < minimum:
            small.append(f"{split} ({len(items)} image(s))")
    return small


@dataclass(frozen=True)
class SitePolicy:
    """A site's own privacy terms, whatever a run's config asks.

    A run's `dp-epsilon-budget` is the server's promise for that run: a
    server can start another run (a new accountant, a fresh budget for the
    same images) or send `dp = "off"`. A site that must not rely on that
    sets `budget`: the epsilon of all DP-SGD runs on its data together (every
    state file in its `privacy/` folder, composed with the RDP accountant at
    `delta`), and trains no round past it; `budget` or `require_dp` also
    refuse every run that is not sample-level DP.
    """

    require_dp: bool = False
    budget: float = 0.0  # epsilon over every run on this site's data (0: none)
    delta: float = 1e-5
    # A deployed site's every split (train, val, test) must hold at least this many images: its
    # replies carry each split's mean loss or Dice, which for one image is that image's value.
    min_figure_images: int = DEFAULT_MIN_FIGURE_IMAGES

    @property
    def demands_dp(self) -> bool:
        return self.require_dp or self.budget > 0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy in a SuperNode's node config; SitePolicyError naming the key if a value is unusable."""
        require = node_config.get(NODE_DP_REQUIRE, False)
        if isinstance(require, str) and require.lower() in ("true", "false"):
            require = require.lower() == "true"
        if not isinstance(require, bool):
            raise SitePolicyError(f"node config '{NODE_DP_REQUIRE}': expected true or false, got {require!r}")
        values = {}
        for key, default in ((NODE_DP_SITE_BUDGET, 0.0), (NODE_DP_SITE_DELTA, 1e-5)):
            raw = node_config.get(key, default)
            try:
                if isinstance(raw, bool):
                    raise TypeError
                values[key] = float(raw)
            except (TypeError, ValueError):
                raise SitePolicyError(f"node config '{key}': expected a number, got {raw!r}") from None
        budget, delta = values[NODE_DP_SITE_BUDGET], values[NODE_DP_SITE_DELTA]
        if not math.isfinite(budget) or budget < 0:
            raise SitePolicyError(f"node config '{NODE_DP_SITE_BUDGET}': must be a finite epsilon >= 0 "
                                  f"(0: none), got {budget}")
        if not 0.0 < delta < 1.0:
            raise SitePolicyError(f"node config '{NODE_DP_SITE_DELTA}': must be in (0, 1), got {delta}")
        return cls(require, budget, delta, _min_figure_images(node_config))


def _min_figure_images(node_config: Mapping[str, Any]) -> int:
    raw = node_config.get(NODE_MIN_FIGURE_IMAGES, DEFAULT_MIN_FIGURE_IMAGES)
    low, high = MIN_FIGURE_IMAGES_FLOOR, MIN_FIGURE_IMAGES_CEILING
    value = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().isdigit():  # Flower may hand a TOML string through
        value = int(raw.strip())
    if value is None or not low <= value <= high:
        raise SitePolicyError(f"node config '{NODE_MIN_FIGURE_IMAGES}': expected a whole number of images in "
                              f"[{low}, {high}] (below {low} a figure is one image's own value), got "
                              f"{repr(raw) if value is None else value}")
    return value


# ------------------------------------------------------------ whose data a privacy ledger accounts
# In `<site-dir>/privacy/`: the data folders (resolved, one per line) whose DP-SGD steps the folder's
# state files account. A site budget bounds every run on the *data*; the ledger is per site folder,
# so a site restarted with another --site-name or --site-dir began a fresh ledger for the same images.
LEDGER_DATA_FILE = "data-path.txt"


def ledger_data(site_dir: Path) -> list[str]:
    """The data folders the privacy ledger in `site_dir` accounts (none if it has no marker)."""
    marker = Path(site_dir) / "privacy" / LEDGER_DATA_FILE
    return marker.read_text(encoding="utf-8").splitlines() if marker.is_file() else []


def mark_ledger(site_dir: Path, data_path: Path) -> None:
    """Record that `site_dir`'s ledger accounts `data_path` (kept with any it accounted before)."""
    from common.atomic import write_text_atomic

    data = str(Path(data_path).expanduser().resolve())
    known = ledger_data(site_dir)
    if data not in known:
        (Path(site_dir) / "privacy").mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(site_dir) / "privacy" / LEDGER_DATA_FILE, "".join(f"{d}\n" for d in known + [data]))


def ledgers_elsewhere(data_path: Path, site_dir: Path, roots: list[Path] | None = None) -> list[Path]:
    """Other site folders under `roots` whose privacy ledger holds runs on `data_path`.

    `roots`: where a site's folders are made; default `$FEDVLSM_HOME/sites` and the parent of this
    site's own folder (a --site-dir elsewhere). A folder whose marker cannot be read counts as
    found: the budget must not restart because a file was unreadable.
    """
    from common.site_naming import fedvlsm_home

    data = str(Path(data_path).expanduser().resolve())
    own = Path(site_dir).expanduser().resolve()
    roots = roots if roots is not None else [fedvlsm_home() / "sites", own.parent]
    found: list[Path] = []
    for root in dict.fromkeys(Path(r).expanduser().resolve() for r in roots):
        for folder in _subfolders(root):
            if folder.resolve() == own or not _charged(folder):
                continue
            try:
                accounts = data in ledger_data(folder)
            except (OSError, UnicodeDecodeError):
                accounts = True
            if accounts:
                found.append(folder)
    return found


def _subfolders(root: Path) -> list[Path]:
    """The folders in `root`; none where it cannot be listed (a site folder's parent may hold others')."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    folders = []
    for entry in entries:
        try:
            if entry.is_dir():
                folders.append(entry)
        except OSError:  # an entry this user may not look at is no site folder of its own
            continue
    return folders


def _charged(folder: Path) -> bool:
    """Whether `folder` holds a privacy ledger with at least one run's state file."""
    try:
        return any((folder / "privacy").glob("*.json"))
    except OSError:
        return False
