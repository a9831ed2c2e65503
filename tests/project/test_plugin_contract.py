"""The one plugin contract: every registered attack and defense keeps it, and a new attack written in
one file (here: a third-party package made in the test) shows up in `secure-kd attack list` and runs
inside `secure-kd audit` with no edit anywhere else.

Every plugin also ships an example config (configs/attacks, configs/defenses). Each plugin's own tiny
run lives in its test file (tests/attacks, tests/defenses); here every plugin's
registration is checked against its Config: the default config round-trips and stays strict, and each
field the registration names (target, inputs, with_model, requires) exists, so the audit never writes a
model or a record file into a field that is not there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from attacks import available_attacks, get_attack
from defenses import available_defenses, get_defense
from secure_kd.app.report.config import default_thresholds
from secure_kd.config import read_yaml
from secure_kd.plugins import TARGET_KINDS, PluginConfig

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = [("attack", n) for n in available_attacks()] + [("defense", n) for n in available_defenses()]


def _plugin(kind: str, name: str):
    return get_attack(name) if kind == "attack" else get_defense(name)


def _has_field(model: type[BaseModel], dotted: str) -> bool:
    """Whether the dotted path names a field of the pydantic model (through nested models)."""
    node: type[BaseModel] | None = model
    for part in dotted.split("."):
        if node is None or part not in node.model_fields:
            return False
        annotation = node.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        node = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return True


def _example(kind: str, name: str) -> Path:
    return ROOT / "configs" / ("attacks" if kind == "attack" else "defenses") / f"{name}.yaml"


def test_every_attack_and_defense_ships_an_example_config():
    missing = [f"{kind} {name}" for kind, name in PLUGINS if not _example(kind, name).is_file()]
    assert not missing, f"no example config under configs/ for: {missing}"


def test_every_attack_and_defense_is_registered():
    assert {"membership", "memorization", "clone", "logit_leak", "backdoor"} <= set(available_attacks())
    assert {"swing", "backdoor_unlearning", "forgetting"} <= set(available_defenses())


@pytest.mark.parametrize(("kind", "name"), PLUGINS, ids=[f"{k}:{n}" for k, n in PLUGINS])
def test_plugin_keeps_the_contract(kind, name, tmp_path):
    plugin = _plugin(kind, name)
    assert plugin.name == name and plugin.summary
    assert issubclass(plugin.Config, PluginConfig)
    example = read_yaml(_example(kind, name))  # its required fields, e.g. the clone's query budget
    config = plugin.Config.model_validate({**example, "seed": 3, "out": str(tmp_path)})
    dumped = config.model_dump(mode="json")
    assert dumped["seed"] == 3 and dumped["out"] == str(tmp_path)
    assert dumped["device"] in ("auto", "cpu", "cuda")
    assert plugin.Config.model_validate(dumped).model_dump(mode="json") == dumped  # round trip
    with pytest.raises(ValidationError, match="stpe"):
        plugin.Config.model_validate({**dumped, "stpe": 4})  # strict: a typo is refused, not ignored
    assert plugin.Result.model_json_schema()["type"] == "object"
    assert set(plugin.kinds) <= set(TARGET_KINDS)
    named = [plugin.target] if plugin.target else []
    named += [i.field for i in plugin.inputs.values()] + [f for i in plugin.inputs.values() for f in i.also]
    named += list(plugin.with_model) + [r.field for r in plugin.requires]
    missing = [field for field in named if not _has_field(plugin.Config, field)]
    assert not missing, f"{name}'s registration names fields its Config does not have: {missing}"


def test_attack_metrics_have_thresholds_with_reasons():
    thresholds = default_thresholds()
    for name in available_attacks():
        for metric in get_attack(name).metrics:
            assert metric.why and metric.name in thresholds
            t = thresholds[metric.name]
            assert (t.medium < t.high) if t.higher_is_worse else (t.medium > t.high)


TOY_ATTACK = '''
"""A toy attack in one file: it reads the width of the model it is given and reports it, scaled."""
import json
from pathlib import Path

from pydantic import BaseModel

from secure_kd.plugins import Metric, Plugin, PluginConfig, write_result


class ToyConfig(PluginConfig):
    out: str = "runs/toy"
    model: str = "none given"


class ToyResult(BaseModel):
    width_score: float
    model: str


def run(config: ToyConfig) -> ToyResult:
    width = json.loads((Path(config.model) / "config.json").read_text())["hidden_size"]
    result = ToyResult(width_score=width / 100, model=config.model)
    write_result(config.out, result)
    return result


PLUGIN = Plugin(
    name="toy_width", Config=ToyConfig, Result=ToyResult, run=run, summary="toy: the width of a model",
    target="model", kinds=("causal_lm",),
    metrics=(
        Metric("toy_width_score", risk="toy_risk", medium=0.1, high=0.5, why="a toy", path="width_score"),
    ),
)
'''


def _third_party_package(root: Path) -> dict[str, str]:
    """A package installed the way pip would leave it: a module and its dist-info entry point."""
    root.mkdir()
    (root / "toy_attack.py").write_text(textwrap.dedent(TOY_ATTACK))
    info = root / "toy_attack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-attack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[secure_kd.attacks]\ntoy_width = toy_attack:PLUGIN\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_a_new_attack_in_one_file_is_listed_and_runs_inside_the_audit(tmp_path, tiny_llama):
    env = _third_party_package(tmp_path / "site")
    cli = [sys.executable, "-m", "secure_kd.app.cli"]
    listed = subprocess.run([*cli, "attack", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "toy_width: toy: the width of a model" in listed.stdout

    model = tmp_path / "model"
    tiny_llama(hidden=32).save_pretrained(model)
    suite = tmp_path / "suite.yaml"
    suite.write_text("suite:\n  - attack: toy_width\n")
    out = tmp_path / "audit"
    args = [*cli, "audit", "-c", str(suite), "--model", str(model), "-o", str(out), "--no-progress"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    (measurement,) = result["measurements"]
    # the audited model went into the toy's own target field: hidden size 32 -> 0.32, medium risk
    assert measurement["metric"] == "toy_width_score" and measurement["value"] == pytest.approx(0.32)
    assert measurement["level"] == "medium" and measurement["risk"] == "toy_risk"
    assert result["entries"][0]["ran_on"].startswith(str(model))


def test_a_broken_third_party_attack_is_named_and_the_others_still_load(tmp_path):
    env = _third_party_package(tmp_path / "site")
    (tmp_path / "site" / "toy_attack.py").write_text("raise ImportError('planted')\n")
    cli = [sys.executable, "-m", "secure_kd.app.cli"]
    listed = subprocess.run([*cli, "attack", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "membership:" in listed.stdout and "toy_width" in listed.stdout and "planted" in listed.stdout
