# The two commands of the README. Each creates .venv when missing and installs
# everything the project needs, so they work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hashray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf build .pytest_cache
