"""The door of every ClientApp message: resolve the job, check it against the organization's policy, and
turn whatever fails into a generic code (`federation.client.errors`) before it could reach the server.

    app.train("default")(guarded("train.default", handle, bound_job=job, resolve=...))

Per message, in this order: the job (bound into the app, or read from the run-config: `invalid-job`
when it does not load, with the full reason in the local log only), the organization's workspace from
node config (`invalid-node-config`), its policy from node config (`federation.client.policy`; a run
asking for less is `policy-refused`, with the refusal's public text), the test roles the job gives this
organization (`adversaries`, `simulate_faults`: also `policy-refused` unless the app installed the
simulation's mods for them, which only `secure-kd federate`'s simulation does), then the handler with
Flower's mods. Any
exception becomes `Message(Error(reason="secure-kd/<code> at <stage>"))`; Flower never sees it, so no
exception text or traceback is serialized into the reply. The handler reads the resolved workspace
with `current_workspace()`.

`flwr run` on a simulation SuperLink (`flower-superlink --simulation`) runs organizations whose node
config names no directories (`partition-id` only): their keys live under the job's `out` and their
trust store is `<out>/trust`, shared on that one machine. There, on `query.hello`, an organization
registers its own public bundle in that trust store (what `federation.run.prepare_organizations` does
for `secure-kd federate`), so a CKKS or p2p run needs no Python step first. A SuperNode with `org-dir`
or `trust-dir` in its node config never writes to a trust store: registration is out of band.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from contextvars import ContextVar
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from federation.client.errors import ClientFailure, classify, record_failure
from federation.client.policy import (
    DEPLOYMENT,
    SIMULATION,
    PolicyConfigError,
    policy_from_node_config,
    refusal_text,
    refusals,
)
from federation.client.workspace import OrgWorkspace, node_org_index
from federation.config import FederatedJob
from federation.failure_codes import Code, network_reason, stage_of
from federation.roles import TEST_ROLE_FIELDS

ClientAppCallable = Callable[[Message, Context], Message]

_CURRENT: ContextVar[OrgWorkspace | None] = ContextVar("secure_kd_current_workspace", default=None)


def current_workspace() -> OrgWorkspace:
    ws = _CURRENT.get()
    if ws is None:
        raise RuntimeError("no workspace: a handler must run inside `guarded`")
    return ws


# Closures reach the ContextVar only through these module-level functions: Ray pickles a ClientApp's
# closures by value, module-level functions by reference, and a ContextVar cannot be pickled.
def _enter(ws: OrgWorkspace):
    return _CURRENT.set(ws)


def _leave(token) -> None:
    _CURRENT.reset(token)


def _job(
    bound: FederatedJob | None, context: Context, resolve: Callable[[dict], FederatedJob]
) -> FederatedJob:
    if bound is not None:
        return bound
    try:
        return resolve(context.run_config)
    except Exception as exc:  # noqa: BLE001 - the reason stays local, the server gets the code
        raise ClientFailure(Code.INVALID_JOB, f"the run's job does not load here: {exc}") from None


def register_in_shared_trust_store(ws: OrgWorkspace, node_config: dict) -> Path | None:
    """Simulation SuperLinks only (no `org-dir`, no `trust-dir` in node config): put this organization's
    own bundle into `<out>/trust` unless it is there already; a different bundle there is refused."""
    if "org-dir" in node_config or "trust-dir" in node_config:
        return None
    ws.keys()  # generated on the organization's disk the first time
    source = ws.keys_dir / "bundle.json"
    trust = Path(ws.job.out) / "trust"
    target = trust / f"{ws.name}.json"
    if target.is_file():
        if target.read_bytes() != source.read_bytes():
            raise ClientFailure(
                Code.NODE_CONFIG,
                f"the shared trust store {trust} holds another bundle for {ws.name}: remove it, or give "
                "this SuperNode its own trust-dir",
            )
        return None
    trust.mkdir(parents=True, exist_ok=True)
    tmp = trust / f".{ws.name}.json.tmp"
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def org_root(job: FederatedJob, node_config, index: int) -> Path:
    """The organization's directory: node config `org-dir`, or `<out>/orgs/<name>` (simulation)."""
    return Path(node_config.get("org-dir") or Path(job.out) / "orgs" / job.org_name(index))


def roles_not_run(job: FederatedJob, index: int, test_roles: Collection[str]) -> list[str]:
    """The test roles `job` gives organization `index` that this ClientApp has no mod for: such a job is
    refused rather than run honestly under a name that says otherwise."""
    return [
        f"{field} names this organization (index {index}); this ClientApp runs no {field} (test roles run "
        "only in the simulation of secure-kd federate, which installs their mods)"
        for field in TEST_ROLE_FIELDS
        if field not in test_roles and index in getattr(job, field)
    ]


def guarded(
    name: str,
    handler: ClientAppCallable,
    *,
    bound_job: FederatedJob | None,
    resolve: Callable[[dict], FederatedJob],
    workspace: Callable[[FederatedJob, Context], OrgWorkspace],
    test_roles: Collection[str] = (),
) -> ClientAppCallable:
    """`handler` (a ClientApp callable, mods included) behind the job, workspace and policy checks;
    `test_roles`: the job fields (`adversaries`, `simulate_faults`) whose mods the handler includes."""
    stage = stage_of(name)
    defaults = SIMULATION if bound_job is not None else DEPLOYMENT

    def call(message: Message, context: Context) -> Message:
        ws: OrgWorkspace | None = None
        org, root = None, None
        try:
            job = _job(bound_job, context, resolve)
            try:
                index = node_org_index(job, context.node_config)
                org, root = job.org_name(index), org_root(job, context.node_config, index)
                policy = policy_from_node_config(context.node_config, defaults)
            except (PolicyConfigError, ValueError, KeyError) as exc:
                raise ClientFailure(Code.NODE_CONFIG, f"node config: {exc}") from None
            problems = refusals(policy, job, index)
            if problems:  # before the workspace exists: a refused run creates nothing here
                text = refusal_text(problems)
                raise ClientFailure(Code.POLICY_REFUSED, text, public=text)
            missing = roles_not_run(job, index, test_roles)
            if missing:  # the policy allows test roles, but this app does not run them
                text = "this ClientApp refuses the run: " + "; ".join(missing)
                raise ClientFailure(Code.POLICY_REFUSED, text, public=text)
            ws = workspace(job, context)
            if name == "query.hello" and bound_job is None:
                register_in_shared_trust_store(ws, dict(context.node_config))
            token = _enter(ws)
            try:
                return handler(message, context)
            finally:
                _leave(token)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a code, the cause stays here
            failure = classify(exc)
            record_failure(
                root if root is not None and root.is_dir() else None,
                run_id=context.run_id,
                org=org,
                stage=stage,
                failure=failure,
                exc=exc,
            )
            reason = network_reason(failure.code, stage, failure.public, org)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    return call
