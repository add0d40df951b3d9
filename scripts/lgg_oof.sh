#!/usr/bin/env bash
# Out-of-fold comparison of LGG training recipes over the 68 non-test patients (5 folds), as
# pre-registered in docs/experiments.md ("Small tumours, out of fold"; "Tversky loss and deep
# supervision, out of fold"; "Neighbouring slices (2.5D), out of fold"; "256² from the start, out of fold";
# "Small-tumour slices drawn more often, alone, out of fold"; "Tversky and deep supervision together";
# "No dropout, the same minutes, out of fold"; "The LGG candidate", K or K_no_dropout by J's result;
# "K with missing-sequence augmentation", KM).
#   scripts/lgg_oof.sh DATA OUT        e.g. scripts/lgg_oof.sh ../shared/data/lgg runs/lgg_oof
#   REFIT=KM_missing_sequence scripts/lgg_oof.sh DATA OUT   the arm on all 68, scored on the 7 test patients
# Every arm trains the same fixed schedule (no early stopping, last epoch kept), so the scores do
# not depend on machine load and no fold's validation patients choose anything for themselves.
set -euo pipefail
DATA=${1:?data folder}; OUT=${2:?output folder}
EPOCHS=${EPOCHS:-16}  # ARMS_TO_RUN="C_tversky D_deep" runs only those (A's crossval must exist)
# FOLDS="3 4" trains only those folds, so that two copies of this script can share an arm's folds
# (one per core); an arm is scored once all five of its folds have a model.
FOLDS=${FOLDS:-0 1 2 3 4}
mkdir -p "$OUT"
TEST=TCGA_DU_6404_19850629,TCGA_CS_6667_20011105,TCGA_DU_5851_19950428,TCGA_HT_7879_19981009,TCGA_HT_7692_19960724,TCGA_CS_4944_20010208,TCGA_HT_7616_19940813
[ -f "$OUT/split5.json" ] || brainseg split "$DATA" --folds 5 --seed 0 --test-patients "$TEST" --out "$OUT/split5.json"
SCHEDULE=(--config "$(dirname "$0")/lgg_cpu_v1.yaml" --epochs "$EPOCHS" --split "$OUT/split5.json"
          --set train.early_stopping_patience=1000 --set "train.lr_milestones=[10,14]"
          --set train.val_every=4 --set train.max_minutes=0)
declare -A ARMS=(
  [A_baseline]=""
  [B_small]="--loss bce_dice_image --set data.small_tumour_weight=3"
  [C_tversky]="--loss bce_tversky"
  [D_deep]="--set model.options.deep_supervision=2"
  [E_context]="--context 1"
  [H_small_draws]="--set data.small_tumour_weight=3"
  [J_no_dropout]="--set model.dropout=0 --epochs 22 --set train.lr_milestones=[14,19]"
  [I_tversky_deep]="--loss bce_tversky --set model.options.deep_supervision=2"
  [G_256]="--image-size 256"
  [K_candidate]="--loss bce_tversky --set model.options.deep_supervision=2 --set data.small_tumour_weight=3 --epochs 32 --set train.lr_milestones=[20,28]"
  [K_no_dropout]="--loss bce_tversky --set model.options.deep_supervision=2 --set data.small_tumour_weight=3 --set model.dropout=0 --epochs 44 --set train.lr_milestones=[28,39]"
  [KM_missing_sequence]="--loss bce_tversky --set model.options.deep_supervision=2 --set data.small_tumour_weight=3 --set model.dropout=0 --epochs 44 --set train.lr_milestones=[28,39] --set augment.p_missing_sequence=0.25"
)
source "$(dirname "$0")/resume_run.sh"  # finished_or_resumed RUN
# REFIT=ARM, once ARM's folds are scored and tuned: ARM's recipe on all 68 non-test patients (fold 0's
# run with its validation patients moved into training, `brainseg train --refit`, for the arm's whole
# fixed schedule), given the threshold and post-processing its tune chose out of fold, then scored
# once on the 7 test patients (OUT/ARM_refit/test).
if [ -n "${REFIT:-}" ]; then
  run="$OUT/${REFIT}_refit"
  if ! finished_or_resumed "$run"; then
    # shellcheck disable=SC2086
    brainseg train --refit "$OUT/$REFIT/fold0" --out "$run" --epochs "$EPOCHS" \
      --set "train.lr_milestones=[10,14]" ${ARMS[$REFIT]}
  fi
  python - "$run" "$OUT/$REFIT/tune/tuning.json" <<'PY'
import json, sys
from brainseg.evaluation.tune import store_postprocessing
store_postprocessing(sys.argv[1], json.load(open(sys.argv[2]))["recommended"],
                     source=f"tuned out of fold over the 68 non-test patients ({sys.argv[2]})")
PY
  brainseg evaluate "$run" --data "$DATA" --split test --precision 32 --out "$run/test"
  exit 0
fi
# One arm's five folds, then its out-of-fold scores: A's alone, the others' paired against A's per
# patient with 95% bootstrap intervals (the decisions). An arm scored before A is paired later:
#   brainseg crossval OUT/ARM/crossval --data DATA --against OUT/A_baseline/crossval --out OUT/ARM/against_A
for arm in ${ARMS_TO_RUN:-A_baseline B_small C_tversky D_deep E_context H_small_draws J_no_dropout I_tversky_deep G_256}; do
  for fold in $FOLDS; do
    run="$OUT/$arm/fold$fold"
    finished_or_resumed "$run" && continue
    # shellcheck disable=SC2086
    brainseg train --data "$DATA" --out "$run" --fold "$fold" "${SCHEDULE[@]}" ${ARMS[$arm]}
  done
  for fold in 0 1 2 3 4; do [ -f "$OUT/$arm/fold$fold/model.pt" ] || continue 2; done
  against=()
  if [ "$arm" != A_baseline ] && [ -f "$OUT/A_baseline/crossval/out_of_fold.csv" ]; then
    against=(--against "$OUT/A_baseline/crossval")
  elif [ "$arm" != A_baseline ]; then
    echo "note: A_baseline has no crossval in $OUT yet, so $arm is scored without its paired change" >&2
  fi
  [ -f "$OUT/$arm/crossval/crossval.json" ] || brainseg crossval \
    "$OUT"/$arm/fold{0,1,2,3,4}/checkpoints/last.ckpt --data "$DATA" \
    --out "$OUT/$arm/crossval" --threshold 0.5 --min-fraction 0 "${against[@]}"
  # Threshold and post-processing out of fold, while the fold models exist (they do not outlast a
  # session; the tables are kept in docs/results).
  [ -f "$OUT/$arm/tune/tuning.json" ] || brainseg tune \
    "$OUT"/$arm/fold{0,1,2,3,4}/checkpoints/last.ckpt --data "$DATA" --out "$OUT/$arm/tune"
done
