"""The run store: schema, rounds (old and new record shapes), idempotence, rewind, status, import, WAL reads."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading

import pytest

from server.run_records import RunRecords
from server.run_store import DB_FILE, SCHEMA_VERSION, RunStore, RunStoreError, ensure_store, import_from_jsonl

OLD = {"round": 1, "dice": 0.5, "dice_personal": 0.5, "train_loss": 1.2, "payload_bytes_up": 200,
       "payload_bytes_down": 400, "failures": ["evaluate: node 7: timed out"], "train_seconds": 1.0,
       "round_seconds": 2.0, "time": "2026-01-01T00:00:00+00:00",
       "sites": {"a": {"node_id": 1, "num_examples": 5, "train_loss": 1.2, "payload_bytes_up": 100,
                       "payload_bytes_down": 200, "val_dice": 0.4, "val_dice_personal": 0.45, "val_loss": 0.9,
                       "val_examples": 2},
                 "b": {"node_id": 2, "val_dice": 0.6, "val_dice_personal": 0.6, "val_loss": 0.5,
                       "val_examples": 6, "payload_bytes_down": 100}}}  # unequal: weighted != plain mean

NEW = {**OLD, "round": 2, "status": "ok", "dice": 0.7, "future_key": {"x": 1},
       "failures": [{"site": "c", "phase": "train", "reason": "CUDA out of memory"}],
       "excluded": [{"site": "d", "phase": "train", "reason": "unexpected tensor names"}],
       "epsilon_max": 1.5, "epsilon_server": 2.5, "delta": 1e-5,
       "sites": {"a": {**OLD["sites"]["a"], "epsilon": 1.5, "delta": 1e-5, "dp_steps": 10, "dp_sample_rate": 0.1,
                       "dp_noise_multiplier": 1.1}}}


def make(tmp_path, **config) -> RunRecords:
    return RunRecords.create(tmp_path, "r", {"rounds": 3, "payload-dtype": "fp16", **config},
                             meta={"trainable_parameters": 50, "base_parameters": 1000})


def test_schema_and_registration(tmp_path):
    records = make(tmp_path)
    con = sqlite3.connect(tmp_path / "r" / DB_FILE)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    run = records.store.read()["run"]
    assert run["status"] == "running" and run["name"] == "r" and run["started_at"]
    assert run["config"]["rounds"] == 3 and run["meta"]["base_parameters"] == 1000
    assert run["full_model_parameters"] == 1000 and run["full_model_bytes"] == 2000  # fp16: 2 bytes each


def test_old_and_new_records_are_extracted_and_kept_whole(tmp_path):
    records = make(tmp_path)
    records.append_round(OLD)
    records.append_round(NEW)
    r1, r2 = records.store.read()["rounds"]
    assert r1["status"] == "ok" and r1["dice"] == 0.5
    assert r1["failed"] == [{"site": "node 7", "phase": "evaluate", "reason": "timed out"}]
    assert [(s["site"], s["trained"], s["evaluated"]) for s in r1["sites"]] == [("a", True, True), ("b", False, True)]
    assert r1["val_loss"] == pytest.approx((0.9 * 2 + 0.5 * 6) / 8)
    # full-model messages: a trained and evaluated (1 up, 2 down), b only evaluated (1 down)
    assert r1["full_model_bytes_up"] == 2000 and r1["full_model_bytes_down"] == 3 * 2000
    assert r2["failed"] == NEW["failures"] and r2["excluded"] == NEW["excluded"]
    assert (r2["epsilon_max"], r2["epsilon_server"], r2["delta"]) == (1.5, 2.5, 1e-5)
    assert r2["sites"][0]["epsilon"] == 1.5 and r2["sites"][0]["dp_steps"] == 10
    assert records.store.read_records()[1]["future_key"] == {"x": 1}  # unknown keys are not lost


def test_re_append_is_idempotent_and_nan_is_null(tmp_path):
    records = make(tmp_path)
    records.append_round({**OLD, "dice": float("nan")})
    records.append_round(OLD)
    records.append_round(OLD)
    rounds = records.store.read()["rounds"]
    assert len(rounds) == 1 and rounds[0]["dice"] == 0.5 and len(rounds[0]["sites"]) == 2
    assert len(rounds[0]["failed"]) == 1
    records.append_round({"round": 2, "dice": float("nan")})
    assert records.store.read()["rounds"][1]["dice"] is None


def test_status_and_rewind(tmp_path):
    records = make(tmp_path)
    for r in (1, 2, 3):
        records.append_round({**OLD, "round": r})
    records.set_status("failed", "boom")
    run = records.store.read()["run"]
    assert (run["status"], run["reason"]) == ("failed", "boom") and run["ended_at"]
    with pytest.raises(ValueError, match="status"):
        records.set_status("exploded")
    # resume after round 1: store and rounds.jsonl both rewound, the run is running again
    resumed = RunRecords.open_existing(tmp_path, "r")
    resumed.rewind_to(1)
    data = resumed.store.read()
    assert [r["round"] for r in data["rounds"]] == [1] and [r["round"] for r in resumed.read_rounds()] == [1]
    assert data["run"]["status"] == "running" and data["run"]["ended_at"] is None
    resumed.set_status("stopped", "stopped by the coordinator")
    assert resumed.store.summary()["status"] == "stopped"


def test_a_crash_between_store_and_jsonl_is_rewound_on_resume(tmp_path, monkeypatch):
    import os

    records = make(tmp_path)
    records.append_round(OLD)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        records.append_round({**OLD, "round": 2})
    monkeypatch.undo()
    assert [r["round"] for r in records.store.read()["rounds"]] == [1, 2]  # in the store, not complete
    assert [r["round"] for r in records.read_rounds()] == [1]
    records.rewind_to(1)  # what resume does (last complete round: record and checkpoint)
    assert [r["round"] for r in records.store.read()["rounds"]] == [1]


def test_import_from_jsonl_and_reimport_when_it_changes(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"rounds": 2}))
    (run / "rounds.jsonl").write_text(json.dumps(OLD) + "\n")
    store = ensure_store(run)
    data = store.read()
    assert data["run"]["status"] == "unknown" and "rounds.jsonl" in data["run"]["reason"]
    assert [r["round"] for r in data["rounds"]] == [1] and data["run"]["source"] == "rounds.jsonl"
    # an older server still writing: a new line is picked up on the next view
    (run / "rounds.jsonl").write_text(json.dumps(OLD) + "\n" + json.dumps({**OLD, "round": 2}) + "\n")
    (run / "final").mkdir()
    (run / "final" / "summary.json").write_text("{}")
    data = ensure_store(run).read()
    assert [r["round"] for r in data["rounds"]] == [1, 2] and data["run"]["status"] == "finished"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(RunStoreError, match="not a run folder"):
        import_from_jsonl(tmp_path / "nothing")


def test_corrupt_missing_and_newer_stores_say_so(tmp_path):
    with pytest.raises(RunStoreError, match="no run store"):
        RunStore(tmp_path / DB_FILE).read()
    assert not (tmp_path / DB_FILE).exists()  # a reader never creates one
    (tmp_path / DB_FILE).write_bytes(b"garbage" * 500)
    with pytest.raises(RunStoreError, match="unreadable"):
        RunStore(tmp_path / DB_FILE).read()
    records = make(tmp_path)
    sqlite3.connect(records.store.path).execute("UPDATE schema_version SET version = 99").connection.commit()
    with pytest.raises(RunStoreError, match="newer fedvlsm"):
        records.store.read()


def test_readers_read_while_the_writer_holds_a_transaction(tmp_path):
    records = make(tmp_path)
    records.append_round(OLD)
    writer = sqlite3.connect(records.store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM rounds")  # uncommitted
    seen = []
    reader = threading.Thread(target=lambda: seen.append(len(RunStore(records.store.path).read()["rounds"])))
    reader.start()
    reader.join(timeout=10)
    assert seen == [1]  # WAL: the last committed snapshot, no waiting, no error
    writer.execute("ROLLBACK")
    writer.close()


def test_first_import_never_overwrites_a_store_that_appeared_meanwhile(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{}")
    make(tmp_path)  # the server registers the run (store written before config.json)
    import_from_jsonl(run)  # a dashboard that saw config.json alone a moment earlier
    assert RunStore.in_run_dir(run).read()["run"]["source"] == "server"


def test_flower_node_ids_beyond_signed_64_bit_are_kept_exactly(tmp_path):
    # Flower's node ids are unsigned 64-bit (a real simulation gave ids above 2**63).
    big = 2**64 - 5
    records = make(tmp_path)
    records.append_round({**NEW, "round": 1, "sites": {"a": {**NEW["sites"]["a"], "node_id": big}}})
    rows = records.store.read()["rounds"][0]["sites"]
    assert [r["node_id"] for r in rows] == [str(big)]


@pytest.mark.parametrize("config, rounds, where", [
    (b'{"rounds": 3}', b'{"dice": 0.5}\n', "rounds.jsonl line 1: a round record needs a 'round' key"),
    (b'{"rounds": 3}', json.dumps(OLD).encode() + b"\n[1, 2]\n",
     "rounds.jsonl line 2: a round record must be a JSON object, not list"),
    (b'{"rounds": 3}', b'{"round": "two"}\n', "rounds.jsonl line 1: a round record's 'round' must be an integer"),
    (b'{"rounds": 3}', b'{"round": 1, "sites": [1]}\n', "rounds.jsonl line 1: round 1: 'sites' must map"),
    (b'{"rounds": 3}', json.dumps(OLD).encode() + b"\n{oops\n", "rounds.jsonl line 2: not valid JSON"),
    (b'{"rounds": 3}', json.dumps(OLD).encode() + b'\n{"round": 2, "note": "\xe9"}\n',
     "rounds.jsonl line 2: not UTF-8"),
    (b'{"note": "\xff"}', b"", "config.json line 1: not UTF-8"),
    (b"[1, 2]", b"", "config.json: must hold a JSON object, not list"),
], ids=["no-round", "a-list", "round-a-string", "sites-a-list", "not-json", "rounds-not-utf8", "config-not-utf8",
        "config-a-list"])
def test_import_refuses_files_of_the_wrong_shape_naming_file_and_line(tmp_path, config, rounds, where):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_bytes(config)
    (run / "rounds.jsonl").write_bytes(rounds)
    with pytest.raises(RunStoreError, match=re.escape(where)):
        ensure_store(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "rounds.jsonl"]  # no store, no leftovers


def test_summary_keeps_the_last_figures_past_a_skipped_round_and_says_why_a_run_ended_early(tmp_path):
    records = make(tmp_path, dp="sample")
    records.append_round({**NEW, "round": 1})
    # every site out of its privacy budget: a skipped round without Dice or epsilon
    records.append_round({"round": 2, "status": "skipped", "dice": None, "dice_personal": None, "sites": {},
                          "failures": [{"site": "a", "phase": "train", "reason": "privacy budget: spent"}]})
    why = "privacy budget: every site has spent its dp-epsilon-budget"
    records.save_final_file("summary.json", json.dumps({"ended_early": why, "final_dice": NEW["dice"]}))
    records.set_status("finished")
    row = records.store.summary()
    assert (row["last_round"], row["rounds_done"]) == (2, 2)
    assert (row["last_dice"], row["last_dice_personal"]) == (NEW["dice"], NEW["dice_personal"])
    assert (row["last_epsilon_max"], row["last_epsilon_server"], row["last_delta"]) == (1.5, 2.5, 1e-5)
    assert row["status"] == "finished" and row["reason"] == why
    assert records.store.read()["run"]["reason"] == why


def test_an_imported_finished_run_ended_when_its_last_round_did(tmp_path):
    run = tmp_path / "old"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    last = {**OLD, "round": 2, "time": "2026-01-02T03:04:05+00:00"}
    (run / "rounds.jsonl").write_text(json.dumps(OLD) + "\n" + json.dumps(last) + "\n")
    (run / "final" / "summary.json").write_text(json.dumps({"ended_early": "privacy budget: spent"}))
    run_row = ensure_store(run).read()["run"]
    assert (run_row["status"], run_row["ended_at"]) == ("finished", "2026-01-02T03:04:05+00:00")
    assert run_row["reason"] == "privacy budget: spent"
    # re-imported when a file changes: still the run's own end, not the import's time
    (run / "rounds.jsonl").write_text(json.dumps({**OLD, "time": {"not": "a time"}}) + "\n")
    os.utime(run / "final" / "summary.json", (1_800_000_000, 1_800_000_000))
    assert ensure_store(run).read()["run"]["ended_at"] == "2027-01-15T08:00:00+00:00"  # summary.json's mtime


def test_the_epsilon_spent_is_the_largest_recorded_not_the_last_rounds(tmp_path):
    # With fraction-train < 1 a round records only the sites it sampled: round 2's maximum (site b, 1.2)
    # is below round 1's (site a, 1.9), yet a has spent 1.9. The summary showed 1.2.
    records = make(tmp_path, dp="sample")
    records.append_round({**NEW, "round": 1, "epsilon_max": 1.9})
    records.append_round({**NEW, "round": 2, "epsilon_max": 1.2})
    assert records.store.summary()["last_epsilon_max"] == 1.9
