"""ClientApp handlers of p2p mode (KNEXA-FL style): a private profile for the matchmaker, soft labels
sealed end to end for the matched peer, and distillation from what the peer sealed for us.

The sealed payload binds run, round, sender and recipient (`federation.crypto.keys`), so the relaying server
can neither read it, alter it, substitute a peer's key, nor replay it into another round.
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from federation.client.rounds import fit_metrics
from federation.client.training import distill_from, evaluate, train_locally
from federation.client.workspace import OrgWorkspace
from federation.crypto.identity import PublicBundle
from federation.crypto.keys import open_from, seal_for
from federation.messages import (
    ARRAYS,
    CONFIG,
    MessageRejected,
    check_layout,
    read_config,
    read_round,
    reply,
    to_array_record,
)
from federation.profiles import ClientProfile, ProfileLedger, profile_vector, release_profile
from federation.soft_labels import check_soft_labels, soft_labels
from federation.students import mean_loss


def profile(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """A Laplace-noised 16-dim profile; every release is recorded in the organization's profile ledger."""
    r = read_round(message.content)
    state = ws.state()
    model = ws.student()
    recent = state.get("recent_loss")
    if recent is None:
        recent = mean_loss(
            model,
            ws.heldout_examples,
            pad_id=ws.public.pad_id,
            limit=ws.job.train.eval_batches,
            batch_size=ws.job.train.batch_size,
            device=ws.device,
        )
    summary = ClientProfile(
        n_examples=len(ws.train_examples),
        topic_histogram=ws.topic_histogram(),
        recent_loss=float(recent),
        model_parameters=sum(p.numel() for p in model.parameters()),
        mean_sequence_length=float(np.mean([len(e) for e in ws.train_examples])),
        previous_loss=state.get("previous_loss"),
    )
    ledger = ProfileLedger.from_dict(state.get("profile_ledger", {"releases": []}))
    noisy = release_profile(
        profile_vector(summary),
        ws.job.p2p.profile_epsilon,
        np.random.default_rng(secrets.randbits(128)),
        ledger=ledger,
        round_index=r,
    )
    ws.update_state(profile_ledger=ledger.to_dict())
    return reply(
        RecordDict({ARRAYS: to_array_record({"profile": noisy})}), {"profile-epsilon": ledger.total_epsilon}
    )


def _peer(message: Message) -> PublicBundle:
    bundle = PublicBundle.from_json(read_config(message.content, "peer-bundle", str))
    if bundle.org != read_config(message.content, "peer", str):
        raise MessageRejected("the peer's key bundle names another organization than the peer")
    return bundle


def _seal_label(context: Context, r: int) -> str:
    return f"{context.run_id}/round-{r}"


def send(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """Soft labels on the transfer set, sealed for the matched peer only."""
    public = ws.public
    check_layout(message.content, public.layout.fingerprint)
    r = read_round(message.content)
    soft = soft_labels(ws.student(), public.transfer, public.layout, pad_id=public.pad_id, device=ws.device)
    sealed = seal_for(
        _peer(message),
        ws.keys(),
        _seal_label(context, r),
        soft.astype("<f8").tobytes(),
        trust=ws.trust(context.node_config.get("trust-dir")),
    )
    return RecordDict({CONFIG: ConfigRecord({"sealed": sealed})})


def learn(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """Open the peer's soft labels, distil from them, train locally; report the loss before and after."""
    layout = ws.public.layout
    check_layout(message.content, layout.fingerprint)
    r = read_round(message.content)
    sealed = read_config(message.content, "sealed", bytes)
    plain = open_from(
        _peer(message),
        ws.keys(),
        _seal_label(context, r),
        sealed,
        trust=ws.trust(context.node_config.get("trust-dir")),
    )
    if len(plain) != 8 * layout.n_positions * layout.width:
        raise MessageRejected(
            f"the peer sent {len(plain)} bytes; the layout needs {8 * layout.n_positions * layout.width}"
        )
    soft = check_soft_labels(np.frombuffer(plain, dtype="<f8").reshape(layout.shape), layout)
    model = ws.student()
    before = evaluate(ws, model)
    digest = distill_from(ws, model, soft, r, steps=ws.job.transfer.digest_steps)
    fit = train_locally(ws, model, r)
    ws.save_student(model)
    after = evaluate(ws, model)
    ws.update_state(previous_loss=before["heldout-loss"], recent_loss=after["heldout-loss"])
    return reply(
        None,
        {
            "loss-before": before["heldout-loss"],
            "loss-after": after["heldout-loss"],
            "test-loss": after["test-loss"],
            "heldout-loss": after["heldout-loss"],
            "kilobytes": len(sealed) / 1024,
            "digest-loss": digest,
            **fit_metrics(fit),
        },
    )
