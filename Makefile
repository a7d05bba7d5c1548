# The two set-up commands of the README:
#   make demo   install (pinned) and run the main job on a model that needs no download
#   make test   install (pinned) and run lint, format check and the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/bf random-model --arch sd15-tiny --seed 0 --out $(DEMO)/tiny --force
	$(BIN)/bf quantize --model $(DEMO)/tiny --bits 2 --out $(DEMO)/tiny-2bit.bfq
	$(BIN)/bf inspect $(DEMO)/tiny-2bit.bfq

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(DEMO) build *.egg-info .pytest_cache .hypothesis
