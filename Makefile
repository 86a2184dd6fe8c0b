SHELL := /bin/bash

.PHONY: setup run test bench lint

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/python -m streaming_llm eval --method streaming --cap 256 --compress-every 64 --max-tokens 1024

test: setup
	.venv/bin/python -m ruff check .
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/decode_overhead.py
