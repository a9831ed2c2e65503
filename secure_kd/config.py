"""Pydantic models for every job, and `load_config(path, overrides)`.

YAML is read with `yaml.safe_load` and validated with `extra="forbid"`: an unknown key, a
wrong type or an impossible value is a `ConfigError` that names the field and the fix. Some
checks need the model (top_k <= vocab): `check_against_vocab` runs them once it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secure_kd.dp.config import PrivacyConfig
from secure_kd.multi_teacher_config import WeightedTeacher, check_teachers
from secure_kd.robust_rules import RuleName
from secure_kd.served.config import ServedConfig
from secure_kd.swing_config import SwingKD, check_swing
from secure_kd.teacher_hacking import TeacherHackingField

SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Strict):
    """A random Llama built from a config (tests, quick experiments)."""

    # Upper bounds far above any tiny model (Llama-3-405B has width 16,384 and 126 layers): a typo such
    # as an extra zero fails here, naming the field, instead of exhausting the machine's memory.
    hidden_size: int = Field(64, gt=0, le=16_384)
    num_layers: int = Field(2, gt=0, le=256)
    num_heads: int = Field(4, gt=0, le=1024)
    num_kv_heads: int | None = Field(None, gt=0, le=1024)
    intermediate_size: int | None = Field(None, gt=0, le=131_072)
    vocab_size: int | None = Field(None, gt=0, le=1 << 22, description="default: the tokenizer's vocabulary")
    max_position_embeddings: int = Field(2048, gt=0, le=1 << 20)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a width that is a multiple of the head count"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "grouped-query attention shares each key/value head among a whole number of heads"
            )
        return self


class LoraConfig(Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelConfig(Strict):
    """Where a model comes from.

    source: `smollm2` (SmolLM2-135M-Instruct, Q4_1, fetched from its PyPI wheel), `tiny`
    (random Llama from `tiny`), `teacher_layers` (students only: copy the teacher's embeddings,
    final norm, output layer and the layers listed in `layers`, DistilBERT-style), `served`
    (teachers and attack victims: an OpenAI-compatible server described by `served`;
    docs/served-teacher.md), or a path to a local Hugging Face directory (safetensors weights).
    """

    source: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    layers: list[int] | None = None
    lora: LoraConfig | None = None
    freeze_embeddings: bool = Field(
        False,
        description="students: keep the input embeddings (and a tied output layer) fixed; faster on CPU",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    served: ServedConfig | None = Field(
        None, description="source: served: the server's base_url, model, api_key_env, dialect, tokenizer, ..."
    )

    @model_validator(mode="after")
    def _source_is_known(self) -> ModelConfig:
        if self.source == "teacher_layers" and not self.layers:
            raise ValueError("source 'teacher_layers' needs `layers`, e.g. layers: [0, 10, 20, 29]")
        if self.source == "served" and self.served is None:
            raise ValueError(
                "source 'served' needs a `served` block, e.g. served: {base_url: http://127.0.0.1:8080, "
                "model: smollm2, api_key_env: SECURE_KD_SERVED_KEY}"
            )
        if self.served is not None and self.source != "served":
            raise ValueError(f"a `served` block applies to source: served only, not {self.source!r}")
        known = ("smollm2", "tiny", "teacher_layers", "served")
        if self.source not in known and not Path(self.source).is_dir():
            raise ValueError(
                f"source {self.source!r} is neither 'smollm2', 'tiny', 'teacher_layers', 'served' nor an "
                "existing directory; give a local Hugging Face model directory (relative paths are from the "
                "current directory) or fetch the real teacher with `secure-kd assets fetch-smollm2`"
            )
        return self


class DistillModelConfig(ModelConfig):
    """A teacher or student of `secure-kd distill`: a `ModelConfig` plus, optionally, its own tokenizer.

    tokenizer: None (the job's `tokenizer`), 'teacher' (the teacher's own), 'tiny:<vocab>' (trained on
    the data) or a local tokenizer directory. A student whose tokenizer differs from the teacher's
    distils with a cross-tokenizer objective (kd.loss: uld or span_aligned).
    """

    tokenizer: str | None = Field(
        None, description="default: the job's tokenizer; 'teacher', 'tiny:<vocab>' or a tokenizer directory"
    )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_spec(cls, value: str | None) -> str | None:
        if value is None or value == "teacher":
            return value
        if value.startswith("tiny:"):
            size = value.split(":", 1)[1]
            if not size.isdigit() or not 259 <= int(size) <= 1 << 20:
                raise ValueError(
                    f"tokenizer {value!r}: tiny:<vocab> needs a vocabulary size from 259 to 1048576, "
                    "e.g. tiny:512"
                )
            return value
        if not Path(value).is_dir():
            raise ValueError(
                f"tokenizer {value!r} is neither 'teacher', 'tiny:<vocab>' nor an existing directory; give a "
                "directory holding tokenizer.json (a saved Hugging Face tokenizer)"
            )
        return value


class TeacherConfig(DistillModelConfig, WeightedTeacher):
    """One entry of `teachers:`: a teacher block plus its `weight` (secure_kd.multi_teacher_config)."""


class SyntheticDataConfig(Strict):
    n_records: int = Field(400, gt=0)
    n_canaries: int = Field(4, ge=0)
    canary_repeats: int | list[int] = 1
    secret_digits: int = Field(4, ge=1, le=8)
    seed: int | None = Field(None, description="default: the job's seed")
    n_users: int | None = Field(
        None,
        gt=0,
        description="give each record a `user_id` among this many users (skewed counts; every insertion "
        "of one canary goes to one user): data for user-level DP (data.user_field: user_id)",
    )


class DataConfig(Strict):
    """Training text: a local file (jsonl/json/csv/parquet/txt) or the synthetic generator."""

    train: str = "synthetic"
    heldout: str | None = Field(None, description="a file; default: split `heldout_fraction` off train")
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    text_field: str = "text"
    privileged_field: str | None = Field(
        None,
        min_length=1,
        description="kd.mode: self_privileged: the field of each record holding the privileged context "
        "(a document, a solution, a customer record) that only the self-teacher sees, before the prompt",
    )
    user_field: str | None = Field(
        None,
        min_length=1,
        description="the field naming each record's user (person, customer): the unit of "
        "train.privacy.unit: user; records with one value are one user",
    )
    max_length: int = Field(128, ge=8)
    packing: bool = False
    mask_prompt: bool = True
    max_records: int | None = Field(None, gt=0)

    @field_validator("train", "heldout")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is None or value == "synthetic":
            return value
        if Path(value).is_dir():
            raise ValueError(
                f"data file {value!r} is a directory; give one .jsonl/.json/.csv/.parquet/.txt file "
                "inside it, or 'synthetic' for the generated corpus"
            )
        if not Path(value).is_file():
            raise ValueError(
                f"data file {value!r} does not exist (relative paths are from the current directory); "
                "give a .jsonl/.json/.csv/.parquet/.txt file, or 'synthetic' for the generated corpus"
            )
        return value


LossName = str


class KDConfig(Strict):
    """`kd`: the distillation objective and how the teacher's targets are used.

    `loss` names an objective of `secure_kd.losses` and `params` its own parameters, validated by that
    objective's typed model (`secure_kd.losses.loss_info(loss).params`; jsd: beta, skew_*: alpha,
    token_selective: ratio, taid: t_start, ...; `secure-kd validate --schema` lists them per loss):
    a value out of range, a missing one or one of another objective is refused at `kd.params.<name>`.
    `kd_weight` * KD loss + `ce_weight` * cross-entropy on the labels; `teacher_targets`: live
    teacher or the offline top-k cache; `mode`: off_policy, on_policy (the student generates a share
    `lmbda` of the batches, GKD), seq_kd (the teacher's generations are the targets) or
    self_privileged (the teacher is the student's own weights, `self_teacher`, shown the record's
    `data.privileged_field` before the prompt; `token_share` of the response tokens distilled;
    secure_kd.self_distill).
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, json_schema_extra=lambda s, _: _loss_params_schema(s)
    )

    loss: LossName = "jsd"
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the loss's own parameters, e.g. {beta: 0.5} for jsd; each loss's are in allOf below",
    )
    temperature: float = 1.0
    scale_by_t2: bool = False
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    teacher_targets: Literal["live", "cache"] = "live"
    top_k: int | None = Field(64, gt=0, description="teacher top-k; null = full vocabulary (live only)")
    tail: Literal["uniform", "zero"] = "uniform"
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="tokens per loss chunk; default: about 8 MiB of float32 per chunk (42 tokens at "
        "vocab 49,152), which measured fastest on CPU",
    )
    fused: bool = False
    mode: Literal["off_policy", "on_policy", "seq_kd", "self_privileged"] = "off_policy"
    lmbda: float = Field(
        0.5, ge=0, le=1, description="on_policy, self_privileged: fraction of batches the student generates"
    )
    self_teacher: Literal["frozen", "shared"] = Field(
        "frozen",
        description="self_privileged: the teacher is a frozen copy of the student made at the start (frozen) "
        "or the live student itself under no_grad (shared)",
    )
    token_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="self_privileged: distil at most this share of each example's response tokens, those "
        "where the privileged teacher is the more certain (token_selective's rule); 1.0 = every token",
    )
    teacher_rule: RuleName = Field(
        "mean",
        description="teachers: how their distributions are combined per position: mean, weighted_mean, "
        "median or trimmed_mean (secure_kd.multi_teacher_config)",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="teacher_rule trimmed_mean: share of teachers cut per end, per token"
    )
    max_new_tokens: int = Field(32, gt=0)
    generation_temperature: float = Field(1.0, gt=0)
    teacher_max_length: int | None = Field(
        None,
        ge=8,
        description="a teacher with another tokenizer: its sequence length in tokens (default: 2 x "
        "data.max_length, room for a less efficient tokenizer); the two are aligned on the text both cover",
    )
    swing: SwingKD | None = Field(
        None,
        description="swing distillation: hotter, noised teacher targets where a detector flags the next "
        "token as private (a heuristic, not DP); secure_kd.swing_config",
    )

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"temperature must be > 0 (got {value}); 1.0 is the usual choice")
        return value

    @model_validator(mode="after")
    def _loss_and_params(self) -> KDConfig:
        from secure_kd.losses import available_losses, loss_info

        names = available_losses()
        if self.loss not in names:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of: {', '.join(names)}")
        if loss_info(self.loss).inputs != "logits":
            raise ValueError(
                f"loss {self.loss!r} matches hidden states, and distillation here compares logits; choose "
                "a logit objective such as jsd, forward_kl or reverse_kl"
            )
        # typed as the loss's model gives them (an int for a float becomes a float); the keys as given.
        # Set without re-validation: this validator also runs on every assignment to the model.
        self.__dict__["params"] = _checked_loss_params(self.loss, self.params)
        if self.teacher_targets == "cache" and self.top_k is None:
            raise ValueError(
                "a cache stores the teacher's top-k: set top_k (e.g. 64) with teacher_targets: cache"
            )
        if self.mode != "off_policy" and self.teacher_targets == "cache":
            raise ValueError(
                f"mode {self.mode!r} scores text the teacher has not seen before, so it needs "
                "teacher_targets: live (a cache only covers the fixed training set)"
            )
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train; set one of them > 0")
        check_swing(self)
        if self.mode != "self_privileged":
            given = [f for f in ("self_teacher", "token_share") if f in self.model_fields_set]
            if given and (self.token_share != 1.0 or self.self_teacher != "frozen"):
                raise ValueError(
                    f"{' and '.join(given)} apply to mode: self_privileged only, not mode {self.mode!r}; "
                    "remove them or set mode: self_privileged (with data.privileged_field)"
                )
        elif self.fused:
            raise ValueError(
                "mode: self_privileged has no fused form (the teacher reads another input); set fused: false"
            )
        return self


