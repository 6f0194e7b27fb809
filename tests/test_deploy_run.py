"""A real deployment on loopback: SuperLink with TLS and node authentication, 3 SuperNodes, 2 rounds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedshift.client.bundle import load_bundle
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.model import ModelConfig, build_model
from fedshift.deploy.superlink import BUSY_TIMEOUT_MS
from fedshift.tests.deploy_support import SITES, Federation, fedshift, flower_processes_under, wait_for

pytestmark = pytest.mark.slow

MANIFEST_SITE = SITES[-1]  # its data-path is a CSV manifest of DICOM files, split by the site per patient


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, rounds=2, min_nodes=3, manifest_sites=(MANIFEST_SITE,))
    try:
        yield fed
    finally:
        fed.stop_all()
    assert flower_processes_under(tmp_path) == []


def test_tls_federation_with_enrolled_sites_runs_two_rounds(federation: Federation) -> None:
    started = time.monotonic()
    server = federation.start_server()
    clients = [federation.start_client(site) for site in SITES]
    wait_for("the federation to finish", lambda: server.poll() is not None, 600, *clients)
    assert server.proc.returncode == 0, federation.log(server.name)
    elapsed = time.monotonic() - started

    results = federation.results()
    history = results["history"]
    assert sorted(history["train"], key=int) == ["1", "2"]
    for r in ("1", "2"):
        assert sorted(history["train"][r]) == list(SITES)
        assert sorted(history["evaluate"][r]) == list(SITES)
        assert {p["mechanism"] for p in history["privacy"][r].values()} == {"dp-sgd"}
    assert sorted(results["final_test"]) == list(SITES)
    assert results["resumed_from_round"] == 0
    assert load_checkpoint(federation.run_dir / "checkpoint").round == 2

    # only the shared adapter tensors and allowed metrics crossed the wire
    shared = build_model(ModelConfig(image_size=32)).shared_state_dict()
    adapter_bytes = ArrayRecord(shared).count_bytes()
    final = load_checkpoint(federation.run_dir / "checkpoint").arrays
    for site in SITES:
        sent = federation.egress(site)
        stages = [(e["round"], e["stage"]) for e in sent]
        assert stages == [
            (1, "train"),
            (1, "evaluate"),
            (2, "train"),
            (2, "evaluate"),
            (2, "evaluate"),
            (2, "query.final_model"),  # the final model reached the site: only its name went back
        ]
        assert {i["mechanism"] for i in sent[-1]["items"]} == {"protocol bookkeeping"}
        # ... and it wrote its model bundle, which verifies against the installed backbone
        bundle = load_bundle(federation.state_dir(site))
        for key, value in bundle.model.shared_state_dict().items():
            np.testing.assert_array_equal(value.numpy(), final[key])
        assert bundle.card["privacy"]["epsilon"] == pytest.approx(
            federation.ledger(site)[-1]["epsilon"], abs=1e-9
        )
        assert all(e["blocked"] == [] for e in sent)
        # every evaluation's split is logged, each (round, split) once; no training loss is sent
        evaluated = [(e["round"], e["split"]) for e in sent if e["stage"] == "evaluate"]
        assert evaluated == [(1, "val"), (2, "val"), (2, "test")]
        assert set(history["train"]["1"][site]) == {"num-examples", "samples-per-second", "bytes-sent"}
        for entry in sent:
            arrays = [i for i in entry["items"] if i["record"] == "arrays"]
            others = {i["mechanism"] for i in entry["items"] if i["record"] != "arrays"}
            assert others <= {"aggregate-metric (allowed by site config)", "protocol bookkeeping"}
            if entry["stage"] == "train":
                assert sorted(i["key"] for i in arrays) == sorted(shared)
                assert {i["mechanism"] for i in arrays} == {"dp-sgd"}
                assert history["train"][str(entry["round"])][site]["bytes-sent"] == adapter_bytes
            else:
                assert arrays == []
        # one DP-SGD charge per round, in the ledger on the site's disk
        ledger = federation.ledger(site)
        assert [(e["round"], e["mechanism"]) for e in ledger] == [(1, "dp-sgd"), (2, "dp-sgd")]
        assert len({e["run_id"] for e in ledger}) == 1
        assert ledger[-1]["epsilon"] <= 50.0

    # the budget status command of the runbook reads the same ledger
    shown = fedshift("ledger", "sites/hospital-a", cwd=federation.root)
    assert shown.returncode == 0, shown.stderr
    assert "2 entries" in shown.stdout and "epsilon = " in shown.stdout
    # ... after verifying its chain, and the egress log's, written by the real SuperNode's ClientApp
    assert "ledger 2 entries chained (anchor 2), egress log 6 lines chained (anchor 6)" in shown.stdout

    # the manifest site trained on its DICOMs, decoded once into its state dir, split at patient level
    state = federation.state_dir(MANIFEST_SITE)
    split = json.loads((state / "data-split.json").read_text())
    assert len(list((state / "decode-cache").rglob("32px-*/*.npy"))) == 90  # the run's size (+ the check's)
    # 46 patients (2 images each; one each in val and test has 1), split 60/20/20 by images per class
    assert sum(_per_split(split["patients"]).values()) == 46
    images = _per_split(split["images"])
    assert all(abs(images[s] - 90 * f) <= 2 for s, f in (("train", 0.6), ("val", 0.2), ("test", 0.2)))
    assert results["final_test"][MANIFEST_SITE]["n"] == images["test"]  # it tested on its saved test split
    # its bundle predicts on the manifest's rows of that split
    predicted = fedshift(
        "predict",
        "--model",
        str(state),
        "--images",
        f"data/{MANIFEST_SITE}/manifest.csv",
        "--out",
        "p.csv",
        cwd=federation.root,
    )
    assert predicted.returncode == 0, predicted.stderr
    rows = (federation.root / "p.csv").read_text().splitlines()[1:]
    tested = {image for image, where in split["images"].items() if where == "test"}
    assert len(rows) == images["test"] and {r.split(",")[0] for r in rows} == tested

    # the node config reached the ClientApp: the state went where site.toml said
    for site in SITES:
        assert (federation.state_dir(site) / "site_local.safetensors").is_file()
        site_log = (federation.state_dir(site) / "logs" / "fedshift-client.log").read_text()
        # the site runner's INFO lines reach the site log (opacus's import-time basicConfig once hid them)
        assert "Site runner up" in site_log and "approved (fedshift.client.app:app)" in site_log
    # the coordinator kept its state where the runbook says
    state = federation.root / "coordinator"
    assert (state / "superlink.db").is_file()
    superlink_log = (state / "logs" / "superlink.log").read_text()
    assert f"fedshift: SQLite busy timeout {BUSY_TIMEOUT_MS} ms" in superlink_log  # run via our launcher
    print(f"normal run: {elapsed:.0f} s")


def _per_split(saved: dict[str, str]) -> dict[str, int]:
    """Patients (or images) per split in a site's saved split map."""
    splits = list(saved.values())
    return {s: splits.count(s) for s in ("train", "val", "test")}
