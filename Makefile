# Development tasks. Every pip install goes through constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.torch-sttp-installed

.PHONY: venv test demo bench clean-venv

venv: $(STAMP)

# Re-installs only when the package metadata or the constraints change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -c constraints.txt -e '.[experiments,dev,transformers,gan]'
	touch $@

test: venv
	$(VPY) -m pytest -q tests

demo: venv
	$(VPY) -m torch_sttp.experiments.demo

# The CPU speed benchmarks (each prints TARGET lines). The studies (compress_minilm.py, calibrated_cnn.py,
# adapters.py: needs the [compare] extra) and the GPU check (gpu_check.sh) are run on their own.
BENCHMARKS := benchmarks/frames.py benchmarks/weights.py benchmarks/surgery.py

bench: venv
	@set -e; for f in $(BENCHMARKS); do echo "==> $$f"; $(VPY) "$$f"; done

clean-venv:
	rm -rf $(VENV)
