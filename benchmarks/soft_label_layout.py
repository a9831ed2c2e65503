"""How well the shared soft-label layout carries the ensemble, on real SmolLM2-derived models (CPU).

The job is `configs/federated-smollm2.yaml` (its public transfer set, tokenizer and private split). The
organizations' models, one per organization, come in two families:

* `lora`: SmolLM2-135M-Instruct (Q4_1) with LoRA adapters (r=8 on q/k/v/o) fine-tuned --lora-steps steps
  of language modelling on that organization's private training records (plain Adam, no DP: the
  measurement is about the layout, not the training);
* `students` (with --run DIR): the organizations' students of a finished run of the job (the
  layer-dropped students of fed_distill, saved in `DIR/orgs/org-<i>/student.safetensors`).

For every layout, each organization's soft labels are its probabilities at the layout's ids per
position plus the tail; the aggregate is their mean (what CKKS decrypts to, before rounding); the student
is trained towards the full distribution that aggregate stands for, the tail spread uniformly over the
other tokens (`federation.soft_labels.full_distribution`, `kd.tail: uniform`). Measured per transfer
position and averaged: KL(full-vocabulary ensemble || that distribution), in nats, where the ensemble is
the mean of the organizations' full distributions; and the ensemble's mass outside the layout's ids.

Layouts: `unigram-K` (the K most frequent target tokens of the transfer set, one set for every
position: the old layout, K=32 in the previous configs) and `reference-K` (each position's top-K under
the public SmolLM2 asset on the transfer text, `transfer.reference`). Bytes on the wire: one
organization's upload of the whole transfer set, under CKKS (the keyring the dealer generates for that
payload size and the job's `ckks` block, federation.client.decrypt.keyring_parameters; one real
ciphertext of the soft labels) and in plaintext (the Flower ArrayRecord of float64 values), divided by
the number of positions. Neither layout sends token ids: they are public.

Run: `python benchmarks/soft_label_layout.py [--run runs/federated-smollm2]` (a few minutes on 2 cores);
writes benchmarks/results/soft_label_layout.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _measure import RESULTS_DIR
from flwr.app import RecordDict

from federation.client.decrypt import keyring_parameters
from federation.client.workspace import OrgWorkspace
from federation.config import load_federated_job
from federation.crypto.he import Keyring, encrypt
from federation.job_data import job_data
from federation.messages import ARRAYS, content_bytes, to_array_record
from federation.soft_labels import SoftLabelLayout, build_layout, full_distribution
from secure_kd.config import KDConfig, ModelConfig, TrainConfig
from secure_kd.data import collate
from secure_kd.models import load_student, load_teacher
from secure_kd.trainer import Distiller

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "federated-smollm2.yaml"


@torch.no_grad()
def transfer_log_probs(model, public, layout: SoftLabelLayout) -> np.ndarray:
    """The model's full-vocabulary log-probabilities at every layout position, `[positions, vocab]`."""
    model.eval()
    rows = []
    for example, positions in zip(public.transfer, layout.positions, strict=True):
        if positions:
            batch = collate([example], pad_id=public.pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
            rows.append(torch.log_softmax(logits.float(), -1)[list(positions), : public.vocab_size].numpy())
    return np.concatenate(rows)


def lora_models(job, public, steps: int, seed: int):
    """One LoRA-fine-tuned SmolLM2 per organization, on its own private training records."""
    cfg = ModelConfig.model_validate(
        {"source": "smollm2", "lora": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    )
    kd = KDConfig.model_validate({"loss": "ce", "kd_weight": 0.0, "ce_weight": 1.0})
    train = TrainConfig.model_validate(
        {"max_steps": steps, "batch_size": 8, "lr": 2e-3, "schedule": "constant", "eval_batches": 1}
    )
    for index in range(job.n_organizations):
        ws = OrgWorkspace(job, index, Path(tempfile.mkdtemp()) / f"org-{index}")
        model = load_student(
            cfg, teacher=None, vocab_size=public.vocab_size, seed=seed, pad_token_id=public.pad_id
        )
        with tempfile.TemporaryDirectory() as out:
            fit = Distiller(
                student=model,
                examples=ws.train_examples,
                kd=kd,
                train=train,
                out=Path(out) / "run",
                pad_id=public.pad_id,
                eos_id=public.tokenizer.eos_token_id,
                seed=seed + index,
                progress=False,
            ).fit()
        yield f"org-{index}", model, {"train_records": len(ws.train_examples), "last_loss": fit.losses[-1]}


def run_students(job, run_dir: Path):
    """The organizations' students as a finished run of the job left them."""
    for index in range(job.n_organizations):
        ws = OrgWorkspace(job, index, run_dir / "orgs" / f"org-{index}")
        yield f"org-{index}", ws.student(), {"student_file": str(ws.root / "student.safetensors")}


def layout_quality(log_probs: list[np.ndarray], layouts: dict[str, SoftLabelLayout], vocab: int) -> dict:
    probs = [np.exp(lp.astype(np.float64)) for lp in log_probs]
    ensemble = np.mean(probs, axis=0)
    out = {}
    for name, layout in layouts.items():
        kept = [np.take_along_axis(p, layout.index, axis=1) for p in probs]
        soft = [np.concatenate([k, np.clip(1 - k.sum(1, keepdims=True), 0, None)], axis=1) for k in kept]
        aggregate = np.mean(soft, axis=0)
        target = full_distribution(aggregate, layout.index, vocab)
        kl = np.sum(ensemble * (np.log(ensemble) - np.log(target)), axis=1)
        tail = 1.0 - np.take_along_axis(ensemble, layout.index, axis=1).sum(1)
        out[name] = {
            "kl_mean": float(kl.mean()),
            "kl_median": float(np.median(kl)),
            "kl_p90": float(np.quantile(kl, 0.9)),
            "ensemble_tail_mass_mean": float(tail.mean()),
        }
    return out


def wire_bytes(job, layout: SoftLabelLayout, sample: np.ndarray) -> dict:
    n_values = layout.n_positions * layout.width
    parameters = keyring_parameters(job, n_values)
    keyring = Keyring.from_parameters(parameters)
    ciphertext = encrypt(keyring, sample.ravel(), weight=1)
    plain = content_bytes(RecordDict({ARRAYS: to_array_record({"soft-labels": sample})}))
    return {
        "values_per_position": layout.width,
        "ckks_ring_degree": parameters.poly_modulus_degree,
        "ckks_coeff_mod_bits": list(parameters.coeff_mod_bit_sizes),
        "ckks_bytes_per_upload": len(ciphertext),
        "ckks_bytes_per_position": len(ciphertext) / layout.n_positions,
        "plaintext_bytes_per_position": plain / layout.n_positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--run", default=None, help="a finished run of the job: also measure its students")
    parser.add_argument("--lora-steps", type=int, default=20)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "soft_label_layout.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    job = load_federated_job(args.config, ["transfer.reference=null"])
    public = job_data(job)
    vocab = public.vocab_size
    reference = load_teacher(job.teacher, vocab_size=vocab, seed=job.seed, pad_token_id=public.pad_id)
    layouts: dict[str, SoftLabelLayout] = {}
    for k in args.ks:
        layouts[f"unigram-{k}"] = build_layout(public.transfer, k, vocab)
    layout_seconds = {}
    for k in args.ks:
        t = time.perf_counter()
        model = load_teacher(job.teacher, vocab_size=vocab, seed=job.seed, pad_token_id=public.pad_id)
        layouts[f"reference-{k}"] = build_layout(public.transfer, k, vocab, reference=model)
        layout_seconds[f"reference-{k}"] = round(time.perf_counter() - t, 2)
    del reference
    families = {"lora": lora_models(job, public, args.lora_steps, args.seed)}
    if args.run:
        families["students"] = run_students(job, Path(args.run))
    results: dict = {"families": {}}
    sample_soft = None
    for family, models in families.items():
        log_probs, info = [], {}
        for name, model, extra in models:
            log_probs.append(transfer_log_probs(model, public, layouts["unigram-32"]))
            info[name] = extra
            del model
        results["families"][family] = {"models": info, "layouts": layout_quality(log_probs, layouts, vocab)}
        if sample_soft is None:
            sample_soft = {
                name: np.concatenate(
                    [
                        np.take_along_axis(np.exp(log_probs[0].astype(np.float64)), layout.index, axis=1),
                        np.zeros((layout.n_positions, 1)),
                    ],
                    axis=1,
                )
                for name, layout in layouts.items()
            }
            for soft in sample_soft.values():
                soft[:, -1] = np.clip(1 - soft[:, :-1].sum(1), 0, None)
    results["wire"] = {name: wire_bytes(job, layout, sample_soft[name]) for name, layout in layouts.items()}
    results.update(
        config=str(Path(args.config).name),
        transfer_positions=layouts["unigram-32"].n_positions,
        transfer_records=len(public.transfer),
        vocab_size=vocab,
        n_organizations=job.n_organizations,
        lora_steps=args.lora_steps,
        reference_layout_seconds=layout_seconds,
        seconds=round(time.perf_counter() - started, 1),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        note="kl_*: KL(mean of the organizations' full distributions || the aggregate's uniform-tail "
        "expansion), nats per position; ensemble_tail_mass_mean: the ensemble's mass outside the ids",
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
