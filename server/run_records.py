"""The run directory: config, per-round records, atomic checkpoints, resume.

Layout of ``<runs-dir>/<run-name>/``::

    config.json                 the FederationConfig the run uses (run-config keys)
    rounds.jsonl                one JSON object per completed round (keys: docs/federation.md)
    run.sqlite                  the run store (server/run_store.py, docs/run-store.md): what the dashboard reads
    checkpoints/round-NNNN/     adapter/ (adapter format) + strategy.npz + state.json
    final/                      adapter/ + summary.json (+ comparison.{json,md} in the demo)

Crash safety: every file is written beside its target and renamed into
place, and a checkpoint is assembled in a hidden temporary folder that is
renamed to ``round-NNNN`` only when complete, so a crash leaves either the
old state or the new one, never half of a checkpoint or of a record. A
round counts as complete when both its record and its checkpoint exist;
``resume`` restarts after the last complete round and drops anything later.

The run store: ``append_round`` writes the round to ``run.sqlite`` first (one
transaction), then to ``rounds.jsonl``. A crash between the two leaves the
round in the store but not in ``rounds.jsonl``: the round is not complete,
and resume rewinds the store to the last complete round as well. Writing a
round that is already in the store replaces it (idempotent).
"""

from __future__ import annotations

import json
import secrets
import shutil
from datetime import UTC, datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from common.adapter_io import read_adapter_weights, save_adapter_state
from common.atomic import atomic_dir, json_text, write_json_atomic, write_text_atomic
from server.run_claim import try_claim
from server.run_store import RunStore, ensure_store

CONFIG_FILE = "config.json"
ROUNDS_FILE = "rounds.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
ADAPTER_DIR = "adapter"
STRATEGY_FILE = "strategy.npz"
STATE_FILE = "state.json"
STATUS_FILE = "status.json"
RUN_ID_FILE = "run-id"  # which run of this name (a resume keeps it; a new run after a deletion gets a new one)
RUN_STATUSES = ("running", "finished", "failed", "stopped")
WEIGHTS_FILE = "adapter_model.safetensors"


class RunRecordsError(RuntimeError):
    """A run directory that cannot be created or resumed as asked."""


def claim_run_name(runs_dir: Path, run_name: str) -> TextIO:
    """Hold the run name `run_name` under `runs_dir` for this process; close the handle to let it go.

    Why: `RunRecords.create` refuses a name only once its run has a round, so a
    second server started with the same name while the first was still before
    its first round's end (two runs launched at once, or default names stamped
    in the same second) took the same folder: each overwrote the other's
    config, run id, records, checkpoints and final adapter, and both exited 0.
    The claim is an exclusive flock on `<runs_dir>/.<run-name>.lock` (beside the
    run folder, so a refused resume leaves no folder behind); the kernel drops it
    when its process dies, so a crashed run never blocks its own resume.
    """
    fh, holder = try_claim(runs_dir, run_name)
    if fh is None:
        raise RunRecordsError(
            f"run '{run_name}' is being run by another server process now{f' (pid {holder})' if holder else ''} "
            f"under {runs_dir}; pick another 'run-name' (or resume it once that process has ended)"
        )
    return fh


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]  # the global (shared) adapter, fp32
    strategy_arrays: dict[str, np.ndarray]
    state: dict[str, Any]


def checkpoint_name(server_round: int) -> str:
    return f"round-{server_round:04d}"


