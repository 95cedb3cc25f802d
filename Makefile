# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test systemd-test lint bench bench-deps bench-log bench-console profile soak clean install install-venv install-files

$(STAMP): pyproject.toml setup.py sinkhole/dns/_fast.pyx
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

## systemd-test: as root, a Debian 12 container booted by systemd-nspawn: make install, then the units under a
## real systemd (tests/service/test_systemd_container.py); the image is cached in /var/cache/sinkhole-systemd-test
systemd-test: $(STAMP)
	$(BIN)/python -m pytest -q -s -m container -o timeout=900 tests/service/test_systemd_container.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sinkhole tests

BENCH_DEPS := dnsperf unbound dnsmasq-base
bench-deps:
	@command -v dnsperf >/dev/null && command -v unbound >/dev/null && command -v dnsmasq >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_DEPS); }

## bench: sinkhole side by side with dnsmasq and Unbound, loopback only (BENCH_ARGS=--quick for a short run)
bench: $(STAMP) bench-deps
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

## soak: mixed load with faults injected (SOAK_ARGS='--seconds 120 --qps 4000')
soak: $(STAMP) bench-deps
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

## bench-log: `log`/`stats` on a 10M-row audit log in /tmp (builds it once, ~2 min; BENCH_LOG_ARGS=--reuse)
bench-log: $(STAMP)
	$(BIN)/python bench/logquery.py $(BENCH_LOG_ARGS)

## bench-console: web console pages and API calls on the 10M-row log of bench-log (run that first)
bench-console: $(STAMP)
	$(BIN)/python bench/console.py $(BENCH_CONSOLE_ARGS)

## profile: where one worker's time goes under dnsperf load, sampled by py-spy (PROFILE_ARGS='--load hot')
profile: $(STAMP) bench-deps
	$(BIN)/python -m pip install --quiet py-spy
	$(BIN)/python bench/profile.py $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------- install
# `sudo make install` on a Debian host: a venv in $(PREFIX), `sinkhole` in $(BINDIR), the unit
# files, the `sinkhole` system user, an example /etc/default/sinkhole and /etc/sinkhole/sinkhole.toml
# (both kept if present).
# DESTDIR=/some/dir stages everything under that directory instead (no user, no systemctl).
# Then: sudo systemctl enable --now sinkhole.socket sinkhole.service
PREFIX ?= /opt/sinkhole
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
SYSCONFDIR ?= /etc
# the service's Python: not under /home or /root, which ProtectHome=yes hides from the service
INSTALL_PYTHON ?= /usr/bin/python3

install: install-venv install-files

install-venv:
	@case "$$($(INSTALL_PYTHON) -c 'import sys; print(sys.base_prefix)')" in \
	  /home/*|/root/*) echo "make install: $(INSTALL_PYTHON) lives under /home or /root, hidden from the" \
	    "service by ProtectHome=yes; use INSTALL_PYTHON=/usr/bin/python3" >&2; exit 2;; esac
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --upgrade .
	@# a staged venv must run from $(PREFIX): drop DESTDIR from its #! lines and byte code
	if [ -n "$(DESTDIR)" ]; then \
	  grep -lIr -- '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg \
	    | xargs -r sed -i 's#$(DESTDIR)$(PREFIX)#$(PREFIX)#g'; \
	  $(DESTDIR)$(PREFIX)/bin/python -m compileall -q -f -s $(DESTDIR) -p / $(DESTDIR)$(PREFIX)/lib; \
	fi

install-files:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(SYSCONFDIR)/sinkhole
	@# every setting commented out at its default; an edited file is kept
	test -e $(DESTDIR)$(SYSCONFDIR)/sinkhole/sinkhole.toml || \
	  install -m 0644 etc/sinkhole.toml $(DESTDIR)$(SYSCONFDIR)/sinkhole/sinkhole.toml
	ln -sfn $(PREFIX)/bin/sinkhole $(DESTDIR)$(BINDIR)/sinkhole
	sed 's#^\(Exec[A-Za-z]*\)=/usr/local/bin/sinkhole #\1=$(BINDIR)/sinkhole #' systemd/sinkhole.service \
	  > $(DESTDIR)$(UNITDIR)/sinkhole.service
	install -m 0644 systemd/sinkhole.socket $(DESTDIR)$(UNITDIR)/sinkhole.socket
	install -m 0644 systemd/sinkhole-blockpage.socket $(DESTDIR)$(UNITDIR)/sinkhole-blockpage.socket
	chmod 0644 $(DESTDIR)$(UNITDIR)/sinkhole.service
	test -e $(DESTDIR)$(SYSCONFDIR)/default/sinkhole || printf '%s\n' \
	  '# Settings for sinkhole.service, as environment variables: SINKHOLE_<KEY>=value, lists' \
	  '# comma-separated (keys: `sinkhole serve --help`, README.md "Settings"). The addresses to' \
	  '# listen on are in sinkhole.socket: `systemctl edit sinkhole.socket`.' \
	  '# The resolvers to forward to (default: the nameservers in /etc/resolv.conf):' \
	  '#SINKHOLE_UPSTREAM=10.0.0.53,10.0.1.53' \
	  '#SINKHOLE_MODE=sinkhole' \
	  '#SINKHOLE_LOG_QUERIES=blocked' \
	  > $(DESTDIR)$(SYSCONFDIR)/default/sinkhole
	@if [ -n "$(DESTDIR)" ]; then \
	  echo "DESTDIR set: not creating the sinkhole user, not calling systemctl"; \
	else \
	  getent passwd sinkhole >/dev/null || useradd --system --user-group --home-dir /var/lib/sinkhole \
	    --no-create-home --shell /usr/sbin/nologin --comment "sinkhole DNS resolver" sinkhole; \
	  install -d -o sinkhole -g sinkhole -m 0750 /var/lib/sinkhole; \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	  else echo "systemd is not running: not calling systemctl"; fi; \
	  echo "next: sudo systemctl enable --now sinkhole.socket sinkhole.service"; \
	fi
