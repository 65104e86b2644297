"""SegDataset and collate_fn follow the data contract of docs/architecture.md."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import common.data.dataset as dataset_module
from common.data import DataError, Item, SegDataset, collate_fn, load_items
from common.data.dataset import IMAGENET_MEAN, IMAGENET_STD, fixed_prompt
from helpers import make_medvlsm_dataset, make_word_tokenizer, square_pair, write_png

PROMPTS = ["", "lesion", "round lesion", ["small round lesion", "tiny round lesion"], "", "round lesion on the left"]


def _item(tmp_path: Path, prompts: list, h: int = 24, w: int = 32, name: str = "a") -> Item:
    image, mask = square_pair(h, w)
    return Item(name, write_png(tmp_path / f"{name}.png", image), write_png(tmp_path / f"{name}_m.png", mask), prompts)


def test_getitem_matches_the_contract(tmp_path: Path) -> None:
    item = _item(tmp_path, PROMPTS, h=24, w=32)
    sample = SegDataset([item], image_size=16, train=False)[0]
    assert set(sample) == {"pixel_values", "mask", "orig_mask", "prompt", "id"}
    pv, mask, orig = sample["pixel_values"], sample["mask"], sample["orig_mask"]
    assert pv.shape == (3, 16, 16) and pv.dtype == torch.float32
    assert mask.shape == (1, 16, 16) and mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert orig.shape == (24, 32) and orig.dtype == torch.uint8 and set(orig.unique().tolist()) == {0, 1}
    assert sample["id"] == "a" and isinstance(sample["prompt"], str)
    # the foreground rectangle rows 6..11, cols 8..15 of 24x32 -> rows 4..7, cols 4..7 of 16x16 (nearest)
    assert int(orig.sum()) == 6 * 8
    assert mask[0, 4:8, 4:8].all() and mask.sum() == 16


def test_imagenet_normalisation(tmp_path: Path) -> None:
    image = np.full((8, 8, 3), 128, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    item = Item("c", write_png(tmp_path / "c.png", image), write_png(tmp_path / "cm.png", mask), ["x"])
    pv = SegDataset([item], 8, train=False)[0]["pixel_values"]
    for c in range(3):
        expected = (128 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(pv[c], torch.full((8, 8), expected), atol=1e-5)


def test_train_draws_cover_non_empty_prompts_and_variants(tmp_path: Path) -> None:
    ds = SegDataset([_item(tmp_path, PROMPTS)], 8, train=True, seed=3)
    seen = Counter()
    for epoch in range(300):
        ds.set_epoch(epoch)
        seen[ds.prompt_for(0)] += 1
    assert "" not in seen
    assert set(seen) == {"lesion", "round lesion", "small round lesion", "tiny round lesion", "round lesion on the left"}
    # uniform over the 4 non-empty prompts: each plain prompt about 1/4, each variant about 1/8
    assert all(40 < seen[p] < 110 for p in ("lesion", "round lesion", "round lesion on the left"))


def test_train_draws_are_reproducible_and_order_independent(tmp_path: Path) -> None:
    items = [_item(tmp_path, PROMPTS, name=f"i{k}") for k in range(5)]

    def draws(seed: int, order: list[int]) -> dict[tuple[int, int], str]:
        ds = SegDataset(items, 8, train=True, seed=seed)
        out = {}
        for epoch in range(4):
            ds.set_epoch(epoch)
            for i in order:
                out[(epoch, i)] = ds[i]["prompt"]
        return out

    forward = draws(0, [0, 1, 2, 3, 4])
    assert forward == draws(0, [4, 2, 0, 3, 1])  # same prompts whatever the access order (workers, shuffling)
    assert forward != draws(1, [0, 1, 2, 3, 4])
    assert len({forward[(e, 0)] for e in range(4)}) > 1 or len({forward[(0, i)] for i in range(5)}) > 1


def test_eval_prompt_is_fixed_with_fallback() -> None:
    assert fixed_prompt(PROMPTS, 2) == "round lesion"
    assert fixed_prompt(PROMPTS, 3) == "small round lesion"  # list: first variant
    assert fixed_prompt(PROMPTS, 4) == "small round lesion"  # p4 empty -> highest non-empty below
    assert fixed_prompt(PROMPTS, 0) == "lesion"  # nothing non-empty at or below -> first above
    assert fixed_prompt(PROMPTS, 99) == "round lesion on the left"
    assert fixed_prompt(PROMPTS, None) == "round lesion on the left"  # None: the most detailed
    assert fixed_prompt(["", ["", "only variant"]], 1) == "only variant"
    with pytest.raises(DataError, match="no non-empty prompt"):
        fixed_prompt(["", " "], 1)


def test_eval_dataset_uses_the_same_prompt_every_call(tmp_path: Path) -> None:
    ds = SegDataset([_item(tmp_path, PROMPTS)], 8, train=False, prompt_index=3)
    prompts = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        prompts.add(ds[0]["prompt"])
    assert prompts == {"small round lesion"}


def test_item_without_prompt_is_refused_naming_the_item(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"without a non-empty prompt: mute \(.*mute.png\)"):
        SegDataset([_item(tmp_path, ["", ["", " "]], name="mute")], 8, train=True)


def test_cache_round_trip_identical_and_reused_by_a_fresh_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=4)
    items = load_items(root, "train")
    cache = tmp_path / "cache"
    plain = [SegDataset(items, 20, train=False)[i] for i in range(len(items))]
    first = [SegDataset(items, 20, train=False, cache_dir=cache)[i] for i in range(len(items))]
    files = sorted(cache.glob("*.npz"))
    assert len(files) == len(items) and not list(cache.glob(".tmp-*"))

    def no_decoding(path: object) -> None:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dataset_module, "read_image", no_decoding)
    monkeypatch.setattr(dataset_module, "read_mask", no_decoding)
    dataset_module.forget_decoded()  # as in a new process each round: from the files on disk
    fresh = SegDataset(items, 20, train=False, cache_dir=cache)
    second = [fresh[i] for i in range(len(items))]
    for a, b, c in zip(plain, first, second):
        for key in ("pixel_values", "mask", "orig_mask"):
            assert torch.equal(a[key], b[key]) and torch.equal(b[key], c[key])
    monkeypatch.undo()

    # another image size or a changed file gets its own entry
    SegDataset(items, 24, train=False, cache_dir=cache)[0]
    st = items[0].image.stat()
    os.utime(items[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    SegDataset(items, 20, train=False, cache_dir=cache)[0]
    assert len(list(cache.glob("*.npz"))) == len(items) + 2


def test_cache_key_is_remembered_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One dataset asks for an item's key many times an epoch (site cache, activation cache,
    resident pixels): realpath once, then two stats; any change of either file is a new key."""
    import hashlib

    item = _item(tmp_path, PROMPTS)
    ds = SegDataset([item], 12, train=False)

    def formula() -> str:  # the key's definition (unchanged, so existing site caches stay valid)
        si, sm = item.image.stat(), item.mask.stat()
        text = (f"v{dataset_module.CACHE_VERSION}|{item.image.resolve()}|{si.st_mtime_ns}|{si.st_size}"
                f"|{item.mask.resolve()}|{sm.st_mtime_ns}|{sm.st_size}|12")
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    first = ds.cache_key(0)
    assert first == formula()
    resolves = []
    real_resolve = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self, *a: resolves.append(self) or real_resolve(self, *a))
    assert ds.cache_key(0) == first and resolves == []  # remembered
    st = item.mask.stat()
    os.utime(item.mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = ds.cache_key(0)
    assert touched != first and touched == formula() and len(resolves) >= 2
    # Replaced by another file of the same size and time (a new inode): recomputed, not remembered.
    st = item.image.stat()
    other = tmp_path / "other.png"
    other.write_bytes(item.image.read_bytes())
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, item.image)
    resolves.clear()
    assert ds.cache_key(0) == formula() and resolves  # same string, so the same key; but looked at again
    item.image.unlink()
    with pytest.raises(DataError, match="item 'a': cannot stat"):
        ds.cache_key(0)


