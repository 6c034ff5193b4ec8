.PHONY: all lint format typecheck test bench demo chaos

all: lint typecheck test

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

typecheck:
	.venv/bin/mypy

test:
	./scripts/test

bench:
	./scripts/bench

demo:
	.venv/bin/hopwatch demo

# Hostile input and faults, longer than in `make test`: 20x the property-test examples (fresh
# random ones each time), poison records, broker kill and restart, slow clients. Loopback only.
chaos:
	HOPWATCH_FUZZ_SCALE=20 .venv/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_fuzz_webhooks.py tests/test_hostile_webhooks.py tests/test_hostile_values.py \
		tests/test_kafka_poison.py tests/test_demo_broker.py \
		tests/test_kafka.py::test_broker_outage_breaks_only_its_links_and_heals \
		tests/test_kafka.py::test_broker_restarts_on_its_port
