"""Federations of real SmolLM2-135M-Instruct (Q4_1) students through Flower's simulation engine (slow).

Both used to crash in `save_student` (safetensors refuses SmolLM2's tied `lm_head.weight` /
`model.embed_tokens.weight`), and `student.source: teacher_layers` was refused in federated jobs.
`configs/federated-smollm2-smoke.yaml` is the reduced job: 2 organizations, 1 round, 32-token
sequences, 2 local steps. References: the asset's own safetensors file and the server's global model.

    .venv/bin/python -m pytest -m slow tests/federation/test_federation_real_model.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from federation.client.student_store import FORMAT_KEY, student_file_metadata
from federation.client.workspace import STUDENT_FILE, OrgWorkspace
from federation.config import load_federated_job
from federation.run import run_federation

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "federated-smollm2-smoke.yaml"
LORA = ["mode=fedavg", "teacher=null", "tokenizer=smollm2"]
LORA_STUDENT = "student={source: smollm2, lora: {r: 4, target_modules: [q_proj, v_proj]}}"


@pytest.fixture(scope="module")
def asset() -> Path:
    from secure_kd.assets import fetch_smollm2

    return fetch_smollm2(log=lambda *_: None) / "model.safetensors"


def _asset_tensor(asset: Path, name: str) -> torch.Tensor:
    with safe_open(str(asset), framework="pt") as handle:
        return handle.get_tensor(name)


def _run(tmp_path: Path, overrides: list[str]):
    job = load_federated_job(CONFIG, [f"out={tmp_path / 'run'}", *overrides])
    result = run_federation(job, progress=False)
    assert result.completed and [r.answered for r in result.rounds] == [["org-0", "org-1"]]
    assert result.final is not None and result.final.answered == ["org-0", "org-1"]
    return job, result


def _org(job, tmp_path: Path, index: int) -> OrgWorkspace:
    return OrgWorkspace(job, index, tmp_path / "run" / "orgs" / f"org-{index}")


def test_smollm2_lora_students_federate_with_fedavg(tmp_path, asset):
    job, result = _run(tmp_path, [*LORA, LORA_STUDENT])
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final.summary.values())
    global_model = load_file(str(tmp_path / "run" / "global-student.safetensors"))
    assert global_model and all(".lora_" in name for name in global_model)  # only adapters were shared
    for index in range(2):
        ws = _org(job, tmp_path, index)
        path = ws.root / STUDENT_FILE
        assert student_file_metadata(path)[FORMAT_KEY] == "adapter"
        assert path.stat().st_size * 100 < asset.stat().st_size  # ~0.9 MB of adapters vs 538 MB
        student = ws.student()
        params = dict(student.named_parameters())
        for name, value in global_model.items():  # the last global model, installed and saved
            assert torch.equal(params[name].detach(), value), name
        base = student.get_base_model()
        assert base.lm_head.weight is base.model.embed_tokens.weight
        assert torch.equal(base.model.embed_tokens.weight, _asset_tensor(asset, "model.embed_tokens.weight"))


def test_smollm2_layer_dropped_students_federate_with_fed_distill(tmp_path, asset):
    job, result = _run(tmp_path, [])
    assert "digest-loss" in result.final.summary  # the organizations distilled from the ensemble
    for index in range(2):
        ws = _org(job, tmp_path, index)
        path = ws.root / STUDENT_FILE
        assert student_file_metadata(path)[FORMAT_KEY] == "full"
        with safe_open(str(path), framework="pt") as handle:
            assert "lm_head.weight" not in handle.keys()  # stored once, under the embedding's name
        student = ws.student()
        assert len(student.model.layers) == 2
        assert student.lm_head.weight is student.model.embed_tokens.weight
        # frozen embeddings are the teacher's; the kept block of teacher layer 29 has trained
        assert torch.equal(
            student.model.embed_tokens.weight, _asset_tensor(asset, "model.embed_tokens.weight")
        )
        teacher_29 = _asset_tensor(asset, "model.layers.29.mlp.up_proj.weight")
        assert student.model.layers[1].mlp.up_proj.weight.shape == teacher_29.shape
        assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher_29)
