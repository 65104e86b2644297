"""A deployed site sends no figure over fewer than `min-figure-images` images (default 5).

Every reply carries a split's mean: train loss, validation Dice and loss, test Dice. Before, a
hospital whose validation split held one image sent that image's Dice every round (and its
personalised Dice, and its loss). The real round loop and handlers (fed_harness.InProcessGrid)
and `fedvlsm site start` run verbatim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.data import synthesize
from common.federation_config import FederationConfig
from common.site_policy import SitePolicy, SitePolicyError
from fed_harness import InProcessGrid
from helpers import DEPLOYED_SITE_DATA
from server.server_app import run_federation

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py

FEDVLSM = os.path.join(os.path.dirname(sys.executable), "fedvlsm")


def _site(root, name: str, splits: tuple[float, float, float], per_site: int):
    """One synthetic site folder `root/name`; returns it and its split sizes."""
    (folder,) = synthesize(root / name, sites=1, per_site=per_site, seed=0, image_size=64, splits=splits)
    counts = {s: len(json.loads((folder / "anns" / f"{s}.json").read_text())) for s in ("train", "val", "test")}
    return folder, counts


def test_a_small_validation_split_sends_no_dice_unless_the_site_allows_that_size(tmp_path):
    data = tmp_path / "data"
    big, big_counts = _site(data, "big", DEPLOYED_SITE_DATA["splits"], DEPLOYED_SITE_DATA["per_site"])
    one, one_counts = _site(data, "one", (0.7, 0.15, 0.15), 9)  # 6 train, 1 val, 2 test
    two, two_counts = _site(data, "two", (0.6, 0.2, 0.2), 10)  # 6 train, 2 val, 2 test
    assert (big_counts["val"], one_counts["val"], two_counts["val"]) == (5, 1, 2)
    node_configs = [
        {"data-path": str(big), "site-name": "big", "site-dir": str(tmp_path / "s-big")},
        {"data-path": str(one), "site-name": "one", "site-dir": str(tmp_path / "s-one")},
        # The hospital lowers its own floor to 2: its 2-image mean is sent.
        {"data-path": str(two), "site-name": "two", "site-dir": str(tmp_path / "s-two"), "min-figure-images": 2},
    ]
    cfg = FederationConfig(base="arch:tiny", adapter="shallow-vlc", home=str(tmp_path / "h"), rounds=1,
                           compare=False, lr=0.01, run_name="small")
    grid = InProcessGrid(cfg, 3, node_configs=node_configs)
    run_federation(grid, cfg)
    (record,) = [json.loads(x) for x in (tmp_path / "h/runs/small/rounds.jsonl").read_text().splitlines()]
    # 'one' trained (6 images) but its 1-image validation split sent nothing: a failure with counts only.
    assert [(f["site"], f["reason"]) for f in record["failures"]] == [
        ("one", "site policy: the val split has 1 image(s), fewer than this site's min-figure-images (5); "
                "it sends no figure over so few")]
    assert "val_dice" in record["sites"]["big"] and "val_dice" in record["sites"]["two"]
    assert "val_dice" not in record["sites"]["one"] and "num_examples" in record["sites"]["one"]
    # What crossed the wire from 'one' (node 101) for evaluation: a status, no metrics at all.
    evaluated = [r for r in grid.replies if r.metadata.src_node_id == 101 and r.metadata.message_type == "evaluate"]
    assert evaluated and all(not r.content.metric_records for r in evaluated)


@pytest.mark.parametrize("value", [1, "1", 0, True, 2.5, "five", 1_000_001])
def test_unusable_min_figure_images_is_refused_naming_the_key(value):
    with pytest.raises(SitePolicyError, match="node config 'min-figure-images': expected a whole number"):
        SitePolicy.from_node_config({"min-figure-images": value})


def test_the_default_and_a_hospitals_own_floor():
    assert SitePolicy.from_node_config({}).min_figure_images == 5
    assert SitePolicy.from_node_config({"min-figure-images": "12"}).min_figure_images == 12


def _site_start(tmp_path, data, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDVLSM_HOME": str(tmp_path / "home")}
    return subprocess.run([FEDVLSM, "site", "start", "--superlink", "127.0.0.1:9", "--data", str(data),
                           "--insecure", *extra], capture_output=True, text=True, timeout=60, env=env, check=False)


def test_site_start_says_which_splits_are_too_small_before_starting_anything(tmp_path):
    small, _ = _site(tmp_path / "data", "small", (0.7, 0.15, 0.15), 9)  # 6 / 1 / 2
    done = _site_start(tmp_path, small)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "fedvlsm site start: --data: val (1 image(s)), test (2 image(s)) below --min-figure-images 5: this "
        "site's replies carry each split's mean loss or Dice, and it sends none over so few images")
    assert not (tmp_path / "home").exists()  # no site folder, no worker, no SuperNode
    refused = _site_start(tmp_path, small, "--min-figure-images", "1")
    assert refused.returncode == 2
    assert "--min-figure-images: expected a whole number of images in [2, 1000000]" in refused.stderr
    lowered = _site_start(tmp_path, small, "--min-figure-images", "2")
    assert lowered.returncode == 2 and "val (1 image(s)) below --min-figure-images 2" in lowered.stderr
    assert "test (" not in lowered.stderr


def test_data_check_notes_the_splits_a_deployed_site_would_refuse(tmp_path):
    # Before, only `fedvlsm site start` (or the site's refusal in round 1) said it; `fedvlsm data check`,
    # the command a hospital runs to prepare its data, said "OK" of a 1-image validation split.
    small, _ = _site(tmp_path / "data", "small", (0.7, 0.15, 0.15), 9)  # 6 / 1 / 2
    big, _ = _site(tmp_path / "data", "big", DEPLOYED_SITE_DATA["splits"], DEPLOYED_SITE_DATA["per_site"])

    def check(*args):
        return subprocess.run([FEDVLSM, "data", "check", *map(str, args)], capture_output=True, text=True,
                              timeout=120)

    done = check(small)
    assert done.returncode == 0, done.stdout + done.stderr  # a note, not a problem: local use is fine
    assert (f"{small}: note: val (1 image(s)), test (2 image(s)) below --min-figure-images 5: a deployed site "
            "(`fedvlsm site start`) refuses to serve these splits") in done.stdout
    lowered = check(small, "--min-figure-images", "2")
    assert "note: val (1 image(s)) below --min-figure-images 2" in lowered.stdout and "test (" not in lowered.stdout
    root = check(small.parent)  # the multi-site root synth wrote: per site
    assert root.returncode == 0 and f"{small}: note: val (1 image(s))" in root.stdout
    fine = check(big)
    assert fine.returncode == 0 and "note:" not in fine.stdout and "OK, no problems found" in fine.stdout
    refused = check(big, "--min-figure-images", "1")
    assert refused.returncode == 2
    assert "--min-figure-images: expected a whole number of images in [2, 1000000]" in refused.stderr
