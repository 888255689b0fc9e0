"""What a prefill or decode instance shares: its transfer agent, its bootstrap
entry, and its transfer metrics and stats.

An instance's epoch (random, drawn at process start) is in its bootstrap entry
and on its control channel, so a restarted instance is a new peer.

On start the endpoint registers the KV pool with the transfer backend, registers
the instance (with its KV layout) at the bootstrap service — a layout that
cannot pair with live peers is refused there, before any request — and keeps
the entry alive with heartbeats until ``close``.

It also lets transfer peers go when their instance is gone: a role calls
``add_peer`` for every peer it pairs with, ``retire_peer`` once the peer's
instance left (control channel closed), and ``retire_idle_peers`` every loop
with the peers its open, draining or quarantined rooms still use; a peer
leaves the agent (``remove_peer``) only once none of its rooms is left.
"""

from __future__ import annotations

import logging
import secrets
import threading

from pdserve.bootstrap.client import BootstrapClient
from pdserve.bootstrap.protocol import InstanceInfo, encode_peer_info
from pdserve.common.config import ServerConfig, served_model_name
from pdserve.common.messages import RoleStats
from pdserve.transfer.base import KVMemory
from pdserve.transfer.metrics import TransferMetrics
from pdserve.transfer.tp import TPAgent, advertised_host, transfer_config

logger = logging.getLogger("pdserve.pd")
# Longer than the bootstrap service's default TTL (10 s): an instance restarted
# under its old id waits for its previous entry to expire.
REGISTER_ID_WAIT_S = 30.0


def new_epoch() -> str:
    """A fresh incarnation id: drawn once per process start."""
    return secrets.token_hex(8)


class PDEndpoint:
    def __init__(self, cfg: ServerConfig, memory: KVMemory, control_address: str, epoch: str,
                 queues: dict[str, str], followers=None):
        """``queues``: the role's queue gauges (name -> help), ``followers``: ranks 1.. (engine/tp.py)."""
        self.cfg = cfg
        self.instance_id: str = cfg.instance_id  # resolved at parse time
        self.epoch = epoch
        self.metrics = TransferMetrics(queues, cfg.metrics.bucket_kv_transfer_latency)
        transfer_cfg = transfer_config(cfg, 0, advertised_host(cfg.disaggregation_control_host or cfg.host))
        # Every rank's agent behind one (transfer/tp.py).
        self.agent = TPAgent(transfer_cfg, memory, followers, cfg.dist_timeout_s)
        self.retiring_peers: set[str] = set()
        self.peer_info = self.agent.peer_info()
        self.bootstrap = BootstrapClient(cfg.disaggregation_bootstrap_url, secret=cfg.cluster_secret)
        self.info = InstanceInfo(
            instance_id=self.instance_id,
            role=cfg.disaggregation_mode,
            http_url=f"http://{advertised_host(cfg.host)}:{cfg.port}",
            control_address=control_address,
            transfer_backend=cfg.disaggregation_transfer_backend,
            peer_info=encode_peer_info(self.peer_info),
            kv_layout=memory.layout,
            model=served_model_name(cfg),
            epoch=epoch,
        )
        # Raises RegistrationRefused on a layout mismatch, or on an id that stays
        # held by another registrant (a fixed --instance-id reused too early).
        self.bootstrap.register(self.info, id_wait_s=REGISTER_ID_WAIT_S)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self.bootstrap.heartbeat_forever,
            args=(self.info, cfg.disaggregation_heartbeat_s, self._stop),
            name="bootstrap-heartbeat",
            daemon=True,
        )
        self._heartbeat.start()
        logger.info("registered %s as %s at %s", self.instance_id, cfg.disaggregation_mode, cfg.disaggregation_bootstrap_url)

    def add_peer(self, peer_info: bytes) -> str:
        """Load a peer's transfer metadata (layouts checked); its name. A returning peer is kept."""
        name = self.agent.add_peer(peer_info)
        self.retiring_peers.discard(name)
        return name

    def retire_peer(self, name: str) -> None:
        """The peer's instance is gone: let the peer go once its rooms are."""
        self.retiring_peers.add(name)

    def retire_idle_peers(self, busy: set[str]) -> set[str]:
        """Remove retiring peers that no room in ``busy`` uses any more; their names."""
        if not self.retiring_peers:
            return set()
        idle = self.retiring_peers - busy
        for name in idle:
            self.agent.remove_peer(name)
        self.retiring_peers &= busy
        return idle

    def stats(self, queues: dict[str, int], **rooms: int) -> RoleStats:
        """The role's stats: ``queues`` are its queue gauges' values, ``rooms``
        its room counts (``RoleStats`` fields)."""
        agent = self.agent.stats()
        return RoleStats(metrics=self.metrics.snapshot(queues), instance_id=self.instance_id,
                         num_transfer_peers=agent.num_peers, num_transfer_rooms=agent.num_rooms, **rooms)

    def close(self) -> None:
        self._stop.set()
        try:
            self.bootstrap.deregister(self.instance_id)
        except Exception as exc:  # the registry may already be gone at shutdown
            logger.warning("deregistering from bootstrap failed: %s", exc)
        self.agent.close()
