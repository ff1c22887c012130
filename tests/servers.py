"""The live servers the suite shares (fixtures re-exported by ``conftest.py``; see it for the why).

* ``api_server``: the README's server (embedded model, shipped plan) with an API key and a single
  sequence slot (``tests/test_api.py`` says why one slot);
* ``small_server``: the same with a 2K context and a 256 MB KV cache (hostile requests, fuzz, faults).
"""

from __future__ import annotations

import pytest

from headwise.server.commands.serve_process import ServerProcess

API_KEY = "headwise-test-key"
START_TIMEOUT_S = 420  # an engine start on a loaded 2-core machine took up to ~160 s with compilation
API_ARGS = ["--api-key", API_KEY, "--max-num-seqs", "1"]
SMALL_CONTEXT = 2048
SMALL_ARGS = ["--max-model-len", str(SMALL_CONTEXT), "--kv-cache-memory-bytes", "256M"]


def _shared(tmp_path_factory, name: str, args: list[str]):
    server = ServerProcess(args, log_path=tmp_path_factory.mktemp(name) / "server.log").start(START_TIMEOUT_S)
    yield server
    server.stop()  # a no-op when a fault test ended it
    assert not server.group_alive(), f"{name}: a server process outlived the session"


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    yield from _shared(tmp_path_factory, "api-server", API_ARGS)


@pytest.fixture(scope="session")
def small_server(tmp_path_factory):
    yield from _shared(tmp_path_factory, "small-server", SMALL_ARGS)
