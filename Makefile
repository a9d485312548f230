# Every target creates the virtual environment on first use; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m vlp_jax.main --config=configs/clip.py:tiny --workdir=workdir/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vlp_jax configs tests

bench: $(STAMP)
	$(PY) -m vlp_jax.bench --config=configs/clip.py:tiny

clean:
	rm -rf $(VENV) workdir
