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
    "tests.fixtures.mariadb",
    "tests.fixtures.tls",
    "tests.fixtures.dns_server",
    "tests.fixtures.grpc_server",
    "tests.fixtures.line_servers",
    "tests.fixtures.faults",
]
