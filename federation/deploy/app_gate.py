"""The app gate: an organization's SuperNode runs only the apps (FABs) its own operator approved.

Flower's SuperNode executes whatever app a run on the SuperLink names: it fetches the app bundle (FAB) and
a `flwr-clientapp` process installs and imports it. Flower's own check, `flower-supernode
--trusted-entities`, verifies FAB signatures that only the Flower Hub issues (the SuperLink marks a FAB
`valid_license` only when it fetched it from the Hub; a FAB submitted with `flwr run .` has no
verification and is refused outright), so it cannot approve this project's own app on an open-source
SuperLink. Instead each organization keeps a list of the FAB hashes it reviewed:

    approve(approved_file, fab_hash_of_app(Path(".")), ...)   # `secure-kd deploy approve-app --app .`
    write_gate(gate_dir, approved_file)                          # done by `secure-kd deploy supernode`

and the launcher runs the SuperNode with `gate_dir` first on its PATH. Flower's SuperExec starts every
task process by name (`flwr-clientapp`, `flwr-agentapp`, ...), so it finds the gate's:

- `flwr-clientapp` runs this file (`python -P app_gate.py clientapp ARGS`): Flower's own
  `flwr-clientapp`, with the one step that installs the pulled FAB wrapped to first compare the SHA-256 of
  the FAB's bytes with the approved list. An unapproved FAB is never written to disk or imported: the
  process replies with an error naming the hash (the ServerApp drops the organization) and exits.
- every other task command (agent apps, server apps, simulations, models, connectors) is a stub that
  refuses: an organization's SuperNode runs ClientApps only.

The approved list is read afresh by every task process, so `approve-app --revoke` takes effect at the next
message. This file imports only the standard library and Flower (run by path with `-P`, it does not even
import the `federation` package): the approved FAB's own `federation` modules are the ones that load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

APPROVED_FORMAT = "secure-kd/approved-apps"
APPROVED_VERSION = 1
APPROVED_FILE = "approved-apps.json"
APPROVED_ENV = "SECURE_KD_APPROVED_APPS"
MAX_APPROVED_BYTES = 1 << 20
_HASH = re.compile(r"[0-9a-f]{64}")


class AppNotApproved(Exception):
    """A FAB whose hash is not in the organization's approved list."""


def check_hash(value: str) -> str:
    value = str(value).strip().lower()
    if not _HASH.fullmatch(value):
        raise ValueError(f"{value!r} is not a SHA-256 hex digest (64 hex characters)")
    return value


def load_approved(path: str | os.PathLike) -> dict[str, dict]:
    """sha256 -> entry; a missing file approves nothing."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if len(data) > MAX_APPROVED_BYTES:
        raise ValueError(f"{path} is {len(data)} bytes: not an approved-apps file")
    fields = json.loads(data)
    if (
        not isinstance(fields, dict)
        or (fields.get("format"), fields.get("version")) != (APPROVED_FORMAT, APPROVED_VERSION)
        or not isinstance(fields.get("apps"), list)
    ):
        raise ValueError(f"{path} is not a {APPROVED_FORMAT} v{APPROVED_VERSION} file")
    return {check_hash(entry["sha256"]): entry for entry in fields["apps"]}


def _save(path: Path, apps: dict[str, dict]) -> None:
    text = json.dumps(
        {"format": APPROVED_FORMAT, "version": APPROVED_VERSION, "apps": list(apps.values())}, indent=2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def approve(path: str | os.PathLike, sha256: str, *, fab_id: str = "", note: str = "") -> dict:
    """Add `sha256` to the approved list at `path`; returns its entry."""
    path, sha256 = Path(path), check_hash(sha256)
    apps = load_approved(path)
    entry = {
        "sha256": sha256,
        "fab_id": fab_id,
        "note": note,
        "approved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    apps[sha256] = entry
    _save(path, apps)
    return entry


def revoke(path: str | os.PathLike, sha256: str) -> bool:
    """Remove `sha256` from the approved list; False if it was not there."""
    path, sha256 = Path(path), check_hash(sha256)
    apps = load_approved(path)
    if apps.pop(sha256, None) is None:
        return False
    _save(path, apps)
    return True


def fab_bytes_of_app(app_dir: str | os.PathLike) -> bytes:
    """The FAB `flwr run APP_DIR` would submit (Flower's own deterministic builder: sorted files, fixed
    timestamps), so its hash is the one the SuperNode receives."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def fab_hash_of_app(app_dir: str | os.PathLike) -> str:
    return hashlib.sha256(fab_bytes_of_app(app_dir)).hexdigest()


