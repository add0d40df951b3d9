# Sourced by the experiment scripts. finished_or_resumed RUN: status 0 when RUN has its model.pt, or once
# a run stopped part-way (a kill, the end of a session) has gone on from its last epoch and written it;
# a run stopped before its first epoch ended has nothing to keep and is removed (status 1: train it from
# the start). A resume that fails (another signal, a damaged checkpoint) ends the calling script with
# brainseg's status and keeps the run folder, so that nothing trained is thrown away.
finished_or_resumed() {
  [ -f "$1/model.pt" ] && return 0
  if [ -f "$1/checkpoints/last.ckpt" ]; then
    brainseg train --resume "$1" || exit $?
    return 0
  fi
  rm -rf "$1"
  return 1
}
