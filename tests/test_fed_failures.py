"""Failures are visible and say where, without leaking a site's data (paths, file names, texts).

Runs the real ServerApp round loop against real ClientApp handlers through
`fed_harness.InProcessGrid`, which serialises every message with Flower's
protobuf code and turns a raising handler into an error reply the way
Flower's simulation does.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.data import synthesize
from common.federation_config import ConfigError, FederationConfig
from common.site_naming import default_site_name
from fed_harness import InProcessGrid
from server.server_app import RunFailed, run_federation, wait_for_sites
from helpers import DEPLOYED_SITE_DATA

SECRET = "patient-4711-doe"  # a file-name fragment that must never reach the server


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture
def hospitals(tmp_path):
    """Three deployed-style sites (data-path node configs); site-1 has one corrupt training image."""
    root = tmp_path / "hospitals"
    synthesize(root, sites=3, seed=0, image_size=64, **DEPLOYED_SITE_DATA)
    sites = sorted(p for p in root.iterdir() if p.is_dir())
    bad = sites[1]
    # synth writes the medvlsm layout: rename one training image (and its
    # mask) to a name that identifies a patient, then corrupt the image.
    anns = json.loads((bad / "anns" / "train.json").read_text())
    victim = anns[0]["img_name"]
    renamed = f"{SECRET}.png"
    for folder in ("images", "masks"):
        (bad / folder / victim).rename(bad / folder / renamed)
    (bad / "images" / renamed).write_bytes(b"not a png at all")
    anns[0]["img_name"] = anns[0]["mask_name"] = renamed
    (bad / "anns" / "train.json").write_text(json.dumps(anns))
    node_configs = [{"data-path": str(p), "site-name": f"hospital-{k}", "site-dir": str(tmp_path / f"site-{k}")}
                    for k, p in enumerate(sites)]
    return root, node_configs, tmp_path


def cfg_for(tmp_path, **kw) -> FederationConfig:
    values = {"base": "arch:tiny", "adapter": "shallow-vlc", "home": str(tmp_path / "server"), "rounds": 2,
              "compare": False, "lr": 0.01, "run_name": "visible", **kw}
    return FederationConfig(**values)


def everything_the_server_saw(grid: InProcessGrid, run_dir) -> bytes:
    blobs = list(grid.wire_replies)
    for f in run_dir.rglob("*"):
        if f.is_file():
            blobs.append(f.read_bytes())
    return b"\n".join(blobs)


def test_a_site_with_bad_data_fails_visibly_and_nothing_identifying_reaches_the_server(hospitals, caplog):
    root, node_configs, tmp = hospitals
    cfg = cfg_for(tmp)
    grid = InProcessGrid(cfg, 3, node_configs=node_configs)
    with caplog.at_level(logging.INFO, logger="flwr"):
        summary = run_federation(grid, cfg)
    run_dir = tmp / "server" / "runs" / "visible"
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2
    for r in rounds:
        assert r["status"] == "ok"
        # The round went on with the others, and its Dice averages only them.
        assert sorted(r["sites"]) == ["hospital-0", "hospital-2"]
        n = sum(s["val_examples"] for s in r["sites"].values())
        assert r["dice"] == pytest.approx(sum(s["val_dice"] * s["val_examples"] for s in r["sites"].values()) / n)
        train_fail = [f for f in r["failures"] if f["phase"] == "train"]
        assert train_fail == [{"site": "hospital-1", "node_id": 101, "phase": "train",
                               "reason": "data check: 1 unreadable-image in train"}]
    # The console's round line names the failed site and why.
    lines = [rec.getMessage() for rec in caplog.records if "round 1/2" in rec.getMessage()]
    assert lines and "hospital-1 failed train: data check: 1 unreadable-image in train" in lines[0]
    # Nothing identifying crossed to the server or landed in its records.
    seen = everything_the_server_saw(grid, run_dir)
    for needle in (SECRET, str(root), "not a png", "Traceback", "UnidentifiedImageError", "PIL"):
        assert needle.encode() not in seen, needle
    # ...while the site's own log has the details.
    site_log = (tmp / "site-1" / "logs" / "site.log").read_text()
    assert SECRET in site_log


def test_a_crashing_handler_replies_with_its_error_class_only(hospitals, monkeypatch):
    _, node_configs, tmp = hospitals
    import client.handlers as handlers

    def broken_fit(*args, **kwargs):
        raise ValueError(f"cannot read /data/{SECRET}/scan.png: value 0.731 out of range")

    monkeypatch.setattr(handlers, "fit", broken_fit)
    cfg = cfg_for(tmp, max_skipped_rounds=2)
    grid = InProcessGrid(cfg, 3, node_configs=[node_configs[0], node_configs[2]])
    with pytest.raises(RunFailed, match="2 round\\(s\\) in a row had no usable site update"):
        run_federation(grid, cfg)
    run_dir = tmp / "server" / "runs" / "visible"
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    # Skipped rounds are recorded (and checkpointed) with the reasons; the run then ends as failed.
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "skipped"), (2, "skipped")]
    assert {f["reason"] for f in rounds[0]["failures"]} == {"train failed: ValueError (details in the site's log)"}
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "no usable site update" in status["reason"]
    seen = everything_the_server_saw(grid, run_dir)
    assert SECRET.encode() not in seen and b"0.731" not in seen


def test_a_missing_data_folder_is_refused_without_its_path(hospitals):
    _, node_configs, tmp = hospitals
    gone = dict(node_configs[2], **{"data-path": str(tmp / SECRET)})
    cfg = cfg_for(tmp, rounds=1)
    grid = InProcessGrid(cfg, 3, node_configs=[node_configs[0], gone])
    run_federation(grid, cfg)
    run_dir = tmp / "server" / "runs" / "visible"
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert [f["reason"] for f in record["failures"]] == ["site config: data-path is not a folder"] * 2
    assert SECRET.encode() not in everything_the_server_saw(grid, run_dir)


def test_a_site_without_a_name_is_not_named_after_its_data_folder(hospitals):
    # Unnamed sites were named after their data folder, and every reply carried that name into
    # the server's records: `/data/<SECRET>` showed up as site "<SECRET>" in rounds.jsonl.
    root, node_configs, tmp = hospitals
    folder = root / SECRET
    Path(node_configs[0]["data-path"]).rename(folder)
    unnamed = {"data-path": str(folder), "site-dir": node_configs[0]["site-dir"]}
    cfg = cfg_for(tmp, rounds=1)
    grid = InProcessGrid(cfg, 2, node_configs=[unnamed, node_configs[2]])
    run_federation(grid, cfg)
    run_dir = tmp / "server" / "runs" / "visible"
    assert SECRET.encode() not in everything_the_server_saw(grid, run_dir)
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert sorted(record["sites"]) == sorted([default_site_name(folder, unnamed["site-dir"]), "hospital-2"])


def test_a_deployed_site_refuses_a_run_that_caps_its_images(hospitals):
    # `max-images = 1` is the server's to set: every site then sent one image's train loss,
    # validation Dice and loss (rows with num_examples 1, val_examples 1 in rounds.jsonl).
    _, node_configs, tmp = hospitals
    cfg = cfg_for(tmp, rounds=1, max_images=1)
    run_federation(InProcessGrid(cfg, 2, node_configs=[node_configs[0], node_configs[2]]), cfg)
    record = json.loads((tmp / "server" / "runs" / "visible" / "rounds.jsonl").read_text().splitlines()[0])
    assert record["sites"] == {}  # no figure of any site: not one over a single image
    assert {f["reason"] for f in record["failures"]} == {
        "site policy: a deployed site uses all its images (max-images would let a figure cover a single image)"}


def test_a_failure_outside_the_handlers_leaves_the_client_app_as_its_class_only(hospitals):
    # A worker address that is not `unix:<path>` fails in the ClientApp itself, before any handler:
    # raised, Flower would send "<class 'ValueError'>:<'... got '/srv/<SECRET>/worker.sock''>" as the reply.
    _, node_configs, tmp = hospitals
    misconfigured = dict(node_configs[0], worker=f"/srv/{SECRET}/worker.sock")
    cfg = cfg_for(tmp, rounds=1, max_skipped_rounds=1)
    grid = InProcessGrid(cfg, 1, node_configs=[misconfigured])
    with pytest.raises(RunFailed):
        run_federation(grid, cfg)
    run_dir = tmp / "server" / "runs" / "visible"
    assert SECRET.encode() not in everything_the_server_saw(grid, run_dir)
    assert not any(r.has_error() for r in grid.replies)  # a fedvlsm error reply, not Flower's
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert [f["reason"] for f in record["failures"]] == ["clientapp failed: ValueError (details in the site's log)"]
    # ...and the details are where the reason says (they went to the console only).
    site_logs = [p for p in tmp.rglob("site.log") if "server" not in p.relative_to(tmp).parts]
    assert any(SECRET in p.read_text() and "[clientapp]" in p.read_text() for p in site_logs), site_logs


class TamperingGrid(InProcessGrid):
    """Delivers as Flower would, then corrupts one site's train reply (a buggy or hostile site)."""

    def __init__(self, *a, tamper, **kw):
        super().__init__(*a, **kw)
        self.tamper = tamper

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for r in replies:
            if r.metadata.src_node_id == 100 and "arrays" in r.content.array_records:
                self.tamper(r)
        return replies


