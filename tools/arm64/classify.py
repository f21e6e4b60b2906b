"""Classify images with chosen artifacts of a bundle and print one JSON document.

Run the same way on the host and, by tools/arm64/check.py, on aarch64 under QEMU user-mode
emulation. It calls the runtime's Python API in-process: under `qemu-aarch64 -L` without binfmt
the emulated interpreter cannot start subprocesses, so neither the `ct-edge` script nor a
multiprocessing pool is used.

    python tools/arm64/classify.py BUNDLE --artifacts tflite-int8,onnx-fp32 IMAGE...
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--artifacts", required=True, help="comma-separated artifact names")
    parser.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
    parser.add_argument("--reference", action="store_true",
                        help="also run quantized TFLite artifacts with TFLite's reference kernels")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import numpy as np

    from ct_edge.classifier import Classifier
    from ct_edge.preprocess import preprocess

    out: dict = {"machine": platform.machine(), "python": platform.python_version(),
                 "numpy": np.__version__, "artifacts": {}}
    for name in args.artifacts.split(","):
        t0 = time.perf_counter()
        classifier = Classifier.from_bundle(args.bundle, artifact=name, threads=args.threads)
        t1 = time.perf_counter()
        results = []
        for path in args.images:
            prediction = classifier.predict(path)  # label and status, domain gate included
            x = preprocess(path, classifier.spec)[None]
            # The model's probabilities also for inputs the gate refuses (no label, maybe no
            # inference), and the engine's own output before the bundle's temperature scaling.
            probabilities = classifier.predict_array(x)[0]
            raw = classifier.backend.predict(x)[0]
            results.append({"path": path, "label": prediction.label, "status": prediction.status,
                            "probabilities": dict(zip(classifier.labels, map(float, probabilities),
                                                      strict=True)),
                            "raw": raw.tolist()})
        t2 = time.perf_counter()
        entry = {"engine": classifier.backend.engine, "sha256": classifier.artifact.sha256,
                 "load_seconds": round(t1 - t0, 3), "classify_seconds": round(t2 - t1, 3),
                 "output_step": None, "results": results}
        if classifier.artifact.format == "tflite":
            entry.update(tflite_details(classifier, args.images, args.reference))
        out["artifacts"][name] = entry
    out["seconds"] = round(time.perf_counter() - started, 3)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def tflite_details(classifier, images: list[str], reference: bool) -> dict:
    """The output quantization step of a TFLite model (None for a float output) and, with
    `reference`, its raw outputs from TFLite's portable reference kernels (BUILTIN_REF)."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from ct_edge.backends import quantize
    from ct_edge.preprocess import preprocess

    model = classifier.artifact.read_verified()
    probe = Interpreter(model_content=model)
    output = next(o for o in probe.get_output_details() if len(o["shape"]) == 2)
    if output["dtype"] in (np.float32, np.float16):
        return {"output_step": None}
    details: dict = {"output_step": float(output["quantization"][0])}
    if reference:
        interpreter = Interpreter(model_content=model, num_threads=1,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        target = next(o for o in interpreter.get_output_details() if len(o["shape"]) == 2)
        rows = []
        for path in images:
            x = preprocess(path, classifier.spec)[None]
            if source["dtype"] not in (np.float32, np.float16):
                x = quantize(x, *source["quantization"], source["dtype"])
            interpreter.set_tensor(source["index"], x)
            interpreter.invoke()
            rows.append(interpreter.get_tensor(target["index"])[0].tolist())
        details["reference_raw"] = rows
    return details


if __name__ == "__main__":
    sys.exit(main())
