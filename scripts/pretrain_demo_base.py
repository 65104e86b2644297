"""Pretrain the shipped demo base: a small CLIPSeg, from scratch, on synthetic scenes.

Why: the project must run offline (tests, the federated demo, CI), but the
real base (CIDAS/clipseg-rd64-refined) lives on the Hugging Face hub and is
far too slow for a 2-core CPU demo. So the project ships a *toy* VLSM: the
same classes (``CLIPSegForImageSegmentation`` + a word-level CLIP-style
tokenizer) with a small config, pretrained here on "open-domain" synthetic
scenes (coloured shapes, ``common/demo_scenes.py``) and then frozen. Its
frozen features are what the adapters build on; the medical-looking sites of
``common/data/synth.py`` are a different domain for them to adapt to.

What it does:
1. builds the tokenizer (``common.tokenizer.build_word_tokenizer``) over the
   scene words and the words of the synthetic medical prompts;
2. builds a small CLIPSeg config (patch 16, complex transposed convolution,
   text hidden size == projection_dim, more vision layers than the decoder
   reads) and trains every weight with ``common.model.build_model(.., "full")``
   (our forward has gradients through both towers) on batches generated on
   the fly: BCE + Dice on the logits, AdamW, warmup + cosine schedule;
3. saves weights as fp16 safetensors, config (with ``fedvlsm_image_size``)
   and tokenizer into ``common/assets/demo-base/``;
4. reloads the saved folder with ``common.bases.load_base`` and reports
   validation Dice on held-out scenes with correct and with shuffled
   prompts (the text must matter), times one dense-vl adapter step, and
   writes the model card ``README.md`` with the figures of this very run.

Rebuild: ``python scripts/pretrain_demo_base.py`` (about 9 minutes on 2 CPU
cores). Deterministic for a given seed and thread count, up to floating-point
reduction order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python scripts/pretrain_demo_base.py` from anywhere
    sys.path.insert(0, str(ROOT))

import transformers
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, PreTrainedTokenizerBase

from common import demo_scenes
from common.bases import DEMO_BASE_DIR, Base, load_base
from common.model import AdaptedCLIPSeg, build_model
from common.tokenizer import BASE_WORDS, EOS_ID, build_word_tokenizer

# Seed namespaces: training batches, validation scenes (tests use their own).
TRAIN_STREAM, VAL_STREAM = 1, 2


# --------------------------------------------------------------- vocabulary
def _words(text: str) -> list[str]:
    return re.findall(r"[\w\-]+|[^\w\s]", text.lower())


def synth_prompt_words(samples_per_site: int = 24, sites: int = 6) -> list[str]:
    """Words the synthetic medical sites put in their prompts (common/data/synth.py).

    Prompts are generated for the three base styles and three perturbed ones
    (small images: only the words matter), plus the module's word constants,
    so that the shipped tokenizer knows every word those prompts can hold.
    """
    from common.data import synth

    words: set[str] = set()
    texts: list[str] = [synth.NOUN, synth.NOUN + "s", *synth.COUNT_WORDS.values(), *synth.TEXTURE_WORDS.values()]
    texts += [word for _, word in synth.SIZE_WORDS] + list(synth.DEFINITIONS)
    for site in range(sites):
        style = synth.site_style(site, 0)
        texts += [style.tone, style.colour, *style.shapes]
        for i in range(samples_per_site):
            sample = synth.make_sample(np.random.default_rng([0, site, i]), style, 64)
            for prompt in synth.make_prompts(sample, style).values():
                texts += [prompt] if isinstance(prompt, str) else list(prompt)
    for text in texts:
        words.update(_words(re.sub(r"\{\w+\}", " ", text)))  # template slots are not words
    return sorted(words)


def build_tokenizer() -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The demo tokenizer and the words it added beyond BASE_WORDS."""
    extra = sorted(set(demo_scenes.vocabulary()) | set(synth_prompt_words()))
    known = {p for w in BASE_WORDS for p in _words(w)}
    return build_word_tokenizer(extra), [w for w in extra if w not in known]


