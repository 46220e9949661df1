"""The CONNECT tunnel's pure parts (request, answer, messages), the proxy password file, the route order."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from agent.config import Endpoint, MqttSection
from agent.errors import BrokerUnreachable, ConfigError, LinkTimeout, TlsError
from agent.link.mqtt import LinkSettings, TlsFiles
from agent.link.proxy import (
    ProxyAuthRequired,
    ProxyError,
    ProxySettings,
    check_status,
    connect_request,
    parse_connect_response,
    parse_proxy,
    proxy_from_config,
    read_password,
)
from agent.link.routes import falls_back, link_routes, sticky_order


def test_parse_proxy_forms_and_refusals() -> None:
    assert parse_proxy("http://proxy.example:3128") == ProxySettings("proxy.example", 3128)
    assert parse_proxy("http://tech@10.0.0.1:8080/") == ProxySettings("10.0.0.1", 8080, "tech")
    assert parse_proxy("http://[fd00::1]:3128").host == "fd00::1"
    for bad in ("proxy:3128", "https://p:3128", "http://u:pw@p:3128", "http://p", "http://p:0", "http://p:70000"):
        with pytest.raises(ConfigError, match=r"mqtt\.proxy"):
            parse_proxy(bad)


def test_password_never_in_repr_or_name() -> None:
    proxy = ProxySettings("p", 3128, "tech", "hunter2")
    assert "hunter2" not in repr(proxy)
    assert "hunter2" not in str(proxy)
    assert str(proxy) == "http://tech@p:3128"


def test_connect_request_with_and_without_basic_auth() -> None:
    plain = connect_request("broker.example", 8883, ProxySettings("p", 1))
    assert plain == b"CONNECT broker.example:8883 HTTP/1.1\r\nHost: broker.example:8883\r\n\r\n"
    auth = connect_request("::1", 443, ProxySettings("p", 1, "tech", "pa:ss"))
    assert auth.startswith(b"CONNECT [::1]:443 HTTP/1.1\r\n")
    token = base64.b64encode(b"tech:pa:ss").decode()
    assert f"Proxy-Authorization: Basic {token}\r\n\r\n".encode() in auth


def test_answers() -> None:
    assert parse_connect_response(b"HTTP/1.0 200 Connection established\r\n\r\n") == (200, "Connection established")
    assert parse_connect_response(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n")[0] == 407
    with pytest.raises(ProxyError, match="did not answer in HTTP"):
        parse_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n")
    proxy = ProxySettings("p", 3128)
    check_status(200, "ok", proxy, "b:1")
    with pytest.raises(ProxyAuthRequired, match="none are configured") as auth:
        check_status(407, "Proxy Authentication Required", proxy, "b:1")
    assert auth.value.exit_code == 48
    with pytest.raises(ProxyAuthRequired, match="user or password was refused"):
        check_status(407, "x", ProxySettings("p", 3128, "tech", "pw"), "b:1")
    with pytest.raises(ProxyAuthRequired, match=r"\(401 Unauthorized\)"):  # tinyproxy's answer to wrong credentials
        check_status(401, "Unauthorized", ProxySettings("p", 3128, "tech", "pw"), "b:1")
    with pytest.raises(ProxyError, match=r"refused the tunnel to b:8883 \(403 Access violation\)") as refused:
        check_status(403, "Access violation", proxy, "b:8883")
    assert refused.value.exit_code == 47


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "proxy_password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_password(secret)
    secret.chmod(0o600)
    assert read_password(secret) == "hunter2"
    assert proxy_from_config("http://tech@p:1", "", tmp_path) == ProxySettings("p", 1, "tech", "hunter2")
    assert proxy_from_config("http://p:1", str(tmp_path / "absent"), tmp_path) == ProxySettings("p", 1)  # no user: not read
    assert proxy_from_config("", "", tmp_path) is None
    with pytest.raises(ConfigError, match="not found"):
        proxy_from_config("http://tech@p:1", str(tmp_path / "absent"), tmp_path)


BASE = LinkSettings("h", 1, "dev", TlsFiles(Path("ca"), Path("crt"), Path("key")))
EP = Endpoint("broker.example", 8883)


def test_routes_by_transport() -> None:
    assert [r.describe() for r in link_routes(MqttSection(), EP, BASE, None)] == ["mqtts://broker.example:8883"]
    ws = "wss://broker.example:443/mqtt"
    auto = link_routes(MqttSection(ws_endpoint=ws), EP, BASE, ProxySettings("p", 3128, "t", "pw"))
    assert [r.describe() for r in auto] == [
        "mqtts://broker.example:8883 via proxy http://t@p:3128",
        "wss://broker.example:443/mqtt via proxy http://t@p:3128",
    ]
    assert all(r.tls == BASE.tls and r.client_id == "dev" for r in auto)  # same identity, same pinned CA
    only_ws = link_routes(MqttSection(transport="websockets", ws_endpoint=ws), EP, BASE, None)
    assert [(r.transport, r.port, r.ws_path) for r in only_ws] == [("websockets", 443, "/mqtt")]
    assert len(link_routes(MqttSection(transport="tcp", ws_endpoint=ws), EP, BASE, None)) == 1


def test_fallback_only_when_the_broker_was_not_reached() -> None:
    assert falls_back(BrokerUnreachable("refused"))
    assert falls_back(LinkTimeout("t"))
    assert falls_back(ProxyError("403"))  # a proxy that allows 443 only
    assert not falls_back(ProxyAuthRequired("407"))
    assert not falls_back(TlsError("not signed by the pinned fleet CA"))  # an intercepting proxy: never routed around
    assert sticky_order((BASE, BASE), 0) == [0, 1]
    assert sticky_order((BASE, BASE), 1) == [1, 0]


def test_config_options(tmp_path: Path) -> None:
    from agent.config import SETTABLE_KEYS, load_config

    uci = tmp_path / "glucoagent"
    uci.write_text(
        "config mqtt 'mqtt'\n\toption transport 'auto'\n\toption ws_endpoint 'wss://b.example:443/mqtt'\n"
        "\toption proxy 'http://tech@p.example:3128'\n"
    )
    cfg = load_config(uci)
    assert (cfg.mqtt.transport, cfg.mqtt.ws_endpoint, cfg.mqtt.proxy) == (
        "auto",
        "wss://b.example:443/mqtt",
        "http://tech@p.example:3128",
    )
    uci.write_text("config mqtt 'mqtt'\n\toption transport 'websockets'\n")
    with pytest.raises(ConfigError, match=r"needs mqtt\.ws_endpoint"):
        load_config(uci)
    uci.write_text("config mqtt 'mqtt'\n\toption ws_endpoint 'https://b:443/mqtt'\n")
    with pytest.raises(ConfigError, match=r":2: mqtt\.ws_endpoint: expected wss://"):
        load_config(uci)
    assert "mqtt.proxy" not in SETTABLE_KEYS  # the cloud cannot redirect the box through a proxy of its choosing
