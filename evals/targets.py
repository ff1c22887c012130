"""What the suite asks: an OpenAI-compatible server (official ``openai`` client) or transformers + a plan."""

from __future__ import annotations

from pathlib import Path

from .sizing import ServerCounter, TokenizerCounter


class OpenAITarget:
    concurrent = True

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, model_dir: str | None = None):
        from openai import OpenAI

        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        self.url, root = base, base[: -len("/v1")]
        self.client = OpenAI(base_url=base, api_key=api_key or "EMPTY", timeout=900, max_retries=0)
        first = self.client.models.list().data[0]
        self.model = model or first.id
        self.max_len = (first.model_extra or {}).get("max_model_len")
        self.count = TokenizerCounter.from_dir(model_dir) if model_dir else ServerCounter(root, self.model, api_key)
        self.label = "server"

    def describe(self) -> dict:
        return {"kind": "openai", "url": self.url, "model": self.model, "max_len": self.max_len}

    def generate(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                temperature=0)
        return r.choices[0].message.content or "", r.usage.prompt_tokens


class HFTarget:
    """``headwise.server.plugin.hf``: the same plan, builders and kernels as the vLLM backend."""

    concurrent = False

    def __init__(self, model_dir: str, plan="dense", dtype: str = "bfloat16"):
        """``plan``: a plan file, a ``Plan`` (the profiler validates the one it made), or ``"dense"``."""
        import json

        from transformers import AutoTokenizer

        from headwise.patterns.plan import ModelGeometry, Plan, Settings, load_plan
        from headwise.server.commands.model import read_geometry
        from headwise.server.plugin import hf

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.count = TokenizerCounter(self.tokenizer)
        if plan == "dense":  # the all-dense plan through the same kernels
            geo = read_geometry(model_dir)
            p = Plan(model=ModelGeometry(**{k: geo[k] for k in ("architecture", "num_layers", "num_heads",
                                                                 "num_kv_heads", "head_dim")}),
                     settings=Settings(dense_below=0), description="dense (headwise eval)")
        elif isinstance(plan, Plan):
            p, plan = plan, plan.description or "plan"
        else:
            p = load_plan(plan)
        self.model = hf.load_model(model_dir, dtype)
        hf.attach_plan(self.model, p)
        self.max_len = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        self.plan, self.model_dir = plan, model_dir
        self.label = f"hf-{Path(plan).stem}" if len(plan) < 100 else "hf-plan"

    def describe(self) -> dict:
        return {"kind": "hf", "model": self.model_dir, "plan": self.plan, "max_len": self.max_len}

    def generate(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        import torch

        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        n = enc.input_ids.shape[1]
        return self.tokenizer.decode(out[0, n:], skip_special_tokens=True), n
