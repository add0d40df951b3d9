"""Scaling out: training on two nodes through torchrun (two launches on loopback, gloo on CPU), the launch
checks and run_info.json, and sharded prediction joined by `brainseg merge`."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from brainseg.config import RunConfig, TrainConfig
from brainseg.data.synth import synthesize
from brainseg.errors import BadInputError, OptionError
from brainseg.inference import Predictor
from brainseg.predict import Case, parse_shard, predict_paths, take_shard
from brainseg.predict_merge import merge_predictions
from brainseg.runs.folder import load_run_config
from brainseg.training import RANK_VARIABLES, _is_rank_zero, check_launch
from conftest import write_png

# Small enough that two launches of two processes each train and validate an epoch in seconds.
TINY = {"data.image_size": 32, "model.base_filters": 4, "model.depth": 3, "train.batch_size": 4,
        "data.val": 0.34, "data.test": 0.0, "data.samples_per_epoch": 16, "train.precision": "32-true"}


def torchrun() -> str | None:
    beside = Path(sys.executable).parent / "torchrun"
    return str(beside) if beside.exists() else shutil.which("torchrun")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(args: list[str], cache: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`brainseg ARGS` as two torchrun nodes of one process each, on 127.0.0.1, with a slice cache of
    their own (a module fixture runs before the per-test cache is set)."""
    launcher = torchrun()
    if launcher is None or not torch.distributed.is_available():
        pytest.skip("torchrun (torch.distributed) is not available here")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BRAINSEG_CACHE": str(cache)}
    nodes = [subprocess.Popen([launcher, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "brainseg.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
             for rank in (0, 1)]
    done = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    return done


def tiny_args(data: Path, *extra: str) -> list[str]:
    args = ["--data", str(data), "--accelerator", "cpu", *extra]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """A run trained for one epoch by two torchrun nodes: (data, run folder, the two nodes' results)."""
    root = tmp_path_factory.mktemp("two-nodes")
    data = synthesize(root / "data", patients=3, seed=0, size=64, slices=(4, 5))
    run = root / "run"
    nodes = launch_two_nodes(["train", "--out", str(run), "--epochs", "1", "--num-nodes", "2",
                              *tiny_args(data)], root / "cache")
    return data, run, nodes


def test_two_torchrun_nodes_train_one_complete_loadable_run(two_node_run):
    data, run, nodes = two_node_run
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: {node.stderr[-3000:]}"
    for name in ("config.yaml", "split.json", "history.csv", "learning_curves.png", "model.pt",
                 "val_metrics.json", "val_patients.csv", "run_info.json", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1  # one writer, not one per node
    assert not list(run.rglob("*.partial")) and not list(run.rglob("*-v1.ckpt"))
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0]  # one row: rank 0 alone writes it
    assert load_run_config(run).train.num_nodes == 2

    info = json.loads((run / "run_info.json").read_text())
    assert info["launcher"] == "TorchElasticEnvironment"
    assert (info["nodes"], info["processes_per_node"], info["processes"]) == (2, 1, 2)
    assert info["effective_batch_size"] == 2 * TINY["train.batch_size"]
    assert info["lr"] == RunConfig().train.lr and info["lr_scaling"].startswith("none")
    # Each process steps through its own half of the epoch's samples (Lightning's distributed sampler
    # around the weighted one), not all of them.
    samples = TINY["data.samples_per_epoch"]
    assert info["samples_per_epoch"] == samples
    assert info["steps_per_epoch"] == math.ceil(samples / 2 / TINY["train.batch_size"])
    assert len(info["sessions"]) == 1

    line = "effective batch size 4 x 2 = 8"
    assert line in nodes[0].stderr and line not in nodes[1].stderr  # said once, by rank 0
    predictor = Predictor.from_checkpoint(run, precision="32")  # the model file loads and predicts
    image = np.asarray(Image.open(sorted(data.glob("*/*_1.tif"))[0]))
    assert predictor.predict_volume(image[None]).shape == (1, *image.shape[:2])


def test_two_torchrun_nodes_resume_the_run(two_node_run, tmp_path):
    _, trained, nodes = two_node_run
    assert all(node.returncode == 0 for node in nodes)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    resumed = launch_two_nodes(["train", "--resume", str(run), "--epochs", "2", "--num-nodes", "2"],
                               tmp_path / "cache")
    for rank, node in enumerate(resumed):
        assert node.returncode == 0, f"node {rank}: {node.stderr[-3000:]}"
    assert "resuming from" in resumed[0].stderr and "resuming from" not in resumed[1].stderr
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1]
    info = json.loads((run / "run_info.json").read_text())
    assert [s["first_epoch"] for s in info["sessions"]] == [0, 1]
    assert info["resumed_from"].endswith("last.ckpt") and info["processes"] == 2
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.fixture
def clean_ranks(monkeypatch):
    for name in (*RANK_VARIABLES, "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
                 "SLURM_NNODES", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_only_the_process_every_launcher_calls_rank_0_writes(clean_ranks):
    assert _is_rank_zero()
    for name, value in (("RANK", "1"), ("NODE_RANK", "1"), ("LOCAL_RANK", "1"), ("SLURM_PROCID", "3"),
                        ("GROUP_RANK", "1")):
        clean_ranks.setenv(name, value)
        assert not _is_rank_zero(), name
        clean_ranks.setenv(name, "0")
    assert _is_rank_zero()


def test_devices_and_nodes_must_match_what_the_launcher_started(clean_ranks):
    for name, value in (("RANK", "0"), ("GROUP_RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                        ("WORLD_SIZE", "4"), ("TORCHELASTIC_RUN_ID", "none")):
        clean_ranks.setenv(name, value)
    check_launch(TrainConfig(devices=2, num_nodes=2))
    with pytest.raises(OptionError, match=r"torchrun started 4 processes \(2 per node\) but --devices 1 x "
                                          r"--num-nodes 1 is 1; .*\(here --devices 2 --num-nodes 2\)"):
        check_launch(TrainConfig())
    with pytest.raises(OptionError, match="--devices 4 x --num-nodes 2 is 8"):
        check_launch(TrainConfig(devices=4, num_nodes=2))


def test_slurm_tasks_must_match_devices_and_nodes(clean_ranks):
    for name, value in (("SLURM_NTASKS", "4"), ("SLURM_NTASKS_PER_NODE", "2"), ("SLURM_NNODES", "2"),
                        ("SLURM_JOB_NAME", "train"), ("SLURM_PROCID", "0")):
        clean_ranks.setenv(name, value)
    check_launch(TrainConfig(devices=2, num_nodes=2))
    with pytest.raises(OptionError, match="SLURM runs SLURM_NNODES=2 but --num-nodes is 1"):
        check_launch(TrainConfig(devices=2))
    clean_ranks.setenv("SLURM_PROCID", "1")  # a second task of `srun` running a one-process run
    with pytest.raises(OptionError, match="one of several processes"):
        check_launch(TrainConfig())


def test_num_nodes_is_range_checked():
    assert RunConfig().train.num_nodes == 1
    with pytest.raises(OptionError, match=r"train\.num_nodes must be at least 1"):
        RunConfig().override({"train.num_nodes": 0})


def test_a_one_process_run_records_its_batch_and_lr(tiny_run):
    _, run = tiny_run
    info = json.loads((run / "run_info.json").read_text())
    config = load_run_config(run)
    assert (info["processes"], info["nodes"]) == (1, 1)
    assert info["effective_batch_size"] == config.train.batch_size and info["lr"] == config.train.lr


# Sharded prediction.

@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", "1/2/3", "-1/2", "1.5/2", ""])
def test_bad_shards_are_option_errors(text):
    with pytest.raises(OptionError, match=r"^--shard must be K/N with whole numbers 1 <= K <= N"):
        parse_shard(text)


def test_shares_are_disjoint_whole_and_the_same_whatever_the_order():
    cases = [Case("image", f"case{i:02d}", [Path(f"/in/case{i:02d}.png")]) for i in range(7)]
    cases.append(BadInputError("/in/missing.png", "does not exist"))
    shares = [take_shard(cases, k, 3) for k in (1, 2, 3)]
    assert sorted(len(share) for share in shares) == [2, 3, 3]
    names = [{getattr(c, "name", None) or c.path.name for c in share} for share in shares]
    assert set.union(*names) == {f"case{i:02d}" for i in range(7)} | {"missing.png"}
    assert sum(len(n) for n in names) == len(cases)
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    assert [{id(c) for c in take_shard(shuffled, k, 3)} for k in (1, 2, 3)] == [{id(c) for c in share}
                                                                              for share in shares]
    assert take_shard(cases, 1, 1) == cases


@pytest.fixture
def batch(tiny_run, tmp_path):
    """Inputs of every kind predict takes from a folder: three synthetic patients, two images, a broken
    file."""
    data, _ = tiny_run
    patients = sorted(p for p in data.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    files = tmp_path / "files"
    write_png(files / "a.png", rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    write_png(files / "b.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (files / "broken.png").write_bytes(b"\x89PNG broken")
    return [*patients, files]


def masks_of(row: pd.Series) -> dict[str, np.ndarray]:
    path = Path(row["mask"])
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {file.name: np.asarray(Image.open(file)) for file in files}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainseg.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_two_shards_merged_equal_one_unsharded_run(tiny_run, batch, tmp_path):
    _, run = tiny_run
    whole = predict_paths(run, batch, tmp_path / "whole", progress=False, echo=lambda _: None)
    shards = [predict_paths(run, batch, tmp_path / f"shard{k}", shard=f"{k}/2", progress=False,
                            echo=lambda _: None) for k in (1, 2)]
    assert sorted(len(s) for s in shards) == [3, 3] and len(whole) == 6
    assert not set(shards[0]["case"]) & set(shards[1]["case"])
    settings = json.loads((tmp_path / "shard2" / "predictions.json").read_text())
    assert settings["shard"] == "2/2" and settings["shard_of"] == 6 and settings["cases"] == 3

    merged_cli = run_cli("merge", str(tmp_path / "shard2"), str(tmp_path / "shard1"), "--out",
                         str(tmp_path / "merged"))
    assert merged_cli.returncode == 0, merged_cli.stderr
    assert "6 cases (1 failed) from 2 shards" in merged_cli.stdout
    merged = pd.read_csv(tmp_path / "merged" / "predictions.csv").set_index("case").sort_index()
    unsharded = pd.read_csv(tmp_path / "whole" / "predictions.csv").set_index("case").sort_index()
    pd.testing.assert_frame_equal(merged.drop(columns="mask"), unsharded.drop(columns="mask"))
    for case, row in unsharded[unsharded["status"] == "ok"].iterrows():
        assert Path(merged.loc[case, "mask"]).parent.parent.name in ("shard1", "shard2")
        mine, theirs = masks_of(merged.loc[case]), masks_of(row)
        assert mine.keys() == theirs.keys() and mine
        assert all(np.array_equal(mine[name], theirs[name]) for name in mine), case
    summary = json.loads((tmp_path / "merged" / "predictions.json").read_text())
    whole_settings = json.loads((tmp_path / "whole" / "predictions.json").read_text())
    assert {k: summary[k] for k in whole_settings} == whole_settings  # same model, settings and counts
    assert [s["shard"] for s in summary["shards"]] == ["1/2", "2/2"] and summary["missing_shards"] == []
    assert "shard" not in summary  # a merge is not a shard: merging it again is refused


def test_merge_refuses_missing_doubled_and_foreign_shards(tiny_run, batch, tmp_path):
    _, run = tiny_run
    quiet = {"progress": False, "echo": lambda _: None}
    for k in (1, 2):
        predict_paths(run, batch, tmp_path / f"s{k}", shard=f"{k}/3", **quiet)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    with pytest.raises(OptionError, match=r"^shard 3/3 missing: give the folders of all 3 shards"):
        merge_predictions([s1, s2], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    partial = merge_predictions([s1, s2], tmp_path / "m", allow_missing=True)
    assert partial["missing_shards"] == ["3/3"] and partial["cases"] == 4
    missing_cli = run_cli("merge", str(s1), "--out", str(tmp_path / "m2"))
    assert missing_cli.returncode == 2
    assert missing_cli.stderr.strip() == ("error: shards 2/3, 3/3 missing: give the folders of all 3 shards "
                                          "(or --allow-missing to merge those given)")

    shutil.copytree(s1, tmp_path / "again")
    with pytest.raises(BadInputError, match=r"is shard 1/3, as .*s1 is"):
        merge_predictions([s1, tmp_path / "again"], tmp_path / "m3", allow_missing=True)

    doubled = tmp_path / "doubled"  # shard 2 with a case of shard 1 added
    shutil.copytree(s2, doubled)
    extra = pd.read_csv(s1 / "predictions.csv").iloc[:1]
    extra.to_csv(doubled / "predictions.csv", mode="a", header=False, index=False)
    settings = json.loads((doubled / "predictions.json").read_text())
    (doubled / "predictions.json").write_text(json.dumps({**settings, "cases": settings["cases"] + 1}))
    with pytest.raises(BadInputError, match=rf"holds case '{extra['case'][0]}' .*a case in two shards"):
        merge_predictions([s1, doubled], tmp_path / "m4", allow_missing=True)

    other = predict_paths(run, batch[:2], tmp_path / "other", shard="3/3", **quiet)  # another batch
    assert len(other) == 0
    with pytest.raises(BadInputError, match="shards of different batches"):
        merge_predictions([s1, s2, tmp_path / "other"], tmp_path / "m5")
    predict_paths(run, batch, tmp_path / "s3", shard="3/3", threshold=0.9, **quiet)
    with pytest.raises(BadInputError, match=r"was predicted with threshold 0\.9.*shards of different"):
        merge_predictions([s1, s2, tmp_path / "s3"], tmp_path / "m6")
    with pytest.raises(BadInputError, match="was not predicted with --shard K/N"):
        merge_predictions([tmp_path / "m"], tmp_path / "m7")
    with pytest.raises(BadInputError, match="not the --out of a finished brainseg predict"):
        merge_predictions([tmp_path / "files"], tmp_path / "m8")


def test_a_bad_shard_is_a_one_line_error_before_anything_is_written(tmp_path):
    result = run_cli("predict", str(tmp_path), "--shard", "3/2", "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --shard must be K/N with whole numbers 1 <= K <= N, e.g. 2/4; "
                                     "got '3/2'")
    assert not (tmp_path / "never").exists()


def test_each_process_validates_slices_of_its_own_and_augments_in_a_stream_of_its_own(tmp_path):
    from types import SimpleNamespace

    from brainseg.data.index import scan
    from brainseg.training import SliceDataModule

    data = synthesize(tmp_path / "data", patients=2, seed=0, size=64, slices=(5, 6))
    result = scan(data)
    config = RunConfig().override({**TINY, "data.root": str(data), "augment.intensity": True})
    table = result.table
    modules = []
    for rank in (0, 1):
        module = SliceDataModule(config, table, table, result.store, workers=0)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        modules.append(module)
    shares = [list(module.val_dataloader().sampler) for module in modules]
    assert not set(shares[0]) & set(shares[1])  # no slice scored twice (a padded sampler repeats one)
    assert sorted(shares[0] + shares[1]) == list(range(len(table)))
    loaders = [module.train_dataloader() for module in modules]
    # The weighted draw is the same in both (Lightning deals it out); the augmentation is not.
    assert list(loaders[0].sampler) == list(loaders[1].sampler)
    first = [module.train_set[0]["image"] for module in modules]
    assert not torch.equal(first[0], first[1])
    assert loaders[0].generator.initial_seed() != loaders[1].generator.initial_seed()
