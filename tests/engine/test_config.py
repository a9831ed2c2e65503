"""Config validation: every kind of bad input names its field and the fix."""

from __future__ import annotations

import pytest

from secure_kd.config import ConfigError, DistillJob, check_against_vocab, load_config


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text: str, overrides=()) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), list(overrides))
    return dict(info.value.problems)


def test_example_configs_validate():
    for name in ("configs/tiny.yaml", "configs/demo.yaml"):
        job = load_config(name)
        assert isinstance(job, DistillJob)


def test_defaults_and_override_types(tmp_path):
    job = load_config(write(tmp_path, "seed: 3\n"), ["train.lr=1e-4", "kd.params.beta=0.25", "out=x"])
    assert job.seed == 3 and job.train.lr == pytest.approx(1e-4) and job.kd.params == {"beta": 0.25}
    assert job.out == "x"


@pytest.mark.parametrize(
    ("text", "overrides", "field", "needle"),
    [
        ("trian: {lr: 1}\n", [], "trian", "unknown key"),  # 1 unknown top-level key
        ("train: {lr: 0.1, bogus: 2}\n", [], "train.bogus", "unknown key"),  # 2 unknown nested key
        ("train: {batch_size: eight}\n", [], "train.batch_size", "integer"),  # 3 wrong type
        ("kd: {temperature: 0}\n", [], "kd.temperature", "> 0"),  # 4 temperature <= 0
        ("kd: {temperature: -2}\n", [], "kd.temperature", "> 0"),  # 5 negative temperature
        ("kd: {loss: jsd, params: {beta: 1.5}}\n", [], "kd.params.beta", "[0, 1]"),  # 6 beta outside [0, 1]
        ("kd: {loss: not_a_loss}\n", [], "kd", "unknown loss"),  # 7 unknown objective
        ("data: {train: /no/such/file.jsonl}\n", [], "data.train", "does not exist"),  # 8 missing file
        ("student: {source: /no/such/dir}\n", [], "student", "neither"),  # 9 missing model dir
        ("train: {lr: -1}\n", [], "train.lr", "greater than 0"),  # 10 impossible lr
        ("kd: {teacher_targets: cache, top_k: null}\n", [], "kd", "top_k"),  # 11 cache without top-k
        ("student: {source: teacher_layers}\n", [], "student", "layers"),  # 12 layer-drop without layers
        ("kd: {mode: on_policy, teacher_targets: cache}\n", [], "kd", "live"),  # 13 on-policy from cache
        ("device: tpu\n", [], "device", "auto"),  # 14 unknown device
        ("kd: {kd_weight: 0, ce_weight: 0}\n", [], "kd", "nothing to train"),  # 15 no objective
        ("student: {tiny: {hidden_size: 30, num_heads: 4}}\n", [], "student.tiny", "divisible"),  # 16
        ("seed: 1\n", ["train.lr=abc"], "train.lr", "number"),  # 17 bad override value
    ],
)
def test_bad_input_names_field_and_fix(tmp_path, text, overrides, field, needle):
    found = problems(tmp_path, text, overrides)
    assert field in found, found
    assert needle.lower() in found[field].lower(), found[field]


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(tmp_path, "kd: {temperature: 0}\ntrain: {lr: -1, batch_size: 0}\nextra: 1\n")
    assert {"kd.temperature", "train.lr", "train.batch_size", "extra"} <= set(found)


def test_not_yaml_and_not_a_mapping(tmp_path):
    assert "(yaml)" in problems(tmp_path, "a: [1, 2\n")
    assert "(top level)" in problems(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, "seed: 1\n"), ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(write(tmp_path, "seed: 1\n"), ["seed.x=1"])


def test_top_k_larger_than_vocab():
    job = DistillJob(kd={"top_k": 600})
    with pytest.raises(ConfigError, match="kd.top_k") as info:
        check_against_vocab(job, 500)
    assert "at most 500" in str(info.value)
    check_against_vocab(DistillJob(kd={"top_k": 500}), 500)


def test_yaml_cannot_execute_code(tmp_path):
    found = problems(tmp_path, "seed: !!python/object/apply:os.system ['true']\n")
    assert "(yaml)" in found
