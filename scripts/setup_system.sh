#!/usr/bin/env bash
# System packages some tests need (Debian): Slurm daemons for the launcher tests.
# Skipped quietly where apt-get is unavailable or we are not root.
set -uo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup] cannot install ${need[*]} (needs root + apt-get); Slurm tests will fail" >&2
  exit 0
fi
echo "[setup] installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null
