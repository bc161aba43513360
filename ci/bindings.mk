# ctypes bindings for the system libbpf; included from the top-level Makefile.
# Regenerates loader/tuplet/bpf/_libbpf.py (tests/test_bindings.py checks for drift).
VENV_PY ?= .venv/bin/python

.PHONY: bindings
bindings:
	$(VENV_PY) ci/gen_bindings.py
