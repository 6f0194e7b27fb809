"""A deployed site owns its privacy settings, and the run-config limits protect its machine.

* no recomputable noise: a deployed site always draws from the OS CSPRNG; ``dp-secure-rng = false``
  is refused by the daemon (one line, exit 2) and by the ClientApp;
* the run config's ``dp-*`` values do not reach a deployed site's DP-SGD or its ledger;
* rounds out of order or beyond ``num-server-rounds`` are refused before any charge or data access;
* a per-run cap ``dp-epsilon-per-run`` bounds each run, numbers checked against Opacus's accountant;
* the accountant is fixed in the ledger;
* every run-config key that sets a site's workload has a maximum.

The ClientApp is driven in process with real messages, a real model, real Opacus and a real ledger,
as a *deployed* node (a node config with ``data-path``), the way a SuperNode's node config reaches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import PRVAccountant

from fedshift.client.app import make_client_app
from fedshift.client.dp import Release, check_allowance, plan_round, reserve
from fedshift.client.ledger import PrivacyLedger
from fedshift.client.site import SiteSettings
from fedshift.common.cli import main
from fedshift.common.config import RUN_CONFIG_MAXIMUM, FederationConfig, PrivacyConfig, TrainConfig
from fedshift.common.errors import BudgetExhaustedError, ConfigError, FedshiftError, PrivacyError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.privacy import epsilon
from fedshift.common.proctree import descendants
from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FISHER_KEY,
    PRIVACY_KEY,
    STATUS_KEY,
    STATUS_ROUND_REFUSED,
)
from fedshift.common.shift_statistics import STAGE_KEY, STAGE_RELEASE, STATISTICS_KEY
from fedshift.deploy.client import check_site
from fedshift.deploy.settings import ClientSettings
from fedshift.server.consolidation import FISHER_MESSAGE
from fedshift.tests.deploy_support import FEDSHIFT, write_site_toml
from fedshift.tests.helpers import one_line_error, site_run_config, write_site

pytestmark = pytest.mark.usefixtures("task_identity")

MODEL = ModelConfig(image_size=32)
LEDGER_FILE = "privacy-ledger.json"


def _train_message(server_round: int) -> Message:
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _deployed_node(site_dir: Path, **privacy: Any) -> dict[str, Any]:
    """A SuperNode's node config as ``fedshift client`` writes it: data, state, name, the site's budget."""
    return {
        "data-path": str(site_dir / "data.npz"),
        "state-dir": str(site_dir),
        "site-name": "hospital-a",
        "device": "cpu",
        "dp-epsilon": 8.0,
        **privacy,
    }


def _call_deployed(app: Any, msg: Message, node: dict[str, Any], run_config: dict[str, Any]) -> Message:
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    return cast(Message, app(msg, context))


def _assert_no_reply(
    app: Any, msg: Message, node: dict[str, Any], run_config: dict[str, Any], needle: str
) -> None:
    """The ClientApp raises a one-line error naming ``needle``, or (when the egress guard turns handler
    exceptions into generic error replies) replies with an error and no content."""
    try:
        reply = _call_deployed(app, msg, node, run_config)
    except FedshiftError as exc:
        assert needle in str(exc) and "\n" not in str(exc)
    else:
        assert reply.has_error() and not reply.has_content()


def _ledger_bytes(site_dir: Path) -> bytes | None:
    path = site_dir / LEDGER_FILE
    return path.read_bytes() if path.is_file() else None


# --- finding 4: no recomputable noise in deployment ---------------------------------------------


def _write_certs(root: Path) -> tuple[Path, Path]:
    """A CA certificate and an unencrypted OpenSSH EC key: what the site daemon's check reads."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca = root / "ca.crt"
    ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    node_key = root / "hospital-a.key"
    node_key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    node_key.chmod(0o600)
    return ca, node_key


def _site_toml(root: Path, **site: Any) -> Path:
    ca, key = _write_certs(root / "certs")
    # loopback, and a port nothing listens on: a daemon that started anyway would only retry
    return write_site_toml(root, ca_cert=ca, private_key=key, superlink="127.0.0.1:9", **site)


