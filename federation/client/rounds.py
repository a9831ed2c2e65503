"""ClientApp handlers of the aggregating modes: fedavg (plaintext, CKKS, SecAgg+), fed_distill and pate.

Each handler takes the organization's workspace, the server's message and the node context, checks what
it reads (`federation.messages`), trains through the engine (`federation.client.training`), and returns
the reply content: plaintext arrays with `num-examples`, a CKKS ciphertext of the pre-weighted payload
and its weight (the server learns neither), or, under SecAgg+, the legacy FitRes that Flower's
`secaggplus_mod` masks before it leaves.

With client-level DP (`client_dp`, `federation.client_dp`) a fedavg update weighs 1, is clipped to C by
the honest hooks and, with `noise: client`, carries this organization's noise share before it is
encrypted, masked or sent; under SecAgg+ the update itself (weights - global) is masked, so that
`secagg.clipping_range` bounds C plus the noise rather than the weights. An organization adds a share
to each round at most once per run and to at most `client_dp.contribution_cap(job)` rounds.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code as StatusCode
from flwr.common import FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from federation import client_dp
from federation.client import hooks
from federation.client.cross_tokenizer import byte_soft_labels, is_byte_layout
from federation.client.decrypt import open_aggregate
from federation.client.errors import ClientFailure
from federation.client.filtering import ensemble_from_weighted_sum, transfer_weights
from federation.client.training import LocalFit, distill_from, evaluate, train_locally
from federation.client.workspace import OrgWorkspace
from federation.crypto.he import Keyring, encrypt
from federation.failure_codes import Code
from federation.messages import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    MessageRejected,
    check_layout,
    read_arrays,
    read_config,
    read_round,
    read_soft_labels,
    reply,
    rounded_metrics,
    to_array_record,
)
from federation.soft_labels import check_soft_labels, soft_labels, votes
from federation.students import flat_parameters, load_parameters


def fit_metrics(fit: LocalFit) -> dict[str, float | None]:
    return {"train-loss": fit.loss, "epsilon": fit.epsilon, "delta": fit.delta, "seconds": fit.seconds}


def keyring(ws: OrgWorkspace) -> Keyring:
    return Keyring.from_secret_context(ws.secret_context())


def _decrypted_mean(
    ws: OrgWorkspace, message: Message, context: Context, n_values: int, check=None, check_name: str = ""
) -> np.ndarray | None:
    """The previous round's encrypted aggregate, checked, decrypted and released (None in the first
    round); `federation.client.decrypt.open_aggregate` says what is checked and how it is rounded."""
    if "aggregate" not in message.content[CONFIG]:
        return None
    blob = read_config(message.content, "aggregate", bytes)
    return open_aggregate(ws, context.run_id, blob, n_values, check=check, check_name=check_name)


def install_global(ws: OrgWorkspace, model, message: Message, context: Context) -> None:
    """fedavg: load the global model the message carries (plaintext arrays, or the CKKS aggregate)."""
    names, tensors = flat_parameters(model)
    if ws.job.protection == "ckks":
        flat = _decrypted_mean(ws, message, context, sum(t.numel() for t in tensors))
        if flat is not None:
            arrays, offset = {}, 0
            for name, tensor in zip(names, tensors, strict=True):
                arrays[name] = flat[offset : offset + tensor.numel()].reshape(tuple(tensor.shape))
                offset += tensor.numel()
            load_parameters(model, arrays)
    elif ARRAYS in message.content:
        spec = {n: (tuple(t.shape), "float32") for n, t in zip(names, tensors, strict=True)}
        load_parameters(model, read_arrays(message.content, spec))


def received_ensemble(ws: OrgWorkspace, message: Message, context: Context) -> np.ndarray | None:
    """fed_distill: the ensemble teacher of the previous round, if the message carries one."""
    layout = ws.public.layout
    check_layout(message.content, layout.fingerprint)
    if ws.job.protection == "ckks":
        filtered = ws.job.transfer.filtering is not None
        n_values = layout.n_positions * (layout.width + (1 if filtered else 0))

        def ensemble(flat: np.ndarray) -> np.ndarray:
            soft = ensemble_from_weighted_sum(flat, layout) if filtered else flat.reshape(layout.shape)
            return check_soft_labels(soft, layout)

        return _decrypted_mean(
            ws, message, context, n_values, ensemble, "the soft-label check (rows are distributions)"
        )
    if ARRAYS in message.content:
        return read_soft_labels(message.content, layout)
    return None


def _upload(ws: OrgWorkspace, arrays: dict[str, np.ndarray], weight: int) -> RecordDict:
    if ws.job.protection == "ckks":
        flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])
        return RecordDict({CONFIG: ConfigRecord({"ciphertext": encrypt(keyring(ws), flat, weight=weight)})})
    return RecordDict({ARRAYS: to_array_record(arrays)})


def _digest(ws: OrgWorkspace, model, message: Message, context: Context, r: int) -> dict[str, float]:
    ensemble = received_ensemble(ws, message, context)
    if ensemble is None:
        return {}
    return {"digest-loss": distill_from(ws, model, ensemble, r, steps=ws.job.transfer.digest_steps)}


def _soft_label_payload(ws: OrgWorkspace, model) -> tuple[dict[str, np.ndarray], float | None]:
    """fed_distill: soft labels on the transfer set, with this organization's filtering weights if asked.

    Under CKKS the weighted labels and the weights are one vector (the server only adds); in plaintext
    the labels stay valid distributions and the weights travel beside them. The labels pass the
    message's hooks (`federation.client.hooks`) before they are weighted, so every layout carries what
    a simulated adversary puts there."""
    public = ws.public
    if is_byte_layout(ws):  # across tokenizers: rows of the byte-aligned layout (federation.byte_layout)
        labels = byte_soft_labels(ws, model)
    else:
        labels = soft_labels(model, public.transfer, public.layout, pad_id=public.pad_id, device=ws.device)
    labels = hooks.current().soft_labels(ws, labels)
    filtering = ws.job.transfer.filtering
    if filtering is None:
        return {"soft-labels": labels}, None
    weights, kept = transfer_weights(
        model, ws.train_examples, public.transfer, public.layout, filtering, seed=ws.job.seed + ws.index
    )
    if ws.job.protection == "ckks":
        return {"weighted-soft-labels": labels * weights[:, None], "filter-weights": weights}, kept
    return {"soft-labels": labels, "filter-weights": weights}, kept


def _weights(model) -> dict[str, np.ndarray]:
    names, tensors = flat_parameters(model)
    return {n: t.float().cpu().numpy().copy() for n, t in zip(names, tensors, strict=True)}


CONTRIBUTIONS = "client_dp_rounds"  # state.json: the rounds of this run this organization added a share to


def _noise_share(ws: OrgWorkspace, weights: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """client_dp with `noise: client`: the clipped weights plus this organization's share N(0, s^2),
    s = sigma * C / sqrt(k) (federation.client_dp). The round is recorded before the share leaves, and a
    round already contributed to, or one past the cap, is refused: a second noisy copy of an update is a
    release the server's accounting does not count."""
    done = [int(x) for x in ws.state().get(CONTRIBUTIONS, [])]
    if r in done:
        raise ClientFailure(
            Code.BUDGET_SPENT, f"round {r} asked again: this organization already added a DP share to it"
        )
    cap = client_dp.contribution_cap(ws.job)
    if len(done) >= cap:
        raise ClientFailure(
            Code.BUDGET_SPENT,
            f"this organization has contributed to {len(done)} round(s) of this run, the most client_dp "
            f"allows (rounds, or what target_epsilon covers at the job's noise multiplier: {cap})",
        )
    ws.update_state(**{CONTRIBUTIONS: [*done, r]})
    return client_dp.add_noise(weights, client_dp.share_std(ws.job), client_dp.noise_generator())


