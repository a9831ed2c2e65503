"""A deviating ServerApp against the real ClientApps (issue 13 item 2): it probes the clients' errors for
decrypted values and must get generic codes only; after one malformed aggregate a client decrypts
nothing more in that run.

The server runs an honest CKKS fed_distill round 1, keeps org-0's upload, then sends as "aggregates":
- to org-1: org-0's upload negated with 2 added to its weight slot, which decrypts to -1 x org-0's soft
  labels at weight 1 (the soft-label check used to report their min and max in its error text);
- to org-2: org-0's upload negated (weight -1: the error used to carry the exact noisy weight, an
  IND-CPA-D decryption oracle).
In round 3 it sends both of them the honest round-1 aggregate: a well-formed one they now refuse.
Every ciphertext operation here needs only the public context the server holds."""

from __future__ import annotations

import re

import numpy as np
import tenseal as ts
from flwr.app import ConfigRecord, RecordDict
from test_federation_apps import RUN_ID, federate, tiny_job

import federation.client.decrypt as client_decrypt
from federation.client.errors import read_failures
from federation.client.guard import current_workspace
from federation.client.workspace import OrgWorkspace
from federation.crypto.codec import PayloadKind, iter_chunks, pack_payload
from federation.crypto.he import check_payload
from federation.messages import CONFIG
from federation.server.aggregation import aggregate_encrypted
from federation.server.strategies.fed_distill import FedDistillStrategy


class ProbingServer(FedDistillStrategy):
    def __init__(self, session) -> None:
        super().__init__(session)
        self.uploads: dict[int, bytes] = {}

    def _read(self, org, content):
        payload, metrics = super()._read(org, content)
        self.uploads[org.node_id] = payload
        return payload, metrics

    def _forged(self, upload: bytes, add_to_weight: float) -> bytes:
        public = self.session.public
        header = check_payload(public, upload)
        chunks = []
        for index, chunk in enumerate(iter_chunks(upload, header)):
            vector = ts.ckks_vector_from(public.context, chunk).neg()
            if index == header.n_chunks - 1:
                shift = np.zeros(vector.size())
                shift[-1] = add_to_weight
                vector = vector + shift.tolist()
            chunks.append(vector.serialize())
        return pack_payload(PayloadKind.AGGREGATE, public.key_id, header.n_values, 1, header.slots, chunks)

    def round(self, r: int):
        s = self.session
        if r == 1:
            record = super().round(1)
            self.first_sum = self.encrypted_sum
            return record
        node = {s.orgs[n].name: n for n in s.nodes}
        contents = {n: self._content(r) for n in s.nodes}
        layout = s.data.layout.fingerprint

        def probe(blob: bytes) -> RecordDict:
            return RecordDict({CONFIG: ConfigRecord({"round": r, "layout": layout, "aggregate": blob})})

        if r == 2:
            contents[node["org-1"]] = probe(self._forged(self.uploads[node["org-0"]], add_to_weight=2.0))
            contents[node["org-2"]] = probe(self._forged(self.uploads[node["org-0"]], add_to_weight=0.0))
        else:
            contents[node["org-1"]] = contents[node["org-2"]] = probe(self.first_sum)
        replies = s.exchange(self.stage, "train", contents, r, self._read)
        s.require(replies, self.stage, r)
        self.encrypted_sum, _ = aggregate_encrypted(s.public, {n: p for n, (p, _) in replies.items()})
        return s.record(r, {n: m for n, (_, m) in replies.items()}, {"kind": "probe"})


def _probe_job(tmp_path):
    return tiny_job(
        tmp_path, mode="fed_distill", protection="ckks", rounds=3, min_clients=1, ckks={"max_abs_update": 1.0}
    )


def test_a_probing_server_gets_generic_codes_and_the_clients_stop_decrypting(tmp_path, monkeypatch):
    decryptions: list[tuple[str, int]] = []
    real = client_decrypt.decrypt_aggregate

    def spy(keyring, blob, length):
        decryptions.append((current_workspace().name, current_round[0]))
        return real(keyring, blob, length)

    current_round = [0]
    monkeypatch.setattr(client_decrypt, "decrypt_aggregate", spy)
    original_round = ProbingServer.round

    def counted(self, r):
        current_round[0] = r
        return original_round(self, r)

    monkeypatch.setattr(ProbingServer, "round", counted)
    job = _probe_job(tmp_path)
    result, grid = federate(job, strategy=ProbingServer)

    replies = {}
    for message, reply in grid.sent("train"):
        replies.setdefault(
            grid.contexts[message.metadata.dst_node_id].node_config["partition-id"], []
        ).append(reply)
    for org in (1, 2):
        second, third = replies[org][1], replies[org][2]
        assert (
            second.has_error()
            and second.error.reason == f"secure-kd/malformed-aggregate at train from org-{org}"
        )
        assert (
            third.has_error()
            and third.error.reason == f"secure-kd/decryption-stopped at train from org-{org}"
        )
    # nothing the server received from any client in any stage carries a number with decimals
    for _, reply in grid.log:
        if reply.has_error():
            assert not re.search(r"\d\.\d|e-\d", reply.error.reason), reply.error.reason
    # the refusal is real: after its malformed aggregate, neither org-1 nor org-2 decrypted anything
    assert ("org-1", 2) in decryptions and ("org-2", 2) in decryptions
    for org in ("org-1", "org-2"):
        assert [r for name, r in decryptions if name == org] == [2]
    assert [r for name, r in decryptions if name == "org-0"] == [2, 3, 3]  # rounds 2, 3 and the final digest
    # the run goes on with the honest organization; the deviating rounds are on record
    assert result.completed and result.final.answered == ["org-0"]
    drops = {(d.org, d.reason) for d in result.rounds[1].dropped}
    assert drops == {
        ("org-1", "client failed: secure-kd/malformed-aggregate at train from org-1"),
        ("org-2", "client failed: secure-kd/malformed-aggregate at train from org-2"),
    }
    # the organizations' own logs name the failed check, without the values
    for org, check in (("org-1", "soft-label check"), ("org-2", "total weight is not a positive")):
        entries = read_failures(tmp_path / "run" / "orgs" / org, RUN_ID)
        assert [e["code"] for e in entries] == [
            "malformed-aggregate",
            "decryption-stopped",
            "decryption-stopped",
        ]
        assert check in entries[0]["cause"] and not re.search(r"\d\.\d", entries[0]["cause"])


def test_the_stop_is_per_run(tmp_path):
    job = _probe_job(tmp_path)
    ws = OrgWorkspace(job, 1, tmp_path / "org")
    client_decrypt.stop_decrypting(ws, 7)
    assert client_decrypt.decryption_stopped(ws, 7) and not client_decrypt.decryption_stopped(ws, 8)
    ws.start_run()  # a new run's query.hello (or a replayed one) does not lift it
    assert client_decrypt.decryption_stopped(ws, 7)