def fab_id_of(fab: bytes) -> str:
    """`publisher/name==version` from the FAB's pyproject.toml, for messages and the approved list."""
    import io
    import tomllib
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            if archive.getinfo("pyproject.toml").file_size > 64 << 10:
                return "?"
            project = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "?"
    publisher = project.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher", "?")
    name, version = project.get("project", {}).get("name", "?"), project.get("project", {}).get("version")
    return f"{publisher}/{name}=={version}"


def check_fab(fab: bytes, approved_file: str | os.PathLike) -> str:
    """The FAB's hash if it is approved, else AppNotApproved (naming the hash and the fix)."""
    digest = hashlib.sha256(fab).hexdigest()
    try:
        approved = load_approved(approved_file)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise AppNotApproved(f"the approved-apps list {approved_file} cannot be read ({error})") from None
    if digest not in approved:
        raise AppNotApproved(
            f"this organization has not approved app sha256:{digest} ({fab_id_of(fab)}); its SuperNode runs "
            f"only the apps in {approved_file} (`secure-kd deploy approve-app`)"
        )
    return digest


# -- the SuperNode side ----------------------------------------------------------------------------------
def gated_commands() -> dict[str, str]:
    """Every task command Flower's SuperExec may start -> 'clientapp' (gated) or 'refuse'."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    return {
        command: "clientapp" if task == TaskType.CLIENT_APP else "refuse"
        for task, command in TASK_TYPE_TO_COMMAND.items()
    }


def write_gate(gate_dir: str | os.PathLike, approved_file: str | os.PathLike) -> Path:
    """The gate's executables in `gate_dir` (put first on the SuperNode's PATH by the launcher)."""
    gate_dir = Path(gate_dir)
    gate_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    python, script = shlex.quote(sys.executable), shlex.quote(str(Path(__file__).resolve()))
    approved = shlex.quote(str(Path(approved_file).resolve()))
    for command, mode in gated_commands().items():
        exec_line = f'exec {python} -P {script} {mode} {shlex.quote(command)} "$@"'
        body = f"#!/bin/sh\n{APPROVED_ENV}={approved} {exec_line}\n"
        path = gate_dir / command
        fd, tmp = tempfile.mkstemp(dir=gate_dir, prefix=f".{command}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    return gate_dir


def install_gate(approved_file: str | os.PathLike | None) -> None:
    """Wrap the one step of Flower's `flwr-clientapp` that installs the pulled FAB so that it first checks
    the FAB against `approved_file`; it runs after the task's message is pulled (so a refusal goes back to
    the server as this node's error reply) and before any of the FAB is written to disk or imported.
    Fails closed (SystemExit) when there is no list or Flower no longer has that step."""
    import flwr.supernode.runtime.run_clientapp as runtime

    install = getattr(runtime, "install_from_fab", None)
    if not approved_file or install is None:
        sys.stderr.write("secure-kd app gate: cannot check the app (no approved list or no hook): refused\n")
        raise SystemExit(1)

    def install_if_approved(fab_file, *args, **kwargs):
        if not isinstance(fab_file, bytes):
            raise AppNotApproved("the app gate only installs FABs given as bytes")
        digest = check_fab(fab_file, approved_file)
        sys.stderr.write(f"secure-kd app gate: app sha256:{digest[:16]} is approved\n")
        return install(fab_file, *args, **kwargs)

    install_if_approved.__wrapped__ = install  # type: ignore[attr-defined]
    runtime.install_from_fab = install_if_approved


def run_gated_clientapp(args: list[str]) -> None:
    """Flower's `flwr-clientapp` main, with FAB installation gated on the approved list."""
    install_gate(os.environ.get(APPROVED_ENV))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = ["flwr-clientapp", *args]
    flwr_clientapp()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("clientapp", "refuse"):
        raise SystemExit("usage: app_gate.py clientapp|refuse COMMAND [ARGS...]")
    mode, command, rest = argv[0], argv[1], argv[2:]
    if mode == "refuse":
        sys.stderr.write(
            f"secure-kd app gate: refused a {command} task: this organization's SuperNode runs only "
            "approved ClientApps\n"
        )
        raise SystemExit(1)
    run_gated_clientapp(rest)


if __name__ == "__main__":
    main()
