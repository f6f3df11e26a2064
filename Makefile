# The two commands of the README: `make repro` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup repro repair preset params push pull test lint lock tiny-clip ablation mask-study parts-study dvc-deps clean-venv

setup: $(STAMP)

# Re-installs only when the pinned set or the project metadata changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# Stage commands call `python`: put the venv first on PATH. dvc.yaml's source deps and fold
# matrices are derived from the code and params first (a no-op when they are current). One local
# Prefect server serves every stage of the run (its UI address is printed; it stops with the run).
# `make repro CONFIG=configs/pascal-5i.yaml DATASET_ROOT=/data/VOC2012` first writes the preset and
# the dataset's root into params.yaml (so DVC tracks them), validated first -- the root must exist,
# laid out as the preset's dataset -- so a bad preset or root stops here, params.yaml untouched.
repro: setup preset params dvc-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server dvc repro

# A store a stage found damaged (its one line names this command): `make repair STAGE=priors` removes
# the stage's DVC cache objects whose md5 no longer matches (a write into a hardlinked output reaches
# the cache), re-runs the stage (dvc repro -f -s) and relinks its outputs (stages/_repair.py).
repair: setup
	$(if $(STAGE),,$(error make repair needs STAGE=<a dvc.yaml stage>, e.g. STAGE=priors))
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server python -m stages._repair $(STAGE)

# The whole params.yaml validated in about a second, before DVC removes any output or a stage
# starts: unknown or missing sections and keys, types, allowed values, YAML line and column.
params: setup preset
	$(BIN)/python -m pipeline.config.check params.yaml

preset: setup
ifneq ($(CONFIG)$(DATASET_ROOT),)
	$(BIN)/python -m pipeline.config.presets $(CONFIG) $(if $(DATASET_ROOT),--set dataset.root=$(DATASET_ROOT))
endif

# Share every artifact through the DVC remote (`dvc remote add -d NAME URL` first; docs/operations.md).
# The remote is checked first: none set, or a local one whose folder is missing, is one line.
push: setup
	$(BIN)/python -m stages._remote push

pull: setup
	$(BIN)/python -m stages._remote pull

# Rewrite dvc.yaml's source deps (each stage's import closure) and fold matrices (split.num_folds).
dvc-deps: setup preset params
	$(BIN)/python -m stages._deps

# Retrain the shipped tiny CLIP from scratch (~15 min on 2 cores) and rewrite fixtures/tiny-vit;
# fails, keeping the shipped one, unless the zero-shot accuracy is reproduced within 2 points.
tiny-clip: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro prepare
	$(BIN)/python -m stages.clip_model --retrain --write-fixture

# The component ablations (LFSS Table 4 + the PI-CLIP priors), every row over 3 training seeds on
# every fold and test seed, with paired-bootstrap significance: ablations/results.json and the
# report's Ablation table. 84 new units, about 1.7 h on 2 cores; resumable (STUDY_ARGS="--seeds 0"
# for a first pass, "--jobs N" to choose the parallelism).
ablation: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server python -m pipeline.studies ablation $(STUDY_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server dvc repro report

# The mask-quality study: the model trained and tested with ground-truth masks of controlled precision
# and recall against the pseudo-masks: ablations/masks.json and the report's Mask quality table.
mask-study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server python -m pipeline.studies masks $(STUDY_ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server dvc repro report

# Does DPS help when objects have parts? The ablation's DPS contrast (the full model with and
# without DPS, with the pseudo-masks and with ground-truth masks, 3 training seeds) on a benchmark
# whose objects come in two parts (prepare.synthetic.parts), built from HEAD in a worktree of its
# own, $(PARTS_DIR) (its own data: about 10 min; 48 units: about 1 h on 2 cores; resumable, and
# STUDY_ARGS as for ablation): ablations/parts.json and the report's table.
PARTS_DIR := .studies/parts
parts-study: setup
	test -d $(PARTS_DIR) || git worktree add --detach $(PARTS_DIR) HEAD
	git -C $(PARTS_DIR) checkout -q -f --detach $$(git rev-parse HEAD)
	ln -sfn $(CURDIR)/$(VENV) $(PARTS_DIR)/$(VENV)
	sed -i 's/^\(    parts:\) false /\1 true  /' $(PARTS_DIR)/params.yaml
	cd $(PARTS_DIR) && PATH="$(CURDIR)/$(BIN):$$PATH" $(CURDIR)/$(BIN)/python -m stages._prefect_server \
		python -m pipeline.studies parts $(STUDY_ARGS)
	cp $(PARTS_DIR)/ablations/parts.json ablations/parts.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages._prefect_server dvc repro report

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pipeline stages tests benchmarks

# Re-pin after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	( echo "# Pinned, working dependency set (pip freeze of a fresh \`make setup\`). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable ) > requirements.lock

clean-venv:
	rm -rf $(VENV)
