"""Encrypted aggregation (federation/crypto/he.py) vs plaintext aggregation vs a raw TenSEAL loop.

Setup: 10 clients, each with a float32 update of 1M parameters drawn from N(0, 1) and a weight
(its number of examples) drawn from [100, 1000]. Every variant computes the weighted mean
sum_i(w_i x_i) / sum_i(w_i) that FedAvg needs, so the server never sees a client's weight.

* `plaintext`: numpy, float64 accumulation of w_i * x_i and of w_i (the error reference).
* `project`: `he.encrypt` per client, `he.aggregate` on the public context, `he.decrypt_mean`;
  the default keyring (N=8192, coeff (60, 20), scale 2**35, symmetric encryption).
* `raw_tenseal`: the most direct TenSEAL code doing the same on the same parameters: per client
  `ts.ckks_vector(ctx, chunk).serialize()` for each 4096-value chunk of [w*x, w], on the server
  `ts.ckks_vector_from` + `+=` per chunk under the public context, then `serialize`, and on the
  client `ckks_vector_from` + `decrypt`. No framing, no validation. `raw_in_memory` also skips
  the (de)serialization: the floor of any CKKS aggregation with these parameters.
* Parameter variants, timed once through the project: `tutorial` (TenSEAL's tutorial moduli
  (60, 40, 40, 60), scale 2**40, as the project encrypts them: symmetric), `tutorial_public_key`
  (bytes only: the same with TenSEAL's default public-key encryption, what a plain TenSEAL user
  sends), and `compact` (`Keyring.for_payload(1M, max_abs_update=1e4, abs_error=1e-3,
  max_clients=10)`: the fewest modulus bits for a weighted-sum error of 1e-3, i.e. ~2e-7 on
  the mean at these weights).

Reported: wall time of each phase (encrypt all clients, aggregate, decrypt), the project/raw
time ratio (target <= 1.1, measured side by side, repeats interleaved, minimum and median),
bytes on the wire per float32 parameter for one client's upload (target <= 50), and the max
absolute error of the mean vs the float64 plaintext mean, next to the error of a float32
plaintext aggregation for scale. The machine is shared: the load average is recorded.

Run: `python benchmarks/he_agg.py` (several minutes on 2 cores; writes
benchmarks/results/he_agg.json) or `--quick` (3 clients x 50k parameters, writes he_agg_quick.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import tenseal as ts
from _measure import ratio, write_results

from federation import he


@dataclass(frozen=True)
class Setting:
    clients: int
    parameters: int
    repeats: int
    seed: int = 0


FULL = Setting(clients=10, parameters=1_000_000, repeats=2)
QUICK = Setting(clients=3, parameters=50_000, repeats=2)


def make_updates(setting: Setting) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(setting.seed)
    updates = [rng.standard_normal(setting.parameters).astype(np.float32) for _ in range(setting.clients)]
    weights = [float(w) for w in rng.integers(100, 1001, setting.clients)]
    return updates, weights


def plaintext_mean(updates: list[np.ndarray], weights: list[float], dtype=np.float64) -> np.ndarray:
    total = np.zeros(updates[0].shape, dtype=dtype)
    for update, weight in zip(updates, weights, strict=True):
        total += dtype(weight) * update.astype(dtype)
    return total / dtype(sum(weights))


def timed(function: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def run_project(keyring: he.Keyring, updates, weights) -> dict:
    public = keyring.public_context()
    blobs, encrypt_s = timed(
        lambda: [he.encrypt(keyring, u, w) for u, w in zip(updates, weights, strict=True)]
    )
    total, aggregate_s = timed(lambda: he.aggregate(public, blobs))
    mean, decrypt_s = timed(lambda: he.decrypt_mean(keyring, total, updates[0].size))
    return {
        "mean": mean,
        "encrypt_s": encrypt_s,
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "total_s": encrypt_s + aggregate_s + decrypt_s,
        "upload_bytes_per_param": len(blobs[0]) / updates[0].size,
        "aggregate_bytes_per_param": len(total) / updates[0].size,
        "public_context_bytes": len(public),
    }


def raw_context(
    coeff_mod_bit_sizes: list[int], scale: float, encryption=ts.ENCRYPTION_TYPE.SYMMETRIC
) -> ts.Context:
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        8192,
        coeff_mod_bit_sizes=coeff_mod_bit_sizes,
        encryption_type=encryption,
        n_threads=1,
    )
    context.global_scale = scale
    return context


def raw_encrypt_client(context: ts.Context, update: np.ndarray, weight: float) -> list[bytes]:
    flat = np.append(update.astype(np.float64) * weight, weight)
    return [
        ts.ckks_vector(context, flat[i : i + 4096].tolist()).serialize() for i in range(0, flat.size, 4096)
    ]


def run_raw(context: ts.Context, updates, weights) -> dict:
    public = context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                               save_relin_keys=False)  # fmt: skip
    server = ts.context_from(public)

    def aggregate(messages: list[list[bytes]]) -> list[bytes]:
        sums = []
        for chunks in zip(*messages, strict=True):
            total = ts.ckks_vector_from(server, chunks[0])
            for chunk in chunks[1:]:
                total += ts.ckks_vector_from(server, chunk)
            sums.append(total.serialize())
        return sums

    def decrypt(sums: list[bytes]) -> np.ndarray:
        flat = np.concatenate([ts.ckks_vector_from(context, chunk).decrypt() for chunk in sums])
        n = updates[0].size
        return flat[:n] / flat[n]

    messages, encrypt_s = timed(
        lambda: [raw_encrypt_client(context, u, w) for u, w in zip(updates, weights, strict=True)]
    )
    sums, aggregate_s = timed(lambda: aggregate(messages))
    mean, decrypt_s = timed(lambda: decrypt(sums))
    upload = sum(len(chunk) for chunk in messages[0])
    return {
        "mean": mean,
        "encrypt_s": encrypt_s,
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "total_s": encrypt_s + aggregate_s + decrypt_s,
        "upload_bytes_per_param": upload / updates[0].size,
    }


def run_raw_in_memory(context: ts.Context, updates, weights) -> dict:
    def run() -> np.ndarray:
        encrypted = []
        for update, weight in zip(updates, weights, strict=True):
            flat = np.append(update.astype(np.float64) * weight, weight)
            encrypted.append(
                [ts.ckks_vector(context, flat[i : i + 4096].tolist()) for i in range(0, flat.size, 4096)]
            )
        sums = encrypted[0]
        for other in encrypted[1:]:
            for total, chunk in zip(sums, other, strict=True):
                total += chunk
        flat = np.concatenate([chunk.decrypt() for chunk in sums])
        return flat[: updates[0].size] / flat[updates[0].size]

    mean, total_s = timed(run)
    return {"mean": mean, "total_s": total_s}


def summarize(runs: list[dict], reference: np.ndarray) -> dict:
    out = {key: value for key, value in runs[0].items() if key != "mean" and not key.endswith("_s")}
    for key in (k for k in runs[0] if k.endswith("_s")):
        values = [run[key] for run in runs]
        out[key] = {"min": round(min(values), 4), "median": round(statistics.median(values), 4)}
    out["max_abs_error_of_mean"] = float(max(np.abs(run["mean"] - reference).max() for run in runs))
    return out


def run(setting: Setting) -> dict:
    updates, weights = make_updates(setting)
    (reference, plain_s) = timed(lambda: plaintext_mean(updates, weights))
    float32_error = float(np.abs(plaintext_mean(updates, weights, np.float32) - reference).max())

    keyring = he.Keyring.generate()
    raw = raw_context(list(keyring.parameters.coeff_mod_bit_sizes), keyring.parameters.global_scale)
    project_runs, raw_runs = [], []
    for repeat in range(setting.repeats):
        order = (
            (project_runs, lambda: run_project(keyring, updates, weights)),
            (raw_runs, lambda: run_raw(raw, updates, weights)),
        )
        for runs, function in order if repeat % 2 == 0 else reversed(order):
            runs.append(function())
            print(f"repeat {repeat}: {'project' if runs is project_runs else 'raw'} "
                  f"{runs[-1]['total_s']:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    in_memory = run_raw_in_memory(raw, updates, weights)

    variants = {
        "plaintext": {"total_s": round(plain_s, 4), "float32_max_abs_error_of_mean": float32_error},
        "project": summarize(project_runs, reference),
        "raw_tenseal": summarize(raw_runs, reference),
        "raw_in_memory": summarize([in_memory], reference),
    }
    tutorial = he.Keyring.generate(coeff_mod_bit_sizes=(60, 40, 40, 60), global_scale=2.0**40)
    compact = he.Keyring.for_payload(setting.parameters, max_abs_update=1e4, abs_error=1e-3, max_clients=10)
    for name, variant in (("tutorial", tutorial), ("compact", compact)):
        variants[name] = summarize([run_project(variant, updates, weights)], reference)
        variants[name]["parameters"] = variant.parameters.model_dump()
        print(f"{name}: {variants[name]['total_s']['min']:.2f} s", file=sys.stderr, flush=True)
    public_key_context = raw_context([60, 40, 40, 60], 2.0**40, ts.ENCRYPTION_TYPE.ASYMMETRIC)
    public_key_upload = sum(len(c) for c in raw_encrypt_client(public_key_context, updates[0], weights[0]))
    variants["tutorial_public_key"] = {"upload_bytes_per_param": public_key_upload / setting.parameters}

    project, raw_variant = variants["project"], variants["raw_tenseal"]
    ratios = {
        "project_over_raw_min": ratio(project["total_s"]["min"], raw_variant["total_s"]["min"]),
        "project_over_raw_median": ratio(project["total_s"]["median"], raw_variant["total_s"]["median"]),
        "project_over_raw_in_memory": ratio(
            project["total_s"]["min"], variants["raw_in_memory"]["total_s"]["min"]
        ),
        "project_over_plaintext": ratio(project["total_s"]["min"], plain_s),
    }
    bytes_per_param = {name: variants[name]["upload_bytes_per_param"] for name in
                       ("project", "compact", "tutorial", "tutorial_public_key")}  # fmt: skip
    return {
        "schema_version": 1,
        "benchmark": "he_agg",
        "config": {**asdict(setting), "default_parameters": keyring.parameters.model_dump()},
        "variants": variants,
        "ratios": ratios,
        "bytes_per_param": bytes_per_param,
        "targets": {
            "project_within_1.1x_of_raw": ratios["project_over_raw_min"] <= 1.1,
            "default_at_most_50_bytes_per_param": bytes_per_param["project"] <= 50,
            "compact_at_most_50_bytes_per_param": bytes_per_param["compact"] <= 50,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "tenseal": ts.__version__,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 clients x 50k parameters: a smoke run")
    parser.add_argument(
        "--repeats", type=int, help="interleaved timed repeats of project and raw (default 2)"
    )
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        setting = replace(setting, repeats=args.repeats)
    write_results("he_agg_quick" if args.quick else "he_agg", run(setting))


if __name__ == "__main__":
    main()
