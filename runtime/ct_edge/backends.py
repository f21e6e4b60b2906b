"""One small class per inference engine. Each turns a float32 NHWC batch into probabilities.

They hide what differs between engines: integer input/output quantization (scale and
zero-point read from the model itself), tensor names (read from the session) and batch size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import REBUILD_BUNDLE, BundleError


class Backend(Protocol):
    engine: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) in the input contract -> float32 (n, classes) probabilities."""
        ...

    def run(self, batch: np.ndarray, maps: bool = False, features: bool = True) -> Outputs:
        """Probabilities plus the optional outputs (maps when asked, features), one run."""
        ...


def _tflite_interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise BundleError("no TFLite engine installed: pip install ai-edge-litert "
                          "(or ct-edge[tflite-legacy]), or choose --backend onnx") from None


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


@dataclass
class Outputs:
    """What one run of the model gives: probabilities (n, classes), and when the artifact exports
    them, class-activation maps (n, h, w, classes) and pooled features (n, d)."""

    probabilities: np.ndarray
    maps: np.ndarray | None = None
    features: np.ndarray | None = None


def _output_roles(outputs: list, shape_of: Callable[[object], list]) -> tuple[object, object, object]:
    """(probabilities, maps or None, features or None) from outputs in the model's own order.

    The converter exports [probabilities, class maps, pooled features] (class maps only for GAP
    heads): the first rank-2 output is the probabilities, a second rank-2 one the features and
    the rank-4 one the maps. A model without a rank-2 output is not a ct-edge classifier.
    """
    flat = [o for o in outputs if len(shape_of(o)) == 2]
    if not flat:
        raise BundleError(f"the model has no (batch, classes) output; {REBUILD_BUNDLE}")
    maps = next((o for o in outputs if len(shape_of(o)) == 4), None)
    return flat[0], maps, flat[1] if len(flat) > 1 else None


def _keras_order(detail: dict) -> tuple[int, int]:
    """TFLite names outputs 'StatefulPartitionedCall:k' with k the Keras output index; the
    interpreter lists them in no particular order."""
    head, _, index = str(detail.get("name", "")).rpartition(":")
    return (int(index), 0) if head and index.isdigit() else (1 << 30, int(detail["index"]))


class _ClassMaps:
    """The optional outputs both engines may expose (`_maps`, `_features`: None when absent)."""

    _maps: object
    _features: object

    @property
    def has_maps(self) -> bool:
        return self._maps is not None

    @property
    def has_features(self) -> bool:
        return self._features is not None

    @property
    def feature_dim(self) -> int | None:
        return None if self._features is None else int(self._feature_shape()[-1])

    def _feature_shape(self) -> list:
        raise NotImplementedError

    def _require_maps(self) -> None:
        if self._maps is None:
            raise BundleError("this model has no class-activation-map output")


