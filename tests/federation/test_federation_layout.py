"""The federation's layout by concern (issue 14 B): the stable names of DESIGN.md still import and work
from where they always were; the client, server and crypto subpackages import only downward; the
honest ClientApp never reads the job's test roles, and the deployed one installs none of their mods."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest


def test_the_stable_he_names_import_and_compute_a_weighted_sum():
    from federation import he
    from federation.crypto import he as implementation

    assert he.Keyring is implementation.Keyring
    ring = he.Keyring.generate()
    public = ring.public_context()
    a, b = np.array([1.0, -2.0, 0.5]), np.array([3.0, 4.0, -1.0])
    total = he.aggregate(public, [he.encrypt(ring, a, 2.0), he.encrypt(ring, b, 1.0)])
    # the weighted sum by hand: 2 * a + 1 * b
    np.testing.assert_allclose(he.decrypt(ring, total, 3), [5.0, 0.0, 0.0], atol=1e-4)


def test_the_stable_matchmaking_names_import_and_learn():
    from federation.matchmaking import LinUCB, Matchmaker

    bandit = LinUCB(2, 0.0)  # no exploration: picks the arm with the larger learned reward
    good, bad = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for _ in range(5):
        bandit.update(good, 1.0)
        bandit.update(bad, 0.0)
    assert bandit.select(np.stack([bad, good])) == 1
    assert Matchmaker(4).n_clients == 4


ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[str]:
    """Every module a file imports (module level, lazy, type-only), as dotted names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # the ClientApp never reaches the ServerApp, the simulation's roles, the simulation entry or deploy
        ("client", ("federation.server", "federation.simulation", "federation.run", "federation.deploy")),
        ("server", ("federation.client", "federation.simulation", "federation.run")),
        ("crypto", ("federation.client", "federation.server", "federation.simulation", "federation.deploy")),
    ],
)
def test_the_subpackages_import_only_downward(package, forbidden):
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "federation" / package).rglob("*.py"))
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not found, found
    # the checker sees such an import when there is one
    assert any(n.startswith("federation.client") for n in _imports(ROOT / "federation/simulation/mods.py"))


def test_the_honest_client_never_reads_the_jobs_test_roles():
    # only the door (guard, policy: to refuse them) names `adversaries` / `simulate_faults`; the handlers
    # learn of a role only through the hooks a simulation mod installs (federation.client.hooks)
    readers = {
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "federation" / "client").glob("*.py"))
        if path.name not in ("guard.py", "policy.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr in ("adversaries", "simulate_faults")
    }
    assert not readers, readers


def test_the_deployed_client_app_has_no_test_role_mods_and_loads_none():
    from federation.simulation.adversary import adversary_mod
    from federation.simulation.faults import fault_mod
    from federation.simulation.mods import simulation_client_app

    component = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert component == {"serverapp": "federation.server.app:app", "clientapp": "federation.client.app:app"}
    code = (
        "import json, sys; from federation.client.app import app; import federation.server.app; "
        "print(json.dumps([list(map(str, app.handler_mods)), "
        "sorted(m for m in sys.modules if m.startswith(('federation.simulation', 'attacks', 'defenses')))]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], []]
    assert simulation_client_app(None).handler_mods == (fault_mod, adversary_mod)
