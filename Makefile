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

bench: venv
	@set -e; for f in benchmarks/*.py; do \
		[ -f "$$f" ] || continue; \
		echo "==> $$f"; \
		$(VPY) "$$f"; \
	done

clean-venv:
	rm -rf $(VENV)
