"""The transformers integration (``attn_implementation="headwise"``) on the embedded SmolLM2-135M.

fp32 throughout: the comparisons are between the same maths in different accumulation orders, so
the tolerances below are fp32 ones (logits of magnitude ~10-30 after 30 layers). Plans run their
exact indices here (``pages=None``); the page-rounded default on CPU is checked against the engine
(test_engine_sparse) and against the op's keys (test_cpu_ops).
"""

import pytest
import torch

from headwise.kernels import decode_attention_reference, masked_attention_reference
from headwise.patterns.plan import ModelGeometry, Plan
from headwise.patterns.plan_errors import PlanError
from headwise.patterns.prefill import build_layer_prefill_index
from headwise.server.plugin import cpu_ops, hf, pages
from headwise.server.commands.model import read_geometry, resolve_model
from headwise.server.commands.tasks import make_task

transformers = pytest.importorskip("transformers")

# Logits after 30 fp32 layers: kernels that tile keys differently agree to ~1e-5 per layer.
LOGIT_ATOL = 2e-3
# One attention layer in fp32 against the fp32 dense-masked oracle.
ATTN_ATOL = 2e-5


@pytest.fixture(scope="module")
def model_path():
    return resolve_model(None)


@pytest.fixture(scope="module")
def geometry(model_path):
    g = read_geometry(model_path)
    return ModelGeometry(**{k: g[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")})


@pytest.fixture(scope="module")
def model(model_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                          attn_implementation=hf.ATTN_NAME)
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    return tok


def _plan(geometry, **data) -> Plan:
    return Plan.from_dict({"model": geometry.model_dump(exclude_none=True), **data})


def _logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask).logits


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- prefill
def test_dense_plan_equals_sdpa_including_a_left_padded_batch(model, geometry):
    dense = _plan(geometry, settings={"dense_below": 0})
    a, b = _ids(300, 0), _ids(173, 1)  # 173: a partial last query block
    model.set_attn_implementation("sdpa")
    ref_a, ref_b = _logits(model, a), _logits(model, b)
    runtime = hf.attach_plan(model, dense, pages=None)
    torch.testing.assert_close(_logits(model, a), ref_a, atol=LOGIT_ATOL, rtol=0)
    assert runtime.density()["prefill"] == pytest.approx(1.0)
    # left padding: row 1 holds b after 127 pad tokens; its real positions must match b alone
    ids = torch.cat([a, torch.cat([torch.zeros(1, 127, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :127] = 0
    both = _logits(model, ids, mask)
    torch.testing.assert_close(both[0], ref_a[0], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(both[1, 127:], ref_b[0], atol=LOGIT_ATOL, rtol=0)


def _reference_attention(plan: Plan, page: int | None = None):
    """Eager attention under the dense mask of the layer's index (batch 1, whole prompt), rounded
    up to whole pages of ``page`` tokens when given."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [S, H, D]
        s, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
        st = plan.settings
        index = build_layer_prefill_index(plan.layer_prefill(module.layer_idx), list(range(hq)), hq, q, k,
                                          torch.arange(hq) // (hq // hkv), 0, s + st.planned_generation,
                                          st.block_size, num_layer_kv_heads=hkv, dense_below=st.dense_below)
        if page:
            index = pages.page_index(index, page)
        out, _ = masked_attention_reference(q, k, v, index.to_dense_mask(), scaling)
        return out[None].to(query.dtype), None

    return attention


STATIC_LAYERS = {  # a static mix per layer and per head, so one wrong head or layer shows
    "0": {"prefill": {"type": "dense"}},
    "1-9": {"prefill": {"type": "a_shape", "sink": 16, "window": 64}},
    "10-19": {"heads": {"0-2": {"prefill": {"type": "strided", "local_blocks": 1, "vert_stride": 3}},
                        "3-5": {"prefill": {"type": "elastic_window", "sink": 8, "alpha": 64, "beta": 0.125}},
                        "6-8": {"prefill": {"type": "a_shape", "sink": 4, "window": 100}}}},
}


def test_sparse_static_plan_equals_the_masked_reference(model, geometry):
    plan = _plan(geometry, settings={"dense_below": 0},
                 default={"prefill": {"type": "a_shape", "sink": 64, "window": 128}}, layers=STATIC_LAYERS)
    ids = _ids(333, 2)
    transformers.AttentionInterface.register("headwise_test_reference", _reference_attention(plan))
    model.set_attn_implementation("headwise_test_reference")
    ref = _logits(model, ids)
    runtime = hf.attach_plan(model, plan, pages=None)
    got = _logits(model, ids)
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=0)
    assert 0.2 < runtime.density()["prefill"] < 0.8  # really sparse, not a dense fallback
    dense = _plan(geometry, settings={"dense_below": 0})
    hf.attach_plan(model, dense, pages=None)
    assert (got - _logits(model, ids)).abs().max() > 0.1  # and the sparsity changes the answer


@pytest.mark.skipif(not cpu_ops.available(torch.float32, 64), reason="vLLM's CPU attention op is not here")
def test_on_cpu_plans_read_the_pages_the_engine_reads(model, geometry):
    # the default where vLLM's CPU op runs: every prefill index rounded up to 32-token pages
    plan = _plan(geometry, settings={"dense_below": 0},
                 default={"prefill": {"type": "a_shape", "sink": 64, "window": 128}}, layers=STATIC_LAYERS)
    ids = _ids(333, 2)
    transformers.AttentionInterface.register("headwise_test_pages", _reference_attention(plan, page=32))
    model.set_attn_implementation("headwise_test_pages")
    ref = _logits(model, ids)
    runtime = hf.attach_plan(model, plan)
    assert runtime.pages == 32
    torch.testing.assert_close(_logits(model, ids), ref, atol=LOGIT_ATOL, rtol=0)
    exact = hf.attach_plan(model, plan, pages=None)
    _logits(model, ids)
    assert runtime.density()["prefill"] > exact.density()["prefill"]  # a superset: the rounded density


def test_a_prompt_prefilled_in_two_chunks_matches_one_pass(model, geometry):
    # the second chunk's queries start at q_offset 192 and read the first chunk from the cache.
    # The split is a multiple of the 64-query block: a block's window starts at its first query,
    # so an unaligned split would move block boundaries and (by design) the mask. No elastic
    # windows: their span follows the length seen so far, so chunking changes them too.
    layers = {"1-9": STATIC_LAYERS["1-9"], "10-19": {"heads": {"0-2": STATIC_LAYERS["10-19"]["heads"]["0-2"]}}}
    plan = _plan(geometry, settings={"dense_below": 0},
                 default={"prefill": {"type": "a_shape", "sink": 16, "window": 64}}, layers=layers)
    hf.attach_plan(model, plan, pages=None)
    ids = _ids(333, 7)
    whole = _logits(model, ids)
    with torch.no_grad():
        first = model(ids[:, :192], use_cache=True)
        second = model(ids[:, 192:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(second, whole[:, 192:], atol=LOGIT_ATOL, rtol=0)


DYNAMIC_HEADS = {"0-2": {"prefill": {"type": "vertical_slash", "vertical": 16, "slash": 8, "local_diagonals": 4}},
                 "3-5": {"prefill": {"type": "block_sparse", "top_k": 2}},
                 "6-8": {"prefill": {"type": "strided", "local_blocks": 1, "vert_stride": 2}}}


@pytest.mark.parametrize("pad", [0, 37])  # no padding; a left-padded row
def test_one_layer_with_dynamic_patterns_equals_the_masked_reference(model, geometry, pad):
    plan = _plan(geometry, settings={"dense_below": 0}, layers={"4": {"heads": DYNAMIC_HEADS}})
    hf.attach_plan(model, plan, pages=None)
    module = model.model.layers[4].self_attn
    g = torch.Generator().manual_seed(3)
    s, d = 301, geometry.head_dim
    q = torch.randn(1, 9, s, d, generator=g)
    k, v = torch.randn(1, 3, s, d, generator=g), torch.randn(1, 3, s, d, generator=g)
    mask = None
    if pad:
        mask = torch.ones(1, 1, s, s, dtype=torch.bool).tril()
        mask[..., :pad] = False
    out, _ = hf.headwise_attention(module, q, k, v, mask, scaling=module.scaling)
    qr, kr, vr = q[0, :, pad:].transpose(0, 1), k[0, :, pad:].transpose(0, 1), v[0, :, pad:].transpose(0, 1)
    index = build_layer_prefill_index(plan.layer_prefill(4), list(range(9)), 9, qr, kr, torch.arange(9) // 3, 0,
                                      s - pad + plan.settings.planned_generation, 64, num_layer_kv_heads=3)
    assert index.density() < 0.9  # sparse (264-301 tokens are few blocks: budgets cover much of them)
    ref, _ = masked_attention_reference(qr, kr, vr, index.to_dense_mask(), module.scaling)
    torch.testing.assert_close(out[0, pad:], ref, atol=ATTN_ATOL, rtol=0)


def test_a_long_prompt_runs_in_chunks_each_as_if_the_prompt_ended_there(model, geometry):
    # chunk c (keys up to its last query) must attend exactly as a prompt cut at the chunk's end
    # does when run whole: the engine's chunked prefill. Dynamic heads estimate from the chunk's own
    # last queries, so a chunk that saw the whole prompt (or only itself) would differ. Every chunk
    # here holds at least the 64 queries vertical-slash estimates from (a shorter last chunk
    # estimates from fewer, in the engine too, and a prompt cut there would not).
    plan = _plan(geometry, settings={"dense_below": 0}, layers={"4": {"heads": DYNAMIC_HEADS}})
    module = model.model.layers[4].self_attn
    g = torch.Generator().manual_seed(5)
    s, d, chunk = 330, geometry.head_dim, 128
    q = torch.randn(1, 9, s, d, generator=g)
    k, v = torch.randn(1, 3, s, d, generator=g), torch.randn(1, 3, s, d, generator=g)
    hf.attach_plan(model, plan, pages=None, chunk=chunk)
    chunked, _ = hf.headwise_attention(module, q, k, v, None, scaling=module.scaling)
    hf.attach_plan(model, plan, pages=None, chunk=None)
    whole, _ = hf.headwise_attention(module, q, k, v, None, scaling=module.scaling)
    assert not torch.allclose(chunked, whole, atol=1e-3)  # the chunks' indices differ from one pass's
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        cut, _ = hf.headwise_attention(module, q[:, :, :c1], k[:, :, :c1], v[:, :, :c1], None,
                                       scaling=module.scaling)
        torch.testing.assert_close(chunked[0, c0:c1], cut[0, c0:c1], atol=ATTN_ATOL, rtol=0)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        hf.attach_plan(model, plan, chunk=0)


# ------------------------------------------------------------------------------ decode
def test_decode_window_and_tidal_read_what_the_plan_says(model, geometry):
    plan = _plan(geometry, settings={"dense_below": 0, "tidal_top_k": 16},
                 default={"decode": {"type": "tidal", "role": "reuse"}},
                 layers={"0": {"decode": {"type": "dense"}},
                         "1": {"decode": {"type": "window", "sink": 4, "window": 32}},
                         "2": {"decode": {"type": "tidal", "role": "select"}},
                         "3-29": {"heads": {"6-8": {"decode": {"type": "window", "sink": 4, "window": 16}}}}})
    runtime = hf.attach_plan(model, plan, pages=None)
    seen = {}
    decode = runtime.decode

    def spy(layer, q, k_cache, v_cache, seq_lens, scale):
        out = decode(layer, q, k_cache, v_cache, seq_lens, scale)
        seen.setdefault(layer, (q, k_cache, v_cache, seq_lens, scale, out))  # first decode step only
        return out

    runtime.decode = spy
    with torch.no_grad():
        model.generate(_ids(200, 4), max_new_tokens=2, do_sample=False)
    q, kc, vc, lens, scale, out = seen[2]
    n = int(lens[0])
    assert n == 201  # the prompt and the first generated token
    table = torch.zeros(1, 1, dtype=torch.int32)
    # independent pick: top-16 q.k per query head with the current token forced in
    scores = torch.einsum("hd,hsd->hs", q[0], kc[0, torch.arange(9) // 3, :n]) * scale
    scores[:, n - 1] = float("inf")
    picked = torch.zeros(1, 9, n, dtype=torch.bool)
    picked[0].scatter_(1, scores.topk(16, -1).indices, True)
    ref, _ = decode_attention_reference(q, kc, vc, table, lens, torch.ones(1, 9, n, dtype=torch.bool), scale)
    torch.testing.assert_close(out.float(), ref, atol=ATTN_ATOL, rtol=0)  # the select layer attends densely
    q, kc, vc, lens, scale, out = seen[5]
    window = torch.arange(n) >= n - 16
    window[:4] = True
    mask = torch.cat([picked[:, :6], window.expand(1, 3, n)], 1)
    ref, _ = decode_attention_reference(q, kc, vc, table, lens, mask, scale)
    torch.testing.assert_close(out.float(), ref, atol=ATTN_ATOL, rtol=0)
    q, kc, vc, lens, scale, out = seen[1]
    window = torch.arange(n) >= n - 32
    window[:4] = True
    ref, _ = decode_attention_reference(q, kc, vc, table, lens, window.expand(1, 9, n), scale)
    torch.testing.assert_close(out.float(), ref, atol=ATTN_ATOL, rtol=0)


def test_sparse_plan_finds_a_passkey_greedily_alone_and_in_a_padded_batch(model, geometry, tokenizer):
    plan = _plan(geometry, settings={"dense_below": 0, "tidal_top_k": 128},
                 default={"prefill": {"type": "vertical_slash", "vertical": 64, "slash": 64, "local_diagonals": 64},
                          "decode": {"type": "tidal", "role": "reuse"}},
                 layers={"0-1": {"prefill": {"type": "dense"}, "decode": {"type": "dense"}},
                         "2,5,8,11,14,17,20,23,26": {"decode": {"type": "tidal", "role": "select"}}})
    tasks = [make_task("passkey", tokenizer, 600, seed=0), make_task("passkey", tokenizer, 420, seed=1)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t.prompt}], add_generation_prompt=True,
                                           tokenize=False) for t in tasks]
    runtime = hf.attach_plan(model, plan, pages=None)
    enc = tokenizer(texts[:1], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert tasks[0].grade(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    density = runtime.density()
    assert density["prefill"] < 0.6 and density["decode"] < 0.6
    enc = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    for row, task in enumerate(tasks):
        assert task.grade(tokenizer.decode(out[row, enc.input_ids.shape[1]:], skip_special_tokens=True))


# ------------------------------------------------------------------------------ errors
def test_errors_name_what_was_wrong(model, geometry):
    wrong = Plan.from_dict({"model": {**geometry.model_dump(exclude_none=True), "num_heads": 32, "num_kv_heads": 8}})
    with pytest.raises(PlanError, match=r"num_heads: expected 9"):
        hf.attach_plan(model, wrong, pages=None)
    hf.detach_plan(model)
    with pytest.raises(RuntimeError, match="attach_plan"):
        _logits(model, _ids(10, 5))
    hf.attach_plan(model, _plan(geometry), pages=None)
    ids = _ids(12, 6).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    with pytest.raises(ValueError, match="left padding"):
        _logits(model, ids, mask)
