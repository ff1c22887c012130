"""``headwise profile`` end to end on the embedded SmolLM2, kept small: its first 2 layers, 256-320
token prompts, one prompt per length (the full 30-layer, 2K profile takes minutes)."""

import json

import pytest

from headwise.patterns.plan import load_plan
from headwise.server.commands.cli import main
from headwise.server.commands.profile_cmd import Measurements, ProfileConfig, make_plan, measure

CFG = ProfileConfig(lengths=(256, 320), prompts=1, density_budget=0.7, num_layers=2, sample_blocks=2,
                    dtype="float32")


@pytest.fixture(scope="module")
def measured() -> Measurements:
    return measure(CFG)


def test_measurements_cover_every_scored_head_and_length(measured):
    mass, density = measured.scores.mass(), measured.scores.density()
    assert mass.shape == density.shape == (2, 9, len(measured.scores.candidates), 2)
    assert (mass[:, :, 0] > 0.999).all() and (density[:, :, 0] == 1.0).all()  # candidate 0 is dense
    assert (mass <= 1.0 + 1e-5).all() and (density <= 1.0 + 1e-9).all() and (density > 0).all()
    assert all(abs(n - length) < 64 for length, ns in measured.prompt_tokens.items() for n in ns)


def test_plan_meets_the_budget_and_covers_the_whole_model(measured):
    plan, report = make_plan(measured, CFG)
    assert plan.model.num_layers == 30 and plan.model.num_heads == 9
    assert sum(report["measured_density"].values()) / 2 <= 0.7 + 1e-6
    assert report["scored_layers"] == 2
    assert all(plan.prefill(l, h).type == "dense" for l in range(2, 30) for h in range(9))  # unscored layers
    assert any(plan.prefill(l, h).type != "dense" for l in range(2) for h in range(9))
    shortest = min(min(v) for v in measured.prompt_tokens.values())
    assert plan.settings.dense_below == shortest // 64 * 64  # sparse from the shortest measured prompt
    assert "headwise profile" in plan.description and "density_budget=0.7" in plan.description


def test_saved_measurements_reproduce_the_plan_through_the_cli(measured, tmp_path):
    scores, out = tmp_path / "m.npz", tmp_path / "plans" / "p.json"
    measured.save(scores)
    expected, _ = make_plan(measured, CFG)
    rc = main(["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320",
               "--density-budget", "0.7", "--decode", "auto"])
    assert rc == 0
    got = load_plan(out)
    strip = lambda p: {k: v for k, v in json.loads(p.to_json()).items() if k != "description"}  # noqa: E731
    assert strip(got) == strip(expected)
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,haystack"], "expected names from"),
    (["--density-budget", "0"], "must be in (0, 1]"),
    (["--prompts", "0"], "at least 1"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, args, message):
    assert main(["profile", "--out", str(tmp_path / "p.json"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_a_budget_no_plan_can_meet_is_a_clear_error(measured, tmp_path, capsys):
    scores = tmp_path / "m.npz"
    measured.save(scores)
    rc = main(["profile", "--out", str(tmp_path / "p.json"), "--from-scores", str(scores), "--density-budget", "0.01"])
    assert rc == 1 and "below" in capsys.readouterr().err
