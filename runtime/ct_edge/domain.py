"""The domain gate: is an input like the images the model was trained on? numpy only.

Every artifact exports the pooled features (the vector the 'logits' layer reads) next to its
probabilities, so the gate scores the same single inference. The bundle records, in the manifest's
`domain` section and in `domain.npz` beside it (sha256-checked like a model file), the method, the
statistics of the training images' features and a threshold fitted on held-out validation images.
A score above the threshold means "unlike the training images": status out_of_domain.

Methods (docs/domain.md compares them on real and synthetic data):
- mahalanobis: distance to the nearest class mean under one shared covariance, shrunk towards a
  multiple of the identity (Ledoit-Wolf), as in Lee et al. 2018.
- knn: cosine distance to the k-th nearest training image.
- energy / max_logit: -logsumexp(logits) / -max(logits), logits = features @ W + b.
- combined: each of mahalanobis and knn standardised on the validation scores, the larger one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BundleError
from .files import NUMPY_LOAD_LOCK

if TYPE_CHECKING:
    from .dicom import DicomInfo

DOMAIN_FILE = "domain.npz"
MAX_DOMAIN_BYTES = 64 * 1024 * 1024
KNN_K = 5
DEFAULT_RULE = "mean+4sd"
COMBINED_PARTS = ("mahalanobis", "knn")


# --- scores: features (n, d) -> (n,), higher = less like the training images -------------------------


def _logits(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    return features @ arrays["weights"] + arrays["bias"]


def mahalanobis(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """sqrt of the smallest squared Mahalanobis distance to a class mean (shared precision).

    With the precision P = L L^T stored as the whitening L (and the means as means @ L), the
    distance is Euclidean after one (d, d) product: a few microseconds per image.
    """
    if "whitening" in arrays:
        whitening, means = arrays["whitening"], arrays["white_means"]
    else:
        whitening = np.linalg.cholesky(arrays["precision"].astype(np.float64)).astype(np.float32)
        means = arrays["means"] @ whitening
    white = features @ whitening
    squared = ((white[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return np.sqrt(squared.min(axis=1))


def knn(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """1 - cosine similarity to the k-th most similar training image."""
    bank = arrays["bank"]
    k = min(int(arrays["k"]), len(bank))
    similarity = _unit(features) @ bank.T
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def energy(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    z = _logits(arrays, features)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def max_logit(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    return -_logits(arrays, features).max(axis=1)


SCORES: dict[str, Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]] = {
    "mahalanobis": mahalanobis, "knn": knn, "energy": energy, "max_logit": max_logit,
}


def combined(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """The largest of the parts' scores, each as (score - centre) / scale of the validation set."""
    parts = [(SCORES[name](_part(arrays, name), features) - arrays[f"{name}.centre"])
             / arrays[f"{name}.scale"] for name in COMBINED_PARTS]
    return np.max(parts, axis=0)


SCORES["combined"] = combined
METHODS = tuple(SCORES)


def clip(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Features limited to the range the full-int8 artifacts can represent ('ceiling', the largest
    feature of the int8 calibration images), so every artifact of a bundle scores the same thing:
    an int8 model saturates there, a float one would not."""
    features = np.asarray(features, np.float32)
    return np.minimum(features, arrays["ceiling"]) if "ceiling" in arrays else features


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _part(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}."
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


# --- fitting (run by convert on the Keras model's features; numpy, so tests need no TensorFlow) ------


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of centred rows x (n, d): (1 - s) S + s mu I, s by Ledoit & Wolf (2004)."""
    n, d = x.shape
    x = x.astype(np.float64)
    empirical = x.T @ x / n
    mu = float(np.trace(empirical)) / d
    x2 = x * x
    beta_sum = float((x2.T @ x2).sum())
    delta_sum = float(((x.T @ x) ** 2).sum()) / n**2
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * mu * float(np.trace(empirical)) + d * mu**2) / d
    shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    return (1.0 - shrinkage) * empirical + shrinkage * mu * np.eye(d), shrinkage


