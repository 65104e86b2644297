"""When the server pushes round r+1's train messages together with round r's evaluate messages.

The real pushes are tested with real processes (tests/test_deployment.py:
round 2's train messages leave before round 1's evaluate replies are in;
tests/test_deployment_faults.py: with `pipeline-rounds=false` they do not).
Here: the rule itself, for every case it excludes.
"""

from __future__ import annotations

import pytest

from common.federation_config import FederationConfig
from server import server_app


@pytest.fixture
def deployment_grid(monkeypatch):
    monkeypatch.setattr(server_app, "can_push_ahead", lambda grid: True)


def test_deployment_pushes_the_next_round_ahead_except_after_the_last(deployment_grid):
    cfg = FederationConfig(rounds=3)
    assert [server_app.pushes_ahead(cfg, object(), r) for r in (1, 2, 3)] == [True, True, False]


@pytest.mark.parametrize("changes", [{"pipeline_rounds": False}, {"dp": "sample", "dp_epsilon_budget": 10.0},
                                     {"dp": "client"}])
def test_switched_off_or_under_dp_nothing_is_pushed_ahead(deployment_grid, changes):
    assert not server_app.pushes_ahead(FederationConfig(rounds=3, **changes), object(), 1)


def test_simulation_and_other_grids_never_push_ahead():
    from flwr.superlink.grid import InMemoryGrid

    from server.messaging import can_push_ahead

    # Flower's simulation may run two messages of one node at once; only the deployment grid qualifies.
    assert not can_push_ahead(InMemoryGrid.__new__(InMemoryGrid))
    assert not can_push_ahead(object())
    assert not server_app.pushes_ahead(FederationConfig(rounds=3), object(), 1)
