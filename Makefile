# Builds and installs baton where a Linux operator looks for it.
#
#   make                         release build of baton, baton-proxy and baton-stats
#   sudo make install            into /usr/local (PREFIX), /etc/baton and /var/log/baton
#   make install DESTDIR=/tmp/stage PREFIX=/usr      staged, as packagers do
#   sudo make uninstall          the installed files, but not /etc/baton/baton.toml or logs
#   make deb                     a Debian package (cargo-deb), in target/debian/
#
# `make install` does not build: run `make` first as yourself, then install as root (which
# may have no Rust toolchain).

PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
DATADIR     ?= $(PREFIX)/share
MANDIR      ?= $(DATADIR)/man
DOCDIR      ?= $(DATADIR)/doc/baton
# systemd reads units from /usr/local/lib/systemd/system as well as /usr/lib/systemd/system.
UNITDIR     ?= $(PREFIX)/lib/systemd/system
# The config stays in /etc whatever the prefix: the units and runit scripts name that file.
SYSCONFDIR  ?= /etc
LOGDIR      ?= /var/log/baton
# Where bash-completion, zsh and fish look (zsh and fish also under /usr/local/share).
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR  ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d

CARGO       ?= cargo
PROFILE     ?= release
PROFILE_DIR := $(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
TARGET_DIR  ?= target
BUILT       := $(TARGET_DIR)/$(PROFILE_DIR)
# Man pages and completions, made from the command-line definitions (packaging/).
ASSETS      ?= packaging/out/assets
# The units and runit scripts for the Debian package (below); its assets name these folders.
STAGED      := packaging/out/staged

BINS := baton baton-proxy baton-stats

.PHONY: all build assets staged install uninstall deb clean-assets

all: build assets

build:
	$(CARGO) build --locked --profile $(PROFILE) -p baton -p baton-proxy -p shm-stats --bins

# The generator is small and runs once: the dev profile, not the release one's long LTO.
assets:
	$(CARGO) run --locked -q -p baton-packaging -- $(ASSETS)

# The units and runit scripts name /usr/local/bin and /etc/baton: installed, they name BINDIR
# and SYSCONFDIR. The package's sample config runs the generations as the user `baton`, which
# its postinst creates.
SUBST = sed 's|/usr/local/bin|$(BINDIR)|g; s|/etc/baton/|$(SYSCONFDIR)/baton/|g'

# The same, under packaging/out/ for the Debian package's assets.
staged:
	mkdir -p $(STAGED)/runit
	for f in baton.service baton-notify-reload.service baton.socket; do $(SUBST) systemd/$$f > $(STAGED)/$$f; done
	for f in run finish; do $(SUBST) systemd/runit/$$f > $(STAGED)/runit/$$f; done
	sed 's|^# \[supervisor\]$$|[supervisor]|; s|^# user = "baton"$$|user = "baton"|' packaging/baton.toml > $(STAGED)/baton.toml

install:
	@for b in $(BINS); do \
		test -x $(BUILT)/$$b || { echo "make install: $(BUILT)/$$b is not built; run make (or make build) first" >&2; exit 1; }; \
	done
	@test -f $(ASSETS)/man/man1/baton.1 || { echo "make install: no man pages in $(ASSETS); run make (or make assets) first" >&2; exit 1; }
	install -d $(DESTDIR)$(BINDIR)
	for b in $(BINS); do install -m 0755 $(BUILT)/$$b $(DESTDIR)$(BINDIR)/$$b; done
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(ASSETS)/man/man1/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	for b in $(BINS); do \
		install -m 0644 $(ASSETS)/completions/bash/$$b $(DESTDIR)$(BASHCOMPDIR)/$$b; \
		install -m 0644 $(ASSETS)/completions/zsh/_$$b $(DESTDIR)$(ZSHCOMPDIR)/_$$b; \
		install -m 0644 $(ASSETS)/completions/fish/$$b.fish $(DESTDIR)$(FISHCOMPDIR)/$$b.fish; \
	done
	install -d $(DESTDIR)$(UNITDIR)
	for f in baton.service baton-notify-reload.service baton.socket; do \
		$(SUBST) systemd/$$f > $(DESTDIR)$(UNITDIR)/$$f && chmod 0644 $(DESTDIR)$(UNITDIR)/$$f; \
	done
	install -d $(DESTDIR)$(DOCDIR)/examples/runit
	for f in run finish; do \
		$(SUBST) systemd/runit/$$f > $(DESTDIR)$(DOCDIR)/examples/runit/$$f && chmod 0755 $(DESTDIR)$(DOCDIR)/examples/runit/$$f; \
	done
	install -m 0644 packaging/baton.toml examples/*.toml $(DESTDIR)$(DOCDIR)/examples/
	install -m 0755 examples/make-cert.sh $(DESTDIR)$(DOCDIR)/examples/
	install -d $(DESTDIR)$(DOCDIR)/examples/logrotate.d
	install -m 0644 examples/logrotate.d/baton $(DESTDIR)$(DOCDIR)/examples/logrotate.d/
	install -m 0644 README.md CHANGELOG.md LICENSE docs/coming-from.md $(DESTDIR)$(DOCDIR)/
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/baton
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/baton/baton.toml ]; then \
		echo "make install: $(DESTDIR)$(SYSCONFDIR)/baton/baton.toml exists: kept (the sample is $(DOCDIR)/examples/baton.toml)"; \
	else \
		echo install -m 0644 packaging/baton.toml $(DESTDIR)$(SYSCONFDIR)/baton/baton.toml; \
		install -m 0644 packaging/baton.toml $(DESTDIR)$(SYSCONFDIR)/baton/baton.toml; \
	fi
	install -d -m 0750 $(DESTDIR)$(LOGDIR)

uninstall:
	for b in $(BINS); do rm -f $(DESTDIR)$(BINDIR)/$$b \
		$(DESTDIR)$(BASHCOMPDIR)/$$b $(DESTDIR)$(ZSHCOMPDIR)/_$$b $(DESTDIR)$(FISHCOMPDIR)/$$b.fish; done
	rm -f $(DESTDIR)$(MANDIR)/man1/baton.1 $(DESTDIR)$(MANDIR)/man1/baton-*.1
	rm -f $(DESTDIR)$(UNITDIR)/baton.service $(DESTDIR)$(UNITDIR)/baton-notify-reload.service $(DESTDIR)$(UNITDIR)/baton.socket
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "make uninstall: kept $(DESTDIR)$(SYSCONFDIR)/baton/baton.toml and $(DESTDIR)$(LOGDIR)"

# The Debian package (see [package.metadata.deb] in supervisor/Cargo.toml), from the binaries
# of PROFILE: `make deb PROFILE=dev` makes a quick one from the debug build, for tests.
deb:
	@$(CARGO) deb --version >/dev/null 2>&1 || { echo "make deb: cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }
	$(MAKE) build assets staged BINDIR=/usr/bin SYSCONFDIR=/etc
	mkdir -p $(STAGED)/deb-units
	cp $(STAGED)/baton.service $(STAGED)/deb-units/
	$(CARGO) deb --locked --no-build -p baton --profile $(PROFILE) $(DEB_FLAGS)

clean-assets:
	rm -rf $(ASSETS) $(STAGED)
