# A newcomer runs `make serve` or `make test`; both build .venv and install everything first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench golden protos clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "fpgaserve needs Python 3.11 or newer; run: make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# NVIDIA's Triton client, for tests/test_triton_client.py only, without its pins: its base
	# requirements would downgrade the ml-dtypes TensorFlow runs on, its [grpc] extra protobuf.
	$(BIN)/python -m pip install --quiet --no-deps 'tritonclient==2.73.0'
	@touch $(STAMP)

# The default model: ResNet-50 in msfp16, ImageNet weights when Keras can download them, else
# random weights with a loud warning (recorded as weights: random in the model's metadata).
MODELS := models
DEFAULT_MODEL := $(MODELS)/resnet50/1/model.zip

$(DEFAULT_MODEL): $(STAMP)
	$(BIN)/fpgaserve build resnet50 --format msfp16 --weights auto -o $@

serve: $(DEFAULT_MODEL)
	$(BIN)/fpgaserve serve --model-repository $(MODELS) --log-format text

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/resnet50_layers.py --batch 1 8
	$(BIN)/python bench/resnet50_model.py --batch 1 8
	$(BIN)/python bench/zoo_fidelity.py
	$(BIN)/python bench/accuracy.py --json bench/results/accuracy.json
	$(BIN)/python bench/opencl_resnet50.py
	$(BIN)/python bench/server_overhead.py --json bench/results/server_overhead.json
	$(BIN)/python bench/request_path.py
	$(BIN)/python bench/report_plots.py

protos: $(STAMP)
	$(BIN)/python protos/generate.py

golden: $(STAMP)
	$(BIN)/python tests/golden/generate.py

clean:
	rm -rf $(VENV) $(MODELS) build *.egg-info .pytest_cache .ruff_cache .hypothesis
