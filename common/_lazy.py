"""Lazy package exports (PEP 562): ``from common import load_base`` without paying for torch up front.

Why: ``fedvlsm --help`` and a Flower SuperNode's start-up import ``common``;
importing torch, transformers and MONAI eagerly costs 7-9 s before anything
runs. A package calls ``lazy_exports(__name__, {...})`` instead of importing
its public names; each name is imported from its module on first access.

One subtlety: ``common.evaluate`` is both a public function and a submodule.
When Python first imports a submodule it sets it as an attribute of the
package, which would make ``from common import evaluate`` return the module
instead of the function. The package's module class therefore refuses to
let a submodule shadow an exported name of the same name.
"""

from __future__ import annotations

import importlib
import sys
import types


class _LazyPackage(types.ModuleType):
    _lazy_exports: dict[str, str]

    def __getattr__(self, name: str):
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        self.__dict__[name] = value  # cached: later lookups are plain attribute reads
        return value

    def __setattr__(self, name: str, value) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if name in exports and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return  # a submodule being registered over an exported function of the same name: keep the function
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_lazy_exports", {})))


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` resolve each name in ``exports`` (name -> module) on first access."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_exports"] = dict(exports)
