"""Served teachers: an OpenAI-compatible completions server (llama.cpp, vLLM) as a teacher or victim.

`teacher.source: served` with a `served:` block (secure_kd/served/config.py) makes the cache builder,
the trainer (live and on-policy KD, seq-KD) and the logit-leak and clone attacks talk to a server
through the engine's query API (`ServedModelAPI`: counted, budgeted, recorded in provenance).
docs/served-teacher.md says what each server returns and what each use needs. Importing this
package imports nothing heavy; `secure_kd.config` imports its config module.
"""