def fit_arrays(method: str, features: np.ndarray, labels: np.ndarray, weights: np.ndarray,
               bias: np.ndarray, validation: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The statistics `method` scores with, from the training images' features (n, d), their
    labels and the 'logits' layer (W, b). `combined` also needs validation features to
    standardise its parts."""
    features = np.asarray(features, np.float64)
    if method == "mahalanobis":
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        covariance, shrinkage = ledoit_wolf(centred)
        precision = np.linalg.inv(covariance)
        whitening = np.linalg.cholesky((precision + precision.T) / 2.0)
        return {"means": means.astype(np.float32), "precision": precision.astype(np.float32),
                "whitening": whitening.astype(np.float32),
                "white_means": (means @ whitening).astype(np.float32),
                "shrinkage": np.float32(shrinkage)}
    if method == "knn":
        return {"bank": _unit(features).astype(np.float32), "k": np.int32(KNN_K)}
    if method in ("energy", "max_logit"):
        return {"weights": np.asarray(weights, np.float32), "bias": np.asarray(bias, np.float32)}
    if method == "combined":
        if validation is None or not len(validation):
            raise ValueError("the combined score needs validation features")
        arrays: dict[str, np.ndarray] = {}
        for name in COMBINED_PARTS:
            part = fit_arrays(name, features, labels, weights, bias)
            scores = SCORES[name](part, np.asarray(validation, np.float32))
            low, centre, high = np.percentile(scores, (25, 50, 75))
            arrays.update({f"{name}.{key}": value for key, value in part.items()})
            arrays[f"{name}.centre"] = np.float32(centre)
            arrays[f"{name}.scale"] = np.float32(max(high - low, 1e-6))
        return arrays
    raise ValueError(f"unknown domain method {method!r}; choose from {', '.join(METHODS)}")


def fit_threshold(scores: np.ndarray, rule: str = DEFAULT_RULE) -> float:
    """The threshold from held-out in-domain scores by `rule`: 'mean+<k>sd' (mean plus k standard
    deviations), 'q<p>' (the p-th percentile) or 'max'.

    The default is mean + 4 sd: a validation split of a few dozen to a few hundred images cannot
    pin down a 99th percentile, and on both measured bundles the held-out test images had a
    heavier tail than validation (docs/domain.md).
    """
    values = np.asarray(scores, np.float64)
    if rule == "max":
        return float(values.max())
    if rule.startswith("q"):
        return float(np.percentile(values, float(rule[1:])))
    if rule.startswith("mean+") and rule.endswith("sd"):
        return float(values.mean() + float(rule[5:-2]) * values.std())
    raise ValueError(f"unknown threshold rule {rule!r} (mean+<k>sd, q<p> or max)")


# --- the gate a bundle carries -----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureGate:
    """A fitted method: scores features and says which are unlike the training images."""

    method: str
    threshold: float
    arrays: dict[str, np.ndarray]

    @property
    def feature_dim(self) -> int:
        for key in ("means", "bank", "weights", "mahalanobis.means"):
            if key in self.arrays:
                value = self.arrays[key]
                return int(value.shape[0] if key == "weights" else value.shape[1])
        raise BundleError("domain statistics hold no feature dimension")

    def scores(self, features: np.ndarray) -> np.ndarray:
        return SCORES[self.method](self.arrays, clip(self.arrays, features))

    def reason(self, score: float) -> str | None:
        """Why an input with this score is refused; None when it is within the domain."""
        if np.isfinite(score) and score <= self.threshold:
            return None
        return f"unlike the training images (score {score:.3g} > {self.threshold:.3g})"

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays)
        return buffer.getvalue()


@dataclass(frozen=True)
class GateEntry:
    """The manifest's `domain` section, checked: the method, its threshold and the statistics file
    (a name in the bundle folder, its size and sha256; ct_edge.bundle reads it like a model)."""

    method: str
    threshold: float
    file: str
    sha256: str
    bytes: int


def gate_entry(section: dict, where: Path) -> GateEntry:
    """The domain section of the manifest at `where` as a GateEntry; BundleError when malformed."""
    try:
        entry = GateEntry(method=str(section["method"]), threshold=float(section["threshold"]),
                          file=str(section["file"]), sha256=str(section["sha256"]),
                          bytes=int(section["bytes"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: 1e999 bytes
        raise BundleError(f"{where}: malformed domain section ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    if entry.method not in SCORES:
        raise BundleError(f"{where}: unknown domain method {entry.method[:100]!r} (this ct-edge "
                          f"knows {', '.join(METHODS)}); upgrade ct-edge")
    if not np.isfinite(entry.threshold):
        raise BundleError(f"{where}: domain threshold {entry.threshold} is not finite")
    if not 0 < entry.bytes <= MAX_DOMAIN_BYTES:
        raise BundleError(f"{where}: implausible domain statistics size {entry.bytes}")
    return entry


def gate_from_npz(entry: GateEntry, data: bytes, path: Path) -> FeatureGate:
    """The gate from the statistics file's verified bytes (read from `path`, named in errors)."""
    try:
        with NUMPY_LOAD_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path}: unreadable domain statistics ({exc})") from None
    gate = FeatureGate(entry.method, entry.threshold, arrays)
    try:
        probe = gate.scores(np.zeros((1, gate.feature_dim), np.float32))
    except (KeyError, ValueError, IndexError) as exc:
        raise BundleError(f"{path}: domain statistics do not fit method {entry.method!r} "
                          f"({type(exc).__name__}: {exc})") from None
    if probe.shape != (1,):
        raise BundleError(f"{path}: domain statistics do not fit method {entry.method!r}")
    return gate


