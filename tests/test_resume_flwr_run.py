"""A resume through `flwr run`: the launch's run config carries every pyproject default.

Flower fills each key the launch did not give with pyproject's value, so
`flwr run . fed --run-config "run-name='x' resume=true"` resumed a 4-round
run with `rounds = 10` and `min-sites = 0` (and rewrote its config.json).
Only the keys the launch gave (Flower's `Run.override_config`) may replace
the run's saved values.
"""

from __future__ import annotations

from types import SimpleNamespace

from common.federation_config import FederationConfig
from server.run_records import RunRecords
from server.server_app import launch_keys, open_run


def _resume(tmp_path, given, **launch):
    cfg = FederationConfig.from_run_config({"home": str(tmp_path), "run-name": "x", "resume": True, **launch})
    opened = open_run(cfg, given)
    opened[-1].close()  # the run-name claim
    return opened[1]


def test_a_flwr_run_resume_keeps_the_saved_values_of_keys_it_did_not_give(tmp_path):
    saved = FederationConfig.from_run_config({"home": str(tmp_path), "run-name": "x", "rounds": 4, "min-sites": 2})
    RunRecords.create(saved.runs_dir, "x", saved.to_run_config())
    # What Flower hands the ServerApp: every default (rounds 10, min-sites 0) + the two given keys.
    cfg = _resume(tmp_path, {"run-name", "resume"})
    assert (cfg.rounds, cfg.min_sites) == (4, 2)
    # A key the launch gave is taken, as documented (rounds: to extend the run).
    cfg = _resume(tmp_path, {"run-name", "resume", "rounds"}, rounds=6)
    assert (cfg.rounds, cfg.min_sites) == (6, 2)
    # Without Flower's list (in-process grids, `fedvlsm simulate`'s own merged config) every key counts as given.
    assert _resume(tmp_path, None, rounds=6).min_sites == 0


def test_launch_keys_are_flowers_override_config():
    grid = SimpleNamespace(run=SimpleNamespace(override_config={"run-name": "x", "resume": True}))
    assert launch_keys(grid) == {"run-name", "resume"}
    assert launch_keys(object()) is None
