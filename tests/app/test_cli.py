"""The command line: validate prints ok or every problem (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import DistillJob, load_config
from secure_kd.data import generate_corpus

runner = CliRunner()


def test_validate_ok():
    result = runner.invoke(app, ["validate", "configs/tiny.yaml"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok"


def test_validate_reports_every_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd: {temperature: 0, params: {beta: 2}}\ntrain: {lr: -1}\nbogus: 1\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    text = result.output
    assert "Traceback" not in text
    for field in ("kd.temperature", "train.lr", "bogus"):
        assert field in text


def test_validate_with_override_error():
    result = runner.invoke(app, ["validate", "configs/tiny.yaml", "--set", "kd.params.beta=-0.5"])
    assert result.exit_code == 2 and "beta" in result.output


def test_distill_missing_config_file():
    result = runner.invoke(app, ["distill", "--config", "nope.yaml"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bench_unknown_name():
    result = runner.invoke(app, ["bench", "no_such_bench"])
    assert result.exit_code == 2 and "no benchmark" in result.output


def test_attack_list_and_unknown():
    listed = runner.invoke(app, ["attack", "list"])
    assert listed.exit_code == 0 and "logit_leak" in listed.output
    unknown = runner.invoke(app, ["attack", "no_such_attack"])
    assert unknown.exit_code == 2 and "available" in unknown.output


def test_attack_logit_leak_from_cli(tmp_path):
    result = runner.invoke(
        app, ["attack", "logit_leak", "--config", "configs/attacks/logit_leak.yaml", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    import json

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == 1
    assert data["estimated_hidden_size"] == data["true_hidden_size"]


def test_attack_bad_config_is_a_user_error(tmp_path):
    result = runner.invoke(
        app, ["attack", "logit_leak", "--config", "configs/attacks/logit_leak.yaml", "--set", "bogus=1"]
    )
    assert result.exit_code == 2 and "bogus" in result.output


def test_validate_federated_configs():
    for name in ("configs/federated-he.yaml", "configs/federated-plain.yaml", "configs/federated-p2p.yaml"):
        for kind in (["--kind", "federate"], []):  # the kind is inferred from the keys without --kind
            result = runner.invoke(app, ["validate", name, *kind])
            assert result.exit_code == 0, result.output


def test_federate_bad_override_is_a_user_error():
    result = runner.invoke(
        app, ["federate", "--config", "configs/federated-plain.yaml", "--set", "rounds=-1"]
    )
    assert result.exit_code == 2 and "rounds" in result.output


def test_threads_option_sets_torchs_thread_count():
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        result = runner.invoke(app, ["--threads", str(wanted), "validate", "configs/tiny.yaml"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == wanted
        refused = runner.invoke(app, ["--threads", "0", "validate", "configs/tiny.yaml"])
        assert refused.exit_code == 2 and "--threads" in refused.output
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- issue 19: tracebacks, validate

ROOT = Path(__file__).resolve().parents[2]
CRASH = """
import sys
import secure_kd.distill_job as job

def planted(*args, **kwargs):
    raise TypeError("planted crash after the records were read")

job._tokenizer = planted
mode, data, out = sys.argv[1:4]
sys.argv = ["secure-kd", "distill", "-c", "configs/tiny.yaml", "--set", f"data.train={data}", "-o", out,
            "--no-progress"]
from secure_kd.app import cli
if mode == "rich":  # typer's defaults before the fix: a rich traceback with every frame's locals
    cli.app.pretty_exceptions_enable = True
    cli.app.pretty_exceptions_show_locals = True
    cli.app()
else:
    cli.main()
