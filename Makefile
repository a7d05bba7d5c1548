# The two set-up commands of the README:
#   make demo   install (pinned) and run the main job on the shipped model (offline, minutes on a CPU)
#   make test   install (pinned) and run lint, format check and the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test lint clean plugins ort-headers ort-op

# Native libraries of plugins_trt/ (see plugins_trt/README.md). The TensorRT plugin is built when
# TensorRT's headers are found: TENSORRT_ROOT=/opt/tensorrt or TENSORRT_INCLUDE_DIR=.../include. With
# TensorRT for RTX installed in the venv, the plugin links to it and its parser's alias library is built.
PLUGIN_BUILD ?= plugins_trt/build
TENSORRT_RTX_LIB_DIR ?= $(shell $(BIN)/python -c "import os, tensorrt_rtx_libs as m; print(os.path.dirname(m.__file__))" 2>/dev/null)
CUDA_ARCHS ?= 75-real;80-real;86-real;89-real;90
# ONNX Runtime's C API header, for the custom-op library: from Debian's libonnxruntime-dev (pinned).
ORT_DEB_URL := http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
ORT_DEB_SHA256 := 14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
ORT_DIR := build/third_party/onnxruntime
ORT_INCLUDE := $(ORT_DIR)/usr/include/onnxruntime

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Installing also builds the ONNX Runtime op library (C++ only, seconds), so that bf infer runs the default
# bf export target (custom ops) with no further step; without cmake or a C++ compiler it says so and goes on.
install: $(BIN)/.installed ort-op

ort-op: $(PLUGIN_BUILD)/libbf_ort_op.so

$(PLUGIN_BUILD)/libbf_ort_op.so: $(wildcard plugins_trt/src/*.cpp plugins_trt/include/*.h) plugins_trt/CMakeLists.txt
	@if command -v cmake >/dev/null && command -v c++ >/dev/null; then \
		$(MAKE) --no-print-directory ort-headers && \
		cmake -S plugins_trt -B $(PLUGIN_BUILD) -DORT_INCLUDE_DIR=$(abspath $(ORT_INCLUDE)) >/dev/null && \
		cmake --build $(PLUGIN_BUILD) -j --target bf_ort_op >/dev/null && echo "built $@" \
		|| echo "note: building $@ failed (see 'make ort-op'); bf infer will run onnx-std and onnx-qdq exports only"; \
	else echo "note: cmake or a C++ compiler is missing, so $@ was not built; bf infer will run onnx-std and onnx-qdq exports, not the default custom-op one"; fi

# The shipped model (no --model) and its shipped BitsFusion model (1.99 bits, trained with bf train's defaults): a 2-bit
# post-training quantization as a control, inspect, compare all three on the first 4 test prompts of each split, export
# the 1.99-bit model to ONNX and to TensorRT for RTX engines (built on this CPU), generate, bench.
demo: install
	$(BIN)/bf quantize --bits 2 --out $(DEMO)/shapes-2bit.bfq --force
	$(BIN)/bf inspect shipped-1.99bit
	$(BIN)/bf eval --model shipped --model shipped-1.99bit --model $(DEMO)/shapes-2bit.bfq --reference shipped --cfg 7.5 --limit 4 \
		--json $(DEMO)/eval.json --grid $(DEMO)/eval.png
	rm -rf $(DEMO)/onnx && $(BIN)/bf export shipped-1.99bit --target onnx-std --out $(DEMO)/onnx
	rm -rf $(DEMO)/rtx && $(BIN)/bf export shipped-1.99bit --target trt-rtx --out $(DEMO)/rtx
	$(BIN)/bf infer $(DEMO)/onnx --prompt "a red circle above a blue square" --out $(DEMO)/infer.png
	$(BIN)/bf bench $(DEMO)/onnx --runs 5 --json $(DEMO)/bench.json --plot $(DEMO)/bench.png

$(ORT_INCLUDE)/onnxruntime_c_api.h:
	mkdir -p $(ORT_DIR)
	curl -fsSL -o $(ORT_DIR).deb '$(ORT_DEB_URL)'
	echo '$(ORT_DEB_SHA256)  $(ORT_DIR).deb' | sha256sum -c --quiet -
	cd $(ORT_DIR) && ar p ../onnxruntime.deb data.tar.xz | tar xJ ./usr/include/onnxruntime
	rm $(ORT_DIR).deb

ort-headers: $(ORT_INCLUDE)/onnxruntime_c_api.h

plugins: ort-headers
	cmake -S plugins_trt -B $(PLUGIN_BUILD) -DBF_CUDA_ARCHITECTURES='$(CUDA_ARCHS)' -DORT_INCLUDE_DIR=$(abspath $(ORT_INCLUDE)) \
		$(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT)) $(if $(TENSORRT_INCLUDE_DIR),-DTENSORRT_INCLUDE_DIR=$(TENSORRT_INCLUDE_DIR)) \
		$(if $(TENSORRT_RTX_LIB_DIR),-DTENSORRT_RTX_LIB_DIR=$(TENSORRT_RTX_LIB_DIR))
	cmake --build $(PLUGIN_BUILD) -j

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, each with one math thread: most tests are single-threaded Python (tracing, exports, CLI
# runs), so two processes keep two cores busy where one process with two threads leaves one idle.
TEST_WORKERS ?= 2
test: lint ort-headers
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(DEMO) build $(PLUGIN_BUILD) *.egg-info .pytest_cache .hypothesis
