"""The default audit suite for "my causal LM and the records it was trained on".

`secure-kd audit --model DIR --data RECORDS [--secrets SECRETS]` without `--config` runs it:

- memorization: training-data extraction (samples from the start token, checked against the records
  and the PII found in them) and, with `--secrets`, the exposure of each secret and whether greedy
  decoding from its prefix gives it away;
- membership: the loss attack, once non-members are given (`data.nonmembers` of the entry: copy
  configs/audit-lm.yaml); skipped with that reason otherwise;
- logit_leak: the hidden size from the full-logit API;
- clone: a one-layer student trained through the API within 2,000 queries.

configs/audit-lm.yaml holds the same suite (a test keeps them equal) for a user who wants to change it.
The settings are sized for a CPU: at SmolLM2-135M scale each entry takes seconds to a couple of
minutes on 2 cores.
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULT_LM_SUITE: list[dict[str, Any]] = [
    {
        "attack": "memorization",
        "config": {
            "data": {"max_length": 128},
            "exposure": {"estimate_samples": 200, "batch_size": 256},
            "extraction": {"n_samples": 64, "prompts": "bos", "max_new_tokens": 48, "canary_samples": 8},
        },
    },
    {
        "attack": "membership",
        "config": {
            "attacks": ["loss"],
            "n_shadows": 0,
            "data": {"n_members": 500, "n_nonmembers": 500, "max_length": 128},
        },
    },
    {
        "attack": "logit_leak",
        "config": {"step": 32, "margin": 8, "prompt_length": 8, "max_prompts": 2048},
    },
    {
        "attack": "clone",
        "budget": 2000,
        "config": {
            "compare_random_init": False,
            "compare_text_only": False,
            "top_k": 20,
            "prompts": {"n_train": 64, "n_heldout": 32, "length": 24},
            "student": {"num_layers": 1, "num_heads": 1, "init": "recovered"},
            "train": {"steps": 30, "batch_size": 8, "lr": 1.0e-3},
        },
    },
]


def default_lm_suite() -> list[dict[str, Any]]:
    return copy.deepcopy(DEFAULT_LM_SUITE)
