"""Switching a module's forward by swapping its class for a subclass with a mixin in front.

The fast path changes how some stock transformers modules compute (the
decoder's attention, the MLPs) while keeping them where they are: the
module object, its parameters, their names and the callers stay; only
``__class__`` changes, to ``type("Mixin" + Cls, (Mixin, Cls), {})`` (made
once per pair), and back. The mixin's forward may call ``super().forward``
for the stock behaviour.
"""

from __future__ import annotations

from torch import nn

_MIXED: dict[tuple[type, type], type] = {}


def swap_in(module: nn.Module, mixin: type) -> bool:
    """Give `module` the mixin's forward; False if it already has it."""
    cls = type(module)
    if isinstance(module, mixin):
        return False
    key = (mixin, cls)
    if key not in _MIXED:
        _MIXED[key] = type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _MIXED[key]
    return True


def swap_out(module: nn.Module, mixin: type) -> bool:
    """Give `module` back its own class; False if it did not have the mixin."""
    cls = type(module)
    if not isinstance(module, mixin) or cls.__bases__[0] is not mixin:
        return False
    module.__class__ = cls.__bases__[1]
    return True


def swap_all(root: nn.Module, mixin: type, on: bool, eligible=lambda m: True) -> int:
    """Swap every module of `root` that is `eligible` to the mixin (on), or every swapped one back
    (off); how many changed. Remembers on `root` whether any is swapped, so that switching off a
    root with none (every plain fit and evaluate does) skips the walk of its modules."""
    flag = f"_fedvlsm_swapped_{mixin.__name__}"
    if not on and not root.__dict__.get(flag, True):
        return 0
    if on:
        n = sum(swap_in(m, mixin) for m in list(root.modules()) if not isinstance(m, mixin) and eligible(m))
    else:
        n = sum(swap_out(m, mixin) for m in list(root.modules()))
    root.__dict__[flag] = on and (n > 0 or any(isinstance(m, mixin) for m in root.modules()))
    return n
