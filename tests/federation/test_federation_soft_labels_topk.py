"""The per-position top-k soft-label layout (`transfer.reference`): each transfer position carries the k
most likely next tokens of a public reference model, computed from public inputs only.

References: a bigram 'LM' whose rows are read off by hand, brute-force sorting, `torch.topk` of a
float64 forward pass, the plaintext mean of the decrypted uploads, and the layout of the same job with
other private records.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_federation_apps import federate, tiny_job

from federation.client.training import distill_from
from federation.client.workspace import OrgWorkspace
from federation.config import FederatedJob
from federation.crypto.he import Keyring, decrypt, decrypt_mean
from federation.job_data import job_data
from federation.soft_label_index import reference_index, top_ids
from federation.soft_labels import (
    REFERENCE,
    EnsembleTargets,
    SoftLabelLayout,
    build_layout,
    full_distribution,
    soft_labels,
)
from secure_kd.config import ModelConfig
from secure_kd.data import TokenizedExample
from secure_kd.losses import get_loss
from secure_kd.models import load_teacher

TINY_REFERENCE = {"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}}


class _Bigram(torch.nn.Module):
    """Logits at t depend on the token at t only: the top-k of a position is a row of the table's."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=generator))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _examples():
    ids = [[1, 2, 3, 2, 2], [3, 2, 1], [4, 4]]
    return [TokenizedExample(x, list(x), i) for i, x in enumerate(ids)]


def _by_hand(table: torch.Tensor, token: int, k: int) -> list[int]:
    row = table[token].double().tolist()
    return sorted(range(len(row)), key=lambda v: (-row[v], v))[:k]


def test_top_ids_are_the_largest_values_with_ties_to_the_smaller_id():
    row = np.array([0.5, 2.0, 2.0, -1.0, 2.0, 0.5])
    assert top_ids(row, 2).tolist() == [1, 2]  # three-way tie at 2.0: the smaller ids win
    assert top_ids(row, 4).tolist() == [1, 2, 4, 0]
    assert top_ids(row, 6).tolist() == [1, 2, 4, 0, 5, 3]
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
        k = int(rng.integers(1, 40))
        expected = sorted(range(40), key=lambda v: (-row[v], v))[:k]
        assert top_ids(row, k).tolist() == expected


def test_reference_layout_holds_each_positions_top_k_of_the_reference():
    model, examples = _Bigram(8), _examples()
    table = model.table.detach().clone()
    layout = build_layout(examples, k=3, vocab_size=8, reference=model)
    assert layout.kind == REFERENCE and layout.shape == (7, 4)
    # position (example e, t) reads input token ids[e][t]: its ids are that table row's top 3
    tokens = [1, 2, 3, 2, 3, 2, 4]
    assert layout.index.tolist() == [_by_hand(table, t, 3) for t in tokens]
    assert len({tuple(r) for r in layout.index.tolist()}) > 1  # not one shared set
    again = build_layout(_examples(), k=3, vocab_size=8, reference=_Bigram(8))
    assert again.fingerprint == layout.fingerprint
    assert build_layout(_examples(), k=3, vocab_size=8, reference=_Bigram(8, seed=1)).fingerprint != (
        layout.fingerprint
    )
    assert build_layout(_examples(), k=3, vocab_size=8).fingerprint != layout.fingerprint  # unigram
    with pytest.raises(ValueError, match="read-only"):
        layout.index[0, 0] = 5


def test_reference_index_is_the_float64_top_k_and_ignores_output_padding():
    reference = load_teacher(ModelConfig.model_validate(TINY_REFERENCE), vocab_size=40, seed=3)
    copy = load_teacher(ModelConfig.model_validate(TINY_REFERENCE), vocab_size=40, seed=3)
    examples = [TokenizedExample([5, 9, 2, 7, 7, 1], [5, 9, 2, 7, 7, 1], 0)]
    positions = ((0, 1, 2, 3, 4),)
    index = reference_index(reference, examples, positions, 6, vocab_size=32)  # ids 32..39: padding
    with torch.no_grad():
        logits = copy.double()(input_ids=torch.tensor([examples[0].input_ids])).logits[0, :5, :32]
    assert index.tolist() == logits.topk(6, dim=-1).indices.tolist()
    assert index.max() < 32
    with pytest.raises(ValueError, match="must use the job's tokenizer"):
        reference_index(copy, examples, positions, 6, vocab_size=64)


