"""``headwise plan validate | show | schema``: exit codes and output.

Two tests run the installed ``headwise`` command in a subprocess (what a user types); the rest call
the same CLI entry point in-process, since each subprocess pays ~5 s of torch import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARSE = ROOT / "configs" / "smollm2-135m-instruct" / "mixed.json"
LLAMA = ROOT / "configs" / "llama-3.1-8b.json"
# the config.json fields a Hugging Face Llama checkpoint carries (SmolLM2-135M's values)
SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def headwise(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "headwise"
    cmd = [str(exe)] if exe.exists() else [shutil.which("headwise") or "", ]
    if not cmd[0]:
        cmd = [sys.executable, "-m", "headwise.server.commands.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from headwise.server.commands.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def smollm2_dir(tmp_path) -> Path:
    d = tmp_path / "SmolLM2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return d


def test_validate_accepts_the_smollm2_plan_against_the_model(smollm2_dir):
    r = headwise("plan", "validate", str(SPARSE), "--model", str(smollm2_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"ok: {SPARSE}: 30 layers x 9 heads (3 KV, head dim 64, LlamaForCausalLM), matches")


def test_validate_rejects_a_plan_made_for_another_model(smollm2_dir):
    r = headwise("plan", "validate", str(LLAMA), "--model", str(smollm2_dir))
    assert r.returncode == 2 and r.stdout == ""
    assert f"invalid plan: {LLAMA}: 4 problems" in r.stderr
    assert f"$.model.num_heads: expected 9 (num_heads of model {smollm2_dir}), found 32" in r.stderr


def test_validate_rejects_a_broken_plan(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    doc = json.loads(SPARSE.read_text())
    doc["layers"]["2"]["decode"]["role"] = "pick"
    bad.write_text(json.dumps(doc))
    code, out, err = cli(capsys, "plan", "validate", str(bad))
    assert code == 2 and out == ""
    assert f"{bad}: $.layers[2].decode.role: expected 'select' or 'reuse', found \"pick\"" in err


def test_validate_says_when_the_model_has_no_config(tmp_path, capsys):
    code, _, err = cli(capsys, "plan", "validate", str(SPARSE), "--model", str(tmp_path))
    assert code == 2 and "expected a Hugging Face model directory with config.json, found none" in err


def test_show_prints_one_row_per_layer_and_the_total(capsys):
    code, out, err = cli(capsys, "plan", "show", str(SPARSE), "--length", "2048")
    assert code == 0, err
    lines = out.splitlines()
    rows = [ln for ln in lines if ln.strip() and ln.split()[0].isdigit()]
    assert len(rows) == 30 and rows[0].split()[1] == "dense"
    assert "expected density at 2048 tokens" in out and lines[-1].split()[0] == "all"


@pytest.mark.parametrize("length,said", [("1e17", "expected a whole number of tokens, found '1e17'"),
                                         (str(10**17), "expected 1..1099511627776 tokens, found 100000000000000000"),
                                         ("0", "expected 1..")])
def test_show_rejects_a_length_out_of_range_by_name(capsys, length, said):
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "plan", "show", str(SPARSE), "--length", length)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --length" in err and said in err


def test_show_rejects_a_broken_plan_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, _, err = cli(capsys, "plan", "show", str(bad))
    assert code == 2 and "expected valid JSON" in err


def test_schema_command_prints_the_shipped_schema(capsys):
    code, out, _ = cli(capsys, "plan", "schema")
    assert code == 0 and json.loads(out) == json.loads((ROOT / "configs" / "plan.schema.json").read_text())


def test_model_geometry_reads_head_dim_from_hidden_size_when_absent(tmp_path):
    from headwise.server.commands.plan_cmd import model_geometry

    cfg = dict(SMOLLM2_CONFIG)
    del cfg["head_dim"], cfg["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    geometry, source = model_geometry(str(tmp_path))
    assert geometry == {"num_layers": 30, "num_heads": 9, "num_kv_heads": 9, "head_dim": 64}
    assert source == f"model {tmp_path}"
