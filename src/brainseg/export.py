"""Export a trained model to ONNX (dynamic batch), with its description embedded as metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from brainseg.errors import BadInputError, OptionError
from brainseg.files import replacing
from brainseg.runs.folder import ONNX_FILE, model_file
from brainseg.runs.model_file import build_network, file_digest, load_model_file
from brainseg.runs.pretrained import is_pretrained

METADATA_KEY = "brainseg"
SOURCE_KEY = "brainseg_source_sha256_16"  # the model file an export came from, to tell a stale one
FORMATS = ("onnx",)


def opset_range() -> tuple[int, int]:
    """The ONNX opsets this torch's TorchScript exporter writes."""
    try:
        from torch.onnx import _constants

        return _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):  # a private module: fall back to what torch 2.x supports
        return 7, 20


def export_model(model: str | Path, out: str | Path | None = None, *, fmt: str = "onnx",
                 opset: int = 17) -> dict:
    """Write `out` (default: beside the model, model.onnx) and check it against torch."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise OptionError(f"--opset: this torch exports opsets {low} to {high}, not {opset}")
    source = model_file(model)
    description, weights = load_model_file(source)
    if out is None:  # beside the model, but never inside the installed package
        shipped = Path(str(model).replace(":", "-") + ".onnx")
        out = shipped if is_pretrained(model) else source.parent / ONNX_FILE
    out = Path(out)
    if out.resolve() == source.resolve():
        raise BadInputError(out, "is the model being exported; give an --out ending in .onnx")
    if out.is_dir():  # --out names the file to write, never a folder to write into
        raise BadInputError(out, "is a folder; give --out a file name ending in .onnx")
    if out.is_file() and out.suffix.lower() != ".onnx":
        raise BadInputError(out, "exists and is not an .onnx file; refusing to overwrite it")
    network = build_network(source, description, weights)
    network.eval()
    size = int(description["preprocessing"]["image_size"])
    channels = int(description["preprocessing"]["in_channels"])
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` and moved over it once complete: a failed export leaves an older one intact.
    with replacing(out) as partial:
        try:
            torch.onnx.export(network, (example,), str(partial), input_names=["image"],
                              output_names=["logits"], opset_version=opset, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except torch.onnx.errors.OnnxExporterError as error:  # an operator the opset has no form for
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OptionError(f"--opset {opset}: cannot export this model ({detail}); try a newer opset "
                              "(the default is 17)") from None
        _embed_description(partial, description, file_digest(source))
        difference = _check_against_torch(partial, network, example)
    return {"path": str(out), "opset": opset, "input": [None, channels, size, size],
            "max_abs_logit_difference": difference}


def _embed_description(path: Path, description: dict, source_digest: str) -> None:
    proto = onnx.load(str(path))
    for key, value in ((METADATA_KEY, json.dumps(description)), (SOURCE_KEY, source_digest)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def exported_from(path: Path) -> str | None:
    """The digest of the model file that an ONNX model was exported from (None: unknown)."""
    try:
        return OnnxNetwork(path).session.get_modelmeta().custom_metadata_map.get(SOURCE_KEY)
    except BadInputError:
        return None


def _check_against_torch(path: Path, network: torch.nn.Module, example: torch.Tensor) -> float:
    session = OnnxNetwork(path)
    with torch.inference_mode():
        expected = network(example).numpy()
    return float(np.abs(session(example).numpy() - expected).max())


class OnnxNetwork:
    """An onnxruntime session that can stand in for the torch network inside a Predictor."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
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
