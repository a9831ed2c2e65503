"""Per-example gradients under Opacus vs a per-example loop: plain Llama, LoRA, tied embeddings.

The reference runs each example alone, unpadded, through plain autograd with the objective's
ordinary "mean" reduction, so it shares neither the batching, the padding, Opacus' hooks nor the
per-example reduction with the code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from secure_kd.config import LoraConfig
from secure_kd.dp.bookkeeping import BookKeeper
from secure_kd.dp.engine import PrivateStudent, check_supported, register_rms_norm_samplers, untie_embeddings
from secure_kd.losses import get_loss
from secure_kd.models import apply_lora

VOCAB, HIDDEN = 48, 16
LENGTHS = [7, 5, 7, 3]
MODES = ["hooks", "functorch", "ghost"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(tied: bool = False, seed: int = 0, bias: bool = False) -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so their gradients are not trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):  # biases start at 0
                p.normal_(std=0.1)
    return model


def biased_llama() -> nn.Module:
    """Every attention and MLP projection with a bias."""
    return llama(bias=True)


def lora_llama() -> nn.Module:
    model = apply_lora(llama(tied=True), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts lora_B at 0, which would make lora_A's gradients 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    width = max(LENGTHS)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    teacher = torch.randn(len(LENGTHS), width, VOCAB, generator=g, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "labels": shifted, "teacher": teacher}


def jsd(logits, teacher, labels, reduction):
    return get_loss("jsd")(logits, teacher, labels, beta=0.5, reduction=reduction)


def loop_gradients(model: nn.Module, data: dict) -> list[dict[str, torch.Tensor]]:
    """One example at a time, unpadded, plain autograd, batch-of-one mean."""
    out = []
    for row, n in enumerate(LENGTHS):
        model.zero_grad()
        logits = model(input_ids=data["input_ids"][row : row + 1, :n]).logits
        jsd(logits, data["teacher"][row : row + 1, :n], data["labels"][row : row + 1, :n], "mean").backward()
        out.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    return out


def flat_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()]).norm()


def private_backward(
    model: nn.Module, data: dict, mode: str, max_grad_norm: float, bookkeeping: bool = True
) -> PrivateStudent:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    private = PrivateStudent(
        model,
        optimizer,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(LENGTHS),
        mode=mode,
        bookkeeping=bookkeeping,
    )
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    private.backward(logits, lambda lg: jsd(lg, data["teacher"], data["labels"], "none"))
    return private


def check_against_loop(
    make_model, mode: str, bookkeeping: bool = True, second_pass: str | None = None
) -> None:
    data = batch()
    reference = loop_gradients(make_model(), data)
    ref_norms = torch.stack([flat_norm(g) for g in reference])
    clip = float(ref_norms.median())  # some examples are clipped, some are not
    model = make_model()
    names = {id(p): name for name, p in model.named_parameters()}
    private = private_backward(model, data, mode, clip, bookkeeping)
    if mode == "ghost":  # the clipped sum from the first pass's inputs and output gradients, or a 2nd pass
        assert private.last_second_pass == (second_pass or ("bookkeeping" if bookkeeping else "backward"))

    norms = private.per_sample_norms()
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-5, atol=1e-7)
    if mode != "ghost":  # hooks and functorch also materialize every per-example gradient
        for p in private.optimizer.params:
            expected = torch.stack([g[names[id(p)]] for g in reference])
            torch.testing.assert_close(p.grad_sample, expected, rtol=1e-5, atol=1e-8)

    private.optimizer.step()  # noise 0, lr 0: p.grad = sum of clipped per-example gradients / batch
    factors = [min(1.0, clip / (float(n) + 1e-6)) for n in ref_norms]
    for p in private.optimizer.params:
        expected = sum(f * g[names[id(p)]] for f, g in zip(factors, reference, strict=True)) / len(LENGTHS)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8)
    assert sum(f < 1 for f in factors) >= 1 and sum(f == 1 for f in factors) >= 1
    private.close()


@pytest.mark.parametrize("mode", MODES)
def test_plain_llama_matches_per_example_loop(mode):
    check_against_loop(llama, mode)


@pytest.mark.parametrize("mode", MODES)
def test_lora_student_matches_per_example_loop(mode):
    check_against_loop(lora_llama, mode)


def test_biased_llama_matches_per_example_loop_by_bookkeeping():
    check_against_loop(biased_llama, "ghost")


@pytest.mark.parametrize("make_model", [llama, biased_llama, lora_llama], ids=["plain", "biased", "lora"])
def test_ghost_without_bookkeeping_takes_the_second_backward_and_matches_the_loop(make_model):
    check_against_loop(make_model, "ghost", bookkeeping=False)


def ghost_clipped_sums(make_model, data: dict, clip: float, bookkeeping: bool, batches: int) -> dict:
    """p.grad after `batches` ghost backward calls (float32): the clipped sums the optimizer receives."""
    model = make_model().float()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    private = PrivateStudent(
        model,
        optimizer,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(LENGTHS),
        mode="ghost",
        bookkeeping=bookkeeping,
    )
    for _ in range(batches):
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        private.backward(logits, lambda lg: jsd(lg, data["teacher"].float(), data["labels"], "none"))
        assert private.last_second_pass == ("bookkeeping" if bookkeeping else "backward")
        if bookkeeping:  # nothing kept past the step
            assert not private._bookkeeper._inputs and not private._bookkeeper._output_grads
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    private.close()
    return grads


@pytest.mark.parametrize("batches", [1, 2], ids=["one", "accumulated"])
@pytest.mark.parametrize("make_model", [llama, biased_llama, lora_llama], ids=["plain", "biased", "lora"])
def test_bookkeeping_equals_the_second_backward_in_float32(make_model, batches):
    data = batch()
    norms = torch.stack([flat_norm(g) for g in loop_gradients(make_model(), data)])
    clip = float(norms.median())  # some examples clipped, some not
    kept = ghost_clipped_sums(make_model, data, clip, bookkeeping=True, batches=batches)
    two_pass = ghost_clipped_sums(make_model, data, clip, bookkeeping=False, batches=batches)
    assert kept.keys() == two_pass.keys()
    for name, grad in two_pass.items():
        assert grad.norm() > 0, name
        assert (kept[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_bookkeeping_keeps_only_the_last_forward_pass():
    model, data = llama(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    private = PrivateStudent(
        model, optimizer, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4, mode="ghost"
    )
    model.eval()  # a forward pass with gradients on and no backward (Opacus' hooks skip eval mode)
    model(input_ids=data["input_ids"])
    model.train()
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    private.backward(logits, lambda lg: jsd(lg, data["teacher"], data["labels"], "none"))
    assert private.last_second_pass == "bookkeeping"
    private.close()


def llama_with_layer_norm() -> nn.Module:
    """A trained layer type book-keeping does not know: the final RMSNorm becomes a LayerNorm."""
    model = llama()
    torch.manual_seed(1)
    norm = nn.LayerNorm(HIDDEN).double()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.normal_(std=0.1)
    model.model.norm = norm
    return model


def test_bookkeeping_declines_layer_types_it_does_not_know():
    model = nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB))
    assert not BookKeeper(model).supported
    model[1].requires_grad_(False)  # frozen layers do not count
    assert BookKeeper(model).supported
    model[0].scale_grad_by_freq = True  # an embedding gradient that is not the plain row sum
    assert not BookKeeper(model).supported


def test_unknown_trained_layer_type_takes_the_second_backward_and_matches_the_loop():
    assert not BookKeeper(llama_with_layer_norm()).supported
    check_against_loop(llama_with_layer_norm, "ghost", second_pass="backward")


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_tied_embeddings_add_both_uses(mode):
    model = llama(tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    check_against_loop(lambda: llama(tied=True), mode)


def test_ghost_refuses_trained_tied_embeddings_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="untie_embeddings: true") as info:
        check_supported(llama(tied=True), "ghost")
    assert "grad_sample_mode: hooks" in str(info.value)


def test_ghost_after_untying_matches_the_untied_loop():
    def untied() -> nn.Module:
        model = llama(tied=True)
        assert untie_embeddings(model)
        return model

    model = untied()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    check_against_loop(untied, "ghost")


def test_llama_rms_norm_has_a_direct_rule():
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    register_rms_norm_samplers()
    assert LlamaRMSNorm in GradSampleHooks.GRAD_SAMPLERS


def test_layer_with_buffers_is_named_with_the_way_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d: buffers running_mean") as info:
        check_supported(model, "hooks")
    assert "Freeze" in str(info.value)
    model[1].requires_grad_(False)
    check_supported(model, "hooks")


def test_a_batch_mean_loss_is_refused():
    model = llama()
    data = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    private = PrivateStudent(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    with pytest.raises(ValueError, match=r"reduction='none'"):
        private.backward(logits, lambda lg: jsd(lg, data["teacher"], data["labels"], "mean"))
    private.close()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batch_releases_noise_only(mode):
    model = llama()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateStudent(
        model, optimizer, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4, mode=mode
    )
    private.optimizer.generator = torch.Generator().manual_seed(0)
    private.prepare_empty_batch()
    private.optimizer.step()
    deltas = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    # the update is pure Gaussian noise: std noise_multiplier * clip / expected batch = 2.0 * 0.5 / 4
    assert deltas.std().item() == pytest.approx(0.25, rel=0.05)
    assert abs(deltas.mean().item()) < 0.01
    private.close()
