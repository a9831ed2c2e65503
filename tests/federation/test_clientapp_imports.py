"""Flower 1.41 starts a fresh ClientApp process per message, so `federation.client.app` must not import
heavy libraries that only some code paths use (benchmarks/clientapp_startup.py measures the cost)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAZY = ("sklearn", "opacus", "datasets", "scipy.stats")


def test_client_app_import_leaves_the_optional_heavy_libraries_unloaded():
    code = (
        "import json, sys; import federation.client.app; "
        f"print(json.dumps([m for m in {list(LAZY)!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
