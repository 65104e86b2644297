"""Load a frozen base CLIPSeg and its tokenizer from a base *spec*.

Specs:
- a Hugging Face hub id (``CIDAS/clipseg-rd64-refined``) or a local folder:
  ``from_pretrained``; honours ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.
- ``arch:clipseg-rd64-refined``: exactly that architecture from its config,
  random (seeded) weights: parameter counts, shapes, benchmarks.
- ``arch:tiny``: a tiny random CLIPSeg for fast tests.
- ``demo``: the small CLIPSeg pretrained by ``scripts/pretrain_demo_base.py``
  on synthetic images, shipped in ``common/assets/demo-base``; runs offline.

The returned model is in eval mode with every parameter frozen; adapter
variants decide what (if anything) becomes trainable on their own copy.

Every base must really listen to its prompts (``check_prompts``, one tiny
text forward at load): a folder saved without its tokenizer used to load a
2-token stand-in that turns every prompt into the same ids, and a text
config whose ``eos_token_id`` is not the tokenizer's end-of-text made the
text tower pool the wrong position, so every prompt gave the same
embedding. Both trained "fine" with exit 0; both are now a ``BaseLoadError``
naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    PreTrainedTokenizerBase,
)

from transformers.utils import logging as hf_logging

from common.tokenizer import EOS_ID, build_word_tokenizer

DEMO_BASE_DIR = Path(__file__).resolve().parent / "assets" / "demo-base"
REAL_BASE_ID = "CIDAS/clipseg-rd64-refined"
# Image size the model runs at unless its folder says otherwise (config key
# `fedvlsm_image_size`, written by the demo pretraining script).
DEFAULT_IMAGE_SIZE = 352


class BaseLoadError(RuntimeError):
    """A base spec that cannot be turned into a model, with the reason."""


class BasePromptError(BaseLoadError):
    """A base that loads but cannot tell prompts apart (tokenizer or end-of-text pooling broken)."""


# Files from which AutoTokenizer builds a real tokenizer (fast, or CLIP's BPE).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Probe prompts for check_prompts: common words every sensible vocabulary
# has; the shared first word makes pooling at a wrong (early) position give
# identical embeddings, so that mistake cannot slip through.
PROBE_PROMPTS = ("a round lesion", "a dark square blob in the upper left corner")
MIN_VOCAB = 16


@dataclass
class Base:
    model: CLIPSegForImageSegmentation
    tokenizer: PreTrainedTokenizerBase
    base_id: str
    image_size: int

    @property
    def fingerprint(self) -> str:
        return base_fingerprint(self.model)


def clipseg_rd64_refined_config() -> CLIPSegConfig:
    """The config of CIDAS/clipseg-rd64-refined (ViT-B/16 at 352, rd 64, refined decoder)."""
    return CLIPSegConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, eos_token_id=EOS_ID,
            bos_token_id=1, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16,
        ),
        projection_dim=512,
        extract_layers=[3, 6, 9],
        reduce_dim=64,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=2048,
        conditional_layer=0,
        use_complex_transposed_convolution=True,
    )


def tiny_config(vocab_size: int) -> CLIPSegConfig:
    """A CLIPSeg small enough that a training step takes milliseconds on a CPU."""
    return CLIPSegConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=2, max_position_embeddings=77, eos_token_id=EOS_ID,
            bos_token_id=1, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=2,
            image_size=64, patch_size=16,
        ),
        projection_dim=32,
        extract_layers=[1, 2, 3],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        conditional_layer=0,
        use_complex_transposed_convolution=True,
    )


ARCHS = {"clipseg-rd64-refined": (clipseg_rd64_refined_config, 352), "tiny": (tiny_config, 64)}


def _freeze(model: CLIPSegForImageSegmentation) -> CLIPSegForImageSegmentation:
    model.eval()
    model.requires_grad_(False)
    return model


def _build_arch(name: str) -> Base:
    if name not in ARCHS:
        raise BaseLoadError(f"unknown architecture 'arch:{name}'; known: {', '.join('arch:' + k for k in ARCHS)}")
    make_config, image_size = ARCHS[name]
    tokenizer = build_word_tokenizer()
    config = make_config(len(tokenizer)) if name == "tiny" else make_config()
    # Seeded so that the same arch spec always yields the same weights (and
    # the same fingerprint), without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPSegForImageSegmentation(config)
    return Base(_freeze(model), tokenizer, f"arch:{name}", image_size)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _load_pretrained(spec: str, base_id: str) -> Base:
    folder = Path(spec)
    local = folder.is_dir()  # a folder load_base has checked; else a hub id
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise for a 2 MB model in every round
    try:
        # fp32 master weights whatever the checkpoint's dtype (the demo ships
        # fp16 to stay small); autocast gives bf16/fp16 speed on GPUs.
        model, info = CLIPSegForImageSegmentation.from_pretrained(spec, dtype=torch.float32,
                                                                  output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as err:  # noqa: BLE001 - whatever a damaged checkpoint raises, one line naming it
        if local:
            raise BaseLoadError(f"base folder {folder}: its checkpoint cannot be loaded (damaged, truncated or "
                                f"not matching its config.json?): {_first_line(err)}") from err
        if not isinstance(err, (OSError, ValueError)):
            raise BaseLoadError(f"cannot load base '{spec}': {_first_line(err)}") from err
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        hint = (
            "offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so only the local cache is searched"
            if offline
            else "the hub could not be reached or has no such model"
        )
        raise BaseLoadError(
            f"cannot load base '{spec}': not a local folder with a CLIPSeg checkpoint, and {hint}. "
            f"Download it where the hub is reachable (hf download {spec} --local-dir DIR) "
            f"and pass --base DIR. Cause: {err}"
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # Weights the checkpoint lacks would be random, and differently so in every process.
    absent = sorted({*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                       for k in info.get("mismatched_keys", ()))})
    if absent:
        raise BaseLoadError(f"base '{spec}': the checkpoint lacks or mismatches {len(absent)} weight(s) of a "
                            f"CLIPSeg model (e.g. {', '.join(absent[:3])}); is it a whole "
                            "CLIPSegForImageSegmentation checkpoint?")
    image_size = int(getattr(model.config, "fedvlsm_image_size", DEFAULT_IMAGE_SIZE))
    return Base(_freeze(model), tokenizer, base_id, image_size)


def _check_folder_is_clipseg(folder: Path) -> None:
    """A local base folder's config.json must exist and be a CLIPSeg one (a CLIP checkpoint loads with a
    random decoder, with nothing but a warning)."""
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise BaseLoadError(f"{config}: cannot be read as a model config ({_first_line(err)})") from None
    if model_type != "clipseg":
        raise BaseLoadError(f"{config}: model_type {model_type!r}, not 'clipseg': fedvlsm needs a CLIPSeg "
                            "checkpoint (e.g. CIDAS/clipseg-rd64-refined)")


def demo_base_dir() -> Path:
    """The folder holding the demo base's weights.

    Normally beside this file. But `flwr run` installs the app bundle (FAB)
    under $FLWR_HOME/apps/... and puts it first on sys.path, and a FAB only
    carries text files (.py/.toml/.md/.json/.yaml in flwr 1.42, not
    configurable): that copy of common/assets/demo-base has config and
    tokenizer but no weights. The installed project (editable or not) still
    has them, so the first copy on sys.path with the weights is used.
    """
    if (DEMO_BASE_DIR / "model.safetensors").is_file():
        return DEMO_BASE_DIR
    relative = Path("common", "assets", "demo-base")
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / relative
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise BaseLoadError(
        f"the demo base's weights are missing from {DEMO_BASE_DIR} (and from every common/assets/demo-base "
        "on sys.path); install the project (pip install -e .) or rebuild them with "
        "`python scripts/pretrain_demo_base.py`"
    )


def load_base(spec: str = "demo") -> Base:
    """Resolve a base spec (see module docstring) to a frozen model + tokenizer, checked by `check_prompts`."""
    if spec.startswith("arch:"):
        base = _build_arch(spec.removeprefix("arch:"))
    elif spec == "demo":
        base = _load_pretrained(str(demo_base_dir()), "demo")
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise BaseLoadError(f"base folder '{path}' has no config.json (expected a saved CLIPSeg model)")
            _check_folder_is_clipseg(path)
            if not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise BasePromptError(
                    f"base folder '{path}' has no tokenizer ({' or '.join(TOKENIZER_FILES)} missing): every prompt "
                    "would become the same ids. Save the tokenizer the model was trained with beside it: "
                    f"tokenizer.save_pretrained('{path}')"
                )
            base = _load_pretrained(str(path), str(path.resolve()))
        elif spec.startswith((".", "/", "~")):  # a path, not a hub id: no hub advice
            raise BaseLoadError(f"base folder {path}: no such folder")
        else:
            base = _load_pretrained(spec, spec)
    check_prompts(base, where=f"base '{spec}'")
    return base


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str) -> dict[str, torch.Tensor]:
    return tokenizer([prompt], truncation=True, max_length=77, return_tensors="pt")


@torch.no_grad()
def check_prompts(base: Base, where: str | None = None) -> None:
    """Refuse a base whose conditional embedding cannot depend on the prompt.

    Three cheap checks (two prompts, one tiny text forward each):
    the tokenizer is not degenerate (a real vocabulary, ids the model's
    embedding table has, different words -> different ids); the position the
    text tower pools (its config's ``eos_token_id``, see
    ``AdaptedCLIPSeg._eot_positions``) is the last real token of each prompt,
    i.e. the tokenizer's end-of-text; and two different prompts give
    different embeddings. Raises ``BasePromptError`` naming the base and the fix.
    """
    where = where or f"base '{base.base_id}'"
    tok, text_cfg = base.tokenizer, base.model.config.text_config
    fix_tok = "save the tokenizer the model was trained with beside it (tokenizer.save_pretrained(FOLDER))"
    if len(tok) < MIN_VOCAB:
        raise BasePromptError(f"{where}: its tokenizer has only {len(tok)} tokens, so prompts cannot be told apart; {fix_tok}")
    encoded = [_tokenize(tok, p) for p in PROBE_PROMPTS]
    special = set(tok.all_special_ids)
    words = {int(i) for e in encoded for i in e["input_ids"][0] if int(i) not in special}
    if len(words) < 2:
        raise BasePromptError(
            f"{where}: its tokenizer maps the words of {PROBE_PROMPTS!r} to {len(words)} distinct id(s) "
            f"(everything unknown?), so prompts cannot be told apart; {fix_tok}"
        )
    top = max(int(e["input_ids"].max()) for e in encoded)
    if top >= text_cfg.vocab_size:
        raise BasePromptError(
            f"{where}: its tokenizer produces id {top} but the text model has only {text_cfg.vocab_size} token "
            f"embeddings: tokenizer and model do not belong together; {fix_tok}"
        )
    from common.model import AdaptedCLIPSeg  # the pooling rule our forward uses (model imports this module)

    eos = text_cfg.eos_token_id
    for prompt, e in zip(PROBE_PROMPTS, encoded):
        ids = e["input_ids"]
        pooled = int(AdaptedCLIPSeg._eot_positions(ids, eos)[0])
        last = int(e["attention_mask"][0].nonzero().max())
        if pooled != last:
            tok_eos = tok.eos_token_id
            raise BasePromptError(
                f"{where}: the text tower pools token position {pooled} but the prompt {prompt!r} ends at "
                f"position {last}: the text config's eos_token_id={eos} is not the tokenizer's end-of-text "
                f"({tok.eos_token!r}, id {tok_eos}), so every prompt would give the same embedding. Fix: set "
                f"\"text_config\": {{\"eos_token_id\": {tok_eos}}} in the base's config.json, or use the "
                "tokenizer the model was trained with"
            )
    model = base.model
    embeddings = []
    for e in encoded:
        out = model.clip.text_model(input_ids=e["input_ids"], attention_mask=e["attention_mask"])
        embeddings.append(model.clip.text_projection(out.pooler_output)[0].float())
    if torch.allclose(embeddings[0], embeddings[1], rtol=1e-4, atol=1e-6):
        raise BasePromptError(
            f"{where}: the prompts {PROBE_PROMPTS[0]!r} and {PROBE_PROMPTS[1]!r} give the same conditional "
            "embedding, so the model cannot follow prompts (text tower weights missing or zero?); "
            "check the checkpoint and its tokenizer"
        )


def _weights_hash(root: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer under `root` (names, shapes, dtypes, values).

    Reads the fp32 originals where the fast path has cast weights to bf16
    (common/fast.py), so it names the weights, not their storage. About 1 s
    per 600 MB of weights on a CPU.
    """
    from common.fast import FP32_ORIGINALS  # local: fast is not needed to load a base

    h = hashlib.blake2b(digest_size=16)
    for module_name, module in root.named_modules():
        kept = module.__dict__.get(FP32_ORIGINALS, {})
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in tensors:
            t = kept.get(name, t).detach()
            h.update(f"{module_name}.{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
                t = t.view(torch.int16)
            h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: CLIPSegForImageSegmentation) -> str:
    """A hash of every weight of the frozen towers (``model.clip``), computed once per loaded base.

    For what must not mix between bases: cached frozen activations
    (common/activation_cache.py) computed on one base are wrong for another
    whose towers differ anywhere (the decoder does not enter them).
    """
    pinned = getattr(model, "_fedvlsm_digest", None)
    if pinned is None:
        model._fedvlsm_digest = pinned = _weights_hash(model.clip)
    return pinned


