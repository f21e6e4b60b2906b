"""Open Inference Protocol (v2) for model `ct-edge`: metadata, request parsing, response shapes.

Inputs: exactly one tensor, either `BYTES` (encoded PNG/JPEG/DICOM files; base64 strings when
`parameters.content_type` is "base64", as MLServer sends them, or Triton's binary-data extension)
or `FP32` (inputs already preprocessed to the bundle's (size, size, channels)). Outputs:
`probabilities` (FP32 [n, classes]), `label`, `status` and `reason` (BYTES [n]); an output asked
with `parameters.classification: N` holds the top N as "score:index:label" (Triton's
classification extension). Outputs are always sent as JSON data.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import DISCLAIMER, __version__
from ..classifier import Prediction
from ..store import sha256_bytes
from .service import ClientError, Service, display_name

MODEL_NAME = "ct-edge"
MODEL_VERSION = "1"
MAX_BATCH = 64
MAX_NAME = 100  # characters of an input tensor's name kept in each result's source
OUTPUTS = ("probabilities", "label", "status", "reason")
EXTENSIONS = ("classification", "binary_tensor_data")


def bad(message: str) -> ClientError:
    return ClientError(400, message)


def server_metadata() -> dict[str, Any]:
    return {"name": "ct-edge", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(service: Service) -> dict[str, Any]:
    classifier = service.classifier
    spec = classifier.spec
    labels = list(classifier.labels)
    return {
        "name": MODEL_NAME, "versions": [MODEL_VERSION],
        "platform": f"ct-edge_{service.identity.artifact_format}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1],
             "parameters": {"content_type": "base64 or binary_data; PNG, JPEG or DICOM files"}},
            {"name": "input", "datatype": "FP32",
             "shape": [-1, spec.size, spec.size, spec.channels],
             "parameters": {"preprocess": spec.to_dict()}},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "status", "datatype": "BYTES", "shape": [-1]},
            {"name": "reason", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": labels, **service.identity.to_dict(),
                       "parity_warning": classifier.artifact.parity_warning,
                       "uncertain_below": classifier.bundle.uncertain_below,
                       "disclaimer": DISCLAIMER},
    }


# --- request parsing --------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON request's bytes and the binary section after it (Inference-Header-Content-Length),
    a view of the body, not a copy."""
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise bad("Inference-Header-Content-Length is not an integer") from None
        if not 0 < length <= len(body):
            raise bad(f"Inference-Header-Content-Length {length} is outside the "
                      f"{len(body)}-byte body")
        head, binary = body[:length], memoryview(body)[length:]
    return head, binary


def json_parse_cost(head: bytes) -> int:
    """Estimated peak bytes `json.loads(head)` allocates: the text twice (decoded, then its
    strings), 64 KiB of small objects, and 64 bytes per element (a float with its list slot takes
    32-46, a one-item list 110 per comma and bracket). Python stores a string at the width of its
    widest character: one emoji, or one escaped, makes the text 4 bytes a character."""
    wide = not head.isascii() or b"\\u" in head
    return (2 * len(head) * (4 if wide else 1) + 65536
            + 64 * (head.count(b",") + head.count(b"[") + head.count(b"{")))


def parse_request(head: bytes) -> dict:
    """The request object of a JSON head; ClientError (400) if it is not one."""
    try:
        request = json.loads(head)
    except (ValueError, RecursionError):
        raise bad("the request is not valid JSON") from None
    if not isinstance(request, dict):
        raise bad("the request must be a JSON object")
    return request


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            type(d) is int and 0 <= d <= 1 << 24 for d in shape):
        raise bad("input 'shape' must be a non-empty list of non-negative integers")
    return shape


def _flatten(data: Any) -> Iterator[Any]:
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _parameters(obj: dict) -> dict:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad("'parameters' must be an object")
    return parameters


