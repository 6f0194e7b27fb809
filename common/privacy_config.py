"""DP-SGD settings of a site (PrivacyConfig), declared once per ``dp-*`` run-config / node-config key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedshift.common.errors import PrivacyError
from fedshift.common.privacy import ACCOUNTANTS, DEFAULT_ACCOUNTANT, MAX_DELTA, check_budget
from fedshift.common.settings import check_fields, keys_of, setting, to_run_config, with_values

_PER_RUN_FIX = (
    "set it to the most one run may spend at this site (e.g. 2.0), or leave it out (the lifetime dp-epsilon "
    "bounds every run)"
)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at a site: whether, how much budget, and how the noise is set.

    The budget (``epsilon``, ``delta``) is the site's *lifetime* budget: the
    ledger adds up every run, and a site refuses to train past it.
    """

    enabled: bool = setting(
        "dp",
        False,
        help="DP-SGD on; deployment turns it on unless the site sets dp=false",
        error=PrivacyError,
    )
    epsilon: float = setting(
        "dp-epsilon",
        math.nan,
        help="lifetime privacy budget epsilon at this site; required with dp (0 in a run config = not set)",
        finite=False,
        unset=0.0,
        sample="8.0",
        error=PrivacyError,
    )
    delta: float = setting(
        "dp-delta", MAX_DELTA, help="delta of the budget; <= 1/n_train and <= 1e-5", error=PrivacyError
    )
    clip_norm: float = setting(
        "dp-clip-norm", 1.0, help="per-sample gradient norm bound C", above=0, error=PrivacyError
    )
    noise_multiplier: float = setting(
        "dp-noise-multiplier",
        0.0,
        help="noise multiplier sigma; 0 = the smallest sigma that fits the budget over the planned rounds",
        minimum=0,
        what="a finite number >= 0 (0 = derive it from the budget)",
        error=PrivacyError,
    )
    accountant: str = setting(
        "dp-accountant",
        DEFAULT_ACCOUNTANT,
        help="Opacus privacy accountant: prv (tight, the default) or rdp",
        choices=ACCOUNTANTS,
        error=PrivacyError,
    )
    secure_rng: bool = setting(
        "dp-secure-rng",
        False,
        help="noise and sampling from the OS CSPRNG (always on in deployment)",
        error=PrivacyError,
    )
    epsilon_per_run: float = setting(
        "dp-epsilon-per-run",
        math.inf,
        help="cap on what one run may spend at this site; 0 in a run config = only the lifetime budget",
        above=0,
        finite=False,
        unset=0.0,
        fix=_PER_RUN_FIX,
        sample="2.0",
        error=PrivacyError,
    )

    KEYS: ClassVar[dict[str, str]]  # run-config / node-config key -> field (from the declarations)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.enabled:
            check_budget(self.epsilon, self.delta)

    @property
    def run_cap(self) -> float | None:
        """The per-run epsilon cap, or ``None`` when only the lifetime budget bounds a run."""
        return self.epsilon_per_run if math.isfinite(self.epsilon_per_run) else None

    def with_values(self, values: Mapping[str, Any], source: str = "run-config") -> PrivacyConfig:
        """A copy with the ``dp-*`` keys present in ``values`` applied (parsed and checked)."""
        return with_values(self, values, source)  # type: ignore[no-any-return]

    def to_run_config(self) -> dict[str, int | float | str]:
        return to_run_config(self)


PrivacyConfig.KEYS = keys_of(PrivacyConfig)
