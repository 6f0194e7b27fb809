"""fedshift export: the TorchScript program against the in-process model and corrections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedshift.client.bundle import SHARED_FILE, backbone_identity, bundle_files, load_bundle, write_bundle
from fedshift.client.correction import predict_logits
from fedshift.client.export import METADATA_FILE, build_program, log_prior_ratio, save_program
from fedshift.common.calibration import Calibration
from fedshift.common.cli import main
from fedshift.common.data import make_synthetic_cxr
from fedshift.common.errors import ConfigError
from fedshift.common.label_shift import correct_posteriors
from fedshift.common.model import FedshiftModel
from fedshift.tests.helpers import perturbed_model
from tests.helpers import one_line_error

SOURCE, TARGET = np.array([0.7, 0.3]), np.array([0.35, 0.65])
CALIBRATION = Calibration("vs", np.array([0.8, 1.3]), np.array([0.25, -0.25]), 0.0)

LOADER = """
import sys


class NoFedshift:  # as if fedshift were not installed: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fedshift":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoFedshift())
import numpy as np, torch
program = torch.jit.load(sys.argv[1])
images = torch.from_numpy(np.load(sys.argv[2]))
out = program(images).detach().numpy()
assert "fedshift" not in sys.modules, sorted(m for m in sys.modules if "fedshift" in m)
np.save(sys.argv[3], out)
"""


@pytest.fixture(scope="module")
def model() -> FedshiftModel:
    return perturbed_model(64, seed=3, noise_seed=0)  # type: ignore[no-any-return]


def _reference(model: FedshiftModel, images: np.ndarray) -> np.ndarray:
    """The in-process path: logits, calibration map, then the prior correction."""
    logits = predict_logits(model, images, torch.device("cpu"))
    return correct_posteriors(CALIBRATION.apply(logits), SOURCE, TARGET)


def test_program_in_a_fresh_process_matches_in_process_prediction(
    model: FedshiftModel, tmp_path: Path
) -> None:
    images = make_synthetic_cxr(32, size=28, seed=5).split("train").images  # resized inside to 64
    program = build_program(model, CALIBRATION, SOURCE, TARGET)
    save_program(program, tmp_path / "model.pt", {"image_size": 64})
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, "model.pt", "images.npy", "out.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    exported = np.load(tmp_path / "out.npy")
    reference = _reference(model, images)
    assert exported.shape == (32, 2)
    np.testing.assert_allclose(exported, reference, rtol=0, atol=1e-5)
    # the correction matters: the uncorrected softmax differs by far more than the tolerance
    plain = torch.softmax(torch.as_tensor(predict_logits(model, images, torch.device("cpu"))), 1).numpy()
    assert np.abs(plain - reference).max() > 1e-2


def test_program_accepts_float_and_channel_inputs(model: FedshiftModel, tmp_path: Path) -> None:
    images = make_synthetic_cxr(8, size=64, seed=6).split("train").images  # already at the model's side
    program = build_program(model, CALIBRATION, SOURCE, TARGET)
    as_uint8 = program(torch.from_numpy(images)).detach().numpy()
    as_float = program(torch.from_numpy(images[:, None].astype(np.float32) / 255.0)).detach().numpy()
    np.testing.assert_allclose(as_uint8, _reference(model, images), rtol=0, atol=1e-5)
    np.testing.assert_allclose(as_float, as_uint8, rtol=0, atol=1e-6)
    with pytest.raises(torch.jit.Error, match="grey images"):
        program(torch.zeros(2, 3, 64, 64))
    save_program(program, tmp_path / "m.pt", {"image_size": 64, "target_prior": TARGET.tolist()})
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["target_prior"] == TARGET.tolist()


def test_log_prior_ratio_closed_form() -> None:
    np.testing.assert_allclose(log_prior_ratio(SOURCE, TARGET, 2), np.log(TARGET / SOURCE), atol=1e-15)
    np.testing.assert_array_equal(log_prior_ratio(None, TARGET, 2), np.zeros(2))
    with pytest.raises(ConfigError, match="--prior none"):
        log_prior_ratio(np.array([1.0, 0.0]), TARGET, 2)


def _write_bundle(model: FedshiftModel, state_dir: Path) -> Path:
    """A real site model bundle for ``model`` with a VS calibration and a stored prior estimate."""
    correction = {
        "split": "test",
        "source_prior": SOURCE.tolist(),
        "prior": TARGET.tolist(),
        "estimate": TARGET.tolist(),
        "interval": [[0.3, 0.6], [0.4, 0.7]],
        "method": "em",
        "n_unlabeled": 200,
        "fallback": False,
        "reason": "",
        "calibration": {
            "kind": "vs",
            "weights": CALIBRATION.weights.tolist(),
            "bias": CALIBRATION.bias.tolist(),
        },
        "threshold": 0.4,
    }
    card = {
        "run_id": "1",
        "site": "site-0",
        "rounds": 2,
        "sites": 3,
        "finetune": model.config.finetune,
        "backbone": backbone_identity(model.config),
        "privacy": {"dp": False, "epsilon": None, "delta": 1e-5, "budget_epsilon": None},
        "validation": {},
        "test": {},
        "label_shift": {"status": "on", "split": "test"},
        "created": "2026-12-01T00:00:00Z",
        "fedshift_version": "test",
    }
    return write_bundle(state_dir, bundle_files(model, card, correction))


def test_cli_export_of_a_bundle_matches_predict(
    model: FedshiftModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedshift.client.inference import infer

    path = _write_bundle(model, tmp_path / "site-0")
    bundle = load_bundle(path)
    images = make_synthetic_cxr(32, size=28, seed=7).split("train").images
    cpu = torch.device("cpu")
    predict_prior = {"stored": bundle.correction.estimate, "training": "training", "none": "none"}
    for prior, mode in predict_prior.items():
        out = tmp_path / f"{prior}.pt"
        assert main(["export", "--model", str(tmp_path / "site-0"), "--out", str(out), "--prior", prior]) == 0
        exported = torch.jit.load(str(out))(torch.from_numpy(images)).detach().numpy()
        predicted = infer(bundle.model, images, cpu, bundle.correction, prior=mode).corrected
        np.testing.assert_allclose(exported, predicted, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        torch.jit.load(str(tmp_path / "stored.pt"))(torch.from_numpy(images)).detach().numpy(),
        _reference(model, images),
        rtol=0,
        atol=1e-5,
    )
    assert "wrote" in capsys.readouterr().out


def test_cli_export_of_a_corrupt_bundle_is_one_line(
    model: FedshiftModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_bundle(model, tmp_path / "site-0")
    (path / SHARED_FILE).write_bytes(b"not tensors")
    code = main(["export", "--model", str(path), "--out", str(tmp_path / "m.pt")])
    one_line_error(code, capsys.readouterr().err, SHARED_FILE)
    assert not (tmp_path / "m.pt").exists()


def test_cli_export_bad_prior_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", "b", "--out", str(tmp_path / "m.pt"), "--prior", "auto"])
    one_line_error(int(str(exc.value.code)), capsys.readouterr().err, "--prior")
    assert not (tmp_path / "m.pt").exists()
