"""Distillation (brainseg distill): a student trained on a teacher's probabilities, on tiny data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from brainseg.cli import app
from brainseg.config import RunConfig
from brainseg.data.dataset import SliceDataset, collate
from brainseg.data.index import scan
from brainseg.errors import BrainsegError
from brainseg.inference import Predictor
from brainseg.losses import DistillationLoss, create_loss
from brainseg.runs.model_file import build_network, file_digest, load_model_file
from brainseg.training import SegmentationModule, Teacher, distill, load_teacher

# the tiny_run teacher's settings (conftest.TINY_TRAINING): 64x64 slices, 4 base filters, depth 3
STUDENT = {"data.image_size": 64, "model.base_filters": 4, "model.depth": 3, "train.batch_size": 8,
           "data.val": 0.34, "data.test": 0.0, "data.samples_per_epoch": 16, "train.precision": "32-true",
           "train.epochs": 1}
runner = CliRunner()


def test_distilled_student_is_a_complete_run_that_names_its_teacher(tiny_run, tmp_path):
    data, teacher = tiny_run
    result = distill(teacher, tmp_path / "student", overrides={**STUDENT, "data.root": str(data),
                                                               "model.base_filters": 2}, progress=False)
    run = result.run_dir
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["teacher"] == str(teacher) and config["train"]["distill_weight"] == 0.5
    description, _ = load_model_file(run)
    assert description["teacher"]["file"] == str(teacher / "model.pt")
    assert description["teacher"]["sha256_16"] == file_digest(teacher / "model.pt")
    assert description["model"]["kwargs"]["base_filters"] == 2  # the student's network, not the teacher's
    mask = Predictor.load(run).predict((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    assert mask.shape == (64, 64)


def small_batch(data, size: int = 64, teacher: Teacher | None = None):
    result = scan(data, progress=False)
    dataset = SliceDataset(result.table.head(4), result.store, image_size=size)
    if teacher is not None:
        dataset.soft_targets = teacher.label(dataset, progress=False)
    return collate([dataset[i] for i in range(4)])


def test_weight_one_trains_on_the_teachers_probabilities_alone(tiny_run):
    data, teacher_run = tiny_run
    config = RunConfig().override({**STUDENT, "data.root": str(data), "train.teacher": str(teacher_run),
                                   "train.distill_weight": 1.0})
    split = {"train": [], "val": [], "test": []}
    teacher = load_teacher(config, 3, split)
    module = SegmentationModule(config.to_dict(), 3, [], teacher_identity=teacher.identity)
    batch = small_batch(data, teacher=teacher)
    logits, loss = module.training_loss(batch)
    description, weights = load_model_file(teacher_run)
    network = build_network(teacher_run, description, weights).eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(network(batch["image"]))
    # labelled once before training, in steps of 1/255
    assert (batch["teacher"] - probabilities).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, batch["teacher"]))
    loss.backward()
    # the gradient reaches the student only, and the truth plays no part: another mask, the same loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert all(p.grad is None for p in teacher.network.parameters())
    assert not teacher.network.training and "teacher" not in " ".join(module.state_dict())
    module.eval()  # no dropout: two calls give the same logits
    flipped = {**batch, "mask": 1 - batch["mask"]}
    assert torch.allclose(module.training_loss(batch)[1], module.training_loss(flipped)[1])


def test_distillation_loss_mixes_truth_and_teacher():
    torch.manual_seed(0)
    logits, truth = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    soft = torch.rand(2, 1, 8, 8)
    base = create_loss("bce_dice")
    mixed = DistillationLoss(base, 0.25)(logits, truth, soft)
    expected = 0.75 * base(logits, truth) + 0.25 * F.binary_cross_entropy_with_logits(logits, soft)
    assert torch.allclose(mixed, expected)
    assert torch.allclose(DistillationLoss(base, 0.0)(logits, truth, soft), base(logits, truth))


def test_a_teacher_of_another_size_gets_resized_input_and_gives_logits_at_the_students_size():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(tuple(images.shape))
            return images[:, :1] * 2 - 1

    logits = Teacher(Recorder(), 32, {}).logits(torch.rand(2, 3, 64, 64))
    assert seen == [(2, 3, 32, 32)] and logits.shape == (2, 1, 64, 64)


def refusal(tiny_run, tmp_path, verb: str = "distill", **settings) -> str:
    """The error of `brainseg distill TEACHER` (or `brainseg train --set train.teacher=TEACHER`)."""
    data, teacher = tiny_run
    named = [verb, str(teacher)] if verb == "distill" else [verb, f"--set=train.teacher={teacher}"]
    args = [*named, "--data", str(data), "--out", str(tmp_path / "student"),
            "--image-size", "64", "--base-filters", "4", "--depth", "3", "--epochs", "1",
            "--precision", "32"] + [f"--set={key}={value}" for key, value in
                                    {"data.val": 0.34, "data.test": 0.0, **settings}.items()]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, BrainsegError), result.output
    assert not (tmp_path / "student").exists()  # refused before anything is written
    return str(result.exception)


def test_a_teacher_with_other_channels_or_normalisation_is_refused(tiny_run, tmp_path):
    _, teacher = tiny_run
    message = refusal(tiny_run, tmp_path, **{"data.context": 1})
    assert "\n" not in message and str(teacher) in message and "9 (context 1)" in message
    for verb in ("distill", "train"):
        message = refusal(tiny_run, tmp_path, verb, **{"data.normalize": "divide255"})
        assert "\n" not in message and str(teacher) in message and "divide255" in message


def test_a_teacher_that_saw_the_students_test_patients_is_refused(tiny_run, tmp_path):
    _, teacher = tiny_run
    trained = yaml.safe_load((teacher / "split.json").read_text())["train"]  # JSON is YAML
    message = refusal(tiny_run, tmp_path, **{"data.test_patients": f"[{trained[0]}]"})
    assert "\n" not in message and str(teacher) in message and trained[0] in message
