"""A manifest of DICOM files federates like the ``.npz`` it was exported from: the same simulation over both,
per-site test AUC within 0.01 (real PneumoniaMNIST images, a real Flower simulation)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from fedshift.common.cli import main
from fedshift.common.data import Dataset, load_dataset, load_npz, save_npz
from fedshift.simulations.manifest_export import export_manifest

pytestmark = pytest.mark.slow

SMALL = {"train": 900, "val": 150}  # images drawn from each split of PneumoniaMNIST (it has no test split)
# at the images' own 28 px the DICOMs decode to the .npz's pixels exactly (a resize in the decode cache
# and one in the training loader differ by rounding, which a 20-image test split turns into AUC noise)
RUN = [
    "--sites",
    "3",
    "--rounds",
    "2",
    "--image-size",
    "28",
    "--no-baseline",
    "--unseen-sites",
    "0",
    "--no-dp",
]


def _subset(source: Path, out: Path) -> Path:
    """A fixed random subset of every split, as an ``.npz``."""
    full = load_npz(source)
    rng = np.random.default_rng(0)
    splits = {
        s: full.split(s).subset(np.sort(rng.choice(len(full.split(s)), n, replace=False)))
        for s, n in SMALL.items()
    }
    save_npz(out, Dataset(splits, full.class_names, str(source), False))
    return out


def _per_site_auc(data: Path, out: Path) -> dict[str, float]:
    assert main(["simulate", "--data", str(data), *RUN, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    return {site: metrics["auc"] for site, metrics in report["federated_test"].items()}


def test_a_dicom_manifest_federates_like_its_npz(
    pneumonia_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the decode cache of a run without a site
    npz = _subset(pneumonia_path, tmp_path / "small.npz")
    manifest = export_manifest(load_npz(npz), tmp_path / "export")

    # the manifest holds the same images, labels and splits (decoded once into the cache)
    pixels, decoded = load_npz(npz), load_dataset(manifest, image_size=28)
    assert decoded.class_names == pixels.class_names
    for split in SMALL:
        np.testing.assert_array_equal(decoded.split(split).labels, pixels.split(split).labels)
        np.testing.assert_array_equal(decoded.split(split).images, pixels.split(split).images)

    from_npz = _per_site_auc(npz, tmp_path / "npz-run")
    from_manifest = _per_site_auc(manifest, tmp_path / "manifest-run")
    assert sorted(from_manifest) == sorted(from_npz) == ["site-0", "site-1", "site-2"]
    for site, auc in from_npz.items():
        assert abs(from_manifest[site] - auc) <= 0.01, (site, from_manifest[site], auc)
    assert min(from_npz.values()) > 0.6  # the sites learned something: the comparison is not of chance


README = Path(__file__).resolve().parents[1] / "README.md"
FASTER = [
    "--max-per-site",
    "120",
    "--rounds",
    "1",
    "--no-baseline",
    "--image-size",
    "28",
    "--unseen-sites",
    "0",
    "--no-dp",  # the README's command is private by default; this test is about the manifest's patients
]


def test_the_readme_worked_example_federates_whole_patients(
    pneumonia_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Worked example" commands (on a subset of PneumoniaMNIST, fewer rounds): a manifest
    without a split column, two images per patient, federated with every patient at one site."""
    section = README.read_text().split("Worked example", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    export, simulate = (shlex.split(line) for line in block.strip().splitlines())
    assert export[:2] == ["fedshift", "export-manifest"] and simulate[:2] == ["fedshift", "simulate"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    small = _subset(pneumonia_path, tmp_path / "small.npz")
    assert main([w.replace("../shared/data/pneumoniamnist.npz", str(small)) for w in export[1:]]) == 0
    rows = (tmp_path / "export" / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,label,patient_id" and len(rows) == 1 + sum(SMALL.values())
    assert main([*simulate[1:], *FASTER, "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(report["federated_test"]) == [f"site-{k}" for k in range(4)]
    # the simulator drew whole patients: at site-0 (the reference scanner leaves pixels as they are) each
    # patient's two images are both there, in one split
    source = load_npz(small)
    patient_of = {
        source.split(s).images[i].tobytes(): f"{s}-{i // 2}"
        for s in SMALL
        for i in range(len(source.split(s)))
    }
    seen: dict[str, list[str]] = {}
    data = load_npz(tmp_path / "run" / "sites" / "site-0" / "data.npz")
    for split, images in data.splits.items():
        for image in images.images:
            seen.setdefault(patient_of[image.tobytes()], []).append(split)
    assert len(seen) >= 50  # a quarter of what the label shift lets the sites use
    assert all(len(splits) == 2 and splits[0] == splits[1] for splits in seen.values())
