"""The Flower ServerApp of `secure-kd federate`.

    app = build_server_app(job)      # simulation (federation/run.py) binds the job
    app                              # `flwr run .`: reads run-config `config` (a YAML path) and `overrides`

The server waits for the organizations, learns who is who (`query.hello`), runs the CKKS key ceremony
when the job asks for it (the dealer's sealed secret contexts are relayed as opaque bytes; the server
keeps only the public context), then runs `rounds` rounds of the mode's strategy and writes
`<out>/results.json` (also after a failure, with the error). Every exchange goes through `Session`,
which drops a client that fails, times out or sends a message that fails validation, logs the
reason, and stops the run if fewer than `min_clients` organizations are left in a round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from federation.client_errors import parse_reason
from federation.config import FederatedJob, load_federated_job
from federation.he import PublicContext, load_public_context
from federation.identity import PublicBundle
from federation.messages import CONFIG, MessageRejected, check_size, content_bytes, read_config
from federation.node_binding import NODE_IDS_KEY, claim_refusal, parse_node_ids
from federation.results import ClientRound, Dropped, FederatedResult, RoundRecord, summarize
from federation.strategies import STRATEGIES, Strategy
from federation.workspace import JobData, job_data
from secure_kd.config import ConfigError
from secure_kd.paths import atomic_write_json, private_dir

logger = logging.getLogger("secure_kd.federation")
T = TypeVar("T")
NODE_POLL_SECONDS = 0.2


class FederationFailed(RuntimeError):
    """The run cannot go on: too few organizations answered (the reasons are in results.json)."""


@dataclass(frozen=True)
class Org:
    index: int
    name: str
    node_id: int
    bundle: str


def short_reason(reason: str | None, limit: int = 300) -> str:
    """What a failed client said: secure-kd's code, stage (and a policy refusal's text) as they are;
    for anything else Flower made (a ClientApp process that died, an unreachable node), its first
    non-empty line without the engine's wrapping, never an empty string."""
    if parse_reason(reason) is not None:
        reason = str(reason)
    else:
        reason = str(reason or "")
        marker = "occurred. Message: "
        if marker in reason:
            reason = reason[reason.rindex(marker) + len(marker) :]
        lines = [line.strip(" '<>") for line in reason.splitlines() if line.strip(" '<>")]
        reason = lines[0] if lines else "no reason given"
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