class RunRecords:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.store = RunStore.in_run_dir(self.run_dir)
        # Whether this process has changed the run yet (created it, or rewound it to resume): a
        # resume that fails before that leaves the run, its status and its final/ as they were.
        self.changed = False

    # ----------------------------------------------------------- open/create
    @classmethod
    def create(cls, runs_dir: Path, run_name: str, config: dict[str, Any],
               meta: dict[str, Any] | None = None) -> RunRecords:
        """A new run directory; refuses one that already holds rounds (use resume).

        The run is registered in the run store with status `running`. `meta`:
        figures about the run that are not config keys, e.g. `trainable_parameters`
        and `base_parameters` (the latter gives the full-model FedAvg comparison).
        """
        records = cls(Path(runs_dir) / run_name)
        if records.read_rounds():
            raise RunRecordsError(
                f"{records.run_dir} already holds rounds of a run named '{run_name}'; "
                "continue it with --run-config \"resume=true run-name=...\" or pick another 'run-name'"
            )
        records.run_dir.mkdir(parents=True, exist_ok=True)
        records._new_run_id()
        # The store first: a dashboard never sees config.json without it (and imports nothing).
        records.store.register_run(run_name, config, meta)
        write_json_atomic(records.run_dir / CONFIG_FILE, config)
        records.set_status("running")
        records.changed = True
        return records

    @classmethod
    def open_existing(cls, runs_dir: Path, run_name: str) -> RunRecords:
        """An existing run (to resume), unchanged until `continue_after` (checks first, then changes)."""
        records = cls(Path(runs_dir) / run_name)
        if not (records.run_dir / CONFIG_FILE).is_file():
            raise RunRecordsError(f"cannot resume '{run_name}': {records.run_dir / CONFIG_FILE} does not exist")
        return records

    def continue_after(self, server_round: int, rerun: bool = True) -> None:
        """The resume really starts: the server writes the store from now on (a run folder from
        before the run store gets one, imported), status `running`, and with `rerun` everything
        after `server_round` is forgotten (`rewind_to`). Without (nothing left to run: the final
        stage is redone) final/ stays until its files are replaced."""
        ensure_store(self.run_dir).claim()
        if rerun:
            self.rewind_to(server_round)
        self.set_status("running")
        self.changed = True

    @property
    def run_id(self) -> str:
        """This run's id (sites key their personal parts by it); made once for a run from before it existed."""
        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            self._new_run_id()
        return path.read_text().strip()

    def _new_run_id(self) -> None:
        write_text_atomic(self.run_dir / RUN_ID_FILE, secrets.token_hex(8))

    def _store(self) -> RunStore:
        """The run store; a run folder from before it existed gets one, imported from rounds.jsonl."""
        if not self.store.exists():
            ensure_store(self.run_dir).claim()
        return self.store

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Run figures that are not config keys (e.g. `trainable_parameters`, `base_parameters`)."""
        self._store().set_meta(meta)

    def read_meta(self) -> dict[str, Any]:
        """The run figures `set_meta` recorded ({} if none)."""
        return self._store().read()["run"]["meta"] or {}

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.run_dir / CONFIG_FILE).read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / CONFIG_FILE, config)
        self._store().set_config(config)

    # ---------------------------------------------------------------- status
    def set_status(self, status: str, reason: str = "") -> None:
        """running | finished | failed (with the reason) | stopped: so a dead run says so.

        Kept in the run store (what the dashboard shows) and in status.json
        (what `fedvlsm simulate` and scripts read without SQLite).
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        self._store().set_status(status, reason)
        write_json_atomic(self.run_dir / STATUS_FILE, {
            "status": status, "reason": reason, "time": datetime.now(UTC).isoformat(timespec="seconds")})

    def read_status(self) -> dict[str, Any]:
        path = self.run_dir / STATUS_FILE
        return json.loads(path.read_text()) if path.is_file() else {"status": "unknown", "reason": ""}

    # ---------------------------------------------------------------- rounds
    def read_rounds(self) -> list[dict[str, Any]]:
        path = self.run_dir / ROUNDS_FILE
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def append_round(self, record: dict[str, Any]) -> None:
        """Add one round's record: to the run store (one transaction), then to rounds.jsonl.

        rounds.jsonl is rewritten and renamed into place; appending a round
        again replaces it in both (and drops later ones from rounds.jsonl).
        """
        if "round" not in record:
            raise ValueError("a round record needs a 'round' key")
        self._store().write_round(record)
        rounds = [r for r in self.read_rounds() if r["round"] < record["round"]] + [record]
        self._write_rounds(rounds)

    def _write_rounds(self, rounds: list[dict[str, Any]]) -> None:
        # json_text: a skipped round's NaN Dice is null (a NaN token is not JSON: jq, JSON.parse refuse it)
        text = "".join(json_text(r, sort_keys=True) + "\n" for r in rounds)
        write_text_atomic(self.run_dir / ROUNDS_FILE, text)

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        adapter_config: dict[str, Any],
        strategy_arrays: dict[str, np.ndarray],
        state: dict[str, Any],
    ) -> Path:
        """Write checkpoints/round-NNNN/ atomically (assembled aside, then renamed)."""
        target = self.run_dir / CHECKPOINTS / checkpoint_name(server_round)
        # replace=True: an existing folder is a leftover from a run that crashed after this point
        with atomic_dir(target, replace=True) as tmp:
            self._write_adapter(tmp / ADAPTER_DIR, arrays, adapter_config)
            with open(tmp / STRATEGY_FILE, "wb") as fh:
                np.savez(fh, **strategy_arrays)
            write_json_atomic(tmp / STATE_FILE, {"round": server_round, **state})
        return target

    @staticmethod
    def _write_adapter(out: Path, arrays: dict[str, np.ndarray], adapter_config: dict[str, Any]) -> None:
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()}
        save_adapter_state(state, adapter_config, out)

    def checkpoint_rounds(self) -> list[int]:
        root = self.run_dir / CHECKPOINTS
        if not root.is_dir():
            return []
        found = []
        for p in root.iterdir():
            if p.name.startswith("round-") and (p / STATE_FILE).is_file():
                found.append(int(p.name.removeprefix("round-")))
        return sorted(found)

    def last_complete_round(self) -> int:
        recorded = {r["round"] for r in self.read_rounds()}
        complete = [r for r in self.checkpoint_rounds() if r in recorded]
        return max(complete, default=0)

    def load_checkpoint(self, server_round: int) -> Checkpoint:
        path = self.run_dir / CHECKPOINTS / checkpoint_name(server_round)
        if not (path / STATE_FILE).is_file():
            raise RunRecordsError(f"{path}: no complete checkpoint ({STATE_FILE} missing)")

        def damaged(why: object) -> RunRecordsError:
            # Checkpoints are written atomically, so damage came later (a disk, a copy): say which and what to do.
            return RunRecordsError(f"damaged checkpoint of round {server_round}: {why}. To continue from round "
                                   f"{server_round - 1} instead, remove the folder {path}")

        try:
            weights = read_adapter_weights(path / ADAPTER_DIR / WEIGHTS_FILE)  # AdapterFileError: a ValueError
        except (OSError, ValueError) as err:
            raise damaged(err) from None
        try:
            with np.load(path / STRATEGY_FILE) as data:
                strategy_arrays = {k: data[k] for k in data.files}
        except Exception as err:  # zipfile.BadZipFile, ValueError, EOFError ... for a damaged .npz
            raise damaged(f"{path / STRATEGY_FILE}: not a readable .npz ({type(err).__name__}: {err})") from None
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise damaged(f"{path / STATE_FILE}: unreadable or not valid JSON ({err})") from None
        return Checkpoint(
            round=server_round,
            arrays={k: v.float().numpy() for k, v in weights.items()},
            strategy_arrays=strategy_arrays,
            state=state,
        )

    def rewind_to(self, server_round: int) -> None:
        """Forget everything after `server_round` (store, records, checkpoints, final, temp leftovers).

        The store's status becomes `running` again: rewinding is how a run resumes.
        """
        self._store().rewind_to(server_round)
        self._write_rounds([r for r in self.read_rounds() if r["round"] <= server_round])
        root = self.run_dir / CHECKPOINTS
        if root.is_dir():
            for p in root.iterdir():
                late = p.name.startswith("round-") and int(p.name.removeprefix("round-")) > server_round
                if late or p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.run_dir / FINAL, ignore_errors=True)

    # ------------------------------------------------------------------ final
    def save_final(self, arrays: dict[str, np.ndarray], adapter_config: dict[str, Any], summary: dict[str, Any]) -> Path:
        final = self.run_dir / FINAL
        final.mkdir(parents=True, exist_ok=True)
        self._write_adapter(final / ADAPTER_DIR, arrays, adapter_config)
        write_json_atomic(final / "summary.json", summary)
        return final

    def save_final_file(self, name: str, text: str) -> Path:
        path = self.run_dir / FINAL / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return path

