"""SecAgg+ (Bell et al. 2020): the server learns the sum of the sites' vectors, never one site's.

Per round, for sites with int node ids (U0: those that sent keys at setup):

0. setup: each site makes two X25519 pairs, c (seals the shares it sends) and s (pairwise masks).
1. share: each site u draws a self-mask seed b_u and Shamir-shares b_u and its s private key t-of-(k+1)
   among itself and its neighbours N(u) (SecAgg+'s graph, :func:`neighbour_graph`), each pair of shares
   sealed with AES-GCM under HKDF(X25519(c_u, c_v)), bound to (round, u, v).
2. mask: U1 = the sites whose shares the server routed. u sends y_u = q(x_u) + PRG(b_u)
   + sum_{v in N(u) & U1} +-PRG(s_uv) mod 2**32 (+ when u < v), q the stochastic quantiser
   (:func:`quantise`), PRG a ChaCha20 keystream.
3. unmask: U2 = the sites whose masked vectors arrived, D = U1 - U2. For a peer in U2 a site reveals its
   share of b, for a peer in D its share of the s key, never both for one peer. The server rebuilds
   b_v (v in U2) and s_v (v in D), removes their masks and gets sum_{u in U2} q(x_u) mod 2**32.

Everything refuses with :class:`SecAggError` rather than revealing more than the sum. Nothing here logs
a share, a key or a vector.

Protects against a server that follows the protocol but reads everything it routes (semi-honest), with
up to t - 1 sites colluding. NOT against a server that deviates: one that tells different sites
different survivor and dropped lists (no site can compare its view with the others') can rebuild one
site's seed from some holders and its neighbours' mask keys from others, and so unmask that site's
update with no site colluding; the per-peer check here stops it only for the same holder. Bell et al.'s
malicious-server variant closes this with a signed consistency round (every survivor signs the list, and
no one reveals before t signatures on the same list), which needs keys the server cannot forge (the
sites' enrolment keys); it is not built. Nor against a server that swaps the public keys it routes
(the sites do not sign them), nor against a site sending a wrong but well-formed vector.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import asdict

import numpy as np
from cryptography.exceptions import InvalidTag

from fedshift.common import shamir
from fedshift.common.secagg_primitives import (
    KEY_BYTES,
    MODULUS,
    NONCE_BYTES,
    TAG_BYTES,
    PublicKeys,
    SecAggError,
    SecAggParams,
    check_stage,
    dequantise,
    levels,
    neighbour_graph,
    new_private,
    node_ids,
    open_seal,
    pair_seed,
    prg,
    public_of,
    quantisation_bound,
    quantise,
    seal,
    threshold,
)

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_SHARE",
    "MODULUS",
    "SEED_SHARE",
    "PublicKeys",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "dequantise",
    "levels",
    "neighbour_graph",
    "quantisation_bound",
    "quantise",
    "threshold",
]

_PLAIN_BYTES = 2 * shamir.SHARE_BYTES  # a sealed pair: the b share, then the s-key share
SEALED_BYTES = NONCE_BYTES + _PLAIN_BYTES + TAG_BYTES
SEED_SHARE, KEY_SHARE = 1, 2  # the first byte of a revealed share: a self-mask seed's, or an s key's
_STATE_VERSION = 1


def _secret(value: bytes | None, what: str) -> bytes:
    if value is None:
        raise SecAggError(
            f"Expected this site's {what} for this stage, but its state holds none (used, or a state not "
            "written by SecAggClient.to_bytes); the round is refused"
        )
    return value


_CLIENT_STAGES = ("new", "keys", "shared", "received", "masked")


class SecAggClient:
    """One site's side of one round. Its whole state (private keys included) round-trips through
    :meth:`to_bytes` / :meth:`from_bytes`; private keys and the seed are dropped once used."""

    def __init__(self, node_id: int, params: SecAggParams) -> None:
        (self.node_id,) = node_ids([node_id], "this site's id")
        self.params = params
        self.stage = "new"
        self._c_sk: bytes | None = None
        self._s_sk: bytes | None = None
        self._seed: bytes | None = None
        self._keys: dict[int, PublicKeys] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (b share, s-key share) this site holds
        self._u1: frozenset[int] = frozenset()
        self._revealed: dict[int, int] = {}  # peer -> SEED_SHARE or KEY_SHARE, once revealed

    @property
    def neighbours(self) -> frozenset[int]:
        """N(u): this site's neighbours in the round's graph (after :meth:`share`)."""
        return neighbour_graph(self._keys, self.params)[self.node_id] if self._keys else frozenset()

    @property
    def threshold(self) -> int:
        """t of this site's secrets: of its holders (itself and its neighbours), how many rebuild them."""
        return threshold(len(self.neighbours) + 1, self.params.threshold_fraction)

    def setup(self) -> PublicKeys:
        """Stage 0: two fresh X25519 pairs; the public halves leave."""
        check_stage(self.stage, "new", "setup")
        self._c_sk, self._s_sk = new_private(), new_private()
        self.stage = "keys"
        return PublicKeys(c=public_of(self._c_sk), s=public_of(self._s_sk))

    def share(self, keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Stage 1: the keys of all of U0 (this site's included) in; neighbour -> its sealed shares out."""
        check_stage(self.stage, "keys", "share")
        c_sk, s_sk = _secret(self._c_sk, "share key"), _secret(self._s_sk, "mask key")
        own = PublicKeys(c=public_of(c_sk), s=public_of(s_sk))
        nodes = node_ids(keys, "the server's key list")
        if keys.get(self.node_id) != own:
            raise SecAggError(
                f"Expected the server's key list to carry site {self.node_id}'s own keys, but it does not; "
                "the server must send back every key of the round's setup"
            )
        threshold(len(nodes), self.params.threshold_fraction)  # refuses fewer than 2 sites
        self._keys = {n: keys[n] for n in nodes}
        self._seed = secrets.token_bytes(KEY_BYTES)
        holders = self.neighbours | {self.node_id}
        t = self.threshold
        seeds, s_keys = shamir.split(self._seed, holders, t), shamir.split(s_sk, holders, t)
        self._held = {self.node_id: (seeds[self.node_id], s_keys[self.node_id])}
        sealed = {}
        for v in sorted(self.neighbours):
            plain = seeds[v] + s_keys[v]
            sealed[v] = seal(c_sk, self._keys[v].c, self.params.round, self.node_id, v, plain)
        self.stage = "shared"
        return sealed

    def receive(self, ciphertexts: Mapping[int, bytes], u1: Collection[int]) -> None:
        """Stage 2: the shares sealed to this site (sender -> ciphertext) and U1 in; each one checked."""
        check_stage(self.stage, "shared", "receive")
        u1_ids = node_ids(u1, "U1")
        if not u1_ids <= set(self._keys) or self.node_id not in u1_ids:
            raise SecAggError(
                f"Expected U1 to be sites of the round's setup including site {self.node_id}, but it is not; "
                "the round is refused"
            )
        expected, got = self.neighbours & u1_ids, node_ids(ciphertexts, "the senders of shares")
        if got != expected:
            raise SecAggError(
                f"Expected shares from the {len(expected)} neighbours in U1, but got {len(got)} "
                f"({len(got - expected)} unexpected senders); the round is refused"
            )
        if len(expected) + 1 < self.threshold:
            raise SecAggError(
                f"Expected at least t={self.threshold} of site {self.node_id}'s holders in U1, but only "
                f"{len(expected) + 1} are; too few sites stayed for the round"
            )
        opened = {v: self._open(v, bytes(ciphertexts[v])) for v in sorted(expected)}  # all, or none kept
        self._held.update(opened)
        self._u1, self._c_sk = u1_ids, None
        self.stage = "received"

    def _open(self, sender: int, sealed: bytes) -> tuple[bytes, bytes]:
        c_sk = _secret(self._c_sk, "share key")
        try:
            plain = open_seal(c_sk, self._keys[sender].c, self.params.round, sender, self.node_id, sealed)
        except (InvalidTag, ValueError):
            raise SecAggError(
                f"Expected the shares from site {sender} sealed to site {self.node_id} for round "
                f"{self.params.round}, but they do not open (tampered or misrouted); the round is refused"
            ) from None
        if len(plain) != _PLAIN_BYTES:
            raise SecAggError(f"Expected {_PLAIN_BYTES} bytes of shares from site {sender}, got {len(plain)}")
        return plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]

    def mask(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Stage 2: float64 1-D ``x`` -> q(x) + PRG(b_u) + the pairwise masks, uint32 (once per round)."""
        check_stage(self.stage, "received", "mask")
        seed, s_sk = _secret(self._seed, "self-mask seed"), _secret(self._s_sk, "mask key")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1 or not np.isfinite(x).all():
            raise SecAggError(
                f"Expected a finite 1-D vector to mask, but got shape {x.shape} or non-finite values"
            )
        rng = np.random.default_rng() if rng is None else rng
        y = quantise(x, self.params.clip_range, len(self._keys), rng)
        y += prg(seed, x.size)
        for v in sorted(self.neighbours & self._u1):
            mask = prg(pair_seed(s_sk, self._keys[v].s, self.params.round, self.node_id, v), x.size)
            if self.node_id < v:
                y += mask
            else:
                y -= mask
        self._seed = self._s_sk = None
        self.stage = "masked"
        return y

    def unmask(self, survivors: Collection[int], dropped: Collection[int]) -> dict[int, bytes]:
        """Stage 3: peer -> share: of b for a survivor, of the s key for a dropped peer, never both."""
        check_stage(self.stage, "masked", "unmask")
        u2, gone = node_ids(survivors, "the survivors"), node_ids(dropped, "the dropped")
        if u2 & gone:
            raise SecAggError(
                f"Expected each peer among the survivors or the dropped, not both, but {len(u2 & gone)} "
                "are in both; revealing both shares would unmask them, so this site refuses"
            )
        if not (u2 | gone) <= self._u1 or self.node_id not in u2:
            raise SecAggError(
                f"Expected survivors and dropped within U1, site {self.node_id} a survivor, but they are "
                "not; this site refuses to unmask"
            )
        if len(u2) < self.threshold:
            raise SecAggError(
                f"Expected at least t={self.threshold} survivors, but got {len(u2)}; "
                "this site refuses to unmask"
            )
        asked = {v: SEED_SHARE for v in u2 & set(self._held)} | {v: KEY_SHARE for v in gone & set(self._held)}
        changed = [v for v, kind in asked.items() if self._revealed.get(v, kind) != kind]
        if changed:
            raise SecAggError(
                f"Expected each peer's shares asked for one kind only, but {len(changed)} peer(s) were "
                "revealed as the other kind before; revealing both would unmask them, so this site refuses"
            )
        self._revealed.update(asked)
        return {v: bytes([kind]) + self._held[v][kind - 1] for v, kind in sorted(asked.items())}

    def to_bytes(self) -> bytes:
        """The whole state as JSON bytes (keys and shares hex): for Flower's Context.state, at the site."""
        hexed = {
            k: v.hex() for k, v in (("c_sk", self._c_sk), ("s_sk", self._s_sk), ("seed", self._seed)) if v
        }
        state = {
            "version": _STATE_VERSION,
            "node_id": self.node_id,
            "params": asdict(self.params),
            "stage": self.stage,
            **hexed,
            "keys": {str(n): [k.c.hex(), k.s.hex()] for n, k in self._keys.items()},
            "held": {str(n): [b.hex(), s.hex()] for n, (b, s) in self._held.items()},
            "u1": sorted(self._u1),
            "revealed": {str(n): kind for n, kind in self._revealed.items()},
        }
        return json.dumps(state, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        """A client from :meth:`to_bytes`; anything else is refused in one line."""
        try:
            state = json.loads(data)
            if state["version"] != _STATE_VERSION:
                raise ValueError(state["version"])
            client = cls(int(state["node_id"]), SecAggParams(**state["params"]))
            client.stage = str(state["stage"])
            if client.stage not in _CLIENT_STAGES:
                raise ValueError(client.stage)
            for name in ("c_sk", "s_sk", "seed"):
                setattr(client, f"_{name}", bytes.fromhex(state[name]) if name in state else None)
            client._keys = {
                int(n): PublicKeys(bytes.fromhex(c), bytes.fromhex(s)) for n, (c, s) in state["keys"].items()
            }
            client._held = {
                int(n): (bytes.fromhex(b), bytes.fromhex(s)) for n, (b, s) in state["held"].items()
            }
            client._u1 = node_ids(state["u1"], "U1")
            client._revealed = {int(n): int(kind) for n, kind in state["revealed"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SecAggError(
                f"Expected a secure aggregation state written by SecAggClient.to_bytes (version "
                f"{_STATE_VERSION}), but it does not read ({type(error).__name__}); the round is refused"
            ) from None
        return client


class SecAggServer:
    """The server's side of one round: it routes keys and sealed shares and rebuilds only the sum."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.stage = "new"
        self._keys: dict[int, PublicKeys] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._total: np.ndarray = np.zeros(0, dtype=np.uint32)

    @property
    def threshold(self) -> int:
        """t: every site has the same number of holders (the graph is regular)."""
        degree = len(next(iter(self._graph.values()))) if self._graph else 1
        return threshold(degree + 1, self.params.threshold_fraction)

    @property
    def u1(self) -> frozenset[int]:
        """The sites whose shares were routed (they mask against each other)."""
        return self._u1

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        """SecAgg+'s graph over U0: site -> its neighbours."""
        return dict(self._graph)

    def add_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
        """Stage 0: U0's public keys in; per site, the keys it needs: all of U0's (each site rebuilds the
        graph and n_max = |U0| from them; 64 bytes a site)."""
        check_stage(self.stage, "new", "add_keys")
        nodes = node_ids(keys, "the setup replies")
        threshold(len(nodes), self.params.threshold_fraction)
        self._keys = {n: keys[n] for n in sorted(nodes)}
        self._graph = neighbour_graph(nodes, self.params)
        self.stage = "keys"
        logger.info(
            "Secure aggregation round %d: %d sites sent keys (t=%d)",
            self.params.round,
            len(nodes),
            self.threshold,
        )
        return {n: dict(self._keys) for n in self._keys}

    def route(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 1: sender -> {holder: sealed} in; recipient -> {sender: sealed} out, for U1 only.

        A sender whose shares are not exactly one sealed pair per neighbour is left out (logged); so is,
        repeatedly, a site with fewer than t holders left in U1 (its secrets could not be rebuilt)."""
        check_stage(self.stage, "keys", "route")
        complete = set()
        for u in node_ids(shares, "the share replies"):
            sealed = shares[u]
            if (
                u in self._graph
                and set(sealed) == self._graph[u]
                and all(len(c) == SEALED_BYTES for c in sealed.values())
            ):
                complete.add(u)
            else:
                logger.warning(
                    "Secure aggregation: site %d's shares are incomplete or malformed: left out", u
                )
        u1 = set(complete)
        while short := {u for u in u1 if len(self._graph[u] & u1) + 1 < self.threshold}:
            u1 -= short
        if len(u1) < self.threshold:
            raise SecAggError(
                f"Expected at least t={self.threshold} sites to send their shares, but {len(complete)} of "
                f"{len(self._keys)} did ({len(u1)} with t holders among them); the round cannot be "
                "aggregated securely (fewer live sites than t)"
            )
        self._u1 = frozenset(u1)
        self.stage = "routed"
        return {v: {u: bytes(shares[u][v]) for u in sorted(self._graph[v] & u1)} for v in sorted(u1)}

    def unmask_request(self, masked: Mapping[int, np.ndarray]) -> tuple[frozenset[int], frozenset[int]]:
        """Stage 2: the masked vectors in (summed at once, never kept one by one); (U2, D = U1 - U2) out."""
        check_stage(self.stage, "routed", "unmask_request")
        vectors = {u: np.asarray(masked[u]) for u in node_ids(masked, "the masked replies") & self._u1}
        sizes = Counter(v.size for v in vectors.values() if v.ndim == 1 and v.dtype == np.uint32)
        size = sizes.most_common(1)[0][0] if sizes else 0
        u2 = {u for u, v in vectors.items() if v.ndim == 1 and v.dtype == np.uint32 and v.size == size}
        for u in sorted(set(masked) - u2):
            logger.warning(
                "Secure aggregation: site %d's masked vector is not U1's or not uint32[%d]: left out", u, size
            )
        if len(u2) < self.threshold:
            raise SecAggError(
                f"Expected at least t={self.threshold} masked vectors, but {len(u2)} of {len(self._u1)} "
                "sites in U1 sent one; the round cannot be aggregated securely (fewer live sites than t)"
            )
        self._total = np.zeros(size, dtype=np.uint32)
        for u in sorted(u2):
            self._total += vectors[u]
        self._u2 = frozenset(u2)
        self.stage = "requested"
        return self._u2, self._u1 - self._u2

    def aggregate(self, revealed: Mapping[int, Mapping[int, bytes]]) -> np.ndarray:
        """Stage 3: holder -> {peer: share} in; the dequantised sum over U2 out (float64), within
        :func:`quantisation_bound` (clip range, |U0|, |U2|) of the sum of the clipped vectors."""
        total = self.unmask_sum(revealed)
        return dequantise(total, self.params.clip_range, len(self._keys), len(self._u2))

    def unmask_sum(self, revealed: Mapping[int, Mapping[int, bytes]]) -> np.ndarray:
        """Stage 3 in the field: sum_{u in U2} q(x_u) mod 2**32 (uint32), the masks rebuilt and removed."""
        check_stage(self.stage, "requested", "aggregate")
        answered = node_ids(revealed, "the unmask replies") & self._u2
        t = self.threshold
        if len(answered) < t:
            raise SecAggError(
                f"Expected at least t={t} survivors to reveal shares, but {len(answered)} of {len(self._u2)} "
                "did; the sum cannot be unmasked"
            )
        total = self._total.copy()
        for v in sorted(self._u2):
            total -= prg(self._rebuild(v, SEED_SHARE, revealed, answered), total.size)
        for v in sorted(self._u1 - self._u2):
            s_sk = self._rebuild(v, KEY_SHARE, revealed, answered)
            if public_of(s_sk) != self._keys[v].s:
                raise SecAggError(
                    f"Expected site {v}'s rebuilt mask key to match its public key, but it does not: "
                    "a share is corrupt"
                )
            for u in sorted(self._graph[v] & self._u2):
                mask = prg(pair_seed(s_sk, self._keys[u].s, self.params.round, u, v), total.size)
                if u < v:
                    total -= mask
                else:
                    total += mask
        self.stage, self._total = "done", np.zeros(0, dtype=np.uint32)
        logger.info(
            "Secure aggregation round %d: the sum of %d sites unmasked (%d dropped after sharing)",
            self.params.round,
            len(self._u2),
            len(self._u1 - self._u2),
        )
        return total

    def _rebuild(
        self, v: int, kind: int, revealed: Mapping[int, Mapping[int, bytes]], answered: frozenset[int]
    ) -> bytes:
        """Site v's self-mask seed (SEED_SHARE) or s key (KEY_SHARE) from its holders' shares."""
        holders = (self._graph[v] | {v}) & answered
        shares = {
            h: bytes(revealed[h][v])[1:]
            for h in holders
            if v in revealed[h] and bytes(revealed[h][v])[:1] == bytes([kind])
        }
        what = "self-mask seed" if kind == SEED_SHARE else "mask key"
        if len(shares) < self.threshold:
            raise SecAggError(
                f"Expected at least t={self.threshold} shares of site {v}'s {what}, but {len(shares)} of its "
                f"{len(self._graph[v]) + 1} holders sent one; the sum cannot be unmasked"
            )
        try:
            return shamir.combine(shares, self.threshold)
        except shamir.ShamirError as error:
            raise SecAggError(f"Site {v}'s {what}: {error}") from None
