"""The design card's layering: `common/` is plain PyTorch and knows nothing of Flower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_module_of_common_imports_flower():
    # Every module under common/, imported in a fresh interpreter; none may pull in flwr.
    code = ("import importlib, pkgutil, sys, common\n"
            "names = [m.name for m in pkgutil.walk_packages(common.__path__, 'common.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(len(names), 'flwr' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    count, flower = out.stdout.split()
    assert int(count) > 20 and flower == "False", out.stdout
