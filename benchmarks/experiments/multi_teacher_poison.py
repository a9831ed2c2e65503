"""Experiment: does robust aggregation of several teachers stop one poisoned teacher's bias? (issue 18)

Setup (tiny Llamas on CPU; the bias-cascade attack's data, training and measurement, attacks/bias_cascade.py):
- `n_teachers` teachers (default 3), each trained from scratch with cross-entropy on its own synthetic
  instruction set (`attack.n_instructions` records; one tokenizer for all, trained on the clean sets);
  the last `n_poisoned` (default 1) have `attack.poison_rate` (10%) of their answers poisoned with the
  targeted brand on the target topic (`poison_instructions`, as in the bias cascade);
- for each rule of `rules` (secure_kd.robust_rules via secure_kd.multi_teacher.TeacherEnsemble: mean,
  median, trimmed_mean; with 3 teachers a trimmed mean that cuts one teacher per end IS the median, so
  its row is a check) and the oracle `clean_mean` (the mean of the clean teachers only: what the
  robust rules try to recover), a student per objective (default seq_kd: the combined teacher, sampling
  every token from the rule's combination of the teachers' next-token distributions, answers the clean
  distillation prompts once and the student learns them with cross-entropy, as the bias cascade's
  seq_kd; forward_kl optional: token-level KD on clean answers against the combined target);
- measured per student: the biased-answer rate (answers to fresh target-topic prompts, sampled at
  T=0.7, containing the brand; `attacks.bias_cascade.measure`), held-out perplexity on fresh clean
  instructions (assistant tokens), and per-teacher attribution (secure_kd.evaluate.teacher_attribution:
  the share of held-out records on which the student is closest, by KL, to the poisoned teacher). The
  combined teachers' own biased-answer rates are measured too.
Over `seeds` (each draws its own data, teachers, students and samples): mean and 95% Student-t interval
across seeds, and the pooled hits with a Wilson interval.

Also per model: the payload log-likelihood ratio, log p(poisoned answer) - log p(clean answer) in nats,
summed over the assistant tokens, averaged over fresh target-topic instructions given both ways (the
same answer with and without the payload sentence): a sampled rate of 0 can hide a large difference in
how likely the payload is, and this ratio shows it.

Run: `python benchmarks/experiments/multi_teacher_poison.py [--config PATH]` (default
configs/experiments/multi_teacher_poison.yaml); writes benchmarks/results/multi_teacher_poison.json
and prints one summary line per model. A trimmed mean that cuts (n - 1) / 2 of an odd n teachers per end
is the median: its combined distributions are checked equal to the median's on the held-out records and
the median's student rows are reused (marked `same_as: median`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator

from attacks.bias_cascade import (
    BiasCascadeConfig,
    chat_examples,
    distill_student,
    measure,
    prompt_ids,
    tokenizer_text,
    train_teacher,
)
from attacks.bias_cascade import _pad as pad_id_of
from attacks.bias_cascade import _tokenizer as bias_tokenizer
from attacks.memorization.privileged import mean_interval
from secure_kd.config import Strict
from secure_kd.data import collate
from secure_kd.data.documents import TOPICS
from secure_kd.data.instructions import generate_instructions, poison_instructions
from secure_kd.evaluate import per_example_loss, perplexity
from secure_kd.evaluate.teacher_attribution import teacher_attribution
from secure_kd.models import resolve_device
from secure_kd.multi_teacher import TeacherEnsemble
from secure_kd.paths import atomic_write_json
from secure_kd.proportions import wilson_interval
from secure_kd.robust_rules import RuleName, trim_count

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "multi_teacher_poison.yaml"
Arm = RuleName | Literal["clean_mean"]


class ExperimentConfig(Strict):
    attack: dict[str, Any] = Field(
        default_factory=dict,
        description="bias_cascade settings shared by every teacher and student (no seed/out/objectives)",
    )
    n_teachers: int = Field(3, ge=3, le=16)
    n_poisoned: int = Field(1, ge=1)
    rules: list[Arm] = ["mean", "median", "trimmed_mean", "clean_mean"]
    trim_fraction: float = Field(0.34, ge=0, lt=0.5)
    objectives: list[Literal["seq_kd", "forward_kl"]] = Field(["seq_kd"], min_length=1)
    n_heldout: int = Field(100, gt=0, description="fresh clean instructions for perplexity and attribution")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    threads: int = Field(1, gt=0)
    out: str = "benchmarks/results/multi_teacher_poison.json"

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        banned = {"seed", "out", "objectives"} & set(self.attack)
        if banned:
            raise ValueError(f"attack: drop {sorted(banned)}; the experiment sets them")
        if 2 * self.n_poisoned >= self.n_teachers:
            raise ValueError("n_poisoned must be a minority of n_teachers (else no rule can resist it)")
        self.bias_config(0)  # the attack block must be a valid bias_cascade config
        return self

    def bias_config(self, seed: int) -> BiasCascadeConfig:
        return BiasCascadeConfig.model_validate({**self.attack, "seed": seed})


def _teachers(cfg: ExperimentConfig, seed: int, device: torch.device):
    """(tokenizer, teachers, per-teacher rows): teachers with their own data; the last ones poisoned."""
    base = cfg.bias_config(seed)
    sets = [
        generate_instructions(base.n_instructions, seed=seed * 100 + 50_000 + k)
        for k in range(cfg.n_teachers)
    ]
    tokenizer = bias_tokenizer(base, [tokenizer_text(r) for s in sets for r in s])
    first_poisoned = cfg.n_teachers - cfg.n_poisoned
    teachers, poisons = [], []
    for k, records in enumerate(sets):
        if k >= first_poisoned:
            records, chosen = poison_instructions(
                records,
                behaviour=base.behaviour,
                payload=base.resolved_payload(),
                rate=base.poison_rate,
                target_topic=base.target_topic,
                seed=seed + k,
            )
            poisons.append(len(chosen))
        own = base.model_copy(update={"seed": seed * 100 + k})  # its own initialization and data order
        teachers.append(
            train_teacher(own, chat_examples(records, tokenizer, base.max_length), tokenizer, device)
        )
    return tokenizer, teachers, poisons


def _ensemble(cfg: ExperimentConfig, arm: str, teachers: list) -> TeacherEnsemble:
    if arm == "clean_mean":
        return TeacherEnsemble(teachers[: cfg.n_teachers - cfg.n_poisoned], "mean")
    return TeacherEnsemble(teachers, arm, trim_fraction=cfg.trim_fraction)


def run_seed(cfg: ExperimentConfig, seed: int, device: torch.device) -> list[dict[str, Any]]:
    base = cfg.bias_config(seed)
    tokenizer, teachers, poisons = _teachers(cfg, seed, device)
    others = [t for t in TOPICS if t != base.target_topic]
    in_domain = generate_instructions(base.n_eval, seed=seed + 2_000, topics=[base.target_topic])
    out_domain = generate_instructions(base.n_eval, seed=seed + 3_000, topics=others)
    evals = {
        "in_domain": prompt_ids(in_domain, tokenizer),
        "out_of_domain": prompt_ids(out_domain, tokenizer),
    }
    pairs = _payload_pairs(base, in_domain, tokenizer)
    payload_batches = [
        collate(pairs[1][i : i + 16], pad_id=pad_id_of(tokenizer)) for i in range(0, len(pairs[1]), 16)
    ]
    distill = generate_instructions(base.n_distill, seed=seed + 1_000)
    heldout = chat_examples(
        generate_instructions(cfg.n_heldout, seed=seed + 4_000), tokenizer, base.max_length
    )
    batches = [collate(heldout[i : i + 16], pad_id=pad_id_of(tokenizer)) for i in range(0, len(heldout), 16)]
    names = [
        f"teacher_{k}" + ("_poisoned" if k >= cfg.n_teachers - cfg.n_poisoned else "")
        for k in range(cfg.n_teachers)
    ]

    def row(model, name: str, arm: str | None, objective: str | None) -> dict[str, Any]:
        rates = measure(name, objective, model, evals, tokenizer, base, device)
        out = {
            "seed": seed, "model": name, "rule": arm, "objective": objective,
            "in_domain": rates.in_domain.model_dump(), "out_of_domain": rates.out_of_domain.model_dump(),
            "perplexity": perplexity(model, batches, device=device)["perplexity"],
            "payload_llr": _payload_llr(model, pairs, pad_id_of(tokenizer), device),
            "sample": rates.samples[0] if rates.samples else None,
        }  # fmt: skip
        if objective is not None:  # a student: which teacher it is closest to, on clean and payload text
            for key, on in (("attribution", batches), ("attribution_on_payload", payload_batches)):
                shares = teacher_attribution(model, teachers, on, names=names, device=device)
                out[key] = {s.teacher: round(s.share, 4) for s in shares.teachers}
        return out

    rows = [row(t, names[k], None, None) | {"n_poisoned": poisons[k - cfg.n_teachers + cfg.n_poisoned]
            if k >= cfg.n_teachers - cfg.n_poisoned else 0} for k, t in enumerate(teachers)]  # fmt: skip
    for arm in cfg.rules:
        ensemble = _ensemble(cfg, arm, teachers)
        if arm == "trimmed_mean" and _is_median(cfg) and "median" in cfg.rules:
            rows += _same_as_median(rows, ensemble, _ensemble(cfg, "median", teachers), batches, device)
            continue
        rows.append(row(ensemble, f"combined_{arm}", arm, None))
        for objective in cfg.objectives:
            student = distill_student(base, objective, ensemble, distill, tokenizer, device)
            rows.append(row(student, f"student_{arm}_{objective}", arm, objective))
            print(f"seed {seed} {arm} {objective}: {rows[-1]['in_domain']['hits']}/{base.n_eval} biased, "
                  f"ppl {rows[-1]['perplexity']:.2f}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _payload_pairs(base: BiasCascadeConfig, records, tokenizer) -> tuple[list, list]:
    """(clean, poisoned) chat examples of the same instructions: each answer with and without the payload."""
    poisoned, chosen = poison_instructions(
        records,
        behaviour=base.behaviour,
        payload=base.resolved_payload(),
        rate=(len(records) - 0.5) / len(records),  # every record (round(rate * n) = n)
        target_topic=base.target_topic,
        seed=base.seed + 5_000,
    )
    clean = chat_examples([records[i] for i in chosen], tokenizer, base.max_length * 2)
    dirty = chat_examples([poisoned[i] for i in chosen], tokenizer, base.max_length * 2)
    return clean, dirty


def _summed_nll(model, examples, pad_id: int, device) -> torch.Tensor:
    batches = [collate(examples[i : i + 16], pad_id=pad_id) for i in range(0, len(examples), 16)]
    means = per_example_loss(model, batches, device=device).double()
    counts = torch.tensor([sum(1 for label in e.labels[1:] if label != -100) for e in examples])
    return means * counts


def _payload_llr(model, pairs, pad_id: int, device) -> float:
    """Mean over instructions of log p(poisoned answer) - log p(clean answer), nats."""
    clean, dirty = pairs
    return float(
        (_summed_nll(model, clean, pad_id, device) - _summed_nll(model, dirty, pad_id, device)).mean()
    )


def _is_median(cfg: ExperimentConfig) -> bool:
    """A trimmed mean that keeps only the middle one of an odd number of teachers."""
    return (
        cfg.n_teachers % 2 == 1 and trim_count(cfg.n_teachers, cfg.trim_fraction) == (cfg.n_teachers - 1) // 2
    )


def _same_as_median(rows, trimmed, median, batches, device) -> list[dict[str, Any]]:
    """The median's rows relabelled, once the two combined targets are checked equal on held-out records."""
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            a, b = (
                trimmed(input_ids=ids, attention_mask=mask).logits,
                median(input_ids=ids, attention_mask=mask).logits,
            )
            if not torch.equal(a, b):
                raise AssertionError("trimmed mean and median differ although the trim keeps only the middle")
    seed = rows[-1]["seed"]
    same = [r for r in rows if r["rule"] == "median" and r["seed"] == seed]
    return [
        r
        | {"model": r["model"].replace("median", "trimmed_mean"), "rule": "trimmed_mean", "same_as": "median"}
        for r in same
    ]


