"""Each organization's privacy policy comes from its own node config and a run cannot weaken it (issue 13
item 3): a run that asks for less is refused by that client with a message naming the field; a job read
from the run-config may not move the ledger or make the organization an adversary; a `config=` path
naming some other file on a node reveals none of its contents."""

from __future__ import annotations

import json

import pytest
import yaml
from test_federation_apps import RUN_ID, LocalGrid, tiny_job

from federation.client.app import build_client_app
from federation.client.errors import read_failures
from federation.client.policy import (
    DEPLOYMENT,
    SIMULATION,
    OrgPolicy,
    PolicyConfigError,
    policy_from_node_config,
)
from federation.client.policy import refusals as policy_refusals
from federation.run import prepare_organizations
from federation.run_config import job_from_run_config
from federation.server.app import FederationServer
from federation.server.session import FederationFailed
from federation.simulation.mods import simulation_client_app
from secure_kd.config import ConfigError

STRICT = {
    "policy-protection": "ckks,secagg+",
    "policy-dp-required": True,
    "policy-max-epsilon": 8.0,
}


def _run(job, node_configs: dict[int, dict], *, client_job="bound", run_config=None):
    prepare_organizations(job)
    # bound: the app of secure-kd federate (with the test roles' mods); run-config: the deployed app
    app = simulation_client_app(job) if client_job == "bound" else build_client_app(None)
    grid = LocalGrid(app, job.n_organizations)
    for node, context in grid.contexts.items():
        context.node_config.update(node_configs.get(node - 1000, {}))
        context.run_config.update(run_config or {})
    try:
        return FederationServer(grid, job, RUN_ID).run(), grid
    except FederationFailed as exc:
        return exc, grid
    finally:
        grid.pool.shutdown(wait=False, cancel_futures=True)


def test_a_run_asking_for_less_than_an_organizations_policy_is_refused_by_it(tmp_path):
    job = tiny_job(tmp_path, n_organizations=3, min_clients=2)  # plaintext fedavg without DP
    result, grid = _run(job, {1: STRICT})
    hello = {m.metadata.dst_node_id - 1000: r for m, r in grid.sent("query.hello")}
    reason = hello[1].error.reason
    assert reason == (
        "secure-kd/policy-refused at hello from org-1: this organization's policy refuses the run: "
        "protection is plaintext; this organization accepts ckks, secagg+; train.privacy is not set; this "
        "organization requires DP-SGD (add train.privacy with target_epsilon <= 8)"
    )
    assert not hello[0].has_error() and not hello[2].has_error()
    # org-1 took part in nothing, and the run record says why
    assert result.organizations == ["org-0", "org-2"]
    assert all(m.metadata.dst_node_id != 1001 for m, _ in grid.sent("train"))
    (dropped,) = json.loads((tmp_path / "run" / "results.json").read_text())["setup"]["dropped"]
    assert dropped == {"org": "org-1", "stage": "hello", "reason": f"client failed: {reason}"}
    assert not (tmp_path / "run" / "orgs" / "org-1" / "student.safetensors").exists()
    assert read_failures(tmp_path / "run" / "orgs" / "org-1", RUN_ID)[0]["code"] == "policy-refused"


def test_every_message_is_checked_so_skipping_hello_does_not_help(tmp_path):
    job = tiny_job(tmp_path, n_organizations=2, min_clients=2)
    failed, _ = _run(job, {1: {"policy-protection": "ckks"}})
    assert isinstance(failed, FederationFailed)
    assert (
        "org-1: client failed: secure-kd/policy-refused at hello from org-1: this organization's policy"
        in str(failed)
    )
    # a server that goes straight to `train` meets the same refusal
    app = build_client_app(job)
    grid = LocalGrid(app, 2)
    grid.contexts[1001].node_config["policy-protection"] = "ckks"
    from flwr.app import ConfigRecord, Message, RecordDict

    train = Message(
        RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=1001, message_type="train"
    )
    (reply,) = grid.send_and_receive([train], timeout=60)
    grid.pool.shutdown(wait=False)
    assert reply.error.reason.startswith("secure-kd/policy-refused at train from org-1: ")


