"""One-run DP auditing of a training job (Steinke, Nasr & Jagielski 2023): `audit.canaries` inserts each
canary with probability 1/2 and records which in a private sidecar; `secure-kd audit --canaries RUN`
turns the trained model's losses on them into an epsilon lower bound next to the claimed epsilon.

Known answers: a non-private run that memorizes (several epochs of cross-entropy) gives a clearly positive
bound; a DP-SGD run's bound stays below its claimed epsilon; the guessing procedure with its search over
guess counts stays valid (Bonferroni) against randomized response at a known epsilon."""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.audit_canaries import SIDECAR_NAME, audit_canary_run, make_canaries, read_sidecar
from secure_kd.config import load_config
from secure_kd.data import generate_corpus
from secure_kd.distill_job import run_distill
from secure_kd.dp.ledger import dataset_key
from secure_kd.metrics import one_run_epsilon_lower_bound
from secure_kd.one_run_audit import audit_from_scores, guess_counts

QUIET = dict(progress=False, log=lambda *a, **k: None)
# a student big enough to memorize 12-character secrets in a few hundred steps of cross-entropy
STUDENT = ["student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.num_heads=4"]
CE_ONLY = ["kd.ce_weight=1.0", "kd.kd_weight=0.0", "train.lr=3e-3", "train.checkpoint_every=1000"]


def test_canaries_are_seeded_distinct_and_inserted_about_half_the_time():
    first, again = make_canaries(400, seed=3), make_canaries(400, seed=3)
    assert first == again and first != make_canaries(400, seed=4)
    assert len({c.text for c in first}) == 400
    assert all(c.text.startswith(c.prefix) and len(c.text) > len(c.prefix) for c in first)
    n_in = sum(c.inserted for c in first)
    assert 160 <= n_in <= 240  # Bin(400, 1/2): mean 200, sd 10


def test_a_secret_found_in_the_data_is_drawn_again():
    plain = make_canaries(5, seed=0)
    secret = plain[2].text[len(plain[2].prefix) :].rstrip(".")
    avoided = make_canaries(5, seed=0, avoid=[f"a record that happens to hold {secret} inside it"])
    assert secret not in "".join(c.text for c in avoided)
    assert [c.inserted for c in avoided] == [c.inserted for c in plain]  # the insertions do not move


def test_guesses_on_perfect_scores_give_the_hand_computed_bound():
    inserted = [True] * 20 + [False] * 20
    audit = audit_from_scores([float(x) for x in inserted], inserted)
    # 40 of 40 right at the Bonferroni-corrected 1 - 0.05/4: q^40 = 0.0125, eps = logit(q)
    q = 0.0125 ** (1 / 40)
    assert (audit["n_guesses"], audit["n_correct"]) == (40, 40)
    assert audit["epsilon_lower_bound"] == pytest.approx(math.log(q / (1 - q)), abs=1e-7)
    # the search over guess counts costs confidence: below the single-test bound at 95%
    assert audit["epsilon_lower_bound"] < one_run_epsilon_lower_bound(40, 40, 40)


def test_guess_counts_by_hand_and_ties_broken_by_position():
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.3]
    inserted = [True, False, False, True, True, False]
    # top 2: indices 0, 3 (both in: 2 right); bottom 2: indices 1, 4 (1 out, 4 in: 1 right)
    assert guess_counts(scores, inserted, 2) == (4, 3)
    # all tied: the first k are guessed in, the last k out, whatever the bits
    assert guess_counts([0.0] * 6, inserted, 2) == (4, 1 + 0 + 0 + 1)  # in: 0 yes, 1 no; out: 4 no, 5 yes


def test_guessing_stays_valid_against_randomized_response_at_a_known_epsilon():
    """Scores from an eps-DP view of each insertion bit (randomized response, then a random tie-break):
    the reported bound, best over guess counts, exceeds the true eps in about 5% of runs at most."""
    eps, m, runs = 1.0, 1000, 100
    rng = np.random.default_rng(0)
    keep = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(runs):
        bits = rng.random(m) < 0.5
        seen = np.where(rng.random(m) < keep, bits, ~bits)
        scores = seen + 0.01 * rng.random(m)
        bounds.append(audit_from_scores(scores.tolist(), bits.tolist())["epsilon_lower_bound"])
    bounds = np.array(bounds)
    assert (bounds > eps).mean() <= 0.1
    assert np.median(bounds) > 0.3  # not vacuous: it sees most of the epsilon


