"""Start-up cost of one Flower ClientApp process: what `import federation.client.app` costs.

Flower 1.41 deployed (`flower-supernode` with process isolation) starts a fresh `flwr-clientapp`
process for every message, so this import is paid on every message of every round. Three variants,
each imported in a fresh `python -c` process, interleaved, --repeats times:

* `floor`: `torch`, `transformers` and Flower's app modules, which any ClientApp that trains a
  Hugging Face model imports;
* `client_app`: `federation.client.app` as shipped (scikit-learn, Opacus, `datasets` and
  scipy.stats are imported only by the code paths that use them: filtering, DP, reading a data file,
  the exposure estimate);
* `eager`: `federation.client.app` plus those four modules, i.e. what the import cost when they were
  imported at module load.

Reports the median and minimum wall seconds of each and the ratios to the floor. Run:
`python benchmarks/clientapp_startup.py` (about 2 minutes); writes benchmarks/results/clientapp_startup.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _measure import ratio, write_results

ROOT = Path(__file__).resolve().parents[1]
LAZY = ("sklearn.cluster", "opacus.accountants", "datasets", "scipy.stats")
VARIANTS = {
    "floor": "import torch, transformers, flwr.app, flwr.clientapp",
    "client_app": "import federation.client.app",
    "eager": "import federation.client.app; " + "; ".join(f"import {m}" for m in LAZY),
}


def seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for code in VARIANTS.values():  # warm the page cache once
        seconds(code)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            times[name].append(seconds(code))
    summary = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": t} for name, t in times.items()
    }
    floor = summary["floor"]["median_s"]
    results = {
        "benchmark": "clientapp_startup",
        "variants": summary,
        "client_app_vs_floor": ratio(summary["client_app"]["median_s"], floor),
        "eager_vs_floor": ratio(summary["eager"]["median_s"], floor),
        "saved_per_process_s": summary["eager"]["median_s"] - summary["client_app"]["median_s"],
        "lazy_modules": list(LAZY),
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    write_results("clientapp_startup", results)
    print(json.dumps({k: v for k, v in results.items() if k != "variants"}))


if __name__ == "__main__":
    main()
