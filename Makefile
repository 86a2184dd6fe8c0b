SHELL := /bin/bash

.PHONY: setup lock system-deps run smoke dashboard paper docs test bench

# Python environment: .venv as the lock files pin it, torch first (scripts/setup.sh; idempotent).
setup:
	bash scripts/setup.sh

# Rewrite requirements.lock and requirements-cuda.lock from pyproject.toml, keeping the pins that still fit (UPGRADE=1:
# the newest fitting releases). uv comes with the dev extra; a setup that stops at pip check (a dependency not yet
# locked) has installed it already.
lock:
	[ -x .venv/bin/uv ] || bash scripts/setup.sh || [ -x .venv/bin/uv ]
	.venv/bin/python scripts/lock.py $(if $(UPGRADE),--upgrade)

# System packages the browser and LaTeX tests need: Debian's chromium and a small TeX Live (idempotent).
system-deps:
	bash scripts/ci-system-deps.sh

# The main job: the study's grid on the embedded model and text, into results/gridrun.duckdb (resumes if stopped).
run: setup
	.venv/bin/python -m gridrun grids/paper.yaml

smoke: setup
	.venv/bin/python -m gridrun grids/smoke.yaml --store results/smoke.duckdb

dashboard: setup
	.venv/bin/python -m dashboard

# LaTeX tables and figures of the paper grid into paper/generated/, and the PDF where pdflatex exists.
paper: setup
	.venv/bin/python -m paper export
	if command -v pdflatex >/dev/null; then .venv/bin/python -m paper pdf; fi

# The documentation site (docs/, mkdocs.yml) on http://127.0.0.1:8000, rebuilt on every edit.
docs: setup
	.venv/bin/mkdocs serve

# ruff, the docs site built strictly (a broken link or anchor fails), then the test suite.
test: setup system-deps
	.venv/bin/python -m ruff check .
	.venv/bin/mkdocs build --strict --quiet
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/decode_overhead.py
	.venv/bin/python bench/gridrun_overhead.py
	.venv/bin/python bench/parallel_eval.py
