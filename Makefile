.PHONY: all lint format typecheck test bench demo chaos soak

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
# random ones each time), poison records, slow clients, and the fault suite (tests/test_faults*)
# with 5x the runs under each fault and 5 broker and database outages. Loopback only.
chaos:
	HOPWATCH_FUZZ_SCALE=20 HOPWATCH_CHAOS_SCALE=5 .venv/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_fuzz_webhooks.py tests/test_hostile_webhooks.py tests/test_webhook_wire.py \
		tests/test_hostile_values.py \
		tests/test_kafka_poison.py tests/test_demo_broker.py \
		tests/test_faults.py tests/test_faults_parts.py tests/test_faults_signals.py \
		tests/test_kafka.py::test_broker_outage_breaks_only_its_links_and_heals \
		tests/test_kafka.py::test_broker_restarts_on_its_port

# The demo watched for about 10 minutes at a tenth of its intervals, a fault a minute, hopwatch
# restarted twice: detection times, false alarms, memory (benchmarks/results/soak.json).
soak:
	.venv/bin/python -m benchmarks.soak --minutes 10
