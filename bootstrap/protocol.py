"""What an instance tells the bootstrap service about itself, and its JSON form.

The bootstrap service speaks JSON over HTTP (curl-friendly, and the router reads
it too); :class:`InstanceInfo` is the one typed record that crosses it. The
transfer layer's agent metadata is opaque bytes, carried base64-encoded in
``peer_info`` so the JSON stays text.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from pdserve.common.kv_layout import KVLayout
from pdserve.common.roles import Role

# The version of everything a prefill and a decode instance exchange: the
# control-channel messages (transfer/pd_messages.py), the transfer notices and
# agent metadata (transfer/messages.py) and the page layout. Bump it when any
# of them changes shape or meaning; the bootstrap service refuses to let two
# versions pair, naming both. 3: instance epochs (``epoch`` here, ``PeerHello``
# and ``KVPagesRequest.prefill_epoch`` on the control channel), and KV layouts
# that say which heads a rank holds (a room moves one part per pair of ranks).
# 4: the agent metadata carries its KV layout as a typed message (``kv_layout``),
# and a ucx agent's address is a ``UcxAddress``. 5: P keeps the rooms of its
# prefill backlog alive (``RoomsInPrefill``).
PD_PROTOCOL_VERSION = 5

# The header that carries a registrant's token (drawn once per process) on
# register, heartbeat and delete, and the error code of a 409 that says the
# instance_id is live under another token.
TOKEN_HEADER = "X-PDServe-Registration-Token"
ID_IN_USE = "instance_id_in_use"

_STR_FIELDS = ("instance_id", "role", "http_url", "control_address", "transfer_backend",
               "peer_info", "model")
_LAYOUT_INT_FIELDS = ("num_layers", "num_pages", "page_size", "num_kv_heads", "head_dim")


class InvalidInstanceInfo(ValueError):
    """The JSON does not describe a valid instance; the message says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def encode_peer_info(data: bytes) -> str:
    """Base64 text for the opaque transfer-agent metadata."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, kw_only=True)
class InstanceInfo:
    instance_id: str
    role: Role  # its name on the wire; "null" is a colocated instance
    http_url: str  # e.g. "http://10.0.0.2:31000", no trailing slash
    control_address: str  # "host:port" of the PD control channel
    transfer_backend: str  # "nixl" | "ucx" | "cuda_ipc"
    peer_info: str  # base64 of the transfer agent's metadata
    kv_layout: KVLayout
    model: str  # served model name
    pd_protocol_version: int = PD_PROTOCOL_VERSION
    # Random per process start: a restarted instance (same instance_id and
    # addresses) is a new peer, never confused with its old self.
    epoch: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))  # its name works too

    @property
    def peer_info_bytes(self) -> bytes:
        return base64.b64decode(self.peer_info)

    @property
    def control_host_port(self) -> tuple[str, int]:
        host, _, port = self.control_address.rpartition(":")
        return host, int(port)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in _STR_FIELDS}
        data["role"] = self.role.value
        data["kv_layout"] = self.kv_layout.to_dict()
        data["pd_protocol_version"] = self.pd_protocol_version
        data["epoch"] = self.epoch
        return data

    @classmethod
    def from_json(cls, data: Any) -> InstanceInfo:
        """Validate untrusted JSON; raises :class:`InvalidInstanceInfo`."""
        if not isinstance(data, dict):
            raise InvalidInstanceInfo("instance info must be a JSON object")
        fields = {name: _require_str(data, name) for name in _STR_FIELDS}
        _check_fields(fields)
        layout = _parse_layout(data.get("kv_layout"))
        epoch = data.get("epoch", "")
        if not isinstance(epoch, str):
            raise InvalidInstanceInfo(f"field 'epoch' must be a string, got {type(epoch).__name__}", "epoch")
        return cls(kv_layout=layout, pd_protocol_version=_protocol_version(data), epoch=epoch, **fields)


def _require_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise InvalidInstanceInfo(f"field '{name}' {kind}", param=name)
    return value


def _protocol_version(data: dict[str, Any]) -> int:
    """A record without the field predates versioning: version 1."""
    value = data.get("pd_protocol_version", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInstanceInfo(
            f"field 'pd_protocol_version' must be a positive integer, got {value!r}", "pd_protocol_version")
    return value


def _check_fields(fields: dict[str, str]) -> None:
    if not fields["instance_id"]:
        raise InvalidInstanceInfo("field 'instance_id' must not be empty", "instance_id")
    if fields["role"] not in Role.names():
        raise InvalidInstanceInfo(
            f"field 'role' must be one of {', '.join(Role.names())}, got '{fields['role']}'", "role")
    if not fields["http_url"].startswith(("http://", "https://")):
        raise InvalidInstanceInfo(
            f"field 'http_url' must start with http:// or https://, got '{fields['http_url']}'",
            "http_url")
    host, sep, port = fields["control_address"].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInstanceInfo(
            f"field 'control_address' must be 'host:port', got '{fields['control_address']}'",
            "control_address")
    try:
        base64.b64decode(fields["peer_info"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInstanceInfo("field 'peer_info' must be base64", "peer_info") from None


def _parse_layout(raw: Any) -> KVLayout:
    if not isinstance(raw, dict):
        raise InvalidInstanceInfo("field 'kv_layout' must be an object", "kv_layout")
    for name in _LAYOUT_INT_FIELDS:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInstanceInfo(
                f"field 'kv_layout.{name}' must be a positive integer, got {value!r}",
                f"kv_layout.{name}")
    layout = KVLayout.from_dict(raw)
    try:
        layout.itemsize  # noqa: B018 - raises for a dtype the pool cannot hold
    except (KeyError, TypeError):
        raise InvalidInstanceInfo(
            f"field 'kv_layout.dtype' is not a supported KV dtype: {raw.get('dtype')!r}",
            "kv_layout.dtype") from None
    return layout
