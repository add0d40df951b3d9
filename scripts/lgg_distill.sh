#!/usr/bin/env bash
# One U-Net distilled from the shipped five-member ensemble (docs/experiments.md, "One network from
# five: distillation"), then scored on the 7 test patients against the ensemble, paired per patient.
#   scripts/lgg_distill.sh DATA OUT     e.g. scripts/lgg_distill.sh ../shared/data/lgg runs/distill
set -euo pipefail
DATA=${1:?LGG data folder}; OUT=${2:?output folder}
mkdir -p "$OUT"
# The ensemble's own patients: its 57 training and 11 validation patients (all 68 trained it in the
# refit), the 7 test patients held out. data.refit=true trains on train + val with no validation.
python - "$OUT/split.json" <<'PY'
import json, sys
from brainseg.runs.model_file import load_model_file, model_file
split = dict(load_model_file(model_file("pretrained"))[0]["split"])
val = split.pop("refit_val")
split.update(train=sorted(set(split["train"]) - set(val)), val=sorted(val))
json.dump(split, open(sys.argv[1], "w"), indent=1)
PY
[ -f "$OUT/student/model.pt" ] || brainseg distill pretrained --config scripts/lgg_cpu_v1.yaml \
  --data "$DATA" --split "$OUT/split.json" --out "$OUT/student" --image-size 256 --lr 3e-4 --epochs 24 \
  --init pretrained --set train.init_member=3 --set data.refit=true --set "train.lr_milestones=[14,20]" \
  --set train.max_minutes=0 --set train.distill_weight=0.5
brainseg compare pretrained "$OUT/student" --data "$DATA" --out "$OUT/compare" --threshold 0.5 --min-fraction 0
