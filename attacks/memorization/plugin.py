"""The `memorization` plugin's registration: where the audited model, records and secrets go, and the
audit metric it reports (the largest canary exposure, bootstrapped over the canaries)."""

from __future__ import annotations

from typing import Any

import numpy as np

from attacks import ATTACKS
from attacks.memorization.audit import MemorizationConfig, MemorizationResult, run
from secure_kd.plugins import Input, Metric, Plugin, Requirement
from secure_kd.readings import Reading, bootstrap_reading

_RECORDS = (
    "memorization of a given model needs the records the model was trained on: give --data FILE (a "
    ".jsonl/.csv/.parquet/.txt of records with a `text` field), and --secrets FILE for canary exposure"
)


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The largest canary exposure (bits; the Secret Sharer estimate where the space was not
    enumerated); interval: percentile bootstrap of that maximum over the canaries."""
    values = []
    for canary in result.get("exposure") or []:
        if canary.get("exposure") is not None:
            values.append(float(canary["exposure"]))
        elif canary.get("estimate"):
            values.append(float(canary["estimate"]["value"]))
    if not values:
        return {}
    array = np.asarray(values)
    if len(array) == 1:
        return {"max_exposure_bits": Reading(value=float(array[0]))}
    return {
        "max_exposure_bits": bootstrap_reading(
            array, np.max, float(array.max()), samples, confidence, f"{len(array)} canaries"
        )
    }


PLUGIN = ATTACKS.register(
    "memorization",
    Plugin(
        name="memorization",
        Config=MemorizationConfig,
        Result=MemorizationResult,
        run=run,
        summary="canary exposure (exact or Secret Sharer estimate) and training-data extraction",
        target="model.source",
        kinds=("causal_lm",),
        own_target="a tiny Llama it trains on a synthetic corpus with canaries",
        inputs={"data": Input("data.source"), "secrets": Input("data.secrets")},
        with_model={"tokenizer": None, "extraction.reference": None},
        requires=(Requirement("data.source", ("synthetic",), _RECORDS),),
        metrics=(
            Metric(
                "max_exposure_bits",
                risk="memorization",
                medium=4.0,
                high=8.0,
                unit="bits",
                why="Secret Sharer exposure of the most exposed canary; 8 bits = it ranks in the top 1/256 "
                "of its secret space, 4 bits = top 1/16",
            ),
        ),  # fmt: skip
        measure=readings,
    ),
)
