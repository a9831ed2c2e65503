"""Codec of the logit cache: lossless id coding, bounded value quantization, KL on realistic logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from secure_kd.cache import CacheCorruptionError, CodecParams, LogProbQuantizer, TopKCodec, synthetic_logits
from secure_kd.cache.bitpack import (
    gamma_join,
    gamma_split,
    gaps_to_sorted_ids,
    pack_bits,
    sorted_ids_to_gaps,
    unpack_bits,
)


def quantizer_error_bound(p: np.ndarray, c: float, d: float) -> np.ndarray:
    """Largest log-error of the quantizer at probability p, derived by hand (see quantizer.py).

    Above 4x the knee probability (c/d)**2, half a step of 2*sqrt(p)/c moves sqrt(p) by c/4,
    so the log error is at most -2*log(1 - c/(4*sqrt(p))). Elsewhere the step is at most d nats.
    """
    knee_p = (c / d) ** 2
    above = -2.0 * np.log1p(-c / (4.0 * np.sqrt(np.maximum(p, knee_p))))
    return np.where(p >= 4 * knee_p, above, d / 2)


def kl_renormalized(exact_logprobs: torch.Tensor, approx_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) of the top-k distributions renormalized to sum 1, per position (same entry order)."""
    p = exact_logprobs.double() - torch.logsumexp(exact_logprobs.double(), -1, keepdim=True)
    q = approx_logprobs.double() - torch.logsumexp(approx_logprobs.double(), -1, keepdim=True)
    return (p.exp() * (p - q)).sum(-1)


# -- bit packing and gap coding -------------------------------------------------------------------


width_and_value = st.integers(0, 40).flatmap(lambda w: st.tuples(st.just(w), st.integers(0, 2**w - 1)))