@pytest.mark.parametrize(
    ("changes", "policy", "expected"),
    [
        ({"protection": "plaintext"}, {"protections": ("ckks",)}, ["protection is plaintext"]),
        (
            {"train": {"max_steps": 2, "privacy": {"noise_multiplier": 1.0}}},
            {"max_epsilon": 4.0},
            ["target_epsilon is not set, so the run has no budget"],
        ),
        (
            {"train": {"max_steps": 2, "privacy": {"target_epsilon": 9.0}}},
            {"max_epsilon": 4.0},
            ["target_epsilon is 9; this organization allows at most 4"],
        ),
        (
            {"train": {"max_steps": 2, "privacy": {"target_epsilon": 3.0, "delta": 1e-3}}},
            {"max_epsilon": 4.0, "max_delta": 1e-5},
            ["delta is 0.001; this organization requires at most 1e-05"],
        ),
        (
            {"train": {"max_steps": 2, "privacy": {"target_epsilon": 3.0, "poisson_sampling": False}}},
            {"dp_required": True},
            ["poisson_sampling is false"],
        ),
        (
            {"train": {"max_steps": 2, "privacy": {"target_epsilon": 3.0, "ledger_dir": "/elsewhere"}}},
            {},
            ["train.privacy.ledger_dir is set by the run"],
        ),
        (
            {"train": {"max_steps": 2, "privacy": {"target_epsilon": 3.0, "ledger_key": "fresh"}}},
            {},
            ["train.privacy.ledger_key is set by the run"],
        ),
        ({"adversaries": {1: {"kind": "scale"}}}, {}, ["adversaries names this organization (index 1)"]),
        ({"simulate_faults": {1: "nan"}}, {}, ["simulate_faults names this organization (index 1)"]),
        ({"simulate_faults": {0: "nan"}}, {}, []),  # another organization's business
        (
            {"mode": "p2p", "p2p": {"profile_epsilon": 5.0}},
            {"max_profile_epsilon": 1.0},
            ["profile_epsilon is 5"],
        ),
        ({"protection": "ckks", "train": {"max_steps": 2, "privacy": {"target_epsilon": 4.0}}}, STRICT, []),
    ],
)
def test_refusals_name_the_field_and_the_requirement(tmp_path, changes, policy, expected):
    job = tiny_job(tmp_path, **changes)
    given = policy_from_node_config(policy) if policy is STRICT else DEPLOYMENT.model_copy(update=policy)
    found = policy_refusals(given, job, 1)
    assert len(found) == len(expected)
    for text, wanted in zip(found, expected, strict=True):
        assert wanted in text


def test_policy_keys_parse_from_node_config_and_typos_are_errors():
    policy = policy_from_node_config(
        {
            "org-name": "alpha",
            "policy-protection": "ckks",
            "policy-max-epsilon": "8",
            "policy-dp-required": "true",
        }
    )
    assert policy == OrgPolicy(protections=("ckks",), max_epsilon=8.0, dp_required=True)
    assert policy_from_node_config({"policy-allow-test-roles": True}, SIMULATION).allow_test_roles
    for bad in ({"policy-max-epsilson": 8}, {"policy-protection": "rot13"}, {"policy-max-epsilon": -1}):
        with pytest.raises(PolicyConfigError, match="node config policy-"):
            policy_from_node_config(bad)


