"""The run store: one SQLite database per run, `<runs-dir>/<run-name>/run.sqlite`.

What the dashboard reads. The ServerApp (through ``RunRecords``) is the one
writer; any number of readers may read while it writes (WAL journal). The
schema is versioned (table ``schema_version``) and documented in
docs/run-store.md. A run folder without a database (written before the store
existed) is imported from its ``rounds.jsonl`` on first view
(``import_from_jsonl``).

Every round's full record is kept as JSON (``rounds.record_json``,
``site_rounds.row_json``) so that no key is lost; the known keys are also
extracted into columns for the API and the charts.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common.atomic import json_text
from server.run_claim import held_by_a_process

DB_FILE = "run.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("running", "finished", "failed", "stopped", "unknown")
# Shown, never stored: a `running` run whose server process has gone (see RunStore._shown_status).
INTERRUPTED = "interrupted"
INTERRUPTED_REASON = ("its server process ended without recording how the run ended (killed, crashed, or its "
                      "machine went down); resume it (resume=true) to continue after its last complete round")

# Bytes per tensor element on the wire, by run-config `payload-dtype`.
WIRE_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    config_json TEXT NOT NULL,
    meta_json TEXT NOT NULL DEFAULT '{}',
    full_model_parameters INTEGER,
    full_model_bytes INTEGER,
    started_at TEXT,
    updated_at TEXT,
    ended_at TEXT,
    source TEXT NOT NULL DEFAULT 'server',
    source_stamp TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    dice REAL,
    dice_personal REAL,
    train_loss REAL,
    val_loss REAL,
    payload_bytes_up INTEGER,
    payload_bytes_down INTEGER,
    train_seconds REAL,
    round_seconds REAL,
    time TEXT,
    epsilon_max REAL,
    epsilon_server REAL,
    delta REAL,
    record_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS site_rounds (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
    site TEXT NOT NULL,
    node_id TEXT,  -- Flower node ids are unsigned 64-bit: beyond SQLite's signed INTEGER
    trained INTEGER NOT NULL,
    evaluated INTEGER NOT NULL,
    num_examples INTEGER,
    train_loss REAL,
    train_seconds REAL,
    payload_bytes_up INTEGER,
    payload_bytes_down INTEGER,
    val_dice REAL,
    val_dice_personal REAL,
    val_loss REAL,
    val_examples INTEGER,
    epsilon REAL,
    delta REAL,
    dp_steps INTEGER,
    dp_sample_rate REAL,
    dp_noise_multiplier REAL,
    row_json TEXT NOT NULL,
    PRIMARY KEY (round, site)
);
CREATE TABLE IF NOT EXISTS site_events (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('failed', 'excluded')),
    site TEXT NOT NULL,
    phase TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS site_events_round ON site_events(round);
"""

ROUND_COLUMNS = ("round", "status", "dice", "dice_personal", "train_loss", "val_loss", "payload_bytes_up",
                 "payload_bytes_down", "train_seconds", "round_seconds", "time", "epsilon_max",
                 "epsilon_server", "delta")
SITE_COLUMNS = ("site", "node_id", "trained", "evaluated", "num_examples", "train_loss", "train_seconds",
                "payload_bytes_up", "payload_bytes_down", "val_dice", "val_dice_personal", "val_loss",
                "val_examples", "epsilon", "delta", "dp_steps", "dp_sample_rate", "dp_noise_multiplier")


