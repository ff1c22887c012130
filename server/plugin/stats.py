"""What the headwise backend did, counted in the worker and read anywhere.

The attention backend runs inside vLLM's worker processes (spawned, one per tensor-parallel rank);
the HTTP server that exposes ``/metrics`` runs elsewhere. So each worker keeps its counters in a
``StatsRecorder`` and publishes them as a JSON snapshot file in a shared directory
(``$HEADWISE_STATS_DIR``): written to a temporary name and renamed into place, so a reader never sees
half a file; at most every ``PUBLISH_INTERVAL_S`` and once at start-up, from a daemon thread so an
engine that goes idle still publishes its last step. ``read_stats(dir)`` merges the workers'
snapshots into one dict, and ``HeadwiseCollector(dir)`` turns that dict into Prometheus metrics.

Density is counted in (query, key) pairs: ``kept`` = pairs the plan let a query read, ``causal`` =
pairs dense causal attention would read. Their ratio per layer and phase is the achieved density.

Profiling (``HEADWISE_PROFILE=1``): the recorder also sums, per layer, the seconds of each named part
of the attention call (``PROFILE_PARTS``: the kernels, index building, copies, decode selection,
the K/V write) and, per step, the metadata build (``plan``); ``timing.phase(layer, part)`` times
one part (a no-op when profiling is off). ``stock_timing.py`` times vLLM's own CPU attention the same
way, so one profile compares stock with headwise part by part. On CUDA a timed part synchronises
the device first and last, so its seconds are the device's, not the launch's.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from headwise.server import env

ENV_STATS_DIR = env.STATS_DIR
PUBLISH_INTERVAL_S = 0.5
PHASES = ("prefill", "decode")
PATHS = ("sparse", "dense_fallback")
# parts of one layer's attention call a profile times (the rest of the call is host work):
# kernel = every attention kernel or op call; index = index building and op schedules made in the
# layer (estimation included); copy = keys copied out of the paged cache; select = decode selection;
# kv_write = the new tokens' K/V into the cache (vLLM's separate call before the attention call)
PROFILE_PARTS = ("kernel", "index", "copy", "select", "kv_write")
STEP_PARTS = ("plan",)  # per step: the metadata builder (host)
BACKENDS = ("headwise", "stock")
_FILE_PREFIX = "worker-"


def stats_dir_from_env() -> str | None:
    return env.stats_dir()


class StatsRecorder:
    """Counters of one worker process. Cheap to update from the hot path (plain Python numbers).

    Counters that live on a device (kept-key counts made per layer on CUDA) are handed in as
    tensors through ``add_keys_tensor`` and added *in place* into one persistent device tensor, so
    the per-layer path never synchronises with the GPU and a captured CUDA graph's replays keep
    counting; ``flush_device`` (called by the step planner) folds it into the host numbers at most
    every ``PUBLISH_INTERVAL_S``.
    """

    def __init__(self, num_layers: int, stats_dir: str | None, rank: int = 0, tp_size: int = 1,
                 plan: str | None = None, device: str = "cpu", backend: str = "headwise",
                 profiling: bool | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_layers = num_layers
        self.stats_dir = Path(stats_dir) if stats_dir else None
        self.rank, self.tp_size, self.plan, self.device = rank, tp_size, plan, device
        self.backend = backend
        self.profiling = env.profile() if profiling is None else profiling
        # part -> seconds per layer; step part -> seconds (profiling only)
        self.parts = {p: [0.0] * num_layers for p in PROFILE_PARTS}
        self.step_parts = dict.fromkeys(STEP_PARTS, 0.0)
        self.started_at = time.time()
        self._lock = threading.Lock()
        # [layer][phase] -> kept / causal (query, key) pairs
        self.kept = [[0, 0] for _ in range(num_layers)]
        self.causal = [[0, 0] for _ in range(num_layers)]
        self.seconds = [0.0] * num_layers
        self.attention_calls = 0
        self.steps = 0
        self.mixed_steps = 0  # steps whose batch held prefill and decode rows together
        self.tokens = [0, 0]
        self.requests = [[0, 0], [0, 0]]  # [phase][path]
        self._device_keys = None  # [layer, phase, (kept, causal)] int64 on the device, added in place
        self._last_flush = 0.0
        self._dirty = True
        self._last_publish = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- updates (hot path)
    def add_keys(self, layer: int, phase: int, kept: int, causal: int) -> None:
        row_k, row_c = self.kept[layer], self.causal[layer]
        row_k[phase] += kept
        row_c[phase] += causal
        self._dirty = True

    def add_keys_tensor(self, layer: int, phase: int, kept, causal) -> None:
        """``kept``/``causal``: 0-d device tensors (or ints), summed on the device until ``flush_device``."""
        import torch

        kept = torch.as_tensor(kept)
        acc = self._device_keys
        if acc is None or acc.device != kept.device:
            self.flush_device(force=True)
            acc = self._device_keys = torch.zeros(self.num_layers, 2, 2, dtype=torch.int64, device=kept.device)
        acc[layer, phase, 0] += kept
        acc[layer, phase, 1] += causal
        self._dirty = True

    def add_call(self, layer: int, seconds: float) -> None:
        self.seconds[layer] += seconds
        self.attention_calls += 1
        self._dirty = True

    def add_part(self, layer: int, part: str, seconds: float) -> None:
        self.parts[part][layer] += seconds
        self._dirty = True

    def add_step_part(self, part: str, seconds: float) -> None:
        self.step_parts[part] += seconds
        self._dirty = True

    def add_step(self, prefill_tokens: int, decode_tokens: int, prefill_sparse: int,
                 prefill_dense: int, decode_sparse: int, decode_dense: int) -> None:
        self.steps += 1
        self.mixed_steps += bool(prefill_tokens and decode_tokens)
        self.tokens[0] += prefill_tokens
        self.tokens[1] += decode_tokens
        self.requests[0][0] += prefill_sparse
        self.requests[0][1] += prefill_dense
        self.requests[1][0] += decode_sparse
        self.requests[1][1] += decode_dense
        self._dirty = True

    def flush_device(self, force: bool = False) -> None:
        """Fold the device counts into the host ones (one device read), at most every
        ``PUBLISH_INTERVAL_S`` unless ``force``."""
        acc = self._device_keys
        now = time.monotonic()
        if acc is None or (not force and now - self._last_flush < PUBLISH_INTERVAL_S):
            return
        self._last_flush = now
        counts = acc.tolist()
        acc.zero_()
        for layer, per_phase in enumerate(counts):
            for phase, (kept, causal) in enumerate(per_phase):
                self.kept[layer][phase] += kept
                self.causal[layer][phase] += causal

    # ---------------------------------------------------------------- publishing
    def snapshot(self) -> dict:
        with self._lock:
            return {
                "version": 1,
                "backend": self.backend,
                "rank": self.rank,
                "tp_size": self.tp_size,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "device": self.device,
                "plan": self.plan,
                "started_at": self.started_at,
                "updated_at": time.time(),
                "num_layers": self.num_layers,
                "steps": self.steps,
                "mixed_steps": self.mixed_steps,
                "attention_calls": self.attention_calls,
                "tokens": dict(zip(PHASES, self.tokens)),
                "requests": {ph: dict(zip(PATHS, self.requests[i])) for i, ph in enumerate(PHASES)},
                "kept_keys": [list(r) for r in self.kept],
                "causal_keys": [list(r) for r in self.causal],
                "attention_seconds": list(self.seconds),
                "profiling": self.profiling,
                "part_seconds": {p: list(v) for p, v in self.parts.items()},
                "step_part_seconds": dict(self.step_parts),
            }

    @property
    def path(self) -> Path | None:
        if self.stats_dir is None:
            return None
        return self.stats_dir / f"{_FILE_PREFIX}rank{self.rank}-pid{os.getpid()}.json"

    def publish(self) -> None:
        """Write the snapshot atomically (tmp file + rename in the same directory)."""
        target = self.path
        if target is None:
            return
        self._dirty = False
        data = json.dumps(self.snapshot())
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(target.parent))
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last_publish = time.monotonic()

    def maybe_publish(self) -> None:
        if self._dirty and time.monotonic() - self._last_publish >= PUBLISH_INTERVAL_S:
            self.publish()

    def start(self) -> None:
        """Publish now and then every interval while anything changed (daemon thread)."""
        if self.stats_dir is None or self._thread is not None:
            return
        self.publish()

        def loop() -> None:
            while not self._stop.wait(PUBLISH_INTERVAL_S):
                try:
                    self.maybe_publish()
                except OSError:
                    pass  # the directory vanished (the run ended); keep serving

        self._thread = threading.Thread(target=loop, name="headwise-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


_RECORDER: StatsRecorder | None = None


def get_recorder() -> StatsRecorder | None:
    return _RECORDER


def init_recorder(**kwargs) -> StatsRecorder:
    """The process-wide recorder (one engine per worker process); created once, started at once."""
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = StatsRecorder(**kwargs)
        _RECORDER.start()
    return _RECORDER


# ------------------------------------------------------------------------------ reading
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ratio(kept: float, causal: float) -> float | None:
    return kept / causal if causal else None


def read_snapshots(stats_dir: str | os.PathLike | None) -> list[dict]:
    if not stats_dir or not Path(stats_dir).is_dir():
        return []
    out = []
    for f in sorted(Path(stats_dir).glob(f"{_FILE_PREFIX}*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue  # removed between glob and read, or not ours
    return out


def read_stats(stats_dir: str | os.PathLike | None) -> dict:
    """Merge every worker snapshot in ``stats_dir`` (see the module docstring for the meaning).

    Keys are summed over tensor-parallel ranks (each owns its heads); seconds are the max over
    ranks (they run at the same time); steps, tokens and request counts come from the lowest rank.
    ``backend_active`` says a *headwise* backend published; a stock engine profiled by
    ``stock_timing`` publishes too (``backend: "stock"``), with timings and no densities.
    """
    snaps = read_snapshots(stats_dir)
    num_layers = max((s["num_layers"] for s in snaps), default=0)
    kept = [[0, 0] for _ in range(num_layers)]
    causal = [[0, 0] for _ in range(num_layers)]
    seconds = [0.0] * num_layers
    parts = {p: [0.0] * num_layers for p in PROFILE_PARTS}
    step_parts = dict.fromkeys(STEP_PARTS, 0.0)
    for s in snaps:
        for i in range(s["num_layers"]):
            for p in range(2):
                kept[i][p] += s["kept_keys"][i][p]
                causal[i][p] += s["causal_keys"][i][p]
            seconds[i] = max(seconds[i], s["attention_seconds"][i])
            for part, per_layer in s.get("part_seconds", {}).items():
                if part in parts:
                    parts[part][i] = max(parts[part][i], per_layer[i])
        for part, sec in s.get("step_part_seconds", {}).items():
            if part in step_parts:
                step_parts[part] = max(step_parts[part], sec)
    lead = min(snaps, key=lambda s: (s["rank"], -s["updated_at"]), default=None)
    layers = [
        {
            "layer": i,
            "density": {ph: _ratio(kept[i][p], causal[i][p]) for p, ph in enumerate(PHASES)},
            "kept_keys": dict(zip(PHASES, kept[i])),
            "causal_keys": dict(zip(PHASES, causal[i])),
            "attention_seconds": seconds[i],
            "part_seconds": {part: parts[part][i] for part in PROFILE_PARTS},
        }
        for i in range(num_layers)
    ]
    totals_k = [sum(k[p] for k in kept) for p in range(2)]
    totals_c = [sum(c[p] for c in causal) for p in range(2)]
    zero_req = {ph: dict.fromkeys(PATHS, 0) for ph in PHASES}
    backends = sorted({s.get("backend", "headwise") for s in snaps})
    return {
        "backend_active": "headwise" in backends,
        "backends": backends,
        "profiling": any(s.get("profiling") for s in snaps),
        "workers": [
            {k: s[k] for k in ("rank", "pid", "tp_size", "device", "plan", "started_at", "updated_at")}
            | {"backend": s.get("backend", "headwise"),
               "alive": _pid_alive(s["pid"]) if s.get("host") == socket.gethostname() else None}
            for s in snaps
        ],
        "plan": lead["plan"] if lead else None,
        "num_layers": num_layers,
        "steps": lead["steps"] if lead else 0,
        "mixed_steps": lead.get("mixed_steps", 0) if lead else 0,
        "attention_calls": sum(s["attention_calls"] for s in snaps),
        "tokens": lead["tokens"] if lead else dict.fromkeys(PHASES, 0),
        "requests": lead["requests"] if lead else zero_req,
        "density": {ph: _ratio(totals_k[p], totals_c[p]) for p, ph in enumerate(PHASES)},
        "attention_seconds": sum(seconds),
        "part_seconds": {part: sum(parts[part]) for part in PROFILE_PARTS},
        "step_part_seconds": step_parts,
        "layers": layers,
    }


class HeadwiseCollector:
    """A ``prometheus_client`` custom collector over ``read_stats(stats_dir)``.

    Register with ``prometheus_client.REGISTRY.register(HeadwiseCollector(dir))``; every scrape
    reads the snapshot files afresh, so nothing needs updating in between.
    """

    def __init__(self, stats_dir: str | os.PathLike):
        self.stats_dir = stats_dir

    def describe(self) -> list:
        return []  # metrics are dynamic (one series per layer); skip the registry's dry run

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = read_stats(self.stats_dir)
        yield GaugeMetricFamily("headwise_backend_active",
                                "1 when a headwise attention backend published from a worker",
                                value=1.0 if st["backend_active"] else 0.0)
        yield GaugeMetricFamily("headwise_workers", "worker processes that published stats",
                                value=len(st["workers"]))
        yield CounterMetricFamily("headwise_steps", "scheduler steps the headwise backend planned",
                                  value=st["steps"])
        yield CounterMetricFamily("headwise_mixed_steps", "steps that batched prefill and decode rows together",
                                  value=st["mixed_steps"])
        yield CounterMetricFamily("headwise_attention_calls",
                                  "per-layer attention calls run by the headwise backend (all ranks)",
                                  value=st["attention_calls"])
        tok = CounterMetricFamily("headwise_tokens", "query tokens attended, by phase", labels=["phase"])
        for ph in PHASES:
            tok.add_metric([ph], st["tokens"][ph])
        yield tok
        req = CounterMetricFamily(
            "headwise_requests",
            "(request, step) pairs by phase and path: sparse = the plan's pattern, "
            "dense_fallback = dense because the sequence is below the plan's dense_below",
            labels=["phase", "path"])
        for ph in PHASES:
            for path in PATHS:
                req.add_metric([ph, path], st["requests"][ph][path])
        yield req
        dens = GaugeMetricFamily("headwise_density",
                                 "kept / causal (query, key) pairs over all layers", labels=["phase"])
        for ph in PHASES:
            if st["density"][ph] is not None:
                dens.add_metric([ph], st["density"][ph])
        yield dens
        ldens = GaugeMetricFamily("headwise_layer_density", "kept / causal (query, key) pairs per layer",
                                  labels=["layer", "phase"])
        lsec = CounterMetricFamily("headwise_layer_attention_seconds",
                                   "seconds spent in headwise attention per layer", labels=["layer"])
        for layer in st["layers"]:
            for ph in PHASES:
                if layer["density"][ph] is not None:
                    ldens.add_metric([str(layer["layer"]), ph], layer["density"][ph])
            lsec.add_metric([str(layer["layer"])], layer["attention_seconds"])
        yield ldens
        yield lsec
        yield CounterMetricFamily("headwise_attention_seconds",
                                  "seconds spent in headwise attention, all layers",
                                  value=st["attention_seconds"])
