"""A real deployment on loopback: Flower's own `flower-superlink` (TLS + SuperNode authentication) bound to
127.0.0.1, the Fleet-only gateway on 127.0.0.2 (this test's stand-in for the operator's public address),
and three `flower-supernode`s (alpha, beta, gamma; each with its own key, org dir, data file and app gate)
dialling the gateway, registered with `secure-kd deploy register-org` (`flwr supernode register`), then
`flwr run` of 2 rounds of CKKS-aggregated federated distillation with tiny models, the ServerApp binding
each organization to its registered node. Also checked:

- an outsider holding ca.pem on the public address cannot `flwr run`, `flwr ls` or `flwr supernode
  register`, and the SuperLink's own port is not open there;
- an app no organization approved, submitted through the Control API, is refused by every SuperNode
  before any of its code runs (it would copy kex.pem), with the refusal in the reply;
- a SuperNode with an unregistered key and one without TLS are refused with a message that says why;
- alpha's SuperNode takes its key on stdin, its key file moved away before the run;
- gamma's SuperNode is killed after round 1 and the run still completes (min_clients=2 still answer).

Every process runs in its own session on free 127.0.0.1 ports, is bounded in time, and is killed by its
process group (and its descendants by pid) at the end even when the test fails; logs are in tmp_path and
printed on failure."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from federation.config import load_federated_job
from federation.deploy.app_gate import approve, fab_bytes_of_app, fab_hash_of_app
from federation.deploy.files import DeployError, init_org, init_superlink, write_demo_data
from federation.deploy.launch import (
    approved_apps_file,
    explain_refusal,
    flower_env,
    flower_executable,
    gateway_command,
    launch,
    run_config,
    superlink_command,
    supernode_command,
    write_connection,
)
from federation.deploy.node_binding import format_node_ids
from federation.deploy.registry import copy_trust
from secure_kd.app.cli import app

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ORGS = ("alpha", "beta", "gamma")
RUN_LIMIT_S = 300  # bound on each wait for the run (quiet 2 cores need far less)
CONNECTION = "loopback"
PUBLIC = "127.0.0.2"  # the operator machine's "public" interface: another loopback address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A subprocess in its own session, logging to a file; `stop` kills its group and descendants."""

    def __init__(
        self,
        name: str,
        command: list[str],
        log: Path,
        env: dict,
        cwd: Path | None = None,
        stdin: bytes | None = None,
    ) -> None:
        self.name, self.log = name, log
        self.handle = log.open("w")
        self.popen = subprocess.Popen(
            command,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        )
        if stdin is not None:
            self.popen.stdin.write(stdin)
            self.popen.stdin.close()

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


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def snapshot_app(out: Path) -> Path:
    """This app as `flwr run .` would ship it now, unpacked: the run and its approval use the same bytes
    even while the working tree changes."""
    with zipfile.ZipFile(io.BytesIO(fab_bytes_of_app(ROOT))) as fab:
        fab.extractall(out)
    return out


