"""The vLLM plugin room: everything that runs inside vLLM's engine and worker processes.

``switch`` (the ``vllm.general_plugins`` entry point and the ``HEADWISE_ENABLE`` switch) ->
``backend`` (what vLLM registers) -> ``metadata`` (the step plan, built once per scheduler step)
-> ``impl`` (per layer: KV write, then ``runner``) -> ``kv_cache`` / ``cpu_ops`` (the paged cache
and vLLM's fused CPU op); ``plan_binding`` slices the plan for this worker's heads and ``stats``
records what ran. ``hf`` is the transformers integration over the same layer runner. Nothing here
imports the commands room (``headwise.server.commands``).

The names below are the switch's; importing this package stays cheap (no vLLM, no torch).
"""

from .switch import (  # noqa: F401
    CPU_BACKEND, CUDA_BACKEND, ENV_ENABLE, ENV_PLAN, ENV_STATS_DIR, PLUGIN_NAME, cli_args, disable, enable_env,
    enabled, engine_args, register, registered_as,
)
