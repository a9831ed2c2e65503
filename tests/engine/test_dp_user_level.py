"""User-level DP (train.privacy.unit: user): accounting vs Opacus, the per-user clip, a repeated canary,
the ledger's unit, and the refusals. Tiny models; the exposure comparison runs 4 seeds x 2 units."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from secure_kd.config import DistillJob, KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample
from secure_kd.data.users import user_ids
from secure_kd.dp.config import PrivacyConfig
from secure_kd.dp.engine import PrivateStudent
from secure_kd.dp.ledger import Ledger
from secure_kd.dp.trainer import DPDistiller
from secure_kd.dp.user_level import per_user_grad_samples
from secure_kd.metrics import exposure
from secure_kd.models import build_tiny

VOCAB, PREFIX, DIGIT0 = 40, [5, 6, 7, 8], 30


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _distiller(
    tmp, examples, users, *, batch, steps, key="users-set", checkpoint_every=10_000, on_step=None, **privacy
):
    privacy.setdefault("ledger_dir", str(tmp / "ledgers"))
    train = TrainConfig(
        max_steps=steps,
        batch_size=batch,
        lr=0.05,
        schedule="constant",
        checkpoint_every=checkpoint_every,
        privacy=PrivacyConfig(**privacy),
    )
    student = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), VOCAB, seed=1)
    return DPDistiller(
        dataset_key=key,
        student=student,
        examples=examples,
        kd=KDConfig(kd_weight=0.0, ce_weight=1.0),
        train=train,
        out=tmp / f"out-{privacy.get('unit', 'record')}",
        pad_id=0,
        eos_id=None,
        progress=False,
        log=lambda message: None,
        on_step=on_step,
        user_of_example=users if privacy.get("unit") == "user" else None,
        user_grouping="grouping-1" if privacy.get("unit") == "user" else None,
        user_field="user_id",
    )


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, 30, (int(torch.randint(5, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=list(ids), record_index=i))
    return out


def test_user_level_epsilon_is_opacus_rdp_from_the_ledgers_parameters(tmp_path):
    # 6 users with 2 records each and one user with 12: 7 users, 24 records
    users = [("u", i % 6) for i in range(12)] + [("big",)] * 12
    d = _distiller(
        tmp_path,
        _examples(24),
        users,
        batch=2,
        steps=4,
        unit="user",
        max_records_per_user=4,
        target_epsilon=3.0,
    )
    d.fit()
    report = json.loads((d.out / "privacy.json").read_text())
    (entry,) = Ledger.open("users-set", tmp_path / "ledgers").entries()
    assert entry.unit == "user" and entry.n_users == 7 and entry.max_records_per_user == 4
    assert entry.sample_rate == pytest.approx(2 / 7)  # users, not records (2/24)
    assert entry.steps == 4 and entry.user_grouping == "grouping-1"
    accountant = RDPAccountant()
    for _ in range(entry.steps):
        accountant.step(noise_multiplier=entry.noise_multiplier, sample_rate=2 / 7)
    assert report["epsilons"]["rdp"] == pytest.approx(accountant.get_epsilon(delta=report["delta"]), rel=1e-9)
    assert report["delta"] == 1e-2  # default for N = 7 users: largest power of ten <= 1/70
    assert report["unit"] == "user" and report["n_users"] == 7 and report["max_records_per_user"] == 4
    assert "for each user of the training set" in report["guarantee"]
    assert not any("a record present k times" in c for c in report["caveats"])


def test_one_user_moves_the_noiseless_sum_by_at_most_c_on_a_linear_model():
    """10 records of user A and 1 of user B through Opacus' per-sample hooks, summed per user, clipped."""
    torch.manual_seed(0)
    w0 = torch.tensor([[0.5, -0.3, 0.2]])
    x = torch.randn(11, 3) * 2
    y = torch.randn(11)
    slots = torch.tensor([0] * 10 + [1])
    clip = 0.5

    def noiseless_sum(rows, slot_of_row, n_users):
        model = nn.Sequential(nn.Linear(3, 1, bias=False))
        model[0].weight.data.copy_(w0)
        captured = {}
        private = PrivateStudent(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=1,
        )
        private.optimizer.attach_step_hook(lambda opt: captured.update(g=opt.params[0].grad.clone()))
        losses = (model(x[rows]).squeeze(-1) - y[rows]) ** 2
        losses.mean().backward()
        per_user_grad_samples(private.optimizer, slot_of_row, n_users)
        private.optimizer.step()
        private.close()
        return captured["g"].flatten()

    # by hand: the gradient of (w.x - y)^2 is 2 (w.x - y) x; each user's sum clipped as a whole
    per_record = 2 * (x @ w0.flatten() - y).unsqueeze(1) * x
    sum_a, sum_b = per_record[:10].sum(0), per_record[10]
    assert sum_a.norm() > 5 * clip  # user A is far over the bound: clipping must act on its sum

    def clipped(v):
        return v * min(1.0, clip / (float(v.norm()) + 1e-6))

    both = noiseless_sum(list(range(11)), slots, 2)
    torch.testing.assert_close(both, clipped(sum_a) + clipped(sum_b), atol=1e-5, rtol=1e-5)
    without_a = noiseless_sum([10], torch.tensor([0]), 1)
    assert float((both - without_a).norm()) <= clip + 1e-5
    # per-record clipping (no per-user sum) moves it by far more than C: what record-level DP allows
    record_level = sum(clipped(g) for g in per_record)
    assert float((record_level - clipped(sum_b)).norm()) > 1.5 * clip


