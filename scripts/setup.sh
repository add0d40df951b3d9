#!/usr/bin/env bash
# Create .venv and install brainseg into it. torch is installed first, in the build that fits the
# machine (scripts/torch_index.sh: the CPU build unless nvidia-smi lists a GPU; BRAINSEG_TORCH=cpu|cuda
# forces one), at the version pinned in constraints.txt, which then holds it there so that no
# dependency can pull another torch (and its CUDA wheels).
# Usage: scripts/setup.sh [extra]   e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/torch_index.sh
source scripts/torch_index.sh
torch_check_env || exit 2
extra="${1:-}"
python="${PYTHON:-python3}"
pin="$(grep -m1 -E '^torch==' constraints.txt)" || { echo "constraints.txt pins no torch" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
installed="$(.venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))' \
  2>/dev/null || true)"
if [[ "$installed" == *+cpu* || "${OSTYPE:-}" == darwin* ]]; then installed_build=cpu; else installed_build=cuda; fi
if [ "${installed%%+*}" = "${pin#torch==}" ] && [ -z "${BRAINSEG_TORCH:-}" ]; then
  echo "torch $installed is installed (BRAINSEG_TORCH=cpu|cuda scripts/setup.sh installs another build)"
else
  PYTHON=.venv/bin/python torch_choice
  echo "torch: the $torch_variant build ($torch_reason)"
  if [ -n "$torch_note" ]; then echo "$torch_note"; fi
  if [ "${installed%%+*}" = "${pin#torch==}" ] && [ "$installed_build" != "$torch_variant" ]; then
    .venv/bin/python -m pip uninstall --quiet --yes torch
  fi
  # ${a[@]+"${a[@]}"}: an empty array under set -u in bash 3.2 (macOS)
  .venv/bin/python -m pip install --quiet -c constraints.txt \
    ${torch_pip_args[@]+"${torch_pip_args[@]}"} "$pin"
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".${extra:+[$extra]}"
