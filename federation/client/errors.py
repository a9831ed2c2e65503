"""What a ClientApp says when it fails: a generic code and the stage over the network, the cause at home.

Flower returns a ClientApp's exception to the server as text (`<class ...>:<'message'>`), and exception
messages can carry what must not leave an organization: decrypted values (a decryption oracle for a
deviating server, see docs/threat-model.md section 2), node-local paths, dataset fingerprints. So every
handler runs inside `federation.client.guard`, which turns any exception into

    secure-kd/<code> at <stage> from <org>     e.g.  secure-kd/malformed-aggregate at train from org-1

(`network_reason`), the only text the server receives. One code adds a fixed public explanation:
`policy-refused`, whose text names the run's field and the organization's requirement (never a path or
a value derived from data), so that whoever submitted the run knows what to change.

The full cause (the exception's type and message, and its traceback: code locations, no local
variables) is appended to the organization's own error log, `<org-dir>/errors.jsonl` (0600, one JSON
object per failure with the run id, stage and code). Causes written by the decryption path are fixed
texts that name the failed check without the values. In simulation `secure-kd federate` runs every
organization on one machine and reads these logs to print one line per failed organization
(`federation.run`); in a deployment the operator sees the code and each organization reads its log.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from federation.failure_codes import Code
from federation.messages import MessageRejected

logger = logging.getLogger("secure_kd.federation")

ERROR_LOG = "errors.jsonl"
MAX_CAUSE_CHARS = 400


class ClientFailure(Exception):
    """A failure with its code, the node-local `cause`, and optionally a `public` text that may cross
    the network (only for codes whose text is built from the run's job and the policy, never data)."""

    def __init__(self, code: Code, cause: str, public: str | None = None) -> None:
        super().__init__(cause)
        self.code, self.cause, self.public = code, cause, public


def _one_line(text: str, limit: int = MAX_CAUSE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(exc: BaseException) -> ClientFailure:
    """The code and local cause of any exception a handler raised."""
    if isinstance(exc, ClientFailure):
        return exc
    from secure_kd.dp.accounting import PrivacyBudgetExhausted

    cause = _one_line(f"{type(exc).__name__}: {exc}".rstrip(": "))
    if isinstance(exc, PrivacyBudgetExhausted):
        return ClientFailure(Code.BUDGET_SPENT, cause)
    if isinstance(exc, MessageRejected):
        return ClientFailure(Code.REJECTED, cause)
    return ClientFailure(Code.FAILED, cause)


def record_failure(
    root: str | Path | None,
    *,
    run_id: int,
    org: str | None,
    stage: str,
    failure: ClientFailure,
    exc: BaseException | None = None,
) -> Path | None:
    """Append the failure to `<root>/errors.jsonl` (0600) and log it locally; returns the file written
    (None when the organization's directory is not known, e.g. a node config that names no organization)."""
    entry: dict[str, Any] = {
        "time": time.time(),
        "run_id": int(run_id),
        "org": org,
        "stage": stage,
        "code": failure.code.value,
        "cause": _one_line(failure.cause),
    }
    if exc is not None and failure.code == Code.FAILED:
        entry["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=12))
    logger.error(
        "%s, stage %s: %s (%s)", org or "this organization", stage, entry["cause"], failure.code.value
    )
    if root is None:
        return None
    path = Path(root) / ERROR_LOG
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    except OSError as error:
        logger.error("could not write the error log %s: %s", path, error)
        return None
    return path


def read_failures(root: str | Path, run_id: int | None = None) -> list[dict[str, Any]]:
    """The entries of `<root>/errors.jsonl` (of one run when `run_id` is given), oldest first."""
    path = Path(root) / ERROR_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and (run_id is None or entry.get("run_id") == run_id):
            entries.append(entry)
    return entries
