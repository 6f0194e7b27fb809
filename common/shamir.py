"""Shamir secret sharing over the prime field of p = 2**521 - 1 (Python ints), for secure aggregation.

A secret of up to 64 bytes is the constant term of a random polynomial of degree t - 1; the share of the
holder with node id ``h`` is the polynomial at ``x = h + 1`` (node ids start at 0, and x = 0 is the
secret). Any t shares rebuild the secret by Lagrange interpolation at 0; fewer tell nothing about it.
The coefficients come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from functools import lru_cache

from fedshift.common.errors import FedshiftError

PRIME = 2**521 - 1  # a Mersenne prime: every 64-byte secret and every 64-bit node id fits below it
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: a share's value, big-endian
SECRET_BYTES = 32  # the secrets secure aggregation shares: a self-mask seed, an X25519 private key


class ShamirError(FedshiftError):
    """Shares that cannot rebuild a secret (too few, duplicated, malformed)."""


def _point(holder: int) -> int:
    """The x coordinate of a holder's share: its node id plus one (never 0, the secret's)."""
    if not 0 <= holder < PRIME - 1:
        raise ShamirError(f"Expected a holder node id in [0, 2**521 - 2], but got {holder}")
    return holder + 1


def split(secret: bytes, holders: Collection[int], t: int) -> dict[int, bytes]:
    """``secret`` shared t-of-n among ``holders`` (node ids): holder -> its share (SHARE_BYTES)."""
    if not 2 <= t <= len(holders):
        raise ShamirError(f"Expected a threshold in [2, {len(holders)}] holders, but got t={t}")
    if len(set(holders)) != len(holders):
        raise ShamirError(f"Expected distinct holders, but got {sorted(holders)}")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ShamirError(
            f"Expected a secret of at most 65 bytes below 2**521 - 1, but got {len(secret)} bytes"
        )
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = {}
    for holder in holders:
        x, y = _point(holder), 0
        for a in reversed(coefficients):
            y = (y * x + a) % PRIME
        shares[holder] = y.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=64)
def _lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis polynomials of ``points`` evaluated at 0, mod PRIME (cached: holders repeat)."""
    weights = []
    for i, xi in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def combine(shares: Mapping[int, bytes], t: int, size: int = SECRET_BYTES) -> bytes:
    """The secret (``size`` bytes) from at least ``t`` shares (holder -> share); uses the first t by id."""
    if len(shares) < t:
        raise ShamirError(f"Expected at least t={t} shares to rebuild a secret, but got {len(shares)}")
    chosen = sorted(shares)[:t]
    values = []
    for holder in chosen:
        share = shares[holder]
        if len(share) != SHARE_BYTES or int.from_bytes(share, "big") >= PRIME:
            raise ShamirError(
                f"Expected a {SHARE_BYTES}-byte share below 2**521 - 1 from holder {holder}, "
                f"but got {len(share)} bytes"
            )
        values.append(int.from_bytes(share, "big"))
    weights = _lagrange_at_zero(tuple(_point(h) for h in chosen))
    secret = sum(w * y for w, y in zip(weights, values, strict=True)) % PRIME
    if secret >= 1 << (8 * size):
        raise ShamirError(
            f"Expected shares of a {size}-byte secret, but they rebuild a larger value: a share is corrupt"
        )
    return secret.to_bytes(size, "big")
