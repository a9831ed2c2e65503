"""report.html: one self-contained page (inline CSS, figures as base64 PNG data URIs, no scripts,
no external fonts or links), so it opens offline and can be attached to a ticket as one file."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from secure_kd.app.report.config import Threshold, default_thresholds
from secure_kd.app.report.figures import FIGURES, privacy_utility_figure
from secure_kd.app.report.forecast import forecast_html
from secure_kd.app.report.inheritance import inheritance_html
from secure_kd.app.report.one_run import one_run_html
from secure_kd.app.report.result import AuditResult
from secure_kd.app.report.verdict import canary_headline
from secure_kd.paths import atomic_write_text

CSS = " ".join(
    (
        'body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;',
        "color:#222;padding:0 1em} h1{font-size:1.6em}",
        "h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}",
        "table{border-collapse:collapse;margin:.6em 0;font-size:.92em}",
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}",
        "th{background:#f3f3f3}",
        ".level{font-weight:bold;text-transform:uppercase;padding:.1em .5em;border-radius:3px}",
        ".low{background:#d8f0d8;color:#185c18} .medium{background:#ffe9b3;color:#7a5200}",
        ".high{background:#f8c8c8;color:#8a1010} .failed{color:#8a1010} .ok{color:#185c18}",
        "pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em} figure{margin:1em 0}",
        "figcaption{font-size:.85em;color:#555} img{max-width:100%;border:1px solid #eee}",
        ".note{color:#555;font-size:.9em}",
    )
)


def _level(level: str | None) -> str:
    if level is None:
        return '<span class="note">no verdict</span>'
    return f'<span class="level {escape(level)}">{escape(level)}</span>'


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _img(png: str, caption: str) -> str:
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _thresholds(result: AuditResult) -> dict[str, Threshold]:
    """The bounds the audit graded by (results.json of an older audit: today's defaults, its config's own)."""
    if result.thresholds:
        return result.thresholds
    given = result.config.get("thresholds") or {}
    return {**default_thresholds(), **{k: Threshold.model_validate(v) for k, v in given.items()}}


def _summary(result: AuditResult) -> str:
    thresholds = _thresholds(result)
    rows = []
    for verdict in result.verdicts:
        for m in verdict.measurements:
            t = thresholds[m.metric]
            op = ">=" if t.higher_is_worse else "<="
            ci = "-" if m.ci_low is None else f"[{_num(m.ci_low)}, {_num(m.ci_high)}]"
            rows.append([
                escape(verdict.risk), _level(verdict.level), escape(m.metric), escape(m.entry),
                f"{_num(m.value)} {escape(t.unit)}", f"{ci}<br><span class='note'>{escape(m.ci_method)}"
                f"{', ' + str(m.n_seeds) + ' seeds' if m.n_seeds > 1 else ''}"
                f"{'<br>' + escape(m.note) if m.note else ''}</span>",
                _level(m.level), f"medium {op} {_num(t.medium)}, high {op} {_num(t.high)}",
            ])  # fmt: skip
    overall = f"<p>Overall: {_level(result.overall)}</p>"
    failed = ""
    if result.failed:
        failed = (
            f"<p class='failed'>Failed attacks (no verdict from them): {escape(', '.join(result.failed))}</p>"
        )
    level = float(result.config.get("confidence", 0.95))
    headers = [
        "risk",
        "verdict",
        "metric",
        "suite entry",
        "value",
        f"{level:.0%} interval",
        "metric level",
        "thresholds",
    ]
    return (
        overall + failed + (_table(headers, rows) if rows else "<p class='note'>No risk metric measured.</p>")
    )


def _entries(result: AuditResult) -> str:
    rows = []
    for entry in result.entries:
        if entry.status == "skipped":
            rows.append(
                [escape(entry.id), escape(entry.attack), "-", "<span class='note'>skipped</span>", "-", "-",
                 escape(entry.reason or "")]
            )  # fmt: skip
            continue
        ran_on = escape(entry.ran_on or "-")
        if not entry.in_verdict:
            ran_on += "<br><span class='note'>not the audited model: not part of the verdict</span>"
        for run in entry.runs:
            status = f"<span class='{'ok' if run.status == 'ok' else 'failed'}'>{escape(run.status)}</span>"
            stage = f"at {run.stage}: " if run.status == "failed" and run.stage else ""
            note = escape(stage + (run.error or "")) + (" (resumed)" if run.resumed else "")
            rows.append(
                [
                    escape(entry.id),
                    escape(entry.attack),
                    str(run.seed),
                    status,
                    f"{run.seconds:.1f}",
                    ran_on,
                    note,
                ]
            )
    return _table(["entry", "attack", "seed", "status", "seconds", "ran on", "error / note"], rows)


def _mask(secret: str) -> str:
    return "\u2022" * len(secret)


def _memorization(result: AuditResult) -> str:
    """Per canary: where its secret ranks and whether decoding gives it away; the PII that came out."""
    parts = []
    for entry in result.entries:
        run = next((r for r in entry.runs if r.status == "ok" and r.result), None)
        if entry.attack != "memorization" or run is None:
            continue
        res = run.result
        canaries = res.get("exposure") or []
        extraction = res.get("extraction") or {}
        targeted = extraction.get("canary_extraction") or []
        parts.append(f"<h3>{escape(entry.id)} (seed {run.seed})</h3>")
        parts += [f"<p class='note'>{escape(note)}</p>" for note in res.get("notes") or []]
        if canaries:
            parts.append(f"<p>{escape(canary_headline(res))}</p>")
            rows = []
            for i, c in enumerate(canaries):
                greedy = targeted[i] if i < len(targeted) else None
                value = c.get("exposure")
                exposure = _num(value) if value is not None else (
                    f"~{_num(c['estimate']['value'])} (estimate)" if c.get("estimate") else "-"
                )  # fmt: skip
                size = c.get("n_candidates")
                rows.append([
                    escape(c.get("prefix", "-")), f"<code>{_mask(c.get('secret', ''))}</code>",
                    str(c.get("repeats", "-")), "-" if size is None else f"{size:,}",
                    "-" if c.get("rank") is None else f"{c['rank']:,}",
                    f"{exposure} of {_num(c.get('max_exposure'))}",
                    "-" if greedy is None else ("yes" if greedy["greedy_extracted"] else "no"),
                    "-" if greedy is None else _num(greedy["sampled_rate"], 2),
                ])  # fmt: skip
            parts.append(
                _table(["text before the secret", "secret", "times in the records", "candidates", "rank",
                        "exposure (bits)", "greedy decoding gives it", "share of samples that give it"], rows)
            )  # fmt: skip
        if extraction:
            findings = extraction.get("pii_findings") or []
            x = extraction
            parts.append(
                f"<p>Extraction: {x['n_generations']} generations, {x['n_flagged']} flagged ({x['n_exact']} "
                f"reproduce a PII value or secret, {x['n_near_duplicate']} near-duplicates of a record); "
                f"{x['pii_values_extracted']} of {x['pii_values']} PII values of the records came out.</p>"
            )
            if findings:
                rows = [
                    [escape(f["type"]), f"<code>{escape(f['redacted'])}</code>", str(f["n_chars"]),
                     str(f["n_generations"]), escape(", ".join(map(str, f["record_ids"][:5])))]
                    for f in findings
                ]  # fmt: skip
                parts.append(
                    _table(["PII type", "value (redacted)", "characters", "generations", "records"], rows)
                )
    return "".join(parts) or "<p class='note'>No memorization entry ran.</p>"


def _figures(result: AuditResult) -> str:
    parts = []
    for entry in result.entries:
        make = FIGURES.get(entry.attack)
        run = next((r for r in entry.runs if r.status == "ok" and r.result), None)
        if make is None or run is None:
            continue
        png = make(run.result, f"{entry.id} (seed {run.seed})")
        if png:
            parts.append(_img(png, f"{entry.id}: {entry.attack}, seed {run.seed}"))
    return "".join(parts) or "<p class='note'>No attack in this suite has a figure.</p>"


def _ledger(result: AuditResult) -> str:
    if not result.privacy_ledger:
        return (
            "<p class='note'>No privacy.json found in the model directory or the given runs (no DP run).</p>"
        )
    utility_key = str(result.config.get("utility_key", "utility"))
    rows = [
        [escape(e.source), _num(e.epsilon), _num(e.delta, 2), _num(e.noise_multiplier), str(e.steps or "-"),
         _num(e.sample_rate, 4), escape(e.accountant or "-"), _num(e.utility)]
        for e in result.privacy_ledger
    ]  # fmt: skip
    table = _table(
        ["run", "epsilon", "delta", "noise multiplier", "steps", "sample rate", "accountant", utility_key],
        rows,
    )
    points = [
        (e.epsilon, e.utility, Path(e.source).name)
        for e in result.privacy_ledger
        if e.epsilon is not None and e.utility is not None
    ]
    png = privacy_utility_figure(points, utility_key)
    return table + (_img(png, "privacy / utility of the DP runs") if png else "")


def _provenance(result: AuditResult) -> str:
    prov: dict[str, Any] = result.provenance
    versions = _table(
        ["package", "version"], [[escape(k), escape(v)] for k, v in prov.get("versions", {}).items()]
    )
    hashes = [
        [escape(role), escape(name), f"<code>{escape(digest)}</code>"]
        for role, files in prov.get("asset_hashes", {}).items()
        for name, digest in files.items()
    ]
    hash_table = (
        _table(["model", "file", "sha256"], hashes)
        if hashes
        else "<p class='note'>No model directory to hash.</p>"
    )
    commit = escape(prov.get("git_commit") or "not a git checkout")
    config = escape(json.dumps(result.config, indent=2))
    return (
        f"<p>git commit: <code>{commit}</code></p><h3>Versions</h3>{versions}"
        f"<h3>Asset hashes</h3>{hash_table}<h3>Exact config</h3><pre>{config}</pre>"
    )


def render_html(result: AuditResult) -> str:
    target = result.model or "each attack's own target"
    if result.model and result.model_kind:
        target += f" ({result.model_kind})"
    subtitle = f"model: {target}" + (f" | teacher: {result.teacher}" if result.teacher else "")
    subtitle += f" | data: {result.data}" if result.data else ""
    body = (
        f"<h1>secure-kd audit</h1><p class='note'>{escape(subtitle)} | {result.seconds:.0f} s</p>"
        f"<h2>Summary verdict</h2>{_summary(result)}"
        f"<h2>Attacks run</h2>{_entries(result)}"
        f"<h2>Memorization: per canary, and the PII that came out</h2>{_memorization(result)}"
        f"<h2>Figures</h2>{_figures(result)}"
        f"<h2>Privacy ledger (DP runs)</h2>{_ledger(result)}"
        f"{one_run_html(result)}"
        f"{forecast_html(result)}"
        f"{inheritance_html(result.inheritance)}"
        f"<h2>Reproduction</h2>{_provenance(result)}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>secure-kd audit</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(out: str | Path, result: AuditResult | None = None) -> Path:
    """Write `<out>/report.html` from `result`, or from `<out>/results.json` (`secure-kd report DIR`)."""
    out = Path(out)
    if result is None:
        path = out / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run `secure-kd audit --out {out}` first")
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("schema_version", None)
        if data.get("kind") != "audit":
            kind = data.get("kind")
            raise ValueError(f"{path} is not an audit result (kind {kind!r}); give an audit's --out dir")
        result = AuditResult.model_validate(data)
    target = out / "report.html"
    atomic_write_text(target, render_html(result))
    return target
