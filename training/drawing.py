"""Drawing tools for the synthetic CT phantom: the patient's frame (pixel grid in body
coordinates), anti-aliased ellipses, branching lines, blurs, noise fields and point sampling.
Plain numpy, float32 grids; `training.phantom` composes a slice from them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# float32 halves the cost of every full-grid operation; 8-bit output needs no more.
_F = np.float32


@functools.lru_cache(maxsize=8)
def _freq2(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return fx**2 + fy**2


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur, sigma in pixels; periodic edges (the image border is air)."""
    if sigma <= 0:
        return img
    n = img.shape[0]
    if sigma < 2.5:
        # Few taps: shifted sums beat an FFT round trip.
        r = int(np.ceil(3.0 * sigma))
        taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        taps = (taps / taps.sum()).tolist()
        pad = np.pad(img.astype(_F, copy=False), r, mode="wrap")
        rows = taps[0] * pad[0:n]
        for i, w in enumerate(taps[1:], start=1):
            rows += w * pad[i : i + n]
        out = taps[0] * rows[:, 0:n]
        for i, w in enumerate(taps[1:], start=1):
            out += w * rows[:, i : i + n]
        return out
    # NumPy's float32 FFT is slower than float64 here, so transform in float64.
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * _freq2(n))
    out = np.fft.irfft2(np.fft.rfft2(img.astype(np.float64)) * gain, s=img.shape)
    return out.astype(_F)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std correlated noise with feature size ~sigma pixels."""
    field = blur(rng.standard_normal((size, size), dtype=_F), sigma)
    return field / (field.std() + 1e-12)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below edge0, 1 above edge1, a smooth cubic ramp between."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def splat(size: int, cols: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bilinear point splatting onto a (size, size) grid."""
    c0 = np.floor(cols)
    r0 = np.floor(rows)
    fc = cols - c0
    fr = rows - r0
    c = np.concatenate([c0, c0 + 1, c0, c0 + 1]).astype(np.intp)
    r = np.concatenate([r0, r0, r0 + 1, r0 + 1]).astype(np.intp)
    w = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc])
    w *= np.tile(weights, 4)
    ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
    out = np.bincount(r[ok] * size + c[ok], weights=w[ok], minlength=size * size)
    return out.reshape(size, size).astype(_F)


