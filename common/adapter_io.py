"""Adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

Only adapter tensors are saved, never the base (as in peft). The config
records the base (its spec and a weight fingerprint), the variant and its
dims, and the name/shape/dtype of every tensor, so that loading can refuse
an adapter that does not belong to the model and say what differs.
Writes are atomic: a folder is written beside the target and renamed into
place, so a crash never leaves a half-written adapter.

Damaged files are refused with one line naming the file (``AdapterFileError``,
a ``ValueError``): an empty or truncated ``adapter_model.safetensors`` (a
copy cut short, a full disk elsewhere), and NaN/Inf values, which a
diverged training can produce and which would make every prediction an
all-black mask without any error. Non-finite tensors are never written
either, so ``server/run_records.py`` (through ``save_adapter_state``) cannot
checkpoint them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.adapters import AdapterSpec
from common.atomic import atomic_dir
from common.model import AdaptedCLIPSeg, AdapterStateError, check_fingerprint


class AdapterFileError(AdapterStateError):
    """An adapter file that cannot be used as stored: empty, truncated or damaged, or with NaN/Inf values."""


def nonfinite_summary(state: dict[str, torch.Tensor], limit: int = 3) -> str | None:
    """Which tensors hold NaN/Inf (at most `limit` named), or None when all values are finite."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                bad.append(f"{name} ({nan} NaN, {int((~finite).sum()) - nan} Inf of {t.numel()})")
    if not bad:
        return None
    more = f" and {len(bad) - limit} more tensor(s)" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.safetensors``; ``AdapterFileError`` (one line) if damaged or non-finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter weights missing")
    size = path.stat().st_size
    if size == 0:
        raise AdapterFileError(f"{path}: empty file (0 bytes); the adapter was never completely written - save or copy it again")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad headers
        why = (str(err).splitlines() or [type(err).__name__])[0]
        raise AdapterFileError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or damaged: {why}) - save or copy it again"
        ) from None
    bad = nonfinite_summary(state)
    if bad:
        raise AdapterFileError(f"{path}: adapter holds non-finite values: {bad}; it would predict garbage (a diverged training?)")
    return state

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def adapter_config(model: AdaptedCLIPSeg, state: dict[str, torch.Tensor], extra: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base": model.base_id,
        "base_fingerprint": model.base_fingerprint,
        "image_size": model.image_size,
        "adapter": model.spec.to_dict(),
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in state.items()},
        **({"extra": extra} if extra else {}),
    }


# What an adapter folder may hold: its two files and `fedvlsm train`'s record of the training.
ADAPTER_FOLDER_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, "training.json"})


