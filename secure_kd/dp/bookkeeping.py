"""Book-keeping for ghost clipping: the clipped gradient sum without a second backward pass.

Ghost clipping (Opacus' fast gradient clipping) needs per-example gradient norms before it knows each
example's clip factor c_b, and then, in Opacus, a second backward pass of sum_b c_b * loss_b to get
the clipped sum. For the layers of a Llama student every weight gradient is a contraction of the
layer's input with the gradient of its output, both of which the first pass already produced. So,
as in Bu et al. 2023 ("Differentially Private Optimization on Large Model at Small Cost", book-keeping),
keep those two per layer during the first pass and form sum_b c_b * grad_b directly:

    nn.Linear      W: sum_{b,t} c_b g_bt a_bt^T,  bias: sum_{b,t} c_b g_bt
    nn.Embedding   row i: sum of c_b g_bt over the positions whose token is i
    LlamaRMSNorm   w: sum_{b,t} c_b g_bt * normalize(x_bt)

This skips the second pass's activation-gradient products (about a forward pass of work). A model with
any other trained layer type (or an Embedding with `scale_grad_by_freq` or sparse gradients), or a
trained layer called more than once per forward pass, is not book-kept: `ready()` is False and the
caller runs the second backward as before. What is kept is dropped after each step and at the start of
every forward pass of the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _rms_norm_type() -> type | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return LlamaRMSNorm


def _book_keepable(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    """Exactly one of the known types (a subclass may compute something else), plain Embedding gradients."""
    if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
        return False
    return type(module) in kinds


class BookKeeper:
    """Per trained layer, its input and its output gradient from the last pass, then the clipped sums."""

    def __init__(self, model: nn.Module) -> None:
        rms_norm = _rms_norm_type()
        kinds = (nn.Linear, nn.Embedding) + ((rms_norm,) if rms_norm is not None else ())
        trained = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.supported = all(_book_keepable(m, kinds) for m in trained)
        self._inputs: dict[nn.Module, list[Tensor]] = {}
        self._output_grads: dict[nn.Module, list[Tensor]] = {}
        self._handles = []
        if self.supported:
            self._handles.append(model.register_forward_pre_hook(lambda module, args: self.clear()))
            for module in trained:
                self._handles.append(module.register_forward_hook(self._keep_input))
                self._handles.append(module.register_full_backward_hook(self._keep_output_grad))
        self._modules = trained

    def _keep_input(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if torch.is_grad_enabled():
            self._inputs.setdefault(module, []).append(inputs[0].detach())

    def _keep_output_grad(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if grad_output[0] is not None:
            self._output_grads.setdefault(module, []).append(grad_output[0].detach())

    def ready(self) -> bool:
        """Every trained layer ran exactly once in the last pass and its output gradient arrived."""
        return self.supported and all(
            len(self._inputs.get(m, ())) == 1 and len(self._output_grads.get(m, ())) == 1
            for m in self._modules
        )

    def clear(self) -> None:
        self._inputs.clear()
        self._output_grads.clear()

    @torch.no_grad()
    def accumulate_clipped(self, factors: Tensor, scale: float) -> None:
        """p.grad += scale * sum_b factors[b] * (example b's gradient of p), for every trained parameter.

        The kept output gradients are those of the first pass; `scale` turns them into what a backward
        of sum_b factors[b] * loss_b would give (the batch size when the first pass took the mean)."""
        for module in self._modules:
            (x,), (g,) = self._inputs[module], self._output_grads[module]
            weights = (factors.to(g.dtype) * scale).view(-1, *([1] * (g.dim() - 1)))
            for param, grad in self._clipped(module, x, g * weights).items():
                if param.requires_grad:
                    param.grad = (
                        grad.to(param.dtype) if param.grad is None else param.grad + grad.to(param.dtype)
                    )
        self.clear()

    @staticmethod
    def _clipped(module: nn.Module, x: Tensor, g: Tensor) -> dict[nn.Parameter, Tensor]:
        if isinstance(module, nn.Linear):
            grads = {module.weight: torch.einsum("...o,...i->oi", g, x.to(g.dtype))}
            if module.bias is not None:
                grads[module.bias] = g.reshape(-1, g.shape[-1]).sum(0)
            return grads
        if isinstance(module, nn.Embedding):
            grad = torch.zeros_like(module.weight, dtype=g.dtype)
            grad.index_add_(0, x.reshape(-1), g.reshape(-1, g.shape[-1]))
            if module.padding_idx is not None:
                grad[module.padding_idx] = 0
            return {module.weight: grad}
        hidden = x.to(torch.float32)
        normalized = (
            hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        ).to(x.dtype)
        return {module.weight: (g * normalized.to(g.dtype)).reshape(-1, g.shape[-1]).sum(0)}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()