def test_a_deployed_site_with_seeded_noise_refuses_to_start(tmp_path: Path) -> None:
    """``fedshift client --config site.toml`` (no --check: the real start) with dp-secure-rng = false.

    Unchecked, the daemon would accept it and start its SuperNode: the seed
    crc32(seed:round:site) is known to the coordinator, which could regenerate the noise.
    """
    path = _site_toml(tmp_path, **{"dp-secure-rng": False})
    proc = subprocess.Popen(
        [*FEDSHIFT, "client", "--config", str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:  # the SuperNode it started runs in its own group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("fedshift client started with dp-secure-rng = false instead of refusing")
    one_line_error(
        proc.returncode, err, "dp-secure-rng", str(path), "CSPRNG", "delete the dp-secure-rng line"
    )
    assert not (tmp_path / "state" / "node-config.toml").exists()  # nothing was written for a SuperNode


def test_the_client_app_refuses_seeded_noise_at_a_deployed_site(tmp_path: Path) -> None:
    """Under a plain flower-supernode (no daemon check) the ClientApp itself refuses, before any charge."""
    site_dir = write_site(tmp_path)
    node = _deployed_node(site_dir, **{"dp-secure-rng": False})  # --node-config "dp-secure-rng=false"
    with pytest.raises(PrivacyError, match="Expected dp-secure-rng to be true at a deployed site"):
        SiteSettings.from_node_config(node, FederationConfig())
    with pytest.raises(
        PrivacyError, match="Expected node-config 'dp-secure-rng' to be true or false, but got 'false'"
    ):
        SiteSettings.from_node_config(
            {**node, "dp-secure-rng": "false"}, FederationConfig()
        )  # text is refused too
    _assert_no_reply(make_client_app(), _train_message(1), node, site_run_config(tmp_path), "dp-secure-rng")
    assert _ledger_bytes(site_dir) is None  # nothing trained, nothing charged


def test_simulated_sites_keep_their_seeded_noise() -> None:
    """Simulation (no data-path) stays reproducible: the run config's seeded noise is allowed there."""
    fed = FederationConfig(sites_root="sites", privacy=PrivacyConfig(enabled=True, epsilon=8.0))
    site = SiteSettings.from_node_config({"partition-id": 0}, fed)
    assert not site.privacy.secure_rng
    deployed = SiteSettings.from_node_config({"data-path": "a.npz", "dp-epsilon": 8.0}, fed)
    assert deployed.privacy.secure_rng


# --- finding 5: the site owns its privacy settings ----------------------------------------------


def test_the_run_configs_privacy_values_do_not_reach_a_deployed_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A coordinator's dp-noise-multiplier = 0.1 (and a larger clip norm, another accountant, a larger
    budget) leaves the site's noise, clip norm, accountant and charge exactly as its own config gives them.

    Unchecked, the deployed site would take dp-noise-multiplier, dp-clip-norm and dp-accountant from the
    run config whenever its node config did not set them.
    """
    site_dir = write_site(tmp_path)
    coordinator = {
        "dp": True,
        "dp-noise-multiplier": 0.1,
        "dp-clip-norm": 20.0,
        "dp-accountant": "rdp",
        "dp-epsilon": 500.0,
    }
    run_config = site_run_config(tmp_path, num_rounds=3, **coordinator)
    node = _deployed_node(site_dir)
    with caplog.at_level(logging.WARNING, logger="fedshift.client.site"):
        reply = _call_deployed(make_client_app(), _train_message(1), node, run_config)
    assert STATUS_KEY not in reply.content.config_records, reply.content.config_records
    # the reference: what the site's own settings plan for this round, on a fresh ledger
    own = PrivacyConfig(enabled=True, epsilon=8.0, secure_rng=True)
    fed = FederationConfig.from_run_config(run_config)
    reference = plan_round(
        own,
        PrivacyLedger.at(tmp_path / "reference"),
        num_examples=60,
        train=fed.train,
        run_id="1",
        server_round=1,
        num_rounds=3,
    )
    ledger = PrivacyLedger.at(site_dir)
    assert ledger.accountant == "prv"
    [entry] = ledger.entries
    assert entry.noise_multiplier == pytest.approx(reference.noise_multiplier, abs=1e-12)
    assert entry.noise_multiplier > 0.9  # nowhere near the coordinator's 0.1
    privacy = reply.content.config_records["privacy"]
    assert privacy["noise-multiplier"] == entry.noise_multiplier  # what DP-SGD ran with
    assert (privacy["clip-norm"], privacy["accountant"], privacy["secure-rng"]) == (1.0, "prv", True)
    assert privacy["budget-epsilon"] == 8.0
    opacus = PRVAccountant()
    opacus.history = ledger.history()
    assert entry.epsilon == pytest.approx(opacus.get_epsilon(1e-5), abs=1e-6)
    ignored = [r.getMessage() for r in caplog.records if "ignoring the run config" in r.getMessage()]
    assert len(ignored) == 1  # once, however often the settings are read
    for value in ("dp-noise-multiplier=0.1", "dp-clip-norm=20.0", "dp-accountant='rdp'", "dp-epsilon=500.0"):
        assert value in ignored[0]


def test_rounds_out_of_order_or_beyond_the_run_are_refused_without_a_charge(tmp_path: Path) -> None:
    """Round 7 of a 5-round run, a repeated and an earlier round: refused, nothing charged, no data read.

    Unchecked, round 7 of 5 would be trained and charged, with noise planned for one remaining
    round (the run's whole allowance at once).
    """
    site_dir = write_site(tmp_path)
    run_config = site_run_config(tmp_path, num_rounds=5)
    node = _deployed_node(site_dir)
    app = make_client_app()
    first = _call_deployed(app, _train_message(2), node, run_config)  # a resumed run may start later
    assert ARRAYS_KEY in first.content.array_records
    charged = _ledger_bytes(site_dir)
    assert [e.round for e in PrivacyLedger.at(site_dir).entries] == [2]
    refused = {
        7: "Expected a training round in 1..5",
        0: "Expected a training round in 1..5",
        2: "to come after round 2",
        1: "to come after round 2",
    }

    def check(server_round: int) -> None:
        reply = _call_deployed(app, _train_message(server_round), node, run_config)
        assert reply.has_content(), reply.error
        status = reply.content.config_records[STATUS_KEY]
        assert status["status"] == STATUS_ROUND_REFUSED
        assert refused[server_round] in str(status["reason"]) and "nothing charged" in str(status["reason"])
        assert not reply.content.array_records and not reply.content.metric_records
        assert _ledger_bytes(site_dir) == charged

    check(7)  # with the site's data in place
    (site_dir / "data.npz").rename(site_dir / "elsewhere.npz")  # reading the data would now fail
    for server_round in refused:
        check(server_round)


# the coordinator's attempt at the noise of the releases besides DP-SGD: all far below fedshift's defaults
LOW_RELEASE_NOISE = {
    "ls-count-noise-multiplier": 0.01,
    "align-noise-multiplier": 0.01,
    "align-clip": 100.0,
    "ewc-fisher-noise-multiplier": 0.01,
    "ewc-fisher-clip": 100.0,
}
RELEASE_RUN = {"ls-correction": True, "align-weight": 1.0, "align-dim": 8, "ewc-consolidate": True}


def _statistics_message(server_round: int) -> Message:
    config = ConfigRecord({STAGE_KEY: STAGE_RELEASE, "server-round": server_round})
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    return Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), dst_node_id=0, message_type="query")


def _fisher_message(server_round: int) -> Message:
    arrays = ArrayRecord(build_model(MODEL).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=FISHER_MESSAGE)


def test_the_run_configs_release_noise_does_not_reach_a_deployed_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ls-count-noise-multiplier, align-noise-multiplier, ewc-fisher-noise-multiplier (and the clip
    norms) of 0.01 / 100 in the run config: a deployed site charges and draws its label counts, moments
    and end-of-run Fisher with its own values (fedshift's defaults, or its node config's), and logs
    what it ignored; a simulated site keeps taking them from the run config.

    Before, a deployed site took them from the run config: the ledger showed noise 0.01, i.e. nearly
    exact label counts and Fisher, charged to the site's budget.
    """
    site_dir = write_site(tmp_path)
    run_config = site_run_config(tmp_path, num_rounds=2, **RELEASE_RUN, **LOW_RELEASE_NOISE)
    node = _deployed_node(site_dir, **{"ls-count-noise-multiplier": 4.0})  # the site's own choice
    app = make_client_app()
    with caplog.at_level(logging.WARNING, logger="fedshift.client.site"):
        released = _call_deployed(app, _statistics_message(0), node, run_config)
        fisher = _call_deployed(app, _fisher_message(3), node, run_config)
    assert STATISTICS_KEY in released.content.config_records, released.content.config_records
    assert FISHER_KEY in fisher.content.array_records, fisher.content.config_records
    noise = {e.mechanism: e.noise_multiplier for e in PrivacyLedger.at(site_dir).entries}
    assert noise == {"dp-label-counts": 4.0, "dp-moments": 3.0, "dp-fisher": 5.0}
    assert fisher.content.config_records[PRIVACY_KEY]["noise-multiplier"] == 5.0
    ignored = [r.getMessage() for r in caplog.records if "ignoring the run config" in r.getMessage()]
    assert len(ignored) == 1
    for key, value in LOW_RELEASE_NOISE.items():
        assert f"{key}={value!r}" in ignored[0]
    # simulation: the run config's values, as before (a site.toml may set its own)
    sim = SiteSettings.from_node_config({"partition-id": 0}, FederationConfig.from_run_config(run_config))
    fed = sim.federation(FederationConfig.from_run_config(run_config))
    assert (fed.shift.count_noise, fed.shift.align_noise, fed.ewc.fisher_noise_multiplier) == (
        0.01,
        0.01,
        0.01,
    )
    (site_dir / "site.toml").write_text("align-noise-multiplier = 6.0\n")
    sim = SiteSettings.from_node_config({"partition-id": 0}, FederationConfig.from_run_config(run_config))
    assert sim.federation(fed).shift.align_noise == 6.0
    # a deployed site's own value is checked like the run config's
    with pytest.raises(PrivacyError, match="ls-count-noise-multiplier"):
        SiteSettings.from_node_config({**node, "ls-count-noise-multiplier": 0}, fed)


def test_statistics_and_fisher_releases_outside_the_run_are_refused_without_a_charge(tmp_path: Path) -> None:
    """The statistics stage at round 7 of a 2-round run, a refresh at an earlier round than the last, and
    the end-of-run Fisher at any round but num-server-rounds + 1: refused, nothing charged, no data read.

    Before, each new round number was charged: release rounds 7, 1 after 2, and a Fisher at round 1
    each spent the site's budget on a fresh draw.
    """
    site_dir = write_site(tmp_path)
    run_config = site_run_config(tmp_path, num_rounds=2, **RELEASE_RUN)
    node = _deployed_node(site_dir)
    app = make_client_app()
    for server_round in (0, 2):  # the stage before round 1 and the refresh before round 2
        reply = _call_deployed(app, _statistics_message(server_round), node, run_config)
        assert STATISTICS_KEY in reply.content.config_records, reply.content.config_records
    charged = _ledger_bytes(site_dir)
    assert [(e.round, e.mechanism) for e in PrivacyLedger.at(site_dir).entries] == [
        (0, "dp-label-counts"),
        (0, "dp-moments"),
        (2, "dp-moments"),
    ]

    def refused(msg: Message, needle: str) -> None:
        reply = _call_deployed(app, msg, node, run_config)
        assert reply.has_content(), reply.error
        status = reply.content.config_records[STATUS_KEY]
        assert status["status"] == STATUS_ROUND_REFUSED, status
        assert needle in str(status["reason"]) and "nothing charged" in str(status["reason"])
        assert STATISTICS_KEY not in reply.content.config_records and not reply.content.array_records
        assert _ledger_bytes(site_dir) == charged

    refused(_statistics_message(7), "Expected a moment release in 0..2")
    refused(_fisher_message(1), "Expected a consolidation Fisher release at round 3")
    refused(_fisher_message(7), "at round 3")
    (site_dir / "data.npz").rename(site_dir / "elsewhere.npz")  # reading the data would now fail
    refused(_statistics_message(1), "to come after round 2")
    refused(_fisher_message(2), "at round 3")


def test_a_site_without_a_fixed_noise_or_per_run_cap_is_warned_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No dp-noise-multiplier and no dp-epsilon-per-run: a one-round run could spend the whole budget,
    so ``fedshift client`` warns at start and names dp-epsilon-per-run (not required). Before: silent."""
    with caplog.at_level(logging.WARNING, logger="fedshift.deploy.client"):
        check_site(ClientSettings.load(_site_toml(tmp_path / "open")))
        warned = [r.getMessage() for r in caplog.records if "dp-epsilon-per-run" in r.getMessage()]
        assert len(warned) == 1 and "num-server-rounds" in warned[0]
        caplog.clear()
        check_site(ClientSettings.load(_site_toml(tmp_path / "capped", **{"dp-epsilon-per-run": 2.0})))
        check_site(ClientSettings.load(_site_toml(tmp_path / "fixed", **{"dp-noise-multiplier": 1.1})))
    assert not [r for r in caplog.records if "dp-epsilon-per-run" in r.getMessage()]


def test_the_daemon_refuses_seeded_noise_with_the_client_apps_own_rule(tmp_path: Path) -> None:
    """One check of dp-secure-rng = false: the daemon's start check raises the ClientApp's words.
    Before, the daemon had its own text ("Expected [site] dp-secure-rng in ... to be true")."""
    path = _site_toml(tmp_path, **{"dp-secure-rng": False})
    node = _deployed_node(tmp_path, **{"dp-secure-rng": False})
    with pytest.raises(PrivacyError) as own:
        SiteSettings.from_node_config(node, FederationConfig())
    with pytest.raises(ConfigError) as daemon:
        check_site(ClientSettings.load(path))
    assert str(own.value) in str(daemon.value) and str(path) in str(daemon.value)


def test_the_per_run_cap_bounds_each_run_and_the_lifetime_budget_all_of_them(tmp_path: Path) -> None:
    """dp-epsilon-per-run = 2 with a lifetime budget of 2.5: the first run is sized to the cap, the next
    one to what is left of the lifetime budget; every number against a fresh Opacus RDP accountant."""
    privacy = PrivacyConfig(enabled=True, epsilon=2.5, epsilon_per_run=2.0)
    ledger = PrivacyLedger.at(tmp_path)
    train = TrainConfig(batch_size=50)  # q = 0.1, 10 steps per round on 500 images

    def run(run_id: str, rounds: int) -> float:
        sigma = 0.0
        for rnd in range(1, rounds + 1):
            dp = plan_round(
                privacy,
                ledger,
                num_examples=500,
                train=train,
                run_id=run_id,
                server_round=rnd,
                num_rounds=rounds,
            )
            sigma = dp.noise_multiplier
            charge = [Release("dp-sgd", dp.cost)]
            reserve(privacy, ledger, run_id=run_id, server_round=rnd, charges=charge, what=f"round {rnd}")
        return sigma

    def opacus(history: list[tuple[float, float, int]]) -> float:
        """A fresh Opacus PRV accountant's epsilon (the default; equal consecutive (sigma, q) merged)."""
        merged: list[tuple[float, float, int]] = []
        for sigma, q, steps in history:
            if merged and merged[-1][:2] == (sigma, q):
                merged[-1] = (sigma, q, merged[-1][2] + steps)
            else:
                merged.append((sigma, q, steps))
        accountant = PRVAccountant()
        accountant.history = merged
        return float(accountant.get_epsilon(1e-5))

    sigma_a = run("a", 4)
    run_a = [(sigma_a, 0.1, 10)] * 4
    assert 2.0 - 0.05 < opacus(run_a) <= 2.0  # the cap binds: the run uses (almost) all of it
    assert opacus([(sigma_a - 2e-3, 0.1, 10)] * 4) > 2.0  # and the noise is the smallest that fits
    assert ledger.epsilon(1e-5) == pytest.approx(opacus(run_a), abs=1e-6)

    sigma_b = run("b", 4)  # two runs at the cap would pass 2.5 (2.76): now the lifetime budget binds
    assert sigma_b > sigma_a
    assert opacus([(sigma_b, 0.1, 10)] * 4) < 2.0
    assert 2.5 - 0.05 < opacus([*run_a, *[(sigma_b, 0.1, 10)] * 4]) <= 2.5
    assert ledger.epsilon(1e-5) == pytest.approx(opacus(ledger.history()), abs=1e-6)

    # a site with its own fixed noise multiplier: the cap stops the run where it would pass 2
    fixed = PrivacyConfig(enabled=True, epsilon=100.0, epsilon_per_run=2.0, noise_multiplier=2.0)
    other = PrivacyLedger.at(tmp_path / "fixed")
    fits = max(k for k in range(1, 40) if opacus([(2.0, 0.1, 10)] * k) <= 2.0)
    for rnd in range(1, fits + 1):
        dp = plan_round(
            fixed, other, num_examples=500, train=train, run_id="c", server_round=rnd, num_rounds=40
        )
        assert dp.cost == (2.0, 0.1, 10)
        reserve(
            fixed, other, run_id="c", server_round=rnd, charges=[Release("dp-sgd", dp.cost)], what="a round"
        )
    with pytest.raises(BudgetExhaustedError, match="dp-epsilon-per-run=2"):  # and nothing is charged
        reserve(
            fixed, other, run_id="c", server_round=fits + 1, charges=[Release("dp-sgd", dp.cost)], what="r"
        )
    assert len(other.entries) == fits
    # a new run gets its own cap; other releases (statistics, Fisher) are held to the same caps
    check_allowance(fixed, other, run_id="d", planned=[dp.cost], what="round 1")
    with pytest.raises(BudgetExhaustedError, match="per-run cap"):
        check_allowance(fixed, other, run_id="c", planned=[(5.0, 1.0, 1)], what="the statistics")
    after = check_allowance(fixed, other, run_id="d", planned=[(5.0, 1.0, 1)], what="the statistics")
    assert after == pytest.approx(epsilon([*other.history(), (5.0, 1.0, 1)], 1e-5), abs=1e-9)


def test_the_per_run_cap_is_a_site_setting(tmp_path: Path) -> None:
    node = {"data-path": "a.npz", "dp-epsilon": 8.0, "dp-epsilon-per-run": 2}
    assert SiteSettings.from_node_config(node, FederationConfig()).privacy.run_cap == 2.0
    for bad in (0, -1.0, "lots", "2.5"):  # one strictness: text is not a number, even text that reads as one
        with pytest.raises(PrivacyError, match="dp-epsilon-per-run"):
            SiteSettings.from_node_config({**node, "dp-epsilon-per-run": bad}, FederationConfig())
    # simulation: a site's own site.toml, like a deployed node config; the run config's 0 = no cap
    fed = FederationConfig(sites_root=str(tmp_path), privacy=PrivacyConfig(enabled=True, epsilon=8.0))
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "site.toml").write_text("dp-epsilon-per-run = 1.5\n")
    assert SiteSettings.from_node_config({"partition-id": 1}, fed).privacy.run_cap == 1.5
    assert SiteSettings.from_node_config({"partition-id": 0}, fed).privacy.run_cap is None
    assert FederationConfig.from_run_config({"dp-epsilon-per-run": 0.0}).privacy.run_cap is None
    assert FederationConfig.from_run_config({"dp-epsilon-per-run": 3.0}).privacy.run_cap == 3.0


def test_site_config_checks_of_the_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The per-run cap's type, and an accountant other than the one the site's ledger is kept with."""
    path = _site_toml(tmp_path, **{"dp-epsilon-per-run": "two"})
    one_line_error(
        main(["client", "--config", str(path), "--check"]),
        capsys.readouterr().err,
        "dp-epsilon-per-run",
        "without quotes",
    )
    path = _site_toml(tmp_path, **{"dp-epsilon-per-run": 2.0})
    assert main(["client", "--config", str(path), "--check"]) == 0
    capsys.readouterr()
    # the site's ledger, started with rdp (the default before prv)
    ledger = PrivacyLedger.at(tmp_path / "state", accountant="rdp")
    ledger.charge(
        run_id="1", round=1, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=1e-5
    )
    path = _site_toml(tmp_path)  # the default accountant (prv) now: refused, naming the ledger's own
    one_line_error(
        main(["client", "--config", str(path), "--check"]),
        capsys.readouterr().err,
        "dp-accountant",
        "'rdp'",
        'set dp-accountant = "rdp"',
    )


# --- finding 7f: upper limits of the run config ---------------------------------------------------


@pytest.mark.parametrize("key", sorted(RUN_CONFIG_MAXIMUM))
def test_every_workload_key_has_a_maximum(key: str) -> None:
    most = RUN_CONFIG_MAXIMUM[key]
    FederationConfig.from_run_config({key: most})  # the maximum itself is allowed
    with pytest.raises(ConfigError) as info:
        FederationConfig.from_run_config({key: most + 1})
    message = str(info.value)
    assert "\n" not in message
    for needle in (f"run-config {key!r}", f"at most {most}", f"got {most + 1}", "lower it"):
        assert needle in message


def test_the_workload_keys_are_the_ones_that_cost_a_site() -> None:
    costly = {
        "num-server-rounds",
        "local-epochs",
        "batch-size",
        "image-size",
        "num-classes",
        "adapter-rank",
        "ewc-fisher-samples",
        "ls-bootstrap",
        "align-dim",
    }
    assert set(RUN_CONFIG_MAXIMUM) == costly
    defaults = FederationConfig().to_run_config()
    assert all(defaults[key] <= most for key, most in RUN_CONFIG_MAXIMUM.items())


def test_a_site_refuses_a_run_config_over_a_maximum_before_training(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    run_config = site_run_config(tmp_path, **{"local-epochs": 1000})
    needle = "'local-epochs' to be at most 20, but got 1000"
    _assert_no_reply(make_client_app(), _train_message(1), _deployed_node(site_dir), run_config, needle)
    assert _ledger_bytes(site_dir) is None