def loss_parameters(name: str) -> dict[str, Any]:
    """The `kd.params` an objective takes (its params model's fields): name -> default
    (`inspect.Parameter.empty` when required). What the trainer passes (logits, labels, temperature,
    reduction, tail, chunk_size) and the per-batch inputs of uld / span_aligned
    (`CROSS_TOKENIZER_ARGUMENTS`) are never among them (tests/engine/test_losses_params.py checks each model
    against its objective's signature)."""
    from secure_kd.losses import loss_info
    from secure_kd.losses.params import param_defaults

    return param_defaults(loss_info(name).params)


def _checked_loss_params(loss: str, params: dict[str, Any]) -> dict[str, Any]:
    """`kd.params` validated by `kd.loss`'s params model, or a ValidationError with one entry per
    problem at `kd.params.<name>`. Parameters of another objective are refused: switching the loss
    (`--set kd.loss=reverse_kl` on a config written for jsd) must not carry the old loss's parameters
    into a call that rejects them."""
    import json

    from pydantic_core import InitErrorDetails, PydanticCustomError

    from secure_kd.losses import loss_info
    from secure_kd.losses.params import describe_param, describe_params, param_problems

    model = loss_info(loss).params
    problems = param_problems(model, params)
    if not problems:
        return model.model_validate(params).model_dump(include=set(params))
    errors: list[InitErrorDetails] = []

    def error(loc: tuple[str, ...], message: str, value: Any) -> None:
        # type "value_error": `_message` shows the text as it is; "{msg}" keeps braces in it literal
        errors.append(
            InitErrorDetails(
                type=PydanticCustomError("value_error", "{msg}", {"msg": message}), loc=loc, input=value
            )
        )

    unknown = sorted(p.field for p in problems if p.kind == "unknown")  # type: ignore[type-var]
    if unknown:
        keep = ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items() if k not in unknown)
        fix = f"--set 'kd.params={{{keep}}}'" if keep else "--set kd.params={}"
        error(
            ("params",),
            f"params {unknown} do not apply to loss {loss!r}, which takes {describe_params(model)}; they "
            f"belong to another objective. Remove them from kd.params (on the command line: {fix})",
            params,
        )
    for p in problems:
        if p.kind == "unknown":
            continue
        if p.field is None:
            error(("params",), f"{p.reason} (loss {loss!r})", params)
            continue
        field = model.model_fields[p.field]
        example = "<value>" if field.is_required() else json.dumps(field.default)  # YAML, as --set reads
        said = "is required" if p.kind == "missing" else f"{p.reason} (got {p.value!r})"
        error(
            ("params", p.field),
            f"{said}; loss {loss!r} takes {describe_param(model, p.field)} "
            f"(e.g. --set kd.params.{p.field}={example})",
            p.value,
        )
    raise ValidationError.from_exception_data("KDConfig", errors)


