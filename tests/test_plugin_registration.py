"""The switch (registration, engine arguments) and plan checks done before any engine starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from headwise.patterns.plan_errors import PlanError
from headwise.server import plugin
from headwise.server.plugin.plan_binding import PlanBinding, layer_index, resolve_plan_path, validate_plan_for_model

ROOT = Path(__file__).resolve().parents[1]
SMOL = {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}


def _write(tmp_path, doc, name="plan.json") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def _checkpoint(tmp_path, **overrides) -> Path:
    """A config.json-only checkpoint directory with SmolLM2's attention geometry."""
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "hidden_size": 576, "max_position_embeddings": 8192, **overrides}
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _register_in_subprocess(env_extra: dict) -> str:
    """Run the entry point in a fresh interpreter (it changes vLLM's global registry) and report
    which class vLLM's CPU_ATTN slot resolves to."""
    code = ("from headwise.server.plugin import register, registered_as; register(); register();"
            "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E;"
            "print('RESULT', registered_as(), E.CPU_ATTN.get_path())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWISE_")} | env_extra
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return next(line for line in res.stdout.splitlines() if line.startswith("RESULT"))


def test_registration_is_gated_by_the_env_switch():
    off = _register_in_subprocess({})
    assert off == "RESULT None vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"
    on = _register_in_subprocess({plugin.ENV_ENABLE: "1"})
    assert on == f"RESULT CPU_ATTN {plugin.CPU_BACKEND}"


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get(plugin.PLUGIN_NAME) == "headwise.server.plugin:register"


def test_engine_args_set_the_switch_and_carry_the_plan(tmp_path, monkeypatch):
    for name in (plugin.ENV_ENABLE, plugin.ENV_PLAN, "HEADWISE_STATS_DIR", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    plan = _write(tmp_path, {"model": SMOL})
    kw = plugin.engine_args(plan, max_model_len=4096, additional_config={"other": 1})
    hw = kw["additional_config"]["headwise"]
    assert hw["plan"] == str(plan.resolve()) and Path(hw["stats_dir"]).is_dir()
    assert kw["additional_config"]["other"] == 1 and kw["max_model_len"] == 4096
    assert os.environ[plugin.ENV_ENABLE] == "1" and os.environ[plugin.ENV_PLAN] == hw["plan"]
    assert os.environ["HEADWISE_STATS_DIR"] == hw["stats_dir"]
    argv = plugin.cli_args(plan, stats_dir=tmp_path)
    assert json.loads(argv[argv.index("--additional-config") + 1])["headwise"]["plan"] == hw["plan"]
    plugin.disable()
    assert plugin.ENV_ENABLE not in os.environ


def test_engine_args_refuse_an_allowlist_that_would_skip_headwise(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    with pytest.raises(RuntimeError, match="does not list the 'headwise' plugin"):
        plugin.engine_args(_write(tmp_path, {"model": SMOL}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        monkeypatch.setenv("VLLM_PLUGINS", "headwise")
        plugin.engine_args(tmp_path / "missing.json")


def test_engine_args_can_check_the_plan_against_the_model_first(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv(plugin.ENV_ENABLE, raising=False)
    bad = _write(tmp_path, {"model": {**SMOL, "num_layers": 24}})
    with pytest.raises(PlanError, match=r"\$\.model\.num_layers: expected 30"):
        plugin.engine_args(bad, validate_for=str(_checkpoint(tmp_path)))
    assert plugin.ENV_ENABLE not in os.environ  # nothing switched on for a plan that does not fit
    with pytest.raises(ValueError, match="tensor_parallel_size 2"):
        plugin.engine_args(_write(tmp_path, {"model": SMOL}, "ok.json"), validate_for=str(_checkpoint(tmp_path)),
                           tensor_parallel_size=2)


def test_plan_path_comes_from_additional_config_then_env(monkeypatch):
    monkeypatch.setenv(plugin.ENV_PLAN, "/from/env.json")
    assert resolve_plan_path({"headwise": {"plan": "/from/config.json"}}) == "/from/config.json"
    assert resolve_plan_path({}) == "/from/env.json"
    monkeypatch.delenv(plugin.ENV_PLAN)
    with pytest.raises(PlanError, match="HEADWISE_PLAN"):
        resolve_plan_path(None)


@pytest.mark.parametrize("plan_doc, expect", [
    # wrong head count: names the field, the model's value and the plan's
    ({"model": {**SMOL, "num_heads": 12, "num_kv_heads": 4}}, r"\$\.model\.num_heads: expected 9 .* found 12"),
    # unknown pattern type: names where it is and the known ones
    ({"model": SMOL, "default": {"prefill": {"type": "diagonal_magic"}}},
     r"\$\.default\.prefill\.type: expected a known pattern type"),
    # corrupt JSON: names the position
    ('{"model": {"num_layers": 30,,}', r"expected valid JSON, found .* line 1 column"),
])
def test_validate_plan_for_model_names_the_problem(tmp_path, plan_doc, expect):
    plan = _write(tmp_path, plan_doc)
    with pytest.raises(PlanError, match=expect) as err:
        validate_plan_for_model(plan, str(_checkpoint(tmp_path)))
    assert str(plan) in str(err.value)


def test_validate_plan_for_model_accepts_the_shipped_plans_and_checks_tp(tmp_path):
    model = str(_checkpoint(tmp_path))
    shipped = sorted((ROOT / "configs" / "smollm2-135m-instruct").glob("*.json"))
    assert shipped, "the SmolLM2 plans are missing from configs/"
    for p in shipped:
        assert validate_plan_for_model(p, model, tensor_parallel_size=3).model.num_heads == 9
    with pytest.raises(ValueError, match="does not divide the plan's 9 query heads"):
        validate_plan_for_model(shipped[0], model, tensor_parallel_size=2)


def test_binding_slices_heads_per_rank():
    from headwise.patterns.plan import Plan

    plan = Plan.from_dict({"model": SMOL, "default": {"prefill": {"type": "dense"}},
                           "layers": {"4": {"heads": {"7": {"prefill": {"type": "a_shape"}}}}}})
    ranks = [PlanBinding(plan, r, 3) for r in range(3)]
    assert [b.heads for b in ranks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    lb = ranks[2].for_layer(4)
    assert [s.type for s in lb.prefill_specs] == ["dense", "a_shape", "dense"]
    assert lb.kv_heads.tolist() == [0, 0, 0]  # one KV head per rank, global KV head 2
    assert ranks[2].for_layer(4) is lb  # bound once
    with pytest.raises(PlanError, match="per rank"):
        ranks[0].check_local(num_heads=9, num_kv_heads=3, head_size=64)
    assert layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="cannot find the layer number"):
        layer_index("model.attn")


def test_the_cpu_page_grain_follows_the_plan():
    """Sink/window plans whose decode vLLM's op runs too (dense, or sink + window: a_shape.json decodes
    with a window) read vLLM's whole blocks (stock's page size); plans that estimate or select
    tokens keep 32-token pages."""
    from pathlib import Path

    from headwise.patterns.plan import load_plan
    from headwise.server.plugin.plan_binding import PlanBinding

    plans = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-instruct"
    grain = {name: PlanBinding(load_plan(plans / f"{name}.json")).coarse_pages
             for name in ("sparse", "dense", "a_shape", "mixed", "vertical_slash", "strided", "tidal")}
    assert grain == {"sparse": True, "dense": True, "a_shape": True, "mixed": False, "vertical_slash": False,
                     "strided": False, "tidal": False}, grain
