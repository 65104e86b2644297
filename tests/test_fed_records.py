"""Run directory: rounds.jsonl, atomic checkpoints, what resume considers complete."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from server.run_records import RunRecords, RunRecordsError

META = {"format_version": 1, "base": "arch:tiny", "base_fingerprint": "x", "adapter": {}, "tensors": {}}


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"adapters.cond.up.weight": np.full((2, 3), value, np.float32)}


def save_round(records: RunRecords, r: int) -> None:
    records.save_checkpoint(r, arrays(r), META, {"m_t/x": np.ones(2) * r}, {"strategy": {"strategy": "FedAvg"}})
    records.append_round({"round": r, "dice": 0.1 * r})


def test_layout_and_roundtrip(tmp_path):
    records = RunRecords.create(tmp_path, "run-a", {"rounds": 2})
    for r in (1, 2):
        save_round(records, r)
    run = tmp_path / "run-a"
    assert json.loads((run / "config.json").read_text()) == {"rounds": 2}
    lines = (run / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    ck = records.load_checkpoint(2)
    np.testing.assert_array_equal(ck.arrays["adapters.cond.up.weight"], arrays(2)["adapters.cond.up.weight"])
    np.testing.assert_array_equal(ck.strategy_arrays["m_t/x"], np.ones(2) * 2)
    assert ck.state["round"] == 2 and (run / "checkpoints/round-0002/adapter/adapter_config.json").is_file()
    assert records.last_complete_round() == 2


def test_an_existing_run_is_not_overwritten(tmp_path):
    save_round(RunRecords.create(tmp_path, "r", {}), 1)
    with pytest.raises(RunRecordsError, match="resume=true"):
        RunRecords.create(tmp_path, "r", {})
    with pytest.raises(RunRecordsError, match="does not exist"):
        RunRecords.open_existing(tmp_path, "nope")


def test_crash_leftovers_do_not_count_and_are_cleaned_on_rewind(tmp_path):
    records = RunRecords.create(tmp_path, "r", {})
    save_round(records, 1)
    save_round(records, 2)
    ck = tmp_path / "r" / "checkpoints"
    # A crash while writing round 3's checkpoint leaves a hidden temp folder;
    # a crash between checkpoint and record leaves a checkpoint without record.
    (ck / ".round-0003.tmp-abc").mkdir()
    records.save_checkpoint(3, arrays(3), META, {}, {"strategy": {}})
    assert records.last_complete_round() == 2
    records.rewind_to(2)
    assert sorted(p.name for p in ck.iterdir()) == ["round-0001", "round-0002"]
    assert [r["round"] for r in records.read_rounds()] == [1, 2]


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    records = RunRecords.create(tmp_path, "r", {})
    save_round(records, 1)
    before = (tmp_path / "r" / "rounds.jsonl").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        records.append_round({"round": 2, "dice": 0.2})
    with pytest.raises(OSError):
        records.save_checkpoint(2, arrays(2), META, {}, {"strategy": {}})
    monkeypatch.undo()
    assert (tmp_path / "r" / "rounds.jsonl").read_text() == before
    assert not (tmp_path / "r" / "checkpoints" / "round-0002").exists()
    assert [p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")] == []
    assert records.last_complete_round() == 1


@pytest.mark.parametrize("damage", ["weights", "strategy", "state"])
def test_a_damaged_checkpoint_is_named_with_the_way_back_to_the_round_before(tmp_path, damage):
    # A truncated strategy.npz raised a bare zipfile error and a damaged state a JSONDecodeError, naming no file.
    records = RunRecords.create(tmp_path, "r", {})
    save_round(records, 1)
    save_round(records, 2)
    folder = tmp_path / "r" / "checkpoints" / "round-0002"
    target = {"weights": folder / "adapter" / "adapter_model.safetensors",
              "strategy": next(folder.glob("*.npz")), "state": folder / "state.json"}[damage]
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(RunRecordsError) as err:
        records.load_checkpoint(2)
    message = str(err.value)
    assert str(target) in message and f"remove the folder {folder}" in message and "\n" not in message
    # The way out it names works: without the folder, round 1 is the last complete one and loads.
    import shutil

    shutil.rmtree(folder)
    assert records.last_complete_round() == 1
    assert records.load_checkpoint(1).state["round"] == 1


def test_rounds_jsonl_is_strict_json_with_null_for_a_missing_figure(tmp_path):
    # A skipped round's Dice (and sample-level DP's round train_loss) is NaN: it was written as the token
    # NaN, which is not JSON (jq and JavaScript's JSON.parse refuse the whole line).
    records = RunRecords.create(tmp_path, "r", {})
    records.append_round({"round": 1, "status": "skipped", "dice": float("nan"), "train_loss": float("inf")})

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    (line,) = (tmp_path / "r" / "rounds.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=refuse) == {"round": 1, "status": "skipped", "dice": None,
                                                       "train_loss": None}


def test_rewinding_for_a_resume_forgets_the_later_rounds_everywhere_and_the_final_stage(tmp_path):
    records = RunRecords.create(tmp_path, "r", {})
    for r in (1, 2, 3):
        save_round(records, r)
    records.save_final(arrays(3), META, {"rounds": 3})
    records.set_status("failed", "killed")
    records.continue_after(1)
    assert [r["round"] for r in records.read_rounds()] == [1]
    assert [r["round"] for r in records.store.read_records()] == [1]  # the run store too (the dashboard)
    assert records.checkpoint_rounds() == [1] and records.last_complete_round() == 1
    assert not (tmp_path / "r" / "final").exists()  # a final adapter of the forgotten rounds
    assert records.read_status()["status"] == "running"


def test_a_resume_with_nothing_left_to_run_keeps_the_rounds_and_final(tmp_path):
    records = RunRecords.create(tmp_path, "r", {})
    save_round(records, 1)
    records.save_final(arrays(1), META, {"rounds": 1})
    records.set_status("failed", "killed in the final stage")
    records.continue_after(1, rerun=False)
    assert [r["round"] for r in records.read_rounds()] == [1]
    assert (tmp_path / "r" / "final" / "summary.json").is_file()
    assert records.read_status()["status"] == "running"


def test_writing_a_round_again_replaces_it_and_drops_the_later_ones(tmp_path):
    records = RunRecords.create(tmp_path, "r", {})
    for r in (1, 2, 3):
        records.append_round({"round": r, "dice": 0.1 * r})
    records.append_round({"round": 2, "dice": 0.9})
    assert records.read_rounds() == [{"round": 1, "dice": 0.1}, {"round": 2, "dice": 0.9}]


def test_a_checkpoint_folder_without_its_state_file_is_not_a_round_to_resume_from(tmp_path):
    # A checkpoint copied back by hand without state.json (or a half-restored backup): resume must
    # fall back to the round before, not pick it and fail loading it.
    records = RunRecords.create(tmp_path, "r", {})
    save_round(records, 1)
    save_round(records, 2)
    (tmp_path / "r" / "checkpoints" / "round-0002" / "state.json").unlink()
    assert records.checkpoint_rounds() == [1] and records.last_complete_round() == 1


def test_a_new_run_in_a_folder_without_rounds_gets_a_new_run_id(tmp_path):
    # A run that failed before its first round leaves its folder; a new run of that name is another
    # run: sites key their personal parts by the run id, so it must not inherit the old one's.
    first = RunRecords.create(tmp_path, "r", {}).run_id
    second = RunRecords.create(tmp_path, "r", {}).run_id
    assert first != second and len(second) == 16
