#!/usr/bin/env bash
# Figshare F2: F1's recipe (pretrained:figshare) refit on more images, as pre-registered in
# docs/experiments.md ("Figshare: F1's recipe on more images"). Trains on all 706 figshare256 images
# plus the originals in odd blocks of 16 indices, for F1's epochs and LR drops, without validation;
# scores F1 and F2 on the originals in even blocks, which neither trained on.
# With a fourth argument `all` (F3, the shipped model) it trains on every image and tests nothing.
#   scripts/figshare_refit.sh SHARED F1 OUT [all]   e.g. scripts/figshare_refit.sh ../shared/data runs/fig3/f1 runs/fig4
# A variant of the recipe (F4): brainseg train options after `even`, a run name and the run to compare
# it with first, e.g.
#   RUN_NAME=f4 AGAINST=runs/fig4/f2 scripts/figshare_refit.sh ../shared/data runs/fig3/f1 runs/fig6 even \
#       --loss bce_tversky_image
set -euo pipefail
SHARED=${1:?folder holding figshare/ and figshare256/}; F1=${2:?F1 run folder}; OUT=${3:?output folder}
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
# brainseg's refit of F1 on this data: F1's config and schedule up to its best epoch, no validation,
# and F1's tuned threshold and post-processing (a refit has no validation images of its own).
[ -f "$RUN/model.pt" ] || brainseg train --refit "$F1" --data "$OUT/figshare_all.yaml" \
  --split "$OUT/split.json" --out "$RUN" "$@"
[ "$HOLD_OUT" = all ] || brainseg compare "${AGAINST:-$F1}" "$RUN" --data "$OUT/figshare_all.yaml" --split test \
  --split-file "$OUT/split.json" --group-by index-block:16 --out "$OUT/compare_test"
