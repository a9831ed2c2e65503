"""An organization and the CKKS aggregates it decrypts: the keyring it deals, the checks, the release.

- `keyring_parameters(job, n_values)`: what the dealer generates. The decrypted mean of total weight W
  must be released (`he.release`) on a grid 2**`ckks.release_margin_bits` (>= 20) above its noise
  bound, noise_bound(max_clients) / W, and that grid should be `ckks.release_decimals` decimals fine;
  so the sum's error budget is 10**-decimals * W_min / 2**margin with W_min = `min_clients` (every
  contributor weighs at least 1), unless the range (`ckks.max_abs_update`, 1 in fed_distill whose
  payloads are probabilities and weights in [0, 1]) leaves float64 and one 60-bit prime too little
  room: then the finest parameters that exist, and fewer decimals are released.
- `open_aggregate(...)`: before decrypting, the header must be an aggregate of this run's key with the
  expected length and between `min_clients` and `n_organizations` contributors; after, the total weight
  must fit them (fed_distill and client_dp fedavg: exactly the contributor count; fedavg: an integer at
  least that) and the values must be finite and pass the caller's check (soft labels are
  distributions). The mean is then rounded to `he.mean_release_decimals` decimals, derived from the
  real noise bound and weight, never from a number the run chooses alone.
- The first aggregate that fails any of this makes the organization stop decrypting for the rest of
  the run (`decryption-stopped.json` in its directory, by run id, kept across `query.hello`): a
  deviating server learns one generic `malformed-aggregate` code (`federation.client.errors`) and
  then `decryption-stopped` codes, never a decrypted value. Causes in the local error log name the
  failed check, without values.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from federation.client.errors import ClientFailure
from federation.client.workspace import OrgWorkspace
from federation.config import FederatedJob
from federation.crypto.codec import PayloadFormatError, PayloadKind
from federation.crypto.he import (
    CkksParameters,
    Keyring,
    choose_release_parameters,
    decrypt_aggregate,
    mean_release_decimals,
    read_header,
    release,
)
from federation.failure_codes import Code
from secure_kd.paths import atomic_write_json

STOP_FILE = "decryption-stopped.json"
KEPT_RUNS = 1000  # run ids remembered in STOP_FILE
WEIGHT_TOLERANCE = 1e-3  # decrypted weights are sums of integers; the CKKS error is many orders smaller


def payload_range(job: FederatedJob) -> float:
    """The bound on |weight * value| of one client's payload that the keyring must hold."""
    if job.mode == "fed_distill":
        return min(job.ckks.max_abs_update, 1.0)  # probabilities and filter weights, weight 1
    return job.ckks.max_abs_update


def keyring_parameters(job: FederatedJob, n_values: int) -> CkksParameters:
    """The dealer's CKKS parameters for a payload of `n_values` values (see the module docstring)."""
    return choose_release_parameters(
        n_values,
        max_abs_update=payload_range(job),
        max_clients=job.n_organizations,
        decimals=job.ckks.release_decimals,
        min_weight=float(job.required_clients),
        margin_bits=job.ckks.release_margin_bits,
        abs_error=job.ckks.abs_error,
    )


def new_keyring(job: FederatedJob, n_values: int) -> Keyring:
    return Keyring.from_parameters(keyring_parameters(job, n_values))


def release_decimals_at_min_weight(job: FederatedJob, parameters: CkksParameters) -> int:
    """The decimals a mean of the smallest total weight (`min_clients`) is released at."""
    return mean_release_decimals(
        parameters,
        float(job.required_clients),
        max_decimals=job.ckks.release_decimals,
        margin_bits=job.ckks.release_margin_bits,
    )


def _stopped_runs(ws: OrgWorkspace) -> list[int]:
    path = ws.root / STOP_FILE
    if not path.is_file():
        return []
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return []
    return [int(r) for r in runs if isinstance(r, int)]