def _loss_params_schema(schema: dict[str, Any]) -> None:
    """JSON schema of `kd`: `loss` lists the objectives; `params` follows the chosen loss's model."""
    from secure_kd.losses import available_losses, loss_info

    names = [n for n in available_losses() if loss_info(n).inputs == "logits"]
    schema["properties"]["loss"]["enum"] = names
    schema["allOf"] = [
        {
            "if": {"properties": {"loss": {"const": name}}, "required": ["loss"]},
            "then": {"properties": {"params": loss_info(name).params.model_json_schema()}},
        }
        for name in names
    ]


class TrainConfig(Strict):
    """`train`: the optimizer loop (AdamW, schedule, clipping, precision, checkpoints) and, with
    `privacy`, DP-SGD of the student (secure_kd.dp.DPDistiller; docs/privacy.md)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(10, gt=0)
    eval_batches: int = Field(8, gt=0)
    privacy: PrivacyConfig | None = Field(None, description="DP-SGD of the student; see docs/privacy.md")
    teacher_hacking: TeacherHackingField = Field(
        None, description="watch for teacher hacking every N steps; warn or stop (secure_kd.teacher_hacking)"
    )


class CanaryAuditConfig(Strict):
    """`audit.canaries`: `n` canary records for a one-run DP audit (secure_kd.audit_canaries), each
    inserted with probability 1/2, drawn from `seed`; which went in is written to the run's sidecar."""

    n: int = Field(..., ge=2, le=100_000, description="how many canaries (each inserted with prob. 1/2)")
    seed: int = Field(0, description="draws the secrets and which canaries are inserted")


