"""The Ray arguments of the simulation: a local instance sized here, an existing cluster left alone."""

from __future__ import annotations

import logging

from federation.config import FederatedJob
from federation.run import ray_init_args


def _job(simultaneous_clients=None) -> FederatedJob:
    return FederatedJob.model_validate(
        dict(
            n_organizations=3,
            rounds=1,
            mode="fedavg",
            protection="plaintext",
            tokenizer="tiny:300",
            simultaneous_clients=simultaneous_clients,
            student={"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
        )
    )


def test_ray_init_args_size_a_local_instance_by_the_job():
    args = ray_init_args(_job(simultaneous_clients=2), environ={})
    assert args == {"num_cpus": 2, "include_dashboard": False, "logging_level": logging.ERROR}


def test_ray_init_args_drop_resources_on_an_existing_cluster():
    # Ray: "When connecting to an existing cluster, num_cpus and num_gpus must not be provided"
    args = ray_init_args(_job(simultaneous_clients=2), environ={"RAY_ADDRESS": "ray://head:10001"})
    assert "num_cpus" not in args and "num_gpus" not in args
    assert args["logging_level"] == logging.ERROR
    # an empty RAY_ADDRESS is no cluster: Ray starts locally, sized by the job
    assert ray_init_args(_job(simultaneous_clients=2), environ={"RAY_ADDRESS": ""})["num_cpus"] == 2