class Session:
    """The server's side of the conversation with the organizations' ClientApps."""

    def __init__(self, grid: Grid, job: FederatedJob, run_id: int, data: JobData | None = None) -> None:
        self.grid, self.job, self.run_id = grid, job, run_id
        self.data = data if data is not None else job_data(job)
        self.orgs: dict[int, Org] = {}
        # org -> registered Flower node id (federation.node_binding); None: names are not bound to nodes
        self.expected_nodes: dict[str, int] | None = None
        self.public: PublicContext | None = None
        self._drops: list[Dropped] = []
        self._bytes_up = self._bytes_down = 0
        self._round_started = time.perf_counter()

    @property
    def nodes(self) -> list[int]:
        return sorted(self.orgs, key=lambda node: self.orgs[node].index)

    def name(self, node: int) -> str:
        return self.orgs[node].name if node in self.orgs else f"node-{node}"

    def drop(self, node: int, stage: str, reason: str, client_reason: str | None = None) -> None:
        name = self.name(node)
        claimed = parse_reason(client_reason)
        if node not in self.orgs and claimed is not None and claimed[2]:
            name = claimed[2]  # before hello is accepted, the organization the client says it is
        logger.warning("dropped %s from %s: %s", name, stage, reason)
        self._drops.append(Dropped(org=name, stage=stage, reason=reason))

    def exchange(
        self,
        stage: str,
        message_type: str,
        contents: Mapping[int, RecordDict],
        round_index: int,
        read: Callable[[Org | None, RecordDict], T],
        *,
        timeout: float | None = None,
    ) -> dict[int, T]:
        """Send one message per node, wait up to the round timeout, keep the replies `read` accepts."""
        timeout = self.job.round_timeout_s if timeout is None else timeout
        messages = []
        for node, content in contents.items():
            self._bytes_down += content_bytes(content)
            messages.append(
                Message(
                    content, dst_node_id=node, message_type=message_type, group_id=f"{stage}-{round_index}"
                )
            )
        if not messages:
            return {}
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        accepted: dict[int, T] = {}
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in contents or node in answered:
                continue
            answered.add(node)
            if reply.has_error():
                self.drop(
                    node, stage, f"client failed: {short_reason(reply.error.reason)}", reply.error.reason
                )
                continue
            try:
                self._bytes_up += check_size(reply.content, self.job.max_message_bytes)
                accepted[node] = read(self.orgs.get(node), reply.content)
            except (MessageRejected, ValueError) as exc:
                self.drop(node, stage, f"message rejected: {exc}")
        for node in contents:
            if node not in answered:
                self.drop(node, stage, f"no reply within {timeout:g} s")
        return accepted

    def require(self, accepted: Mapping[int, Any], stage: str, round_index: int) -> None:
        needed = self.job.required_clients
        if len(accepted) < needed:
            reasons = "; ".join(f"{d.org}: {d.reason}" for d in self._drops[-10:])
            raise FederationFailed(
                f"round {round_index}, {stage}: {len(accepted)} organization(s) answered, min_clients is "
                f"{needed}; dropped: {reasons or 'none'}"
            )

    def record(
        self, round_index: int, metrics: Mapping[int, Mapping[str, float]], aggregate: dict
    ) -> RoundRecord:
        """Close the round: what each client reported, who was dropped and why, bytes and seconds."""
        clients = [
            ClientRound(org=self.name(node), metrics=dict(m))
            for node, m in sorted(
                metrics.items(), key=lambda item: self.orgs[item[0]].index if item[0] in self.orgs else -1
            )
        ]
        record = RoundRecord(
            round=round_index,
            seconds=time.perf_counter() - self._round_started,
            answered=[c.org for c in clients],
            dropped=self._drops,
            clients=clients,
            summary=summarize(clients),
            aggregate=aggregate,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
        )
        self._drops, self._bytes_up, self._bytes_down = [], 0, 0
        self._round_started = time.perf_counter()
        return record


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(NODE_POLL_SECONDS)


def _read_hello(job: FederatedJob) -> Callable[[Org | None, RecordDict], tuple[int, str]]:
    def read(_: Org | None, content: RecordDict) -> tuple[int, str]:
        index = read_config(content, "index", int)
        name = read_config(content, "org", str)
        bundle = read_config(content, "bundle", str)
        if not 0 <= index < job.n_organizations or name != job.org_name(index):
            raise MessageRejected(
                f"claims to be {name!r} with index {index}, not an organization of this job"
            )
        try:
            if PublicBundle.from_json(bundle).org != name:
                raise MessageRejected(f"its key bundle names another organization than {name!r}")
        except ValueError as exc:
            raise MessageRejected(f"malformed key bundle: {exc}") from None
        return index, bundle

    return read


def introduce(session: Session) -> dict[str, Any]:
    """Discover the nodes and who they are. With the operator's registry (`session.expected_nodes`) an
    organization is accepted only from its registered node; without it, duplicates of an organization
    are refused (the first node keeps the name)."""
    job = session.job
    nodes = wait_for_nodes(session.grid, job.n_organizations, job.join_timeout_s)
    hello = RecordDict({CONFIG: ConfigRecord({"round": 0})})
    replies = session.exchange("hello", "query.hello", {node: hello for node in nodes}, 0, _read_hello(job))
    seen: dict[int, int] = {}
    for node, (index, bundle) in sorted(replies.items()):
        refused = claim_refusal(session.expected_nodes, node, job.org_name(index))
        if refused:
            session.drop(node, "hello", refused)
            continue
        if index in seen:
            session.drop(node, "hello", f"{job.org_name(index)} already answered from node {seen[index]}")
            continue
        seen[index] = node
        session.orgs[node] = Org(index, job.org_name(index), node, bundle)
    session.require(session.orgs, "hello", 0)
    binding = "registry" if session.expected_nodes is not None else "none"
    return {"nodes": len(nodes), "organizations": len(session.orgs), "node_binding": binding}