EVIL_SERVER = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config["out"])
    deadline, nodes = time.time() + 60, []
    while len(nodes) < 3 and time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.2)
    content = RecordDict({"c": ConfigRecord({"x": 1})})
    asks = [Message(content, dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(asks, timeout=120)
    found = [
        {"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None} for r in replies
    ]
    out.write_text(json.dumps(found))
"""
EVIL_CLIENT = """
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def steal(message, context):
    key = Path(context.node_config["org-dir"]) / "keys" / "kex.pem"
    stolen = Path(context.run_config["out"]).parent / f"stolen-{context.node_id}.pem"
    stolen.write_bytes(key.read_bytes())
    return Message(RecordDict(), reply_to=message)
"""


def evil_app(directory: Path) -> Path:
    """An app nobody approved: its ClientApp copies the organization's kex.pem out."""
    (directory / "evil").mkdir(parents=True)
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "mallory"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil.server:app"\nclientapp = "evil.client:app"\n\n'
        '[tool.flwr.app.config]\nout = "none"\n'
    )
    (directory / "evil" / "__init__.py").write_text("")
    (directory / "evil" / "server.py").write_text(EVIL_SERVER)
    (directory / "evil" / "client.py").write_text(EVIL_CLIENT)
    return directory


def results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def flwr(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(
        [flower_executable("flwr"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_tls_authenticated_deployment(tmp_path, processes):
    started = time.monotonic()
    env = flower_env({**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONUNBUFFERED": "1"})
    link = init_superlink(tmp_path / "operator", [PUBLIC])
    port, fleet_port = free_port(), free_port()
    processes.append(
        Process("superlink", superlink_command(link.directory, port=port), tmp_path / "superlink.log", env)
    )
    superlink = processes[-1]
    gateway = gateway_command(link.directory, listen=f"{PUBLIC}:{fleet_port}", upstream_port=port)
    processes.append(Process("gateway", gateway, tmp_path / "gateway.log", env))
    wait_for(lambda: port_open(port) or superlink.popen.poll() is not None, 90, "the SuperLink's port")
    wait_for(lambda: port_open(fleet_port, PUBLIC), 60, "the fleet gateway's port")
    assert superlink.popen.poll() is None, "the SuperLink exited: see superlink.log below"
    write_connection(env["FLWR_HOME"], name=CONNECTION, address=f"127.0.0.1:{port}", ca_cert=link.ca_cert)

    # an outsider with the public CA certificate, on the public address: no Control API there
    assert not port_open(port, PUBLIC)  # the SuperLink's own port does not listen on the public interface
    write_connection(
        env["FLWR_HOME"], name="outsider", address=f"{PUBLIC}:{fleet_port}", ca_cert=link.ca_cert
    )
    orgs = {name: init_org(name, tmp_path / name) for name in (*ORGS, "mallory")}
    outsider_started = time.monotonic()
    outsider = {
        "run": flwr(["run", ".", "outsider", "--format", "json"], env),
        "ls": flwr(["ls", "outsider", "--format", "json"], env),
        "register": flwr(
            ["supernode", "register", str(orgs["mallory"].node_pub), "outsider", "--format", "json"], env
        ),
    }
    for what, call in outsider.items():
        output = call.communicate(timeout=120)[0]
        reply = json.loads(output[output.index("{") :])  # `--format json` exits 0 and says success: false
        assert reply["success"] is False and "403 Forbidden" in reply["error-message"], (what, output)
    phases = {"outsider refused": time.monotonic() - outsider_started}
    refusals = (tmp_path / "gateway.log").read_text()
    for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/register-node"):
        assert f"refused POST {path}" in refusals

    # each organization makes its keys; the operator registers the three public bundles
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

    # each organization reviews this app and approves exactly its bytes (and mallory's approves it too)
    shipped = snapshot_app(tmp_path / "app")
    digest = fab_hash_of_app(shipped)
    for files in orgs.values():
        approve(approved_apps_file(files.directory), digest, note="reviewed in the test")

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
            orgs[name].directory, org=name, superlink=f"{PUBLIC}:{fleet_port}", ca_cert=link.ca_cert,
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
        flower_executable("flower-supernode"), "--insecure", "--superlink", f"{PUBLIC}:{fleet_port}",
        "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10",
    ]  # fmt: skip
    with pytest.raises(DeployError, match="TLS"):
        launch(insecure, log_path=tmp_path / "plaintext.log", timeout_s=60)
    assert "2004" in (tmp_path / "superlink.log").read_text()  # the SuperLink's own refusal line

    # alpha's SuperNode key arrives on stdin; the key file is moved away before the SuperNode starts
    alpha_key = orgs["alpha"].node_key.read_bytes()
    orgs["alpha"].node_key.rename(tmp_path / "alpha-node-key-offline")
    processes.append(
        Process("alpha", supernode("alpha", node_key="-"), tmp_path / "alpha.log", env, stdin=alpha_key)
    )
    for name in ORGS[1:]:
        processes.append(Process(name, supernode(name), tmp_path / f"{name}.log", env))

    # an app nobody approved, submitted through the (local) Control API, is refused by every SuperNode
    evil_started = time.monotonic()
    evil = evil_app(tmp_path / "evil-app")
    evil_out = tmp_path / "evil" / "replies.json"
    evil_out.parent.mkdir()
    submit = flwr(["run", str(evil), CONNECTION, "--run-config", f"out='{evil_out}'"], env)
    assert submit.wait(timeout=120) == 0, submit.communicate()[0]
    answers = wait_for(lambda: results(evil_out), RUN_LIMIT_S, "the unapproved app's replies", interval=1)
    evil_hash = fab_hash_of_app(evil)
    assert sorted(a["node"] for a in answers) == sorted(e["node_id"] for e in registry.values())
    for answer in answers:
        assert answer["error"] and f"has not approved app sha256:{evil_hash}" in answer["error"], answers
    assert not list(evil_out.parent.glob("stolen-*"))  # its ClientApp never ran
    phases["unapproved app refused"] = time.monotonic() - evil_started

    submit = subprocess.run(
        [flower_executable("flwr"), "run", str(shipped), CONNECTION, "--run-config",
         run_config(job_path, [], format_node_ids(registry))],
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
    assert final["setup"]["node_binding"] == "registry"
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
    assert "approved" in (tmp_path / "alpha.log").read_text()  # the gate let the reviewed app through
    print(
        f"deployment test: {time.monotonic() - started:.1f} s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    )
    assert explain_refusal((tmp_path / "mallory.log").read_text())