class TFLiteBackend(_ClassMaps):
    """LiteRT (ai-edge-litert) first, tflite-runtime as fallback. One call at a time."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        interpreter_class, self.engine = _tflite_interpreter_class()
        try:
            self._interpreter = interpreter_class(model_content=model, num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{self.engine} cannot load the model: {exc}") from None
        self._input = self._interpreter.get_input_details()[0]
        outputs = sorted(self._interpreter.get_output_details(), key=_keras_order)
        # Class-activation maps (n, h, w, classes) for heatmaps (ct_edge.explain) and pooled
        # features (n, d) for the domain gate (ct_edge.domain) come from the same run.
        self._output, self._maps, self._features = _output_roles(outputs, lambda o: o["shape"])
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.num_classes = int(self._output["shape"][-1])
        self._batch = int(self._input["shape"][0])
        # Re-entrant: predict_with_maps reads the maps after predict, under the same hold.
        self._lock = threading.RLock()

    def _quantization(self, detail: dict) -> tuple[float, int] | None:
        if detail["dtype"] in (np.float32, np.float16):
            return None
        scale, zero_point = detail["quantization"]
        return float(scale), int(zero_point)

    def _feature_shape(self) -> list:
        return list(self._features["shape"])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                self._interpreter.allocate_tensors()
                self._input = self._interpreter.get_input_details()[0]
                self._output = next(o for o in self._interpreter.get_output_details()
                                    if o["index"] == self._output["index"])
                self._batch = batch.shape[0]
            params = self._quantization(self._input)
            if params is None:
                x = batch.astype(self._input["dtype"], copy=False)
            else:
                x = quantize(batch, *params, self._input["dtype"])
            try:
                self._interpreter.set_tensor(self._input["index"], x)
                self._interpreter.invoke()
                y = self._interpreter.get_tensor(self._output["index"])
            except (RuntimeError, ValueError) as exc:
                raise BundleError(f"{self.engine} failed to run the model: {exc}") from None
            params = self._quantization(self._output)
            return y.astype(np.float32) if params is None else dequantize(y, *params)

    def predict_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (n, classes) and class-activation maps (n, h, w, classes), one run."""
        self._require_maps()
        outputs = self.run(batch, maps=True)
        return outputs.probabilities, outputs.maps  # type: ignore[return-value]

    def run(self, batch: np.ndarray, maps: bool = False, features: bool = True) -> Outputs:
        """Probabilities and, when asked for and present, maps and features: one run."""
        with self._lock:
            probabilities = self.predict(batch)
            wanted = {"maps": self._maps if maps else None,
                      "features": self._features if features else None}
            extra = {}
            for key, detail in wanted.items():
                if detail is None:
                    continue
                try:
                    value = self._interpreter.get_tensor(detail["index"])
                except (RuntimeError, ValueError) as exc:
                    raise BundleError(f"{self.engine} failed to run the model: {exc}") from None
                # An int8 model quantizes each output with its own scale and zero-point.
                params = self._quantization(detail)
                extra[key] = value.astype(np.float32) if params is None else dequantize(value, *params)
        return Outputs(probabilities, **extra)


class OnnxBackend(_ClassMaps):
    """onnxruntime on the CPU; tensor names come from the session, never from constants."""

    engine = "onnxruntime"

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("ONNX bundles need onnxruntime: pip install 'ct-edge[onnx]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError(f"onnxruntime cannot load the model: {exc}") from None
        model_input = self._session.get_inputs()[0]
        output, maps, features = _output_roles(self._session.get_outputs(), lambda o: o.shape)
        self._input, self._output = model_input.name, output.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in model_input.shape[1:])
        self.num_classes = output.shape[-1] if isinstance(output.shape[-1], int) else -1
        self._maps = maps.name if maps is not None else None
        self._features = features.name if features is not None else None
        self._shapes = {o.name: o.shape for o in self._session.get_outputs()}

    def _feature_shape(self) -> list:
        return list(self._shapes[self._features])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        try:
            (y,) = self._session.run([self._output], {self._input: batch.astype(np.float32, copy=False)})
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError(f"onnxruntime failed to run the model: {exc}") from None
        return np.asarray(y, dtype=np.float32)

    def predict_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (n, classes) and class-activation maps (n, h, w, classes), one run."""
        self._require_maps()
        outputs = self.run(batch, maps=True)
        return outputs.probabilities, outputs.maps  # type: ignore[return-value]

    def run(self, batch: np.ndarray, maps: bool = False, features: bool = True) -> Outputs:
        """Probabilities and, when asked for and present, maps and features: one run."""
        names = {"probabilities": self._output, "maps": self._maps if maps else None,
                 "features": self._features if features else None}
        names = {key: name for key, name in names.items() if name is not None}
        try:
            values = self._session.run(list(names.values()),
                                       {self._input: batch.astype(np.float32, copy=False)})
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError(f"onnxruntime failed to run the model: {exc}") from None
        return Outputs(**{key: np.asarray(value, dtype=np.float32)
                          for key, value in zip(names, values, strict=True)})


ENGINES: dict[str, Callable[[bytes, int | None], Backend]] = {
    "tflite": TFLiteBackend,
    "onnx": OnnxBackend,
}


def open_backend(fmt: str, model: bytes, threads: int | None = None) -> Backend:
    """The backend for a model format ('tflite' or 'onnx')."""
    if fmt not in ENGINES:
        raise BundleError(f"unknown model format {fmt!r}; this ct-edge runs: {', '.join(ENGINES)}")
    return ENGINES[fmt](model, threads)
