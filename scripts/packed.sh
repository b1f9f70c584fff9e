#!/usr/bin/env bash
# Runs a command with OUT pointing at a scratch folder, then packs that folder into $OUT/logs.tgz
# (plus summary.txt beside it). The GPU machines hand back only a few files from $OUT, no more
# than two folders down; the GIN tests alone write a log per process.
#
#   scripts/packed.sh 'EPCOMM_CHECK_STEPS="build gin" scripts/gpu-check.sh; scripts/gin-probe.sh build-gpu'
set -uo pipefail
final=${OUT:-$PWD/gpu-logs}
mkdir -p "$final"
scratch=$(mktemp -d /tmp/epcomm-out.XXXXXX)
OUT=$scratch bash -c "$*"
rc=$?
[[ -f $scratch/summary.txt ]] && cp "$scratch/summary.txt" "$final/summary.txt"
tar czf "$final/logs.tgz" -C "$scratch" . && echo "[packed.sh] logs: $(du -h "$final/logs.tgz" | cut -f1) in logs.tgz"
exit $rc
