#!/usr/bin/env bash
# Which torch build scripts/setup.sh installs, and from where. Sourced by setup.sh; run it to see the
# choice without installing anything:   scripts/torch_index.sh --print-choice
#
#   BRAINSEG_TORCH=cpu|cuda      force a build (unset: cuda where `nvidia-smi -L` lists a GPU, else cpu)
#   BRAINSEG_TORCH_CPU_INDEX     the CPU wheel index (default PyTorch's; a mirror, or file:// for tests)
#   BRAINSEG_TORCH_PROBE_SECONDS how long to wait for that index before falling back (default 10)
#
# cpu installs from PyTorch's CPU wheel index (`--index-url`, as PyTorch documents), which also
# serves torch's dependencies; where that index cannot be reached it falls back to a plain install
# from this machine's pip configuration (local wheels, a mirror), and says so. cuda is a plain
# install: on Linux the default torch wheel is the CUDA build. On macOS the default wheel is the
# CPU build, so cpu is a plain install there too.

BRAINSEG_TORCH_DEFAULT_CPU_INDEX="https://download.pytorch.org/whl/cpu"

# 0 if BRAINSEG_TORCH is unset, empty, cpu or cuda; otherwise one line on stderr and 2.
torch_check_env() {
  case "${BRAINSEG_TORCH:-}" in
    "" | cpu | cuda) return 0 ;;
    *)
      echo "BRAINSEG_TORCH must be cpu or cuda (or unset to detect), not '${BRAINSEG_TORCH}'" >&2
      return 2
      ;;
  esac
}

# 0 where a working nvidia-smi lists at least one GPU.
torch_has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  local listing
  if command -v timeout >/dev/null 2>&1; then
    listing="$(timeout 20 nvidia-smi -L 2>/dev/null)" || return 1
  else
    listing="$(nvidia-smi -L 2>/dev/null)" || return 1
  fi
  [[ "$listing" == *GPU* ]]
}

# 0 where the package index $1 answers within BRAINSEG_TORCH_PROBE_SECONDS (file:// URLs: the folder exists).
torch_index_reachable() {
  "${PYTHON:-python3}" - "$1" "${BRAINSEG_TORCH_PROBE_SECONDS:-10}" <<'PY' >/dev/null 2>&1
import os
import sys
import urllib.parse
import urllib.request

index, seconds = sys.argv[1].rstrip("/"), float(sys.argv[2])
parts = urllib.parse.urlparse(index)
if parts.scheme == "file":
    sys.exit(0 if os.path.isdir(urllib.request.url2pathname(parts.path)) else 1)
with urllib.request.urlopen(index + "/torch/", timeout=seconds) as answer:
    answer.read(1)
PY
}

# Sets torch_variant (cpu|cuda), torch_reason, torch_note (empty unless falling back) and the array
# torch_pip_args (index options for `pip install torch==...`). Returns 2 on a bad BRAINSEG_TORCH.
torch_choice() {
  torch_check_env || return 2
  torch_pip_args=()
  torch_note=""
  if [ -n "${BRAINSEG_TORCH:-}" ]; then
    torch_variant="$BRAINSEG_TORCH"
    torch_reason="BRAINSEG_TORCH=$BRAINSEG_TORCH"
  elif torch_has_nvidia_gpu; then
    torch_variant=cuda
    torch_reason="nvidia-smi lists a GPU"
  else
    torch_variant=cpu
    torch_reason="no working nvidia-smi"
  fi
  [ "$torch_variant" = cpu ] || return 0
  local index="${BRAINSEG_TORCH_CPU_INDEX:-$BRAINSEG_TORCH_DEFAULT_CPU_INDEX}"
  if [[ "${OSTYPE:-}" == darwin* ]]; then
    torch_note="macOS: the default torch wheel is the CPU build"
  elif torch_index_reachable "$index"; then
    torch_pip_args=(--index-url "$index")
  else
    torch_note="CPU wheel index $index unreachable: installing torch from this machine's pip configuration"
  fi
}

# Prints the choice as key=value lines: variant, reason, pip_args, note.
torch_print_choice() {
  torch_choice || return $?
  echo "variant=$torch_variant"
  echo "reason=$torch_reason"
  echo "pip_args=${torch_pip_args[*]+${torch_pip_args[*]}}"  # bash 3.2 (macOS): an empty array is unset
  echo "note=$torch_note"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  case "${1:-}" in
    --print-choice) torch_print_choice; exit $? ;;
    *) echo "usage: $0 --print-choice" >&2; exit 2 ;;
  esac
fi
