"""``SegDataset`` and ``collate_fn``: items -> model-ready tensors (data contract).

Kept separate from ``formats`` so the model side depends only on the tensor
contract in docs/architecture.md, not on how a site stores its files.

Prompt choice. Training draws, per item and epoch, one prompt uniformly
among the item's non-empty prompts, then (for a list-valued prompt) one
non-empty variant uniformly. The draw comes from
``random.Random(f"{seed}:{epoch}:{index}")``: it depends only on the seed,
the epoch set with ``set_epoch`` and the item index, so it is the same with
any number of DataLoader workers and any shuffling order, and a trainer that
calls ``set_epoch(e)`` each epoch sees a new prompt per item per epoch.
Evaluation uses the fixed ``prompt_index`` k: p_k if non-empty, else the
highest-index non-empty prompt below k, else the first non-empty one above k;
for a list, its first non-empty variant. ``prompt_index=None`` in evaluation
means "the most detailed", the last non-empty prompt. A ``prompt_index``
given in training fixes the training prompt the same way.

Caching. Decoding and resizing dominate the data cost of a short federated
round, and each round may run in a new process; with ``cache_dir`` the
resized image, resized mask and original-resolution mask are stored as one
``.npz`` per item, keyed by a hash of both files' absolute paths, mtimes and
sizes and the image size, written atomically (temporary file + os.replace)
so concurrent clients never see a partial file. A warm process (Ray actor,
site worker) also keeps the decoded entries in memory, least recently used
out first, up to ``$FEDVLSM_ITEM_MEMORY_GB`` (default 0.5; 0 turns it off):
reading an ``.npz`` cost about 1 ms per item per epoch, a good part of a
short round on a small site. The entries are read-only arrays, keyed by the
cache file, whose name already changes with any file, size or setting.
"""

from __future__ import annotations

import hashlib
import os
import random
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.atomic import atomic_path
from common.budget import device_budget

