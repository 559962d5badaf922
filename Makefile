# Two entry points (see README): `make demo` runs the main job, `make test` runs the checks.
# Both create .venv from a bare Python and install everything they need into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: install demo test test-fast lint typecheck unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The lesson's scenario (p=4, m=8): every schedule compared, pictures of each, then a real
# 4-rank pipeline-parallel training run on local processes (gloo, CPU), then a fine-tune of
# the bundled Hugging Face model on the bundled text (eval perplexity, exported folder).
demo: install
	$(BIN)/stagewise compare -p 4 -m 8 -v 2
	for s in gpipe 1f1b interleaved-1f1b; do \
	  $(BIN)/stagewise simulate -s $$s -p 4 -m 8 --plot $(OUT)/$$s.png \
	    --memory-plot $(OUT)/$$s-memory.png --trace $(OUT)/$$s-trace.json || exit 1; \
	done
	$(BIN)/stagewise train --out $(OUT)/train
	$(BIN)/stagewise train --model examples/finetune/model \
	  --data examples/finetune/data/train.txt --eval-data examples/finetune/data/eval.txt \
	  --eval-every 10 -p 2 -m 4 --global-batch 8 --seq-len 64 --steps 30 \
	  --data-cache $(OUT)/data-cache --export-hf $(OUT)/finetuned --out $(OUT)/finetune

lint: install
	$(BIN)/ruff check src tests benchmarks examples

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: lint typecheck unit

# The pure-Python tier (schedules, simulator, search, planner, run files): no torch, under 60 s.
test-fast: install
	$(BIN)/pytest -m "not torch and not slow"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache
