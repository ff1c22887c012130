"""headwise's long-context accuracy suite: RULER-style tasks generated from a seed (no downloads).

``headwise eval`` (``headwise.evals.cli``) runs it against any OpenAI-compatible endpoint or the
transformers path with a plan, and writes JSON, a Markdown table and a PNG.

Seeds: case ``i`` of every task and length uses seed ``EVAL_SEEDS[i]`` (1,000,000 + i). The
profiler's calibration prompts (``headwise.server.commands.tasks.CALIBRATION_SEEDS``) use seeds
below 1,000,000, and other generators besides, so no calibration prompt is an eval prompt.
"""

EVAL_SEEDS = range(1_000_000, 2_000_000)


def eval_seeds(cases: int) -> list[int]:
    """The first ``cases`` seeds of the documented range (no picking)."""
    if not 0 < cases <= len(EVAL_SEEDS):
        raise ValueError(f"cases must be in 1..{len(EVAL_SEEDS)}, found {cases}")
    return list(EVAL_SEEDS[:cases])
