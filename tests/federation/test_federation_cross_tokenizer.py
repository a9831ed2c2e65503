"""fed_distill across tokenizers: the byte-aligned layout (federation/byte_layout.py), the organizations'
rows and their distillation (federation/client/cross_tokenizer.py), the config's refusals, and the shipped
two-tokenizer configuration under CKKS end to end.

References computed here independently of the code under test: the common boundaries from each
tokenizer's own character offsets (ASCII text, so characters are bytes), the rows by brute force over
the vocabulary with GPT-2's byte alphabet written out below, the CKKS aggregate against the mean of the
uploads decrypted by a key holder, and bits per byte by summing token log-probabilities by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federation_apps import federate

from federation.byte_layout import build_byte_layout
from federation.client.cross_tokenizer import example_rows, row_kl
from federation.client.workspace import SECRET_CONTEXT_FILE, STUDENT_FILE, OrgWorkspace
from federation.config import FederatedJob, load_federated_job
from federation.crypto.he import Keyring, decrypt, decrypt_mean, load_public_context
from federation.job_data import job_data, organization_data
from federation.students import build_student
from secure_kd.config import ConfigError
from secure_kd.data import tokenize_records
from secure_kd.data.tokenizer import train_tiny_tokenizer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "federated-cross-tokenizer.yaml"
TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "a bird in the hand is worth two in the bush, said the cat",
    "the dog and the cat are friends; the bird is not",
    "two birds, one mat, three logs and a hand",
] * 3


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode (encoder.py), inverted: piece character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def pair():
    tokenizers = {"a": train_tiny_tokenizer(TEXTS, 280), "b": train_tiny_tokenizer(TEXTS, 330)}
    records = [{"text": t} for t in TEXTS[:4]]
    examples = {n: tokenize_records(records, tok, max_length=14) for n, tok in tokenizers.items()}
    layout = build_byte_layout([r["text"] for r in records], tokenizers, examples, k=6)
    return tokenizers, records, examples, layout


def test_rows_sit_between_the_byte_offsets_where_every_tokenizer_ends_a_token(pair):
    tokenizers, records, examples, layout = pair
    assert len({len(t) for t in tokenizers.values()}) == 2
    for i, record in enumerate(records):
        ends, reach = [], []
        for name, tok in tokenizers.items():
            n_text = sum(1 for x in examples[name][i].input_ids if x != tok.eos_token_id)
            offsets = tok(record["text"], return_offsets_mapping=True)["offset_mapping"][:n_text]
            ends.append({end for _, end in offsets})
            reach.append(offsets[-1][1])
        expected = sorted(e for e in set.intersection(*ends) if 0 < e <= min(reach))
        assert list(layout.boundaries[i]) == expected
        assert len(expected) >= 3  # the tokenizers differ, yet agree at word ends
    assert layout.n_positions == sum(len(b) - 1 for b in layout.boundaries)
    assert layout.width == 6 + 2 and layout.kind == "byte-aligned"


def _reference_rows(tok, text: str, ids: list[int], log_probs: torch.Tensor, bounds, byte_set) -> np.ndarray:
    alphabet = gpt2_byte_alphabet()
    special = set(tok.all_special_ids)
    first = {}
    for v in range(len(tok)):
        piece = tok.convert_ids_to_tokens(v)
        first[v] = None if v in special else alphabet[piece[0]]
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    last_at = {end: j for j, (_, end) in enumerate(offsets)}
    probs = log_probs.double().exp()
    data = text.encode()
    rows = []
    for b, b_next in zip(bounds[:-1], bounds[1:], strict=True):
        j, j_next = last_at[b], last_at[b_next]
        p_span = math.prod(float(probs[u - 1, ids[u]]) for u in range(j + 1, j_next + 1))
        mass = {c: 0.0 for c in byte_set}
        other = 0.0
        for v in range(len(tok)):
            if first[v] in mass:
                mass[first[v]] += float(probs[j, v])
            else:
                other += float(probs[j, v])
        if data[b] in mass:
            mass[data[b]] -= p_span
        else:
            other -= p_span
        rows.append([p_span, *(mass[c] for c in byte_set), other])
    return np.array(rows)


def test_each_tokenizers_rows_equal_a_brute_force_over_its_vocabulary(pair):
    tokenizers, records, examples, layout = pair
    generator = torch.Generator().manual_seed(0)
    offset = 0
    for i, record in enumerate(records):
        n_rows = len(layout.boundaries[i]) - 1
        for name, tok in tokenizers.items():
            view = layout.views[name]
            ids = list(view.examples[i].input_ids)
            log_probs = torch.log_softmax(
                torch.randn(len(ids), len(tok), generator=generator).double() * 3, -1
            )
            rows, log_span = example_rows(log_probs.double(), i, len(ids), view, layout, "cpu")
            expected = _reference_rows(
                tok, record["text"], ids, log_probs, layout.boundaries[i], layout.byte_set
            )
            np.testing.assert_allclose(rows.numpy(), expected, atol=1e-12)
            np.testing.assert_allclose(rows.sum(-1).numpy(), 1.0, atol=1e-12)
            np.testing.assert_allclose(log_span.exp().numpy(), expected[:, 0], rtol=1e-10)
        offset += n_rows
    assert offset == layout.n_positions


def test_the_row_kl_is_zero_at_the_target_and_positive_elsewhere():
    target = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.0, 0.9]])
    assert float(row_kl(target, target, target[:, 0].log())) == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    by_hand = np.mean(
        [
            sum(p * math.log(p / q) for p, q in zip(t, o, strict=True) if p > 0)
            for t, o in zip(target.tolist(), other.tolist(), strict=True)
        ]
    )
    assert float(row_kl(target, other, other[:, 0].log())) == pytest.approx(by_hand, rel=1e-5)


def _job(**changes) -> FederatedJob:
    return load_federated_job(CONFIG, [f"{key}={value}" for key, value in changes.items()])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"mode": "fedavg"}, "No anchor federates across tokenizers: the organizations use tokenizers"),
        ({"mode": "pate", "protection": "plaintext"}, "counts votes for one tokenizer's token ids"),
        ({"mode": "p2p", "protection": "plaintext"}, "mode p2p sends a peer soft labels"),
        (
            {"transfer.reference": "{source: tiny}"},
            "No anchor federates across tokenizers: transfer.reference",
        ),
        ({"organization_models.7": "{tokenizer: 'tiny:400'}"}, "organization_models names organizations [7]"),
        ({"organization_models.3": "{tokenizer: 'tiny:100'}"}, "organization_models.3.tokenizer='tiny:100'"),
        ({"organization_models.3": "{nope: 1}"}, "organization_models.3.nope"),
        ({"transfer.layout": "tokens"}, "No anchor federates across tokenizers: transfer.layout: tokens"),
    ],
)
def test_what_cannot_federate_across_tokenizers_is_refused_with_the_field_and_the_fix(override, needle):
    with pytest.raises(ConfigError) as error:
        _job(**override)
    assert needle in str(error.value)


def test_one_tokenizer_for_every_organization_keeps_the_token_layout():
    job = _job(**{"organization_models.2": "{tokenizer: 'tiny:320'}", "organization_models.3": "{}"})
    assert job_data(job).layout.kind == "unigram"
    fedavg = _job(
        mode="fedavg", **{"organization_models.2": "{tokenizer: 'tiny:320'}", "organization_models.3": "{}"}
    )
    assert fedavg.mode == "fedavg"
    bytes_one = _job(organization_models="{}", **{"transfer.layout": "bytes"})
    layout = job_data(bytes_one).layout
    assert layout.kind == "byte-aligned" and list(layout.views) == ["tiny:320"]
    with pytest.raises(ConfigError, match="transfer.layout: bytes is a layout of fed_distill's soft labels"):
        _job(organization_models="{}", mode="fedavg", **{"transfer.layout": "bytes"})


def _bits_per_byte_by_hand(model, tokenizer, texts: list[str], max_length: int) -> float:
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"][:max_length]  # the text tokens the org's sequence keeps
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)))
            n_bytes += len(tokenizer.decode(ids[1:]).encode())
    return nll / n_bytes / math.log(2)


def test_two_tokenizers_federate_under_ckks_and_every_student_improves(tmp_path):
    job = _job(out=str(tmp_path / "run"), rounds=1, **{"data.max_length": 40})
    vocabularies = {i: len(organization_data(job, i).tokenizer) for i in range(job.n_organizations)}
    assert vocabularies == {0: 320, 1: 320, 2: 512, 3: 512}
    fresh = {}
    for i in range(job.n_organizations):
        fresh[i] = build_student(job, i, organization_data(job, i))
    result, grid = federate(job)

    # the server relays a public context only and never holds the secret
    public = load_public_context(grid.sent("query.keygen")[0][1].content["config"]["public-context"])
    assert not public.context.is_private() and not public.context.has_secret_key()
    secrets = {p.relative_to(tmp_path) for p in (tmp_path / "run").rglob(SECRET_CONTEXT_FILE)}
    assert secrets == {Path("run") / "orgs" / f"org-{i}" / SECRET_CONTEXT_FILE for i in range(4)}

    # the aggregate is the plain mean of the four organizations' row vectors, decrypted one by one
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / SECRET_CONTEXT_FILE).read_bytes()
    )
    layout = job_data(job).layout
    n = layout.n_positions * layout.width
    uploads = [decrypt(keyring, reply.content["config"]["ciphertext"], n) for _, reply in grid.sent("train")]
    assert len(uploads) == 4
    for upload in uploads:
        np.testing.assert_allclose(upload.reshape(layout.shape).sum(1), 1.0, atol=1e-6)
    mean = decrypt_mean(keyring, grid.sent("train.digest")[0][0].content["config"]["aggregate"], n)
    np.testing.assert_allclose(mean, np.mean(uploads, axis=0), atol=3 * keyring.noise_bound(4))
    # the two tokenizers' uploads differ (their students differ) but fill the same rows
    assert np.abs(uploads[0] - uploads[2]).max() > 1e-3

    # each organization's student: held-out bits per byte before the round and after the final digest
    before = {c.org: c.metrics["heldout-bits-per-byte"] for c in result.rounds[0].clients}
    after = {c.org: c.metrics["heldout-bits-per-byte"] for c in result.final.clients}
    for i in range(job.n_organizations):
        ws = OrgWorkspace(job, i, tmp_path / "run" / "orgs" / f"org-{i}")
        assert (ws.root / STUDENT_FILE).is_file()
        texts = [r["text"] for r in ws.own_data.heldout][: job.train.eval_batches * job.train.batch_size]
        by_hand_before = _bits_per_byte_by_hand(fresh[i].eval(), ws.public.tokenizer, texts, 40)
        by_hand_after = _bits_per_byte_by_hand(ws.student().eval(), ws.public.tokenizer, texts, 40)
        assert by_hand_before == pytest.approx(before[f"org-{i}"], abs=2e-3)
        assert by_hand_after == pytest.approx(after[f"org-{i}"], abs=2e-3)
        assert by_hand_after < by_hand_before - 0.1, (i, by_hand_before, by_hand_after)
    assert all("digest-loss" in c.metrics for c in result.final.clients)


def test_in_plaintext_the_ensemble_is_the_mean_of_the_uploaded_rows(tmp_path):
    job = _job(out=str(tmp_path / "run"), rounds=1, protection="plaintext", **{"data.max_length": 32})
    _, grid = federate(job)
    uploads = [reply.content["arrays"]["soft-labels"].numpy() for _, reply in grid.sent("train")]
    layout = job_data(job).layout
    assert len(uploads) == 4 and all(u.shape == layout.shape for u in uploads)
    ensemble = grid.sent("train.digest")[0][0].content["arrays"]["soft-labels"].numpy()
    np.testing.assert_allclose(ensemble, sum(uploads) / 4, atol=1e-12)


def test_the_fingerprint_binds_the_text_and_every_tokenizer(pair):
    tokenizers, records, examples, layout = pair
    texts = [r["text"] for r in records]
    again = build_byte_layout(texts, tokenizers, examples, k=6)
    assert again.fingerprint == layout.fingerprint
    other = {"a": tokenizers["a"], "b": train_tiny_tokenizer(TEXTS, 300)}
    other_examples = {n: tokenize_records(records, tok, max_length=14) for n, tok in other.items()}
    assert build_byte_layout(texts, other, other_examples, k=6).fingerprint != layout.fingerprint
    edited = [texts[0].replace("cat", "cot"), *texts[1:]]
    edited_examples = {
        n: tokenize_records([{"text": t} for t in edited], tok, max_length=14)
        for n, tok in tokenizers.items()
    }
    assert build_byte_layout(edited, tokenizers, edited_examples, k=6).fingerprint != layout.fingerprint


def test_an_aggregate_that_is_not_rows_of_the_layout_is_refused(pair):
    from federation.soft_labels import check_soft_labels

    layout = pair[3]
    good = np.full(layout.shape, 1.0 / layout.width)
    assert check_soft_labels(good, layout).shape == layout.shape
    with pytest.raises(ValueError, match="shared layout"):
        check_soft_labels(good[:-1], layout)
    shifted = good.copy()
    shifted[3, 0] += 0.5
    with pytest.raises(ValueError, match="rows must sum to 1"):
        check_soft_labels(shifted, layout)
