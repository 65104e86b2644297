"""Extension points of the round loop, for code that lives above the server.

The ServerApp a consortium runs (server/server_app.py) calls no hooks; the
simulation app (simulations/) passes its demo hooks, which prepare the
synthetic data and end with the per-site comparison table. So the demo
drives the same round loop without the server importing any demo code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from common.bases import Base
    from common.federation_config import FederationConfig
    from server.run_records import RunRecords


class RunHooks:
    """No-op hooks; subclass and override what you need."""

    def before_rounds(self, grid: Grid, cfg: FederationConfig, nodes: list[int]) -> None:
        """Called once the sites are connected, before the first round (raise to refuse the run)."""

    def after_final(
        self,
        grid: Grid,
        cfg: FederationConfig,
        frozen: Base,
        global_arrays: dict[str, np.ndarray],
        records: RunRecords,
        nodes: list[int],
    ) -> dict[str, Any] | None:
        """Called after the final adapter is saved; a returned dict joins the run summary."""
        return None