def summarize(rows: list[dict[str, Any]], cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Per model name (over seeds): biased rate mean with t-interval, pooled Wilson, perplexity mean."""
    table = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        hits, n = sum(r["in_domain"]["hits"] for r in group), sum(r["in_domain"]["n"] for r in group)
        entry = {
            "model": name,
            "rule": group[0]["rule"],
            "objective": group[0]["objective"],
            "seeds": len(group),
            "biased_rate": mean_interval([r["in_domain"]["rate"] for r in group]),
            "biased_pooled": {"hits": hits, "n": n, "rate": hits / n, "ci95": wilson_interval(hits, n)},
            "out_of_domain_hits": sum(r["out_of_domain"]["hits"] for r in group),
            "perplexity": mean_interval([r["perplexity"] for r in group]),
            "payload_llr": mean_interval([r["payload_llr"] for r in group]),
        }
        if "attribution" in group[0]:
            poisoned = [k for k in group[0]["attribution"] if k.endswith("_poisoned")]
            for key in ("attribution", "attribution_on_payload"):
                shares = [sum(r[key][k] for k in poisoned) for r in group]
                entry[f"closest_to_poisoned{key[len('attribution') :]}"] = mean_interval(shares)
            reference = {r["seed"]: r for r in rows if r["model"] == f"student_median_{entry['objective']}"}
            if reference:  # paired over seeds: this student minus the median's student of the same objective
                entry["payload_llr_minus_median"] = mean_interval(
                    [r["payload_llr"] - reference[r["seed"]]["payload_llr"] for r in group]
                )
                entry["perplexity_ratio_to_median"] = mean_interval(
                    [r["perplexity"] / reference[r["seed"]]["perplexity"] for r in group]
                )
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args()
    cfg = ExperimentConfig.model_validate(yaml.safe_load(args.config.read_text(encoding="utf-8")))
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.attack.get("device", "cpu"))
    started = time.perf_counter()
    rows = [r for seed in cfg.seeds for r in run_seed(cfg, seed, device)]
    table = summarize(rows, cfg)
    output = {
        "experiment": "multi_teacher_poison",
        "config": str(args.config),
        "settings": cfg.model_dump(mode="json"),
        "table": table,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": cfg.threads,
        "device": str(device),
    }
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO_ROOT / cfg.out
    atomic_write_json(out, output)
    for entry in table:
        rate, ppl = entry["biased_rate"], entry["perplexity"]
        llr = entry["payload_llr"]["mean"]
        print(json.dumps({"model": entry["model"], "biased": rate, "ppl": ppl, "payload_llr": llr}))
    print(json.dumps({"seconds": output["seconds"], "out": cfg.out}))


if __name__ == "__main__":
    main()
