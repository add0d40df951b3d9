#!/usr/bin/env bash
# Figshare: U-Net and ResUNet with the per-image Dice loss on the shipped model's split, side by side
# with one thread each (docs/experiments.md, "Figshare: Dice per image, U-Net and ResUNet").
#   scripts/figshare_runs.sh DATA SPLIT OUT   e.g. scripts/figshare_runs.sh ../shared/data/figshare256 split.json runs/fig2
set -euo pipefail
DATA=${1:?figshare256 folder}; SPLIT=${2:?split.json of the shipped model}; OUT=${3:?output folder}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# From scratch, as they ran before figshare_cpu started from an LGG network (train.init_weights).
COMMON=(--config src/brainseg/configs/figshare_cpu.yaml --data "$DATA" --split "$SPLIT" --loss bce_dice_image --max-minutes 80
        --set train.init_weights=)
brainseg train "${COMMON[@]}" --model unet --out "$OUT/unet_img" > "$OUT/unet_img.log" 2>&1 &
brainseg train "${COMMON[@]}" --model resunet --out "$OUT/resunet_img" > "$OUT/resunet_img.log" 2>&1 &
wait
