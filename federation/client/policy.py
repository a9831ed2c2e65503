"""An organization's privacy policy: set in its own SuperNode's node config, and a run cannot weaken it.

Whoever submits a run writes the job (`flwr run --run-config`), but what an organization accepts is its
own decision. Each ClientApp reads its policy from node config (keys below, e.g. `flower-supernode
--node-config "org-name='alpha' policy-protection='ckks' policy-dp-required=true policy-max-epsilon=8"`)
and checks every message's job against it (`federation.client.guard`) before any handler runs; a run that
asks for less is refused with `policy-refused` and a text naming the run's field and the requirement,
never a path or a value derived from data.

    policy-protection           comma-separated `protection` values it accepts, e.g. "ckks" or
                                "ckks,secagg+" (default: any)
    policy-dp-required          true: local training must be DP-SGD (`train.privacy`, Poisson sampling)
    policy-max-epsilon          `train.privacy.target_epsilon` must be set and at most this: it is the
                                hard budget on the organization's ledger, across runs
    policy-max-delta            `train.privacy.delta` must be set and at most this
    policy-max-profile-epsilon  p2p: `p2p.profile_epsilon` (per release) at most this
    policy-allow-run-ledger     true: the run may set `train.privacy.ledger_dir` / `ledger_key`
                                (otherwise the ledger is where node config `ledger-dir` says, or the
                                default, under the dataset's own fingerprint)
    policy-allow-test-roles     true: the run may make this organization an adversary (`adversaries`)
                                or inject faults into it (`simulate_faults`), where the ClientApp
                                runs them at all: only the simulation's does (federation.simulation);
                                the deployed one refuses them whatever the policy says

Defaults depend on where the job comes from. A job read from the run-config (`flwr run`, a deployment)
gets `DEPLOYMENT`: no run-chosen ledger, no test roles. A job bound into the app by the same person who
runs every organization (`secure-kd federate`, `build_client_app(job)`) gets `SIMULATION`, which
allows both (attack studies need them); node config keys override either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict

from federation.config import FederatedJob, Protection

PROTECTIONS: tuple[str, ...] = get_args(Protection)
NODE_KEYS = {
    "policy-protection": "protections",
    "policy-dp-required": "dp_required",
    "policy-max-epsilon": "max_epsilon",
    "policy-max-delta": "max_delta",
    "policy-max-profile-epsilon": "max_profile_epsilon",
    "policy-allow-run-ledger": "allow_run_ledger",
    "policy-allow-test-roles": "allow_test_roles",
}


class PolicyConfigError(ValueError):
    """The node config's policy keys are malformed (the SuperNode operator's fix, not the run's)."""


class OrgPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protections: tuple[str, ...] | None = None
    dp_required: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    max_profile_epsilon: float | None = None
    allow_run_ledger: bool = False
    allow_test_roles: bool = False


DEPLOYMENT = OrgPolicy()
SIMULATION = OrgPolicy(allow_run_ledger=True, allow_test_roles=True)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PolicyConfigError(f"node config {key} must be true or false")


def _positive(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise PolicyConfigError(f"node config {key} must be a positive number")
    return number


def _protections(key: str, value: Any) -> tuple[str, ...]:
    items = tuple(p.strip() for p in str(value).split(",") if p.strip())
    unknown = [p for p in items if p not in PROTECTIONS]
    if not items or unknown:
        raise PolicyConfigError(
            f"node config {key} must list protections among {', '.join(PROTECTIONS)} (comma-separated)"
        )
    return items


def policy_from_node_config(node_config: Mapping[str, Any], defaults: OrgPolicy = DEPLOYMENT) -> OrgPolicy:
    """`defaults` with the node config's `policy-*` keys applied; an unknown `policy-*` key is an error."""
    values: dict[str, Any] = {}
    for key, raw in node_config.items():
        if not str(key).startswith("policy-"):
            continue
        if key not in NODE_KEYS:
            raise PolicyConfigError(f"node config {key} is not a policy key; known: {', '.join(NODE_KEYS)}")
        field = NODE_KEYS[key]
        if field == "protections":
            values[field] = _protections(key, raw)
        elif field in ("dp_required", "allow_run_ledger", "allow_test_roles"):
            values[field] = _bool(key, raw)
        else:
            values[field] = _positive(key, raw)
    return defaults.model_copy(update=values)


def refusals(policy: OrgPolicy, job: FederatedJob, index: int) -> list[str]:
    """What `job` asks of organization `index` that `policy` does not accept (empty: acceptable)."""
    found: list[str] = []
    if policy.protections is not None and job.protection not in policy.protections:
        found.append(
            f"protection is {job.protection}; this organization accepts {', '.join(policy.protections)}"
        )
    privacy = job.train.privacy
    needs_dp = policy.dp_required or policy.max_epsilon is not None or policy.max_delta is not None
    if needs_dp and privacy is None:
        budget = f" with target_epsilon <= {policy.max_epsilon:g}" if policy.max_epsilon is not None else ""
        found.append(
            f"train.privacy is not set; this organization requires DP-SGD (add train.privacy{budget})"
        )
    if privacy is not None and needs_dp and not privacy.poisson_sampling:
        found.append("train.privacy.poisson_sampling is false, which the DP accounting does not cover")
    if privacy is not None and policy.max_epsilon is not None:
        if privacy.target_epsilon is None:
            found.append(
                "train.privacy.target_epsilon is not set, so the run has no budget; this organization "
                f"requires one of at most {policy.max_epsilon:g}"
            )
        elif privacy.target_epsilon > policy.max_epsilon:
            found.append(
                f"train.privacy.target_epsilon is {privacy.target_epsilon:g}; this organization allows at "
                f"most {policy.max_epsilon:g}"
            )
    if privacy is not None and policy.max_delta is not None:
        if privacy.delta is None or privacy.delta > policy.max_delta:
            given = "not set" if privacy.delta is None else f"{privacy.delta:g}"
            found.append(
                f"train.privacy.delta is {given}; this organization requires at most {policy.max_delta:g}"
            )
    if privacy is not None and not policy.allow_run_ledger:
        for name in ("ledger_dir", "ledger_key"):
            if getattr(privacy, name) is not None:
                found.append(
                    f"train.privacy.{name} is set by the run; this organization keeps its privacy ledger "
                    "where its own node config says: remove it from the job"
                )
    if (
        policy.max_profile_epsilon is not None
        and job.mode == "p2p"
        and job.p2p.profile_epsilon > policy.max_profile_epsilon
    ):
        found.append(
            f"p2p.profile_epsilon is {job.p2p.profile_epsilon:g}; this organization allows at most "
            f"{policy.max_profile_epsilon:g} per release"
        )
    if not policy.allow_test_roles:
        if index in job.adversaries:
            found.append(
                f"adversaries names this organization (index {index}); its policy forbids test roles"
            )
        if index in job.simulate_faults:
            found.append(
                f"simulate_faults names this organization (index {index}); its policy forbids fault injection"
            )
    return found


def refusal_text(problems: list[str]) -> str:
    return "this organization's policy refuses the run: " + "; ".join(problems)
