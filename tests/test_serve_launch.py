"""`headwise serve` turns its arguments into a `vllm serve` command line: defaults, pass-through, errors.

No engine starts here. Every launch is re-parsed with vLLM's own `serve` parser, so the checks are
on what vLLM would actually receive, not on our strings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from headwise.server.commands.launch import (DEFAULT_PLAN, ENV_CONFIGS, ROUTES_MIDDLEWARE, ServeError, parse_vllm_args,
                                             plan_launch)
from headwise.server.commands.model import default_model_dir, prepare_default_model

ROOT = Path(__file__).resolve().parents[1]
SMOLLM_PLANS = ROOT / "configs" / "smollm2-135m-instruct"
LLAMA_PLAN = ROOT / "configs" / "llama-3.1-8b.json"  # the Docker example's plan: wrong geometry for SmolLM2


@pytest.fixture(scope="module", autouse=True)
def embedded_model():
    return prepare_default_model()


@pytest.fixture
def launches(monkeypatch):
    """plan_launch, with the stats directories it creates removed afterwards."""
    monkeypatch.delenv("HEADWISE_STATS_DIR", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    for name in ("OMP_WAIT_POLICY", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(name, raising=False)  # the CPU defaults apply only when these are unset
    made = []

    def launch(*args, **kw):
        result = plan_launch(*args, **kw)
        made.append(result)
        return result

    yield launch
    for result in made:
        if result.owned_stats_dir:
            shutil.rmtree(result.owned_stats_dir, ignore_errors=True)


def test_no_arguments_serve_the_embedded_model_with_its_plan_and_small_machine_defaults(launches):
    launch = launches(None, None, [], on_cpu=True)
    args = parse_vllm_args(launch.argv)
    assert args.model_tag == str(default_model_dir())
    assert args.served_model_name == ["SmolLM2-135M-Instruct"]
    assert args.max_model_len == 8192
    assert args.kv_cache_memory_bytes == 2 * 1024**3  # "2G" is binary in vLLM's notation
    assert args.enforce_eager is True
    assert args.middleware == [ROUTES_MIDDLEWARE]
    plan = args.additional_config["headwise"]["plan"]
    assert Path(plan) == (SMOLLM_PLANS / DEFAULT_PLAN.name).resolve()
    assert launch.env["HEADWISE_ENABLE"] == "1" and launch.env["HEADWISE_PLAN"] == plan
    # the stats directory the workers publish into exists and is the one the routes will read
    assert Path(launch.env["HEADWISE_STATS_DIR"]).is_dir()
    assert args.additional_config["headwise"]["stats_dir"] == launch.env["HEADWISE_STATS_DIR"]


def test_the_users_own_flags_win_over_every_default(launches):
    extra = ["--max-model-len", "4096", "--kv-cache-memory-bytes", "1G", "-O1",
             "--served-model-name", "tiny", "--port", "9123"]
    args = parse_vllm_args(launches(None, None, extra, on_cpu=True).argv)
    assert args.max_model_len == 4096
    assert args.kv_cache_memory_bytes == 1024**3
    assert args.enforce_eager is False  # -O1 chose compilation
    assert args.served_model_name == ["tiny"]
    assert args.port == 9123


def test_an_explicit_kv_cache_size_wins_over_the_legacy_cpu_variable(launches, monkeypatch):
    # vLLM's CPU platform would let VLLM_CPU_KVCACHE_SPACE silently replace the flag
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    launch = launches(None, None, ["--kv-cache-memory-bytes", "1G"], on_cpu=True)
    assert launch.unset == ["VLLM_CPU_KVCACHE_SPACE"]
    assert "env -u VLLM_CPU_KVCACHE_SPACE" in launch.command_line()
    assert any("VLLM_CPU_KVCACHE_SPACE ignored" in d for d in launch.defaults)
    # without the flag, the variable is the user's choice and stays
    launch = launches(None, None, [], on_cpu=True)
    assert launch.unset == [] and parse_vllm_args(launch.argv).kv_cache_memory_bytes is None


@pytest.mark.parametrize("flag", ["--no-enforce-eager", "--compilation-config={\"mode\": 3}"])
def test_any_compilation_choice_turns_the_cpu_eager_default_off(launches, flag):
    assert parse_vllm_args(launches(None, None, [flag], on_cpu=True).argv).enforce_eager is False


def test_vllm_flags_pass_through_and_additional_config_is_merged(launches):
    extra = ["--api-key", "k1", "--seed", "7", "--max-num-seqs", "3", "--tensor-parallel-size", "1",
             "--additional-config", json.dumps({"other": {"x": 1}, "headwise": {"note": "kept"}}),
             "--middleware", "my.module.Middleware"]
    args = parse_vllm_args(launches(None, None, extra, on_cpu=True).argv)
    assert args.api_key == ["k1"] and args.seed == 7 and args.max_num_seqs == 3
    assert args.additional_config["other"] == {"x": 1}
    assert args.additional_config["headwise"]["note"] == "kept"
    assert args.additional_config["headwise"]["plan"].endswith(DEFAULT_PLAN.name)
    assert args.middleware == ["my.module.Middleware", ROUTES_MIDDLEWARE]


def test_gpu_launch_keeps_vllm_memory_and_compilation_defaults(launches):
    args = parse_vllm_args(launches(None, None, [], on_cpu=False).argv)
    assert args.kv_cache_memory_bytes is None and args.enforce_eager is False


def test_no_headwise_serves_stock_attention_but_keeps_the_routes(launches):
    launch = launches(None, None, ["--max-model-len", "2048"], headwise=False, on_cpu=True)
    args = parse_vllm_args(launch.argv)
    # no headwise switch; only the CPU defaults, which stock gets too (a comparison differs in attention only)
    assert launch.plan is None and not any(k.startswith("HEADWISE_") for k in launch.env)
    from headwise.server.commands.cpu_defaults import thread_env

    assert launch.env == thread_env()
    assert "headwise" not in (args.additional_config or {})
    assert args.middleware == [ROUTES_MIDDLEWARE]


def test_a_plan_given_through_additional_config_counts_as_plan(launches):
    mine = str((SMOLLM_PLANS / "dense.json").resolve())
    launch = launches(None, None, ["--additional-config", json.dumps({"headwise": {"plan": mine}})], on_cpu=True)
    assert launch.plan == mine == launch.env["HEADWISE_PLAN"]


def test_an_allowlist_without_headwise_gets_it_added(launches, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "someone_else")
    launch = launches(None, None, [], on_cpu=True)
    assert launch.env["VLLM_PLUGINS"] == "someone_else,headwise"


def test_an_explicit_plan_and_a_model_directory(launches, embedded_model, tmp_path):
    plan = tmp_path / "mine.json"
    plan.write_text((SMOLLM_PLANS / "dense.json").read_text())
    launch = launches(str(embedded_model), str(plan), [], on_cpu=True)
    args = parse_vllm_args(launch.argv)
    assert args.model_tag == str(Path(embedded_model).resolve())
    assert args.additional_config["headwise"]["plan"] == str(plan.resolve())
    # a model given by the user keeps vLLM's own name and context length
    assert args.served_model_name is None and args.max_model_len is None


# ------------------------------------------------------------------------ mistakes users make
def _error(launches, *args, **kw) -> str:
    with pytest.raises(ServeError) as info:
        launches(*args, **kw)
    return str(info.value)


def test_a_plan_for_another_model_is_refused_before_any_engine(launches):
    message = _error(launches, None, str(LLAMA_PLAN), [], on_cpu=True)
    assert str(LLAMA_PLAN) in message and "cannot serve model" in message
    # the geometry fields that differ are named, with what the model has and what the plan says
    assert "num_layers: expected 30" in message and "found 32" in message


def test_heads_that_do_not_split_over_tensor_parallel_ranks_are_refused(launches):
    # SmolLM2 has 9 query and 3 KV heads: two ranks cannot share them
    message = _error(launches, None, None, ["--tensor-parallel-size", "2"], on_cpu=True)
    assert "tensor_parallel_size 2" in message and "9 query heads" in message


def test_a_model_without_a_plan_asks_for_one(launches, embedded_model):
    message = _error(launches, str(embedded_model), None, [], on_cpu=True)
    assert "--plan" in message and "--no-headwise" in message


@pytest.mark.parametrize("extra, expected", [
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["stray-model-name"], "unrecognized arguments: stray-model-name"),  # models go in --model
    (["--max-model-len", "abc"], "--max-model-len: invalid"),
])
def test_bad_arguments_are_named(launches, extra, expected):
    assert expected in _error(launches, None, None, extra, on_cpu=True)


def test_missing_files_and_contradictions_are_named(launches, tmp_path):
    assert "no such file" in _error(launches, None, str(tmp_path / "nope.json"), [], on_cpu=True)
    assert "no such directory" in _error(launches, str(tmp_path / "no-model"), None, [], on_cpu=True)
    assert "--no-headwise" in _error(launches, None, str(SMOLLM_PLANS / "dense.json"), [],
                                     headwise=False, on_cpu=True)
    other = json.dumps({"headwise": {"plan": str(SMOLLM_PLANS / "dense.json")}})
    assert "two plans" in _error(launches, None, str(SMOLLM_PLANS / "tidal.json"),
                                 ["--additional-config", other], on_cpu=True)


def test_default_plan_missing_says_where_it_looked(launches, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CONFIGS, str(tmp_path))
    message = _error(launches, None, None, [], on_cpu=True)
    assert str(tmp_path / DEFAULT_PLAN) in message and ENV_CONFIGS in message


def test_cpu_defaults_are_the_same_for_stock_and_headwise_and_yield_to_the_user(launches, monkeypatch):
    from headwise.server.commands import cpu_defaults

    monkeypatch.setattr(cpu_defaults, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # no native bf16
    stock = launches(None, None, [], headwise=False, on_cpu=True)
    ours = launches(None, None, [], on_cpu=True)
    assert parse_vllm_args(stock.argv).dtype == parse_vllm_args(ours.argv).dtype == "float32"
    assert {k: v for k, v in ours.env.items() if not k.startswith("HEADWISE_")} == stock.env
    assert parse_vllm_args(launches(None, None, ["--dtype", "bfloat16"], on_cpu=True).argv).dtype == "bfloat16"
    monkeypatch.setattr(cpu_defaults, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert parse_vllm_args(launches(None, None, [], on_cpu=True).argv).dtype == "auto"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own thread settings win, all of them
    assert not any(k.startswith(("OMP_", "VLLM_CPU_")) for k in launches(None, None, [], on_cpu=True).env)
