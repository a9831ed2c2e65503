"""Fault injection for testing fault tolerance (`simulate_faults` in a job; tests and demos only), as a
Flower mod, `fault_mod`, that only the simulation's ClientApp installs (`federation.simulation.mods`).

An organization listed there misbehaves on purpose in every payload-bearing exchange (`train`,
`query.votes`, `train.p2p_send`): `crash` raises, `slow` answers after the round timeout, and a
malicious one corrupts what it was about to send: `nan` (a non-finite value, or a ciphertext that is
not one), `oversized` (a reply over `max_message_mb`), `wrong_shape` (an array or ciphertext of the
wrong length). The server must drop it with a logged reason and go on with the others. `crash_final`
raises in the final stage only (`evaluate`, `train.digest`): a run whose final stage fewer than
`min_clients` complete must fail, with the cause.

The mod sits inside the ClientApp's guard and inside SecAgg+'s mod: it raises or sleeps before the
handler, and corrupts the handler's reply after it (not SecAgg+'s `train`, whose reply Flower's mod
masks afterwards).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from federation.client.guard import current_workspace
from federation.client.workspace import OrgWorkspace
from federation.messages import ARRAYS, CONFIG, to_array_record

PAYLOAD_MESSAGES = frozenset({"train.default", "query.votes", "train.p2p_send"})
FINAL_MESSAGES = frozenset({"evaluate.default", "train.digest"})


def before_handling(ws: OrgWorkspace, message_type: str) -> None:
    fault = ws.job.simulate_faults.get(ws.index)
    if fault == "crash_final" and message_type in FINAL_MESSAGES:
        raise RuntimeError(f"{ws.name}: simulated crash in the final stage (simulate_faults)")
    if message_type not in PAYLOAD_MESSAGES:
        return
    if fault == "crash":
        raise RuntimeError(f"{ws.name}: simulated crash (simulate_faults)")
    if fault == "slow":
        time.sleep(ws.job.round_timeout_s + 2.0)


def sabotaged(ws: OrgWorkspace, content: RecordDict) -> RecordDict:
    """The payload a malicious organization sends instead of `content` (unchanged for honest ones)."""
    fault = ws.job.simulate_faults.get(ws.index)
    if fault == "oversized":
        padded = dict(content[CONFIG]) if CONFIG in content else {}
        content[CONFIG] = ConfigRecord({**padded, "padding": b"\0" * (ws.job.max_message_bytes + 1)})
    elif fault in ("nan", "wrong_shape") and ARRAYS in content:
        arrays = {name: array.numpy().copy() for name, array in content[ARRAYS].items()}
        name = next(iter(arrays))
        if fault == "nan":
            arrays[name] = arrays[name].astype(np.float64) if arrays[name].dtype.kind != "f" else arrays[name]
            arrays[name].flat[0] = np.nan
        else:
            arrays[name] = arrays[name].ravel()[:-1]
        content[ARRAYS] = to_array_record(arrays)
    elif fault in ("nan", "wrong_shape"):
        key = next(iter(content[CONFIG].keys()))
        blob = content[CONFIG][key]
        content[CONFIG] = ConfigRecord(
            {key: blob[: len(blob) // 2] if fault == "wrong_shape" else b"\xff" * 64}
        )
    return content


def handler_name(message: Message) -> str:
    """The ClientApp handler a message goes to: `train` is `train.default`."""
    kind = message.metadata.message_type
    return kind if "." in kind else f"{kind}.default"


def fault_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The organization's `simulate_faults` entry, around one handler (nothing for the others)."""
    ws = current_workspace()
    name = handler_name(message)
    before_handling(ws, name)
    reply = call_next(message, context)
    masked_later = name == "train.default" and ws.job.protection == "secagg+"
    if ws.index in ws.job.simulate_faults and name in PAYLOAD_MESSAGES and not masked_later:
        sabotaged(ws, reply.content)  # in place
    return reply


fault_mod.job_field = "simulate_faults"  # the job field this mod runs (federation.client.app)
