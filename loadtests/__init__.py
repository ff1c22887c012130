"""Load tests for an OpenAI-compatible server: a locust file, a headless runner, its report."""
