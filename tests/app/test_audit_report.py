"""report.html: self-contained, every figure a real PNG, and it renders in headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict

from attacks import get_attack
from secure_kd.app.report.audit import run_audit
from secure_kd.app.report.config import AuditConfig
from secure_kd.metrics import roc_metrics
from secure_kd.plugins import Plugin, PluginConfig, write_result

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)


class AnyConfig(PluginConfig):
    out: str = "runs/x"
    crash: bool = False


class AnyResult(BaseModel):
    model_config = ConfigDict(extra="allow")


def _membership() -> dict:
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(100, int), np.zeros(100, int)]
    attacks = []
    for name, separation in (("loss", 1.0), ("rmia", 2.0)):
        roc = roc_metrics(rng.normal(members * separation, 1.0), members, fpr_levels=(0.01,))
        attacks.append({
            "attack": name, "auc": roc["auc"], "tpr_at_fpr": {"0.01": roc["tpr_at_fpr"][0.01]},
            "roc_fpr": roc["fpr"], "roc_tpr": roc["tpr"], "n_members": 100, "n_nonmembers": 100,
        })  # fmt: skip
    return {"attacks": attacks}


def _memorization() -> dict:
    rng = np.random.default_rng(1)
    canaries = []
    for repeats, canary_loss in ((1, 14.0), (16, 6.0)):
        counts, edges = np.histogram(rng.normal(14, 2, 1000), bins=30)
        canaries.append({
            "prefix": f"The access code for Canary {repeats} is ", "secret": f"{repeats:03d}",
            "n_candidates": 1000, "max_exposure": 9.966, "rank": 1 if repeats == 16 else 436,
            "repeats": repeats, "exposure": 9.9 if repeats == 16 else 1.2, "estimate": None,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist(), "canary_loss": canary_loss,
                          "sampled": False},
        })  # fmt: skip
    return {"exposure": canaries}


def _logit_leak() -> dict:
    values = [10.0 / (i + 1) for i in range(48)] + [1e-7] * 16
    return {
        "singular_values": values,
        "estimated_hidden_size": 48,
        "true_hidden_size": 48,
        "gap_decades": 5.0,
    }


RESULTS = {"membership": _membership, "memorization": _memorization, "logit_leak": _logit_leak}


def _get(name: str) -> Plugin:
    def run(cfg: AnyConfig) -> AnyResult:
        if cfg.crash:
            raise RuntimeError("planted failure")
        result = AnyResult(**RESULTS[name]())
        write_result(cfg.out, result)
        return result

    # the real attack's registration (its metrics and how it reads them), with a canned run
    return dataclasses.replace(get_attack(name), Config=AnyConfig, Result=AnyResult, run=run)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("audit")
    runs = []
    for eps, ppl in ((1.0, 40.0), (4.0, 30.0), (8.0, 27.0)):
        run = base / f"dp_eps{eps:g}"
        run.mkdir()
        privacy = {"epsilon": eps, "delta": 1e-5, "noise_multiplier": 1.1, "steps": 100, "sample_rate": 0.01,
                   "accountant": "rdp"}  # fmt: skip
        (run / "privacy.json").write_text(json.dumps(privacy))
        (run / "results.json").write_text(json.dumps({"student_after": {"perplexity": ppl}}))
        runs.append(str(run))
    config = AuditConfig.model_validate({
        "out": str(base / "out"), "progress": False, "runs": runs,
        "suite": [{"attack": "membership"}, {"attack": "memorization"}, {"attack": "logit_leak"},
                  {"attack": "membership", "id": "broken", "config": {"crash": True}}],
    })  # fmt: skip
    run_audit(config, get_plugin=_get)
    return base / "out" / "report.html"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = _Collector()
    collector.feed(html)
    return collector.tags


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    tags = _tags(html)
    for tag, attrs in tags:
        for key in ("src", "href", "srcset", "action", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "file:")), f"<{tag} {key}={value[:60]}>"
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in tags)
    assert "@import" not in html and "url(" not in html  # no external CSS resources or fonts


def test_every_figure_is_a_nonempty_png(report):
    images = [attrs for tag, attrs in _tags(report.read_text(encoding="utf-8")) if tag == "img"]
    assert len(images) == 4  # ROC, exposure histograms, singular values, privacy/utility
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as image:
            assert image.width > 100 and image.height > 100
            assert len(set(image.convert("L").getdata())) > 2  # something is drawn on it


def test_report_content(report):
    html = report.read_text(encoding="utf-8")
    for needle in (
        "Summary verdict",
        "mia_auc",
        "max_exposure_bits",
        "logit_leak_gap_decades",
        "planted failure",
        "Privacy ledger",
        "dp_eps4",
        "Exact config",
        "Versions",
        "git commit",
    ):
        assert needle in html, needle
    assert re.search(r'class="level high">high', html)
    # Issue 19: the per-canary table and the headline read from it, with every secret masked.
    assert "1 of 2 secrets rank first among their candidates (ranks 436, 1 of 1,000 candidates each)" in html
    assert "The access code for Canary 16 is" in html and "<code>\u2022\u2022\u2022</code>" in html
    # image bytes and the git commit hash may spell any digits by chance
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+|\b[0-9a-f]{40}\b", "", html)
    assert "016" not in text and "001<" not in text


# --------------------------------------------------------------------------- headless Chromium

CHECKER = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).length;
  document.title = 'CHECK ' + JSON.stringify({n: imgs.length, bad: bad, errors: window.__errors.length});
});
</script>"""


