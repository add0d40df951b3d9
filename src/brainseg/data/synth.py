"""Synthetic brain-MRI data sets in the on-disk layouts brainseg reads.

Each patient is a small stack of axial slices through an elliptical head (scalp, skull, a thin
CSF rim, brain with smooth grey/white texture, ventricles) with one irregular lesion in the
middle slices. The lesion is bright on FLAIR, slightly dark on pre-contrast T1 and partly
rim-enhancing on post-contrast T1, roughly like a glioma in the LGG MRI Segmentation set.
Everything is drawn from one seeded generator, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

from brainseg.config import check_seed
from brainseg.errors import BadInputError, OptionError

__all__ = ["LABEL_NAMES", "LAYOUTS", "synthesize"]

LAYOUTS = ("kaggle_3m", "images_masks")
LABEL_NAMES = ("meningioma", "glioma", "pituitary")
MIN_SIZE = 64
MAX_SIZE = 1024  # real sets are 256 or 512; memory grows with size**2 (~0.4 GB a patient at 1024)

# Tissue intensities per channel (pre-contrast T1, FLAIR, post-contrast T1) on the 0..255
# scale, set by eye against the LGG set: bright scalp fat, dark bone, CSF dark on FLAIR.
_SCALP = np.array([185.0, 175.0, 135.0], dtype=np.float32)
_BONE = np.array([14.0, 12.0, 18.0], dtype=np.float32)
_CSF = np.array([30.0, 22.0, 38.0], dtype=np.float32)
_WHITE = np.array([82.0, 68.0, 64.0], dtype=np.float32)
_GREY = np.array([66.0, 84.0, 58.0], dtype=np.float32)
_LESION = np.array([58.0, 0.0, 54.0], dtype=np.float32)  # FLAIR is brain + a per-patient boost
_FLAIR_BRAIN = np.float32(0.5 * (_WHITE[1] + _GREY[1]))

# Lossless deflate like the published files; level 1 is ~4x faster than the default and the
# files are only ~4% larger (noise does not compress anyway).
_TIFF = {"compression": "zlib", "compressionargs": {"level": 1}}

# Radii of the head layers, as fractions of the outer head ellipse.
_R_BONE, _R_CSF, _R_BRAIN = 0.91, 0.86, 0.84


@dataclass(frozen=True)
class _Sphere:
    """A smooth random function on the unit sphere: sum of a few plane waves, range [-1, 1]."""

    dirs: np.ndarray  # (m, 3) unit vectors
    weights: np.ndarray  # (m,), sums to 1
    phases: np.ndarray  # (m,)
    freq: float

    @classmethod
    def draw(cls, rng: np.random.Generator, m: int, freq: float) -> _Sphere:
        dirs = rng.standard_normal((m, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        weights = rng.uniform(0.5, 1.0, m)
        return cls(dirs, weights / weights.sum(), rng.uniform(0, 2 * np.pi, m), freq)

    def __call__(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(ux), dtype=np.float32)
        for d, w, p in zip(self.dirs, self.weights, self.phases, strict=True):
            out += np.float32(w) * np.cos(self.freq * (d[0] * ux + d[1] * uy + d[2] * uz) + p)
        return out


@dataclass(frozen=True)
class _Patient:
    """Everything random about one patient except pixel noise; lengths are fractions of size."""

    folder: str
    age: int
    gender: int
    n: int  # slices
    # head: centre, semi-axes, rotation, axial range covered, outline wobble
    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    t0: float
    t1: float
    wobble: np.ndarray  # (4, 2): amplitude and phase of harmonics 1..4
    # lesion: centre (x, y, slice), semi-axes (x, y, slices), rotation, boundary noise
    lx: float
    ly: float
    lz: float
    lrx: float
    lry: float
    lrz: float
    langle: float
    lamp: float
    shape: _Sphere
    rim: _Sphere
    flair_boost: float
    rim_boost: float
    # small random grids, upsampled to smooth fields at render time
    coarse: np.ndarray  # (2, 6, 6)
    fine: np.ndarray  # (2, 18, 18)
    bias: np.ndarray  # (3, 4, 4)
    bias_amp: float


def synthesize(
    out: str | Path,
    patients: int = 6,
    seed: int = 0,
    *,
    slices: tuple[int, int] = (16, 24),
    size: int = 256,
    layout: str = "kaggle_3m",
    progress: bool = False,
) -> Path:
    """Write a synthetic brain-MRI data set into the new or empty folder `out` and return it.

    layout "kaggle_3m": patient folders `TCGA_SY_<id>_<date>/` with RGB slice TIFFs and 0/255
    mask TIFFs, plus `data.csv`. layout "images_masks": `images/<k>.png` (FLAIR only),
    `masks/<k>.png` and `labels.csv`. Each patient has `slices` (inclusive range) slices of
    `size` x `size` pixels; the same arguments always give byte-identical files.
    """
    if layout not in LAYOUTS:
        raise OptionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise OptionError(f"size must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    seed = check_seed(seed)
    if int(patients) < 1:
        raise OptionError(f"patients must be at least 1, got {patients}")
    lo, hi = (int(s) for s in slices)
    if not 3 <= lo <= hi:
        raise OptionError(f"slices must be (lo, hi) with 3 <= lo <= hi, got {slices}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "exists and is not a folder; choose a new output folder")
    if out.is_dir() and any(out.iterdir()):
        raise BadInputError(out, "folder is not empty; choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    size = int(size)
    grid = _Grid(size)
    k = 0
    rows: list[str] = []
    for i in range(int(patients)):
        p = _draw_patient(rng, i, lo, hi)
        images, masks = _render(p, grid, rng)
        if layout == "kaggle_3m":
            _write_kaggle(out, p, images, masks)
            rows.append(f"{p.folder.rsplit('_', 1)[0]},{p.age},{p.gender}")
        else:
            label = i % 3 + 1  # tumour type is a property of the patient
            for img, mask in zip(images, masks, strict=True):
                k += 1
                _write_png(out / "images" / f"{k}.png", img[..., 1])
                _write_png(out / "masks" / f"{k}.png", mask)
                rows.append(f"{k},{label},{LABEL_NAMES[label - 1]}")
        if progress:
            n_les = int(sum(bool(m.any()) for m in masks))
            print(
                f"synth: patient {i + 1}/{patients} {p.folder}: {p.n} slices, {n_les} with lesion",
                file=sys.stderr,
                flush=True,
            )
    if layout == "kaggle_3m":
        header, name = "Patient,age_at_initial_pathologic,gender", "data.csv"
    else:
        header, name = "index,label,label_name", "labels.csv"
    (out / name).write_bytes(("\n".join([header, *rows]) + "\n").encode("ascii"))
    return out


def _draw_patient(rng: np.random.Generator, i: int, lo: int, hi: int) -> _Patient:
    """Draw one patient's anatomy and lesion (sizes relative to the image side)."""
    n = int(rng.integers(lo, hi + 1))
    date = f"{rng.integers(1995, 2006)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    age = int(rng.integers(20, 76))
    gender = int(rng.integers(1, 3))  # coded 1/2 like the published data.csv

    cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
    ax = rng.uniform(0.30, 0.35)
    ay = min(ax * rng.uniform(1.12, 1.25), 0.43)
    angle = rng.uniform(-0.25, 0.25)
    t0, t1 = -rng.uniform(0.85, 0.95), rng.uniform(0.80, 0.92)
    # Outline harmonics 1..4: an egg-shaped, slightly irregular head.
    wobble = np.stack([rng.uniform(0, 0.02, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1)

    # Lesion boundary: unit ellipsoid radius perturbed by a smooth function of direction.
    lamp = rng.uniform(0.18, 0.35)
    shape = _Sphere.draw(rng, 8, rng.uniform(2.5, 4.5))
    rim = _Sphere.draw(rng, 3, 2.0)
    # Scale the slice axis so the lesion covers 30-60% of the slices: sample the boundary's
    # extreme heights over many directions (exact enough; the boundary is smooth).
    u = rng.standard_normal((2000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    height = u[:, 2] * (1 + lamp * shape(u[:, 0], u[:, 1], u[:, 2]))
    top, bottom = float(height.max()), float(height.min())
    span = rng.uniform(0.30, 0.60) * n
    lrz = max(span, 1.2) / (top - bottom)
    half = span / 2
    mid = (n - 1) / 2 + rng.uniform(-0.08, 0.08) * n
    mid = float(np.clip(mid, 0.5 + half, n - 1.5 - half)) if n - 2 > span else (n - 1) / 2
    lz = mid - lrz * (top + bottom) / 2

    # In-plane size from small to large; place the centre where the whole lesion fits in the
    # brain at its middle slice.
    lrx = rng.uniform(0.03, 0.12)
    lry = lrx * rng.uniform(0.7, 1.4)
    langle = rng.uniform(0, np.pi)
    t_mid = t0 + (t1 - t0) * mid / (n - 1)
    shrink = np.sqrt(max(1 - t_mid**2, 0.05))
    reach = max(lrx, lry) * (1 + lamp)
    room = 1 - max(reach / (_R_BRAIN * ax * shrink), reach / (_R_BRAIN * ay * shrink)) - 0.05
    rho = np.sqrt(rng.uniform()) * max(room, 0.0)
    phi = rng.uniform(0, 2 * np.pi)
    hx, hy = rho * _R_BRAIN * ax * shrink * np.cos(phi), rho * _R_BRAIN * ay * shrink * np.sin(phi)
    c, s = np.cos(angle), np.sin(angle)
    lx, ly = cx + c * hx - s * hy, cy + s * hx + c * hy

    return _Patient(
        folder=f"TCGA_SY_{i + 1:04d}_{date}",
        age=age,
        gender=gender,
        n=n,
        cx=float(cx),
        cy=float(cy),
        ax=float(ax),
        ay=float(ay),
        angle=float(angle),
        t0=float(t0),
        t1=float(t1),
        wobble=wobble,
        lx=float(lx),
        ly=float(ly),
        lz=float(lz),
        lrx=float(lrx),
        lry=float(lry),
        lrz=float(lrz),
        langle=float(langle),
        lamp=float(lamp),
        shape=shape,
        rim=rim,
        flair_boost=float(rng.uniform(65, 100)),
        rim_boost=float(rng.uniform(30, 70)),
        coarse=rng.standard_normal((2, 6, 6)),
        fine=rng.standard_normal((2, 18, 18)),
        bias=rng.standard_normal((3, 4, 4)),
        bias_amp=float(rng.uniform(0.04, 0.10)),
    )


class _Grid:
    """Pixel-centre coordinates and cached smoothing matrices for one image size."""

    def __init__(self, size: int) -> None:
        self.size = size
        u = ((np.arange(size) + 0.5) / size).astype(np.float32)
        self.x, self.y = np.meshgrid(u, u)
        self._w: dict[int, np.ndarray] = {}

    def smooth(self, g: np.ndarray) -> np.ndarray:
        """Upsample a small k x k random grid to a smooth size x size field with unit std.

        Gaussian-kernel interpolation as two matrix products: W @ g @ W.T.
        """
        k = g.shape[-1]
        if k not in self._w:
            centres = np.linspace(0.0, 1.0, k)
            d = (self.x[0][:, None] - centres[None, :]) * (k - 1)
            w = np.exp(-0.5 * d**2)
            self._w[k] = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
        w = self._w[k]
        f = w @ g.astype(np.float32) @ w.T
        return (f - f.mean()) / (f.std() + 1e-6)


def _sig(x: np.ndarray) -> np.ndarray:
    """Logistic function (soft edges give partial-volume borders instead of jaggies)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _render(p: _Patient, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one patient: images (n, size, size, 3) uint8 and masks (n, size, size) 0/255."""
    size, n = grid.size, p.n
    f32 = np.float32
    px_head = 1.0 / (size * p.ax)  # one pixel in head units
    px_les = 1.0 / (size * min(p.lrx, p.lry))

    # Head frame: rotate about the head centre, then normalise by the semi-axes.
    c, s = np.cos(p.angle), np.sin(p.angle)
    dx, dy = grid.x - f32(p.cx), grid.y - f32(p.cy)
    ex = (c * dx + s * dy) / f32(p.ax)
    ey = (-s * dx + c * dy) / f32(p.ay)
    r0 = np.sqrt(ex**2 + ey**2)
    theta = np.arctan2(ey, ex)
    wob = np.ones_like(r0)
    for h, (a, ph) in enumerate(p.wobble, start=1):
        wob += f32(a) * np.cos(h * theta + f32(ph))
    r0 /= wob
    # Work only in the head's bounding box (about half the image); outside is noise only.
    rows = np.flatnonzero((r0 < 1 + 8 * px_head).any(axis=1))
    cols = np.flatnonzero((r0 < 1 + 8 * px_head).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    ex, ey, r0 = ex[box], ey[box], r0[box]
    coarse = [grid.smooth(g)[box] for g in p.coarse]
    fine = [grid.smooth(g)[box] for g in p.fine]
    bias = np.stack([1 + p.bias_amp * grid.smooth(g)[box] for g in p.bias], axis=-1)

    # Lesion frame, in units of its own semi-axes.
    c, s = np.cos(p.langle), np.sin(p.langle)
    dx, dy = grid.x[box] - f32(p.lx), grid.y[box] - f32(p.ly)
    qx = (c * dx + s * dy) / f32(p.lrx)
    qy = (-s * dx + c * dy) / f32(p.lry)
    q2 = qx**2 + qy**2

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    full = np.zeros((size, size, 3), dtype=f32)
    for k in range(n):
        t = p.t0 + (p.t1 - p.t0) * k / (n - 1)
        shrink = f32(np.sqrt(max(1 - t * t, 0.03)))
        r = r0 / shrink
        w = f32(px_head) / shrink
        head, in_bone, in_csf, brain = (_sig((edge - r) / w) for edge in (1.0, _R_BONE, _R_CSF, _R_BRAIN))
        # Texture drifts smoothly from slice to slice (rotating between two random fields).
        tex = f32(np.cos((t + 1) * 0.9)) * coarse[0] + f32(np.sin((t + 1) * 0.9)) * coarse[1]
        ftex = f32(np.cos((t + 1) * 2.5)) * fine[0] + f32(np.sin((t + 1) * 2.5)) * fine[1]

        # White matter core with a wavy (gyrus-like) border to the cortical grey ribbon.
        white = _sig((0.7 - r + 0.1 * ftex) / 0.02)[..., None]
        tissue = _GREY + white * (_WHITE - _GREY) + (7 * tex + 4 * ftex)[..., None]
        flair_base = tissue[..., 1].copy()  # brain FLAIR before ventricles are drawn in
        # Lateral ventricles: two elongated ellipses, largest in the middle slices.
        vs = 1 - (t / 0.55) ** 2
        if vs > 0.05:
            vw = f32(0.07 * np.sqrt(vs))  # half-width
            vy = ey / shrink + f32(0.02)
            # Horns diverge towards the front (negative y), like a butterfly.
            vx = np.abs(ex / shrink) - (f32(0.1) - f32(0.12) * vy)
            rv = np.sqrt((vx / vw) ** 2 + (vy / f32(0.28)) ** 2)
            vent = _sig((1 - rv) * vw * shrink / f32(px_head))[..., None]
            tissue += vent * (_CSF - tissue)
        # Nested layers: scalp, bone, CSF rim, brain.
        sig = (
            head[..., None] * _SCALP
            + in_bone[..., None] * (_BONE - _SCALP)
            + in_csf[..., None] * (_CSF - _BONE)
            + brain[..., None] * (tissue - _CSF)
        )

        # Lesion cross-section on this slice; the boundary noise is evaluated only near it.
        hz = f32((k - p.lz) / p.lrz)
        near = q2 + hz * hz < (1 + p.lamp + 4 * px_les) ** 2
        if near.any():
            d = np.sqrt(q2[near] + hz * hz) + f32(1e-6)
            ux, uy, uz = qx[near] / d, qy[near] / d, hz / d
            rb = 1 + f32(p.lamp) * p.shape(ux, uy, uz)
            # Soft in-plane edge: (rb - d) over the in-plane gradient of d is the distance to the
            # boundary, so slices near the lesion's top or bottom still get a crisp, bright section.
            grad = np.sqrt(q2[near]) / d + f32(1e-3)
            lw = _sig((rb - d) / (grad * f32(0.5 * px_les))) * brain[near]
            # Partial rim: the outer fifth of the lesion, on the side where p.rim is positive.
            rim = _sig((d / rb - 0.8) / 0.05) * _sig(p.rim(ux, uy, uz) / 0.15)
            les = np.empty((lw.size, 3), dtype=f32)
            les[:, 0] = _LESION[0] + 4 * ftex[near]
            # FLAIR: boost over the average brain, keeping only half the local texture so a
            # dark patch of brain cannot swallow the contrast.
            base = 0.5 * (flair_base[near] + _FLAIR_BRAIN)
            les[:, 1] = base + f32(p.flair_boost) * (1 + 0.08 * ftex[near])
            les[:, 2] = _LESION[2] + f32(p.rim_boost) * rim
            sig[near] += lw[:, None] * (les - sig[near])
            m = np.zeros(near.shape, dtype=bool)
            m[near] = (d < rb) & (brain[near] > 0.5)
            masks[k][box][m] = 255

        full[box] = sig * bias
        noisy = rng.standard_normal(full.shape, dtype=f32)
        noisy *= f32(3.0)
        noisy += full
        # abs() mimics the Rician floor of magnitude images in the black background.
        np.abs(noisy, out=noisy)
        np.rint(noisy, out=noisy)
        np.clip(noisy, 0, 255, out=noisy)
        images[k] = noisy
    return images, masks


def _write_kaggle(out: Path, p: _Patient, images: np.ndarray, masks: np.ndarray) -> None:
    """Write one patient folder in the LGG kaggle_3m layout."""
    folder = out / p.folder
    folder.mkdir()
    for k, (img, mask) in enumerate(zip(images, masks, strict=True), start=1):
        stem = folder / f"{p.folder}_{k}"
        tifffile.imwrite(f"{stem}.tif", img, photometric="rgb", **_TIFF)
        tifffile.imwrite(f"{stem}_mask.tif", mask, photometric="minisblack", **_TIFF)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit greyscale PNG (Pillow writes no timestamp, so bytes are reproducible)."""
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


# Hostile inputs for tests and benchmarks: files of a few bytes whose headers declare huge images or
# volumes, to check that readers refuse them from the header, before decoding.

def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height RGB pixels (and no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header declares width x height pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"\xff\xc0")
    data[start + 5:start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    """A deflate-compressed greyscale TIFF with one strip of a few bytes declaring width x height."""
    strip = zlib.compress(b"\0" * 1024)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, len(strip))]
    offset_of_strip = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = offset_of_strip if tag == 273 else value
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def nifti_declaring(shape: tuple[int, ...], dtype=np.float32) -> bytes:
    """A .nii.gz of a few hundred bytes: a header declaring `shape` and no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4)


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of these members (stored, not compressed, unless told), as uploads and the malformed-container
    builders below use them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _patch_first_entry(data: bytes, central_offset: int, value: bytes,
                       local_offset: int | None = None) -> bytes:
    """Overwrite a field of the first central-directory entry, and of its local header if given."""
    patched = bytearray(data)
    central = patched.index(b"PK\x01\x02")
    patched[central + central_offset:central + central_offset + len(value)] = value
    if local_offset is not None:
        patched[local_offset:local_offset + len(value)] = value
    return bytes(patched)


def malformed_zips(member: str, content: bytes) -> dict[str, bytes]:
    """Zips of one member that each break the format a different way: a damaged byte (bad CRC), the
    encryption flag, compression method 99, an uncompressed size claiming 2 GB, and one too short."""
    stored = zip_of({member: content})
    damaged = bytearray(stored)
    damaged[stored.index(member.encode()) + len(member) + min(200, len(content) - 1)] ^= 0xFF
    return {"bad_crc.zip": bytes(damaged),
            "encrypted.zip": _patch_first_entry(stored, 8, b"\x01\x00", local_offset=6),
            "method99.zip": _patch_first_entry(stored, 10, b"\x63\x00", local_offset=8),
            "lying.zip": _patch_first_entry(stored, 24, struct.pack("<I", 2**31)),
            "short.zip": _patch_first_entry(stored, 24, struct.pack("<I", 100))}
