"""Run-config settings of site-side label-shift correction and domain alignment (issue 5).

Both are off by default: turning either on adds a *statistics stage* before
the first round, in which every site releases DP-protected statistics (label
counts, feature moments) that the site's ledger charges; see
:mod:`fedshift.client.correction` and :mod:`fedshift.client.alignment`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from fedshift.common.errors import ConfigError, PrivacyError

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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ShiftConfig:
    """Label-shift correction and domain alignment at every site."""

    correction: bool = False  # correct posteriors for the site's prior at evaluation (needs DP label counts)
    prior_method: str = "em"  # em or bbse: how the site's prior is estimated from unlabeled data
    calibration: str = "bcts"  # bcts, ts, vs or none: fitted on the site's val split, reweighted to p_s
    prior_pseudocount: float = 1.0  # EM: Dirichlet pseudo-count per class (MAP; 1 = Laplace, 0 = ML)
    bootstrap: int = 100  # resamples of the bootstrap interval around the prior; 0 = no interval
    min_samples: int = 50  # fewer unlabeled images than this: no correction (said so)
    max_interval_width: float = 0.5  # a wider bootstrap interval for a class: no correction
    threshold: bool = False  # also report a per-site decision threshold chosen on the site's val split
    logit_adjust: float = 0.0  # tau of the logit-adjusted training loss towards the global prior; 0 = off
    count_noise: float = 2.0  # noise multiplier of the DP label-count release (L2 sensitivity 1)
    align_weight: float = 0.0  # weight of the feature-alignment loss; 0 = off
    align_loss: str = "prototype"  # prototype (class-conditional means) or coral (marginal moments)
    align_dim: int = 16  # features are projected on this many fixed random directions before alignment
    align_clip: float = 8.0  # L2 bound of a projected feature in the DP release (~1 at 32 px, ~8 at 64 px)
    align_noise: float = 3.0  # noise multiplier of the DP moment release
    align_refresh: bool = True  # release moments before every round (they move as adapters train)
    tta: bool = False  # also evaluate with norm statistics adapted on the unlabeled evaluation images

    # run-config key -> field
    KEYS: ClassVar[dict[str, str]] = {
        "ls-correction": "correction",
        "ls-prior-method": "prior_method",
        "ls-calibration": "calibration",
        "ls-prior-pseudocount": "prior_pseudocount",
        "ls-bootstrap": "bootstrap",
        "ls-min-samples": "min_samples",
        "ls-max-interval-width": "max_interval_width",
        "ls-threshold": "threshold",
        "ls-logit-adjust": "logit_adjust",
        "ls-count-noise-multiplier": "count_noise",
        "align-weight": "align_weight",
        "align-loss": "align_loss",
        "align-dim": "align_dim",
        "align-clip": "align_clip",
        "align-noise-multiplier": "align_noise",
        "align-refresh": "align_refresh",
        "align-tta": "tta",
    }

    def __post_init__(self) -> None:
        for key, name in self.KEYS.items():
            value = getattr(self, name)
            if name in ("correction", "threshold", "tta", "align_refresh"):
                if not isinstance(value, bool):
                    raise ConfigError(f"Expected {key} to be true or false, but got {value!r}")
            elif name in ("prior_method", "calibration", "align_loss"):
                choices = {"prior_method": PRIOR_METHODS, "calibration": CALIBRATIONS}.get(name, ALIGN_LOSSES)
                if value not in choices:
                    raise ConfigError(
                        f"Expected {key} to be one of {sorted(choices)}, but got {value!r}; "
                        f"use {next(iter(choices))!r}"
                    )
            elif name in ("bootstrap", "min_samples", "align_dim"):
                low = 0 if name == "bootstrap" else 1
                if isinstance(value, float) and value.is_integer():
                    object.__setattr__(self, name, int(value))
                    value = int(value)
                if not _is_int(value) or value < low or (name == "bootstrap" and value == 1):
                    raise ConfigError(
                        f"Expected {key} to be an integer >= {2 if name == 'bootstrap' else low}"
                        f"{' (or 0)' if name == 'bootstrap' else ''}, but got {value!r}"
                    )
            else:
                if not _is_number(value) or not math.isfinite(value) or value < 0:
                    raise ConfigError(f"Expected {key} to be a finite number >= 0, but got {value!r}")
                object.__setattr__(self, name, float(value))
        if self.max_interval_width <= 0 or self.align_clip <= 0:
            raise ConfigError(
                "Expected ls-max-interval-width and align-clip to be > 0, but got "
                f"{self.max_interval_width!r} and {self.align_clip!r}"
            )
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
        """A copy with the ``ls-*`` / ``align-*`` keys present in ``values`` applied."""
        changes = {name: values[key] for key, name in self.KEYS.items() if key in values}
        return replace(self, **changes)

    def to_run_config(self) -> dict[str, int | float | str]:
        return {key: getattr(self, name) for key, name in self.KEYS.items()}
