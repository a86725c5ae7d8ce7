#!/usr/bin/env bash
# Detect or predict? (issue 36) Equal-time comparison, 10 minutes per run, one core and one thread
# per run, 3 seeds, every read-out of `dilemma compare` (--readouts all). Arms: sparse (r = 0.75,
# no position task), + detect (DILEMMA, p = 0.2), + predict (q = 0.75 of the kept tokens without a
# position, labels smoothed with sigma = 1 patch decaying to 0: DropPos's settings). MoCo v3 and
# I-JEPA, on Animal-MNIST (embedded) and Animal-Texture; then DropPos beside MAE + DILEMMA on
# Animal-MNIST (the same 128 x 2 x 4 decoder size and crops). Resumable: a finished run is skipped,
# an interrupted one resumes, so the study can span sittings. From the repository root:
#   bash benchmarks/position_study.sh            # two queues side by side (cores 0 and 1)
#   bash benchmarks/position_study.sh tables     # every table, once all runs have finished (trains nothing then)
set -u
study() {  # study NAME [ARM]: one comparison into runs/positions/NAME (droppos_mae: ARM alone if given)
    local arms=(--variant "sparse=dilemma.misplace_prob=0" --variant "detect="
                --variant "predict=dilemma.task=predict,dilemma.position_drop_prob=0.75,dilemma.position_smoothing=1")
    local args
    case $1 in
        mocov3_animal) args=("${arms[@]}") ;;
        mocov3_texture) args=("${arms[@]}" --set data.source=animal-texture) ;;
        ijepa_animal) args=(--config configs/ijepa_dilemma.yaml "${arms[@]}") ;;
        ijepa_texture) args=(--config configs/ijepa_dilemma.yaml "${arms[@]}" --set data.source=animal-texture) ;;
        droppos_mae)
            local mae=(--variant "mae_dilemma=")
            local droppos=(--variant "droppos=method.name=droppos,dilemma.task=predict,dilemma.position_drop_prob=0.75,dilemma.position_smoothing=1,method.droppos.decoder_dim=128,method.droppos.decoder_heads=4")
            case ${2:-both} in
                mae_dilemma) args=(--config configs/mae_dilemma.yaml "${mae[@]}") ;;
                droppos) args=(--config configs/mae_dilemma.yaml "${droppos[@]}") ;;
                both) args=(--config configs/mae_dilemma.yaml "${mae[@]}" "${droppos[@]}") ;;
            esac ;;
    esac
    dilemma compare "${args[@]}" --seeds 0 1 2 --time-budget 10 --curve-points 1 --readouts all \
        --out "runs/positions/$1"
}
export OMP_NUM_THREADS=1  # one thread per run (and the summaries' header says so when `tables` rewrites them)
if [ "${1:-}" = tables ]; then
    for name in mocov3_animal ijepa_animal mocov3_texture ijepa_texture droppos_mae; do study $name; done
    exit 0
fi
export -f study
# Twelve runs per core: each DropPos arm runs on its own core beside the other, each into its own
# run folders (runs/positions/droppos_mae/ARM/seed_N); `tables` then summarises both arms.
taskset -c 0 bash -c "study mocov3_animal; study ijepa_texture; study droppos_mae mae_dilemma" &
taskset -c 1 bash -c "study ijepa_animal; study mocov3_texture; study droppos_mae droppos" &
wait
