"""Read and verify a model bundle: a folder with manifest.json and the model files it lists.

The manifest is untrusted input: its schema version must be known, every file must stay inside
the bundle folder (`bundle_file`: the manifest itself, the models, the domain statistics), and a
file's bytes must match their size and sha256 before any engine or the domain gate sees them
(`read_checked`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .domain import MODALITIES, FeatureGate, gate_entry, gate_from_npz
from .errors import REBUILD_BUNDLE, BundleError, parity_warning
from .preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENV_BUNDLE = "CT_EDGE_BUNDLE"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MODEL_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Artifact:
    """One model file of a bundle, as the manifest describes it."""

    name: str
    file: str
    format: str
    precision: str
    sha256: str
    bytes: int
    status: str
    path: Path
    parity: dict = field(default_factory=dict)
    failures: tuple[str, ...] = ()

    def read_verified(self) -> bytes:
        """The model bytes, after checking size and sha256 against the manifest (`read_checked`)."""
        return read_checked(self.path.parent, self.file, self.bytes, self.sha256, "model file")

    @property
    def parity_warning(self) -> str | None:
        """What to tell whoever runs this artifact when it did not pass its parity check."""
        return parity_warning(self.name, self.status)


@dataclass(frozen=True)
class Bundle:
    """A verified manifest and the artifacts it lists."""

    root: Path
    manifest: dict
    labels: tuple[str, ...]
    spec: PreprocessSpec
    artifacts: dict[str, Artifact]
    default: str | None
    temperature: float
    uncertain_below: float
    # How uncertain_below was chosen (method, target, measured risk and coverage, on what data);
    # empty for bundles that predate it. Informational: only uncertain_below decides.
    operating_point: dict = field(default_factory=dict)
    # The exact manifest.json bytes parsed above and their sha256: the bundle's identity on every
    # result (re-reading the file later could name a bundle installed since).
    manifest_bytes: bytes = field(default=b"", repr=False)
    manifest_sha256: str = ""

    @property
    def domain(self) -> dict:
        """The manifest's `domain` section: modality and feature gate ({} in older bundles)."""
        section = self.manifest.get("domain")
        return section if isinstance(section, dict) else {}

    @property
    def modality(self) -> str | None:
        """'ct' or 'xray' when the bundle records what it was trained on, else None."""
        return self.domain.get("modality")

    def feature_gate(self) -> FeatureGate | None:
        """The fitted feature gate (its statistics file checked like a model file), None when the
        manifest records none."""
        loaded = self.gate_with_data()
        return None if loaded is None else loaded[0]

    def gate_with_data(self) -> tuple[FeatureGate, bytes] | None:
        """The feature gate and the verified statistics bytes it was built from; None without one."""
        if "method" not in self.domain:
            return None
        entry = gate_entry(self.domain, self.root / MANIFEST)
        data = read_checked(self.root, entry.file, entry.bytes, entry.sha256,
                            "domain statistics file")
        return gate_from_npz(entry, data, self.root / entry.file), data

    @classmethod
    def load(cls, root: str | Path | None = None) -> Bundle:
        root = resolve_bundle_dir(root)
        raw = _read_manifest(root)
        manifest = _parse_manifest(root / MANIFEST, raw)
        try:
            version = manifest.get("schema_version")
            if type(version) is not int or version != SCHEMA_VERSION:  # true == 1.0 == 1 in Python
                raise BundleError(f"{root / MANIFEST}: unknown schema_version {version!r} (this "
                                  f"ct-edge reads {SCHEMA_VERSION}); upgrade ct-edge or rebuild")
            if not isinstance(manifest["labels"], list):
                raise BundleError(f"{root / MANIFEST}: labels must be a list")
            labels = tuple(str(label) for label in manifest["labels"])
            spec = PreprocessSpec.from_dict(manifest["preprocess"])
            shape = [int(d) for d in manifest["input"]["shape"]]
            if shape[1:] != [spec.size, spec.size, spec.channels]:
                raise BundleError(f"{root / MANIFEST}: input shape {shape} does not match the "
                                  "preprocessing spec")
            if not 2 <= len(labels) <= 1000:
                raise BundleError(f"{root / MANIFEST}: implausible label list {labels!r}")
            artifacts = {entry["name"]: _artifact(root, entry) for entry in manifest["artifacts"]}
            calibration = manifest.get("calibration", {})
            temperature = float(calibration.get("temperature", 1.0))
            uncertain_below = float(calibration.get("uncertain_below", 0.0))
            operating_point = calibration.get("operating_point") or {}
            if not isinstance(operating_point, dict):
                raise BundleError(f"{root / MANIFEST}: calibration.operating_point must be an "
                                  "object")
            default = manifest.get("default")
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            raise BundleError(f"{root / MANIFEST}: malformed manifest ({type(exc).__name__}: "
                              f"{exc}); {REBUILD_BUNDLE}") from None
        if not 0.01 <= temperature <= 100:
            raise BundleError(f"{root / MANIFEST}: implausible temperature {temperature}")
        if not 0.0 <= uncertain_below <= 1.0:
            raise BundleError(f"{root / MANIFEST}: implausible uncertain_below {uncertain_below}")
        if default is not None and (not isinstance(default, str) or default not in artifacts):
            raise BundleError(f"{root / MANIFEST}: default artifact {default!r} is not listed")
        domain = manifest.get("domain")
        if domain is not None and (not isinstance(domain, dict)
                                   or domain.get("modality") not in (None, *MODALITIES)):
            raise BundleError(f"{root / MANIFEST}: malformed domain section (modality must be one "
                              f"of {', '.join(MODALITIES)})")
        return cls(root, manifest, labels, spec, artifacts, default, temperature, uncertain_below,
                   operating_point, raw, hashlib.sha256(raw).hexdigest())

    def select(self, name: str | None = None, fmt: str | None = None) -> Artifact:
        """The artifact to run: by name, else the default (of a format), else the best passing one."""
        if name is not None:
            if name not in self.artifacts:
                raise BundleError(f"no artifact {name!r} in {self.root}; choose one of: "
                                  + ", ".join(self.artifacts))
            return self.artifacts[name]
        if self.default and (fmt is None or self.artifacts[self.default].format == fmt):
            return self.artifacts[self.default]
        passing = [a for a in self.artifacts.values()
                   if a.status == "passed" and (fmt is None or a.format == fmt)]
        if not passing:
            wanted = f" {fmt}" if fmt else ""
            raise BundleError(f"{self.root} has no{wanted} artifact that passed its parity check")
        order = {"int8": 0, "dynamic": 1, "fp16": 2, "fp32": 3}
        return min(passing, key=lambda a: order.get(a.precision, 9))