class _Binary:
    """Triton's binary section: each binary input takes the next `binary_data_size` bytes (views
    of the request body, not copies)."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.offset = data, 0

    def take(self, size: Any) -> memoryview:
        if type(size) is not int or size < 0 or self.offset + size > len(self.data):
            raise bad(f"binary_data_size {size!r} does not fit the binary section "
                      f"({len(self.data) - self.offset} bytes left)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk


def _bytes_elements(tensor: dict, count: int, request_parameters: dict,
                    binary: _Binary) -> list[bytes | memoryview]:
    parameters = _parameters(tensor)
    if "binary_data_size" in parameters:
        raw = binary.take(parameters["binary_data_size"])
        elements, offset = [], 0
        for _ in range(count):
            if offset + 4 > len(raw):
                raise bad("binary BYTES tensor is shorter than its shape says")
            (length,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + length > len(raw):
                raise bad("binary BYTES element runs past the tensor's binary_data_size")
            elements.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        if offset != len(raw):
            raise bad("binary BYTES tensor is longer than its shape says")
        return elements
    if "data" not in tensor:
        raise bad("input has neither 'data' nor parameters.binary_data_size")
    items = list(_flatten(tensor["data"]))
    if len(items) != count or not all(isinstance(item, str) for item in items):
        raise bad(f"BYTES input needs {count} strings as its shape says (got {len(items)} items)")
    content_type = parameters.get("content_type", request_parameters.get("content_type"))
    if content_type != "base64":
        # JSON strings cannot carry arbitrary file bytes; without base64 they are taken as UTF-8.
        return [item.encode("utf-8", "surrogatepass") for item in items]
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError):
        raise bad("BYTES input is not valid base64") from None


def _fp32_batch(tensor: dict, shape: list[int], expected: tuple[int, int, int],
                value_range: tuple[float, float], binary: _Binary) -> np.ndarray:
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        raise bad(f"FP32 input shape must be [n, {expected[0]}, {expected[1]}, {expected[2]}] "
                  f"(the bundle's preprocessed input); got {tensor.get('shape')}")
    if not 1 <= shape[0] <= MAX_BATCH:
        raise bad(f"batch of {shape[0]} inputs; between 1 and {MAX_BATCH} per request")
    count = math.prod(shape)
    parameters = _parameters(tensor)
    if "binary_data_size" in parameters:
        raw = binary.take(parameters["binary_data_size"])
        if len(raw) != 4 * count:
            raise bad(f"FP32 binary data is {len(raw)} bytes; shape {shape} needs {4 * count}")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        if "data" not in tensor:
            raise bad("input has neither 'data' nor parameters.binary_data_size")
        items = list(_flatten(tensor["data"]))
        if len(items) != count or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise bad(f"FP32 input needs {count} numbers as its shape says")
        try:
            values = np.asarray(items, dtype=np.float32)
        except OverflowError:
            raise bad("FP32 input holds a number out of float32 range") from None
    if not np.isfinite(values).all():
        raise bad("FP32 input holds NaN or infinity")
    low, high = value_range
    # Finite but far out (3e38) an fp32 model overflows to NaN; nothing else is preprocessed.
    if values.min() < low or values.max() > high:
        raise bad(f"FP32 input values must lie in [{low:g}, {high:g}], the range the bundle's "
                  f"preprocessing produces (parameters.preprocess in the model metadata); got "
                  f"{values.min():g} to {values.max():g}")
    return values.reshape(shape)


def _requested_outputs(request: dict, labels: int) -> list[tuple[str, int | None]]:
    """(name, top N or None) for each output to send."""
    request_parameters = _parameters(request)
    default_top = request_parameters.get("classification")
    outputs = request.get("outputs")
    if outputs is None:
        wanted = [{"name": name} for name in OUTPUTS]
        if default_top is not None:
            wanted[0]["parameters"] = {"classification": default_top}
    elif not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad("'outputs' must be a list of objects")
    else:
        wanted = outputs
    result = []
    for output in wanted:
        name = output.get("name")
        if name not in OUTPUTS:
            raise bad(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        top = _parameters(output).get("classification")
        if top is not None:
            if type(top) is not int or top < 1:
                raise bad("parameters.classification must be a positive integer")
            if name != "probabilities":
                raise bad("classification applies to the 'probabilities' output only")
            top = min(top, labels)
        result.append((name, top))
    return result


# --- inference (runs in a worker thread) ------------------------------------------------------


def infer(service: Service, body: bytes, header_length: str | None) -> dict[str, Any]:
    """One OIP v2 infer request -> its response object.

    Every item is read and classified before any is stored: a request refused for one item
    stores none; an answered one has every result stored (origin 'oip') before it returns.
    """
    head, binary_section = split_body(body, header_length)
    cost, room = json_parse_cost(head), service.decode_room
    if cost > room.limit:
        raise ClientError(413, f"the JSON request would take about {cost >> 20} MiB to parse, over "
                               f"the server's {room.limit >> 20} MiB; send large tensors as binary "
                               "data (Inference-Header-Content-Length) or files to /v1/classify")
    labels = service.classifier.labels
    files: list[bytes | memoryview] = []
    answered: list[tuple[Prediction, str]] = []
    # The parsed JSON is held against the decode budget until it is dropped; files in it are
    # decoded after that, each under its own hold (holds are never nested: that could deadlock).
    with room.holding(cost):
        request = parse_request(head)
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise bad("'inputs' must be a list holding exactly one tensor")
        tensor = inputs[0]
        outputs = _requested_outputs(request, len(labels))
        shape = _shape(tensor)
        binary = _Binary(binary_section)
        datatype = tensor.get("datatype")
        name = display_name(tensor.get("name", "input"), "input", MAX_NAME)
        if datatype == "BYTES":
            files = _file_elements(tensor, shape, _parameters(request), binary, name)
        elif datatype == "FP32":
            answered = _classify_fp32(service, tensor, shape, binary, name)
        else:
            raise bad(f"input datatype {datatype!r} is not supported; send BYTES (encoded "
                      "files) or FP32 (preprocessed inputs)")
        request_id = request.get("id")
        del request, inputs, tensor
    # Files decoded from base64 are copies, all in memory until the request ends; files in the
    # binary section are views of the body (counted with the upload), copied one at a time.
    copies = sum(len(file) for file in files if isinstance(file, bytes))
    for index, file in enumerate(files):
        data = bytes(file)
        extra = copies if isinstance(file, bytes) else copies + len(data)
        answered.append((service.predict_encoded(data, f"{name}[{index}]", extra),
                         sha256_bytes(data)))
        del data
    # Every item was read and classified: only now is anything stored, all rows in one
    # transaction (a refused batch stores nothing), committed before the answer.
    ids = service.record_all(answered, "oip")
    predictions = [prediction for prediction, _ in answered]
    response: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION,
                                "outputs": [_output(name, top, predictions, labels)
                                            for name, top in outputs],
                                "parameters": {"result_ids": ids, "disclaimer": DISCLAIMER}}
    if isinstance(request_id, str):
        response["id"] = request_id
    return response


def _file_elements(tensor: dict, shape: list[int], request_parameters: dict, binary: _Binary,
                   name: str) -> list[bytes | memoryview]:
    """The files of a BYTES tensor; ClientError for a wrong count or an empty file."""
    count = math.prod(shape)
    if not 1 <= count <= MAX_BATCH:
        raise bad(f"batch of {count} files; between 1 and {MAX_BATCH} per request")
    files = _bytes_elements(tensor, count, request_parameters, binary)
    for index, data in enumerate(files):
        if not data:
            raise bad(f"{name}[{index}]: empty file")
    return files


def _classify_fp32(service: Service, tensor: dict, shape: list[int], binary: _Binary,
                   name: str) -> list[tuple[Prediction, str]]:
    """Each preprocessed FP32 input -> (prediction, sha256 of its float32 bytes), none stored."""
    spec = service.classifier.spec
    low, high = spec.to_dict()["range"]
    batch = _fp32_batch(tensor, shape, (spec.size, spec.size, spec.channels), (low, high),
                        binary)
    return [(service.predict_array(x, f"{name}[{index}]"), sha256_bytes(x.tobytes()))
            for index, x in enumerate(batch)]


def _output(name: str, top: int | None, predictions: list[Prediction],
            labels: tuple[str, ...]) -> dict[str, Any]:
    n = len(predictions)
    if name == "probabilities" and top is not None:
        data = []
        for p in predictions:
            scores = [p.probabilities.get(label, 0.0) for label in labels]
            order = sorted(range(len(labels)), key=lambda i: -scores[i])[:top]
            data.extend(f"{scores[i]:f}:{i}:{labels[i]}" for i in order)
        return {"name": name, "datatype": "BYTES", "shape": [n, top], "data": data}
    if name == "probabilities":
        data = [float(p.probabilities.get(label, 0.0)) for p in predictions for label in labels]
        return {"name": name, "datatype": "FP32", "shape": [n, len(labels)], "data": data}
    values = {"label": [p.label or "" for p in predictions],
              "status": [p.status or "" for p in predictions],
              "reason": [p.reason or "" for p in predictions]}[name]
    return {"name": name, "datatype": "BYTES", "shape": [n], "data": values}
