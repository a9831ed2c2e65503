"""`secure-kd deploy ...`: keys, certificates and launchers for a real Flower deployment (docs/deploy.md).

Mounted on the main CLI as a typer sub-app; heavy imports happen inside the commands.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import typer
from rich.console import Console

deploy_app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a rich traceback prints every frame's locals: keys, paths, records
    pretty_exceptions_show_locals=False,
    help="Deploy across organizations: Flower SuperLink/SuperNodes with TLS and node authentication.",
)
console = Console(stderr=True)
USER_ERROR_EXIT = 2
CONNECTION = "secure-kd-deploy"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _errors(fn):
    """User errors (and refused connections) print one paragraph and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from federation.crypto.identity import CeremonyError
        from federation.deploy.files import DeployError
        from secure_kd.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (
            DeployError,
            CeremonyError,
            ConfigError,
            FileNotFoundError,
            FileExistsError,
            ValueError,
            PermissionError,
        ) as exc:
            if os.environ.get("SECURE_KD_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper


def _flwr_home(home: Path | None) -> Path:
    from flwr.supercore.utils import get_flwr_home

    return Path(home) if home is not None else get_flwr_home()


def _env(home: Path | None) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(_flwr_home(home))
    return env


HOME_OPTION = typer.Option(
    None, "--flwr-home", help="Flower's config directory (default $FLWR_HOME or ~/.flwr)"
)
CONNECTION_OPTION = typer.Option(CONNECTION, "--connection", help="name of the flwr SuperLink connection")


@deploy_app.command("init-superlink")
@_errors
def init_superlink_cmd(
    out: Path = typer.Option(..., "--out", help="the operator's directory (CA, server key, registry)"),
    address: list[str] = typer.Option(
        ..., "--address", help="host name or IP the SuperNodes dial (repeat, or HOST,HOST)"
    ),
    days: int = typer.Option(365, help="certificate validity"),
    force: bool = typer.Option(False, "--force", help="replace existing keys"),
) -> None:
    """Create a private CA and the SuperLink's TLS certificate (SANs = the addresses, and 127.0.0.1 where
    the SuperLink itself listens); keys 0600."""
    from federation.deploy.files import init_superlink

    hosts = [h.strip() for item in address for h in item.split(",") if h.strip()]
    files = init_superlink(out, hosts, force=force, days=days)
    console.print(f"CA certificate (give it to every organization): {files.ca_cert}")
    console.print(f"keep secret: {files.ca_key}, {files.server_key}")


@deploy_app.command("init-org")
@_errors
def init_org_cmd(
    org: str = typer.Option(..., "--org", help="the organization's name, as in the job's `organizations`"),
    out: Path = typer.Option(..., "--out", help="the organization's directory (its SuperNode's org-dir)"),
    force: bool = typer.Option(False, "--force", help="replace all existing keys (new identity)"),
    valid_days: float = typer.Option(90, help="validity of the signed key-exchange bundle"),
) -> None:
    """Create the SuperNode authentication key and the HE identity/key-exchange keys of one organization."""
    from federation.deploy.files import init_org

    files = init_org(org, out, force=force, valid_days=valid_days)
    console.print(f"send to the operator (public keys only): {files.registration}")
    console.print(f"keep secret: {files.node_key}, {files.keys_dir}/identity.pem, {files.keys_dir}/kex.pem")


@deploy_app.command("rotate-keys")
@_errors
def rotate_keys_cmd(
    org_dir: Path = typer.Option(..., "--org-dir", help="the organization's directory (init-org --out)"),
    valid_days: float = typer.Option(90, help="validity of the new signed key-exchange bundle"),
) -> None:
    """New key-exchange key, next key epoch, new expiry (same identity and SuperNode key). Send the new
    registration bundle to the operator: once it is registered and trust/ redistributed, bundles of older
    epochs are refused."""
    import datetime as dt

    from federation.deploy.files import rotate_keys

    files, keys = rotate_keys(org_dir, valid_days=valid_days)
    until = dt.datetime.fromtimestamp(keys.not_after, dt.UTC).strftime("%Y-%m-%d")
    console.print(f"{keys.org}: key epoch {keys.epoch}, valid until {until}")
    console.print(f"send to the operator (public keys only): {files.registration}")


@deploy_app.command("approve-app")
@_errors
def approve_app_cmd(
    org_dir: Path = typer.Option(..., "--org-dir", help="the organization's directory (init-org --out)"),
    app_dir: Path | None = typer.Option(
        None, "--app", help="the app directory you reviewed (builds its FAB)"
    ),
    fab: Path | None = typer.Option(None, "--fab", help="or a .fab file you reviewed (`flwr build`)"),
    sha256: str | None = typer.Option(None, "--sha256", help="or the FAB's SHA-256, checked out of band"),
    revoke: bool = typer.Option(False, "--revoke", help="remove the app from the approved list"),
    note: str = typer.Option("", help="a note kept next to the hash (who reviewed it, which commit)"),
) -> None:
    """Approve (or revoke) an app for this organization's SuperNode: it runs only FABs whose SHA-256 is
    in <org-dir>/approved-apps.json, checked before any of the app's code is installed or imported."""
    import hashlib

    from federation.deploy.app_gate import APPROVED_FILE, approve, check_hash, fab_bytes_of_app, fab_id_of
    from federation.deploy.app_gate import revoke as revoke_app

    given = [x for x in (app_dir, fab, sha256) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --app DIR, --fab FILE or --sha256 HEX")
    fab_id = ""
    if app_dir is not None:
        if not (app_dir / "pyproject.toml").is_file():
            raise FileNotFoundError(f"--app {app_dir} has no pyproject.toml: give the app's directory")
        content = fab_bytes_of_app(app_dir)
        digest, fab_id = hashlib.sha256(content).hexdigest(), fab_id_of(content)
    elif fab is not None:
        content = fab.read_bytes()
        digest, fab_id = hashlib.sha256(content).hexdigest(), fab_id_of(content)
    else:
        digest = check_hash(sha256)
    approved = org_dir / APPROVED_FILE
    if revoke:
        found = revoke_app(approved, digest)
        console.print(f"sha256:{digest} " + ("revoked" if found else "was not approved"))
        return
    approve(approved, digest, fab_id=fab_id, note=note)
    console.print(f"approved sha256:{digest} {fab_id} in {approved}")
    typer.echo(digest)


@deploy_app.command("connection")
@_errors
def connection_cmd(
    address: str = typer.Option(..., "--address", help="the SuperLink's HOST:PORT"),
    ca: Path = typer.Option(..., "--ca", help="the operator's ca.pem"),
    name: str = CONNECTION_OPTION,
    flwr_home: Path | None = HOME_OPTION,
) -> None:
    """Write a TLS connection for the `flwr` CLI (`flwr run . NAME`, `flwr supernode ...`)."""
    from federation.deploy.launch import write_connection

    if not ca.is_file():
        raise FileNotFoundError(f"--ca {ca} does not exist: copy the operator's ca.pem here")
    typer.echo(str(write_connection(_flwr_home(flwr_home), name=name, address=address, ca_cert=ca)))


@deploy_app.command("register-org")
@_errors
def register_org_cmd(
    superlink_dir: Path = typer.Option(..., "--superlink-dir", help="the operator's directory"),
    bundle: Path = typer.Option(..., "--bundle", help="the organization's <org>.registration.json"),
    connection: str = CONNECTION_OPTION,
    flwr_home: Path | None = HOME_OPTION,
    force: bool = typer.Option(False, "--force", help="replace the organization's keys (new identity)"),
) -> None:
    """Register an organization: `flwr supernode register` its node key, trust its identity bundle. A
    bundle from `rotate-keys` (same SuperNode key and identity, newer key epoch) replaces the trusted one."""
    from federation.deploy.files import SuperLinkFiles
    from federation.deploy.launch import register_node, unregister_node
    from federation.deploy.registry import Registration, add_org, is_rotation, remove_org, set_node_id
    from secure_kd.config import require_file

    expected = "the organization's <org>.registration.json file (made by `secure-kd deploy init-org`)"
    registration = Registration.load(require_file(bundle, "--bundle", expected))
    files = SuperLinkFiles(superlink_dir)
    old = files.read_registry().get(registration.org, {})
    same_node = bool(old) and old.get("node_key_fingerprint") == registration.node_key_fingerprint
    if old and same_node and (force or is_rotation(old, registration)):
        add_org(superlink_dir, registration, force=True)  # the Flower node and its id stay
        console.print(
            f"{registration.org}: key epoch {registration.bundle.epoch} registered (SuperNode "
            f"{old.get('node_id')} unchanged); give every organization {files.trust_dir}/"
        )
        return
    if old and force:
        if old.get("node_id") is not None:
            unregister_node(old["node_id"], connection, env=_env(flwr_home))
        remove_org(superlink_dir, registration.org)
    add_org(superlink_dir, registration, force=force)
    try:
        node_id = register_node(files.nodes_dir / f"{registration.org}.pub", connection, env=_env(flwr_home))
    except Exception:
        remove_org(superlink_dir, registration.org)
        raise
    set_node_id(superlink_dir, registration.org, node_id)
    console.print(
        f"{registration.org}: SuperNode {node_id} registered; give every organization {files.trust_dir}/"
    )


@deploy_app.command("remove-org")
@_errors
def remove_org_cmd(
    superlink_dir: Path = typer.Option(..., "--superlink-dir", help="the operator's directory"),
    org: str = typer.Option(..., "--org"),
    connection: str = CONNECTION_OPTION,
    flwr_home: Path | None = HOME_OPTION,
) -> None:
    """Revoke an organization's node key and drop it from the trust store (the next run's CKKS key
    ceremony excludes it)."""
    from federation.deploy.files import SuperLinkFiles
    from federation.deploy.launch import unregister_node
    from federation.deploy.registry import remove_org

    entry = SuperLinkFiles(superlink_dir).read_registry().get(org, {})
    if entry.get("node_id") is not None:
        unregister_node(entry["node_id"], connection, env=_env(flwr_home))
    remove_org(superlink_dir, org)
    console.print(
        f"{org} removed: its SuperNode key is revoked and its identity is no longer trusted. Remove it "
        "from the job's `organizations`, have every organization delete "
        f"<trust-dir>/{org}.json, and start a new run: its key ceremony makes a new CKKS key for the rest."
    )


@deploy_app.command("superlink")
@_errors
def superlink_cmd(
    directory: Path = typer.Option(..., "--dir", help="the operator's directory (init-superlink --out)"),
    port: int = typer.Option(9093, help="the SuperLink's port on 127.0.0.1 (Fleet, Control, Runtime APIs)"),
    fleet_address: str | None = typer.Option(
        None,
        "--fleet-address",
        help="HOST:PORT where SuperNodes on other machines dial in (e.g. 0.0.0.0:9092): a gateway that "
        "serves only the Fleet API (default: none, SuperNodes on this machine only)",
    ),
    database: Path | None = typer.Option(None, help="state database (default: in memory)"),
    connection: str = CONNECTION_OPTION,
    flwr_home: Path | None = HOME_OPTION,
    log: Path | None = typer.Option(None, help="also write the log here"),
) -> None:
    """Start Flower's SuperLink on 127.0.0.1 with TLS and SuperNode authentication (its Control API has no
    authentication, so it never listens elsewhere), and the Fleet-only gateway (runs until interrupted)."""
    from federation.deploy.files import SuperLinkFiles
    from federation.deploy.launch import gateway_command, launch, superlink_command, write_connection

    command = superlink_command(directory, port=port, database=database)
    companions = []
    if fleet_address:
        companions.append(
            ("fleet-gateway", gateway_command(directory, listen=fleet_address, upstream_port=port))
        )
    dial = f"127.0.0.1:{port}"
    path = write_connection(
        _flwr_home(flwr_home), name=connection, address=dial, ca_cert=SuperLinkFiles(directory).ca_cert
    )
    console.print(f"flwr connection {connection!r} -> {dial} written to {path}")
    console.print(
        f"SuperNodes dial {fleet_address} (Fleet API only)"
        if fleet_address
        else "no --fleet-address: only SuperNodes on this machine can connect"
    )
    launch(command, log_path=log, companions=companions)


@deploy_app.command("supernode")
@_errors
def supernode_cmd(
    org: str = typer.Option(..., "--org"),
    org_dir: Path = typer.Option(..., "--org-dir", help="the organization's directory (init-org --out)"),
    data: Path = typer.Option(..., "--data", help="the organization's private data file (stays here)"),
    superlink: str = typer.Option(..., "--superlink", help="the SuperLink's fleet HOST:PORT"),
    ca: Path = typer.Option(..., "--ca", help="the operator's ca.pem"),
    trust_dir: Path = typer.Option(..., "--trust-dir", help="copy of the operator's trust/ directory"),
    port: int = typer.Option(9094, help="local ClientAppIo port (one per SuperNode on a machine)"),
    ledger_dir: Path | None = typer.Option(None, help="DP ledgers (default $SECURE_KD_HOME/privacy-ledgers)"),
    node_key: str | None = typer.Option(
        None, "--node-key", help="the SuperNode key file, or - to read it from stdin (default: in org-dir)"
    ),
    node_config: list[str] = typer.Option(
        [],
        "--node-config",
        help="extra node config KEY=VALUE, e.g. policy-max-epsilon=8 (docs/federation.md)",
    ),
    log: Path | None = typer.Option(None, help="also write the log here"),
) -> None:
    """Start Flower's SuperNode for one organization: TLS, its auth key, its data path as node config,
    and the app gate (only apps in <org-dir>/approved-apps.json run)."""
    from federation.deploy.launch import launch, supernode_command

    extra = {}
    for item in node_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--node-config {item!r} must be KEY=VALUE")
        extra[key.strip()] = value
    command = supernode_command(
        org_dir,
        org=org,
        superlink=superlink,
        ca_cert=ca,
        data=data,
        trust_dir=trust_dir,
        clientappio_port=port,
        ledger_dir=ledger_dir,
        node_key=node_key,
        extra_node_config=extra,
    )
    launch(command, log_path=log)


@deploy_app.command("demo-data")
@_errors
def demo_data_cmd(
    config: Path = typer.Option(..., "--config", help="a deployment job, e.g. configs/deploy-tiny.yaml"),
    out: Path = typer.Option(..., "--out"),
) -> None:
    """Demo only: write each organization's share of the job's synthetic corpus to <out>/<org>.jsonl."""
    from federation.config import load_federated_job
    from federation.deploy.files import write_demo_data

    for org, path in write_demo_data(load_federated_job(config), out).items():
        typer.echo(f"{org} {path}")


@deploy_app.command("run")
@_errors
def run_cmd(
    config: Path = typer.Option(..., "--config", help="the federated job YAML"),
    superlink_dir: Path = typer.Option(
        ..., "--superlink-dir", help="the operator's directory: registry.json binds each org to its node"
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", help="KEY=VALUE, repeatable"),
    connection: str = CONNECTION_OPTION,
    flwr_home: Path | None = HOME_OPTION,
) -> None:
    """`flwr run` this app on the deployed federation (absolute job path; streams the log). The ServerApp
    accepts each organization only from the Flower node registered for it."""
    from federation.deploy.files import SuperLinkFiles
    from federation.deploy.launch import flower_env, run_config
    from federation.deploy.node_binding import format_node_ids

    if not config.is_file():
        raise FileNotFoundError(f"--config {config} does not exist")
    registry = SuperLinkFiles(superlink_dir).read_registry()
    if not registry:
        raise FileNotFoundError(
            f"{SuperLinkFiles(superlink_dir).registry} lists no organization: register them first"
        )
    resolved = config.resolve()
    # a job inside this app's configs/ travels in the FAB: name it relative, the same on every machine
    shipped = resolved.is_relative_to(PROJECT_ROOT / "configs")
    path = resolved.relative_to(PROJECT_ROOT) if shipped else resolved
    text = run_config(path, overrides, format_node_ids(registry))
    command = [_flwr_executable(), "run", ".", connection, "--stream", "--run-config", text]
    raise typer.Exit(subprocess.call(command, cwd=PROJECT_ROOT, env=flower_env(_env(flwr_home))))


def _flwr_executable() -> str:
    from federation.deploy.launch import flower_executable

    return flower_executable("flwr")
