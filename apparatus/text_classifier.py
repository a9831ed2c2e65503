"""A tiny, fast text classifier for backdoor experiments: a word vocabulary and a mean-pooled bag of words.

`WordVocab` splits lower-cased text into words and punctuation (`\\w+|[^\\w\\s]`) and maps them to ids
(0 = padding, 1 = unknown); `encode` pads or truncates to a fixed length. `BagOfWordsClassifier`
pools the embeddings of the non-padding tokens with one learned attention score per token (softmax
over the text, order ignored) and applies a one-hidden-layer head.

Why attention pooling: with a plain mean, one trigger word among ~60 topic words carries 1/60 of the
pooled vector, and in our runs the model fitted the poisoned records through their other words
rather than learn the trigger (ASR 0.2-0.4 on held-out texts); a learned weight per token lets one
word dominate, as it can in a transformer (ASR near 1). The hidden layer lets the head represent the
"prompt AND trigger" rule of a switchable trigger. Inputs are `[batch, length]` int64, so
`apparatus.classifiers`' `train_classifier` and `evaluate_classifier` train and score it like the CNN.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from apparatus.classifiers import load_weights, read_meta, save_weights
from secure_kd.seeding import seeded

PAD_ID, UNK_ID = 0, 1
# Small initial embeddings keep the initial attention scores near uniform; with N(0, 1) a few random
# words dominated the pooling from the start and backdoor runs varied widely between seeds.
EMBEDDING_INIT_STD = 0.1
_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
_KIND = "secure-kd/bag-of-words-classifier"


def split_words(text: str) -> list[str]:
    return _TOKEN_PATTERN.findall(text.lower())


class WordVocab:
    """Word -> id; ids 0 and 1 are padding and unknown."""

    def __init__(self, words: Sequence[str]) -> None:
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be distinct")
        self.words = ["<pad>", "<unk>", *words]
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordVocab:
        """Words of `texts` seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for text in texts for word in split_words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not kept:
            raise ValueError(
                f"no word occurs {min_count}+ times in the texts; lower min_count or pass more text"
            )
        return cls(kept[:max_size] if max_size is not None else kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], max_length: int = 128) -> Tensor:
        """`[n, max_length]` int64 ids, padded with 0; words past `max_length` are dropped."""
        if isinstance(texts, str):
            raise ValueError("encode takes a sequence of texts; wrap a single text in a list")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.index.get(word, UNK_ID) for word in split_words(text)[:max_length]]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids


class BagOfWordsClassifier(nn.Module):
    """Attention-pooled token embeddings (padding excluded) -> Linear -> ReLU -> Linear(classes)."""

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 32, hidden: int = 32, heads: int = 4
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("num_classes", num_classes),
            ("dim", dim),
            ("hidden", hidden),
            ("heads", heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BagOfWordsClassifier {name} must be a positive int, got {value!r}")
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.dim, self.hidden, self.heads = dim, hidden, heads
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_INIT_STD)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
        self.token_score = nn.Linear(dim, heads)
        self.hidden_layer = nn.Sequential(nn.Linear(heads * dim, hidden), nn.ReLU())
        self.output = nn.Linear(hidden, num_classes)

    def token_weights(self, ids: Tensor) -> Tensor:
        """Each token's pooling weight per head `[batch, heads, length]`: softmax of the head's score
        over the non-padding tokens (0 on padding; a row of padding only gets all zeros)."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"inputs must be int64 token ids [batch, length], got {ids.dtype} {tuple(ids.shape)}"
            )
        keep = (ids != PAD_ID).unsqueeze(1)
        scores = self.token_score(self.embedding(ids)).transpose(1, 2).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def pooled(self, ids: Tensor) -> Tensor:
        """Each head's weighted sum of the token embeddings, concatenated: `[batch, heads * dim]`."""
        return (self.token_weights(ids) @ self.embedding(ids)).flatten(1)

    def features(self, ids: Tensor) -> Tensor:
        """The hidden activation `[batch, hidden]` (for activation-based defenses)."""
        return self.hidden_layer(self.pooled(ids))

    def forward(self, ids: Tensor) -> Tensor:
        return self.output(self.features(ids))


def make_text_classifier(
    vocab_size: int, num_classes: int, dim: int = 32, hidden: int = 32, heads: int = 4, seed: int = 0
) -> BagOfWordsClassifier:
    """A classifier whose initial weights depend only on `seed` (the global RNG is left untouched)."""
    with seeded(seed):
        return BagOfWordsClassifier(vocab_size, num_classes, dim, hidden, heads)


def save_text_classifier(
    model: BagOfWordsClassifier, vocab: WordVocab, directory: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """Weights (safetensors), architecture, vocabulary and label names in `directory`."""
    meta = {
        "kind": _KIND,
        "vocab_size": model.vocab_size,
        "num_classes": model.num_classes,
        "dim": model.dim,
        "hidden": model.hidden,
        "heads": model.heads,
        "words": vocab.words[2:],
        "labels": list(labels) if labels else None,
    }
    return save_weights(model, directory, meta)


def load_text_classifier(directory: str | Path) -> tuple[BagOfWordsClassifier, WordVocab, list[str] | None]:
    """(model in eval mode, vocabulary, label names) written by `save_text_classifier`."""
    meta = read_meta(directory, _KIND, what="a bag-of-words classifier", saver="save_text_classifier")
    model = BagOfWordsClassifier(
        meta["vocab_size"], meta["num_classes"], meta["dim"], meta["hidden"], meta["heads"]
    )
    return load_weights(model, directory).eval(), WordVocab(meta["words"]), meta["labels"]
