"""The eval suite's generators, sizing, scorer and seeds (the tokenizer only), and one tiny run of
`headwise eval` against the live server, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from headwise.evals import EVAL_SEEDS, eval_seeds
from headwise.evals.score import score
from headwise.evals.sizing import PROMISE, TokenizerCounter, fit, messages_of
from headwise.evals.tasks import TASKS
from headwise.server.commands.model import default_model_dir
from headwise.server.commands.tasks import CALIBRATION_SEEDS, calibration_seed
from servers import API_KEY

# 1K: the shortest length the suite promises; 4K: above sparse.json's dense_below (3072);
# 8144: SmolLM2's 8192 minus the longest answer budget (64 tokens)
LENGTHS = (1024, 4096, 8144)


@pytest.fixture(scope="module")
def count():
    return TokenizerCounter.from_dir(str(default_model_dir()))


@pytest.mark.parametrize("name", list(TASKS))
def test_a_seed_gives_the_same_prompt_and_another_seed_another(name):
    t = TASKS[name]
    a, b, c = t.draft(EVAL_SEEDS[0], 400), t.draft(EVAL_SEEDS[0], 400), t.draft(EVAL_SEEDS[1], 400)
    assert a == b
    assert a.text != c.text and a.expected != c.expected


@pytest.mark.parametrize("name", list(TASKS))
def test_the_answer_does_not_depend_on_the_length(name):
    t = TASKS[name]
    if name == "fwe":  # the most frequent words are the same, drawn before the text
        assert t.draft(EVAL_SEEDS[0], 500).expected == t.draft(EVAL_SEEDS[0], 3000).expected
        return
    assert t.draft(EVAL_SEEDS[0], 200).expected == t.draft(EVAL_SEEDS[0], 3000).expected


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_are_sized_within_one_percent(name, length, count):
    draft, tokens = fit(TASKS[name], EVAL_SEEDS[0], length, count)
    assert tokens == count(messages_of(draft))  # what was reported is what the prompt has
    assert abs(tokens - length) <= PROMISE * length, (tokens, length)
    for v in draft.expected:
        assert v in draft.text  # the answer is in the prompt


def test_scorer_right_wrong_and_near_misses():
    assert score("The number is 5808602.", ("5808602",), (), "number") == 1
    assert score("I do not know.", ("5808602",), (), "number") == 0
    assert score("It is 158086021.", ("5808602",), (), "number") == 0  # the digits inside a longer number
    assert score("It is 1822637.", ("5808602",), ("1822637",), "number") == 0  # a distractor's value
    assert score("5808602 or 1822637", ("5808602",), ("1822637",), "number") == 0.5  # hedging costs
    assert score("Ember Goblet", ("ember-goblet",), (), "text") == 1
    assert score("ember-goblets", ("ember-goblet",), (), "text") == 0
    assert score("a, b", ("a", "b", "c", "d"), (), "text") == 0.5
    uuid = "6724fc7c-7eff-620d-543c-ce05a85a40c4"
    assert score(uuid.upper(), (uuid,), (), "uuid") == 1
    assert score(uuid[:-1], (uuid,), (), "uuid") == 0


def test_eval_and_calibration_seeds_are_disjoint():
    assert set(EVAL_SEEDS).isdisjoint(CALIBRATION_SEEDS)
    assert eval_seeds(3) == [EVAL_SEEDS[0], EVAL_SEEDS[1], EVAL_SEEDS[2]]  # the first N, no picking
    # every seed the profiler can choose (--seed 0..999, up to 1000 prompts) is a calibration seed
    assert calibration_seed(0, 0) == 0 and calibration_seed(999, 999) in CALIBRATION_SEEDS
    with pytest.raises(ValueError):
        calibration_seed(1000, 0)


@pytest.mark.server
def test_headwise_eval_against_the_live_server_writes_every_case(api_server, tmp_path):
    tasks = ["niah_single", "vt", "qa"]
    cmd = [sys.executable, "-m", "headwise.server.commands.cli", "eval", "--url", api_server.base_url,
           "--api-key", API_KEY, "--lengths", "1k", "--tasks", ",".join(tasks), "--cases", "1",
           "--label", "tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["complete"] and report["planned_cases"] == len(report["cases"]) == len(tasks)
    for case in report["cases"]:
        assert case["task"] in tasks and case["seed"] == EVAL_SEEDS[0] and case["reply"], case
        assert abs(case["usage_prompt_tokens"] - case["prompt_tokens"]) <= 0.01 * case["prompt_tokens"] + 8, case
        assert 0.0 <= case["score"] <= 1.0
        assert all(0.0 <= d <= 1.0 for d in case["depths"]) and (case["task"] != "niah_single" or case["depths"])
    assert "niah_single" in (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.png").stat().st_size > 5_000
