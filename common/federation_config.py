"""FederationConfig: the one typed config of a federated run.

Built in exactly one place from Flower's ``context.run_config`` (the
``[tool.flwr.app.config]`` table of pyproject.toml, overridden with
``flwr run . --run-config "key=value ..."``) plus, on a site, its
``context.node_config``. No Flower import, so the CLI, tests and the
simulation helpers can build it too.

Every key of ``[tool.flwr.app.config]`` maps to one field here (hyphens in
the file, underscores here); docs/federation.md lists them with their
meaning. Errors name the config key, so a typo in ``--run-config`` says
which value is wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.adapters.spec import VARIANTS, AdapterSpec
from common.config import MAX_LR, MIN_LR, TrainConfig, TrainConfigError
from common.site_errors import SiteRefusal
from common.site_naming import default_site_dir, default_site_name, fedvlsm_home

if TYPE_CHECKING:  # torch, transformers: imported where a model is built, so a bad config is refused at once
    from common.bases import Base
    from common.model import AdaptedCLIPSeg

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
PAYLOAD_DTYPES = ("fp32", "fp16", "int8")  # int8: uploads only (updates); weights go down in fp16
PARTITIONS = ("natural", "iid", "quantity-skew", "dirichlet")
ADAPTER_INITS = ("paper", "identity")
DP_MODES = ("off", "sample", "client")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_CLIPPINGS = ("server", "client")
# Client level: which neighbouring federations the epsilon compares. "zero-update": one hospital's
# update replaced by zero in a mean over a fixed m (the DP-FedAvg convention, sensitivity C / m).
# "add-remove": a hospital added or removed, which also changes who or how many are averaged: the
# mean moves by up to 2C / m, so the epsilon is that of noise z / 2 (the same noise is added).
DP_CLIENT_NEIGHBOURS = ("zero-update", "add-remove")
# Keys a resumed run takes from the new launch (when given) instead of its saved config.json.
RESUME_OVERRIDABLE = ("rounds", "home", "round_timeout", "torch_threads", "min_sites", "site_wait_timeout",
                      "max_skipped_rounds", "compare", "dashboard_port", "pipeline_rounds")
MAX_SEED = 2**31 - 1
# torch intra-op threads: more than any CPU has cores; 65536 made libgomp fail to create threads and
# the site process segfault in its first matmul (4096 still ran).
MAX_TORCH_THREADS = 1024
# Simulated hospitals in one run (--num-sites, demo-sites): far above any consortium; beyond it a typo
# (1e21) had Flower register nodes for ever.
MAX_SIMULATED_SITES = 10_000
# Bounds on values no run can use (docs/federation.md's key table says each). Why each one:
# rounds: a million rounds take 3.5 days at the fastest round measured (0.3 s: arch:tiny, 3 demo
# sites), real rounds take minutes; rounds = 1e12 was accepted and ran "round 1/1000000000000".
MAX_ROUNDS = 1_000_000
# local-epochs, finetune-epochs: a round is a handful of epochs; 1e12 was accepted, and no site could
# ever finish its training (fit runs every epoch).
MAX_EPOCHS = 10_000
# demo-images: the demo writes every image (two PNGs) before the run starts, 4 ms and 32 kB each at
# 96 px here: 1e5 is 7 minutes and 3 GB per site; 1e12 would have filled the disk.
MAX_DEMO_IMAGES = 100_000
# prox-mu: FedProx tunes mu up to about 1; 1e6 still trains (the term pins the weights to the global),
# 1e38 overflowed the float32 loss: every site's reply was excluded (non-finite train loss) and the
# run "finished" without one update.
MAX_PROX_MU = 1e6
# server-lr: FedAdam/FedYogi normalise the step, so every weight moves by about server-lr per round.
# 1e38 failed round 1 ("overflows fp16"; with fp32 every site's training then diverged); below 1e-10
# the step is under float32's resolution of any weight above ~1e-3 (1e-320 left the global adapter
# unchanged round after round, silently).
SERVER_LR_RANGE = (1e-10, 10.0)
# server-tau: Adam's epsilon, m / (sqrt(v) + tau) in float32: below ~1e-45 tau is 0 there and a weight
# no site changed gives 0/0 (1e-320: NaN global, the run failed in round 1). Above 1e3 tau swamps
# sqrt(v) and the step is server-lr x m / tau, 1% of the update at most (1e38: the global never moved).
SERVER_TAU_RANGE = (1e-30, 1e3)
# dp-delta: kept below 1 / (images at a site, or sites); 1e-30 is below 1/N^2 for any N up to 1e15.
# 1e-320 (a denormal) made Opacus' PRV fail at every site ("cannot convert float NaN to integer";
# 5e-324: ZeroDivisionError), while RDP and Flower's accountant reported an epsilon for it.
MIN_DP_DELTA = 1e-30
# dp-delta with dp-accountant = 'prv': Opacus' PRV refuses a delta below 1.1e-19 (long double's eps)
# x its grid's size ("Floating point errors will dominate"), and its grid grows with the run: 1.5e5
# points for 100 steps, 1e7 for 1e5 steps here, so 1e-12 failed; 1e-10 keeps a margin (a far longer
# run can need more still: its sites then fail with Opacus' message; RDP has no such limit).
MIN_PRV_DELTA = 1e-10
# dp-noise-multiplier (z, when > 0): Opacus' RDP divides by z^2 (1e-320: ZeroDivisionError at every
# site); at 1e-9 its epsilon is already ~1e20 (100 steps at q = 0.1: no privacy). dp-max-grad-norm /
# dp-clip-norm (C): at 1e-320 (0 in float32) nothing trained and the Dice never moved; AdamW's step does
# not depend on the gradient's scale, so 1e-6 still trained (sample level, quick demo). Upper: the noise
# std is z x C; 1e38 for either overflowed (every update "overflows fp16", or NaN): z, C <= 1e4 keep
# z x C <= 1e8 and its square finite in float32. That keeps the arithmetic finite, not the model useful
# (client level, C = 1, 3 sites: z = 1e4 made every site's training diverge in round 2), and above
# z = 1e3 epsilon stops falling (RDP, 100 steps at q = 0.1: 0.103 at 1e3, 1e6 and 1e38).
DP_NOISE_RANGE = (1e-9, 1e4)
DP_CLIP_RANGE = (1e-6, 1e4)
# dp-target-epsilon: e^10000 promises nothing; Opacus' calibration of z never returned at 1e15 (it
# bisects to 0.01 absolute, finer than a float64 there; 1e12 took 7 s): a site would hang in round 1.
MAX_DP_EPSILON = 1e4
# The run-config key of each TrainConfig field the run config sets (train_config below).
_TRAIN_KEYS = {"epochs": "local-epochs", "batch_size": "batch-size", "lr": "lr", "seed": "seed", "prox_mu": "prox-mu"}
# Flower's client-level accountant needs FedAvg's uniform mean (FedProx is FedAvg on the server).
DP_CLIENT_STRATEGIES = ("fedavg", "fedprox")
# A run name becomes a folder name on every machine involved: keep it boring.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def is_run_name(name: str) -> bool:
    """A name `run-name` accepts: also one plain file or folder name (no '/', no leading '.', no newline:
    `match` let 'a\\n' through, its `$` matching before a final newline)."""
    return _RUN_NAME.fullmatch(name) is not None


# Node-config keys a deployed SuperNode may set (`flower-supernode --node-config`).
NODE_DATA_PATH = "data-path"
NODE_SITE_DIR = "site-dir"
NODE_SITE_NAME = "site-name"
# Node-config keys the Flower simulation engine sets.
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


class ConfigError(ValueError):
    """A run/node config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class FederationConfig:
    # --- model
    base: str = "demo"
    adapter: str = "shallow-vlc"
    adapter_init: str = "identity"
    # --- federation
    rounds: int = 10
    local_epochs: int = 2
    lr: float = 0.001  # 0: the variant's default learning rate (TrainConfig.lr = None)
    batch_size: int = 8
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 0  # 0: every site connected when the run starts
    # Deployment: how long the server waits for `min-sites` SuperNodes before
    # giving up (it logs "waiting for N sites, M connected" meanwhile).
    site_wait_timeout: float = 600.0
    # A round whose every site failed (or was excluded) is recorded as skipped
    # and the run goes on; this many skipped rounds in a row end it (failed).
    max_skipped_rounds: int = 3
    # Reply checks: a train update whose L2 norm (reply - global, fp32) exceeds
    # this is excluded (0: no bound); a round with fewer usable train replies
    # than `min-replies` is recorded as skipped (the global adapter is kept).
    max_update_norm: float = 0.0
    min_replies: int = 1
    strategy: str = "fedavg"
    prox_mu: float = 0.01
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    trim_beta: float = 0.2
    payload_dtype: str = "fp16"
    personal: tuple[str, ...] = ()  # tensor-name prefixes that never leave the site
    finetune_epochs: int = 2  # final local fine-tuning of the global adapter at each site
    seed: int = 0
    round_timeout: float = 3600.0
    # Deployment: push round r+1's train messages with round r's evaluate
    # messages, so a SuperNode finds its next message at once instead of after
    # its 3 s idle poll (server/server_app.py `pushes_ahead`; off under DP).
    pipeline_rounds: bool = True
    # torch intra-op threads in each site process and the server (0: torch's
    # default, all cores). On small CPUs shared by several processes (a
    # simulation's actors, SuperNodes on one host) more threads than free
    # cores make OpenMP spin-wait: 20-30x slower steps were measured on 2 cores.
    torch_threads: int = 1
    # --- data
    data: str = "demo"  # "demo": synthesize; else the folder the simulation partitions
    partition: str = "natural"
    partition_alpha: float = 0.5
    demo_sites: int = 0  # 0: one synthetic hospital per SuperNode
    demo_images: int = 60  # per synthetic site (all splits)
    demo_image_size: int = 96
    max_images: int = 0  # per site and split, 0 = all (quick experiments, tests)
    # --- records
    home: str = ""
    run_name: str = ""
    resume: bool = False
    compare: bool = True  # end with the per-site comparison table (simulation only)
    dashboard_port: int = 0  # >0: the ServerApp serves the dashboard on 127.0.0.1:<port> for its run
    # --- differential privacy (docs/federation.md "Differential privacy"; checked in _check_dp)
    dp: str = "off"  # off | sample (DP-SGD at each site) | client (central, client-level, at the server)
    dp_noise_multiplier: float = 1.0  # z: noise std = z x clip norm
    dp_delta: float = 1e-5
    dp_epsilon_budget: float = 0.0  # 0: no budget (sample: per site; client: at the server)
    dp_max_grad_norm: float = 1.0  # sample: per-sample gradient clip C
    dp_target_epsilon: float = 0.0  # sample: >0 calibrates z for the planned run (overrides dp-noise-multiplier)
    dp_accountant: str = "rdp"  # sample: rdp | prv (client level is always Flower's RDP accountant)
    dp_clip_norm: float = 1.0  # client: L2 bound on a site's update (reply - global)
    dp_clipping: str = "server"  # client: where updates are clipped: server | client (a mod at the site)
    dp_client_neighbour: str = "zero-update"  # client: which neighbour the epsilon is for (DP_CLIENT_NEIGHBOURS)

    # ------------------------------------------------------------------ build
    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"run config '{key}': {why}")

        # NaN passes every `< 0` check below (and turns `max-update-norm` off, never ends a
        # timeout); Flower's --run-config parser makes floats of 'nan' and 'inf'.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(_key(f.name), f"must be a finite number, got {value}")
        if self.adapter == "none":
            raise bad("adapter", "'none' has nothing to train or federate")
        if self.adapter not in VARIANTS:
            trainable = ", ".join(v for v in VARIANTS if v != "none")
            raise bad("adapter", f"unknown variant {self.adapter!r}; choose one of {trainable}")
        if self.adapter_init not in ADAPTER_INITS:
            raise bad("adapter-init", f"must be one of {ADAPTER_INITS}, got {self.adapter_init!r}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.payload_dtype not in PAYLOAD_DTYPES:
            raise bad("payload-dtype", f"must be one of {PAYLOAD_DTYPES}, got {self.payload_dtype!r}")
        if self.partition not in PARTITIONS:
            raise bad("partition", f"must be one of {PARTITIONS}, got {self.partition!r}")
        for key in ("rounds", "local_epochs", "batch_size", "demo_images", "demo_image_size", "max_skipped_rounds"):
            if getattr(self, key) < 1:
                raise bad(_key(key), f"must be >= 1, got {getattr(self, key)}")
        # numpy's generators (data synthesis, partitions, np.random.seed) refuse negative seeds, and
        # np.random.seed refuses seeds >= 2**32 (the pooled bound trains with seed + 7919).
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        if not 0 <= self.dashboard_port <= 65535:
            raise bad("dashboard-port", f"must be a TCP port (1-65535) or 0 (off), got {self.dashboard_port}")
        for key in ("min_sites", "demo_sites", "finetune_epochs", "max_images", "lr", "prox_mu", "torch_threads"):
            if getattr(self, key) < 0:
                raise bad(_key(key), f"must be >= 0, got {getattr(self, key)}")
        if self.demo_sites > MAX_SIMULATED_SITES:
            raise bad("demo-sites", f"must be at most {MAX_SIMULATED_SITES}, got {self.demo_sites}")
        for key, most in (("rounds", MAX_ROUNDS), ("local_epochs", MAX_EPOCHS), ("finetune_epochs", MAX_EPOCHS),
                          ("demo_images", MAX_DEMO_IMAGES), ("prox_mu", MAX_PROX_MU)):
            if getattr(self, key) > most:
                shown = most if isinstance(most, int) else f"{most:g}"
                raise bad(_key(key), f"must be at most {shown}, got {getattr(self, key)}")
        if self.torch_threads > MAX_TORCH_THREADS:
            raise bad("torch-threads", f"must be at most {MAX_TORCH_THREADS} (0: torch's default), "
                                       f"got {self.torch_threads}")
        for key in ("base", "data"):
            if not getattr(self, key).strip():
                raise bad(_key(key), f"must not be empty (default {getattr(type(self), key)!r})")
        if self.data != "demo":
            # Saved absolute: config.json is what a resume reads, and a relative folder resolved
            # again from another working directory partitioned other data under the same records.
            object.__setattr__(self, "data", str(Path(self.data).expanduser().resolve()))
        from common.data.synth import IMAGE_SIZE_RANGE, MIN_PER_SITE  # the demo's data: what synthesize takes

        if not IMAGE_SIZE_RANGE[0] <= self.demo_image_size <= IMAGE_SIZE_RANGE[1]:
            raise bad("demo-image-size", f"must be in [{IMAGE_SIZE_RANGE[0]}, {IMAGE_SIZE_RANGE[1]}] pixels, "
                                         f"got {self.demo_image_size}")
        if self.demo_images < MIN_PER_SITE:
            raise bad("demo-images", f"must be >= {MIN_PER_SITE} (one image in each split), got {self.demo_images}")
        # Every site trains with TrainConfig's checks: said here, before the run starts, not by
        # every site in round 1 (lr = 1e38 made each site's AdamW fail on a float32 overflow).
        try:
            self.train_config(self.local_epochs, self.seed, self.prox_mu)
        except TrainConfigError as err:
            why = err.why if err.field != "lr" else (f"must be in [0, {MAX_LR:g}] (0: the variant's default; "
                                                     f"else at least {MIN_LR:g}), got {self.lr}")
            raise bad(_TRAIN_KEYS.get(err.field, _key(err.field)), why) from None
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise bad(_key(key), f"must be in (0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise bad("trim-beta", f"must be in [0, 0.5), got {self.trim_beta}")
        for key, (low, high) in (("server_lr", SERVER_LR_RANGE), ("server_tau", SERVER_TAU_RANGE)):
            if not low <= getattr(self, key) <= high:
                raise bad(_key(key), f"must be in [{low:g}, {high:g}], got {getattr(self, key)}")
        for key in ("server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(_key(key), f"must be in [0, 1), got {getattr(self, key)}")
        if self.partition_alpha <= 0:
            raise bad("partition-alpha", f"must be > 0, got {self.partition_alpha}")
        if self.max_update_norm < 0 or self.min_replies < 1:
            raise bad("max-update-norm/min-replies", f"need >= 0 and >= 1, got {self.max_update_norm}, {self.min_replies}")
        if self.round_timeout <= 0:
            raise bad("round-timeout", f"must be > 0 seconds, got {self.round_timeout}")
        if self.site_wait_timeout <= 0:
            raise bad("site-wait-timeout", f"must be > 0 seconds, got {self.site_wait_timeout}")
        if self.run_name and not is_run_name(self.run_name):
            raise bad("run-name", f"{self.run_name!r}: use letters, digits, '.', '_' or '-' (max 100)")
        if self.resume and not self.run_name:
            raise bad("resume", "needs 'run-name' (the run to continue)")
        if self.strategy == "fedprox" and self.prox_mu == 0:
            raise bad("prox-mu", "fedprox with prox-mu = 0 is plain fedavg; set prox-mu > 0 or strategy = 'fedavg'")
        self._check_dp()

    def _check_dp(self) -> None:
        """Differential-privacy keys: values, and every combination whose epsilon would not hold."""
        def bad(keys: str, why: str) -> ConfigError:
            return ConfigError(f"run config {keys}: {why}")

        if self.dp not in DP_MODES:
            raise bad("'dp'", f"must be one of {DP_MODES}, got {self.dp!r}")
        for key in ("dp_noise_multiplier", "dp_epsilon_budget", "dp_target_epsilon", "dp_delta",
                    "dp_max_grad_norm", "dp_clip_norm"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise bad(f"'{_key(key)}'", f"must be a finite number >= 0, got {value}")
        if not MIN_DP_DELTA <= self.dp_delta < 1.0:
            raise bad("'dp-delta'", f"must be in [{MIN_DP_DELTA:g}, 1), got {self.dp_delta}")
        for key, (low, high) in (("dp_max_grad_norm", DP_CLIP_RANGE), ("dp_clip_norm", DP_CLIP_RANGE)):
            if not low <= getattr(self, key) <= high:
                raise bad(f"'{_key(key)}'", f"must be in [{low:g}, {high:g}], got {getattr(self, key)}")
        low, high = DP_NOISE_RANGE
        if self.dp_noise_multiplier != 0 and not low <= self.dp_noise_multiplier <= high:
            raise bad("'dp-noise-multiplier'", f"must be 0 or in [{low:g}, {high:g}], got {self.dp_noise_multiplier}")
        if self.dp_target_epsilon > MAX_DP_EPSILON:
            raise bad("'dp-target-epsilon'",
                      f"must be at most {MAX_DP_EPSILON:g} (0: off), got {self.dp_target_epsilon}")
        if self.dp_accountant not in DP_ACCOUNTANTS:
            raise bad("'dp-accountant'", f"must be one of {DP_ACCOUNTANTS}, got {self.dp_accountant!r}")
        if self.dp_clipping not in DP_CLIPPINGS:
            raise bad("'dp-clipping'", f"must be one of {DP_CLIPPINGS}, got {self.dp_clipping!r}")
        if self.dp_client_neighbour not in DP_CLIENT_NEIGHBOURS:
            raise bad("'dp-client-neighbour'", f"must be one of {DP_CLIENT_NEIGHBOURS}, got {self.dp_client_neighbour!r}")
        if self.dp_client_neighbour != "zero-update" and self.dp != "client":
            raise bad("'dp-client-neighbour' without 'dp' = 'client'",
                      "it chooses what a client-level epsilon means; sample-level DP protects one image "
                      "(add or remove one, Opacus)")
        budget, target = self.dp_epsilon_budget, self.dp_target_epsilon
        if self.dp == "sample":
            if self.dp_accountant == "prv" and self.dp_delta < MIN_PRV_DELTA:
                raise bad("'dp-delta' with 'dp-accountant' = 'prv'",
                          f"must be at least {MIN_PRV_DELTA:g} (Opacus' PRV accountant failed below 1e-14 to 1e-12 "
                          f"here, the longer the run the higher), got {self.dp_delta}; use 'rdp' for a smaller delta")
            if self.adapter == "full":
                raise bad("'dp' = 'sample' with 'adapter' = 'full'",
                          "per-sample gradients of all 150 M parameters are not supported (Opacus cannot hook "
                          "the raw embedding parameters, and per-sample gradients would cost ~0.6 GB per image); "
                          "use an adapter variant")
            if target == 0 and self.dp_noise_multiplier <= 0:
                raise bad("'dp-noise-multiplier'", "must be > 0 with dp = 'sample' (or set 'dp-target-epsilon')")
            if target > 0 and budget > 0 and target > budget:
                raise bad("'dp-target-epsilon' / 'dp-epsilon-budget'",
                          f"the planned run ({target}) would exceed the budget ({budget}); lower the target")
        if self.dp == "client":
            if self.strategy not in DP_CLIENT_STRATEGIES:
                raise bad("'dp' = 'client' with 'strategy'",
                          f"{self.strategy!r} is not accounted by Flower's client-level accountant (it needs "
                          f"FedAvg's mean of clipped updates); use one of {DP_CLIENT_STRATEGIES}")
            if self.dp_noise_multiplier <= 0:
                raise bad("'dp-noise-multiplier'", "must be > 0 with dp = 'client' (no noise: no epsilon)")
            if target > 0:
                raise bad("'dp-target-epsilon' with 'dp' = 'client'",
                          "calibration is sample-level only; set 'dp-noise-multiplier' (and 'dp-epsilon-budget')")
            if self.dp_accountant != "rdp":
                raise bad("'dp-accountant' with 'dp' = 'client'",
                          "client-level DP is accounted by Flower's RdpAccountant only; use 'rdp'")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Parse Flower's run_config (hyphenated keys, TOML scalar values)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in run_config.items():
            name = raw_key.replace("-", "_")
            if name not in names:
                raise ConfigError(unknown_key_message(raw_key, [_key(n) for n in names]))
            values[name] = _coerce(raw_key, value, names[name])
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of from_run_config (what config.json stores, what --run-config takes)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[_key(f.name)] = ",".join(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> FederationConfig:
        return dataclasses.replace(self, **changes)

    def named(self) -> FederationConfig:
        """This config with its `run-name`, or a new one made of the time, strategy and adapter."""
        if self.run_name:
            return self
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return self.replace(run_name=f"{stamp}-{self.strategy}-{self.adapter}")

    def to_json(self) -> str:
        """The run config as the server sends it to every site with every message."""
        return json.dumps(self.to_run_config(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederationConfig:
        return cls.from_run_config(json.loads(text))

    def fingerprint(self) -> str:
        """Short hash of the whole config: equal on the server and every site of one run."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    # --------------------------------------------------------------- derived
    @property
    def home_dir(self) -> Path:
        return fedvlsm_home(self.home)

    @property
    def runs_dir(self) -> Path:
        return self.home_dir / "runs"

    def demo_site_count(self, num_nodes: int) -> int:
        """Synthetic hospitals in the demo: `demo-sites`, or one per SuperNode when 0."""
        return self.demo_sites or num_nodes

    def demo_data_dir(self, num_nodes: int) -> Path:
        # Keyed by everything that shapes the synthetic data, so runs with
        # other demo settings never read a mismatched folder.
        return self.home_dir / "data" / (
            f"demo-s{self.demo_site_count(num_nodes)}-n{self.demo_images}-px{self.demo_image_size}-seed{self.seed}"
        )

    def data_dir(self, num_nodes: int) -> Path:
        """The folder a simulation of `num_nodes` SuperNodes partitions (absolute)."""
        if self.data == "demo":
            return self.demo_data_dir(num_nodes)
        return Path(self.data).expanduser().resolve()

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(variant=self.adapter, init=self.adapter_init)

    def train_config(self, epochs: int, seed: int, prox_mu: float = 0.0) -> TrainConfig:
        """Local-training settings for one call of common.train.fit."""
        return TrainConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr or None,
            seed=seed,
            prox_mu=prox_mu,
            device="cpu" if os.environ.get("FEDVLSM_FORCE_CPU") else "auto",
            # A round is a handful of epochs: the best-validation restore and
            # early stop of centralised training would make a site return an
            # earlier state than the one it trained to, which breaks
            # FedProx/FedOpt's notion of a local update.
            select_best=False,
            early_stop_patience=10**6,
            progress=False,
        )

    def initial_model(self, base: Base) -> AdaptedCLIPSeg:
        """Adapters at their initial values: identical on every site and on the server.

        Seeded by the run's seed alone (the caller's RNG is left untouched),
        so the server's initial global adapter, personal parts that have not
        trained yet and a site's local-only baseline start from the same tensors.
        """
        import torch

        from common.model import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build_model(base, self.adapter_spec())

    def apply_threads(self) -> None:
        """Set torch's intra-op threads for this process (see `torch_threads`)."""
        import torch

        if self.torch_threads and torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


def _key(name: str) -> str:
    return name.replace("_", "-")


def unknown_key_message(raw_key: str, known: list[str]) -> str:
    """'unknown key' with the closest known key, so a typo is fixed in one go."""
    close = difflib.get_close_matches(raw_key.replace("_", "-"), known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"run config '{raw_key}': unknown key{hint} (known keys: {', '.join(sorted(known))})"


def _coerce(raw_key: str, value: Any, f: dataclasses.Field) -> Any:
    """TOML gives int/float/bool/str; accept what a user would write for each field."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("tuple"):
            if isinstance(value, (list, tuple)):
                return tuple(str(v).strip() for v in value if str(v).strip())
            return tuple(p.strip() for p in str(value).split(",") if p.strip())
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no", ""):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"run config '{raw_key}': {err}") from None


@dataclass(frozen=True)
class SiteIdentity:
    """Who a node is and where its data and site-local state live.

    Deployment: the SuperNode's ``--node-config "data-path=... site-dir=...
    site-name=..."``. Simulation: ``partition-id`` / ``num-partitions`` set
    by Flower; the data come from the partitioner.
    """

    name: str
    partition_id: int | None  # simulation only
    num_partitions: int | None
    data_path: Path | None  # deployment only
    site_dir: Path = field(default=Path("."))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: FederationConfig) -> SiteIdentity:
        if NODE_DATA_PATH in node_config:
            name = str(node_config.get(NODE_SITE_NAME, "") or "")
            data_path = Path(str(node_config[NODE_DATA_PATH])).expanduser().resolve()
            if not data_path.is_dir():
                raise SiteRefusal(
                    "site config: data-path is not a folder",
                    f"node config '{NODE_DATA_PATH}': {data_path} is not a folder",
                )
            # A deployed site's own folders: `site-dir`, else its own
            # FEDVLSM_HOME (the server's `home` names a folder on the server).
            # Named after the data folder: that name stays home, the server gets a pseudonym.
            site_dir = Path(str(node_config.get(NODE_SITE_DIR, "") or default_site_dir(data_path, name)))
            site_dir = site_dir.expanduser().resolve()
            try:
                name = name or default_site_name(data_path, site_dir)
            except (OSError, ValueError) as err:  # the key names the site folder: its text stays home
                raise SiteRefusal("site config: the site's pseudonym key cannot be read or made",
                                  f"site folder {site_dir}: {err}") from err
            return cls(name, None, None, data_path, site_dir)
        if NODE_PARTITION_ID in node_config:
            pid = int(node_config[NODE_PARTITION_ID])
            num = int(node_config.get(NODE_NUM_PARTITIONS, 0))
            name = f"site-{pid}"
            site_dir = cfg.home_dir / "sites" / f"sim-{cfg.data_dir(num).name}-{cfg.partition}-{num}" / name
            return cls(name, pid, num, None, site_dir)
        raise SiteRefusal(
            "site config: no data-path",
            f"node config has neither '{NODE_DATA_PATH}' (deployment: flower-supernode "
            f"--node-config \"{NODE_DATA_PATH}=/path/to/site/data\") nor '{NODE_PARTITION_ID}' (simulation); "
            f"got keys {sorted(node_config)}",
        )
