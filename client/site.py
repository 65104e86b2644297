"""One site (hospital) as its ClientApp sees it: frozen base, data, site-local state.

Why this file exists: Flower builds a new ClientApp for every message, and
in deployment a SuperNode even starts a new *process* for every message.
So anything worth keeping must live somewhere that outlives the message:

- The frozen base: a per-process cache keyed by base spec (``base``). In
  simulation one Ray actor serves many messages (and sites), so the base is
  loaded once per actor; in deployment each message pays one load. Load
  count and seconds are reported in every reply's metrics.
- Preprocessed images: ``<site-dir>/cache/`` (SegDataset's npz cache), which
  survives processes, rounds and runs.
- Personalised adapter parts (run config ``personal``): written each round
  to ``<site-dir>/runs/<run-name>/personal/round-NNNN.safetensors``. They
  never leave the site, and a resumed run finds them again.
- A small per-run history in Flower's ``context.state`` (rounds trained),
  which the SuperNode keeps across messages of one run.
- Idle adapter models (``Site.leased_model``): building one walks the base
  and initialises every adapter module, about 5 ms on ``arch:tiny`` and paid
  twice per evaluate message; a warm process (Ray actor, site worker) resets
  an idle one to the initial adapter instead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path, write_text_atomic
from common.bases import Base, load_base
from common.config import TrainConfig
from common.data import SegDataset, load_items
from common.data.formats import Item
from common.federation_config import (
    NODE_DATA_PATH,
    NODE_PARTITION_ID,
    NODE_SITE_DIR,
    NODE_SITE_NAME,
    FederationConfig,
    SiteIdentity,
)
from common.adapters.baselines import MUTATING
from common.model import AdaptedCLIPSeg
from common.payload import split_personal
from common.site_errors import SiteRefusal
from common.site_naming import default_site_dir, default_site_name
from common.site_policy import SitePolicy, SitePolicyError

# The per-process cache. A module global on purpose: it is exactly the
# thing that must outlive one ClientApp object (and nothing else lives here).
_BASES: dict[str, Base] = {}
_STATS: dict[str, float] = {"base-loads": 0, "base-load-seconds": 0.0, "process-messages": 0}

# (what the site reads, fingerprints of its data as checked) -> its items. A warm process
# (Ray actor, site worker) lists a site's files once per change, not once per message.
_ITEMS: dict[tuple, dict[str, list[Item]]] = {}

# (base, adapter spec, seed) -> idle models of this process, each with its initial adapter state.
_IDLE_MODELS: dict[tuple, list[tuple[Base, AdaptedCLIPSeg, dict[str, torch.Tensor]]]] = {}
_MAX_IDLE = 1  # the handlers lease one model at a time
# Keys (runs' adapter, seed, base) whose idle models are kept: a site worker serving many runs (a seed
# sweep, adapter comparisons) kept one model per run it ever served; now only the latest few.
_MAX_IDLE_KEYS = 2

_PERSONAL_FILE = re.compile(r"^round-(\d{4,})\.safetensors$")
_RUN_ID_MARKER = "run-id"  # in a personal folder: the run whose parts it holds


def base(spec: str) -> Base:
    """The frozen base for `spec`, loaded at most once per process."""
    if spec not in _BASES:
        start = time.perf_counter()
        _BASES[spec] = load_base(spec)
        _STATS["base-loads"] += 1
        _STATS["base-load-seconds"] += time.perf_counter() - start
    return _BASES[spec]


def site_name_for(node_config: Mapping[str, Any]) -> str:
    """The site's name from its node config alone (for replies when nothing else worked)."""
    if node_config.get(NODE_SITE_NAME):
        return str(node_config[NODE_SITE_NAME])
    if NODE_PARTITION_ID in node_config:
        return f"site-{int(node_config[NODE_PARTITION_ID])}"
    if node_config.get(NODE_DATA_PATH):  # as SiteIdentity names it: never the data folder's own name
        data = Path(str(node_config[NODE_DATA_PATH]))
        try:
            return default_site_name(data, node_config.get(NODE_SITE_DIR, "") or default_site_dir(data))
        except (OSError, ValueError):  # no key to be had: a name that says nothing rather than none
            return "unnamed-site"
    return "unnamed-site"


