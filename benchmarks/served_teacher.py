"""The served teacher against the in-process teacher on the same texts: cache-build tokens/s and the
KL between their top-k distributions.

Both teachers are SmolLM2-135M-Instruct with the same Q4_1 weights: in-process, the GGUF dequantized
to float32 and run by torch (secure_kd.assets); served, the GGUF itself run by llama.cpp behind
llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (secure_kd.served). One run, side by side:

  inprocess_tokens_per_s   build_cache with the torch teacher (batch 8), positions / wall seconds;
  served_tokens_per_s      build_cache with the ServedTeacher (one echo request per sequence, plus
                           one request per position the echo leaves out), positions / wall seconds;
  ratio_served_over_inprocess   the two above divided (> 1: the served teacher is faster);
  server_no_logprobs_tokens_per_s   the same server asked for no log-probabilities (`max_tokens: 1`,
                           one request per sequence, a fresh prefix each time; `logits_all` stays on,
                           so it still copies every position's 49,152 logits): the server without
                           the Python-side sort of all 49,152 log-probabilities per prompt position;
  topk_kl_mean / _median / _p90   per position KL(in-process || served) over the in-process top-k
                           plus a tail bucket (secure_kd.served.teacher.topk_kl), from the two caches;
  top1_agreement           share of positions whose top-1 ids agree;
  *_nameable               the same over the positions whose in-process top-k holds only ids the
                           server's text-keyed answers can name (secure_kd.served.pieces): what is
                           left is llama.cpp's Q4_1 arithmetic against torch's dequantized float32;
  unnameable_share         the share of positions whose in-process top-k holds an id it cannot name;
  manifest_check           the served cache manifest's teacher_check (probe KL to the reference).

Needs `make served` (the extra and both assets). Run: `python benchmarks/served_teacher.py`
(writes benchmarks/results/served_teacher.json), `--quick` for a smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import json
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

import httpx
import torch

from secure_kd.cache import LogitCache, build_cache
from secure_kd.fingerprint import token_dataset_fingerprint

RESULTS = Path(__file__).resolve().parent / "results"


def texts(tokenizer, n_sequences: int, length: int, seed: int) -> list[list[int]]:
    from faker import Faker

    from secure_kd.data.documents import TOPICS, make_document

    fake, rng = Faker(), random.Random(seed)
    Faker.seed(seed)
    sequences = []
    while len(sequences) < n_sequences:
        text = " ".join(make_document(rng.choice(TOPICS), fake, rng)[0] for _ in range(3))
        sequences.append(list(tokenizer(text, add_special_tokens=False)["input_ids"][:length]))
    return sequences


def timed_build(teacher, sequences, directory: Path, k: int, batch_size: int) -> tuple[float, object]:
    started = time.perf_counter()
    manifest = build_cache(
        teacher, sequences, directory, k=k, teacher_id="bench", tokenizer_fingerprint="bench",
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    return time.perf_counter() - started, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 short sequences; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.length = 3, 24

    from secure_kd.models import load_pretrained, load_tokenizer
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.local_server import LocalLlamaServer, llama_cpp_available, smollm2_gguf
    from secure_kd.served.teacher import ServedTeacher, topk_kl

    if not llama_cpp_available():
        sys.exit("llama-cpp-python's server is not installed: run `make served`")
    gguf = smollm2_gguf(fetch=False)
    if gguf is None:
        sys.exit("the SmolLM2 GGUF is absent: run `make served`")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2")
    sequences = texts(tokenizer, args.sequences, args.length, args.seed)
    n_tokens = sum(map(len, sequences))
    model = load_pretrained("smollm2").eval()
    with torch.inference_mode():  # warm-up outside the timing
        model(input_ids=torch.tensor([sequences[0]]))

    with tempfile.TemporaryDirectory() as tmp, LocalLlamaServer(gguf, n_threads=args.threads) as server:
        root = Path(tmp)
        cfg = server.served_config(reference="smollm2", max_topk_kl=10.0)
        teacher = ServedTeacher(ServedModelAPI(cfg, tokenizer, top_k=args.k))
        teacher.api.client.next_topk(sequences[0][:4], 4)  # warm-up (the server's first request)
        inprocess_s, _ = timed_build(model, sequences, root / "inprocess", args.k, batch_size=8)
        served_s, manifest = timed_build(teacher, sequences, root / "served", args.k, batch_size=8)
        eval_s = 0.0
        for index, ids in enumerate(sequences):  # no logprobs: llama.cpp's forward pass (+ HTTP)
            salted = [tokenizer.convert_tokens_to_ids("Ġ" + str(index))] + ids  # defeats prefix reuse
            body = {"model": cfg.model, "prompt": tokenizer.decode(salted), "max_tokens": 1, "temperature": 0}
            started = time.perf_counter()
            httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120).raise_for_status()
            eval_s += time.perf_counter() - started
        fingerprint = token_dataset_fingerprint(sequences)
        opened = [
            LogitCache.open(
                root / name, expect_tokenizer="bench", expect_dataset=fingerprint, expect_k=args.k
            )
            for name in ("inprocess", "served")
        ]
        unnameable = set(teacher.api.client.pieces.ambiguous_ids)
        kls, agree, nameable = [], [], []
        for index, ids in enumerate(sequences):
            ref, srv = (cache.batch([index]) for cache in opened)
            for p in range(len(ids)):
                one_ref, one_srv = ref[0, p : p + 1], srv[0, p : p + 1]
                kls.append(
                    topk_kl(one_ref.values, one_ref.indices, one_srv.values, one_srv.indices, len(tokenizer))
                )
                agree.append(int(ref.indices[0, p, 0] == srv.indices[0, p, 0]))
                nameable.append(not unnameable.intersection(ref.indices[0, p].tolist()))
        provenance = teacher.provenance()

    named_kls = sorted(kl for kl, ok in zip(kls, nameable, strict=True) if ok)
    named_agree = [a for a, ok in zip(agree, nameable, strict=True) if ok]
    kls.sort()
    result = {
        "benchmark": "served_teacher",
        "teacher": "SmolLM2-135M-Instruct (Q4_1): torch float32 (dequantized) vs llama.cpp "
        "(llama-cpp-python 0.3.36 server)",
        "sequences": len(sequences),
        "tokens": n_tokens,
        "k": args.k,
        "threads": args.threads,
        "inprocess_seconds": inprocess_s,
        "served_seconds": served_s,
        "inprocess_tokens_per_s": n_tokens / inprocess_s,
        "served_tokens_per_s": n_tokens / served_s,
        "ratio_served_over_inprocess": inprocess_s / served_s,
        "server_no_logprobs_tokens_per_s": n_tokens / eval_s,
        "topk_kl_mean": statistics.fmean(kls),
        "topk_kl_median": kls[len(kls) // 2],
        "topk_kl_p90": kls[int(0.9 * (len(kls) - 1))],
        "top1_agreement": statistics.fmean(agree),
        "unnameable_share": 1 - statistics.fmean(nameable),
        "topk_kl_mean_nameable": statistics.fmean(named_kls),
        "topk_kl_median_nameable": named_kls[len(named_kls) // 2],
        "top1_agreement_nameable": statistics.fmean(named_agree),
        "served_requests": provenance["requests"],
        "served_fill_requests": provenance["fill_requests"],
        "served_dropped_entries": provenance["dropped_entries"],
        "manifest_check": {
            key: manifest.teacher_check[key]
            for key in ("topk_kl_to_reference", "served_tokens_per_s", "reference_tokens_per_s")
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "served_teacher.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
