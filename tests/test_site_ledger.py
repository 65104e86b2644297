"""A site budget bounds every run on the *data*, even when the site comes back under another folder.

The privacy ledger is the state files in `<site-dir>/privacy/`. Before, a hospital that restarted
its site with another `--site-name` (so another default folder) or `--site-dir` trained on the same
images from epsilon 0 again under `--dp-site-budget`. The real round loop and handlers
(fed_harness.InProcessGrid) and `fedvlsm site start` run verbatim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from client.launcher import _check_args
from common.cli import build_parser
from common.data import synthesize
from common.federation_config import FederationConfig
from common.site_policy import LEDGER_DATA_FILE, ledgers_elsewhere
from fed_harness import InProcessGrid
from helpers import DEPLOYED_SITE_DATA
from server.server_app import RunFailed, run_federation

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py

FEDVLSM = os.path.join(os.path.dirname(sys.executable), "fedvlsm")


@pytest.fixture
def hospital(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path / "home"))
    (data,) = synthesize(tmp_path / "data", sites=1, seed=0, image_size=64, **DEPLOYED_SITE_DATA)
    return data


def _train_round(tmp_path, data, site_dir, run_name, policy, refused=False):
    cfg = FederationConfig(base="arch:tiny", adapter="shallow-vlc", home=str(tmp_path / "server"), rounds=1,
                           local_epochs=1, batch_size=2, compare=False, lr=0.01, run_name=run_name,
                           dp="sample", dp_noise_multiplier=1.0, dp_epsilon_budget=100.0, max_skipped_rounds=1)
    node = {"data-path": str(data), "site-name": "hospital-a", "site-dir": str(site_dir), **policy}
    grid = InProcessGrid(cfg, 1, node_configs=[node])
    if refused:  # the only site refused its only round: the run fails, its record says why
        with pytest.raises(RunFailed):
            run_federation(grid, cfg)
    else:
        run_federation(grid, cfg)
    rounds = tmp_path / "server" / "runs" / run_name / "rounds.jsonl"
    return json.loads(rounds.read_text().splitlines()[0])


def test_a_site_budget_refuses_a_second_ledger_for_the_same_data(hospital, tmp_path):
    sites = tmp_path / "home" / "sites"
    first = _train_round(tmp_path, hospital, sites / "hospital-a", "a", {"dp-site-budget": 50.0})
    assert first["status"] == "ok"
    assert (sites / "hospital-a" / "privacy" / LEDGER_DATA_FILE).read_text() == f"{hospital.resolve()}\n"

    # The same images under another folder (a new --site-name): refused before anything is charged.
    again = _train_round(tmp_path, hospital, sites / "renamed", "b", {"dp-site-budget": 50.0}, refused=True)
    assert again["sites"] == {}
    assert [f["reason"] for f in again["failures"]] == [
        "site policy: this site's data has a privacy ledger in another site folder"]
    assert not list((sites / "renamed" / "privacy").glob("*.json"))
    log = (sites / "renamed" / "logs" / "site.log").read_text()
    assert f"--site-dir {sites / 'hospital-a'}" in log  # the fix, said at home only

    # The original folder goes on; without a site budget (nothing to restart) another folder trains.
    assert _train_round(tmp_path, hospital, sites / "hospital-a", "c", {"dp-site-budget": 50.0})["status"] == "ok"
    assert _train_round(tmp_path, hospital, sites / "renamed", "d", {"dp-require": "true"})["status"] == "ok"


def test_a_site_dir_outside_the_home_is_found_beside_the_folder_it_moved_from(hospital, tmp_path):
    srv = tmp_path / "srv"
    assert _train_round(tmp_path, hospital, srv / "one", "a", {"dp-site-budget": 50.0})["status"] == "ok"
    assert ledgers_elsewhere(hospital, srv / "two", [tmp_path / "home" / "sites", srv]) == [srv / "one"]
    moved = _train_round(tmp_path, hospital, srv / "two", "b", {"dp-site-budget": 50.0}, refused=True)
    assert [f["reason"] for f in moved["failures"]] == [
        "site policy: this site's data has a privacy ledger in another site folder"]


def test_site_start_with_a_budget_names_the_folder_that_holds_the_ledger(hospital, tmp_path):
    sites = tmp_path / "home" / "sites"
    assert _train_round(tmp_path, hospital, sites / "hospital-a", "a", {"dp-site-budget": 50.0})["status"] == "ok"
    done = subprocess.run([FEDVLSM, "site", "start", "--superlink", "127.0.0.1:9", "--data", str(hospital),
                           "--site-name", "hospital-b", "--insecure", "--dp-site-budget", "50"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fedvlsm site start: --dp-site-budget: {sites / 'hospital-a'} already holds the privacy ledger of "
        f"DP-SGD runs on {hospital.resolve()}; a new one in {sites / 'hospital-b'} would restart the budget "
        f"from epsilon 0. Start with --site-dir {sites / 'hospital-a'} (and the --site-name it had)")
    assert not (sites / "hospital-b").exists()

    def args(*extra):
        return build_parser().parse_args(["site", "start", "--superlink", "x:9092", "--data", str(hospital),
                                          "--insecure", "--dp-site-budget", "50", *extra])

    assert _check_args(args("--site-name", "hospital-a")) is None  # its own folder: fine
    assert _check_args(args("--site-dir", str(sites / "hospital-a"))) is None
