"""secure_kd.cross_tokenizer: byte spans, token alignment, padded vocabularies.

Oracles: hand-written groups and spans, the text itself (every group covers the same bytes on both
sides), and TRL GOLD's own helpers (`ULDLoss._align_by_byte_offsets`, `encode_with_byte_offsets`,
`ULDLoss._initialize_vocabulary_mapping`).
"""

from __future__ import annotations

import random
import types
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from secure_kd.cross_tokenizer import (
    TokenAlignment,
    TokenSpans,
    VocabPadding,
    VocabPair,
    align_spans,
    stack_spans,
    token_byte_spans,
)
from secure_kd.data.tokenizer import train_tiny_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns on import
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import encode_with_byte_offsets

trl_align = ULDLoss._align_by_byte_offsets

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café! Smörgåsbord and crème brûlée.",
    "Distillation across tokenizers needs byte offsets of the same text.",
    "the the the quick quick brown brown fox",
    "Emojis 😀 🎉 and CJK 你好 世界 are several bytes each.",
] * 3
TEXTS = [
    "Héllo the quick café 😀!",
    "naïve 你好世界 brûlée 🎉🎉",
    "<|im_start|>user\nthe fox<|im_end|>\n",
    "  two  spaces\n\nand a tab\there",
]


@pytest.fixture(scope="module")
def tokenizers():
    """Two byte-level BPE tokenizers of one corpus that split differently (300 and 420 tokens)."""
    return train_tiny_tokenizer(CORPUS, vocab_size=300), train_tiny_tokenizer(CORPUS, vocab_size=420)


# -- the walk ------------------------------------------------------------------------------------------
HAND_MADE = {
    # name: (student spans, teacher spans, student groups, teacher groups)
    "same": ([(0, 1), (1, 3)], [(0, 1), (1, 3)], [[0], [1]], [[0], [1]]),
    "student splits": ([(0, 3), (3, 5)], [(0, 5)], [[0, 1]], [[0]]),
    "teacher splits": ([(0, 5)], [(0, 3), (3, 5)], [[0]], [[0, 1]]),
    "crossing": ([(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)], [[0, 1], [2]], [[0, 1], [2]]),
    "both end with eos": ([(0, 2), (2, 2)], [(0, 1), (1, 2), (2, 2)], [[0], [1]], [[0, 1], [2]]),
    "teacher eos only": ([(0, 2)], [(0, 2), (2, 2)], [[0], []], [[0], [1]]),
    "student bos": ([(0, 0), (0, 2)], [(0, 2)], [[0, 1]], [[0]]),
    "trim_offsets gap": ([(0, 5), (6, 9)], [(0, 5), (5, 9)], [[0], [1]], [[0], [1]]),
}


@pytest.mark.parametrize("case", HAND_MADE, ids=list(HAND_MADE))
def test_align_spans_gives_the_hand_made_groups_and_trls(case):
    s, t, s_groups, t_groups = HAND_MADE[case]
    assert align_spans(s, t) == (s_groups, t_groups)
    assert align_spans(s, t) == tuple(trl_align(s, t))


def _random_spans(rng: random.Random, n_bytes: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_bytes), rng.randint(0, n_bytes - 1)))
    edges = [0, *cuts, n_bytes]
    spans = [(a, b) for a, b in zip(edges, edges[1:], strict=False)]
    if rng.random() < 0.3:  # a zero-width special token (BOS / EOS) somewhere
        at = rng.randint(0, len(spans))
        pos = spans[at - 1][1] if at else 0
        spans.insert(at, (pos, pos))
    return spans


