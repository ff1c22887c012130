"""Chunked prefill gives the unchunked result for static patterns (no engine).

One 300-token prompt under a static plan (A-shape, S2 strides) is prefilled once whole and once
in 64-token chunks, each chunk a separate step reading its context from the paged cache. fp32: the
two runs differ only in how the softmax is split across chunks (prefix and chunk merged by their
log-sum-exp), ~1e-6; 1e-5 covers it.

``dense_below`` is 0 here on purpose: it is decided per chunk from the sequence so far (a short
*prompt* attends densely), so a chunk shorter than it differs from the same positions of an
unchunked long prompt; the second test pins that behaviour down.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from plugin_batches import D, HKV, HQ, Req, Step, make_backend, make_plan, run_layer
from plugin_batches import fresh_recorder  # noqa: F401  (autouse)

def static_plan(dense_below: int = 0):
    return make_plan({"type": "a_shape", "sink": 16, "window": 64}, {"type": "dense"}, num_layers=3,
                     dense_below=dense_below,
                     layers={"1": {"heads": {"3-5": {"prefill": {"type": "strided", "local_blocks": 1,
                                                                   "vert_stride": 2, "block_size": 32}}}}})


STATIC = static_plan()
N = 300  # not a multiple of the 64-query block: the last block is partial in both runs


def _prefill(tmp_path, plan, chunk: int, k, v, q, runner=None) -> torch.Tensor:
    """Every layer's attention output ``[layers, N, HQ, D]`` over the steps of one prompt
    (``runner``: builds the backend the way vLLM's model runner does, knowing the prompt's length)."""
    builder, impls = (runner or _NoRunner()).make_backend(plan, tmp_path)
    full = Step([Req(context=0, q_len=N, prefilling=True)], kv=[(k, v)])  # the request's cache layout
    outs = torch.full((len(impls), N, HQ, D), float("nan"))
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        step = Step([Req(context=start, q_len=n, prefilling=True)], kv=[(k, v)],
                    block_table=full.block_table, kv_cache=full.kv_cache)
        md = builder.build(0, step.common)
        for layer, impl in enumerate(impls):  # attention only: every layer sees the same queries
            outs[layer, start:start + n] = run_layer(impl, layer, step, md, q[start:start + n], write=layer == 0)
    return outs


class _NoRunner:
    def make_backend(self, plan, tmp_path):
        return make_backend(plan, tmp_path)


class _Runner(_NoRunner):
    """Builds the builder from a method of an object shaped like vLLM's model runner (``input_batch``,
    ``attn_groups``), which is where the builder reads each request's prompt length from."""

    def __init__(self, prompt_len: int):
        self.input_batch = SimpleNamespace(num_prompt_tokens_cpu_tensor=torch.tensor([prompt_len]))
        self.attn_groups: list = []


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, HKV, D, generator=g), torch.randn(N, HKV, D, generator=g),
            torch.randn(N, HQ, D, generator=g))


def test_chunked_prefill_equals_unchunked_for_static_patterns(tmp_path):
    k, v, q = _inputs()
    whole = _prefill(tmp_path, STATIC, N, k, v, q)
    chunked = _prefill(tmp_path, STATIC, 64, k, v, q)
    assert not torch.isnan(whole).any()
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # not vacuous: the plan is really sparse, so dense attention differs
    dense = _prefill(tmp_path, make_plan({"type": "dense"}, {"type": "dense"}, num_layers=3), N, k, v, q)
    assert (dense[:, 128:] - whole[:, 128:]).abs().max() > 1e-2


def test_chunks_below_dense_below_attend_densely(tmp_path):
    k, v, q = _inputs()
    plan = static_plan(dense_below=128)
    dense = _prefill(tmp_path, make_plan({"type": "dense"}, {"type": "dense"}, num_layers=3), N, k, v, q)
    chunked = _prefill(tmp_path, plan, 64, k, v, q)
    whole = _prefill(tmp_path, plan, N, k, v, q)
    # the first chunk sees a sequence of 64 < 128 tokens: dense; the second (128) is not below it
    torch.testing.assert_close(chunked[:, :64], dense[:, :64], atol=1e-5, rtol=0)
    assert (chunked[:, 64:128] - dense[:, 64:128]).abs().max() > 1e-2
    # unchunked, the 300-token sequence is past dense_below: every query is sparse
    torch.testing.assert_close(whole, _prefill(tmp_path, STATIC, N, k, v, q), atol=1e-5, rtol=0)


def test_only_the_chunk_that_ends_the_prompt_has_the_dense_tail(tmp_path):
    k, v, q = _inputs()
    tailed = make_plan({"type": "a_shape", "sink": 16, "window": 64}, {"type": "dense"}, num_layers=3, dense_tail=32)
    whole = _prefill(tmp_path, tailed, N, k, v, q, runner=_Runner(N))
    chunked = _prefill(tmp_path, tailed, 64, k, v, q, runner=_Runner(N))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # the tail is there: the prompt's last queries differ from the untailed plan's, the rest do not
    plain = _prefill(tmp_path, make_plan({"type": "a_shape", "sink": 16, "window": 64}, {"type": "dense"},
                                         num_layers=3), N, k, v, q)
    assert (whole[:, N - 32:] - plain[:, N - 32:]).abs().max() > 1e-2
    torch.testing.assert_close(whole[:, :256], plain[:, :256], atol=1e-5, rtol=0)
    # without a runner to ask, every chunk counts as ending the prompt: a tail too many, never too few
    blind = _prefill(tmp_path, tailed, 192, k, v, q)  # the first chunk's tail block (128-191) is made dense
    assert (blind[:, 160:192] - plain[:, 160:192]).abs().max() > 1e-2
    torch.testing.assert_close(blind[:, N - 32:], whole[:, N - 32:], atol=1e-5, rtol=0)
