#!/bin/bash
# Runs inside the virtme-ng guest started by `make vm-test`: the `vm`-marked tests on the guest's kernel.
#   run-in-guest.sh OUT_DIR [pytest args...]
# More pytest arguments, shell-quoted, may be in OUT_DIR/pytest-args (make vm-test VM_PYTEST_ARGS='-k "..."').
# tests/vm is always the path collected.
# The guest sees the host's filesystem read-only (OUT_DIR is shared read-write): the project's venv python
# runs by absolute path, nothing is written into the tree (no bytecode, no pytest cache), logs go to OUT_DIR.
# The exit status is pytest's, which vng returns as its own.
set -u -o pipefail
out=$1; shift
[ ! -s "$out/pytest-args" ] || eval "set -- $(cat "$out/pytest-args") \"\$@\""
root=$(cd "$(dirname "$0")/../.." && pwd)
started=$(cut -d' ' -f1 /proc/uptime)
echo "vm-guest: kernel $(uname -r) up after ${started%.*} s; $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"

# bpffs is not mounted in the guest; /run and /tmp are the guest's own.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || { echo "vm-guest: cannot mount bpffs"; exit 2; }
# Socket LB's tests need cgroup v2 (a cgroup of their own below its root).
grep -q ' cgroup2 ' /proc/self/mounts || mount -t cgroup2 none /sys/fs/cgroup \
    || echo "vm-guest: cannot mount cgroup2 (socket LB tests will fail)"
grep ' cgroup2 ' /proc/self/mounts | sed 's/^/vm-guest: /'
# Temporary files on the guest's tmpfs: 9p (the shared OUT_DIR) cannot truncate an unlinked file, which
# pytest's output capture does.
tmp=$(mktemp -d /var/tmp/tpl-vm.XXXXXX)
export TUPLET_IN_VM=1 TUPLET_VM_OUT="$out" PYTHONDONTWRITEBYTECODE=1 TMPDIR="$tmp" PYTHONUNBUFFERED=1

echo "vm-guest: running pytest -m vm tests/vm $*"
cd "$root" || exit 2
"$root/.venv/bin/python" -m pytest -m vm -p no:cacheprovider -p no:hypothesispytest --basetemp="$tmp/pytest" \
    --junitxml="$out/junit.xml" -o junit_logging=all -v --tb=short "$root/tests/vm" "$@" 2>&1 | tee "$out/pytest.log"
rc=$?
[ ! -s "$out/verifier-sizes.txt" ] || cat "$out/verifier-sizes.txt"
echo "vm-guest: pytest exit $rc after $(( $(cut -d. -f1 /proc/uptime) - ${started%.*} )) s"
exit $rc
