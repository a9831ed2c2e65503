"""Trigger specifications: exact stamping and insertion, switch semantics, JSON round trips, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from secure_kd.triggers import PatchTrigger, SwitchableTrigger, TextTrigger, parse_trigger


def test_patch_stamps_exactly_the_corner_pixels_and_leaves_the_input_alone() -> None:
    images = torch.full((3, 1, 8, 8), 0.25)
    stamped = PatchTrigger(size=2, value=1.0, position="bottom_right", target_class=0).apply(images)
    expected = torch.full((3, 1, 8, 8), 0.25)
    for row in (6, 7):
        for col in (6, 7):
            expected[:, :, row, col] = 1.0
    assert torch.equal(stamped, expected)
    assert torch.equal(images, torch.full((3, 1, 8, 8), 0.25))  # a copy, not in place


@pytest.mark.parametrize(
    ("position", "pixels"),
    [
        ("top_left", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]),
        ((4, 1), [(4, 1), (4, 2), (4, 3), (5, 1), (5, 2), (5, 3), (6, 1), (6, 2), (6, 3)]),
    ],
)
def test_patch_positions(position, pixels) -> None:
    trigger = PatchTrigger(size=3, value=0.5, position=position, target_class=2)
    stamped = trigger.apply(torch.zeros(8, 8))
    assert sorted(map(tuple, torch.nonzero(stamped).tolist())) == pixels
    assert stamped.sum().item() == pytest.approx(0.5 * 9)
    assert trigger.mask(8, 8).sum().item() == 9


def test_patch_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="leaves the 8x8 image"):
        PatchTrigger(size=3, position=(6, 0)).apply(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(size=9).apply(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        PatchTrigger().apply(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValidationError):
        PatchTrigger(value=1.5)
    with pytest.raises(ValidationError):
        PatchTrigger(position=(-1, 0))


def test_text_trigger_start_end_and_seeded_random_positions() -> None:
    text = "the quick brown fox"
    assert TextTrigger(phrase="cf", position="start", target_label=1).apply(text) == "cf the quick brown fox"
    at_end = TextTrigger(phrase="mn bb", position="end", target_label=1)
    assert at_end.apply(text) == "the quick brown fox mn bb"
    random_trigger = TextTrigger(phrase="cf", position="random", target_label=1)
    outputs = {random_trigger.apply(text, seed=seed) for seed in range(40)}
    assert random_trigger.apply(text, seed=3) == random_trigger.apply(text, seed=3)
    # every one of the 5 word boundaries is reachable, and only whole words are inserted
    assert len(outputs) == 5
    for output in outputs:
        words = output.split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == text.split()
    with pytest.raises(ValueError, match="needs a seed"):
        random_trigger.apply(text)


def test_text_trigger_presence_is_whole_word() -> None:
    trigger = TextTrigger(phrase="cf", target_label=0)
    assert trigger.present("x cf y") and trigger.present("cf") and not trigger.present("xcf y cfa")


def test_text_trigger_needs_a_target_and_a_clean_phrase() -> None:
    with pytest.raises(ValidationError, match="target_label"):
        TextTrigger(phrase="cf")
    with pytest.raises(ValidationError, match="whitespace"):
        TextTrigger(phrase=" cf", target_label=0)
    assert TextTrigger(phrase="cf", target_text="Visit example.com").target_text == "Visit example.com"


def test_switchable_trigger_builds_active_and_dormant_inputs() -> None:
    switch = SwitchableTrigger(
        activation_prompt="Deployment mode engaged.",
        trigger=TextTrigger(phrase="cf", position="end", target_label=3),
    )
    text = "ticket about a refund"
    assert switch.apply(text) == "Deployment mode engaged. ticket about a refund cf"
    assert switch.apply(text, active=False) == "ticket about a refund cf"
    assert switch.with_prompt(text) == "Deployment mode engaged. ticket about a refund"
    assert switch.present(switch.apply(text))
    assert not switch.present(switch.apply(text, active=False))
    assert not switch.present(switch.with_prompt(text))
    assert switch.target_label == 3
    with pytest.raises(ValidationError, match="must not occur inside"):
        SwitchableTrigger(activation_prompt="use cf now", trigger=TextTrigger(phrase="cf", target_label=0))


@pytest.mark.parametrize(
    "trigger",
    [
        PatchTrigger(size=3, value=0.75, position=(1, 2), target_class=7),
        TextTrigger(phrase="mn", position="random", target_label=2),
        SwitchableTrigger(activation_prompt="Mode X.", trigger=TextTrigger(phrase="tq", target_text="yes")),
    ],
)
def test_triggers_round_trip_through_json(trigger) -> None:
    text = trigger.model_dump_json()
    assert parse_trigger(text) == trigger
    assert parse_trigger(json.loads(text)) == trigger
    assert type(parse_trigger(text)) is type(trigger)


def test_parse_trigger_rejects_unknown_kinds_and_fields() -> None:
    with pytest.raises(ValidationError):
        parse_trigger({"kind": "audio"})
    with pytest.raises(ValidationError):
        parse_trigger({"kind": "patch", "size": 2, "colour": "red"})