class JobAuditConfig(Strict):
    """`audit`: what a training job prepares for auditing it afterwards."""

    canaries: CanaryAuditConfig | None = None


class DistillJob(Strict):
    """`secure-kd distill`: distil a student from a teacher."""

    schema_version: int = SCHEMA_VERSION
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = "runs/distill"
    teacher: DistillModelConfig = DistillModelConfig(source="tiny")
    teachers: list[TeacherConfig] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="several teachers instead of `teacher`, combined by kd.teacher_rule; teachers[0] is the "
        "primary (its tokenizer, its layers for a teacher_layers student)",
    )
    student: DistillModelConfig = DistillModelConfig(source="tiny")
    tokenizer: str = Field(
        "teacher",
        description="'teacher' (the teacher's own), 'tiny:<vocab>' (train one on the data), or a dir; "
        "teacher.tokenizer / student.tokenizer override it per side",
    )
    data: DataConfig = DataConfig()
    kd: KDConfig = KDConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: str | None = Field(None, description="default: <out>/teacher-cache")
    audit: JobAuditConfig = Field(
        JobAuditConfig(), description="canaries for a one-run DP audit (`secure-kd audit --canaries`)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistillJob:
        check_teachers(self)  # with a `teachers:` list, `teacher` becomes teachers[0]
        _check_self_privileged(self)  # first: it makes the teacher the student's model
        if self.teacher.source == "teacher_layers":
            raise ValueError("teacher.source cannot be 'teacher_layers'; that is a way to build a student")
        if self.teacher_tokenizer.startswith("tiny:") and self.teacher.source == "smollm2":
            raise ValueError(
                "the SmolLM2 teacher has its own tokenizer: use tokenizer: teacher (a student with another "
                "tokenizer sets student.tokenizer)"
            )
        if self.tokenizers_differ() is True or _needs_alignment(self.kd):
            problems = cross_tokenizer_problems(self)
            if problems:
                raise ValueError(" ".join(problems))
        if self.train.privacy is not None:
            _check_private_job(self)
        _check_user_unit(self)
        return self

    @property
    def teacher_tokenizer(self) -> str:
        """The teacher's tokenizer spec: teacher.tokenizer, else the job's `tokenizer`."""
        return self.teacher.tokenizer or self.tokenizer

    @property
    def student_tokenizer(self) -> str:
        """The student's tokenizer spec: student.tokenizer, else the job's `tokenizer`."""
        return self.student.tokenizer or self.tokenizer

    def tokenizers_differ(self) -> bool | None:
        """True / False when the two specs certainly name different / the same tokenizers; None when only
        loading them tells (two directories, a directory and the teacher's own): run_distill then
        compares their fingerprints."""
        specs = (self.student_tokenizer, self.teacher_tokenizer)
        sides = [_tokenizer_identity(spec, self.teacher.source) for spec in specs]
        if sides[0] == sides[1]:
            return False
        if "tiny" in (sides[0][0], sides[1][0]):
            return True  # a tokenizer trained here is not a saved one, and tiny:N != tiny:M
        return None


def _needs_alignment(kd: KDConfig) -> bool:
    from secure_kd.losses import loss_info

    return kd.kd_weight > 0 and loss_info(kd.loss).cross_tokenizer == "required"


def _tokenizer_identity(spec: str, teacher_source: str) -> tuple[str, str]:
    if spec == "teacher":
        spec = teacher_source
    if spec.startswith("tiny:"):
        return ("tiny", spec.split(":", 1)[1])
    if spec == "smollm2":
        return ("source", "smollm2")
    return ("dir", str(Path(spec).resolve()))


def cross_tokenizer_problems(job: DistillJob) -> list[str]:
    """What a job whose student and teacher tokenizers differ cannot do, each with its fix."""
    from secure_kd.losses import loss_info

    kd, problems = job.kd, []
    if kd.kd_weight > 0 and loss_info(kd.loss).cross_tokenizer == "none":
        problems.append(
            f"kd.loss {kd.loss!r} compares teacher and student token by token over one vocabulary, but "
            f"student.tokenizer ({job.student_tokenizer}) differs from the teacher's "
            f"({job.teacher_tokenizer}); use kd.loss: uld or kd.loss: span_aligned (cross-tokenizer "
            "objectives), or give both the same tokenizer."
        )
    if job.student.source == "teacher_layers":
        problems.append(
            "student.source teacher_layers copies the teacher's embeddings, which index the teacher's "
            "vocabulary: it cannot have another tokenizer; use student.source: tiny or a directory."
        )
    if kd.fused and kd.kd_weight > 0:
        problems.append("kd.fused has no cross-tokenizer form; set kd.fused: false.")
    if kd.mode != "off_policy":
        problems.append(
            f"kd.mode {kd.mode!r} would re-tokenize generated text for a teacher with another tokenizer, "
            "which is not supported; use kd.mode: off_policy."
        )
    if job.data.packing:
        problems.append(
            "data.packing mixes records in one sequence, and the two tokenizations are aligned per record; "
            "set data.packing: false."
        )
    if kd.tail == "zero" and kd.top_k is not None and kd.kd_weight > 0:
        problems.append(
            "kd.tail: zero renormalizes the student over the teacher's top-k ids, which has no meaning "
            "across vocabularies; set kd.tail: uniform."
        )
    return problems


def _check_private_job(job: DistillJob) -> None:
    """What DP-SGD (train.privacy) cannot protect or cannot see, refused before anything runs."""
    from secure_kd.losses import loss_info

    if job.data.packing:
        raise ValueError(
            "train.privacy with data.packing: DP protects one record per training sequence, and a packed "
            "block mixes several records; set data.packing: false"
        )
    if job.kd.fused:
        raise ValueError(
            "train.privacy with kd.fused: the fused loss bypasses the output layer module, so Opacus cannot "
            "see its per-example gradients; set kd.fused: false"
        )
    if loss_info(job.kd.loss).stateful:
        raise ValueError(
            f"train.privacy with kd.loss {job.kd.loss!r}: its state is updated from whole batches, outside "
            "DP-SGD; choose a stateless objective (forward_kl, reverse_kl, jsd, tvd, skew_*, ce, ...)"
        )


def _check_user_unit(job: DistillJob) -> None:
    """`data.user_field` and `train.privacy.unit: user` go together (secure_kd.dp.user_level)."""
    privacy, field = job.train.privacy, job.data.user_field
    if privacy is not None and privacy.unit == "user" and field is None:
        raise ValueError(
            "train.privacy.unit: user needs data.user_field: the field of each record that names its user "
            "(e.g. data.user_field: user_id; with data.train: synthetic also set data.synthetic.n_users)"
        )
    if field is not None and (privacy is None or privacy.unit != "user"):
        now = "train.privacy is not set" if privacy is None else "train.privacy.unit is record"
        raise ValueError(
            f"data.user_field {field!r} is set but {now}: nothing would protect users as a unit. Set "
            "train.privacy.unit: user (with max_records_per_user) for user-level DP, or remove "
            "data.user_field"
        )
    if field is not None and job.data.train == "synthetic":
        if job.data.synthetic.n_users is None:
            raise ValueError(
                "data.user_field with data.train: synthetic needs data.synthetic.n_users (how many users "
                "the generated records belong to)"
            )
        if field != "user_id":
            raise ValueError(
                f"data.user_field {field!r}: the synthetic corpus names each record's user in the field "
                "'user_id'; set data.user_field: user_id"
            )


def _check_self_privileged(job: DistillJob) -> None:
    """kd.mode: self_privileged and data.privileged_field go together; the teacher is the student.

    The job's `teacher` becomes the student's model (without LoRA or frozen embeddings) so that the
    tokenizer and the model sizes resolve as for the student; a `teacher` block that says otherwise is
    refused, since it would be ignored."""
    field, mode = job.data.privileged_field, job.kd.mode
    if mode == "self_privileged" and field is None:
        raise ValueError(
            "kd.mode: self_privileged needs data.privileged_field: the field of each record holding the "
            "context only the teacher sees (e.g. data.privileged_field: context)"
        )
    if field is not None and mode != "self_privileged":
        raise ValueError(
            f"data.privileged_field {field!r} is set but kd.mode is {mode!r}, which would never read it; set "
            "kd.mode: self_privileged, or remove data.privileged_field"
        )
    if mode != "self_privileged":
        return
    if job.student.source in ("teacher_layers", "served"):
        raise ValueError(
            f"kd.mode: self_privileged trains the student against its own weights; student.source "
            f"{job.student.source!r} is not a model of its own: use tiny, smollm2 or a model directory"
        )
    if job.data.packing:
        raise ValueError(
            "kd.mode: self_privileged puts each record's privileged context before its own prompt, which a "
            "packed block of several records cannot do; set data.packing: false"
        )
    own = job.student.model_copy(update={"lora": None, "freeze_embeddings": False})
    if "teacher" in job.model_fields_set and job.teacher != own:
        raise ValueError(
            "kd.mode: self_privileged: the teacher is the student's own weights (kd.self_teacher: frozen or "
            "shared), so a `teacher` block would be ignored; remove it"
        )
    job.__dict__["teacher"] = own  # without re-validation (this validator runs on every assignment)


class ConfigError(ValueError):
    """Invalid configuration: one entry per problem, each naming the field and the fix."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  - {loc}: {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling against `secure-kd validate --schema`"
    if kind == "missing":
        return "required field is missing"
    msg = msg.removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error",):
        msg += f" (got {err['input']!r})"
    return msg


def errors_from_validation(exc: ValidationError) -> list[tuple[str, str]]:
    return [(_loc(e), _message(e)) for e in exc.errors()]


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([(item, "an override is KEY=VALUE with a dotted key, e.g. train.lr=1e-4")], "--set")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError([(item, "empty key")], "--set")
    return keys, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError([(".".join(keys), f"{k!r} is a value, not a section")], "--set")
            node = child
        node[keys[-1]] = value
    return data


class InputFileError(ValueError):
    """A file argument names a directory, a missing path or something unreadable; the message says
    which argument, which path and what to give instead."""


def require_file(path: str | Path, argument: str, expected: str) -> Path:
    """`path` as a Path if it is an existing regular file; else an `InputFileError` naming `argument`
    (e.g. "--bundle") and what it `expected` (e.g. "the <org>.registration.json made by init-org")."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{argument} {str(path)!r} is a directory, not a file; give {expected}")
    if not path.exists():
        raise InputFileError(f"{argument} {str(path)!r} does not exist; give {expected}")
    if not path.is_file():
        raise InputFileError(f"{argument} {str(path)!r} is not a regular file; give {expected}")
    return path


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            [("--config", f"{str(path)!r} is a directory; give the YAML file itself (configs/tiny.yaml)")],
            str(path),
        )
    if not path.is_file():
        raise ConfigError([("--config", f"file {str(path)!r} does not exist")], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                (
                    "(encoding)",
                    f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} cannot be "
                    "decoded; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 OLD > NEW`)",
                )
            ],
            str(path),
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("(yaml)", f"not valid YAML: {exc}")], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([("(top level)", "the file must be a mapping of keys to values")], str(path))
    return data


