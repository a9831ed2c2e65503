"""The example configs ship inside the package: a wheel, installed into a fresh venv, validates its own
examples and starts its demo from another directory; in the checkout (an editable install) the same
names resolve to configs/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.app.report.plan import suite_config_file
from secure_kd.resources import configs_dir, example_configs, packaged_config

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT_CONFIGS = sorted(
    p.relative_to(ROOT / "configs").as_posix()
    for p in (ROOT / "configs").rglob("*")
    if p.suffix in (".yaml", ".jsonl")
)


def test_the_checkout_configs_are_the_packaged_ones():
    """Editable install: the package's configs are the checkout's configs/ directory itself."""
    assert configs_dir().resolve() == (ROOT / "configs").resolve()
    assert example_configs() == CHECKOUT_CONFIGS
    assert {"tiny.yaml", "demo.yaml", "demo-audit.yaml", "federated-he.yaml", "attacks/clone.yaml"} <= set(
        CHECKOUT_CONFIGS
    )


def test_packaged_config_names():
    assert packaged_config("configs/attacks/clone.yaml") == configs_dir() / "attacks" / "clone.yaml"
    assert packaged_config("tiny.yaml") == configs_dir() / "tiny.yaml"
    for outside in ("configs/../pyproject.toml", "../pyproject.toml", "/etc/hostname", "configs/nope.yaml"):
        assert packaged_config(outside) is None, outside
    assert packaged_config("configs/__init__.py") is None  # data files only
    assert packaged_config("configs") is None


def test_a_suite_config_file_falls_back_to_the_packaged_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert suite_config_file("configs/attacks/clone.yaml") == configs_dir() / "attacks" / "clone.yaml"
    own = tmp_path / "configs" / "attacks" / "clone.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("seed: 3\n")
    assert suite_config_file("configs/attacks/clone.yaml") == Path("configs/attacks/clone.yaml")  # cwd wins
    assert suite_config_file("configs/attacks/missing.yaml") == Path("configs/attacks/missing.yaml")


def test_examples_lists_and_copies_without_overwriting(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["examples"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[1:] == [f"configs/{name}" for name in CHECKOUT_CONFIGS]
    done = runner.invoke(app, ["examples", "--copy", str(tmp_path)])
    assert done.exit_code == 0, done.output
    for name in CHECKOUT_CONFIGS:
        assert (tmp_path / "configs" / name).read_bytes() == (ROOT / "configs" / name).read_bytes()
    edited = tmp_path / "configs" / "tiny.yaml"
    edited.write_text("mine\n")
    (tmp_path / "configs" / "demo.yaml").unlink()
    refused = runner.invoke(app, ["examples", "--copy", str(tmp_path)])
    assert refused.exit_code == 2 and "exists" in refused.output and "Traceback" not in refused.output
    assert edited.read_text() == "mine\n" and not (tmp_path / "configs" / "demo.yaml").exists()


def test_no_engine_or_app_module_finds_configs_by_its_own_location():
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted((ROOT / "secure_kd").rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "__file__" in line and "configs" in line
    ]
    assert offenders == []


# --------------------------------------------------------------------------- the wheel, in a fresh venv


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done


def test_the_wheel_ships_its_configs_and_runs_from_another_directory(tmp_path):
    """Build a wheel from a copy of the sources (nothing is written into the checkout), install it into a
    fresh venv whose only other packages are this interpreter's (a .pth line: torch and the rest, without
    the network), and run `secure-kd` from an empty directory."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("secure_kd", "federation", "attacks", "defenses", "apparatus", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip"]
    # no build isolation: the build uses this environment's setuptools instead of downloading one
    _run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        tmp_path,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("secure_kd-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
        ).stdout.strip()
    )
    (purelib / "_secure_kd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            *pip,
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        tmp_path,
        env,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [str(python), "-c", "import secure_kd; from secure_kd.resources import configs_dir; "
         "print(secure_kd.__file__); print(configs_dir())"],
        elsewhere, env,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(purelib) for p in where), where  # the wheel's, not the checkout's
    packaged = Path(where[1])
    assert (
        sorted(
            p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.suffix in (".yaml", ".jsonl")
        )
        == CHECKOUT_CONFIGS
    )

    cli = str(venv / "bin" / "secure-kd")
    # audit.yaml names its attacks' configs as configs/attacks/...: there are none in `elsewhere`
    for name, kind in (
        ("tiny.yaml", []),
        ("audit.yaml", []),
        ("attacks/clone.yaml", ["--kind", "attack:clone"]),
    ):
        checked = _run([cli, "validate", str(packaged / name), *kind], elsewhere, env)
        assert checked.stdout.strip().splitlines()[-1] == "ok", (name, checked.stdout, checked.stderr)
    demo = _run([cli, "demo", "--help"], elsewhere, env)
    assert "Usage: secure-kd demo" in demo.stdout
    listed = _run([cli, "examples"], elsewhere, env).stdout.splitlines()
    assert listed[0] == f"# {packaged}" and "configs/demo.yaml" in listed
    assert sorted(os.listdir(elsewhere)) == []  # nothing written where it ran
