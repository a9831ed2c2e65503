"""The Flower ClientApp of `secure-kd federate`: one organization, its private data, its student.

    app = build_client_app(job)      # simulation (federation/run.py) binds the job
    app                              # `flwr run .`: reads run-config `config` and `overrides`

The organization is `node_config["partition-id"]` (set by the simulation engine) or `org-name` (one of
the job's `organizations`, set by `flower-supernode --node-config "org-name='alpha' org-dir='/srv/alpha'
trust-dir='/srv/trust' data-path='/srv/alpha/records.jsonl'"`, see docs/deploy.md); its state lives in
its directory (`org-dir`, default `<out>/orgs/org-<i>`, see `federation.client.workspace`) and, with
`data-path`, its private records are that file (node config never leaves the SuperNode).
Every instruction from the server is checked (`federation.messages`) before it is used; what goes back
is rounded (metrics), encrypted (CKKS), masked (SecAgg+) or sealed for one peer (p2p).

Message types: `query.hello`, `query.keygen`, `query.keyshare` (setup and key ceremony, here), `train`,
`evaluate`, `train.digest`, `query.votes` (`federation.client.rounds`), `query.profile`,
`train.p2p_send`, `train.p2p_learn` (`federation.client.p2p`). `train` messages that carry Flower's
SecAgg+ configuration go through `secaggplus_mod` first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import make_ffn, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from federation.client import p2p, rounds
from federation.client.decrypt import new_keyring
from federation.client.guard import current_workspace, guarded, org_root
from federation.client.workspace import OrgWorkspace, node_org_index
from federation.config import FederatedJob
from federation.crypto.he import Keyring
from federation.crypto.identity import PublicBundle
from federation.crypto.keys import open_from, seal_for
from federation.job_data import job_digest
from federation.messages import CONFIG, METRICS, MessageRejected, read_config
from federation.students import flat_parameters

Handler = Callable[[OrgWorkspace, Message, Context], RecordDict]
logger = logging.getLogger("secure_kd.federation")


# Per process: the simulation engine hands each message a fresh copy of the ClientApp, so a cache in
# its closure would not survive; derived data (tokenized records, a teacher) is kept here instead.
_WORKSPACES: dict[tuple[str, int, str], OrgWorkspace] = {}


def workspace(job: FederatedJob, context: Context) -> OrgWorkspace:
    config = context.node_config
    index = node_org_index(job, config)
    root = org_root(job, config, index)
    data_path = config.get("data-path") or None
    key = (job_digest(job), index, str(root), data_path)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = OrgWorkspace(
            job, index, root, ledger_dir=config.get("ledger-dir"), data_path=data_path
        )
    return _WORKSPACES[key]


def _trust(ws: OrgWorkspace, context: Context):
    return ws.trust(context.node_config.get("trust-dir"))


def hello(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """The first message of every run: start from a clean slate, say who this organization is."""
    removed = ws.start_run()
    if removed:
        logger.info("%s: a new run starts; removed the previous run's %s", ws.name, ", ".join(removed))
    own = ws.keys().public_bundle()
    own.check_not_expired()  # peers would refuse it: say so here, where the fix is (rotate-keys)
    bundle = own.to_json()
    return RecordDict({CONFIG: ConfigRecord({"org": ws.name, "index": ws.index, "bundle": bundle})})


def _expected_payload(ws: OrgWorkspace) -> int:
    if ws.job.mode == "fedavg":
        return sum(t.numel() for t in flat_parameters(ws.student())[1])
    layout = ws.public.layout
    return layout.n_positions * (layout.width + (1 if ws.job.transfer.filtering is not None else 0))


def _job_organizations(ws: OrgWorkspace) -> list[str]:
    return [ws.job.org_name(i) for i in range(ws.job.n_organizations)]


def _job_recipients(ws: OrgWorkspace, recipients: list) -> list[PublicBundle]:
    """The server's list of whom to seal the CKKS secret to: other organizations of this job only, each
    once. Being in the trust store is not enough: it may hold organizations outside this job."""
    members = set(_job_organizations(ws)) - {ws.name}
    bundles, seen = [], set()
    for item in recipients:
        if not isinstance(item, str):
            raise MessageRejected("recipients must be key bundles (JSON strings)")
        try:
            bundle = PublicBundle.from_json(item)
        except ValueError as exc:
            raise MessageRejected(f"a recipient's key bundle is malformed: {exc}") from None
        if bundle.org not in members:
            raise MessageRejected(
                f"the server asks to seal the CKKS key to {bundle.org!r}, which is not another organization "
                f"of this job ({', '.join(sorted(members)) or 'none'}): refused"
            )
        if bundle.org in seen:
            raise MessageRejected(f"the server lists {bundle.org!r} twice as a recipient")
        seen.add(bundle.org)
        bundles.append(bundle)
    return bundles


def keygen(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """The dealer: a keyring sized for the payload, its secret sealed to each other organization of the
    job (checked against the job and, per bundle, the trust store: epoch, expiry, identity)."""
    n_values = read_config(message.content, "n-values", int)
    if n_values != _expected_payload(ws):
        raise MessageRejected(
            f"the server asks for a key for {n_values} values; this job's payload has {_expected_payload(ws)}"
        )
    job, trust, keys = ws.job, _trust(ws, context), ws.keys()
    recipients = _job_recipients(ws, read_config(message.content, "recipients", list))
    ring = new_keyring(job, n_values)  # sized for the payload and the release margin (client/decrypt.py)
    secret = ring.secret_context()
    sealed = [seal_for(b, keys, str(context.run_id), secret, trust=trust) for b in recipients]
    ws.save_secret_context(secret)
    return RecordDict({CONFIG: ConfigRecord({"public-context": ring.public_context(), "sealed": sealed})})


def keyshare(ws: OrgWorkspace, message: Message, context: Context) -> RecordDict:
    """A recipient: open the dealer's sealed secret (signed, bound to this run and to us) and keep it."""
    dealer = PublicBundle.from_json(read_config(message.content, "dealer-bundle", str))
    if dealer.org not in _job_organizations(ws) or dealer.org == ws.name:
        raise MessageRejected(f"the CKKS key comes from {dealer.org!r}, not another organization of this job")
    sealed = read_config(message.content, "sealed", bytes)
    secret = open_from(dealer, ws.keys(), str(context.run_id), sealed, trust=_trust(ws, context))
    ring = Keyring.from_secret_context(secret)
    ws.save_secret_context(secret)
    return RecordDict({CONFIG: ConfigRecord({"key-id": ring.key_id.hex()})})


