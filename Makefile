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

# The winners' ensemble on the demo data (~10 minutes on 2 cores): a 2.5D model with its
# classification head and a 3D model trained on fold 0, each scored alone (OOF tuned, test),
# then their blend (0.8 x 2.5D + 0.2 x 3D: the CPU demo's 3D model is the weaker one) tuned
# and scored the same way.
AUX_RUNS   := runs/demo_cpu_aux
RUNS_3D    := runs/demo_cpu_3d
BLEND_DIR  := runs/blend_demo
BLEND_ARGS := --runs $(AUX_RUNS) $(RUNS_3D) --weights 0.8 0.2 --blend-dir $(BLEND_DIR)
OOF_ARGS   := --oof --fold 0 --folds-csv $(FOLDS_CSV) --data-dir $(DATA_DIR) --no-progress
TUNE_ARGS  := --tune --data-dir $(DATA_DIR) --metric kaggle --no-progress

demo-ensemble: data folds
	rm -f $(AUX_RUNS)/postprocess.json $(RUNS_3D)/postprocess.json $(BLEND_DIR)/postprocess.json
	$(PY) scripts/train.py --fold 0 --config configs/demo_cpu.yaml --data-dir $(DATA_DIR) \
		--folds-csv $(FOLDS_CSV) --no-progress --fresh --set name=demo_cpu_aux model.aux_head=true
	$(PY) scripts/train.py --fold 0 --config configs/demo_cpu_3d.yaml --data-dir $(DATA_DIR) \
		--folds-csv $(FOLDS_CSV) --no-progress --fresh
	@for run in $(AUX_RUNS) $(RUNS_3D); do \
		echo "== $$run alone: OOF of fold 0, tuned (untuned / thresholds_only / full)"; \
		$(PY) scripts/infer.py $(OOF_ARGS) --runs $$run || exit 1; \
		$(PY) scripts/evaluate.py $(TUNE_ARGS) --runs $$run || exit 1; \
		echo "== $$run alone: test set, tuned"; \
		$(PY) scripts/infer.py --runs $$run --data-dir $(DATA_DIR) --no-progress \
			--out submissions/submission_$$(basename $$run).csv || exit 1; \
		$(PY) scripts/evaluate.py --submission submissions/submission_$$(basename $$run).csv \
			$(EVAL_TEST) || exit 1; \
	done
	@echo "== the blend: OOF of fold 0, tuned (untuned / thresholds_only / full)"
	$(PY) scripts/infer.py $(OOF_ARGS) $(BLEND_ARGS)
	$(PY) scripts/evaluate.py $(TUNE_ARGS) --runs $(BLEND_DIR)
	@echo "== the blend: test set, tuned -> submissions/submission_blend.csv"
	$(PY) scripts/infer.py $(BLEND_ARGS) --data-dir $(DATA_DIR) --no-progress \
		--out submissions/submission_blend.csv
	$(PY) scripts/evaluate.py --submission submissions/submission_blend.csv $(EVAL_TEST)

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
