"""The model comes home, end to end on real data: a Flower simulation of PneumoniaMNIST sites, a verified
bundle at every trained and unseen site, and `fedshift predict` on a site's bundle equal to the
federation's own final test metrics of that site (with label-shift correction and without)."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from fedshift.client.bundle import load_bundle, verify_bundle
from fedshift.client.inference import PRIOR_NONE, infer
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.cli import main
from fedshift.common.config import FederationConfig
from fedshift.common.data import load_npz
from fedshift.common.metrics import classification_metrics
from fedshift.common.model import build_model
from fedshift.simulations.unseen import AS_RECEIVED, SITE_SIDE

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
# added to the README's simulate, for CI (its DP default is tested in test_simulation.py)
FASTER = ["--max-per-site", "150", "--rounds", "2", "--no-baseline", "--no-dp"]
KEYS = ("auc", "accuracy", "log_loss")


def _readme_commands(data: Path, run: Path, csv_out: Path) -> tuple[list[str], list[str]]:
    """The README's two commands of "Use the model at your hospital" (simulate, predict), here."""
    section = README.read_text().split("## Use the model at your hospital", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line) for line in block.strip().splitlines()]
    assert [line[:2] for line in lines] == [["fedshift", "simulate"], ["fedshift", "predict"]]
    places = {"../shared/data/pneumoniamnist.npz": str(data), "predictions.csv": str(csv_out)}

    def here(word: str) -> str:
        return places.get(word, word.replace("runs/pneumonia", str(run)))

    simulate, predict = ([here(w) for w in line[1:]] for line in lines)
    return [*simulate, *FASTER], predict


def _predict(bundle: Path, data: Path, out: Path, *more: str) -> dict[str, float]:
    """`fedshift predict` on the test split; the metrics of the CSV's corrected probabilities."""
    args = ["predict", "--model", str(bundle), "--images", str(data), "--split", "test", "--out", str(out)]
    assert main([*args, *more]) == 0
    return _metrics(out, data)


def _columns(predictions: Path, prefix: str) -> np.ndarray:
    """The CSV's probabilities whose column names start with ``prefix`` (``raw_``, ``corrected_``)."""
    with predictions.open() as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(r[k]) for k in r if k.startswith(prefix)] for r in rows])


def _metrics(predictions: Path, data: Path) -> dict[str, float]:
    labels = load_npz(data).split("test").labels
    probs = _columns(predictions, "corrected_")
    assert len(probs) == len(labels)
    return classification_metrics(labels, probs)


def _close(got: dict[str, float], expected: dict[str, float], prefix: str = "") -> None:
    for key in KEYS:
        want = float(expected[prefix + key.replace("_", "-")])
        assert math.isclose(got[key], want, rel_tol=0, abs_tol=1e-6), (prefix, key, got[key], want)


def test_every_site_predicts_as_the_federation_evaluated_it(
    pneumonia_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    simulate, predict = _readme_commands(pneumonia_path, out, tmp_path / "readme.csv")
    assert main(simulate) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    names = ["site-0", "site-1", "site-2", "site-3", "unseen-0"]
    assert sorted(report["bundles"]) == names
    for name in names:
        verify_bundle(out / "sites" / name)
    # the command's last lines say where the bundles are and what to type next
    tail = printed.strip().splitlines()[-2:]
    assert tail[0].startswith("Every site holds its model bundle (5:")
    assert tail[1].split()[:4] == ["fedshift", "predict", "--model", str(out / "sites" / "site-0" / "model")]

    # a trained site: predict on its bundle = the federation's final test metrics, to 1e-6, with the
    # label-shift correction (the README's command) and without it
    site0 = out / "sites" / "site-0"
    final = report["federated_test"]["site-0"]
    assert main(predict) == 0
    _close(_metrics(tmp_path / "readme.csv", site0 / "data.npz"), final, "ls-")
    _close(_predict(site0 / "model", site0 / "data.npz", tmp_path / "plain.csv", "--prior", "none"), final)

    # the unseen site: never trained, holds the final adapters and its own adapted norm statistics
    unseen = out / "sites" / "unseen-0"
    row = report["unseen_sites"]["unseen-0"]
    bundle = load_bundle(unseen)
    checkpoint = load_checkpoint(out / "server" / "checkpoint")
    for key, value in bundle.model.shared_state_dict().items():
        np.testing.assert_array_equal(value.numpy(), checkpoint.arrays[key])
    assert bundle.card["joined"]["unlabelled_images"] == row["unlabelled_images"] > 0
    assert "Hospitals outside the federation" in printed
    # its "site-side" row is what `fedshift predict` gives on its bundle
    predicted = _predict(unseen / "model", unseen / "data.npz", tmp_path / "unseen.csv")
    for key in KEYS:
        assert math.isclose(predicted[key], row[SITE_SIDE][key], abs_tol=1e-9), key
    # its bundle exported: the program, in plain torch, gives predict's probabilities (its adapted stem in it)
    program_path = tmp_path / "unseen.pt"
    assert (
        main(["export", "--model", str(unseen / "model"), "--out", str(program_path), "--prior", "none"]) == 0
    )
    images = load_npz(unseen / "data.npz").split("test").images[:32]
    exported = torch.jit.load(str(program_path))(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(exported, _columns(tmp_path / "unseen.csv", "raw_")[:32], atol=1e-5)
    # its "as received" row: the checkpoint's model, untouched, scored independently
    fed = FederationConfig.from_run_config(json.loads((out / "config.json").read_text())["run_config"])
    model = build_model(fed.model)
    model.load_shared_state_dict({k: torch.from_numpy(v.copy()) for k, v in checkpoint.arrays.items()})
    test = load_npz(unseen / "data.npz").split("test")
    raw = infer(model, test.images, torch.device("cpu"), None, prior=PRIOR_NONE).corrected
    expected = classification_metrics(test.labels, raw)
    for key in KEYS:
        assert math.isclose(row[AS_RECEIVED][key], expected[key], abs_tol=1e-9), key
