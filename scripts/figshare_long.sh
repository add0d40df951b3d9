#!/usr/bin/env bash
# Figshare F1: U-Net with the per-image Dice loss, started from the LGG ensemble's member 3, alone on
# the CPU for 90 minutes (docs/experiments.md, "Figshare: longer, from an LGG network").
#   scripts/figshare_long.sh DATA SPLIT OUT [RUN...]   RUN: earlier runs to score beside it on the
#   240 originals, none of which F1 trained on (F1 was chosen against the Figshare model shipped
#   before it; today's pretrained:figshare trained on originals, so compare would refuse it)
#   e.g. scripts/figshare_long.sh ../shared/data/figshare256 scripts/splits/figshare256_f1.json runs/fig3
# (scripts/splits/figshare256_f1.json is F1's split: 586 training, 120 validation images in 8 blocks.)
set -euo pipefail
DATA=${1:?figshare256 folder}; SPLIT=${2:?F1 split.json}; OUT=${3:?output folder}
shift 3
mkdir -p "$OUT"
brainseg train --config src/brainseg/configs/figshare_cpu.yaml --data "$DATA" --split "$SPLIT" \
  --loss bce_dice_image --init pretrained --set train.init_member=3 --max-minutes 90 \
  --model unet --out "$OUT/f1" > "$OUT/f1.log" 2>&1
brainseg compare "$OUT/f1" "$@" --data "$(dirname "$DATA")/figshare" --split all \
  --group-by index-block:16 --out "$OUT/compare_orig" > "$OUT/compare_orig.log" 2>&1
