"""Size, fidelity and speed of the offline teacher logit cache (secure_kd.cache).

Method. A teacher runs once over a set of token sequences (vocab 49,152) and its exact top-k_max
log-probabilities (float64 softmax, k_max = the largest k asked for) and exact tail mass are kept
in memory. For every k, `build_cache` then writes a real cache (safetensors shards + manifest)
from a replay of those outputs: the replay teacher returns logits whose top-k_max entries are
the exact log-probabilities and whose other entries share the exact tail mass evenly, so for any
k <= k_max the cache sees exactly the teacher's top-k and tail. The figures:

  bytes_per_token      total shard bytes on disk / cached positions (headers included);
  kl_topk_mean         mean over positions of KL(exact || decoded), both top-k renormalized;
  kl_uniform_tail_mean the same for the full distributions completed with a uniform tail
                       (top-k entries plus the tail mass spread over the other ids);
  ids_exact            every position's decoded token-id set equals the exact top-k set;
  encode_tokens_per_s  TopKCodec.encode alone on the k-specific arrays (teacher excluded);
  shard_decode_tokens_per_s  cold reads: size + sha256 checks, LZMA, id and code decoding;
  batch_ms_8x128       `cache.batch` of 8 random sequences padded to 128 (dequantize, renormalize,
                       sort) from decoded shards, median of repeats; batch_slots_per_s counts the
                       8*128 padded slots, batch_real_tokens_per_s the cached positions in them;
  ratio_vs_fp16_int32  6*k bytes (float16 value + int32 id per entry) / bytes_per_token;
  ratio_vs_distillkit  DistillKit's reported bytes/token at the same k (about 114 at k=50 and
                       300 at k=128, from its README) / ours.

Sources: `synthetic` (default) draws realistic peaked logits with `secure_kd.cache.SyntheticTeacher`
(Zipf prior on ids, a few lifted candidates; distribution statistics are printed with the results);
`smollm2` runs SmolLM2-135M-Instruct (Q4_1, needs `secure-kd assets fetch-smollm2`) over
Faker-made documents (`secure_kd.data.documents`), 128 tokens each.

Run: `python benchmarks/cache.py` (writes benchmarks/results/cache.json), `--source smollm2`
(writes benchmarks/results/cache_smollm2.json), `--quick` for a smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import safetensors.numpy
import torch

from secure_kd.cache import CodecParams, LogitCache, SyntheticTeacher, TopKCodec, build_cache
from secure_kd.fingerprint import token_dataset_fingerprint

VOCAB = 49_152
DISTILLKIT_BYTES_PER_TOKEN = {50: 114.0, 128: 300.0}
RESULTS = Path(__file__).resolve().parent / "results"


# -- sources ----------------------------------------------------------------------------------------


def synthetic_source(n_tokens: int, seed: int) -> tuple[SyntheticTeacher, list[list[int]], str]:
    rng = random.Random(seed)
    sequences, total = [], 0
    while total < n_tokens:
        length = rng.randint(32, 128)
        sequences.append([rng.randrange(VOCAB) for _ in range(length)])
        total += length
    return SyntheticTeacher(VOCAB, seed=seed), sequences, "synthetic (secure_kd.cache.SyntheticTeacher)"


def smollm2_source(n_tokens: int, seed: int):
    try:
        from faker import Faker

        from secure_kd.config import ModelConfig
        from secure_kd.data.documents import TOPICS, make_document
        from secure_kd.models import load_teacher, load_tokenizer
    except ImportError as exc:
        sys.exit(f"--source smollm2 needs secure_kd.models.load_teacher and secure_kd.data ({exc})")
    try:
        tokenizer = load_tokenizer("smollm2")
        teacher = load_teacher(ModelConfig(source="smollm2"), vocab_size=len(tokenizer), seed=seed)
    except Exception as exc:  # the asset may be missing: say how to get it
        sys.exit(f"could not load SmolLM2 ({exc}); fetch it first with `secure-kd assets fetch-smollm2`")
    fake, rng = Faker(), random.Random(seed)
    Faker.seed(seed)
    sequences, total = [], 0
    while total < n_tokens:
        text = " ".join(make_document(rng.choice(TOPICS), fake, rng)[0] for _ in range(4))
        ids = tokenizer(text)["input_ids"][:128]
        sequences.append(ids)
        total += len(ids)
    return teacher, sequences, "SmolLM2-135M-Instruct (Q4_1)"


# -- exact reference and replay -----------------------------------------------------------------------


def exact_reference(teacher, sequences: list[list[int]], k_max: int, batch_size: int = 8):
    """Per sequence: exact top-k_max log-probabilities (desc), ids, tail log-mass; plus statistics."""
    reference: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    top1, entropy = [], []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            out = teacher(input_ids=ids, attention_mask=mask)
            logits = getattr(out, "logits", out)
            for row, seq in enumerate(batch):
                logprobs = torch.log_softmax(logits[row, : len(seq)].double(), -1)
                top = logprobs.topk(k_max, -1)
                tail = torch.logsumexp(logprobs.scatter(-1, top.indices, -math.inf), -1)
                reference.append((top.values, top.indices, tail))
                top1.append(top.values[:, 0].exp())
                entropy.append(-(logprobs.exp() * logprobs).sum(-1))
    top1_all, entropy_all = torch.cat(top1), torch.cat(entropy)
    stats = {
        "top1_prob_mean": round(top1_all.mean().item(), 4),
        "top1_prob_p10_p50_p90": [
            round(q, 4)
            for q in torch.quantile(top1_all, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        ],
        "entropy_nats_mean": round(entropy_all.mean().item(), 4),
    }
    return reference, stats


def topk_of(reference_item, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices, tail_max = reference_item
    tail = torch.logsumexp(torch.cat([values[:, k:], tail_max[:, None]], -1), -1)
    return values[:, :k], indices[:, :k], tail


class ReplayTeacher:
    """Logits whose softmax has the exact top-k_max and spreads the exact tail mass evenly."""

    def __init__(self, sequences: list[list[int]], reference) -> None:
        self.by_sequence = {tuple(seq): item for seq, item in zip(sequences, reference, strict=True)}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for row in range(input_ids.shape[0]):
            length = int(attention_mask[row].sum())
            values, indices, tail = self.by_sequence[tuple(input_ids[row, :length].tolist())]
            k_max = values.shape[-1]
            fill = (tail - math.log(VOCAB - k_max)).float()[:, None].expand(length, VOCAB)
            logits[row, :length] = fill.scatter(-1, indices, values.float())
        return logits


# -- measurements ------------------------------------------------------------------------------------


def kl_figures(cache: LogitCache, sequences, reference, k: int) -> dict:
    kl_topk, kl_tail, ids_exact = [], [], True
    for i in range(len(sequences)):
        exact_values, exact_ids, exact_tail = topk_of(reference[i], k)
        decoded = cache[i]
        ids_exact &= torch.equal(decoded.indices.sort(-1).values, exact_ids.sort(-1).values)
        # align both by token id
        exact_sorted = exact_values.gather(-1, exact_ids.argsort(-1))
        decoded_sorted = decoded.values.double().gather(-1, decoded.indices.argsort(-1))
        p = torch.log_softmax(exact_sorted, -1)
        q = torch.log_softmax(decoded_sorted, -1)
        kl_topk.append((p.exp() * (p - q)).sum(-1))
        mass, decoded_mass = exact_tail.exp(), decoded.missing_mass().double()
        tail_term = torch.where(mass > 0, mass * (exact_tail - decoded_mass.log()), torch.zeros_like(mass))
        kl_tail.append((exact_sorted.exp() * (exact_sorted - decoded_sorted)).sum(-1) + tail_term)
    kl_topk_all, kl_tail_all = torch.cat(kl_topk), torch.cat(kl_tail)
    return {
        "ids_exact": bool(ids_exact),
        "kl_topk_mean": float(kl_topk_all.mean()),
        "kl_topk_p99": float(torch.quantile(kl_topk_all, 0.99)),
        "kl_uniform_tail_mean": float(kl_tail_all.mean()),
        "kl_uniform_tail_p99": float(torch.quantile(kl_tail_all, 0.99)),
    }


def stream_breakdown(directory: Path, manifest) -> dict[str, float]:
    sizes: dict[str, int] = {}
    for shard in manifest.shards:
        for name, array in safetensors.numpy.load((directory / shard.file).read_bytes()).items():
            sizes[name] = sizes.get(name, 0) + array.nbytes
    sizes["headers_and_padding"] = manifest.total_bytes - sum(sizes.values())
    return {name: round(size / manifest.n_tokens, 2) for name, size in sorted(sizes.items())}


def measure_k(k: int, sequences, reference, replay, root: Path, repeats: int) -> dict:
    directory = root / f"k{k}"
    dataset = token_dataset_fingerprint(sequences)
    started = time.perf_counter()
    manifest = build_cache(
        replay,
        sequences,
        directory,
        k=k,
        teacher_id="replay",
        tokenizer_fingerprint="bench",
        dataset_fingerprint=dataset,
        batch_size=8,
        progress=False,
    )
    build_s = time.perf_counter() - started

    parts = [topk_of(item, k) for item in reference]
    values, indices, tails = (torch.cat([p[j] for p in parts]) for j in range(3))
    codec = TopKCodec(CodecParams(), vocab_size=VOCAB, k=k)
    encode_s = []
    for _ in range(max(1, repeats // 3)):
        started = time.perf_counter()
        codec.encode(values, indices, tails)
        encode_s.append(time.perf_counter() - started)

    decode_s = []
    for _ in range(max(1, repeats // 3)):
        cold = LogitCache.open(directory, expect_tokenizer="bench", expect_dataset=dataset)
        started = time.perf_counter()
        cold.verify()
        decode_s.append(time.perf_counter() - started)

    cache = LogitCache.open(directory, expect_tokenizer="bench", expect_dataset=dataset, expect_k=k)
    cache.verify()  # warm: every shard decoded once
    rng = random.Random(k)
    batch_s, real_tokens = [], []
    for _ in range(repeats):
        chosen = rng.sample(range(len(cache)), 8)
        started = time.perf_counter()
        cache.batch(chosen, pad_to=128)
        batch_s.append(time.perf_counter() - started)
        real_tokens.append(sum(len(sequences[i]) for i in chosen))

    n_tokens = manifest.n_tokens
    result = {
        "k": k,
        "bytes_per_token": round(manifest.bytes_per_token, 2),
        "bytes_per_entry": round(manifest.bytes_per_token / k, 3),
        "stream_bytes_per_token": stream_breakdown(directory, manifest),
        **kl_figures(cache, sequences, reference, k),
        "encode_tokens_per_s": round(n_tokens / statistics.median(encode_s)),
        "shard_decode_tokens_per_s": round(n_tokens / statistics.median(decode_s)),
        "batch_ms_8x128": round(1000 * statistics.median(batch_s), 3),
        "batch_slots_per_s": round(8 * 128 / statistics.median(batch_s)),
        "batch_real_tokens_per_s": round(
            statistics.median(t / s for t, s in zip(real_tokens, batch_s, strict=True))
        ),
        "build_s_with_replay_teacher": round(build_s, 2),
        "ratio_vs_fp16_int32": round(6 * k / manifest.bytes_per_token, 2),
    }
    if k in DISTILLKIT_BYTES_PER_TOKEN:
        result["distillkit_bytes_per_token"] = DISTILLKIT_BYTES_PER_TOKEN[k]
        result["ratio_vs_distillkit"] = round(DISTILLKIT_BYTES_PER_TOKEN[k] / manifest.bytes_per_token, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--tokens", type=int, default=4096, help="cached positions (approximate)")
    parser.add_argument("--ks", default="16,50,64,128,256", help="comma-separated k values")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="600 tokens, k=16,64, print only")
    args = parser.parse_args()
    ks = [16, 64] if args.quick else sorted({int(k) for k in args.ks.split(",")})
    n_tokens = 600 if args.quick else args.tokens
    torch.manual_seed(args.seed)

    source = synthetic_source if args.source == "synthetic" else smollm2_source
    teacher, sequences, teacher_name = source(n_tokens, args.seed)
    started = time.perf_counter()
    reference, stats = exact_reference(teacher, sequences, max(ks))
    reference_s = time.perf_counter() - started
    for k in ks:  # the mass the top-k hold, for context
        stats[f"top{k}_mass_mean"] = round(
            float(torch.cat([topk_of(r, k)[0].exp().sum(-1) for r in reference]).mean()), 4
        )
    replay = ReplayTeacher(sequences, reference)

    with tempfile.TemporaryDirectory() as tmp:
        results = [measure_k(k, sequences, reference, replay, Path(tmp), args.repeats) for k in ks]
    by_k = {r["k"]: r for r in results}
    targets = {}
    if 64 in by_k:
        targets["k64_bytes_per_token_le_120"] = by_k[64]["bytes_per_token"] <= 120
        targets["k64_kl_topk_lt_1e-3"] = by_k[64]["kl_topk_mean"] < 1e-3
    for k in DISTILLKIT_BYTES_PER_TOKEN:
        if k in by_k:
            targets[f"beats_distillkit_at_k{k}"] = by_k[k]["ratio_vs_distillkit"] > 1
    targets["kl_topk_lt_1e-3_all_k"] = all(r["kl_topk_mean"] < 1e-3 for r in results)
    targets["ids_exact_all_k"] = all(r["ids_exact"] for r in results)

    report = {
        "benchmark": "cache",
        "source": args.source,
        "teacher": teacher_name,
        "vocab_size": VOCAB,
        "n_sequences": len(sequences),
        "n_tokens": sum(len(s) for s in sequences),
        "teacher_reference_pass_s": round(reference_s, 2),
        "distribution": stats,
        "codec": CodecParams().model_dump(),
        "results": results,
        "targets": targets,
        "machine": {
            "numpy": np.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
    }
    line = json.dumps(report)
    print(line)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "cache.json" if args.source == "synthetic" else f"cache_{args.source}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
