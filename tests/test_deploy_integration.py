"""A real deployment on loopback: Flower's own `flower-superlink` (TLS + SuperNode authentication) and
three `flower-supernode`s (alpha, beta, gamma; each with its own key, org dir and data file as node
config), registered with `secure-kd deploy register-org` (`flwr supernode register`), then `flwr run`
of 2 rounds of CKKS-aggregated federated distillation with tiny models. Also checked: a SuperNode with an
unregistered key and one without TLS are refused with a message that says why; gamma's SuperNode is
killed after round 1 and the run still completes because min_clients=2 still answer.

Every process runs in its own session on free 127.0.0.1 ports, is bounded in time, and is killed by its
process group (and its descendants by pid) at the end even when the test fails; logs are in tmp_path and
printed on failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from federation.config import load_federated_job
from federation.deploy import DeployError, copy_trust, init_org, init_superlink, write_demo_data
from federation.deploy_launch import (
    explain_refusal,
    flower_env,
    flower_executable,
    launch,
    superlink_command,
    supernode_command,
    write_connection,
)
from secure_kd.cli import app

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ORGS = ("alpha", "beta", "gamma")
RUN_LIMIT_S = 300  # bound on each wait for the run (quiet 2 cores need far less)
CONNECTION = "loopback"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A subprocess in its own session, logging to a file; `stop` kills its group and descendants."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict, cwd: Path | None = None) -> None:
        self.name, self.log = name, log
        self.handle = log.open("w")
        self.popen = subprocess.Popen(
            command, stdout=self.handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def stop(self) -> None:
        try:
            descendants = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is None:
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue
        for child in descendants:  # e.g. flower-superexec, started in a session of its own
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.handle.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@pytest.fixture
def processes(tmp_path):
    """Started processes, stopped at teardown whatever happened; their logs are printed then (pytest
    shows a test's captured output only when it fails)."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()
    for log in sorted(tmp_path.glob("*.log")):
        print(f"----- {log.name} -----\n{log.read_text(errors='replace')[-6000:]}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_tls_authenticated_deployment(tmp_path, processes):
    started = time.monotonic()
    env = flower_env({**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONUNBUFFERED": "1"})
    link = init_superlink(tmp_path / "operator", ["127.0.0.1"])
    port = free_port()
    processes.append(
        Process("superlink", superlink_command(link.directory, port=port), tmp_path / "superlink.log", env)
    )
    superlink = processes[-1]
    wait_for(lambda: port_open(port) or superlink.popen.poll() is not None, 90, "the SuperLink's port")
    assert superlink.popen.poll() is None, "the SuperLink exited: see superlink.log below"
    write_connection(env["FLWR_HOME"], name=CONNECTION, address=f"127.0.0.1:{port}", ca_cert=link.ca_cert)

    # each organization makes its keys; the operator registers the three public bundles
    orgs = {name: init_org(name, tmp_path / name) for name in (*ORGS, "mallory")}
    runner = CliRunner(env={"FLWR_HOME": env["FLWR_HOME"]})
    for name in ORGS:
        result = runner.invoke(
            app,
            ["deploy", "register-org", "--superlink-dir", str(link.directory),
             "--bundle", str(orgs[name].registration), "--connection", CONNECTION,
             "--flwr-home", env["FLWR_HOME"]],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    registry = json.loads(link.registry.read_text())
    assert sorted(registry) == list(ORGS) and all(entry["node_id"] for entry in registry.values())

    # the job: the shipped tiny deployment config, three organizations, min_clients 2
    raw = yaml.safe_load((ROOT / "configs" / "deploy-tiny.yaml").read_text())
    raw.update(
        out=str(tmp_path / "run"), n_organizations=3, organizations=list(ORGS), min_clients=2,
        round_timeout_s=90, join_timeout_s=120,
    )  # fmt: skip
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(raw))
    data = write_demo_data(load_federated_job(job_path), tmp_path / "data")

    def supernode(name: str, **extra) -> list[str]:
        trust = copy_trust(link.directory, tmp_path / name / "trust")
        return supernode_command(
            orgs[name].directory, org=name, superlink=f"127.0.0.1:{port}", ca_cert=link.ca_cert,
            data=data.get(name, data["alpha"]), trust_dir=trust, clientappio_port=free_port(),
            ledger_dir=tmp_path / name / "ledgers", **extra,
        )  # fmt: skip

    # refused: a SuperNode whose key was never registered, and one that does not speak TLS
    with pytest.raises(DeployError, match="not registered"):
        launch(
            supernode("mallory", max_wait_s=10) + ["--max-retries", "1"],
            log_path=tmp_path / "mallory.log",
            timeout_s=60,
        )
    insecure = [
        flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
        "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10",
    ]  # fmt: skip
    with pytest.raises(DeployError, match="TLS"):
        launch(insecure, log_path=tmp_path / "plaintext.log", timeout_s=60)
    assert "2004" in (tmp_path / "superlink.log").read_text()  # the SuperLink's own refusal line

    for name in ORGS:
        processes.append(Process(name, supernode(name), tmp_path / f"{name}.log", env))
    submit = subprocess.run(
        [flower_executable("flwr"), "run", ".", CONNECTION, "--run-config",
         f"config='{job_path}' overrides=''"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    out = tmp_path / "run" / "results.json"

    # kill gamma's SuperNode once round 1 is recorded: round 2 must still aggregate alpha and beta
    def round_one():
        current = results(out)
        return current if current and (current["rounds"] or current.get("error")) else None

    first = wait_for(round_one, RUN_LIMIT_S, "round 1 in results.json", interval=1)
    assert first["rounds"] and first["rounds"][0]["answered"] == list(ORGS), first
    gamma = next(p for p in processes if p.name == "gamma")
    gamma.stop()

    def finished():
        current = results(out)
        return current if current and (current["completed"] or current.get("error")) else None

    final = wait_for(finished, RUN_LIMIT_S, "the end of the run", interval=1)
    assert final["completed"], final.get("error")
    assert final["organizations"] == list(ORGS)
    ceremony = final["setup"]["key_ceremony"]
    assert ceremony["key_holders"] == 3 and ceremony["dealer"] in ORGS
    one, two = final["rounds"]
    assert one["answered"] == list(ORGS) and one["aggregate"]["contributors"] == 3
    assert two["answered"] == ["alpha", "beta"] and two["aggregate"]["kind"] == "ckks-sum"
    assert two["aggregate"]["contributors"] == 2
    assert [d["org"] for d in two["dropped"]] == ["gamma"]
    assert final["final"]["answered"] == ["alpha", "beta"]
    for record in (one, two):
        assert 0 < record["summary"]["test-loss"] < 20
    # node config (the data paths) never reached the SuperLink side
    server_side = (tmp_path / "superlink.log").read_text() + out.read_text()
    assert not any(str(path) in server_side for path in data.values())
    print(f"deployment test: {time.monotonic() - started:.1f} s")
    assert explain_refusal((tmp_path / "mallory.log").read_text())
