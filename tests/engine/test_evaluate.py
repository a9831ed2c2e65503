"""Model-level evaluation on tiny random Llamas, against direct per-example computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, processors
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from secure_kd.evaluate import (
    canary_exposure,
    per_example_loss,
    perplexity,
    score_candidates,
    teacher_agreement,
)

VOCAB = 64


def tiny_llama(seed: int, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def random_sequences(seed: int, lengths: list[int]) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=generator) for length in lengths]


def right_padded_batch(sequences: list[Tensor], labels: list[Tensor] | None = None) -> dict[str, Tensor]:
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    label_ids = torch.full_like(input_ids, -100)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        label_ids[row, : len(sequence)] = sequence if labels is None else labels[row]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def unpadded_logits(model: nn.Module, sequence: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=sequence.unsqueeze(0)).logits[0]


# --------------------------------------------------------------------------- perplexity and losses


def test_perplexity_equals_token_weighted_cross_entropy_over_all_tokens() -> None:
    model = tiny_llama(0)
    sequences = random_sequences(1, [9, 4, 12, 6, 7])
    labels = [sequence.clone() for sequence in sequences]
    labels[2][:5] = -100  # a masked prompt: its 4 predicted tokens (positions 1-4) must not count

    reference_sum, reference_count = 0.0, 0
    for sequence, label in zip(sequences, labels, strict=True):
        logits = unpadded_logits(model, sequence)
        reference_sum += float(F.cross_entropy(logits[:-1], label[1:], ignore_index=-100, reduction="sum"))
        reference_count += int((label[1:] != -100).sum())

    batches = [right_padded_batch(sequences[:2], labels[:2]), right_padded_batch(sequences[2:], labels[2:])]
    result = perplexity(model, batches)

    assert result["tokens"] == reference_count == 8 + 3 + 7 + 5 + 6
    assert result["nll"] == pytest.approx(reference_sum / reference_count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(reference_sum / reference_count), rel=1e-5)


def test_perplexity_does_not_depend_on_padding_or_batching() -> None:
    model = tiny_llama(0)
    sequences = random_sequences(2, [10, 3, 7])
    one_by_one = perplexity(model, [right_padded_batch([sequence]) for sequence in sequences])
    padded_together = perplexity(model, [right_padded_batch(sequences)])
    without_labels = perplexity(
        model, [{key: value for key, value in right_padded_batch(sequences).items() if key != "labels"}]
    )
    assert padded_together["tokens"] == one_by_one["tokens"] == without_labels["tokens"] == 17
    assert padded_together["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)
    assert without_labels["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)


def test_perplexity_restores_training_mode_and_rejects_empty_input() -> None:
    model = tiny_llama(0).train()
    perplexity(model, [right_padded_batch(random_sequences(3, [5]))])
    assert model.training
    with pytest.raises(ValueError, match="no label tokens"):
        perplexity(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(model, [{"labels": torch.zeros(1, 3, dtype=torch.long)}])


def test_per_example_loss_is_each_examples_mean_nll() -> None:
    model = tiny_llama(0)
    sequences = random_sequences(4, [6, 11, 4, 8])
    expected = torch.stack(
        [F.cross_entropy(unpadded_logits(model, sequence)[:-1], sequence[1:]) for sequence in sequences]
    )
    losses = per_example_loss(model, [right_padded_batch(sequences[:3]), right_padded_batch(sequences[3:])])
    assert losses.shape == (4,)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)


def test_per_example_loss_names_an_example_without_labels() -> None:
    model = tiny_llama(0)
    sequences = random_sequences(5, [5, 5])
    batch = right_padded_batch(sequences, labels=[sequences[0], torch.full((5,), -100)])
    with pytest.raises(ValueError, match="example 1"):
        per_example_loss(model, [batch])


def test_teacher_agreement_against_direct_kl_and_argmax() -> None:
    student, teacher = tiny_llama(0), tiny_llama(1)
    sequences = random_sequences(6, [8, 5, 9])
    matches, kl_sum, positions = 0, 0.0, 0
    for sequence in sequences:
        student_logprobs = F.log_softmax(unpadded_logits(student, sequence)[:-1], dim=-1)
        teacher_logprobs = F.log_softmax(unpadded_logits(teacher, sequence)[:-1], dim=-1)
        kl_sum += float(F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum"))
        matches += int((student_logprobs.argmax(-1) == teacher_logprobs.argmax(-1)).sum())
        positions += len(sequence) - 1

    result = teacher_agreement(student, teacher, [right_padded_batch(sequences)])
    assert result["positions"] == positions
    assert result["top1_agreement"] == pytest.approx(matches / positions)
    assert result["mean_forward_kl"] == pytest.approx(kl_sum / positions, rel=1e-4)

    same = teacher_agreement(teacher, teacher, [right_padded_batch(sequences)])
    assert same["top1_agreement"] == 1.0
    assert same["mean_forward_kl"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_agreement_rejects_different_vocabularies() -> None:
    with pytest.raises(ValueError, match="shared vocabulary"):
        teacher_agreement(
            tiny_llama(0), tiny_llama(1, vocab_size=VOCAB + 8), [right_padded_batch(random_sequences(7, [4]))]
        )


# --------------------------------------------------------------------------- candidate scoring


class CountingModel(nn.Module):
    """Delegates to a model and counts its forward calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


def naive_suffix_nll(model: nn.Module, prefix: list[int], suffix: list[int]) -> float:
    """One full forward over prefix + suffix; sum the suffix tokens' NLL."""
    sequence = torch.tensor(prefix + suffix)
    logprobs = F.log_softmax(unpadded_logits(model, sequence), dim=-1)
    positions = torch.arange(len(prefix) - 1, len(sequence) - 1)
    return float(-logprobs[positions, sequence[positions + 1]].sum())


