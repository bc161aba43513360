# tuplet: eBPF conntrack datapath + Python agent.
#   make demo     set up everything, run the demo topology
#   make test     set up everything, run the whole test suite
#   make          build the BPF objects          (V=1 shows commands)

.DELETE_ON_ERROR:
.DEFAULT_GOAL := build

CLANG     ?= clang
HOSTCC    ?= gcc
BPFTOOL   ?= bpftool
PYTHON    ?= /usr/bin/python3
VENV      ?= .venv
VENV_PY   := $(VENV)/bin/python
BUILD     := build
ARCH      := $(shell uname -m | sed 's/x86_64/x86/;s/aarch64/arm64/')
BPF_CFLAGS ?= -O2 -g -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
              -I vmlinux -I bpf -I /usr/include/$(shell uname -m)-linux-gnu

BPF_PROGS := $(patsubst bpf/%.c,$(BUILD)/%.o,$(wildcard bpf/*.c))
BENCH_PROGS := $(patsubst bench/%.bpf.c,$(BUILD)/%.o,$(wildcard bench/*.bpf.c))
BPF_HDRS  := $(wildcard bpf/lib/*.h)
APT_PKGS  := clang llvm libbpf-dev bpftool iproute2 iptables iputils-ping python3-venv make gcc nftables \
             libbpf1 linux-libc-dev

ifeq ($(V),1)
Q :=
msg :=
else
Q := @
msg = @printf '  %-8s %s\n' "$(1)" "$(2)";
endif

.PHONY: build deps venv test demo bindings clean vmlinux bench install uninstall bench-services bench-resize
build: $(BPF_PROGS) $(BENCH_PROGS)

# System packages (Debian 12). Skipped when every tool is already there.
deps: $(BUILD)/.deps
$(BUILD)/.deps:
	$(call msg,APT,$(APT_PKGS))
	$(Q)if ! command -v $(CLANG) >/dev/null || ! command -v $(BPFTOOL) >/dev/null \
	     || [ ! -f /usr/include/bpf/libbpf.h ] || ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null \
	     || ! command -v iptables >/dev/null || ! command -v ping >/dev/null \
	     || ! command -v $(HOSTCC) >/dev/null || ! command -v nft >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi
	$(Q)mkdir -p $(BUILD) && touch $@

# Python virtual environment with pinned dependencies.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml | $(BUILD)/.deps
	$(call msg,VENV,$(VENV))
	$(Q)[ -x $(VENV_PY) ] || $(PYTHON) -m venv $(VENV)
	$(Q)$(VENV_PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(Q)$(VENV_PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(Q)touch $@

vmlinux: vmlinux/vmlinux.h
vmlinux/vmlinux.h: | $(BUILD)/.deps
	$(call msg,BTF,$@)
	$(Q)mkdir -p $(@D) && $(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@

$(BUILD)/%.o: bpf/%.c $(BPF_HDRS) vmlinux/vmlinux.h | $(BUILD)/.deps
	$(call msg,CLANG,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(BUILD)/%.o: bench/%.bpf.c $(BPF_HDRS) vmlinux/vmlinux.h | $(BUILD)/.deps
	$(call msg,CLANG,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

-include ci/bindings.mk
bindings: venv

test: build venv $(BUILD)/loadgen
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

demo: build venv
	$(VENV)/bin/tuplet-demo

bench: build venv
	$(VENV_PY) bench/datapath.py

$(BUILD)/loadgen: bench/loadgen.c | $(BUILD)/.deps
	$(call msg,CC,$@)
	$(Q)$(HOSTCC) -O2 -Wall -Werror -o $@ $<

bench-services: build venv $(BUILD)/loadgen
	$(VENV_PY) bench/services.py $(BENCH_ARGS)

bench-resize: build venv
	$(VENV_PY) bench/resize.py $(BENCH_ARGS)

# The agent as a systemd service: a venv with tuplet in $(LIBDIR), the objects beside it,
# `tuplet` in $(PREFIX)/bin, the unit, and /etc/tuplet/tuplet.toml when there is none.
PREFIX      ?= /usr/local
LIBDIR      := $(PREFIX)/lib/tuplet
SYSTEMD_DIR ?= /etc/systemd/system
ETC_DIR     ?= /etc/tuplet
install: build | $(BUILD)/.deps
	$(call msg,INSTALL,$(LIBDIR) $(PREFIX)/bin/tuplet $(SYSTEMD_DIR)/tuplet.service)
	$(Q)install -d $(LIBDIR)/bpf $(PREFIX)/bin $(SYSTEMD_DIR) $(ETC_DIR)
	$(Q)install -m 0644 $(BPF_PROGS) $(LIBDIR)/bpf/
	$(Q)install -m 0644 README.md $(LIBDIR)/README.md
	$(Q)[ -x $(LIBDIR)/venv/bin/python ] || $(PYTHON) -m venv $(LIBDIR)/venv
	$(Q)$(LIBDIR)/venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.txt .
	$(Q)ln -sf $(LIBDIR)/venv/bin/tuplet $(PREFIX)/bin/tuplet
	$(Q)sed -e 's,@BINDIR@,$(PREFIX)/bin,g' -e 's,@OBJDIR@,$(LIBDIR)/bpf,g' -e 's,@DOCDIR@,$(LIBDIR),g' \
	     systemd/tuplet.service > $(SYSTEMD_DIR)/tuplet.service
	$(Q)[ -e $(ETC_DIR)/tuplet.toml ] || install -m 0644 examples/node.toml $(ETC_DIR)/tuplet.toml
	$(Q)if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now tuplet"

uninstall:
	rm -rf $(LIBDIR) $(PREFIX)/bin/tuplet $(SYSTEMD_DIR)/tuplet.service
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(BUILD) vmlinux/vmlinux.h
