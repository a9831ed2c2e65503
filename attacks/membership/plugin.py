"""The `membership` plugin's registration: where the audited model and its members go, what it needs
(non-members), and the audit metrics it reports (best AUC, best TPR at 1% FPR, bootstrapped over the
examples from the stored ROC curves)."""

from __future__ import annotations

from typing import Any

from attacks import ATTACKS
from attacks.membership.audit import run
from attacks.membership.config import MembershipConfig, MembershipResult
from secure_kd.plugins import Input, Metric, Plugin, Requirement
from secure_kd.readings import Reading, bootstrap_reading, roc_stat, scores_from_roc


def _rows(roc: dict[str, Any]):
    return scores_from_roc(roc["roc_fpr"], roc["roc_tpr"], int(roc["n_members"]), int(roc["n_nonmembers"]))


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The best AUC and the best TPR at 1% FPR over the attacks run (taking the best of several attacks
    is optimistic for the attacker, the side an audit should err on); interval: bootstrap over
    examples, rebuilt exactly from the stored ROC and the member counts."""
    rocs = result.get("attacks") or []
    if not rocs:
        return {}
    out: dict[str, Reading] = {}
    for metric, key in (("mia_auc", "auc"), ("mia_tpr_at_1pct_fpr", "tpr")):
        stat = roc_stat(key)

        def headline(roc: dict, key: str = key, stat=stat) -> float:
            if key == "auc":
                return float(roc["auc"])
            tprs = {float(k): v for k, v in roc["tpr_at_fpr"].items()}
            return float(tprs[0.01]) if 0.01 in tprs else stat(_rows(roc))

        best = max(rocs, key=headline)
        n = int(best["n_members"]) + int(best["n_nonmembers"])
        out[metric] = bootstrap_reading(
            _rows(best), stat, headline(best), samples, confidence, f"{n} examples ({best['attack']})"
        )
        if metric == "mia_tpr_at_1pct_fpr" and int(best["n_nonmembers"]) < 100:
            few = int(best["n_nonmembers"])
            out[metric].note = f"only {few} non-members: TPR at 1% FPR is read at FPR 0 (needs >= 100)"
    return out


PLUGIN = ATTACKS.register(
    "membership",
    Plugin(
        name="membership",
        Config=MembershipConfig,
        Result=MembershipResult,
        run=run,
        summary="membership inference: loss attack, RMIA and LiRA (offline/online) with shadow models",
        target="target.source",
        kinds=("causal_lm",),
        own_target="a tiny Llama it trains on synthetic members",
        inputs={"data": Input("data.members", also={"data.source": "files"})},
        with_model={"tokenizer": None},
        requires=(
            Requirement(
                "data.members", (None,),
                "membership inference needs the model's training records (its members): give --data FILE",
            ),
            Requirement(
                "data.nonmembers", (None,),
                "membership inference needs records the model never trained on (non-members) next to its "
                "training records: set data.nonmembers of this suite entry (see configs/audit-lm.yaml)",
            ),
        ),
        metrics=(
            Metric(
                "mia_auc", risk="membership", medium=0.6, high=0.75,
                why="best ROC AUC over the membership attacks run (0.5 = guessing)",
            ),
            Metric(
                "mia_tpr_at_1pct_fpr", risk="membership", medium=0.05, high=0.2,
                why="best TPR at 1% FPR (LiRA's low-FPR view; guessing gives 0.01)",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
