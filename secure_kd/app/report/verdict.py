"""From attack results (plain JSON dicts) to risk levels with confidence intervals.

No models and no attack imports: each attack's registration says how its Result becomes readings
(`secure_kd.plugins.Plugin.measure` and `.metrics`, built from the interval helpers of
`secure_kd.readings`), so this module only combines them and grades them against thresholds. Taking
the best of several attacks of one kind (membership) is optimistic for the attacker, which is the side
an audit should err on.

With several seeds the value is the mean over seeds and the interval a bootstrap over seeds (with
2-3 seeds that interval is coarse; the report says how many seeds it rests on).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from secure_kd.app.report.config import LEVELS, Level, Threshold
from secure_kd.metrics import bootstrap_ci
from secure_kd.plugins import Plugin
from secure_kd.readings import Reading


class Measurement(BaseModel):
    entry: str
    attack: str
    metric: str
    risk: str
    value: float
    ci_low: float | None
    ci_high: float | None
    ci_method: str
    n_seeds: int
    level: Level
    note: str | None = None


class RiskVerdict(BaseModel):
    risk: str
    level: Level
    measurements: list[Measurement]


def level_of(value: float, threshold: Threshold) -> Level:
    """`high` at or beyond `high`, `medium` at or beyond `medium`, else `low` (flipped if lower is worse)."""
    if threshold.higher_is_worse:
        return "high" if value >= threshold.high else "medium" if value >= threshold.medium else "low"
    return "high" if value <= threshold.high else "medium" if value <= threshold.medium else "low"


def level_at_least(level: Level, bound: Level) -> bool:
    return LEVELS.index(level) >= LEVELS.index(bound)


def dotted(data: Any, path: str) -> Any:
    node = data
    for key in path.split("."):
        if isinstance(node, list) and key.lstrip("-").isdigit():
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise KeyError(f"{path!r}: no {key!r} in the result")
    return node


def run_values(
    plugin: Plugin, result: dict, extra: dict[str, str], *, samples: int = 1000, confidence: float = 0.95
) -> dict[str, Reading]:
    """The verdict metrics of one run: the plugin's own readings (its `measure`, or each declared metric's
    `path` in the result), `ece` if reported, and the entry's `extra` {metric: dotted path}."""
    if plugin.measure is not None:
        values = plugin.measure(result, samples, confidence)
    else:
        values = {m.name: _number(result, m.name, m.path) for m in plugin.metrics if m.path is not None}
    if isinstance(result.get("ece"), int | float):
        values["ece"] = Reading(value=float(result["ece"]))
    for metric, path in extra.items():
        values[metric] = _number(result, metric, path)
    return values


def _number(result: dict, metric: str, path: str) -> Reading:
    found = dotted(result, path)
    if not isinstance(found, int | float) or isinstance(found, bool):
        raise ValueError(f"metric {metric!r}: {path!r} is {found!r}, not a number")
    return Reading(value=float(found))


def combine_seeds(values: list[Reading], *, samples: int, confidence: float) -> Reading:
    """One seed: its own interval. Several: their mean, with a bootstrap interval over seeds."""
    if len(values) == 1:
        return values[0]
    array = np.asarray([v.value for v in values])
    low, high = bootstrap_ci(array, np.mean, n=samples, alpha=1 - confidence, seed=0)
    note = next((v.note for v in values if v.note), None)
    return Reading(
        value=float(array.mean()),
        ci_low=low,
        ci_high=high,
        ci_method=f"bootstrap over {len(array)} seeds",
        note=note,
    )


def risk_verdicts(measurements: list[Measurement]) -> list[RiskVerdict]:
    """One verdict per risk: the highest level among its measurements."""
    by_risk: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_risk.setdefault(m.risk, []).append(m)
    return [
        RiskVerdict(risk=risk, level=max((m.level for m in ms), key=LEVELS.index), measurements=ms)
        for risk, ms in by_risk.items()
    ]


def canary_headline(result: dict[str, Any]) -> str:
    """A memorization result's headline from its per-canary figures (never from the maximum alone):
    how many secrets rank first, every rank, and how many greedy decoding gives away."""
    ranked = [c for c in result.get("exposure") or [] if c.get("rank") is not None]
    targeted = (result.get("extraction") or {}).get("canary_extraction") or []
    parts = []
    if ranked:
        first = sum(c["rank"] == 1 for c in ranked)
        sizes = {c["n_candidates"] for c in ranked}
        if len(sizes) == 1:
            ranks = f"ranks {', '.join(str(c['rank']) for c in ranked)} of {sizes.pop():,} candidates each"
        else:
            ranks = "ranks " + ", ".join(f"{c['rank']} of {c['n_candidates']:,}" for c in ranked)
        parts.append(f"{first} of {len(ranked)} secrets rank first among their candidates ({ranks})")
    if targeted:
        hits = sum(bool(c["greedy_extracted"]) for c in targeted)
        parts.append(f"greedy decoding from the text before the secret gives {hits} of {len(targeted)} away")
    return "; ".join(parts) + "." if parts else ""
