"""Experiment: swing distillation vs plain KD vs DP-SGD KD on a canary corpus, over several seeds.

Swing Distillation (Li et al. 2023) reports over 80% less canary exposure than plain KD. Here, at tiny
scale, with secure-kd's own formulation (`defenses.swing`, NO formal DP guarantee):

- data: the synthetic corpus (Faker records with PII spans) with canaries ("The access code for
  <name> is <3 digits>.") inserted several times; a quarter of the clean records are held out.
- teacher: a tiny Llama fine-tuned with cross-entropy on the training records (it memorizes the canaries).
- students (same tiny architecture, fresh init, forward KL on the teacher's full distributions):
  plain KD; swing KD over a small grid of (T_max, sigma) in two arms that differ only in how private
  tokens are found:
  * `detectors` (the HEADLINE): the regex detectors alone, what a user with real data has;
  * `oracle`: the detectors plus the corpus' own PII spans (every canary name and secret marked
    exactly), which no real dataset provides: an upper bound for the detectors, not a result;
  and DP-SGD KD (the engine's DPDistiller, `train.privacy`, fixed noise multiplier, epsilon from the
  RDP accountant).
- measurements per student, the attacks through the registry (`attacks.get_attack`): canary exposure
  over the whole secret space and extraction (memorization attack), loss-attack MIA AUC on clean
  members vs held-out records (membership attack), and held-out perplexity.
- every seed draws its own corpus, canaries, tokenizer, teacher and students; per seed the exposure
  reduction vs that seed's plain KD and the perplexity ratio to it are computed, then the mean over
  seeds with a Student-t confidence interval (the seed is the unit of replication).

Run: `python benchmarks/experiments/swing_kd.py [--config PATH] [--seeds 0 1 2]`; writes the JSON
named by `out`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from apparatus.tiny_lm import build_model, heldout_perplexity, pad_token_id
from attacks import get_attack
from defenses.swing import (
    SwingConfig,
    SwingSetting,
    SwingSettings,
    build_setting,
    distil_student,
    scored_examples,
)
from secure_kd.config import KDConfig, Strict, TrainConfig, load_config
from secure_kd.dp.config import PrivacyConfig
from secure_kd.dp.trainer import DPDistiller
from secure_kd.paths import atomic_write_json, atomic_write_text
from secure_kd.teacher_targets import LiveTeacher

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "swing_kd.yaml"
Arm = Literal["detectors", "oracle"]
ARM_NOTES = {
    "detectors": "regex detectors only (what real data allows): the headline",
    "oracle": (
        "detectors + the corpus' true PII spans (every canary name and secret): an upper bound, not a result"
    ),
}
METRICS = (
    "mean_exposure",
    "exposure_reduction_vs_plain",
    "perplexity_ratio_vs_plain",
    "heldout_perplexity",
    "mia_loss_auc",
    "canary_greedy_extraction_rate",
    "canary_sampled_extraction_rate",
    "private_token_fraction",
    "canary_secret_tokens_marked",
    "canary_name_tokens_marked",
)


class GridPoint(Strict):
    max_temperature: float = Field(..., gt=0)
    noise_std: float = Field(..., ge=0)


class DPSettings(Strict):
    noise_multiplier: float = Field(1.0, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(30.0, gt=0)
    lr: float = Field(3e-3, gt=0)


class ExperimentConfig(Strict):
    threads: int = Field(1, gt=0)
    out: str = "benchmarks/results/swing_kd.json"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    defense: SwingConfig = SwingConfig()
    arms: list[Arm] = Field(default_factory=lambda: ["detectors", "oracle"], min_length=1)
    grid: list[GridPoint] = Field(min_length=1)
    headline: GridPoint = Field(..., description="the grid point the README headlines (detectors arm)")
    dp: list[DPSettings] = Field(default_factory=lambda: [DPSettings()])
    extraction_samples: int = Field(64, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if "use_known_spans" in self.defense.swing.model_fields_set:
            raise ValueError(
                "defense.swing.use_known_spans is set per arm by this experiment; remove it and list "
                "the arms under `arms` (detectors, oracle)"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed; give distinct seeds")
        if "detectors" not in self.arms:
            raise ValueError("arms must include 'detectors': it is the headline arm")
        if self.headline not in self.grid:
            raise ValueError(f"headline {self.headline.model_dump()} is not one of the grid points")
        return self


def model_name(arm: Arm, point: GridPoint) -> str:
    return f"swing_{arm}_T{point.max_temperature:g}_sigma{point.noise_std:g}"


def t_interval(values: list[float], confidence: float) -> dict[str, Any]:
    """Mean, sample sd and the Student-t interval of the mean (None with a single value)."""
    from scipy import stats as scipy_stats

    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": None, "sd": None, "ci": None, "n": 0}
    center = statistics.fmean(finite)
    if n == 1:
        return {"mean": center, "sd": None, "ci": None, "n": 1}
    sd = statistics.stdev(finite)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": center, "sd": sd, "ci": [center - half, center + half], "n": n}


def chance_exposure(space_size: int) -> float:
    """Mean exposure of a canary whose rank is uniform over the space (a model that never saw it):
    log2(N) - mean(log2 r) for r = 1..N, about log2(e) = 1.44 bits for large N."""
    return math.log2(space_size) - math.lgamma(space_size + 1) / math.log(2) / space_size


def dp_student(
    setting: SwingSetting, cfg: ExperimentConfig, defense: SwingConfig, dp: DPSettings, workdir: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student distilled with DP-SGD (plain forward KL) through the engine's DPDistiller."""
    pad_id = pad_token_id(setting.tokenizer)
    student = build_model(defense.student, len(setting.tokenizer), seed=defense.seed + 2, pad_id=pad_id)
    student = student.to(setting.device)
    privacy = PrivacyConfig(
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        ledger_dir=str(workdir / f"ledgers-{dp.noise_multiplier:g}"),
        ledger_key="swing-kd-experiment",
    )
    train = TrainConfig(
        epochs=dp.epochs,
        batch_size=defense.student.batch_size,
        lr=dp.lr,
        precision="fp32",
        checkpoint_every=1 << 30,
        privacy=privacy,
    )
    kd = KDConfig(loss="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, top_k=None)
    distiller = DPDistiller(
        dataset_key="swing-kd-experiment",
        log=lambda _: None,
        student=student,
        examples=setting.train_examples,
        kd=kd,
        train=train,
        out=workdir / f"dp-{dp.noise_multiplier:g}",
        pad_id=pad_id,
        eos_id=None,
        targets=LiveTeacher(setting.teacher, None),
        seed=defense.seed,
        device=setting.device,
        progress=False,
    )
    distiller.fit()
    student.eval()
    return student, distiller.report.model_dump(mode="json")


def attack(
    model, name: str, setting: SwingSetting, cfg: ExperimentConfig, defense: SwingConfig, workdir: Path
) -> dict[str, Any]:
    """Exposure, extraction and loss-attack MIA of one model, through the attacks registry."""
    model_dir = workdir / "models" / name
    model.save_pretrained(model_dir, safe_serialization=True)
    setting.tokenizer.save_pretrained(model_dir)
    memo = get_attack("memorization")
    memo_result = memo.run(
        memo.Config.model_validate(
            {
                "seed": defense.seed,
                "device": "cpu",
                "out": str(workdir / "memo" / name),
                "model": {"source": str(model_dir)},
                "tokenizer": str(model_dir),
                "data": {"source": str(workdir / "train.jsonl"), "max_length": defense.corpus.max_length},
                "exposure": {"estimate_samples": 0},
                "extraction": {
                    "n_samples": cfg.extraction_samples,
                    "max_new_tokens": 40,
                    "reference": None,
                    "canary_samples": 8,
                },
            }
        )
    )
    membership = get_attack("membership")
    mia = membership.run(
        membership.Config.model_validate(
            {
                "seed": defense.seed,
                "device": "cpu",
                "out": str(workdir / "mia" / name),
                "target": {"source": str(model_dir)},
                "tokenizer": str(model_dir),
                "data": {
                    "source": "files",
                    "members": str(workdir / "members.jsonl"),
                    "nonmembers": str(workdir / "nonmembers.jsonl"),
                    "n_members": None,
                    "n_nonmembers": None,
                    "n_population": None,
                    "max_length": defense.corpus.max_length,
                },
                "attacks": ["loss"],
                "n_shadows": 0,
            }
        )
    )
    extraction = memo_result.extraction
    return {
        "mean_exposure": statistics.fmean([c.exposure for c in memo_result.exposure]),
        "exposures": [c.exposure for c in memo_result.exposure],
        "canary_greedy_extraction_rate": extraction.canary_greedy_extraction_rate,
        "canary_sampled_extraction_rate": extraction.canary_sampled_extraction_rate,
        "pii_extraction_rate": extraction.pii_extraction_rate,
        "mia_loss_auc": mia.attacks[0].auc,
        "heldout_perplexity": heldout_perplexity(
            model, setting.heldout_examples, pad_id=pad_token_id(setting.tokenizer), device=setting.device
        ),
    }


def write_data(setting: SwingSetting, workdir: Path) -> None:
    setting.train.to_jsonl(workdir / "train.jsonl")
    members = [r["text"] for r in setting.train.records if r["topic"] != "canary"]
    for name, texts in (("members", members), ("nonmembers", setting.heldout.texts())):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        atomic_write_text(workdir / f"{name}.jsonl", lines)


def coverage(setting: SwingSetting, scores: list[list[float]]) -> dict[str, float]:
    """What an arm marks: the share of all training tokens, and of the canaries' secret and name tokens."""
    tokenizer, marked = setting.tokenizer, {"secret": [0, 0], "name": [0, 0]}
    for record, row in zip(setting.train.records, scores, strict=True):
        if record["topic"] != "canary":
            continue
        offsets = tokenizer(record["text"], return_offsets_mapping=True)["offset_mapping"]
        for span in record["pii_spans"]:
            if span["type"] not in marked:
                continue
            hits = [
                score > 0
                for (start, end), score in zip(offsets, row, strict=False)
                if start < span["end"] and end > span["start"] and end > start
            ]
            marked[span["type"]][0] += sum(hits)
            marked[span["type"]][1] += len(hits)
    flat = [s for row in scores for s in row]
    return {
        "private_token_fraction": sum(1 for s in flat if s > 0) / len(flat),
        "canary_secret_tokens_marked": marked["secret"][0] / max(marked["secret"][1], 1),
        "canary_name_tokens_marked": marked["name"][0] / max(marked["name"][1], 1),
    }


def run_seed(cfg: ExperimentConfig, seed: int, log) -> dict[str, Any]:
    """Every model of one seed: its corpus, teacher, plain KD, the swing arms over the grid, DP-SGD KD."""
    started = time.perf_counter()
    detectors_only = cfg.defense.swing.model_copy(update={"use_known_spans": False})
    defense = cfg.defense.model_copy(update={"seed": seed, "swing": detectors_only})
    setting = build_setting(defense)  # token scores from the detectors alone
    oracle = detectors_only.model_copy(update={"use_known_spans": True})
    scores = {
        "detectors": setting.token_scores,
        "oracle": scored_examples(
            setting.train.records, setting.tokenizer, oracle, defense.corpus.max_length
        )[1],
    }
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="secure-kd-swing-kd-") as tmp:
        workdir = Path(tmp)
        write_data(setting, workdir)
        rows["teacher"] = attack(setting.teacher, "teacher", setting, cfg, defense, workdir)
        plain = distil_student(setting, defense, None)
        rows["plain_kd"] = attack(plain, "plain_kd", setting, cfg, defense, workdir)
        for arm in cfg.arms:
            arm_setting = replace(setting, token_scores=scores[arm])
            marks = coverage(setting, scores[arm])
            for point in cfg.grid:
                swing = SwingSettings(
                    **{**defense.swing.model_dump(), **point.model_dump(), "use_known_spans": arm == "oracle"}
                )
                name = model_name(arm, point)
                student = distil_student(arm_setting, defense, swing)
                rows[name] = attack(student, name, setting, cfg, defense, workdir)
                rows[name] |= {"arm": arm, "swing": point.model_dump(), **marks}
                log(f"seed {seed}: {name} exposure {rows[name]['mean_exposure']:.2f}")
        for dp in cfg.dp:
            name = f"dp_sgd_kd_noise{dp.noise_multiplier:g}"
            dp_model, privacy = dp_student(setting, cfg, defense, dp, workdir)
            rows[name] = attack(dp_model, name, setting, cfg, defense, workdir)
            keys = ("epsilon", "delta", "noise_multiplier", "steps", "sample_rate")
            rows[name]["privacy"] = {k: privacy.get(k) for k in keys}
    plain_exposure = rows["plain_kd"]["mean_exposure"]
    plain_ppl = rows["plain_kd"]["heldout_perplexity"]
    for row in rows.values():
        reduction = (plain_exposure - row["mean_exposure"]) / plain_exposure if plain_exposure > 0 else None
        row["exposure_reduction_vs_plain"] = reduction
        row["perplexity_ratio_vs_plain"] = row["heldout_perplexity"] / plain_ppl
    return {
        "seed": seed,
        "n_train_records": len(setting.train),
        "n_heldout_records": len(setting.heldout),
        "n_canaries": len(setting.train.canaries),
        "models": rows,
        "seconds": time.perf_counter() - started,
    }


