"""Reading CT volumes in any format SimpleITK reads, and resampling them.

Arrays are (x, y, z), z last. SimpleITK's ``GetArrayFromImage`` returns (z, y, x); every
function here transposes once, on the way in. Volumes are reoriented to SimpleITK's identity
direction (LPS: x runs right->left, y anterior->posterior, z inferior->superior) when their
axes are axis-aligned, so files written by different tools mean the same thing per axis.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "IGNORED_SUFFIXES", "CTReadError", "read_ct", "read_sitk",
           "resample", "resampled_shape", "find_ct_inputs", "dicom_series",
           "split_by_subject", "source_files", "check_complete", "check_slice_positions",
           "volume_suffix", "volume_stem"]

#: File name endings treated as single-file (or header) volumes, checked longest first.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mhd", ".mha", ".hdr", ".img.gz",
                  ".vtk", ".gipl", ".gipl.gz", ".mnc", ".npy", ".dcm", ".ima")
#: Companion data files or non-image files that are never volumes on their own.
IGNORED_SUFFIXES = (".raw", ".zraw", ".img", ".raw.gz", ".json", ".csv", ".txt", ".md", ".py",
                    ".pdf", ".html", ".xml", ".log", ".tmp", ".yaml", ".yml", ".ini", ".sh",
                    ".zip", ".tar", ".gz", ".bz2")


class CTReadError(InputError):
    """A file or folder that cannot be read as a CT volume; the message says why. Stage 0 skips
    such an input with its line; elsewhere it is bad input like any other."""


def volume_suffix(path: str | os.PathLike) -> str:
    """The (possibly double) file suffix of a volume path, lower case (``.nii.gz``)."""
    name = Path(path).name.lower()
    for suf in sorted(IMAGE_SUFFIXES + IGNORED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its volume suffix (``case1.nii.gz`` -> ``case1``)."""
    name = Path(path).name
    suf = volume_suffix(path)
    return name[: len(name) - len(suf)] if suf and name.lower().endswith(suf) else Path(name).stem


def dicom_series(folder: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """The DICOM series directly inside ``folder``: a list of (series UID, sorted file names)."""
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    folder = str(folder)
    out = []
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)   # "No Series were found" is not news here
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()
    except RuntimeError:
        ids = ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    for sid in ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
        if files:
            out.append((sid, list(files)))
    return out


def _dicom_subject(path: str) -> tuple[str, str]:
    """(PatientID, StudyInstanceUID) of one DICOM file, from its header ("" when absent)."""
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "", ""
    get = lambda tag: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""  # noqa: E731
    return get("0010|0020"), get("0020|000d")