def test_soft_labels_are_each_models_probabilities_at_the_positions_ids_plus_tail():
    examples = _examples()
    layout = build_layout(examples, k=3, vocab_size=8, reference=_Bigram(8))
    client = _Bigram(8, seed=5)  # an organization's model: not the reference
    soft = soft_labels(client, examples, layout, pad_id=0, batch_size=2)
    tokens = [1, 2, 3, 2, 3, 2, 4]
    for row, token in enumerate(tokens):
        probs = torch.softmax(client.table[token].double(), -1).detach().numpy()
        ids = layout.index[row]
        np.testing.assert_allclose(soft[row], [*probs[ids], 1 - probs[ids].sum()], atol=1e-6)
    # the payload is values only, in the public layout: no token id of the client's own choosing
    assert soft.shape == layout.shape and soft.dtype == np.float64


def test_ensemble_targets_carry_each_positions_ids_and_train_towards_the_uniform_tail():
    examples = _examples()
    layout = build_layout(examples, k=3, vocab_size=8, reference=_Bigram(8))
    soft = soft_labels(_Bigram(8, seed=5), examples, layout, pad_id=0)
    targets = EnsembleTargets(soft, layout)
    batch = {"example_index": torch.tensor([1, 0]), "input_ids": torch.zeros(2, 6, dtype=torch.long)}
    topk = targets(batch)
    assert topk.values.shape == (2, 6, 3)
    # batch row 0 is example 1, whose layout rows are 4 and 5 (positions 0 and 1)
    for t, row in ((0, 4), (1, 5)):
        assert topk.indices[0, t].tolist() == layout.index[row].tolist()
        np.testing.assert_allclose(topk.values[0, t].exp().numpy(), soft[row, :3], rtol=1e-5)
        np.testing.assert_allclose(topk.missing_mass()[0, t].item(), soft[row, 3], rtol=1e-4, atol=1e-6)
    # the engine's forward KL with tail=uniform is the KL to the full distribution the layout implies
    full = torch.from_numpy(full_distribution(soft[4:6], layout.index[4:6], 8))
    student = torch.randn(1, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = (full * (full.log() - torch.log_softmax(student[0], -1))).sum(-1).mean()
    loss = get_loss("forward_kl")(student, topk[0:1, 0:2], tail="uniform")
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-4)


def test_full_distribution_spreads_the_tail_uniformly_over_the_other_tokens():
    soft = np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    index = np.array([[3, 0], [1, 2]])
    full = full_distribution(soft, index, 5)
    np.testing.assert_allclose(full[0], [0.2, 0.1, 0.1, 0.5, 0.1])
    np.testing.assert_allclose(full[1], [0.8 / 3, 0.1, 0.1, 0.8 / 3, 0.8 / 3])


def test_a_one_dimensional_index_is_one_set_for_every_position():
    layout = SoftLabelLayout(index=(4, 1), lengths=(4,), positions=((0, 1, 2),), fingerprint="f")
    assert layout.index.tolist() == [[4, 1]] * 3 and layout.shape == (3, 3)
    with pytest.raises(ValueError, match="expected"):
        SoftLabelLayout(index=np.zeros((2, 2)), lengths=(4,), positions=((0, 1, 2),), fingerprint="f")


def _file_job(tmp_path, records, **changes) -> FederatedJob:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tiny_job(
        tmp_path,
        mode="fed_distill",
        data={"train": str(path), "heldout_fraction": 0.1, "max_length": 24},
        transfer={"n_records": 6, "index_k": 8, "digest_steps": 1, "reference": TINY_REFERENCE},
        **changes,
    )


