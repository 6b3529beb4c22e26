# gitract: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
# Both set everything up themselves on a fresh clone (a venv in .venv, installed once).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA_DIR   ?= data/synthetic
LABELS_DIR ?= data/synthetic_labels
FOLDS_CSV  ?= folds/folds.csv
DEMO_RUNS  := runs/demo_cpu
DEMO_ARGS  := --config configs/demo_cpu.yaml --data-dir $(DATA_DIR)
SUBMISSION := submissions/submission.csv
RUNS       ?= runs/default
KAGGLE_USER ?= $(KAGGLE_USERNAME)

.PHONY: setup data folds demo demo-ensemble test lint format clean kaggle

# Re-installs only when pyproject.toml changes: a no-op in well under a second otherwise.
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

data: setup
	$(PY) scripts/make_synthetic.py --out $(DATA_DIR) --labels-out $(LABELS_DIR)

folds: setup
	$(PY) scripts/make_folds.py --data-dir $(DATA_DIR) --out $(FOLDS_CSV)

# The whole pipeline on synthetic data, CPU only: ~8 minutes on 2 cores. Scores are printed
# under both metric profiles (kaggle: the documented metric; mlebench: mle-bench's grader).
EVAL_TEST := --labels $(LABELS_DIR)/test_labels.csv --data-dir $(DATA_DIR) --metric all
demo: data folds
	rm -f $(DEMO_RUNS)/postprocess.json $(DEMO_RUNS)/postprocess_mlebench.json
	$(PY) scripts/train.py --fold 0 $(DEMO_ARGS) --folds-csv $(FOLDS_CSV) --fresh
	@echo "== out-of-fold score of fold 0 (its validation cases), untuned post-processing"
	$(PY) scripts/infer.py --oof --fold 0 $(DEMO_ARGS) --folds-csv $(FOLDS_CSV) --no-progress
	$(PY) scripts/evaluate.py --submission $(DEMO_RUNS)/oof.csv --data-dir $(DATA_DIR) --metric all
	@echo "== test set, untuned post-processing -> submissions/submission_untuned.csv"
	$(PY) scripts/infer.py $(DEMO_ARGS) --out submissions/submission_untuned.csv --no-progress
	$(PY) scripts/evaluate.py --submission submissions/submission_untuned.csv $(EVAL_TEST)
	@echo "== tune post-processing on fold 0's OOF: untuned / thresholds_only / full, per profile"
	$(PY) scripts/evaluate.py --tune --runs $(DEMO_RUNS) --data-dir $(DATA_DIR) --metric mlebench \
		--out $(DEMO_RUNS)/postprocess_mlebench.json --no-progress
	$(PY) scripts/evaluate.py --tune --runs $(DEMO_RUNS) --data-dir $(DATA_DIR) --metric kaggle \
		--no-progress
	@echo "== test set, tuned for kaggle ($(DEMO_RUNS)/postprocess.json) -> $(SUBMISSION)"
	$(PY) scripts/infer.py $(DEMO_ARGS) --out $(SUBMISSION) --no-progress
	$(PY) scripts/evaluate.py --submission $(SUBMISSION) $(EVAL_TEST)
	@echo "== test set, tuned for mlebench -> submissions/submission_mlebench.csv"
	$(PY) scripts/infer.py $(DEMO_ARGS) --postprocess $(DEMO_RUNS)/postprocess_mlebench.json \
		--out submissions/submission_mlebench.csv --no-progress
	$(PY) scripts/evaluate.py --submission submissions/submission_mlebench.csv $(EVAL_TEST)
	$(PY) scripts/visualize.py --submission $(SUBMISSION) \
		--labels $(LABELS_DIR)/test_labels.csv --data-dir $(DATA_DIR) --out-dir $(DEMO_RUNS)/fold0
	@echo "== training curves: $(DEMO_RUNS)/fold0/curves.png"

# Blend selection on the demo data (about an hour on 2 cores): four candidate runs trained on
# fold 0 (the demo's 2.5D model, the same with a classification head, the same with the
# z-channel, and a 3D model), each predicted out of fold; evaluate.py --select then picks the
# blend (greedy, with weights) and tunes it on that OOF evidence, per profile, and prints its
# report; last, every member alone and each selected blend predict the test set and are scored
# there. More folds make the per-fold report worth reading: ENSEMBLE_FOLDS="0 1 2 3 4".
ENSEMBLE_FOLDS ?= 0
CANDIDATES := runs/demo_cpu runs/demo_cpu_aux runs/demo_cpu_z runs/demo_cpu_3d
SELECTED   := ensembles/demo_selected
TRAIN_CPU  := --config configs/demo_cpu.yaml --data-dir $(DATA_DIR) --folds-csv $(FOLDS_CSV) \
	--no-progress --fresh

