# `make test` and `make demo` create the virtual environment on first use.
PY := .venv/bin/python

.venv/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

venv: .venv/.installed

test: .venv/.installed
	$(PY) -m pytest -q tests

demo: .venv/.installed
	@echo "make demo arrives with pretrain.py (issue 5); until then: make test"

.PHONY: venv test demo
