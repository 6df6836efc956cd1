"""Fetch two real chest CTs (with nodule masks) to try the pipeline on.

The source distribution of ``pyradiomics==3.0.1`` on the Python package index carries two
chest CT scans in HU, stored as NRRD, with their nodule label maps:
``lung1_image.nrrd`` (512 x 512 x 48, 0.57 x 0.57 x 5.0 mm), ``lung2_image.nrrd``
(512 x 512 x 61, 0.63 x 0.63 x 5.0 mm), ``lung1_label.nrrd``, ``lung2_label.nrrd``.
This script downloads that sdist with ``pip download --no-deps --no-build-isolation`` (pip
needs numpy, setuptools and wheel in the environment to prepare the sdist's metadata),
extracts only ``data/lung*`` and checks sizes and SHA-256 digests. Nothing is installed.

The files are cached in ``~/.cache/semantic_genesis/sample_ct`` (or
``$SEMANTIC_GENESIS_CACHE/sample_ct``, or ``--cache_dir``); a second run only verifies them.
The folder is printed as the last line of stdout, so ``DIR=$(python scripts/fetch_sample_ct.py)``
works. ``--images_only DIR`` also links/copies the two images (not the masks) into DIR, ready
for ``scripts/prepare_dataset.py --input_dir DIR``.
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tarfile
import tempfile

from runtime.cli import add_verbosity_flag, ArgumentParser, HelpFormatter, run_cli, positive_float
from runtime.errors import ReportedError

__all__ = ["PACKAGE", "SAMPLE_FILES", "IMAGES", "LABELS", "FetchError", "DownloadError",
           "default_cache_dir", "verify_sample_ct", "fetch_sample_ct", "main"]

PACKAGE = "pyradiomics==3.0.1"
#: name -> (size in bytes, sha256, image size (x, y, z)), recorded from the first fetch.
SAMPLE_FILES: dict[str, tuple[int, str, tuple[int, int, int]]] = {
    "lung1_image.nrrd": (12548518, "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
                         (512, 512, 48)),
    "lung1_label.nrrd": (24999, "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
                         (512, 512, 48)),
    "lung2_image.nrrd": (17817709, "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
                         (512, 512, 61)),
    "lung2_label.nrrd": (33427, "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
                         (512, 512, 61)),
}
IMAGES = ("lung1_image.nrrd", "lung2_image.nrrd")
LABELS = ("lung1_label.nrrd", "lung2_label.nrrd")


class FetchError(ReportedError, RuntimeError):
    """The sample CTs could not be downloaded or verified; the message says why."""


class DownloadError(FetchError):
    """``pip download`` of the sdist failed (index unreachable, timeout, no pip/numpy): the
    files are unavailable here, as opposed to present but wrong."""


def default_cache_dir() -> Path:
    """``--cache_dir`` default: ``$SEMANTIC_GENESIS_CACHE/sample_ct`` or
    ``~/.cache/semantic_genesis/sample_ct``."""
    root = os.environ.get("SEMANTIC_GENESIS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "semantic_genesis"
    return base / "sample_ct"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sample_ct(folder: str | os.PathLike, check_hash: bool = True) -> list[str]:
    """Problems with the cached files in ``folder`` (empty list: all four present and intact)."""
    folder = Path(folder)
    problems = []
    for name, (size, digest, _) in SAMPLE_FILES.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != size:
            problems.append(f"{p}: {p.stat().st_size} bytes, expected {size}")
        elif check_hash and _sha256(p) != digest:
            problems.append(f"{p}: SHA-256 differs from the recorded one")
    return problems


def _extract(tarball: Path, dest: Path) -> None:
    """Extract only ``*/data/lung*`` members of the sdist into ``dest`` (flat, by base name)."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            found = 0
            for m in tar.getmembers():
                parts = Path(m.name).parts
                base = parts[-1] if parts else ""
                if (m.isfile() and len(parts) >= 2 and parts[-2] == "data"
                        and base in SAMPLE_FILES):
                    src = tar.extractfile(m)
                    if src is None:
                        continue
                    tmp = dest / f".{base}.part"
                    with src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(tmp, dest / base)
                    found += 1
    except (tarfile.TarError, OSError) as e:
        why = " ".join(str(e).split())
        raise FetchError(f"{tarball}: cannot extract ({why})") from e
    if found < len(SAMPLE_FILES):
        raise FetchError(f"{tarball}: holds {found} of the {len(SAMPLE_FILES)} data/lung* files")


