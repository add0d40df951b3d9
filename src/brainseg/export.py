"""Export a trained model to ONNX (dynamic batch), with its description embedded as metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from brainseg.errors import BadInputError, OptionError

METADATA_KEY = "brainseg"
FORMATS = ("onnx",)


def export_model(model: str | Path, out: str | Path | None = None, *, fmt: str = "onnx",
                 opset: int = 17) -> dict:
    """Write `out` (default: beside the model, model.onnx) and check it against torch."""
    from brainseg.prediction import MODEL_FILE, load_model_file, resolve_model_path

    if fmt not in FORMATS:
        raise OptionError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    source = resolve_model_path(model)
    description, weights = load_model_file(source)
    if out is None:  # beside the model, but never inside the installed package
        out = Path("pretrained.onnx") if str(model) == "pretrained" else (
            (source if source.is_dir() else source.parent) / (Path(MODEL_FILE).stem + ".onnx"))
    out = Path(out)
    from brainseg.models import create_model

    network = create_model(description["model"]["name"], **description["model"]["kwargs"])
    network.load_state_dict(weights)
    network.eval()
    size = int(description["preprocessing"]["image_size"])
    channels = int(description["preprocessing"]["in_channels"])
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(network, (example,), str(out), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    _embed_description(out, description)
    difference = _check_against_torch(out, network, example)
    return {"path": str(out), "opset": opset, "input": [None, channels, size, size],
            "max_abs_logit_difference": difference}


def _embed_description(path: Path, description: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)
    onnx.save(proto, str(path))


def _check_against_torch(path: Path, network: torch.nn.Module, example: torch.Tensor) -> float:
    session = OnnxNetwork(path)
    with torch.inference_mode():
        expected = network(example).numpy()
    return float(np.abs(session(example).numpy() - expected).max())


class OnnxNetwork:
    """An onnxruntime session that can stand in for the torch network inside a Predictor."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for any unreadable model
            raise BadInputError(path, f"not an ONNX model ({type(error).__name__})") from None
        self.path = Path(path)

    def description(self) -> dict:
        """The brainseg description that `export_model` embedded in the model's metadata."""
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise BadInputError(self.path, "ONNX model has no brainseg description; "
                                           "export it with brainseg export")
        return json.loads(meta[METADATA_KEY])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"image": array})[0])

    def eval(self) -> OnnxNetwork:
        return self

    def to(self, *args, **kwargs) -> OnnxNetwork:
        return self
