# Sourced by the experiment scripts. resume_or_clear RUN: a run stopped part-way (a kill, the end of a
# session) goes on from its last epoch (status 0 once it has its model.pt); one stopped before its first
# epoch ended has nothing to keep and is removed (status 1: train it from the start). A resume that
# fails (another signal, a damaged checkpoint) ends the calling script with brainseg's status and keeps
# the run folder, so that nothing trained is thrown away.
resume_or_clear() {
  if [ -f "$1/checkpoints/last.ckpt" ]; then
    brainseg train --resume "$1" || exit $?
    return 0
  fi
  rm -rf "$1"
  return 1
}
