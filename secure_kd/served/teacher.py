"""A teacher behind a server: top-k per position for the cache builder and the trainer, samples for
seq-KD, and the probe that ties a cache to the server that built it.

`ServedTeacher` asks everything through a `ServedModelAPI`, so every position it scores is a
counted, budgeted query recorded in `provenance()`. It offers:

- `topk_positions(sequences, k)`: what `secure_kd.cache.build_cache` asks a teacher that answers
  top-k itself (values, indices, tail log-mass per position; the tail is the exact mass outside
  the named top-k, log(1 - sum p));
- `ServedTargets(teacher, k)`: the trainer's `TeacherTargets` (live off-policy and on-policy KD,
  whose student-written batches are scored by the server);
- `generate(...)`: the subset of Hugging Face `generate` that `secure_kd.generation` calls, so
  seq-KD can let the served teacher write (its text re-tokenized with the served tokenizer);
- `cache_check(previous)`: called by the cache builder on every build. It scores a fixed public
  probe text; on the first build it records those answers in the manifest (with, when
  `served.reference` names the same weights in-process, the KL between the two top-k distributions
  and both tokens/s on the probe, refusing the server if the KL passes `served.max_topk_kl`); on
  every later build of that directory it refuses a server whose answers moved more than
  `served.drift_tolerance` (KL) from the recorded ones.

The top-k KL (`topk_kl`) compares two distributions on k + 1 buckets: the first one's top-k ids and
the rest. The second gives its own log-probability to those ids it names and spreads its missing mass
uniformly over the ids it does not name (the cache's `tail: uniform` policy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from secure_kd.served.api import ServedModelAPI
from secure_kd.topk import TopKLogits

PROBE_TEXT = (
    "Knowledge distillation trains a small student model to imitate a larger teacher. The capital of "
    "France is Paris, and water boils at one hundred degrees Celsius at sea level."
)


class ServedTeacherRefused(ValueError):
    """The served teacher does not match its reference model or the cache it is asked to extend."""


def topk_kl(
    p_values: Tensor, p_indices: Tensor, q_values: Tensor, q_indices: Tensor, vocab_size: int
) -> float:
    """Mean over positions of KL(P || Q) on P's top-k ids plus one tail bucket (module docstring)."""
    total = 0.0
    for pv, pi, qv, qi in zip(p_values.double(), p_indices, q_values.double(), q_indices, strict=True):
        q_named = dict(zip(qi.tolist(), qv.exp().tolist(), strict=True))
        q_rest = max(1.0 - sum(q_named.values()), 0.0) / max(vocab_size - len(q_named), 1)
        p = pv.exp().tolist()
        q = [q_named.get(t, q_rest) for t in pi.tolist()]
        p_tail, q_tail = max(1.0 - sum(p), 0.0), max(1.0 - sum(q), 0.0)
        kl = sum(a * (math.log(a) - math.log(max(b, 1e-300))) for a, b in zip(p, q, strict=True) if a > 0)
        if p_tail > 0:
            kl += p_tail * (math.log(p_tail) - math.log(max(q_tail, 1e-300)))
        total += max(kl, 0.0)
    return total / max(len(p_values), 1)


