"""HTTP client for an OpenAI-compatible `/v1/completions` server that returns prompt log-probabilities.

Two dialects, because the servers differ in what they return (docs/served-teacher.md has the table):

- `llama_cpp_python` (llama-cpp-python's `python -m llama_cpp.server`): the prompt is text (the
  server re-tokenizes it; the client checks the echoed tokens against its own ids), `echo: true`
  with `logprobs: k` returns a `{token text: logprob}` dict per prompt position, keyed by text
  (`PieceMap` turns texts back into ids). The first answered position is always null, and positions
  whose token is the model's BOS id are skipped by the server; the client fills those positions
  with one extra request each (`echo: false`, the prompt cut after that position). The server
  applies `logit_bias` to sampling only: the log-probabilities it returns ignore it.
- `vllm`: token-id prompts, `prompt_logprobs: k` gives `{token id: {logprob, ...}}` per position
  (position i is the distribution of token i given tokens < i), and the last position's
  distribution comes from the one generated token's `top_logprobs` (`return_tokens_as_token_ids`).
  Written against vLLM's documented response; not run against a real vLLM here.

The API key is read from the environment variable named in the config when the client is built
and lives only in the Authorization header; errors name the URL and the HTTP status, never the
key, the headers, or the prompt (a server's validation error can echo the prompt back, so its
body is not repeated). Responses are size-bounded before they are parsed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from secure_kd.served.config import ServedConfig
from secure_kd.served.pieces import PieceMap

MAX_RESPONSE_BYTES = 256 << 20  # a full-vocabulary answer for a long prompt is tens of MB


class ServedError(RuntimeError):
    """The server could not be reached, refused the request or answered something unusable."""


class ServedProtocolError(ServedError):
    """The server answered, but not in the shape this dialect expects (or tokenized differently)."""


def api_key_from_env(cfg: ServedConfig) -> str | None:
    """The key from the variable `cfg.api_key_env` names; an error (naming the variable only) if unset."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ServedError(
            f"served.api_key_env names the environment variable {cfg.api_key_env}, which is not set or "
            f"empty; export the server's API key under that name (e.g. `export {cfg.api_key_env}=...`), "
            "or remove api_key_env for a server without a key"
        )
    return key


@dataclass
class ClientStats:
    """What the client sent: requests, positions answered, bytes received, entries it had to drop."""

    requests: int = 0
    positions: int = 0
    bytes_received: int = 0
    dropped_entries: int = 0
    fill_requests: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "positions": self.positions,
            "bytes_received": self.bytes_received,
            "dropped_entries": self.dropped_entries,
            "fill_requests": self.fill_requests,
            "seconds": round(self.seconds, 3),
        }


