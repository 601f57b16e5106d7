# The README's two commands: `make train` (set up, then train the default bundle on generated
# phantom data) and `make test` (set up, then run the test suite).
PY := .venv/bin/python

.PHONY: setup train test lint
setup:
	bash scripts/setup.sh

train: setup
	bash scripts/train_default.sh $(ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check medmtl tests benchmarks
