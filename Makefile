# The two commands of the README. Each creates .venv when missing and installs
# everything the project needs, so they work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hashray demo

test: lint browser
	$(BIN)/python -m pytest -q

# The formatter and the linter (ruff, configured in pyproject.toml): a change
# that is not formatted, or that leaves an unused import, fails the tests.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The web page's test drives Debian's chromium headless; install it when missing.
# A failed install only warns: that one test then reports chromium as missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium for the browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium \
	  || echo "warning: could not install chromium; the browser test will report it"; }

clean:
	rm -rf build .pytest_cache
