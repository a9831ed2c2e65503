"""An organization's saved student (`federation.client.student_store`): tied weights and LoRA adapters.

SmolLM2 ties `lm_head.weight` to `model.embed_tokens.weight`; `save_student` used `save_file` on the
whole state dict, which safetensors refuses for tied tensors, so every SmolLM2-based student crashed
the federation. A tiny tied Llama reproduces it; the references here are plain transformers and PEFT
loading the saved file, not secure-kd's own loader."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from test_federation_apps import federate, tiny_job
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from federation.client.student_store import StudentFileError
from federation.client.workspace import STUDENT_FILE, OrgWorkspace
from federation.config import FederatedJob
from federation.job_data import job_data
from federation.students import build_student, build_teacher


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Llama with tie_word_embeddings=True and the tiny job's vocabulary, as an HF directory."""
    vocab = job_data(tiny_job(tmp_path_factory.mktemp("vocab"))).vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _perturbed(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Change every trainable weight (so a reload that ignored the file, or half of it, would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _file_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(12).remainder(vocab).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_tied_student_saves_once_and_reloads_exactly_with_its_tie(tmp_path, tied_dir):
    job = tiny_job(tmp_path, student={"source": str(tied_dir)})
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    model = _perturbed(ws.student())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ws.save_student(model)  # crashed: "Some tensors share memory ... {'lm_head.weight', 'model.embed_...'}"

    path = ws.root / STUDENT_FILE
    assert "model.embed_tokens.weight" in _file_keys(path) and "lm_head.weight" not in _file_keys(path)
    reloaded = ws.student()
    _assert_same_weights(reloaded, model)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():  # still one tensor: a change through one name shows through the other
        reloaded.model.embed_tokens.weight[0, 0] += 1.0
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)

    # reference: plain transformers reads the same file as a model directory and re-ties it
    hf_dir = tmp_path / "as-hf"
    shutil.copytree(tied_dir, hf_dir)
    shutil.copyfile(path, hf_dir / "model.safetensors")
    vocab = model.config.vocab_size
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(hf_dir), vocab), _logits(model, vocab), rtol=0, atol=0
    )


def test_lora_student_is_saved_as_its_adapter_only(tmp_path, tied_dir):
    lora = {"r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}
    job = tiny_job(tmp_path, student={"source": str(tied_dir), "lora": lora})
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    model = _perturbed(ws.student())
    ws.save_student(model)

    path = ws.root / STUDENT_FILE
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert _file_keys(path) == {n.replace(".default", "") for n in trainable}  # PEFT's adapter names
    full_bytes = sum(t.numel() * t.element_size() for t in model.get_base_model().state_dict().values())
    assert path.stat().st_size * 10 < full_bytes  # 2 layers x 2 modules of rank 2: ~1.3 KB of ~200 KB
    _assert_same_weights(ws.student(), model)  # frozen base rebuilt from the job, adapters from the file

    # reference: PEFT loads the file as an adapter onto the untouched base model
    adapter_dir = tmp_path / "adapter"
    model.peft_config["default"].save_pretrained(adapter_dir)
    shutil.copyfile(path, adapter_dir / "adapter_model.safetensors")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_dir), adapter_dir)
    vocab = model.config.vocab_size
    torch.testing.assert_close(_logits(peft, vocab), _logits(model, vocab), rtol=0, atol=0)


def test_a_student_file_of_another_student_is_refused(tmp_path, tied_dir):
    lora = {"r": 2, "target_modules": ["q_proj"]}
    job = tiny_job(tmp_path, student={"source": str(tied_dir), "lora": lora})
    ws = OrgWorkspace(job, 0, tmp_path / "org")
    ws.save_student(ws.student())
    plain = tiny_job(tmp_path, student={"source": str(tied_dir)})
    with pytest.raises(StudentFileError, match="holds a LoRA adapter, the job builds a student without LoRA"):
        OrgWorkspace(plain, 0, tmp_path / "org").student()
    tiny = tiny_job(tmp_path)  # untied tiny Llama of another width
    other = OrgWorkspace(plain, 1, tmp_path / "org-1")
    other.save_student(other.student())
    with pytest.raises(StudentFileError, match="tied weights"):
        OrgWorkspace(tiny, 1, tmp_path / "org-1").student()


def test_teacher_layers_student_copies_the_teachers_layers(tmp_path):
    teacher = {"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 3, "num_heads": 2}}
    job = tiny_job(
        tmp_path, mode="fed_distill", teacher=teacher, student={"source": "teacher_layers", "layers": [0, 2]}
    )
    public = job_data(job)
    reference, student = build_teacher(job, public), build_student(job, 0, public)
    assert len(student.model.layers) == 2
    teacher_state = reference.state_dict()
    for name, value in student.state_dict().items():  # layer i of the student is teacher layer [0, 2][i]
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str([0, 2][int(parts[2])])
        assert torch.equal(value, teacher_state[".".join(parts)]), name
    assert all(p.requires_grad for p in student.parameters())


def test_fed_distill_with_teacher_layers_students_runs_and_saves_them(tmp_path):
    teacher = {"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 3, "num_heads": 2}}
    job = tiny_job(
        tmp_path,
        n_organizations=2,
        rounds=2,
        mode="fed_distill",
        teacher=teacher,
        student={"source": "teacher_layers", "layers": [0, 2]},
    )
    result, _ = federate(job)
    assert result.completed and [r.answered for r in result.rounds] == [["org-0", "org-1"]] * 2
    for index in range(2):
        ws = OrgWorkspace(job, index, tmp_path / "run" / "orgs" / f"org-{index}")
        saved, teacher_layer = ws.student(), build_teacher(job, ws.public).model.layers[2]
        assert len(saved.model.layers) == 2  # trained since it was copied from teacher layer 2
        assert not torch.equal(saved.model.layers[1].mlp.up_proj.weight, teacher_layer.mlp.up_proj.weight)


def test_fedavg_of_lora_students_on_a_tied_base(tmp_path, tied_dir):
    lora = {"r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}
    job = tiny_job(tmp_path, n_organizations=2, student={"source": str(tied_dir), "lora": lora})
    result, grid = federate(job)
    assert result.completed and result.rounds[0].answered == ["org-0", "org-1"]
    shared = {name for m, _ in grid.sent("evaluate") for name in m.content["arrays"]}
    assert shared and all(".lora_" in name for name in shared)  # only adapters cross the network


def test_teacher_layers_needs_a_teacher_with_its_tokenizer(tmp_path):
    base = tiny_job(tmp_path).model_dump(mode="json")
    with pytest.raises(
        ValueError, match="teacher_layers copies layers of the teacher, and this job has none"
    ):
        FederatedJob.model_validate({**base, "student": {"source": "teacher_layers", "layers": [0]}})
    with pytest.raises(ValueError, match="set tokenizer: teacher"):
        FederatedJob.model_validate(
            {**base, "teacher": {"source": "smollm2"}, "student": {"source": "teacher_layers", "layers": [0]}}
        )