def _fedavg_payload(ws: OrgWorkspace, model, start: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """The weights this organization sends: its own, clipped if the job asks (the message's hooks), with
    its client-level DP noise share when the clients add the noise."""
    weights = hooks.current().fedavg_weights(ws, _weights(model), start)
    dp = ws.job.client_dp
    if dp is not None and dp.noise == "client":
        weights = _noise_share(ws, weights, r)
    return weights


def _fedavg_weight(ws: OrgWorkspace) -> int:
    """An update's weight: its number of examples, or 1 under client-level DP (the sensitivity bound is
    on the unweighted sum; an example count would be released outside the guarantee)."""
    return 1 if ws.job.client_dp is not None else len(ws.train_examples)


def train(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """One round: take in the aggregate, evaluate it, train locally, upload weights or soft labels."""
    if ws.job.protection == "secagg+":
        return secagg_train(ws, message, context)
    r = read_round(message.content)
    model = ws.student()
    if ws.job.mode == "fedavg":
        install_global(ws, model, message, context)
        extra: dict[str, float] = {}
    else:
        extra = _digest(ws, model, message, context, r)
    before = evaluate(ws, model)
    start = _weights(model) if ws.job.mode == "fedavg" else {}
    fit = train_locally(ws, model, r)
    ws.save_student(model)
    if ws.job.mode == "fedavg":
        payload = _fedavg_payload(ws, model, start, r)
        weight = _fedavg_weight(ws)
    else:
        payload, kept = _soft_label_payload(ws, model)
        if kept is not None and ws.job.protection == "plaintext":  # under CKKS the weights stay hidden
            extra["kept-fraction"] = kept
        weight = 1
    metrics = {**before, **fit_metrics(fit), **extra}
    if ws.job.protection == "plaintext":
        metrics[NUM_EXAMPLES] = weight  # under CKKS the weight travels encrypted, never in the clear
    return reply(_upload(ws, payload, weight), metrics)


def final_evaluate(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """After the last round: install the global model (fedavg) or distil from the last ensemble."""
    model = ws.student()
    if ws.job.mode == "fedavg":
        install_global(ws, model, message, context)
        extra: dict[str, float] = {}
    else:
        extra = _digest(ws, model, message, context, read_round(message.content))
    ws.save_student(model)
    return reply(None, {**evaluate(ws, model), **extra})


def secagg_train(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """SecAgg+ (Flower's legacy FitIns/FitRes records): `secaggplus_mod` masks the reply before it leaves.

    The weights pass the message's hooks before masking, as under CKKS (a simulated adversary's boosted
    update among them); SecAgg+ then clips every value to `secagg.clipping_range` when it quantizes,
    which bounds (but does not remove) a boosted update. Under client-level DP the masked vector is the
    update (weights - global) plus the noise share, each weighing the same (`secagg.max_weight`)."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    r = int(fitins.config.get("server-round", 0))
    model = ws.student()
    names, tensors = flat_parameters(model)
    received = parameters_to_ndarrays(fitins.parameters)
    if [a.shape for a in received] != [tuple(t.shape) for t in tensors]:
        raise MessageRejected("the global parameters do not match this organization's student")
    if not all(np.all(np.isfinite(a)) for a in received):
        raise MessageRejected("the global parameters hold NaN or infinite values")
    load_parameters(model, dict(zip(names, received, strict=True)))
    before = evaluate(ws, model)
    start = _weights(model)
    fit = train_locally(ws, model, r)
    ws.save_student(model)
    payload = _fedavg_payload(ws, model, start, r)
    weight = len(ws.train_examples)
    if ws.job.client_dp is not None:
        payload = {n: (payload[n].astype(np.float64) - start[n]).astype(np.float32) for n in names}
        weight = max(1, int(ws.job.secagg.max_weight))  # equal weights: the mean of the updates
    updated = [payload[name] for name in names]
    metrics = dict(rounded_metrics({**before, **fit_metrics(fit), "org-index": ws.index}))
    result = FitRes(Status(StatusCode.OK, ""), ndarrays_to_parameters(updated), weight, metrics)
    return compat.fitres_to_recorddict(result, keep_input=True)


def pate_votes(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """This organization as a PATE teacher: train on its own records, vote a token at every position."""
    public = ws.public
    check_layout(message.content, public.layout.fingerprint)
    r = read_round(message.content)
    model = ws.student()
    fit = train_locally(ws, model, r)
    ws.save_student(model)
    chosen = votes(model, public.transfer, public.layout, pad_id=public.pad_id, device=ws.device)
    return reply(
        RecordDict({ARRAYS: to_array_record({"votes": chosen})}), {**evaluate(ws, model), **fit_metrics(fit)}
    )
