"""Client-level DP for fedavg (issue 18): clipping, the noise on the sum, its composition with CKKS and
SecAgg+, the federation's ledger and its budget stop, and the example config.

The federations run the real ServerApp and ClientApp through test_federation_apps' in-process `LocalGrid`
(tiny students); the noise's statistics are measured on zero updates over many draws; epsilon is checked
against a fresh Opacus `RDPAccountant` fed from the ledger file itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from pydantic import ValidationError
from test_federation_apps import RUN_ID, LocalGrid, _arrays, tiny_job
from typer.testing import CliRunner

from federation import client_dp
from federation.client import rounds
from federation.client.errors import ClientFailure
from federation.client.workspace import SECRET_CONTEXT_FILE, OrgWorkspace
from federation.crypto.he import Keyring, decrypt_aggregate
from federation.failure_codes import Code
from federation.run import prepare_organizations
from federation.server.app import FederationServer
from federation.server.client_dp import server_noised_mean
from federation.server.session import FederationFailed
from federation.simulation.mods import simulation_client_app
from secure_kd.app.cli import app as cli

SIGMA, CLIP = 1.0, 0.05  # C small enough that every honest tiny-student update is clipped


def dp_job(tmp_path, name="run", **changes):
    dp = {"clip_norm": CLIP, "noise_multiplier": SIGMA, "ledger_dir": str(tmp_path / "ledgers")}
    dp.update(changes.pop("client_dp", {}))
    return tiny_job(tmp_path, out=str(tmp_path / name), client_dp=dp, **changes)


def run(job):
    """The real apps through LocalGrid; returns the server (its strategy's state), result and grid."""
    prepare_organizations(job)
    grid = LocalGrid(simulation_client_app(job), job.n_organizations)
    server = FederationServer(grid, job, RUN_ID)
    try:
        result = server.run()
    finally:
        grid.pool.shutdown(wait=False, cancel_futures=True)
    return server, result, grid


def norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Independent L2 norm of a - b over every array."""
    return math.sqrt(sum(float(((a[n].astype(np.float64) - b[n]) ** 2).sum()) for n in a))


@pytest.fixture
def recorded(monkeypatch):
    """What each organization's handler sent per round: the global it started from, its trained weights,
    its clipped weights (what the hooks return) and the payload with its noise share."""
    seen: dict[tuple[int, int], dict] = {}
    payload, share = rounds._fedavg_payload, rounds._noise_share

    def fedavg_payload(ws, model, start, r):
        seen[(ws.index, r)] = {"start": dict(start), "trained": rounds._weights(model)}
        return payload(ws, model, start, r)

    def noise_share(ws, weights, r):
        out = share(ws, weights, r)
        seen[(ws.index, r)].update(clipped=dict(weights), sent=dict(out))
        return out

    monkeypatch.setattr(rounds, "_fedavg_payload", fedavg_payload)
    monkeypatch.setattr(rounds, "_noise_share", noise_share)
    return seen


def _sum(parts: list[dict[str, np.ndarray]], minus: dict[str, np.ndarray] | None = None) -> np.ndarray:
    flat = [np.concatenate([p[n].astype(np.float64).ravel() for n in p]) for p in parts]
    total = np.sum(flat, axis=0)
    if minus is not None:
        total -= len(parts) * np.concatenate([minus[n].astype(np.float64).ravel() for n in minus])
    return total


# -- the mechanism --------------------------------------------------------------------------------------


@pytest.mark.parametrize("colluders", [0, 1])
def test_the_noise_on_the_sum_has_std_sigma_c_and_each_readers_view_keeps_it(tmp_path, colluders):
    # sigma 1.3, C 0.7, 4 organizations, all required: the sum must carry sigma*C = 0.91 per coordinate;
    # with one tolerated colluder, so must the sum minus any one share (what a client reading it knows)
    job = tiny_job(
        tmp_path,
        n_organizations=4,
        client_dp={"clip_norm": 0.7, "noise_multiplier": 1.3, "tolerated_colluders": colluders},
    )
    zero = {"w": np.zeros(2000, dtype=np.float32)}  # a zero update: what arrives is the noise alone
    sums, views = [], []
    for draw in range(100):
        shares = [
            client_dp.add_noise(zero, client_dp.share_std(job), np.random.default_rng([draw, i]))["w"]
            for i in range(4)
        ]
        sums.append(np.sum(shares, axis=0, dtype=np.float64))
        views.append(sums[-1] - shares[0])
    target = 1.3 * 0.7
    # 200,000 samples: the standard deviation is estimated to ~0.16%
    if colluders == 0:
        assert np.std(sums) == pytest.approx(target, rel=0.01)
        assert np.std(views) == pytest.approx(target * math.sqrt(3 / 4), rel=0.01)  # the caveat, measured
    else:
        assert np.std(views) == pytest.approx(target, rel=0.01)
        assert np.std(sums) == pytest.approx(target * math.sqrt(4 / 3), rel=0.01)


def test_server_side_noise_has_std_sigma_c_on_the_sum(tmp_path):
    job = tiny_job(
        tmp_path,
        n_organizations=4,
        client_dp={"clip_norm": 0.7, "noise_multiplier": 1.3, "noise": "server"},
    )
    reference = {"w": np.zeros(1000, dtype=np.float32)}
    sums = [
        4 * server_noised_mean([reference] * 4, reference, job, np.random.default_rng(d))["w"]
        for d in range(200)
    ]
    assert np.std(sums) == pytest.approx(1.3 * 0.7, rel=0.01)


def test_an_organization_adds_a_share_to_a_round_once_and_to_no_more_rounds_than_the_budget_covers(tmp_path):
    # sigma 1, delta 1e-2 (3 organizations), q = 1: epsilon after 2 rounds 4.34, after 3 rounds 5.70
    job = tiny_job(
        tmp_path, rounds=3, client_dp={"clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 5.0}
    )
    assert client_dp.contribution_cap(job) == 2
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    weights = {"w": np.zeros(8, dtype=np.float32)}
    first = rounds._noise_share(ws, weights, 1)
    assert np.any(first["w"] != 0)
    with pytest.raises(ClientFailure) as again:  # a second noisy copy of round 1's update
        rounds._noise_share(ws, weights, 1)
    assert again.value.code == Code.BUDGET_SPENT
    rounds._noise_share(ws, weights, 2)
    with pytest.raises(ClientFailure, match="contributed to 2 round"):
        rounds._noise_share(ws, weights, 3)
    ws.start_run()  # a new run starts a new count (the server's ledger composes the runs)
    rounds._noise_share(ws, weights, 1)


# -- composition with the protections -------------------------------------------------------------------


def test_ckks_decrypted_sum_is_the_clipped_sum_plus_the_shares_and_the_server_holds_no_plaintext(
    tmp_path, recorded
):
    # org-2 scales its update by 10 and skips clipping: the documented limit (nobody can check it)
    job = dp_job(
        tmp_path,
        protection="ckks",
        ckks={"max_abs_update": 16.0},
        adversaries={2: {"kind": "scale", "boost": 10.0}},
    )
    server, result, grid = run(job)
    # the server: only ciphertexts came in, it never formed a plaintext aggregate, and cannot decrypt
    for message, reply in grid.log:
        assert not reply.content.array_records, message.metadata.message_type
    for _, reply in grid.sent("train"):
        assert set(reply.content["config"].keys()) == {"ciphertext"}
        assert "num-examples" not in reply.content["metrics"]
    assert server.strategy.plain is None and isinstance(server.strategy.encrypted_sum, bytes)
    sent = [recorded[(i, 1)] for i in range(3)]
    start = sent[0]["start"]
    assert all(norm(s["start"], start) == 0 for s in sent)  # one global model for everyone
    for index in (0, 1):  # honest: clipped to C, and clipping was needed
        assert norm(sent[index]["trained"], start) > CLIP
        assert norm(sent[index]["clipped"], start) <= CLIP * (1 + 1e-5)
    assert norm(sent[2]["clipped"], start) > 5 * CLIP  # the malicious one is not bounded
    # what a key holder decrypts: the sum of the clipped updates plus the three shares, nothing else
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / SECRET_CONTEXT_FILE).read_bytes()
    )
    blob = grid.sent("evaluate")[0][0].content["config"]["aggregate"]
    n = sum(a.size for a in start.values())
    decrypted = decrypt_aggregate(keyring, blob, n)
    assert decrypted.weight == pytest.approx(3, abs=1e-3)  # weight 1 each
    decrypted_sum = decrypted.mean * decrypted.weight - 3 * _sum([start])
    clipped_sum = _sum([s["clipped"] for s in sent], minus=start)
    shares = [_sum([s["sent"]]) - _sum([s["clipped"]]) for s in sent]
    np.testing.assert_allclose(decrypted_sum, clipped_sum + np.sum(shares, axis=0), atol=1e-4)
    # each share is N(0, s^2), s = sigma C / sqrt(min_clients - 1) = 0.05 / sqrt(2), measured over n values
    for share in shares:
        assert np.std(share) == pytest.approx(SIGMA * CLIP / math.sqrt(2), rel=0.05)
    # no reader sees the unnoised sum: what org-0 knows (its own share) leaves sigma*C of noise
    view = decrypted_sum - shares[0] - clipped_sum
    assert np.std(view) == pytest.approx(SIGMA * CLIP, rel=0.05)
    assert result.client_dp["protection"] == "ckks" and result.client_dp["steps"] == 1


def test_secagg_plus_server_sees_only_the_mean_of_the_noised_clipped_updates(tmp_path, recorded):
    secagg = {"max_weight": 64.0, "clipping_range": 1.0}
    job = dp_job(tmp_path, protection="secagg+", secagg=secagg)
    _, result, grid = run(job)
    for _, reply in grid.sent("train"):  # every SecAgg+ stage reply: no plaintext array leaves a client
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    sent = [recorded[(i, 1)] for i in range(3)]
    start = sent[0]["start"]
    for s in sent:
        assert norm(s["trained"], start) > CLIP and norm(s["clipped"], start) <= CLIP * (1 + 1e-5)
    final = _arrays(grid.sent("evaluate")[0][0])  # the global model SecAgg+ released to the server
    released = _sum([final], minus=start)
    noised = _sum([s["sent"] for s in sent], minus=start) / 3
    unnoised = _sum([s["clipped"] for s in sent], minus=start) / 3
    step = 2 * 1.0 / job.secagg.quantization_range  # stochastic quantization, per client and value
    np.testing.assert_allclose(released, noised, atol=3 * step + 1e-6)
    # what the server holds differs from the unnoised mean by the shares: sigma C / 3 per coordinate
    assert np.std(released - unnoised) == pytest.approx(SIGMA * CLIP * math.sqrt(3 / 2) / 3, rel=0.05)
    assert result.rounds[0].aggregate["contributors"] == 3


def test_server_side_noise_clips_every_update_and_noises_the_sum(tmp_path, monkeypatch):
    job = dp_job(tmp_path, client_dp={"noise": "server"})
    monkeypatch.setattr(client_dp, "noise_generator", lambda: np.random.default_rng(123))
    _, result, grid = run(job)
    start = _arrays(grid.sent("train")[0][0])
    updates = [_arrays(r) for _, r in grid.sent("train")]
    assert all(norm(u, start) > CLIP for u in updates)  # the clients did not clip: the server does
    for _, reply in grid.sent("train"):
        assert reply.content["metrics"]["num-examples"] == 1  # no dataset size in the clear
    # independently: clip each update to C, sum, add the seeded N(0, sigma^2 C^2), divide by 3
    rng = np.random.default_rng(123)
    final = _arrays(grid.sent("evaluate")[0][0])
    for name, g in start.items():
        total = sum(
            (u[name].astype(np.float64) - g) * min(1.0, CLIP / norm(u, start)) for u in updates
        ) + rng.normal(0.0, SIGMA * CLIP, size=g.shape)
        np.testing.assert_allclose(final[name], g + total / 3, rtol=1e-5, atol=1e-6)
    assert "unnoised aggregate" in result.client_dp["server_view"]


# -- accounting, ledger, budget -------------------------------------------------------------------------


def _ledger_history(path: str) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) of every entry, read from the JSONL file directly."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [
        (e["entry"]["noise_multiplier"], e["entry"]["sample_rate"], e["entry"]["steps"])
        for e in lines
        if "entry" in e and e["entry"]["steps"] > 0
    ]


def _opacus_epsilon(history, delta) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def test_epsilon_equals_an_independent_opacus_rdp_accountant_from_the_ledger(tmp_path):
    job = dp_job(tmp_path, rounds=2)
    _, result, _ = run(job)
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy == result.client_dp  # results.json and privacy.json say the same
    assert (tmp_path / "run" / "privacy.json").stat().st_mode & 0o777 == 0o600
    assert privacy["unit"] == "client" and privacy["accountant"] == "rdp"
    history = _ledger_history(privacy["ledger"]["file"])
    assert history == [(SIGMA, 1.0, 2)]  # sample rate 3 sampled / 3 organizations, one step per round
    assert privacy["delta"] == 1e-2  # the largest power of ten not above 1 / (10 * 3 organizations)
    assert privacy["epsilon"] == pytest.approx(_opacus_epsilon(history, 1e-2), rel=1e-9)
    assert privacy["ledger"]["key"].startswith("federation-")
    per_round = [r.aggregate["client_dp_epsilon"] for r in result.rounds]
    assert per_round[0] == pytest.approx(_opacus_epsilon([(SIGMA, 1.0, 1)], 1e-2), rel=1e-9)
    assert per_round[1] == privacy["epsilon"]


def test_a_run_that_would_exceed_the_budget_stops_cleanly_with_a_message(tmp_path):
    # sigma 1, delta 1e-2: 2 rounds spend 4.34, 3 rounds 5.70, 4 rounds 6.93; the target is 6
    budget = {"target_epsilon": 6.0, "clip_norm": 1.0}
    _, first, _ = run(dp_job(tmp_path, "first", rounds=2, client_dp=budget))
    assert len(first.rounds) == 2 and not first.client_dp["stopped_by_budget"]
    _, second, _ = run(dp_job(tmp_path, "second", rounds=2, client_dp=budget))
    assert second.completed and len(second.rounds) == 1 and second.final is not None
    report = second.client_dp
    assert report["stopped_by_budget"] and "stopped before round 2" in report["stop_reason"]
    assert report["epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 1.0, 2), (1.0, 1.0, 1)], 1e-2), rel=1e-9)
    assert report["epsilon"] <= 6.0 < _opacus_epsilon([(1.0, 1.0, 4)], 1e-2)
    # nothing left for one more round: refused before anything is released
    with pytest.raises(FederationFailed, match="privacy budget is spent"):
        run(dp_job(tmp_path, "third", rounds=1, client_dp=budget))
    third = json.loads((tmp_path / "third" / "results.json").read_text())
    assert not third["completed"] and third["rounds"] == []
    assert _ledger_history(report["ledger"]["file"]) == [(1.0, 1.0, 2), (1.0, 1.0, 1)]


# -- the job --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"protection": "ckks", "client_dp": {"noise": "server"}}, "client_dp.noise: server needs"),
        ({"mode": "fed_distill", "kd": {"loss": "forward_kl"}}, "use mode fedavg"),
        ({"aggregation": {"rule": "median"}}, "set aggregation.rule: mean"),
        ({"aggregation": {"client_clip_norm": 1.0}}, "replaces aggregation.client_clip_norm"),
        ({"client_dp": {"tolerated_colluders": 3}}, "must be below min_clients=3"),
        ({"client_dp": {"delta": 0.5}}, "client_dp.delta=0.5 is not below 1/n_organizations"),
        (
            {"protection": "secagg+", "client_dp": {"clip_norm": 1.0}, "secagg": {"clipping_range": 2.0}},
            "secagg.clipping_range=2 would cut the noised updates",
        ),
        ({"client_dp": {"noise_multiplier": None}}, "client_dp needs noise_multiplier, target_epsilon"),
    ],
)
def test_client_dp_refuses_what_it_cannot_cover(tmp_path, changes, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("+", r"\+")):
        dp_job(tmp_path, **changes)


def test_the_example_config_validates_and_runs_from_the_cli_on_a_local_ray_instance(tmp_path, monkeypatch):
    runner = CliRunner()
    checked = runner.invoke(cli, ["validate", "configs/federated-client-dp.yaml"])
    assert checked.exit_code == 0 and checked.output.strip() == "ok", checked.output
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the single-machine path: Ray starts here
    smaller = [
        "n_organizations=3",
        "min_clients=3",
        "rounds=1",
        "data.synthetic.n_records=120",
        "train.max_steps=2",
        f"client_dp.ledger_dir={tmp_path / 'ledgers'}",
        "simultaneous_clients=2",
    ]
    args = [
        "federate",
        "-c",
        "configs/federated-client-dp.yaml",
        "-o",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    outcome = runner.invoke(cli, [*args, *[x for item in smaller for x in ("--set", item)]])
    assert outcome.exit_code == 0, outcome.output
    assert "client-level DP: epsilon 2.753" in outcome.output
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["steps"] == 1 and privacy["protection"] == "ckks" and privacy["noise"] == "client"
    assert privacy["epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 1.0, 1)], 1e-2), rel=1e-9)
