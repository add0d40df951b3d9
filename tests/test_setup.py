"""scripts/setup.sh picks the torch build that fits the machine (scripts/torch_index.sh).

The choice runs with a fake PATH (a fake `nvidia-smi` that lists a GPU, fails, or is absent) and a
file:// CPU index that exists or not, so nothing here touches the network or installs anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")
MACOS = sys.platform == "darwin"  # the default torch wheel is the CPU build there: no index to choose

WORKING_GPU = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-fake)'\n"
BROKEN_DRIVER = "#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver.'\nexit 9\n"
NO_DEVICES = "#!/bin/sh\necho 'No devices were found'\n"


def fake_bin(tmp_path: Path, nvidia_smi: str | None) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        tool = folder / "nvidia-smi"
        tool.write_text(nvidia_smi)
        tool.chmod(0o755)
    return folder


def cpu_index(tmp_path: Path, reachable: bool = True) -> str:
    folder = tmp_path / "cpu-index"
    if reachable:
        folder.mkdir(exist_ok=True)
    return folder.as_uri()


def choose(tmp_path: Path, *, nvidia_smi: str | None = None, forced: str | None = None,
           index: str | None = None) -> subprocess.CompletedProcess:
    """`scripts/torch_index.sh --print-choice` with only the fake bin folder on PATH."""
    env = {"PATH": str(fake_bin(tmp_path, nvidia_smi)), "PYTHON": sys.executable,
           "BRAINSEG_TORCH_CPU_INDEX": index or cpu_index(tmp_path), "BRAINSEG_TORCH_PROBE_SECONDS": "5"}
    if forced is not None:
        env["BRAINSEG_TORCH"] = forced
    return subprocess.run([BASH, str(REPO / "scripts" / "torch_index.sh"), "--print-choice"], env=env,
                          capture_output=True, text=True, timeout=60)


def choice(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def cpu_args(index: str) -> str:
    return "" if MACOS else f"--index-url {index}"


@pytest.mark.parametrize("nvidia_smi", [None, BROKEN_DRIVER, NO_DEVICES],
                         ids=["absent", "failing", "no-devices"])
def test_cpu_build_from_the_cpu_index_without_a_working_gpu(tmp_path, nvidia_smi):
    index = cpu_index(tmp_path)
    picked = choice(choose(tmp_path, nvidia_smi=nvidia_smi, index=index))
    assert picked == {"variant": "cpu", "reason": "no working nvidia-smi", "pip_args": cpu_args(index),
                      "note": picked["note"] if MACOS else ""}


def test_default_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    picked = choice(choose(tmp_path, nvidia_smi=WORKING_GPU))
    assert picked == {"variant": "cuda", "reason": "nvidia-smi lists a GPU", "pip_args": "", "note": ""}


def test_forced_cpu_on_a_gpu_machine(tmp_path):
    index = cpu_index(tmp_path)
    picked = choice(choose(tmp_path, nvidia_smi=WORKING_GPU, forced="cpu", index=index))
    assert (picked["variant"], picked["reason"], picked["pip_args"]) == ("cpu", "BRAINSEG_TORCH=cpu",
                                                                         cpu_args(index))


def test_forced_cuda_without_a_gpu(tmp_path):
    picked = choice(choose(tmp_path, forced="cuda"))
    assert picked == {"variant": "cuda", "reason": "BRAINSEG_TORCH=cuda", "pip_args": "", "note": ""}


def test_empty_value_detects(tmp_path):
    assert choice(choose(tmp_path, nvidia_smi=WORKING_GPU, forced=""))["variant"] == "cuda"


@pytest.mark.skipif(MACOS, reason="no CPU index is used on macOS")
def test_unreachable_cpu_index_falls_back_to_the_local_pip_configuration(tmp_path):
    index = cpu_index(tmp_path, reachable=False)
    picked = choice(choose(tmp_path, index=index))
    assert (picked["variant"], picked["pip_args"]) == ("cpu", "")
    assert picked["note"] == (f"CPU wheel index {index} unreachable: installing torch from this machine's "
                              "pip configuration")


@pytest.mark.parametrize("value", ["rocm", "CPU", "gpu"])
def test_bad_value_is_one_line_and_exit_2(tmp_path, value):
    result = choose(tmp_path, forced=value)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"BRAINSEG_TORCH must be cpu or cuda (or unset to detect), not '{value}'\n"


# setup.sh itself, in a copy of the repository whose .venv/bin/python is a fake that logs its arguments
# (it hands the index probe, `python -`, to the real interpreter), so nothing is installed.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "{log}"
case "$1" in
  -) exec "{python}" "$@" ;;
  -c) [ -n "$FAKE_TORCH_VERSION" ] && echo "$FAKE_TORCH_VERSION" && exit 0; exit 1 ;;
esac
exit 0
"""