@dataclass(frozen=True)
class Frame:
    """Pixel grid expressed in the body frame.

    Image units span [-1, 1] across the image. ``p`` (patient's right to left, image left to
    right) and ``q`` (anterior to posterior, image top to bottom) are image units rotated and
    translated with the body, so anatomy is placed once and posed for free.
    """

    size: int
    p: np.ndarray
    q: np.ndarray
    a: float  # body half-width
    b: float  # body half-depth
    cos: float
    sin: float
    tx: float
    ty: float

    @property
    def px(self) -> float:
        """Pixels per image unit."""
        return self.size / 2.0

    @property
    def scale(self) -> float:
        """Pixel lengths in `training.phantom` are tuned at 192 px."""
        return self.size / 192.0

    def to_pixels(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.tx + self.cos * p - self.sin * q
        y = self.ty + self.sin * p + self.cos * q
        return (x + 1.0) * self.px - 0.5, (y + 1.0) * self.px - 0.5

    def radius(
        self,
        cp: float,
        cq: float,
        rp: float,
        rq: float,
        angle: float = 0.0,
        wobble: np.ndarray | None = None,
    ) -> np.ndarray:
        """Normalised elliptical radius (< 1 inside), optionally with a wavy outline."""
        return elliptical_radius(self.p, self.q, cp, cq, rp, rq, angle, wobble)

    def disc(
        self,
        cp: float,
        cq: float,
        rp: float,
        rq: float,
        angle: float = 0.0,
        wobble: np.ndarray | None = None,
    ) -> np.ndarray:
        """Anti-aliased elliptical mask in [0, 1]."""
        # Small shapes are evaluated only inside their bounding box: most of the render time
        # would otherwise go to zeros far from the shape.
        reach = max(rp, rq) * self.px
        if wobble is not None:
            reach *= 1.0 + np.abs(wobble[:, 0]).sum()
        col, row = self.to_pixels(np.float64(cp), np.float64(cq))
        r0, r1 = max(0, int(row - reach) - 2), min(self.size, int(row + reach) + 3)
        c0, c1 = max(0, int(col - reach) - 2), min(self.size, int(col + reach) + 3)
        out = np.zeros((self.size, self.size), _F)
        if r0 < r1 and c0 < c1:
            win = np.s_[r0:r1, c0:c1]
            r = elliptical_radius(self.p[win], self.q[win], cp, cq, rp, rq, angle, wobble)
            out[win] = self.inside(r, min(rp, rq))
        return out

    def inside(self, r: np.ndarray, radius: float) -> np.ndarray:
        """Anti-aliased mask from a normalised radius field (about one pixel of ramp)."""
        return np.clip((1.0 - r) * float(radius * self.px) + 0.5, 0.0, 1.0)


def elliptical_radius(
    p: np.ndarray,
    q: np.ndarray,
    cp: float,
    cq: float,
    rp: float,
    rq: float,
    angle: float,
    wobble: np.ndarray | None,
) -> np.ndarray:
    """`Frame.radius` on explicit (p, q) grids, so `Frame.disc` can pass a window of them."""
    # Python floats keep float32 grids in float32 (NumPy scalars would upcast them).
    dp = p - float(cp)
    dq = q - float(cq)
    rp, rq = float(rp), float(rq)
    if angle:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        dp, dq = c * dp + s * dq, -s * dp + c * dq
    up = dp / rp
    uq = dq / rq
    r = np.sqrt(up * up + uq * uq)
    if wobble is not None:
        # cos(k*phi + phase) through angle-addition recurrences: no arctan2/cos per pixel.
        inv = 1.0 / np.maximum(r, 1e-6)
        c1, s1 = up * inv, uq * inv
        ck, sk = c1 * c1 - s1 * s1, 2.0 * c1 * s1
        outline = np.ones_like(r)
        for amp, phase in wobble.tolist():
            outline += amp * np.cos(phase) * ck - amp * np.sin(phase) * sk
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        r = r / outline
    return r


def make_frame(rng: np.random.Generator, size: int) -> Frame:
    """A (size, size) grid posed with a random body: tilt, shift, half-width and depth."""
    c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(_F)
    x, y = np.meshgrid(c, c)
    theta = rng.uniform(-0.12, 0.12)
    tx = rng.uniform(-0.06, 0.06)
    ty = rng.uniform(-0.10, 0.02)
    a = rng.uniform(0.76, 0.93)
    b = a * rng.uniform(0.62, 0.78)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    dx = x - tx
    dy = y - ty
    return Frame(
        size=size,
        p=cos * dx + sin * dy,
        q=-sin * dx + cos * dy,
        a=a,
        b=b,
        cos=cos,
        sin=sin,
        tx=tx,
        ty=ty,
    )


def branching_tree(
    rng: np.random.Generator,
    hilum: tuple[float, float],
    heading: float,
    spread: float,
    trunks: int,
    trunk_len: float,
    depth: int,
    step: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random branching lines from a hilum in the body frame.

    Returns points (p, q), each point's segment length and its generation (0 = trunk).
    Vectorised per generation so a whole tree costs a handful of array operations.
    """
    start = np.tile(np.asarray(hilum, dtype=float), (trunks, 1))
    head = heading + rng.uniform(-spread, spread, trunks)
    length = trunk_len * rng.uniform(0.7, 1.15, trunks)
    ps, qs, segs, gens = [], [], [], []
    for gen in range(depth):
        n = max(2, int(np.ceil(length.max() / step)))
        t = np.arange(1, n + 1) / n
        bend = rng.normal(0.0, 0.3, head.size)
        ang = head[:, None] + bend[:, None] * t[None, :]
        seg = np.broadcast_to((length / n)[:, None], ang.shape)
        p = start[:, :1] + np.cumsum(np.cos(ang) * seg, axis=1)
        q = start[:, 1:] + np.cumsum(np.sin(ang) * seg, axis=1)
        ps.append(p.ravel())
        qs.append(q.ravel())
        segs.append(seg.ravel())
        gens.append(np.full(p.size, gen))
        m = head.size
        fork = rng.uniform(0.25, 0.65, (m, 2)) * np.array([-1.0, 1.0])
        start = np.repeat(np.stack([p[:, -1], q[:, -1]], axis=1), 2, axis=0)
        head = (ang[:, -1:] + fork).ravel()
        length = np.repeat(length, 2) * rng.uniform(0.65, 0.85, 2 * m)
    return np.concatenate(ps), np.concatenate(qs), np.concatenate(segs), np.concatenate(gens)


def draw_lines(
    frame: Frame,
    p: np.ndarray,
    q: np.ndarray,
    seg: np.ndarray,
    intensity: np.ndarray | float,
    sigma_px: float,
) -> np.ndarray:
    """Render points as a line of Gaussian cross-section whose peak equals `intensity`."""
    sigma = max(0.5, sigma_px * frame.scale)
    cols, rows = frame.to_pixels(p, q)
    weights = np.broadcast_to(intensity, p.shape) * seg * frame.px * np.sqrt(2 * np.pi) * sigma
    return blur(splat(frame.size, cols, rows, weights), sigma)


def sample_pixels(rng: np.random.Generator, weight: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Draw `n` pixel positions (cols, rows) with probability proportional to `weight`."""
    cdf = np.cumsum(weight.ravel(), dtype=np.float64)
    total = cdf[-1]
    if n <= 0 or total <= 0:
        return np.zeros(0), np.zeros(0)
    idx = np.searchsorted(cdf, rng.uniform(0.0, total, n), side="right")
    idx = np.minimum(idx, cdf.size - 1)
    rows, cols = np.divmod(idx, weight.shape[1])
    jitter = rng.uniform(-0.5, 0.5, (2, n))
    return cols + jitter[0], rows + jitter[1]


def pixel_blob(frame: Frame, col: float, row: float, rc: float, rr: float, angle: float) -> np.ndarray:
    """Anisotropic Gaussian blob at a pixel position, radii in pixels."""
    idx = np.arange(frame.size, dtype=_F)
    dc = idx[None, :] - float(col)
    dr = idx[:, None] - float(row)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    u = (c * dc + s * dr) / float(rc)
    v = (-s * dc + c * dr) / float(rr)
    return np.exp(-0.5 * (u * u + v * v))