# The job kind behind each config model: what a config's optional top-level `kind:` names and what
# `secure-kd validate` infers. A model with a `kind` field of its own validates the key itself.
JOB_KINDS_BY_MODEL = {
    "DistillJob": "distill", "EvalJob": "eval", "FederatedJob": "federate", "AuditConfig": "audit",
}  # fmt: skip


def job_kind_of(model: type[BaseModel]) -> str | None:
    return JOB_KINDS_BY_MODEL.get(model.__name__)


def _check_declared_kind(data: dict, model: type[BaseModel], source: str) -> None:
    """A top-level `kind: distill|eval|federate|audit` is allowed in every job config; it must match."""
    if "kind" not in data or "kind" in model.model_fields:
        return
    expected = job_kind_of(model)
    declared = data.pop("kind")
    if expected is not None and declared != expected:
        raise ConfigError(
            [("kind", f"this file is a {declared!r} config but was given to a {expected!r} command; run "
              f"`secure-kd {declared} --config {source}` (or fix `kind:`)")],
            source,
        )  # fmt: skip


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = DistillJob,
    *,
    values: dict[str, Any] | None = None,
):
    """Read YAML (or start from defaults when `path` is None), apply `--set` overrides, validate.

    `values` are top-level values set last and taken as they are (not parsed as YAML), e.g. the paths
    of command-line options such as `--model DIR`."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    data.update(values or {})
    _check_declared_kind(data, model, str(path or "config"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(errors_from_validation(exc), str(path or "config")) from None


def check_against_vocab(job: DistillJob, vocab_size: int) -> None:
    """Checks that need the loaded model: top_k must fit in the vocabulary."""
    if job.kd.top_k is not None and job.kd.top_k > vocab_size:
        raise ConfigError(
            [
                (
                    "kd.top_k",
                    f"top_k={job.kd.top_k} exceeds the vocabulary size {vocab_size}; "
                    f"use at most {vocab_size}",
                )
            ]
        )


class EvalJob(Strict):
    """`secure-kd eval`: perplexity of a model on held-out text (and agreement with a teacher)."""

    schema_version: int = SCHEMA_VERSION
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = "runs/eval"
    model: str = Field(..., description="a local HF directory, or 'smollm2'")
    teacher: str | None = Field(None, description="optional teacher (same tokenizer) for top-1 agreement")
    tokenizer: str | None = Field(None, description="default: the model's own")
    data: DataConfig = DataConfig()
    batch_size: int = Field(8, gt=0)
    max_batches: int | None = Field(None, gt=0)

    @field_validator("model", "teacher")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is None or value == "smollm2" or Path(value).is_dir():
            return value
        raise ValueError(f"model {value!r} is not a directory; give a local HF model directory or 'smollm2'")
