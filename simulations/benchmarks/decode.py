"""Decode throughput and peak memory of a manifest site's images, through the decode cache.

    python -m fedshift.simulations.benchmarks.decode [--n 3000] [--size 512] [--image-size 224]
        [--out decode.json]

It writes ``--n`` generated 16-bit DICOM files (``--size`` squared; a third MONOCHROME1 with a window, a
third with a rescale slope/intercept, the rest plain 12-bit MONOCHROME2) and a manifest listing them in a
temporary folder, then loads the manifest with ``load_manifest`` twice: cold (every file decoded, windowed,
resized to ``--image-size`` and stored in the cache, by ``--workers`` processes) and warm (read back from
the cache). Generation and each phase run in their own fresh process, so each phase's peak RSS
(``ru_maxrss``) is its own: the table shows it, the RSS of that process before the load (Python, numpy,
pydicom and fedshift imported) and their difference, and the largest decoding worker's peak, next to the
size of the archive at full resolution; it writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.common.dicom import write_dicom
from fedshift.common.manifest import load_manifest

logger = logging.getLogger(__name__)


def rss_mib() -> float:
    """This process's resident set size now, MiB (``/proc/self/status``; the peak where not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size so far, MiB (Linux reports KiB): this process's, or (RUSAGE_CHILDREN) that of
    its largest finished child (a decoding worker)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def _dicom(path: Path, pixels: np.ndarray, kind: int) -> None:
    """Kind 0: MONOCHROME1 with a window; 1: rescale slope/intercept and a window; 2: 12-bit, no window."""
    if kind == 0:
        write_dicom(
            path, pixels, photometric="MONOCHROME1", elements={"WindowCenter": 30000, "WindowWidth": 40000}
        )
    elif kind == 1:
        window = {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": 14000, "WindowWidth": 12000}
        write_dicom(path, pixels, elements={"Modality": "CT", **window})
    else:
        write_dicom(path, pixels >> 4, bits_stored=12)


def generate(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` DICOM files and ``manifest.csv`` (two classes, three images per patient) in ``root``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 20000 + 20000 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6)
    rows = ["path,label,patient_id"]
    for i in range(n):
        noise = rng.normal(0, 3000, (size, size)).astype(np.float32)
        pixels = np.clip(base + noise + 8000 * (i % 2) * xx, 0, 65535).astype(np.uint16)
        _dicom(root / f"im{i:05d}.dcm", pixels, i % 3)
        rows.append(f"im{i:05d}.dcm,{'abnormal' if i % 2 else 'normal'},P{i // 3}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _generate_child(root: Path, n: int, size: int) -> dict[str, float]:
    start = time.perf_counter()
    generate(root, n, size)
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}


def _phase_child(manifest: Path, state: Path, image_size: int, workers: int) -> dict[str, float]:
    """One load in this (fresh) process: its images, seconds, RSS before, peak RSS, workers' peak."""
    import PIL.Image  # noqa: F401  (imports paid before the baseline, as a running site has them)
    import pydicom.pixels  # noqa: F401

    import fedshift.common.data  # noqa: F401

    before = rss_mib()
    start = time.perf_counter()
    data = load_manifest(manifest, image_size=image_size, state_dir=state, workers=workers)
    seconds = time.perf_counter() - start
    images = sum(len(s) for s in data.splits.values())
    peak = peak_rss_mib()
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "peak_growth_mib": peak - before,
        "peak_rss_worker_mib": peak_rss_mib(resource.RUSAGE_CHILDREN) if workers > 1 else 0.0,
    }


def _in_child(fn: Any, *args: Any) -> dict[str, float]:
    """``fn(*args)`` in a fresh spawned process (its own ``ru_maxrss``)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure(n: int, size: int, image_size: int, workdir: Path | None, workers: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedshift-decode-", dir=workdir) as tmp:
        root = Path(tmp)
        generated = _in_child(_generate_child, root, n, size)
        manifest = root / "manifest.csv"
        archive_mib = sum(f.stat().st_size for f in root.glob("*.dcm")) / 2**20
        phases = []
        for phase in ("cold", "warm"):
            result = _in_child(_phase_child, manifest, root / "state", image_size, workers)
            phases.append({"phase": phase, **result})
    return {
        "n": n,
        "size": size,
        "image_size": image_size,
        "workers": workers,
        "archive_mib": archive_mib,
        "decoded_arrays_mib": n * image_size * image_size / 2**20,
        "generate_seconds": generated["seconds"],
        "generate_peak_rss_mib": generated["peak_rss_mib"],
        "phases": phases,
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("decode.json"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (load_manifest's workers)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = measure(args.n, args.size, args.image_size, args.workdir, args.workers)
    print(
        f"{result['n']} DICOMs {result['size']}x{result['size']} 16-bit ({result['archive_mib']:.0f} MiB) "
        f"-> {result['image_size']} px ({result['decoded_arrays_mib']:.0f} MiB decoded), "
        f"{result['workers']} worker(s); "
        f"generating (its own process): {result['generate_seconds']:.0f} s, peak RSS "
        f"{result['generate_peak_rss_mib']:.0f} MiB; each phase in a fresh process"
    )
    header = ("phase", "images", "seconds", "images/s", "RSS before", "peak RSS", "growth", "worker peak")
    print(
        f"{header[0]:<6} {header[1]:>7} {header[2]:>8} {header[3]:>9}"
        + "".join(f" {h:>11}" for h in header[4:])
    )
    for p in result["phases"]:
        mib = (p["rss_before_mib"], p["peak_rss_mib"], p["peak_growth_mib"], p["peak_rss_worker_mib"])
        print(
            f"{p['phase']:<6} {p['images']:>7} {p['seconds']:>8.1f} {p['images_per_s']:>9.0f}"
            + "".join(f" {m:>11.0f}" for m in mib)
        )
    print("RSS columns in MiB; worker peak: the largest decoding worker's (0 with --workers 1)")
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
