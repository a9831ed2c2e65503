"""Training throughput of one distillation step: secure-kd's Distiller vs TRL's GKDTrainer vs plain CE.

Method. One process builds a random student (Llama, 2 layers, width 128) and teacher (Llama, 4 layers,
width 256), untied embeddings, vocabulary 49,152, and random sequences (batch 8 x 128 tokens, every
position trained; ids below a tiny tokenizer's vocabulary, which TRL's trainer needs; the cost of a step
does not depend on the ids). Every training variant starts from the same student and uses torch AdamW
(lr 1e-4, no weight decay, constant schedule), gradient clipping at 1.0 and float32.

Timing. Each variant runs `warmup` untimed steps, then `rounds` rounds in which every variant runs
`steps` timed steps in turn (the order rotates each round), so a change in the load of this shared
machine hits all variants alike instead of whichever ran at that moment. A variant's figure is its
median step time (the minimum, the least disturbed step, is reported too); tokens/s = batch * seq /
median. TRL's steps are timed inside its own training loop by a TrainerCallback (on_step_begin ->
on_step_end: forward, loss, backward, clipping, optimizer and scheduler step; its setup and data
loading excluded); each round calls `trainer.train()` again, which keeps the optimizer and its state.
OMP_WAIT_POLICY defaults to PASSIVE (see below), which removes most of the noise that spin-waiting
OpenMP threads add on a shared machine, for every variant alike.

Variants:
  ce               the student's plain cross-entropy step (forward, CE, backward, clip, AdamW), no teacher;
  ce_plus_teacher  the same plus a teacher forward under no_grad (the floor of any live-teacher KD step);
  trl_gkd          TRL's GKDTrainer, off-policy (lmbda=0, seq_kd=False), beta=0.5, T=1, full-vocab JSD;
  ours_live_full   Distiller.train_step, live teacher, jsd beta=0.5, the teacher's full-vocabulary logits;
  ours_live_top64  the same with the teacher's top-64 (uniform tail);
  ours_cache       Distiller from a LogitCache built once (not timed) at k=64, uniform tail;
  ours_cache_fused the same with kd.fused=True (the student's logits are never materialized);
  jsd_loss_alone_{trl,ours_dense,ours_top64}: forward + backward of the JSD objective alone on fixed
                   logits of one batch: TRL's `GKDTrainer.generalized_jsd_loss` vs `secure_kd.losses.jsd`
                   with the dense teacher and with its top-64 (uniform tail), at the trainer's kd.chunk_size.

Targets: ours_live at >= 3x TRL's tokens/s; a cached KD step within 1.3x of the CE step's time.
Run from the repository root: `python benchmarks/distill_step.py` (full size, writes
benchmarks/results/distill_step.json) or `--quick` (small vocabulary and batch, prints only).
`--chunk-size N` overrides kd.chunk_size of secure-kd's variants, `--threads`, `--rounds`, `--steps`,
`--variants` change the run; such runs print (or write to `--out`) and leave the recorded results alone.

On a GPU: `--device cuda` puts every model, batch and cache read there (TRL's trainer with
use_cpu=False), synchronizes before every clock read, and reports per variant the CUDA allocator's
peak while its steps ran (`torch.cuda.max_memory_allocated`, after `reset_peak_memory_stats`), both
in all and beyond what was allocated when its steps began (the other variants' models stay resident,
so the second is the variant's own); `--precision bf16` runs every variant under bf16 autocast
(TRL's `bf16=True`). Such runs print or write `--out` only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# On a machine shared with other jobs, OpenMP's default spin-waiting makes each of torch's parallel regions
# wait for a descheduled partner thread (an index_select of 200 MB measured 1.7-8.7 s instead of 0.5 s at
# load 11 on 2 cores); passive waiting removes that noise. It must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from _measure import cuda_info, ratio, write_results
from torch import Tensor, nn

from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample, collate
from secure_kd.losses import get_loss
from secure_kd.models import build_tiny
from secure_kd.teacher_targets import CachedTeacher, LiveTeacher, shift_labels
from secure_kd.topk import TopKLogits
from secure_kd.trainer import Distiller

LR = 1e-4
BETA = 0.5
TOP_K = 64
PAD_ID = 0
THREADS = 2

Runner = Callable[[int], list[float]]  # runs n steps, returns each step's wall time in seconds


@dataclass(frozen=True)
class Setting:
    vocab: int
    batch: int
    seq: int
    student_hidden: int
    student_layers: int
    teacher_hidden: int
    teacher_layers: int
    heads: int
    tokenizer_vocab: int
    warmup: int
    rounds: int
    steps: int
    device: str = "cpu"
    precision: str = "fp32"


FULL = Setting(
    vocab=49_152,
    batch=8,
    seq=128,
    student_hidden=128,
    student_layers=2,
    teacher_hidden=256,
    teacher_layers=4,
    heads=4,
    tokenizer_vocab=512,
    warmup=2,
    rounds=3,
    steps=2,
)
QUICK = Setting(
    vocab=2_048,
    batch=2,
    seq=32,
    student_hidden=32,
    student_layers=1,
    teacher_hidden=64,
    teacher_layers=2,
    heads=2,
    tokenizer_vocab=300,
    warmup=1,
    rounds=2,
    steps=2,
)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> Runner:
    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    return run


def autocast(s: Setting):
    return torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.precision == "bf16")


# -- models and data ---------------------------------------------------------------------------------
def make_student(s: Setting) -> nn.Module:
    cfg = TinyModelConfig(hidden_size=s.student_hidden, num_layers=s.student_layers, num_heads=s.heads)
    return build_tiny(cfg, s.vocab, seed=1).to(s.device).train()


def make_teacher(s: Setting) -> nn.Module:
    cfg = TinyModelConfig(hidden_size=s.teacher_hidden, num_layers=s.teacher_layers, num_heads=s.heads)
    teacher = build_tiny(cfg, s.vocab, seed=0).to(s.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_examples(s: Setting, n: int) -> list[TokenizedExample]:
    """n sequences of exactly `seq` random ids in [3, tokenizer_vocab), every position trained."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, s.tokenizer_vocab, (n, s.seq), generator=g).tolist()
    return [TokenizedExample(input_ids=row, labels=list(row), record_index=i) for i, row in enumerate(ids)]


