"""Experiment: does privileged-information self-distillation leak the privileged context into the
student, and does distilling only a share of the tokens change it? (issue 18; TRACE and CEPO report
that all-token self-distillation amplifies privileged-information leakage.)

Setup (tiny Llamas on CPU, one synthetic task):
- a base model (hidden 64, 2 layers, tiny BPE tokenizer of 400 trained on public records) is trained
  with cross-entropy on public records "note: the code of NAME is DDD" + "Q: code of NAME? A:" +
  " the code of NAME is DDD." (half of them without the note): it learns to copy a code from the
  context, and without a note has nothing to go on (checked: its copy accuracy with and without
  the note is in the results);
- the private set: `--records` records with names never seen in pretraining, each with a random
  3-digit code that appears ONLY in its privileged context (data.privileged_field); the record's
  own completion says " the code of NAME is on file." and every batch is on-policy (kd.lmbda 1):
  the student samples its continuation of the prompt, so the code is never in the student's input;
- self_privileged distillation from the base (kd.self_teacher frozen, kd.loss forward_kl, full
  logits, batch 8, lr 2e-3) for each of `--epochs` (5: early; 30: long), at kd.token_share 1.0 (all
  tokens) and each of `--shares` (0.5, 0.25, 0.1; about 10 response tokens per record, 2 of them the
  code's);
- the reference: the same training with the teacher shown no context (the run "no_privileged").

Measured on each student, for every private record's code (a canary in the context only): exposure
over the 1000 codes (rank given the prefix "Q: code of NAME? A: the code of NAME is"), and greedy
extraction of the code from that prefix (attacks.memorization.privileged). Over `--seeds` seeds (each
draws its own names, codes and sampling): the mean and a 95% Student-t interval across seeds.

Run: `python benchmarks/experiments/self_distill_leakage.py [--seeds 0 1 2] [--out PATH]`; writes
benchmarks/results/self_distill_leakage.json and prints one line per arm. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch

from attacks.memorization.privileged import mean_interval, privileged_leakage
from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import Canary, TokenizedExample, train_tiny_tokenizer
from secure_kd.data.synthetic import SecretSpace
from secure_kd.models import build_tiny
from secure_kd.paths import atomic_write_json
from secure_kd.proportions import wilson_interval
from secure_kd.self_distill import SEPARATOR, PrivilegedSelfTeacher, self_teacher
from secure_kd.trainer import fit_in_scratch

REPO_ROOT = Path(__file__).resolve().parents[2]
SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "po", "ne", "vi", "da", "zu", "fe", "go", "hi", "ja", "qu"]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3))


def _code(rng: random.Random) -> str:
    return f"{rng.randrange(1000):03d}"


def note(name: str, code: str) -> str:
    return f"note: the code of {name} is {code}"


def prompt(name: str) -> str:
    return f"Q: code of {name}? A:"


def answer(name: str, code: str) -> str:
    return f" the code of {name} is {code}."


def canary_prefix(name: str) -> str:
    return f"{prompt(name)} the code of {name} is "


class Task:
    """The tokenizer, the pretrained copier and the encoders of the task (one per experiment)."""

    def __init__(self, seed: int, n_public: int, epochs: float, device: str) -> None:
        rng = random.Random(10_000 + seed)
        public = [(_name(rng), _code(rng)) for _ in range(n_public)]
        self.public_names = {n for n, _ in public}
        texts = [note(n, c) + SEPARATOR + prompt(n) + answer(n, c) for n, c in public[:2000]]
        self.tokenizer = train_tiny_tokenizer(texts, vocab_size=400)
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        examples = []
        for i, (n, c) in enumerate(public):
            context = self.ids(note(n, c) + SEPARATOR) if i % 2 == 0 else []
            head, tail = self.ids(prompt(n)), self.ids(answer(n, c)) + [self.eos]
            examples.append(TokenizedExample(context + head + tail, [-100] * len(context + head) + tail, i))
        self.base = build_tiny(
            TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4), len(self.tokenizer), seed=seed
        )
        kd = KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None)
        train = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, warmup_steps=20)
        fit_in_scratch(self.base, examples, kd, train, pad_id=self.pad, seed=seed, device=device)
        self.device = device
        self.copy_accuracy = self._copy_accuracy(rng)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def _copy_accuracy(self, rng: random.Random, n: int = 50) -> dict[str, float]:
        hits = {"with_note": 0, "without_note": 0}
        self.base.eval()
        for _ in range(n):
            name, code = _name(rng), _code(rng)
            for arm, context in (("with_note", self.ids(note(name, code) + SEPARATOR)), ("without_note", [])):
                x = torch.tensor([context + self.ids(canary_prefix(name).rstrip())], device=self.device)
                out = self.base.generate(
                    input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=self.pad
                )
                hits[arm] += self.tokenizer.decode(out[0, x.shape[1] :]).strip().startswith(code)
        return {arm: k / n for arm, k in hits.items()}


def private_set(task: Task, n: int, seed: int):
    """(examples, privileged ids per example, canaries): codes only in the privileged context."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = _name(rng)
        if name not in task.public_names and name not in names:
            names.append(name)
    codes = [_code(rng) for _ in names]
    examples, contexts, canaries = [], [], []
    for i, (name, code) in enumerate(zip(names, codes, strict=True)):
        head, tail = task.ids(prompt(name)), task.ids(f" the code of {name} is on file.") + [task.eos]
        examples.append(TokenizedExample(head + tail, [-100] * len(head) + tail, i))
        contexts.append(task.ids(note(name, code) + SEPARATOR))
        text = canary_prefix(name) + code + "."
        canaries.append(
            Canary(prefix=canary_prefix(name), secret=code, text=text, record_ids=(i,), repeats=1)
        )
    return examples, contexts, canaries