HANDLERS: dict[str, Handler] = {
    "query.hello": hello,
    "query.keygen": keygen,
    "query.keyshare": keyshare,
    "train.default": rounds.train,
    "evaluate.default": rounds.final_evaluate,
    "train.digest": rounds.final_evaluate,
    "query.votes": rounds.pate_votes,
    "query.profile": p2p.profile,
    "train.p2p_send": p2p.send,
    "train.p2p_learn": p2p.learn,
}


def secagg_when_asked(message: Message, context: Context, call_next):
    """Flower's SecAgg+ client protocol for the `train` messages of SecAggPlusWorkflow, and only those."""
    if message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def build_client_app(job: FederatedJob | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp for `job` (or, when None, for the job named in each run's run-config).

    Every handler runs behind `federation.client.guard.guarded`: the organization's policy is checked
    first, and a failure reaches the server as a generic code only (`federation.client.errors`).

    `mods`: Flower mods (`(message, context, call_next) -> Message`) put around every handler, inside
    the guard (they see the organization's workspace, and what they raise leaves as a code) and inside
    SecAgg+'s mod. Only the simulation passes any (`federation.simulation.mods`: the test roles); a mod
    with a `job_field` attribute is what runs that field of the job (`adversaries`, `simulate_faults`),
    and a job that gives this organization a role no installed mod runs is refused, not run honestly.
    The app keeps them in `handler_mods`; the module's `app`, which `flwr run` and deployed SuperNodes
    load, has none."""
    from federation.run_config import job_from_run_config

    app = ClientApp()
    app.handler_mods = tuple(mods)
    roles = frozenset(field for mod in mods if (field := getattr(mod, "job_field", None)))

    def register(name: str, handler: Handler) -> None:
        category, action = name.split(".")

        def handle(message: Message, context: Context) -> Message:
            started = time.perf_counter()
            ws = current_workspace()
            content = handler(ws, message, context)
            if METRICS in content.metric_records:  # time spent in the ClientApp, for the round-time breakdown
                content[METRICS]["handler-seconds"] = round(time.perf_counter() - started, 4)
            return Message(content, reply_to=message)

        inner = make_ffn(handle, [*([secagg_when_asked] if name == "train.default" else []), *mods])
        getattr(app, category)(action)(
            guarded(
                name,
                inner,
                bound_job=job,
                resolve=job_from_run_config,
                workspace=workspace,
                test_roles=roles,
            )
        )

    for name, handler in HANDLERS.items():
        register(name, handler)
    return app


app = build_client_app()
