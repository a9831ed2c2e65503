"""Scoring throughput of the reference-based membership audit against a plain batched forward.

`attacks.membership.token_scores.score_sequences` runs one forward pass per batch and, per predicted
position, the log-probability of the actual token and the mean and variance of log p over the
vocabulary (Min-K%++'s moments). The baseline is `model(input_ids, attention_mask).logits` over the
very same length-sorted, padded batches, with nothing computed from the logits. Both run on the target
and on the reference model in one process, batch by batch back to back in alternating order, so that
noise on a shared machine hits both alike:

  plain_seconds / scored_seconds   minimum and median over repeats of the summed time over all batches
                                   of all models;
  ratio_min, ratio_median          scored / plain (target: <= 1.1);
  ratio_median_per_batch           the median over batches of scored / plain for the same batch;
  tokens_per_s_scored              predicted positions scored per second (all models, min time).

Models: `--model`/`--reference` (default smollm2 for both: SmolLM2-135M-Instruct, Q4_1 dequantized
to float32, `secure-kd assets fetch-smollm2`), or `--tiny`: a random Llama of hidden 64 with SmolLM2's
vocabulary size (49,152) as both, the case where the vocabulary statistics weigh most. Records: the
synthetic corpus, first `--length` tokens. Run: `python benchmarks/mia_scoring.py` (writes
benchmarks/results/mia_scoring.json); `--device cuda` on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _measure
import torch

from attacks.membership.token_scores import batch_order, pad_batch, score_sequences


@torch.no_grad()
def plain_forward(model, batch, *, pad_id: int, device) -> None:
    ids, mask = pad_batch(batch, pad_id)
    model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # noqa: B018
    if device.type == "cuda":
        torch.cuda.synchronize()


def scored(model, batch, *, pad_id: int, device) -> None:
    score_sequences(model, batch, pad_id=pad_id, device=device, batch_size=len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def _models(args, device):
    from secure_kd.model_files import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer("smollm2" if args.tiny else args.model)
    if args.tiny:
        from secure_kd.config import TinyModelConfig
        from secure_kd.models import build_tiny

        cfg = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
        models = [build_tiny(cfg, len(tokenizer), seed=s).to(device) for s in (0, 1)]
        names = ["tiny-llama-h64-v49152 (seed 0)", "tiny-llama-h64-v49152 (seed 1)"]
    else:
        dtype = args.dtype
        models = [load_pretrained(name, dtype=dtype).to(device) for name in (args.model, args.reference)]
        names = [args.model, args.reference]
    return tokenizer, [m.eval() for m in models], names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--reference", default="smollm2")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default benchmarks/results/mia_scoring[_tiny].json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from secure_kd.data import generate_corpus, tokenize_records

    tokenizer, models, names = _models(args, device)
    texts = generate_corpus(args.records, seed=0, n_canaries=0).texts()
    records = [{"text": t} for t in texts]
    examples = tokenize_records(records, tokenizer, max_length=args.length, schema="text")
    sequences = [list(e.input_ids) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"pad_id": int(pad), "device": device}

    batches = [[sequences[i] for i in b] for b in batch_order([len(s) for s in sequences], args.batch_size)]
    for model in models:  # warm-up, untimed
        plain_forward(model, batches[0], **kwargs)
        scored(model, batches[0], **kwargs)
    # Per batch, plain and scored back to back, in alternating order: noise on a shared machine hits both.
    plain_times, scored_times, batch_ratios = [], [], []
    for _ in range(args.repeats):
        plain_total = scored_total = 0.0
        for model in models:
            for j, batch in enumerate(batches):
                if j % 2 == 0:
                    p, q = timed(plain_forward, model, batch, **kwargs), timed(scored, model, batch, **kwargs)
                else:
                    q, p = timed(scored, model, batch, **kwargs), timed(plain_forward, model, batch, **kwargs)
                plain_total, scored_total = plain_total + p, scored_total + q
                batch_ratios.append(q / p)
        plain_times.append(plain_total)
        scored_times.append(scored_total)
    positions = sum(len(s) - 1 for s in sequences) * len(models)
    results = {
        "benchmark": "mia_scoring",
        "models": names,
        "records": len(sequences),
        "max_length": args.length,
        "batch_size": args.batch_size,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "plain_seconds_min": round(min(plain_times), 4),
        "plain_seconds_median": round(statistics.median(plain_times), 4),
        "scored_seconds_min": round(min(scored_times), 4),
        "scored_seconds_median": round(statistics.median(scored_times), 4),
        "ratio_min": _measure.ratio(min(scored_times), min(plain_times)),
        "ratio_median": _measure.ratio(statistics.median(scored_times), statistics.median(plain_times)),
        "ratio_median_per_batch": round(statistics.median(batch_ratios), 4),
        "tokens_per_s_scored": round(positions / min(scored_times), 1),
        "repeats": args.repeats,
        "machine": platform.machine(),
        **_measure.cuda_info(),
    }
    name = "mia_scoring_tiny" if args.tiny else "mia_scoring"
    if device.type == "cuda":
        name += "_cuda"
    _measure.write_results(name, results, args.out)


if __name__ == "__main__":
    main()
