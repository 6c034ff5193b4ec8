.PHONY: all lint format typecheck test bench demo

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
