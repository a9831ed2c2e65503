"""The app layer: the `secure-kd` command line (`cli.py`), the demo (`demo_story.py`) and the audit with
its HTML report (`report/`).

The only part of `secure_kd` that imports `federation`, `attacks` and `defenses`; the engine (`secure_kd/`
outside `app/`) imports nothing from here or from them (tests/project/test_layer_contract.py enforces it).
"""
