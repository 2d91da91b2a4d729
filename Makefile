# Two commands on a fresh machine:
#   make train   # virtualenv + llmpy, then train a small GPT-2 on the embedded corpus (~5 min, 2 CPU cores)
#   make test    # virtualenv + llmpy[test] (pytest, torch CPU, transformers), then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/llmpy train $(ARGS)

# pytest exits 5 when it collected no test: that is a failure here too.
# --durations: the 15 slowest tests, so a CI log says where its minutes went.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q --durations=15 $(ARGS)

bench: $(VENV)/.installed-test
	$(VENV)/bin/llmpy bench --device cpu --model d12 -B 4 -T 64 --compare torch $(ARGS)

clean:
	rm -rf $(VENV) out data/pydoc
