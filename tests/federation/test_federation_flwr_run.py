"""`flwr run .` with CKKS, as docs/federation.md tells a user to do it (issue 19 item 6): a simulation
SuperLink (`flower-superlink --insecure --simulation --disable-runtime-dependency-installation`), the
shipped `configs/deploy-tiny.yaml` (fed_distill under CKKS with the key ceremony), no Python step first.

Before, the key ceremony failed ("no *.json bundles in <out>/trust") unless `prepare_organizations(job)`
had been called from Python, and `flwr run --stream` exited 0 all the same. Now each organization of a
simulation SuperLink registers its own bundle in `<out>/trust` on `query.hello` (`federation.client.guard`).

What Flower 1.41 lets a ServerApp do about the outcome: raising from `main` makes the run's status
`finished:failed` (`flwr ls`), but `flwr run --stream` exits 0 whatever the status (its log stream ends
without reading it); the second run checks both, so a Flower upgrade that changes either shows up here.

Processes run in their own sessions on a free 127.0.0.1 port with FLWR_HOME in tmp_path, bounded in time,
and are killed by process group at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.run import write_flwr_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_LIMIT_S = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flwr(env: dict, *args: str, timeout: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _status(env: dict, run_id: int) -> str:
    listed = _flwr(env, "ls", "secure-kd", "--run-id", str(run_id), "--format", "json", timeout=60)
    runs = json.loads(listed.stdout)["runs"]
    return runs[0]["status"]


@pytest.fixture
def superlink(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    write_flwr_config(address=f"127.0.0.1:{port}", home=env["FLWR_HOME"])
    log = (tmp_path / "superlink.log").open("w")
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation", "--port", str(port),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert process.poll() is None, (tmp_path / "superlink.log").read_text()
        time.sleep(0.5)
    yield env
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
    log.close()
    print((tmp_path / "superlink.log").read_text(errors="replace")[-4000:])


def _run(env: dict, out: Path, extra: str = "") -> tuple[subprocess.CompletedProcess, int]:
    overrides = f"out={out};rounds=1;round_timeout_s=240;join_timeout_s=120{extra}"
    done = _flwr(
        env, "run", ".", "secure-kd", "--stream",
        "--federation-config", "num-supernodes=2",
        "--run-config", f"config='configs/deploy-tiny.yaml' overrides='{overrides}'",
    )  # fmt: skip
    found = re.search(r"Successfully started run (\d+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    return done, int(found.group(1))


def test_flwr_run_with_ckks_needs_no_python_step_and_a_failed_run_is_failed(superlink, tmp_path):
    done, run_id = _run(superlink, tmp_path / "ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert result["completed"], result.get("error")
    assert result["setup"]["key_ceremony"]["key_holders"] == 2
    assert result["rounds"][0]["aggregate"]["kind"] == "ckks-sum"
    assert sorted(p.name for p in (tmp_path / "ok" / "trust").glob("*.json")) == ["alpha.json", "beta.json"]
    assert _status(superlink, run_id) == "finished:completed"

    # a run the organizations refuse (the run would inject faults into beta): the ServerApp raises
    failed, failed_id = _run(superlink, tmp_path / "refused", ";simulate_faults={1: nan}")
    result = json.loads((tmp_path / "refused" / "results.json").read_text())
    assert not result["completed"]
    assert "beta: client failed: secure-kd/policy-refused at hello from beta" in result["error"]
    assert "simulate_faults names this organization (index 1)" in result["error"]
    assert _status(superlink, failed_id) == "finished:failed"
    assert failed.returncode == 0  # Flower 1.41: `flwr run --stream` does not report the run's status