def decryption_stopped(ws: OrgWorkspace, run_id: int) -> bool:
    return int(run_id) in _stopped_runs(ws)


def stop_decrypting(ws: OrgWorkspace, run_id: int) -> None:
    runs = [r for r in _stopped_runs(ws) if r != int(run_id)] + [int(run_id)]
    atomic_write_json(ws.root / STOP_FILE, {"runs": runs[-KEPT_RUNS:]}, mode=0o600)


class _Refused(Exception):
    """A failed check; the message is a fixed text without values."""


def _check_header(job: FederatedJob, keyring: Keyring, blob: bytes, n_values: int) -> None:
    header = read_header(keyring, blob)
    if header.kind != PayloadKind.AGGREGATE:
        raise _Refused("the 'aggregate' is a single client's update, not an aggregate")
    if header.n_values != n_values:
        raise _Refused("the aggregate's length is not this job's payload length")
    if (
        not job.required_clients
        <= header.n_contributors
        <= min(job.n_organizations, keyring.parameters.max_clients)
    ):
        raise _Refused("the aggregate's contributor count is outside min_clients..n_organizations")


def _check_weight(job: FederatedJob, weight: float, n_contributors: int) -> None:
    if job.mode == "fed_distill" or job.client_dp is not None:
        if abs(weight - n_contributors) > WEIGHT_TOLERANCE:
            raise _Refused(
                "the decrypted total weight is not the contributor count (fed_distill and client-level "
                "DP fedavg weigh 1 each)"
            )
    elif weight < n_contributors - WEIGHT_TOLERANCE or abs(weight - round(weight)) > WEIGHT_TOLERANCE:
        raise _Refused(
            "the decrypted total weight is not a whole number of examples, one or more per contributor"
        )


def open_aggregate(
    ws: OrgWorkspace,
    run_id: int,
    blob: bytes,
    n_values: int,
    *,
    check: Callable[[np.ndarray], np.ndarray] | None = None,
    check_name: str = "the payload check",
) -> np.ndarray:
    """The checked, released (rounded) mean of an encrypted aggregate; see the module docstring.

    Raises ClientFailure: `decryption-stopped` when an earlier aggregate of this run failed,
    `malformed-aggregate` (and stops decrypting for the run) when this one fails."""
    if decryption_stopped(ws, run_id):
        raise ClientFailure(
            Code.DECRYPTION_STOPPED,
            "an earlier aggregate of this run was malformed; this organization decrypts nothing more in it",
        )
    keyring = Keyring.from_secret_context(ws.secret_context())
    job = ws.job
    try:
        _check_header(job, keyring, blob, n_values)
        decrypted = decrypt_aggregate(keyring, blob, n_values)
        _check_weight(job, decrypted.weight, decrypted.n_contributors)
        if job.mode == "fedavg" and np.abs(decrypted.mean).max() > keyring.max_abs_update:
            raise _Refused("the decrypted mean is outside the keyring's range")
        decimals = mean_release_decimals(
            keyring.parameters,
            decrypted.weight,
            max_decimals=job.ckks.release_decimals,
            margin_bits=job.ckks.release_margin_bits,
        )
        released = release(decrypted.mean, decimals=decimals)
        if check is not None:
            try:
                released = check(released)
            except ValueError:
                raise _Refused(f"the decrypted aggregate failed {check_name}") from None
    except Exception as exc:
        stop_decrypting(ws, run_id)
        if isinstance(exc, _Refused):
            cause = str(exc)
        elif isinstance(exc, PayloadFormatError):
            cause = f"the aggregate is not a well-formed payload of this run's key: {exc}"
        else:  # decrypt_aggregate's own refusals and TenSEAL errors carry no decrypted values
            cause = f"the aggregate does not decrypt to a valid payload: {exc}"
        raise ClientFailure(Code.MALFORMED_AGGREGATE, cause + "; decryption stops for this run") from None
    return released
