"""A site's side of secure aggregation (SecAgg+, :mod:`fedshift.common.secagg`).

Around each training round the server runs three query stages; between messages the site's
round secrets live in its Flower ``Context.state`` (at the site, never sent):

1. :func:`setup_reply`: fresh key pairs for this round; the public keys and the site's FedAvg
   weight (its training split's size, which DP-SGD's sampling rate discloses anyway) leave.
2. :func:`share_reply`: the self-mask seed and the mask key, Shamir-shared among the site's
   neighbours, each share sealed to its holder (the server routes what it cannot read).
3. :func:`masked_arrays` (in the training reply): the DP-SGD update, weighted, clipped to
   the field's range, quantised and masked. DP-SGD ran first, so the site's own guarantee holds
   whatever happens to the masks.
4. :func:`unmask_reply`: the shares the server needs for the survivors' sum, and never both
   kinds for one peer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedshift.client.site import SiteSettings, load_site_data
from fedshift.common.aggregation_config import secagg_params
from fedshift.common.config import FederationConfig
from fedshift.common.errors import RoundRefusedError
from fedshift.common.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    SECAGG_C_KEYS_FIELD,
    SECAGG_DROPPED_FIELD,
    SECAGG_KEY,
    SECAGG_MASKED_FIELD,
    SECAGG_NODES_FIELD,
    SECAGG_S_KEYS_FIELD,
    SECAGG_SEALED_FIELD,
    SECAGG_SHARES_FIELD,
    SECAGG_SURVIVORS_FIELD,
    SECAGG_U1_FIELD,
    SECAGG_WEIGHT_SCALE_FIELD,
    SITE_KEY,
    WEIGHT_KEY,
    round_of,
    secagg_bytes,
    secagg_node_field,
    secagg_nodes,
    site_record,
)
from fedshift.common.secagg import PublicKeys, SecAggClient, SecAggError
from fedshift.common.update_vector import clip_to_norm, flatten_update

logger = logging.getLogger(__name__)

_STATE = "secure-aggregation"  # the Context.state record of the round in progress (site-local)
_CLIENT, _ROUND = "client", "round"


def _save(context: Context, client: SecAggClient, server_round: int) -> None:
    context.state[_STATE] = ConfigRecord({_CLIENT: client.to_bytes(), _ROUND: server_round})


def _load(context: Context, server_round: int) -> SecAggClient:
    record = context.state.config_records.get(_STATE)
    if record is None or record.get(_ROUND) != server_round:
        raise RoundRefusedError(
            f"Expected secure aggregation's setup for round {server_round} before this stage, but this site "
            "holds none for it; the server must run the round's stages in order"
        )
    data: Any = record[_CLIENT]
    return SecAggClient.from_bytes(bytes(data))


def _reply(
    msg: Message, site: SiteSettings, record: dict[str, Any], metrics: MetricRecord | None = None
) -> Message:
    content = RecordDict({SECAGG_KEY: ConfigRecord(record), SITE_KEY: site_record(site.name)})
    if metrics is not None:
        content[METRICS_KEY] = metrics
    return Message(content, reply_to=msg)


def setup_reply(msg: Message, context: Context, fed: FederationConfig, site: SiteSettings) -> Message:
    """Stage 1: this round's key pairs (kept here), the public keys and the site's weight (sent)."""
    server_round = round_of(msg)
    client = SecAggClient(context.node_id, secagg_params(fed.aggregation, server_round))
    keys = client.setup()
    weight = len(load_site_data(site, fed.model).split("train"))
    _save(context, client, server_round)
    record = {SECAGG_C_KEYS_FIELD: [keys.c], SECAGG_S_KEYS_FIELD: [keys.s]}
    return _reply(msg, site, record, MetricRecord({WEIGHT_KEY: weight}))


def share_reply(msg: Message, context: Context, fed: FederationConfig, site: SiteSettings) -> Message:
    """Stage 2: the neighbours' public keys in; this site's shares out, each sealed to its holder."""
    server_round = round_of(msg)
    client = _load(context, server_round)
    record = msg.content.config_records[SECAGG_KEY]
    nodes = secagg_nodes(record, SECAGG_NODES_FIELD)
    c_keys, s_keys = secagg_bytes(record, SECAGG_C_KEYS_FIELD), secagg_bytes(record, SECAGG_S_KEYS_FIELD)
    keys = {n: PublicKeys(c=c, s=s) for n, c, s in zip(nodes, c_keys, s_keys, strict=True)}
    sealed = client.share(keys)
    _save(context, client, server_round)
    holders = sorted(sealed)
    return _reply(
        msg,
        site,
        {SECAGG_NODES_FIELD: secagg_node_field(holders), SECAGG_SEALED_FIELD: [sealed[h] for h in holders]},
    )


def begin_masking(msg: Message, context: Context) -> SecAggClient:
    """Stage 3, before training: the shares sealed to this site taken in (each checked), so that a round
    whose protocol cannot go on is refused before any privacy is charged."""
    server_round = round_of(msg)
    client = _load(context, server_round)
    if SECAGG_KEY not in msg.content.config_records:
        raise RoundRefusedError(
            f"Expected round {server_round}'s training message to carry secure aggregation's shares, but "
            "it has none; the server must run secure aggregation's stages (secure-aggregation = true)"
        )
    record = msg.content.config_records[SECAGG_KEY]
    senders = secagg_nodes(record, SECAGG_NODES_FIELD)
    try:
        sealed = dict(zip(senders, secagg_bytes(record, SECAGG_SEALED_FIELD), strict=True))
        client.receive(sealed, secagg_nodes(record, SECAGG_U1_FIELD))
    except (SecAggError, ValueError) as exc:  # a tampered or mis-routed share, a repeated message
        raise RoundRefusedError(f"secure aggregation cannot go on in round {server_round}: {exc}") from None
    return client


def masked_arrays(
    msg: Message,
    context: Context,
    client: SecAggClient,
    fed: FederationConfig,
    shared: Mapping[str, np.ndarray],
    weight: int,
) -> ArrayRecord:
    """Stage 3, after training: the shared tensors as one masked vector, for the training reply.

    The update (``shared`` minus the global tensors in ``msg``) is clipped to ``update-norm-bound``
    here (the server cannot see it to bound it), weighted by ``weight`` over the round's total,
    and masked (:meth:`SecAggClient.mask` clips each coordinate to ``secagg-clip-range`` and
    quantises it).
    """
    server_round = round_of(msg)
    reference = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()}
    bound = fed.aggregation.norm_bound
    delta, norm = clip_to_norm(flatten_update(shared, reference), bound)
    if bound > 0 and norm > bound:
        logger.info("Round %d: the update's norm %.3g clipped to %g", server_round, norm, bound)
    scale: Any = msg.content.config_records[SECAGG_KEY][SECAGG_WEIGHT_SCALE_FIELD]
    masked = client.mask(delta * (weight / float(scale)))
    _save(context, client, server_round)
    return ArrayRecord({SECAGG_MASKED_FIELD: Array(masked)})


def unmask_reply(msg: Message, context: Context, fed: FederationConfig, site: SiteSettings) -> Message:
    """Stage 4: the shares that unmask the survivors' sum (the client refuses to reveal both of a peer)."""
    server_round = round_of(msg)
    client = _load(context, server_round)
    record = msg.content.config_records[SECAGG_KEY]
    shares = client.unmask(
        secagg_nodes(record, SECAGG_SURVIVORS_FIELD), secagg_nodes(record, SECAGG_DROPPED_FIELD)
    )
    _save(context, client, server_round)
    peers = sorted(shares)
    return _reply(
        msg,
        site,
        {SECAGG_NODES_FIELD: secagg_node_field(peers), SECAGG_SHARES_FIELD: [shares[p] for p in peers]},
    )
