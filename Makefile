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
TEST_PROGS := $(patsubst tests/bpf/%.bpf.c,$(BUILD)/%.o,$(wildcard tests/bpf/*.bpf.c))
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

.PHONY: prom-deps build deps venv lint test test-host demo bindings clean vmlinux bench install uninstall \
        bench-services bench-resize bench-flood vm-deps vm-test cni-deps bench-endpoints bench-churn
build: $(BPF_PROGS) $(BENCH_PROGS) $(TEST_PROGS)

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

$(BUILD)/%.o: tests/bpf/%.bpf.c vmlinux/vmlinux.h | $(BUILD)/.deps
	$(call msg,CLANG,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

-include ci/bindings.mk
bindings: venv

# The whole suite: lint, the host tests, then the vm-marked ones in a Linux 6.1 VM (vm-test).
test: lint test-host
	$(MAKE) --no-print-directory vm-test

# Then the clock-sensitive tests again with the datapath's clock reading a few seconds (a node just
# booted: no "now - N" may go below zero, no lifetime comparison may assume a large clock), and
# once more just before the u32 wrap (lifetimes and "now" on either side of 2^32).
CLOCK_NEAR_ZERO ?= 5
CLOCK_NEAR_WRAP ?= 4294967000
test-host: build venv cni-deps prom-deps $(BUILD)/loadgen $(BUILD)/synflood
	$(VENV_PY) -m pytest $(PYTEST_ARGS)
	$(VENV_PY) -m pytest -m clock --datapath-clock $(CLOCK_NEAR_ZERO) $(PYTEST_ARGS)
	$(VENV_PY) -m pytest -m clock --datapath-clock $(CLOCK_NEAR_WRAP) $(PYTEST_ARGS)
	$(VENV_PY) -m pytest --agent-confined tests/test_agent.py   # the agent within systemd/tuplet.service's limits

# The layer contract (import-linter), no imports inside functions or cycles, strict types, pyflakes.
lint: venv
	$(call msg,LINT,ruff mypy import-linter check_imports)
	$(Q)$(VENV)/bin/ruff check -q loader tests bench ci
	$(Q)$(VENV)/bin/mypy
	$(Q)$(VENV)/bin/lint-imports --no-cache
	$(Q)$(VENV_PY) ci/check_imports.py

demo: build venv
	$(VENV_PY) -m tuplet.lab.demo

bench: build venv
	$(VENV_PY) bench/datapath.py

$(BUILD)/loadgen: bench/loadgen.c | $(BUILD)/.deps
	$(call msg,CC,$@)
	$(Q)$(HOSTCC) -O2 -Wall -Werror -o $@ $<

bench-services: build venv $(BUILD)/loadgen
	$(VENV_PY) bench/services.py $(BENCH_ARGS)

bench-resize: build venv
	$(VENV_PY) bench/resize.py $(BENCH_ARGS)

$(BUILD)/synflood: bench/synflood.c | $(BUILD)/.deps
	$(call msg,CC,$@)
	$(Q)$(HOSTCC) -O2 -Wall -Werror -o $@ $<

bench-flood: build venv $(BUILD)/loadgen $(BUILD)/synflood
	$(VENV_PY) bench/flood.py $(BENCH_ARGS)

# GC churn soak (minutes; not part of the tests): connections broken by GC, with and without its protection.
bench-churn: build venv $(BUILD)/loadgen
	$(VENV_PY) bench/churn.py $(BENCH_ARGS)

# The agent as a systemd service: a venv with tuplet in $(LIBDIR), the objects beside it,
# `tuplet` in $(PREFIX)/bin, the unit, and /etc/tuplet/tuplet.toml when there is none.
PREFIX      ?= /usr/local
LIBDIR      := $(PREFIX)/lib/tuplet
SYSTEMD_DIR ?= /etc/systemd/system
ETC_DIR     ?= /etc/tuplet
CNI_BIN_DIR ?= /opt/cni/bin
CNI_CONF_DIR ?= /etc/cni/net.d
install: build | $(BUILD)/.deps
	$(call msg,INSTALL,$(LIBDIR) $(PREFIX)/bin/tuplet $(SYSTEMD_DIR)/tuplet.service)
	$(Q)install -d $(LIBDIR)/bpf $(PREFIX)/bin $(SYSTEMD_DIR) $(ETC_DIR)
	$(Q)install -m 0644 $(BPF_PROGS) $(LIBDIR)/bpf/
	$(Q)install -m 0644 README.md $(LIBDIR)/README.md
	$(Q)[ -x $(LIBDIR)/venv/bin/python ] || $(PYTHON) -m venv $(LIBDIR)/venv
	$(Q)rm -rf $(BUILD)/lib $(BUILD)/bdist.*   # setuptools' staging: stale modules would be installed too
	$(Q)$(LIBDIR)/venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.txt .
	$(Q)ln -sf $(LIBDIR)/venv/bin/tuplet $(PREFIX)/bin/tuplet
	$(Q)install -d $(CNI_BIN_DIR) $(CNI_CONF_DIR)
	$(Q)ln -sf $(LIBDIR)/venv/bin/tuplet-cni $(CNI_BIN_DIR)/tuplet-cni
	$(Q)install -m 0644 examples/tuplet-cni.conflist $(LIBDIR)/tuplet-cni.conflist.example
	$(Q)sed -e 's,@BINDIR@,$(PREFIX)/bin,g' -e 's,@OBJDIR@,$(LIBDIR)/bpf,g' -e 's,@DOCDIR@,$(LIBDIR),g' \
	     systemd/tuplet.service > $(SYSTEMD_DIR)/tuplet.service
	$(Q)[ -e $(ETC_DIR)/tuplet.toml ] || install -m 0644 examples/node.toml $(ETC_DIR)/tuplet.toml
	$(Q)if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now tuplet"

uninstall:
	rm -rf $(LIBDIR) $(PREFIX)/bin/tuplet $(SYSTEMD_DIR)/tuplet.service $(CNI_BIN_DIR)/tuplet-cni
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# What the podman/CNI tests need (tests/test_podman.py skips, saying so, without them).
CNI_PKGS := podman runc containernetworking-plugins busybox-static
cni-deps:
	$(Q)if ! command -v podman >/dev/null || ! command -v runc >/dev/null || [ ! -x /usr/lib/cni/ptp ] \
	     || [ ! -x /bin/busybox ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CNI_PKGS) >/dev/null; \
	fi

# promtool and the Prometheus server: alert rule unit tests (tests/test_alert_rules.py).
PROM_PKGS := prometheus
prom-deps:
	$(Q)if ! command -v promtool >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PROM_PKGS) >/dev/null; \
	fi

bench-endpoints: build venv
	$(VENV_PY) bench/endpoints.py

# VM tests: the `vm`-marked tests of tests/vm inside Debian's 6.1 kernel (no TCX: legacy TC), booted with
# virtme-ng under software emulation (KVM hangs on these machines). The guest sees this tree read-only and runs
# the venv's python by absolute path; logs go to $(VM_OUT) (shared read-write). See tests/vm/run-in-guest.sh.
# VM_PYTEST_ARGS is passed to pytest in the guest (e.g. -k geneve). VM_FS: how the guest sees the host's
# files, virtiofs (tests/vm/bin/virtiofsd adapts vng to Debian's C daemon; vng falls back to 9p by itself if
# it fails) or 9p (--force-9p; Python imports about 3x slower).
VM_APT_PKGS := qemu-system-x86 busybox-static linux-image-amd64
VM_OUT      := $(BUILD)/vm
VM_TIMEOUT  ?= 2400
VM_MEMORY   ?= 2G
VM_CPUS     ?= 2
VM_FS       ?= virtiofs
VM_BLACKLIST := kvm kvm_amd kvm_intel ahci libahci libata ata_piix ata_generic sr_mod cdrom sg psmouse pcspkr \
  iTCO_wdt iTCO_vendor_support lpc_ich i2c_i801 i2c_smbus serio_raw evdev i6300esb button qemu_fw_cfg floppy \
  joydev mousedev bochs drm drm_kms_helper ttm intel_rapl_msr intel_rapl_common intel_pmc_core \
  aesni_intel ghash_clmulni_intel crc32_pclmul crc32c_intel crct10dif_pclmul sha512_ssse3 sha256_ssse3 \
  sha1_ssse3 polyval_clmulni polyval_generic rapl virtio_balloon virtio_rng
export VM_PYTEST_ARGS   # to the guest through a file: no quoting through vng's --exec
VM_EMPTY :=
VM_SPACE := $(VM_EMPTY) $(VM_EMPTY)
VM_COMMA := ,
vm-deps: $(BUILD)/.vm-deps
$(BUILD)/.vm-deps: $(VENV)/.installed
	$(call msg,APT,$(VM_APT_PKGS))
	$(Q)if [ "$$(dpkg-query -W -f='$${db:Status-Status}\n' $(VM_APT_PKGS) 2>/dev/null | grep -cx installed)" \
	     != $(words $(VM_APT_PKGS)) ] || ! ls /boot/vmlinuz-6.1.* >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VM_APT_PKGS) >/dev/null; \
	fi
	$(Q)[ -x $(VENV)/bin/vng ] || { echo "vng missing in $(VENV): is virtme-ng in requirements.txt?"; exit 1; }
	$(Q)touch $@

vm-test: build venv vm-deps
	$(Q)kernel=$$(ls /boot/vmlinuz-6.1.* | sort -V | tail -n 1); \
	rm -rf $(VM_OUT) && mkdir -p $(VM_OUT) && log=$(VM_OUT)/console.log && \
	printf '%s\n' "$${VM_PYTEST_ARGS-}" > $(VM_OUT)/pytest-args && \
	echo "vm-test: booting $$kernel (software emulation, $(VM_CPUS) CPUs, $(VM_MEMORY)); console: $$log" && \
	start=$$(date +%s) && \
	$(VENV_PY) -m compileall -q loader tests >/dev/null && \
	{ PATH="$(CURDIR)/tests/vm/bin:$(CURDIR)/$(VENV)/bin:$$PATH" timeout --kill-after=30 $(VM_TIMEOUT) \
	    vng --run "$$kernel" --disable-kvm $(if $(filter 9p,$(VM_FS)),--force-9p) \
	    --cpus $(VM_CPUS) --memory $(VM_MEMORY) --rwdir "$(CURDIR)/$(VM_OUT)" --cwd "$(CURDIR)" \
	    --append "modprobe.blacklist=$(subst $(VM_SPACE),$(VM_COMMA),$(strip $(VM_BLACKLIST)))" \
	    --exec "$(CURDIR)/tests/vm/run-in-guest.sh $(CURDIR)/$(VM_OUT)" </dev/null; \
	  echo $$? > $(VM_OUT)/vng.rc; } 2>&1 | tee $$log; \
	rc=$$(cat $(VM_OUT)/vng.rc 2>/dev/null || echo 1); \
	echo "vm-test: vng exit $$rc after $$(( $$(date +%s) - start )) s (boot + tests)"; \
	[ "$$rc" != 124 ] || echo "vm-test: timed out after $(VM_TIMEOUT) s"; \
	echo "vm-test: console $$log, pytest log $(VM_OUT)/pytest.log, junit $(VM_OUT)/junit.xml"; \
	exit $$rc

clean:
	rm -rf $(BUILD) vmlinux/vmlinux.h
