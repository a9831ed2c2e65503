"""Experiment: reference-based membership inference on SmolLM2-135M-Instruct (Q4_1), known answers.

Three models, one reference: the reference is SmolLM2-135M-Instruct itself (Q4_1 GGUF dequantized to
float32, `secure-kd assets fetch-smollm2`), the base both targets are fine-tuned from.
- `fine_tuned`: SmolLM2 fine-tuned with cross-entropy on the members for `--epochs` epochs (the top
  `--train-layers` decoder layers and the final norm trained, the rest frozen: what 2 CPU cores allow);
- `control`: the same recipe on other records of the same corpus, never on the audited ones: the same
  architecture, fine-tuned as much, that never saw a member (must come out at chance);
- records: the synthetic corpus (`secure_kd.data.generate_corpus`, templated records that share most
  tokens), `--n` members and `--n` non-members, first 64 tokens.
Each target is audited by `secure-kd audit --model DIR --reference smollm2 --members --nonmembers`
(`run_reference_audit`, the same code): loss, reference loss ratio, zlib, Min-K%, Min-K%++, offline RMIA,
AUC and TPR at 1% FPR with 95% bootstrap intervals. The reference's per-token statistics are scored once
and read from the shared score cache by the second audit.

Run: `python benchmarks/experiments/reference_mia_smollm2.py [--n 200] [--epochs 3] [--work DIR]
[--device cuda]` (the issue's GPU size: `--n 10000 --device cuda`);
writes benchmarks/results/reference_mia_smollm2.json and prints one line per target.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from secure_kd.app.reference_audit import ReferenceAuditConfig, run_reference_audit
from secure_kd.assets import fetch_smollm2
from secure_kd.data import generate_corpus, tokenize_records
from secure_kd.model_files import load_pretrained, load_tokenizer
from secure_kd.paths import atomic_write_json

RESULTS = Path(__file__).resolve().parents[1] / "results" / "reference_mia_smollm2.json"
MAX_LENGTH = 64


def fine_tune(
    base,
    sequences,
    *,
    epochs: int,
    train_layers: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    device: str = "cpu",
):
    """CE fine-tune of the top `train_layers` decoder layers + final norm, in place; returns the losses."""
    from attacks.membership.token_scores import pad_batch

    model = copy.deepcopy(base).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [*model.model.layers[-train_layers:], model.model.norm]
    params = [p for module in trained for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            ids, mask = pad_batch(batch, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(sequences))
        print(f"  epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.cpu(), losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="members and non-members (each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/experiments/reference_mia_smollm2"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: fine-tuning and the audits")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    base_dir = fetch_smollm2()
    tokenizer = load_tokenizer(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = generate_corpus(3 * args.n, seed=11 + args.seed, n_canaries=0).texts()
    members, nonmembers, other = texts[: args.n], texts[args.n : 2 * args.n], texts[2 * args.n :]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("members", members), ("nonmembers", nonmembers)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))

    base = load_pretrained(base_dir).eval()
    targets, training = {}, {}
    for name, rows in (("fine_tuned", members), ("control", other)):
        directory = work / name
        if not (directory / "config.json").is_file():
            print(f"fine-tuning {name} on {len(rows)} records ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            examples = tokenize_records(
                [{"text": t} for t in rows], tokenizer, max_length=MAX_LENGTH, schema="text"
            )
            model, losses = fine_tune(
                base, [e.input_ids for e in examples], epochs=args.epochs, train_layers=args.train_layers,
                lr=args.lr, batch_size=args.batch_size, seed=args.seed, pad_id=int(pad),
                device=args.device,
            )  # fmt: skip
            model.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            training[name] = {"train_loss_per_epoch": losses, "seconds": time.perf_counter() - t0}
            del model
        targets[name] = str(directory)
    del base

    audits = {}
    for name, directory in targets.items():
        t0 = time.perf_counter()
        cfg = ReferenceAuditConfig(
            model=directory, references=[str(base_dir)], members=str(work / "members.jsonl"),
            nonmembers=str(work / "nonmembers.jsonl"), out=str(work / f"audit_{name}"), max_length=MAX_LENGTH,
            cache_dir=str(work / "scores"), device=args.device, progress=False, seed=args.seed,
        )  # fmt: skip
        result = run_reference_audit(cfg)
        audits[name] = {
            "attacks": {a.name: a.model_dump(mode="json") for a in result.attacks},
            "cache_hits": result.cache_hits,
            "seconds": time.perf_counter() - t0,
        }
        line = ", ".join(
            f"{a.name} {a.auc:.3f} [{a.auc_ci[0]:.3f}, {a.auc_ci[1]:.3f}] tpr@1% {a.tpr_at_1pct_fpr:.3f}"
            for a in result.attacks
        )
        print(f"{name}: {line}", flush=True)
    report = {
        "experiment": "reference_mia_smollm2",
        "model": "SmolLM2-135M-Instruct (Q4_1, dequantized to float32)",
        "n_members": args.n,
        "n_nonmembers": args.n,
        "max_length": MAX_LENGTH,
        "epochs": args.epochs,
        "train_layers": args.train_layers,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "training": training,
        "audits": audits,
        "seconds": time.perf_counter() - started,
        "command": "python benchmarks/experiments/reference_mia_smollm2.py " + " ".join(argv or sys.argv[1:]),
    }
    atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
