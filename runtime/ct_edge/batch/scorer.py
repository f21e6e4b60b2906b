"""The Ray actor of a batch job: the verified bundle in one engine, classifying blocks of paths."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError
from .payload import ModelPayload, error_row, rows_to_table

if TYPE_CHECKING:
    import pyarrow as pa


class Scorer:
    """One Ray actor: the verified bundle in one engine, classifying blocks of paths.

    Ray Data builds it from `fn_constructor_kwargs`; it must be importable by name on every node
    (`ct_edge.batch.scorer.Scorer`), which is why the package has to be installed there.
    """

    def __init__(self, payload: ModelPayload, threads: int | None = 1,
                 window: tuple[float, float] | None = None, decode_workers: int = 1,
                 domain_check: bool = True) -> None:
        from ..backends import open_backend
        from ..bundle import MANIFEST, Bundle, bundle_file
        from ..classifier import Classifier

        if hashlib.sha256(payload.manifest).hexdigest() != payload.manifest_sha256:
            raise BundleError("the manifest bytes the actor received do not match their sha256")
        # Bundle.load checks the manifest exactly as on a device; it reads a folder, so the
        # manifest (only: the model stays in memory) goes to a private temporary one.
        # The domain statistics file too: the Classifier reads (and sha256-checks) it on creation.
        with tempfile.TemporaryDirectory(prefix="ct-edge-actor-") as folder:
            Path(folder, MANIFEST).write_bytes(payload.manifest)
            bundle = Bundle.load(folder)
            if payload.domain:
                # Only where the bundle's one file rule allows it, as on the driver.
                bundle_file(bundle.root, str(bundle.domain.get("file")),
                            "domain statistics file").write_bytes(payload.domain)
            artifact = bundle.select(payload.artifact)
            digest = hashlib.sha256(payload.model).hexdigest()
            if len(payload.model) != artifact.bytes or digest != artifact.sha256:
                raise BundleError(f"the model bytes of {artifact.name!r} the actor received do not "
                                  "match the manifest's sha256; it will not be run")
            engine = open_backend(artifact.format, payload.model, threads)
            spec = bundle.spec.with_window(window) if window is not None else None
            self.classifier = Classifier(bundle, artifact, engine, spec, domain_check)
        self.payload = payload
        self.decode_workers = decode_workers
        self.node_id = None
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # else a test calls the class directly
            self.node_id = ray.get_runtime_context().get_node_id()

    def score(self, paths: Sequence[str]) -> list[dict[str, Any]]:
        """One row per path, in order; a file that cannot be classified is an error row."""
        from ..inputs import predictions  # the very code `ct-edge classify` runs per file

        payload = self.payload
        rows = []
        for prediction in predictions(self.classifier, [(str(p), None) for p in paths],
                                      workers=self.decode_workers):
            if prediction.error is not None:
                rows.append(error_row(prediction.path, prediction.error, payload, self.node_id))
                continue
            rows.append({"path": prediction.path, "label": prediction.label,
                         "confidence": prediction.confidence,
                         "status": prediction.status, "reason": prediction.reason,
                         **{label: prediction.probabilities.get(label) for label in payload.labels},
                         "error": None, "artifact": payload.artifact,
                         "artifact_sha256": payload.artifact_sha256,
                         "bundle_sha256": payload.manifest_sha256, "node_id": self.node_id})
        return rows

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return rows_to_table(self.score(list(batch["path"])), self.payload.labels)
