"""The example configs, installed as the package `secure_kd.resources.configs` (data only, no code).

setup.py maps this directory onto that package and pyproject.toml ships its YAML and JSONL files, so a
wheel carries them and `secure_kd.resources.configs_dir()` finds them in an editable install too.
"""
