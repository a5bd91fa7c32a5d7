"""The export tests share the serving tests' tiny bundle fixture."""

from tests.serve.conftest import tiny_bundle  # noqa: F401 - a fixture, found by pytest by name