class RunStoreError(RuntimeError):
    """A run store that is missing, corrupt, or from a newer schema; the message says which."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _num(value: Any) -> float | None:
    """A float for SQLite, or None for missing/NaN/inf (SQLite and JSON have no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    x = _num(value)
    return int(x) if x is not None else None


def _text(value: Any) -> str | None:
    """A string for a TEXT column, or None (a hand-edited record may hold anything; its JSON copy keeps it)."""
    return value if isinstance(value, str) else None


def _json(value: Any) -> str:
    # A round without evaluation has a NaN Dice: written as null (JSON has no NaN).
    return json_text(value, sort_keys=True)


def parse_events(items: Any) -> list[dict[str, str]]:
    """Failures or exclusions as `{site, phase, reason}` dicts.

    Accepts the dict form and the older string form ``"<phase>: node <id>: <reason>"``.
    """
    out = []
    for item in items or []:
        if isinstance(item, dict):
            out.append({"site": str(item.get("site", "") or item.get("node", "") or "?"),
                        "phase": str(item.get("phase", "") or ""), "reason": str(item.get("reason", "") or "")})
            continue
        text = str(item)
        phase, _, rest = text.partition(": ")
        if not rest:
            out.append({"site": "?", "phase": "", "reason": text})
            continue
        site, sep, reason = rest.partition(": ")
        if not sep:
            site, reason = "?", rest
        out.append({"site": site.strip(), "phase": phase.strip(), "reason": reason.strip()})
    return out


def full_model_from_meta(config: dict[str, Any], meta: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(parameters, bytes) of one full-model FedAvg message, or (None, None) when not known.

    Full-model FedAvg sends the whole base model (`base_parameters`) in each
    message; we count it at the run's wire dtype (`payload-dtype`), so the
    comparison shows what the adapters save, not what fp16 saves. An explicit
    `full_model_bytes` in `meta` wins.
    """
    meta = meta or {}
    params = _int(meta.get("full_model_parameters")) or _int(meta.get("base_parameters"))
    explicit = _int(meta.get("full_model_bytes"))
    if explicit is not None:
        return params, explicit
    if params is None:
        return None, None
    element = WIRE_ELEMENT_BYTES.get(str(config.get("payload-dtype", "fp32")), 4)
    return params, params * element


def check_record(record: Any) -> int:
    """The round number of a round record; ValueError saying what is wrong with one of another shape.

    Checked before anything is written: a record of the wrong shape (an older
    or hand-edited rounds.jsonl) would otherwise fail deep inside the write.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a round record must be a JSON object, not {type(record).__name__}")
    if "round" not in record:
        raise ValueError("a round record needs a 'round' key")
    number = record["round"]
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"a round record's 'round' must be an integer, not {number!r}")
    sites = record.get("sites")
    if sites is not None and not (isinstance(sites, dict)
                                  and all(row is None or isinstance(row, dict) for row in sites.values())):
        raise ValueError(f"round {number}: 'sites' must map site names to JSON objects")
    for key in ("failures", "excluded"):
        if record.get(key) is not None and not isinstance(record[key], list):
            raise ValueError(f"round {number}: '{key}' must be a list, not {type(record[key]).__name__}")
    return number


def _site_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, row in sorted((record.get("sites") or {}).items()):
        row = row or {}
        rows.append({
            "site": str(name),
            "node_id": None if row.get("node_id") is None else str(row.get("node_id")),
            "trained": int("num_examples" in row),
            "evaluated": int("val_dice" in row or "val_examples" in row),
            "num_examples": _int(row.get("num_examples")),
            "train_loss": _num(row.get("train_loss")),
            "train_seconds": _num(row.get("train_seconds")),
            "payload_bytes_up": _int(row.get("payload_bytes_up")),
            "payload_bytes_down": _int(row.get("payload_bytes_down")),
            "val_dice": _num(row.get("val_dice")),
            "val_dice_personal": _num(row.get("val_dice_personal")),
            "val_loss": _num(row.get("val_loss")),
            "val_examples": _int(row.get("val_examples")),
            "epsilon": _num(row.get("epsilon")),
            "delta": _num(row.get("delta")),
            "dp_steps": _int(row.get("dp_steps")),
            "dp_sample_rate": _num(row.get("dp_sample_rate")),
            "dp_noise_multiplier": _num(row.get("dp_noise_multiplier")),
            "row_json": _json(row),
        })
    return rows


def _val_loss(rows: list[dict[str, Any]]) -> float | None:
    """Validation loss of the global adapter, mean over sites weighted by validation images."""
    pairs = [(r["val_loss"], r["val_examples"]) for r in rows if r["val_loss"] is not None and r["val_examples"]]
    n = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / n if n else None


class RunStore:
    """One run's database. Connections are opened per operation (no handle held between rounds)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_run_dir(cls, run_dir: Path) -> RunStore:
        return cls(Path(run_dir) / DB_FILE)

    def exists(self) -> bool:
        return self.path.is_file()

    # ------------------------------------------------------------ connection
    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        if not write and not self.exists():
            raise RunStoreError(f"{self.path}: no run store (run.sqlite) in this run folder")
        # A reader without write access to the folder (a dashboard run as another user) cannot make the
        # WAL's run.sqlite-shm. With no run.sqlite-wal (no writer has it open) it reads the file as it
        # stands (immutable: no locks, no -shm), and checks that the file did not change meanwhile.
        frozen = not write and not os.access(self.path.parent, os.W_OK) and not self._wal().exists()
        mode = "rwc" if write else "ro" if frozen else "rw"  # a reader never creates the file
        # The path quoted: a '#', '?' or '%' in it would end or change the URI's path.
        uri = f"file:{quote(str(self.path))}?mode={mode}{'&immutable=1' if frozen else ''}"
        before = self._stamp() if frozen else None
        try:
            con = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise RunStoreError(f"{self.path}: cannot open the run store: {err}") from err
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 10000")
            con.execute("PRAGMA foreign_keys = ON")
            if write:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = FULL")
            else:
                con.execute("PRAGMA query_only = ON")
            yield con
            if frozen and self._stamp() != before:
                raise RunStoreError(f"{self.path}: written while it was read (read as it stands: no write access "
                                    "to its folder); read it again")
        except sqlite3.DatabaseError as err:
            if not write and "readonly" in str(err):
                raise RunStoreError(f"{self.path}: cannot be read without write access to its folder while "
                                    f"its run.sqlite-wal has no run.sqlite-shm ({err})") from err
            raise RunStoreError(f"{self.path}: the run store is unreadable ({err}); "
                                "it may be corrupt or not a fedvlsm run store") from err
        finally:
            con.close()

    def _wal(self) -> Path:
        return Path(f"{self.path}-wal")

    def _stamp(self) -> tuple[int, int, int, bool]:
        """What changes when the store's file is written (inode, size, mtime) and whether a writer has it open."""
        st = self.path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns, self._wal().exists()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect(write=True) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _check_version(self, con: sqlite3.Connection) -> None:
        try:
            row = con.execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.OperationalError as err:
            if "no such table" not in str(err):  # e.g. a read-only folder: said by _connect
                raise
            raise RunStoreError(f"{self.path}: not a fedvlsm run store ({err})") from err
        if row is None:
            raise RunStoreError(f"{self.path}: run store has no schema version")
        if row[0] > SCHEMA_VERSION:
            raise RunStoreError(f"{self.path}: run store schema v{row[0]} was written by a newer fedvlsm; "
                                f"this one reads up to v{SCHEMA_VERSION}")

    # --------------------------------------------------------------- writing
    def register_run(self, name: str, config: dict[str, Any], meta: dict[str, Any] | None = None, *,
                     status: str = "running", started_at: str | None = None, source: str = "server",
                     source_stamp: str | None = None) -> None:
        """(Re)start the run's row and forget any rounds (a new run under this name)."""
        _check_status(status)
        params, full_bytes = full_model_from_meta(config, meta)
        with self._transaction() as con:
            # statement by statement: executescript() would commit the open transaction
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            version = con.execute("SELECT version FROM schema_version").fetchone()
            if version is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version[0] > SCHEMA_VERSION:
                raise RunStoreError(f"{self.path}: run store schema v{version[0]} is newer than this fedvlsm "
                                    f"(v{SCHEMA_VERSION})")
            con.execute("DELETE FROM rounds")
            con.execute("DELETE FROM run")
            stamp = started_at or now()
            con.execute(
                "INSERT INTO run (id, name, status, reason, config_json, meta_json, full_model_parameters, "
                "full_model_bytes, started_at, updated_at, ended_at, source, source_stamp) "
                "VALUES (1, ?, ?, '', ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (name, status, _json(config), _json(meta or {}), params, full_bytes, stamp, now(), source,
                 source_stamp),
            )

    def write_round(self, record: dict[str, Any]) -> None:
        """One round in one transaction; writing the same round again replaces it (idempotent)."""
        number = check_record(record)
        sites = _site_rows(record)
        with self._transaction() as con:
            self._check_version(con)
            con.execute("DELETE FROM rounds WHERE round = ?", (number,))  # cascades to sites and events
            con.execute(
                f"INSERT INTO rounds ({', '.join(ROUND_COLUMNS)}, record_json) "
                f"VALUES ({', '.join('?' * (len(ROUND_COLUMNS) + 1))})",
                (number, str(record.get("status") or "ok"), _num(record.get("dice")),
                 _num(record.get("dice_personal")), _num(record.get("train_loss")), _val_loss(sites),
                 _int(record.get("payload_bytes_up")), _int(record.get("payload_bytes_down")),
                 _num(record.get("train_seconds")), _num(record.get("round_seconds")), _text(record.get("time")),
                 _num(record.get("epsilon_max")), _num(record.get("epsilon_server")), _num(record.get("delta")),
                 _json(record)),
            )
            for row in sites:
                con.execute(
                    f"INSERT INTO site_rounds (round, {', '.join(SITE_COLUMNS)}, row_json) "
                    f"VALUES ({', '.join('?' * (len(SITE_COLUMNS) + 2))})",
                    (number, *(row[c] for c in SITE_COLUMNS), row["row_json"]),
                )
            for kind, key in (("failed", "failures"), ("excluded", "excluded")):
                for event in parse_events(record.get(key)):
                    con.execute("INSERT INTO site_events (round, kind, site, phase, reason) VALUES (?, ?, ?, ?, ?)",
                                (number, kind, event["site"], event["phase"], event["reason"]))
            con.execute("UPDATE run SET updated_at = ?", (now(),))

    def rewind_to(self, server_round: int) -> None:
        """Forget every round after `server_round`; the run is running again (resume)."""
        with self._transaction() as con:
            self._check_version(con)
            con.execute("DELETE FROM rounds WHERE round > ?", (server_round,))
            con.execute("UPDATE run SET status = 'running', reason = '', ended_at = NULL, updated_at = ?", (now(),))

    def set_status(self, status: str, reason: str = "", ended_at: str | None = None) -> None:
        """`ended_at`: when the run ended, if not now (an import knows it from the records); NULL while running."""
        _check_status(status)
        with self._transaction() as con:
            self._check_version(con)
            stamp = now()
            # `unknown` (imports only) may still be running: no end time to show
            ended = None if status in ("running", "unknown") else (ended_at or stamp)
            con.execute("UPDATE run SET status = ?, reason = ?, ended_at = ?, updated_at = ?",
                        (status, reason, ended, stamp))

    def claim(self) -> None:
        """From now on the server writes this store (an imported one is no longer re-imported)."""
        with self._transaction() as con:
            self._check_version(con)
            con.execute("UPDATE run SET source = 'server', source_stamp = NULL")

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Figures known once the server has built the model (parameter counts: full-model comparison)."""
        with self._transaction() as con:
            self._check_version(con)
            row = con.execute("SELECT config_json FROM run").fetchone()
            config = json.loads(row[0]) if row and row[0] else {}
            params, full_bytes = full_model_from_meta(config, meta)
            con.execute("UPDATE run SET meta_json = ?, full_model_parameters = ?, full_model_bytes = ?, "
                        "updated_at = ?", (_json(meta), params, full_bytes, now()))

    def set_config(self, config: dict[str, Any]) -> None:
        with self._transaction() as con:
            self._check_version(con)
            con.execute("UPDATE run SET config_json = ?, updated_at = ?", (_json(config), now()))

    # --------------------------------------------------------------- reading
    def read(self, since: int | None = None, base: str | None = None) -> dict[str, Any]:
        """The run: {run, rounds: [{..., sites, failed, excluded}], rounds_key, since}.

        `rounds_key` fingerprints the rounds returned (and what their derived
        figures depend on). A reader that holds every round up to N, as of a
        response whose `rounds_key` was K, asks `read(since=N, base=K)`: when
        the rounds up to N are still those (same fingerprint), only the rounds
        after N are read and returned, with `since` = N; otherwise (a resume
        rewound and rewrote rounds, a new run took the name, a re-import) the
        whole run is, with `since` = None. A 5,000-round run then costs a poll
        a few kB instead of every round's site rows (docs/run-store.md).
        """
        gone = self._process_gone()  # before the read: see _shown_status
        with self._connect(write=False) as con:
            con.execute("BEGIN")  # one snapshot for all the selects below
            self._check_version(con)
            run = con.execute("SELECT * FROM run WHERE id = 1").fetchone()
            if run is None:
                raise RunStoreError(f"{self.path}: the run store holds no run")
            # The round columns of every round are cheap (no JSON, no site rows): the fingerprint covers them
            # all. Plain tuples (no Row, no dict) for the rounds a poll does not send: most of them.
            cursor = con.cursor()
            cursor.row_factory = None
            values = cursor.execute(f"SELECT {', '.join(ROUND_COLUMNS)} FROM rounds ORDER BY round").fetchall()
            key_at_since, key = _rounds_keys(con, run, values, since)
            if since is None or base != key_at_since:
                since = None
            else:
                values = values[bisect.bisect_right(values, since, key=lambda v: v[0]):]  # sorted by round
            rounds = [dict(zip(ROUND_COLUMNS, v)) for v in values]
            after = -(2 ** 63) if since is None else since  # SQLite's smallest integer: every round
            by_round = {r["round"]: r for r in rounds}
            for r in rounds:
                r.update(sites=[], failed=[], excluded=[])
            for row in con.execute(f"SELECT round, {', '.join(SITE_COLUMNS)} FROM site_rounds WHERE round > ? "
                                   "ORDER BY round, site", (after,)):
                row = dict(row)
                number = row.pop("round")
                row["trained"], row["evaluated"] = bool(row["trained"]), bool(row["evaluated"])
                by_round[number]["sites"].append(row)
            for ev in con.execute("SELECT round, kind, site, phase, reason FROM site_events WHERE round > ? "
                                  "ORDER BY rowid", (after,)):
                by_round[ev["round"]][ev["kind"]].append({"site": ev["site"], "phase": ev["phase"],
                                                          "reason": ev["reason"]})
            con.execute("COMMIT")
        info = dict(run)
        info.pop("id")
        info["status"], info["reason"] = self._shown_status(info["status"], info["reason"], gone)
        info["config"] = json.loads(info.pop("config_json"))
        info["meta"] = json.loads(info.pop("meta_json"))
        for r in rounds:
            full = info["full_model_bytes"]
            ups = sum(1 for s in r["sites"] if s["trained"])
            downs = sum(int(s["trained"]) + int(s["evaluated"]) for s in r["sites"])
            r["full_model_bytes_up"] = ups * full if full is not None else None
            r["full_model_bytes_down"] = downs * full if full is not None else None
        return {"run": info, "rounds": rounds, "rounds_key": key, "since": since}

    def summary(self) -> dict[str, Any]:
        """The runs-list row: name, status, reason, rounds done, last round, last Dice, last privacy figures, times.

        The Dice is the last `ok` round's and each privacy figure the latest
        one recorded (as final/summary.json does): a skipped round, e.g. one
        where every site had spent its privacy budget, has neither.
        """
        gone = self._process_gone()
        with self._connect(write=False) as con:
            con.execute("BEGIN")
            self._check_version(con)
            run = con.execute("SELECT name, status, reason, started_at, updated_at, ended_at FROM run "
                              "WHERE id = 1").fetchone()
            if run is None:
                raise RunStoreError(f"{self.path}: the run store holds no run")
            done, last = con.execute("SELECT COUNT(*), MAX(round) FROM rounds").fetchone()
            ok = con.execute("SELECT dice, dice_personal FROM rounds WHERE status = 'ok' "
                             "ORDER BY round DESC LIMIT 1").fetchone()
            # Epsilon spent so far: the largest recorded (a round records only the sites it sampled).
            privacy = {"last_epsilon_max": _largest(con, "epsilon_max"),
                       "last_epsilon_server": _largest(con, "epsilon_server"), "last_delta": _latest(con, "delta")}
            con.execute("COMMIT")
        row = dict(run)
        row["status"], row["reason"] = self._shown_status(row["status"], row["reason"], gone)
        return {**row, "rounds_done": done, "last_round": last, "last_dice": ok["dice"] if ok else None,
                "last_dice_personal": ok["dice_personal"] if ok else None, **privacy}

    def _process_gone(self) -> bool:
        """True when this run's name has a claim file that no process holds (its server is gone).

        Asked before the store is read: the server writes its final status and
        only then lets the claim go, so a claim found free before a read that
        still says `running` means no process is left to write another status.
        """
        run_dir = self.path.parent
        return held_by_a_process(run_dir.parent, run_dir.name) is False

    def _shown_status(self, status: str, reason: str, gone: bool) -> tuple[str, str]:
        """The status and reason to show: a `running` run nothing runs any more is `interrupted`.

        Why: a server killed by SIGKILL, the OOM killer or a power cut cannot
        write its end, and its run said `running` for ever.
        """
        if status == "running" and gone:
            return INTERRUPTED, INTERRUPTED_REASON
        return status, self._shown_reason(status, reason)

    def _shown_reason(self, status: str, reason: str) -> str:
        """The status reason to show; a finished run that ended early says why.

        The server records such a run (e.g. every site spent its privacy
        budget) as `finished` with no reason; final/summary.json's
        `ended_early` has the why.
        """
        if status == "finished" and not reason:
            return _ended_early(self.path.parent)
        return reason

    def read_records(self) -> list[dict[str, Any]]:
        """The rounds' full records as written (NaN written as null)."""
        with self._connect(write=False) as con:
            self._check_version(con)
            return [json.loads(r[0]) for r in con.execute("SELECT record_json FROM rounds ORDER BY round")]


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"run status must be one of {STATUSES}, got {status!r}")


