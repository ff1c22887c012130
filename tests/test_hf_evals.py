"""The accuracy harness (``evals/run.py``) through the HF path, on one short passkey prompt."""

import importlib.util
import json
from pathlib import Path

import pytest

_RUN = Path(__file__).resolve().parents[1] / "evals" / "run.py"


@pytest.fixture(scope="module")
def evals_run():
    spec = importlib.util.spec_from_file_location("headwise_evals_run", _RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ranges_parse_like_the_help_says(evals_run):
    assert evals_run._ints("0-3,7") == [0, 1, 2, 3, 7]
    assert evals_run._ints("1024,2048") == [1024, 2048]


def test_dense_plan_answers_and_the_report_has_every_reply(evals_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = evals_run.main(["--plan", "dense", "--tasks", "passkey", "--lengths", "300", "--seeds", "0-1",
                         "--max-new-tokens", "12", "--batch-size", "2", "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (target,) = report["targets"]
    assert target["name"] == "hf:dense" and len(target["results"]) == 2
    cell = target["summary"]["passkey"]["300"]
    assert (cell["correct"], cell["total"], cell["accuracy"]) == (2, 2, 1.0)
    # the dense plan ran through the kernels, which count what they read
    assert cell["prefill_density"] == pytest.approx(1.0) and cell["decode_density"] == pytest.approx(1.0)
    assert all(r["answer"] in r["reply"] for r in target["results"])
    assert "hf:dense" in capsys.readouterr().out  # the table


def test_nothing_to_evaluate_is_an_error(evals_run):
    with pytest.raises(SystemExit):
        evals_run.main(["--no-hf"])
