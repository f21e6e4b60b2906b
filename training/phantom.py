"""The synthetic axial chest CT slice: anatomy, class findings and acquisition, rendered in numpy.

Every slice has the same anatomy model (body, fat rim, chest wall, lungs, heart, aorta, spine,
ribs, vessels, sometimes a table) with randomised pose, size, intensity and noise. Only the
findings depend on the class: peripheral bilateral ground-glass patches for COVID-19, central or
lobar consolidation with thickened bronchial walls for Viral Pneumonia, nothing for Normal. Most
sick slices show clearly visible findings; a tail of faint early cases (`_SUBTLE_RATE`) keeps the
set from being trivially separable. `training.synthetic` writes the built-in data set from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .drawing import (
    Frame,
    blur,
    branching_tree,
    draw_lines,
    make_frame,
    pixel_blob,
    sample_pixels,
    smooth_noise,
    smoothstep,
    splat,
)

CLASSES: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")
MIN_SIZE = 32
# Bump when the rendering changes, so that stale data sets on disk get regenerated
# (training.synthetic stamps every set with it).
GENERATOR_VERSION = 2

# float32 halves the cost of every full-grid operation; 8-bit output needs no more.
_F = np.float32


@dataclass
class _Anatomy:
    background: np.ndarray  # everything except lung content and bones
    lungs: list[np.ndarray]  # per lung soft mask, image-left lung first
    lung: np.ndarray  # union of the lungs
    depth: np.ndarray  # blurred lung mask: ~0.5 at the pleura, -> 1 deep inside
    parenchyma: np.ndarray  # lung intensity without vessels
    vessels: np.ndarray  # additive, already restricted to the lungs
    hila: list[tuple[float, float]]  # per lung hilum in the body frame
    overlay: np.ndarray  # bones and table, drawn on top
    overlay_alpha: np.ndarray


def _anatomy(frame: Frame, rng: np.random.Generator, lung_extent: float = 1.0) -> _Anatomy:
    """Everything but the findings, drawn from a stream the label never touches.

    `lung_extent` scales both lungs (1 = the mid-chest slices of the training set; smaller
    towards the apex and the base of a series)."""
    a, b, size = frame.a, frame.b, frame.size
    air = rng.uniform(0.0, 0.03)
    fat_v = rng.uniform(0.33, 0.42)
    muscle_v = rng.uniform(0.54, 0.62)
    bone_v = rng.uniform(0.86, 0.98)

    body_r = frame.radius(0.0, 0.0, a, b, wobble=rng.normal(0.0, 0.015, (3, 2)))
    fat_t = rng.uniform(0.03, 0.10)
    wall_t = rng.uniform(0.05, 0.08)
    body = frame.inside(body_r, b)
    muscle = frame.inside(body_r / (1.0 - fat_t), b * (1.0 - fat_t))
    cavity_scale = 1.0 - fat_t - wall_t
    cavity = frame.inside(body_r / cavity_scale, b * cavity_scale)
    skin = np.exp(-(((body_r - 1.0) * b * frame.px / (0.7 * frame.scale + 0.3)) ** 2))

    img = np.full((size, size), air, dtype=_F)
    img += (fat_v - air) * body
    img += (muscle_v - fat_v) * muscle
    img += 0.12 * skin * body
    # Mediastinal fat fills the cavity; organs and lungs are drawn into it.
    img += (fat_v + 0.03 - muscle_v) * cavity

    hp, hq = rng.uniform(0.08, 0.16) * a, rng.uniform(-0.34, -0.22) * b
    hrp, hrq = rng.uniform(0.24, 0.30) * a, rng.uniform(0.30, 0.38) * b
    h_ang = rng.uniform(-0.6, -0.25)
    heart_r = frame.radius(hp, hq, hrp, hrq, h_ang)
    heart = frame.inside(heart_r, min(hrp, hrq))
    heart_inner = frame.inside(heart_r / 0.95, 0.95 * min(hrp, hrq))
    img += (fat_v - img) * heart
    img += (muscle_v + rng.uniform(0.0, 0.05) - fat_v) * heart_inner
    ao_r = rng.uniform(0.06, 0.08) * a
    ao_p, ao_q = 0.16 * a, rng.uniform(0.28, 0.38) * b
    aorta = frame.disc(ao_p, ao_q, ao_r, ao_r)
    img += (muscle_v + 0.05 - img) * aorta
    # Keeps the lungs apart at the midline, as the oesophagus and great vessels do.
    column = frame.disc(0.0, 0.0, 0.06 * a, 0.7 * b)

    vb_r = rng.uniform(0.09, 0.12) * a
    vb_q = b * rng.uniform(0.42, 0.50)
    canal_r = vb_r * 0.45
    canal_q = vb_q + vb_r + canal_r * 1.1
    vb_outer = frame.disc(0.0, vb_q, vb_r, vb_r * 0.92)
    vb_inner = frame.disc(0.0, vb_q, vb_r * 0.82, vb_r * 0.74)
    arch = frame.disc(0.0, canal_q + canal_r * 0.2, canal_r * 2.0, canal_r * 1.7)
    canal = frame.disc(0.0, canal_q, canal_r, canal_r)
    spinous = frame.disc(0.0, canal_q + canal_r * 2.4, canal_r * 0.45, canal_r * 1.4)
    transverse = sum(
        frame.disc(s * vb_r * 1.1, canal_q, vb_r * 0.5, canal_r * 0.4, s * 0.5) for s in (-1.0, 1.0)
    )
    bone = np.clip(vb_outer + arch + spinous + transverse, 0.0, 1.0)
    bone_val = bone_v - 0.12 * vb_inner  # trabecular marrow is darker than cortex
    bone_alpha = bone * (1.0 - canal)
    spine_keepout = frame.disc(0.0, vb_q + vb_r * 0.6, vb_r * 1.6, vb_r * 1.9)

    rib_alpha = np.zeros((size, size), _F)
    rib_scale = 1.0 - fat_t - wall_t * 0.45
    for side in (-1.0, 1.0):
        n_ribs = int(rng.integers(4, 7))
        # Angles stop short of the midline, where sternum and spine already are.
        angles = rng.uniform(0.2, 2.75, n_ribs)
        for ang in angles:
            rp = side * np.sin(ang) * a * rib_scale
            rq = -np.cos(ang) * b * rib_scale
            tang = np.arctan2(np.sin(ang) * b, side * np.cos(ang) * a)
            length = rng.uniform(0.035, 0.07)
            thick = rng.uniform(0.018, 0.026)
            rib_alpha = np.maximum(rib_alpha, frame.disc(rp, rq, length, thick, tang))
    sternum = frame.disc(0.0, -b * (1.0 - fat_t - wall_t * 0.5), 0.07 * a, 0.03)
    rib_alpha = np.maximum(rib_alpha, sternum)
    overlay = bone_val * bone_alpha + bone_v * 0.92 * rib_alpha * (1.0 - bone_alpha)
    overlay_alpha = np.clip(bone_alpha + rib_alpha, 0.0, 1.0)
    overlay = overlay / np.maximum(overlay_alpha, 1e-6)

    # The keep-out (heart, aorta, spine, midline) carves the medial border: kidney shapes.
    lung_scale = rng.uniform(0.88, 1.06) * lung_extent
    cavity_lung = frame.inside(body_r / (cavity_scale - 0.01), b * cavity_scale)
    keepout = np.clip(
        frame.inside(heart_r / 1.12, 1.12 * min(hrp, hrq))
        + frame.disc(ao_p, ao_q, ao_r * 1.3, ao_r * 1.3)
        + column
        + spine_keepout,
        0.0,
        1.0,
    )
    lungs: list[np.ndarray] = []
    hila: list[tuple[float, float]] = []
    for side in (-1.0, 1.0):
        s_scale = lung_scale * rng.uniform(0.94, 1.04)
        cp = side * a * rng.uniform(0.42, 0.48)
        cq = b * rng.uniform(0.0, 0.08)
        rp = a * 0.37 * s_scale
        rq = b * 0.8 * s_scale
        wob = rng.normal(0.0, 0.03, (3, 2))
        mask = frame.disc(cp, cq, rp, rq, side * rng.uniform(0.0, 0.15), wob)
        lungs.append(mask * cavity_lung * (1.0 - keepout))
        hila.append((side * a * rng.uniform(0.18, 0.24), b * rng.uniform(-0.12, 0.02)))
    lung = np.clip(lungs[0] + lungs[1], 0.0, 1.0)
    depth = blur(lung, 0.045 * size)

    # Gravity makes the posterior (dependent) lung slightly denser in every patient.
    lung_v = rng.uniform(0.05, 0.12)
    dependent = rng.uniform(0.0, 0.05) * np.clip(frame.q / b + 0.2, 0.0, 1.0)
    texture = rng.uniform(0.006, 0.018) * smooth_noise(rng, size, 1.5 * frame.scale)
    parenchyma = lung_v + dependent + texture
    if rng.random() < 0.2:
        # Faint dependent subpleural band, present in every class as a benign look-alike.
        band = (1.0 - smoothstep(0.5, 0.75, depth)) * smoothstep(0.1, 0.5, frame.q / b)
        parenchyma = parenchyma + rng.uniform(0.02, 0.05) * band

    # Splats are collected per line width so that each width costs a single blur.
    vessel_v = rng.uniform(0.25, 0.42)
    thick_sigma = max(0.5, 0.9 * frame.scale)
    thin_sigma = max(0.5, 0.55 * frame.scale)
    norm = np.sqrt(2 * np.pi) * frame.px
    thick: list[tuple[np.ndarray, ...]] = []
    thin: list[tuple[np.ndarray, ...]] = []
    hila_px = []
    for side, hilum in zip((-1.0, 1.0), hila, strict=True):
        heading = 0.0 if side > 0 else np.pi
        trunks = int(rng.integers(3, 5))
        p, q, seg, gen = branching_tree(rng, hilum, heading, 1.6, trunks, 0.07, 3, 0.6 / frame.px)
        cols, rows = frame.to_pixels(p, q)
        mass = vessel_v * (1.0 - 0.2 * gen) * seg * norm
        big = gen < 2
        thick.append((cols[big], rows[big], mass[big] * thick_sigma))
        thin.append((cols[~big], rows[~big], mass[~big] * thin_sigma))
        hila_px.append(np.array(frame.to_pixels(np.float64(hilum[0]), np.float64(hilum[1]))))

    n_seg = int(rng.integers(40, 80) * frame.scale**2 + 8)
    cols, rows = sample_pixels(rng, lung * (0.2 + depth), n_seg)
    near = np.where(cols < (hila_px[0][0] + hila_px[1][0]) / 2, 0, 1)
    hub = np.stack(hila_px)[near]
    dc, dr = cols - hub[:, 0], rows - hub[:, 1]
    dist = np.hypot(dc, dr) / (0.5 * size)  # ~1 at the far pleura
    ang = np.arctan2(dr, dc) + rng.normal(0.0, 0.35, n_seg)
    fall = np.clip(1.0 - 0.7 * dist, 0.2, 1.0)
    length = rng.uniform(3.0, 10.0, n_seg) * frame.scale * fall
    t = np.linspace(-0.5, 0.5, 12)
    seg_c = (cols[:, None] + np.cos(ang)[:, None] * length[:, None] * t).ravel()
    seg_r = (rows[:, None] + np.sin(ang)[:, None] * length[:, None] * t).ravel()
    seg_mass = vessel_v * rng.uniform(0.4, 0.9, n_seg) * fall * length / 12
    thin.append((seg_c, seg_r, np.repeat(seg_mass, 12) * np.sqrt(2 * np.pi) * thin_sigma))

    n_dots = int(rng.integers(40, 90) * frame.scale**2 + 8)
    cols, rows = sample_pixels(rng, lung * (0.2 + depth), n_dots)
    dot_w = rng.uniform(0.3, 1.0, cols.size) * vessel_v * 2 * np.pi * thin_sigma**2
    thin.append((cols, rows, dot_w))
    thick_splat = splat(size, *(np.concatenate(parts) for parts in zip(*thick, strict=True)))
    thin_splat = splat(size, *(np.concatenate(parts) for parts in zip(*thin, strict=True)))
    vessels = blur(thick_splat, thick_sigma) + blur(thin_splat, thin_sigma)
    vessels = np.minimum(vessels, 0.6) * lung * smoothstep(0.4, 0.6, depth)

    # The couch belongs to the scanner, not the body, so it does not rotate with the pose.
    bottom = frame.ty + float(np.hypot(a * frame.sin, b * frame.cos)) * 1.03
    if rng.random() < 0.6:
        yy = frame.q * frame.cos + frame.p * frame.sin + frame.ty
        xx = frame.p * frame.cos - frame.q * frame.sin + frame.tx
        top = bottom + rng.uniform(0.02, 0.06) + rng.uniform(0.0, 0.15) * xx**2
        width = rng.uniform(0.7, 0.95)
        table = np.zeros((size, size), _F)
        for offset, amp in ((0.0, 1.0), (rng.uniform(0.04, 0.08), 0.6)):
            dist = (yy - top - offset) * frame.px / max(0.8, 1.2 * frame.scale)
            table = np.maximum(table, amp * np.exp(-dist * dist))
        table *= smoothstep(width, width - 0.05, np.abs(xx))
        table_v = rng.uniform(0.45, 0.7)
        overlay = overlay * overlay_alpha + table_v * table * (1.0 - overlay_alpha)
        overlay_alpha = np.clip(overlay_alpha + table, 0.0, 1.0)
        overlay = overlay / np.maximum(overlay_alpha, 1e-6)

    return _Anatomy(
        background=img,
        lungs=lungs,
        lung=lung,
        depth=depth,
        parenchyma=parenchyma,
        vessels=vessels,
        hila=hila,
        overlay=overlay,
        overlay_alpha=overlay_alpha,
    )


@dataclass
class _Findings:
    haze: np.ndarray  # additive, vessels stay visible through it (ground glass)
    solid: np.ndarray  # consolidation alpha: hides vessels
    solid_value: np.ndarray | float
    walls: np.ndarray  # additive bright bronchial walls
    bronchogram: np.ndarray  # alpha of air-filled bronchi inside consolidation


def _no_findings(size: int) -> _Findings:
    zero = np.zeros((size, size), _F)
    return _Findings(zero, zero, 0.0, zero, zero)


# Share of COVID-19 and Viral Pneumonia slices drawn as subtle early disease: the hard tail that
# keeps the set from being trivially separable. The rest show clearly visible findings.
_SUBTLE_RATE = 0.1


def _severity(rng: np.random.Generator, subtle: tuple[float, float], overt: tuple[float, float]) -> float:
    """Disease severity in [0, 1]: a faint early case with probability `_SUBTLE_RATE`."""
    low, high = subtle if rng.random() < _SUBTLE_RATE else overt
    return float(rng.uniform(low, high))


def _covid(frame: Frame, anat: _Anatomy, rng: np.random.Generator) -> _Findings:
    """Bilateral, peripheral, patchy ground-glass opacities."""
    size = frame.size
    severity = _severity(rng, (0.0, 0.25), (0.55, 1.0))
    amp = 0.1 + 0.2 * severity
    peripheral = 1.0 - smoothstep(0.55, 0.9, anat.depth)
    # Posterior and lateral pleura are favoured over the mediastinal surface.
    posterior = 0.5 + smoothstep(-0.4, 0.6, frame.q / frame.b)
    lateral = smoothstep(0.1, 0.5, np.abs(frame.p) / frame.a)
    blobs = np.zeros((size, size), _F)
    for lung in anat.lungs:
        weight = lung * peripheral * posterior * (0.2 + lateral)
        n = 1 + int(rng.poisson(1.0 + 3.0 * severity))
        cols, rows = sample_pixels(rng, weight, n)
        for col, row in zip(cols, rows, strict=True):
            r_big = (0.055 + 0.07 * severity * rng.uniform(0.6, 1.2)) * size
            r_small = r_big * rng.uniform(0.45, 0.9)
            strength = rng.uniform(0.6, 1.0)
            blob = pixel_blob(frame, col, row, r_big, r_small, rng.uniform(0, np.pi))
            blobs = np.maximum(blobs, strength * blob)
    patchy = blobs * (0.75 + 0.35 * smooth_noise(rng, size, 3.0 * frame.scale))
    haze = smoothstep(0.2, 0.75, patchy)
    if rng.random() < 0.35 * severity:
        # Crazy paving: a fine reticular pattern on top of the ground glass.
        mesh = np.abs(smooth_noise(rng, size, 1.2 * frame.scale))
        haze = haze * (0.85 + 0.4 * (mesh < 0.25))
    haze = blur(haze, 1.2 * frame.scale) * anat.lung * amp
    zero = np.zeros((size, size), _F)
    return _Findings(haze, zero, 0.0, zero, zero)


def _viral(frame: Frame, anat: _Anatomy, rng: np.random.Generator) -> _Findings:
    """Central or lobar consolidation with a peribronchial pattern around the hilum."""
    size = frame.size
    severity = _severity(rng, (0.0, 0.2), (0.45, 1.0))
    both = rng.random() < 0.3
    first = int(rng.integers(0, 2))
    sides = [first, 1 - first] if both else [first]
    # Well inside the lung, so that small consolidations stand out against aerated lung
    # instead of merging with the mediastinum.
    central = smoothstep(0.72, 0.95, anat.depth)
    noise = 0.8 * smooth_noise(rng, size, 5.0 * frame.scale)
    noise += 0.4 * smooth_noise(rng, size, 1.5 * frame.scale)
    solid = np.zeros((size, size), _F)
    for k, idx in enumerate(sides):
        lung = anat.lungs[idx]
        extent = severity * (1.0 if k == 0 else rng.uniform(0.3, 0.7))
        hp, hq = anat.hila[idx]
        dp, dq = frame.p - hp, frame.q - hq
        from_hilum = np.sqrt(dp * dp + dq * dq)
        if rng.random() < 0.5:
            # Lobar: the part of the lung beyond a fissure-like line between the hilum and the
            # middle of the lung, facing away from the mediastinum, out to a reach that grows
            # with the extent.
            mass = float(lung.sum()) + 1e-6
            mp = float((lung * frame.p).sum()) / mass
            mq = float((lung * frame.q).sum()) / mass
            cp, cq = hp + 0.5 * (mp - hp), hq + 0.5 * (mq - hq)
            lp, lq = frame.p - cp, frame.q - cq
            ang = (np.pi if idx == 0 else 0.0) + rng.uniform(-1.4, 1.4)
            offset = rng.uniform(-0.03, 0.08) - 0.06 * extent
            along = lp * float(np.cos(ang)) + lq * float(np.sin(ang))
            reach = (0.18 + 0.4 * extent) * frame.a
            lobe = smoothstep(offset, offset + 0.01, along)
            lobe *= 1.0 - smoothstep(0.7 * reach, reach, np.sqrt(lp * lp + lq * lq))
            field = lobe * (0.75 + 0.15 * noise) + 0.1 * noise
        else:
            near_hilum = np.exp(from_hilum * from_hilum * float(-0.5 / (0.25 * frame.a) ** 2))
            cols, rows = sample_pixels(rng, lung * central * (0.2 + near_hilum), 1)
            r_big = (0.05 + 0.1 * extent * rng.uniform(0.7, 1.2)) * size
            r_small = r_big * rng.uniform(0.5, 0.9)
            blob = pixel_blob(frame, cols[0], rows[0], r_big, r_small, rng.uniform(0, np.pi))
            field = blob + 0.18 * noise
        solid = np.maximum(solid, smoothstep(0.45, 0.6, field) * lung)
    # Soft halo around the dense core, as partially filled airspaces.
    solid = np.clip(0.8 * solid + 0.5 * blur(solid, 2.5 * frame.scale), 0.0, 1.0) * anat.lung
    # Consolidation approaches soft-tissue density, well above ground glass.
    density = 0.5 + 0.5 * severity
    target = rng.uniform(0.48, 0.6) + 0.02 * noise
    solid_value = anat.parenchyma + density * (target - anat.parenchyma)

    # Thickened bronchial walls read as tram lines (wide minus narrow line) plus a cuff of haze.
    walls = np.zeros((size, size), _F)
    bronchogram = np.zeros((size, size), _F)
    wall_v = 0.08 + 0.22 * severity
    for idx in sides:
        hp, hq = anat.hila[idx]
        heading = np.pi if idx == 0 else 0.0
        trunks = int(rng.integers(2, 5))
        p, q, seg, _ = branching_tree(rng, (hp, hq), heading, 1.5, trunks, 0.08, 3, 0.6 / frame.px)
        outer = draw_lines(frame, p, q, seg, 1.0, 1.5)
        inner = draw_lines(frame, p, q, seg, 1.0, 0.6)
        tube = np.clip(outer - 0.8 * inner, 0.0, None) + 0.35 * blur(outer, 2.5 * frame.scale)
        walls += wall_v * tube
        bronchogram = np.maximum(bronchogram, 0.6 * np.clip(inner, 0.0, 1.0))
    fade = smoothstep(0.45, 0.7, anat.depth) * anat.lung
    return _Findings(np.zeros((size, size), _F), solid, solid_value, walls * fade, bronchogram * fade)


def _findings(label: str, frame: Frame, anat: _Anatomy, rng: np.random.Generator) -> _Findings:
    """The only class-dependent part of a slice."""
    if label == "COVID-19":
        return _covid(frame, anat, rng)
    if label == "Viral Pneumonia":
        return _viral(frame, anat, rng)
    return _no_findings(frame.size)


def _compose(anat: _Anatomy, found: _Findings) -> np.ndarray:
    img = anat.background * (1.0 - anat.lung) + (anat.parenchyma + found.haze) * anat.lung
    img = img + anat.vessels * (1.0 - found.solid)
    img = img * (1.0 - found.solid) + found.solid_value * found.solid
    # Inside consolidation bronchi show as air bronchograms (back to lung density), not walls.
    air = found.bronchogram * found.solid
    img = img * (1.0 - air) + anat.parenchyma * air + found.walls * (1.0 - found.solid)
    return img * (1.0 - anat.overlay_alpha) + anat.overlay * anat.overlay_alpha


def _acquire(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner/reconstruction variation: window (gamma, contrast, level), blur and noise."""
    size = img.shape[0]
    scale = size / 192.0
    gamma = rng.uniform(0.8, 1.25)
    contrast = rng.uniform(0.85, 1.12)
    level = rng.uniform(-0.04, 0.05)
    img = np.clip(img, 0.0, 1.0) ** gamma * contrast + level
    img = blur(img, rng.uniform(0.3, 0.9) * scale)
    img = img + rng.uniform(0.008, 0.035) * rng.standard_normal(img.shape, dtype=_F)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_slice(label: str, rng: np.random.Generator, size: int = 192, *,
                 lung_extent: float = 1.0, anatomy_seed: int | None = None) -> np.ndarray:
    """One synthetic slice, uint8 (size, size).

    The generator is split into independent anatomy, findings and acquisition streams, so two
    labels rendered from equally seeded generators show the same patient and differ only in
    the findings. `anatomy_seed` fixes the anatomy stream (one patient across the slices of a
    series, training.synthetic_series); `lung_extent` scales the lungs (see `_anatomy`).
    """
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    anat_rng, finding_rng, acq_rng = rng.spawn(3)
    if anatomy_seed is not None:
        anat_rng = np.random.default_rng(anatomy_seed)
    frame = make_frame(anat_rng, size)
    anat = _anatomy(frame, anat_rng, lung_extent)
    found = _findings(label, frame, anat, finding_rng)
    return _acquire(_compose(anat, found), acq_rng)
