"""The Flower ServerApp of `secure-kd federate`.

    app = build_server_app(job)      # simulation (federation/run.py) binds the job
    app                              # `flwr run .`: reads run-config `config` (a YAML path) and `overrides`

The server waits for the organizations, learns who is who (`query.hello`), runs the CKKS key ceremony
when the job asks for it (the dealer's sealed secret contexts are relayed as opaque bytes; the server
keeps only the public context), then runs `rounds` rounds of the mode's strategy (fewer when its privacy
budget stops the run before a round: client-level DP, `stop_before`) and writes `<out>/results.json`
(also after a failure, with the error). Every exchange goes through `Session`
(session.py), which drops a client that fails, times out or sends a message that fails validation,
logs the reason, and stops the run if fewer than `min_clients` organizations are left in a round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from federation.config import FederatedJob
from federation.crypto.he import load_public_context
from federation.crypto.identity import PublicBundle
from federation.deploy.node_binding import NODE_IDS_KEY, claim_refusal, parse_node_ids
from federation.messages import CONFIG, MessageRejected, read_config
from federation.results import FederatedResult, RoundRecord
from federation.run_config import job_from_run_config
from federation.server.session import FederationFailed, Org, Session
from federation.server.strategies import strategy_for
from federation.server.strategies.base import Strategy
from secure_kd.paths import atomic_write_json, private_dir

logger = logging.getLogger("secure_kd.federation")
NODE_POLL_SECONDS = 0.2


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
        strategy = getattr(self, "strategy", None)
        if strategy is not None:
            self.result.client_dp = strategy.privacy_report()
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
                stop = self.strategy.stop_before(r)  # a client-level privacy budget: stop cleanly here
                if stop is not None:
                    bar.update(task, status="stopped by the privacy budget")
                    break
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
