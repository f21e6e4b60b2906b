"""A measurement in a fresh interpreter: `python -m benchmarks.worker TASK SPEC_JSON RESULT_PATH`.

The parent (benchmarks.run) chooses the CPU affinity; the task's keyword arguments come as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def _tasks() -> dict[str, Callable[..., dict]]:
    # Imported here so that `artifacts` and `per_image` workers never import TensorFlow.
    from . import endtoend, latency

    def keras(**kwargs: object) -> dict:
        from .keras_baseline import measure_keras

        return measure_keras(**kwargs)

    return {"artifacts": latency.measure_artifacts, "per_image": endtoend.per_image, "keras": keras}


def main(argv: list[str] | None = None) -> int:
    task, spec, result_path = argv or sys.argv[1:]
    result = _tasks()[task](**json.loads(spec))
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