def test_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    item = _item(tmp_path, PROMPTS)
    cache = tmp_path / "cache"
    ds = SegDataset([item], 12, train=False, cache_dir=cache)
    expected = ds[0]["pixel_values"]
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"truncated")
    dataset_module.forget_decoded()  # a new process: only the damaged file
    assert torch.equal(SegDataset([item], 12, train=False, cache_dir=cache)[0]["pixel_values"], expected)


def test_a_warm_process_reads_each_cache_file_once_within_its_memory_budget(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=4)
    items = load_items(root, "train")
    cache = tmp_path / "cache"
    loads: list[Path] = []
    real_load = dataset_module._load_npz
    monkeypatch.setattr(dataset_module, "_load_npz", lambda path: loads.append(path) or real_load(path))
    first = [SegDataset(items, 20, train=False, cache_dir=cache)[i] for i in range(len(items))]
    again = [SegDataset(items, 20, train=False, cache_dir=cache)[i] for i in range(len(items))]
    assert len(loads) == len(items)  # the second dataset came from memory
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("pixel_values", "mask", "orig_mask"))
    ds = SegDataset(items, 20, train=False, cache_dir=cache)
    assert not ds.arrays(0)[0].flags.writeable  # shared entries cannot be changed in place ...
    ds[0]["orig_mask"][0, 0] = 7  # ... and what a caller gets is its own copy
    assert ds.arrays(0)[2][0, 0] != 7
    # A changed file is another entry, read from its files.
    st = items[0].image.stat()
    os.utime(items[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    SegDataset(items, 20, train=False, cache_dir=cache)[0]
    assert len(loads) == len(items) + 1
    # Budget: 0 keeps nothing; room for one item keeps the most recently used one only.
    one_item = max(sum(a.nbytes for a in ds.arrays(i)) for i in (0, 1))
    for budget, order, reads in ((0, [1, 1], 2), ((one_item + 0.5) / 2**30, [0, 0, 1, 1, 0, 0], 3)):
        monkeypatch.setenv("FEDVLSM_ITEM_MEMORY_GB", repr(budget))
        dataset_module.forget_decoded()
        loads.clear()
        for i in order:
            ds.arrays(i)
        assert len(loads) == reads, budget
    monkeypatch.setenv("FEDVLSM_ITEM_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="FEDVLSM_ITEM_MEMORY_GB"):
        SegDataset(items, 21, train=False, cache_dir=cache)[0]


def test_collate_tokenises_and_stacks(tmp_path: Path) -> None:
    items = [_item(tmp_path, ["", "lesion"], name="a", h=24, w=32), _item(tmp_path, ["", "small round lesion"], name="b", h=20, w=20)]
    ds = SegDataset(items, 16, train=False)
    tok = make_word_tokenizer(["lesion", "small round lesion"])
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_fn(tok))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    assert batch["ids"] == ["a", "b"] and batch["prompts"] == ["lesion", "small round lesion"]
    assert [m.shape for m in batch["orig_masks"]] == [(24, 32), (20, 20)]
    assert batch["input_ids"].shape == (2, 5)  # <bos> small round lesion <eos>
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 1].item() == tok.convert_tokens_to_ids("lesion")
    assert batch["input_ids"][0, 3].item() == tok.pad_token_id

    short = collate_fn(tok, max_length=3)([ds[1]])
    assert short["input_ids"].shape == (1, 3)


def test_collate_tokens_equal_the_tokenizers_batch_call_with_each_prompt_tokenised_once() -> None:
    import random

    words = ["polyp", "round", "oval", "small", "lesion", "left", "bright"]
    tok = make_word_tokenizer(words)
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words + ["unknownword"]) for _ in range(rng.randint(0, 12))) for _ in range(15)]
    prompts.append(" ".join(["polyp"] * 100))  # longer than CLIP's 77 positions: truncated
    for max_length in (77, 6):
        collate = collate_fn(tok, max_length=max_length)
        for _ in range(30):
            batch = [rng.choice(prompts) for _ in range(rng.randint(1, 6))]  # repeats within and across batches
            ours = collate.tokens(batch)
            theirs = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            assert torch.equal(ours[0], theirs["input_ids"]) and torch.equal(ours[1], theirs["attention_mask"])
            assert ours[0].dtype == theirs["input_ids"].dtype and ours[1].dtype == theirs["attention_mask"].dtype
    assert {k for k in dataset_module._PROMPT_IDS[tok] if k[1] == 6} <= {(p, 6) for p in prompts}
    # A tokenizer that pads on the left is padded on the right all the same (see _Collate.tokens).
    left = make_word_tokenizer(words)
    left.padding_side = "left"
    batch = [prompts[0], prompts[-1], "round polyp"]
    ours = collate_fn(left).tokens(batch)
    right = make_word_tokenizer(words)
    theirs = right(batch, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(ours[0], theirs["input_ids"]) and torch.equal(ours[1], theirs["attention_mask"])


def test_collate_rejects_empty_batch_and_bad_max_length() -> None:
    tok = make_word_tokenizer(["x"])
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn(tok)([])
    with pytest.raises(ValueError, match="max_length"):
        collate_fn(tok, max_length=0)


def test_worker_loader_gives_the_same_batches(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    ds = SegDataset(load_items(root, "train"), 16, train=True, seed=11)
    ds.set_epoch(2)
    tok = make_word_tokenizer(["polyp", "round", "oval"])
    single = list(DataLoader(ds, batch_size=2, collate_fn=collate_fn(tok)))
    multi = list(DataLoader(ds, batch_size=2, collate_fn=collate_fn(tok), num_workers=2))
    assert [b["prompts"] for b in single] == [b["prompts"] for b in multi]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(single, multi))


def test_plain_evaluation_does_not_depend_on_the_batch_with_a_left_padding_tokenizer(synth_sites) -> None:
    """A tokenizer saved with padding_side='left' (a base folder may carry one): its left-padded batches
    shifted each prompt's position embeddings by its padding, so an item's result depended on which
    prompts shared its batch (loss 2.3168 at batch 1, 2.4317 at batch 8 in the review's run)."""
    from common.bases import load_base
    from common.config import TrainConfig
    from common.data import SegDataset, load_items
    from common.evaluate import evaluate
    from common.model import build_model

    base = load_base("demo")
    base.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = build_model(base, "dense-vl")
    items = load_items(synth_sites[0], "train")
    ds = SegDataset(items, base.image_size, train=False, prompt_index=None)  # the most detailed prompts
    ds_short = SegDataset(items, base.image_size, train=False, prompt_index=0)
    mixed = torch.utils.data.ConcatDataset([ds, ds_short])  # prompts of different lengths share batches
    one, eight = (evaluate(model, mixed, base.tokenizer, TrainConfig(batch_size=b, fast="off"), hd95=False)
                  for b in (1, 8))
    assert one.loss == pytest.approx(eight.loss, rel=1e-5) and one.dice == pytest.approx(eight.dice, abs=1e-6)


def test_a_text_tower_shorter_than_77_positions_evaluates_and_predicts(synth_sites) -> None:
    """The plain path tokenised to 77 tokens whatever the text tower holds: a base with a shorter
    position table failed on a long prompt in plain evaluate and in predict (the fast path worked)."""
    import dataclasses

    import numpy as np
    from transformers import CLIPSegForImageSegmentation

    from common.bases import Base, tiny_config
    from common.config import TrainConfig
    from common.data import SegDataset, load_items
    from common.evaluate import evaluate, predict
    from common.model import build_model
    from common.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    cfg = tiny_config(len(tok))
    cfg.text_config.max_position_embeddings = 20
    torch.manual_seed(0)
    base = Base(CLIPSegForImageSegmentation(cfg).eval().requires_grad_(False), tok, "short-text", 64)
    model = build_model(base, "dense-vl")
    long_prompt = "lesion " * 30
    items = [dataclasses.replace(it, prompts=[long_prompt]) for it in load_items(synth_sites[0], "test")]
    for fast in ("off", "on"):
        res = evaluate(model, SegDataset(items, 64, train=False), tok, TrainConfig(batch_size=4, fast=fast), hd95=False)
        assert res.n == len(items)
    prob = predict(model, tok, np.zeros((50, 60, 3), np.uint8), long_prompt, torch.device("cpu"))
    assert prob.shape == (50, 60)