def split_by_subject(files: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The slices of one series UID grouped by (patient, study), order kept: two patients'
    scans that share a SeriesInstanceUID are never merged into one volume. Returns
    ``[(subject, files)]`` with subject ``""`` when all slices belong to one patient and study."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in files:
        groups.setdefault(_dicom_subject(f), []).append(f)
    if len(groups) == 1:
        return [("", list(files))]
    return [(f"{pid or 'patient'}_{study[-8:]}" if study else (pid or "patient"), fs)
            for (pid, study), fs in groups.items()]


def find_ct_inputs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Everything under ``root`` (recursively) that may be a CT volume, in sorted order.

    Returns items ``{"path": Path, "kind": "file"|"dicom", "series": uid|None,
    "files": [..]|None}``: one per DICOM series (all its slices) and one per other file that
    is not a known companion / non-image file (``.raw`` beside an ``.mhd``, ``.json``, ...).
    A ``root`` that is a file gives that file; a ``root`` that is a series folder gives it.
    """
    root = Path(root)
    if root.is_file():
        return [{"path": root, "kind": "file", "series": None, "files": None}]
    if not root.is_dir():
        raise CTReadError(f"{root}: " + ("not a regular file or folder (a pipe or device?)"
                                          if root.exists() else "no such file or folder"))
    items: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(f for f in filenames if not f.startswith("."))
        if not names:
            continue
        series = [(sid, subject, fs) for sid, files in dicom_series(dirpath)
                  for subject, fs in split_by_subject(files)]
        in_series: set[str] = set()
        for sid, subject, files in series:
            in_series.update(os.path.abspath(f) for f in files)
            items.append({"path": Path(dirpath), "kind": "dicom", "series": sid,
                          "subject": subject, "files": files, "n_series": len(series)})
        for name in names:
            full = Path(dirpath) / name
            if os.path.abspath(full) in in_series:
                continue
            if not full.is_file():  # a pipe, socket or device would block or fail on reading
                print(f"note: skipped {full}: not a regular file", file=sys.stderr)
                continue
            suf = volume_suffix(name)
            if suf in IGNORED_SUFFIXES and suf not in IMAGE_SUFFIXES:
                continue
            items.append({"path": full, "kind": "file", "series": None, "files": None})
    return items


# ------------------------------------------------------------------ files and their stored data
#: The first bytes of a gzip stream.
_GZIP_MAGIC = b"\x1f\x8b"
#: Bytes kept from the start of a data stream: a NIfTI-2 header is 540 bytes.
_HEAD = 544
_CHUNK = 1 << 22


def _meta_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` lines of a MetaImage header up to ``ElementDataFile`` (the last
    one), and the byte offset just after it (where an ``.mha`` holds its data)."""
    keys: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as f:
        while offset < 1 << 16 and (raw := f.readline(4096)):
            offset += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            keys[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return keys, offset


def _companion(path: Path) -> Path | None:
    """The data file of a two-file volume: a MetaImage header's ``ElementDataFile`` (one file,
    not LOCAL, a LIST or a pattern), an Analyze/NIfTI ``.hdr``'s ``.img`` (or ``.img.gz``)."""
    suf = volume_suffix(path)
    if suf == ".mhd":
        name = _meta_header(path)[0].get("ElementDataFile", "")
        if name and name != "LOCAL" and not name.startswith("LIST") and "%" not in name:
            return path.parent / name
    elif suf == ".hdr":
        stem = path.name[: -len(".hdr")]
        for ext in (".img", ".img.gz", ".IMG"):
            if (path.parent / f"{stem}{ext}").is_file():
                return path.parent / f"{stem}{ext}"
    return None


def source_files(item: dict[str, Any]) -> list[Path]:
    """Every file one input of :func:`find_ct_inputs` is read from: a series' slices, a
    header and its data file (``.mhd`` + ``.raw``, ``.hdr`` + ``.img``), or the file itself.
    These are the bytes that make a patient's content identity."""
    if item.get("files"):
        return [Path(f) for f in item["files"]]
    path = Path(item["path"])
    data = _companion(path) if path.is_file() else None
    return [path] + ([data] if data is not None and data.is_file() else [])


def _damaged(path: Path, why: str) -> CTReadError:
    return CTReadError(f"{path}: {why}; the file is damaged (an interrupted download or copy?): "
                       "copy or download it again, or remove it")


def _gzip_length(path: Path) -> tuple[int, bytes]:
    """(uncompressed length, first bytes) of a gzip file, decompressed to its end: Python's
    gzip checks every member's CRC-32 and length, so truncation or corruption is an error."""
    n, head = 0, b""
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                head += chunk[: max(0, _HEAD - len(head))]
                n += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _damaged(path, f"truncated or corrupted gzip data ({e})") from e
    return n, head


def _zlib_length(path: Path, offset: int) -> int:
    """Uncompressed length of the zlib (or gzip) stream of ``path`` from byte ``offset``,
    decompressed to its end marker (which checks its Adler-32 / CRC-32)."""
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)
    n = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while not d.eof and (chunk := f.read(_CHUNK)):
                n += len(d.decompress(chunk))
            n += len(d.flush())
    except zlib.error as e:
        raise _damaged(path, f"corrupted compressed data ({e})") from e
    if not d.eof:
        raise _damaged(path, "truncated compressed data (the stream ends before its end marker)")
    return n


def _stored(path: Path) -> tuple[int, bytes]:
    """(length, first bytes) of a file's content, gzip files decompressed to their end."""
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if head[:2] == _GZIP_MAGIC:
        return _gzip_length(path)
    return path.stat().st_size, head


def _nifti_bytes(head: bytes, single_file: bool) -> int | None:
    """Bytes a NIfTI-1/-2 (or Analyze 7.5) header says its data file holds: vox_offset +
    voxels x bitpix / 8 (None when ``head`` is no such header)."""
    for end in "<>":
        if len(head) >= 348 and struct.unpack(end + "i", head[:4])[0] == 348:
            dim = struct.unpack(end + "8h", head[40:56])
            bitpix = struct.unpack(end + "h", head[72:74])[0]
            offset, first = struct.unpack(end + "f", head[108:112])[0], 352
        elif len(head) >= 540 and struct.unpack(end + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(end + "h", head[14:16])[0]
            dim = struct.unpack(end + "8q", head[16:80])
            offset, first = struct.unpack(end + "q", head[168:176])[0], 544
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0 or not np.isfinite(offset):
            return None
        voxels = int(np.prod([max(1, int(d)) for d in dim[1:dim[0] + 1]], dtype=np.int64))
        start = max(int(offset), first) if single_file else max(0, int(offset))
        return start + voxels * bitpix // 8
    return None


def check_complete(path: str | os.PathLike) -> None:
    """Refuse (:class:`CTReadError`) a single-file volume whose stored data is shorter than its
    header declares, or whose compressed data is truncated or corrupted.

    ITK's NIfTI, Analyze, GIPL and VTK readers fill missing data with zeros, and its
    MetaImage reader does not check the zlib checksum, so such a file would be read as a
    scan with a block of zeros. The check decompresses every compressed stream to its end
    (gzip: CRC-32 and length; zlib: Adler-32) and compares the data length with the header:
    NIfTI / Analyze exactly (``vox_offset + voxels x bitpix / 8``), GIPL exactly (256-byte
    header), binary VTK and compressed MetaImage at least the voxel data. NRRD, uncompressed
    MetaImage and DICOM readers refuse a short file themselves.
    """
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        io = reader.GetImageIOFromFileName(str(path))
    except RuntimeError:
        _stored(path)          # a damaged .gz says so; anything else is reported by the reader
        return
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    need = int(np.prod(reader.GetSize(), dtype=np.int64)) * (int(bits.group(1)) // 8 if bits else 1) \
        * max(1, reader.GetNumberOfComponents())
    if io == "NiftiImageIO":
        data = _companion(path) or path
        have, head = _stored(data)
        need = _nifti_bytes(head if data == path else _stored(path)[1], data == path) or need
    elif io == "GiplImageIO":
        have, need = _stored(path)[0], need + 256
    elif io == "VTKImageIO":
        have, head = _stored(path)
        if b"BINARY" not in head[:256].upper():
            return             # ASCII values: no fixed size
    elif io == "MetaImageIO":
        keys, offset = _meta_header(path)
        if keys.get("CompressedData", "").lower() != "true":
            return             # ITK refuses short uncompressed data itself
        local = keys.get("ElementDataFile") == "LOCAL"
        data = path if local else _companion(path)
        if data is None:
            return
        have = _zlib_length(data, offset if local else 0)
    else:
        _stored(path)
        return
    if have < need:
        raise _damaged(path if io != "NiftiImageIO" else data,
                       f"truncated: {have} bytes of image data where its header declares {need}")


def check_slice_positions(files: Sequence[str], where: str | os.PathLike) -> None:
    """Refuse (:class:`CTReadError`) a DICOM series whose slices are not evenly spaced along
    the slice normal (ImagePositionPatient projected on the normal of ImageOrientationPatient):
    two slices at one position (a duplicated slice), a gap unlike the others (a missing slice)
    or slices of several orientations. ITK would stack them as if evenly spaced. A series
    without positions (secondary capture) is not checked."""
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    if len(files) < 3:
        return
    pos, ori = [], []
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
            pos.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            ori.append([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        except (RuntimeError, ValueError):
            return
    if any(len(p) != 3 for p in pos) or any(len(o) != 6 for o in ori):
        return
    ori_a = np.asarray(ori)
    if np.abs(ori_a - ori_a[0]).max() > 1e-3:
        raise CTReadError(f"{where}: the slices of this DICOM series have different orientations "
                          "(ImageOrientationPatient); give each stack as its own series")
    z = np.asarray(pos) @ np.cross(ori_a[0, :3], ori_a[0, 3:])
    order = np.argsort(z, kind="stable")
    z, names = z[order], [Path(files[i]).name for i in order]
    gaps = np.diff(z)
    step = float(np.median(gaps))
    dup = np.flatnonzero(gaps <= max(1e-4, 0.01 * step))
    if len(dup):
        k = int(dup[0])
        raise CTReadError(f"{where}: slices {names[k]} and {names[k + 1]} lie at the same position "
                          f"({z[k]:.3f} mm along the slice normal; {len(dup)} such pair(s)): a "
                          "duplicated slice or two scans in one series; remove the extra slices")
    fit = np.polyval(np.polyfit(np.arange(len(z)), z, 1), np.arange(len(z)))
    if np.abs(z - fit).max() > 0.2 * step:
        k = int(np.argmax(np.abs(gaps - step)))
        raise CTReadError(f"{where}: uneven slice positions: {gaps[k]:.3f} mm between "
                          f"{names[k]} and {names[k + 1]} where the others are {step:.3f} mm "
                          "apart (a missing slice?); complete the series or remove it")


def read_sitk(path: str | os.PathLike, series_files: Sequence[str] | None = None):
    """Read a SimpleITK image from a file or a DICOM series folder (largest series when the
    folder holds several, or the given ``series_files``). Raises :class:`CTReadError`."""
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    path = Path(path)
    try:
        if series_files is None and path.is_dir():
            series = dicom_series(path)
            if not series:
                raise CTReadError(f"{path}: folder holds no DICOM series")
            series_files = max(series, key=lambda s: len(s[1]))[1]
        if series_files is not None:
            check_slice_positions(series_files, path)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(series_files))
            return reader.Execute()
        check_complete(path)
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CTReadError(f"{path}: SimpleITK cannot read it ({_sitk_reason(e)})") from e
    except OSError as e:
        raise CTReadError(f"{path}: cannot be read ({e.strerror or e})") from e


def _sitk_reason(e: BaseException) -> str:
    """The informative line of a SimpleITK exception (they run over several lines)."""
    msg = str(e).strip().splitlines()
    why = next((m for m in msg if "ERROR" in m or "Unable" in m), msg[-1] if msg else "")
    return why.strip()[:200]


def read_ct(path: str | os.PathLike, series_files: Sequence[str] | None = None,
            reorient: bool = True) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    """Read a CT volume (any SimpleITK file, or a DICOM series folder).

    Args:
        path: a file (``.mhd``, ``.nii.gz``, ``.nrrd``, ``.dcm`` volume, ...) or a folder
            holding a DICOM series.
        series_files: the slices of one series (from :func:`find_ct_inputs`), else the
            folder's largest series is read.
        reorient: turn axis-aligned volumes to the identity direction (LPS) first.

    Returns:
        ``hu``: float32 (X, Y, Z), the stored values after the file's rescale (HU for CT);
        ``spacing``: (sx, sy, sz) in mm; ``meta``: plain-typed facts (original size,
        spacing, origin, direction and orientation code, pixel type, number of components).

    Raises:
        CTReadError: unreadable, damaged (truncated or corrupted data: :func:`check_complete`),
        a DICOM series with missing or duplicated slices (:func:`check_slice_positions`), not
        3D (a 2D image or a single slice), multi-component or complex.
    """
    img = read_sitk(path, series_files)
    try:
        return _to_array(img, path, reorient)
    except RuntimeError as e:   # a pixel type or geometry SimpleITK cannot convert
        raise CTReadError(f"{path}: SimpleITK cannot convert it to a CT volume "
                          f"({_sitk_reason(e)})") from e


def _to_array(img: Any, path: str | os.PathLike, reorient: bool
              ) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    """:func:`read_ct` after reading: checks, reorientation, (x, y, z) float32 array."""
    import SimpleITK as sitk  # local: .npy-only callers never load SimpleITK

    if "complex" in img.GetPixelIDTypeAsString():
        raise CTReadError(f"{path}: complex-valued voxels ({img.GetPixelIDTypeAsString()}: "
                          "k-space or a Fourier transform?), not a CT volume; skip it")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    size = tuple(int(s) for s in img.GetSize())
    if img.GetDimension() != 3 or min(size) < 2:
        raise CTReadError(f"{path}: a {img.GetDimension()}D image of size {size}, not a 3D volume "
                          "(a single slice or 2D image); skip it or give the whole series")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CTReadError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel "
                          "(colour/vector image), not a CT volume")
    meta: dict[str, Any] = {
        "source": str(path),
        "original_size_xyz": list(size),
        "original_spacing": [float(s) for s in img.GetSpacing()],
        "original_origin": [float(o) for o in img.GetOrigin()],
        "original_direction": [float(d) for d in img.GetDirection()],
        "pixel_type": img.GetPixelIDTypeAsString(),
    }
    try:
        meta["original_orientation"] = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            img.GetDirection())
    except (AttributeError, RuntimeError):
        meta["original_orientation"] = ""
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    axis_aligned = np.allclose(np.abs(direction).max(axis=0), 1.0, atol=1e-3)
    if reorient and axis_aligned and not np.allclose(direction, np.eye(3), atol=1e-3):
        img = sitk.DICOMOrient(img, "LPS")
        meta["reoriented_to"] = "LPS"
    elif reorient and not axis_aligned:
        meta["reoriented_to"] = "none (oblique direction kept)"
    img = sitk.Cast(img, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)                     # (Z, Y, X)
    hu = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (X, Y, Z)
    spacing = tuple(float(s) for s in img.GetSpacing())   # (sx, sy, sz), same order as hu axes
    meta["spacing"] = list(spacing)
    meta["origin"] = [float(o) for o in img.GetOrigin()]
    meta["shape_xyz"] = list(hu.shape)
    return hu.astype(np.float32, copy=False), spacing, meta  # type: ignore[return-value]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    new_spacing: Sequence[float]) -> tuple[int, int, int]:
    """Output size that keeps the physical extent ``shape * spacing`` (rounded, at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))  # type: ignore[return-value]


def resample(hu: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float],
             pad_value: float = -1024.0) -> np.ndarray:
    """Linear resampling of an (X, Y, Z) volume from ``spacing`` to ``new_spacing`` (mm).

    The physical extent (``shape * spacing``, voxel edges to voxel edges) is kept: the output
    has :func:`resampled_shape` voxels aligned on the same outer edge. Output points within
    half an input voxel of the edge take the nearest edge value; points beyond the input
    (only from rounding the size up) get ``pad_value``, air (-1024 HU) by default -- a real
    HU value, never a pixel-type code. Separable (one axis at a time, trilinear overall),
    float32, vectorised.
    """
    out = np.asarray(hu, dtype=np.float32)
    if out.ndim != 3:
        raise ValueError(f"resample expects an (X, Y, Z) volume, got shape {out.shape}")
    new_shape = resampled_shape(out.shape, spacing, new_spacing)
    for axis, (n, s, t, m) in enumerate(zip(out.shape, spacing, new_spacing, new_shape)):
        if m == n and abs(s - t) < 1e-9:
            continue
        p = (np.arange(m, dtype=np.float64) + 0.5) * (t / s) - 0.5   # output centres, input index
        outside = (p < -0.5 - 1e-6) | (p > n - 0.5 + 1e-6)
        pc = np.clip(p, 0, n - 1)
        i0 = np.floor(pc).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (pc - i0).astype(np.float32)
        bshape = [1, 1, 1]
        bshape[axis] = m
        w = w.reshape(bshape)
        a0 = np.take(out, i0, axis=axis)
        a1 = np.take(out, i1, axis=axis)
        a1 -= a0
        a1 *= w
        a0 += a1
        if outside.any():
            idx = [slice(None)] * 3
            idx[axis] = np.flatnonzero(outside)
            a0[tuple(idx)] = pad_value
        out = a0
    return np.ascontiguousarray(out, dtype=np.float32)