# ------------------------------------------------------------------- config
def demo_config(vocab_size: int, image_size: int) -> CLIPSegConfig:
    """The demo CLIPSeg: small, but with the structure of clipseg-rd64-refined.

    - patch 16 and the complex transposed convolution, like the real model;
    - text hidden size == projection_dim (shallow text adapters add text
      hidden states to the conditional embedding);
    - 6 vision layers, decoder reads [1, 3, 4]: layer 5 feeds nothing and is
      skipped by our forward (the real model: 12 layers, reads [3, 6, 9]);
    - 4 text layers >= max(extract_layers) (dense text adapters need them);
    - vision image_size == run resolution: no position interpolation.
    """
    config = CLIPSegConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "max_position_embeddings": 77, "eos_token_id": EOS_ID,
            "bos_token_id": 1, "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
            "image_size": image_size, "patch_size": 16,
        },
        projection_dim=64,
        extract_layers=[1, 3, 4],
        reduce_dim=64,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        conditional_layer=0,
        use_complex_transposed_convolution=True,
    )
    config.fedvlsm_image_size = image_size
    return config


def reset_decoder_init(model: CLIPSegForImageSegmentation) -> None:
    """PyTorch's default init for the decoder's reduce/FiLM linears and convolutions.

    ``CLIPSegPreTrainedModel._init_weights`` leaves these at a plain N(0, 1)
    (CLIPSeg is never meant to be trained from scratch), which makes the
    initial logits about 10^3 and the first hundreds of steps wasted.
    """
    decoder = model.decoder
    for module in [*decoder.reduces, decoder.film_mul, decoder.film_add, *decoder.transposed_convolution]:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


