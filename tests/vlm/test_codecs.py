"""Action codecs: exact text, round trips (property-based) and total decoding of malformed text."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covr_lightning.vlm.codecs import make_codec

DMC = make_codec("numeric", -np.ones(3), np.ones(3))
CARLA = make_codec("carla", [-1, -1], [1, 1])
RACING = make_codec("car_racing", [-1, 0, 0], [1, 1, 1])
CODECS = {"numeric": DMC, "carla": CARLA, "car_racing": RACING}

MALFORMED = [
    "",
    "   ",
    "I think the robot should move forward.",
    "torques: [0.1, 0.2]",  # too few
    "torques: [0.1, 0.2, 0.3, 0.4]",  # too many
    "torques: [nan, 0.1, 0.2]",
    "torques: [1e9, 0.0, 0.0]",
    "torques: [inf, -inf, 0]",
    "torques: [1e999, 0, 0]",
    "[0.1, 0.2",
    "扭矩: [〇.一, 二, 三]",
    "accelerate moderately and steer left and steer right",  # contradictory steering
    "brake hard but accelerate fully and go straight",  # contradictory throttle
    "steer leftwards",
    "ускоряйся и поверни налево",
    "\x00\x01\x02",
    "9" * 5000,
]


def test_numeric_text_by_hand():
    assert DMC.encode([0.123, -0.8, -0.0001]) == "torques: [0.12, -0.80, 0.00]"
    assert DMC.encode([3.0, -7.0, 0.5]) == "torques: [1.00, -1.00, 0.50]"  # clipped to bounds
    action, valid = DMC.decode("Sure! torques: [0.5, -1.02, 1] because the leg is bent")
    assert valid and action.tolist() == [0.5, -1.0, 1.0]  # -1.02 within 5 % slack, clipped
    assert DMC.decode("0.1 0.2 0.3")[1]  # no brackets: every number in the text


def test_phrase_text_by_hand():
    assert CARLA.encode([0.55, -0.12]) == "accelerate moderately and steer slightly left"
    assert CARLA.encode([-1.0, 0.9]) == "brake hard and steer sharply right"
    action, valid = CARLA.decode("I would Accelerate   Moderately and steer slightly left.")
    assert valid and np.allclose(action, [0.6, -0.15])
    assert RACING.encode([0.0, 1.0, 0.0]) == "go straight, full gas, no brake"
    action, valid = RACING.decode("steer right, light gas, no brake")
    assert valid and np.allclose(action, [0.4, 0.3, 0.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=3, max_size=3))
def test_numeric_round_trip(values):
    action, valid = DMC.decode(DMC.encode(values))
    assert valid
    np.testing.assert_allclose(action, values, atol=0.005 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["carla", "car_racing"]), st.data())
def test_phrase_round_trip_is_quantisation(kind, data):
    codec = CODECS[kind]
    values = [data.draw(st.floats(lo, hi)) for lo, hi in zip(codec.low, codec.high, strict=True)]
    action, valid = codec.decode(codec.encode(values))
    assert valid
    assert codec.encode(action) == codec.encode(values)  # stable under re-encoding
    # each dimension decodes to the level nearest to its value (in canonical [-1, 1] units)
    canonical = codec._to_canonical(np.asarray(values, dtype=np.float64))
    decoded = codec._to_canonical(action.astype(np.float64))
    for levels, c, d in zip(codec.dimensions, canonical, decoded, strict=True):
        nearest = min(abs(level.value - c) for level in levels)
        assert abs(d - c) == pytest.approx(nearest, abs=1e-6)


@pytest.mark.parametrize("kind", list(CODECS))
@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_text_is_invalid_or_in_bounds(kind, text):
    codec = CODECS[kind]
    action, valid = codec.decode(text)
    assert action.shape == codec.low.shape and action.dtype == np.float32
    assert np.all(action >= codec.low) and np.all(action <= codec.high)
    if kind == "numeric" and text in MALFORMED[:10]:
        assert not valid


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(CODECS)), st.text(max_size=200))
def test_decode_is_total(kind, text):
    codec = CODECS[kind]
    action, valid = codec.decode(text)
    assert np.all(np.isfinite(action))
    assert np.all(action >= codec.low) and np.all(action <= codec.high)
    assert isinstance(valid, bool)


def test_invalid_answers_give_the_middle_of_the_bounds():
    action, valid = RACING.decode("no idea")
    assert not valid and action.tolist() == [0.0, 0.5, 0.5]
    action, valid = CARLA.decode(None)  # not even a string
    assert not valid and action.tolist() == [0.0, 0.0]


def test_bad_kind_or_bounds():
    with pytest.raises(ValueError, match="unknown codec kind"):
        make_codec("morse", [-1], [1])
    with pytest.raises(ValueError, match="high > low"):
        make_codec("numeric", [1.0], [1.0])
    with pytest.raises(ValueError, match="phrase sets"):
        make_codec("carla", [-1, -1, -1], [1, 1, 1])


@settings(max_examples=200)
@given(st.sampled_from(list(CODECS)), st.data())
def test_every_answer_matches_the_answer_pattern(kind, data):
    # Guided decoding constrains a server to this pattern: it must admit every encode() output.
    codec = CODECS[kind]
    action = np.array(
        [data.draw(st.floats(lo, hi)) for lo, hi in zip(codec.low, codec.high, strict=True)]
    )
    assert re.fullmatch(codec.answer_pattern(), codec.encode(action))


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("numeric", "torques: [0.12, -0.80]"),  # two values for three dimensions
        ("numeric", "torques: [0.1, -0.80, 0.33]"),  # one decimal
        ("numeric", "I would push: [0.12, -0.80, 0.33]"),
        ("car_racing", "steer left, full gas"),
        ("carla", "brake hard, steer left"),  # the wrong joiner
    ],
)
def test_the_answer_pattern_refuses_other_text(kind, text):
    assert re.fullmatch(CODECS[kind].answer_pattern(), text) is None