def test_the_layout_depends_on_public_records_only_not_on_what_the_organizations_hold(tmp_path):
    records = [
        {"text": f"record {i} says {'abc ' * (i % 5)}the meeting is at {i % 12} pm."} for i in range(60)
    ]
    job = _file_job(tmp_path / "a", records)
    data = job_data(job)
    assert data.layout.kind == REFERENCE
    public = {r["text"] for r in data.split.test + data.split.transfer}
    private = [i for i, r in enumerate(records) if r["text"] not in public]
    changed = [dict(r) for r in records]
    for i in private:  # every organization's records become other text
        changed[i]["text"] = f"private {i}: account 4417-{i:04d} belongs to patient number {i * 7}."
    other = job_data(_file_job(tmp_path / "b", changed))
    assert other.layout.fingerprint == data.layout.fingerprint
    assert np.array_equal(other.layout.index, data.layout.index)
    # the check can fail: changing one transfer record changes the layout
    transfer_record = next(
        i for i, r in enumerate(records) if r["text"] in {t["text"] for t in data.split.transfer}
    )
    changed[transfer_record]["text"] = "an entirely different public sentence about trains and weather."
    assert job_data(_file_job(tmp_path / "c", changed)).layout.fingerprint != data.layout.fingerprint


def test_ckks_fed_distill_runs_on_the_reference_layout_and_the_ensemble_is_the_upload_mean(tmp_path):
    job = tiny_job(
        tmp_path,
        mode="fed_distill",
        protection="ckks",
        ckks={"max_abs_update": 1.0},
        transfer={"n_records": 6, "index_k": 8, "digest_steps": 1, "reference": TINY_REFERENCE},
    )
    result, grid = federate(job)
    layout = job_data(job).layout
    assert result.setup["index"] == REFERENCE and result.setup["index_k"] == 8
    assert [r.answered for r in result.rounds] == [["org-0", "org-1", "org-2"]]
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / "ckks-secret.bin").read_bytes()
    )
    n = layout.n_positions * layout.width
    uploads = [decrypt(keyring, r.content["config"]["ciphertext"], n) for _, r in grid.sent("train")]
    mean = decrypt_mean(keyring, grid.sent("train.digest")[0][0].content["config"]["aggregate"], n)
    np.testing.assert_allclose(mean, np.mean(uploads, axis=0), atol=3 * keyring.noise_bound(3))
    # each upload is that organization's student at the reference's ids: rows sum to 1 with the tail
    for upload in uploads:
        np.testing.assert_allclose(upload.reshape(layout.shape).sum(1), 1.0, atol=1e-4)
    assert result.final is not None and all("digest-loss" in c.metrics for c in result.final.clients)


def test_distilling_from_the_reference_layout_moves_the_student_towards_the_ensemble(tmp_path):
    job = tiny_job(
        tmp_path,
        mode="fed_distill",
        transfer={"n_records": 6, "index_k": 8, "digest_steps": 1, "reference": TINY_REFERENCE},
        train={"max_steps": 2, "batch_size": 4, "lr": 3e-2, "schedule": "constant", "eval_batches": 1},
    )
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    public, model = ws.public, ws.student()
    target_model = load_teacher(job.transfer.reference, vocab_size=public.vocab_size, seed=11)
    target = soft_labels(target_model, public.transfer, public.layout, pad_id=public.pad_id)

    def kl() -> float:
        mine = soft_labels(model, public.transfer, public.layout, pad_id=public.pad_id)
        return float(np.mean(np.sum(target * (np.log(target + 1e-12) - np.log(mine + 1e-12)), axis=1)))

    before = kl()
    distill_from(ws, model, target, 1, steps=20)
    assert kl() < 0.8 * before


@pytest.mark.parametrize(
    ("transfer", "tokenizer", "words"),
    [
        ({"reference": {"source": "smollm2"}}, "tiny:300", "set tokenizer: smollm2"),
        ({"reference": {"source": "teacher_layers", "layers": [0]}}, "tiny:300", "cannot be a reference"),
        ({"reference": {**TINY_REFERENCE, "lora": {"r": 2}}}, "tiny:300", "drop lora"),
    ],
)
def test_a_reference_that_cannot_score_the_transfer_text_is_refused(tmp_path, transfer, tokenizer, words):
    with pytest.raises(ValidationError, match=words):
        FederatedJob.model_validate(
            {"mode": "fed_distill", "tokenizer": tokenizer, "transfer": transfer, "out": str(tmp_path)}
        )
