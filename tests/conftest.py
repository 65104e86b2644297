"""Shared fixtures. Tests never reach for the hub: offline mode is forced here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_base():
    from common.bases import load_base

    return load_base("arch:tiny")


@pytest.fixture(scope="session")
def full_arch_base():
    from common.bases import load_base

    return load_base("arch:clipseg-rd64-refined")


@pytest.fixture(scope="session")
def host_step():
    """bench/host_step.py as a module (its operator counts are what tests of the fast path check)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import host_step

    return host_step


@pytest.fixture(scope="session")
def synth_sites(tmp_path_factory):
    """Three small synthetic sites, made once per test session."""
    from common.data import synthesize

    root = tmp_path_factory.mktemp("synth")
    return synthesize(root, sites=3, per_site=24, seed=0)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory):
    """A real loopback deployment (SuperLink + 3 sites, TLS + site auth): tests/test_deployment*.py."""
    from test_deployment import started_deployment

    yield from started_deployment(tmp_path_factory)


@pytest.fixture()
def task_identity():
    """Messages created outside a Flower runtime (the in-process grids) need a task identity.

    Used by the Flower-facing test files through `pytestmark = pytest.mark.usefixtures("task_identity")`.
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