def process_stats() -> dict[str, float]:
    """Base loads and seconds in this process, and how many messages it served."""
    return dict(_STATS)


class Site:
    """A site's view for one message: identity, data, personal state."""

    def __init__(self, cfg: FederationConfig, node_config: Mapping[str, Any]) -> None:
        _STATS["process-messages"] += 1
        self.cfg = cfg
        self.identity = SiteIdentity.from_node_config(node_config, cfg)
        self._node_config = node_config
        self._items: dict[str, list[Item]] | None = None
        self._sim_root: Path | None = None
        self._sim_folders: list[Path] | None = None
        # Set by ensure_data_ok: the data fingerprints its verdict is for (keys the items memo).
        self._checked: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def site_dir(self) -> Path:
        return self.identity.site_dir

    @cached_property
    def policy(self) -> SitePolicy:
        """The site's own terms from its node config (common/site_policy.py), read once per message."""
        try:
            return SitePolicy.from_node_config(self._node_config)
        except SitePolicyError as err:
            raise SiteRefusal("site config: a privacy setting is not usable", str(err)) from err

    # ------------------------------------------------------------------ data
    def items(self, split: str) -> list[Item]:
        if self._items is None:
            if self._checked is None:  # no data check in this message: nothing vouches for a memo
                self._items = self._load_items()
            else:
                ident = self.identity
                key = (str(self.data_to_check()), ident.partition_id, ident.num_partitions,
                       self.cfg.partition, self.cfg.seed, self.cfg.partition_alpha, self._checked)
                if key not in _ITEMS:
                    if len(_ITEMS) >= 64:  # sites x data versions seen by one process: keep it bounded
                        _ITEMS.pop(next(iter(_ITEMS)))
                    _ITEMS[key] = self._load_items()
                self._items = _ITEMS[key]
        items = self._items[split]
        return items[: self.cfg.max_images] if self.cfg.max_images else items

    def _load_items(self) -> dict[str, list[Item]]:
        ident = self.identity
        if ident.data_path is not None:
            return {split: load_items(ident.data_path, split) for split in ("train", "val", "test")}
        from simulations.partition import site_items  # simulation only

        assert ident.partition_id is not None and ident.num_partitions is not None
        return site_items(
            self.simulation_data_root(),
            self.cfg.partition,
            ident.partition_id,
            ident.num_partitions,
            seed=self.cfg.seed,
            alpha=self.cfg.partition_alpha,
        )

    def simulation_data_root(self) -> Path:
        """The folder a simulation partitions (the demo's sites are synthesised on first use).

        Asked for by the items and by the data check of one message: found once.
        """
        if self._sim_root is None:
            self._sim_root = self._find_simulation_data_root()
        return self._sim_root

    def _find_simulation_data_root(self) -> Path:
        from simulations.demo_data import prepare_data  # simulation only

        assert self.identity.num_partitions is not None
        root = prepare_data(self.cfg, self.identity.num_partitions)
        if self.cfg.partition == "natural":
            folders = self._site_folders(root)
            if len(folders) != self.identity.num_partitions:
                raise SiteRefusal(
                    f"simulation: the data has {len(folders)} site folder(s) for {self.identity.num_partitions} "
                    f"SuperNode(s); use num-supernodes={len(folders)} or a partition other than 'natural'")
        return root

    def data_to_check(self) -> Path:
        """The folder whose data this site trains on (its own folder, or the partitioned root)."""
        ident = self.identity
        if ident.data_path is not None:
            return ident.data_path
        root = self.simulation_data_root()
        if self.cfg.partition == "natural":
            assert ident.partition_id is not None
            return self._site_folders(root)[ident.partition_id]
        return root

    def _site_folders(self, root: Path) -> list[Path]:
        """`site_folders(root)`, listed once per message (it tests every folder's format)."""
        if self._sim_folders is None:
            from simulations.partition import site_folders

            self._sim_folders = site_folders(root)
        return self._sim_folders

    def ensure_data_ok(self) -> None:
        """Refuse to serve on data that fails `fedvlsm data check` (cached by a fingerprint of the data).

        The refusal's reason holds categories and counts only; the per-file
        messages go to the site's own log with the refusal.
        """
        from common.data.check import site_data_check

        folder = self.data_to_check()
        sources = [folder]
        if self.identity.data_path is None and self.cfg.partition != "natural":
            # A partitioned simulation pools a multi-site root: check each source dataset (one cache each).
            from simulations.partition import is_dataset

            sources = [folder] if is_dataset(folder) else self._site_folders(folder)
        fingerprints = []
        for k, source in enumerate(sources):
            cache = self.site_dir / "cache" if source == folder else self.site_dir / "cache" / f"source-{k}"
            result = site_data_check(source, cache)
            if not result.ok:
                raise SiteRefusal(result.summary, "\n".join(result.details))
            fingerprints.append(result.fingerprint)
        self._checked = tuple(fingerprints)

    def dataset(self, split: str, frozen: Base, train: bool, seed: int = 0) -> SegDataset:
        items = self.items(split)
        self._refuse_small_split(split, len(items))
        return SegDataset(
            items,
            frozen.image_size,
            train=train,
            prompt_index=None if train else TrainConfig.eval_prompt_index,
            seed=seed,
            cache_dir=self.site_dir / "cache",
        )

    def _refuse_small_split(self, split: str, count: int) -> None:
        """A deployed site serves no split smaller than its `min-figure-images`.

        Every reply carries a split's mean (train loss, validation Dice and loss, test Dice): over
        one image that is the image's own value. A simulation's sites are partitions of data the
        server process holds anyway, so only a deployed site (one with a data-path) refuses.
        """
        minimum = self.policy.min_figure_images
        if self.identity.data_path is not None and count < minimum:
            raise SiteRefusal(f"site policy: the {split} split has {count} image(s), fewer than this site's "
                              f"min-figure-images ({minimum}); it sends no figure over so few")

    # --------------------------------------------------------- personal parts
    def personal_dir(self, run_name: str, run_id: str = "") -> Path:
        """`<site-dir>/runs/<run-name>/personal`, holding the parts of run `run_id` only.

        A run of the same name made earlier (deleted at the server, then started
        anew) left its parts there: they are moved aside to `personal-<its id>`
        (nothing is deleted), so the new run never starts from them.
        """
        folder = self.site_dir / "runs" / run_name / "personal"
        if not run_id:  # a message from a server that sends no run id: as before
            return folder
        marker = folder / _RUN_ID_MARKER
        owner = marker.read_text().strip() if marker.is_file() else None
        if owner == run_id:
            return folder
        if folder.is_dir() and any(folder.iterdir()):
            aside = folder.with_name(f"personal-{owner or 'unknown'}")
            aside = aside if not aside.exists() else aside.with_name(f"{aside.name}-{time.time_ns()}")
            folder.rename(aside)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, run_id)
        return folder

    def load_personal(self, run_name: str, before_round: int, run_id: str = "") -> dict[str, torch.Tensor]:
        """The latest personal parts saved before `before_round` ({} if none yet, or the run keeps none)."""
        if not self.cfg.personal:  # a run without personal parts starts every round from the global adapter
            return {}
        return self.personal_parts(run_name, self.personal_round(run_name, before_round, run_id), run_id)

    def personal_parts(self, run_name: str, saved_round: int, run_id: str = "") -> dict[str, torch.Tensor]:
        """The personal parts saved in round `saved_round` (`personal_round`'s answer; 0: none)."""
        if not self.cfg.personal or not saved_round:
            return {}
        state = load_file(str(self.personal_dir(run_name, run_id) / f"round-{saved_round:04d}.safetensors"))
        return split_personal(state, self.cfg.personal)[1]  # only what this run keeps personal

    def personal_round(self, run_name: str, before_round: int, run_id: str = "") -> int:
        """The round of the personal parts `load_personal` takes (0: none). Sent with each train reply,
        so that the server sees parts lost since the site last trained (`check_personal_kept`)."""
        folder = self.personal_dir(run_name, run_id)
        if not folder.is_dir():
            return 0
        rounds = [int(m.group(1)) for p in folder.iterdir() if (m := _PERSONAL_FILE.match(p.name))]
        return max((r for r in rounds if r < before_round), default=0)

    def save_personal(self, run_name: str, server_round: int, state: Mapping[str, torch.Tensor],
                      run_id: str = "") -> None:
        """Atomically write this round's personal parts (never sent anywhere)."""
        if not state:
            return
        with atomic_path(self.personal_dir(run_name, run_id) / f"round-{server_round:04d}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))

    # ------------------------------------------------------------------ model
    def model(
        self,
        frozen: Base,
        shared: Mapping[str, torch.Tensor] | None = None,
        personal: Mapping[str, torch.Tensor] | None = None,
    ) -> AdaptedCLIPSeg:
        """Fresh adapters on the cached base, then the global (shared) and personal tensors."""
        return self._load(self.cfg.initial_model(frozen), shared, personal)

    @contextmanager
    def leased_model(
        self,
        frozen: Base,
        shared: Mapping[str, torch.Tensor] | None = None,
        personal: Mapping[str, torch.Tensor] | None = None,
    ) -> Iterator[AdaptedCLIPSeg]:
        """`model(...)` on an idle model of this process when there is one (reset to the initial adapter).

        The model goes back to the idle list when the block ends normally; one
        left by an exception (mid-training, half-loaded) is dropped. Always a
        fresh model for DP-SGD (Opacus hooks into the modules) and for the
        baselines that copy the base ("full", "lora", "decoder": an idle copy
        and its initial state would hold two copies of the base).
        """
        spec = self.cfg.adapter_spec()
        key = (spec, self.cfg.seed, frozen.base_id)
        reuse = self.cfg.dp != "sample" and spec.variant not in MUTATING
        idle = [e for e in _IDLE_MODELS.get(key, []) if e[0] is frozen] if reuse else []
        if idle:
            _, model, initial = idle[0]
            _IDLE_MODELS[key].remove(idle[0])
            model.load_adapter_state(initial)
        else:
            model = self.cfg.initial_model(frozen)
            initial = model.adapter_state()
        yield self._load(model, shared, personal)
        if reuse:
            for p in model.trainable_parameters():
                p.grad = None
            model.train(False)
            # Models on another object of the same base (reloaded) are never leased again: drop them.
            pool = [e for e in _IDLE_MODELS.pop(key, []) if e[0] is frozen]
            _IDLE_MODELS[key] = pool + [(frozen, model, initial)] if len(pool) < _MAX_IDLE else pool
            while len(_IDLE_MODELS) > _MAX_IDLE_KEYS:  # the least recently returned key goes first
                del _IDLE_MODELS[next(iter(_IDLE_MODELS))]

    def _load(self, model: AdaptedCLIPSeg, shared: Mapping[str, torch.Tensor] | None,
              personal: Mapping[str, torch.Tensor] | None) -> AdaptedCLIPSeg:
        if shared:
            expected, _ = split_personal(dict.fromkeys(model.adapter_names()), self.cfg.personal)
            if set(shared) != set(expected):
                missing = sorted(set(expected) - set(shared))[:3]
                extra = sorted(set(shared) - set(expected))[:3]
                raise ValueError(
                    f"site {self.name}: the global adapter does not match this site's model "
                    f"(missing e.g. {missing}, unexpected e.g. {extra}); do the server and the site "
                    "use the same 'adapter', 'base' and 'personal' settings?"
                )
            model.load_adapter_state(dict(shared), strict=False)
        if personal:
            model.load_adapter_state(dict(personal), strict=False)
        return model