def _chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    flags = ["--headless=new", "--disable-gpu", "--no-first-run", "--disable-extensions", "--hide-scrollbars"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


def _browser_check(page: Path) -> dict:
    probe = page.with_name(page.stem + "-probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</head>", CHECKER + "</head>", 1))
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    match = re.search(r"<title>CHECK (\{.*?\})</title>", done.stdout)
    assert match, f"the page did not finish loading in Chromium: {done.stderr[-2000:]}"
    return json.loads(match.group(1))


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: `apt-get install -y chromium` as root (`make test` does it in CI)",
)
def test_report_renders_in_headless_chromium(report, tmp_path):
    check = _browser_check(report)
    assert check == {"n": 4, "bad": 0, "errors": 0}
    logged = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri())
    assert "</html>" in logged.stdout or "</body>" in logged.stdout
    console = [line for line in logged.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line]
    assert console == [], console
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,2600", report.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 2600)
    if os.environ.get("SECURE_KD_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "report-screenshot.png")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (see the test above)")
def test_browser_check_catches_a_broken_figure(report, tmp_path):
    broken = tmp_path / "broken.html"
    html = report.read_text(encoding="utf-8")
    broken.write_text(html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    check = _browser_check(broken)
    assert check["n"] == 4 and check["bad"] == 1


def test_report_shows_redacted_pii_findings_and_the_memorization_notes(tmp_path):
    from secure_kd.app.report.audit import AuditResult, EntryResult, SeedRun
    from secure_kd.app.report.html import render_html

    redacted = "a\u2022\u2022.\u2022\u2022\u2022@\u2022\u2022\u2022.\u2022\u2022\u2022"
    extraction = {
        "n_generations": 64, "n_flagged": 3, "n_exact": 2, "n_near_duplicate": 1, "pii_values": 40,
        "pii_values_extracted": 1, "canary_extraction": [],
        "pii_findings": [{"type": "email", "redacted": redacted, "n_chars": 15, "n_generations": 2,
                          "record_ids": [4, 9]}],
    }  # fmt: skip
    result = {"exposure": [], "extraction": extraction, "notes": ["PII of the records found by pattern"]}
    run = SeedRun(seed=0, status="ok", dir=str(tmp_path), seconds=1.0, result=result)
    audit = AuditResult(
        model=str(tmp_path), teacher=None, data=None, model_kind="causal_lm", entries=[
            EntryResult(id="memorization", attack="memorization", status="ok", runs=[run],
                        ran_on=f"{tmp_path} (the audited model)"),
            EntryResult(id="backdoor", attack="backdoor", status="skipped", runs=[], in_verdict=False,
                        reason="backdoor has no field for the audited model"),
        ], measurements=[], verdicts=[], overall=None, failed=[], skipped=["backdoor"], config={},
        provenance={}, privacy_ledger=[], seconds=1.0,
    )  # fmt: skip
    html = render_html(audit)
    assert "1 of 40 PII values of the records came out" in html
    assert "<code>a\u2022\u2022.\u2022\u2022\u2022@" in html and "4, 9" in html
    assert "PII of the records found by pattern" in html
    assert "backdoor has no field for the audited model" in html and "(causal_lm)" in html
    assert f"{tmp_path} (the audited model)" in html
