"""Teacher attribution in the audit: which of several teachers a student's behaviour came from.

`secure-kd attack teacher_attribution` (and an audit entry of that name) takes a student (`model`), the
candidate teachers (`teachers`: model directories sharing the student's tokenizer) and records
(`data`), and attributes each record to the teacher whose next-token distributions the student is
closest to (mean KL(p_student || p_teacher) over the record's tokens;
`secure_kd.evaluate.teacher_attribution`). The metric `suspect_teacher_share` is the share of records
attributed to `suspect` (e.g. a teacher suspected of poisoning), with its Wilson interval: with n
teachers a student that took equally from all of them lands near 1/n; near 1 says the student sits
closest to that teacher on these records. Run it on the records where the behaviour shows (e.g. answers
carrying an injected brand): on ordinary text teachers agree, and the shares there are noise
(docs/results.md, "Multi-teacher distillation with a poisoned teacher").

A comparison among the teachers given, not a proof of provenance: a student is always attributed to the
nearest, so read each teacher's `mean_kl` with the shares.

With no model it builds its own case: three random tiny Llamas and a student copied from the second,
on random token sequences (the second must get every record).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from attacks import ATTACKS
from secure_kd.config import TinyModelConfig
from secure_kd.data import TokenizedExample, collate, load_records, tokenize_records
from secure_kd.evaluate.teacher_attribution import Attribution, teacher_attribution
from secure_kd.models import build_tiny, load_pretrained, load_tokenizer, resolve_device
from secure_kd.plugins import Input, Metric, Plugin, PluginConfig, Requirement, write_result
from secure_kd.readings import Reading, proportion

OWN_VOCAB = 64


class TeacherAttributionConfig(PluginConfig):
    out: str = "runs/attacks/teacher_attribution"
    model: str | None = Field(None, description="the student: a model directory; none: a built-in case")
    teachers: list[str] = Field(default_factory=list, description="candidate teachers: model directories")
    suspect: int = Field(0, ge=0, description="index in `teachers` whose share is the metric")
    data: str | None = Field(None, description="records (jsonl, json, csv, parquet, txt) to attribute")
    text_field: str = "text"
    max_length: int = Field(128, ge=8)
    max_records: int = Field(500, gt=0)
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> TeacherAttributionConfig:
        if self.model is not None and (len(self.teachers) < 2 or self.data is None):
            raise ValueError(
                "a given model needs `teachers` (at least two model directories sharing its tokenizer) and "
                "`data` (the records to attribute)"
            )
        n = len(self.teachers) if self.model is not None else 3
        if self.suspect >= n:
            raise ValueError(f"suspect {self.suspect} is not an index of the {n} teachers; use 0 to {n - 1}")
        return self


class TeacherAttributionResult(BaseModel):
    suspect: str
    attribution: Attribution
    seconds: float


def _own_case(cfg: TeacherAttributionConfig):
    """Three random tiny teachers, a student copied from the second, random token records."""
    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)
    teachers = [build_tiny(tiny, OWN_VOCAB, seed=cfg.seed + 1 + i).eval() for i in range(3)]
    student = copy.deepcopy(teachers[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(1, OWN_VOCAB, (min(cfg.max_records, 64), 16), generator=gen).tolist()
    examples = [TokenizedExample(row, row, i) for i, row in enumerate(ids)]
    return student, teachers, examples, 0, ["teacher_0", "teacher_1", "teacher_2"]


def _given_case(cfg: TeacherAttributionConfig):
    tokenizer = load_tokenizer(cfg.model)
    records = [dict(r) for r in load_records(cfg.data)][: cfg.max_records]
    examples = tokenize_records(records, tokenizer, max_length=cfg.max_length, text_field=cfg.text_field)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    teachers = [load_pretrained(path).eval() for path in cfg.teachers]
    return load_pretrained(cfg.model).eval(), teachers, examples, int(pad or 0), list(cfg.teachers)


def run(config: TeacherAttributionConfig) -> TeacherAttributionResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    case = _own_case if config.model is None else _given_case
    student, teachers, examples, pad, names = case(config)
    if not examples:
        raise ValueError("no records to attribute after tokenization; check `data` and `text_field`")
    student = student.to(device)
    teachers = [t.to(device) for t in teachers]
    size = config.batch_size
    batches = [collate(examples[i : i + size], pad_id=pad) for i in range(0, len(examples), size)]
    attribution = teacher_attribution(student, teachers, batches, names=names, device=device)
    result = TeacherAttributionResult(
        suspect=names[config.suspect], attribution=attribution, seconds=time.perf_counter() - started
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The suspect teacher's share of the records, with a Wilson interval over them."""
    attribution = result["attribution"]
    share = next(t for t in attribution["teachers"] if t["teacher"] == result["suspect"])
    value = proportion(float(share["share"]), int(attribution["n_records"]), confidence)
    value.note = f"{share['records']} of {attribution['n_records']} records closest to {result['suspect']}"
    return {"suspect_teacher_share": value}


PLUGIN = ATTACKS.register(
    "teacher_attribution",
    Plugin(
        name="teacher_attribution",
        Config=TeacherAttributionConfig,
        Result=TeacherAttributionResult,
        run=run,
        summary="which of several teachers a student sits closest to, record by record (KL)",
        target="model",
        kinds=("causal_lm",),
        own_target="three random tiny Llamas and a student copied from the second",
        inputs={"data": Input("data")},
        requires=(
            Requirement("teachers", (None, []), "give `teachers`: the candidate teachers' model directories"),
            Requirement("data", (None,), "give --data: the records to attribute (where the behaviour shows)"),
        ),
        metrics=(
            Metric(
                "suspect_teacher_share", risk="bias_injection", medium=0.5, high=0.8,
                why="share of records on which the student is closer (KL) to the suspect teacher than to "
                "every other candidate; with n teachers an even mix lands near 1/n",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
