"""Synthetic chest-CT phantoms in Hounsfield units, for tests and the quickstart demo.

A phantom is a procedural chest: body outline with a subcutaneous fat layer, two lungs
(parenchyma about -850 HU) crossed by thin vessels, a trachea that splits into two main
bronchi, a mediastinum with heart and descending aorta, a vertebral body with spinal canal,
ribs, a sternum and, optionally, solid nodules whose voxels are marked in a mask.

Geometry is defined on the field of view (normalised coordinates), so any shape gives a whole
chest: (48, 48, 24) for unit tests, (512, 512, 120) for a realistic size. Every patient differs
by seed (sizes, positions, rib phase, vessel tree, noise). Everything is vectorised on
broadcast coordinate grids; no per-voxel Python loops.

Axis order (x, y, z) as everywhere in the project, in the LPS convention SimpleITK uses:
x runs from the patient's right to left (the lungs are at low and high x), y from anterior to
posterior (the sternum is at low y, the spine at high y), z from inferior to superior (the
diaphragm is at low z, the lung apices and the trachea at high z).

    >>> hu, mask = make_chest_phantom((128, 128, 64), seed=3, nodules=2)
    >>> hu.dtype, mask.dtype, hu.shape
    (dtype('float32'), dtype('uint8'), (128, 128, 64))
"""
from __future__ import annotations

from pathlib import Path


import argparse
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
from scipy import ndimage

from runtime.cli import (ArgumentParser, HelpFormatter, run_cli, nonneg_int,
                         positive_float, positive_int, seed_int)
from runtime.errors import InputError
from runtime.files import atomic_path, make_output_dir, save_npy_atomic
from runtime.intensity import normalize_hu

__all__ = ["HU_AIR", "HU_LUNG", "HU_FAT", "HU_SOFT", "HU_BONE", "DEFAULT_SPACING",
           "make_chest_phantom", "phantom_lung_mask", "write_volume", "write_phantom_dataset",
           "make_nodule_cubes", "PHANTOM_FORMATS", "build_parser", "run", "main"]

HU_AIR = -1000.0
HU_LUNG = -850.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 900.0
#: Default voxel spacing (mm) of a phantom, (sx, sy, sz): a typical chest CT.
DEFAULT_SPACING = (0.7, 0.7, 2.5)
#: File formats :func:`write_phantom_dataset` can write.
PHANTOM_FORMATS = ("nrrd", "nii.gz", "mhd", "npy", "dicom")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                  cells: tuple[int, int, int], sigma: float = 1.0) -> np.ndarray:
    """A smooth random field of ``shape``, unit std, with about ``cells`` blobs per axis.

    White noise on a coarse grid, Gaussian-smoothed, then trilinearly upsampled (vectorised).
    """
    coarse = tuple(max(3, int(c)) for c in cells)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma,
                                    mode="wrap")
    field /= field.std() + 1e-6
    zoom = [s / c for s, c in zip(shape, coarse)]
    out = ndimage.zoom(field, zoom, order=1, mode="nearest", grid_mode=True)
    # zoom may be off by one voxel on an axis: crop / pad to the exact shape
    out = out[: shape[0], : shape[1], : shape[2]]
    if out.shape != tuple(shape):
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape)], mode="edge")
    return out.astype(np.float32, copy=False)