def resolve_bundle_dir(root: str | Path | None) -> Path:
    """--bundle, else $CT_EDGE_BUNDLE, else ./artifacts/bundle."""
    if root is None:
        root = os.environ.get(ENV_BUNDLE) or Path("artifacts") / "bundle"
    path = Path(root)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"no model bundle at {path} (no {MANIFEST}); pass --bundle DIR, set "
                          f"${ENV_BUNDLE}, or install or copy a bundle there "
                          "(on the build machine: `make demo` or `make convert`)")
    return path


def bundle_file(root: Path, file: str, what: str) -> Path:
    """root/file for a file of the bundle (`what` names it in errors): a plain name, not a
    symlink out of the folder. The one rule for the manifest, every model and the domain
    statistics; BundleError otherwise."""
    candidate = Path(file)
    if candidate.is_absolute() or len(candidate.parts) != 1 or file in ("", ".", "..") \
            or "\x00" in file:
        raise BundleError(f"{root / MANIFEST}: {what} {file[:100]!r} is outside the bundle")
    path = root / file
    try:
        outside = path.is_symlink() and path.resolve().parent != root.resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a name too long, a symlink loop
        raise BundleError(f"{root / MANIFEST}: {what} {file[:100]!r} cannot be checked "
                          f"({exc}); {REBUILD_BUNDLE}") from None
    if outside:
        raise BundleError(f"{path}: the {what} links outside the bundle folder; it will not be "
                          f"used - {REBUILD_BUNDLE}")
    return path


def read_checked(root: Path, file: str, size: int, sha256: str, what: str) -> bytes:
    """The bytes of bundle file `file` (see `bundle_file`), once their size and sha256 match the
    manifest's. Only a regular file of that size is read: a FIFO would block forever, and a huge
    (e.g. sparse) file would exhaust memory."""
    path = bundle_file(root, file, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{path} is not a regular file; {REBUILD_BUNDLE}")
            if info.st_size != size:
                raise BundleError(f"{path} does not match its size and sha256 in the manifest "
                                  f"({info.st_size} bytes, the manifest says {size}: tampered or "
                                  f"corrupt); the bundle will not be run - {REBUILD_BUNDLE}")
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(size + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {exc.strerror or exc}; "
                          f"{REBUILD_BUNDLE}") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"{path} does not match its sha256 in the manifest (tampered or "
                          f"corrupt); the bundle will not be run - {REBUILD_BUNDLE}")
    return data


def _read_manifest(root: Path) -> bytes:
    path = bundle_file(root, MANIFEST, "manifest")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: manifest is implausibly large")
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the manifest ({exc.strerror or exc}); "
                          "rebuild the bundle") from None


def _parse_manifest(path: Path, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError: also JSONDecodeError, UnicodeDecodeError and over-long integer literals;
        # RecursionError: arrays nested thousands deep.
        raise BundleError(f"{path}: cannot read the manifest ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); rebuild the bundle") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    return manifest


def _artifact(root: Path, entry: dict) -> Artifact:
    file = str(entry["file"])
    path = bundle_file(root, file, "model file")
    size = int(entry["bytes"])
    if not 0 < size <= MAX_MODEL_BYTES:
        raise BundleError(f"{root / MANIFEST}: artifact {file!r} has implausible size {size}")
    return Artifact(name=str(entry["name"]), file=file, format=str(entry["format"]),
                    precision=str(entry["precision"]), sha256=str(entry["sha256"]), bytes=size,
                    status=str(entry.get("status", "unknown")), path=path,
                    parity=dict(entry.get("parity") or {}),
                    failures=tuple(str(f) for f in entry.get("failures") or ()))
