# Two commands for a new user: `make demo` and `make test` (both set up the environment first).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
DEMO := demo

.PHONY: setup demo test clean serve serve-nifti

setup: $(STAMP)

# Re-runs only when the pins or the project metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps monailabel==0.8.5
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	# a lesion case in the appearance the shipped weights were trained on (2D sagittal, paper contrasts)
	$(PY) -m imsct.phantoms --out $(DEMO)/data --cases 1 --seed 42 --quiet --healthy-fraction 0 \
		--random-intensity-fraction 0 --acquisition sagittal --storage int16
	cd bundle && ../$(PY) -m monai.bundle run --config_file configs/inference.json \
		--meta_file configs/metadata.json --logging_file configs/logging.conf \
		--dataset_dir ../$(DEMO)/data --output_dir ../$(DEMO)/output

# MONAI Label server at http://127.0.0.1:$(PORT)/ for OHIF (http://127.0.0.1:$(PORT)/ohif/) and 3D Slicer:
# starts a local Orthanc (loopback, port ORTHANC_PORT or a free one, storage in $(DEMO)/orthanc/db; Debian
# packages orthanc orthanc-dicomweb), stores 3 phantom cases in it as DICOM and serves the app on its
# DICOMweb. Ctrl-C stops both.
PORT ?= 8000
ORTHANC_PORT ?=
serve: setup
	$(PY) apps/imsct_label/serve.py --orthanc $(DEMO)/orthanc --demo-cases 3 --port $(PORT) \
		$(if $(ORTHANC_PORT),--orthanc-port $(ORTHANC_PORT))

# the same app on a NIfTI folder ($(DEMO)/label_studies: <id>.nii.gz T2w + T1w/<id>.nii.gz), no Orthanc:
# for 3D Slicer (server http://127.0.0.1:$(PORT)/); OHIF needs DICOMweb, i.e. `make serve`
serve-nifti: setup
	$(PY) apps/imsct_label/serve.py --studies $(DEMO)/label_studies --demo-cases 3 --port $(PORT)

# one pytest-xdist worker per core, at most 4 (each worker loads the networks and may start servers);
# whole files go to one worker, so a module's server or trained checkpoint is made once
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=25 tests

clean:
	rm -rf $(DEMO) .pytest_cache
