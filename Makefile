# The two commands: `make demo` and `make test`. Both create .venv from pyproject.toml when it
# is missing or older than pyproject.toml. `make docs` builds the documentation site.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-from-pyproject

# MLX's Linux CPU wheel bundles the slow reference BLAS; preload the system's OpenBLAS when
# there is one (apt-get install libopenblas0-pthread). MLXTERP_NO_OPENBLAS=1 turns this off.
OPENBLAS := $(firstword $(wildcard \
	/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
	/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0))
ifneq ($(filter-out 0 false no,$(MLXTERP_NO_OPENBLAS)),)
OPENBLAS :=
endif
WITH_OPENBLAS := $(if $(OPENBLAS),LD_PRELOAD="$(OPENBLAS)",)

.PHONY: demo test docs

demo: $(STAMP)
	$(VENV)/bin/mlxterp run examples/tour.mlxq
	$(VENV)/bin/mlxterp status
	@echo "The daemon keeps the demo model loaded for the next run; \`$(VENV)/bin/mlxterp stop\` stops it."

test: $(STAMP)
	$(WITH_OPENBLAS) $(VENV)/bin/python -m pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[cpu,viz,docs,dev,train]"
	touch $(STAMP)