def key_ceremony(session: Session, n_values: int) -> dict[str, Any]:
    """One client (the dealer) makes the CKKS keyring and seals its secret for each other client; the
    server relays the sealed bytes and keeps the public context. Clients without the key are dropped."""
    run = str(session.run_id)
    for dealer in session.nodes:
        others = [node for node in session.nodes if node != dealer]
        request = RecordDict(
            {
                CONFIG: ConfigRecord(
                    {"round": 0, "n-values": n_values, "recipients": [session.orgs[n].bundle for n in others]}
                )
            }
        )

        def read_keygen(_: Org | None, content: RecordDict, count: int = len(others)):
            public = load_public_context(read_config(content, "public-context", bytes))
            sealed = read_config(content, "sealed", list)
            if len(sealed) != count or not all(isinstance(item, bytes) for item in sealed):
                raise MessageRejected(f"expected {count} sealed secrets, got {len(sealed)}")
            return public, sealed

        made = session.exchange("keygen", "query.keygen", {dealer: request}, 0, read_keygen)
        if dealer in made:
            break
    else:
        raise FederationFailed("no organization could generate the CKKS keyring; see the dropped reasons")
    public, sealed = made[dealer]
    session.public = public
    dealer_bundle = session.orgs[dealer].bundle
    shares = {
        node: RecordDict({CONFIG: ConfigRecord({"round": 0, "dealer-bundle": dealer_bundle, "sealed": blob})})
        for node, blob in zip(others, sealed, strict=True)
    }

    def read_share(_: Org | None, content: RecordDict) -> str:
        key_id = read_config(content, "key-id", str)
        if key_id != public.key_id.hex():
            raise MessageRejected(f"holds key {key_id[:12]}, not this run's {public.key_id.hex()[:12]}")
        return key_id

    received = session.exchange("keyshare", "query.keyshare", shares, 0, read_share)
    for node in [n for n in session.nodes if n != dealer and n not in received]:
        del session.orgs[node]  # without the key it can take no part in an encrypted round
    session.require(session.orgs, "key ceremony", 0)
    logger.info(
        "key ceremony: %s dealt the CKKS key to %d organization(s); run %s",
        session.name(dealer),
        len(received),
        run,
    )
    p = public.parameters
    return {
        "dealer": session.name(dealer),
        "key_holders": len(session.orgs),
        "ckks": {
            "poly_modulus_degree": p.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes),
            "global_scale_bits": round(math.log2(p.global_scale), 3),
            "max_clients": p.max_clients,
        },
    }


def strategy_for(job: FederatedJob) -> Callable[[Session], Strategy]:
    if job.protection == "secagg+":
        from federation.secagg import SecAggFedAvgStrategy

        return SecAggFedAvgStrategy
    return STRATEGIES[job.mode]


