"""A real (short) federation that writes a run store, for the dashboard tests.

It runs the real ServerApp round loop against the real ClientApp through the
in-process grid of test_fed_inprocess.py (arch:tiny, 3 sites x 9 images).
The ServerApp itself records the base's parameter count (for the
full-model comparison) and the run's final status.
"""

from __future__ import annotations

from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity


def simulate(data: Path, home: Path, run_name: str, rounds: int = 2, **kw) -> Path:
    from fed_harness import InProcessGrid
    from server import server_app
    from test_fed_inprocess import make_cfg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = make_cfg(data, home, run_name=run_name, rounds=rounds, **kw)
    server_app.run_federation(InProcessGrid(cfg, 3), cfg)
    run_dir = home / "runs" / run_name
    return run_dir
