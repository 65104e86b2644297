"""A site's own privacy terms: set by the hospital in its node config, not by a run.

`fedvlsm site start --dp-require / --dp-site-budget EPS / --dp-site-delta D`
put them in the SuperNode's node config; the train handler refuses any run
that is not sample-level DP when either is set, and `common.privacy.fit_private`
keeps the epsilon of all the site's runs together within the budget. No
torch here: the site launcher checks the values before it starts anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SitePolicyError(ValueError):
    """A site privacy setting that cannot be used (the message names the node-config key)."""


# Node-config keys (`fedvlsm site start --dp-require / --dp-site-budget / --dp-site-delta`):
# set by the hospital, not by the run, so a server cannot switch them off.
NODE_DP_REQUIRE = "dp-require"
NODE_DP_SITE_BUDGET = "dp-site-budget"
NODE_DP_SITE_DELTA = "dp-site-delta"


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
        return cls(require, budget, delta)
