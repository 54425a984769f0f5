# The two commands: `make run` opens the app, `make test` runs the whole suite.
# Both create the virtual environment in .venv first if it is missing.
PY := .venv/bin/python
PORT ?= 8501
# pytest workers (pytest-xdist) for all but the browser tests: one per core; WORKERS=0 runs them in this process.
# The browser tests run after them, alone, since they time pages against their targets.
WORKERS ?= auto

.PHONY: run test env lint bench pretrained docs

env:
	@scripts/ensure_env.sh

run: env
	@scripts/ensure_data.sh
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

test: env
	@scripts/ensure_chromium.sh
	@scripts/ensure_data.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --ignore=tests/e2e $(PYTEST_ARGS)
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check .

bench: env
	$(PY) bench/bench.py

# Regenerate docs/experiments.md, its figures (Plotly + kaleido, driving Debian's Chromium) and the
# README's performance table from the stored results (docs/results/, bench/results/).
docs: env
	$(PY) -m scripts.docgen

pretrained: env
	$(PY) pretrained/make_pretrained.py