# -- plain cross-entropy -----------------------------------------------------------------------------
def ce_runner(s: Setting, examples: list[TokenizedExample], teacher: nn.Module | None) -> Runner:
    """The floor: forward, CE on shifted labels, backward, clip, AdamW (and a teacher forward if given)."""
    student = make_student(s)
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batches = itertools.cycle(
        [collate(examples[i : i + s.batch], pad_id=PAD_ID) for i in range(0, len(examples), s.batch)]
    )

    def step() -> None:
        batch = {k: v.to(s.device, non_blocking=True) for k, v in next(batches).items()}
        optimizer.zero_grad(set_to_none=True)
        with autocast(s):
            if teacher is not None:
                with torch.no_grad():
                    teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = shift_labels(batch["labels"])
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return timed(step, s.device)


# -- secure-kd's Distiller ---------------------------------------------------------------------------
def distiller_runner(s: Setting, examples, teacher, targets, kd: KDConfig, out: Path) -> Runner:
    train = TrainConfig(
        batch_size=s.batch,
        lr=LR,
        weight_decay=0.0,
        schedule="constant",
        max_grad_norm=1.0,
        precision=s.precision,
    )
    distiller = Distiller(
        student=make_student(s),
        teacher=teacher,
        targets=targets,
        examples=examples,
        kd=kd,
        train=train,
        out=out,
        pad_id=PAD_ID,
        eos_id=PAD_ID,
        seed=0,
        device=s.device,
        progress=False,
    )
    steps = itertools.count()
    return timed(lambda: distiller.train_step(next(steps)), s.device)


def jsd_config(
    top_k: int | None, chunk_size: int | None, *, cache: bool = False, fused: bool = False
) -> KDConfig:
    """The KD settings of secure-kd's variants; chunk_size None keeps KDConfig's default."""
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    return KDConfig(
        loss="jsd",
        params={"beta": BETA},
        top_k=top_k,
        tail="uniform",
        fused=fused,
        teacher_targets="cache" if cache else "live",
        **chunking,
    )


def open_logit_cache(
    teacher: nn.Module, examples: list[TokenizedExample], directory: Path, device: str = "cpu"
):
    """The teacher's top-k over `examples`, built once (not timed) and opened for reading."""
    from secure_kd.cache import LogitCache, build_cache
    from secure_kd.fingerprint import token_dataset_fingerprint

    sequences = [e.input_ids for e in examples]
    tokenizer_id, dataset_id = "benchmark-random-ids", token_dataset_fingerprint(sequences)
    build_cache(
        teacher,
        sequences,
        directory,
        k=TOP_K,
        teacher_id="benchmark-teacher",
        tokenizer_fingerprint=tokenizer_id,
        dataset_fingerprint=dataset_id,
        device=device,
        progress=False,
    )
    return LogitCache.open(
        directory, expect_tokenizer=tokenizer_id, expect_dataset=dataset_id, expect_k=TOP_K
    )


# -- TRL's GKDTrainer --------------------------------------------------------------------------------
def tiny_tokenizer(vocab: int):
    from secure_kd.data import train_tiny_tokenizer

    words = [f"token{i} word{i % 97} piece{i % 13}" for i in range(2000)]
    return train_tiny_tokenizer(words, vocab_size=vocab, min_frequency=1)


