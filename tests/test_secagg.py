"""SecAgg+ core: masks cancel exactly in the field, dropouts are recovered, one masked vector is uniform,
and every refusal (consistency check, tampering, too few sites) holds."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from fedshift.common import shamir
from fedshift.common.secagg import (
    KEY_SHARE,
    SEED_SHARE,
    PublicKeys,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    dequantise,
    levels,
    neighbour_graph,
    quantisation_bound,
    quantise,
    threshold,
)
from fedshift.common.secagg_primitives import new_private, open_seal, pair_seed, prg, public_of, seal

R = 0.5  # clip range
Z_999 = 3.090232306167813  # the standard normal's 0.999 quantile
Z_6 = 4.753424308822899  # its 1 - 1e-6 quantile


def _params(neighbours: int = 0, fraction: float = 0.6, rnd: int = 7) -> SecAggParams:
    return SecAggParams(round=rnd, threshold_fraction=fraction, neighbours=neighbours, clip_range=R)


def _xs(ids: Collection[int], d: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(1)
    return {u: rng.normal(0, 0.2, d) for u in ids}  # a few coordinates beyond +-R: clipping matters


class Round:
    """One in-process round; ``silent`` sites stop after one stage: 'keys', 'shares', 'masked'."""

    def __init__(self, n: int, params: SecAggParams, d: int = 2000) -> None:
        self.ids = [2**63 + 11 * i for i in range(n)]  # Flower-sized node ids
        self.params, self.d = params, d
        self.clients = {u: SecAggClient(u, params) for u in self.ids}
        self.server = SecAggServer(params)
        self.xs = _xs(self.ids, d)

    def run(self, silent: dict[int, str] | None = None) -> tuple[np.ndarray, frozenset[int]]:
        """The unmasked field sum and U2."""
        silent = silent or {}
        per_site = self.server.add_keys({u: c.setup() for u, c in self.clients.items()})
        shares = {u: c.share(per_site[u]) for u, c in self.clients.items() if silent.get(u) != "keys"}
        routed = self.server.route(shares)
        for u in self.server.u1:
            self.clients[u].receive(routed[u], self.server.u1)
        masked = {
            u: self.clients[u].mask(self.xs[u], np.random.default_rng(u % 1000))
            for u in self.server.u1
            if silent.get(u) != "shares"
        }
        u2, dropped = self.server.unmask_request(masked)
        revealed = {u: self.clients[u].unmask(u2, dropped) for u in u2 if silent.get(u) != "masked"}
        return self.server.unmask_sum(revealed), u2

    def quantised_sum(self, u2: Collection[int]) -> np.ndarray:
        """sum of q(x_u) over u2 mod 2**32, recomputed with each site's rounding draws."""
        total = np.zeros(self.d, dtype=np.uint64)
        for u in u2:
            total += quantise(self.xs[u], R, len(self.ids), np.random.default_rng(u % 1000))
        return (total % 2**32).astype(np.uint32)


