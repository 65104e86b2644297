"""AdaptedCLIPSeg: a frozen CLIPSeg with trainable adapters, and our own forward.

Why our own forward: the stock ``CLIPSegForImageSegmentation.forward`` runs
both CLIP towers under ``torch.no_grad()``, so nothing inside the towers could
ever get a gradient. Here the towers are walked layer by layer, which lets
dense adapters sit inside the blocks, lets the ``full`` baseline really train
the towers, and lets us stop the vision tower at the last layer the decoder
reads (layers 10 and 11 of the real model feed nothing).

Layers without adapters are called as the stock modules, so with the ``none``
variant the logits equal the stock forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import CLIPSegForImageSegmentation
from transformers.masking_utils import create_causal_mask

from common.adapters import AdapterSet, AdapterSpec, build_adapter_set
from common.adapters.baselines import MUTATING, prepare_base
from common.bases import Base, base_fingerprint, legacy_fingerprint


class AdapterStateError(ValueError):
    """An adapter state that does not fit the model (names, shapes, dtypes, base)."""


class AdaptedCLIPSeg(nn.Module):
    def __init__(self, base: Base, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.base_id = base.base_id
        self.base_fingerprint = base_fingerprint(base.model)
        self.legacy_base_fingerprint = legacy_fingerprint(base.model)  # adapters saved before 2026-12-07
        self.image_size = base.image_size
        self.clipseg: CLIPSegForImageSegmentation = prepare_base(base.model, spec)
        self.adapters: AdapterSet = build_adapter_set(spec, self.clipseg.config)
        self.adapters.requires_grad_(True)
        self.extract_layers = list(self.clipseg.config.extract_layers)
        # Prompt tokens the text tower takes: CLIP's 77, or fewer where its position table is shorter.
        self.max_prompt_tokens = min(77, int(self.clipseg.config.text_config.max_position_embeddings))
        # Name -> parameter, walked once: the state calls below run several times per message,
        # and walking the whole base each time cost more than the copies. A parameter keeps
        # its identity through Opacus, torch.compile and CPU <-> CUDA moves, but not through
        # every conversion (to "meta", or with torch.__future__'s overwrite-on-conversion
        # flag, .to() makes new Parameters): _apply re-indexes after each.
        self._trainable_index = {n: p for n, p in self.named_parameters() if p.requires_grad}
        # The fast forward (common/fast.py): set by fast.prepare_model, None for the plain one.
        self.fast = None

    # ------------------------------------------------------------------ state
    def _reindex(self) -> None:
        """Point the index at the module's current parameters (same names)."""
        names = self._trainable_index
        self._trainable_index = {n: p for n, p in self.named_parameters() if n in names}

    def _apply(self, fn, recurse: bool = True):  # every .to()/.cuda()/.half() of the model goes through here
        out = super()._apply(fn, recurse)
        self._reindex()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train, in `parameters()` order (from the index, not a walk of the base)."""
        return [p for p in self._trainable_index.values() if p.requires_grad]

    def adapter_names(self) -> list[str]:
        """Names of the tensors that make up the adapter state (what trains, what travels)."""
        return list(self._trainable_index)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only, detached, on the CPU, in their own dtype."""
        return {n: p.detach().cpu().clone() for n, p in self._trainable_index.items()}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy `state` into the adapter tensors; with strict, names/shapes must match exactly."""
        params = self._trainable_index
        expected = set(self._trainable_index)
        given = set(state)
        problems = []
        if strict:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            if missing:
                problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
            if unexpected:
                problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        for name in sorted(given & expected):
            if tuple(state[name].shape) != tuple(params[name].shape):
                problems.append(f"{name}: shape {tuple(state[name].shape)} != model {tuple(params[name].shape)}")
        if not strict and not (given & expected):
            problems.append("no tensor name in common with the model")
        if problems:
            raise AdapterStateError(
                f"adapter state does not fit a '{self.spec.variant}' model on base '{self.base_id}': "
                + "; ".join(problems)
            )
        with torch.no_grad():
            for name in given & expected:
                params[name].copy_(state[name].to(params[name].dtype))

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total}

    def train(self, mode: bool = True) -> "AdaptedCLIPSeg":
        # Frozen parts stay in eval mode whatever the caller does: the base is
        # shared and has no business changing behaviour during adapter training.
        if self.spec.variant in MUTATING:
            return super().train(mode)
        # Not super().train(): walking the whole base twice (train, then eval)
        # cost ~4 ms per call on the tiny base, several times per message.
        self.training = mode
        self.adapters.train(mode)
        if self.clipseg.training:
            self.clipseg.eval()
        return self

    def to_device(self, device: torch.device) -> "AdaptedCLIPSeg":
        """``self.to(device)``, walking only the adapters when the (shared) base is already there."""
        probe = next(self.clipseg.parameters(), None)
        if probe is not None and probe.device == device and self.spec.variant not in MUTATING:
            # Adapters hold parameters only (no buffers): skip even their walk when all are there.
            if any(p.device != device for p in self._trainable_index.values()):
                self.adapters.to(device)
                self._reindex()
            return self
        return self.to(device)

    # ---------------------------------------------------------------- forward
    def _layer(self, layer: nn.Module, tower: str, index: int, h: torch.Tensor, mask, **kw) -> torch.Tensor:
        adapters = self.adapters.layer_adapters(tower, index)
        fast = self.fast
        if adapters is None and fast is None:
            return layer(h, mask, **kw)
        attn_adapter, mlp_adapter = adapters if adapters is not None else (None, None)
        x = layer.layer_norm1(h)
        if fast is not None:
            # One cast of the layer-norm output (fp32 under autocast) for q, k and v,
            # instead of autocast casting it three times, and q, k, v in one matmul.
            a = fast.attention(layer.self_attn, fast.cast(x), mask, bool(kw.get("is_causal", False)))
        else:
            a, _ = layer.self_attn(hidden_states=x, attention_mask=mask, **kw)
        h = h + (attn_adapter(a) if attn_adapter is not None else a)
        m = layer.mlp(layer.layer_norm2(h))
        return h + (mlp_adapter(m) if mlp_adapter is not None else m)

    def vision_trunk(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The extracted vision activations before any shallow adapter (dense adapters act inside)."""
        vm = self.clipseg.clip.vision_model
        if self.fast is not None:
            emb = self.fast.vision_embeddings(vm.embeddings, pixel_values)
        else:
            emb = vm.embeddings(pixel_values, interpolate_pos_encoding=True)
        h = vm.pre_layrnorm(emb)
        acts = []
        for i, layer in enumerate(vm.encoder.layers[: max(self.extract_layers) + 1]):
            h = self._layer(layer, "vision", i, h, None)
            if i in self.extract_layers:
                acts.append(h)
        return acts

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Vision activations the decoder reads (after vision adapters)."""
        return self.adapters.adapt_activations(self.vision_trunk(pixel_values))

    def text_trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(projected text feature, text taps) before the conditional and shallow text adapters."""
        tm = self.clipseg.clip.text_model
        h = tm.embeddings(input_ids=input_ids)
        # Under the causal mask, right padding can never reach the end-of-text
        # token (the only position anyone reads), so the padding mask is dropped
        # and attention keeps its fast fused causal kernel; a mask is kept only
        # if some pad comes before a real token (left padding). The check reads
        # the mask where it lies: callers pass it on the CPU (as the training
        # loop does) so that no GPU sync stalls a host-bound step. The fast
        # path (common/fast.py) decides this in its collate and passes None.
        if attention_mask is not None:
            if not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                attention_mask = None
            else:
                attention_mask = attention_mask.to(h.device)
        # positional: the 4th parameter was renamed (past_key_values -> cache) within transformers 5.x
        mask = create_causal_mask(tm.config, h, attention_mask, None)
        eot = self._eot_positions(input_ids, tm.config.eos_token_id).to(h.device)
        rows = torch.arange(h.shape[0], device=h.device)
        taps = []
        for i, layer in enumerate(tm.encoder.layers):
            h = self._layer(layer, "text", i, h, mask, is_causal=True)
            if self.adapters.needs_text_taps and i in self.extract_layers:
                taps.append(h[rows, eot])
        pooled = tm.final_layer_norm(h)[rows, eot]
        return self.clipseg.clip.text_projection(pooled), taps

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The conditional embedding (after text and conditional adapters)."""
        cond, taps = self.text_trunk(input_ids, attention_mask)
        return self.adapters.adapt_condition(cond, taps)

    def head(self, activations: list[torch.Tensor], cond: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the trunks' outputs: shallow adapters, then the decoder (shape (B, 1, H, W)).

        For shallow variants the trunks are frozen and adapter-free, so their
        outputs can be cached (common/activation_cache.py) and only this runs.
        """
        acts = self.adapters.adapt_activations(activations)
        cond = self.adapters.adapt_condition(cond, taps)
        return self.clipseg.decoder(acts, cond).logits.unsqueeze(1)

    @staticmethod
    def _eot_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        # Same rule as CLIPSegTextModel: legacy configs (eos id 2) pool at the
        # highest token id (CLIP's end-of-text is the last vocabulary entry).
        ids = input_ids.to(torch.int)
        if eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == eos_token_id).int().argmax(dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of shape (B, 1, H, W) at the model's input resolution.

        `attention_mask` may stay on the CPU (cheaper: see `encode_text`).
        """
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch mismatch: {pixel_values.shape[0]} images but {input_ids.shape[0]} prompts"
            )
        activations = self.vision_trunk(pixel_values)
        cond, taps = self.text_trunk(input_ids, attention_mask)
        return self.head(activations, cond, taps)


def build_model(base: Base, spec: AdapterSpec | str) -> AdaptedCLIPSeg:
    """A model with `spec`'s adapters (fresh, per its init) on top of `base`."""
    if isinstance(spec, str):
        spec = AdapterSpec(variant=spec)
    return AdaptedCLIPSeg(base, spec)


def check_fingerprint(model: AdaptedCLIPSeg, fingerprint: str, base_id: str, source: str) -> None:
    # An adapter saved before 2026-12-07 carries the 16-digit sampled fingerprint: checked as it was made.
    mine = model.legacy_base_fingerprint if len(str(fingerprint)) == 16 else model.base_fingerprint
    if fingerprint != mine:
        raise AdapterStateError(
            f"{source}: adapter was trained on base '{base_id}' (fingerprint {fingerprint}), "
            f"but this model's base is '{model.base_id}' (fingerprint {model.base_fingerprint})"
        )
