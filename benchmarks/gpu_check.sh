#!/usr/bin/env bash
# The GPU check of secure-kd: on a machine with a CUDA device and no network, from the working tree
# alone, in under 10 minutes, writing JSON.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else runs/gpu-check)
#
# Stages, each with its own time limit inside an overall budget (GPU_CHECK_BUDGET_S, default 540 s;
# a stage that no longer fits is skipped and says so):
#   1. preflight   python, torch, CUDA device, the Python packages secure-kd needs   preflight.json
#   2. gpu tests   tests/engine/test_gpu.py on the GPU (loss curve vs CPU, bf16, losses, cache, DP modes)
#   3. slow tests  pytest -m slow (real SmolLM2 runs): only where the SmolLM2 asset is already on disk
#                  ($SECURE_KD_HOME/assets/...): nothing is fetched here
#   4. benchmarks  kd_loss, dp_step, distill_step (fp32 and bf16; secure-kd vs TRL's GKDTrainer),
#                  each --device cuda, peak memory from torch.cuda.max_memory_allocated
#   5. audit_10k   the reference audit of 10,000 + 10,000 records on SmolLM2 (where the asset is on
#                  disk)                                                              reference_mia_n10000.json
# and gpu_check.json: every stage's exit code, seconds and (tests) pass/fail/skip counts, with the
# headline ratios of each benchmark. Exit code: 0 when every stage that ran passed, 1 otherwise,
# 3 when the preflight found no CUDA device or a missing package (nothing else runs then).
#
# GPU_CHECK_DEVICE=cpu is a dry run of this script itself on a machine without a GPU: the same stages
# on the CPU, the benchmarks at their --quick sizes (its figures say nothing about a GPU).
#
# Python: $PYTHON, else .venv/bin/python when it imports torch, else python3. The .venv (2+ GB) does
# not fit a 64 MiB transfer to a lent machine: there, python3's own torch is used and the packages it
# lacks travel as wheels in .whl/ (installed with --no-index into a temporary directory; see
# docs/distributed.md, "The GPU check"). Nothing is downloaded: pip runs with --no-index, the
# Hugging Face libraries run offline.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TRL_EXPERIMENTAL_SILENCE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  PY=.venv/bin/python
else
  PY=python3
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/secure-kd-gpu-check-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >"$OUT_DIR/wheels.log" 2>&1 || echo "gpu_check: installing .whl/ failed, see $OUT_DIR/wheels.log" >&2
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=()
if [ "$DEVICE" = cpu ]; then
  QUICK=(--quick)
  export SECURE_KD_GPU_TEST_DEVICE=cpu
fi

STAGES="$OUT_DIR/stages.jsonl"
: >"$STAGES"
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME LIMIT_S COMMAND...: run it under `timeout`, its output in OUT_DIR/NAME.log, a line in stages.jsonl
stage() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 30 ]; then
    echo "{\"stage\": \"$name\", \"skipped\": \"the check's budget of ${BUDGET} s is spent\"}" >>"$STAGES"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (at most ${limit} s) ..." >&2
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit}" >>"$STAGES"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    echo "gpu_check: $name failed (exit $rc; 124 = out of time); see $OUT_DIR/$name.log" >&2
  fi
  return 0
}