def _pip_download(tmp: Path, timeout: float) -> Path:
    """``pip download`` the sdist into ``tmp``; return the tarball path."""
    if _missing("numpy"):
        raise DownloadError(f"pip needs numpy installed to prepare {PACKAGE}'s metadata: "
                            "pip install numpy")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary", ":all:", "--disable-pip-version-check", "--retries", "2",
           "--timeout", "30", "-d", str(tmp), PACKAGE]
    try:
        # pip writes UTF-8; decode it as such whatever the process locale (a library may have
        # switched it to ASCII), replacing bytes that are not UTF-8
        res = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8",
                             errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DownloadError(f"pip download {PACKAGE} took longer than {timeout:.0f}s "
                            "(is the package index reachable?)") from e
    except Exception as e:  # noqa: BLE001 -- any failure to run pip means "not downloaded"
        why = " ".join(str(e).split()) or type(e).__name__
        raise DownloadError(f"cannot run pip download {PACKAGE} ({type(e).__name__}: {why})") from e
    tars = sorted(tmp.glob("pyradiomics-3.0.1*.tar.gz"))
    if res.returncode != 0 or not tars:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise DownloadError(f"pip download {PACKAGE} failed (rc {res.returncode}): {tail} -- is "
                            "the package index reachable, and are numpy, setuptools and wheel "
                            "installed? (or pass --tarball to a downloaded sdist)")
    return tars[0]


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def fetch_sample_ct(cache_dir: str | os.PathLike | None = None, tarball: str | os.PathLike | None = None,
                    timeout: float = 600.0, quiet: bool = False) -> Path:
    """Make sure the two sample CTs and their masks are in ``cache_dir``; return it.

    Idempotent: when the four files are present and intact nothing is downloaded. Otherwise
    the sdist is downloaded (or ``tarball`` is used), ``data/lung*`` extracted, and
    everything verified. Raises :class:`FetchError` with the reason on failure.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not verify_sample_ct(folder):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{folder}: cannot create the cache folder ({e.strerror}); pass "
                         "--cache_dir to a writable folder") from e
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="sample_ct_", dir=folder) as t:
        tmp = Path(t)
        if tarball is None:
            say(f"downloading {PACKAGE} (source distribution, ~34 MB) to extract data/lung* ...")
            tar = _pip_download(tmp, timeout)
        else:
            tar = Path(tarball)
        _extract(tar, folder)
    problems = verify_sample_ct(folder)
    if problems:
        raise FetchError("sample CT verification failed: " + "; ".join(problems))
    say(f"sample CTs ready in {folder}")
    return folder


def link_images(folder: Path, dest: Path) -> list[Path]:
    """Put the two images (not the masks) into ``dest`` (symlink, else copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in IMAGES:
        target = dest / name
        if not target.exists():
            try:
                target.symlink_to((folder / name).resolve())
            except OSError:
                shutil.copy2(folder / name, target)
        out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch (or verify) the sample CTs; print their folder last. 0 ok, 2 failure."""
    return run_cli(build_parser, _fetch_and_link, argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/fetch_sample_ct.py``."""
    ap = ArgumentParser(prog="fetch_sample_ct.py", description=__doc__.split("\n\n")[0],
                        formatter_class=HelpFormatter)
    g = ap.add_argument_group("sample data")
    g.add_argument("--cache_dir", default=None,
                   help="folder to keep the files in (default $SEMANTIC_GENESIS_CACHE/sample_ct "
                        "or ~/.cache/semantic_genesis/sample_ct)")
    g.add_argument("--tarball", default=None,
                   help="use an already downloaded pyradiomics-3.0.1.tar.gz instead of pip")
    g.add_argument("--images_only", default=None, metavar="DIR",
                   help="also link (or copy) the two CT images, without masks, into DIR")
    g.add_argument("--timeout", type=positive_float, default=600.0, help="seconds allowed for pip download")
    add_verbosity_flag(g, "1 and 2: what is fetched and checked (0 prints only the folder)")
    return ap


def _fetch_and_link(args: argparse.Namespace) -> Path:
    folder = fetch_sample_ct(args.cache_dir, args.tarball, args.timeout, args.verbose == 0)
    if args.images_only:
        link_images(folder, Path(args.images_only))
    print(folder)
    return folder


if __name__ == "__main__":
    raise SystemExit(main())