def _round_column(column: str) -> str:
    if column not in ROUND_COLUMNS:  # interpolated into the SQL: only a known column name
        raise ValueError(f"not a rounds column: {column!r}")
    return column


def _latest(con: sqlite3.Connection, column: str) -> Any:
    """The latest round's non-NULL value of a `rounds` column (one of ROUND_COLUMNS), or None."""
    c = _round_column(column)
    row = con.execute(f"SELECT {c} FROM rounds WHERE {c} IS NOT NULL ORDER BY round DESC LIMIT 1").fetchone()
    return row[0] if row else None


def _largest(con: sqlite3.Connection, column: str) -> Any:
    """The largest non-NULL value of a `rounds` column (one of ROUND_COLUMNS), or None."""
    return con.execute(f"SELECT MAX({_round_column(column)}) FROM rounds").fetchone()[0]


def _rounds_keys(con: sqlite3.Connection, run: sqlite3.Row, values: list[tuple[Any, ...]],
                 since: int | None) -> tuple[str, str]:
    """(fingerprint of the rounds up to `since`, fingerprint of all rounds): what read()'s `base` is checked against.

    `values`: every round's ROUND_COLUMNS, sorted by round. Covers what a
    reader's copy of those rounds was made of: the run's identity (a new run
    under the name has another start), the full-model size (each round's
    full-model bytes derive from it), every round column (a rewritten round
    has at least another `time`, to the second) and how many site rows and
    events those rounds have (a round's rows are written with it, in one
    transaction). The two are equal when no round is after `since`.
    """
    def key(rows: list[tuple[Any, ...]], counts: tuple[int, int]) -> str:
        text = repr((run["started_at"], run["source_stamp"], run["full_model_bytes"], rows, counts))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    total = tuple(con.execute("SELECT (SELECT COUNT(*) FROM site_rounds), (SELECT COUNT(*) FROM site_events)").fetchone())
    if since is None:
        return "", key(values, total)
    held = bisect.bisect_right(values, since, key=lambda v: v[0])
    if held == len(values):  # nothing after `since`: the same rounds, the same counts
        whole = key(values, total)
        return whole, whole
    counts = tuple(con.execute("SELECT (SELECT COUNT(*) FROM site_rounds WHERE round <= ?), "
                               "(SELECT COUNT(*) FROM site_events WHERE round <= ?)", (since, since)).fetchone())
    return key(values[:held], counts), key(values, total)


