#!/usr/bin/env bash
# System packages some tests need (Debian): the Slurm daemons and clients of the launcher tests
# and iproute2 for their network namespaces
# (tests/slurm start their own slurmctld + slurmd fake nodes with auth/none, so munge is not
# needed). --no-install-recommends keeps it to a handful of packages (recommends pull ~40).
# Skipped quietly where apt-get is unavailable or we are not root.
set -uo pipefail
PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # tests/slurm: one network namespace per fake node
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] cannot install ${need[*]} (needs root + apt-get); the Slurm tests will be skipped" >&2
  exit 0
fi
echo "[setup] installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# the packages try to start their services through policy-rc.d/systemd: harmless, nothing starts
apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
