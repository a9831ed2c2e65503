"""The real ServerApp and ClientApp exchanging real Flower Messages through an in-process Grid.

`LocalGrid` stands in for the SuperLink and the simulation engine only (it delivers each message to the
ClientApp of its node, in a thread, and honours the timeout); everything else is production code. The
end-to-end run through Flower's own simulation engine is in test_federation_simulation.py.
"""

from __future__ import annotations

import copy
import json
import uuid
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant, RDPAccountant

from federation.client.errors import read_failures
from federation.client.workspace import SECRET_CONTEXT_FILE
from federation.config import FederatedJob
from federation.crypto.he import Keyring, decrypt, decrypt_mean, load_public_context
from federation.job_data import job_data
from federation.run import prepare_organizations
from federation.server.app import FederationServer
from federation.server.session import FederationFailed
from federation.simulation.mods import simulation_client_app

RUN_ID = 4242


class LocalGrid(Grid):
    def __init__(self, client_app, n_nodes: int) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
        self.app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=RUN_ID,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": n_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n_nodes)
        }
        self.pool = ThreadPoolExecutor(max_workers=n_nodes)
        self.log: list[tuple[Message, Message]] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid only delivers through send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid only delivers through send_and_receive")

    def _deliver(self, message: Message) -> Message:
        delivered = Message(
            copy.deepcopy(message.content),
            dst_node_id=message.metadata.dst_node_id,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )
        delivered.metadata.__dict__["_message_id"] = message.metadata.message_id
        try:
            reply = self.app(delivered, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:  # what the simulation engine does with a ClientApp exception
            reply = Message(
                Error(code=2, reason=f"Exception ClientAppException occurred. Message: {exc}"),
                reply_to=delivered,
            )
        self.log.append((message, reply))
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        futures = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            futures.append(self.pool.submit(self._deliver, message))
        done, _ = wait(futures, timeout=timeout)
        return [f.result() for f in done]

    def sent(self, message_type: str) -> list[tuple[Message, Message]]:
        return [(m, r) for m, r in self.log if m.metadata.message_type == message_type]


def tiny_job(tmp_path, **changes) -> FederatedJob:
    base = dict(
        seed=0,
        out=str(tmp_path / "run"),
        n_organizations=3,
        rounds=1,
        mode="fedavg",
        protection="plaintext",
        tokenizer="tiny:300",
        round_timeout_s=120,
        student={"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
        data={"synthetic": {"n_records": 90, "n_canaries": 0}, "heldout_fraction": 0.1, "max_length": 24},
        partition={"min_records": 6},
        kd={"loss": "forward_kl"},
        train={"max_steps": 2, "batch_size": 4, "lr": 3e-3, "schedule": "constant", "eval_batches": 1},
        transfer={"n_records": 6, "index_k": 16, "digest_steps": 1},
    )
    base.update(changes)
    return FederatedJob.model_validate(base)


def federate(job: FederatedJob, **server_options):
    prepare_organizations(job)
    grid = LocalGrid(simulation_client_app(job), job.n_organizations)  # the app of secure-kd federate
    try:
        result = FederationServer(grid, job, RUN_ID, **server_options).run()
    finally:
        grid.pool.shutdown(wait=False, cancel_futures=True)
    return result, grid


def _arrays(message: Message) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in message.content["arrays"].items()}


def test_fedavg_aggregates_only_accepted_updates_as_their_weighted_average(tmp_path):
    job = tiny_job(
        tmp_path,
        n_organizations=5,
        min_clients=1,
        max_message_mb=0.2,
        simulate_faults={1: "crash", 2: "nan", 3: "oversized", 4: "wrong_shape"},
    )
    result, grid = federate(job)
    record = result.rounds[0]
    assert record.answered == ["org-0"]
    reasons = {d.org: d.reason for d in record.dropped}
    # the cause stays with org-1
    assert reasons["org-1"] == "client failed: secure-kd/failed at train from org-1"
    (local,) = read_failures(tmp_path / "run" / "orgs" / "org-1", RUN_ID)
    assert local["stage"] == "train" and "simulated crash" in local["cause"]
    assert "Traceback" in local["traceback"]
    assert "NaN" in reasons["org-2"]
    assert "exceeds the 209,715-byte limit" in reasons["org-3"]
    assert "expected float32" in reasons["org-4"]
    # one accepted update: the global model is exactly it
    updates = {m.metadata.dst_node_id: r for m, r in grid.sent("train")}
    final = {m.metadata.dst_node_id: m for m, _ in grid.sent("evaluate")}
    accepted = _arrays(updates[1000])
    for name, value in _arrays(final[1000]).items():
        np.testing.assert_array_equal(value, accepted[name])
    assert result.final is not None and len(result.final.answered) == 5  # everyone evaluates the global model


def test_fedavg_global_model_is_the_weighted_mean_of_two_updates(tmp_path):
    job = tiny_job(
        tmp_path, n_organizations=2, partition={"kind": "dirichlet", "alpha": 0.5, "min_records": 6}
    )
    result, grid = federate(job)
    replies = [r for _, r in grid.sent("train")]
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    assert len(set(weights)) == 2  # unequal sizes, so the weighting matters
    updates = [_arrays(r) for r in replies]
    final = _arrays(grid.sent("evaluate")[0][0])
    for name, value in final.items():
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        expected = np.tensordot(np.asarray(weights, float) / sum(weights), stacked, axes=1)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["completed"] and len(saved["rounds"]) == 1
    assert set(saved["rounds"][0]["clients"][0]["metrics"]) >= {"train-loss", "test-loss", "heldout-loss"}


def test_a_slow_client_is_dropped_after_the_timeout(tmp_path):
    job = tiny_job(
        tmp_path, n_organizations=2, min_clients=1, round_timeout_s=10, simulate_faults={1: "slow"}
    )
    result, _ = federate(job)
    assert result.rounds[0].answered == ["org-0"]
    assert result.rounds[0].dropped[0].reason == "no reply within 10 s"


def test_too_few_clients_stop_the_run_and_say_why(tmp_path):
    job = tiny_job(tmp_path, n_organizations=2, min_clients=2, simulate_faults={1: "crash"})
    with pytest.raises(FederationFailed, match="1 organization\\(s\\) answered, min_clients is 2"):
        federate(job)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not saved["completed"]
    assert "org-1: client failed: secure-kd/failed at train from org-1" in saved["error"]


def test_ckks_fed_distill_ensemble_is_the_mean_of_the_clients_soft_labels(tmp_path):
    job = tiny_job(tmp_path, mode="fed_distill", protection="ckks", ckks={"max_abs_update": 10.0})
    result, grid = federate(job)
    assert result.setup["key_ceremony"]["key_holders"] == 3
    # the server's public context cannot decrypt; every organization holds the same secret key
    public = load_public_context(grid.sent("query.keygen")[0][1].content["config"]["public-context"])
    assert not public.context.is_private()
    keys = {(tmp_path / "run" / "orgs" / f"org-{i}" / SECRET_CONTEXT_FILE).read_bytes() for i in range(3)}
    assert len(keys) == 1
    keyring = Keyring.from_secret_context(keys.pop())
    layout = job_data(job).layout
    n = layout.n_positions * layout.width
    # as a key holder, decrypt each client's upload and the server's aggregate
    uploads = [decrypt(keyring, r.content["config"]["ciphertext"], n) for _, r in grid.sent("train")]
    for _, reply in grid.sent("train"):
        assert "num-examples" not in reply.content["metrics"]  # dataset sizes never travel in the clear
    aggregate = grid.sent("train.digest")[0][0].content["config"]["aggregate"]
    mean = decrypt_mean(keyring, aggregate, n)
    expected = np.mean(uploads, axis=0)  # weight 1 per client
    np.testing.assert_allclose(mean, expected, atol=3 * keyring.noise_bound(3))
    assert np.allclose(mean.reshape(layout.shape).sum(1), 1.0, atol=1e-4)
    assert result.final is not None and all("digest-loss" in c.metrics for c in result.final.clients)


def _independent_epsilon(history, delta):
    """The DP report claims the smaller of Opacus' RDP and PRV bounds (both sound); recompute both."""
    values = []
    for accountant in (RDPAccountant(), PRVAccountant()):
        accountant.history = list(history)
        values.append(accountant.get_epsilon(delta))
    return min(values)


def test_dp_epsilon_accumulates_across_rounds_and_runs(tmp_path):
    privacy = {"noise_multiplier": 1.2, "delta": 1e-3, "ledger_dir": str(tmp_path / "ledgers")}
    job = tiny_job(
        tmp_path,
        n_organizations=2,
        rounds=2,
        train={"max_steps": 2, "batch_size": 4, "lr": 3e-3, "eval_batches": 1, "privacy": privacy},
    )
    first, _ = federate(job)
    again, _ = federate(job.model_copy(update={"out": str(tmp_path / "second"), "rounds": 1}))
    data = job_data(job)
    for index in range(2):
        org = f"org-{index}"
        n_train = len(data.split.organizations[index].train)
        q = min(1.0, 4 / n_train)
        per_round = [r.clients[index].metrics["epsilon"] for r in first.rounds + again.rounds]
        assert per_round[0] < per_round[1] < per_round[2]
        for rounds_so_far, eps in enumerate(per_round, start=1):
            expected = _independent_epsilon([(1.2, q, 2)] * rounds_so_far, 1e-3)
            assert eps == pytest.approx(expected, abs=2e-4)  # metrics leave the client rounded to 4 decimals
        assert again.epsilon[org] == per_round[2]


def test_pate_releases_one_noisy_label_per_transfer_position(tmp_path):
    job = tiny_job(tmp_path, mode="pate", pate={"sigma": 1.0, "delta": 1e-5, "student_steps": 2})
    result, grid = federate(job)
    data = job_data(job)
    positions = sum(sum(1 for label in e.labels[1:] if label != -100) for e in data.transfer)
    aggregate = result.rounds[0].aggregate
    assert aggregate["teachers"] == 3 and aggregate["queries_total"] == positions
    # Q queries at sigma 1: rho = Q, epsilon = rho + 2 sqrt(rho log(1/delta)) (closed form of the bound)
    rho = float(positions)
    assert aggregate["epsilon"] == pytest.approx(rho + 2 * np.sqrt(rho * np.log(1e5)), rel=1e-3)
    assert np.isfinite(aggregate["student_test_loss"])
    for _, reply in grid.sent("query.votes"):
        assert reply.content["arrays"]["votes"].dtype == "int64"


def test_p2p_peers_exchange_sealed_soft_labels_through_the_server(tmp_path):
    job = tiny_job(tmp_path, n_organizations=4, mode="p2p", min_clients=2)
    result, grid = federate(job)
    pairs = result.rounds[0].aggregate["pairs"]
    assert sorted(org for pair in pairs for org in pair) == ["org-0", "org-1", "org-2", "org-3"]
    for _, reply in grid.sent("train.p2p_send"):
        assert set(reply.content.keys()) == {"config"}  # nothing but the sealed bytes reach the server
        assert reply.content["config"]["sealed"][:4] == b"SKSL"
    learned = {c.org: c.metrics for c in result.rounds[0].clients}
    assert all({"loss-before", "loss-after", "kilobytes"} <= set(m) for m in learned.values())
    assert len(result.rounds[0].aggregate["rewards"]) == 2


@pytest.mark.parametrize("adversaries", [{}, {1: {"kind": "scale", "boost": 3.0}}], ids=["honest", "scaled"])
def test_secagg_plus_average_equals_the_plaintext_average_of_the_same_updates(tmp_path, adversaries):
    # with an adversary: SecAgg+ hides its update from the server but carries it into the sum unchanged
    plain_job = tiny_job(tmp_path, out=str(tmp_path / "plain"), adversaries=adversaries)
    _, plain_grid = federate(plain_job)
    replies = [r for _, r in plain_grid.sent("train")]
    weights = np.asarray([r.content["metrics"]["num-examples"] for r in replies], dtype=float)
    expected = {
        name: np.tensordot(weights / weights.sum(), np.stack([_arrays(r)[name] for r in replies]), axes=1)
        for name in _arrays(replies[0])
    }
    secagg = {"max_weight": 64.0, "clipping_range": 4.0}
    masked_job = tiny_job(
        tmp_path, out=str(tmp_path / "secagg"), protection="secagg+", secagg=secagg, adversaries=adversaries
    )
    result, grid = federate(masked_job)
    assert result.rounds[0].aggregate["contributors"] == 3
    for _, reply in grid.sent("train"):  # every SecAgg+ stage reply: no plaintext array leaves a client
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    final = _arrays(grid.sent("evaluate")[0][0])
    # The same local training (same seeds) under masking: each client quantizes (n_i / max_weight) * w_i
    # with step 2 * clipping_range / quantization_range, the server divides the sum by sum_i n_i / max_weight.
    step = 2 * 4.0 / masked_job.secagg.quantization_range
    bound = 3 * step / (weights.sum() / 64.0)
    for name, value in final.items():
        np.testing.assert_allclose(value, expected[name], atol=bound)


def test_a_second_run_in_the_same_directory_starts_afresh(tmp_path):
    # before: the organizations' students of run 1 were loaded as run 2's starting point, silently
    # (fed_distill sends no initial model that would have overwritten them)
    job = tiny_job(tmp_path, rounds=2, mode="fed_distill")
    first, _ = federate(job)
    second, _ = federate(job)

    def losses(result):
        return [
            [(c.org, c.metrics["test-loss"]) for c in sorted(r.clients, key=lambda c: c.org)]
            for r in [*result.rounds, result.final]
        ]

    assert losses(second) == losses(first)


def test_start_run_keeps_keys_and_the_profile_ledger_only(tmp_path):
    from federation.client.workspace import STATE_FILE, STUDENT_FILE, OrgWorkspace

    job = tiny_job(tmp_path)
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    ws.keys()
    (ws.root / STUDENT_FILE).write_bytes(b"old student")
    ws.save_secret_context(b"old key")
    (ws.root / "work" / "round-1").mkdir(parents=True)
    ws.update_state(noise_multiplier=1.3, recent_loss=2.0, profile_ledger={"releases": [{"epsilon": 1.0}]})
    removed = ws.start_run()
    assert sorted(removed) == sorted(
        [STUDENT_FILE, SECRET_CONTEXT_FILE, "work", "noise_multiplier", "recent_loss"]
    )
    assert ws.state() == {"profile_ledger": {"releases": [{"epsilon": 1.0}]}}
    assert (ws.root / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert (ws.root / "keys" / "bundle.json").is_file() and ws.start_run() == []