@pytest.fixture(scope="module")
def memorizing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memorizing")
    job = load_config(
        "configs/tiny.yaml",
        [f"out={out}", "audit.canaries.n=40", "train.schedule=constant", "train.max_steps=300", *STUDENT,
         *CE_ONLY],
    )  # fmt: skip
    return out, run_distill(job, **QUIET)


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    """A DP-SGD run with canaries, and one without on the same corpus, sharing one ledger directory."""
    root = tmp_path_factory.mktemp("dp")
    common = [
        f"train.privacy.ledger_dir={root / 'ledgers'}",
        "data.synthetic.n_records=120",
        *STUDENT,
        *CE_ONLY,
    ]
    with_canaries = load_config(
        "configs/dp-tiny.yaml",
        [f"out={root / 'canaries'}", "audit.canaries.n=40", "train.max_steps=40", *common],
    )
    plain = load_config(  # a larger budget for the dataset: the first run spent most of 8
        "configs/dp-tiny.yaml",
        [f"out={root / 'plain'}", "train.max_steps=4", "train.privacy.target_epsilon=20", *common],
    )
    return root, run_distill(with_canaries, **QUIET), run_distill(plain, **QUIET)


def test_the_sidecar_is_private_and_says_which_went_in(memorizing_run, tmp_path):
    out, result = memorizing_run
    sidecar = out / SIDECAR_NAME
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    canaries = read_sidecar(out)
    assert canaries == make_canaries(40, seed=0, avoid=[])  # the tiny corpus holds none of the secrets
    n_in = sum(c.inserted for c in canaries)
    info = result.audit_canaries
    assert info == {"n": 40, "seed": 0, "n_inserted": n_in, "sidecar": str(sidecar)}
    results_json = (out / "results.json").read_text()
    assert all(c.text not in results_json for c in canaries)  # which ones: only in the sidecar
    # the same job without canaries: n_in fewer training sequences, the same held-out set
    plain = run_distill(
        load_config("configs/tiny.yaml", [f"out={tmp_path}", "train.max_steps=1", *STUDENT, *CE_ONLY]),
        **QUIET,
    )
    assert result.data["train_sequences"] == plain.data["train_sequences"] + n_in
    assert result.data["heldout_sequences"] == plain.data["heldout_sequences"]
    assert result.teacher_eval == plain.teacher_eval


def test_a_non_private_run_that_memorizes_gives_a_clearly_positive_bound(memorizing_run):
    out, _ = memorizing_run
    audit = audit_canary_run(out)
    assert audit["claimed_epsilon"] is None and audit["delta"] == 0.0
    assert audit["epsilon_lower_bound"] > 1.0  # measured 1.46 (38/40 right); 40/40 would give 2.3
    assert audit["n_correct"] >= 0.9 * audit["n_guesses"]


def test_a_dp_sgd_run_bound_stays_below_its_claimed_epsilon(dp_runs):
    root, private, _ = dp_runs
    audit = audit_canary_run(root / "canaries")
    claimed = json.loads((root / "canaries" / "privacy.json").read_text())
    assert audit["claimed_epsilon"] == claimed["run_epsilon"] and audit["delta"] == claimed["delta"] > 0
    assert 0.0 <= audit["epsilon_lower_bound"] <= claimed["run_epsilon"] <= claimed["epsilon"]
    assert private.audit_canaries["n_inserted"] == sum(c.inserted for c in read_sidecar(root / "canaries"))


def test_canaries_draw_on_the_private_records_ledger(dp_runs):
    """The ledger key excludes the canaries: a run with canaries and one without share one budget."""
    root, private, plain = dp_runs
    assert len(sorted((root / "ledgers").glob("*.jsonl"))) == 1
    corpus = generate_corpus(120, seed=0, n_canaries=2, canary_repeats=1)  # dp-tiny's corpus, as configured
    key = dataset_key([r["text"] for r in corpus.records])  # its records alone, no audit canary
    assert private.privacy["ledger"]["key"] == plain.privacy["ledger"]["key"] == key
    assert plain.privacy["ledger"]["entries"] == 2
    # the dataset's epsilon after the plain run holds the canary run's spend, not the plain run's alone
    assert plain.privacy["epsilon"] > max(plain.privacy["run_epsilon"], private.privacy["run_epsilon"])


def test_cli_audit_canaries_puts_the_bound_next_to_the_claim(memorizing_run, dp_runs, tmp_path):
    out, _ = memorizing_run
    root, _, _ = dp_runs
    audit_out = tmp_path / "audit"
    result = CliRunner().invoke(
        app, ["audit", "--canaries", str(out), "--canaries", str(root / "canaries"), "--out", str(audit_out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((audit_out / "results.json").read_text())
    assert [a["run"] for a in data["one_run"]] == [str(out), str(root / "canaries")]
    claimed = json.loads((root / "canaries" / "privacy.json").read_text())["run_epsilon"]
    assert data["one_run"][1]["claimed_epsilon"] == claimed
    html = (audit_out / "report.html").read_text()
    assert "One-run DP audit" in html and f"{claimed:.3g}" in html
    assert all(c.text not in html for c in read_sidecar(out))


def test_cli_audit_canaries_of_a_run_without_them_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["audit", "--canaries", str(tmp_path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "audit.canaries" in result.output and "Traceback" not in result.output