"""


def _crash(mode: str, tmp_path: Path, debug: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    corpus = generate_corpus(12, seed=11, n_canaries=0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "private.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus.records))
    pii = [r["text"][s["start"] : s["end"]] for r in corpus.records for s in r["pii_spans"]]
    env = {k: v for k, v in os.environ.items() if k != "SECURE_KD_DEBUG"}
    env["COLUMNS"] = "200"
    if debug:
        env["SECURE_KD_DEBUG"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", CRASH, mode, str(data), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return done, [value for value in pii if len(value) >= 6]


def test_a_crash_on_private_data_prints_no_record_contents(tmp_path):
    """Issue 19: a crash printed a 3,288-line rich traceback whose locals held the training records."""
    rich, pii = _crash("rich", tmp_path / "rich")
    assert rich.returncode != 0
    assert [v for v in pii if v in rich.stdout + rich.stderr], "the frames do hold the records (reference)"
    done, pii = _crash("main", tmp_path / "main")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert not [v for v in pii if v in output]
    assert "stopped on an unexpected TypeError" in output and "planted crash" in output
    assert "Traceback (most recent call last)" not in output and "╭" not in output
    assert len(output[output.index("error:") :].strip().splitlines()) == 2  # the error and the hint
    debug, pii = _crash("main", tmp_path / "debug", debug=True)
    output = debug.stdout + debug.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in output
    assert not [v for v in pii if v in output]  # a traceback, but no local variables


def test_every_typer_app_is_built_without_locals():
    from secure_kd.app.cli import assets_app

    for typer_app in (app, assets_app):
        assert typer_app.pretty_exceptions_enable is False
        assert typer_app.pretty_exceptions_show_locals is False


def test_the_readme_tour_switch_to_reverse_kl_is_caught_by_validate():
    """Issue 19: `--set kd.loss=reverse_kl` on tiny.yaml validated ok, then crashed on jsd's beta."""
    args = ["configs/tiny.yaml", "--set", "kd.loss=reverse_kl"]
    checked = runner.invoke(app, ["validate", *args])
    assert checked.exit_code == 2
    text = " ".join(checked.output.split())
    assert "params ['beta'] do not apply to loss 'reverse_kl', which takes no parameters" in text
    assert "--set kd.params={}" in text
    ran = runner.invoke(app, ["distill", "-c", *args])
    assert ran.exit_code == 2 and "beta" in ran.output  # refused before anything is built
    fixed = runner.invoke(app, ["validate", *args, "--set", "kd.params={}"])
    assert fixed.exit_code == 0, fixed.output
    skew = runner.invoke(app, ["validate", "configs/tiny.yaml", "--set", "kd.loss=skew_forward_kl"])
    assert skew.exit_code == 2 and "which takes alpha" in skew.output


def test_every_distill_command_of_the_readme_validates():
    """The README's own commands: each `secure-kd distill ...` line passes `validate` with its options."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [ln.split("#")[0].split() for ln in readme.splitlines() if ln.startswith("secure-kd distill ")]
    assert len(lines) >= 3
    for words in lines:
        args, it = [], iter(words[2:])
        for word in it:
            if word in ("-c", "--config"):
                args.insert(0, next(it))
            elif word in ("-s", "--set"):
                args += ["--set", next(it)]
            elif word in ("-o", "--out"):
                next(it)
        done = runner.invoke(app, ["validate", *args])
        assert done.exit_code == 0, (words, done.output)


def test_validate_infers_the_kind_of_every_shipped_job_config():
    kinds = {
        "configs/tiny.yaml": "distill", "configs/federated-he.yaml": "federate",
        "configs/federated-plain.yaml": "federate", "configs/federated-p2p.yaml": "federate",
        "configs/audit.yaml": "audit", "configs/audit-lm.yaml": "audit",
        "configs/audit-scenarios.yaml": "audit",
    }  # fmt: skip
    from secure_kd.app.cli import infer_kind
    from secure_kd.config import read_yaml

    for path, kind in kinds.items():
        assert infer_kind(read_yaml(ROOT / path)) == kind, path
        if path != "configs/audit-lm.yaml":  # the default suite needs a model
            done = runner.invoke(app, ["validate", str(ROOT / path)])  # no --kind
            assert done.exit_code == 0, (path, done.output)
    assert infer_kind({"model": "m", "data": {"heldout": "h.jsonl"}}) == "eval"
    assert infer_kind({"model": "m", "data": "records.jsonl"}) == "audit"


def test_a_kind_field_is_read_and_checked(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text() + "kind: distill\n")
    assert runner.invoke(app, ["validate", str(config)]).exit_code == 0
    load_config(config, [], DistillJob)  # `distill --config` accepts it too
    config.write_text((ROOT / "configs/tiny.yaml").read_text() + "kind: federate\n")
    done = runner.invoke(app, ["distill", "-c", str(config)])
    assert (
        done.exit_code == 2 and "is a 'federate' config but was given to a 'distill' command" in done.output
    )


def test_the_schema_flag_the_unknown_key_message_points_to_exists(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus: 1\n")
    message = runner.invoke(app, ["validate", str(bad)]).output
    assert "secure-kd validate --schema" in message
    every = runner.invoke(app, ["validate", "--schema"])
    assert every.exit_code == 0
    schemas = json.loads(every.output)
    assert set(schemas) == {"distill", "eval", "federate", "audit"}
    assert "kd" in schemas["distill"]["properties"] and schemas["distill"]["additionalProperties"] is False
    one = json.loads(
        runner.invoke(app, ["validate", str(ROOT / "configs/federated-he.yaml"), "--schema"]).output
    )
    assert one["title"] == "FederatedJob" and "n_organizations" in one["properties"]
    attack = json.loads(runner.invoke(app, ["validate", "--schema", "--kind", "attack:memorization"]).output)
    assert "secrets" in attack["$defs"]["CorpusConfig"]["properties"]
