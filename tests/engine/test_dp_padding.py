"""A pad id that is also a real token inside the sequences (SmolLM2-Instruct: pad = eos = <|im_end|>).

`nn.Embedding(padding_idx=p)` gives row p no gradient, whatever the input: non-DP training never
moves it. Opacus' embedding rules ignore `padding_idx`, so without secure-kd's own rules the
per-example gradient (hooks) and norm (ghost) count every occurrence of p, an example with many
chat turns is over-clipped, and hooks mode trains the row. The reference here is a per-example
autograd loop over an `nn.Embedding(padding_idx=PAD)` whose pad token occurs inside the sequences,
run one example at a time, unpadded: it shares no code with Opacus' hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from secure_kd.dp.engine import PrivateStudent
from secure_kd.losses import get_loss

VOCAB, HIDDEN, PAD = 40, 16, 2
# rows: a chat of three turns (PAD closes each), one turn, PAD-dense, no PAD at all
SEQUENCES = [
    [5, 9, 11, PAD, 7, 13, PAD, 21, 8, PAD],
    [6, 17, 30, PAD],
    [PAD, 12, PAD, PAD, 19, PAD, PAD],
    [3, 14, 25, 33, 4],
]
CASES = [("hooks", True), ("functorch", True), ("ghost", True), ("ghost", False)]
IDS = ["hooks", "functorch", "ghost-bookkeeping", "ghost-second-backward"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        model.model.embed_tokens.weight[PAD].normal_(std=0.02)  # like every other row, not zeros
    assert model.model.embed_tokens.padding_idx == PAD
    return model


def batch() -> dict[str, torch.Tensor]:
    width = max(map(len, SEQUENCES))
    ids = torch.full((len(SEQUENCES), width), PAD)  # right padding uses the same id
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(SEQUENCES):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = torch.full_like(ids, -100)
    for row, seq in enumerate(SEQUENCES):
        labels[row, : len(seq) - 1] = torch.tensor(seq[1:])
    teacher = torch.randn(len(SEQUENCES), width, VOCAB, generator=torch.Generator().manual_seed(1)).double()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "teacher": teacher}


def objective(logits, teacher, labels, reduction):
    return get_loss("jsd")(logits, teacher, labels, beta=0.5, reduction=reduction)


def autograd_loop(data: dict) -> list[dict[str, torch.Tensor]]:
    model, out = llama(), []
    for row, seq in enumerate(SEQUENCES):
        n = len(seq)
        model.zero_grad()
        logits = model(input_ids=data["input_ids"][row : row + 1, :n]).logits
        objective(
            logits, data["teacher"][row : row + 1, :n], data["labels"][row : row + 1, :n], "mean"
        ).backward()
        out.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return out


def flat_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()]).norm()


def private(model: nn.Module, mode: str, bookkeeping: bool, clip: float, noise: float, lr: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return PrivateStudent(
        model,
        optimizer,
        noise_multiplier=noise,
        max_grad_norm=clip,
        expected_batch_size=len(SEQUENCES),
        mode=mode,
        bookkeeping=bookkeeping,
    )


def backward(model: nn.Module, student: PrivateStudent, data: dict) -> None:
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    student.backward(logits, lambda lg: objective(lg, data["teacher"], data["labels"], "none"))


def test_the_pad_row_has_no_gradient_under_autograd_although_the_pad_token_is_used():
    reference = autograd_loop(batch())
    embedding = "model.embed_tokens.weight"
    for grads, seq in zip(reference, SEQUENCES, strict=True):
        assert grads[embedding][PAD].abs().max() == 0  # padding_idx: no gradient, ever
        other = next(t for t in seq if t != PAD)
        assert grads[embedding][other].abs().max() > 0


@pytest.mark.parametrize(("mode", "bookkeeping"), CASES, ids=IDS)
def test_per_example_norms_and_clipped_sum_match_autograd_with_padding_idx(mode, bookkeeping):
    data = batch()
    reference = autograd_loop(data)
    ref_norms = torch.stack([flat_norm(g) for g in reference])
    clip = float(ref_norms.median())  # some examples clipped, some not
    model = llama()
    names = {id(p): name for name, p in model.named_parameters()}
    student = private(model, mode, bookkeeping, clip, noise=0.0, lr=0.0)
    backward(model, student, data)
    if mode == "ghost":
        assert student.last_second_pass == ("bookkeeping" if bookkeeping else "backward")
    torch.testing.assert_close(student.per_sample_norms().double(), ref_norms, rtol=1e-5, atol=1e-7)
    if mode != "ghost":
        for p in student.optimizer.params:
            expected = torch.stack([g[names[id(p)]] for g in reference])
            torch.testing.assert_close(p.grad_sample, expected, rtol=1e-5, atol=1e-8)
    student.optimizer.step()  # noise 0, lr 0: p.grad = sum of clipped per-example gradients / batch
    factors = [min(1.0, clip / (float(n) + 1e-6)) for n in ref_norms]
    assert sum(f < 1 for f in factors) >= 1 and sum(f == 1 for f in factors) >= 1
    for p in student.optimizer.params:
        expected = sum(f * g[names[id(p)]] for f, g in zip(factors, reference, strict=True)) / len(SEQUENCES)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8)
    student.close()


@pytest.mark.parametrize(("mode", "bookkeeping"), CASES, ids=IDS)
def test_a_noisy_dp_step_leaves_the_pad_row_where_non_dp_training_leaves_it(mode, bookkeeping):
    data = batch()
    model = llama()
    before = model.model.embed_tokens.weight.detach().clone()
    student = private(model, mode, bookkeeping, clip=1.0, noise=1.0, lr=0.5)
    student.optimizer.generator = torch.Generator().manual_seed(0)
    backward(model, student, data)
    student.optimizer.step()
    after = model.model.embed_tokens.weight.detach()
    assert torch.equal(after[PAD], before[PAD])  # frozen, as under autograd
    assert (after[PAD + 1] - before[PAD + 1]).abs().max() > 0  # every other row moves (noise at least)
    student.close()


def test_a_tied_output_layer_still_trains_the_pad_row():
    """Tied weights: the output layer's use of row PAD has a gradient (eos is predicted), so no freezing."""
    model = llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    before = model.lm_head.weight.detach().clone()
    student = private(model, "hooks", True, clip=1.0, noise=1.0, lr=0.5)
    student.optimizer.generator = torch.Generator().manual_seed(0)
    backward(model, student, batch())
    student.optimizer.step()
    assert (model.lm_head.weight.detach()[PAD] - before[PAD]).abs().max() > 0
    student.close()
