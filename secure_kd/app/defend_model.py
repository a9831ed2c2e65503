"""`secure-kd defend forget` (or `unlearn`) `--model DIR --clean FILE --forget FILE --out DIR`: a defense
applied to the user's own model directory (`defenses.lm_forget`), not a planted toy world.

The options become the technique's config (`ModelForgetConfig`, extra="forbid"), after `--config` YAML
and `--set` overrides; a bad path or field is a one-line error naming it. Prints the before/after
table and the path of the defended model and of results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_DEFENSES = {
    "forget": "forget records of your model: suppress their tokens by self-distillation (--model DIR)",
    "unlearn": "backdoor unlearning of your model: pull triggered records to their clean anchors (--trigger)",
}


def run_model_defense(
    name: str,
    config: Path | None,
    overrides: list[str],
    values: dict[str, Any],
    *,
    echo,
    log,
) -> None:
    from defenses.lm_forget import ModelForgetConfig, run_model_forget
    from secure_kd.config import load_config

    given = {k: str(v) for k, v in values.items() if v is not None}
    job = load_config(config, overrides, ModelForgetConfig, values=given)
    result = run_model_forget(job, name, log=log)
    rows = [
        ("forget loss (nats/token)", "forget_loss"),
        ("forget top-1 rate", "forget_top1"),
        ("forget greedy reproduction", "forget_greedy"),
    ]
    if result.before.forget_exposure is not None:
        rows.append((f"secret exposure (bits, max {result.max_exposure:.2f})", "forget_exposure"))
    rows.append(("clean perplexity", "clean_perplexity"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  {'before':>10}  {'after':>10}"]
    for label, field in rows:
        lines.append(
            f"{label:{width}}  {getattr(result.before, field):>10.4g}  {getattr(result.after, field):>10.4g}"
        )
    echo("\n".join(lines))
    where = Path(job.out) / "results.json"
    log(f"defend {name} ({result.method}): model: {result.defended_model}  results: {where}")
