"""Every YAML under configs/ is valid for what reads it (configs/README.md says which is for what).

Job configs go through `secure-kd validate` (its kind inferred from the keys, as a user runs it); the
attack and defense configs through their plugin's Config; the experiment configs through the config
model of the benchmark script that reads them, down to every job or plugin config the script builds.
A YAML that no rule here covers fails the test: a new config is validated from the day it lands.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from secure_kd.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
EXPERIMENTS = ROOT / "benchmarks" / "experiments"


def _all_yaml() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


def _read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _script(name: str):
    """A benchmark script as a module (its sibling modules importable, as when it runs)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"_experiment_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # pydantic resolves the script's annotations through it
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _plugin_config(kind: str, name: str, data: dict[str, Any]) -> None:
    if kind == "attack":
        from attacks import get_attack as get
    else:
        from defenses import get_defense as get
    get(name).Config.model_validate(data)


def _experiment_config_model(name: str) -> None:
    _script(name).ExperimentConfig.model_validate(_read(CONFIGS / "experiments" / f"{name}.yaml"))


def _robust_aggregation(path: Path) -> None:
    cfg = _read(path)
    _plugin_config("defense", "robust_aggregation", {**cfg["defense"], "federation": cfg["federation"]})
    _plugin_config("attack", "federated", {**cfg["attack"], "federation": cfg["federation"]})


def _fed_noniid(path: Path) -> None:
    script = _script("fed_noniid")
    cfg = _read(path)
    for seed in cfg["seeds"]:
        for _, arm in script._arms(cfg):
            script._job(cfg, arm, seed, Path("unused"))


def _backdoor_unlearning(path: Path) -> None:
    script = _script("backdoor_unlearning")
    experiment = _read(path)
    base = _read(ROOT / experiment["base"])
    for variant in experiment["variants"]:
        for kind in variant["kinds"]:
            data = script._merge(base, {"kind": kind, **experiment.get("kind_overrides", {}).get(kind, {})})
            _plugin_config("defense", "backdoor_unlearning", script._merge(data, variant["overrides"]))


def _defensive_distillation(path: Path) -> None:
    script = _script("defensive_distillation")
    experiment = _read(path)
    names = {"defensive": "defensive_distillation"}
    for part in script.PARTS:
        if part in experiment:
            data = script._config(experiment[part], 0, Path("unused"))
            _plugin_config("defense", names.get(part, "adversarial_distillation"), data)


EXPERIMENT_RULES = {
    "robust_aggregation.yaml": _robust_aggregation,
    "fed_noniid.yaml": _fed_noniid,
    "fed_pairing.yaml": _fed_noniid,  # the same script, its pairing arms
    "backdoor_unlearning.yaml": _backdoor_unlearning,
    "defensive_distillation.yaml": _defensive_distillation,
    "bias_cascade_seed1.yaml": lambda path: _script("bias_cascade").ExperimentConfig.model_validate(
        _read(path)
    ),
    "logit_leak_smollm2.yaml": lambda path: _script("clone_smollm2").ExperimentConfig.model_validate(
        _read(path)
    ),
}


# Templates the demo fills in: placeholder -> a stand-in of the same kind (record files; the warm-start
# student's directory).
TEMPLATES = {"demo-audit.yaml": ("MEMBERS", "NONMEMBERS"), "demo-federated.yaml": ("WARM_START",)}
DIRECTORIES = {"WARM_START"}


def _filled(path: Path, tmp: Path) -> Path:
    """`path`, or for a template a copy whose placeholders name stand-in record files."""
    placeholders = TEMPLATES.get(path.name)
    if placeholders is None or path.parent != CONFIGS:
        return path
    text = path.read_text(encoding="utf-8")
    for name in placeholders:
        if name in DIRECTORIES:
            stand_in = tmp / name.lower()
            stand_in.mkdir(exist_ok=True)
        else:
            stand_in = tmp / f"{name.lower()}.jsonl"
            stand_in.write_text('{"text": "a record"}\n', encoding="utf-8")
        text = text.replace(f" {name},", f" {stand_in},")
    filled = tmp / path.name
    filled.write_text(text, encoding="utf-8")
    return filled


def _validate(relative: str, tmp: Path | None = None) -> None:
    path = CONFIGS / relative
    parts = Path(relative).parts
    if len(parts) == 1:
        if tmp is not None:
            path = _filled(path, tmp)
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0 and "ok" in result.output, f"{relative}:\n{result.output}"
    elif parts[0] in ("attacks", "defenses"):
        _plugin_config(parts[0][:-1].replace("defens", "defense"), Path(parts[1]).stem, _read(path))
    elif parts[0] == "experiments":
        rule = EXPERIMENT_RULES.get(parts[1])
        if rule is not None:
            rule(path)
        elif (EXPERIMENTS / f"{Path(parts[1]).stem}.py").exists():
            _experiment_config_model(Path(parts[1]).stem)
        else:
            pytest.fail(f"configs/{relative}: no benchmark script reads it; add a rule to this test")
    else:
        pytest.fail(f"configs/{relative}: no rule validates configs in {parts[0]}/; add one to this test")


@pytest.mark.parametrize("relative", _all_yaml())
def test_every_config_validates(relative, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name each other and their data from the repository root
    _validate(relative, tmp_path)


def test_configs_readme_names_every_config():
    text = (CONFIGS / "README.md").read_text(encoding="utf-8")
    named = {name for name in _all_yaml() if f"`{name}`" in text}
    plugin_dirs = {"attacks", "defenses"}  # named by plugin: `NAME` under its package's heading
    plugins = {n for n in _all_yaml() if Path(n).parts[0] in plugin_dirs and f"`{Path(n).stem}`" in text}
    missing = sorted(set(_all_yaml()) - named - plugins)
    assert not missing, f"say in configs/README.md what these are for: {missing}"


def test_the_check_refuses_a_broken_config(tmp_path, monkeypatch):
    broken = tmp_path / "configs"
    (broken / "attacks").mkdir(parents=True)
    data = _read(CONFIGS / "attacks" / "membership.yaml")
    (broken / "attacks" / "membership.yaml").write_text(yaml.safe_dump({**data, "no_such_field": 1}))
    monkeypatch.setattr(sys.modules[__name__], "CONFIGS", broken)
    with pytest.raises(Exception, match="no_such_field"):
        _validate("attacks/membership.yaml")
