"""The results tables (docs/results.md) against the JSON behind them: every command names the flags that
produced its figures, `make reproduce` runs exactly the commands of the "Reproduced findings" table, and a
result whose interval includes no effect is marked as not evidence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "docs" / "results.md").read_text()  # the results tables (the README links there)
RESULTS = ROOT / "benchmarks" / "results"


def findings_rows() -> list[str]:
    lines = README[README.index("| finding (paper) |") :].splitlines()[2:]
    return lines[: next(i for i, line in enumerate(lines) if not line.startswith("|"))]


def row(prefix: str) -> str:
    return next(line for line in findings_rows() if line.startswith(f"| {prefix}"))


def test_make_reproduce_runs_every_command_of_the_findings_table():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    target = makefile[makefile.index("reproduce:") :].split("\n\n")[0]
    runs = {" ".join(line.split()[1:]) for line in target.splitlines()[1:] if "$(BIN)/python" in line}
    commands = set()
    for line in findings_rows():
        cell = line.split(" | ")[2]
        commands |= {c.removeprefix("python ") for c in re.findall(r"`(python [^`]+)`", cell)}
        if "the same with `--config" in cell:  # "...; the same with `--config X`" re-runs the row's script
            script = re.search(r"`python ([^` ]+)", cell).group(1)
            commands.add(f"{script} {re.search(r'the same with `([^`]+)`', cell).group(1)}")
    assert commands and commands <= runs, sorted(commands - runs)


def test_dp_opd_row_names_the_flags_of_its_json():
    data = json.loads((RESULTS / "dp_opd_tiny_lr5e-4.json").read_text())
    config = data["config"]
    assert (config["teacher"], config["train"]["lr"]) == ("tiny", 5e-4)
    line = row("DP-OPD beats DP-SFT")
    assert (
        "--teacher tiny --lr 5e-4" in line and "--results benchmarks/results/dp_opd_tiny_lr5e-4.json" in line
    )
    dp_sft, dp_opd = (
        next(r for r in data["rows"] if r["arm"] == arm and r["epsilon"] == 2.0)
        for arm in ("dp_sft", "dp_opd")
    )
    assert f"DP-OPD {dp_opd['heldout_perplexity']:.2f} vs DP-SFT {dp_sft['heldout_perplexity']:.2f}" in line
    assert "one seed" in line


def test_bias_cascade_row_names_the_second_seed_config():
    seed1 = json.loads((RESULTS / "bias_cascade_seed1.json").read_text())
    assert seed1["config"].endswith("bias_cascade_seed1.yaml")
    assert "`--config configs/experiments/bias_cascade_seed1.yaml`" in row("bias is amplified")


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def _difference_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2 (method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = _wilson(k1, n1), _wilson(k2, n2)
    return p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(u1 - p1, p2 - l2)


def test_memorization_claims_whose_interval_includes_no_effect_are_marked_not_evidence():
    data = json.loads((RESULTS / "memorization_kd.json").read_text())
    line = row("KD memorizes less than fine-tuning")
    for regime in data["regimes"]:
        models = regime["models"]
        ce, soft = (len(models[m]["memorized_members"]) for m in ("baseline", "soft_kd"))
        n = models["baseline"]["eligible_members"]
        low, high = _difference_interval(ce, n, soft, n)
        epochs = int(regime["finetune_epochs"])
        if low <= 0 <= high:  # 8 epochs: 2 vs 0 of 150
            assert f"At {epochs} epochs {soft} vs {ce} of {n}" in line and "not evidence" in line
            assert f"{low * 100:.0f} to +{high * 100:.0f} points" in line
        else:  # 20 epochs: 45 vs 15 of 150
            assert f"{epochs} epochs: soft-KD student {soft} " in line
            assert f"CI {low * 100:.0f} to {high * 100:.0f} points" in line
    section = README[README.index("**Memorization in KD**") :]
    assert "8 epochs are not\nevidence either way" in section[: section.index("**Logit-leak cloning**")]