# --- metadata: what a DICOM header says, before any pixel is looked at ----------------------------------

# Bundle modality -> the DICOM Modality values and SOP classes it accepts, and how to name it.
MODALITIES: dict[str, dict] = {
    "ct": {"name": "CT", "modalities": ("CT",),
           "sop_classes": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                           "1.2.840.10008.5.1.4.1.1.2.2")},
    "xray": {"name": "X-ray (CR, DX)", "modalities": ("CR", "DX", "RG"),
             "sop_classes": ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                             "1.2.840.10008.5.1.4.1.1.1.1.1")},
}
# Modality values that say nothing about what was imaged (other, secondary capture).
NEUTRAL_MODALITIES = ("", "OT", "SC")
# Secondary Capture and its multi-frame variants: the class says nothing about what was imaged.
SECONDARY_CAPTURE_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1",
                             "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
                             "1.2.840.10008.5.1.4.1.1.7.4")
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")


def domain_rule(modality: str | None) -> dict:
    """The header rule of a bundle of `modality`; for a bundle that records none (converted before
    bundles named their modality), the rules of every modality ct-edge knows, joined."""
    if modality in MODALITIES:
        return MODALITIES[modality]
    rules = MODALITIES.values()
    return {"name": " or ".join(rule["name"] for rule in rules),
            "modalities": tuple(dict.fromkeys(m for rule in rules for m in rule["modalities"])),
            "sop_classes": tuple(dict.fromkeys(u for rule in rules for u in rule["sop_classes"]))}


def metadata_reason(info: DicomInfo, modality: str | None) -> str | None:
    """Why a DICOM object with these header fields is foreign to a bundle of `modality`; None when
    nothing in the header speaks against it (then the pixels decide)."""
    rule = domain_rule(modality)
    accepts = f"this bundle accepts {rule['name']}"
    if not info.has_pixels:
        kind = info.sop_class_name or (f"modality {info.modality}" if info.modality else "object")
        return f"DICOM {kind} holds no image; {accepts}"
    if info.modality not in NEUTRAL_MODALITIES and info.modality not in rule["modalities"]:
        return f"modality {info.modality}; {accepts}"
    uid = info.sop_class_uid
    if uid and uid not in rule["sop_classes"] and uid not in SECONDARY_CAPTURE_CLASSES:
        return f"SOP class {info.sop_class_name or uid}; {accepts}"
    if info.samples > 1 or (info.photometric and not info.photometric.startswith("MONOCHROME")):
        return f"colour image ({_colour_kind(info)}); {accepts}"
    part = info.body_part.replace(" ", "").replace("_", "")
    if part and not any(chest in part for chest in CHEST_PARTS):
        return f"body part {info.body_part}; this bundle accepts chest images"
    if modality == "ct" and "LOCALIZER" in info.image_type:
        return f"image type LOCALIZER (a scout view); {accepts} slices"
    return None


def _colour_kind(info: DicomInfo) -> str:
    """The colour model a header names, or its sample count when it names a gray one (or none):
    three samples labelled MONOCHROME2 are still colour."""
    if info.photometric and not info.photometric.startswith("MONOCHROME"):
        return info.photometric
    labelled = f", labelled {info.photometric}" if info.photometric else ""
    return f"{info.samples} samples per pixel{labelled}"
