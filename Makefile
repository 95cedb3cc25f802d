# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: serve on 127.0.0.1:5353 (UDP+TCP) with the shipped lists, forwarding to /etc/resolv.conf
run: $(STAMP)
	$(BIN)/sinkhole serve $(ARGS)

## test: the whole suite (real sockets on 127.0.0.1; dig tests need dnsutils)
test: $(STAMP)
	$(BIN)/ruff check sinkhole tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sinkhole tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
