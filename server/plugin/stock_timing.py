"""Timers around vLLM's own CPU attention, so a profile compares stock with headwise part by part.

With ``HEADWISE_PROFILE=1`` and headwise *off* (``headwise serve --no-headwise``), ``switch.register``
calls ``install()`` in every vLLM process. In the worker it wraps three methods of vLLM's CPU
attention backend, changing nothing they compute:

* the metadata builder's ``__init__`` starts a stats recorder (``backend: "stock"``) sized to the
  model's layers, publishing into ``$HEADWISE_STATS_DIR`` like headwise's own;
* ``build`` is timed as the step part ``plan``;
* ``do_kv_cache_update`` as the layer's ``kv_write``, and ``forward`` (one fused op call) as the
  layer's ``kernel`` and its attention seconds.

The headwise backend records the same parts (``stats.PROFILE_PARTS``), so per layer
``/v1/headwise/stats`` reads the same way for both.
"""

from __future__ import annotations

import functools
import time

from .stats import get_recorder, init_recorder, stats_dir_from_env
from .timing import phase, step_phase

_installed = False


def install() -> bool:
    """Wrap vLLM's CPU attention backend (once per process); False when there is none here."""
    global _installed
    if _installed:
        return True
    try:
        from vllm.v1.attention.backends import cpu_attn
    except ImportError:  # not vLLM's CPU build
        return False
    builder, impl = cpu_attn.CPUAttentionMetadataBuilder, cpu_attn.CPUAttentionBackendImpl
    builder.__init__ = _timed_init(builder.__init__)
    builder.build = _timed_build(builder.build)
    impl.forward = _timed_forward(impl.forward)
    impl.do_kv_cache_update = _timed_kv_write(impl.do_kv_cache_update)
    _installed = True
    return True


def _layer(layer) -> int:
    from .plan_binding import layer_index

    return layer_index(layer.layer_name)


def _timed_init(init):
    @functools.wraps(init)
    def wrapper(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        init(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        parallel = vllm_config.parallel_config
        init_recorder(num_layers=vllm_config.model_config.get_num_layers(parallel), stats_dir=stats_dir_from_env(),
                      rank=parallel.rank, tp_size=parallel.tensor_parallel_size, plan=None,
                      device=str(getattr(device, "type", device)), backend="stock", profiling=True)
    return wrapper


def _timed_build(build):
    @functools.wraps(build)
    def wrapper(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        rec = get_recorder()
        with step_phase("plan"):
            md = build(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
        if rec is not None:  # tokens by phase: a one-token row counts as decode (stock does not say)
            cm = common_attn_metadata
            q_lens = cm.query_start_loc_cpu[1:cm.num_reqs + 1] - cm.query_start_loc_cpu[:cm.num_reqs]
            decodes = int((q_lens == 1).sum())
            prefills = cm.num_reqs - decodes
            rec.add_step(prefill_tokens=int(q_lens.sum()) - decodes, decode_tokens=decodes, prefill_sparse=0,
                         prefill_dense=prefills, decode_sparse=0, decode_dense=decodes)
        return md
    return wrapper


def _timed_forward(forward):
    @functools.wraps(forward)
    def wrapper(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        rec = get_recorder()
        if rec is None or attn_metadata is None:
            return forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        i = _layer(layer)
        started = time.perf_counter()
        with phase(i, "kernel"):
            out = forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        rec.add_call(i, time.perf_counter() - started)
        return out
    return wrapper


def _timed_kv_write(update):
    @functools.wraps(update)
    def wrapper(self, layer, *args, **kwargs):
        if get_recorder() is None or layer is None:
            return update(self, layer, *args, **kwargs)
        with phase(_layer(layer), "kv_write"):
            return update(self, layer, *args, **kwargs)
    return wrapper
