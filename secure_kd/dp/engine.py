"""Opacus wiring of a student: per-sample gradients, clipping and noise.

`PrivateStudent` attaches Opacus' per-sample gradient hooks to a model (grad_sample_mode `hooks`,
`functorch`, or `ghost` = ghost clipping, which computes per-example gradient norms without
materializing per-example gradients) and wraps its optimizer in Opacus' DP optimizer. The caller
feeds it per-example losses (shape [batch]): a batch mean would couple the examples.

What is checked before training, with a message naming the layer and the way out:
- a trainable layer with buffers (e.g. BatchNorm) mixes examples: freeze or replace it;
- tied input/output embeddings that are trained are unsafe with ghost clipping in Opacus 1.6 (the
  two uses of the one matrix get one per-example norm between them): untie them
  (`untie_embeddings`) or use `hooks`/`functorch`, which add both uses up correctly.

`LlamaRMSNorm` (tiny students, SmolLM2) gets a direct per-sample gradient rule; Opacus would
otherwise fall back to functorch for it, which is correct but slower.

`nn.Embedding` gets rules that honour `padding_idx`: autograd gives the padding row no gradient,
whatever the input, but Opacus' grad and norm samplers count every occurrence of that token. Where
the pad id is a real token inside the sequences (SmolLM2-Instruct: pad = eos = `<|im_end|>` closes
every chat turn), that over-clipped such examples (ghost) and trained a row that non-DP training
freezes (hooks). The row's per-example gradients are then exactly zero, and the DP optimizer also
zeroes the noise there (post-processing of a coordinate no record can influence), unless the matrix
is tied to another layer (a tied output layer does train the row).

Data-parallel (`distributed=` with N > 1 processes): Opacus' distributed DP optimizers. Each rank
clips its own examples' gradients and sums them; rank 0 alone adds the Gaussian noise (of std
`noise_multiplier * max_grad_norm`, once for the global batch); each rank divides by
`expected_batch_size / N` and the gradients are averaged over the ranks, so the update is
(sum of every clipped gradient + one noise draw) / expected_batch_size, as in one process. Ghost
clipping and book-keeping run per rank on that rank's examples (the clip factors are per example).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import Tensor, nn

from secure_kd.distributed import Distributed
from secure_kd.dp.bookkeeping import BookKeeper

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")

# Raised by torch for the embedding (integer inputs) and by Opacus' functorch path on CPU; both benign.
_BENIGN_WARNINGS = (
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    "In CPU autocast, but the target dtype is not supported",
)


def _llama_rms_norm_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
    """d(weight * normalize(x))/d(weight) = normalize(x), summed over positions, per example."""
    x = activations[0]
    if not layer.weight.requires_grad:
        return {}
    hidden = x.to(torch.float32)
    inverse_rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)
    normalized = (hidden * inverse_rms).to(x.dtype)
    return {layer.weight: sum_over_all_but_batch_and_last_n(normalized * backprops, layer.weight.dim())}


def register_rms_norm_samplers() -> None:
    """Register the LlamaRMSNorm rule with Opacus (idempotent)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # another transformers layout: Opacus' functorch fallback still covers it
        return
    if LlamaRMSNorm not in GradSampleHooks.GRAD_SAMPLERS:
        register_grad_sampler(LlamaRMSNorm)(_llama_rms_norm_grad_sample)


