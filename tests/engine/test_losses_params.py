"""Typed loss parameters: one pydantic model per objective checks a direct call, the fused loss, the
config's `kd.params` (errors at `kd.params.<name>` with the range and a fix that works) and the schema."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import ConfigError, KDConfig, load_config, loss_parameters
from secure_kd.losses import (
    CROSS_TOKENIZER_ARGUMENTS,
    LossParams,
    LossParamsError,
    available_losses,
    check_params,
    fused_linear_kd_loss,
    get_loss,
    loss_info,
)

# what the trainer passes to every objective, never a parameter of the objective itself
TRAINER_ARGUMENTS = {"self", "student_logits", "teacher_logits", "labels", "temperature", "reduction", "tail"}
TRAINER_ARGUMENTS |= {"chunk_size", "student_hidden", "teacher_hidden"}


def keyword_parameters(name: str) -> dict:
    entry = get_loss(name)
    signature = inspect.signature(entry.__init__ if loss_info(name).stateful else entry)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in TRAINER_ARGUMENTS | CROSS_TOKENIZER_ARGUMENTS and p.kind != p.VAR_KEYWORD
    }


@pytest.mark.parametrize("name", available_losses())
def test_each_params_model_is_exactly_the_objectives_keyword_parameters(name):
    """The model and the call cannot drift apart: same names, same defaults, in the same order."""
    model = loss_info(name).params
    assert issubclass(model, LossParams)
    declared = {
        n: (inspect.Parameter.empty if f.is_required() else f.default) for n, f in model.model_fields.items()
    }
    assert list(declared.items()) == list(keyword_parameters(name).items())
    assert loss_parameters(name) == declared  # what the config reports


def test_the_documented_parameters_and_ranges():
    """DESIGN.md: jsd beta in [0, 1] (default 0.5), skew_* alpha in [0, 1) (default 0.1)."""
    schema = {n: loss_info(n).params.model_json_schema()["properties"] for n in available_losses()}
    assert schema["jsd"] == {"beta": schema["jsd"]["beta"]}
    assert {k: schema["jsd"]["beta"][k] for k in ("default", "minimum", "maximum")} == {
        "default": 0.5,
        "minimum": 0,
        "maximum": 1,
    }
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        alpha = schema[name]["alpha"]
        assert (alpha["default"], alpha["minimum"], alpha["exclusiveMaximum"]) == (0.1, 0, 1)
    for name in ("forward_kl", "reverse_kl", "tvd", "ce", "uld"):
        assert schema[name] == {}


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("jsd", {"beta": 1.5}, r"beta=1.5 .*beta: a number in \[0, 1\], default 0.5"),
        ("jsd", {"beta": True}, r"beta=True .*valid number"),  # no booleans for numbers (strict)
        ("jsd", {"beta": "0.5"}, r"beta='0.5' .*valid number"),  # no strings for numbers
        ("skew_reverse_kl", {"alpha": 1.0}, r"alpha: a number in \[0, 1\)"),
        ("token_selective", {"ratio": 0.0}, r"ratio: a number in \(0, 1\]"),
    ],
)
def test_a_direct_call_names_the_parameter_and_its_range(name, params, needle):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    with pytest.raises(LossParamsError, match=needle):
        get_loss(name)(student, teacher, **params)
    with pytest.raises(LossParamsError, match=needle):
        check_params(name, params)


def test_stateful_and_cross_field_rules_live_in_the_model():
    with pytest.raises(LossParamsError, match=r"t_start=0.9 must be <= t_end=0.5"):
        get_loss("taid")(t_start=0.9, t_end=0.5)
    with pytest.raises(LossParamsError, match=r"t_start=nan .*finite"):
        get_loss("taid")(t_start=float("nan"))
    with pytest.raises(LossParamsError, match="student_dim=0"):
        get_loss("hidden_mse")(0, 4)
    with pytest.raises(LossParamsError, match="both"):
        check_params("span_aligned", {"matched_weight": 0.5})
    assert check_params("span_aligned", {"matched_weight": 1, "unmatched_weight": 0}) == {
        "matched_weight": 1.0,
        "unmatched_weight": 0.0,
    }


def test_the_fused_loss_checks_with_the_same_model():
    hidden, weight = torch.randn(4, 3), torch.randn(7, 3)
    teacher = torch.randn(4, 7)
    with pytest.raises(LossParamsError, match=r"unexpected parameters for loss 'tvd': \['beta'\]"):
        fused_linear_kd_loss(hidden, weight, teacher, loss="tvd", beta=0.5)
    with pytest.raises(LossParamsError, match=r"alpha: a number in \[0, 1\)"):
        fused_linear_kd_loss(hidden, weight, teacher, loss="skew_forward_kl", alpha=1)


def config_problems(overrides: list[str]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", overrides)
    return dict(info.value.problems)


def test_kd_params_errors_name_the_field_the_range_and_a_fix_that_validates():
    found = config_problems(["kd.params.beta=1.5"])
    assert list(found) == ["kd.params.beta"], found
    message = found["kd.params.beta"]
    assert "got 1.5" in message and "[0, 1], default 0.5" in message
    fix = re.search(r"--set (\S+)\)", message).group(1)
    assert load_config("configs/tiny.yaml", [fix]).kd.params == {"beta": 0.5}

    found = config_problems(["kd.loss=taid", "kd.params={t_start: 0.2, gamma: 3, beta: 2}"])
    assert set(found) == {"kd.params", "kd.params.beta"}, found
    assert "params ['gamma'] do not apply to loss 'taid'" in found["kd.params"]
    assert "beta: a number in [0, 1], default 0.99" in found["kd.params.beta"]
    fix = re.search(r"--set '(.+)'\)", found["kd.params"]).group(1)  # keeps t_start and beta, drops gamma
    assert config_problems(["kd.loss=taid", fix]).keys() == {"kd.params.beta"}

    found = config_problems(["kd.loss=taid", "kd.params={t_start: 0.9, t_end: 0.5}"])
    assert found == {"kd.params": "t_start=0.9 must be <= t_end=0.5 (loss 'taid')"}
    found = config_problems(["kd.loss=hidden_mse", "kd.params={student_dim: 4, teacher_dim: 4}"])
    assert "hidden states" in found["kd"]


def test_kd_params_come_out_typed_and_as_given():
    job = load_config("configs/tiny.yaml", ["kd.loss=skew_forward_kl", "kd.params={alpha: 0}"])
    assert job.kd.params == {"alpha": 0.0} and isinstance(job.kd.params["alpha"], float)
    assert KDConfig(loss="taid").params == {}  # defaults are the objective's, not copied in
    found = config_problems(["kd.params={beta: '0.5'}"])
    assert "valid number (got '0.5')" in found["kd.params.beta"]


def test_switching_the_loss_on_a_built_config_is_checked_too():
    kd = KDConfig(loss="jsd", params={"beta": 0.2})
    with pytest.raises(ValueError, match=r"params \['beta'\] do not apply to loss 'reverse_kl'"):
        kd.loss = "reverse_kl"


def distill_schema() -> dict:
    result = CliRunner().invoke(app, ["validate", "--schema", "--kind", "distill"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_distill_schema_carries_each_losses_params_model():
    kd = distill_schema()["$defs"]["KDConfig"]
    names = kd["properties"]["loss"]["enum"]
    assert "jsd" in names and "taid" in names and "hidden_mse" not in names  # hidden_mse is refused
    by_loss = {
        rule["if"]["properties"]["loss"]["const"]: rule["then"]["properties"]["params"]
        for rule in kd["allOf"]
    }
    assert set(by_loss) == set(names)
    assert (
        by_loss["jsd"]["properties"]["beta"]["maximum"] == 1
        and by_loss["jsd"]["additionalProperties"] is False
    )
    assert by_loss["reverse_kl"]["properties"] == {}


def test_a_json_schema_validator_applies_the_chosen_losses_model():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(distill_schema())

    def ok(kd_section: dict) -> bool:
        return validator.is_valid({"kd": kd_section})

    assert ok({"loss": "jsd", "params": {"beta": 0.3}})
    assert not ok({"loss": "jsd", "params": {"beta": 1.3}})
    assert not ok({"loss": "reverse_kl", "params": {"beta": 0.3}})  # another loss's parameter
    assert ok({"loss": "skew_reverse_kl", "params": {"alpha": 0.0}})
    assert not ok({"loss": "skew_reverse_kl", "params": {"alpha": 1.0}})
    assert ok({"loss": "taid", "params": {"t_start": 0.2, "adaptive": False}})