demo-ensemble: data folds
	rm -rf $(addsuffix /oof_probs,$(CANDIDATES))
	@for fold in $(ENSEMBLE_FOLDS); do \
		$(PY) scripts/train.py --fold $$fold $(TRAIN_CPU) || exit 1; \
		$(PY) scripts/train.py --fold $$fold $(TRAIN_CPU) \
			--set name=demo_cpu_aux model.aux_head=true || exit 1; \
		$(PY) scripts/train.py --fold $$fold $(TRAIN_CPU) \
			--set name=demo_cpu_z data.z_channel=true || exit 1; \
		$(PY) scripts/train.py --fold $$fold --config configs/demo_cpu_3d.yaml \
			--data-dir $(DATA_DIR) --folds-csv $(FOLDS_CSV) --no-progress --fresh || exit 1; \
	done
	@for run in $(CANDIDATES); do \
		for fold in $(ENSEMBLE_FOLDS); do \
			$(PY) scripts/infer.py --oof --fold $$fold --runs $$run --folds-csv $(FOLDS_CSV) \
				--data-dir $(DATA_DIR) --no-progress || exit 1; \
		done; \
	done
	@echo "== blend selection on the OOF of folds $(ENSEMBLE_FOLDS), per profile (last line: report)"
	$(PY) scripts/evaluate.py --select --runs $(CANDIDATES) --data-dir $(DATA_DIR) \
		--folds-csv $(FOLDS_CSV) --metric all --out $(SELECTED).yaml --no-progress \
		| tee runs/demo_selection.json
	@echo "== test set: each run alone (tuned on its own OOF) and the selected blends"
	@for run in $(CANDIDATES); do \
		for profile in kaggle mlebench; do \
			$(PY) scripts/evaluate.py --tune --runs $$run --data-dir $(DATA_DIR) \
				--metric $$profile --out $$run/postprocess_$$profile.json --no-progress \
				>/dev/null || exit 1; \
			$(PY) scripts/infer.py --runs $$run --data-dir $(DATA_DIR) --no-progress \
				--postprocess $$run/postprocess_$$profile.json \
				--out submissions/submission_$$(basename $$run)_$$profile.csv >/dev/null || exit 1; \
		done; \
	done
	@for profile in kaggle mlebench; do \
		ensemble=$(SELECTED)$$( [ $$profile = kaggle ] || echo _$$profile ).yaml; \
		$(PY) scripts/infer.py --ensemble $$ensemble --data-dir $(DATA_DIR) --no-progress \
			--out submissions/submission_selected_$$profile.csv >/dev/null || exit 1; \
	done
	$(PY) scripts/compare_submissions.py --labels $(LABELS_DIR)/test_labels.csv \
		--data-dir $(DATA_DIR) --selection runs/demo_selection.json \
		$(foreach run,$(CANDIDATES),$(notdir $(run))=submissions/submission_$(notdir $(run))) \
		selected=submissions/submission_selected

# Offline Kaggle bundle: dist/kaggle-dataset (wheels + trained folds) and dist/kaggle-kernel.
# Third-party wheels are downloaded once into dist/wheel-cache and reused.
kaggle: setup
	$(PY) scripts/build_kaggle.py --runs $(RUNS) --out dist $(if $(KAGGLE_USER),--user $(KAGGLE_USER))

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Deletes only what make itself generated and can regenerate in minutes: the synthetic data set
# of `make data` (only if its marker file says the generator wrote it), the test cache and the
# Kaggle bundle (copies). Never runs/ (trained models: hours of GPU), submissions/, folds/ or
# any other data/ folder (where the Kaggle data is unzipped). Paths are literal, not $(DATA_DIR):
# `make clean DATA_DIR=<the real data>` must not delete it.
clean:
	if [ -f data/synthetic/.gitract_synthetic.json ]; then rm -rf data/synthetic; fi
	rm -f data/synthetic_labels/test_labels.csv
	rmdir data/synthetic_labels 2>/dev/null || true
	rmdir data 2>/dev/null || true
	rm -rf .pytest_cache dist/kaggle-dataset dist/kaggle-kernel
	@echo "kept: runs/, submissions/, folds/ and other data/ folders (delete those by hand)"
