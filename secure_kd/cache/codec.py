"""Compression of top-k teacher log-probabilities: exact token ids, 8-bit log-probabilities.

One block of n positions (a cache shard) becomes four byte streams:

- `gap_classes`: the Elias-gamma class of each gap between the sorted token ids (bitpack.py),
  one byte each, entry-major (all first gaps, then all second gaps, ...: gaps at the same
  rank share statistics), LZMA-compressed.
- `gap_remainders`: the remainder bits of the gaps, bit-packed in the same order, stored raw
  (they are nearly uniform; an entropy coder gains nothing on them).
- `value_codes`: the quantized log-probability (quantizer.py) of each entry, in ascending
  token-id order, position-major, LZMA-compressed.
- `tail_codes`: the quantized log of the teacher's mass outside the top-k, one per position.

Only the log-probabilities are lossy. On decoding, the k values and the tail mass are
renormalized together to sum to 1 (a small shared shift of every value), which keeps
`TopKLogits.missing_mass()` equal to the decoded tail mass and leaves the renormalized
top-k distribution untouched. Decoded entries come out sorted by decreasing log-probability
(ties by token id), like `torch.topk`.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from secure_kd.cache.bitpack import (
    gamma_join,
    gamma_split,
    gaps_to_sorted_ids,
    pack_bits,
    sorted_ids_to_gaps,
    unpack_bits,
)
from secure_kd.cache.errors import CacheCorruptionError
from secure_kd.cache.quantizer import LogProbQuantizer
from secure_kd.topk import TopKLogits

CODEC_NAME = "gamma-gaps+sqrt-log-u8+lzma"
STREAM_NAMES = ("gap_classes", "gap_remainders", "value_codes", "tail_codes")


class CodecParams(BaseModel):
    """Codec settings, recorded in the manifest. The defaults keep the mean KL between the
    exact and decoded renormalized top-k distributions near 3e-4 at k=64 and below 1e-3 up
    to k=256 on the synthetic benchmark (benchmarks/cache.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["gamma-gaps+sqrt-log-u8+lzma"] = CODEC_NAME
    sqrt_step: float = Field(0.012, gt=0.0, le=1.0, description="quantizer step in 2*sqrt(p) units")
    max_log_step: float = Field(0.3, gt=0.0, le=4.0, description="largest quantizer step, nats")
    log_floor: float = Field(-30.0, ge=-200.0, lt=0.0, description="log-probabilities below are clamped")
    lzma_preset: int = Field(6, ge=0, le=9, description="LZMA2 preset of the compressed streams")

    @model_validator(mode="after")
    def _quantizer_fits_eight_bits(self) -> CodecParams:
        self.quantizer()  # raises ValueError naming the fix
        return self

    def quantizer(self) -> LogProbQuantizer:
        return LogProbQuantizer(self.sqrt_step, self.max_log_step, self.log_floor)


@dataclass(frozen=True)
class DecodedBlock:
    """A decoded block, still compact: ids ascending per position, 8-bit value and tail codes."""

    ids: np.ndarray  # [n, k] int32 (int64 for vocabularies past 2**31)
    value_codes: np.ndarray  # [n, k] uint8
    tail_codes: np.ndarray  # [n] uint8

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.value_codes.nbytes + self.tail_codes.nbytes


def _as_numpy(x: np.ndarray | torch.Tensor, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class TopKCodec:
    """Encode and decode blocks of top-k log-probabilities for one vocabulary size and k."""

    def __init__(self, params: CodecParams, *, vocab_size: int, k: int) -> None:
        if not 0 < k <= vocab_size:
            raise ValueError(f"k={k} must be in [1, vocab_size={vocab_size}]")
        self.params = params
        self.vocab_size = vocab_size
        self.k = k
        self.quantizer = params.quantizer()
        self._lzma_filters = [{"id": lzma.FILTER_LZMA2, "preset": params.lzma_preset}]
        self.id_dtype = np.int32 if vocab_size <= np.iinfo(np.int32).max else np.int64

    # -- encoding --------------------------------------------------------------------------------

    def encode(
        self,
        values: np.ndarray | torch.Tensor,
        indices: np.ndarray | torch.Tensor,
        tail_logprobs: np.ndarray | torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """Compress n positions of top-k log-probabilities.

        values: [n, k] log-probabilities over the full vocabulary; indices: [n, k] token ids,
        distinct per position; tail_logprobs: [n] log of the mass outside the top-k (-inf for
        none). When omitted it is derived from the values, which loses precision when the
        tail is tiny; build_cache passes the exact value computed from the full logits.
        """
        values = _as_numpy(values, np.float64)
        indices = _as_numpy(indices, np.int64)
        if values.ndim != 2 or values.shape != indices.shape or values.shape[1] != self.k:
            raise ValueError(
                f"expected values and indices of shape [n, k={self.k}], "
                f"got {values.shape} and {indices.shape}"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={self.vocab_size})")
        if tail_logprobs is None:
            mass = np.exp(values).sum(axis=1)
            with np.errstate(divide="ignore"):
                tail_logprobs = np.log(np.clip(1.0 - mass, 0.0, 1.0))
        tail_logprobs = _as_numpy(tail_logprobs, np.float64)
        if tail_logprobs.shape != values.shape[:1]:
            raise ValueError(f"tail_logprobs must have shape [{values.shape[0]}], got {tail_logprobs.shape}")

        order = np.argsort(indices, axis=1, kind="stable")
        sorted_ids = np.take_along_axis(indices, order, axis=1)
        sorted_values = np.take_along_axis(values, order, axis=1)
        try:
            gaps = sorted_ids_to_gaps(sorted_ids)
        except ValueError:
            raise ValueError("each position's top-k token ids must be distinct") from None
        classes, remainders = gamma_split(gaps.T)  # entry-major

        tail_codes = self.quantizer.encode(tail_logprobs)
        tail_codes[np.isneginf(tail_logprobs)] = 0  # code 0 of the tail means "no mass outside the top-k"
        return {
            "gap_classes": self._compress(classes),
            "gap_remainders": pack_bits(remainders, classes),
            "value_codes": self._compress(self.quantizer.encode(sorted_values)),
            "tail_codes": self._compress(tail_codes),
        }

    def _compress(self, data: np.ndarray) -> np.ndarray:
        blob = lzma.compress(data.tobytes(), format=lzma.FORMAT_RAW, filters=self._lzma_filters)
        return np.frombuffer(blob, dtype=np.uint8)

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, streams: dict[str, np.ndarray], n_tokens: int, *, source: str = "block") -> DecodedBlock:
        """Decode a block of n_tokens positions; raises CacheCorruptionError naming `source`."""
        missing = [name for name in STREAM_NAMES if name not in streams]
        if missing:
            raise CacheCorruptionError(f"{source}: missing streams {missing}")
        n, k = n_tokens, self.k
        classes = self._decompress(streams["gap_classes"], n * k, source, "gap_classes")
        value_codes = self._decompress(streams["value_codes"], n * k, source, "value_codes")
        tail_codes = self._decompress(streams["tail_codes"], n, source, "tail_codes")
        try:
            remainders = _unpack_remainders(streams["gap_remainders"], classes)
            value_levels_ok = int(value_codes.max(initial=0)) < self.quantizer.n_levels
            tail_levels_ok = int(tail_codes.max(initial=0)) < self.quantizer.n_levels
        except ValueError as exc:
            raise CacheCorruptionError(f"{source}: {exc}") from None
        gaps = gamma_join(classes, remainders).reshape(k, n).T
        ids = gaps_to_sorted_ids(gaps)
        if ids.size and ids[:, -1].max() >= self.vocab_size:
            raise CacheCorruptionError(f"{source}: decoded token id beyond vocab_size={self.vocab_size}")
        if not (value_levels_ok and tail_levels_ok):
            raise CacheCorruptionError(f"{source}: quantizer code out of range")
        return DecodedBlock(
            ids=ids.astype(self.id_dtype),
            value_codes=value_codes.reshape(n, k),
            tail_codes=tail_codes,
        )

    def _decompress(self, blob: np.ndarray, expected: int, source: str, name: str) -> np.ndarray:
        # The expected size is known, so a hostile stream cannot inflate past it.
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=self._lzma_filters)
        try:
            data = decompressor.decompress(np.asarray(blob, dtype=np.uint8).tobytes(), max_length=expected)
        except lzma.LZMAError as exc:
            raise CacheCorruptionError(f"{source}: stream {name!r} does not decompress ({exc})") from None
        if len(data) != expected or not decompressor.eof or decompressor.unused_data:
            raise CacheCorruptionError(
                f"{source}: stream {name!r} decompresses to the wrong size (expected {expected} bytes)"
            )
        return np.frombuffer(data, dtype=np.uint8)

    def to_topk(self, ids: np.ndarray, value_codes: np.ndarray, tail_codes: np.ndarray) -> TopKLogits:
        """TopKLogits [..., k] (float32 values sorted descending, int64 ids) from decoded codes.

        The k probabilities and the tail mass are renormalized to sum to 1 together.
        """
        values, indices = self.to_arrays(ids, value_codes, tail_codes)
        return TopKLogits(values=torch.from_numpy(values), indices=torch.from_numpy(indices))

    def to_arrays(
        self, ids: np.ndarray, value_codes: np.ndarray, tail_codes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`to_topk` as numpy arrays: values float32, ids int64 (numpy avoids torch's thread start-up
        cost on these small arrays)."""
        logprobs = self.quantizer.decode(value_codes)
        tail_mass = np.where(tail_codes > 0, np.exp(self.quantizer.decode(tail_codes)), 0.0)
        total = np.exp(logprobs).sum(axis=-1) + tail_mass
        logprobs = logprobs - np.log(total)[..., None]
        # the table is increasing and the shift is shared by a position, so sorting the 8-bit codes
        # orders the values; numpy's stable sort of uint8 is a radix sort
        order = np.argsort(np.uint8(255) - value_codes, axis=-1, kind="stable")
        values = np.take_along_axis(logprobs, order, axis=-1).astype(np.float32)
        indices = np.take_along_axis(ids, order, axis=-1).astype(np.int64)
        return values, indices

    def decode_topk(self, block: DecodedBlock) -> TopKLogits:
        return self.to_topk(block.ids, block.value_codes, block.tail_codes)


def _unpack_remainders(packed: np.ndarray, classes: np.ndarray) -> np.ndarray:
    needed_bytes = (int(classes.astype(np.int64).sum()) + 7) // 8
    if np.asarray(packed).size != needed_bytes:
        raise ValueError(f"gap_remainders holds {np.asarray(packed).size} bytes, expected {needed_bytes}")
    return unpack_bits(packed, classes)
