"""fed_distill across two tokenizers vs the same organizations forced onto one tokenizer.

Base job: configs/federated-cross-tokenizer.yaml (4 organizations, CKKS; organizations 0 and 1 use the
job's tokenizer, 2 and 3 their own, e.g. tiny:320 and tiny:512). Arms, per seed, everything else equal:

- `two tokenizers`: the job as shipped, soft labels on the byte-aligned layout (federation/byte_layout.py);
- `one tokenizer, bytes`: the tokenizers of `organization_models` dropped (its students kept), every
  organization on the job's tokenizer, soft labels still on the byte-aligned layout (`transfer.layout:
  bytes`): what the second tokenizer changes, the layout equal;
- `one tokenizer, tokens`: the same organizations on the token layout (`transfer.layout: tokens`: the
  `index_k` most frequent public tokens + a tail, distilled by the engine's Distiller), today's
  one-tokenizer fed_distill;
- `local only`: the two-tokenizer organizations, the same rounds of local training, no exchange (what
  the federation adds on top of each organization's own records).

Each arm is a `secure-kd federate` job through Flower's simulation engine (`run_federation`); the local
arm calls the organizations' own training (`federation.client.training.train_locally`). Metric: held-out
bits per byte of each organization's final student on its own held-out records, scored on the bytes both
tokenizers cover (`tokenize_pairs` of the organization's tokenizer with the other one, the same
`data.max_length` on both sides), so an organization's number is comparable between the arms whichever
tokenizer it has.

Run: `python benchmarks/experiments/fed_cross_tokenizer.py [--config PATH] [--seeds 0 1] [--rounds N]
[--set key=value ...] [--smollm2-layers 0 29] [--results PATH]`; writes the JSON (default
benchmarks/results/fed_cross_tokenizer.json) and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from federation.client.training import train_locally
from federation.client.workspace import OrgWorkspace
from federation.config import FederatedJob, load_federated_job
from federation.cross_tokenizer_config import tokenizer_of, tokenizer_specs
from federation.job_data import organization_data
from federation.run import run_federation
from secure_kd.data.paired import tokenize_pairs
from secure_kd.evaluate import bits_per_byte, paired_batches
from secure_kd.paths import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
TWO, ONE_BYTES, ONE_TOKENS, LOCAL = (
    "two tokenizers",
    "one tokenizer, bytes",
    "one tokenizer, tokens",
    "local only",
)
ARMS = (TWO, ONE_BYTES, ONE_TOKENS, LOCAL)


def _jobs(config: Path, overrides: list[str], seed: int, out: Path) -> dict[str, FederatedJob]:
    two = load_federated_job(config, [*overrides, f"seed={seed}", f"out={out / 'two' / f'seed{seed}'}"])
    if len(tokenizer_specs(two)) != 2:
        raise SystemExit(f"{config}: the experiment needs exactly two tokenizers, got {tokenizer_specs(two)}")
    one = two.model_dump()
    one["organization_models"] = {
        i: {"student": m.student.model_dump()} for i, m in two.organization_models.items() if m.student
    }

    def variant(name: str, layout: str) -> FederatedJob:
        data = {**one, "out": str(out / name / f"seed{seed}")}
        return FederatedJob.model_validate({**data, "transfer": {**one["transfer"], "layout": layout}})

    local = two.model_copy(update={"out": str(out / "local" / f"seed{seed}")})
    return {
        TWO: two,
        ONE_BYTES: variant("one-bytes", "bytes"),
        ONE_TOKENS: variant("one-tokens", "tokens"),
        LOCAL: local,
    }


def heldout_bpb(
    job: FederatedJob, reference: FederatedJob, index: int, model, *, public: bool = False
) -> float:
    """Bits per byte on organization `index`'s held-out records (`public`: on the public test set), on the
    bytes its tokenizer and the other tokenizer of `reference` (the two-tokenizer job) both cover."""
    own = organization_data(job, index).tokenizer
    mine = tokenizer_of(job, index)
    other_spec = next(s for s in tokenizer_specs(reference) if s != mine)
    other = organization_data(
        reference,
        next(i for i in range(reference.n_organizations) if tokenizer_of(reference, i) == other_spec),
    ).tokenizer
    ws = OrgWorkspace(job, index, Path(job.out) / "orgs" / job.org_name(index))
    pairs = tokenize_pairs(
        organization_data(job, index).split.test if public else ws.own_data.heldout,
        own,
        other,
        max_length=job.data.max_length,
        teacher_max_length=job.data.max_length,
        text_field=job.data.text_field,
    ).pairs
    pad = own.pad_token_id if own.pad_token_id is not None else own.eos_token_id
    batches = paired_batches(pairs, "student", pad_id=pad, batch_size=16)
    return float(bits_per_byte(model, batches, eos_id=own.eos_token_id)["bits_per_byte"])


def _local_only(job: FederatedJob) -> None:
    for i in range(job.n_organizations):
        ws = OrgWorkspace(job, i, Path(job.out) / "orgs" / job.org_name(i))
        ws.start_run()
        model = ws.student()
        for r in range(1, job.rounds + 1):
            train_locally(ws, model, r)
        ws.save_student(model)


def run_seed(config: Path, overrides: list[str], seed: int, out: Path) -> list[dict]:
    jobs = _jobs(config, overrides, seed, out)
    rows = []
    for arm, job in jobs.items():
        started = time.perf_counter()
        if arm == LOCAL:
            _local_only(job)
            metrics = {}
        else:
            result = run_federation(job, progress=False)
            if not result.completed:
                raise RuntimeError(f"{arm} seed {seed} failed: {result.error}")
            metrics = {c.org: c.metrics for c in result.final.clients}
        seconds = time.perf_counter() - started
        for i in range(job.n_organizations):
            ws = OrgWorkspace(job, i, Path(job.out) / "orgs" / job.org_name(i))
            model = ws.student().eval()
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "org": job.org_name(i),
                    "tokenizer": tokenizer_of(job, i),
                    "heldout_bits_per_byte": heldout_bpb(job, jobs[TWO], i, model),
                    "test_bits_per_byte": heldout_bpb(job, jobs[TWO], i, model, public=True),
                    "run_metric_bits_per_byte": metrics.get(job.org_name(i), {}).get("heldout-bits-per-byte"),
                    "digest_loss": metrics.get(job.org_name(i), {}).get("digest-loss"),
                    "arm_seconds": seconds,
                }
            )
        print(
            json.dumps({"arm": arm, "seed": seed, "seconds": round(seconds, 1)}), file=sys.stderr, flush=True
        )
    return rows


def markdown(rows: list[dict], seeds: list[int], metric: str = "heldout_bits_per_byte") -> str:
    orgs = sorted({r["org"] for r in rows})
    head = "| organization (tokenizer in the two-tokenizer arm) | " + " | ".join(ARMS) + " |"
    lines = [head, "|---|" + "---|" * len(ARMS)]
    for org in orgs:
        tok = next(r["tokenizer"] for r in rows if r["org"] == org and r["arm"] == TWO)
        cells = []
        for arm in ARMS:
            values = [r[metric] for r in rows if r["org"] == org and r["arm"] == arm]
            cells.append(" / ".join(f"{v:.3f}" for v in values))
        lines.append(f"| {org} ({tok}) | " + " | ".join(cells) + " |")
    means = []
    for arm in ARMS:
        per_seed = [
            statistics.mean(r[metric] for r in rows if r["arm"] == arm and r["seed"] == s) for s in seeds
        ]
        means.append(" / ".join(f"{v:.3f}" for v in per_seed))
    lines.append("| mean over organizations | " + " | ".join(means) + " |")
    return "\n".join(lines)


def smollm2_overrides(layers: list[int], out: Path, other: str) -> list[str]:
    """The SmolLM2 variant: organizations 0 and 1 on the SmolLM2 tokenizer with a student made of the
    asset's `layers` (embeddings and output layer copied and frozen, saved once under `out`), 2 and 3 on
    tokenizer `other` with the job's tiny student; the job's tokenizer is SmolLM2's, the one the
    one-tokenizer arm forces on every organization."""
    from secure_kd.config import ModelConfig
    from secure_kd.models import drop_layers, load_teacher

    target = out / f"smollm2-layers-{'-'.join(map(str, layers))}"
    if not (target / "config.json").is_file():
        teacher = load_teacher(ModelConfig(source="smollm2"), vocab_size=49_152, seed=0)
        drop_layers(teacher, layers).save_pretrained(target, safe_serialization=True)
    student = f"{{source: {target}, freeze_embeddings: true}}"
    return [
        "tokenizer=smollm2",
        f"organization_models={{0: {{student: {student}}}, 1: {{student: {student}}}, "
        f"2: {{tokenizer: '{other}'}}, 3: {{tokenizer: '{other}'}}}}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "federated-cross-tokenizer.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as federate")
    parser.add_argument(
        "--smollm2-layers",
        type=int,
        nargs="+",
        help="the SmolLM2 variant: organizations 0, 1 get SmolLM2's tokenizer and a student of these layers",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "fed_cross_tokenizer"))
    parser.add_argument(
        "--results", default=str(ROOT / "benchmarks" / "results" / "fed_cross_tokenizer.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = ([f"rounds={args.rounds}"] if args.rounds else []) + list(args.overrides)
    if args.smollm2_layers:
        overrides = smollm2_overrides(args.smollm2_layers, Path(args.out), "tiny:512") + overrides
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows += run_seed(Path(args.config), overrides, seed, Path(args.out))
    table = markdown(rows, args.seeds)
    test_table = markdown(rows, args.seeds, "test_bits_per_byte")
    report = {
        "experiment": "fed_distill across two tokenizers vs one tokenizer vs local only",
        "config": args.config,
        "overrides": overrides,
        "seeds": args.seeds,
        "metric": "bits per byte on the bytes both tokenizers cover (lower is better): heldout_ on the "
        "organization's own held-out records, test_ on the public test set",
        "rows": rows,
        "table_markdown": table,
        "test_table_markdown": test_table,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(Path(args.results), report)
    print(table)
    print()
    print(test_table)


if __name__ == "__main__":
    main()
