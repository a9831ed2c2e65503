"""Command lines for Flower's own executables, and the thin launchers of `secure-kd deploy`.

    superlink_command(superlink_dir, port=...)               flower-superlink on 127.0.0.1, TLS + node auth
    gateway_command(superlink_dir, listen=..., upstream_port=...)  the Fleet-only gateway (public)
    supernode_command(org_dir, org=..., superlink=..., ...)  flower-supernode with TLS, its auth key, its
                                                             node config and the app gate on its PATH
    write_connection(...)                                    the `flwr` CLI's connection (config.toml)
    register_node(...) / unregister_node(...)                `flwr supernode register|unregister`
    run_config(config, overrides, node_ids)                  the run-config string of `flwr run`
    launch(command, log_path, companions=...)                run them, stream the log, explain a refusal

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on ONE HTTPS port (`--host`,
`--port`), and the open-source Control API has no authentication. So the SuperLink always listens on
127.0.0.1 (the operator's `flwr` runs there, or through an SSH tunnel), and SuperNodes on other machines
dial `federation.deploy.fleet_gateway`, which forwards the Fleet API's paths only. Node authentication: the
SuperLink runs with `--enable-supernode-auth` (which Flower only accepts with TLS) and admits a
SuperNode only if its ECDSA public key was registered with `flwr supernode register`. Each SuperNode
runs only the apps its organization approved (`federation.deploy.app_gate`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from federation.deploy.files import LOOPBACK, DeployError, OrgFiles, SuperLinkFiles
from federation.deploy.process import explain_refusal, flower_env, flower_executable, launch
from secure_kd.paths import atomic_write_text

__all__ = [
    "explain_refusal",
    "flower_env",
    "flower_executable",
    "gateway_command",
    "launch",
    "register_node",
    "run_config",
    "superlink_command",
    "supernode_command",
    "unregister_node",
    "write_connection",
]

DEFAULT_PORT = 9093
DEFAULT_FLEET_PORT = 9092
GATE_DIR = "app-gate"
NODE_CONFIG_FILE = "node-config.toml"


def _loopback_sans(cert_path: Path) -> bool:
    import ipaddress

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address(LOOPBACK) in sans.get_values_for_type(x509.IPAddress)


def _operator_files(superlink_dir: str | Path) -> SuperLinkFiles:
    files = SuperLinkFiles(Path(superlink_dir))
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise DeployError(
                f"{path} is missing: run `secure-kd deploy init-superlink --out {superlink_dir}`"
            )
    if not _loopback_sans(files.server_cert):
        raise DeployError(
            f"{files.server_cert} does not name {LOOPBACK}, where the SuperLink now listens: make a new one "
            f"with `secure-kd deploy init-superlink --out {superlink_dir} --address ... --force` (every "
            "organization then needs the new ca.pem)"
        )
    return files


def superlink_command(
    superlink_dir: str | Path,
    *,
    port: int = DEFAULT_PORT,
    database: str | Path | None = None,
) -> list[str]:
    """flower-superlink on 127.0.0.1 only, with TLS (the CA and server certificate of init-superlink) and
    node auth. Its one port carries the Control API, which has no authentication in open-source Flower:
    it never listens on another interface (SuperNodes elsewhere dial `gateway_command`'s gateway).

    `--disable-runtime-dependency-installation`: without it the SuperLink runs `uv sync` on the app's
    dependencies before each run (a multi-GB CUDA build of torch for this project)."""
    files = _operator_files(superlink_dir)
    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(files.ca_cert),
        "--ssl-certfile", str(files.server_cert),
        "--ssl-keyfile", str(files.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", LOOPBACK,
        "--port", str(port),
    ]  # fmt: skip
    if database is not None:
        command += ["--database", str(database)]
    return command


def gateway_command(
    superlink_dir: str | Path, *, listen: str, upstream_port: int = DEFAULT_PORT
) -> list[str]:
    """The Fleet-only TLS gateway (`federation.deploy.fleet_gateway`) on `listen` (HOST:PORT, e.g.
    0.0.0.0:9092), in front of the SuperLink on 127.0.0.1:`upstream_port`."""
    files = _operator_files(superlink_dir)
    host, sep, listen_port = listen.rpartition(":")
    if not sep or not host or not listen_port.isdigit():
        raise DeployError(f"--fleet-address {listen!r} must be HOST:PORT, e.g. 0.0.0.0:{DEFAULT_FLEET_PORT}")
    if host.strip("[]") in (LOOPBACK, "localhost") and int(listen_port) == upstream_port:
        raise DeployError(f"--fleet-address {listen} is the SuperLink's own port: pick another port")
    return [
        sys.executable, "-m", "federation.deploy.fleet_gateway",
        "--listen", listen,
        "--upstream", f"{LOOPBACK}:{upstream_port}",
        "--ca", str(files.ca_cert),
        "--cert", str(files.server_cert),
        "--key", str(files.server_key),
    ]  # fmt: skip


def write_node_config(org_dir: str | Path, values: Mapping[str, str]) -> Path:
    """The SuperNode's node config as a TOML file in its org dir (paths with spaces survive it).
    Node config stays on the SuperNode: the ClientApp reads it, the SuperLink never sees it."""
    path = Path(org_dir) / NODE_CONFIG_FILE
    atomic_write_text(path, tomli_w.dumps({k: str(v) for k, v in values.items()}), mode=0o600)
    return path


def _check_policy(values: Mapping[str, str]) -> None:
    """The organization's `policy-*` node config (federation.client.policy), checked before the SuperNode
    starts rather than at its first message."""
    from federation.client.policy import PolicyConfigError, policy_from_node_config

    try:
        policy_from_node_config({k: v for k, v in values.items() if k.startswith("policy-")})
    except PolicyConfigError as exc:
        raise DeployError(f"--node-config: {exc}") from None


def approved_apps_file(org_dir: str | Path) -> Path:
    from federation.deploy.app_gate import APPROVED_FILE

    return Path(org_dir).resolve() / APPROVED_FILE


def supernode_command(
    org_dir: str | Path,
    *,
    org: str,
    superlink: str,
    ca_cert: str | Path,
    data: str | Path,
    trust_dir: str | Path,
    clientappio_port: int = 9094,
    ledger_dir: str | Path | None = None,
    max_wait_s: float | None = None,
    node_key: str | Path | None = None,
    extra_node_config: Mapping[str, str] | None = None,
) -> list[str]:
    """flower-supernode for one organization: TLS to `superlink` verified with `ca_cert`, its node
    authentication key, its node config (org-name, org-dir, data-path, trust-dir, ledger-dir, and
    `extra_node_config`, e.g. the organization's `policy-*` keys, checked here), and
    `<org-dir>/app-gate` first on its PATH, so that it runs only the apps in
    `<org-dir>/approved-apps.json` (federation.deploy.app_gate).

    `node_key`: the SuperNode key's path (default `<org-dir>/node-auth/supernode.key`), or "-" to read it
    from standard input once at startup (then the key file need not be readable by the account that runs
    the SuperNode and its apps)."""
    from federation.deploy.app_gate import load_approved, write_gate

    files = OrgFiles(Path(org_dir).resolve(), org)
    data, trust_dir, ca_cert = Path(data).resolve(), Path(trust_dir).resolve(), Path(ca_cert).resolve()
    key_path = files.node_key if node_key is None else Path(node_key)
    checks = [
        (ca_cert, "copy the operator's ca.pem (public) to this machine"),
        (data, "give the organization's own data file (.jsonl, .json, .csv, .parquet or .txt)"),
    ]
    if str(node_key) != "-":
        checks.insert(0, (key_path, f"run `secure-kd deploy init-org --org {org} --out {org_dir}`"))
    for path, fix in checks:
        if not path.is_file():
            raise DeployError(f"{path} is missing: {fix}")
    if not any(trust_dir.glob("*.json")):
        raise DeployError(
            f"{trust_dir} holds no identity bundles: copy the operator's trust/ directory there"
        )
    approved = approved_apps_file(files.directory)
    if not load_approved(approved):
        raise DeployError(
            f"{org} has approved no app ({approved} is missing or empty), and its SuperNode runs only "
            "approved apps: review the app, then "
            f"`secure-kd deploy approve-app --org-dir {org_dir} --app DIR`"
        )
    values = {
        "org-name": org,
        "org-dir": str(files.directory),
        "data-path": str(data),
        "trust-dir": str(trust_dir),
    }
    if ledger_dir is not None:
        values["ledger-dir"] = str(Path(ledger_dir).resolve())
    for key, value in (extra_node_config or {}).items():
        if key in values:
            raise DeployError(f"node config {key!r} is set by the launcher itself; drop it")
        values[key] = str(value)
    _check_policy(values)
    node_config = write_node_config(files.directory, values)
    gate = write_gate(files.directory / GATE_DIR, approved)
    path = os.pathsep.join([str(gate), flower_env()["PATH"]])
    command = [
        shutil.which("env") or "/usr/bin/env", f"PATH={path}",
        flower_executable("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", "/dev/stdin" if str(node_key) == "-" else str(key_path.resolve()),
        "--node-config", str(node_config),
        "--port", str(clientappio_port),
    ]  # fmt: skip
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    return command


def write_connection(
    home: str | Path, *, name: str, address: str, ca_cert: str | Path, default: bool = False
) -> Path:
    """A TLS connection for the `flwr` CLI in `<home>/config.toml` (FLWR_HOME; other entries kept)."""
    import tomli
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tomli.loads(path.read_text(encoding="utf-8") if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML)
    superlinks = config.setdefault("superlink", {})
    superlinks[name] = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    if default:
        superlinks["default"] = name
    atomic_write_text(path, tomli_w.dumps(config))
    return path


def _flwr(args: list[str], *, env: Mapping[str, str] | None, timeout: float) -> dict:
    command = [flower_executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=flower_env(env))
    except subprocess.TimeoutExpired as error:
        raise DeployError(
            f"`{' '.join(command)}` did not finish in {timeout:g} s: is the SuperLink up?"
        ) from error
    match = re.search(r"\{.*\}", done.stdout, re.S)
    reply = json.loads(match.group(0)) if match else {}
    if done.returncode != 0 or not reply.get("success"):
        text = (done.stdout + done.stderr).strip()
        hint = explain_refusal(text)
        raise DeployError(
            f"`flwr {' '.join(args)}` failed: {reply.get('error-message') or text[-800:]}"
            + (f"\n{hint}" if hint else "")
        )
    return reply


def register_node(
    public_key: str | Path, connection: str, *, env: Mapping[str, str] | None = None, timeout: float = 60
) -> int:
    """`flwr supernode register`: the SuperLink will admit the SuperNode holding this key. Returns its id."""
    reply = _flwr(["supernode", "register", str(public_key), connection], env=env, timeout=timeout)
    return int(reply["node-id"])


def unregister_node(
    node_id: int, connection: str, *, env: Mapping[str, str] | None = None, timeout: float = 60
) -> None:
    """`flwr supernode unregister`: the SuperLink stops admitting that SuperNode (its key is revoked)."""
    _flwr(["supernode", "unregister", str(node_id), connection], env=env, timeout=timeout)


def run_config(config: str | Path, overrides: list[str], node_ids: str = "") -> str:
    """`flwr run --run-config` for a job: its path, its `--set` overrides, and the operator's org -> node
    id map (federation.deploy.node_binding), which binds each organization's name to its registered node."""
    from federation.deploy.node_binding import NODE_IDS_KEY, parse_node_ids

    for item in [*overrides, str(config)]:
        if ";" in item or "'" in item:
            raise ValueError(f"{item!r}: paths and --set values cannot contain ';' or a single quote")
    parse_node_ids(node_ids)
    text = f"config='{config}' overrides='{';'.join(overrides)}'"
    return text + (f" {NODE_IDS_KEY}='{node_ids}'" if node_ids else "")