def _grids(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates as broadcastable grids: u (X,1,1) and v (1,Y,1) in [-1, 1]
    (voxel centres), t (1,1,Z) in [0, 1] from inferior to superior."""
    nx, ny, nz = shape
    u = ((np.arange(nx, dtype=np.float32) + 0.5) / nx * 2 - 1).reshape(nx, 1, 1)
    v = ((np.arange(ny, dtype=np.float32) + 0.5) / ny * 2 - 1).reshape(1, ny, 1)
    t = ((np.arange(nz, dtype=np.float32) + 0.5) / nz).reshape(1, 1, nz)
    return u, v, t


def _anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> dict:
    """Random per-patient anatomy parameters (normalised units)."""
    j = lambda s: float(rng.uniform(1 - s, 1 + s))  # noqa: E731  (relative jitter)
    return dict(
        body_a=0.90 * j(0.05), body_b=0.70 * j(0.06), body_v=float(rng.uniform(-0.04, 0.04)),
        fat=0.06 * j(0.4),
        lung_u=0.43 * j(0.05), lung_v=0.0 + float(rng.uniform(-0.04, 0.04)),
        lung_a=0.33 * j(0.06), lung_b=0.50 * j(0.06),
        apex=float(rng.uniform(0.9, 1.0)), dome=float(rng.uniform(0.10, 0.22)),
        heart_u=0.10 * j(0.3), heart_v=-0.12 * j(0.3), heart_a=0.27 * j(0.1),
        heart_b=0.28 * j(0.1), heart_top=float(rng.uniform(0.45, 0.6)),
        carina=float(rng.uniform(0.55, 0.68)), trachea_r=0.055 * j(0.15),
        spine_v=0.50 * j(0.05), spine_r=0.12 * j(0.1),
        n_ribs=float(rng.uniform(5.0, 7.0)), rib_phase=float(rng.uniform(0, 1)),
        vessel_eps=0.3 * j(0.1),
    )


def _body(u: np.ndarray, v: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body ellipse (X, Y, 1) bool, its subcutaneous fat ring (X, Y, 1) bool and the
    normalised radius (X, Y, 1) the ribs are placed on."""
    vb = v - p["body_v"]
    body_r = np.sqrt((u / p["body_a"]) ** 2 + (vb / p["body_b"]) ** 2)
    body = body_r <= 1.0
    return body, body & (body_r > 1.0 - p["fat"]), body_r


def _lungs_and_heart(shape: tuple[int, int, int], u: np.ndarray, v: np.ndarray, t: np.ndarray,
                     p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Lungs (X, Y, Z) bool: two ellipses whose size changes along z above a dome-shaped
    diaphragm, minus the heart; the heart (X, Y, Z) bool, in the lower half."""
    lung_profile = np.sqrt(np.clip((p["apex"] - t) / 0.3, 0.0, 1.0))               # (1,1,Z)
    lung = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        lu = (u - side * p["lung_u"]) / p["lung_a"]
        lv = (v - p["lung_v"]) / p["lung_b"]
        rr = lu ** 2 + lv ** 2                                                    # (X, Y, 1)
        diaphragm = p["dome"] + 0.15 * np.clip(1.0 - rr, 0, 1)                     # (X, Y, 1)
        lung |= (rr <= lung_profile ** 2) & (t >= diaphragm)
    # the heart pushes into the lungs (mostly the left one: high x)
    hu_ = (u - p["heart_u"]) / p["heart_a"]
    hv = (v - p["heart_v"]) / p["heart_b"]
    ht = np.clip((p["heart_top"] - t) / max(p["heart_top"], 1e-3), 0, 1)          # (1,1,Z)
    heart = (hu_ ** 2 + hv ** 2 <= np.sqrt(ht)) & (t < p["heart_top"])
    return lung & ~heart, heart


def _vessels_and_texture(rng: np.random.Generator, shape: tuple[int, int, int], lung: np.ndarray,
                         u: np.ndarray, v: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Lung vessels (X, Y, Z) bool: thin tubes where two smooth random fields both cross zero,
    thicker near the hila; and a smooth parenchyma texture (X, Y, Z) of unit std."""
    nx, ny, nz = shape
    cells = (max(4, nx // 6), max(4, ny // 6), max(3, nz // 4))
    f1 = _smooth_noise(rng, shape, cells)
    f2 = _smooth_noise(rng, shape, cells)
    hilum = np.sqrt(np.minimum((u - p["lung_u"]) ** 2, (u + p["lung_u"]) ** 2) + v ** 2)
    eps = p["vessel_eps"] * np.clip(1.2 - hilum / 0.45, 0.35, 1.2)
    vessels = lung & (np.abs(f1) < eps) & (np.abs(f2) < eps * 2.0)
    texture = _smooth_noise(rng, shape, (max(4, nx // 6), max(4, ny // 6), max(3, nz // 3)))
    return vessels, texture


def _airway(shape: tuple[int, int, int], u: np.ndarray, v: np.ndarray, t: np.ndarray,
            p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Airway lumen (X, Y, Z) bool (trachea above the carina, two bronchi diverging below it)
    and its wall (X, Y, Z) bool."""
    tv = v - (p["lung_v"] - 0.08)
    airway = ((u ** 2 + tv ** 2) <= p["trachea_r"] ** 2) & (t >= p["carina"])
    depth = np.clip(p["carina"] - t, 0, None)                                      # (1,1,Z)
    for side in (-1.0, 1.0):
        cu = side * depth * 1.6
        airway = airway | ((((u - cu) ** 2 + tv ** 2) <= (0.7 * p["trachea_r"]) ** 2)
                           & (t < p["carina"]) & (depth < 0.18))
    wall = ndimage.binary_dilation(airway, iterations=max(1, shape[0] // 96)) & ~airway
    return airway, wall


def _skeleton(u: np.ndarray, v: np.ndarray, t: np.ndarray, body_r: np.ndarray,
              p: dict) -> dict[str, np.ndarray]:
    """Descending aorta, vertebra (body, cortex, canal, arch), ribs and sternum as bool masks
    ((X, Y, 1), the ribs (X, Y, Z))."""
    vb = v - p["body_v"]
    sv = v - p["spine_v"]
    spine_rr = u ** 2 + sv ** 2
    vertebra = spine_rr <= p["spine_r"] ** 2
    canal_rr = u ** 2 + (v - p["spine_v"] - p["spine_r"] - 0.06) ** 2
    canal = canal_rr <= 0.045 ** 2
    angle = np.arctan2(vb, u)                                                      # (X, Y, 1)
    rib_shell = (body_r > 0.80 - p["fat"]) & (body_r < 0.88 - p["fat"])
    rib_wave = np.cos(2 * np.pi * (t * p["n_ribs"] + p["rib_phase"]
                                   + 0.12 * np.abs(np.sin(angle))))
    return dict(
        aorta=((u - 0.12) ** 2 + (v - (p["spine_v"] - 0.2)) ** 2) <= 0.065 ** 2,
        vertebra=vertebra,
        cortex=vertebra & (spine_rr > (0.75 * p["spine_r"]) ** 2),
        canal=canal,
        arch=(canal_rr <= 0.085 ** 2) & ~canal,
        ribs=rib_shell & (rib_wave > 0.55) & (np.abs(u) > 0.12),
        sternum=((u / 0.09) ** 2 + ((v - (p["body_v"] - p["body_b"] * 0.88)) / 0.045) ** 2) <= 1.0,
    )


def _compose_hu(shape: tuple[int, int, int], m: dict[str, np.ndarray],
                texture: np.ndarray) -> np.ndarray:
    """The HU volume (X, Y, Z) float32 from the tissue masks ``m``; later layers overwrite
    earlier ones."""
    def full(mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(mask, shape)

    hu = np.full(shape, HU_AIR, np.float32)
    body, lung = m["body"], m["lung"]
    hu[full(body)] = HU_SOFT
    hu[full(m["fat"])] = HU_FAT
    np.copyto(hu, (HU_LUNG + 25.0 * texture).astype(np.float32), where=lung)
    hu[m["vessels"]] = HU_SOFT
    hu[full(m["heart"] & body)] = HU_SOFT + 5.0
    hu[full(m["aorta"] & body) & ~lung] = HU_SOFT + 10.0
    hu[m["wall"] & full(body)] = HU_SOFT
    hu[m["airway"]] = HU_AIR
    bone_in = full(body)
    hu[full(m["vertebra"]) & bone_in] = 300.0
    hu[full(m["cortex"] | m["arch"]) & bone_in] = HU_BONE
    hu[full(m["canal"]) & bone_in] = 20.0
    hu[m["ribs"] & ~lung] = 750.0
    hu[full(m["sternum"]) & bone_in] = 650.0
    return hu


def _paint_nodules(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, nodules: int,
                   spacing: Sequence[float]) -> np.ndarray:
    """Paint ``nodules`` solid spheres (+20..+60 HU, radius 3..10 mm) inside the lungs of
    ``hu`` (X, Y, Z) in place, on their bounding boxes only; return their mask (X, Y, Z) uint8."""
    shape = hu.shape
    mask = np.zeros(shape, np.uint8)
    if nodules <= 0:
        return mask
    sp = np.asarray(spacing, np.float64)
    inner = ndimage.binary_erosion(lung, iterations=2)
    cand = np.flatnonzero(inner if inner.any() else lung)
    if cand.size == 0:
        raise ValueError(f"shape {shape} too small: no lung voxel to place a nodule in")
    for _ in range(int(nodules)):
        c = np.array(np.unravel_index(cand[rng.integers(cand.size)], shape))
        r_mm = rng.uniform(3.0, 10.0)
        r = np.maximum(r_mm / sp, 1.5)                                           # voxels per axis
        r = np.minimum(r, np.array(shape) / 8.0 + 1.0)
        lo = np.maximum(np.floor(c - r - 1).astype(int), 0)
        hi = np.minimum(np.ceil(c + r + 2).astype(int), shape)
        gx, gy, gz = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = ((gx - c[0]) / r[0]) ** 2 + ((gy - c[1]) / r[1]) ** 2 + ((gz - c[2]) / r[2]) ** 2
        inside = d <= 1.0
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        hu[box][inside] = float(rng.uniform(20.0, 60.0))
        mask[box][inside] = 1
    return mask


def make_chest_phantom(shape: Sequence[int] = (128, 128, 64), seed: int = 0,
                       spacing: Sequence[float] = DEFAULT_SPACING, nodules: int = 0,
                       noise_hu: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like CT volume in HU and its nodule mask.

    Args:
        shape: (X, Y, Z) in voxels; any size from about (24, 24, 8) up.
        seed: the patient; same seed and arguments -> the same bytes.
        spacing: voxel size (sx, sy, sz) in mm; used to size nodules (radius 3..10 mm, at
            least 1.5 voxels) and written to files by :func:`write_phantom_dataset`.
        nodules: how many solid nodules (+20..+60 HU) to place inside the lungs.
        noise_hu: standard deviation of the Gaussian image noise, in HU.

    Returns:
        ``hu``: float32 (X, Y, Z): air -1000, lung about -850, vessels and soft tissue about
        +40, fat about -100, bone +300..+1000.
        ``mask``: uint8 (X, Y, Z), 1 on nodule voxels, 0 elsewhere.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be (X, Y, Z) with every side >= 4, got {shape}")
    # the draws happen in a fixed order (anatomy, vessel fields, texture, nodules, noise):
    # the same seed gives the same patient
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EC7]))
    p = _anatomy(shape, rng)
    u, v, t = _grids(shape)
    body, fat, body_r = _body(u, v, p)
    lung, heart = _lungs_and_heart(shape, u, v, t, p)
    vessels, texture = _vessels_and_texture(rng, shape, lung, u, v, p)
    airway, wall = _airway(shape, u, v, t, p)
    masks = dict(body=body, fat=fat, lung=lung, heart=heart, vessels=vessels, airway=airway,
                 wall=wall, **_skeleton(u, v, t, body_r, p))
    hu = _compose_hu(shape, masks, texture)
    mask = _paint_nodules(rng, hu, lung, nodules, spacing)
    if noise_hu > 0:
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise *= np.float32(noise_hu)
        hu += noise
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu, mask


def phantom_lung_mask(shape: Sequence[int], seed: int) -> np.ndarray:
    """Approximate lung mask (bool, (X, Y, Z)) of ``make_chest_phantom(shape, seed)``:
    voxels below -500 HU inside the body (lungs and airways)."""
    hu, _ = make_chest_phantom(shape, seed, noise_hu=0.0)
    body = ndimage.binary_fill_holes(hu > -500, structure=np.ones((3, 3, 1)))
    return (hu < -500) & body


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
def _to_sitk(vol_xyz: np.ndarray, spacing: Sequence[float], origin: Sequence[float] | None = None):
    """(x, y, z) array -> SimpleITK image (SimpleITK arrays are (z, y, x))."""
    import SimpleITK as sitk  # local: the npy format and the nodule cubes never need it

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol_xyz, (2, 1, 0))))
    img.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    return img


def _write_dicom_series(hu: np.ndarray, spacing: Sequence[float], folder: Path,
                        patient: str, uid_seed: int) -> Path:
    """Write an int16 HU volume (x, y, z) as a CT DICOM series, one file per z slice.

    The slices go to a temporary folder renamed to ``folder`` at the end, so a crash never
    leaves a partial series that ``--skip_existing`` would keep."""
    import SimpleITK as sitk  # local: the npy format and the nodule cubes never need it

    final = folder
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    img = _to_sitk(np.round(hu).astype(np.int16), spacing, origin=(0.0, 0.0, 0.0))
    root = "1.2.826.0.1.3680043.8.498"   # generic example UID root
    study = f"{root}.{uid_seed + 1}.1"
    series = f"{root}.{uid_seed + 1}.2"
    direction = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0010|0010": patient, "0010|0020": patient,
            "0020|000d": study, "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{c:.6f}" for c in pos),
            "0020|0037": "\\".join(f"{c:.6f}" for c in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7])),
            "0018|0050": f"{float(spacing[2]):.6f}",
            "0028|1052": "0", "0028|1053": "1",
        }
        for key, val in tags.items():
            sl.SetMetaData(key, val)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(sl)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes 0700
    if final.exists():
        shutil.rmtree(final)
    os.replace(folder, final)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_volume(path: str | os.PathLike, vol_xyz: np.ndarray,
                 spacing: Sequence[float] = DEFAULT_SPACING) -> Path:
    """Write one (x, y, z) volume with SimpleITK (format from the extension: .nrrd, .nii.gz,
    .mhd, ...), with its spacing, transposing to SimpleITK's (z, y, x)."""
    import SimpleITK as sitk  # local: the npy format and the nodule cubes never need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _to_sitk(vol_xyz, spacing)
    if path.suffix.lower() == ".mhd":  # header + data file: move the data first, the header last
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            sitk.WriteImage(img, str(Path(tmp) / path.name), True)
            for f in sorted(Path(tmp).iterdir(), key=lambda f: f.suffix.lower() == ".mhd"):
                os.replace(f, path.parent / f.name)
        return path
    ext = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=ext) as tmp:  # SimpleITK picks the format from the extension
        sitk.WriteImage(img, str(tmp), True)
    return path


def write_phantom_dataset(out_dir: str | os.PathLike, n: int, shape: Sequence[int] = (128, 128, 64),
                          seed: int = 0, fmt: str = "nrrd",
                          spacing: Sequence[float] = DEFAULT_SPACING, nodules: int = 0,
                          mask_dir: str | os.PathLike | None = None,
                          prefix: str = "phantom", overwrite: bool = True) -> list[Path]:
    """Write ``n`` phantom patients (seeds ``seed``, ``seed+1``, ...) into ``out_dir``.

    ``fmt``: ``nrrd`` / ``nii.gz`` / ``mhd`` (HU as int16, with spacing), ``dicom`` (one
    folder per patient holding a CT series), or ``npy`` (float32 already normalised to [0, 1]
    from [-1000, 1000] HU, axes (x, y, z), as prepared volumes are).
    With ``mask_dir``, nodule masks go there as ``{prefix}_{i:03d}_label.<ext>`` (uint8; for
    ``dicom`` / ``npy`` as ``.nrrd`` / ``.npy``); they are kept apart so a folder of
    images stays a folder of images.
    ``overwrite=False`` keeps patients whose image already exists (re-runs are cheap).
    Returns the image paths (files, or series folders for ``dicom``).
    """
    if fmt not in PHANTOM_FORMATS:
        raise ValueError(f"fmt must be one of {PHANTOM_FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(int(n)):
        name = f"{prefix}_{i:03d}"
        existing = out / (name if fmt == "dicom" else f"{name}.{fmt}")
        if not overwrite and existing.exists() and (fmt != "dicom" or any(existing.iterdir())):
            paths.append(existing)
            continue
        hu, mask = make_chest_phantom(shape, seed=int(seed) + i, spacing=spacing, nodules=nodules)
        if fmt == "npy":
            paths.append(save_npy_atomic(out / f"{name}.npy", normalize_hu(hu)))
        elif fmt == "dicom":
            paths.append(_write_dicom_series(hu, spacing, out / name, name, int(seed) + i))
        else:
            paths.append(write_volume(out / f"{name}.{fmt}", np.round(hu).astype(np.int16), spacing))
        if mask_dir is not None:
            mext = {"npy": "npy", "dicom": "nrrd"}.get(fmt, fmt)
            mpath = Path(mask_dir) / f"{name}_label.{mext}"
            if mext == "npy":
                save_npy_atomic(mpath, mask)
            else:
                write_volume(mpath, mask, spacing)
    return paths


def make_nodule_cubes(n: int, size: Sequence[int] = (64, 64, 32), seed: int = 0,
                      positive_fraction: float = 0.5,
                      radius: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A nodule / no-nodule classification set of lung cubes.

    Cubes are crops of phantom lungs (one phantom per 8 cubes), normalised to [0, 1] from
    [-1000, 1000] HU; a positive cube has a solid nodule (in-plane radius 2..min(size)/6 voxels,
    or uniform in ``radius`` = (low, high) voxels; half that along z) near its centre, a
    negative one has none (vessels only).
    Returns ``cubes`` float32 (n, X, Y, Z) and ``labels`` int64 (n,) in {0, 1}.
    """
    size = tuple(int(s) for s in size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0BE]))
    labels = (rng.permutation(n) < round(n * positive_fraction)).astype(np.int64)
    cubes = np.empty((n, *size), np.float32)
    vol_shape = (size[0] * 3, size[1] * 3, max(size[2] * 2, 16))
    per = 8
    for start in range(0, n, per):
        hu, _ = make_chest_phantom(vol_shape, seed=int(seed) * 1000 + start // per)
        lung = ndimage.binary_erosion(hu < -600, iterations=1)
        lung[: size[0] // 2] = lung[-(size[0] - size[0] // 2):] = False
        lung[:, : size[1] // 2] = lung[:, -(size[1] - size[1] // 2):] = False
        lung[:, :, : size[2] // 2] = lung[:, :, -(size[2] - size[2] // 2):] = False
        cand = np.flatnonzero(lung)
        for i in range(start, min(n, start + per)):
            if cand.size:
                c = np.array(np.unravel_index(cand[rng.integers(cand.size)], vol_shape))
            else:
                c = np.array(vol_shape) // 2
            lo = np.clip(c - np.array(size) // 2, 0, np.array(vol_shape) - size)
            crop = hu[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]].copy()
            if labels[i]:
                lo_r, hi_r = radius if radius is not None else (2.0, max(2.5, min(size) / 6.0))
                r = rng.uniform(lo_r, hi_r)
                ctr = np.array(size) / 2.0 + rng.uniform(-2, 2, 3)
                gx, gy, gz = np.ogrid[: size[0], : size[1], : size[2]]
                d = (gx - ctr[0]) ** 2 + (gy - ctr[1]) ** 2 + ((gz - ctr[2]) * 2.0) ** 2
                crop[d <= r * r] = rng.uniform(20.0, 60.0) + rng.normal(0, 15.0, int((d <= r * r).sum()))
            cubes[i] = normalize_hu(crop)
    return cubes, labels


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python scripts/phantoms.py``."""
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = ap.add_argument_group("phantoms")
    g.add_argument("--output_dir", required=True, help="folder to write the phantom volumes into")
    g.add_argument("--n", type=nonneg_int, default=10, help="number of phantom patients")
    g.add_argument("--shape", type=positive_int, nargs=3, default=[320, 320, 96], metavar=("X", "Y", "Z"),
                   help="volume size in voxels, axes (x, y, z)")
    g.add_argument("--spacing", type=positive_float, nargs=3, default=list(DEFAULT_SPACING),
                   metavar=("SX", "SY", "SZ"), help="voxel spacing in mm written to the files")
    g.add_argument("--format", default="nrrd", choices=PHANTOM_FORMATS,
                   help="file format (npy = already normalised to [0, 1])")
    g.add_argument("--nodules", type=nonneg_int, default=0, help="nodules per patient")
    g.add_argument("--mask_dir", default=None, help="also write nodule masks into this folder")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the first patient (then +1, +2, ...)")
    g.add_argument("--skip_existing", action="store_true",
                   help="keep patients already written in --output_dir")
    g = ap.add_argument_group("nodule classification cubes (instead of volumes)")
    g.add_argument("--nodule_cubes", type=nonneg_int, default=0, metavar="N",
                   help="write N lung cubes in [0, 1] as cubes.npy (N, X, Y, Z) and labels.npy "
                        "(N,), half with a nodule (label 1), into --output_dir, instead of volumes")
    g.add_argument("--cube_size", type=positive_int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="size of the nodule cubes")
    g.add_argument("--nodule_radius", type=positive_float, nargs=2, default=None,
                   metavar=("LOW", "HIGH"),
                   help="in-plane nodule radius drawn uniformly in [LOW, HIGH) voxels (half that "
                        "along z); default 2 to max(2.5, smallest cube side / 6)")
    return ap


def run(args: argparse.Namespace) -> None:
    """Write the phantom patients (or nodule cubes) that ``args`` ask for."""
    for folder, flag in ((args.output_dir, "--output_dir"), (args.mask_dir, "--mask_dir")):
        if folder:
            make_output_dir(folder, flag)
    if args.nodule_cubes > 0:
        radius = tuple(args.nodule_radius) if args.nodule_radius else None
        if radius and radius[0] > radius[1]:
            raise InputError(f"--nodule_radius {radius[0]:g} {radius[1]:g}: LOW must not exceed "
                             "HIGH")
        cubes, labels = make_nodule_cubes(args.nodule_cubes, args.cube_size, args.seed,
                                          radius=radius)
        out = Path(args.output_dir)
        save_npy_atomic(out / "cubes.npy", cubes)
        save_npy_atomic(out / "labels.npy", labels)
        print(f"wrote {len(cubes)} cubes {tuple(args.cube_size)} ({int(labels.sum())} with a nodule) "
              f"to {out / 'cubes.npy'} and {out / 'labels.npy'}")
        return
    if args.n < 1:
        raise InputError(f"--n {args.n}: must be >= 1 (the number of phantom patients)")
    paths = write_phantom_dataset(args.output_dir, args.n, args.shape, args.seed, args.format,
                                  args.spacing, args.nodules, args.mask_dir,
                                  overwrite=not args.skip_existing)
    print(f"{len(paths)} phantom(s) of shape {tuple(args.shape)} in {args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    """CLI: write a folder of phantom patients (for trying the pipeline without data)."""
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
