"""Two runs at once under one home: a run name belongs to one server process at a time.

Before: `RunRecords.create` refused a name only once its run had a round, so a
second `fedvlsm simulate` / ServerApp started with the same name (or a default
name stamped in the same second) during the first one's first round took the
same folder; the two overwrote each other's config, run id, records and final
adapter, and both exited 0.
"""

from __future__ import annotations

import json

import pytest

from common.federation_config import FederationConfig
from server.run_records import RunRecordsError
from server.server_app import open_run


def release(opened: tuple) -> None:
    """Let go of the run name `open_run` claimed (its last element), as `run_federation` does at the end
    (tolerant, so that the code before the fix fails on its behaviour, not on this helper)."""
    getattr(opened[-1], "close", lambda: None)()


def test_a_run_name_in_use_by_another_server_is_refused_and_left_alone(tmp_path):
    first_cfg = FederationConfig.from_run_config({"home": str(tmp_path), "run-name": "same", "seed": 1})
    second_cfg = FederationConfig.from_run_config({"home": str(tmp_path), "run-name": "same", "seed": 2})
    first = open_run(first_cfg)  # the first run, before its first round ends
    records = first[0]
    run_id = records.run_id
    try:
        with pytest.raises(RunRecordsError, match="another server process"):
            open_run(second_cfg)
        assert json.loads((records.run_dir / "config.json").read_text())["seed"] == 1
        assert records.run_id == run_id
        # a default name is claimed too (two launches stamped in the same second get the same one)
        unnamed = FederationConfig.from_run_config({"home": str(tmp_path)})
        named = open_run(unnamed)
        try:
            with pytest.raises(RunRecordsError, match="another server process"):
                open_run(unnamed.replace(run_name=named[1].run_name))
        finally:
            release(named)
    finally:
        release(first)
    # once the first process has let go (ended, or died: the kernel drops its lock), the name is free again
    release(open_run(second_cfg))
    assert json.loads((records.run_dir / "config.json").read_text())["seed"] == 2
