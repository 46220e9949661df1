"""A threaded loopback TCP proxy that breaks links the way real networks do.

Between the agent and the broker: ``cut(rst=True)`` resets every connection
(SO_LINGER 0, the peer reads ECONNRESET), ``cut(rst=False)`` closes them with a
FIN, ``black_hole()`` keeps every socket open but silently drops all bytes (new
connections are accepted and go nowhere, so even the TLS handshake hangs),
``drop_replies()`` drops only what comes back from the broker (acks get lost),
``refuse()`` resets new connections at once, and ``flap(period_s)`` cuts every
connection every ``period_s`` seconds until ``steady()``. ``latency_s`` delays
every chunk each way (a slow uplink), so a backlog takes long enough to be cut
mid-upload.

Each connection is a pair of sockets pumped by two threads; pumps poll with a
short timeout, so every state change takes effect within ``POLL_S``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
POLL_S = 0.05
CHUNK = 65_536


class Mode(enum.StrEnum):
    FORWARD = "forward"
    BLACK_HOLE = "black_hole"  # read and drop everything, both ways; accept but never connect upstream
    DROP_REPLIES = "drop_replies"  # forward towards the broker, drop everything coming back (acks lost)
    REFUSE = "refuse"  # reset new connections as soon as they are accepted


def _close(sock: socket.socket, *, rst: bool) -> None:
    with contextlib.suppress(OSError):
        if rst:  # linger on, timeout 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)  # wakes a pump blocked in recv, sends nothing
        else:
            sock.shutdown(socket.SHUT_RDWR)  # FIN now
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: client side and (unless black-holed from the start) upstream side."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.bytes_down = 0

    def start(self) -> None:
        self.client.settimeout(POLL_S)
        threading.Thread(target=self._pump, args=(self.client, True), name="proxy-up", daemon=True).start()
        if self.upstream is not None:
            self.upstream.settimeout(POLL_S)
            threading.Thread(target=self._pump, args=(self.upstream, False), name="proxy-down", daemon=True).start()

    def _pump(self, src: socket.socket, up: bool) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(CHUNK)
            except TimeoutError:
                continue
            except OSError:
                if src is self.client and not self.closed.is_set():
                    self.proxy._client_closed()
                self.close(rst=False)
                return
            if not data:  # the peer closed: pass the close on
                if src is self.client and not self.closed.is_set():
                    self.proxy._client_closed()
                self.close(rst=False)
                return
            mode = self.proxy.mode
            if mode is Mode.BLACK_HOLE or (mode is Mode.DROP_REPLIES and not up) or self.upstream is None:
                continue  # swallowed
            if self.proxy.latency_s:
                time.sleep(self.proxy.latency_s)  # a slow link: every chunk, each way
            dst = self.upstream if up else self.client
            try:
                dst.sendall(data)
            except OSError:
                self.close(rst=False)
                return
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)

    def close(self, *, rst: bool) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        _close(self.client, rst=rst)
        if self.upstream is not None:
            _close(self.upstream, rst=rst)
        self.proxy._forget(self)


class TcpProxy:
    """``with TcpProxy(broker_port) as proxy:`` listens on ``proxy.port`` (loopback) and forwards."""

    def __init__(
        self,
        target_port: int,
        target_host: str = LOOPBACK,
        *,
        port: int = 0,
        latency_s: float = 0.0,
        admit: Callable[[socket.socket], bool] | None = None,
    ) -> None:
        """``admit``: judges each new client connection before it is forwarded (a cloud fake's gate, e.g.
        testbed/clouds/aws_fake.py's SNI check); a connection it refuses is reset."""
        self.target = (target_host, target_port)
        self.admit = admit
        self.latency_s = latency_s
        self.mode = Mode.FORWARD
        self.accepted = 0
        self.cuts = 0
        self.accepted_at: list[float] = []  # time.monotonic() of every accepted connection
        self.client_closed_at: list[float] = []  # ... of every close the client side made (not our cuts)
        self._listener = socket.create_server((LOOPBACK, port), reuse_port=False)
        self._listener.settimeout(POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flap_stop = threading.Event()
        self._flapper: threading.Thread | None = None
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    @property
    def endpoint(self) -> str:
        """For the agent's ``mqtt.endpoint``: the broker certificate names localhost."""
        return f"mqtts://localhost:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def close(self) -> None:
        self.steady()
        self._stop.set()
        self._acceptor.join(timeout=2)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut(rst=True, count=False)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self.close()

    # --- faults ----------------------------------------------------------------------------------
    def forward(self) -> None:
        """Back to normal for new connections (black-holed ones stay dead, as after a real outage)."""
        self.mode = Mode.FORWARD

    def black_hole(self) -> None:
        self.mode = Mode.BLACK_HOLE

    def drop_replies(self) -> None:
        """One-way black hole: what the agent sends still arrives, nothing comes back (PUBACKs, acks, PINGRESP)."""
        self.mode = Mode.DROP_REPLIES

    def refuse(self) -> None:
        self.mode = Mode.REFUSE

    def cut(self, *, rst: bool, count: bool = True) -> int:
        """Close every open connection, with RST or FIN; returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close(rst=rst)
        if count and pairs:
            self.cuts += 1
        return len(pairs)

    def flap(self, period_s: float, *, rst: bool = True) -> None:
        """Cut every connection every ``period_s`` seconds (in the background) until ``steady()``."""
        self.steady()
        self._flap_stop.clear()

        def loop() -> None:
            while not self._flap_stop.wait(period_s):
                self.cut(rst=rst)

        self._flapper = threading.Thread(target=loop, name="proxy-flap", daemon=True)
        self._flapper.start()

    def steady(self) -> None:
        self._flap_stop.set()
        if self._flapper is not None:
            self._flapper.join(timeout=2)
            self._flapper = None

    # --- internals -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.accepted_at.append(time.monotonic())
            mode = self.mode
            if mode is Mode.REFUSE or (mode is Mode.FORWARD and self.admit is not None and not self.admit(client)):
                _close(client, rst=True)
                continue
            upstream: socket.socket | None = None
            if mode is Mode.FORWARD:
                try:
                    upstream = socket.create_connection(self.target, timeout=2)
                except OSError as exc:  # broker down: the agent sees its connection reset
                    log.info("proxy: upstream %s:%d: %s", *self.target, exc)
                    _close(client, rst=True)
                    continue
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, client, upstream)
            with self._lock:
                self._pairs.add(pair)
            pair.start()

    def _client_closed(self) -> None:
        self.client_closed_at.append(time.monotonic())

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