@pytest.mark.parametrize("prefix", [[5], [3, 17, 42, 8, 0]])
def test_score_candidates_equals_naive_full_forward(prefix: list[int]) -> None:
    model = tiny_llama(0)
    candidates = torch.randint(0, VOCAB, (37, 4), generator=torch.Generator().manual_seed(8))
    scores = score_candidates(model, prefix, candidates, batch_size=8)
    expected = torch.tensor([naive_suffix_nll(model, prefix, row.tolist()) for row in candidates])
    assert scores.shape == (37,)
    torch.testing.assert_close(scores.float(), expected, atol=1e-5, rtol=0)


def test_score_candidates_groups_mixed_lengths_and_keeps_input_order() -> None:
    model = tiny_llama(0)
    prefix = [1, 2, 3]
    candidates = [[7], [9, 10, 11], [4, 4], [60], [12, 13, 14], [0, 63]]
    scores = score_candidates(model, prefix, candidates, batch_size=2)
    expected = torch.tensor([naive_suffix_nll(model, prefix, candidate) for candidate in candidates])
    torch.testing.assert_close(scores.float(), expected, atol=1e-5, rtol=0)


def test_score_candidates_makes_one_forward_per_batch_not_per_candidate() -> None:
    counting = CountingModel(tiny_llama(0))
    candidates = torch.randint(0, VOCAB, (100, 4), generator=torch.Generator().manual_seed(9))
    score_candidates(counting, [1, 2, 3], candidates, batch_size=16)
    assert counting.calls == 1 + math.ceil(100 / 16)

    counting.calls = 0
    score_candidates(counting, [1, 2, 3], [[5], [6], [7]], batch_size=16)
    assert counting.calls == 1  # one-token suffixes are all scored from the prefix's logits


def test_score_candidates_rejects_bad_input() -> None:
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="prefix_ids is empty"):
        score_candidates(model, [], [[1]])
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        score_candidates(model, [1], [[1], []])
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        score_candidates(model, [1], [[1, VOCAB]])
    with pytest.raises(ValueError, match="batch_size"):
        score_candidates(model, [1], [[1]], batch_size=0)


# --------------------------------------------------------------------------- canary exposure

CHARACTERS = list("0123456789abcdefghijklmnopqrstuvwxyz: ")


def char_tokenizer(merges: list[tuple[str, str]] | None = None) -> PreTrainedTokenizerFast:
    """Character-level BPE (optionally with a few merges) that prepends <bos>."""
    merges = merges or []
    vocab = {token: index for index, token in enumerate(["<bos>", "<eos>", "<unk>", *CHARACTERS])}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


FOUR_DIGIT_SPACE = [f"{number:04d}" for number in range(10_000)]


def memorizing_model(tokenizer: PreTrainedTokenizerFast, text: str, steps: int) -> LlamaForCausalLM:
    """Train a tiny Llama on `text` plus filler records with random numbers under another prefix."""
    model = tiny_llama(0, vocab_size=len(tokenizer))
    generator = torch.Generator().manual_seed(10)
    fillers = [f"note: {int(n):04d}" for n in torch.randint(0, 10_000, (7,), generator=generator)]
    batch = tokenizer([text, *fillers], return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_canary_exposure_of_a_memorized_canary_is_near_the_maximum() -> None:
    tokenizer = char_tokenizer()
    model = memorizing_model(tokenizer, "code: 4817", steps=150)
    result = canary_exposure(model, tokenizer, "code: ", FOUR_DIGIT_SPACE, "4817", batch_size=1024)
    assert result["n_candidates"] == 10_000
    assert result["max_exposure"] == pytest.approx(math.log2(10_000))
    assert result["rank"] == 1
    assert result["exposure"] > 12.5
    # The canary's loss is the model's NLL of its four digits after the prefix.
    ids = tokenizer("code: 4817")["input_ids"]
    assert result["canary_loss"] == pytest.approx(naive_suffix_nll(model, ids[:7], ids[7:]), abs=1e-5)


def test_canary_exposure_of_an_untrained_model_is_small() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(0, vocab_size=len(tokenizer))
    result = canary_exposure(model, tokenizer, "code: ", FOUR_DIGIT_SPACE, "4817", batch_size=1024)
    # An untrained model ranks the canary uniformly at random: exposure averages log2(e) ~ 1.44 bits
    # and exceeds 6 bits with probability 1/64, far from the memorized ~13.3.
    assert result["exposure"] < 6.0
    assert result["rank"] > 10_000 / 2**6


def test_canary_exposure_detects_a_merge_across_the_prefix_boundary() -> None:
    tokenizer = char_tokenizer(merges=[("4", "2")])
    model = tiny_llama(0, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="merges across the"):
        canary_exposure(model, tokenizer, "code: 4", ["2", "3"], "3")
    # Moving the boundary so that no merge crosses it works.
    result = canary_exposure(model, tokenizer, "code: ", ["42", "43"], "43")
    assert result["n_candidates"] == 2


def test_canary_exposure_rejects_a_canary_outside_the_space_and_duplicates() -> None:
    tokenizer = char_tokenizer()
    model = tiny_llama(0, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="not among the candidates"):
        canary_exposure(model, tokenizer, "code: ", ["0000", "0001"], "9999")
    with pytest.raises(ValueError, match="duplicates"):
        canary_exposure(model, tokenizer, "code: ", ["0000", "0000", "0001"], "0001")
