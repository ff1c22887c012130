"""Plans: the shipped configs, compact forms, round trips, atomic saves, the exported schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.patterns.a_shape import AShape
from headwise.patterns.dense import Dense
from headwise.patterns.plan import ModelGeometry, Plan, Settings, load_plan
from headwise.patterns.tidal import Tidal
from headwise.patterns.vertical_slash import VerticalSlash
from headwise.patterns.window import Window

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOLLM2 = dict(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
LLAMA_8B = dict(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
SMALL = {"architecture": "LlamaForCausalLM", "num_layers": 4, "num_heads": 6, "num_kv_heads": 2, "head_dim": 16}


def small(**parts) -> Plan:
    return Plan.from_dict({"model": SMALL, **parts})


@pytest.mark.parametrize("path", sorted((CONFIGS / "smollm2-135m-instruct").glob("*.json")), ids=lambda p: p.name)
def test_smollm2_configs_load_and_fit_the_model(path):
    plan = load_plan(path)
    plan.check_geometry(**SMOLLM2, source="SmolLM2-135M-Instruct")
    assert plan.model.architecture == "LlamaForCausalLM" and plan.source == str(path)
    for n in (1, 100, 2048, 8192):
        assert 0.0 < plan.expected_density(n) <= 1.0 and 0.0 < plan.expected_decode_density(n) <= 1.0


def test_llama_example_fits_llama_geometry():
    plan = load_plan(CONFIGS / "llama-3.1-8b.json")
    plan.check_geometry(**LLAMA_8B)
    assert plan.prefill(31, 0) == Dense() and plan.prefill(31, 2) == VerticalSlash(vertical=3500, slash=100)
    assert plan.prefill(10, 9).type == "a_shape" and plan.prefill(10, 16).type == "vertical_slash"
    assert plan.decode(13, 5) == Tidal(role="select") and plan.max_tidal_top_k() == 2048


def test_mixed_smollm2_plan_is_sparse_at_2k_and_dense_when_short():
    plan = load_plan(CONFIGS / "smollm2-135m-instruct" / "mixed.json")
    assert plan.expected_density(2048) <= 0.30
    assert plan.expected_density(plan.settings.dense_below - 1) == 1.0
    assert plan.layer_prefill(0) == [Dense()] * 9 and plan.layer_decode(1) == [Dense()] * 9


def test_dense_plan_is_dense():
    plan = load_plan(CONFIGS / "smollm2-135m-instruct" / "dense.json")
    assert plan.expected_density(8192) == 1.0 and plan.expected_decode_density(8192) == 1.0


def test_schema_file_is_the_exported_schema():
    """configs/plan.schema.json must be regenerated (`headwise plan schema -o ...`) when models change."""
    on_disk = json.loads((CONFIGS / "plan.schema.json").read_text())
    assert on_disk == Plan.json_schema()
    assert set(on_disk["properties"]) >= {"model", "settings", "default", "layers"}


def test_compact_forms_expand_with_later_entries_winning():
    plan = small(
        default={"prefill": {"type": "a_shape", "sink": 4, "window": 8}, "decode": {"type": "window"}},
        layers={
            "0-1": {"prefill": {"type": "dense"}},          # a range
            "1": {"heads": {"2-3": {"decode": {"type": "dense"}}}},  # per-head override inside it
            "2,3": {"heads": [{}, {}, {}, {}, {}, {"prefill": {"type": "vertical_slash"}}]},  # a list
            "3": {"prefill": {"type": "a_shape", "sink": 1, "window": 2}},  # later: wins over the list's head 0
        })
    a = AShape(sink=4, window=8)
    assert [plan.prefill(0, h) for h in range(6)] == [Dense()] * 6
    assert [plan.decode(1, h) for h in range(6)] == [Window()] * 2 + [Dense()] * 2 + [Window()] * 2
    assert [plan.prefill(2, h) for h in range(6)] == [a] * 5 + [VerticalSlash()]
    assert [plan.prefill(3, h) for h in range(6)] == [AShape(sink=1, window=2)] * 6
    assert plan.decode(3, 0) == Window()


def test_missing_levels_fall_back_to_dense():
    plan = small()
    assert plan.prefill(3, 5) == Dense() and plan.decode(0, 0) == Dense()


def test_layers_may_be_a_full_list():
    plan = small(layers=[{"prefill": {"type": "dense"}}, {}, {"prefill": {"type": "a_shape"}}, {}])
    assert plan.prefill(2, 0) == AShape() and plan.prefill(1, 0) == Dense()


def test_save_and_load_round_trip(tmp_path):
    src = load_plan(CONFIGS / "llama-3.1-8b.json")
    out = tmp_path / "sub" / "plan.json"
    src.save(out)
    again = load_plan(out)
    for layer in range(32):
        assert again.layer_prefill(layer) == src.layer_prefill(layer)
        assert again.layer_decode(layer) == src.layer_decode(layer)
    assert again.settings == src.settings and again.model == src.model
    assert again.to_json() == src.to_json()
    assert os.listdir(out.parent) == ["plan.json"], "the temp file was left behind"


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    out = tmp_path / "plan.json"
    out.write_text("previous contents")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        small().save(out)
    assert out.read_text() == "previous contents"
    assert os.listdir(tmp_path) == ["plan.json"]


specs = st.sampled_from([Dense(), AShape(sink=4, window=8), AShape(), VerticalSlash(vertical=10, slash=5)])
dspecs = st.sampled_from([Dense(), Window(), Window(sink=1, window=2)])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_from_tables_compresses_without_changing_a_cell(data):
    n_layers, n_heads = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([1, 2, 4]))
    pre = [[data.draw(specs) for _ in range(n_heads)] for _ in range(n_layers)]
    dec = [[data.draw(dspecs) for _ in range(n_heads)] for _ in range(n_layers)]
    geo = ModelGeometry(architecture="LlamaForCausalLM", num_layers=n_layers, num_heads=n_heads,
                        num_kv_heads=1, head_dim=8)
    plan = Plan.from_tables(geo, pre, dec, Settings(dense_below=0))
    assert [plan.layer_prefill(i) for i in range(n_layers)] == pre
    assert [plan.layer_decode(i) for i in range(n_layers)] == dec
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert [again.layer_prefill(i) for i in range(n_layers)] == pre


def test_summary_rows_describe_each_layer():
    plan = small(settings={"dense_below": 0},
                 layers={"1": {"heads": {"0-3": {"prefill": {"type": "a_shape", "sink": 4, "window": 8}}}}})
    rows = plan.summary(512)
    assert len(rows) == 4 and rows[0].prefill == "dense" and rows[1].prefill == "a_shape x4, dense x2"
    assert rows[0].prefill_density == 1.0 and rows[1].prefill_density < 1.0
    assert plan.expected_density(512) == pytest.approx(sum(r.prefill_density for r in rows) / 4)


def test_tidal_reuse_density_follows_the_select_layer_budget():
    plan = small(settings={"dense_below": 0, "tidal_top_k": 50},
                 layers={"0": {"decode": {"type": "tidal", "role": "select", "top_k": 100}},
                         "1-3": {"decode": {"type": "tidal", "role": "reuse"}}})
    rows = plan.summary(1000)
    assert rows[0].decode_density == 1.0  # a select layer attends densely
    assert [r.decode_density for r in rows[1:]] == pytest.approx([0.1] * 3)  # the 100 positions layer 0 chose


def test_expected_density_counts_the_dense_tail():
    from headwise.patterns.prefill import build_layer_prefill_index
    from headwise.patterns.ranges import fast_density

    plan = load_plan(CONFIGS / "smollm2-135m-instruct" / "sparse.json")
    s, m = plan.settings, plan.model
    assert s.dense_tail > 0
    for length in (4096, 8192):
        index = build_layer_prefill_index(plan.layer_prefill(5), list(range(m.num_heads)), m.num_heads, None, None,
                                          None, 0, length, s.block_size, q_len=length,
                                          num_layer_kv_heads=m.num_kv_heads, dense_below=s.dense_below,
                                          dense_tail=s.dense_tail)
        built = fast_density(index)
        assert abs(plan.expected_density(length) - built) < 0.005, (length, plan.expected_density(length), built)
        without = Plan.from_dict({**plan.model_dump(mode="json", exclude_none=True),
                                  "settings": {**s.model_dump(), "dense_tail": 0}})
        assert without.expected_density(length) < built - 0.005  # the tail is a visible share