def _ended_early(run_dir: Path) -> str:
    """Why a finished run stopped before its last round (final/summary.json's `ended_early`), or ''."""
    try:
        summary = json.loads((run_dir / "final" / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or unreadable: the reason is a note, never worth failing a view
        return ""
    reason = summary.get("ended_early") if isinstance(summary, dict) else None
    return reason if isinstance(reason, str) else ""


# --------------------------------------------------------------- import
def _jsonl_stamp(run_dir: Path) -> str:
    """Changes whenever rounds.jsonl, config.json or final/summary.json change."""
    parts = []
    for name in ("config.json", "rounds.jsonl", "final/summary.json"):
        p = run_dir / name
        parts.append(f"{name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" if p.is_file() else f"{name}:-")
    return "|".join(parts)


def _read_text(path: Path) -> str:
    """A UTF-8 file's text; RunStoreError naming the file (and the line) when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunStoreError(f"{path}: cannot read it: {err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise RunStoreError(f"{path} line {line}: not UTF-8 text (byte {err.start:,})") from err


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RunStoreError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise RunStoreError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _read_records(path: Path) -> list[dict[str, Any]]:
    """rounds.jsonl's records, each checked (`check_record`); RunStoreError naming the file and line of a bad one."""
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunStoreError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from err
        try:
            check_record(record)
        except ValueError as err:
            raise RunStoreError(f"{path} line {number}: {err}") from err
        records.append(record)
    return records


def _utc_stamp(value: Any) -> str | None:
    """An ISO 8601 time as this store writes it (UTC, seconds), or None when `value` is not one."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="seconds")


def _mtime_stamp(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _imported_end(records: list[dict[str, Any]], summary_path: Path) -> str:
    """When an imported finished run ended: its last round's `time`, else when final/summary.json was written.

    Never the import's own time: a run is imported again whenever its files change.
    """
    if records:
        stamp = _utc_stamp(max(records, key=lambda r: r["round"]).get("time"))
        if stamp:
            return stamp
    try:
        return _mtime_stamp(summary_path)
    except OSError:  # removed since it was read: the import's time is all there is
        return now()


def import_from_jsonl(run_dir: Path, replace: bool = False) -> RunStore:
    """Build `run.sqlite` of a run folder written before the store existed (config.json + rounds.jsonl).

    Status: `finished` when `final/summary.json` exists (ended at the last
    round's `time`), else `unknown` (such a folder cannot tell a failed,
    stopped or still running run apart). The import remembers the files'
    size and mtime; `ensure_store` imports again when they change, so a run
    written by an older server stays current. Without `replace`, a store
    that appeared meanwhile (a server registering the run) is kept: the
    import never overwrites it. Files that cannot be read, or hold JSON of
    another shape (config not an object, a record without an integer
    `round`), raise RunStoreError naming the file and line.
    """
    run_dir = Path(run_dir)
    config_path, rounds_path = run_dir / "config.json", run_dir / "rounds.jsonl"
    summary_path = run_dir / "final" / "summary.json"
    if not config_path.is_file() and not rounds_path.is_file():
        raise RunStoreError(f"{run_dir}: not a run folder (no config.json, no rounds.jsonl)")
    stamp = _jsonl_stamp(run_dir)
    config = _read_json_object(config_path) if config_path.is_file() else {}
    records = _read_records(rounds_path) if rounds_path.is_file() else []
    summary = _read_json_object(summary_path) if summary_path.is_file() else None
    meta = {}
    if summary and summary.get("trainable_parameters"):
        meta["trainable_parameters"] = summary["trainable_parameters"]
    try:
        started = _mtime_stamp(config_path if config_path.is_file() else rounds_path)
    except OSError as err:
        raise RunStoreError(f"{run_dir}: cannot import the run's records: {err}") from err
    if not os.access(run_dir, os.W_OK):
        raise RunStoreError(f"{run_dir}: a run folder from before the run store: its {DB_FILE} is made from "
                            "rounds.jsonl on first view, which needs write access to the folder (view it once "
                            "as a user who may write there)")
    # Build aside, then rename: a reader never sees a half-imported store.
    tmp = RunStore(run_dir / f".{DB_FILE}.import-{time.monotonic_ns()}")
    try:
        tmp.register_run(run_dir.name, config, meta, status="running", started_at=started, source="rounds.jsonl",
                         source_stamp=stamp)
        for record in records:
            tmp.write_round(record)
        if summary is not None:
            ended_early = summary.get("ended_early")
            tmp.set_status("finished", ended_early if isinstance(ended_early, str) else "",
                           ended_at=_imported_end(records, summary_path))
        else:
            tmp.set_status("unknown", "imported from rounds.jsonl without final/: "
                                      "the run may have failed, been stopped, or still be running")
        with tmp._connect(write=True) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.execute("PRAGMA journal_mode = DELETE")  # one self-contained file to rename
        store = RunStore.in_run_dir(run_dir)
        if replace:
            tmp.path.replace(store.path)
            for suffix in ("-wal", "-shm"):
                Path(f"{store.path}{suffix}").unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileExistsError):  # another writer made it first: keep theirs
                os.link(tmp.path, store.path)  # atomic, and never over an existing store
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp.path}{suffix}").unlink(missing_ok=True)
    return store


def ensure_store(run_dir: Path) -> RunStore:
    """The run's store, importing it from rounds.jsonl when missing or when an imported copy is stale."""
    run_dir = Path(run_dir)
    store = RunStore.in_run_dir(run_dir)
    if not store.exists():
        return import_from_jsonl(run_dir, replace=False)
    with store._connect(write=False) as con:
        store._check_version(con)
        row = con.execute("SELECT source, source_stamp FROM run WHERE id = 1").fetchone()
    if row is not None and row["source"] == "rounds.jsonl" and row["source_stamp"] != _jsonl_stamp(run_dir):
        return import_from_jsonl(run_dir, replace=True)
    return store
