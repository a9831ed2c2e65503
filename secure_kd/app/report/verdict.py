"""From attack results (plain JSON dicts) to risk levels with confidence intervals.

Pure functions over `results.json` contents: no models, no attack imports, so a report can be
re-rendered anywhere. Each attack kind has an extractor that returns its headline numbers and an
interval for each:

- memorization: the largest canary exposure (bits; the Secret Sharer estimate where the space was
  not enumerated); interval: percentile bootstrap of that maximum over the canaries.
- membership: the best AUC and the best TPR at 1% FPR over the attacks run (taking the best of
  several attacks is optimistic for the attacker, which is the side an audit should err on);
  interval: bootstrap over examples, rebuilt exactly from the stored ROC and the member counts.
- clone: the best variant's top-1 agreement; logit_leak: the spectral gap in decades; backdoor:
  ASR; adversarial: success rate at the smallest radius; bias_cascade: the worst student's rate of
  the injected behaviour in the target topic; federated: the rise of the global test loss caused by
  the malicious organization (one run each, no interval), the backdoor ASR when there is one, and the
  share of a client's tokens the server reads from one update (0 when the update is hidden).
  Proportions get a Wilson interval, which treats the positions or inputs as independent trials (an
  approximation for token positions).

With several seeds the value is the mean over seeds and the interval a bootstrap over seeds (with
2-3 seeds that interval is coarse; the report says how many seeds it rests on).
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any

import numpy as np
from pydantic import BaseModel

from secure_kd.app.report.config import LEVELS, Level, Threshold
from secure_kd.metrics import bootstrap_ci, roc_metrics


class RunValue(BaseModel):
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str = "none"
    note: str | None = None


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


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise ValueError(f"n must be positive for a proportion's interval, got {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _proportion(value: float, n: int, confidence: float) -> RunValue:
    if n <= 0:
        return RunValue(value=value)
    low, high = wilson_interval(round(value * n), n, confidence)
    return RunValue(value=value, ci_low=low, ci_high=high, ci_method=f"Wilson, n={n}")


def scores_from_roc(fpr: list[float], tpr: list[float], n_members: int, n_nonmembers: int) -> np.ndarray:
    """(score, is_member) rows with exactly the ranking behind an empirical ROC curve.

    Every step of the curve is one group of tied scores; its members and non-members get the same
    score, earlier steps higher ones. Any statistic of the ranking (AUC, TPR at FPR) is unchanged.
    """
    tp = np.rint(np.asarray(tpr) * n_members).astype(int)
    fp = np.rint(np.asarray(fpr) * n_nonmembers).astype(int)
    rows: list[tuple[float, int]] = []
    for step in range(1, len(tp)):
        score = float(len(tp) - step)
        rows += [(score, 1)] * int(tp[step] - tp[step - 1]) + [(score, 0)] * int(fp[step] - fp[step - 1])
    return np.asarray(rows, dtype=float)


def _roc_stat(key: str):
    def stat(rows: np.ndarray) -> float:
        labels = rows[:, 1]
        if labels.min() == labels.max():  # a resample with one class only: no ROC
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = roc_metrics(rows[:, 0], labels.astype(int), fpr_levels=(0.01,))
        return metrics["auc"] if key == "auc" else metrics["tpr_at_fpr"][0.01]

    return stat


def _bootstrap(rows: np.ndarray, stat, value: float, samples: int, confidence: float, what: str) -> RunValue:
    def finite(data: np.ndarray) -> float:
        result = stat(data)
        return value if math.isnan(result) else result

    low, high = bootstrap_ci(rows, finite, n=samples, alpha=1 - confidence, seed=0)
    return RunValue(value=value, ci_low=low, ci_high=high, ci_method=f"bootstrap over {what}")


def _membership(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    rocs = result.get("attacks") or []
    if not rocs:
        return {}
    out: dict[str, RunValue] = {}
    for metric, key in (("mia_auc", "auc"), ("mia_tpr_at_1pct_fpr", "tpr")):
        stat = _roc_stat(key)

        def headline(roc: dict, key: str = key, stat=stat) -> float:
            if key == "auc":
                return float(roc["auc"])
            tprs = {float(k): v for k, v in roc["tpr_at_fpr"].items()}
            return float(tprs[0.01]) if 0.01 in tprs else stat(_rows(roc))

        best = max(rocs, key=headline)
        rows = _rows(best)
        n = int(best["n_members"]) + int(best["n_nonmembers"])
        out[metric] = _bootstrap(
            rows, stat, headline(best), samples, confidence, f"{n} examples ({best['attack']})"
        )
        if metric == "mia_tpr_at_1pct_fpr" and int(best["n_nonmembers"]) < 100:
            few = int(best["n_nonmembers"])
            out[metric].note = f"only {few} non-members: TPR at 1% FPR is read at FPR 0 (needs >= 100)"
    return out


def _rows(roc: dict) -> np.ndarray:
    return scores_from_roc(roc["roc_fpr"], roc["roc_tpr"], int(roc["n_members"]), int(roc["n_nonmembers"]))


def _memorization(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    values = []
    for canary in result.get("exposure") or []:
        if canary.get("exposure") is not None:
            values.append(float(canary["exposure"]))
        elif canary.get("estimate"):
            values.append(float(canary["estimate"]["value"]))
    if not values:
        return {}
    array = np.asarray(values)
    if len(array) == 1:
        return {"max_exposure_bits": RunValue(value=float(array[0]))}
    return {
        "max_exposure_bits": _bootstrap(
            array, np.max, float(array.max()), samples, confidence, f"{len(array)} canaries"
        )
    }


def _clone(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    variants = result.get("variants") or []
    if not variants:
        return {}
    best = max(variants, key=lambda v: v["top1_agreement"])
    return {
        "clone_agreement": _proportion(
            float(best["top1_agreement"]), int(result.get("heldout_positions", 0)), confidence
        )
    }


def _logit_leak(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    return {"logit_leak_gap_decades": RunValue(value=float(result["gap_decades"]))}


def _backdoor(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    report = (result.get("distillation") or {}).get("clean_transfer") or result["backdoored_model"]
    metrics = report["metrics"]
    return {
        "backdoor_asr": _proportion(
            float(metrics["attack_success_rate"]), int(metrics["n_triggered"]), confidence
        )
    }


def _adversarial(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    stats = result.get("results") or []
    if not stats:
        return {}
    smallest = min(stats, key=lambda s: math.inf if s.get("eps") is None else s["eps"])
    return {
        "adversarial_success_rate": _proportion(
            float(smallest["success_rate"]), int(smallest["n_correct"]), confidence
        )
    }


def _bias_cascade(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    students = [row for row in result.get("rows") or [] if row.get("objective")]
    if not students:
        return {}
    worst = max(students, key=lambda row: row["in_domain"]["rate"])
    rate = worst["in_domain"]
    value = _proportion(float(rate["rate"]), int(rate["n"]), confidence)
    value.note = f"{worst['model']}, in the target topic"
    teacher = next((row for row in result["rows"] if row["model"] == "teacher"), None)
    if teacher is not None:
        value.note += f"; poisoned teacher {teacher['in_domain']['rate']:.3f}"
    return {"bias_student_rate": value}


def _federated(result: dict, samples: int, confidence: float) -> dict[str, RunValue]:
    one_run = "one honest and one attacked run"
    out = {"poisoning_loss_increase": RunValue(value=float(result["loss_increase"]), note=one_run)}
    asr = (result.get("attacked") or {}).get("backdoor_asr")
    if asr is not None:
        out["backdoor_asr"] = RunValue(value=float(asr), note="federated backdoor, global model")
    inversion = result.get("inversion") or {}
    if inversion.get("update_visible") and inversion.get("recall") is not None:
        out["update_token_recall"] = _proportion(
            float(inversion["recall"]), int(inversion["true_tokens"]), confidence
        )
    elif inversion:
        out["update_token_recall"] = RunValue(value=0.0, note=inversion.get("note"))
    return out


EXTRACTORS = {
    "membership": _membership,
    "memorization": _memorization,
    "clone": _clone,
    "logit_leak": _logit_leak,
    "backdoor": _backdoor,
    "adversarial": _adversarial,
    "bias_cascade": _bias_cascade,
    "federated": _federated,
}


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
    attack: str, result: dict, extra: dict[str, str], *, samples: int = 1000, confidence: float = 0.95
) -> dict[str, RunValue]:
    """The verdict metrics of one attack run: the attack's extractor, `ece` if reported, and `extra` paths."""
    values = EXTRACTORS[attack](result, samples, confidence) if attack in EXTRACTORS else {}
    if isinstance(result.get("ece"), int | float):
        values["ece"] = RunValue(value=float(result["ece"]))
    for metric, path in extra.items():
        found = dotted(result, path)
        if not isinstance(found, int | float) or isinstance(found, bool):
            raise ValueError(f"metric {metric!r}: {path!r} is {found!r}, not a number")
        values[metric] = RunValue(value=float(found))
    return values


def combine_seeds(values: list[RunValue], *, samples: int, confidence: float) -> RunValue:
    """One seed: its own interval. Several: their mean, with a bootstrap interval over seeds."""
    if len(values) == 1:
        return values[0]
    array = np.asarray([v.value for v in values])
    low, high = bootstrap_ci(array, np.mean, n=samples, alpha=1 - confidence, seed=0)
    note = next((v.note for v in values if v.note), None)
    return RunValue(
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
