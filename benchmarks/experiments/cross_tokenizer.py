"""Experiment (issue 16): a SmolLM2 teacher (Q4_1) and a student with its own tokenizer, by `uld` and by
`span_aligned`, against the same student trained with cross-entropy only, at equal steps.

Teacher: SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (`secure-kd assets fetch-smollm2`),
its own 49,152-token byte-level BPE. Student: a small random Llama with a byte-level BPE trained here
on the training text (`student.vocab` tokens, e.g. 2,048), so the two tokenize every text differently.
Text: English prose paragraphs of the Python standard library's docstrings (this interpreter's, hence
offline and deterministic; the corpus sha256 is recorded), shuffled by seed and split into train and
held-out paragraphs. Every arm starts from the same initialization and sees the same batches in the
same order (one seed per run); the KD arms add `kd_weight` x objective to the cross-entropy term.
The teacher's top-k runs once, into a cache that stores its token ids and byte spans
(`secure_kd.cache`), which every KD arm trains from (`CachedCrossTeacher`).

Measured on the held-out paragraphs, on exactly the same bytes for every model (`secure_kd.data.paired`):
- bits per byte and per-byte perplexity (`secure_kd.evaluate.bytes`): comparable across tokenizers;
- teacher agreement (`secure_kd.evaluate.cross_agreement`): at one-to-one aligned groups (the next token
  is one token covering the same bytes after the same text on both sides), the share where the
  student's and the teacher's most likely next tokens are the same bytes; with its coverage;
- for each KD arm, the bits-per-byte difference to the CE arm with a paired bootstrap 95% interval over
  held-out paragraphs (the evaluation's sampling noise only: one training seed, no seed-to-seed spread).

Run: `python benchmarks/experiments/cross_tokenizer.py [--config PATH] [--steps N] [--seed S]
[--results PATH] [--out DIR]`; writes the JSON named by `results` (benchmarks/results/
cross_tokenizer.json) and prints the markdown table and one summary line. `--seed` changes the
students' initialization and batch order, not the train/held-out split (`corpus.split_seed`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import logging
import math
import platform
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from pydantic import Field

from secure_kd.assets import asset_dir, asset_info
from secure_kd.cache import LogitCache, build_cache
from secure_kd.config import KDConfig, Strict, TinyModelConfig, TrainConfig, read_yaml
from secure_kd.cross_teacher import CachedCrossTeacher
from secure_kd.cross_tokenizer import VocabPair
from secure_kd.data import train_tiny_tokenizer
from secure_kd.data.paired import PairedData, tokenize_pairs
from secure_kd.evaluate import bits_per_byte, cross_tokenizer_agreement, paired_batches, top1_predictions
from secure_kd.fingerprint import token_dataset_fingerprint, tokenizer_fingerprint
from secure_kd.models import build_tiny, count_parameters, load_pretrained, load_tokenizer
from secure_kd.paths import atomic_write_json
from secure_kd.trainer import fit_in_scratch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "cross_tokenizer.yaml"


class CorpusSpec(Strict):
    modules: list[str] = Field(min_length=1, description="standard-library modules whose docstrings are read")
    min_chars: int = Field(120, gt=0)
    max_chars: int = Field(400, gt=0)
    n_train: int = Field(600, gt=0)
    n_heldout: int = Field(100, gt=0)
    split_seed: int = Field(0, description="shuffles the paragraphs before the train/held-out split")


class StudentSpec(Strict):
    vocab: int = Field(2048, ge=259)
    tiny: TinyModelConfig = TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4)


class TrainSpec(Strict):
    steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)


class ArmSpec(Strict):
    name: str
    loss: str = "ce"
    kd_weight: float = Field(0.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class ExperimentConfig(Strict):
    seed: int = 0
    out: str = "runs/experiments/cross_tokenizer"
    results: str = "benchmarks/results/cross_tokenizer.json"
    threads: int = Field(1, gt=0)
    corpus: CorpusSpec
    student: StudentSpec = StudentSpec()
    max_length: int = Field(64, ge=8)
    teacher_max_length: int = Field(128, ge=8)
    top_k: int = Field(32, gt=0)
    train: TrainSpec = TrainSpec()
    arms: list[ArmSpec] = Field(min_length=2)
    bootstrap: int = Field(2000, gt=0)


def docstring_paragraphs(spec: CorpusSpec) -> list[str]:
    """Prose paragraphs of the modules' docstrings (module, then public members by name), deduplicated:
    ASCII, no doctest, mostly letters and spaces, `min_chars` to `max_chars` characters."""
    seen: set[str] = set()
    out: list[str] = []
    for name in spec.modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        members = [module] + [
            getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_")
        ]
        for member in members:
            if member is not module and getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            for paragraph in re.split(r"\n\s*\n", doc or ""):
                text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
                if not spec.min_chars <= len(text) <= spec.max_chars or ">>>" in text or not text.isascii():
                    continue
                if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.85 or text in seen:
                    continue
                seen.add(text)
                out.append(text)
    return out


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def evaluate(student, heldout: PairedData, s_tok, t_tok, vocab, teacher_top1, batch_size: int) -> dict:
    batches = paired_batches(heldout.pairs, "student", pad_id=s_tok.pad_token_id, batch_size=batch_size)
    scores = bits_per_byte(student, batches, eos_id=s_tok.eos_token_id, per_example=True)
    agreement = cross_tokenizer_agreement(
        student,
        teacher_top1,
        heldout.pairs,
        student_tokenizer=s_tok,
        teacher_tokenizer=t_tok,
        vocab=vocab,
        student_pad_id=s_tok.pad_token_id,
        teacher_pad_id=t_tok.pad_token_id,
        batch_size=batch_size,
    )
    return {"bytes": scores, "agreement": agreement}


def bootstrap_difference(a: dict, b: dict, n: int, seed: int) -> dict[str, float]:
    """bits/byte of a minus b, with a paired bootstrap 95% interval over held-out paragraphs."""
    nll_a, nll_b = np.array(a["example_nll"]), np.array(b["example_nll"])
    n_bytes = np.array(a["example_bytes"])
    if not np.array_equal(n_bytes, np.array(b["example_bytes"])):
        raise ValueError("the two arms were scored on different bytes")
    scale = 1.0 / math.log(2)
    point = (nll_a.sum() - nll_b.sum()) / n_bytes.sum() * scale
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(n_bytes), size=(n, len(n_bytes)))
    diffs = (nll_a[draws].sum(1) - nll_b[draws].sum(1)) / n_bytes[draws].sum(1) * scale
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(point), "ci95": [float(low), float(high)]}


def markdown(teacher: dict, rows: list[dict], ce_name: str) -> str:
    lines = [
        "| model | bits/byte | byte perplexity | top-1 agreement (one-to-one groups) "
        "| bits/byte vs CE (95% CI) |",
        "|---|---|---|---|---|",
        f"| teacher SmolLM2-135M-Instruct (Q4_1) | {teacher['bits_per_byte']:.3f} | "
        f"{teacher['byte_perplexity']:.3f} | 1 | |",
    ]
    for row in rows:
        scores, agreement = row["after"]["bytes"], row["after"]["agreement"]
        diff = row.get("vs_ce")
        vs = (
            ""
            if row["name"] == ce_name
            else f"{diff['difference']:+.3f} ({diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f})"
        )
        lines.append(
            f"| student, {row['name']} | {scores['bits_per_byte']:.3f} | {scores['byte_perplexity']:.3f} | "
            f"{agreement['top1_agreement']:.3f} | {vs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, help="override train.steps (the same for every arm)")
    parser.add_argument("--seed", type=int, help="override the seed (initialization, batch order)")
    parser.add_argument("--results", help="override the config's results path")
    parser.add_argument("--out", help="override the config's work directory")
    args = parser.parse_args()
    data = read_yaml(args.config)
    data.update({k: v for k, v in {"results": args.results, "out": args.out}.items() if v})
    if args.seed is not None:
        data["seed"] = args.seed
    if args.steps is not None:
        data["train"] = {**data.get("train", {}), "steps": args.steps}
    cfg = ExperimentConfig.model_validate(data)
    torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("secure_kd").setLevel(logging.ERROR)
    started = time.perf_counter()
    work = Path(cfg.out)
    work.mkdir(parents=True, exist_ok=True)

    paragraphs = docstring_paragraphs(cfg.corpus)
    need = cfg.corpus.n_train + cfg.corpus.n_heldout
    if len(paragraphs) < need:
        raise SystemExit(f"only {len(paragraphs)} paragraphs, the config asks for {need}; add modules")
    corpus_sha = hashlib.sha256("\n\n".join(paragraphs).encode()).hexdigest()
    random.Random(cfg.corpus.split_seed).shuffle(paragraphs)
    train_text, heldout_text = paragraphs[: cfg.corpus.n_train], paragraphs[cfg.corpus.n_train : need]
    log(f"{len(paragraphs)} paragraphs (sha256 {corpus_sha[:12]}): {len(train_text)} train, "
        f"{len(heldout_text)} held out", started)  # fmt: skip

    t_tok = load_tokenizer("smollm2")
    s_tok = train_tiny_tokenizer(train_text, cfg.student.vocab)
    teacher = load_pretrained("smollm2").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = VocabPair.from_tokenizers(
        s_tok, t_tok, student_width=len(s_tok), teacher_width=teacher.config.vocab_size
    )
    pair_args = dict(max_length=cfg.max_length, teacher_max_length=cfg.teacher_max_length)
    train = tokenize_pairs([{"text": t} for t in train_text], s_tok, t_tok, **pair_args)
    heldout = tokenize_pairs([{"text": t} for t in heldout_text], s_tok, t_tok, **pair_args)
    log(f"student tokenizer {len(s_tok)} tokens, {vocab.n_shared} shared with the teacher's "
        f"{vocab.teacher.real_size}; train tokens: student {sum(len(p.student) for p in train.pairs)}, "
        f"teacher {sum(len(p.teacher) for p in train.pairs)}", started)  # fmt: skip

    cache_dir = work / "teacher-cache"
    sequences = [p.teacher.input_ids for p in train.pairs]
    build_cache(
        teacher,
        sequences,
        cache_dir,
        k=cfg.top_k,
        teacher_id="smollm2 (Q4_1)",
        tokenizer_fingerprint=tokenizer_fingerprint(t_tok),
        byte_spans=[p.teacher_spans for p in train.pairs],
        text_fingerprint=train.text_fingerprint,
        batch_size=cfg.train.batch_size,
        progress=False,
    )
    cache = LogitCache.open(
        cache_dir,
        expect_tokenizer=tokenizer_fingerprint(t_tok),
        expect_dataset=token_dataset_fingerprint(sequences),
        expect_k=cfg.top_k,
        expect_text=train.text_fingerprint,
    )
    log(f"teacher top-{cfg.top_k} cached ({cache.bytes_per_token:.0f} bytes/position)", started)
    t_batches = paired_batches(
        heldout.pairs, "teacher", pad_id=t_tok.pad_token_id, batch_size=cfg.train.batch_size
    )
    teacher_bytes = bits_per_byte(teacher, t_batches, eos_id=t_tok.eos_token_id, per_example=True)
    teacher_top1 = top1_predictions(
        teacher,
        [p.teacher for p in heldout.pairs],
        real_size=vocab.teacher.real_size,
        pad_id=t_tok.pad_token_id,
        batch_size=cfg.train.batch_size,
    )
    log(
        f"teacher: {teacher_bytes['bits_per_byte']:.3f} bits/byte on {teacher_bytes['bytes']} held-out bytes",
        started,
    )
    targets = CachedCrossTeacher(cache, [p.student_spans for p in train.pairs], "cpu")

    def fresh_student():
        return build_tiny(cfg.student.tiny, len(s_tok), seed=cfg.seed, pad_token_id=s_tok.pad_token_id)

    before = evaluate(fresh_student(), heldout, s_tok, t_tok, vocab, teacher_top1, cfg.train.batch_size)
    rows = []
    for arm in cfg.arms:
        kd = KDConfig(
            loss=arm.loss,
            params=arm.params,
            kd_weight=arm.kd_weight,
            ce_weight=arm.ce_weight,
            teacher_targets="cache",
            top_k=cfg.top_k,
        )
        train_cfg = TrainConfig(
            max_steps=cfg.train.steps,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            warmup_steps=cfg.train.warmup_steps,
            schedule="cosine",
        )
        student = fresh_student()
        arm_started = time.perf_counter()
        fit = fit_in_scratch(
            student,
            train.students,
            kd,
            train_cfg,
            pad_id=s_tok.pad_token_id,
            seed=cfg.seed,
            device="cpu",
            targets=targets if arm.kd_weight > 0 else None,
            vocab=vocab,
        )
        seconds = time.perf_counter() - arm_started
        after = evaluate(student, heldout, s_tok, t_tok, vocab, teacher_top1, cfg.train.batch_size)
        rows.append(
            {
                "name": arm.name,
                "arm": arm.model_dump(),
                "train_seconds": round(seconds, 1),
                "first_losses": fit.losses[:5],
                "last_losses": fit.losses[-5:],
                "after": after,
            }
        )
        log(f"{arm.name}: {after['bytes']['bits_per_byte']:.3f} bits/byte, agreement "
            f"{after['agreement']['top1_agreement']:.3f} ({seconds:.0f} s)", started)  # fmt: skip
    ce_name = next(arm.name for arm in cfg.arms if arm.kd_weight == 0)
    ce_row = next(row for row in rows if row["name"] == ce_name)
    for row in rows:
        if row["name"] != ce_name:
            row["vs_ce"] = bootstrap_difference(
                row["after"]["bytes"], ce_row["after"]["bytes"], cfg.bootstrap, cfg.seed
            )
    best = min(rows, key=lambda row: row["after"]["bytes"]["bits_per_byte"])
    best_agreement = max(rows, key=lambda row: row["after"]["agreement"]["top1_agreement"])

    def strip(scores: dict) -> dict:
        return {k: v for k, v in scores.items() if not k.startswith("example_")}

    for row in [*rows, {"after": before}]:
        row["after"]["bytes"] = strip(row["after"]["bytes"])
    results = {
        "experiment": "cross_tokenizer",
        "teacher": "SmolLM2-135M-Instruct",
        "quantization": "Q4_1 (dequantized to float32)",
        "teacher_asset": info.model_dump() if (info := asset_info(asset_dir())) else None,
        "python": platform.python_version(),
        "corpus": {
            "paragraphs": len(paragraphs),
            "sha256": corpus_sha,
            "train": len(train),
            "heldout": len(heldout),
        },
        "student": {
            "tokenizer_vocab": len(s_tok),
            "shared_tokens_with_teacher": vocab.n_shared,
            "parameters": count_parameters(fresh_student()),
        },
        "teacher_bits_per_byte": strip(teacher_bytes),
        "student_before": before,
        "rows": rows,
        "best_bits_per_byte": best["name"],
        "best_agreement": best_agreement["name"],
        "agreement_definition": (
            "at each one-to-one aligned group of the held-out text (the next token is one token covering the "
            "same bytes after the same text on both sides), the student's and the teacher's most likely "
            "next tokens stand for the same bytes"
        ),
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    results["table_markdown"] = markdown(results["teacher_bits_per_byte"], rows, ce_name)
    atomic_write_json(Path(cfg.results), results)
    print(results["table_markdown"])
    summary = {
        "experiment": "cross_tokenizer",
        "best_bits_per_byte": best["name"],
        "seconds": results["seconds"],
    }
    summary.update({row["name"]: round(row["after"]["bytes"]["bits_per_byte"], 4) for row in rows})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
