"""`ct-edge listen`: a DICOM Storage SCP that classifies slices and series (needs pynetdicom:
`pip install 'ct-edge[listen]'`)."""

from __future__ import annotations

from .config import Forward, NodeConfig, server_tls_context
from .node import Node
from .series import METHODS, SeriesResult, aggregate

__all__ = ["METHODS", "Forward", "Node", "NodeConfig", "SeriesResult", "aggregate",
           "server_tls_context"]