# 1. preflight
"$PY" - "$OUT_DIR/preflight.json" "$DEVICE" <<'EOF'
import importlib, json, platform, sys
needed = ["torch", "transformers", "pydantic", "opacus", "safetensors", "datasets", "trl", "rich", "typer", "yaml", "faker", "secure_kd"]
report = {"python": sys.executable, "python_version": platform.python_version(), "missing": []}
for name in needed:
    try:
        module = importlib.import_module(name)
        report.setdefault("versions", {})[name] = getattr(module, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - a report, not a handler
        report["missing"].append(f"{name}: {type(exc).__name__}: {exc}"[:300])
try:
    import torch
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                   "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                   "bf16_supported": torch.cuda.is_bf16_supported()}
except Exception as exc:  # noqa: BLE001
    report["cuda_available"] = False
    report["torch_error"] = str(exc)[:300]
try:
    from secure_kd.assets import asset_dir
    report["smollm2_asset"] = (asset_dir() / "asset.json").is_file()
except Exception:  # noqa: BLE001
    report["smollm2_asset"] = False
json.dump(report, open(sys.argv[1], "w"), indent=2)
print(json.dumps(report))
report["device"] = sys.argv[2]
json.dump(report, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if (report["cuda_available"] or sys.argv[2] == "cpu") and not report["missing"] else 3)
EOF
PREFLIGHT=$?
if [ "$PREFLIGHT" -ne 0 ]; then
  echo "gpu_check: preflight failed (no CUDA device or a missing package); see $OUT_DIR/preflight.json" >&2
  "$PY" -c "import json,sys; json.dump({'preflight': json.load(open(sys.argv[1])), 'passed': False}, open(sys.argv[2], 'w'), indent=2)" \
    "$OUT_DIR/preflight.json" "$OUT_DIR/gpu_check.json" 2>/dev/null
  exit 3
fi

# whether the preflight found the SmolLM2 asset on disk (the slow tests and the 10,000-record audit need it)
has_asset() { "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['smollm2_asset'] else 1)" "$OUT_DIR/preflight.json"; }

# 2. the GPU tests; 3. the slow tests, where the real model is already on disk
stage gpu_tests 150 "$PY" -m pytest tests/engine/test_gpu.py -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
if [ "$DEVICE" = cpu ]; then
  echo '{"stage": "slow_tests", "skipped": "dry run on the CPU (GPU_CHECK_DEVICE=cpu)"}' >>"$STAGES"
elif has_asset; then
  stage slow_tests 180 "$PY" -m pytest -m slow -q -p no:cacheprovider -x --junitxml="$OUT_DIR/slow_tests.xml"
else
  echo '{"stage": "slow_tests", "skipped": "the SmolLM2 asset is not on this machine (secure-kd assets fetch-smollm2 needs the network; carry $SECURE_KD_HOME/assets or set SECURE_KD_HOME to a copy)"}' >>"$STAGES"
fi

# 4. the benchmarks on the GPU
stage kd_loss 90 "$PY" benchmarks/kd_loss.py --device "$DEVICE" "${QUICK[@]}" --repeats 3 --out "$OUT_DIR/kd_loss.json"
stage dp_step 120 "$PY" benchmarks/dp_step.py --device "$DEVICE" "${QUICK[@]}" --rounds 2 --steps 3 \
  --out "$OUT_DIR/dp_step.json"
stage distill_step 100 "$PY" benchmarks/distill_step.py --device "$DEVICE" "${QUICK[@]}" --rounds 3 --steps 3 \
  --out "$OUT_DIR/distill_step.json"
stage distill_step_bf16 75 "$PY" benchmarks/distill_step.py --device "$DEVICE" "${QUICK[@]}" --precision bf16 \
  --rounds 2 --steps 3 --variants ce trl_gkd ours_live_top64 ours_cache ours_cache_fused \
  --out "$OUT_DIR/distill_step_bf16.json"

# 5. the reference audit at the issue's GPU size, 10,000 members + 10,000 non-members on SmolLM2 (two
# fine-tuned targets, one epoch on the top 2 layers; each audit's seconds are in its JSON): last, so the
# benchmarks run first when the budget is short
if [ "$DEVICE" = cpu ]; then
  echo '{"stage": "audit_10k", "skipped": "dry run on the CPU (GPU_CHECK_DEVICE=cpu)"}' >>"$STAGES"
elif has_asset; then
  stage audit_10k 240 "$PY" benchmarks/experiments/reference_mia_smollm2.py --n 10000 --epochs 1 --train-layers 2 \
    --device "$DEVICE" --work "${TMPDIR:-/tmp}/secure-kd-audit-10k" --out "$OUT_DIR/reference_mia_n10000.json"
else
  echo '{"stage": "audit_10k", "skipped": "the SmolLM2 asset is not on this machine"}' >>"$STAGES"
fi

# the summary
"$PY" - "$OUT_DIR" "$FAILED" "$(($(date +%s) - START))" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
out, failed, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
def tests(name):
    path = out / f"{name}.xml"
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = lambda key: int(suite.get(key, 0))
    return {"tests": get("tests"), "failures": get("failures"), "errors": get("errors"), "skipped": get("skipped")}
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
summary = {
    "passed": not failed,
    "seconds": seconds,
    "preflight": load("preflight"),
    "stages": [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()],
    "gpu_tests": tests("gpu_tests"),
    "slow_tests": tests("slow_tests"),
}
kd, dp, ds, ds16 = load("kd_loss"), load("dp_step"), load("distill_step"), load("distill_step_bf16")
if kd:
    summary["kd_loss"] = {k: kd.get(k) for k in ("peak_mib", "memory_ratio_vs_naive", "fused_memory_ratio_vs_naive_linear",
                                                 "time_ratio_vs_naive", "time_ratio_jsd_vs_trl", "memory_method")}
if dp:
    summary["dp_step"] = {"time_ratio_vs_non_dp": dp.get("time_ratio_vs_non_dp", {}).get("wall_median_s"),
                          "memory_ratio_vs_non_dp": dp.get("memory_ratio_vs_non_dp")}
for name, run in (("distill_step", ds), ("distill_step_bf16", ds16)):
    if run:
        summary[name] = {"ratios": run.get("ratios"),
                         "tokens_per_s": {k: v.get("tokens_per_s") for k, v in run.get("variants", {}).items()},
                         "cuda_max_memory_allocated": {k: v.get("cuda_max_memory_allocated") for k, v in run.get("variants", {}).items()}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
print(json.dumps({"passed": summary["passed"], "seconds": seconds, "gpu_tests": summary["gpu_tests"],
                  "slow_tests": summary["slow_tests"], "out": str(out / "gpu_check.json")}))
EOF
exit "$FAILED"