def test_a_run_config_job_may_not_make_an_organization_an_adversary_or_move_its_ledger(tmp_path):
    ledgers = tmp_path / "run-chosen-ledgers"
    raw = dict(
        yaml.safe_load(open("configs/deploy-tiny.yaml")),
        out=str(tmp_path / "run"),
        n_organizations=2,
        min_clients=1,
        protection="plaintext",
        simulate_faults={1: "nan"},
        train={
            "max_steps": 1,
            "batch_size": 4,
            "privacy": {"noise_multiplier": 1.0, "ledger_dir": str(ledgers)},
        },
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_config = {"config": str(path), "overrides": ""}
    job = job_from_run_config(run_config)
    result, grid = _run(job, {}, client_job="run-config", run_config=run_config)
    reasons = {
        m.metadata.dst_node_id - 1000: r.error.reason for m, r in grid.sent("query.hello") if r.has_error()
    }
    assert set(reasons) == {0, 1}
    assert "ledger_dir is set by the run" in reasons[0] and "simulate_faults" not in reasons[0]
    assert (
        "ledger_dir is set by the run" in reasons[1]
        and "simulate_faults names this organization" in reasons[1]
    )
    assert str(ledgers) not in reasons[0]  # the refusal never names a path
    assert not ledgers.exists()
    # the same job bound into the app by whoever runs every organization (secure-kd federate) is allowed
    bound, _ = _run(job.model_copy(update={"out": str(tmp_path / "bound")}), {}, client_job="bound")
    assert bound.completed and ledgers.exists()


def test_config_naming_another_file_on_a_node_reveals_nothing_of_it(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2-ZX81\napi_token: {nested: sk-live-1234}\n")
    run_config = {"config": str(secret), "overrides": ""}
    job = tiny_job(tmp_path, n_organizations=2, min_clients=1)
    failed, grid = _run(job, {1: {}}, client_job="run-config", run_config=run_config)
    assert isinstance(failed, FederationFailed)
    reasons = [r.error.reason for _, r in grid.sent("query.hello")]
    assert reasons == ["secure-kd/invalid-job at hello"] * 2  # the job (and so the name) is unknown
    with pytest.raises(ConfigError) as caught:  # the ServerApp's own error, which `flwr log` shows
        job_from_run_config(run_config)
    for fragment in ("hunter2", "ZX81", "password", "api_token", "sk-live"):
        assert fragment not in str(caught.value)
    assert "withheld" in str(caught.value)
    with pytest.raises(ConfigError, match="nope"):  # the app's own files keep their reasons
        job_from_run_config({"config": "configs/deploy-tiny.yaml", "overrides": "n_organizations=nope"})


def _run_config_job(tmp_path, **changes):
    raw = dict(
        yaml.safe_load(open("configs/deploy-tiny.yaml")),
        out=str(tmp_path / "run"),
        n_organizations=2,
        min_clients=1,
        mode="fedavg",
        protection="plaintext",
        train={"max_steps": 1, "batch_size": 4},
        **changes,
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_config = {"config": str(path), "overrides": ""}
    return job_from_run_config(run_config), run_config


def _hello_reasons(grid) -> dict[int, str]:
    return {
        m.metadata.dst_node_id - 1000: r.error.reason for m, r in grid.sent("query.hello") if r.has_error()
    }


@pytest.mark.parametrize("role", [{"adversaries": {1: {"kind": "scale"}}}, {"simulate_faults": {1: "nan"}}])
def test_the_deployed_client_app_refuses_test_roles_even_where_the_policy_allows_them(tmp_path, role):
    # before issue 14 B the honest handlers ran a role whenever the node's policy allowed it; the deployed
    # app (pyproject's clientapp) now has no mod for either, so no node config can turn one on
    job, run_config = _run_config_job(tmp_path, **role)
    allow = {"policy-allow-test-roles": True}
    result, grid = _run(job, {0: allow, 1: allow}, client_job="run-config", run_config=run_config)
    (field,) = role
    assert _hello_reasons(grid) == {
        1: f"secure-kd/policy-refused at hello from {job.org_name(1)}: this ClientApp refuses the run: "
        f"{field} names this organization (index 1); this ClientApp runs no {field} (test roles run only "
        "in the simulation of secure-kd federate, which installs their mods)"
    }
    assert result.completed and result.organizations == [job.org_name(0)]  # the honest one took part
    # without the node's consent the policy refuses first, as before
    _, grid = _run(job, {}, client_job="run-config", run_config=run_config)
    assert "its policy forbids" in _hello_reasons(grid)[1]


def test_a_bound_job_with_a_test_role_needs_the_simulation_app_not_the_plain_one(tmp_path):
    job = tiny_job(tmp_path, n_organizations=2, min_clients=1, simulate_faults={1: "nan"})
    prepare_organizations(job)
    grid = LocalGrid(build_client_app(job), job.n_organizations)  # bound, but without the mods
    try:
        result = FederationServer(grid, job, RUN_ID).run()
    finally:
        grid.pool.shutdown(wait=False, cancel_futures=True)
    assert "this ClientApp runs no simulate_faults" in _hello_reasons(grid)[1]
    assert result.organizations == ["org-0"]  # refused, not silently run as an honest organization
    # the simulation's app runs the fault: org-1 sends a NaN and the server drops it at train
    simulated, grid = _run(job.model_copy(update={"out": str(tmp_path / "sim")}), {}, client_job="bound")
    assert not _hello_reasons(grid)
    (dropped,) = simulated.rounds[0].dropped
    assert dropped.org == "org-1" and "NaN" in dropped.reason
