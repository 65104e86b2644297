"""Test helpers shared by the data tests (no network, no hub downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image


def make_word_tokenizer(words: Iterable[str]):
    """A tiny whitespace word-level ``PreTrainedTokenizerFast`` over ``words``.

    Adds <bos>/<eos> around each text like CLIP does; unknown words map to [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<bos>", "<eos>"]
    vocab_words = sorted({w for text in words for w in text.split()} - set(specials))
    vocab = {w: i for i, w in enumerate(specials + vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>"
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def square_pair(h: int = 24, w: int = 32, value: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random RGB image and a {0,255} mask with a rectangle of foreground."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    image[mask > 0] = value
    return image, mask


def write_medvlsm(root: Path, splits: dict[str, list[dict]]) -> Path:
    """Write anns/<split>.json files (records given as dicts)."""
    (root / "anns").mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        (root / "anns" / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def medvlsm_record(name: str, prompts: dict | None = None, mask: str | None = None) -> dict:
    """A record shaped like naamiinepal/medvlsm's anns/*.json entries."""
    return {
        "bbox": [0, 0, 1, 1],
        "cat": 0,
        "segment_id": Path(name).stem,
        "img_name": name,
        "mask_name": mask or name,
        "sentences": [{"idx": 0, "sent_id": 0, "sent": ""}],
        "prompts": prompts if prompts is not None else {"p0": "", "p1": "polyp", "p2": ["round polyp", "oval polyp"]},
        "sentences_num": 1,
    }


def make_medvlsm_dataset(root: Path, n: int = 6, size: tuple[int, int] = (24, 32)) -> Path:
    """A small clean medvlsm dataset: images/, masks/, anns/{train,val,test}.json."""
    records = []
    for i in range(n):
        name = f"img{i}.png"
        image, mask = square_pair(*size, seed=i)
        write_png(root / "images" / name, image)
        write_png(root / "masks" / name, mask)
        records.append(medvlsm_record(name))
    cut = max(1, n - 2)
    return write_medvlsm(root, {"train": records[: cut], "val": records[cut : cut + 1], "test": records[cut + 1 :]})


# A deployed site (one with a data-path) serves no split with fewer images than its
# min-figure-images (default 5): the smallest synthetic site such tests use, 5 per split.
DEPLOYED_SITE_DATA = {"per_site": 15, "splits": (1 / 3, 1 / 3, 1 / 3)}
