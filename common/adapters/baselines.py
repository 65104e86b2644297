"""Baselines in the adapter interface: decoder-only, full, LoRA, none.

They train parts of the base itself, so they work on their own deep copy of
the base: the frozen base that a site process caches stays untouched.
- ``decoder``: only the CLIPSeg decoder trains.
- ``full``: everything trains, the towers truly end-to-end (our forward has
  no ``no_grad`` around them, unlike the stock CLIPSeg forward).
- ``lora``: peft LoRA on the towers' attention projections (rank configurable).
- ``none``: nothing trains; the frozen base as it is.
"""

from __future__ import annotations

import copy

from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPSegForImageSegmentation

from common.adapters.spec import AdapterSpec

MUTATING = {"decoder", "full", "lora"}


def prepare_base(clipseg: CLIPSegForImageSegmentation, spec: AdapterSpec) -> CLIPSegForImageSegmentation:
    """Return the base this variant runs on, with `requires_grad` set on what it trains."""
    if spec.variant not in MUTATING:
        return clipseg
    if spec.variant == "lora":
        # A rank above the projections' width is no low-rank update (a rank of 1e8 tried to allocate
        # it: `fedvlsm train` hung, `fedvlsm params` counted 147 M "trainable" parameters on arch:tiny).
        width = min(clipseg.config.vision_config.hidden_size, clipseg.config.text_config.hidden_size)
        if spec.lora_rank > width:
            raise ValueError(f"lora_rank must be at most {width} (the width of this base's q/v projections), "
                             f"got {spec.lora_rank}")
    model = copy.deepcopy(clipseg)
    model.requires_grad_(False)
    if spec.variant == "decoder":
        model.decoder.requires_grad_(True)
    elif spec.variant == "full":
        model.requires_grad_(True)
    else:
        targets = "|".join(spec.lora_targets)
        lora = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            # Only the CLIP towers; the decoder has q/v projections too.
            target_modules=rf".*(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.({targets})",
        )
        inject_adapter_in_model(lora, model.clip)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model
