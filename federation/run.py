"""`run_federation(job)`: N virtual organizations on this machine, through Flower's simulation engine.

    from federation.config import load_federated_job
    from federation.run import run_federation
    result = run_federation(load_federated_job("configs/federated-he.yaml", ["rounds=2"]))

What it does:
1. prepares each organization's directory `<out>/orgs/org-<i>/` with its own identity and key-exchange
   keys, and registers the public bundles in `<out>/trust/` (the out-of-band registration a real
   deployment does, e.g. alongside the SuperNode keys);
2. runs `build_server_app(job)` and `simulation_client_app(job)` (the ClientApp with the test roles'
   mods, federation.simulation.mods) with `flwr.simulation.run_simulation`
   (Ray backend, `n_organizations` SuperNodes, at most `simultaneous_clients` ClientApps at once; with
   `RAY_ADDRESS` set, on that existing Ray cluster, `ray_init_args`), with a round progress bar;
3. returns the `FederatedResult` the ServerApp wrote to `<out>/results.json`.

The same apps run under `flwr run .` (pyproject's `[tool.flwr.app]`; see docs/federation.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from federation.client.errors import read_failures
from federation.config import FederatedJob
from federation.crypto.identity import OrgKeys
from federation.results import FederatedResult
from federation.server.app import build_server_app
from federation.server.session import FederationFailed
from federation.simulation.mods import simulation_client_app
from secure_kd.paths import atomic_write_text

logger = logging.getLogger("secure_kd.federation")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _current_keys(keys_dir: Path) -> bool:
    """Keys that a simulation can keep: present, loadable (this bundle format) and not expired."""
    try:
        return not OrgKeys.load(keys_dir).public_bundle().expired()
    except (FileNotFoundError, ValueError):
        return False


def prepare_organizations(job: FederatedJob) -> Path:
    """Keys per organization (kept if present and not expired) and the trust directory of their public
    bundles."""
    out = Path(job.out)
    trust = out / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    for index in range(job.n_organizations):
        name = job.org_name(index)
        keys_dir = out / "orgs" / name / "keys"
        if not _current_keys(keys_dir):
            OrgKeys.generate(name).save(keys_dir, overwrite=True)
        shutil.copyfile(keys_dir / "bundle.json", trust / f"{name}.json")
    return trust


RAY_ADDRESS = "RAY_ADDRESS"


def ray_init_args(job: FederatedJob, environ: Mapping[str, str] | None = None) -> dict:
    """The arguments Flower's Ray backend passes to `ray.init`.

    On this machine (no `RAY_ADDRESS`), Ray starts a local instance with `simultaneous_clients` CPUs
    (default: the CPU count), which caps how many ClientApps run at once. With `RAY_ADDRESS` set,
    `ray.init()` connects to that existing cluster instead, and Ray refuses resource arguments there
    ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"): the cluster's
    own resources and `client_resources` decide the concurrency, and only logging settings are passed
    (the address itself is read by `ray.init` from the environment)."""
    environ = os.environ if environ is None else environ
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR}
    if environ.get(RAY_ADDRESS):
        return quiet
    return {"num_cpus": job.simultaneous_clients or os.cpu_count() or 1, **quiet}


def _backend_config(job: FederatedJob, environ: Mapping[str, str] | None = None) -> dict:
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": ray_init_args(job, environ)}


def _importable_by_workers() -> None:
    """Ray's worker processes import the apps by module name: make this checkout importable for them."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])


SUPERLINK_COMMAND = "flower-superlink --insecure --simulation --disable-runtime-dependency-installation"


def write_flwr_config(
    *, connection: str = "secure-kd", address: str = "127.0.0.1:8000", home: str | Path | None = None
) -> Path:
    """Add (or update) a SuperLink connection in Flower's `config.toml` for `flwr run . <connection>`.

    Flower >= 1.26 keeps connections in `$FLWR_HOME/config.toml` (default `~/.flwr`). The entry points
    at a SuperLink you start yourself with `SUPERLINK_COMMAND` (simulation runtime, one HTTP port, and no
    runtime `uv sync` of the app's dependencies: the `:local:` address starts one that installs them,
    which for this project means a multi-GB CUDA build of torch). Other connections and the default are
    left as they are. Returns the path written.
    """
    import tomli
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    from flwr.supercore.utils import get_flwr_home

    path = (Path(home) if home is not None else get_flwr_home()) / "config.toml"
    config = tomli.loads(path.read_text(encoding="utf-8") if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML)
    config.setdefault("superlink", {})[connection] = {"address": address, "insecure": True}
    atomic_write_text(path, tomli_w.dumps(config))
    return path


def failure_causes(job: FederatedJob, run_id: int | None) -> list[str]:
    """Simulation only (every organization's directory is on this machine): for each organization that
    failed in run `run_id`, `"<org>, stage <stage>: <cause>"` from its own error log, its first failure
    (later ones are often consequences, e.g. `decryption-stopped` after `malformed-aggregate`)."""
    if run_id is None:
        return []
    lines = []
    for index in range(job.n_organizations):
        name = job.org_name(index)
        entries = read_failures(Path(job.out) / "orgs" / name, run_id)
        if entries:
            first = entries[0]
            lines.append(f"{first.get('org') or name}, stage {first['stage']}: {first['cause']}")
    return lines


def failure_summary(job: FederatedJob, result: FederatedResult | None, error: str) -> str:
    """One line: who failed, at which stage, why (from the organizations' logs), then the run's error."""
    causes = failure_causes(job, result.run_id if result is not None else None)
    return "; ".join(causes) + f" [{error}]" if causes else error


def run_federation(job: FederatedJob, *, progress: bool = True) -> FederatedResult:
    """Run `job` in Flower's simulation engine. Raises FederationFailed, with one line naming each failed
    organization, its stage and the cause from its own error log, whenever the run did not complete:
    a round or the final stage with fewer than `min_clients` answers, a ServerApp that failed, or no
    results.json."""
    from flwr.simulation import run_simulation

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "job.json", json.dumps(job.model_dump(mode="json"), indent=2) + "\n")
    (out / "results.json").unlink(missing_ok=True)
    prepare_organizations(job)
    _importable_by_workers()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    error: str | None = None
    try:
        run_simulation(
            server_app=build_server_app(job, progress=progress),
            client_app=simulation_client_app(job),
            num_supernodes=job.n_organizations,
            backend_config=_backend_config(job),
        )
    except FederationFailed as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported with the organizations' causes below
        error = f"the simulation stopped: {exc}"
    path = out / "results.json"
    result = FederatedResult.model_validate_json(path.read_text()) if path.is_file() else None
    if error is None and result is None:
        error = f"the ServerApp wrote no {path}: see the log above"
    elif error is None and not result.completed:
        error = result.error or "the federation did not complete"
    if error is not None:
        raise FederationFailed(failure_summary(job, result, error))
    return result
