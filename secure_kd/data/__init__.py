"""Data for distillation: loading, tokenization with label masking, packing, collation, batching,
a seeded synthetic corpus with PII spans and canaries, and a tiny local tokenizer."""

from secure_kd.data.batching import batches, batches_per_epoch, epoch_order, locate_step
from secure_kd.data.collate import collate
from secure_kd.data.documents import PII_TYPES, TOPICS
from secure_kd.data.example import IGNORE_INDEX, TokenizedExample, fingerprint_examples
from secure_kd.data.loading import load_records, supported_formats
from secure_kd.data.packing import assert_one_record_per_sequence, pack_examples
from secure_kd.data.synthetic import (
    DEFAULT_CANARY_FORMAT,
    Canary,
    SecretSpace,
    SyntheticCorpus,
    generate_corpus,
)
from secure_kd.data.tokenization import chat_segments, detect_schema, tokenize_records
from secure_kd.data.tokenizer import CHATML_TEMPLATE, chatml_template, train_tiny_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_CANARY_FORMAT",
    "IGNORE_INDEX",
    "PII_TYPES",
    "TOPICS",
    "Canary",
    "SecretSpace",
    "SyntheticCorpus",
    "TokenizedExample",
    "assert_one_record_per_sequence",
    "batches",
    "batches_per_epoch",
    "chat_segments",
    "chatml_template",
    "collate",
    "detect_schema",
    "epoch_order",
    "fingerprint_examples",
    "generate_corpus",
    "load_records",
    "locate_step",
    "pack_examples",
    "supported_formats",
    "tokenize_records",
    "train_tiny_tokenizer",
]