class ServedClient:
    """Top-k log-probabilities and samples from a served model, in token ids of `tokenizer`."""

    def __init__(self, cfg: ServedConfig, tokenizer) -> None:
        import httpx

        key = api_key_from_env(cfg)  # first: a missing key fails before any other work
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.stop_ids = sorted(
            {i for i in (self.bos_id, getattr(tokenizer, "eos_token_id", None)) if i is not None}
        )
        self.pieces = PieceMap.from_tokenizer(tokenizer) if cfg.dialect == "llama_cpp_python" else None
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s)
        transport = httpx.HTTPTransport(retries=cfg.max_retries)
        self._http = httpx.Client(
            base_url=cfg.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.stats = ClientStats()
        self._added_bos: int | None = None  # does the server put a BOS in front of a text prompt?

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        import time

        import httpx

        url = f"{self.cfg.base_url}{path}"
        started = time.perf_counter()
        try:
            with self._http.stream("POST", path, json=body) as response:
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise ServedProtocolError(
                            f"{url} answered more than {MAX_RESPONSE_BYTES >> 20} MiB; ask for fewer "
                            "logprobs or shorter prompts"
                        )
                status = response.status_code
        except httpx.TimeoutException:
            raise ServedError(
                f"{url} did not answer within served.read_timeout_s={self.cfg.read_timeout_s} s "
                f"(connect timeout {self.cfg.connect_timeout_s} s); raise them, or check the server"
            ) from None
        except httpx.TransportError as exc:
            raise ServedError(
                f"cannot reach the served model at {url} ({type(exc).__name__}); start the server "
                "(`secure-kd`'s tests use `python -m llama_cpp.server`) or fix served.base_url"
            ) from None
        finally:
            self.stats.seconds += time.perf_counter() - started
        self.stats.requests += 1
        self.stats.bytes_received += len(data)
        if status == 401 or status == 403:
            hint = (
                f"the key in ${self.cfg.api_key_env} was refused"
                if self.cfg.api_key_env
                else "the server wants a key: name its environment variable in served.api_key_env"
            )
            raise ServedError(f"{url} answered HTTP {status}: {hint}")
        if status != 200:
            raise ServedError(
                f"{url} answered HTTP {status} (body not shown: it can echo the prompt); check "
                "served.model and that the server supports this dialect's parameters"
            )
        try:
            return json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServedProtocolError(f"{url} answered something that is not JSON") from None

    def models(self) -> list[str]:
        """The model names the server lists at /v1/models."""
        import httpx

        try:
            response = self._http.get("/v1/models")
        except httpx.TransportError as exc:
            raise ServedError(
                f"cannot reach the served model at {self.cfg.base_url} ({type(exc).__name__})"
            ) from None
        self.stats.requests += 1
        if response.status_code != 200:
            raise ServedError(f"{self.cfg.base_url}/v1/models answered HTTP {response.status_code}")
        return [str(m.get("id")) for m in response.json().get("data", [])]

    # -- helpers ------------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("an empty token sequence was given; a query needs at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}) (the served tokenizer's vocabulary)"
            )
        return ids

    def _check_k(self, k: int) -> None:
        if self.cfg.max_top_k is not None and k > self.cfg.max_top_k:
            raise ValueError(
                f"k={k} logprobs per position exceeds served.max_top_k={self.cfg.max_top_k}, the server's "
                "limit; ask for fewer, or raise the server's limit and served.max_top_k with it"
            )

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _body(self, prompt, **extra) -> dict:
        return {"model": self.cfg.model, "prompt": prompt, **extra}

    # -- log-probabilities --------------------------------------------------------------------------
    def prompt_topk(self, ids: Sequence[int], k: int) -> list[dict[int, float]]:
        """One {token id: logprob} per position t: the distribution after ids[:t + 1] (its top k)."""
        ids = self._check_ids(ids)
        self._check_k(k)
        answers = self._vllm_prompt(ids, k) if self.cfg.dialect == "vllm" else self._llama_prompt(ids, k)
        self.stats.positions += len(ids)
        return answers

    def next_topk(
        self, ids: Sequence[int], k: int, logit_bias: dict[int, float] | None = None
    ) -> dict[int, float]:
        """{token id: logprob}: the top k after the whole prompt (with `logit_bias` sent along)."""
        ids = self._check_ids(ids)
        self._check_k(k)
        self.stats.positions += 1
        if self.cfg.dialect == "vllm":
            body = self._body(ids, max_tokens=1, logprobs=k, temperature=0.0, return_tokens_as_token_ids=True)
            if logit_bias:
                body["logit_bias"] = {str(t): float(b) for t, b in logit_bias.items()}
            return _vllm_generated_topk(self._post("/v1/completions", body))
        return self._llama_next(ids, k, logit_bias)

    def _llama_next(
        self, ids: list[int], k: int, logit_bias: dict[int, float] | None = None
    ) -> dict[int, float]:
        # The stop tokens are biased away so the one sampled token is never end-of-generation (which
        # would leave the answer without log-probabilities); the bias changes sampling only.
        bias = {str(t): -100.0 for t in self.stop_ids}
        bias.update({str(t): float(b) for t, b in (logit_bias or {}).items()})
        body = self._body(
            self._text(ids), max_tokens=1, logprobs=k, echo=False, temperature=0.0, logit_bias=bias
        )
        response = self._post("/v1/completions", body)
        self._check_prompt_length(response, ids)
        choice = _first_choice(response)
        logprobs = choice.get("logprobs") or {}
        tops = logprobs.get("top_logprobs") or []
        if not tops or not isinstance(tops[0], dict):
            raise ServedProtocolError(
                "the server returned no top_logprobs for the generated token; is it llama-cpp-python's "
                "server with logits_all enabled?"
            )
        found, dropped = self.pieces.ids(tops[0])
        self.stats.dropped_entries += dropped
        return found

    def _check_prompt_length(self, response: dict, ids: list[int]) -> int:
        """The number of tokens the server added in front (0 or 1: a BOS); refuses a prompt the server
        read as another number of tokens than the client sent (text prompts are re-tokenized)."""
        n_prompt = int((response.get("usage") or {}).get("prompt_tokens", -1))
        added = n_prompt - len(ids)
        if added not in (0, 1) or (self._added_bos is not None and added != self._added_bos):
            raise ServedProtocolError(
                f"the server read the prompt as {n_prompt} tokens where the client sent {len(ids)}: the "
                "text of these token ids does not tokenize back to them (ids that are not what "
                "served.tokenizer makes of text, e.g. random ids), or the server uses another vocabulary. "
                "llama-cpp-python's server takes text prompts only; send ids the tokenizer produced"
            )
        self._added_bos = added
        return added

    def _llama_prompt(self, ids: list[int], k: int) -> list[dict[int, float]]:
        body = self._body(self._text(ids), max_tokens=1, logprobs=k, echo=True, temperature=0.0)
        body["logit_bias"] = {str(t): -100.0 for t in self.stop_ids}
        response = self._post("/v1/completions", body)
        choice = _first_choice(response)
        added_bos = self._check_prompt_length(response, ids)
        logprobs = choice.get("logprobs") or {}
        tokens, tops = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
        prompt = ([self.bos_id] if added_bos else []) + ids
        stripped = 1 if self.bos_id is not None and prompt[0] == self.bos_id else 0
        labels: list[int | None] = [*prompt[stripped:], None]  # None: the one generated token
        answers: list[dict[int, float] | None] = [None] * len(ids)
        out = 0
        # row r of the server's scores is the distribution after prompt[:r + 1]
        for row, label in enumerate(labels):
            if label == self.bos_id:
                continue  # the server skips BOS-labelled entries
            if out >= len(tops):
                break
            if label is not None and tokens[out] != self.pieces.pieces[label]:
                raise ServedProtocolError(
                    "the server's echoed tokens differ from the client's token ids (at one position the "
                    "texts disagree): it tokenizes the text differently; use the served model's own tokenizer"
                )
            position = row - added_bos
            top = tops[out]
            out += 1
            if 0 <= position < len(ids) and isinstance(top, dict):
                found, dropped = self.pieces.ids(top, label)
                self.stats.dropped_entries += dropped
                answers[position] = found
        for position, answer in enumerate(answers):
            if answer is None:  # the first answered position is null; BOS-labelled ones are skipped
                self.stats.fill_requests += 1
                answers[position] = self._llama_next(ids[: position + 1], k)
        return answers  # type: ignore[return-value]

    def _vllm_prompt(self, ids: list[int], k: int) -> list[dict[int, float]]:
        body = self._body(
            ids, max_tokens=1, logprobs=k, prompt_logprobs=k, temperature=0.0, return_tokens_as_token_ids=True
        )
        response = self._post("/v1/completions", body)
        choice = _first_choice(response)
        prompt_logprobs = choice.get("prompt_logprobs")
        if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) != len(ids):
            raise ServedProtocolError(
                "the server's prompt_logprobs is missing or does not have one entry per prompt token; "
                "is it vLLM (which supports prompt_logprobs), with a token-id prompt?"
            )
        answers = []
        for entry in prompt_logprobs[1:]:  # entry i: the distribution of token i given tokens < i
            if not isinstance(entry, dict):
                raise ServedProtocolError("a prompt_logprobs entry after the first is not a mapping")
            answers.append(_vllm_entry(entry, k))
        answers.append(_vllm_generated_topk(response))
        return answers

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, ids: Sequence[int], max_new_tokens: int, temperature: float, seed: int) -> list[int]:
        """Token ids of one sampled continuation (the generated text re-tokenized with the tokenizer)."""
        ids = self._check_ids(ids)
        prompt = ids if self.cfg.dialect == "vllm" else self._text(ids)
        body = self._body(prompt, max_tokens=max_new_tokens, temperature=temperature, seed=seed, top_p=1.0)
        if self.cfg.dialect == "llama_cpp_python":
            body.update(top_k=0, min_p=0.0, repeat_penalty=1.0)
        text = _first_choice(self._post("/v1/completions", body)).get("text")
        if not isinstance(text, str):
            raise ServedProtocolError("the completion has no text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_choice(response: dict) -> dict:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServedProtocolError("the completion response has no choices")
    return choices[0]


def _vllm_entry(entry: dict, k: int) -> dict[int, float]:
    found: dict[int, float] = {}
    for key, value in entry.items():
        logprob = value.get("logprob") if isinstance(value, dict) else value
        found[int(key)] = float(logprob)
    return dict(sorted(found.items(), key=lambda kv: -kv[1])[:k])


def _vllm_generated_topk(response: dict) -> dict[int, float]:
    logprobs = _first_choice(response).get("logprobs") or {}
    tops = logprobs.get("top_logprobs") or []
    if not tops or not isinstance(tops[0], dict):
        raise ServedProtocolError("the server returned no top_logprobs for the generated token")
    found = {}
    for key, value in tops[0].items():
        if not key.startswith("token_id:"):
            raise ServedProtocolError(
                "top_logprobs keys are not 'token_id:N'; the server ignored return_tokens_as_token_ids"
            )
        found[int(key.removeprefix("token_id:"))] = float(value)
    return found
