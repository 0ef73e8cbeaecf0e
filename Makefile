# The two commands: `make demo` and `make test`. Both set up everything they need on a fresh
# Debian machine (run as root): the virtualenv in .venv, the package with its test extras, and
# the Debian packages the tests and the demo use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBS := iproute2 iperf3 curl tcpdump iputils-ping procps kmod postgresql prometheus ethtool
# Debian's postgresql would create and start a "main" cluster listening on TCP port 5432; the
# tests start a throwaway server of their own on a Unix socket, so none is made. prometheus is
# there for promtool (the tests lint /metrics with it); its server, which Debian would start on
# port 9090, is stopped and disabled again.
PG_CREATECLUSTER := /etc/postgresql-common/createcluster.conf
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# What pip needs to build the C fast path (cellvpn/native, by hatch_build.py); without them the
# install still works and cellvpn runs its Python loops. Installed before the virtualenv is.
CC_DEBS := gcc libc6-dev python3-dev
NATIVE := hatch_build.py cellvpn/native/_fastpath.c cellvpn/native/frames.h
SANITIZE := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

.PHONY: test demo venv debs cc lint typecheck bench clean flood fuzz fuzz-native

venv: $(STAMP)

$(STAMP): pyproject.toml $(NATIVE) | cc
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,postgres]'
	@# twistd finds the plugin through dropin.cache; write it now, as its owner.
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $(STAMP)

cc:
	@missing=""; for p in $(CC_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages for the C fast path:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    case " $$missing " in *" postgresql "*) \
	        mkdir -p $(dir $(PG_CREATECLUSTER)) && \
	        grep -qsx 'create_main_cluster = false' $(PG_CREATECLUSTER) || \
	        echo 'create_main_cluster = false' >> $(PG_CREATECLUSTER);; \
	    esac; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $$missing; \
	    case " $$missing " in *" prometheus "*) \
	        if [ -d /run/systemd/system ]; then systemctl disable --now prometheus.service || true; fi;; \
	    esac; \
	fi

test: venv debs
	$(VENV)/bin/ruff check cellvpn tests twisted bench
	$(VENV)/bin/ruff format --check cellvpn tests twisted bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv debs
	$(PY) -m cellvpn.demo

lint: venv
	$(VENV)/bin/ruff check cellvpn tests twisted bench
	$(VENV)/bin/ruff format --check cellvpn tests twisted bench

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) dist build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -f cellvpn/native/*.so
	find . -name dropin.cache -delete

flood: venv debs
	CELLVPN_REQUIRE_NETNS=1 CELLVPN_FLOOD_SECONDS=$${CELLVPN_FLOOD_SECONDS:-300} $(VENV)/bin/pytest -q tests/integration/test_flood_netns.py -s

# The long fuzz run: a million inputs per target unless CELLVPN_FUZZ_EXAMPLES says otherwise,
# on the fuzz engine (tests/fuzz/engine.py: the suite's strategies and oracles, mutation and
# coverage instead of a hypothesis draw per input), at the lowest priority, targets one after
# another; each target's tally as it ends, all of them in CELLVPN_FUZZ_TALLY as it goes.
fuzz: venv
	nice -n 19 $(PY) -m tests.fuzz.engine --inputs $${CELLVPN_FUZZ_EXAMPLES:-1000000} \
	    --tally $${CELLVPN_FUZZ_TALLY:-/tmp/cellvpn-fuzz-tally.json}

# The C fast path under AddressSanitizer and UndefinedBehaviorSanitizer: its loops alone
# (cellvpn/native/fuzz_frames.c), then the module built with both, loaded into Python and fed
# beside the Python loops (tests/native/sanitized.py); four million inputs each (a quarter of
# them for the pump, half for the scan) unless CELLVPN_FUZZ_EXAMPLES says otherwise.
fuzz-native: venv cc
	mkdir -p build/sanitized
	gcc $(SANITIZE) -Wall -Wextra cellvpn/native/fuzz_frames.c -o build/fuzz_frames
	build/fuzz_frames $${CELLVPN_FUZZ_EXAMPLES:-4000000}
	gcc $(SANITIZE) -fPIC -shared -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	    cellvpn/native/_fastpath.c -o build/sanitized/_fastpath.so
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	    ASAN_OPTIONS=detect_leaks=0 $(PY) -m tests.native.sanitized build/sanitized/_fastpath.so \
	    --inputs $${CELLVPN_FUZZ_EXAMPLES:-4000000}