def summarize(per_seed: list[dict[str, Any]], confidence: float) -> dict[str, dict[str, Any]]:
    """Per model: each metric's mean over seeds with its t-interval, and every canary's exposure."""
    names = list(per_seed[0]["models"])
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [seed["models"][name] for seed in per_seed]
        entry: dict[str, Any] = {
            metric: t_interval([row[metric] for row in rows], confidence)
            for metric in METRICS
            if all(row.get(metric) is not None for row in rows)
        }
        entry["canary_exposures"] = [e for row in rows for e in row["exposures"]]
        for key in ("arm", "swing", "privacy"):
            if key in rows[0]:
                entry[key] = rows[0][key] if key != "privacy" else [row[key] for row in rows]
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--out", help="override the config's out")
    args = parser.parse_args(argv)
    overrides = []
    if args.seeds:
        overrides.append(f"seeds={json.dumps(args.seeds)}")
    if args.out:
        overrides.append(f"out={json.dumps(args.out)}")
    cfg = load_config(args.config, overrides, model=ExperimentConfig)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    per_seed = []
    for seed in cfg.seeds:
        per_seed.append(run_seed(cfg, seed, lambda message: print(message, file=sys.stderr, flush=True)))
    summary = summarize(per_seed, cfg.confidence)
    space = 10**cfg.defense.corpus.secret_digits
    plain = summary["plain_kd"]["mean_exposure"]["mean"]
    chance = chance_exposure(space)
    headline = model_name("detectors", cfg.headline)
    results = {
        "experiment": "swing_kd",
        "paper": "Li et al. 2023, Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework",
        "note": "swing is secure-kd's own formulation and gives NO formal DP guarantee; dp_sgd_kd does",
        "arms": {arm: ARM_NOTES[arm] for arm in cfg.arms},
        "headline": {
            "model": headline,
            "oracle_counterpart": model_name("oracle", cfg.headline) if "oracle" in cfg.arms else None,
            "exposure_reduction_vs_plain": summary[headline]["exposure_reduction_vs_plain"],
            "perplexity_ratio_vs_plain": summary[headline]["perplexity_ratio_vs_plain"],
        },
        "interval": f"{cfg.confidence:.0%} Student-t interval of the mean over seeds (one value per seed)",
        "config": cfg.model_dump(mode="json"),
        "seeds": cfg.seeds,
        "n_canaries_per_seed": per_seed[0]["n_canaries"],
        "n_train_records": [s["n_train_records"] for s in per_seed],
        "n_heldout_records": [s["n_heldout_records"] for s in per_seed],
        "max_exposure": math.log2(space),
        "chance_exposure": chance,
        "reduction_at_chance_exposure": (plain - chance) / plain if plain else None,
        "summary": summary,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - started,
        "seconds_per_seed": [s["seconds"] for s in per_seed],
    }
    out = REPO_ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    atomic_write_json(out, results)
    short = {
        name: {
            metric: round(entry[metric]["mean"], 3)
            for metric in ("mean_exposure", "exposure_reduction_vs_plain", "perplexity_ratio_vs_plain")
            if metric in entry and entry[metric]["mean"] is not None
        }
        for name, entry in summary.items()
    }
    seconds = round(results["seconds"], 1)
    print(json.dumps({"headline": results["headline"], "models": short, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
