"""LinUCB: a linear contextual bandit with upper-confidence-bound exploration (Li et al., 2010).

State: `A = I + sum x x'` (d x d), `b = sum r x`; estimate `theta = A^-1 b`; the score of a context x is

    theta . x + alpha_t * sqrt(x' A^-1 x)

and `select` returns the arm with the highest score (ties go to the lowest index).

`schedule="constant"` (the default) keeps `alpha_t = alpha`; with a suitable constant (or slowly
growing) alpha LinUCB has the usual O(d sqrt(T) log T) regret bound. `schedule="decay"` uses
KNEXA-FL's `alpha_t = beta0 / sqrt(t)`: exploration vanishes quickly, which can help in practice but
removes that guarantee (the confidence width no longer covers theta with high probability, so the
bandit can lock onto a wrong arm forever).

`inverse="sherman_morrison"` maintains A^-1 with rank-one updates (O(d^2) per update);
`inverse="solve"` keeps only A and solves a linear system at each score (O(d^3), the reference).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Literal

import numpy as np

Schedule = Literal["constant", "decay"]
Inverse = Literal["sherman_morrison", "solve"]
STATE_FORMAT = "secure_kd.federation.linucb"
STATE_VERSION = 1


def _finite_positive(name: str, value: float) -> float:
    if not (isinstance(value, Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class LinUCB:
    """Linear UCB over `dim`-dimensional contexts; see the module docstring for the formulas."""

    def __init__(
        self,
        dim: int,
        alpha: float = 1.0,
        *,
        schedule: Schedule = "constant",
        beta0: float = 1.0,
        inverse: Inverse = "sherman_morrison",
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if schedule not in ("constant", "decay"):
            raise ValueError(f"schedule must be 'constant' or 'decay', got {schedule!r}")
        if inverse not in ("sherman_morrison", "solve"):
            raise ValueError(f"inverse must be 'sherman_morrison' or 'solve', got {inverse!r}")
        self.dim = dim
        self.alpha = _finite_positive("alpha", alpha)
        self.schedule: Schedule = schedule
        self.beta0 = _finite_positive("beta0", beta0)
        self.inverse: Inverse = inverse
        self.n_updates = 0
        self._A = np.eye(dim)
        self._b = np.zeros(dim)
        self._A_inv = np.eye(dim)

    # ----------------------------------------------------------------------------------- estimates
    @property
    def A(self) -> np.ndarray:
        return self._A.copy()

    @property
    def b(self) -> np.ndarray:
        return self._b.copy()

    @property
    def A_inv(self) -> np.ndarray:
        if self.inverse == "solve":
            return np.linalg.inv(self._A)
        return self._A_inv.copy()

    @property
    def theta(self) -> np.ndarray:
        if self.inverse == "solve":
            return np.linalg.solve(self._A, self._b)
        return self._A_inv @ self._b

    def exploration(self, t: int | None = None) -> float:
        """alpha_t for decision round t (1-based; default: the number of updates so far + 1)."""
        if self.schedule == "constant":
            return self.alpha
        if t is None:
            t = self.n_updates + 1
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise ValueError(f"round t must be an int >= 1, got {t!r}")
        return self.beta0 / math.sqrt(t)

    # ----------------------------------------------------------------------------------- decisions
    def _check_contexts(self, contexts: Any) -> np.ndarray:
        x = np.asarray(contexts, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] < 1:
            raise ValueError(f"contexts must have shape [n_arms >= 1, {self.dim}], got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("contexts hold NaN or infinite values")
        return x

    def confidence_widths(self, contexts: Any) -> np.ndarray:
        """sqrt(x' A^-1 x) for each row x of `contexts`."""
        x = self._check_contexts(contexts)
        if self.inverse == "solve":
            quad = np.einsum("ij,ji->i", x, np.linalg.solve(self._A, x.T))
        else:
            quad = np.einsum("ij,jk,ik->i", x, self._A_inv, x)
        # A^-1 is positive definite; a tiny negative value can only be rounding.
        return np.sqrt(np.maximum(quad, 0.0))

    def scores(self, contexts: Any, t: int | None = None) -> np.ndarray:
        """UCB score of each row of `contexts` ([n_arms, dim]) at decision round t."""
        x = self._check_contexts(contexts)
        return x @ self.theta + self.exploration(t) * self.confidence_widths(x)

    def select(self, contexts: Any, t: int | None = None) -> int:
        """Index of the highest-scoring arm; ties go to the lowest index."""
        return int(np.argmax(self.scores(contexts, t)))

    # ------------------------------------------------------------------------------------- learning
    def update(self, context: Any, reward: float) -> None:
        """Observe `reward` for `context`: A += x x', b += r x."""
        x = np.asarray(context, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"context must have shape ({self.dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("context holds NaN or infinite values")
        if not (isinstance(reward, Real) and math.isfinite(reward)):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
        self._A += np.outer(x, x)
        self._b += float(reward) * x
        if self.inverse == "sherman_morrison":
            a_inv_x = self._A_inv @ x
            self._A_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + x @ a_inv_x)
            # Keep the inverse exactly symmetric so rounding does not accumulate in one triangle.
            self._A_inv = 0.5 * (self._A_inv + self._A_inv.T)
        self.n_updates += 1

    # -------------------------------------------------------------------------------- serialization
    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "alpha": self.alpha,
            "schedule": self.schedule,
            "beta0": self.beta0,
            "inverse": self.inverse,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (plain lists and floats; `json.dumps` round-trips it exactly)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **self.config(),
            "n_updates": self.n_updates,
            "A": self._A.tolist(),
            "b": self._b.tolist(),
            "A_inv": self._A_inv.tolist() if self.inverse == "sherman_morrison" else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore learned state saved by `state_dict`; the configuration must match this instance's.

        Use `LinUCB.from_state_dict` to rebuild an instance with the saved configuration instead.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a LinUCB state (expected format {STATE_FORMAT!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported LinUCB state version {state.get('version')!r}; expected {STATE_VERSION}"
            )
        for key, value in self.config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"LinUCB state has {key}={state.get(key)!r} but this instance has {key}={value!r}; "
                    "build the instance with LinUCB.from_state_dict(state) to take the saved configuration"
                )
        n_updates = state.get("n_updates")
        if not isinstance(n_updates, int) or n_updates < 0:
            raise ValueError(f"LinUCB state n_updates must be an int >= 0, got {n_updates!r}")
        expected = [("A", (self.dim, self.dim)), ("b", (self.dim,))]
        if self.inverse == "sherman_morrison":
            expected.append(("A_inv", (self.dim, self.dim)))
        arrays = {"A_inv": np.eye(self.dim)}
        for key, shape in expected:
            try:
                arr = np.asarray(state[key], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"LinUCB state {key!r} is missing or not numeric") from err
            if arr.shape != shape or not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"LinUCB state {key!r} must be a finite array of shape {shape}, got {arr.shape}"
                )
            arrays[key] = arr
        if not np.allclose(arrays["A"], arrays["A"].T):
            raise ValueError("LinUCB state 'A' is not symmetric")
        self._A, self._b, self._A_inv = arrays["A"], arrays["b"], arrays["A_inv"]
        self.n_updates = n_updates

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LinUCB:
        if not isinstance(state, dict):
            raise ValueError("a LinUCB state must be a dict produced by LinUCB.state_dict()")
        try:
            bandit = cls(
                state["dim"],
                state["alpha"],
                schedule=state["schedule"],
                beta0=state["beta0"],
                inverse=state["inverse"],
            )
        except KeyError as err:
            raise ValueError(f"LinUCB state lacks the configuration key {err.args[0]!r}") from None
        bandit.load_state_dict(state)
        return bandit
