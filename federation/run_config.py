"""`flwr run .`: the federated job a ServerApp or ClientApp reads from the run-config.

The run-config names a job YAML (`config`) and dotted overrides (`overrides`); both apps read it the same
way. Its own module so that the ClientApp (client/app.py) does not import the ServerApp to read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from federation.config import FederatedJob, load_federated_job
from secure_kd.config import ConfigError

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
