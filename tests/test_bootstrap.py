"""The bootstrap service's HTTP API: registry, TTL, pairing refusals, bad input."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pdserve.bootstrap.protocol import PD_PROTOCOL_VERSION, TOKEN_HEADER, InstanceInfo
from pdserve.bootstrap.registry import InstanceRegistry
from pdserve.bootstrap.server import BootstrapConfig, create_app, parse_args
from pdserve.common.roles import Role
from pdserve.tests.support.clock import FakeClock
from pdserve.tests.support.fake_worker import FAKE_LAYOUT, make_info
from pdserve.tests.support.openai_errors import assert_openai_error

LAYOUT = FAKE_LAYOUT


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock) -> TestClient:
    registry = InstanceRegistry(ttl_s=10.0, clock=clock)
    return TestClient(create_app(BootstrapConfig(ttl_s=10.0), registry))


def test_register_lookup_list_delete(client: TestClient) -> None:
    p, d = make_info("p1"), make_info("d1", role="decode")
    for info in (p, d):
        assert client.post("/register", json=info.to_json()).status_code == 200
    got = InstanceInfo.from_json(client.get("/instances/p1").json())
    assert got == p
    assert got.peer_info_bytes == b"\x00agent-metadata\xff"
    assert {i["instance_id"] for i in client.get("/instances").json()} == {"p1", "d1"}
    assert [i["instance_id"] for i in client.get("/instances?role=decode").json()] == ["d1"]
    assert client.delete("/instances/p1").status_code == 200
    assert_openai_error(client.get("/instances/p1"), 404, "p1")
    assert_openai_error(client.delete("/instances/p1"), 404, "p1")
    assert client.get("/health").json()["num_instances"] == 1


def test_a_record_holds_its_role_as_a_role_and_sends_its_name() -> None:
    info = make_info("d1", role="decode")
    assert info.role is Role.DECODE and info.to_json()["role"] == "decode"
    assert InstanceInfo.from_json(info.to_json()) == info


def test_heartbeat_keeps_entry_alive_and_ttl_expires_it(client: TestClient, clock: FakeClock) -> None:
    client.post("/register", json=make_info("p1").to_json())
    clock.advance(8)
    assert client.post("/heartbeat", json={"instance_id": "p1"}).status_code == 200
    clock.advance(8)  # 16 s after registering, 8 s after the heartbeat
    assert client.get("/instances/p1").status_code == 200
    clock.advance(3)
    assert_openai_error(client.get("/instances/p1"), 404)
    assert client.get("/instances").json() == []
    assert_openai_error(client.post("/heartbeat", json={"instance_id": "p1"}), 404, "register again")


def test_layout_mismatch_with_other_role_is_refused_naming_both_values(client: TestClient) -> None:
    assert client.post("/register", json=make_info("p1").to_json()).status_code == 200
    bad = make_info("d1", role="decode", page_size=32)
    error = assert_openai_error(client.post("/register", json=bad.to_json()), 409,
                                "page_size", "16", "32", "'p1'", "'d1'")
    assert "dtype" not in error["message"]  # only the fields that differ
    assert_openai_error(client.get("/instances/d1"), 404)


def test_backend_and_same_role_mismatches_are_refused(client: TestClient) -> None:
    client.post("/register", json=make_info("p1").to_json())
    ucx = make_info("d1", role="decode", transfer_backend="ucx")
    assert_openai_error(client.post("/register", json=ucx.to_json()), 409, "transfer_backend", "nixl", "ucx")
    fp32 = make_info("p2", dtype="float32")
    assert_openai_error(client.post("/register", json=fp32.to_json()), 409, "dtype", "bfloat16", "float32")


def test_another_pd_protocol_version_is_refused_naming_both(client: TestClient) -> None:
    assert client.post("/register", json=make_info("p1").to_json()).status_code == 200
    older = {**make_info("d1", role="decode").to_json(), "pd_protocol_version": PD_PROTOCOL_VERSION - 1}
    assert_openai_error(client.post("/register", json=older), 409, "pd_protocol_version",
                        f"'d1'={PD_PROTOCOL_VERSION - 1}", f"'p1'={PD_PROTOCOL_VERSION}")
    legacy = make_info("d2", role="decode").to_json()
    del legacy["pd_protocol_version"]  # a record from before the field existed is version 1
    assert InstanceInfo.from_json(legacy).pd_protocol_version == 1
    assert_openai_error(client.post("/register", json={**legacy, "pd_protocol_version": "2"}), 400, "pd_protocol_version")
    assert client.post("/register", json=make_info("d3", role="decode").to_json()).status_code == 200


def test_pairing_rules_ignore_other_models_colocated_and_self(client: TestClient) -> None:
    client.post("/register", json=make_info("p1").to_json())
    other_model = make_info("d1", role="decode", page_size=32, model="other")
    assert client.post("/register", json=other_model.to_json()).status_code == 200
    colocated = make_info("c1", role="null", page_size=64)
    assert client.post("/register", json=colocated.to_json()).status_code == 200
    # A restarted instance may come back with a new layout under its own id.
    assert client.post("/register", json=make_info("p1", page_size=8).to_json()).status_code == 200


def test_expired_instance_no_longer_blocks_pairing(client: TestClient, clock: FakeClock) -> None:
    client.post("/register", json=make_info("p1").to_json())
    clock.advance(11)
    bad = make_info("d1", role="decode", head_dim=128)
    assert client.post("/register", json=bad.to_json()).status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"instance_id": "x"}', "'role'"),
    ],
)
def test_invalid_register_bodies_are_400(client: TestClient, body: bytes, fragment: str) -> None:
    response = client.post("/register", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, fragment)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("role", "router", "role"),
        ("control_address", "nohost", "control_address"),
        ("http_url", "127.0.0.1:5", "http_url"),
        ("peer_info", "not base64!", "peer_info"),
        ("kv_layout", {**LAYOUT.to_dict(), "page_size": 0}, "kv_layout.page_size"),
        ("kv_layout", {**LAYOUT.to_dict(), "dtype": "int3"}, "kv_layout.dtype"),
    ],
)
def test_invalid_instance_fields_are_400(client: TestClient, field: str, value: object,
                                         param: str) -> None:
    body = {**make_info("p1").to_json(), field: value}
    assert_openai_error(client.post("/register", json=body), 400, field, param=param)


def test_invalid_heartbeat_and_role_filter_are_400(client: TestClient) -> None:
    assert_openai_error(client.post("/heartbeat", json={}), 400, "instance_id")
    assert_openai_error(client.post("/heartbeat", content=b"x"), 400, "JSON")
    assert_openai_error(client.get("/instances?role=router"), 400, "role")


def test_cli_defaults_come_from_config() -> None:
    assert parse_args([]) == BootstrapConfig()
    assert parse_args(["--port", "9000", "--ttl-s", "2.5"]).ttl_s == 2.5


SECRET = "cluster-secret-xyz"


@pytest.fixture
def secured(clock: FakeClock) -> TestClient:
    registry = InstanceRegistry(ttl_s=10.0, clock=clock)
    return TestClient(create_app(BootstrapConfig(ttl_s=10.0, cluster_secret=SECRET), registry))


def _auth(token: str | None = None, secret: str = SECRET, scheme: str = "Bearer") -> dict[str, str]:
    headers = {"Authorization": f"{scheme} {secret}"}
    return {**headers, TOKEN_HEADER: token} if token else headers


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                                     {"Authorization": f"Basic {SECRET}"}])
def test_cluster_secret_guards_every_endpoint_but_health(secured: TestClient, headers: dict) -> None:
    calls = [("POST", "/register", make_info("p1").to_json()), ("POST", "/heartbeat", {"instance_id": "p1"}),
             ("DELETE", "/instances/p1", None), ("GET", "/instances", None), ("GET", "/instances/p1", None)]
    assert secured.post("/register", json=make_info("p1").to_json(), headers=_auth("t1")).status_code == 200
    for method, path, body in calls:
        response = secured.request(method, path, json=body, headers={**headers, TOKEN_HEADER: "t1"})
        assert_openai_error(response, 401, "cluster secret", code="invalid_api_key")
    assert secured.get("/health").status_code == 200
    # Nothing the refused calls asked for happened: p1 is still there, as registered.
    assert secured.get("/instances/p1", headers=_auth()).json() == make_info("p1").to_json()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_cluster_secret_scheme_is_case_insensitive(secured: TestClient, scheme: str) -> None:
    response = secured.post("/register", json=make_info("p1").to_json(), headers=_auth("t1", scheme=scheme))
    assert response.status_code == 200, response.text
    assert [i["instance_id"] for i in secured.get("/instances", headers=_auth(scheme=scheme)).json()] == ["p1"]


def test_a_live_instance_cannot_be_taken_over_by_another_registrant(secured: TestClient, clock: FakeClock) -> None:
    real = make_info("p1")
    assert secured.post("/register", json=real.to_json(), headers=_auth("owner")).status_code == 200
    impostor = make_info("p1", http_url="http://10.6.6.6:1")
    for token in ("impostor", None):
        headers = _auth(token)
        assert_openai_error(secured.post("/register", json=impostor.to_json(), headers=headers), 409,
                            "another process", param="instance_id", code="instance_id_in_use")
        assert_openai_error(secured.post("/heartbeat", json={"instance_id": "p1"}, headers=headers), 409,
                            "another process", code="instance_id_in_use")
        assert_openai_error(secured.delete("/instances/p1", headers=headers), 409, "another process")
    assert secured.get("/instances/p1", headers=_auth()).json()["http_url"] == real.http_url
    # The owner keeps it alive, re-registers it (a new layout after a restart of
    # the same process is its own business) and deletes it.
    assert secured.post("/heartbeat", json={"instance_id": "p1"}, headers=_auth("owner")).status_code == 200
    assert secured.post("/register", json=real.to_json(), headers=_auth("owner")).status_code == 200
    assert secured.delete("/instances/p1", headers=_auth("owner")).status_code == 200
    # Deleted: the id is free for a new registrant (a restarted instance).
    assert secured.post("/register", json=impostor.to_json(), headers=_auth("restarted")).status_code == 200


def test_an_expired_registration_frees_its_id(secured: TestClient, clock: FakeClock) -> None:
    assert secured.post("/register", json=make_info("p1").to_json(), headers=_auth("old")).status_code == 200
    clock.advance(9)
    assert secured.post("/register", json=make_info("p1").to_json(), headers=_auth("new")).status_code == 409
    clock.advance(2)  # 11 s after the old registrant's last word: expired
    assert secured.post("/register", json=make_info("p1").to_json(), headers=_auth("new")).status_code == 200
    assert_openai_error(secured.post("/heartbeat", json={"instance_id": "p1"}, headers=_auth("old")), 409)


def test_only_authenticated_registrants_count_for_pairing(secured: TestClient) -> None:
    # A first registration with another page size would lock real instances out:
    # without the secret it is refused, so it never counts.
    squatter = make_info("squatter", page_size=32)
    assert_openai_error(secured.post("/register", json=squatter.to_json()), 401)
    assert secured.post("/register", json=make_info("p1").to_json(), headers=_auth("a")).status_code == 200
    assert secured.post("/register", json=make_info("d1", role="decode").to_json(),
                        headers=_auth("b")).status_code == 200


def test_cluster_secret_from_file_or_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert parse_args(["--cluster-secret-file", str(path)]).cluster_secret == "from-file"
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "from-env")
    assert parse_args([]).cluster_secret == "from-env"
    assert parse_args(["--cluster-secret", "flag"]).cluster_secret == "flag"
    assert "from-env" not in repr(parse_args([]))
    path.write_text("  \n")
    with pytest.raises(SystemExit):
        parse_args(["--cluster-secret-file", str(path)])
    with pytest.raises(SystemExit):
        parse_args(["--cluster-secret-file", str(tmp_path / "missing")])


def test_server_info_shows_the_secret_only_as_set(secured: TestClient) -> None:
    response = secured.get("/get_server_info", headers=_auth())
    assert response.status_code == 200
    assert response.json()["config"]["cluster_secret"] == "<redacted>"
    assert SECRET not in response.text