def test_align_spans_equals_trl_on_random_tokenizations_and_groups_cover_the_same_bytes():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 24)
        s, t = _random_spans(rng, n), _random_spans(rng, n)
        s_groups, t_groups = align_spans(s, t)
        assert (s_groups, t_groups) == tuple(trl_align(s, t))
        for sg, tg in zip(s_groups, t_groups, strict=True):
            if sg and tg:  # both sides of a group end at the same byte: a common boundary
                assert s[sg[-1]][1] == t[tg[-1]][1]
        flat_s = [i for g in s_groups for i in g]
        flat_t = [i for g in t_groups for i in g]
        assert flat_s == list(range(len(s))) and flat_t == list(range(len(t)))


# -- byte spans -------------------------------------------------------------------------------------------
def _check_spans_tile_the_text(tokenizer, text: str, spans: TokenSpans) -> None:
    data = text.encode("utf-8")
    assert spans.spans[0][0] == 0 and spans.spans[-1][1] == len(data)
    for (_, end), (start, _) in zip(spans.spans, spans.spans[1:], strict=False):
        assert start == end  # contiguous: no byte lost, none counted twice
    for token_id, (start, end) in zip(spans.ids, spans.spans, strict=True):
        piece = tokenizer.decode([token_id])
        if "\ufffd" not in piece:  # a whole-character token decodes to exactly its bytes
            assert piece.encode("utf-8") == data[start:end], (piece, data[start:end])


@pytest.mark.parametrize("text", TEXTS)
def test_byte_spans_tile_the_text_and_equal_trls(tokenizers, text):
    for tok in tokenizers:
        ours = token_byte_spans(tok, text)
        _check_spans_tile_the_text(tok, text, ours)
        [(ids, theirs)] = encode_with_byte_offsets(tok.backend_tokenizer, [text])
        assert ours.ids == ids and ours.spans == theirs


def test_a_character_split_over_byte_tokens_gets_one_exact_span_per_byte_piece(tokenizers):
    small = tokenizers[0]
    text = "a 😀 b"  # the emoji is one character (char 2) of 4 bytes (bytes 2..6)
    enc = small.backend_tokenizer.encode(text, add_special_tokens=False)
    inside = [i for i, (s, e) in enumerate(enc.offsets) if s <= 2 < e]
    assert len(inside) > 1, "the small tokenizer is expected to split the emoji"
    # the tokenizer's character offsets overlap: each piece claims the whole emoji
    assert all(enc.offsets[i][1] == 3 for i in inside)
    spans = token_byte_spans(small, text).spans
    pieces = [spans[i] for i in inside]
    # one byte per character of a byte-level piece, contiguous, from the space (byte 1) to byte 6
    assert [e - s for s, e in pieces] == [len(enc.tokens[i]) for i in inside]
    assert pieces[0][0] == 1 and pieces[-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))


def test_special_tokens_written_in_the_text_and_added_around_it(tokenizers):
    small = tokenizers[0]
    text = "<|im_start|>user\nhi<|im_end|>"
    spans = token_byte_spans(small, text)
    assert spans.ids[0] == small.convert_tokens_to_ids("<|im_start|>") and spans.spans[0] == (0, 12)
    assert spans.ids[-1] == small.convert_tokens_to_ids("<|im_end|>")
    assert spans.spans[-1] == (len(text) - 10, len(text))
    # a post-processor that adds BOS/EOS: zero-width spans where they stand
    backend = Tokenizer.from_str(small.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)]
    )
    wrapped = token_byte_spans(backend, "the fox", add_special_tokens=True)
    assert wrapped.ids[0] == 1 and wrapped.ids[-1] == 2
    assert wrapped.spans[0] == (0, 0) and wrapped.spans[-1] == (7, 7)


def test_a_special_token_one_tokenizer_lacks_is_one_merged_group(tokenizers):
    small, large = tokenizers
    large = train_tiny_tokenizer(CORPUS, vocab_size=420)
    large.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    text = "call <|tool|> now"
    s, t = token_byte_spans(small, text), token_byte_spans(large, text)
    tool = text.encode().index(b"<|tool|>")
    assert (tool, tool + 8) in t.spans and (tool, tool + 8) not in s.spans
    s_groups, t_groups = align_spans(s.spans, t.spans)
    [(sg, tg)] = [
        (sg, tg) for sg, tg in zip(s_groups, t_groups, strict=True) if tg == [t.spans.index((tool, tool + 8))]
    ]
    assert len(sg) > 1 and s.spans[sg[0]][0] == tool and s.spans[sg[-1]][1] == tool + 8


