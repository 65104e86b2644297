"""Atomic writes: a file or folder is written beside its target and renamed into place.

A crash (or a concurrent reader) then sees either the old content or the new
one, never half of either. Every checkpoint, record, adapter, cache entry and
site file of the project goes through here.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever is written there replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats as None: JSON has no NaN (``json.dumps`` would write a NaN token
    that strict parsers, such as JavaScript's ``JSON.parse`` or jq, refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of `obj` (NaN/Inf as null): what every JSON file of the project holds."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj, indent=2))


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`, renamed to `path` once the block succeeds.

    If `path` exists by then: with `replace`, the old folder is swapped out in
    two renames (a crash leaves the old or the new one); without, the new one
    is dropped and the existing folder kept (another writer got there first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would become the folder's mode; this one follows the umask
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if not path.exists():
            try:
                os.replace(tmp, path)
                return
            except OSError:  # appeared meanwhile (a concurrent writer)
                if not path.exists():
                    raise
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
