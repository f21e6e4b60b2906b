"""What a batch job sends every actor and the row each input becomes: the bundle as verified
bytes (`ModelPayload`) and the Parquet schema of the results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BundleError, CtEdgeError, one_line

if TYPE_CHECKING:
    import pyarrow as pa

# Fixed columns; then one float column per label, in the bundle's label order, after `reason`.
FIXED_COLUMNS = ("path", "label", "confidence", "status", "reason", "error", "artifact",
                 "artifact_sha256", "bundle_sha256", "node_id")


class BatchError(CtEdgeError):
    """The batch job cannot start or go on (no Ray, a cluster problem, an --out folder in use)."""


@dataclass(frozen=True)
class ModelPayload:
    """What every actor receives in its constructor: the bundle as bytes, and what they must hash to."""

    manifest: bytes
    model: bytes
    artifact: str
    manifest_sha256: str
    labels: tuple[str, ...]
    artifact_sha256: str
    artifact_format: str
    artifact_status: str
    domain: bytes = b""  # the domain statistics file (ct_edge.domain), sha256-checked on load

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path | None, artifact: str | None,
                    backend: str | None = None) -> ModelPayload:
        """Load and verify the bundle on the driver (the actors verify the bytes again): the very
        manifest, model and domain statistics bytes that were verified, never a second read."""
        from ..bundle import Bundle

        bundle = Bundle.load(bundle_dir)
        chosen = bundle.select(artifact, backend)
        model = chosen.read_verified()
        gate = bundle.gate_with_data()  # verified here first, as on a device
        return cls(manifest=bundle.manifest_bytes, model=model, artifact=chosen.name,
                   domain=b"" if gate is None else gate[1],
                   manifest_sha256=bundle.manifest_sha256, labels=bundle.labels,
                   artifact_sha256=chosen.sha256, artifact_format=chosen.format,
                   artifact_status=chosen.status)

    @property
    def parity_warning(self) -> str | None:
        """The warning for running this artifact (ct_edge.errors.parity_warning)."""
        from ..errors import parity_warning

        return parity_warning(self.artifact, self.artifact_status)


def result_schema(labels: Sequence[str]) -> pa.Schema:
    """The Parquet schema of every part: fixed columns plus one probability column per label."""
    import pyarrow as pa

    clash = sorted(set(labels) & set(FIXED_COLUMNS))
    if clash:
        raise BundleError(f"label(s) {clash} collide with result column names; rename the labels")
    fields = [pa.field("path", pa.string(), nullable=False),
              pa.field("label", pa.string()),
              pa.field("confidence", pa.float64()),
              pa.field("status", pa.string()),
              pa.field("reason", pa.string()),
              *(pa.field(label, pa.float64()) for label in labels),
              pa.field("error", pa.string()),
              pa.field("artifact", pa.string()),
              pa.field("artifact_sha256", pa.string()),
              pa.field("bundle_sha256", pa.string()),
              pa.field("node_id", pa.string())]
    return pa.schema(fields)


def rows_to_table(rows: list[dict[str, Any]], labels: Sequence[str]) -> pa.Table:
    """Result rows as a table of the result schema; a value Parquet cannot hold is a BatchError."""
    import pyarrow as pa

    schema = result_schema(labels)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, UnicodeError) as exc:
        raise BatchError(f"cannot store a result row in Parquet: {one_line(exc)}") from None


def error_row(path: str, error: str, payload: ModelPayload, node_id: str | None = None) -> dict:
    return {"path": path, "label": None, "confidence": None, "status": None, "reason": None,
            **dict.fromkeys(payload.labels), "error": error, "artifact": payload.artifact,
            "artifact_sha256": payload.artifact_sha256, "bundle_sha256": payload.manifest_sha256,
            "node_id": node_id}
