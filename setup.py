"""setuptools: the packages, and the example configs that ship inside them (all other metadata is in
pyproject.toml).

The top-level configs/ directory stays where a checkout, the tests and the Flower app read it, and is
also the package `secure_kd.resources.configs` of the installed distribution (package_dir), in a wheel
and in an editable install alike; its YAML and JSONL files are package data (pyproject.toml).
pyproject's `packages.find` cannot add a package mapped from outside its own directory, hence this file.
"""

from setuptools import find_packages, setup

CONFIGS = "secure_kd.resources.configs"

setup(
    packages=[
        *find_packages(include=["secure_kd*", "federation*", "attacks*", "defenses*", "apparatus*"]),
        CONFIGS,
    ],
    package_dir={CONFIGS: "configs"},
)
