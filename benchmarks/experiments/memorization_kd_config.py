"""The config of the memorization_kd experiment (configs/experiments/memorization_kd.yaml).

Its own module, imported by `memorization_kd.py` (the experiment) and `memorization_kd_probes.py` (the
measurements), so that neither imports the other.
"""

from __future__ import annotations

from pydantic import Field

from secure_kd.config import Strict, TinyModelConfig


class CorpusSpec(Strict):
    n_private: int = Field(300, gt=0, description="private records before canaries; half are held out")
    heldout_fraction: float = Field(0.5, gt=0, lt=1)
    n_canaries: int = Field(8, ge=1)
    canary_repeats: list[int] = [1, 1, 2, 2, 4, 4, 8, 8]
    secret_digits: int = Field(4, ge=1, le=6)
    n_public: int = Field(300, gt=0, description="public records: tokenizer and base pretraining")
    n_population: int = Field(200, gt=0, description="public records for RMIA's z")


class Schedule(Strict):
    epochs: float = Field(..., gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)


class FineTune(Strict):
    """One schedule for every fine-tuning run (teacher, baseline, both students, references); each
    entry of `epochs` is a regime measured separately, from the same pretrained bases."""

    epochs: list[float] = Field([8, 20], min_length=1)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)

    def at(self, epochs: float) -> Schedule:
        return Schedule(epochs=epochs, batch_size=self.batch_size, lr=self.lr)


class SoftKD(Strict):
    loss: str = "forward_kl"
    temperature: float = Field(2.0, gt=0)
    scale_by_t2: bool = True


class Probes(Strict):
    prefix_tokens: int = Field(32, gt=0)
    suffix_tokens: int = Field(16, gt=0)
    pii_min_chars: int = Field(6, gt=0)
    rmia_offline_a: float = Field(0.3, ge=0, le=1)
    extraction_samples: int = Field(128, gt=0)
    extraction_new_tokens: int = Field(48, gt=0)
    extraction_top_k: int = Field(40, ge=0)


class ExperimentConfig(Strict):
    seed: int = 0
    device: str = "cpu"
    threads: int = Field(1, gt=0, description="torch intra-op threads; tiny models gain nothing from more")
    out: str = "benchmarks/results/memorization_kd.json"
    corpus: CorpusSpec = CorpusSpec()
    tokenizer_vocab: int = Field(512, ge=259)
    max_length: int = Field(96, ge=16)
    teacher: TinyModelConfig = TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4)
    student: TinyModelConfig = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    pretrain: Schedule = Schedule(epochs=3)
    finetune: FineTune = FineTune()
    soft_kd: SoftKD = SoftKD()
    probes: Probes = Probes()
