"""The experiment scripts' shared resume step (scripts/resume_run.sh), with a stand-in brainseg."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def finished_or_resumed(tmp_path: Path, run: Path, brainseg_status: int) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "brainseg"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nexit {brainseg_status}\n')
    fake.chmod(0o755)
    script = (f'set -euo pipefail; source {SCRIPTS}/resume_run.sh\n'
              f'finished_or_resumed {run} && echo "status 0" || echo "status $?"')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"})


def a_run(tmp_path: Path, *, checkpoint: bool) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    if checkpoint:
        (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return run


def test_a_run_with_a_checkpoint_is_resumed(tmp_path):
    run = a_run(tmp_path, checkpoint=True)
    done = finished_or_resumed(tmp_path, run, 0)
    assert done.stdout.strip() == "status 0" and (run / "config.yaml").exists()
    assert (tmp_path / "calls").read_text().split() == ["train", "--resume", str(run)]


@pytest.mark.parametrize("status", [143, 2])  # stopped by a signal again; a checkpoint that does not load
def test_a_failed_resume_stops_the_script_and_keeps_the_run(tmp_path, status):
    run = a_run(tmp_path, checkpoint=True)
    done = finished_or_resumed(tmp_path, run, status)
    assert done.returncode == status and "status" not in done.stdout
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_a_finished_run_is_left_as_it_is(tmp_path):
    run = a_run(tmp_path, checkpoint=True)
    (run / "model.pt").write_bytes(b"model")
    done = finished_or_resumed(tmp_path, run, 0)
    assert done.stdout.strip() == "status 0" and (run / "model.pt").exists()
    assert not (tmp_path / "calls").exists()


def test_a_run_stopped_before_its_first_epoch_is_cleared(tmp_path):
    run = a_run(tmp_path, checkpoint=False)
    done = finished_or_resumed(tmp_path, run, 0)
    assert done.stdout.strip() == "status 1" and not run.exists()
    assert not (tmp_path / "calls").exists()