def base_fingerprint(model: CLIPSegForImageSegmentation) -> str:
    """A hash of every weight of the base (towers and decoder), independent of where it was loaded from.

    Adapters are only meaningful on the weights they were trained against:
    two bases with identical shapes (rd64 vs rd64-refined, a random arch, a
    fine-tuned checkpoint) must be told apart wherever they differ. Computed
    once per loaded base (pinned in ``_fedvlsm_fingerprint``), from the fp32
    weights also after the GPU fast path cast them to bf16 in place.
    32 hex digits; adapters saved before it carry the 16-digit
    ``legacy_fingerprint`` (common/model.py, check_fingerprint).
    """
    pinned = getattr(model, "_fedvlsm_fingerprint", None)
    if pinned is None:
        model._fedvlsm_fingerprint = pinned = _weights_hash(model)
    return pinned


def legacy_fingerprint(model: CLIPSegForImageSegmentation) -> str:
    """The fingerprint adapters carried until 2026-12-07: a hash of a few sampled slices (16 hex digits).

    It told different checkpoints apart only where they differ inside the
    slices; kept so that adapters saved with it still load on their base.
    Pinned like ``base_fingerprint`` (before a bf16 cast rounds the slices).
    """
    pinned = getattr(model, "_fedvlsm_legacy_fingerprint", None)
    if pinned is not None:
        return pinned
    h = hashlib.sha256()
    clip = model.clip
    probes = [
        clip.vision_model.embeddings.patch_embedding.weight,
        clip.vision_model.encoder.layers[0].self_attn.q_proj.weight,
        clip.text_model.embeddings.token_embedding.weight,
        clip.text_projection.weight,
        model.decoder.film_mul.weight,
    ]
    for t in probes:
        flat = t.detach().float().reshape(-1)[:4096].cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(flat.numpy().round(5).tobytes())
    model._fedvlsm_legacy_fingerprint = pinned = h.hexdigest()[:16]
    return pinned