def _canary_data(seed, k):
    g = torch.Generator().manual_seed(seed)
    secret = int(torch.randint(0, 100, (1,), generator=g))
    seqs, users = [], []
    for user in range(32):
        for _ in range(2):
            seqs.append(
                torch.randint(2, 30, (int(torch.randint(6, 9, (1,), generator=g)),), generator=g).tolist()
            )
            users.append(("u", user))
    canary = [*PREFIX, DIGIT0 + secret // 10, DIGIT0 + secret % 10, 9]
    seqs += [list(canary) for _ in range(k)]  # one person's k records hold the canary
    users += [("canary-owner",)] * k
    examples = [TokenizedExample(input_ids=s, labels=list(s), record_index=i) for i, s in enumerate(seqs)]
    return examples, users, secret


def _exposure(model, secret):
    seqs = torch.tensor([[*PREFIX, DIGIT0 + c // 10, DIGIT0 + c % 10, 9] for c in range(100)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=seqs).logits[:, :-1].float(), -1)
    token_losses = -logprobs.gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
    secret_losses = token_losses[:, len(PREFIX) - 1 : len(PREFIX) + 1].sum(1)
    return exposure(secret_losses.tolist(), secret)


def test_a_canary_in_k_records_of_one_user_is_less_exposed_under_user_level_dp_at_equal_epsilon(tmp_path):
    """Same records, same epsilon (8, delta 1e-3), same steps, similar sample rates (16/80 records vs
    7/33 users): record-level DP clips each of the 16 copies on its own, user-level clips their sum."""
    k, results = 16, {"record": [], "user": []}
    for seed in range(4):
        examples, users, secret = _canary_data(seed, k)
        for unit, batch, extra in (
            ("record", 16, {}),
            ("user", 7, {"unit": "user", "max_records_per_user": k}),
        ):
            d = _distiller(
                tmp_path / f"{unit}-{seed}",
                examples,
                users,
                batch=batch,
                steps=40,
                key=f"canary-{seed}",
                target_epsilon=8.0,
                **extra,
            )
            d.fit()
            assert d.report.delta == 1e-3 and d.report.epsilons["rdp"] == pytest.approx(8.0, abs=0.02)
            results[unit].append(_exposure(d.student, secret))
    record, user = statistics.mean(results["record"]), statistics.mean(results["user"])
    assert record > 5.0, results  # record-level at epsilon 8 memorizes a 16-fold canary (max 6.64 bits)
    assert user < record - 1.0, results
    assert all(u <= r for u, r in zip(results["user"], results["record"], strict=True)), results


def test_a_resumed_user_level_run_spends_what_an_uninterrupted_one_spends(tmp_path):
    users = [("u", i % 5) for i in range(20)]
    args = dict(batch=2, steps=6, unit="user", max_records_per_user=4, target_epsilon=3.0, checkpoint_every=2)
    straight = _distiller(tmp_path / "a", _examples(20), users, **args)
    straight.fit()

    def power_cut(step: int, loss: float) -> None:
        if step == 5:
            raise RuntimeError("power cut")

    crashed = _distiller(tmp_path / "b", _examples(20), users, on_step=power_cut, **args)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit()
    resumed = _distiller(tmp_path / "b", _examples(20), users, **args)
    resumed.fit(resume=True)
    (entry,) = Ledger.open("users-set", tmp_path / "b" / "ledgers").entries()
    assert entry.steps == 6 and entry.unit == "user"
    assert resumed.report.epsilons["rdp"] == pytest.approx(straight.report.epsilons["rdp"], rel=1e-12)
    other_users = [("v", i % 4) for i in range(20)]  # a different grouping: same n_records, 4 users
    with pytest.raises(Exception, match="n_users"):
        _distiller(tmp_path / "b", _examples(20), other_users, **args).fit(resume=True)


def test_a_ledger_keeps_one_unit(tmp_path):
    users = [("u", i % 4) for i in range(16)]
    _distiller(tmp_path, _examples(16), users, batch=4, steps=2, noise_multiplier=1.0).fit()
    user_run = _distiller(
        tmp_path,
        _examples(16),
        users,
        batch=2,
        steps=2,
        unit="user",
        max_records_per_user=4,
        noise_multiplier=1.0,
    )
    with pytest.raises(ValueError, match="cannot\\s+compose the two units"):
        user_run.fit()


def test_physical_batches_of_whole_users_give_the_same_step(tmp_path, monkeypatch):
    """Users split over several physical batches (4 records each) vs one batch: identical weights."""
    import secure_kd.dp.trainer as trainer_module

    original = trainer_module.SecretRandomness
    monkeypatch.setattr(trainer_module, "SecretRandomness", lambda secret=None: original(1234))
    users = [("u", i % 5) for i in range(20)]
    weights = []
    for physical in (4, 20):
        d = _distiller(
            tmp_path / str(physical),
            _examples(20),
            users,
            batch=5,
            steps=2,
            unit="user",
            max_records_per_user=4,
            noise_multiplier=1.0,
            max_physical_batch_size=physical,
        )
        d.fit()
        weights.append(torch.cat([p.detach().flatten() for p in d.student.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("data", "privacy", "needle"),
    [
        ({}, {"unit": "user", "max_records_per_user": 4}, "needs data.user_field"),
        ({"user_field": "u"}, {}, "train.privacy.unit is record"),
        ({"user_field": "u"}, None, "train.privacy is not set"),
        ({"user_field": "u"}, {"unit": "user"}, "needs train.privacy.max_records_per_user"),
        ({}, {"max_records_per_user": 3}, "only applies to user-level DP"),
        (
            {"user_field": "u"},
            {"unit": "user", "max_records_per_user": 4, "grad_sample_mode": "ghost"},
            "ghost",
        ),
        ({"user_field": "name"}, {"unit": "user", "max_records_per_user": 4}, "needs data.synthetic.n_users"),
    ],
)
def test_config_refusals_name_the_field_and_the_fix(data, privacy, needle):
    cfg = {"data": data, "train": {}}
    if privacy is not None:
        cfg["train"]["privacy"] = {"noise_multiplier": 1.0, **privacy}
    with pytest.raises(ValueError, match=needle):
        DistillJob.model_validate(cfg)


def test_a_record_without_the_user_field_is_named_by_index_not_content():
    records = [{"text": "a", "user_id": "x"}, {"text": "secret 4242", "who": "y"}]
    with pytest.raises(ValueError) as info:
        user_ids(records, "user_id")
    assert "record 1 (0-based)" in str(info.value) and "'user_id'" in str(info.value)
    assert "4242" not in str(info.value)
    with pytest.raises(ValueError, match="record 0 .* null"):
        user_ids([{"user_id": None}], "user_id")


def test_synthetic_users_put_each_canarys_copies_with_one_user_and_skew_the_counts():
    from collections import Counter

    from secure_kd.data import generate_corpus
    from secure_kd.data.users import assign_synthetic_users

    corpus = generate_corpus(300, seed=3, n_canaries=3, canary_repeats=[5, 3, 1])
    records = assign_synthetic_users(corpus.records, [c.record_ids for c in corpus.canaries], 40, seed=3)
    by_id = {r["record_id"]: r["user_id"] for r in records}
    for canary in corpus.canaries:
        assert len({by_id[i] for i in canary.record_ids}) == 1  # k copies = k records of one person
    counts = Counter(by_id.values()).most_common()
    assert counts[0][1] >= 4 * counts[len(counts) // 2][1]  # a few users hold many records
    assert [r["text"] for r in records] == corpus.texts()  # only the field is added
