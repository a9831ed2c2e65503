"""Private client profiles for the matchmaker: a 16-dim summary in [0, 1], released with Laplace noise.

A client describes itself to the (honest-but-curious) matchmaking server with a `ClientProfile`;
`profile_vector` turns it into 16 numbers, each clipped to [0, 1]; `release_profile` adds Laplace noise
so the server never sees the exact statistics, and records the release in the client's `ProfileLedger`.

What the epsilon covers (read this before choosing it):

* Neighbouring inputs are *any two profile vectors* of this client: the guarantee hides the whole
  profile (all 16 dimensions at once, whatever data produced them), not one training example.
* Every dimension lies in [0, 1] after clipping, so replacing one profile by another changes the vector
  by at most 16 in L1 norm: the L1 sensitivity is `PROFILE_DIM = 16`, and the Laplace scale is
  `16 / epsilon` per dimension. `epsilon` is per release, for the whole vector.
* Releases compose sequentially: k releases of the same client's profile cost the sum of their
  epsilons, which `ProfileLedger.total_epsilon` reports. Re-using an already released (noisy) vector in
  later rounds is post-processing and costs nothing, and so does anything the server computes from it
  (clipping, pair contexts, the bandit's scores).
* Not covered: the rewards a client reports after an exchange (loss deltas, kilobytes), the fact that
  it takes part, and the knowledge it exchanges with its peer. Those need their own protection (the DP
  ledger of the training job, end-to-end encryption between peers).

With the default epsilon of 1 the noise scale (16) dwarfs the [0, 1] signal: a single release says
little about a client, which is the point of client-level privacy at epsilon 1. The benchmark
`benchmarks/matchmaking.py` measures what that costs the matchmaker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

TOPIC_SKETCH_BINS = 8
PROFILE_FIELDS: tuple[str, ...] = (
    "data_size",
    *(f"topic_{k}" for k in range(TOPIC_SKETCH_BINS)),
    "topic_entropy",
    "recent_loss",
    "loss_improvement",
    "model_size",
    "sequence_length",
    "bandwidth",
    "participation",
)
PROFILE_DIM = len(PROFILE_FIELDS)
# L1 diameter of [0, 1]^16: the most one profile can differ from another.
PROFILE_L1_SENSITIVITY = float(PROFILE_DIM)
DEFAULT_RELEASE_EPSILON = 1.0


@dataclass(frozen=True)
class ClientProfile:
    """Raw statistics a client summarizes about itself (never sent as such).

    `topic_histogram` holds counts or probabilities over the client's topics, labels or canary owners
    (any number of categories; it is normalized and folded into `TOPIC_SKETCH_BINS` bins).
    `previous_loss` is the client's loss one round earlier, or None in its first round.
    """

    n_examples: int
    topic_histogram: Sequence[float]
    recent_loss: float
    model_parameters: int
    mean_sequence_length: float = 0.0
    bandwidth_kilobytes: float = 0.0
    participation_rate: float = 1.0
    previous_loss: float | None = None


@dataclass(frozen=True)
class ProfileScales:
    """Shared normalizers that map raw statistics onto [0, 1]; every client must use the same ones.

    Sizes use a log scale (`log10(1 + x) / log10(1 + max)`), the rest a linear one (`x / max`).
    """

    max_examples: float = 1e7
    loss_scale: float = 12.0  # about ln(vocab) for a 50k-token vocabulary: a uniform model's loss
    max_parameters: float = 1e11
    max_sequence_length: float = 4096.0
    max_kilobytes: float = 1e6

    def __post_init__(self) -> None:
        for name in ("max_examples", "loss_scale", "max_parameters", "max_sequence_length", "max_kilobytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ProfileScales.{name} must be a positive finite number, got {value!r}")


def topic_sketch(histogram: Sequence[float], bins: int = TOPIC_SKETCH_BINS) -> np.ndarray:
    """Normalize a histogram over K categories and fold it into `bins` contiguous groups.

    Category k goes to bin `floor(k * bins / max(K, bins))`: with K <= bins each category keeps its own
    bin (the rest stay 0), with K > bins neighbouring categories share one. The result sums to 1.
    """
    hist = np.asarray(histogram, dtype=np.float64)
    if hist.ndim != 1 or hist.size == 0:
        raise ValueError(f"topic_histogram must be a non-empty 1-D sequence, got shape {hist.shape}")
    if not np.all(np.isfinite(hist)) or np.any(hist < 0) or hist.sum() <= 0:
        raise ValueError("topic_histogram must hold finite non-negative counts with a positive total")
    probs = hist / hist.sum()
    bin_of = (np.arange(hist.size) * bins) // max(hist.size, bins)
    return np.bincount(bin_of, weights=probs, minlength=bins)


def _normalized_entropy(histogram: Sequence[float]) -> float:
    hist = np.asarray(histogram, dtype=np.float64)
    if hist.size < 2:
        return 0.0
    probs = hist[hist > 0] / hist.sum()
    return float(-(probs * np.log(probs)).sum() / math.log(hist.size))


def _log_scale(value: float, maximum: float) -> float:
    return math.log10(1.0 + value) / math.log10(1.0 + maximum)


def profile_vector(profile: ClientProfile, scales: ProfileScales | None = None) -> np.ndarray:
    """The 16-dim profile in `PROFILE_FIELDS` order, every dimension clipped to [0, 1]."""
    scales = scales or ProfileScales()
    numbers = {
        "n_examples": profile.n_examples,
        "recent_loss": profile.recent_loss,
        "model_parameters": profile.model_parameters,
        "mean_sequence_length": profile.mean_sequence_length,
        "bandwidth_kilobytes": profile.bandwidth_kilobytes,
        "participation_rate": profile.participation_rate,
    }
    if profile.previous_loss is not None:
        numbers["previous_loss"] = profile.previous_loss
    for name, value in numbers.items():
        if not (isinstance(value, Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"ClientProfile.{name} must be a finite number >= 0, got {value!r}")
    improvement = 0.0
    if profile.previous_loss is not None:
        improvement = max(0.0, profile.previous_loss - profile.recent_loss) / scales.loss_scale
    vector = np.concatenate(
        [
            [_log_scale(profile.n_examples, scales.max_examples)],
            topic_sketch(profile.topic_histogram),
            [
                _normalized_entropy(profile.topic_histogram),
                profile.recent_loss / scales.loss_scale,
                improvement,
                _log_scale(profile.model_parameters, scales.max_parameters),
                profile.mean_sequence_length / scales.max_sequence_length,
                profile.bandwidth_kilobytes / scales.max_kilobytes,
                profile.participation_rate,
            ],
        ]
    )
    return np.clip(vector, 0.0, 1.0)


@dataclass(frozen=True)
class ProfileRelease:
    """One noisy release of a profile: what it cost and when."""

    epsilon: float
    round_index: int
    sensitivity: float = PROFILE_L1_SENSITIVITY
    mechanism: str = "laplace"


@dataclass
class ProfileLedger:
    """The client's own record of its profile releases (sequential composition: epsilons add up).

    Kept by the client, next to its training privacy ledger; `to_dict`/`from_dict` persist it as JSON.
    """

    releases: list[ProfileRelease] = field(default_factory=list)

    @property
    def total_epsilon(self) -> float:
        return float(math.fsum(release.epsilon for release in self.releases))

    def record(self, epsilon: float, round_index: int) -> ProfileRelease:
        _check_epsilon(epsilon)
        if not isinstance(round_index, int) or round_index < 0:
            raise ValueError(f"round_index must be an int >= 0, got {round_index!r}")
        release = ProfileRelease(epsilon=float(epsilon), round_index=round_index)
        self.releases.append(release)
        return release

    def to_dict(self) -> dict:
        return {
            "total_epsilon": self.total_epsilon,
            "releases": [
                {
                    "epsilon": r.epsilon,
                    "round_index": r.round_index,
                    "sensitivity": r.sensitivity,
                    "mechanism": r.mechanism,
                }
                for r in self.releases
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ProfileLedger:
        if not isinstance(data, dict) or not isinstance(data.get("releases"), list):
            raise ValueError(
                "a profile ledger must be a dict with a 'releases' list (see ProfileLedger.to_dict)"
            )
        ledger = cls()
        for item in data["releases"]:
            if not isinstance(item, dict) or set(item) != _RELEASE_KEYS:
                raise ValueError(f"malformed profile release record {item!r}")
            _check_epsilon(item["epsilon"])
            ledger.releases.append(
                ProfileRelease(
                    epsilon=float(item["epsilon"]),
                    round_index=int(item["round_index"]),
                    sensitivity=float(item["sensitivity"]),
                    mechanism=str(item["mechanism"]),
                )
            )
        return ledger


_RELEASE_KEYS = {"epsilon", "round_index", "sensitivity", "mechanism"}


def _check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, Real) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")


def laplace_scale(epsilon: float) -> float:
    """Per-dimension Laplace scale b = sensitivity / epsilon for one release of the whole profile."""
    _check_epsilon(epsilon)
    return PROFILE_L1_SENSITIVITY / epsilon


def release_profile(
    vector: Sequence[float] | np.ndarray,
    epsilon: float = DEFAULT_RELEASE_EPSILON,
    rng: np.random.Generator | None = None,
    *,
    ledger: ProfileLedger | None = None,
    round_index: int = 0,
) -> np.ndarray:
    """An epsilon-DP release of a 16-dim profile: clip to [0, 1], add Laplace(16 / epsilon) noise.

    The clip is part of the mechanism (it is what bounds the sensitivity), so out-of-range inputs are
    clipped, not rejected. The output is not clipped, so the noise stays unbiased; the server may clip
    it (post-processing). Pass the client's `ledger` to record the release; `rng` must be a seeded
    `numpy.random.Generator` (one per client, never shared with the server).
    """
    values = np.asarray(vector, dtype=np.float64)
    if values.shape != (PROFILE_DIM,):
        raise ValueError(
            f"a profile vector has shape ({PROFILE_DIM},), got {values.shape}; build it with profile_vector"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("the profile vector holds NaN or infinite values")
    if rng is None:
        raise ValueError(
            "release_profile needs rng=numpy.random.default_rng(seed): noise must come from a seeded source"
        )
    scale = laplace_scale(epsilon)
    noisy = np.clip(values, 0.0, 1.0) + rng.laplace(0.0, scale, size=PROFILE_DIM)
    if ledger is not None:
        ledger.record(epsilon, round_index)
    return noisy