def self_distil(task: Task, examples, contexts, *, share: float, epochs: float, seed: int):
    student = copy.deepcopy(task.base)
    teacher = self_teacher(student, "frozen")
    kd = KDConfig(
        loss="forward_kl", mode="self_privileged", lmbda=1.0, top_k=None, max_new_tokens=10,
        token_share=share, self_teacher="frozen",
    )  # fmt: skip
    targets = PrivilegedSelfTeacher(teacher, contexts, top_k=None, pad_id=task.pad, bos_id=None)
    train = TrainConfig(epochs=epochs, batch_size=8, lr=2e-3, schedule="constant", max_grad_norm=1.0)
    fit = fit_in_scratch(
        student,
        examples,
        kd,
        train,
        pad_id=task.pad,
        seed=seed,
        device=task.device,
        teacher=teacher,
        targets=targets,
    )
    return student, fit


def summarize(rows: list[dict]) -> dict:
    """Across seeds: mean exposure and extraction rate with a 95% t interval over the seeds' means, and
    the extraction pooled over every canary of every seed with its 95% Wilson interval."""
    hits, n = sum(r["extracted"] for r in rows), sum(r["n_canaries"] for r in rows)
    return {
        "mean_exposure": mean_interval([r["mean_exposure"] for r in rows]),
        "extraction_rate": mean_interval([r["extraction_rate"] for r in rows]),
        "extraction_pooled": {
            "hits": hits,
            "n": n,
            "rate": hits / n,
            "wilson95": list(wilson_interval(hits, n)),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--epochs", type=float, nargs="+", default=[5.0, 30.0])
    parser.add_argument("--pretrain-records", type=int, default=4000)
    parser.add_argument("--pretrain-epochs", type=float, default=12.0)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks/results/self_distill_leakage.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    device = "cpu"
    task = Task(0, args.pretrain_records, args.pretrain_epochs, device)
    space = SecretSpace(3)
    arms = ["no_privileged", "all_tokens"] + [f"share_{s:g}" for s in args.shares]
    runs: dict[str, list[dict]] = {f"{arm}@{e:g}ep": [] for e in args.epochs for arm in arms}
    base_runs = []
    for seed in args.seeds:
        examples, contexts, canaries = private_set(task, args.records, seed)
        base_runs.append(privileged_leakage(task.base, task.tokenizer, canaries, space).model_dump())
        settings = {"no_privileged": ([[] for _ in contexts], 1.0), "all_tokens": (contexts, 1.0)}
        settings.update({f"share_{s:g}": (contexts, s) for s in args.shares})
        for epochs in args.epochs:
            for arm, (ctx, share) in settings.items():
                student, fit = self_distil(task, examples, ctx, share=share, epochs=epochs, seed=seed)
                leak = privileged_leakage(student, task.tokenizer, canaries, space).model_dump()
                leak.update(seed=seed, final_loss=fit.losses[-1], steps=fit.steps)
                key = f"{arm}@{epochs:g}ep"
                runs[key].append(leak)
                print(f"seed {seed} {key}: exposure {leak['mean_exposure']:.2f} bits, extracted "
                      f"{leak['extracted']}/{leak['n_canaries']}", file=sys.stderr)  # fmt: skip
    summary = {arm: summarize(rows) for arm, rows in runs.items()}
    summary["base_before_distillation"] = summarize(base_runs)
    result = {
        "experiment": "self_distill_leakage",
        "command": "python benchmarks/experiments/self_distill_leakage.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_copy_accuracy": task.copy_accuracy,
        "max_exposure_bits": 3 * 3.321928094887362,
        "summary": summary,
        "runs": runs,
        "base_runs": base_runs,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(args.out, result)
    for arm, s in summary.items():
        e, x = s["mean_exposure"], s["extraction_pooled"]
        print(f"{arm}: exposure {e['mean']:.2f} {e['ci']}, extraction {x['hits']}/{x['n']} {x['wilson95']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
