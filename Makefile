# ct-edge: every target installs what it needs first (make setup is idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?=
EPOCHS ?=
ARCH   ?=
RECIPE ?=
FLIP_TTA ?=
MODEL  ?= artifacts/model/model.keras
BUNDLE ?= artifacts/bundle
QUICK  ?=

DATA_ARG   = $(if $(DATA),--data "$(DATA)")
EPOCHS_ARG = $(if $(EPOCHS),--epochs $(EPOCHS))
ARCH_ARG   = $(if $(ARCH),--arch $(ARCH))
RECIPE_ARG = $(if $(RECIPE),--recipe $(RECIPE))
FLIP_TTA_ARG = $(if $(FLIP_TTA),--flip-tta)

comma := ,

.PHONY: setup demo train convert evaluate distill-cv architectures bench test test-all lint clean help

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): requirements/runtime.txt requirements/dev.txt pyproject.toml runtime/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/dev.txt -c requirements/runtime.txt \
		-e "./runtime[onnx,dicom,ray,listen]" -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install runtime + training/convert (pinned)

demo: setup  ## the main job on built-in synthetic data: generate, train, convert, classify
	$(BIN)/python -m training.train $(EPOCHS_ARG)
	$(BIN)/python -m convert --model $(MODEL) --out $(BUNDLE)
	$(BIN)/ct-edge classify --bundle $(BUNDLE) artifacts/data/synthetic/test/*/0000[01].png
	$(BIN)/ct-edge explain --bundle $(BUNDLE) artifacts/data/synthetic/test/*/00000.png -o artifacts/explain/

train: setup  ## train: make train [DATA=dir] [EPOCHS=n] [ARCH=name] [RECIPE=finetune|probe|mixture [FLIP_TTA=1]]
	$(BIN)/python -m training.train $(DATA_ARG) $(EPOCHS_ARG) $(ARCH_ARG) $(RECIPE_ARG) $(FLIP_TTA_ARG)

convert: setup  ## TFLite + ONNX bundle with parity gate: make convert [DATA=dir]
	$(BIN)/python -m convert --model $(MODEL) --out $(BUNDLE) $(DATA_ARG)

evaluate: setup  ## cross-validated comparison of recipes: make evaluate [DATA=dir] [EXPERIMENTS=a,b] [SEEDS=0,1,2]
	for seed in $(or $(subst $(comma), ,$(SEEDS)),0); do $(BIN)/python -m training.evaluate $(DATA_ARG) --seed $$seed \
	  $(if $(EXPERIMENTS),--experiments $(EXPERIMENTS)) || exit 1; done

DISTILL_OUT ?= artifacts/issue14/distill-bank
distill-cv: setup  ## bank distillation into edge-gap, fold by fold, resumable: make distill-cv DATA=dir [SEEDS=5,6,7]
	@test -n "$(DATA)" || { echo "error: distill-cv needs DATA=dir (real images; see docs/accuracy.md)"; exit 2; }
	for seed in $(or $(subst $(comma), ,$(SEEDS)),5 6 7); do for fold in 0 1 2 3 4; do \
	  out="$(DISTILL_OUT)/fold$$fold-seed$$seed.json"; \
	  if [ -f "$$out" ]; then echo "have $$out"; continue; fi; \
	  $(BIN)/python -m training.distill --cv-fold $$fold --seed $$seed $(DATA_ARG) --teacher-recipe mixture \
	    --bank-views 32 --mixup 0.4 --temperature 1 --alpha 0 --epochs 30 --out "$$out" || exit 1; \
	done; done
	$(BIN)/python -m training.distill --table $(DISTILL_OUT)/fold*-seed*.json

architectures: setup  ## per architecture: train, convert, int8 size/agreement, latency [DATA=dir]
	$(BIN)/python -m benchmarks.architectures $(DATA_ARG)

bench: setup  ## latency, size, memory of every artifact: make bench [QUICK=1]
	$(BIN)/python -m benchmarks.run --bundle $(BUNDLE) $(if $(QUICK),--quick)
	$(BIN)/python -m benchmarks.ray_batch --bundle $(BUNDLE) $(if $(QUICK),--quick)
	$(BIN)/python -m benchmarks.server --bundle $(BUNDLE) $(if $(QUICK),--quick)

test: setup  ## the fast test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-all: setup  ## every test, including slow and real-data ones
	$(BIN)/python -m pytest -q -m ""

lint: setup  ## ruff
	$(BIN)/ruff check .

clean:  ## remove generated files (keeps .venv)
	rm -rf artifacts .pytest_cache .ruff_cache
	find benchmarks/results -type f ! -name .gitkeep -delete

# --- robustness (issue 8; docs/robustness.md) ---
.PHONY: fuzz arm64-check
FUZZ_CASES ?= 10000
FUZZ_SEED  ?= 0

fuzz: setup  ## fuzz inputs + manifest, >= 10,000 cases: make fuzz [FUZZ_CASES=n] [FUZZ_SEED=n]
	$(BIN)/python -m tools.fuzz --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) \
		--save artifacts/fuzz/found --json artifacts/fuzz/summary.json

arm64-check: setup  ## the runtime on aarch64 (QEMU) gives the x86 answers [BUNDLE=dir]
	bash tools/arm64/setup.sh $(BIN)/python
	$(BIN)/python tools/arm64/check.py $(if $(filter-out artifacts/bundle,$(BUNDLE)),--bundle "$(BUNDLE)")

# --- DICOM node (docs/listen.md) ---
.PHONY: listen-demo listen-bench
LISTEN_PORT ?= 11112

listen-demo: setup  ## a synthetic CT series sent by DCMTK storescu to ct-edge listen; results --series
	@command -v storescu >/dev/null || { echo "needs DCMTK: bash tools/setup_system.sh"; exit 1; }
	$(BIN)/python -m training.synthetic_series --out artifacts/listen-demo/series --slices 60 \
		--apex-extent 0.9 --base-extent 0.9
	rm -rf artifacts/listen-demo/data
	$(BIN)/ct-edge listen --bundle $(BUNDLE) --host 127.0.0.1 --port $(LISTEN_PORT) \
		--data-dir artifacts/listen-demo/data --stable-seconds 3 & pid=$$!; \
	for i in $$(seq 120); do echoscu -aec CTEDGE 127.0.0.1 $(LISTEN_PORT) 2>/dev/null && break; sleep 1; done; \
	storescu -aec CTEDGE -aet DEMO 127.0.0.1 $(LISTEN_PORT) artifacts/listen-demo/series/*.dcm; \
	for i in $$(seq 120); do $(BIN)/ct-edge results --series --json --data-dir artifacts/listen-demo/data \
		| grep -q '"state": "complete"' && break; sleep 1; done; \
	kill $$pid; wait $$pid; \
	$(BIN)/ct-edge results --series --data-dir artifacts/listen-demo/data

listen-bench: setup  ## ct-edge listen vs DCMTK storescp on a 300-slice series [BUNDLE=dir]
	$(BIN)/python -m benchmarks.listen --bundle $(BUNDLE)