def _without_padding_positions(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> Tensor:
    """The output gradients with the positions of `padding_idx` zeroed: what autograd's embedding uses."""
    if layer.padding_idx is None:
        return backprops
    keep = (activations[0] != layer.padding_idx).unsqueeze(-1)
    return backprops * keep.to(backprops.dtype)


def _embedding_grad_sample(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> dict:
    return compute_embedding_grad_sample(
        layer, activations, _without_padding_positions(layer, activations, backprops)
    )


def _embedding_norm_sample(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> dict:
    return compute_embedding_norm_sample(
        layer, activations, _without_padding_positions(layer, activations, backprops)
    )


def register_samplers() -> None:
    """secure-kd's rules in Opacus' registries: LlamaRMSNorm, Embedding with `padding_idx` (idempotent)."""
    register_rms_norm_samplers()
    if GradSampleHooks.GRAD_SAMPLERS.get(nn.Embedding) is not _embedding_grad_sample:
        register_grad_sampler(nn.Embedding)(_embedding_grad_sample)
    if GradSampleHooksFastGradientClipping.NORM_SAMPLERS.get(nn.Embedding) is not _embedding_norm_sample:
        register_norm_sampler(nn.Embedding)(_embedding_norm_sample)


def frozen_padding_rows(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(weight, row) of each trained Embedding's padding row whose matrix no other layer uses."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        (m.weight, int(m.padding_idx))
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        and m.padding_idx is not None
        and m.weight.requires_grad
        and uses[id(m.weight)] == 1
    ]


class _FrozenRowsMixin:
    """After the noise is added, zero it on rows whose every per-example gradient is zero by construction."""

    frozen_rows: list[tuple[nn.Parameter, int]] = []

    def add_noise(self) -> None:
        super().add_noise()  # the generator advances as usual: the rest of the noise is unchanged
        for weight, row in self.frozen_rows:
            if weight.grad is not None:
                weight.grad[row] = 0


class _DPOptimizer(_FrozenRowsMixin, DPOptimizer):
    pass


class _DPOptimizerFastGradientClipping(_FrozenRowsMixin, DPOptimizerFastGradientClipping):
    pass


class _DistributedDPOptimizer(_FrozenRowsMixin, DistributedDPOptimizer):
    pass


class _DistributedDPOptimizerFastGradientClipping(
    _FrozenRowsMixin, DistributedDPOptimizerFastGradientClipping
):
    pass


def _optimizer_class(mode: str, world_size: int) -> type[DPOptimizer]:
    if world_size > 1:
        return _DistributedDPOptimizerFastGradientClipping if mode == "ghost" else _DistributedDPOptimizer
    return _DPOptimizerFastGradientClipping if mode == "ghost" else _DPOptimizer


def tied_trainable_embedding(model: nn.Module) -> nn.Parameter | None:
    """The shared matrix when input and output embeddings are one trained parameter, else None."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return None
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or out.weight is not inp.weight:
        return None
    return inp.weight if inp.weight.requires_grad else None


def untie_embeddings(model: nn.Module) -> bool:
    """Give the output layer its own copy of a tied embedding matrix; True if something was untied."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if base is not None and getattr(base, "config", None) is not None:
        base.config.tie_word_embeddings = False
    return True


def check_supported(model: nn.Module, mode: str) -> None:
    """Refuse, before any training, what Opacus would get wrong or reject mid-run."""
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode {mode!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the student has no trainable parameters: nothing for DP-SGD to train")
    with_buffers = [
        f"{name} ({type(m).__name__}: buffers {', '.join(n for n, _ in m.named_buffers())})"
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False)) and any(True for _ in m.buffers())
    ]
    if with_buffers:
        raise ValueError(
            f"Opacus cannot compute per-example gradients for layer(s) {'; '.join(with_buffers)}: a "
            "trainable layer with buffers (e.g. BatchNorm's running statistics) mixes examples. Freeze them "
            "(requires_grad=False), or replace them with a per-example layer (LayerNorm, GroupNorm, RMSNorm)"
        )
    if mode == "ghost" and tied_trainable_embedding(model) is not None:
        raise ValueError(
            "the student's input and output embeddings are one tied, trained matrix, which ghost clipping in "
            "Opacus 1.6 cannot handle (the two uses need one combined per-example norm). Set "
            "train.privacy.untie_embeddings: true (the output layer gets its own copy), or use "
            "grad_sample_mode: hooks (adds both uses up correctly), or freeze the embeddings "
            "(student.freeze_embeddings: true)"
        )


@contextlib.contextmanager
def _quiet_benign_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _BENIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def _checked(losses: Tensor) -> Tensor:
    if losses.ndim != 1:
        raise ValueError(
            f"DP-SGD needs one loss per example, shape [batch]; got shape {tuple(losses.shape)} "
            "(call the objective with reduction='none')"
        )
    return losses


class _BranchStarts:
    """Per forward pass, the outputs of trained layers whose inputs need no gradient.

    Every other trained layer lies downstream of one of them, so gradients with respect to these
    outputs pass through the output gradient of every trained layer (the embedding for a fully
    trained model; each first LoRA adapter of a LoRA student).
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors: list[Tensor] = []
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [
            m.register_forward_hook(self._capture)
            for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]

    def _reset(self, module: nn.Module, args: object) -> None:
        self.tensors = []

    def _capture(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
            return
        first = output[0] if isinstance(output, tuple | list) else output
        if isinstance(first, Tensor) and first.requires_grad:
            self.tensors.append(first)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PrivateStudent:
    """A model with Opacus hooks and its optimizer wrapped in Opacus' DP optimizer.

    Per physical batch: `backward(logits, per_example_loss)`, then `optimizer.step()` (Opacus clips each
    example's gradient to `max_grad_norm`, sums, and, at the end of a logical batch, adds Gaussian
    noise of std `noise_multiplier * max_grad_norm` and divides by `expected_batch_size`), then
    `optimizer.zero_grad()`. An empty Poisson batch still takes a (noise-only) step: call
    `prepare_empty_batch()` instead of `backward`. With `distributed` over N > 1 processes, every rank
    calls the same sequence on its share of the logical batch (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        mode: str = "hooks",
        secure_mode: bool = False,
        bookkeeping: bool = True,
        distributed: Distributed | None = None,
    ) -> None:
        register_samplers()
        check_supported(model, mode)
        self.model, self.mode = model, mode
        options: dict = dict(batch_first=True, loss_reduction="mean", strict=True)
        if mode == "ghost":
            options.update(max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        try:
            self.module = prepare_module(model, mode, **options)
        except NotImplementedError as exc:
            raise ValueError(f"Opacus rejected the student: {exc}. Freeze the layers it names.") from None
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._branch_starts = _BranchStarts(model) if mode == "ghost" else None
        self._bookkeeper = BookKeeper(model) if mode == "ghost" and bookkeeping else None
        self.last_second_pass: str | None = None  # ghost mode: "bookkeeping" or "backward"
        world = distributed.world_size if distributed is not None else 1
        self.optimizer: DPOptimizer = _optimizer_class(mode, world)(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            # as Opacus' PrivacyEngine does: each rank averages over its share; the ranks are then averaged
            expected_batch_size=expected_batch_size / world if world > 1 else expected_batch_size,
            loss_reduction="mean",
            secure_mode=secure_mode,
        )
        self.optimizer.frozen_rows = frozen_padding_rows(model)

    def backward(self, logits: Tensor, per_example_loss: Callable[[Tensor], Tensor]) -> Tensor:
        """Backward pass leaving what the optimizer clips; returns the detached per-example losses.

        `per_example_loss(logits)` must return one loss per example, shape [batch] (a batch mean would
        couple the examples). Ghost clipping needs two backward passes through the model; the loss is
        differentiated once, and both passes go through the surrogate `sum(logits * dloss/dlogits)`,
        which has the same per-example gradients and is cheap to differentiate twice (the chunked
        objectives free their gradient buffers after one backward). Call the model right before.
        """
        if self.mode != "ghost":
            losses = _checked(per_example_loss(logits))
            with _quiet_benign_warnings():
                losses.mean().backward()
            return losses.detach()
        detached = logits.detach().requires_grad_(True)
        losses = _checked(per_example_loss(detached))
        (dloss_dlogits,) = torch.autograd.grad(losses.sum(), detached)
        surrogate = (logits * dloss_dlogits.to(logits.dtype)).flatten(1).sum(1, dtype=torch.float32)
        self._ghost_backward(surrogate)
        return losses.detach()

    @property
    def bookkept(self) -> bool:
        """Ghost mode forms the clipped gradients from the first pass (`secure_kd.dp.bookkeeping`)."""
        return self._bookkeeper is not None and self._bookkeeper.supported

    def _ghost_backward(self, surrogate: Tensor) -> None:
        """Opacus' two ghost-clipping passes, the first one lighter, the second one book-kept.

        Opacus' `DPTensorFastGradientClipping.backward` runs a full first backward only for its hooks to
        compute per-example norms from activations and output gradients, then discards the parameter
        gradients. Here the first pass asks autograd only for the gradients of the branch starts (see
        `_BranchStarts`), which carry every output gradient the hooks need but skip all weight-gradient
        products. Every trained parameter must have received a fresh norm, else the layers not
        reached are named (use grad_sample_mode: hooks for such a model). When every trained layer is
        one `BookKeeper` handles, the second pass is replaced by contractions of the first pass's
        inputs and output gradients; otherwise it is Opacus' backward of sum_b c_b * loss_b.
        """
        anchors, self._branch_starts.tensors = self._branch_starts.tensors, []
        if not anchors:
            raise ValueError(
                "ghost clipping found no trained layer output in the last forward pass; call the model "
                "(with gradients enabled) right before backward"
            )
        for p in self.optimizer.params:
            p._norm_sample = None
        with _quiet_benign_warnings():
            torch.autograd.grad(surrogate.mean(), anchors, retain_graph=True, allow_unused=True)
        unreached = [self._names[id(p)] for p in self.optimizer.params if p._norm_sample is None]
        if unreached:
            raise ValueError(
                f"ghost clipping could not reach {', '.join(unreached)} from the loss through the trained "
                "layers' outputs; use grad_sample_mode: hooks or functorch for this model"
            )
        coefficients = self.module.get_clipping_coef().to(surrogate.device)
        if self._bookkeeper is not None and self._bookkeeper.ready():
            # the first pass took the batch mean: scale its output gradients back to per-example sums
            self._bookkeeper.accumulate_clipped(coefficients, scale=float(len(surrogate)))
            self.last_second_pass = "bookkeeping"
            return
        self.last_second_pass = "backward"
        if self._bookkeeper is not None:
            self._bookkeeper.clear()
        self.module.disable_hooks()
        try:
            with _quiet_benign_warnings():
                (coefficients * surrogate).sum().backward()
        finally:
            self.module.enable_hooks()
            if self._bookkeeper is not None:
                self._bookkeeper.clear()

    def per_sample_norms(self) -> Tensor:
        """The per-example gradient norms the optimizer will clip (after `backward`, before `step`)."""
        if self.mode == "ghost":
            return self.module.per_sample_gradient_norms
        norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.optimizer.grad_samples]
        return torch.stack(norms, dim=1).norm(2, dim=1)

    def prepare_empty_batch(self) -> None:
        """An empty logical batch: zero gradients, so that the step releases noise only."""
        for p in self.optimizer.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and attributes; returns the plain model."""
        if self._branch_starts is not None:
            self._branch_starts.remove()
        if self._bookkeeper is not None:
            self._bookkeeper.remove()
        self.module.cleanup()
        for p in self.model.parameters():
            for attr in ("summed_grad", "_processed"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return self.model


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    mode: str = "hooks",
    secure_mode: bool = False,
) -> PrivateStudent:
    """Attach Opacus to `model` and wrap `optimizer` (see `PrivateStudent`)."""
    return PrivateStudent(
        model,
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        mode=mode,
        secure_mode=secure_mode,
    )


__all__ = [
    "GRAD_SAMPLE_MODES",
    "PrivateStudent",
    "check_supported",
    "frozen_padding_rows",
    "make_private",
    "register_rms_norm_samplers",
    "register_samplers",
    "tied_trainable_embedding",
    "untie_embeddings",
]