def check_adapter_out(out_dir: str | Path) -> None:
    """Refuse an output folder whose content saving an adapter would destroy.

    An adapter is written as a whole new folder swapped in for the old one (a
    crash leaves one or the other): anything else in that folder would be
    deleted with it. So the folder must be new, empty or an adapter folder;
    not a file, not the current folder (renamed away under the process).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out}: exists and is not a folder; give a new or empty folder for the adapter")
    if not out.exists():
        return
    if os.path.abspath(out) == os.getcwd():
        raise AdapterFileError(f"{out}: is the current folder; give a subfolder for the adapter (it is "
                               "written as a new folder that replaces the old one)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ADAPTER_FOLDER_FILES)
    if foreign:
        raise AdapterFileError(
            f"{out}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that are not an adapter's "
            f"(e.g. {foreign[0]!r}); saving replaces the whole folder, so give a new or empty folder")


def save_adapter_state(
    state: dict[str, torch.Tensor], config: dict, out_dir: str | Path
) -> Path:
    """Atomically write an adapter folder from a state dict and its config."""
    out = Path(out_dir)
    check_adapter_out(out)
    bad = nonfinite_summary(state)
    if bad:  # refused before anything is written: the previous adapter (if any) stays in place
        raise AdapterFileError(f"{out}: refusing to save an adapter with non-finite values: {bad}")
    with atomic_dir(out) as tmp:
        tensors = {n: t.detach().cpu().contiguous() for n, t in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def save_adapter(model: AdaptedCLIPSeg, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Save `model`'s adapter tensors (only those) and their config to `out_dir`."""
    state = model.adapter_state()
    return save_adapter_state(state, adapter_config(model, state, extra), out_dir)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The checked ``adapter_config.json`` of an adapter folder; one error naming the file and the field."""
    if Path(adapter_dir).is_file():
        raise AdapterFileError(f"{adapter_dir}: is a file; give the adapter folder (with {CONFIG_NAME} and {WEIGHTS_NAME})")
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter config (expected {CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not valid JSON ({err}); damaged or not an adapter config") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("format_version", "base", "base_fingerprint", "adapter", "tensors"):
        if key not in cfg:
            raise AdapterStateError(f"{path}: missing key '{key}'")
    _check_config_types(cfg, path)
    if cfg["format_version"] > FORMAT_VERSION:
        raise AdapterStateError(
            f"{path}: format_version {cfg['format_version']} is newer than this fedvlsm supports ({FORMAT_VERSION})"
        )
    try:
        AdapterSpec.from_dict(cfg["adapter"])
    except ValueError as err:  # a default for a missing field (init: "paper") would load silently
        raise AdapterFileError(f"{path}: 'adapter': {err}") from None
    return cfg


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config_types(cfg: dict, path: Path) -> None:
    """Refuse wrong-typed fields with one error naming the key: they raised TypeError/AttributeError tracebacks."""
    def bad(key: str, want: str) -> AdapterFileError:
        return AdapterFileError(f"{path}: '{key}' must be {want}; damaged or not an adapter config")

    if not _is_int(cfg["format_version"]) or cfg["format_version"] < 1:
        raise bad("format_version", "a whole number >= 1")
    for key in ("base", "base_fingerprint"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise bad(key, "a non-empty string")
    if not isinstance(cfg["adapter"], dict):
        raise bad("adapter", "a JSON object")
    if not isinstance(cfg["tensors"], dict):
        raise bad("tensors", "a JSON object of tensor name -> {shape, dtype}")
    for name, meta in cfg["tensors"].items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise bad(f"tensors.{name}", "an object whose 'shape' is a list of whole numbers")


def read_adapter_spec(adapter_dir: str | Path) -> AdapterSpec:
    return AdapterSpec.from_dict(read_adapter_config(adapter_dir)["adapter"])


def load_adapter(model: AdaptedCLIPSeg, adapter_dir: str | Path) -> dict:
    """Load an adapter folder into `model`, refusing any mismatch. Returns its config."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    spec = AdapterSpec.from_dict(cfg["adapter"])
    where = str(adapter_dir)
    if spec != model.spec:
        diffs = [
            f"{k}: file {v!r} vs model {model.spec.to_dict()[k]!r}"
            for k, v in spec.to_dict().items()
            if model.spec.to_dict()[k] != v
        ]
        raise AdapterStateError(f"{where}: adapter spec differs from the model's ({'; '.join(diffs)})")
    check_fingerprint(model, cfg["base_fingerprint"], cfg["base"], where)
    state = read_adapter_weights(adapter_dir / WEIGHTS_NAME)
    params = dict(model.named_parameters())
    problems = []
    for name, t in state.items():
        if name in params and t.dtype != params[name].dtype:
            problems.append(f"{name}: dtype {t.dtype} != model {params[name].dtype}")
        meta = cfg["tensors"].get(name)
        if meta is None or list(t.shape) != meta["shape"]:
            problems.append(f"{name}: weights file and {CONFIG_NAME} disagree")
    if problems:
        raise AdapterStateError(f"{where}: " + "; ".join(problems))
    try:
        model.load_adapter_state(state, strict=True)
    except AdapterStateError as err:
        extra = cfg.get("extra") if isinstance(cfg.get("extra"), dict) else {}
        hint = ""
        if extra.get("shared_only"):  # a personalised run's final/ or checkpoint adapter: not a whole adapter
            hint = (f"; this adapter holds a personalised run's shared tensors only: its personal ones "
                    f"(prefixes {extra.get('personal')}) are at each site, in <site-dir>/runs/<run>/personal/")
        raise AdapterStateError(f"{where}: {err}{hint}") from err
    return cfg
