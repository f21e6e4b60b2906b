"""The one table of formats. Convert, parity, manifest and benchmarks all iterate FORMATS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import onnx_writer, tflite_writer
from .errors import ConvertError


@dataclass(frozen=True)
class Thresholds:
    """The parity gate: the one place its numbers live."""

    max_accuracy_drop: float = 0.01  # one point...
    max_accuracy_drop_images: int = 1  # ...or one test image, whichever is larger
    min_agreement: float = 0.98  # top-1 agreement with the Keras model
    max_abs_diff: float | None = None  # max |Δp| vs Keras; set for float32 artifacts only
    min_status_agreement: float = 0.99  # same status (ok / uncertain / out_of_domain) as Keras

    def allowed_drop(self, n: int) -> float:
        """Accuracy an artifact may lose against Keras on n test images."""
        return max(self.max_accuracy_drop_images / max(n, 1), self.max_accuracy_drop)

    def to_dict(self) -> dict:
        return {"max_accuracy_drop": self.max_accuracy_drop,
                "max_accuracy_drop_images": self.max_accuracy_drop_images,
                "min_agreement": self.min_agreement, "max_abs_diff": self.max_abs_diff,
                "min_status_agreement": self.min_status_agreement}


GATE = Thresholds()
FLOAT32_GATE = replace(GATE, max_abs_diff=1e-4)


@dataclass
class WriteContext:
    """What a writer gets: the Keras model, int8 calibration images and a scratch folder."""

    model: Any  # keras.Model
    calibration: np.ndarray  # float32 (n, h, w, c) training images; empty when no row needs it
    workdir: Path
    memo: dict[str, Any] = field(default_factory=dict)
    bias_correction: bool = False  # full-int8 heads bias-corrected (convert.bias_correction)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """Shared intermediate results (e.g. the float32 ONNX graph the int8 one starts from)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def calibration_images(self) -> np.ndarray:
        if not len(self.calibration):
            raise ConvertError("int8 conversion needs calibration images and none were loaded")
        return self.calibration


Writer = Callable[[WriteContext], bytes]


@dataclass(frozen=True)
class Format:
    """One artifact the converter knows."""

    name: str
    file: str
    format: str  # 'tflite' | 'onnx': the ct_edge backend that runs it
    precision: str  # 'fp32' | 'fp16' | 'dynamic' | 'int8'
    engine: str
    writer: Writer
    thresholds: Thresholds = GATE
    calibrated: bool = False  # needs training images for static quantization


FORMATS: tuple[Format, ...] = (
    Format("tflite-fp32", "model_fp32.tflite", "tflite", "fp32", "litert",
           tflite_writer.write_fp32, FLOAT32_GATE),
    Format("tflite-fp16", "model_fp16.tflite", "tflite", "fp16", "litert",
           tflite_writer.write_fp16),
    Format("tflite-dynamic", "model_dynamic.tflite", "tflite", "dynamic", "litert",
           tflite_writer.write_dynamic),
    Format("tflite-int8", "model_int8.tflite", "tflite", "int8", "litert",
           tflite_writer.write_int8, calibrated=True),
    Format("onnx-fp32", "model_fp32.onnx", "onnx", "fp32", "onnxruntime",
           onnx_writer.write_fp32, FLOAT32_GATE),
    Format("onnx-int8", "model_int8.onnx", "onnx", "int8", "onnxruntime",
           onnx_writer.write_int8, calibrated=True),
)

# The bundle's default when it passes; otherwise the most compact passing artifact.
DEFAULT_ARTIFACT = "tflite-int8"
PRECISION_ORDER = {"int8": 0, "dynamic": 1, "fp16": 2, "fp32": 3}

EMBEDDERS: dict[str, Callable[[bytes, dict], bytes]] = {
    "tflite": tflite_writer.embed_metadata,
    "onnx": onnx_writer.embed_metadata,
}
READERS: dict[str, Callable[[bytes], dict | None]] = {
    "tflite": tflite_writer.read_metadata,
    "onnx": onnx_writer.read_metadata,
}


def select(names: Sequence[str] | None = None,
           table: Sequence[Format] = FORMATS) -> tuple[Format, ...]:
    """The rows named (in table order); all of them when names is None."""
    if names is None:
        return tuple(table)
    known = {row.name for row in table}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConvertError(f"unknown format(s) {', '.join(unknown)}; choose from: "
                           + ", ".join(row.name for row in table))
    if not names:
        raise ConvertError("no formats selected")
    return tuple(row for row in table if row.name in set(names))
