"""Atomic writes: the target holds the old or the new content, never a half-written one."""

import pytest

from common.atomic import atomic_dir, atomic_path, write_json_atomic


def test_failed_file_write_keeps_old_content(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash")
    assert target.read_text() == '{\n  "v": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_dir_replace_and_keep(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "a").write_text("other")
    assert (target / "a").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def strict(text: str):
    """Parse as strict JSON (as JavaScript's JSON.parse and jq do): NaN/Infinity tokens refused."""
    import json

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_files_hold_null_where_a_value_is_nan(tmp_path):
    # summary.json (a run whose last ok round had no evaluation), comparison.json (no pooled bound
    # outside simulation) and rounds.jsonl were written with NaN tokens that strict parsers refuse.
    target = tmp_path / "s.json"
    write_json_atomic(target, {"final_dice": float("nan"), "rows": [{"pooled": float("inf"), "n": 3}]})
    assert strict(target.read_text()) == {"final_dice": None, "rows": [{"pooled": None, "n": 3}]}