def _chi2_critical(dof: int, z: float = Z_999) -> float:
    """Wilson-Hilferty: the chi-square quantile of ``dof`` degrees of freedom at the normal quantile z."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def _chi2_top_byte(values: np.ndarray) -> float:
    counts = np.bincount((values >> 24).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_masks_cancel_exactly_and_dequantised_sum_is_within_the_bound() -> None:
    rnd = Round(5, _params(), d=10_000)
    total, u2 = rnd.run()
    assert u2 == frozenset(rnd.ids)
    assert np.array_equal(total, rnd.quantised_sum(u2))
    got = dequantise(total, R, 5, 5)
    clipped = np.sum([np.clip(rnd.xs[u], -R, R) for u in rnd.ids], axis=0)
    error = np.abs(got - clipped)
    bound = quantisation_bound(R, 5, 5)
    assert bound == pytest.approx(5 * 2 * R / ((2**32 - 1) // 5))
    assert error.max() <= bound
    assert error.max() > 0.2 * bound  # the bound is tight-ish: stochastic rounding does move values
    assert np.abs(np.sum(list(rnd.xs.values()), axis=0)).max() > 5 * R / 2  # clipping was exercised


def test_the_aggregate_is_the_dequantised_field_sum() -> None:
    rnd = Round(3, _params(fraction=1.0), d=500)
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    routed = rnd.server.route({u: c.share(per_site[u]) for u, c in rnd.clients.items()})
    for u in rnd.ids:
        rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = {u: rnd.clients[u].mask(rnd.xs[u], np.random.default_rng(u % 1000)) for u in rnd.ids}
    u2, dropped = rnd.server.unmask_request(masked)
    out = rnd.server.aggregate({u: rnd.clients[u].unmask(u2, dropped) for u in u2})
    assert out.dtype == np.float64
    assert np.array_equal(out, dequantise(rnd.quantised_sum(u2), R, 3, 3))


def test_quantiser_is_unbiased_and_never_wraps() -> None:
    n_max = 4
    assert levels(n_max) == (2**32 - 1) // 4 and n_max * levels(n_max) <= 2**32 - 1
    x = np.full(200_000, 0.123456789)
    q = quantise(x, R, n_max, np.random.default_rng(0))
    assert q.min() >= 0 and int(q.max()) <= levels(n_max)
    exact = (0.123456789 + R) * levels(n_max) / (2 * R)
    assert set(np.unique(q).tolist()) == {math.floor(exact), math.floor(exact) + 1}
    assert abs(q.mean() - exact) < 5 * 0.5 / math.sqrt(x.size)  # E q = exact (5 sigma)
    edges = quantise(np.array([-9.0, -R, R, 9.0]), R, n_max, np.random.default_rng(0))
    assert edges.tolist() == [0, 0, levels(n_max), levels(n_max)]


def test_dropouts_before_sharing_after_sharing_and_after_masking_are_recovered_exactly() -> None:
    rnd = Round(10, _params())
    before, after_shares, after_mask = rnd.ids[1], rnd.ids[4], rnd.ids[8]
    silent = {before: "keys", after_shares: "shares", after_mask: "masked"}
    total, u2 = rnd.run(silent)
    assert before not in rnd.server.u1 and after_shares in rnd.server.u1
    assert u2 == frozenset(rnd.ids) - {before, after_shares}  # the site silent after masking is summed
    assert np.array_equal(total, rnd.quantised_sum(u2))


def test_five_sites_one_drops_before_sharing_one_after_masking() -> None:
    rnd = Round(5, _params(), d=3000)
    total, u2 = rnd.run({rnd.ids[0]: "keys", rnd.ids[3]: "masked"})
    assert len(u2) == 4 and rnd.server.threshold == 3
    assert np.array_equal(total, rnd.quantised_sum(u2))


def test_fewer_survivors_than_the_threshold_is_refused() -> None:
    rnd = Round(5, _params())  # t = 3
    with pytest.raises(SecAggError, match=r"at least t=3 masked vectors, but 2 of 5") as info:
        rnd.run({u: "shares" for u in rnd.ids[:3]})
    assert "\n" not in str(info.value)
    rnd = Round(5, _params())
    with pytest.raises(SecAggError, match=r"at least t=3 survivors to reveal shares, but 2 of 3"):
        rnd.run({u: "shares" for u in rnd.ids[:2]} | {rnd.ids[2]: "masked"})
    rnd = Round(5, _params())
    with pytest.raises(SecAggError, match=r"at least t=3 sites to send their shares, but 2 of 5"):
        rnd.run({u: "keys" for u in rnd.ids[:3]})


def test_a_site_refuses_to_unmask_with_fewer_survivors_than_t() -> None:
    rnd = Round(5, _params())
    _masked_round(rnd)
    with pytest.raises(SecAggError, match=r"at least t=3 survivors, but got 2"):
        rnd.clients[rnd.ids[0]].unmask(set(rnd.ids[:2]), set(rnd.ids[2:]))


def _masked_round(rnd: Round) -> tuple[frozenset[int], frozenset[int]]:
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    routed = rnd.server.route({u: c.share(per_site[u]) for u, c in rnd.clients.items()})
    for u in rnd.ids:
        rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = {u: rnd.clients[u].mask(rnd.xs[u]) for u in rnd.ids}
    return rnd.server.unmask_request(masked)


def test_consistency_check_refuses_both_shares_of_one_peer() -> None:
    rnd = Round(5, _params())
    _masked_round(rnd)
    me, peer = rnd.ids[0], rnd.ids[4]
    client = rnd.clients[me]
    with pytest.raises(SecAggError, match="both") as info:
        client.unmask(set(rnd.ids), {peer})  # the same call
    assert "\n" not in str(info.value)
    first = client.unmask(set(rnd.ids[:4]), {peer})  # the peer dropped: its key share
    assert first[peer][0] == KEY_SHARE and {first[u][0] for u in rnd.ids[:4]} == {SEED_SHARE}
    with pytest.raises(SecAggError, match="revealed as the other kind"):
        client.unmask(set(rnd.ids), set())  # a later call: now the peer's seed share
    again = client.unmask(set(rnd.ids[:4]), {peer})  # asking the same again reveals nothing new
    assert again == first


def test_tampered_or_misbound_shares_are_refused() -> None:
    rnd = Round(4, _params(fraction=0.51))
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    shares = {u: c.share(per_site[u]) for u, c in rnd.clients.items()}
    a, b, c = rnd.ids[:3]
    routed = rnd.server.route(shares)
    tampered = dict(routed[b])
    tampered[a] = tampered[a][:-1] + bytes([tampered[a][-1] ^ 1])
    with pytest.raises(SecAggError, match=f"from site {a} sealed to site {b}.*do not open") as info:
        rnd.clients[b].receive(tampered, rnd.server.u1)
    assert "\n" not in str(info.value)
    reflected = dict(routed[a])
    reflected[b] = shares[a][b]  # a's own seal for b, handed back to a as if from b: same key, other (u, v)
    with pytest.raises(SecAggError, match="do not open"):
        rnd.clients[a].receive(reflected, rnd.server.u1)
    swapped = dict(routed[c])
    swapped[a] = shares[b][c]  # b's seal for c, labelled as a's
    with pytest.raises(SecAggError, match="do not open"):
        rnd.clients[c].receive(swapped, rnd.server.u1)


def test_seals_bind_round_sender_and_recipient() -> None:
    cu, cv = new_private(), new_private()
    sealed = seal(cu, public_of(cv), 3, 10, 20, b"share")
    assert open_seal(cv, public_of(cu), 3, 10, 20, sealed) == b"share"
    for rnd, sender, recipient in ((4, 10, 20), (3, 20, 10), (3, 10, 21)):
        with pytest.raises(InvalidTag):
            open_seal(cv, public_of(cu), rnd, sender, recipient, sealed)


def test_state_round_trips_through_bytes_between_every_stage() -> None:
    rnd = Round(4, _params(), d=600)
    clients = {u: c.to_bytes() for u, c in rnd.clients.items()}

    def step(u: int, call: str, *args: object) -> object:
        client = SecAggClient.from_bytes(clients[u])  # as Flower's Context.state between messages
        out = getattr(client, call)(*args)
        clients[u] = client.to_bytes()
        return out

    per_site = rnd.server.add_keys({u: step(u, "setup") for u in rnd.ids})  # type: ignore[misc]
    routed = rnd.server.route({u: step(u, "share", per_site[u]) for u in rnd.ids})  # type: ignore[misc]
    for u in rnd.ids:
        step(u, "receive", routed[u], rnd.server.u1)
    before_mask = {u: SecAggClient.from_bytes(clients[u]) for u in rnd.ids}
    assert json.loads(clients[rnd.ids[0]]).keys() >= {"s_sk", "seed"}  # needed to mask; c_sk is gone
    assert "c_sk" not in json.loads(clients[rnd.ids[0]])
    masked = {u: step(u, "mask", rnd.xs[u], np.random.default_rng(u % 1000)) for u in rnd.ids}
    again = before_mask[rnd.ids[0]].mask(rnd.xs[rnd.ids[0]], np.random.default_rng(rnd.ids[0] % 1000))
    assert np.array_equal(again, masked[rnd.ids[0]])  # type: ignore[arg-type]
    u2, dropped = rnd.server.unmask_request(masked)  # type: ignore[arg-type]
    total = rnd.server.unmask_sum({u: step(u, "unmask", u2, dropped) for u in u2})  # type: ignore[misc]
    assert np.array_equal(total, rnd.quantised_sum(u2))
    used = json.loads(clients[rnd.ids[0]])
    assert not {"c_sk", "s_sk", "seed"} & set(used)  # private keys and the seed are dropped once used


@pytest.mark.parametrize("data", [b"", b"not json", b"{}", json.dumps({"version": 99}).encode()])
def test_a_state_that_does_not_read_is_refused_in_one_line(data: bytes) -> None:
    with pytest.raises(SecAggError, match="to_bytes") as info:
        SecAggClient.from_bytes(data)
    assert "\n" not in str(info.value)


def test_stages_out_of_order_are_refused() -> None:
    client = SecAggClient(3, _params())
    with pytest.raises(SecAggError, match="'keys' stage"):
        client.share({})
    client.setup()
    with pytest.raises(SecAggError, match="'new' stage"):
        client.setup()


def test_secagg_plus_graph_is_symmetric_regular_and_the_sum_survives_two_dropouts() -> None:
    rnd = Round(20, _params(neighbours=4), d=1500)
    graph = neighbour_graph(rnd.ids, rnd.params)
    assert all(len(graph[u]) == 4 and u not in graph[u] for u in rnd.ids)
    assert all(u in graph[v] for u in rnd.ids for v in graph[u])
    assert neighbour_graph(rnd.ids, _params(neighbours=4, rnd=8)) != graph  # drawn anew each round
    assert neighbour_graph(list(reversed(rnd.ids)), rnd.params) == graph  # the same at every party
    a = rnd.ids[0]
    b = sorted(graph[a])[0]  # two neighbours drop: each is rebuilt from the other holders
    total, u2 = rnd.run({a: "shares", b: "shares"})
    assert u2 == frozenset(rnd.ids) - {a, b} and rnd.server.threshold == 3
    assert np.array_equal(total, rnd.quantised_sum(u2))
    complete = neighbour_graph(range(6), _params(neighbours=6))
    assert complete == neighbour_graph(range(6), _params(neighbours=0))
    assert all(len(v) == 5 for v in complete.values())


def _masked_vector(n: int = 5, d: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rnd = Round(n, _params(), d=d)
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    routed = rnd.server.route({u: c.share(per_site[u]) for u, c in rnd.clients.items()})
    u = rnd.ids[0]
    rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = rnd.clients[u].mask(rnd.xs[u], np.random.default_rng(0))
    return masked, quantise(rnd.xs[u], R, n, np.random.default_rng(0))


def test_one_masked_vector_is_uniform_over_the_field_and_the_quantised_one_is_not() -> None:
    masked, plain = _masked_vector()
    assert masked.dtype == np.uint32
    critical = _chi2_critical(255)  # p = 0.001 with 255 degrees of freedom
    assert _chi2_top_byte(masked) < critical
    assert _chi2_top_byte(plain) > 100 * critical
    low = np.bincount((masked & 0xFF).astype(np.int64), minlength=256)  # the low byte too
    assert float(((low - masked.size / 256) ** 2 / (masked.size / 256)).sum()) < _chi2_critical(255, Z_6)


def test_chi2_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert _chi2_critical(255) == pytest.approx(stats.chi2.isf(0.001, 255), rel=1e-3)


def test_prg_is_chacha20_rfc7539_keystream() -> None:
    # RFC 7539 A.1 test vector 1: key 0, nonce 0, block counter 0: 76 b8 e0 ad a0 f1 3d 90 ...
    assert prg(bytes(32), 2).tolist() == [0xADE0B876, 0x903DF1A0]
    assert prg(bytes(32), 5000).size == 5000


def test_pair_seeds_agree_on_both_sides_and_differ_by_round() -> None:
    su, sv = new_private(), new_private()
    seed = pair_seed(su, public_of(sv), 5, 1, 2)
    assert seed == pair_seed(sv, public_of(su), 5, 2, 1)
    assert seed != pair_seed(su, public_of(sv), 6, 1, 2)


def test_shamir_any_t_shares_rebuild_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    holders = [0, 5, 2**64 - 1, 77, 9]
    shares = shamir.split(secret, holders, 3)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    for drop in holders:
        for other in holders:
            subset = {h: shares[h] for h in holders if h not in (drop, other)}
            if len(subset) == 3:
                assert shamir.combine(subset, 3) == secret
    with pytest.raises(shamir.ShamirError, match="at least t=3"):
        shamir.combine({h: shares[h] for h in holders[:2]}, 3)
    two = {h: shares[h] for h in holders[:2]}
    with pytest.raises(shamir.ShamirError, match="larger value"):  # two points of a degree-2 polynomial
        shamir.combine(two, 2)


def test_threshold_values() -> None:
    assert [threshold(n, 0.6) for n in (2, 3, 5, 10, 50)] == [2, 2, 3, 6, 30]
    assert threshold(10, 0.7) == 7 and threshold(4, 1.0) == 4 and threshold(3, 0.1) == 2
    with pytest.raises(SecAggError, match="at least 2 sites"):
        threshold(1, 0.6)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("neighbours", 3, "even number"),
        ("clip_range", 0.0, "clip range"),
        ("threshold_fraction", 0.5, "(0.5, 1]"),
    ],
)
def test_bad_params_are_refused(field: str, value: float, needle: str) -> None:
    values = {"round": 1, "threshold_fraction": 0.6, "neighbours": 0, "clip_range": 1.0, field: value}
    with pytest.raises(SecAggError, match=re.escape(needle)):
        SecAggParams(**values)  # type: ignore[arg-type]


def test_public_keys_must_be_raw_x25519() -> None:
    with pytest.raises(SecAggError, match="32-byte"):
        PublicKeys(c=b"short", s=bytes(32))


def test_the_server_keeps_only_the_sum_of_masked_vectors() -> None:
    rnd = Round(4, _params(), d=300)
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    routed = rnd.server.route({u: c.share(per_site[u]) for u, c in rnd.clients.items()})
    for u in rnd.ids:
        rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = {u: rnd.clients[u].mask(rnd.xs[u]) for u in rnd.ids}
    rnd.server.unmask_request(masked)
    arrays = [v for v in vars(rnd.server).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and not any(np.array_equal(arrays[0], m) for m in masked.values())


def test_malformed_replies_are_left_out_not_summed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rnd = Round(5, _params())
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    shares = {u: c.share(per_site[u]) for u, c in rnd.clients.items()}
    a, b = rnd.ids[:2]
    shares[a] = dict(list(shares[a].items())[:-1])  # one neighbour's seal missing
    routed = rnd.server.route(shares)
    assert rnd.server.u1 == frozenset(rnd.ids) - {a}
    for u in rnd.server.u1:
        rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = {u: rnd.clients[u].mask(rnd.xs[u], np.random.default_rng(u % 1000)) for u in rnd.server.u1}
    masked[b] = masked[b].astype(np.int64)  # the wrong dtype
    u2, dropped = rnd.server.unmask_request(masked)
    assert u2 == frozenset(rnd.ids) - {a, b} and dropped == {b}
    revealed = {u: rnd.clients[u].unmask(u2, dropped) for u in u2}
    total = rnd.server.unmask_sum(revealed)
    assert np.array_equal(total, rnd.quantised_sum(u2))
    assert sum("left out" in r.getMessage() for r in caplog.records) == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    secrets_seen = [v.hex()[:16] for r in revealed.values() for v in r.values()]
    secrets_seen += [c.hex()[:16] for r in shares.values() for c in r.values()]
    assert not [h for h in secrets_seen if h in logged]  # no share, seal or key, and no vector, is logged
    assert not re.search(r"(?=[0-9a-f]*[a-f])[0-9a-f]{16,}|\[\s*\d+[\s,]+\d+", logged)  # hex, arrays


def test_cost_benchmark_counts_bytes_by_closed_form() -> None:
    from fedshift.common.shamir import SHARE_BYTES
    from fedshift.simulations.benchmarks.secagg_cost import ID_BYTES, one_round

    sealed = 12 + 2 * SHARE_BYTES + 16  # nonce, the two shares, the GCM tag
    for n, k, drop in ((5, 0, 0), (12, 4, 1)):
        row = one_round(n, k, 1000, drop)
        degree = k or n - 1
        assert row["holders"] == degree + 1 and row["threshold"] == threshold(degree + 1, 0.6)
        assert row["sent_bytes"]["setup"] == 64
        assert row["sent_bytes"]["share"] == degree * (ID_BYTES + sealed)
        assert row["sent_bytes"]["mask"] == 4 * 1000 == row["plain_float32_bytes"]
        assert row["dropped"] == drop
        assert row["max_error"] <= row["quantisation_bound"]
    assert one_round(5, 0, 1000, 0)["sent_bytes"]["unmask"] == 5 * (ID_BYTES + 1 + SHARE_BYTES)


def test_a_corrupt_revealed_share_is_detected_not_summed() -> None:
    rnd = Round(4, _params(fraction=1.0), d=200)  # t = 4: every share is used
    per_site = rnd.server.add_keys({u: c.setup() for u, c in rnd.clients.items()})
    routed = rnd.server.route({u: c.share(per_site[u]) for u, c in rnd.clients.items()})
    for u in rnd.ids:
        rnd.clients[u].receive(routed[u], rnd.server.u1)
    masked = {u: rnd.clients[u].mask(rnd.xs[u]) for u in rnd.ids}
    u2, dropped = rnd.server.unmask_request(masked)
    revealed = {u: rnd.clients[u].unmask(u2, dropped) for u in u2}
    a, b = rnd.ids[:2]
    share = revealed[a][b]
    revealed[a][b] = share[:-1] + bytes([share[-1] ^ 1])  # one bit of a's share of b's seed
    with pytest.raises(SecAggError, match=f"Site {b}'s self-mask seed.*a share is corrupt") as info:
        rnd.server.aggregate(revealed)
    assert "\n" not in str(info.value)
