"""Peak resident memory of a fresh process that loads one artifact and classifies one image."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from .proc import ChildError, run_child, tail

# Only ct_edge is imported here: this is the footprint of the runtime a device would run.
_CLASSIFY_ONE = """
import json, sys
from ct_edge.classifier import Classifier
classifier = Classifier.from_bundle(sys.argv[1], artifact=sys.argv[2])
prediction = classifier.predict(sys.argv[3])
print(json.dumps({"label": prediction.label, "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def peak_rss_mb() -> float:
    """This process's peak RSS so far (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def artifact_memory(bundle_dir: Path, name: str, image: Path) -> dict:
    """Peak RSS (MB) of `Classifier.from_bundle(bundle, artifact=name).predict(image)` in a new process."""
    child = run_child([sys.executable, "-c", _CLASSIFY_ONE, str(bundle_dir), name, str(image)])
    if child.returncode != 0:
        raise ChildError(f"classifying with {name} exited {child.returncode}:\n{tail(child.stderr)}")
    answer = json.loads(child.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": child.max_rss_mb, "wall_s": child.wall_s, **answer}
