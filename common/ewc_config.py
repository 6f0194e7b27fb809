"""EWC settings of a site (EWCConfig) and their registries, declared once per ``ewc-*`` run-config key."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedshift.common.errors import PrivacyError
from fedshift.common.settings import (
    Setting,
    check_fields,
    check_known,
    check_value,
    keys_of,
    setting,
    setting_of,
    to_run_config,
    with_values,
)

# fisher_source -> where the Fisher diagonal comes from
FISHER_SOURCES: dict[str, str] = {
    "dp": "estimated on the site's private data under DP and charged to the ledger",
    "public": "estimated on public or synthetic data (no privacy cost)",
    "none": "no estimate: F = 1 everywhere (a plain L2 pull towards the anchor)",
}
# anchor -> which parameters the penalty pulls towards
ANCHORS: dict[str, str] = {
    "global": "the global adapters received this round",
    "consolidated": "parameters consolidated at the end of an earlier phase",
}
# labels -> how the Fisher's expectation over the model's predictive distribution is taken
LABEL_MODES: dict[str, str] = {
    "expected": "exact sum over the classes, weighted by p(y|x)",
    "sampled": "one label per image drawn from p(y|x) (Monte Carlo, seeded)",
}

_LAMBDA_FIX = "set ewc-lambda to a finite number such as 100.0, or to 0 to turn EWC off"


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(key: str, value: object, choices: Mapping[str, str]) -> None:
    """Refuse a ``value`` of the argument ``key`` that is not a name in the registry ``choices``."""
    check_value(Setting(key, str, next(iter(choices)), key, choices=choices), value, source="")


@dataclass(frozen=True)
class EWCConfig:
    """EWC at a site: how strong the pull is, towards what, and where the Fisher comes from."""

    lam: float = setting(
        "ewc-lambda", 0.0, help="EWC penalty strength lambda; 0 = EWC off", minimum=0, fix=_LAMBDA_FIX
    )
    fisher_source: str = setting(
        "ewc-fisher-source", "dp", help="where the Fisher diagonal comes from", choices=FISHER_SOURCES
    )
    fisher_samples: int = setting(
        "ewc-fisher-samples", 512, help="images of one Fisher estimate", minimum=1, maximum=10_000, cap=True
    )
    fisher_clip: float = setting(
        "ewc-fisher-clip",
        1.0,
        help="dp: L2 bound of each image's squared-gradient vector (the sensitivity)",
        above=0,
    )
    fisher_noise_multiplier: float = setting(
        "ewc-fisher-noise-multiplier",
        5.0,
        help="dp: Gaussian noise std / ewc-fisher-clip, added to the sum",
        minimum=0,
    )
    fisher_labels: str = setting(
        "ewc-fisher-labels",
        "expected",
        help="how the Fisher's expectation over labels is taken",
        choices=LABEL_MODES,
    )
    anchor: str = setting("ewc-anchor", "global", help="what the penalty pulls towards", choices=ANCHORS)
    consolidate: bool = setting(
        "ewc-consolidate",
        False,
        help="after the last round, gather every site's Fisher at the final adapters",
    )

    KEYS: ClassVar[dict[str, str]]  # run-config / node-config key -> field (from the declarations)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.enabled and self.fisher_source == "dp" and self.fisher_noise_multiplier == 0:
            raise PrivacyError(
                "Expected ewc-fisher-noise-multiplier > 0 for a Fisher estimated on private data, but got 0 "
                "(it would leak patient data through the penalty); set it (e.g. 5.0), or use "
                "ewc-fisher-source='public' or 'none'"
            )

    @property
    def enabled(self) -> bool:
        return self.lam > 0

    @property
    def spends_privacy(self) -> bool:
        """True when each round's Fisher estimate is a DP release the ledger must charge.

        A consolidated anchor comes with its Fisher from the server: nothing to estimate.
        """
        return self.enabled and self.fisher_source == "dp" and self.anchor == "global"

    @property
    def consolidation_spends_privacy(self) -> bool:
        """True when the end-of-run Fisher (``ewc-consolidate``) is a DP release the ledger must charge."""
        return self.consolidate and self.fisher_source == "dp"

    def with_values(self, values: Mapping[str, Any]) -> EWCConfig:
        """A copy with the ``ewc-*`` keys present in ``values`` applied; unknown ``ewc-*`` keys refused."""
        check_known([k for k in values if k.startswith("ewc-")], self.KEYS)
        return with_values(self, values)  # type: ignore[no-any-return]

    def to_run_config(self) -> dict[str, int | float | str]:
        return to_run_config(self)


EWCConfig.KEYS = keys_of(EWCConfig)


def check_lambda(lam: object) -> float:
    """``lam`` as a float, or :class:`ConfigError` when it is not a finite number >= 0 (ewc-lambda)."""
    return float(check_value(setting_of(EWCConfig, "ewc-lambda"), lam))