def trl_gkd_runner(s: Setting, examples: list[TokenizedExample], teacher: nn.Module, out: Path) -> Runner:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(s.device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(s.device)
            self.times.append(time.perf_counter() - self.start)

    def stack(features: list[dict]) -> dict[str, Tensor]:
        return {key: torch.tensor([f[key] for f in features], dtype=torch.long) for key in features[0]}

    data = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "attention_mask": [[1] * len(e.input_ids) for e in examples],
            "labels": [e.labels for e in examples],
        }
    )
    args = GKDConfig(
        output_dir=str(out),
        per_device_train_batch_size=s.batch,
        max_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lmbda=0.0,
        beta=BETA,
        temperature=1.0,
        seq_kd=False,
        max_length=s.seq,
        bf16=s.precision == "bf16",
        fp16=False,
        use_cpu=s.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    timer = StepTimer()
    trainer = GKDTrainer(
        model=make_student(s),
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(s.tokenizer_vocab),
        data_collator=stack,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training log line would break the one JSON line

    def run(n: int) -> list[float]:
        if n == 0:  # max_steps=0 would make the Trainer run whole epochs instead
            return []
        trainer.args.max_steps = n
        before = len(timer.times)
        trainer.train()
        if len(timer.times) - before != n:
            raise RuntimeError(f"GKDTrainer ran {len(timer.times) - before} steps, expected {n}")
        return timer.times[before:]

    return run


# -- the JSD objective alone -------------------------------------------------------------------------
def loss_alone_runners(s: Setting, examples, teacher: nn.Module, chunk_size: int | None) -> dict[str, Runner]:
    """Forward + backward of the JSD objective alone on fixed logits of one batch, ours with the trainer's
    chunk size (what the Distiller passes), so that it explains the step figures."""
    from trl.experimental.gkd import GKDTrainer

    batch = {k: v.to(s.device) for k, v in collate(examples[: s.batch], pad_id=PAD_ID).items()}
    model_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        student_logits = make_student(s)(**model_inputs).logits
        teacher_logits = teacher(**model_inputs).logits
    student_logits.requires_grad_()
    labels, shifted = batch["labels"], shift_labels(batch["labels"])
    teacher_topk = TopKLogits.from_logits(teacher_logits, TOP_K)
    jsd = get_loss("jsd")

    def backward(loss: Tensor) -> None:
        loss.backward()
        student_logits.grad = None

    def trl() -> None:  # TRL's compute_loss shifts the logits; the objective masks labels == -100
        shifted_student, shifted_teacher = student_logits[:, :-1], teacher_logits[:, :-1]
        backward(GKDTrainer.generalized_jsd_loss(shifted_student, shifted_teacher, labels[:, 1:], beta=BETA))

    return {
        "jsd_loss_alone_trl": timed(trl, s.device),
        "jsd_loss_alone_ours_dense": timed(
            lambda: backward(jsd(student_logits, teacher_logits, shifted, beta=BETA, chunk_size=chunk_size)),
            s.device,
        ),
        "jsd_loss_alone_ours_top64": timed(
            lambda: backward(
                jsd(student_logits, teacher_topk, shifted, beta=BETA, tail="uniform", chunk_size=chunk_size)
            ),
            s.device,
        ),
    }


# -- the run -----------------------------------------------------------------------------------------
def machine_info() -> dict[str, object]:
    import transformers
    import trl

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def build_runners(
    s: Setting, variants: list[str], examples, teacher: nn.Module, root: Path, chunk_size: int | None
) -> dict[str, Runner]:
    live_top_k = {"ours_live_full": None, "ours_live_top64": TOP_K}
    cached: CachedTeacher | None = None
    runners: dict[str, Runner] = {}
    for name in variants:
        if name == "jsd_loss_alone":
            runners.update(loss_alone_runners(s, examples, teacher, jsd_config(None, chunk_size).chunk_size))
        elif name in ("ce", "ce_plus_teacher"):
            runners[name] = ce_runner(s, examples, teacher if name == "ce_plus_teacher" else None)
        elif name == "trl_gkd":
            runners[name] = trl_gkd_runner(s, examples, teacher, root / name)
        elif name in live_top_k:
            top_k = live_top_k[name]
            runners[name] = distiller_runner(
                s, examples, teacher, LiveTeacher(teacher, top_k), jsd_config(top_k, chunk_size), root / name
            )
        else:  # ours_cache, ours_cache_fused: one cache, built once
            if cached is None:
                cache = open_logit_cache(teacher, examples, root / "cache", s.device)
                cached = CachedTeacher(cache, torch.device(s.device))
            kd = jsd_config(TOP_K, chunk_size, cache=True, fused=name.endswith("_fused"))
            runners[name] = distiller_runner(s, examples, None, cached, kd, root / name)
    return runners


def run(s: Setting, variants: list[str], threads: int, chunk_size: int | None) -> dict[str, object]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = s.batch * s.seq
    examples = make_examples(s, n=4 * s.batch)
    teacher = make_teacher(s)
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {}
    memory: dict[str, dict[str, int]] = {}
    cuda = s.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="distill-step-") as tmp:
        runners = build_runners(s, variants, examples, teacher, Path(tmp), chunk_size)
        names = list(runners)
        for name in names:
            runners[name](s.warmup)
            times[name] = []
            memory[name] = {"peak_bytes": 0, "peak_bytes_beyond_resident": 0}
        for round_index in range(s.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()
                times[name] += runners[name](s.steps)
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                    memory[name]["peak_bytes"] = max(memory[name]["peak_bytes"], peak)
                    beyond = max(memory[name]["peak_bytes_beyond_resident"], peak - resident)
                    memory[name]["peak_bytes_beyond_resident"] = beyond
            print(
                f"round {round_index + 1}/{s.rounds}: "
                + ", ".join(f"{n} {statistics.median(times[n]):.3f}s" for n in names),
                file=sys.stderr,
                flush=True,
            )
    results = {
        name: {
            "median_s": round(statistics.median(t), 4),
            "min_s": round(min(t), 4),
            "tokens_per_s": round(tokens / statistics.median(t), 1),
            "times_s": [round(x, 4) for x in t],
            **({"cuda_max_memory_allocated": memory[name]} if cuda else {}),
        }
        for name, t in times.items()
    }
    return {
        "benchmark": "distill_step",
        "setting": asdict(s),
        "tokens_per_step": tokens,
        "kd_chunk_size": jsd_config(None, chunk_size).chunk_size,
        "variants": results,
        "ratios": ratios(results),
        "machine": machine_info()
        | cuda_info()
        | {"load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }


def ratios(r: dict[str, dict]) -> dict[str, object]:
    """Side-by-side ratios of the variants that ran (medians), and whether the targets are met."""
    med = {name: v["median_s"] for name, v in r.items()}
    out: dict[str, object] = {}
    for name in ("ours_live_full", "ours_live_top64"):
        if name in med and "trl_gkd" in med:
            out[f"{name}_over_trl_gkd_tokens_per_s"] = ratio(med["trl_gkd"], med[name])
    for name in ("ce_plus_teacher", "ours_cache", "ours_cache_fused"):
        if name in med and "ce" in med:
            out[f"{name}_over_ce_step_time"] = ratio(med[name], med["ce"])
    for name in ("ours_dense", "ours_top64"):
        if f"jsd_loss_alone_{name}" in med and "jsd_loss_alone_trl" in med:
            out[f"jsd_loss_alone_{name}_over_trl_time"] = ratio(
                med[f"jsd_loss_alone_{name}"], med["jsd_loss_alone_trl"]
            )
    live = [v for k, v in out.items() if k.startswith("ours_live")]
    cache = [v for k, v in out.items() if k.startswith("ours_cache")]
    out["targets"] = {
        "live_at_least_3x_trl_tokens_per_s": max(live) >= 3.0 if live else None,
        "cache_step_within_1.3x_ce_step": min(cache) <= 1.3 if cache else None,
    }
    return out


ALL_VARIANTS = [
    "ce",
    "ce_plus_teacher",
    "trl_gkd",
    "ours_live_full",
    "ours_live_top64",
    "ours_cache",
    "ours_cache_fused",
    "jsd_loss_alone",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small vocabulary and batch, prints only")
    positive = {"warmup": 0, "rounds": 1, "steps": 1, "threads": 1, "chunk_size": 1}  # lowest allowed value
    for name in ("warmup", "rounds", "steps"):
        parser.add_argument(f"--{name}", type=int, help=f"override the setting's {name}")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--chunk-size", type=int, help="kd.chunk_size of our variants (default: KDConfig's)")
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=ALL_VARIANTS)
    parser.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    for name, low in positive.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    setting = QUICK if args.quick else FULL
    setting = replace(
        setting,
        **{n: getattr(args, n) for n in ("warmup", "rounds", "steps") if getattr(args, n) is not None},
        device=args.device,
        precision=args.precision,
    )
    report = run(setting, args.variants, args.threads, args.chunk_size)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    recorded = args.device == "cpu" and args.precision == "fp32" and args.out is None
    if not args.quick and args.variants == ALL_VARIANTS and args.chunk_size is None and recorded:
        write_results("distill_step", report)
    else:  # quick, partial or modified runs never overwrite the recorded results
        print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
