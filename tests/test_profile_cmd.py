"""``headwise profile`` end to end on the embedded SmolLM2, kept small: its first 2 layers, 256-320
token prompts, one prompt per length (the full 30-layer, 2K profile takes minutes)."""

import json

import pytest

from headwise.patterns.plan import load_plan
from headwise.server.commands.cli import main
from headwise.server.commands.profile_measure import Measurements, ProfileConfig, measure
from headwise.server.commands.profile_plan import make_plan

CFG = ProfileConfig(lengths=(256, 320), prompts=1, density_budget=0.7, num_layers=2, sample_blocks=2,
                    dtype="float32", cost="density", validate_cases=0)


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
    assert "headwise profile" in plan.description and plan.provenance["budget"] == 0.7
    assert plan.provenance["objective"] == CFG.objective == "mass" and plan.provenance["lengths"] == [256, 320]
    assert plan.settings.dense_tail == CFG.dense_tail


def test_saved_measurements_reproduce_the_plan_through_the_cli(measured, tmp_path):
    scores, out = tmp_path / "m.npz", tmp_path / "plans" / "p.json"
    measured.save(scores)
    expected, _ = make_plan(measured, __import__("dataclasses").replace(CFG, decode="auto"))
    rc = main(["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320",
               "--density-budget", "0.7", "--decode", "auto", "--cost", "density", "--validate-cases", "0"])
    assert rc == 0
    got = load_plan(out)
    def strip(p):  # what differs between two runs: the time they were made
        d = json.loads(p.to_json())
        d["provenance"] = {k: v for k, v in d["provenance"].items() if k not in ("created", "measure_seconds")}
        return d

    assert strip(got) == strip(expected)
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_costs_from_a_plan_reproduce_its_timed_choice_without_timing(measured, tmp_path):
    """A plan made with ``--cost time`` records what each candidate took; ``--costs-from`` re-solves
    with those seconds (no timing run), so the same scores give the same plan on any machine."""
    import dataclasses

    import numpy as np

    from headwise.patterns.profile import describe

    scores = tmp_path / "m.npz"
    measured.save(scores)
    cands = measured.scores.candidates
    rng = np.random.default_rng(0)  # any positive timings; dense the slowest, as measured ones are
    seconds = np.concatenate([[[1.0, 1.4]], rng.uniform(0.05, 0.9, (len(cands) - 1, 2))])
    source = tmp_path / "timed.json"
    source.write_text(json.dumps({"provenance": {"lengths": [256, 320], "candidate_seconds": {
        describe(c): row.tolist() for c, row in zip(cands, seconds)}}}))
    out = tmp_path / "p.json"
    rc = main(["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320",
               "--cost", "time", "--time-budget", "0.5", "--costs-from", str(source), "--validate-cases", "0",
               "--decode", "dense"])  # this plan timed no decode candidates (--decode optimize needs them)
    assert rc == 0
    cfg = dataclasses.replace(CFG, cost="time", time_budget=(0.5,), decode="dense")
    expected, _ = make_plan(dataclasses.replace(measured, costs=seconds, cost_device="cpu"), cfg)
    got = load_plan(out)
    assert all(got.prefill(l, h) == expected.prefill(l, h) for l in range(30) for h in range(9))
    assert got.provenance["candidate_seconds"][describe(cands[1])] == [round(x, 5) for x in seconds[1]]
    # a plan timed over other candidates is refused, naming what is missing
    source.write_text(json.dumps({"provenance": {"lengths": [256, 320], "candidate_seconds": {
        describe(cands[0]): [1.0, 1.0]}}}))
    rc = main(["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320",
               "--cost", "time", "--costs-from", str(source), "--validate-cases", "0"])
    assert rc == 1


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,haystack"], "expected names from"),
    (["--density-budget", "0"], "must be in (0, 1]"),
    (["--prompts", "0"], "at least 1"),
    (["--families", "a_shape,diagonal"], "expected names from"),
    (["--validate-tasks", "niah_single,haystack"], "expected names from"),
    (["--time-budget", "0.3,0"], "must be > 0"),
    (["--decode-time-budget", "1,0"], "--decode-time-budget: expected values > 0"),
    (["--decode-time-budget", "-0.5"], "--decode-time-budget: expected values > 0"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, args, message):
    assert main(["profile", "--out", str(tmp_path / "p.json"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_a_budget_no_plan_can_meet_is_a_clear_error(measured, tmp_path, capsys):
    scores = tmp_path / "m.npz"
    measured.save(scores)
    rc = main(["profile", "--out", str(tmp_path / "p.json"), "--from-scores", str(scores), "--density-budget", "0.01",
               "--cost", "density", "--validate-cases", "0"])
    assert rc == 1 and "below" in capsys.readouterr().err


def test_candidates_are_priced_by_their_measured_time_and_the_plan_holds_the_time_budget(measured):
    """--cost time: every candidate timed as the server runs it; the MILP keeps the plan's attention
    time vs dense under the budget at every length (a property of the solve, not of the machine)."""
    import dataclasses

    from headwise.server.commands.profile_cost import measure_costs, relative

    cands = measured.scores.candidates
    costs = measure_costs(cands, 9, 3, 64, measured.scores.lengths, dtype=__import__("torch").float32, repeats=1)
    assert costs.shape == (len(cands), 2) and (costs > 0).all()
    assert (relative(costs)[0] == 1.0).all()  # candidate 0 is dense
    timed = dataclasses.replace(measured, costs=costs, cost_device="cpu")
    # feasible whatever the timings were: every head can take the candidate whose slowest length is the
    # fastest (the per-length minima need not come from one candidate: noisy timings on a loaded machine)
    budget = float(relative(costs).max(1).min()) + 0.05
    cfg = dataclasses.replace(CFG, cost="time", time_budget=(budget,), decode="dense")  # decode timings: below
    plan, report = make_plan(timed, cfg)
    assert all(v <= budget + 1e-6 for v in report["attention_time_vs_dense"].values())
    assert set(report["candidate_seconds"]) and plan.provenance["cost_device"] == "cpu"
    with pytest.raises(ValueError, match="no timings"):
        make_plan(measured, cfg)  # measured with --cost density: nothing to price by time


def test_the_plan_is_validated_on_the_eval_suite_and_a_miss_is_written_with_a_warning(measured, tmp_path, capsys):
    scores, out = tmp_path / "m.npz", tmp_path / "p.json"
    measured.save(scores)
    rc = main(["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320",
               "--density-budget", "0.7", "--cost", "density", "--validate-cases", "1",
               "--validate-tasks", "niah_single", "--accuracy-target", "-1"])  # a target no plan meets
    assert rc == 0
    v = load_plan(out).provenance["validation"]
    assert set(v["scores"]) == {"dense", "plan"} and set(v["scores"]["plan"]["niah_single"]) == {"256", "320"}
    assert v["passed"] is False and v["seeds"].startswith("eval seeds")
    assert "WARNING: the plan misses its accuracy target" in capsys.readouterr().err


# ------------------------------------------------------------------ decode by optimisation
def _timed(measured, window_vs_dense: float = 0.5):
    """``measured`` with stand-in timings: prefill as in the --costs-from test, decode where a window
    layer costs ``window_vs_dense`` of a dense one (a device where selections pay off)."""
    import dataclasses

    import numpy as np

    from headwise.patterns.profile_decode import DecodeCosts

    rng = np.random.default_rng(0)
    n_cands = len(measured.scores.candidates)
    prefill = np.concatenate([[[1.0, 1.4]], rng.uniform(0.05, 0.9, (n_cands - 1, 2))])
    op = np.array([1e-3, 1.2e-3])
    n_dec = len(measured.decode_scores.candidates)
    kernel = op * np.r_[1.2, np.linspace(window_vs_dense, 0.9 * window_vs_dense, n_dec - 1)][:, None]
    return dataclasses.replace(measured, costs=prefill, cost_device="cpu", decode_costs=DecodeCosts(op, op, kernel))


def _decode_table(plan):
    return [[plan.decode(l, h) for h in range(9)] for l in range(30)]


def test_decode_is_chosen_by_the_milp_under_the_decode_budget(measured):
    import dataclasses

    import numpy as np

    from headwise.patterns.profile_decode import choose_decode, decode_plan_cost

    timed = _timed(measured)
    ds = timed.decode_scores
    assert ds.mass().shape == (2, 9, len(ds.candidates), 2) and np.allclose(ds.mass()[:, :, 0], 1.0, atol=1e-5)
    assert (ds.mass()[:, :, 1:] <= ds.mass()[:, :, :1] + 1e-5).all()  # no window keeps more than dense
    cfg = dataclasses.replace(CFG, cost="time", time_budget=(0.9,), decode_time_budget=(0.8, 0.7))
    plan, report = make_plan(timed, cfg)
    assert plan.provenance["decode_budget"] == [0.8, 0.7] and plan.provenance["decode"] == "optimize"
    assert all(report["decode_time_vs_dense"][str(n)] <= b + 1e-6 for n, b in zip((256, 320), (0.8, 0.7)))
    assert any(plan.decode(l, h).type == "window" for l in range(2) for h in range(9))
    assert all(plan.decode(l, h).type == "dense" for l in range(2, 30) for h in range(9))  # unscored layers
    assert set(plan.provenance["decode_seconds"]) >= {"dense (server's dense path)"} | set(report["decode_candidates"])
    pick = np.array([[ds.candidates.index(plan.decode(l, h)) for h in range(9)] for l in range(2)])
    assert list(decode_plan_cost(pick, timed.decode_costs)) == pytest.approx(
        [report["decode_time_vs_dense"]["256"], report["decode_time_vs_dense"]["320"]], abs=1e-4)
    assert report["decode_kept_mass"] == pytest.approx(
        choose_decode(ds.mass(), timed.decode_costs, [0.8, 0.7]).kept, abs=1e-4)
    # the default budget of 1.0 keeps every head dense: dense keeps the most and fits
    plan, report = make_plan(timed, dataclasses.replace(cfg, decode_time_budget=(1.0,)))
    assert all(plan.decode(l, h).type == "dense" for l in range(30) for h in range(9))
    assert report["decode_time_vs_dense"] == {"256": 1.0, "320": 1.0}
    with pytest.raises(ValueError, match="--decode-time-budget: expected one value or one per"):
        make_plan(timed, dataclasses.replace(cfg, decode_time_budget=(0.8, 0.7, 0.6)))


def test_decode_costs_are_measured_as_the_server_runs_them(measured):
    """One decode step of one layer: vLLM's op for dense layers, the torch kernel for selecting ones.
    Where dense decode is measured the fastest (on CPU the op's dense decode beats the torch kernel's
    window by far), the default budget gives all dense and a smaller one is refused."""
    import dataclasses

    import torch

    from headwise.server.commands.profile_cost import measure_decode_costs

    cands = measured.decode_scores.candidates
    costs = measure_decode_costs(cands, 9, 3, 64, [256, 320], dtype=torch.float32, repeats=10)
    assert costs.kernel.shape == (len(cands), 2) and (costs.kernel > 0).all() and (costs.op > 0).all()
    timed = dataclasses.replace(_timed(measured), decode_costs=costs)
    plan, report = make_plan(timed, dataclasses.replace(CFG, cost="time", time_budget=(0.9,)))
    assert all(v <= 1.0 + 1e-6 for v in report["decode_time_vs_dense"].values())
    # timings on a loaded machine can be noisy: the checks hold whenever dense measured the fastest (and
    # the layout change did not halve the op's time: then no mix of the 2 layers reaches half of dense's)
    if (costs.op < costs.kernel[1:].min(0)).all() and (costs.op_shared >= costs.op * 0.5).all():
        assert all(plan.decode(l, h).type == "dense" for l in range(30) for h in range(9))
        with pytest.raises(ValueError, match="--decode-time-budget 0.5: .*below"):
            make_plan(timed, dataclasses.replace(CFG, cost="time", time_budget=(0.9,), decode_time_budget=(0.5,)))


def test_saved_decode_scores_and_costs_reproduce_the_decode_choice(measured, tmp_path):
    """--save-scores carries the decode scores and timings: --from-scores re-solves the same decode
    without running the model or timing; --costs-from reads a plan's decode seconds too."""
    import dataclasses

    timed = _timed(measured)
    scores, out = tmp_path / "m.npz", tmp_path / "p.json"
    timed.save(scores)
    args = ["profile", "--out", str(out), "--from-scores", str(scores), "--lengths", "256,320", "--cost", "time",
            "--time-budget", "0.9", "--decode-time-budget", "0.75", "--validate-cases", "0"]
    assert main(args) == 0
    cfg = dataclasses.replace(CFG, cost="time", time_budget=(0.9,), decode_time_budget=(0.75,))
    expected, _ = make_plan(timed, cfg)
    got = load_plan(out)
    assert _decode_table(got) == _decode_table(expected)
    assert any(d.type == "window" for row in _decode_table(got) for d in row)
    assert got.provenance["decode_seconds"] == expected.provenance["decode_seconds"]
    # the plan just written holds every timing: re-solving from it (no timings in the scores) agrees
    bare = dataclasses.replace(timed, costs=None, decode_costs=None, cost_device=None)
    bare.save(scores)
    again = tmp_path / "again.json"
    assert main([*args[:2], str(again), *args[3:], "--costs-from", str(out)]) == 0
    assert _decode_table(load_plan(again)) == _decode_table(expected)
    # a plan without decode timings is refused for --decode optimize, naming what is missing
    prov = json.loads(out.read_text())
    del prov["provenance"]["decode_seconds"]
    out.write_text(json.dumps(prov))
    assert main([*args[:2], str(again), *args[3:], "--costs-from", str(out)]) == 1


def test_a_malformed_decode_budget_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--out", str(tmp_path / "p.json"), "--decode-time-budget", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--decode-time-budget" in err and "expected comma-separated numbers" in err


def test_the_clis_decode_choices_are_the_profilers():
    """The CLI spells the choices out (its parser imports no torch); they must stay the profiler's."""
    from headwise.patterns.profile_decode import DECODE_CHOICES
    from headwise.server.commands import profile_cmd

    assert profile_cmd.DECODE_CHOICES == DECODE_CHOICES and ProfileConfig().decode == "optimize"
