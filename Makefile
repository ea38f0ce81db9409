# Two commands for a fresh clone:  `make run` (set up + one alignment round)  and  `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: setup run test seeds pretrain pipeline-compile bench clean-round

setup: $(VENV)/.installed

# torch first, alone: this machine's pip finds the local CPU wheel (a newer torch would pull CUDA
# wheels); its file differs per variant, so the locks pin its dependencies but not torch itself.
# Then everything else from the hash-pinned locks (runtime + [cluster,wan] + [test]; scripts/lock.sh
# re-resolves them), then ipa-align itself without dependency resolution.
$(VENV)/.installed: pyproject.toml requirements.lock requirements-test.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps torch==2.13.0
	$(BIN)/pip install -q --require-hashes -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	$(BIN)/ipa hands model fetch
	touch $@

## one alignment round on the embedded toy world: sample -> gate -> train -> evaluate -> register -> promote
run: setup
	$(BIN)/dvc repro
	$(BIN)/ipa show

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

## the README's seeds table: three full rounds (round seeds 0, 1, 2) as DVC experiments
seeds: setup
	$(BIN)/python scripts/seeds_table.py --seeds 0 1 2 --out docs/seeds.md

## redo the frozen pretraining stage (~3 h on 2 CPU cores, estimated; 377 s on an H100)
pretrain: setup
	$(BIN)/dvc unfreeze pretrain && $(BIN)/dvc repro pretrain; $(BIN)/dvc freeze pretrain

pipeline-compile: setup
	$(BIN)/ipa pipeline compile

bench: setup
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/gating.py

## the miniature paper table, docs/results.md: 39 DVC experiments (SFT, IPA global/hand, Diffusion-DPO,
## Diffusion-KTO x beta 200/600/2000 x seeds 0-2 on one gated set; 2 queue workers on 2 CPU cores), then `ipa report`
.PHONY: paper-table paper-table-round2
paper-table: setup
	$(BIN)/python scripts/paper_grid.py run
	$(BIN)/ipa report

## the experiments that separate IPA from SFT (docs/results.md "Experiments"): three DVC experiment grids
## (step budget x gated-set size, a biased gated set, beta saturation x optimizer), then `ipa report`
.PHONY: experiments
experiments: setup
	$(BIN)/python scripts/experiments.py run
	$(BIN)/ipa report

## a second round for IPA hand (beta 600) and SFT: each samples again from its own round-1 adapter
paper-table-round2: setup
	$(BIN)/python scripts/paper_grid.py run --round 2 --methods ipa-hand sft --betas 600
	$(BIN)/ipa report

## the runtime image (components/Dockerfile) with buildah and a local Debian base, no Docker needed:
## docs/containers.md (IMAGE=localhost/ipa-runtime:0.1.0; needs buildah podman runc mmdebstrap)
.PHONY: image
image:
	bash scripts/build_image.sh
