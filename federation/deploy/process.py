"""Running Flower's executables for `secure-kd deploy`: where they are, their environment, and a
foreground launcher that streams their log and explains a refused connection in words.

    flower_executable("flower-supernode")  next to this Python (the project's virtualenv), else on PATH
    flower_env()                           PATH with that directory first (Flower starts helpers by name)
    launch(command, companions=[...])      run a process (and companions, e.g. the fleet gateway next to
                                           the SuperLink) until it exits; DeployError with the reason
    explain_refusal(log_text)              Flower's log lines for refused connections, in words
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from federation.deploy.files import DeployError

# Lines of a launched process's log kept for explaining its exit: the SuperNode's own reason can be
# followed by a long traceback of the flower-superexec it started, so a short tail can miss it.
LOG_LINES_KEPT = 2000

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
    (
        re.compile(r"only the Flower Fleet API is served|403 Forbidden"),
        "this address is the fleet gateway, which serves SuperNodes only: run `flwr` (and `secure-kd "
        "deploy register-org|run`) on the SuperLink machine, or through an SSH tunnel to its 127.0.0.1 port",
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


class _Relayed:
    """One launched process whose output is echoed (with a prefix) to stdout and the log file."""

    def __init__(self, command: list[str], prefix: str, log, lock: threading.Lock) -> None:
        self.command, self.prefix, self.log, self.lock = command, prefix, log, lock
        self.tail: list[str] = []
        self.helpers: list = []
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env()
        )
        self.reader = threading.Thread(target=self._relay, daemon=True)
        self.reader.start()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = self.prefix + line
            with self.lock:
                sys.stdout.write(line)
                if self.log:
                    self.log.write(line)
                    self.log.flush()
            self.tail.append(line)
            del self.tail[:-LOG_LINES_KEPT]

    def watch(self) -> None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            self.helpers = psutil.Process(self.process.pid).children(recursive=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _stop_helpers(self.helpers)
        self.reader.join(timeout=10)

    def failure(self, code: int) -> DeployError:
        text = "".join(self.tail)
        hint = explain_refusal(text)  # the whole kept log: helpers' tracebacks can follow the reason
        return DeployError(
            f"{Path(self.command[0]).name if self.prefix == '' else self.prefix.strip()} exited with code "
            f"{code}" + (f": {hint}" if hint else f"; its last lines:\n{text[-2000:]}")
        )


def launch(
    command: list[str],
    *,
    log_path: str | Path | None = None,
    timeout_s: float | None = None,
    companions: Sequence[tuple[str, list[str]]] = (),
) -> int:
    """Run a Flower executable in the foreground, echoing its log (and saving it), for at most
    `timeout_s` seconds, with `companions` ((name, command) pairs, e.g. the fleet gateway) started after
    it and stopped with it. When any of them exits with an error, the others are stopped and DeployError
    says why, read from that process's log."""
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    lock = threading.Lock()
    started: list[_Relayed] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed: tuple[_Relayed, int] | None = None
    try:
        started.append(_Relayed(command, "", log, lock))
        for name, companion in companions:
            started.append(_Relayed(companion, f"[{name}] ", log, lock))
        main = started[0]
        while main.process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                main.process.kill()
                break
            for item in started:
                item.watch()
            stopped = [item for item in started[1:] if item.process.poll() is not None]
            if stopped:
                failed = (stopped[0], stopped[0].process.returncode)
                break
            time.sleep(0.5)
        code = main.process.wait() if failed is None else failed[1]
    except KeyboardInterrupt:
        code = 130
    finally:
        for item in reversed(started):
            item.stop()
        if log:
            log.close()
    if failed is not None:
        raise failed[0].failure(failed[1] if failed[1] not in (0, None) else -1)
    if code not in (0, -2, 130):
        raise started[0].failure(code)
    return code
