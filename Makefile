# Every target creates the virtual environment on first use; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo lint bench clean data-emoji

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,emoji,tfds]"
	touch $(STAMP)

# Test processes (pytest-xdist): 2 fits the 2-core, 24 GB CI machine (each process holds its own 8 fake devices and
# shared runs; they share one compilation cache). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=15

# Unit tests only (no end-to-end training runs, no extra processes): a few minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit --durations=10

demo: $(STAMP)
	$(PY) -m vlp_jax.main --config=configs/clip.py:tiny --workdir=workdir/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vlp_jax configs tests launch tools colab

bench: $(STAMP)
	$(PY) -m vlp_jax.bench --config=configs/clip.py:tiny

# Real image-text data: emoji art in three styles with their CLDR/emojilib/Unicode names and keywords (licences in
# README.md, "Real data: emoji"). The pinned npm packages go to data/emoji/npm, the shards to data/emoji/shards;
# neither is committed.
EMOJI_DIR := data/emoji
EMOJI_PACKAGES := emoji-datasource@16.0.0 emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 \
	openmoji@17.0.0 emojibase-data@17.0.0 emojilib@4.0.3

data-emoji: $(STAMP)
	mkdir -p $(EMOJI_DIR)/npm
	npm install --no-audit --no-fund --prefix $(EMOJI_DIR)/npm $(EMOJI_PACKAGES)
	$(PY) -m vlp_jax.datasets.emoji --npm-dir=$(EMOJI_DIR)/npm --out=$(EMOJI_DIR)/shards --baselines

clean:
	rm -rf $(VENV) workdir