# --------------------------------------------------------------------- data
class SceneBatches(IterableDataset):
    """Training batches generated on the fly; batch i depends only on (seed, i).

    Each batch renders ``batch_size // prompts_per_scene`` scenes and draws
    ``prompts_per_scene`` prompts for each: rendering is the expensive part,
    and two different prompts on the same image in one batch push the model
    to read the text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seed: int, steps: int, batch_size: int,
                 image_size: int, prompts_per_scene: int = 2) -> None:
        if batch_size % prompts_per_scene:
            raise ValueError(f"batch_size {batch_size} is not a multiple of prompts_per_scene {prompts_per_scene}")
        self.tokenizer, self.seed, self.steps = tokenizer, seed, steps
        self.batch_size, self.image_size, self.k = batch_size, image_size, prompts_per_scene

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, TRAIN_STREAM, step])
        images, masks, prompts = [], [], []
        for _ in range(self.batch_size // self.k):
            scene = demo_scenes.render_scene(rng, self.image_size)
            for _ in range(self.k):
                prompt, mask = demo_scenes.describe(rng, scene)
                images.append(scene.image)
                masks.append(mask)
                prompts.append(prompt)
        mean = torch.tensor(demo_scenes.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(demo_scenes.IMAGENET_STD).view(1, 3, 1, 1)
        pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - mean) / std
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        return {
            "pixel_values": pixels.contiguous(),
            "mask": torch.from_numpy(np.stack(masks)[:, None]).float(),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for step in range(self.steps):
            yield self.batch(step)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------- loss
def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel BCE + soft Dice (per sample, averaged), both on the logits."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    dice = (2 * (prob * tgt).sum(1) + 1.0) / (prob.sum(1) + tgt.sum(1) + 1.0)
    return bce + (1 - dice).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------- evaluation
@dataclass
class DiceReport:
    correct: float  # Dice with each scene's own prompt
    shuffled: float  # Dice (against the same masks) with another scene's prompt
    all_objects: float  # text-blind reference: predicting every object in the scene
    scenes: int
    by_kind: dict[str, tuple[float, int]]  # correct-prompt Dice, count, by attributes named


@torch.no_grad()
def evaluate(model: AdaptedCLIPSeg, tokenizer: PreTrainedTokenizerBase, seed: int, scenes: int,
             image_size: int, chunk: int = 64) -> DiceReport:
    """Mean per-scene Dice (threshold 0.5) on held-out scenes, correct vs shuffled prompts."""
    was_training = model.training
    model.eval()
    correct, shuffled, blind, kinds = [], [], [], []
    for start in range(0, scenes, chunk):
        batch = demo_scenes.sample_batch([seed, VAL_STREAM, start], min(chunk, scenes - start), image_size)
        for prompts, out in ((batch.prompts, correct), (demo_scenes.shuffled(batch.prompts), shuffled)):
            tokens = tokenizer(prompts, padding=True, return_tensors="pt")
            logits = model(batch.pixel_values, tokens["input_ids"], tokens["attention_mask"])
            out.append(demo_scenes.dice_per_sample(logits > 0, batch.masks))
        blind.append(demo_scenes.dice_per_sample(batch.all_objects, batch.masks))
        kinds += [demo_scenes.prompt_kind(p) for p in batch.prompts]
    model.train(was_training)
    per_scene = torch.cat(correct)
    by_kind = {}
    for kind in sorted(set(kinds)):
        picked = per_scene[[k == kind for k in kinds]]
        by_kind[kind] = (float(picked.mean()), len(picked))
    return DiceReport(float(per_scene.mean()), float(torch.cat(shuffled).mean()), float(torch.cat(blind).mean()),
                      scenes, by_kind)


def time_adapter_step(base: Base, variant: str = "dense-vl", batch_size: int = 8, steps: int = 10) -> float:
    """Seconds per training step (forward + backward + AdamW) of `variant` adapters on `base`."""
    model = build_model(base, variant)
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    batch = demo_scenes.sample_batch([0, 99], batch_size, base.image_size)
    tokens = base.tokenizer(batch.prompts, padding=True, return_tensors="pt")
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        loss = bce_dice_loss(model(batch.pixel_values, tokens["input_ids"], tokens["attention_mask"]), batch.masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # the first steps allocate
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


# --------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEMO_BASE_DIR, help="output folder (replaced)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--prompts-per-scene", type=int, default=2, help="prompts drawn per rendered scene in a batch")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    # One intra-op thread plus one data worker keeps both cores busy without
    # oversubscription. With 2 intra-op threads while other jobs shared the 2
    # cores, steps were measured 5-12x slower (1.7-3.7 s vs 0.29-0.32 s).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="data-generating processes (0: in the main process)")
    p.add_argument("--val-scenes", type=int, default=512)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--card-only", action="store_true",
                   help="no training: re-evaluate the base in --out and rewrite its README.md and training_stats.json")
    return p.parse_args(argv)


def save_base(model: CLIPSegForImageSegmentation, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """fp16 safetensors + config + tokenizer, written next to `out` and swapped in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    half = CLIPSegForImageSegmentation(model.config)
    half.load_state_dict(model.state_dict())
    half.half().save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def model_card(stats: dict, config: dict) -> str:
    """README.md of the saved base, filled with the figures of the run in `stats`."""
    c, v, t = config, config["vision_config"], config["text_config"]
    val = stats["validation"]
    kind_names = {"colour": "colour, no shape (\"the red object\")", "shape": "shape, no colour (\"small ring\")",
                  "colour+shape": "colour and shape (\"blue circle at the top\")", "neither": "neither"}
    kinds = "\n".join(f"| {kind_names.get(k, k)} | {n} | {d:.3f} |" for k, (d, n) in val["by_kind"].items())
    load = stats.get("load_average_end_of_training")
    load_note = f"; 1-min load average {load:.1f} at the end of training" if load else ""
    return f"""# fedvlsm demo base: a toy CLIPSeg trained from scratch on synthetic shapes

**What this is.** A *small* `CLIPSegForImageSegmentation` (the Hugging Face
CLIPSeg classes, unchanged) with a word-level CLIP-style tokenizer, trained
from scratch by `scripts/pretrain_demo_base.py` on synthetic "open-domain"
scenes: 2-4 coloured geometric objects (circle, square, triangle, star, ring,
ellipse; red, green, blue, yellow, white; small or large) on random smooth
or blotchy noisy backgrounds, each paired with a prompt naming one object by
some of its attributes ("red circle", "the small blue square", "a yellow star
located in the top left of the image") and the mask of every object the
prompt describes (`common/demo_scenes.py`).

**What it is not.** It is not CLIP or CLIPSeg: it has never seen a natural
or a medical image, knows {stats["vocab_size"]} words, and its "language" is
attribute matching. It exists so that the project (tests, the federated
demo) runs offline on 2 CPU cores with a real, frozen vision-language
segmentation model whose features adapters can build on. Results obtained
on it say nothing about the real CIDAS/clipseg-rd64-refined.

## Architecture (`config.json`)

| part | setting |
|---|---|
| vision tower | ViT, patch {v["patch_size"]}, {v["num_hidden_layers"]} layers, hidden {v["hidden_size"]}, \
MLP {v["intermediate_size"]}, {v["num_attention_heads"]} heads, image {v["image_size"]} |
| text tower | {t["num_hidden_layers"]} layers, hidden {t["hidden_size"]}, MLP {t["intermediate_size"]}, \
{t["num_attention_heads"]} heads, vocab {t["vocab_size"]}, {t["max_position_embeddings"]} positions, \
eos id {t["eos_token_id"]} |
| projection_dim | {c["projection_dim"]} (== text hidden size) |
| decoder | extract_layers {c["extract_layers"]}, reduce_dim {c["reduce_dim"]}, \
{c["decoder_num_attention_heads"]} heads, MLP {c["decoder_intermediate_size"]}, complex transposed \
convolution, FiLM at layer {c["conditional_layer"]} |
| run resolution | `fedvlsm_image_size` = {c["fedvlsm_image_size"]} |

Parameters: {stats["params_total"]:,} in total, {stats["params_used"]:,} used by the
forward (vision layers after max(extract_layers) feed nothing; they were
never trained and are skipped by `common.model`, as layers 10-11 of the real
model are). Weights are stored as fp16 safetensors ({stats["weights_bytes"]:,} bytes)
and loaded as fp32 by `common.bases.load_base("demo")`.

## Training recipe

- every weight trained (`build_model(base, "full")`: gradients through both towers),
  from the transformers init except the decoder's reduce/FiLM/convolution layers
  (PyTorch default init: CLIPSeg's own init leaves them at N(0, 1));
- {stats["steps"]} steps of batch {stats["batch_size"]} \
({stats["batch_size"] // stats["prompts_per_scene"]} scenes x {stats["prompts_per_scene"]} prompts), \
{stats["image_size"]}x{stats["image_size"]} px, scenes generated on the fly (seeded, never repeated);
- loss BCE + soft Dice on the logits; AdamW (lr {stats["lr"]}, betas (0.9, 0.98), weight decay
  {stats["weight_decay"]} on matrices), {stats["warmup"]} warmup steps, cosine decay to 5% of the
  peak; gradient norm clipped at 1;
- seed {stats["seed"]}; {stats["threads"]} torch thread(s) + {stats["workers"]} data-generating worker;
- training wall time {stats["train_seconds"] / 60:.1f} min on {stats["machine"]}{load_note};
  torch {stats["torch"]}, transformers {stats["transformers"]}.

## Validation (held-out scenes, fp16 weights reloaded)

Mean per-scene Dice at threshold 0.5 on {val["scenes"]} freshly generated scenes:

| prompts | Dice |
|---|---|
| correct prompt | {val["correct"]:.3f} |
| shuffled prompts (another scene's prompt, scored against the correct mask) | {val["shuffled"]:.3f} |
| text-blind reference: the exact mask of *every* object in the scene | {val["all_objects"]:.3f} |

The gap between the first two rows is what the text contributes. The third
row is not a model: it is what a perfect segmenter that ignores the prompt
would score.

Correct-prompt Dice by the attributes the prompt names (size and position words
may come on top):

| prompt names | scenes | Dice |
|---|---|---|
{kinds}

In this run colour was read far more reliably than shape; small objects (one or two
16-pixel patches) come out coarse: the decoder upsamples an 8x8 token grid.

Speed: one `dense-vl` adapter training step (batch 8, forward + backward +
AdamW) on this base: {stats["dense_vl_step_ms"]:.0f} ms (median of 10) with
{stats.get("step_threads", stats["threads"])} torch thread(s).

## Tokenizer

`common.tokenizer.build_word_tokenizer` over its BASE_WORDS plus the scene
words and the words of the synthetic medical prompts (`common/data/synth.py`);
ids: pad 0, bos 1, unk 2, eos 3. Words added beyond BASE_WORDS:
{", ".join(stats["added_words"])}.
Medical words (lesion, polyp, ...) are in the vocabulary but never occurred in
pretraining: their embeddings are untrained, one more gap for the adapters.
The vocabulary is frozen with the weights: a word added to the synthetic
prompts later maps to `<|unk|>` until the base is rebuilt.

## Rebuild

```
python scripts/pretrain_demo_base.py              # trains, writes common/assets/demo-base/
python scripts/pretrain_demo_base.py --card-only  # re-evaluates it, rewrites this card
```

`training_stats.json` holds the numbers of the run that produced these weights.
"""