class ServedTeacher:
    """Top-k log-probabilities (and samples) of a served model, through the counted query API."""

    training = False

    def __init__(self, api: ServedModelAPI) -> None:
        self.api = api
        self.vocab_size = api.vocab_size
        self.config = SimpleNamespace(vocab_size=api.vocab_size)  # lets the cache builder check token ids
        self.teacher_id = f"served:{api.cfg.model}"

    # -- what nn.Module-minded callers touch ---------------------------------------------------------
    def eval(self) -> ServedTeacher:
        return self

    def train(self, mode: bool = True) -> ServedTeacher:
        return self

    def to(self, *args, **kwargs) -> ServedTeacher:
        return self

    def parameters(self):
        return iter(())

    def provenance(self) -> dict:
        return self.api.provenance()

    # -- the cache builder's interface ---------------------------------------------------------------
    def topk_positions(
        self, sequences: Sequence[Sequence[int] | np.ndarray], k: int
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per sequence: (values [L, k], indices [L, k], tail log-mass [L]) after every prefix."""
        answers = self.api.topk_logprobs_positions_batch([list(map(int, s)) for s in sequences], k=k)
        results = []
        for answer in answers:
            values, indices = answer.values[:, :k], answer.indices[:, :k]
            kept = values.double().exp().sum(-1).clamp(max=1.0)
            tail = torch.log1p(-kept.clamp(max=1.0 - 1e-12)).float()
            results.append((values, indices, tail))
        return results

    # -- seq-KD --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        *,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        pad_token_id: int,
        eos_token_id: int | None = None,
        seed: int = 0,
        **_: object,
    ) -> Tensor:
        """[B, width + new]: the left-padded prompts followed by the server's sampled tokens (padded)."""
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        samples = self.api.sample_text_batch(prompts, max_new_tokens, temperature, seed=seed)
        out = torch.full((len(prompts), input_ids.shape[1] + max_new_tokens), pad_token_id, dtype=torch.long)
        out[:, : input_ids.shape[1]] = input_ids.cpu()
        for row, sample in enumerate(samples):
            if sample:
                out[row, input_ids.shape[1] : input_ids.shape[1] + len(sample)] = torch.tensor(sample)
        return out.to(input_ids.device)

    # -- the probe that ties a cache to its server ---------------------------------------------------
    def _probe(self, k: int) -> tuple[list[int], TopKLogits, float]:
        ids = list(self.api.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        started = time.perf_counter()
        answer = self.api.topk_logprobs_positions_batch([ids], k=k)[0]
        seconds = time.perf_counter() - started
        return ids, TopKLogits(answer.values[:, :k], answer.indices[:, :k]), len(ids) / max(seconds, 1e-9)

    def cache_check(self, previous: dict | None, *, k: int) -> dict:
        """The manifest's `teacher_check` record; raises `ServedTeacherRefused` on a drifted server."""
        cfg = self.api.cfg
        ids, served, served_tps = self._probe(k)
        if previous is not None:
            recorded = TopKLogits(
                torch.tensor(previous["probe_values"], dtype=torch.float32),
                torch.tensor(previous["probe_indices"], dtype=torch.long),
            )
            if previous.get("probe_tokens") != ids or recorded.indices.shape[-1] != k:
                raise ServedTeacherRefused(
                    "the cache manifest's probe was made with another tokenizer or k; delete the cache "
                    "directory to rebuild it with this served teacher"
                )
            drift = topk_kl(recorded.values, recorded.indices, served.values, served.indices, self.vocab_size)
            if not drift <= cfg.drift_tolerance:
                raise ServedTeacherRefused(
                    f"the served teacher {cfg.model!r} at {cfg.base_url} has drifted from the cache "
                    "manifest: "
                    f"on the probe text its top-{k} distributions are KL {drift:.3g} from the recorded ones "
                    f"(served.drift_tolerance {cfg.drift_tolerance:g}). The server now serves other weights "
                    "(or other settings) than the ones that built this cache; serve the original model, or "
                    "delete the cache directory to rebuild it"
                )
            return {**previous, "last_drift_kl": drift, "last_served_tokens_per_s": served_tps}
        record: dict = {
            "backend": "served",
            "server": cfg.describe(),
            "probe_tokens": ids,
            "probe_values": served.values.tolist(),
            "probe_indices": served.indices.tolist(),
            "served_tokens_per_s": served_tps,
            "reference": cfg.reference,
            "topk_kl_to_reference": None,
            "reference_tokens_per_s": None,
            "max_topk_kl": cfg.max_topk_kl,
            "drift_tolerance": cfg.drift_tolerance,
        }
        if cfg.reference is not None:
            kl, ref_tps = self._reference_kl(ids, served, k)
            record.update(topk_kl_to_reference=kl, reference_tokens_per_s=ref_tps)
            if not kl <= cfg.max_topk_kl:
                raise ServedTeacherRefused(
                    f"the served teacher {cfg.model!r} is KL {kl:.3g} from the in-process reference "
                    f"{cfg.reference!r} on the probe text (top-{k}; served.max_topk_kl {cfg.max_topk_kl:g}): "
                    "it does not serve the same weights. Point served.reference at the served model's "
                    "weights, or raise max_topk_kl if a larger gap (another quantization) is expected"
                )
        return record

    def _reference_kl(self, ids: list[int], served: TopKLogits, k: int) -> tuple[float, float]:
        from secure_kd.model_files import load_pretrained

        model = load_pretrained(self.api.cfg.reference).eval()
        with torch.inference_mode():
            started = time.perf_counter()
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            seconds = time.perf_counter() - started
        reference = TopKLogits.from_logits(logits, k)
        kl = topk_kl(reference.values, reference.indices, served.values, served.indices, self.vocab_size)
        return kl, len(ids) / max(seconds, 1e-9)


class ServedTargets:
    """`TeacherTargets` for the trainer: the served teacher's top-k for every real position of a batch."""

    def __init__(self, teacher: ServedTeacher, top_k: int) -> None:
        self.teacher = teacher
        self.top_k = top_k

    def __call__(self, batch: dict[str, Tensor]) -> TopKLogits:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        sequences = [row[: int(n)].tolist() for row, n in zip(ids, lengths, strict=True)]
        answers = self.teacher.topk_positions(sequences, self.top_k)
        # padded positions (labels -100, never scored): uniform over ids 0..k-1, finite and normalized
        values = torch.full((*ids.shape, self.top_k), -math.log(self.top_k))
        indices = torch.arange(self.top_k).expand(*ids.shape, self.top_k).clone()
        for row, (v, i, _) in enumerate(answers):
            values[row, : len(v)] = v
            indices[row, : len(i)] = i
        return TopKLogits(values.to(ids.device), indices.to(ids.device))
