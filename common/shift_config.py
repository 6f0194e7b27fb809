"""Run-config settings of site-side label-shift correction and domain alignment (ShiftConfig).

Both are off by default: turning either on adds a *statistics stage* before
the first round, in which every site releases DP-protected statistics (label
counts, feature moments) that the site's ledger charges; see
:mod:`fedshift.client.correction` and :mod:`fedshift.client.alignment`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedshift.common.errors import PrivacyError
from fedshift.common.settings import check_fields, keys_of, setting, to_run_config, with_values

# ls-prior-method -> what it is
PRIOR_METHODS: dict[str, str] = {
    "em": "maximum likelihood by EM on calibrated probabilities (Saerens et al. 2002)",
    "bbse": "black-box shift estimation from the confusion matrix (Lipton et al. 2018)",
}
# align-loss -> what it is
ALIGN_LOSSES: dict[str, str] = {
    "prototype": "class-conditional: each feature pulled to its class's global mean (DP per-class sums)",
    "coral": "marginal CORAL + mean towards the global moments (DP sums and outer products)",
}
# ls-calibration -> what it is
CALIBRATIONS: dict[str, str] = {
    "bcts": "bias-corrected temperature scaling",
    "ts": "temperature scaling",
    "vs": "vector scaling",
    "none": "no calibration",
}


@dataclass(frozen=True)
class ShiftConfig:
    """Label-shift correction and domain alignment at every site."""

    correction: bool = setting(
        "ls-correction", False, help="correct posteriors for the site's prior at evaluation (DP label counts)"
    )
    prior_method: str = setting(
        "ls-prior-method",
        "em",
        help="how the site's prior is estimated from unlabeled data",
        choices=PRIOR_METHODS,
    )
    calibration: str = setting(
        "ls-calibration",
        "bcts",
        help="calibration fitted on the site's val split, reweighted to its prior",
        choices=CALIBRATIONS,
    )
    prior_pseudocount: float = setting(
        "ls-prior-pseudocount",
        1.0,
        help="EM: Dirichlet pseudo-count per class (MAP; 1 = Laplace, 0 = ML)",
        minimum=0,
    )
    bootstrap: int = setting(
        "ls-bootstrap",
        100,
        help="resamples of the bootstrap interval around the prior; 0 = no interval",
        minimum=0,
        maximum=2000,
        cap=True,
        allowed=lambda n: n != 1,
        what="an integer in [2, 2000] (or 0)",
    )
    min_samples: int = setting(
        "ls-min-samples", 50, help="fewer unlabeled images than this: no correction (said so)", minimum=1
    )
    max_interval_width: float = setting(
        "ls-max-interval-width", 0.5, help="a wider bootstrap interval for a class: no correction", above=0
    )
    threshold: bool = setting(
        "ls-threshold", False, help="also report a per-site decision threshold chosen on the site's val split"
    )
    logit_adjust: float = setting(
        "ls-logit-adjust",
        0.0,
        help="tau of the logit-adjusted training loss towards the global prior; 0 = off",
        minimum=0,
    )
    count_noise: float = setting(
        "ls-count-noise-multiplier",
        2.0,
        help="noise multiplier of the DP label-count release (L2 sensitivity 1)",
        minimum=0,
    )
    align_weight: float = setting(
        "align-weight", 0.0, help="weight of the feature-alignment loss; 0 = off", minimum=0
    )
    align_loss: str = setting(
        "align-loss", "prototype", help="the feature-alignment loss", choices=ALIGN_LOSSES
    )
    align_dim: int = setting(
        "align-dim",
        16,
        help="features are projected on this many fixed random directions before alignment",
        minimum=1,
        maximum=256,
        cap=True,
    )
    align_clip: float = setting(
        "align-clip",
        8.0,
        help="L2 bound of a projected feature in the DP release (~1 at 32 px, ~8 at 64 px)",
        above=0,
    )
    align_noise: float = setting(
        "align-noise-multiplier", 3.0, help="noise multiplier of the DP moment release", minimum=0
    )
    align_refresh: bool = setting(
        "align-refresh", True, help="release moments before every round (they move as adapters train)"
    )
    tta: bool = setting(
        "align-tta",
        False,
        help="also evaluate with norm statistics adapted on the unlabeled evaluation images",
    )

    KEYS: ClassVar[dict[str, str]]  # run-config key -> field (from the declarations)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.needs_counts and self.count_noise <= 0:
            raise PrivacyError(
                "Expected ls-count-noise-multiplier > 0 (label counts are patient data and leave the site "
                "only through the Gaussian mechanism), but got 0; set it, e.g. 2.0"
            )
        if self.align and self.align_noise <= 0:
            raise PrivacyError(
                "Expected align-noise-multiplier > 0 (feature moments leave the site only through the "
                "Gaussian mechanism), but got 0; set it, e.g. 3.0"
            )

    @property
    def align(self) -> bool:
        """The feature-alignment loss is on."""
        return self.align_weight > 0

    @property
    def needs_counts(self) -> bool:
        """Label counts are released: the global prior (correction, logit adjustment) or per-class means."""
        return self.correction or self.logit_adjust > 0 or self.align

    @property
    def refreshes(self) -> bool:
        """The sites release their feature moments again before every round after the first."""
        return self.align and self.align_refresh

    @property
    def needs_statistics(self) -> bool:
        """A statistics stage must run before the first round."""
        return self.needs_counts or self.align

    def with_values(self, values: Mapping[str, Any]) -> ShiftConfig:
        """A copy with the ``ls-*`` / ``align-*`` keys present in ``values`` applied (checked)."""
        return with_values(self, values)  # type: ignore[no-any-return]

    def to_run_config(self) -> dict[str, int | float | str]:
        return to_run_config(self)


ShiftConfig.KEYS = keys_of(ShiftConfig)
