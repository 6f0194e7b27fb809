"""The wire vocabulary between the ServerApp and the ClientApp: every name both sides must agree on.

Record keys, the fields of the records, mechanism names, status (refusal) kinds, message-type
suffixes, metric names, the typed privacy report a site sends with each release, and the few
helpers that read or build those records (:func:`round_of`, :func:`split_of`, :func:`refusal`).
No other module spells one of these strings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedshift.common.errors import BudgetExhaustedError, RoundRefusedError

ARRAYS_KEY = "arrays"  # ArrayRecord: the shared adapter tensors (and nothing else)
METRICS_KEY = "metrics"  # MetricRecord: aggregate metrics of one site
CONFIG_KEY = "config"  # ConfigRecord: the server's round config
SITE_KEY = "site"  # ConfigRecord: the site's display name (configuration, not patient data)
WEIGHT_KEY = "num-examples"  # metric used as the FedAvg weight
PRIVACY_KEY = "privacy"  # ConfigRecord: the mechanism that protected the arrays, and the site's accounting
ANCHOR_KEY = "ewc-anchor"  # ArrayRecord: a consolidated EWC anchor the server sends with training messages
FISHER_KEY = "ewc-fisher"  # ArrayRecord: a diagonal Fisher (a site's release, or the consolidated one)
STATUS_KEY = "status"  # ConfigRecord: why a site sends no update this time (budget-exhausted, blocked, ...)
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"  # the site's privacy budget cannot pay for this release
STATUS_BLOCKED = "blocked"  # the egress guard blocked an item of the reply
STATUS_ROUND_REFUSED = "round-refused"  # a training round out of order or past num-server-rounds (no charge)
SPLIT_KEY = "split"  # config of an evaluate message: the split the server asks for (val, test)
STATUS_SPLIT_NOT_ALLOWED = "split-not-allowed"  # an evaluate split outside the site's eval-splits (no train)
STATUS_STATISTICS_LOST = "statistics-lost"  # statistics charged but their release is gone: none are sent
# Error reasons of a site's error replies (Flower's Error.reason): fixed words, never text from the site
APP_REFUSED = "app-refused: this site runs only its installed, approved fedshift app"  # a run's FAB refused
SITE_ERROR = "site-error: the site's ClientApp failed; the details stay in the site's log"  # an exception
# Mechanisms: what protected a release (a privacy record's "mechanism", a ledger entry's mechanism)
MECHANISM_DP_SGD = "dp-sgd"  # adapters trained by DP-SGD (a Poisson-subsampled Gaussian)
MECHANISM_DP_FISHER = "dp-fisher"  # a DP release of the EWC Fisher diagonal
MECHANISM_DP_LABEL_COUNTS = "dp-label-counts"  # the site's training label counts (Gaussian mechanism)
MECHANISM_DP_MOMENTS = "dp-moments"  # first and second moments of the site's projected features
MECHANISM_NONE = "none"  # dp=false at this site: nothing protected the release
MECHANISM_PUBLIC = "public"  # a Fisher estimated on public (synthetic) images: no private data
MECHANISM_UNIT = "unit"  # a Fisher of ones (F = 1): no data at all
# Record fields, message-type suffixes and statistics keys the server reads
SERVER_ROUND_KEY = "server-round"  # config of every server message: the federation's round
SITE_NAME_FIELD = "name"  # the site record's field: the name the site claims
STATUS_FIELD = "status"  # the status record's field: the kind (a STATUS_* value)
REASON_FIELD = "reason"  # the status record's field: why, in the site's words
STATUS_REFUSED = "refused"  # a release the site refuses for a reason of its own (the default kind)
MECHANISM_FIELD = "mechanism"  # a privacy record's field: the mechanism (a MECHANISM_* value)
FISHER_SOURCE_FIELD = "ewc-fisher"  # a privacy record's field: where the round's or reply's Fisher came from
UNDECLARED = "undeclared"  # what the server records for a privacy field a reply does not declare
FISHER_QUERY = "fisher"  # message-type suffix of the end-of-phase Fisher query ("query.fisher")
LABEL_COUNTS_KEY = "label-counts"  # statistics release: the site's noisy training label counts
MOMENT_SUM_KEY = "moment-sum"  # statistics release: per-class sums of the projected features
MOMENT_OUTER_KEY = "moment-outer"  # statistics release (CORAL): the sum of feature outer products
MOMENT_SQUARE_KEY = "moment-square"  # statistics release (prototype): per-class sums of squared norms
SPLIT_VAL = "val"  # the split the server asks for after every round (validation)
SPLIT_TEST = "test"  # the split of the final evaluation
# Metric names a site's replies carry (the egress guard lets only those the site allows leave)
SAMPLES_PER_SECOND_KEY = "samples-per-second"  # training: throughput, not a statistic of the data
AUC_KEY, ACCURACY_KEY, BALANCED_ACCURACY_KEY = "auc", "accuracy", "balanced-accuracy"
LOG_LOSS_KEY, ECE_KEY = "log-loss", "ece"  # ECE: expected calibration error
EVALUATION_METRICS = (AUC_KEY, ACCURACY_KEY, BALANCED_ACCURACY_KEY, LOG_LOSS_KEY, ECE_KEY)
# label-shift correction and domain alignment: the same metrics of the corrected / adapted predictions
# (cal = calibrated, ls = prior-corrected, oracle = corrected with the split's true prior,
# tta = test-time-adapted norms), and whether the correction fell back
SHIFT_VARIANTS = ("cal", "ls", "oracle", "tta", "tta-ls")
CALIBRATED, CORRECTED, ORACLE, ADAPTED, ADAPTED_CORRECTED = SHIFT_VARIANTS  # metric-name prefixes
THRESHOLD_ACCURACY_KEY = "thr-accuracy"  # accuracy at the site's chosen decision threshold
THRESHOLD_BALANCED_ACCURACY_KEY = "thr-balanced-accuracy"  # balanced accuracy at that threshold
SHIFT_FALLBACK_KEY = "ls-fallback"  # 1 when the site's prior estimate was rejected (no correction)
COUNT_KEY = "n"  # the number of images an evaluation reply was computed on
SHIFT_METRICS = frozenset(
    {
        *(f"{v}-{m}" for v in SHIFT_VARIANTS for m in EVALUATION_METRICS),
        THRESHOLD_ACCURACY_KEY,
        THRESHOLD_BALANCED_ACCURACY_KEY,
        SHIFT_FALLBACK_KEY,
    }
)
# every metric fedshift's replies carry: the FedAvg weight (the size of the split used; public under
# DP-SGD's accounting), the throughput (no training loss: it leaves no site), and the evaluation of the
# splits in eval-splits (once per run, round and split; WITHOUT DP), with the number of images "n"
DEFAULT_METRICS = frozenset(
    {WEIGHT_KEY, SAMPLES_PER_SECOND_KEY, *EVALUATION_METRICS, COUNT_KEY} | SHIFT_METRICS
)


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy record a site sends with a release: what protected it, and the site's accounting.

    ``to_record`` writes the fields that are set, in this order, under their wire names.
    """

    mechanism: str  # a MECHANISM_* value
    epsilon: float | None = None  # the site's lifetime epsilon after this release
    delta: float | None = None
    budget_epsilon: float | None = None  # the site's lifetime budget dp-epsilon
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    accountant: str | None = None
    secure_rng: bool | None = None
    ewc_fisher: str | None = None  # where the EWC Fisher came from (FISHER_SOURCE_FIELD)

    def to_record(self) -> dict[str, bool | float | int | str]:
        """The record's fields under their wire names (``noise_multiplier`` -> ``noise-multiplier``)."""
        out: dict[str, bool | float | int | str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyReport:
        """Parse a privacy record; a missing mechanism or an unknown field is a one-line ValueError."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in record if k not in names)
        if unknown or MECHANISM_FIELD not in record:
            raise ValueError(
                f"Expected a privacy record with a {MECHANISM_FIELD!r} and only the fields {sorted(names)}, "
                f"but got {sorted(str(k) for k in record)}; the server and the site run different versions"
            )
        return cls(**{names[k]: v for k, v in record.items()})


def round_of(msg: Message) -> int:
    """The message's ``server-round`` (0 when it names none); :class:`RoundRefusedError` when it is not a
    whole number (a string, a bool, NaN, inf, 2.5): the guard refuses such a message before site code runs."""
    config = msg.content.config_records.get(CONFIG_KEY)
    value = config.get(SERVER_ROUND_KEY, 0) if config is not None else 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise RoundRefusedError(
        f"Expected server-round to be a whole number (1, 2, ...), but got {repr(value)[:40]}; "
        "the server must send the round it runs"
    )


def split_of(msg: Message) -> str:
    """The split an evaluate message asks for (``val`` when it names none)."""
    config = msg.content.config_records.get(CONFIG_KEY)
    return str(config.get(SPLIT_KEY, SPLIT_VAL)) if config is not None else SPLIT_VAL


def site_record(site: str) -> ConfigRecord:
    """The record that names the replying site."""
    return ConfigRecord({SITE_NAME_FIELD: site})


def refusal(msg: Message, site: str, status: str, reason: str) -> Message:
    """A reply that says why this site sends nothing this time."""
    content = RecordDict(
        {SITE_KEY: site_record(site), STATUS_KEY: ConfigRecord({STATUS_FIELD: status, REASON_FIELD: reason})}
    )
    return Message(content, reply_to=msg)


def refusal_for(msg: Message, site: str, exc: RoundRefusedError | BudgetExhaustedError) -> Message:
    """The refusal of a release the site's ledger does not allow: out of order, or over the budget."""
    status = STATUS_ROUND_REFUSED if isinstance(exc, RoundRefusedError) else STATUS_BUDGET_EXHAUSTED
    return refusal(msg, site, status, str(exc))


PRIVACY_FIELDS = frozenset(f.name.replace("_", "-") for f in fields(PrivacyReport))  # a record's wire names

FINAL_MODEL_QUERY = "final_model"  # message-type suffix of the final-model stage ("query.final_model")
NUM_SITES_KEY = "num-sites"  # config of the final-model stage: how many sites took part in the run

# Secure aggregation (SecAgg+): the three query stages around a training round, and their records
SECAGG_SETUP_QUERY = "secagg_setup"  # message-type suffix: a site makes its round keys, sends the public ones
SECAGG_SHARE_QUERY = "secagg_share"  # a site secret-shares its self-mask seed and key among its neighbours
SECAGG_UNMASK_QUERY = "secagg_unmask"  # a site reveals the shares that unmask the survivors' sum
SECAGG_KEY = "secagg"  # ConfigRecord: one stage's protocol data (public keys, sealed shares, node lists)
SECAGG_MASKED_KEY = "secagg-masked"  # ArrayRecord of a training reply: the masked update (uint32 field)
SECAGG_MASKED_FIELD = "masked"  # its one array
SECAGG_NODES_FIELD = "nodes"  # node ids (as strings: they do not fit a signed int64) of the lists below
SECAGG_C_KEYS_FIELD = "c-keys"  # X25519 public keys that seal the shares, one per node
SECAGG_S_KEYS_FIELD = "s-keys"  # X25519 public keys of the pairwise masks, one per node
SECAGG_SEALED_FIELD = "sealed"  # AES-GCM sealed shares, one per node (to it, or from it)
SECAGG_U1_FIELD = "u1"  # the sites whose shares the server routed: each masks against these only
SECAGG_SURVIVORS_FIELD = "survivors"  # the sites whose masked updates arrived
SECAGG_DROPPED_FIELD = "dropped"  # the sites that shared but sent no masked update
SECAGG_SHARES_FIELD = "shares"  # the revealed shares, one per node of SECAGG_NODES_FIELD
SECAGG_WEIGHT_SCALE_FIELD = "weight-scale"  # the round's total num-examples: each site scales by its share


def secagg_nodes(record: ConfigRecord, field: str) -> list[int]:
    """A node list of a secure-aggregation record (node ids travel as strings)."""
    values: Any = record.get(field, [])
    return [int(str(n)) for n in values]


def secagg_node_field(nodes: Any) -> list[str]:
    """Node ids as a secure-aggregation record carries them."""
    return [str(n) for n in nodes]


def secagg_bytes(record: ConfigRecord, field: str) -> list[bytes]:
    """A list of byte strings (keys, sealed or revealed shares) of a secure-aggregation record."""
    values: Any = record.get(field, [])
    return [bytes(v) for v in values]
