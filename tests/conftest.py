"""Shared test fixtures: each area keeps its real-process fixtures in tests/fixtures/<area>.py."""

pytest_plugins = [
    "tests.fixtures.core",
    "tests.fixtures.kafka",
    "tests.fixtures.webhooks",
    "tests.fixtures.otlp",
    "tests.fixtures.store",
    "tests.fixtures.demo",
    "tests.fixtures.prometheus",
    "tests.fixtures.postman",
]
