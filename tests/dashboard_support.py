"""A real (short) federation that writes a run store, for the dashboard tests.

It runs the real ServerApp round loop against the real ClientApp through the
in-process grid of test_fed_inprocess.py (arch:tiny, 3 sites x 9 images).
Until server_app.py passes `meta` to RunRecords.create and sets the final
status itself (integration done there), `simulate` supplies both the way the
ServerApp will: `base_parameters` of the frozen base, and `finished` at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from server.run_records import RunRecords


def simulate(data: Path, home: Path, run_name: str, rounds: int = 2, **kw) -> Path:
    from common.bases import load_base
    from server import server_app
    from test_fed_inprocess import InProcessGrid, make_cfg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = make_cfg(data, home, run_name=run_name, rounds=rounds, **kw)
    base_parameters = sum(p.numel() for p in load_base(cfg.base).model.parameters())
    original = RunRecords.create.__func__

    def create(cls, runs_dir, name, config, meta=None):
        if meta is None and base_parameters:
            meta = {"base_parameters": base_parameters}
        return original(cls, runs_dir, name, config, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunRecords, "create", classmethod(create))
        server_app.run_federation(InProcessGrid(cfg, 3), cfg)
    run_dir = home / "runs" / run_name
    records = RunRecords(run_dir)
    if records.store.summary()["status"] == "running":
        records.set_status("finished")
    return run_dir
