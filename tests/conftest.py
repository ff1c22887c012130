"""Live servers the suite shares, and the order that lets fault tests end them.

A ``headwise serve`` start costs about a minute on the CI machine, so tests that need the same
kind of server share one per session (``servers.py``: ``api_server``, ``small_server``).

A test that ends a shared server on purpose (SIGTERM, a killed engine core) is marked
``ends_server`` and runs after every other test of the session, so that it ends the server after
its last user. Whatever a shared server's end, nothing of it may be left running.
"""

from __future__ import annotations

import pytest

from servers import api_server, small_server  # noqa: F401 - fixtures for every test module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("ends_server") is not None)  # stable: order kept
