"""Secure aggregation's building blocks: the round's parameters and SecAgg+'s graph, the stochastic
quantiser into the field of 2**32, and the crypto, all from ``cryptography`` (X25519 key agreement,
HKDF-SHA256, AES-GCM seals for the shares, the ChaCha20 keystream that masks vectors).
:mod:`fedshift.common.secagg` runs the protocol and exports what callers need."""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedshift.common.errors import FedshiftError

MODULUS = 2**32  # the field of the masked vectors: uint32 arithmetic
KEY_BYTES = 32  # raw X25519 keys and seeds
NONCE_BYTES = 12  # AES-GCM
TAG_BYTES = 16  # AES-GCM
_SEAL_INFO = b"fedshift secagg seal"  # HKDF info prefixes: each derived key has one use
_MASK_INFO = b"fedshift secagg pair mask"
_GRAPH_INFO = b"fedshift secagg graph"


def levels(n_max: int) -> int:
    """L = floor((2**32 - 1) / n_max): the quantiser's top level, so that n_max values never wrap."""
    return (MODULUS - 1) // n_max


def quantise(x: np.ndarray, clip_range: float, n_max: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` clipped to [-r, r] and stochastically rounded onto the integers 0..L (uint32), unbiased:
    (clip(x) + r) * L / 2r, rounded up with probability its fractional part."""
    scale = levels(n_max) / (2 * clip_range)
    scaled = (np.clip(np.asarray(x, dtype=np.float64), -clip_range, clip_range) + clip_range) * scale
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < scaled - low)).astype(np.uint32)


def dequantise(total: np.ndarray, clip_range: float, n_max: int, count: int) -> np.ndarray:
    """The sum of ``count`` clipped vectors from the sum of their quantised values:
    total * 2r / L - count * r (float64)."""
    return np.asarray(total, dtype=np.float64) * (2 * clip_range / levels(n_max)) - count * clip_range


def quantisation_bound(clip_range: float, n_max: int, count: int) -> float:
    """Per coordinate, |dequantise(sum of q(x_u)) - sum of clip(x_u)| < count * 2r / L.

    Each stochastic rounding moves a value by less than one level (2r / L), so the sum of ``count`` of
    them is off by less than ``count`` levels (plus float64 rounding, ~1e-16 relative)."""
    return count * 2 * clip_range / levels(n_max)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values of the ChaCha20 keystream under the 32-byte ``seed`` (little-endian words)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def new_private() -> bytes:
    """A fresh raw X25519 private key."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive(private: bytes, public_peer: bytes, info: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public_peer)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_seed(s_private: bytes, s_public_peer: bytes, rnd: int, u: int, v: int) -> bytes:
    """s_uv: the seed of the mask u and v share (the same from either side), bound to the round and pair."""
    return _derive(s_private, s_public_peer, _MASK_INFO + struct.pack(">QQQ", rnd, min(u, v), max(u, v)))


def _bound(rnd: int, sender: int, recipient: int) -> bytes:
    return struct.pack(">QQQ", rnd, sender, recipient)


def seal(
    c_private: bytes, c_public_peer: bytes, rnd: int, sender: int, recipient: int, plain: bytes
) -> bytes:
    """``plain`` sealed from ``sender`` to ``recipient``: nonce + AES-GCM under HKDF(X25519(c, c_peer)),
    with (round, sender, recipient) as associated data."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    aead = AESGCM(_derive(c_private, c_public_peer, _SEAL_INFO + struct.pack(">Q", rnd)))
    return nonce + aead.encrypt(nonce, plain, _bound(rnd, sender, recipient))


def open_seal(
    c_private: bytes, c_public_peer: bytes, rnd: int, sender: int, recipient: int, sealed: bytes
) -> bytes:
    """What :func:`seal` sealed; raises ``cryptography.exceptions.InvalidTag`` when tampered or misbound."""
    aead = AESGCM(_derive(c_private, c_public_peer, _SEAL_INFO + struct.pack(">Q", rnd)))
    return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _bound(rnd, sender, recipient))


class SecAggError(FedshiftError):
    """Secure aggregation cannot go on without revealing more than the sum (too few sites, a bad message)."""


@dataclass(frozen=True)
class SecAggParams:
    """One round's protocol parameters, the same at the server and at every site."""

    round: int  # the federation's round: bound into every key, seal and mask
    threshold_fraction: float  # in (0.5, 1]: t = ceil(fraction * holders), at least 2 (:func:`threshold`)
    neighbours: int  # k: the peers holding each site's shares; 0 = all other sites; even
    clip_range: float  # r: each coordinate is clipped to [-r, r] before quantisation

    def __post_init__(self) -> None:
        if not 0 <= self.round < 2**64:
            raise SecAggError(f"Expected a round in [0, 2**64), but got {self.round}")
        if not 0.5 < self.threshold_fraction <= 1:
            raise SecAggError(
                f"Expected a threshold fraction in (0.5, 1], but got {self.threshold_fraction}: at most half "
                "would let two disjoint groups of holders each rebuild one secret of a site; e.g. 0.6"
            )
        if self.neighbours < 0 or self.neighbours % 2:
            raise SecAggError(
                f"Expected an even number of neighbours >= 0 (half on each side of SecAgg+'s ring), but got "
                f"{self.neighbours}; e.g. 0 (all sites) or 10"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise SecAggError(f"Expected a clip range > 0, but got {self.clip_range}; e.g. 1.0")


@dataclass(frozen=True)
class PublicKeys:
    """A site's two raw 32-byte X25519 public keys: c seals shares, s derives pairwise masks."""

    c: bytes
    s: bytes

    def __post_init__(self) -> None:
        if not (isinstance(self.c, bytes) and isinstance(self.s, bytes)) or {len(self.c), len(self.s)} != {
            KEY_BYTES
        }:
            raise SecAggError(f"Expected two raw {KEY_BYTES}-byte X25519 public keys, but got other values")


def threshold(holders: int, fraction: float) -> int:
    """Shamir's t for a secret shared among ``holders``: max(2, ceil(fraction * holders)), <= holders."""
    if holders < 2:
        raise SecAggError(f"Expected at least 2 sites to share secrets among, but got {holders}")
    return min(holders, max(2, math.ceil(fraction * holders - 1e-9)))


def neighbour_graph(nodes: Collection[int], params: SecAggParams) -> dict[int, frozenset[int]]:
    """SecAgg+'s graph: each site -> its neighbours (symmetric, each of degree min(k, n - 1)).

    Every other site when ``neighbours`` is 0 or >= n - 1; otherwise a ring over the ids in an order
    drawn from the round (SHA-256 of round and id), k/2 on each side."""
    ids = sorted(set(nodes))
    n, half = len(ids), params.neighbours // 2
    if params.neighbours == 0 or params.neighbours >= n - 1:
        return {u: frozenset(ids) - {u} for u in ids}
    rounds = struct.pack(">Q", params.round)
    ring = sorted(ids, key=lambda u: hashlib.sha256(_GRAPH_INFO + rounds + struct.pack(">Q", u)).digest())
    return {
        u: frozenset(ring[(i + j) % n] for j in range(-half, half + 1) if j != 0) for i, u in enumerate(ring)
    }


def node_ids(nodes: Iterable[int], what: str) -> frozenset[int]:
    out = frozenset(int(n) for n in nodes)
    if any(not 0 <= n < 2**64 for n in out):
        raise SecAggError(f"Expected node ids in [0, 2**64) in {what}, but got {sorted(out)[:3]}...")
    return out


def check_stage(actual: str, expected: str, call: str) -> None:
    if actual != expected:
        raise SecAggError(
            f"Expected {call} at the {expected!r} stage of secure aggregation, but this party is at "
            f"{actual!r}; the stages run setup, share, receive, mask, unmask, once each per round"
        )
