"""Decode throughput and peak memory of a manifest site's images, through the decode cache.

    python -m fedshift.simulations.benchmarks.decode [--n 3000] [--size 512] [--image-size 224]
        [--out decode.json]

It writes ``--n`` generated 16-bit DICOM files (``--size`` squared; a third MONOCHROME1 with a window, a
third with a rescale slope/intercept, the rest plain 12-bit MONOCHROME2) and a manifest listing them in a
temporary folder, then loads the manifest with ``load_manifest`` twice: cold (every file decoded, windowed,
resized to ``--image-size`` and stored in the cache, by ``--workers`` processes) and warm (read back from
the cache). It prints images/s and the process's peak RSS after each phase (``resource.getrusage``, and the
largest worker's), next to the size of the archive at full resolution, and writes JSON.
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


def measure(n: int, size: int, image_size: int, workdir: Path | None, workers: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedshift-decode-", dir=workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        manifest = generate(root, n, size)
        generated_s = time.perf_counter() - start
        rss_generated = peak_rss_mib()
        archive_mib = sum(f.stat().st_size for f in root.glob("*.dcm")) / 2**20
        phases = []
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            data = load_manifest(manifest, image_size=image_size, state_dir=root / "state", workers=workers)
            seconds = time.perf_counter() - start
            images = sum(len(s) for s in data.splits.values())
            phases.append(
                {
                    "phase": phase,
                    "images": images,
                    "seconds": seconds,
                    "images_per_s": images / seconds,
                    "peak_rss_mib": peak_rss_mib(),
                    "peak_rss_worker_mib": peak_rss_mib(resource.RUSAGE_CHILDREN),
                }
            )
            del data
    return {
        "n": n,
        "size": size,
        "image_size": image_size,
        "workers": workers,
        "archive_mib": archive_mib,
        "decoded_arrays_mib": n * image_size * image_size / 2**20,
        "generate_seconds": generated_s,
        "peak_rss_after_generate_mib": rss_generated,
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
        f"peak RSS after generating {result['peak_rss_after_generate_mib']:.0f} MiB"
    )
    print(
        f"{'phase':<6} {'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13} {'worker MiB':>11}"
    )
    for p in result["phases"]:
        print(
            f"{p['phase']:<6} {p['images']:>7} {p['seconds']:>8.1f} {p['images_per_s']:>9.0f} "
            f"{p['peak_rss_mib']:>13.0f} {p['peak_rss_worker_mib']:>11.0f}"
        )
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
