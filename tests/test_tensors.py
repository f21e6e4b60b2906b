"""benchmarks.tensors (what a bundle's TFLite files store) and benchmarks.versus (one artifact of
several bundles timed side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.tensors import constants, inspect_bundle, main


def test_constants_by_type_of_each_artifact(tiny_bundle: Path) -> None:
    report = inspect_bundle(tiny_bundle)
    assert {"model_fp32.tflite", "model_int8.tflite"} <= set(report)
    for name, entry in report.items():
        assert 0 < entry["bytes"] <= entry["file_bytes"], name
        assert entry["tensors"] == sum(t["tensors"] for t in entry["by_type"].values())
        assert entry["ops"] > 0
    fp32, int8 = report["model_fp32.tflite"], report["model_int8.tflite"]
    assert "int8" not in fp32["by_type"] and fp32["by_type"]["float32"]["bytes"] > 0.9 * fp32["bytes"]
    # full int8: weights int8, biases int32, about a quarter of the float32 weights' bytes
    assert int8["by_type"]["int8"]["bytes"] > 0 and int8["by_type"]["int32"]["tensors"] > 0
    assert int8["by_type"]["int8"]["bytes"] <= 0.3 * fp32["by_type"]["float32"]["bytes"]


def test_a_buffer_used_by_two_tensors_is_counted_once() -> None:
    """A hand-built flatbuffer with a known layout: 'w' and 'w_again' share one 16-byte buffer,
    'b' owns 8 bytes, the activation 'x' has none."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def buffer(data: list[int] | None = None) -> schema.BufferT:
        made = schema.BufferT()
        made.data = data
        return made

    def tensor(name: str, kind: int, index: int, shape: list[int]) -> schema.TensorT:
        made = schema.TensorT()
        made.name, made.type, made.buffer, made.shape = name.encode(), kind, index, shape
        return made

    graph = schema.SubGraphT()
    graph.tensors = [tensor("w", schema.TensorType.FLOAT32, 1, [4]),
                     tensor("w_again", schema.TensorType.FLOAT32, 1, [4]),
                     tensor("b", schema.TensorType.INT32, 2, [2]),
                     tensor("x", schema.TensorType.FLOAT32, 0, [4])]
    add = schema.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 0, [0, 1], [3]
    graph.operators, graph.inputs, graph.outputs = [add], [], [3]
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.ADD
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [buffer(), buffer(list(range(16))), buffer(list(range(8)))]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")

    assert constants(bytes(builder.Output())) == {
        "by_type": {"float32": {"tensors": 1, "bytes": 16}, "int32": {"tensors": 1, "bytes": 8}},
        "tensors": 2, "bytes": 24, "shared_buffers": 1, "ops": 1}


def test_cli_table_json_and_one_line_errors(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tiny_bundle)]) == 0
    table = capsys.readouterr().out
    assert "| model_int8.tflite |" in table and "int8 constants (size)" in table
    assert main([str(tiny_bundle / "model_int8.tflite"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"model_int8.tflite"}

    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes((tiny_bundle / "model_int8.tflite").read_bytes()[:2000])
    text = tmp_path / "text.tflite"
    text.write_text("not a model")
    for path, problem in ((damaged, "damaged TFLite flatbuffer"),
                          (text, "not a TFLite flatbuffer"), (tmp_path / "empty", "no .tflite")):
        if path.name == "empty":
            path.mkdir()
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}") and problem in err and err.count("\n") == 1


def test_versus_times_the_same_artifact_of_several_bundles(tiny_bundle: Path, capsys) -> None:
    """Structure only: the figures depend on the machine and its load."""
    from benchmarks.versus import main as versus

    assert versus([str(tiny_bundle), str(tiny_bundle), "--runs", "3", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("tflite-int8, batch 1, one thread") and "| 1.00x |" in table
    assert table.count(f"| {tiny_bundle} | model_int8.tflite |") == 2
    assert versus([str(tiny_bundle), "--artifact", "onnx-fp32", "--runs", "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["file"].endswith(".onnx") and row["constants"] is None
    assert row["latency"]["runs"] == 2 and row["size_bytes"] > 0
    assert versus([str(tiny_bundle), "--artifact", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no artifact 'nope'")
    with pytest.raises(SystemExit):
        versus([str(tiny_bundle), "--runs", "0"])  # a usage error, not a traceback