from .check import pair_problems
from .formats import (
    DataError,
    Item,
    Prompt,
    binarize_mask,
    format_problems,
    has_prompt,
    prompt_is_empty,
    read_image,
    read_mask,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 4  # bump when the preprocessing changes, to invalidate old cache files (2: JPEG {0, 1}
# masks; 3: transparent mask pixels; 4: EXIF orientation applied)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
# The in-memory tier of the site cache (module docstring): cache file -> read-only arrays.
_DECODED: OrderedDict[Path, Arrays] = OrderedDict()
_DECODED_BYTES = [0]


def _non_empty_variants(prompt: Prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] if prompt.strip() else []
    return [v for v in prompt if v.strip()]


def random_prompt(prompts: Sequence[Prompt], rng: random.Random) -> str:
    """One non-empty prompt drawn uniformly, then one of its non-empty variants."""
    choices = [p for p in prompts if not prompt_is_empty(p)]
    if not choices:
        raise DataError("item has no non-empty prompt")
    return rng.choice(_non_empty_variants(rng.choice(choices)))


def fixed_prompt(prompts: Sequence[Prompt], index: int | None) -> str:
    """p_index, else the last non-empty prompt below it, else the first above; first variant of a list."""
    filled = [k for k, p in enumerate(prompts) if not prompt_is_empty(p)]
    if not filled:
        raise DataError("item has no non-empty prompt")
    if index is None:
        k = filled[-1]
    else:
        at_or_below = [k for k in filled if k <= index]
        k = at_or_below[-1] if at_or_below else filled[0]
    return _non_empty_variants(prompts[k])[0]


def _file_key(path: Path, st: os.stat_result) -> str:
    return f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}"


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a file's key can change with, short of a renamed folder above it (same file, same bytes)."""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class SegDataset(Dataset):
    """Map-style dataset of ``Item``s returning the dicts of the data contract."""

    def __init__(
        self,
        items: Sequence[Item],
        image_size: int,
        train: bool,
        prompt_index: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if prompt_index is not None and prompt_index < 0:
            raise ValueError(f"prompt_index must be >= 0 or None, got {prompt_index}")
        self.items = list(items)
        silent = [f"{i.id} ({i.image})" for i in self.items if not has_prompt(i)]
        if silent:
            raise DataError(f"{len(silent)} item(s) without a non-empty prompt: {', '.join(silent[:10])}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.prompt_index = prompt_index
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.epoch = 0
        # (image, mask) -> (both files' identities, cache key): a key costs two realpath()s (a syscall
        # per path component; 58-82 us per key here), a remembered one two stats (~6 us).
        self._keys: dict[tuple[Path, Path], tuple[tuple, str]] = {}
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        self._std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the training prompt draws of ``epoch`` (call once per epoch)."""
        self.epoch = int(epoch)

    def prompt_for(self, index: int) -> str:
        """The prompt ``__getitem__(index)`` uses now (no pixels loaded)."""
        prompts = self.items[index].prompts  # non-empty: checked in __init__
        if self.train and self.prompt_index is None:
            return random_prompt(prompts, random.Random(f"{self.seed}:{self.epoch}:{index}"))
        return fixed_prompt(prompts, self.prompt_index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image, mask, orig_mask = self.arrays(index)
        pixels = image.astype(np.float32).transpose(2, 0, 1) / 255.0
        pixels = (pixels - self._mean) / self._std
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
            "mask": torch.from_numpy(mask.astype(np.float32)[None]),
            "orig_mask": torch.tensor(orig_mask),  # a copy: cached arrays are read-only
            "prompt": self.prompt_for(index),
            "id": item.id,
        }

    # ---- pixels ----------------------------------------------------------

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 SxSx3, mask uint8 SxS {0,1}, original mask uint8 HxW {0,1}), cached if enabled."""
        item = self.items[index]
        if self.cache_dir is None:
            return self._preprocess(item)
        path = self.cache_dir / f"{self._cache_key(item)}.npz"
        held = _DECODED.get(path)
        if held is not None:
            _DECODED.move_to_end(path)
            return held
        arrays = _load_npz(path)
        if arrays is None:
            arrays = self._preprocess(item)
            _save_npz(path, arrays)
        return _remember(path, arrays)

    def cache_key(self, index: int) -> str:
        """What item `index`'s preprocessed arrays depend on (files, mtimes, sizes, image size,
        preprocessing version), hashed: also the data part of the activation cache's key."""
        return self._cache_key(self.items[index])

    def _cache_key(self, item: Item) -> str:
        try:
            si, sm = os.stat(item.image), os.stat(item.mask)
            ident = _identity(si) + _identity(sm)
            held = self._keys.get((item.image, item.mask))
            if held is not None and held[0] == ident:
                return held[1]
            key = f"v{CACHE_VERSION}|{_file_key(item.image, si)}|{_file_key(item.mask, sm)}|{self.image_size}"
        except OSError as exc:
            raise DataError(f"item '{item.id}': cannot stat {exc.filename}: {exc.strerror}") from exc
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
        self._keys[(item.image, item.mask)] = (ident, digest)
        return digest

    def _preprocess(self, item: Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = read_image(item.image)
        raw_mask = read_mask(item.mask)
        problems = pair_problems(item.image, image, item.mask, raw_mask)
        if problems:
            raise DataError(format_problems(problems, f"item '{item.id}'"))
        orig_mask = binarize_mask(raw_mask)
        size = (self.image_size, self.image_size)
        resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(orig_mask).resize(size, Image.Resampling.NEAREST))
        return np.ascontiguousarray(resized), np.ascontiguousarray(mask), orig_mask


def _remember(path: Path, arrays: Arrays) -> Arrays:
    """Keep `arrays` (made read-only) in the in-memory tier, evicting the least recently used."""
    for a in arrays:
        a.flags.writeable = False
    size = sum(a.nbytes for a in arrays)
    budget = device_budget("FEDVLSM_ITEM_MEMORY_GB", torch.device("cpu"), 0.0, 2**29)
    if size > budget:
        return arrays
    while _DECODED and _DECODED_BYTES[0] + size > budget:
        _, old = _DECODED.popitem(last=False)
        _DECODED_BYTES[0] -= sum(a.nbytes for a in old)
    _DECODED[path] = arrays
    _DECODED_BYTES[0] += size
    return arrays


def forget_decoded() -> None:
    """Empty this process's in-memory tier (the disk cache stays): as a new process would start."""
    _DECODED.clear()
    _DECODED_BYTES[0] = 0


def _load_npz(path: Path) -> Arrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return data["image"], data["mask"], data["orig_mask"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache file is rebuilt, never trusted


def _save_npz(path: Path, arrays: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    image, mask, orig_mask = arrays
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, image=image, mask=mask, orig_mask=orig_mask)


# Token ids per prompt, per tokenizer, for the tokenizer's life: a site's prompts
# come back in every batch and round, and the tokenizer's batch call costs
# about 1 ms of per-call work for a handful of prompts on the CPU path.
_PROMPT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROMPT_IDS_MAX = 100_000  # distinct (prompt, max_length) pairs kept per tokenizer


def prompt_ids(tokenizer: Any, prompt: str, max_length: int) -> torch.Tensor:
    """`prompt`'s token ids (truncated to `max_length`, unpadded), tokenised once per tokenizer.

    Shared by the plain collate (below) and the fast path (`common.fast.PromptTokens`).
    """
    try:
        memo = _PROMPT_IDS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        memo = {}
    ids = memo.get((prompt, max_length))
    if ids is None:
        if len(memo) >= _PROMPT_IDS_MAX:
            memo.clear()
        ids = memo[(prompt, max_length)] = torch.tensor(
            tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"], dtype=torch.long)
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The id that right-pads prompts: the tokenizer's pad id, else its end-of-text id (both paths)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither a pad nor an end-of-text token "
                         "id; set tokenizer.pad_token")
    return int(pad)


class _Collate:
    """Picklable collate callable (DataLoader workers may be spawned, not forked)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if not batch:
            raise ValueError("collate_fn got an empty batch")
        prompts = [b["prompt"] for b in batch]
        input_ids, attention_mask = self.tokens(prompts)
        return {
            "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "mask": torch.stack([b["mask"] for b in batch]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "orig_masks": [b["orig_mask"] for b in batch],
            "ids": [b["id"] for b in batch],
            "prompts": prompts,
        }

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask): each prompt tokenised once, right-padded to the longest.

        For a right-padding tokenizer this is its `padding=True` batch
        (tests/test_dataset.py compares them). Every tokenizer is padded on
        the right, whatever its `padding_side`: the text tower numbers
        positions from the first column, so left padding shifted a prompt's
        position embeddings by its padding and its result depended on which
        prompts shared its batch (and disagreed with the fast path, which
        always pads right). Under the causal mask right padding cannot reach
        the end-of-text token, the only one read. No pad id: the end-of-text
        id pads, as on the fast path.
        """
        rows = [prompt_ids(self.tokenizer, prompt, self.max_length) for prompt in prompts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_token_id(self.tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
        return input_ids, attention_mask


def collate_fn(tokenizer: Any, max_length: int = 77) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A DataLoader ``collate_fn`` that stacks tensors and tokenises the prompts.

    Prompts are padded to the longest in the batch and truncated to
    ``max_length`` tokens (CLIP's text tower has 77 positions).
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return _Collate(tokenizer, max_length)
