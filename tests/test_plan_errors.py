"""Every way a user can break a plan, and the message they get: file, JSON path, expected, found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headwise.patterns.plan import PlanError, load_plan

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {"architecture": "LlamaForCausalLM", "num_layers": 4, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}


def write(tmp_path: Path, doc, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


def error_of(tmp_path: Path, doc) -> str:
    path = write(tmp_path, doc)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), "every message starts with the file"
    return text


def test_a_plan_for_32_heads_against_a_9_head_model():
    plan = load_plan(ROOT / "configs" / "llama-3.1-8b.json")
    with pytest.raises(PlanError) as info:
        plan.check_geometry(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, source="model SmolLM2")
    text = str(info.value)
    assert "llama-3.1-8b.json" in text
    assert "$.model.num_heads: expected 9 (num_heads of model SmolLM2), found 32" in text
    assert "$.model.num_layers: expected 30" in text and "$.model.head_dim: expected 64" in text
    assert [i.path for i in info.value.issues] == ["$.model.num_layers", "$.model.num_heads",
                                                   "$.model.num_kv_heads", "$.model.head_dim"]


def test_unknown_pattern_type_names_the_tag_and_the_known_ones(tmp_path):
    heads = [{}] * 9
    heads[2] = {"prefill": {"type": "sliding_window", "window": 64}}
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": [{}, {}, {}, {"heads": heads}]})
    assert '$.layers[3].heads[2].prefill.type: expected a known pattern type: ' in text
    assert "'vertical_slash'" in text and text.rstrip().endswith('found "sliding_window"')


def test_a_decode_only_type_in_prefill_is_unknown_there(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"prefill": {"type": "tidal"}}})
    assert '$.default.prefill.type: expected a known pattern type' in text and 'found "tidal"' in text


def test_corrupt_json_gives_line_and_column(tmp_path):
    text = error_of(tmp_path, '{\n  "model": {"architecture": "x",\n  "num_layers": 4,,\n}')
    assert "$: expected valid JSON, found Expecting property name enclosed in double quotes at line 3 column 19" in text


@pytest.mark.parametrize("field,value,expected", [
    ("sink", "many", "expected an integer, found \"many\""),
    ("sink", -1, "expected a number >= 0, found -1"),
    ("window", 2.5, "expected a whole number, found 2.5"),
    ("window", None, "expected an integer, found null"),
])
def test_wrong_field_types_name_the_field(tmp_path, field, value, expected):
    layers = {"2": {"heads": {"4": {"prefill": {"type": "a_shape", field: value}}}}}
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": layers})
    assert f"$.layers[2].heads[4].prefill.{field}: {expected}" in text


def test_unknown_field_is_a_typo_not_a_default(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"decode": {"type": "window", "windw": 512}}})
    assert "$.default.decode.windw: expected only the fields this object defines (a typo?), found unknown field 'windw'" in text


def test_missing_required_field_and_missing_type(tmp_path):
    text = error_of(tmp_path, {"model": {k: v for k, v in GEOMETRY.items() if k != "head_dim"}})
    assert "$.model.head_dim: expected this required field, found nothing" in text
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"prefill": {"sink": 4}}})
    assert "$.default.prefill: expected a 'type' field naming the pattern type, found an object without it" in text


def test_geometry_that_cannot_be_gqa(tmp_path):
    text = error_of(tmp_path, {"model": dict(GEOMETRY, num_kv_heads=2)})
    assert "$.model: expected num_heads a multiple of num_kv_heads, found 9 query heads, 2 KV heads" in text


def test_per_head_list_of_the_wrong_length(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": {"1": {"heads": [{}] * 8}}})
    assert "$.layers[1].heads: expected a list of 9 head entries (one per head), or an object of overrides, " \
           "found a list of 8" in text


def test_layer_keys_out_of_range_or_malformed(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": {"2-5": {}}})
    assert '$.layers["2-5"]: expected layers within 0..3 (the plan\'s model has 4 layers)' in text
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": {"last": {}}})
    assert "$.layers.last: expected a layer number in 0..3" in text and "found the key 'last'" in text
    text = error_of(tmp_path, {"model": GEOMETRY, "layers": {"0": {"heads": {"9": {}}}}})
    assert "$.layers[0].heads[9]: expected heads within 0..8" in text


def test_tidal_reuse_needs_an_earlier_select(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"decode": {"type": "tidal", "role": "reuse"}},
                               "layers": {"0": {"decode": {"type": "dense"}}, "2": {"decode": {"type": "tidal", "role": "select"}}}})
    assert "$.default.decode.role: expected a tidal 'select' layer before the first 'reuse' layer of head 0, " \
           "found 'reuse' at layer 1 with no earlier 'select'" in text


def test_hierarchical_stages_must_nest(tmp_path):
    spec = {"type": "hierarchical", "stages": [{"chunk": 32, "budget": 1024}, {"chunk": 12, "budget": 240}],
            "refresh": [4, 2]}
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"prefill": spec}})
    assert "$.default.prefill: expected stage chunk sizes that shrink and divide the previous one, found [32, 12]" in text


def test_page_budget_below_one_page(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "default": {"decode": {"type": "page_topk", "budget": 8}}})
    assert "$.default.decode: expected a budget of at least one page (16 tokens), found budget 8" in text


def test_several_problems_are_listed_together(tmp_path):
    text = error_of(tmp_path, {"model": GEOMETRY, "settings": {"dense_below": -5, "block_size": 60}})
    assert "2 problems" in text
    assert "$.settings.dense_below: expected a number >= 0, found -5" in text
    assert "$.settings.block_size: expected a multiple of 16, found 60" in text


def test_unsupported_format_version(tmp_path):
    text = error_of(tmp_path, {"format_version": 2, "model": GEOMETRY})
    assert "$.format_version: expected 1, found 2" in text


@pytest.mark.parametrize("doc,found", [("[1, 2]", "a JSON list"), ('"plan"', "a JSON str")])
def test_top_level_must_be_an_object(tmp_path, doc, found):
    assert f"$: expected a JSON object with 'model' and the patterns, found {found}" in error_of(tmp_path, doc)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PlanError, match=r"nope\.json: \$: expected a plan file, found no such file"):
        load_plan(tmp_path / "nope.json")
    with pytest.raises(PlanError, match="expected a plan file, found a directory"):
        load_plan(tmp_path)
