#!/usr/bin/env bash
# Figshare F2: F1's recipe (pretrained:figshare) refit on more images, as pre-registered in
# docs/experiments.md ("Figshare: F1's recipe on more images"). Trains on all 706 figshare256 images
# plus the originals in odd blocks of 16 indices, for F1's epochs and LR drops, without validation;
# scores it on the originals in even blocks, which it did not train on.
# With a fourth argument `all` (F3, the shipped model) it trains on every image and tests nothing.
#   scripts/figshare_refit.sh SHARED RECIPE OUT [even|all] [brainseg train options]
# RECIPE: F1's run folder (refit: its config, its epochs up to its best, its tuned settings), or a model
# made that way, whose file holds the recipe (pretrained:figshare is F3: F1's config and schedule; its
# threshold and post-processing are copied too), e.g.
#   scripts/figshare_refit.sh ../shared/data pretrained:figshare runs/fig4          # F2 and its test
#   RUN_NAME=f4 AGAINST=runs/fig4/f2 scripts/figshare_refit.sh ../shared/data pretrained:figshare runs/fig6 \
#       even --loss bce_tversky_image                                                # a variant against F2
# The test: AGAINST paired with the new run (brainseg compare, OUT/compare_test), or, with no AGAINST, the
# new run alone (brainseg evaluate, OUT/test_RUN_NAME); the per-image table is OUT/.../per_image.csv.
# AGAINST may be a run or a kept evaluation of one (docs/results/figshare_f2b: F2b's test, its model gone).
# Both score in fp32.
set -euo pipefail
SHARED=${1:?folder holding figshare/ and figshare256/}; RECIPE=${2:?F1 run folder or a model}; OUT=${3:?output folder}
HOLD_OUT=${4:-even}  # even: originals in even blocks are the test; all: no test
shift $(( $# < 4 ? $# : 4 ))  # what is left goes to brainseg train
mkdir -p "$OUT"
printf 'folders: [%s, %s]\n' "$(realpath "$SHARED/figshare256")" "$(realpath "$SHARED/figshare")" \
  > "$OUT/figshare_all.yaml"
# The split: originals by blocks of 16 consecutive indices, odd blocks train, even blocks test.
python - "$SHARED" "$OUT" "$HOLD_OUT" <<'PY'
import json, sys
from pathlib import Path
shared, out = map(Path, sys.argv[1:3])
names = lambda folder: sorted(p.stem for p in (shared / folder / "images").glob("*.png"))
originals, extra = names("figshare"), names("figshare256")
test = [n for n in originals if ((int(n) - 1) // 16) % 2 == 0] if sys.argv[3] == "even" else []
train = sorted(set(extra) | (set(originals) - set(test)), key=int)
json.dump({"format": "brainseg-split/1", "unit": "image", "grouped_by": "index-block:16",
           "train": train, "val": [], "test": sorted(test, key=int)}, open(out / "split.json", "w"), indent=1)
PY
RUN=$OUT/${RUN_NAME:-$([ "$HOLD_OUT" = all ] && echo f3 || echo f2)}
source "$(dirname "$0")/resume_run.sh"
finished_or_resumed "$RUN" || true  # else trained from the start below
if [ -f "$RECIPE/history.csv" ]; then
  # brainseg's refit of F1 on this data: F1's config and schedule up to its best epoch, no validation,
  # and F1's tuned threshold and post-processing (a refit has no validation images of its own).
  [ -f "$RUN/model.pt" ] || brainseg train --refit "$RECIPE" --data "$OUT/figshare_all.yaml" \
    --split "$OUT/split.json" --out "$RUN" "$@"
else
  [ -f "$RUN/model.pt" ] || brainseg train --config "$RECIPE" --data "$OUT/figshare_all.yaml" \
    --split "$OUT/split.json" --out "$RUN" "$@"
  python -c 'import sys; from brainseg.runs.model_file import store_settings, tuned_settings
store_settings(sys.argv[1], tuned_settings(sys.argv[2]))' "$RUN" "$RECIPE"
fi
[ "$HOLD_OUT" = all ] && exit 0
if [ -n "${AGAINST:-}" ]; then
  brainseg compare "$AGAINST" "$RUN" --data "$OUT/figshare_all.yaml" --split test \
    --split-file "$OUT/split.json" --group-by index-block:16 --precision 32 --out "$OUT/compare_test"
else
  brainseg evaluate "$RUN" --data "$OUT/figshare_all.yaml" --split test --split-file "$OUT/split.json" \
    --precision 32 --out "$OUT/test_$(basename "$RUN")"
fi
