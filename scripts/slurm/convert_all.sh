#!/bin/bash
# Submit the conversion array (N tasks) and the merge job that runs after all of them succeeded.
# Usage: SRC=... OUT=... [ARGS="--license-set commercial"] bash scripts/slurm/convert_all.sh N
set -euo pipefail
N=${1:?number of array tasks}
HERE=$(dirname "$0")
mkdir -p logs
jid=$(sbatch --parsable --array=0-$((N - 1)) --export=ALL "$HERE/convert_array.sbatch")
sbatch --dependency=afterok:"$jid" --job-name=cc-merge --cpus-per-task=1 --export=ALL,MERGE=1 \
  "$HERE/convert_array.sbatch"
echo "submitted array $jid ($N tasks) and its merge job"