class FederationServer:
    def __init__(
        self,
        grid: Grid,
        job: FederatedJob,
        run_id: int,
        *,
        progress: bool = False,
        strategy: Callable[[Session], Strategy] | None = None,
        node_ids: dict[str, int] | None = None,
    ) -> None:
        self.grid, self.job, self.run_id, self.progress = grid, job, run_id, progress
        self.node_ids = node_ids
        self.make_strategy = strategy or strategy_for(job)
        self.result = FederatedResult(run_id=run_id, config=job.model_dump(mode="json"), organizations=[])
        self.out = Path(job.out)

    def _write(self) -> None:
        private_dir(self.out)  # results name the organizations, their losses and epsilons
        atomic_write_json(self.out / "results.json", self.result.model_dump(mode="json"), mode=0o600)

    def _note_epsilon(self, record: RoundRecord) -> None:
        for client in record.clients:
            if "epsilon" in client.metrics:
                self.result.epsilon[client.org] = client.metrics["epsilon"]

    def run(self) -> FederatedResult:
        started = time.perf_counter()
        try:
            self.session = Session(self.grid, self.job, self.run_id)
            self.session.expected_nodes = self.node_ids
            self.strategy = self.make_strategy(self.session)
            setup = introduce(self.session)
            setup.update(self.strategy.setup())
            if self.job.protection == "ckks":
                setup["key_ceremony"] = key_ceremony(self.session, self.strategy.payload_values())
            self.result.organizations = [self.session.orgs[n].name for n in self.session.nodes]
            self.result.setup = setup
            setup_record = self.session.record(0, {}, {})  # the setup's traffic is not a round's
            if setup_record.dropped:  # but who was dropped, and why, is on record
                setup["dropped"] = [d.model_dump(mode="json") for d in setup_record.dropped]
            self._rounds()
            self.result.completed = True
        except Exception as exc:
            self.result.error = f"{type(exc).__name__}: {exc}"
            logger.error("federation stopped: %s", self.result.error)
            raise
        finally:
            self.result.seconds = time.perf_counter() - started
            self._write()
        return self.result

    def _rounds(self) -> None:
        columns = (
            TextColumn("[bold]federate {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable=not self.progress) as bar:
            task = bar.add_task(f"{self.job.mode}/{self.job.protection}", total=self.job.rounds, status="")
            for r in range(1, self.job.rounds + 1):
                record = self.strategy.round(r)
                self.result.rounds.append(record)
                self._note_epsilon(record)
                self._write()
                loss = record.summary.get("test-loss")
                status = f"{len(record.answered)} answered, {len(record.dropped)} dropped" + (
                    f", test loss {loss:.3f}" if loss is not None else ""
                )
                bar.update(task, completed=r, status=status)
            final = self.strategy.finish()
            if final is not None:
                self.result.final = final
                self._note_epsilon(final)


APP_ROOT = Path(__file__).resolve().parent.parent


def job_from_run_config(run_config: Mapping[str, Any]) -> FederatedJob:
    """`flwr run`: the job is the YAML file named by run-config `config`, with `overrides` applied
    (`key=value` entries separated by ';', as `secure-kd federate --set`). A relative path that does not
    exist in the working directory is read from the app itself (the FAB ships `configs/`), so
    `config='configs/deploy-tiny.yaml'` names the same file on every machine.

    Whoever submits the run chooses the path, and errors travel back to them (`flwr log`): for a file
    outside the app, a job that does not load is reported without its reasons, which quote the file
    (a YAML excerpt, keys, values); validate such a file where it was written (`secure-kd validate`)."""
    path = run_config.get("config")
    if not path:
        raise ValueError(
            "run-config needs `config`, the path of a federated job YAML (configs/federated-*.yaml)"
        )
    given = Path(str(path))
    shipped = (APP_ROOT / given).resolve()
    if not given.is_absolute() and not given.exists() and shipped.is_file():
        path = shipped
    inside_app = Path(str(path)).resolve().is_relative_to(APP_ROOT)
    overrides = [item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    try:
        return load_federated_job(str(path), overrides)
    except ConfigError as exc:
        if inside_app:
            raise
        raise ConfigError(
            [
                (
                    "config",
                    f"{len(exc.problems)} problem(s) loading a job from outside the app; the reasons are "
                    "withheld because they quote the file: run `secure-kd validate --config PATH` where the "
                    "file was written, or ship it in the app's configs/",
                )
            ],
            "run-config",
        ) from None


def build_server_app(
    job: FederatedJob | None = None,
    *,
    progress: bool = False,
    strategy: Callable[[Session], Strategy] | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = job if job is not None else job_from_run_config(context.run_config)
        show = progress or bool(context.run_config.get("progress", False))
        registry = context.run_config.get(NODE_IDS_KEY)
        node_ids = parse_node_ids(registry) if registry else None
        FederationServer(
            grid, resolved, context.run_id, progress=show, strategy=strategy, node_ids=node_ids
        ).run()

    return app


app = build_server_app()
