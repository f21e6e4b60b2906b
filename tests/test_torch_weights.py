"""The restricted reader of legacy PyTorch weights: real file, hand-made files, hostile files."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from training import torch_weights
from training.torch_weights import TorchWeightsError, read_state_dict


class _Storage:
    """What a torch storage pickles as: a persistent id plus raw bytes after the pickle."""

    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


def _legacy_file(state: object, storages: list[_Storage], kind: str = "FloatStorage") -> bytes:
    """A file laid out like legacy torch.save; a stand-in 'torch' module names the globals."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_class = type(kind, (), {"__module__": "torch"})
    setattr(torch, kind, storage_class)
    torch._utils = utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", storage_class, obj.key, "cpu", obj.data.size)
            return None

    stream = io.BytesIO()
    try:
        for header in (torch_weights.LEGACY_MAGIC, torch_weights.PROTOCOL_VERSION,
                       {"little_endian": True}):
            pickle.dump(header, stream, protocol=2)
        Pickler(stream, protocol=2).dump(state)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    pickle.dump([s.key for s in storages], stream, protocol=2)
    for storage in storages:
        stream.write(np.int64(storage.data.size).tobytes())
        stream.write(storage.data.tobytes())
    return stream.getvalue()


def test_hand_made_file_reads_views_offsets_and_strides() -> None:
    data = np.arange(24, dtype="<f4")
    storage = _Storage("0", data)
    state = collections.OrderedDict(
        whole=_Tensor(storage, 0, (2, 3, 4), (12, 4, 1)),
        transposed=_Tensor(storage, 0, (4, 6), (1, 4)),
        tail=_Tensor(storage, 20, (4,), (1,)),
        scalar=_Tensor(storage, 5, (), ()))
    tensors = read_state_dict(_legacy_file(state, [storage]))
    assert list(tensors) == ["whole", "transposed", "tail", "scalar"]
    np.testing.assert_array_equal(tensors["whole"], data.reshape(2, 3, 4))
    np.testing.assert_array_equal(tensors["transposed"], data.reshape(6, 4).T)
    np.testing.assert_array_equal(tensors["tail"], data[20:])
    assert tensors["scalar"] == 5.0 and tensors["whole"].dtype == np.float32


def test_long_storage_is_int64() -> None:
    storage = _Storage("7", np.array([3], dtype="<i8"))
    raw = _legacy_file({"n": _Tensor(storage, 0, (), ())}, [storage], kind="LongStorage")
    value = read_state_dict(raw)["n"]
    assert value.dtype == np.int64 and int(value) == 3


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = _legacy_file(collections.OrderedDict(w=_Exploit(marker)), [])
    with pytest.raises(TorchWeightsError, match=r"refusing to load global (posix|os)\.system"):
        read_state_dict(raw)
    assert not marker.exists()
    # The same payload in the header pickles is refused too.
    stream = io.BytesIO()
    pickle.dump(_Exploit(marker), stream, protocol=2)
    with pytest.raises(TorchWeightsError, match="refusing to load global"):
        read_state_dict(stream.getvalue())
    assert not marker.exists()


def test_truncated_and_foreign_files_give_one_clear_error(tmp_path: Path) -> None:
    storage = _Storage("0", np.arange(8, dtype="<f4"))
    raw = _legacy_file({"w": _Tensor(storage, 0, (8,), (1,))}, [storage])
    path = tmp_path / "cut.pth"
    path.write_bytes(raw[:-4])
    with pytest.raises(TorchWeightsError, match=rf"^{path}: file ends inside storage 0"):
        read_state_dict(path)
    with pytest.raises(TorchWeightsError, match="zip-format"):
        read_state_dict(b"PK\x03\x04rest")
    with pytest.raises(TorchWeightsError, match="wrong magic number"):
        read_state_dict(pickle.dumps(42, protocol=2))
    too_long = _Tensor(storage, 4, (8,), (1,))
    with pytest.raises(TorchWeightsError, match="reaches past storage"):
        read_state_dict(_legacy_file({"w": too_long}, [storage]))


def test_changed_package_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(torch_weights.EFFICIENTNET_LITE0_PACKAGE)
    monkeypatch.setattr(torch_weights, "EFFICIENTNET_LITE0_SHA256", "0" * 64)
    with pytest.raises(TorchWeightsError, match="is not the pinned"):
        torch_weights.efficientnet_lite0_path()


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """EfficientNet-Lite0 as published: stages (kernel, stride, expansion, width, repeats)."""
    stages = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
    shapes: dict[str, tuple[int, ...]] = {"_conv_stem.weight": (32, 3, 3, 3),
                                          "_conv_head.weight": (1280, 320, 1, 1),
                                          "_fc.weight": (1000, 1280), "_fc.bias": (1000,)}

    def bn(prefix: str, n: int) -> None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{key}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("_bn0", 32)
    bn("_bn1", 1280)
    index, channels = 0, 32
    for kernel, _stride, expansion, width, repeats in stages:
        for _ in range(repeats):
            prefix, hidden = f"_blocks.{index}", channels * expansion
            if expansion != 1:
                shapes[f"{prefix}._expand_conv.weight"] = (hidden, channels, 1, 1)
                bn(f"{prefix}._bn0", hidden)
            shapes[f"{prefix}._depthwise_conv.weight"] = (hidden, 1, kernel, kernel)
            bn(f"{prefix}._bn1", hidden)
            shapes[f"{prefix}._project_conv.weight"] = (width, hidden, 1, 1)
            bn(f"{prefix}._bn2", width)
            index, channels = index + 1, width
    return shapes


def test_real_efficientnet_lite0_file_reads_296_tensors() -> None:
    pytest.importorskip(torch_weights.EFFICIENTNET_LITE0_PACKAGE)
    tensors = torch_weights.efficientnet_lite0_weights()
    assert len(tensors) == 296
    assert {name: t.shape for name, t in tensors.items()} == _expected_shapes()
    assert all(t.dtype == np.float32 for n, t in tensors.items() if "num_batches" not in n)
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert (tensors["_bn1.running_var"] > 0).all()
