"""The one failure text that crosses the network, in both directions of the protocol:

    secure-kd/<code> at <stage> from <org>[: <public text>]

A ClientApp writes it (`network_reason`, through `federation.client.errors` and the guard), the
ServerApp's session reads it back (`parse_reason`); nothing else about a client's failure leaves the
organization. Its own module so that neither side imports the other for it.
"""

from __future__ import annotations

import re
from enum import StrEnum

REASON_PREFIX = "secure-kd/"


MAX_PUBLIC_CHARS = 600


# Flower message type -> the stage named in errors and in the run's summary line.
STAGES = {
    "query.hello": "hello",
    "query.keygen": "keygen",
    "query.keyshare": "keyshare",
    "train.default": "train",
    "evaluate.default": "final-evaluate",
    "train.digest": "final-digest",
    "query.votes": "votes",
    "query.profile": "profile",
    "train.p2p_send": "p2p-send",
    "train.p2p_learn": "p2p-learn",
}


class Code(StrEnum):
    POLICY_REFUSED = "policy-refused"  # the run asks for less than the organization's policy
    INVALID_JOB = "invalid-job"  # the run's job (run-config) does not load or validate here
    NODE_CONFIG = "invalid-node-config"  # the SuperNode's own node config is wrong (its operator's fix)
    REJECTED = "rejected-instruction"  # the server's message failed validation
    MALFORMED_AGGREGATE = "malformed-aggregate"  # an encrypted aggregate failed a check; decryption stops
    DECRYPTION_STOPPED = "decryption-stopped"  # asked to decrypt again in a run that sent a malformed one
    BUDGET_SPENT = "privacy-budget-spent"  # the organization's DP budget does not cover this round
    FAILED = "failed"  # anything else (training, saving, a bug): the cause is in the local log


def stage_of(message_type: str) -> str:
    return STAGES.get(message_type, "message")


def network_reason(code: Code, stage: str, public: str | None = None, org: str | None = None) -> str:
    """The only failure text that leaves the organization (its name is no secret: the job lists it)."""
    reason = f"{REASON_PREFIX}{code.value} at {stage}" + (f" from {org}" if org else "")
    if public:
        text = " ".join(public.split())
        reason += ": " + (text if len(text) <= MAX_PUBLIC_CHARS else text[: MAX_PUBLIC_CHARS - 3] + "...")
    return reason


_REASON = re.compile(
    rf"^{re.escape(REASON_PREFIX)}([a-z-]+) at ([a-z0-9-]+)(?: from ([A-Za-z0-9._-]{{1,64}}))?(?:: (.*))?$",
    re.DOTALL,
)


def parse_reason(reason: str | None) -> tuple[str, str, str | None, str | None] | None:
    """(code, stage, organization, public text) of a `network_reason`, or None for any other text."""
    match = _REASON.match(reason or "")
    if match is None or match.group(1) not in {c.value for c in Code}:
        return None
    return match.group(1), match.group(2), match.group(3), match.group(4)
