"""Command lines for Flower's own executables, and the thin launchers of `secure-kd deploy`.

    superlink_command(superlink_dir, host=..., port=...)     flower-superlink with TLS + node auth
    supernode_command(org_dir, org=..., superlink=..., ...)  flower-supernode with TLS + its auth key
    write_connection(...)                                    the `flwr` CLI's connection (config.toml)
    register_node(...) / unregister_node(...)                `flwr supernode register|unregister`
    launch(command, log_path)                                run one, stream its log, explain a refusal

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink on ONE HTTPS port (`--host`,
`--port`, default 127.0.0.1:8000); SuperNodes dial it, and so does `flwr`. Node authentication: the
SuperLink runs with `--enable-supernode-auth` (which Flower only accepts with TLS) and admits a
SuperNode only if its ECDSA public key was registered with `flwr supernode register`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from federation.deploy import DeployError, OrgFiles, SuperLinkFiles
from secure_kd.paths import atomic_write_text

DEFAULT_PORT = 9093
# Lines of a launched process's log kept for explaining its exit: the SuperNode's own reason can be
# followed by a long traceback of the flower-superexec it started, so a short tail can miss it.
LOG_LINES_KEPT = 2000
NODE_CONFIG_FILE = "node-config.toml"

# Flower's log lines for a refused SuperNode, and what they mean here.
REFUSALS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"Failed to activate SuperNode|ApiError:2004|No SuperNode found with the given public key"
        ),
        "the SuperLink refused this SuperNode's authentication key: it is not registered (send "
        "<org>.registration.json to the operator, who runs `secure-kd deploy register-org`), or the "
        "organization was removed (`secure-kd deploy remove-org`)",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSLCertVerificationError"),
        "the SuperLink's TLS certificate does not verify against --ca (wrong ca.pem, or the address "
        "dialled is not one of the certificate's names: re-run init-superlink with that --address)",
    ),
    (
        re.compile(
            r"Server disconnected without sending a response|WRONG_VERSION_NUMBER|wrong version number"
        ),
        "the TLS handshake did not happen: one side speaks plain HTTP (a SuperNode started with "
        "--insecure against a TLS SuperLink, or the reverse); secure-kd deploy always uses TLS",
    ),
    (
        re.compile(r"Connection refused|ConnectError|Name or service not known"),
        "nothing answers at the SuperLink address: is the SuperLink running, and is its port open?",
    ),
    (
        re.compile(r"Unable to parse the private key file"),
        "the SuperNode key is not an OpenSSH ECDSA private key: make it with `secure-kd deploy init-org`",
    ),
]


def explain_refusal(log_text: str) -> str | None:
    """What a Flower log says went wrong with a connection, in words; None if nothing known matched."""
    for pattern, meaning in REFUSALS:
        if pattern.search(log_text):
            return meaning
    return None


def flower_executable(name: str) -> str:
    """Flower's executables installed next to this Python (the project's virtualenv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeployError(
            f"{name} not found next to {sys.executable} or on PATH: install flwr (pip install flwr)"
        )
    return found


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: they start each other by name (flower-superexec,
    flwr-serverapp, flwr-clientapp), so the directory of this Python's executables goes first on PATH."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, *filter(None, [env.get("PATH")])])
    return env


def superlink_command(
    superlink_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    database: str | Path | None = None,
) -> list[str]:
    """flower-superlink with TLS (the CA and server certificate of init-superlink) and node auth.

    `--disable-runtime-dependency-installation`: without it the SuperLink runs `uv sync` on the app's
    dependencies before each run (a multi-GB CUDA build of torch for this project)."""
    files = SuperLinkFiles(Path(superlink_dir))
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise DeployError(
                f"{path} is missing: run `secure-kd deploy init-superlink --out {superlink_dir}`"
            )
    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(files.ca_cert),
        "--ssl-certfile", str(files.server_cert),
        "--ssl-keyfile", str(files.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if database is not None:
        command += ["--database", str(database)]
    return command


def write_node_config(org_dir: str | Path, values: Mapping[str, str]) -> Path:
    """The SuperNode's node config as a TOML file in its org dir (paths with spaces survive it).
    Node config stays on the SuperNode: the ClientApp reads it, the SuperLink never sees it."""
    path = Path(org_dir) / NODE_CONFIG_FILE
    atomic_write_text(path, tomli_w.dumps({k: str(v) for k, v in values.items()}))
    return path


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
) -> list[str]:
    """flower-supernode for one organization: TLS to `superlink` verified with `ca_cert`, its node
    authentication key, and its node config (org-name, org-dir, data-path, trust-dir, ledger-dir)."""
    files = OrgFiles(Path(org_dir).resolve(), org)
    data, trust_dir, ca_cert = Path(data).resolve(), Path(trust_dir).resolve(), Path(ca_cert).resolve()
    for path, fix in (
        (files.node_key, f"run `secure-kd deploy init-org --org {org} --out {org_dir}`"),
        (ca_cert, "copy the operator's ca.pem (public) to this machine"),
        (data, "give the organization's own data file (.jsonl, .json, .csv, .parquet or .txt)"),
    ):
        if not path.is_file():
            raise DeployError(f"{path} is missing: {fix}")
    if not any(trust_dir.glob("*.json")):
        raise DeployError(
            f"{trust_dir} holds no identity bundles: copy the operator's trust/ directory there"
        )
    values = {
        "org-name": org,
        "org-dir": str(files.directory),
        "data-path": str(data),
        "trust-dir": str(trust_dir),
    }
    if ledger_dir is not None:
        values["ledger-dir"] = str(Path(ledger_dir).resolve())
    node_config = write_node_config(files.directory, values)
    command = [
        flower_executable("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(files.node_key),
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


def _stop_helpers(helpers: list) -> None:
    """Flower's own helpers (flower-superexec) run detached from the launched process; when it exits
    they would linger for a minute retrying it, holding its log pipe open. End them by pid."""
    import psutil

    for helper in helpers:
        with contextlib.suppress(psutil.NoSuchProcess):
            helper.terminate()
    _, alive = psutil.wait_procs(helpers, timeout=5)
    for helper in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            helper.kill()


def launch(command: list[str], *, log_path: str | Path | None = None, timeout_s: float | None = None) -> int:
    """Run a Flower executable in the foreground, echoing its log (and saving it), for at most
    `timeout_s` seconds. When it exits with an error, raise DeployError with the reason read from its log."""
    import psutil

    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    tail: list[str] = []
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env()
    )

    def relay() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            if log:
                log.write(line)
                log.flush()
            tail.append(line)
            del tail[:-LOG_LINES_KEPT]

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    helpers: list = []
    try:
        while process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                break
            with contextlib.suppress(psutil.NoSuchProcess):
                helpers = psutil.Process(process.pid).children(recursive=True)
            time.sleep(0.5)
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        code = process.wait(timeout=30)
    finally:
        _stop_helpers(helpers)
        reader.join(timeout=10)
        if log:
            log.close()
    if code not in (0, -2, 130):
        text = "".join(tail)
        hint = explain_refusal(text)  # the whole kept log: helpers' tracebacks can follow the reason
        raise DeployError(
            f"{Path(command[0]).name} exited with code {code}"
            + (f": {hint}" if hint else f"; its last lines:\n{text[-2000:]}")
        )
    return code
