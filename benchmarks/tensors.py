"""What a bundle's TFLite files store: constant tensors by type, their bytes, and shared buffers.

    python -m benchmarks.tensors artifacts/bundle [--json]

A file's size is mostly its constants: int8 weights, int32 biases (a bias's scale is input scale
x weight scale, so a weight used at two activation scales needs two biases), float32/float16
weights. This reads the flatbuffer through the schema `ai_edge_litert` ships (no TensorFlow), so
size figures such as "the flip graph stores every weight once" can be repeated from a clone.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from convert.report import human_size


def constants(data: bytes) -> dict:
    """{'by_type': {type: {'tensors', 'bytes'}}, 'tensors', 'bytes', 'shared_buffers', 'ops'} of
    one TFLite file. A constant is a buffer that holds data (inline or at an offset), counted once
    however many tensors use it; 'shared_buffers' counts those used by more than one."""
    from ai_edge_litert import schema_py_generated as schema

    if data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        return _count(model, {v: k.lower() for k, v in vars(schema.TensorType).items()
                              if not k.startswith("_")})
    except (struct.error, IndexError, TypeError) as exc:
        raise ValueError(f"damaged TFLite flatbuffer: {exc}") from None


def _count(model: Any, type_names: dict[int, str]) -> dict:
    """`constants` of an unpacked flatbuffer model (`ModelT`)."""
    by_type: dict[str, dict[str, int]] = {}
    users: Counter[int] = Counter()
    ops = 0
    for graph in model.subgraphs or []:
        ops += len(graph.operators or [])
        for tensor in graph.tensors or []:
            buffer = model.buffers[tensor.buffer]
            size = len(buffer.data) if buffer.data is not None else int(buffer.size or 0)
            if not size:
                continue
            users[tensor.buffer] += 1
            if users[tensor.buffer] > 1:
                continue  # counted once: a shared buffer is stored once
            entry = by_type.setdefault(type_names.get(tensor.type, f"type{tensor.type}"),
                                       {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += size
    return {"by_type": dict(sorted(by_type.items())),
            "tensors": sum(e["tensors"] for e in by_type.values()),
            "bytes": sum(e["bytes"] for e in by_type.values()),
            "shared_buffers": sum(1 for n in users.values() if n > 1), "ops": ops}


def inspect_bundle(bundle: Path) -> dict[str, dict]:
    """{file name: constants(...) and the file's size} for every .tflite file of `bundle`."""
    files = sorted(bundle.glob("*.tflite")) if bundle.is_dir() else [bundle]
    if not files:
        raise FileNotFoundError(f"{bundle}: no .tflite file")
    report = {}
    for path in files:
        try:
            report[path.name] = {"file_bytes": path.stat().st_size,
                                 **constants(path.read_bytes())}
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return report


def markdown(report: dict[str, dict]) -> str:
    types = sorted({t for entry in report.values() for t in entry["by_type"]})
    header = ["file", "size", "ops", *(f"{t} constants (size)" for t in types),
              "buffers shared"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, entry in report.items():
        cells = [name, human_size(entry["file_bytes"]), str(entry["ops"])]
        for t in types:
            found = entry["by_type"].get(t)
            cells.append(f"{found['tensors']} ({human_size(found['bytes'])})" if found else "—")
        cells.append(str(entry["shared_buffers"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tensors",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle folder or one .tflite file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        report = inspect_bundle(args.bundle)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
