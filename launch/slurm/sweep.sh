#!/bin/bash
# Submit a sweep as one SLURM job array, one task per config, each into its own run directory
# (<output-dir>/<config name>). Default: the 19 VTAB-1k tasks. Run from the repository root:
#
#   launch/slurm/sweep.sh                                  # configs/vtab/*.yaml
#   launch/slurm/sweep.sh --suite fgvc --output-dir runs/fgvc-vitb
#   launch/slurm/sweep.sh --sbatch "--gpus-per-node=1 --partition=a100" -- --set train.precision=bf16
#   launch/slurm/sweep.sh configs/vtab/cifar.yaml configs/vtab/dtd.yaml
#   tools/report.py runs/sweep-*/                         # the table against the paper
#
# Options: --suite vtab|fgvc, --output-dir DIR (default runs/<suite>-<date>), --launcher
# train.sbatch|train_srun.sbatch, --sbatch "OPTIONS" (passed to sbatch), --max-parallel N,
# --dry-run (print the sbatch command only). After "--": options for launch/train.py.
set -euo pipefail

suite=vtab output_dir="" launcher=train.sbatch sbatch_opts="" max_parallel="" dry_run=0 configs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --output-dir) output_dir=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --sbatch) sbatch_opts=$2; shift 2 ;;
    --max-parallel) max_parallel=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) echo "sweep.sh: error: unknown option $1" >&2; exit 2 ;;
    *) configs+=("$1"); shift ;;
  esac
done
if [ ! -f launch/train.py ]; then
  echo "sweep.sh: error: run from the rlrr repository root" >&2
  exit 2
fi
if [ ${#configs[@]} -eq 0 ]; then
  case "$suite" in
    vtab|fgvc) mapfile -t configs < <(find "configs/$suite" -name '*.yaml' ! -name base.yaml | sort) ;;
    *) echo "sweep.sh: error: --suite must be vtab or fgvc, got '$suite'" >&2; exit 2 ;;
  esac
fi
for c in "${configs[@]}"; do
  [ -f "$c" ] || { echo "sweep.sh: error: config $c does not exist" >&2; exit 2; }
done
output_dir=${output_dir:-runs/${suite}-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$output_dir"
list="$output_dir/sweep-configs.txt"
printf '%s\n' "${configs[@]}" > "$list"

array="0-$(( ${#configs[@]} - 1 ))${max_parallel:+%$max_parallel}"
# shellcheck disable=SC2206  # --sbatch is a list of options: split it on purpose
cmd=(sbatch --parsable --array="$array" --job-name="rlrr-$suite" --output="$output_dir/slurm-%A_%a.out"
     $sbatch_opts "launch/slurm/$launcher" --config-list "$list" --set "output_dir=$output_dir" "$@")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
job=$("${cmd[@]}")
echo "submitted array job ${job%%;*}: ${#configs[@]} runs into $output_dir (configs: $list)"