def _nan(reply):
    arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
    first = sorted(arrays)[0]
    arrays[first].flat[0] = np.nan
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _foreign(reply):
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    arrays["clip.vision_model.embeddings.patch_embedding.weight"] = np.zeros((2, 2), np.float16)
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _no_examples(reply):
    reply.content["metrics"]["num-examples"] = 0.0


@pytest.mark.parametrize("tamper,reason", [
    (_nan, "update holds NaN/Inf"),
    (_foreign, "tensors are not the shared adapter: 1 unexpected, 0 missing (personal parts must never be sent)"),
    (_no_examples, "num-examples missing or not a whole number in [1, 2147483647]"),
])
def test_a_bad_reply_is_excluded_and_the_round_aggregates_the_rest(tmp_path, tamper, reason):
    data = tmp_path / "data"
    synthesize(data, sites=3, per_site=9, seed=0, image_size=64)
    cfg = cfg_for(tmp_path, rounds=1, data=str(data))
    grid = TamperingGrid(cfg, 3, tamper=tamper)
    run_federation(grid, cfg)
    record = json.loads((tmp_path / "server/runs/visible/rounds.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok"
    assert [(e["site"], e["reason"]) for e in record["excluded"]] == [("site-0", reason)]
    assert sorted(record["sites"]) == ["site-0", "site-1", "site-2"]  # site-0 still evaluated
    assert "num_examples" not in record["sites"]["site-0"]  # ...but its update was not aggregated
    assert all("num_examples" in record["sites"][s] for s in ("site-1", "site-2"))


def test_min_sites_fails_at_once_in_simulation_and_waits_then_gives_up_in_deployment(tmp_path, caplog):
    cfg = cfg_for(tmp_path, min_sites=4, site_wait_timeout=0.3)
    grid = InProcessGrid(cfg, 3)
    with pytest.raises(ConfigError, match="'min-sites' = 4 but the simulation has 3 SuperNode"):
        wait_for_sites(grid, cfg, simulation=True)

    class Deployment(InProcessGrid):
        fedvlsm_simulation = False

    with caplog.at_level(logging.INFO, logger="flwr"):
        with pytest.raises(ConfigError, match="3 of 4 site\\(s\\) connected after 0s"):
            wait_for_sites(Deployment(cfg, 3), cfg, simulation=False, poll=0.05, report_every=0.1)
    waiting = [r.getMessage() for r in caplog.records if "waiting for 4 sites, 3 connected" in r.getMessage()]
    assert len(waiting) >= 2  # said periodically, not once


def test_the_server_app_has_no_demo_code_on_its_path():
    import subprocess
    import sys

    code = ("import sys, server.server_app; "
            "bad = sorted(m for m in sys.modules if m.startswith('simulations')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_resume_does_not_touch_config_json_when_it_fails(tmp_path):
    data = tmp_path / "data"
    synthesize(data, sites=3, per_site=9, seed=0, image_size=64)
    cfg = cfg_for(tmp_path, rounds=1, data=str(data))
    run_federation(InProcessGrid(cfg, 3), cfg)
    config_file = tmp_path / "server/runs/visible/config.json"
    before = config_file.read_bytes()
    # A resume to 3 rounds that cannot start (min-sites not met): config.json keeps rounds = 1.
    resumed = cfg.replace(rounds=3, resume=True, min_sites=5)
    with pytest.raises(ConfigError):
        run_federation(InProcessGrid(resumed, 3), resumed)
    assert config_file.read_bytes() == before
    shutil.rmtree(tmp_path / "server")
