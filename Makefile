# lungcad: `make demo` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint system-deps clean reference

# torch==2.13.0 is installed first and pinned: on these machines it resolves to a local CPU
# wheel, while a looser requirement would pull several GB of CUDA packages.
# pyradiomics ships only an sdist whose build needs numpy and versioneer already present.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q numpy versioneer
	$(PY) -m pip install -q --no-build-isolation pyradiomics==3.0.1
	$(PY) -m pip install -q -e '.[dev,radiomics]'
	touch $(STAMP)

# Debian packages the PACS, DICOM network, conformance and browser tests use (Orthanc +
# DICOMweb plugin, dcmtk, dicom3tools, Chromium).
# Each installer is idempotent. On a user's machine a failed install warns and the tests that
# need the tool skip, saying why; under CI=true (.ci/run) it fails the build, as those tests
# would (tests/system_tools.py). Add an installer as one more `$(call system_dep,...)` line
# (COMMAND, then what is lost without it; no commas in either).
ORTHANC_INSTALL ?= scripts/orthanc.sh install
BROWSER_INSTALL ?= scripts/install_browser.sh
DCMTK_INSTALL ?= scripts/dcmtk.sh
DICOM3TOOLS_INSTALL ?= scripts/dicom3tools.sh
IS_CI := $(filter 1 true yes,$(shell echo '$(CI)' | tr 'A-Z' 'a-z'))
system_dep = $(1) || { echo "$(2) ($(if $(IS_CI),CI=true: the build fails,they will be skipped))" >&2; $(if $(IS_CI),exit 1,true); }

system-deps:
	@$(call system_dep,$(ORTHANC_INSTALL),Orthanc unavailable: the PACS tests need it)
	@$(call system_dep,$(BROWSER_INSTALL),Chromium unavailable: the browser tests need it)
	@$(call system_dep,$(DCMTK_INSTALL),dcmtk unavailable: the lungcad listen tests need it)
	@$(call system_dep,$(DICOM3TOOLS_INSTALL),dicom3tools unavailable: the DICOM conformance tests need dciodvfy)

demo: $(STAMP)
	$(VENV)/bin/lungcad demo --out demo_output

test: lint system-deps
	$(VENV)/bin/pytest -q

test-slow: $(STAMP) system-deps
	$(VENV)/bin/pytest -q -m slow

# Style, spelling and types: the same checks as .pre-commit-config.yaml.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check -q src tests benchmarks scripts
	$(VENV)/bin/codespell src tests benchmarks docs README.md CONTRIBUTING.md CHANGELOG.md configs scripts
	$(VENV)/bin/mypy

# The reference models, end to end on 2 CPU cores: DATA holds iqothnccd/ and msd_lung_patches/
# (as ../shared/data does). OUT/seg is stage 1: grouped 5-fold CV on the MSD patches, whose
# five fold models form the segmentation ensemble (every patient in training once);
# OUT/seg_init the stage-1 run the classifier starts from (configs/seg_cpu_small.yaml); OUT/cls
# the two-stage fold ensemble (grouped 5-fold CV on IQ-OTH/NCCD, each fold started from
# OUT/seg_init); OUT/results.md both out-of-fold tables (stage 1; stage 2 beside the
# baselines and the shortcut audit).
reference: $(STAMP)
	@test -n "$(DATA)" -a -n "$(OUT)" || { echo "usage: make reference DATA=DIR OUT=DIR" >&2; exit 2; }
	$(VENV)/bin/lungcad prepare --data "$(DATA)/msd_lung_patches" --pixel-spacing 2 \
		--out "$(OUT)/prepared/msd"
	$(VENV)/bin/lungcad prepare --data "$(DATA)/iqothnccd" --positive "Malignant cases" \
		--negative "Normal cases,Bengin cases" --out "$(OUT)/prepared/iqothnccd"
	$(VENV)/bin/lungcad validate --train "$(OUT)/prepared/msd" --folds 5 \
		--config configs/seg_cpu_cv.yaml --out "$(OUT)/seg"
	$(VENV)/bin/lungcad train seg --config configs/seg_cpu_small.yaml \
		--manifest "$(OUT)/prepared/msd" --out "$(OUT)/seg_init" --set train.progress=false
	$(VENV)/bin/lungcad validate --train "$(OUT)/prepared/iqothnccd" --folds 5 \
		--config configs/cls_cpu_cv.yaml --set train.init_from="$(OUT)/seg_init" \
		--out "$(OUT)/cls"
	cat "$(OUT)/seg/results.md" "$(OUT)/cls/results.md" > "$(OUT)/results.md"

clean:
	rm -rf $(VENV) demo_output .pytest_cache .ruff_cache