def train(args: argparse.Namespace) -> dict:
    """Pretrain from scratch, save into ``args.out``; the training half of the stats."""
    torch.manual_seed(args.seed)
    tokenizer, added = build_tokenizer()
    config = demo_config(len(tokenizer), args.image_size)
    model = CLIPSegForImageSegmentation(config)
    reset_decoder_init(model)
    params_total = sum(p.numel() for p in model.parameters())
    skipped = model.clip.vision_model.encoder.layers[max(config.extract_layers) + 1 :]
    params_used = params_total - sum(p.numel() for p in skipped.parameters())
    print(f"vocab {len(tokenizer)} words; parameters {params_total:,} ({params_used:,} used by the forward)", flush=True)

    net = build_model(Base(model, tokenizer, "pretraining", args.image_size), "full")
    net.train()
    decayed = {n for n, p in net.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n}
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if n in decayed], "weight_decay": args.weight_decay},
            {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    data = SceneBatches(tokenizer, args.seed, args.steps, args.batch_size, args.image_size, args.prompts_per_scene)
    loader = DataLoader(data, batch_size=None, num_workers=args.workers, worker_init_fn=_worker_init,
                        prefetch_factor=4 if args.workers else None)

    t_train = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        logits = net(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss = bce_dice_loss(logits, batch["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.trainable_parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            quick = evaluate(net, tokenizer, args.seed, 48, args.image_size)
            elapsed = time.perf_counter() - t_train
            print(f"step {step + 1:5d}/{args.steps}  loss {running / args.log_every:.4f}  "
                  f"val48 dice correct {quick.correct:.3f} shuffled {quick.shuffled:.3f}  "
                  f"{elapsed:6.0f}s", flush=True)
            running = 0.0
    train_seconds = time.perf_counter() - t_train
    load = os.getloadavg()[0]
    save_base(net.clipseg, tokenizer, args.out)
    return {
        "vocab_size": len(tokenizer),
        "added_words": added,
        "params_total": params_total,
        "params_used": params_used,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "prompts_per_scene": args.prompts_per_scene,
        "image_size": args.image_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "seed": args.seed,
        "threads": args.threads,
        "workers": args.workers,
        "train_seconds": train_seconds,
        "load_average_end_of_training": load,
        "machine": f"{platform.machine()} CPU with {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    stats_file = args.out / "training_stats.json"
    if args.card_only:
        if not stats_file.is_file():
            raise SystemExit(f"--card-only: {stats_file} is missing; train first")
        stats = json.loads(stats_file.read_text())
    else:
        stats = train(args)

    base = load_base(str(args.out))
    val = evaluate(build_model(base, "none"), base.tokenizer, stats["seed"], args.val_scenes, base.image_size)
    print(f"validation ({val.scenes} held-out scenes, fp16 weights reloaded): Dice correct prompts {val.correct:.3f}, "
          f"shuffled prompts {val.shuffled:.3f}; text-blind all-objects reference {val.all_objects:.3f}", flush=True)
    print("  correct-prompt Dice by attributes named: "
          + ", ".join(f"{k} {d:.3f} (n={n})" for k, (d, n) in val.by_kind.items()), flush=True)
    step_s = time_adapter_step(base)
    print(f"dense-vl adapter step (batch 8, {torch.get_num_threads()} thread(s)): {step_s * 1000:.1f} ms", flush=True)

    weights = args.out / "model.safetensors"
    stats.update(
        weights_bytes=weights.stat().st_size,
        validation=asdict(val),
        dense_vl_step_ms=step_s * 1000,
        step_threads=torch.get_num_threads(),
    )
    if not args.card_only:
        stats["total_seconds"] = time.perf_counter() - t_start
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    config = json.loads((args.out / "config.json").read_text())
    (args.out / "README.md").write_text(model_card(stats, config))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB; weights {weights.stat().st_size / 1e6:.2f} MB); "
          f"training {stats['train_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
