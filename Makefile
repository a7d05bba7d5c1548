# The two set-up commands of the README:
#   make demo   install (pinned) and run the main job on the shipped model (offline, minutes on a CPU)
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

# The shipped model (no --model): quantize to 2 bits, inspect, compare both on a few test prompts, export to ONNX.
demo: install
	$(BIN)/bf quantize --bits 2 --out $(DEMO)/shapes-2bit.bfq
	$(BIN)/bf inspect $(DEMO)/shapes-2bit.bfq
	$(BIN)/bf eval --model shipped --model $(DEMO)/shapes-2bit.bfq --reference shipped --cfg 7.5 --limit 6 \
		--json $(DEMO)/eval.json --grid $(DEMO)/eval.png
	rm -rf $(DEMO)/onnx && $(BIN)/bf export $(DEMO)/shapes-2bit.bfq --target onnx-std --out $(DEMO)/onnx

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(DEMO) build *.egg-info .pytest_cache .hypothesis
