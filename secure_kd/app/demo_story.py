"""`secure-kd demo` (`make demo`): the whole story on the real teacher, in one command.

Part of the app layer (`secure_kd/app/`; only `secure_kd/app/cli.py` imports it): it drives the engine,
the federation and the audit, which the engine never imports.

1. A private corpus with canaries (the synthetic generator, 200 records with PII and 4 canaries
   inserted 4 times each) and, from other seeds, records of the same generator that nobody trains
   on (held-out evaluation text and the non-members of the membership audit) and 200 public records.
2. A warm start on public data (`configs/demo.yaml`): SmolLM2-135M-Instruct (Q4_1) teacher, its top-64
   log-probabilities cached once per corpus, a student made of 6 of its layers (0-2, 27-29), forward KL
   on the public records only (no private data, no privacy cost). Every private run starts from it, for
   `PRIVATE_EPOCHS` over the private corpus: central distillation from the cached teacher; the same with
   a cross-entropy mix (KD + 0.5 CE); the baseline, plainly fine-tuned on the same records
   (cross-entropy only). The three share one teacher cache.
3. DP-SGD distillation at two target epsilons (`DP_EPSILONS`), from the same warm start, each with its
   own ledger and 64 audit canaries (`audit.canaries`, each inserted with probability 1/2; both runs
   insert the same ones and share a second cache).
4. Federated distillation (`configs/demo-federated.yaml`): 4 simulated organizations share the private
   corpus's generator (its seed, its canaries), each starts from the warm start, distils the SmolLM2
   teacher on its share with DP-SGD, and the soft labels on a public transfer set are aggregated under
   CKKS (the server holds no secret key); the real tokenizer, so its perplexity on the held-out records
   is comparable with the central rows.
5. The audit (`configs/demo-audit.yaml`) of the student: canary exposure and extraction, loss-based
   membership inference, cloning through the API (its first step recovers the hidden size and the
   output layer from the logits, as `secure-kd attack logit_leak` does); of the baseline (same
   architecture and API), the exposure, extraction and membership part;
   `<out>/audit/report.html` for the student, `<out>/audit-baseline/report.html` for the baseline; the
   memorization entry alone for the KD + CE and DP students. One federated student (the organization
   holding the most canaries, exported with `federation.export`) gets the memorization and membership
   part: `<out>/federated-audit/audit/`.
6. Privacy against utility (`secure_kd.app.demo_tradeoff`): a membership attack with the teacher as
   the reference model (loss ratio) on every central model, the one-run DP audit of each DP run (its
   epsilon lower bound next to its claimed epsilon), `<out>/privacy_utility.png` (held-out perplexity
   against exposure and against the reference-attack AUC) and which comparisons are at matched
   utility (perplexities within 1.25x).
7. A summary table (`secure_kd.app.demo_summary`): perplexity, epsilon, one-run bound, exposure, MIA
   AUC, reference-attack AUC, clone agreement; under it, per audited model, every canary's rank among
   its 1,000 candidates and how many greedy decoding gives away (the exposure column is the most
   exposed canary's, not a statement about all of them), and the matched-utility verdicts.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from secure_kd.app.demo_summary import DemoResult, DemoRow, matched_lines, plot
from secure_kd.app.demo_summary import print_summary as _print_summary
from secure_kd.config import DistillJob, load_config
from secure_kd.data.synthetic import generate_corpus
from secure_kd.paths import atomic_write_json
from secure_kd.resources import configs_dir, packaged_config

CONFIGS = configs_dir()  # the packaged examples (secure_kd.resources): a wheel install runs the demo too


def _corpora(out: Path, n_private: int, n_heldout: int, n_public: int) -> tuple[Path, Path, Path]:
    """The private corpus (with canaries), held-out records nobody trains on (evaluation text and the
    membership audit's non-members) and public records for the warm start, each from its own seed."""
    data = out / "data"
    private = generate_corpus(n_private, seed=0, n_canaries=4, canary_repeats=4, secret_digits=3)
    private.to_jsonl(data / "private.jsonl")
    heldout = generate_corpus(n_heldout, seed=1, n_canaries=0)
    heldout.to_jsonl(data / "heldout.jsonl")
    public = generate_corpus(n_public, seed=2, n_canaries=0)
    public.to_jsonl(data / "public.jsonl")
    return data / "private.jsonl", data / "heldout.jsonl", data / "public.jsonl"


def _distill(
    out: Path, private: Path, heldout: Path, extra: list[str], log, cache: Path | None = None
) -> Any:
    from secure_kd.distill_job import run_distill

    overrides = [
        f"data.train={private}",
        f"data.heldout={heldout}",
        "data.max_length=48",
        f"out={out}",
        *([f"cache_dir={cache}"] if cache is not None else []),
        *extra,
    ]
    job = load_config(CONFIGS / "demo.yaml", overrides, DistillJob)
    return run_distill(job, log=log)


def _federate(out: Path, warm_start: Path) -> Any:
    from federation.config import load_federated_job
    from federation.run import run_federation

    # The demo owns its output: a re-run starts a fresh federation with its own privacy ledger, so its
    # epsilon is that of one run. Real jobs keep one ledger per dataset under $SECURE_KD_HOME, where
    # every run on the same records adds to the budget.
    if out.exists():
        shutil.rmtree(out)
    overrides = [f"out={out}", f"train.privacy.ledger_dir={out / 'ledgers'}", f"student.source={warm_start}"]
    return run_federation(load_federated_job(CONFIGS / "demo-federated.yaml", overrides), progress=True)


def _heldout_perplexity(model_dir: str, heldout: Path) -> float:
    """Perplexity on the demo's held-out records, as the central runs measure it (48 tokens, all 64)."""
    from secure_kd.config import EvalJob
    from secure_kd.eval_job import run_eval

    job = EvalJob(model=model_dir, data={"heldout": str(heldout), "max_length": 48}, batch_size=8)
    return run_eval(job, log=lambda *_: None).perplexity


def demo_audit_config(
    out: Path, model_dir: str, private: Path, heldout: Path, *, attacks: tuple[str, ...] | None = None
):
    """configs/demo-audit.yaml aimed at `model_dir`, trained on `private` (`heldout`: never trained on);
    `attacks` keeps only those suite entries."""
    from secure_kd.app.report.config import AuditConfig

    raw = yaml.safe_load((CONFIGS / "demo-audit.yaml").read_text())
    raw.update(model=model_dir, data=str(private), out=str(out))
    if attacks is not None:
        raw["suite"] = [entry for entry in raw["suite"] if entry["attack"] in attacks]
    for entry in raw["suite"]:
        entry["config_file"] = str(packaged_config(entry["config_file"]) or entry["config_file"])
        data = entry.get("config", {}).get("data", {})
        if data.get("members") == "MEMBERS":
            data.update(members=str(private), nonmembers=str(heldout))
    return AuditConfig.model_validate(raw)


def _audit(
    out: Path,
    model_dir: str,
    private: Path,
    heldout: Path,
    console: Console,
    attacks: tuple[str, ...] | None = None,
) -> Any:
    from secure_kd.app.report.audit import run_audit

    return run_audit(demo_audit_config(out, model_dir, private, heldout, attacks=attacks), console=console)


def _audit_federated(out: Path, run_dir: Path, heldout: Path, console: Console) -> tuple[Any, float]:
    """Export the federated student of the organization holding the most canaries, audit its memorization
    and membership (its own training records against records nobody trained on), and measure its
    perplexity on the demo's held-out records."""
    from federation.config import load_federated_job
    from federation.export import export_student, org_with_most_canaries
    from secure_kd.app.report.audit import run_audit

    org = org_with_most_canaries(load_federated_job(run_dir / "job.json"))
    shutil.rmtree(out / "export", ignore_errors=True)  # the demo owns it: an export needs an empty dir
    exported = export_student(run_dir, org, out / "export")
    console.print(
        f"auditing {org}'s student ({exported.canaries} canaries in its {exported.n_members} records)"
    )
    config = demo_audit_config(
        out / "audit",
        exported.model_dir,
        Path(exported.members),
        Path(exported.nonmembers),
        attacks=("memorization", "membership"),
    )
    return run_audit(config, console=console), _heldout_perplexity(exported.model_dir, heldout)


def _canaries(audit: Any) -> dict[str, Any]:
    """Per-canary figures of the audit's memorization entry (ranks, greedy extractions, the headline)."""
    from secure_kd.app.report.verdict import canary_headline

    for entry in audit.entries:
        run = next((r for r in entry.runs if r.status == "ok" and r.result), None)
        if entry.attack != "memorization" or run is None:
            continue
        ranks = [c["rank"] for c in run.result.get("exposure") or [] if c.get("rank") is not None]
        targeted = (run.result.get("extraction") or {}).get("canary_extraction") or []
        greedy = sum(bool(c["greedy_extracted"]) for c in targeted) if targeted else None
        return {
            "canary_ranks": ranks or None,
            "canaries_greedy_extracted": greedy,
            "canaries": canary_headline(run.result),
        }
    return {}


def _metric(audit: Any, name: str) -> float | None:
    values = [m.value for m in audit.measurements if m.metric == name]
    return max(values) if values else None


DP_EPSILONS = (8.0, 2.0)  # the two DP-KD rows
PRIVATE_EPOCHS = 1  # epochs of every private run, from the public warm start
AUDIT_CANARIES = 64  # one-run DP audit canaries of the DP rows (each inserted with probability 1/2)


def _dp_extra(out: Path, epsilon: float) -> list[str]:
    """A DP-KD run of its own (a fresh ledger in its directory, so its epsilon is one run's) with audit
    canaries; both DP runs insert the same canaries, so they share one teacher cache."""
    if out.exists():  # the demo owns it: a re-run must not find the budget spent by the last one
        shutil.rmtree(out)
    return [
        f"train.privacy.target_epsilon={epsilon}", "train.privacy.max_grad_norm=1.0",
        "train.privacy.grad_sample_mode=hooks", f"train.privacy.ledger_dir={out / 'ledgers'}",
        f"audit.canaries.n={AUDIT_CANARIES}", "audit.canaries.seed=0",
    ]  # fmt: skip


def _reference_attack(
    models: dict[str, str], teacher_dir: str, private: Path, heldout: Path, out: Path
) -> dict[str, dict]:
    """The reference-based membership attacks of `secure-kd audit --reference` on each model, the teacher
    as the reference: 64 training records (a seeded sample) against the 64 held-out records. The score
    cache is shared, so the teacher's statistics are computed once; `<out>/<model>/results.json` holds
    all six attacks (loss, reference, zlib, Min-K%, Min-K%++, offline RMIA)."""
    import random

    from secure_kd.app.reference_audit import ReferenceAuditConfig, run_reference_audit
    from secure_kd.paths import atomic_write_text, private_dir

    lines = [line for line in private.read_text().splitlines() if line.strip()]
    n_heldout = sum(1 for line in heldout.read_text().splitlines() if line.strip())
    members = private_dir(out) / "members.jsonl"
    sample = random.Random(0).sample(lines, min(len(lines), n_heldout))
    atomic_write_text(members, "\n".join(sample) + "\n", mode=0o600)
    found = {}
    for name, model_dir in models.items():
        config = ReferenceAuditConfig(
            model=model_dir, references=[teacher_dir], members=str(members), nonmembers=str(heldout),
            out=str(out / name), max_length=48, cache_dir=str(out / "scores"), n_bootstrap=300,
            progress=False,
        )  # fmt: skip
        attacks = {a.name: a for a in run_reference_audit(config).attacks}
        found[name] = {k: {"auc": a.auc, "ci": list(a.auc_ci)} for k, a in attacks.items()}
    return found


def _one_run(run_dir: str | Path) -> float | None:
    from secure_kd.audit_canaries import audit_canary_run

    return audit_canary_run(run_dir)["epsilon_lower_bound"]


def run_demo(out: str | Path = "runs/demo", *, console: Console | None = None) -> DemoResult:
    console = console or Console()
    out = Path(out)
    seconds: dict[str, float] = {}

    def stage(name: str, fn, *args, **kwargs):
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - started, 1)
        console.print(f"{name}: {seconds[name]:.0f} s")
        return value

    from secure_kd.assets import fetch_smollm2

    teacher_dir = stage(
        "teacher asset (SmolLM2-135M-Instruct, Q4_1)", lambda: fetch_smollm2(log=console.print)
    )
    private, heldout, public = stage("corpora: private with canaries, held-out, public", _corpora, out, 200,
                                     64, 200)  # fmt: skip
    log = console.print
    warm = stage("warm start: distillation on public records (no private data, no privacy cost)", _distill,
                 out / "public-kd", public, heldout, [], log, out / "teacher-cache-public")  # fmt: skip
    # Every private run starts from the public student, as a user would start from a public checkpoint:
    # the private stages then compare what the private records add, at utility a DP run can reach.
    start = [f"student.source={warm.student_dir}", f"train.epochs={PRIVATE_EPOCHS}"]
    cache, dp_cache = out / "teacher-cache", out / "teacher-cache-canaries"  # one top-k pass each
    runs = {
        "student": stage("central distillation from the cached teacher", _distill, out / "kd", private,
                         heldout, start, log, cache),
        "kd_ce": stage("KD with a cross-entropy mix", _distill, out / "kd-ce", private, heldout,
                       [*start, "kd.ce_weight=0.5"], log, cache),
        "baseline": stage("baseline: plain fine-tuning", _distill, out / "baseline", private, heldout,
                          [*start, "kd.kd_weight=0", "kd.ce_weight=1"], log, cache),
    }  # fmt: skip
    for eps in DP_EPSILONS:
        run_dir = out / f"dp-kd-eps{eps:g}"
        runs[f"dp{eps:g}"] = stage(
            f"DP-SGD distillation at epsilon {eps:g}", _distill, run_dir, private, heldout,
            [*start, *_dp_extra(run_dir, eps)], log, dp_cache,
        )  # fmt: skip
    fed = stage("federated distillation: 4 organizations, CKKS, DP-SGD", _federate, out / "federated",
                warm.student_dir)  # fmt: skip
    fed_audit, fed_perplexity = stage(
        "audit of a federated student", _audit_federated, out / "federated-audit", out / "federated", heldout,
        console,
    )  # fmt: skip
    audits = {
        "student": stage("audit of the distilled student", _audit, out / "audit", runs["student"].student_dir,
                         private, heldout, console),
        # the baseline shares the student's architecture and API: hidden-size recovery and cloning would
        # repeat the student's figures, so it gets the privacy part of the suite
        "baseline": stage("audit of the baseline", _audit, out / "audit-baseline",
                          runs["baseline"].student_dir, private, heldout, console,
                          attacks=("memorization", "membership")),
    }  # fmt: skip
    runs = {"public": warm, **runs}  # the control: what a model that never saw a private record shows
    for name in ("public", "kd_ce", *(f"dp{eps:g}" for eps in DP_EPSILONS)):  # memorization only: exposure
        audits[name] = stage(
            f"audit of {name} (memorization)", _audit, out / f"audit-{name}", runs[name].student_dir, private,
            heldout, console, attacks=("memorization",),
        )  # fmt: skip
    reference = stage(
        "membership with the teacher as reference", _reference_attack,
        {name: str(run.student_dir) for name, run in runs.items()}, str(teacher_dir), private, heldout,
        out / "reference-audit",
    )  # fmt: skip
    bounds = {f"dp{eps:g}": _one_run(out / f"dp-kd-eps{eps:g}") for eps in DP_EPSILONS}
    rows = [
        DemoRow(
            model="teacher (SmolLM2-135M Q4_1)",
            perplexity=runs["student"].teacher_eval.perplexity,
            epsilon=None,
            exposure_bits=None,
            mia_auc=None,
            clone_agreement=None,
            note="public model; never saw the private corpus; the reference of the reference attack",
        )
    ]
    labels = {
        "public": "public warm start (no private records)",
        "student": "KD student (forward KL, cache)",
        "kd_ce": "KD + CE mix (0.5)",
        "baseline": "fine-tuned baseline",
        **{f"dp{eps:g}": f"DP KD (target eps {eps:g})" for eps in DP_EPSILONS},
    }
    for name, label in labels.items():
        audit, result = audits[name], runs[name]
        privacy = result.privacy or {}
        rows.append(
            DemoRow(
                model=label,
                perplexity=result.student_after.perplexity,
                epsilon=privacy.get("run_epsilon"),
                exposure_bits=_metric(audit, "max_exposure_bits"),
                mia_auc=_metric(audit, "mia_auc"),
                clone_agreement=_metric(audit, "clone_agreement"),
                reference_auc=reference[name]["reference"]["auc"],
                reference_auc_ci=reference[name]["reference"]["ci"],
                one_run_bound=bounds.get(name),
                **_canaries(audit),
                note=(
                    "public records only: the control"
                    if name == "public"
                    else f"DP-SGD, {AUDIT_CANARIES} audit canaries"
                    if privacy
                    else f"no DP; {PRIVATE_EPOCHS} epoch(s) on the private records from the warm start"
                )  # fmt: skip
                + (f"; failed: {', '.join(audit.failed)}" if audit.failed else ""),
            )
        )
    rows.append(_federated_row(fed, fed_audit, fed_perplexity))
    failed = [
        f"{name}: {line}"
        for name, audit in (*audits.items(), ("federated", fed_audit))
        for line in (e.failure_line() for e in audit.entries)
        if line
    ]
    result = DemoResult(
        rows=rows,
        failed=failed,
        stage_seconds=seconds,
        reports={
            name: str(out / d / "report.html")
            for name, d in (
                ("student", "audit"),
                ("baseline", "audit-baseline"),
                ("federated", "federated-audit/audit"),
            )
        },
        matched=matched_lines(rows),
        plot=plot(rows, out),
    )
    atomic_write_json(out / "summary.json", result.model_dump(mode="json"))
    _print_summary(result, console)
    return result


def _federated_row(fed: Any, fed_audit: Any, perplexity: float) -> DemoRow:
    epsilons = [e for e in fed.epsilon.values() if e is not None]
    return DemoRow(
        model=f"federated x{len(fed.organizations)} (CKKS+DP)",
        perplexity=perplexity,
        epsilon=max(epsilons) if epsilons else None,
        exposure_bits=_metric(fed_audit, "max_exposure_bits"),
        mia_auc=_metric(fed_audit, "mia_auc"),
        clone_agreement=None,
        **_canaries(fed_audit),
        note="from the warm start, 8 DP-SGD steps and one CKKS soft-label exchange; perplexity and audit of "
        "the organization holding the most canaries (memorization, membership)"
        + (f"; failed: {', '.join(fed_audit.failed)}" if fed_audit.failed else ""),
    )