def test_sentencepiece_pieces_and_byte_fallback_get_exact_spans():
    pieces = [("<unk>", 0.0), *[(f"<0x{b:02X}>", -10.0) for b in range(256)], ("▁the", -1.0), ("▁fox", -1.0)]
    backend = Tokenizer(models.Unigram([*pieces, ("▁", -2.0), ("é", -2.0)], unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    text = "the 😀 foxé"  # bytes: the(0-3) space(3) emoji(4-8) space(8) fox(9-12) é(12-14)
    spans = token_byte_spans(backend, text)
    tokens = [backend.id_to_token(i) for i in spans.ids]
    assert tokens == ["▁the", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁fox", "é"]
    # the prefix space Metaspace adds is not in the text; the emoji's four bytes get one span each
    assert spans.spans == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 12), (12, 14)]


# -- batches --------------------------------------------------------------------------------------------
def test_alignment_of_two_tokenizers_groups_the_same_bytes_and_equals_trls(tokenizers):
    small, large = tokenizers
    s = [token_byte_spans(small, t) for t in TEXTS]
    t = [token_byte_spans(large, t) for t in TEXTS]
    s_ids, s_spans = stack_spans(s, 40)
    t_ids, t_spans = stack_spans(t, 32)
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    assert alignment.batch_size == 4 and alignment.student_seq_len == 40 and alignment.teacher_seq_len == 32
    merged = 0
    for b in range(len(TEXTS)):
        s_groups, t_groups = alignment.student_groups(b), alignment.teacher_groups(b)
        assert (s_groups, t_groups) == tuple(trl_align(s[b].spans, t[b].spans))
        for sg, tg in zip(s_groups, t_groups, strict=True):
            # both sides decode to the same text
            assert small.decode([s[b].ids[i] for i in sg]) == large.decode([t[b].ids[i] for i in tg])
            merged += len(sg) + len(tg) > 2
    assert merged > 3, "the two tokenizers should disagree somewhere"
    assert alignment.coincident().sum() + merged == alignment.n_groups
    # targets and rows point into the padded batch
    torch.testing.assert_close(alignment.student_targets, s_ids.reshape(-1)[alignment.student_rows])


def test_alignment_skips_positions_without_text_and_refuses_different_texts():
    ids = torch.zeros(1, 4, dtype=torch.long)
    spans = torch.tensor([[[-1, -1], [0, 2], [2, 5], [-1, -1]]])
    teacher = torch.tensor([[[-1, -1], [-1, -1], [0, 5], [-1, -1]]])
    alignment = TokenAlignment.build(ids, spans, ids, teacher)
    assert alignment.student_groups(0) == [[1, 2]] and alignment.teacher_groups(0) == [[2]]
    with pytest.raises(ValueError, match="same text"):
        TokenAlignment.build(ids, spans, ids, torch.tensor([[[0, 4], [-1, -1], [-1, -1], [-1, -1]]]))
    with pytest.raises(ValueError, match="ordered and disjoint"):
        TokenAlignment.build(ids, torch.tensor([[[0, 3], [2, 5], [-1, -1], [-1, -1]]]), ids, teacher)
    with pytest.raises(ValueError, match=r"\(-1, -1\)"):
        TokenAlignment.build(ids, torch.tensor([[[-1, 3], [0, 5], [-1, -1], [-1, -1]]]), ids, teacher)
    with pytest.raises(ValueError, match="spans must be"):
        TokenAlignment.build(ids, spans[:, :3], ids, teacher)


def test_smollm2_spans_equal_trls_and_align_with_a_tiny_tokenizer(tokenizers):
    from secure_kd.assets import asset_dir

    if not (asset_dir() / "tokenizer.json").exists():
        pytest.skip("SmolLM2 is not fetched here (secure-kd assets fetch-smollm2)")
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(asset_dir())
    for text in TEXTS:
        ours = token_byte_spans(smol, text)
        _check_spans_tile_the_text(smol, text, ours)
        [(ids, theirs)] = encode_with_byte_offsets(smol.backend_tokenizer, [text])
        assert ours.ids == ids and ours.spans == theirs
        tiny = token_byte_spans(tokenizers[0], text)
        for sg, tg in zip(*align_spans(ours.spans, tiny.spans), strict=True):
            assert smol.decode([ours.ids[i] for i in sg]) == tokenizers[0].decode([tiny.ids[i] for i in tg])


# -- padded vocabularies ------------------------------------------------------------------------------
def test_padded_vocabulary_is_detected_and_trimming_keeps_every_real_token(tokenizers):
    small = train_tiny_tokenizer(CORPUS, vocab_size=300)
    small.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # the last id, 300
    assert small.vocab_size == 300 and small.convert_tokens_to_ids("<|tool|>") == 300
    padding = VocabPadding.detect(small, 320)
    assert (padding.real_size, padding.width, padding.padding, padding.n_tokens) == (301, 320, 19, 301)
    # every id the tokenizer can produce survives the trim, with its own column
    logits = torch.arange(320, dtype=torch.float32).expand(2, 3, 320)
    trimmed = padding.trim(logits)
    real_ids = sorted(set(small.get_vocab().values()) | set(small.all_special_ids))
    assert trimmed.shape[-1] == 301 and trimmed[0, 0, real_ids].tolist() == [float(i) for i in real_ids]
    # `tokenizer.vocab_size` (300, added tokens excluded) would have dropped <|tool|>
    assert small.convert_tokens_to_ids("<|tool|>") >= small.vocab_size
    assert VocabPadding.detect(small, 301).padding == 0
    with pytest.raises(ValueError, match="could never be predicted"):
        VocabPadding.detect(small, 300)
    with pytest.raises(ValueError, match="columns"):
        padding.trim(logits[..., :310])


def test_one_family_padded_to_two_widths_is_trimmed_to_one_vocabulary(tokenizers):
    small, large = tokenizers
    pair = VocabPair.from_tokenizers(small, small, student_width=320, teacher_width=384)
    s = torch.randn(2, 3, 320)
    t = torch.randn(2, 3, 384)
    s_trim, t_trim = pair.trim_pair(s, t)
    assert s_trim.shape == t_trim.shape == (2, 3, 300)
    torch.testing.assert_close(t_trim, t[..., :300])
    other = VocabPair.from_tokenizers(small, large, student_width=300, teacher_width=len(large))
    with pytest.raises(ValueError, match="uld"):
        other.trim_pair(s[..., :300], torch.randn(2, 3, len(large)))


def test_shared_tokens_equal_trls_vocabulary_mapping(tokenizers):
    small, large = tokenizers
    pair = VocabPair.from_tokenizers(small, large, student_width=320, teacher_width=len(large) + 12)
    config = types.SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=True,
        uld_token_merge_strategy="bayesian",
        uld_use_hybrid_loss=True,
        beta=0.5,
    )
    trl = ULDLoss(config, student_tokenizer=small, teacher_tokenizer=large)
    expected = sorted(trl._vocab_mapping.items())
    assert pair.shared_teacher_ids.tolist() == [t for t, _ in expected]
    assert pair.shared_student_ids.tolist() == [s for _, s in expected]
    assert pair.n_shared == 300  # the smaller tokenizer's merges are a prefix of the larger one's
    assert int(pair.shared_teacher_ids.max()) < pair.teacher.real_size < pair.teacher.width
