"""The word-level tokenizer of the arch:/demo bases splits prompts into the pieces its vocabulary holds."""

from __future__ import annotations

from common.tokenizer import UNK, build_word_tokenizer


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])[1:-1]


def test_hyphenated_vocabulary_words_are_reachable_and_punctuation_still_splits():
    # "x-ray" is in BASE_WORDS, but the pre-tokenizer isolated every hyphen: <unk> - <unk>.
    tok = build_word_tokenizer(["Well-Defined"])
    assert _pieces(tok, "X-ray of the chest") == ["x-ray", "of", "the", "chest"]
    assert _pieces(tok, "well-defined lesion") == ["well-defined", "lesion"]
    assert _pieces(tok, "round lesion, (left).") == ["round", "lesion", ",", "(", "left", ")", "."]
    assert _pieces(tok, "lesion -") == ["lesion", "-"]
    assert UNK not in _pieces(tok, "  Small   round lesion ")