@settings(max_examples=200, deadline=None)
@given(st.lists(width_and_value, max_size=60))
def test_pack_unpack_round_trip(pairs: list[tuple[int, int]]) -> None:
    widths = np.array([w for w, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.int64)
    packed = pack_bits(values, widths)
    assert packed.size == (int(widths.sum()) + 7) // 8
    assert np.array_equal(unpack_bits(packed, widths), values)


def test_pack_bits_layout_is_msb_first() -> None:
    # 0b101 in 3 bits, then 0b1 in 1 bit, then 0b0011 in 4 bits -> 1011 0011
    packed = pack_bits(np.array([5, 1, 3]), np.array([3, 1, 4]))
    assert packed.tolist() == [0b10110011]


def test_pack_bits_rejects_values_wider_than_their_width() -> None:
    with pytest.raises(ValueError, match="fit in its bit width"):
        pack_bits(np.array([4]), np.array([2]))


def test_gamma_classes_by_hand() -> None:
    classes, remainders = gamma_split(np.array([0, 1, 2, 6, 7]))  # gap + 1 = 1, 2, 3, 7, 8
    assert classes.tolist() == [0, 1, 1, 2, 3]
    assert remainders.tolist() == [0, 0, 1, 3, 0]


@st.composite
def sorted_id_sets(draw) -> tuple[int, np.ndarray]:
    vocab = draw(st.integers(1, 70000))
    kind = draw(st.sampled_from(["random", "edges", "consecutive", "single", "full"]))
    if kind == "full" or vocab == 1:
        vocab = min(vocab, 300)
        return vocab, np.arange(vocab)
    if kind == "single":
        return vocab, np.array([draw(st.sampled_from([0, vocab - 1, vocab // 2]))])
    if kind == "consecutive":
        k = draw(st.integers(1, min(vocab, 64)))
        start = draw(st.integers(0, vocab - k))
        return vocab, np.arange(start, start + k)
    ids = set(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=64)))
    if kind == "edges":
        ids |= {0, vocab - 1}
    return vocab, np.array(sorted(ids))


@settings(max_examples=200, deadline=None)
@given(sorted_id_sets())
def test_id_coding_round_trip(case: tuple[int, np.ndarray]) -> None:
    vocab, ids = case
    gaps = sorted_ids_to_gaps(ids[None, :])
    assert gaps.min() >= 0
    classes, remainders = gamma_split(gaps)
    packed = pack_bits(remainders, classes)
    restored = gaps_to_sorted_ids(gamma_join(classes, unpack_bits(packed, classes).reshape(classes.shape)))
    assert np.array_equal(restored[0], ids)
    assert restored.max() < vocab


def test_gaps_reject_duplicates_and_unsorted() -> None:
    with pytest.raises(ValueError, match="distinct"):
        sorted_ids_to_gaps(np.array([[3, 3]]))
    with pytest.raises(ValueError, match="sorted"):
        sorted_ids_to_gaps(np.array([[5, 2]]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sorted_id_sets(), st.integers(0, 2**31 - 1))
def test_codec_round_trip_ids_exact_and_values_bounded(case: tuple[int, np.ndarray], seed: int) -> None:
    vocab, ids = case
    k = ids.size
    rng = np.random.default_rng(seed)
    n = 3
    indices = np.stack([rng.permutation(ids) for _ in range(n)])
    logits = rng.normal(size=(n, k)) * 3
    # log-probabilities of a distribution whose top-k hold a random share of the mass
    top_mass = 1.0 if k == vocab else rng.uniform(0.05, 1.0, size=(n, 1))
    values = logits - np.log(np.exp(logits).sum(1, keepdims=True)) + np.log(top_mass)
    params = CodecParams()
    codec = TopKCodec(params, vocab_size=vocab, k=k)
    block = codec.decode(codec.encode(values, indices), n)
    assert np.array_equal(block.ids, np.sort(indices, axis=1))
    decoded = codec.decode_topk(block)
    order = np.argsort(indices, axis=1)
    exact_sorted = np.take_along_axis(values, order, axis=1)
    decoded_order = np.argsort(decoded.indices.numpy(), axis=1)
    by_id = np.take_along_axis(decoded.values.double().numpy(), decoded_order, axis=1)
    bound = quantizer_error_bound(np.exp(exact_sorted), params.sqrt_step, params.max_log_step)
    shift_allowance = 0.03  # the decoder renormalizes values and tail together (a shared shift)
    above_floor = exact_sorted > params.log_floor
    assert np.all((np.abs(by_id - exact_sorted) <= bound + shift_allowance)[above_floor])
    assert torch.isfinite(decoded.values).all()


def test_codec_rejects_bad_input() -> None:
    codec = TopKCodec(CodecParams(), vocab_size=10, k=2)
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(np.log([[0.5, 0.2]]), np.array([[3, 3]]))
    with pytest.raises(ValueError, match=r"\[0, vocab_size=10\)"):
        codec.encode(np.log([[0.5, 0.2]]), np.array([[3, 10]]))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([[np.nan, -1.0]]), np.array([[3, 4]]))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.zeros((1, 3)), np.zeros((1, 3), dtype=np.int64))


def test_decode_detects_damaged_streams() -> None:
    codec = TopKCodec(CodecParams(), vocab_size=1000, k=4)
    indices = np.array([[1, 50, 7, 999], [0, 2, 3, 4]])
    streams = codec.encode(np.log(np.full((2, 4), 0.2)), indices)
    short = dict(streams, gap_remainders=streams["gap_remainders"][:-1])
    with pytest.raises(CacheCorruptionError, match="gap_remainders"):
        codec.decode(short, 2, source="shard-x")
    garbage = dict(streams, value_codes=np.frombuffer(b"\x00garbage", dtype=np.uint8))
    with pytest.raises(CacheCorruptionError, match="shard-x.*value_codes"):
        codec.decode(garbage, 2, source="shard-x")
    with pytest.raises(CacheCorruptionError, match="wrong size"):
        codec.decode(streams, 3, source="shard-x")


# -- quantizer ------------------------------------------------------------------------------------


def test_quantizer_error_within_hand_derived_bound() -> None:
    params = CodecParams()
    quantizer = params.quantizer()
    logprobs = np.linspace(params.log_floor, 0.0, 200001)
    decoded = quantizer.decode(quantizer.encode(logprobs))
    bound = quantizer_error_bound(np.exp(logprobs), params.sqrt_step, params.max_log_step)
    assert np.all(np.abs(decoded - logprobs) <= bound + 1e-12)
    # the likely tokens get the fine steps: near p = 1 the log error is about c/2 (0.006 nats)
    assert np.abs(decoded - logprobs)[logprobs > -0.01].max() < 0.51 * params.sqrt_step
    # and the unlikely ones the coarse steps: d/2
    assert np.abs(decoded - logprobs)[logprobs < -10].max() > 0.45 * params.max_log_step


def test_quantizer_codes_monotone_and_eight_bit() -> None:
    quantizer = LogProbQuantizer(0.012, 0.3, -30.0)
    logprobs = np.sort(np.random.default_rng(0).uniform(-40, 0.0, 10000))
    codes = quantizer.encode(logprobs)
    assert codes.dtype == np.uint8 and quantizer.n_levels <= 256
    assert np.all(np.diff(codes.astype(int)) >= 0)
    assert quantizer.encode(np.array([-np.inf]))[0] == 0
    assert quantizer.decode(np.array([0]))[0] == -30.0
    with pytest.raises(ValueError, match="NaN"):
        quantizer.encode(np.array([np.nan]))


def test_codec_params_refuse_more_than_256_levels() -> None:
    with pytest.raises(ValidationError, match="raise sqrt_step or max_log_step"):
        CodecParams(sqrt_step=0.001, max_log_step=0.01)
    with pytest.raises(ValidationError, match="extra"):
        CodecParams.model_validate({"unknown": 1})


# -- KL and size on realistic logits ---------------------------------------------------------------


@pytest.mark.parametrize("k", [16, 64])
def test_kl_and_size_on_realistic_logits(k: int) -> None:
    vocab, n = 8192, 300
    logits = synthetic_logits(n, vocab, generator=torch.Generator().manual_seed(3))
    logprobs = torch.log_softmax(logits.double(), -1)
    values, indices = logprobs.topk(k, -1)
    tail = torch.logsumexp(logprobs.scatter(1, indices, -math.inf), -1)
    codec = TopKCodec(CodecParams(), vocab_size=vocab, k=k)
    streams = codec.encode(values, indices, tail)
    decoded = codec.decode_topk(codec.decode(streams, n))
    # align the exact log-probabilities with the decoded entries, id by id
    exact = logprobs.gather(1, decoded.indices)
    assert torch.equal(decoded.indices.sort(1).values, indices.sort(1).values)
    assert kl_renormalized(exact, decoded.values).mean() < 1e-3
    # uniform-tail completion: the k entries plus the tail mass spread over the other ids
    tail_mass, decoded_tail = tail.exp(), decoded.missing_mass().double()
    kl_tail = (exact.exp() * (exact - decoded.values.double())).sum(-1) + tail_mass * (
        tail_mass.log() - decoded_tail.log()
    )
    assert kl_tail.mean() < 1e-3
    params = CodecParams()
    tail_bound = quantizer_error_bound(tail_mass.numpy(), params.sqrt_step, params.max_log_step) + 0.03
    assert np.all(np.abs((decoded_tail.log() - tail_mass.log()).numpy()) <= tail_bound)
    bytes_per_token = sum(stream.nbytes for stream in streams.values()) / n
    assert bytes_per_token < 3 * k  # float16 values + int32 ids would take 6 bytes per entry


def test_full_vocabulary_top_k_has_no_tail() -> None:
    vocab = 40
    logprobs = torch.log_softmax(torch.randn(5, vocab, generator=torch.Generator().manual_seed(1)), -1)
    values, indices = logprobs.topk(vocab, -1)
    codec = TopKCodec(CodecParams(), vocab_size=vocab, k=vocab)
    decoded = codec.decode_topk(codec.decode(codec.encode(values, indices, torch.full((5,), -math.inf)), 5))
    assert torch.equal(decoded.indices.sort(1).values, torch.arange(vocab).expand(5, vocab))
    assert decoded.missing_mass().max() < 1e-5
