# Two commands do everything: `make demo` and `make test`. Each one creates .venv
# if it is missing and installs the pinned torch pair first (a bare `torch` would
# pull a multi-GB build), then the project with its extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.offramp-installed

ifeq ($(shell uname -m),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup demo test test-all bench-exits proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $@

# promtool lints the daemons' metrics pages in the suite. Debian's prometheus package holds it: where apt-get
# can fetch that package, its one binary is unpacked into the venv (nothing is installed on the system);
# elsewhere the promtool test skips and says why.
PROMTOOL := $(BIN)/promtool

$(PROMTOOL): | $(STAMP)
	-@tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q prometheus >/dev/null 2>&1 \
	  && dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$(PROMTOOL)) \
	  || echo "promtool not fetched (no apt-get or no Debian archive): its test will skip"; rm -rf $$tmp

demo: setup
	$(BIN)/offramp demo

# Two workers, a test file each at a time (module fixtures, such as a shared cloud, stay in one process):
# the suite waits on sockets, links and daemons as much as it computes.
# `make test` leaves out the tests marked long (a Ray cluster, a whole benchmark: half a minute or more each);
# `make test-all`, which CI runs, includes them.
test: setup $(PROMTOOL)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not long"

test-all: setup $(PROMTOOL)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench-exits: setup
	$(BIN)/python -m bench.exits --quick

proto: setup
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
