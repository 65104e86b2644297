"""A partitioned simulation (iid, quantity-skew, dirichlet) pools a multi-site root: the sites' data check
checks each source dataset instead of refusing the root ("a multi-site root, not one dataset"), and still
refuses bad data in any source."""

from __future__ import annotations

import json

import pytest

from common.data import synthesize
from common.federation_config import FederationConfig
from fed_harness import InProcessGrid
from server.server_app import run_federation


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.mark.parametrize("corrupt", [False, True])
def test_iid_sites_pass_the_data_check_of_each_source_and_a_bad_source_is_refused(tmp_path, corrupt):
    data = tmp_path / "data"
    synthesize(data, sites=3, per_site=12, seed=0, image_size=64)
    if corrupt:
        anns = json.loads((data / "site-2" / "anns" / "train.json").read_text())
        (data / "site-2" / "images" / anns[0]["img_name"]).write_bytes(b"not a png")
    cfg = FederationConfig(base="arch:tiny", adapter="shallow-vlc", home=str(tmp_path / "h"), rounds=1,
                           compare=False, run_name="iid", data=str(data), partition="iid", max_skipped_rounds=5)
    run_federation(InProcessGrid(cfg, 4), cfg)
    record = json.loads((tmp_path / "h" / "runs" / "iid" / "rounds.jsonl").read_text().splitlines()[0])
    if not corrupt:
        assert record["status"] == "ok" and record["failures"] == [] and len(record["sites"]) == 4
    else:
        assert record["status"] == "skipped" and len(record["failures"]) >= 4
        assert all(f["reason"].startswith("data check: 1 unreadable-image in train") for f in record["failures"]), (
            record["failures"])