def setup(tmp_path: Path, *, nvidia_smi: str = BROKEN_DRIVER, forced: str | None = None,
          installed: str = "", reachable: bool = True) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "torch_index.sh"):
        shutil.copy2(REPO / "scripts" / name, repo / "scripts" / name)
    shutil.copy2(REPO / "constraints.txt", repo / "constraints.txt")
    log = tmp_path / "python.log"
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(log=log, python=sys.executable))
    python.chmod(0o755)
    env = {"PATH": f"{fake_bin(tmp_path, nvidia_smi)}{os.pathsep}{os.environ['PATH']}",
           "BRAINSEG_TORCH_CPU_INDEX": cpu_index(tmp_path, reachable), "FAKE_TORCH_VERSION": installed}
    if forced is not None:
        env["BRAINSEG_TORCH"] = forced
    result = subprocess.run([BASH, str(repo / "scripts" / "setup.sh"), "dev"], env=env, capture_output=True,
                            text=True, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def pin() -> str:
    return next(line for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.startswith("torch=="))


@pytest.mark.skipif(MACOS, reason="no CPU index is used on macOS")
def test_setup_installs_the_cpu_build_from_the_cpu_index(tmp_path):
    result, calls = setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch: the cpu build (no working nvidia-smi)"]
    index = cpu_index(tmp_path)
    assert f"-m pip install --quiet -c constraints.txt --index-url {index} {pin()}" in calls
    assert "-m pip install --quiet -c constraints.txt -e .[dev]" in calls


def test_setup_says_when_it_falls_back(tmp_path):
    result, calls = setup(tmp_path, reachable=False)
    assert result.returncode == 0, result.stderr
    if not MACOS:
        assert "unreachable: installing torch from this machine's pip configuration" in result.stdout
    assert f"-m pip install --quiet -c constraints.txt {pin()}" in calls


def test_setup_installs_the_default_build_on_a_gpu_machine(tmp_path):
    result, calls = setup(tmp_path, nvidia_smi=WORKING_GPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch: the cuda build (nvidia-smi lists a GPU)"]
    assert f"-m pip install --quiet -c constraints.txt {pin()}" in calls


def test_setup_keeps_an_installed_torch_at_the_pin(tmp_path):
    version = pin().removeprefix("torch==") + "+cpu"
    result, calls = setup(tmp_path, nvidia_smi=WORKING_GPU, installed=version)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"torch {version} is installed")
    assert not [call for call in calls if pin() in call]


def test_setup_swaps_the_build_when_forced(tmp_path):
    version = pin().removeprefix("torch==") + "+cpu"
    result, calls = setup(tmp_path, forced="cuda", installed=version)
    assert result.returncode == 0, result.stderr
    uninstall = calls.index("-m pip uninstall --quiet --yes torch")
    assert calls.index(f"-m pip install --quiet -c constraints.txt {pin()}") > uninstall


def test_setup_refuses_a_bad_value_before_doing_anything(tmp_path):
    result, calls = setup(tmp_path, forced="rocm")
    assert result.returncode == 2
    assert result.stderr == "BRAINSEG_TORCH must be cpu or cuda (or unset to detect), not 'rocm'\n"
    assert calls == []
