"""The commands room: the ``headwise`` CLI and what it runs in the API process.

``cli`` (the entry point) dispatches to ``serve`` (vLLM's OpenAI server with the plugin switched
on, the HTTP ``routes`` and metrics, ``supervise`` so nothing outlives it), ``plan_cmd``,
``profile_cmd`` and ``model`` (the embedded default model). ``serve_process`` runs a server as a
child process for tests, benchmarks and load tests. Commands may import the plugin room; the
plugin never imports a command.
"""
