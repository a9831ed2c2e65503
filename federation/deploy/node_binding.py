"""Which Flower node each organization is: the operator's registry, handed to the ServerApp.

An organization names itself in `query.hello` (its node config `org-name`), but that name is only a claim:
any SuperNode the SuperLink admits could make it. The operator registered each organization's SuperNode key
with `flwr supernode register`, which returned the node id, and `registry.json` keeps org -> node id
(federation.deploy.registry). `secure-kd deploy run` passes that map as the run-config entry `node-ids`
(`"alpha=123;beta=456"`); the ServerApp then accepts an organization's hello only from its registered node:

    expected = parse_node_ids(run_config["node-ids"])      # {"alpha": 123, "beta": 456}
    reason = claim_refusal(expected, node_id, "alpha")      # None, or why the claim is refused

Without `node-ids` (simulation, or `flwr run` without it) names are not bound to nodes, and when two nodes
claim one name the first to answer keeps it; the ServerApp records which binding applied.
"""

from __future__ import annotations

from collections.abc import Mapping

from federation.crypto.identity import check_org

NODE_IDS_KEY = "node-ids"
MAX_NODE_ID = 2**64 - 1


def format_node_ids(registry: Mapping[str, Mapping]) -> str:
    """registry.json's entries as the run-config value; organizations without a node id are left out."""
    pairs = []
    for org, entry in sorted(registry.items()):
        node_id = entry.get("node_id")
        if node_id is not None:
            pairs.append(f"{check_org(org)}={int(node_id)}")
    return ";".join(pairs)


def parse_node_ids(text: object) -> dict[str, int]:
    """`"alpha=123;beta=456"` -> {"alpha": 123, "beta": 456}; an empty value is an empty map."""
    if not isinstance(text, str):
        raise ValueError(f"run-config `{NODE_IDS_KEY}` must be a string like 'alpha=123;beta=456'")
    expected: dict[str, int] = {}
    seen_nodes: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        org, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"run-config `{NODE_IDS_KEY}`: {item!r} is not ORG=NODE_ID")
        org, node_id = check_org(org.strip()), int(value)
        if not 0 < node_id <= MAX_NODE_ID:
            raise ValueError(f"run-config `{NODE_IDS_KEY}`: node id {node_id} of {org} is out of range")
        if org in expected or node_id in seen_nodes:
            raise ValueError(f"run-config `{NODE_IDS_KEY}`: {item!r} repeats an organization or a node id")
        expected[org], seen_nodes[node_id] = node_id, org
    return expected


def claim_refusal(expected: Mapping[str, int] | None, node_id: int, org: str) -> str | None:
    """Why node `node_id` may not be `org` under the registry `expected` (None: it may)."""
    if expected is None:
        return None
    registered = expected.get(org)
    if registered is None:
        return f"claims to be {org}, which has no registered node in the operator's registry"
    if registered != node_id:
        return f"claims to be {org}, but {org} is registered as node {registered}: an impostor node"
    return None
