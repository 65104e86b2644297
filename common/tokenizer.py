"""A small word-level CLIP-style tokenizer for bases that have no CLIP vocabulary.

The real CLIP BPE vocabulary comes with hub checkpoints. Random-weight
architectures (`arch:`) and the demo base need *some* tokenizer; a word-level
one built with the `tokenizers` library keeps the embedding table small (the
demo base must stay under 5 MB) and behaves like CLIP's where it matters:
`<|startoftext|> words <|endoftext|>`, padded, and the end-of-text id is what
the text tower pools on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, UNK, EOS = "<|pad|>", "<|startoftext|>", "<|unk|>", "<|endoftext|>"
# Order fixes the ids: EOS is 3, never 2, because CLIPSeg's text tower switches
# to a legacy "argmax of input ids" pooling when eos_token_id == 2.
SPECIALS = [PAD, BOS, UNK, EOS]
EOS_ID = 3

# Words of the prompts the project itself produces (synthetic data, demo
# pretraining) plus common medical-segmentation prompt words.
BASE_WORDS = """
a an the of in on at to with and or image photo scan picture
lesion lesions polyp polyps tumor tumour nodule cyst ulcer wound mass spot spots blob
object objects shape shapes region area structure organ tissue skin breast ultrasound
endoscopy endoscopic dermoscopy x-ray xray ct mri chest lung heart ventricle liver kidney
round oval circular elliptical irregular elongated square rectangular triangular
star ring cross line stripe stripes
small tiny little medium large big huge
bright dark light pale white black gray grey red green blue yellow pink orange purple brown
smooth rough textured blurry sharp soft
left right top bottom upper lower center centre middle corner
located positioned found seen near
one two three single multiple several many
background foreground
, . ; : ( ) -
""".split()


# One rule for the pieces of a text, used both to build the vocabulary and to split prompts:
# words (hyphenated ones whole: "x-ray") and single punctuation marks. The pre-tokenizer used
# to isolate every punctuation mark, hyphens included, so vocabulary words such as "x-ray"
# could never be produced and a prompt's "x-ray" became <unk> - <unk>.
PIECE = r"\w+(?:-\w+)*|[^\w\s]"


def build_word_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over BASE_WORDS + `words`."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in list(BASE_WORDS) + [w.lower() for w in words]:
        for piece in re.findall(PIECE, w):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # invert: the pattern's matches are the pieces; what lies between them (whitespace) is dropped.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
    )
