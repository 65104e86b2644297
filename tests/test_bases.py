"""A base must really listen to its prompts: broken tokenizers and end-of-text pooling are refused at load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from common.bases import Base, BaseLoadError, BasePromptError, check_prompts, load_base
from helpers import make_word_tokenizer


def _save(base: Base, folder: Path, tokenizer: bool = True) -> Path:
    base.model.save_pretrained(folder)
    if tokenizer:
        base.tokenizer.save_pretrained(folder)
    return folder


def _set_text_eos(folder: Path, eos_id: int) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = eos_id
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_correct_saved_folder_loads(tiny_base, tmp_path):
    base = load_base(str(_save(tiny_base, tmp_path / "good")))
    assert base.fingerprint == tiny_base.fingerprint


def test_folder_without_tokenizer_is_refused(tiny_base, tmp_path):
    folder = _save(tiny_base, tmp_path / "no-tok", tokenizer=False)
    with pytest.raises(BasePromptError, match=f"'{folder}' has no tokenizer.*save_pretrained"):
        load_base(str(folder))


@pytest.mark.parametrize("eos_id", [4, 7, 2])  # a word's id, an id absent from the prompts, the legacy argmax rule
def test_eos_id_disagreeing_with_the_tokenizer_is_refused(tiny_base, tmp_path, eos_id):
    folder = _save(tiny_base, tmp_path / f"eos-{eos_id}")
    _set_text_eos(folder, eos_id)
    with pytest.raises(BasePromptError) as err:
        load_base(str(folder))
    message = str(err.value)
    assert str(folder) in message and f"eos_token_id={eos_id}" in message
    assert '"eos_token_id": 3' in message  # the fix: the tokenizer's real end-of-text id


def test_degenerate_tokenizers_are_refused(tiny_base):
    tiny_vocab = Base(tiny_base.model, make_word_tokenizer(["x"]), "t", 64)  # 5 tokens
    with pytest.raises(BasePromptError, match="only 5 tokens"):
        check_prompts(tiny_vocab)
    unknown_words = Base(tiny_base.model, make_word_tokenizer(["zz" + str(i) for i in range(20)]), "t", 64)
    with pytest.raises(BasePromptError, match="distinct id"):
        check_prompts(unknown_words)


def test_a_text_tower_that_ignores_the_prompt_is_refused(tiny_base):
    model = copy.deepcopy(tiny_base.model)
    with torch.no_grad():
        model.clip.text_projection.weight.zero_()
    with pytest.raises(BasePromptError, match="same conditional embedding"):
        check_prompts(Base(model, tiny_base.tokenizer, "zeroed", 64))


def test_shipped_and_random_bases_pass(tiny_base, full_arch_base):
    check_prompts(tiny_base)
    check_prompts(full_arch_base)  # random weights: different prompts still give different embeddings
    check_prompts(load_base("demo"))
    assert issubclass(BasePromptError, BaseLoadError)


def _weights_file(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_one_error_naming_the_folder(tiny_base, tmp_path, damage):
    # A SafetensorError is no OSError/ValueError: it escaped as a traceback (exit 1).
    folder = _save(tiny_base, tmp_path / "damaged")
    weights = _weights_file(folder)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if damage == "truncated" else b"\0" * 100)
    with pytest.raises(BaseLoadError, match=f"base folder {folder}: its checkpoint cannot be loaded"):
        load_base(str(folder))


def test_a_checkpoint_without_the_decoder_or_of_clip_is_refused_not_completed_at_random(tiny_base, tmp_path):
    # Both loaded with a random decoder (a different one in every process) and exit 0.
    from transformers import CLIPSegModel

    towers = CLIPSegModel(tiny_base.model.config)
    towers.load_state_dict(tiny_base.model.clip.state_dict())
    folder = tmp_path / "towers-only"
    towers.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    with pytest.raises(BaseLoadError, match="lacks or mismatches .* weight\\(s\\) of a CLIPSeg model"):
        load_base(str(folder))
    clip = _save(tiny_base, tmp_path / "clip")
    cfg = json.loads((clip / "config.json").read_text())
    cfg["model_type"] = "clip"
    (clip / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseLoadError, match="model_type 'clip', not 'clipseg'"):
        load_base(str(clip))


def test_a_folder_spec_never_gets_hub_advice(tmp_path):
    with pytest.raises(BaseLoadError, match="no such folder") as err:
        load_base(str(tmp_path / "nowhere"))
    assert "hf download" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BaseLoadError, match="has no config.json"):
        load_base(str(empty))
