"""Tests of proxyguard.py: pure protocol tests first, then real processes on loopback.

Run: python3 -m pytest -q proxyguard_test.py  (every test has a time bound: pytest-timeout)

The process tests start `python3 proxyguard.py` as subprocesses, with a UDP echo thread standing
in for WireGuard behind the server and a UDP socket standing in for WireGuard in front of the
client. Only loopback addresses are used.
"""

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import proxyguard as pg

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "proxyguard.py")
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.timeout(60)


# =============================================================================================
# Helpers: ports, a UDP echo, proxyguard processes, a WireGuard stand-in
# =============================================================================================


def free_port(kind=socket.SOCK_STREAM):
    """A port that is free on 127.0.0.1 for both TCP and UDP right now."""
    while True:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as check:
            try:
                check.bind((LOOPBACK, port))
            except OSError:
                continue
        return port


class UdpEcho:
    """A UDP echo on 127.0.0.1 in a daemon thread: stands in for WireGuard behind the server."""

    def __init__(self, port=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOOPBACK, port or 0))
        self.port = self.sock.getsockname()[1]
        self.sources = set()
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                data, source = self.sock.recvfrom(70000)
                self.sources.add(source)
                self.count += 1
                self.sock.sendto(data, source)
            except OSError:
                return

    def close(self):
        self.sock.close()


class Proc:
    """A `python3 proxyguard.py ...` subprocess whose log goes to a file we can search."""

    def __init__(self, tmp_path, args, ready="listening on", name="pg", env=None, wait=True):
        self.log_path = tmp_path / ("%s-%d.log" % (name, time.monotonic_ns()))
        self.log_file = open(self.log_path, "w")
        self.args = list(args)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen([sys.executable, SCRIPT] + self.args,
                                      stdin=subprocess.DEVNULL, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, env=full_env)
        if wait and ready:
            self.wait_log(ready)

    def log(self):
        return self.log_path.read_text()

    def wait_log(self, text, timeout=10, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError("%r not seen %d times in log (exit %r):\n%s"
                             % (text, count, self.popen.poll(), self.log()))

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Signal the process, wait, and return its exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.log_file.close()


def start_server(tmp_path, wireguard_port, *extra, port=None, name="server"):
    port = port or free_port()
    proc = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, port),
                           "--to", "%s:%d" % (LOOPBACK, wireguard_port)] + list(extra),
                name=name)
    proc.port = port
    return proc


def start_client(tmp_path, url, *extra, name="client"):
    listen_port = free_port(socket.SOCK_DGRAM)
    wireguard = WireGuardStandIn()
    proc = Proc(tmp_path, ["client", "--to", url, "--listen-port", str(listen_port),
                           "--forward-port", str(wireguard.port)] + list(extra), name=name)
    wireguard.endpoint = (LOOPBACK, listen_port)
    proc.wireguard = wireguard
    return proc


class WireGuardStandIn:
    """A UDP socket in front of the client, as WireGuard with ListenPort and Endpoint set."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = None

    def send(self, data):
        self.sock.sendto(data, self.endpoint)

    def recv(self, timeout=5):
        self.sock.settimeout(timeout)
        return self.sock.recvfrom(70000)[0]

    def roundtrip(self, data, timeout=5):
        self.send(data)
        return self.recv(timeout)


def numbered(index, size):
    """A datagram of `size` bytes that starts with its index (4 bytes) and is unlike others."""
    head = struct.pack("!I", index)
    body = bytes((index + i) & 0xFF for i in range(256)) * (size // 256 + 1)
    return (head + body)[:size]


@pytest.fixture
def echo():
    server = UdpEcho()
    yield server
    server.close()


@pytest.fixture
def procs():
    """Processes to clean up: tests append Procs; leftovers are killed."""
    started = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def tunnel(tmp_path, echo, procs):
    """echo <- server <- client <- WireGuardStandIn, all up; yields (server, client)."""
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/proxyguard" % (LOOPBACK, server.port))
    procs.append(client)
    yield server, client


def raw_exchange(port, data, timeout=5, read_all=True):
    """Send `data` on a new TCP connection to the server; return what comes back until close."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)


UPGRADE = pg.build_upgrade_request("example", "/")


# =============================================================================================
# Pure protocol: frames
# =============================================================================================

FRAME_SIZES = [0, 1, 1420, 65507, 65535]


def test_encode_frame_prefixes_big_endian_length():
    assert pg.encode_frame(b"abc") == b"\x00\x03abc"
    assert pg.encode_frame(b"") == b"\x00\x00"
    assert pg.encode_frame(b"x" * 65535)[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        pg.encode_frame(b"x" * 65536)
    assert pg.encode_frames([b"a", b"", b"bc"]) == b"\x00\x01a\x00\x00\x00\x02bc"


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_decoder_every_split_point_of_one_frame(size):
    datagram = numbered(7, size)
    stream = pg.encode_frame(datagram)
    points = range(len(stream) + 1) if size < 2000 else list(range(0, 5)) + list(
        range(len(stream) - 4, len(stream) + 1)) + [len(stream) // 2, 1000, 40000]
    for split in points:
        decoder = pg.FrameDecoder()
        got = decoder.feed(stream[:split]) + decoder.feed(stream[split:])
        assert got == [datagram], split
        assert decoder.pending == 0


def test_decoder_several_frames_per_read_and_byte_by_byte():
    datagrams = [numbered(i, size) for i, size in enumerate(FRAME_SIZES * 2)]
    stream = b"".join(pg.encode_frame(d) for d in datagrams)
    assert pg.FrameDecoder().feed(stream) == datagrams
    decoder = pg.FrameDecoder()
    small = [numbered(i, i % 50) for i in range(40)]
    small_stream = b"".join(pg.encode_frame(d) for d in small)
    got = []
    for i in range(len(small_stream)):
        got += decoder.feed(small_stream[i:i + 1])
    assert got == small


def test_decoder_every_split_point_of_mixed_stream():
    datagrams = [numbered(i, size) for i, size in enumerate([0, 1, 3, 0, 100, 2])]
    stream = b"".join(pg.encode_frame(d) for d in datagrams)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = pg.FrameDecoder()
            got = (decoder.feed(stream[:first]) + decoder.feed(stream[first:second])
                   + decoder.feed(stream[second:]))
            assert got == datagrams


def test_decoder_keeps_partial_frame_pending():
    decoder = pg.FrameDecoder()
    assert decoder.feed(b"\x00\x05ab") == []
    assert decoder.pending == 4
    assert decoder.feed(bytearray(b"cde\x00")) == [b"abcde"]
    assert decoder.pending == 1


# =============================================================================================
# Pure protocol: requests and responses
# =============================================================================================


def request(lines, method="GET", version="HTTP/1.1"):
    return ("%s / %s\r\n" % (method, version) + "".join(l + "\r\n" for l in lines)
            + "\r\n").encode()


def check(head):
    pg.check_upgrade_request(pg.parse_request(head))


def refusal(head):
    with pytest.raises(pg.HandshakeError) as info:
        check(head)
    return info.value


def test_client_request_bytes_match_the_original():
    assert pg.build_upgrade_request("vpn.example.org:8443", "/pg?x=1", "UA/1") == (
        b"GET /pg?x=1 HTTP/1.1\r\nHost: vpn.example.org:8443\r\nUser-Agent: UA/1\r\n"
        b"Connection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n")
    check(UPGRADE)


def test_upgrade_response_bytes_match_the_original():
    assert pg.UPGRADE_RESPONSE == (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade"
                                   b"\r\nUpgrade: UoTLV/1\r\n\r\n")
    assert len(pg.UPGRADE_RESPONSE) == 75


@pytest.mark.parametrize("lines", [
    ["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/1"],
    ["HOST: a", "connection: upgrade", "upgrade: uotlv/1"],
    ["Host: a", "Connection:  keep-alive, Upgrade ", "Upgrade:\tUoTLV/1"],
    ["Host: a", "Connection: keep-alive", "Connection: Upgrade", "Upgrade: UoTLV/1"],
    ["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/1", "X-Forwarded-For: 192.0.2.1"],
])
def test_good_upgrade_requests_pass(lines):
    check(request(lines))


def test_http10_without_host_and_bare_lf_pass():
    check(request(["Connection: Upgrade", "Upgrade: UoTLV/1"], version="HTTP/1.0"))
    check(b"GET /x HTTP/1.1\nHost: a\nConnection: Upgrade\nUpgrade: UoTLV/1\n\n")


@pytest.mark.parametrize("lines,status,text", [
    (["Host: a"], 426, "'Connection' header is not 'Upgrade', got: ''"),
    (["Host: a", "Connection: Upgrade", "Upgrade: websocket"], 426,
     "'Upgrade' header is not 'UoTLV/1', got: 'websocket'"),
    (["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/2"], 426, "got: 'UoTLV/2'"),
    (["Connection: Upgrade", "Upgrade: UoTLV/1"], 400, "Host"),
    (["Host: a", "Host: b", "Connection: Upgrade", "Upgrade: UoTLV/1"], 400, "Host"),
    (["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/1", "Content-Length: 5"], 400, "body"),
    (["Host: a", "Bad Header: x"], 400, "malformed header"),
    (["Host: a", " folded"], 400, "folded"),
    (["Host: a", "X: a\x01b"], 400, "control"),
])
def test_bad_upgrade_requests_get_the_right_status(lines, status, text):
    error = refusal(request(lines))
    assert error.status == status
    assert text in str(error)
    if status == 426:
        assert ("Upgrade", "UoTLV/1") in error.extra_headers


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD", "DELETE"])
def test_other_methods_get_405_with_allow(method):
    error = refusal(request(["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/1"], method))
    assert error.status == 405 and ("Allow", "GET") in error.extra_headers


@pytest.mark.parametrize("head,status", [
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTX/1.1\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
])
def test_malformed_requests(head, status):
    assert refusal(head).status == status


def test_error_response_is_complete_http():
    response = pg.build_response(426, "why", [("Connection", "Upgrade"), ("Upgrade", "UoTLV/1")])
    head, body = response.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: UoTLV/1" in head and b"\r\nConnection: Upgrade, close" in head
    assert b"Content-Length: 4" in head and body == b"why\n"


@pytest.mark.parametrize("head", [
    pg.UPGRADE_RESPONSE,
    b"HTTP/1.1 101 Switching Protocols\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n"
    b"Connection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n",
    b"http/1.1 101 switching protocols\r\nCONNECTION: upgrade\r\nupgrade: uotlv/1\r\n\r\n"
    .replace(b"http/1.1", b"HTTP/1.1"),
])
def test_good_upgrade_responses_pass(head):
    pg.check_upgrade_response(pg.parse_response(head))


@pytest.mark.parametrize("head,cause", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "captive portal"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://portal/login\r\n\r\n", "http://portal/login"),
    (b"HTTP/1.1 404 Not Found\r\n\r\n", "wrong path"),
    (b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n\r\n", "not a ProxyGuard"),
    (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "cannot reach"),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     "not a ProxyGuard server"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: UoTLV/1\r\n\r\n", "Connection: Upgrade"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not a web server"),
])
def test_refused_upgrades_name_the_likely_cause(head, cause):
    with pytest.raises(pg.UpgradeRefused) as info:
        pg.check_upgrade_response(pg.parse_response(head))
    assert cause in str(info.value)


def test_split_head():
    assert pg.split_head(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert pg.split_head(b"A\r\n\r\nrest") == (b"A\r\n\r\n", b"rest")
    assert pg.split_head(b"A\n\nrest") == (b"A\n\n", b"rest")


def test_server_url():
    url = pg.ServerURL("https://vpn.example.org/proxyguard?a=b")
    assert (url.tls, url.host, url.port, url.host_header, url.target) == (
        True, "vpn.example.org", 443, "vpn.example.org", "/proxyguard?a=b")
    url = pg.ServerURL("http://[::1]:8080")
    assert (url.host, url.port, url.host_header, url.target) == ("::1", 8080, "[::1]:8080", "/")
    for bad, text in [("vpn.example.org:443", "http://vpn.example.org:443/"),
                      ("ftp://x/", "scheme"), ("http://:80/", "host is missing"),
                      ("http://x:99999/", "not a valid URL")]:
        with pytest.raises(pg.UsageError) as info:
            pg.ServerURL(bad)
        assert text in str(info.value)


def test_parse_host_port():
    assert pg.parse_host_port("[::]:443", "--listen") == ("::", 443)
    assert pg.parse_host_port("127.0.0.1:51821", "--listen") == ("127.0.0.1", 51821)
    assert pg.parse_host_port(":51821", "--listen", default_host="0.0.0.0") == ("0.0.0.0", 51821)
    for bad in ["127.0.0.1", "::1:80", "host:0", "host:x", "[::1]80", ":1"]:
        with pytest.raises(pg.UsageError) as info:
            pg.parse_host_port(bad, "--to")
        assert "--to" in str(info.value)


def test_forwarded_client_walks_past_trusted_proxies():
    trusted = pg.parse_networks(pg.DEFAULT_TRUSTED_PROXIES, "--trusted-proxies")
    def client(lines, peer="127.0.0.1"):
        return pg.forwarded_client(pg.parse_request(request(["Host: a"] + lines)), peer, trusted)
    assert client(["X-Forwarded-For: 192.0.2.7"]) == "192.0.2.7"
    assert client(["X-Forwarded-For: 6.6.6.6, 192.0.2.7, 127.0.0.1"]) == "192.0.2.7"
    assert client(['Forwarded: for="[2001:db8::1]:4711";proto=https']) == "2001:db8::1"
    assert client(["Forwarded: for=192.0.2.60:3000, for=127.0.0.2",
                   "X-Forwarded-For: 6.6.6.6"]) == "192.0.2.60"
    assert client(["X-Forwarded-For: 192.0.2.7"], peer="192.0.2.99") is None
    assert client([]) is None
    with pytest.raises(pg.UsageError):
        pg.parse_networks("10.0.0.0/8,nonsense", "--trusted-proxies")


# =============================================================================================
# Real processes on loopback: the tunnel
# =============================================================================================


def test_datagrams_come_back_identical_and_in_order(tunnel, echo):
    server, client = tunnel
    wireguard = client.wireguard
    sizes = [1, 1420, 8000, 65507]
    for i, size in enumerate(sizes):
        assert wireguard.roundtrip(numbered(i, size)) == numbered(i, size)
    # A burst, in order.
    burst = [numbered(i, (1, 1420, 8000)[i % 3]) for i in range(300)]
    for datagram in burst:
        wireguard.send(datagram)
    assert [wireguard.recv() for _ in burst] == burst
    assert len(echo.sources) == 1
    assert client.stop() == 0 and server.stop() == 0
    for proc in (client, server):
        assert "tunnel down" in proc.log()
    assert "301 datagrams" in server.log() or "304 datagrams" in server.log()


def test_two_clients_stay_separate(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    url = "http://%s:%d/" % (LOOPBACK, server.port)
    first, second = start_client(tmp_path, url, name="c1"), start_client(tmp_path, url, name="c2")
    procs.extend([first, second])
    for i in range(50):
        first.wireguard.send(b"first %d" % i)
        second.wireguard.send(b"second %d" % i)
    assert [first.wireguard.recv() for _ in range(50)] == [b"first %d" % i for i in range(50)]
    assert [second.wireguard.recv() for _ in range(50)] == [b"second %d" % i for i in range(50)]
    # One connected UDP socket per tunnel: WireGuard sees two source ports.
    assert len(echo.sources) == 2
    server.wait_log("tunnel up", count=2)


def test_server_restart_loses_nothing_sent_after_it(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port))
    procs.append(client)
    wireguard = client.wireguard
    stop_flow = threading.Event()

    def flow():  # traffic that keeps flowing while the server dies
        i = 0
        while not stop_flow.is_set():
            wireguard.send(b"before %d" % i)
            i += 1
            time.sleep(0.002)

    assert wireguard.roundtrip(b"hello") == b"hello"
    flowing = threading.Thread(target=flow)
    flowing.start()
    time.sleep(0.3)
    server.kill()
    server = start_server(tmp_path, echo.port, port=server.port, name="server2")
    procs.append(server)
    stop_flow.set()
    flowing.join()
    after = [b"after %d" % i for i in range(200)]
    for datagram in after:
        wireguard.send(datagram)
    got = []
    deadline = time.monotonic() + 20
    while len([d for d in got if d.startswith(b"after")]) < len(after):
        got.append(wireguard.recv(timeout=max(0.1, deadline - time.monotonic())))
    assert [d for d in got if d.startswith(b"after")] == after
    client.wait_log("tunnel up", count=2)
    assert client.popen.poll() is None


def test_frames_split_anywhere_and_bytes_with_the_request(tmp_path, echo, procs):
    """A raw client: the first frame rides in the request's packet; then frames byte by byte."""
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    datagrams = [numbered(i, size) for i, size in enumerate([5, 0, 1420, 3])]
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(UPGRADE + pg.encode_frame(datagrams[0]))
        reply = sock.recv(len(pg.UPGRADE_RESPONSE))
        assert reply == pg.UPGRADE_RESPONSE
        for byte in b"".join(pg.encode_frame(d) for d in datagrams[1:]):
            sock.sendall(bytes([byte]))
        decoder = pg.FrameDecoder()
        got = []
        # The empty datagram reaches the echo, which sends back an empty datagram that is
        # dropped as the original does; the others come back.
        while len(got) < 3:
            got += decoder.feed(sock.recv(65536))
    assert got == [datagrams[0], datagrams[2], datagrams[3]]
    assert echo.count == 4


@pytest.mark.parametrize("size", [65508, 65535])
def test_oversized_frame_is_dropped_and_tunnel_goes_on(tmp_path, echo, procs, size):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(UPGRADE)
        assert sock.recv(75) == pg.UPGRADE_RESPONSE
        sock.sendall(pg.encode_frame(b"x" * size) + pg.encode_frame(b"after"))
        decoder = pg.FrameDecoder()
        got = []
        while not got:
            got += decoder.feed(sock.recv(65536))
        assert got == [b"after"]
    server.wait_log("dropped a %d-byte frame" % size)
    server.wait_log("1 oversized frames dropped")


def test_idle_timeout_closes_both_sides(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port, "--idle-timeout", "1.5")
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port),
                          "--idle-timeout", "1")
    procs.append(client)
    assert client.wireguard.roundtrip(b"ping") == b"ping"
    client.wait_log("tunnel down", timeout=5)
    server.wait_log("tunnel down", timeout=5)
    assert "(idle for 1s)" in client.log()
    # The next datagram opens a new tunnel at once (an idle close is no failure).
    assert client.wireguard.roundtrip(b"again") == b"again"
    client.wait_log("tunnel up", count=2)
    assert "next attempt" not in client.log()


def test_wireguard_restart_does_not_end_the_tunnel(tmp_path, procs):
    """ICMP port unreachable from a stopped WireGuard must not end the tunnel."""
    wireguard_port = free_port(socket.SOCK_DGRAM)
    server = start_server(tmp_path, wireguard_port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port))
    procs.append(client)
    for i in range(5):  # nothing listens: each send draws ICMP
        client.wireguard.send(b"lost %d" % i)
        time.sleep(0.05)
    server.wait_log("tunnel up")
    echo = UdpEcho(wireguard_port)
    try:
        assert client.wireguard.roundtrip(b"back") == b"back"
    finally:
        echo.close()
    assert "tunnel down" not in server.log()
    assert client.log().count("tunnel up") == 1


def test_client_is_lazy_and_sends_the_request_of_the_original(tmp_path, procs):
    """No connection before the first datagram; then the request, byte for byte."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        listener.settimeout(1)
        port = listener.getsockname()[1]
        client = start_client(tmp_path, "http://localhost:%d/pg?x=1" % port,
                              "--user-agent", "UA/1")
        procs.append(client)
        with pytest.raises(socket.timeout):
            listener.accept()
        client.wireguard.send(b"first")
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += conn.recv(1)
            assert head == pg.build_upgrade_request("localhost:%d" % port, "/pg?x=1", "UA/1")
            # A 101 with other case and a Date header is accepted; the queued datagram follows.
            conn.sendall(b"HTTP/1.1 101 switching\r\nDate: x\r\nconnection: UPGRADE\r\n"
                         b"upgrade: uotlv/1\r\n\r\n")
            decoder = pg.FrameDecoder()
            got = []
            while not got:
                got += decoder.feed(conn.recv(100))
            assert got == [b"first"]
            conn.sendall(pg.encode_frame(b"reply"))
            assert client.wireguard.recv() == b"reply"


def test_client_names_captive_portal_and_keeps_retrying(tmp_path, procs):
    """A portal answers 200 until the user logs in: log why, retry at the longest wait."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        listener.settimeout(5)
        client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, listener.getsockname()[1]))
        procs.append(client)
        client.wireguard.send(b"x")
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin")
        client.wait_log("captive portal")
        client.wait_log("next attempt in 10s")
        client.wireguard.send(b"y")
        listener.settimeout(15)
        conn, _ = listener.accept()  # it came back by itself, after the wait
        conn.close()
    assert client.popen.poll() is None
    assert client.stop() == 0


def test_reconnect_waits_grow_and_are_logged(tmp_path, procs):
    port = free_port()
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, port), "--connect-timeout", "1")
    procs.append(client)
    client.wireguard.send(b"x")
    client.wait_log("next attempt in 1s")
    client.wireguard.send(b"x")
    client.wait_log("next attempt in 2s", timeout=5)
    assert "connection refused" in client.log()


# =============================================================================================
# The server's answers to bad requests
# =============================================================================================


@pytest.fixture
def server(tmp_path, echo, procs):
    proc = start_server(tmp_path, echo.port, "--handshake-timeout", "1")
    procs.append(proc)
    return proc


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"426"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b"426"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n", b"405"),
    (b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n", b"400"),
    (b"hello\r\n\r\n", b"400"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
], ids=["no-upgrade", "websocket", "post", "no-host", "garbage", "http2", "huge-header"])
def test_bad_requests_get_an_http_answer_and_a_close(server, data, status):
    answer = raw_exchange(server.port, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body.endswith(b"\n") and b"Content-Length: %d" % len(body) in head
    if status == b"426":
        assert b"\r\nUpgrade: UoTLV/1\r\n" in head
    if status == b"405":
        assert b"\r\nAllow: GET\r\n" in head
    assert server.popen.poll() is None


def test_browser_and_requests_see_426(server):
    requests = pytest.importorskip("requests")
    response = requests.get("http://%s:%d/anything" % (LOOPBACK, server.port), timeout=5)
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "UoTLV/1"
    assert "'Connection' header is not 'Upgrade'" in response.text
    response = requests.post("http://%s:%d/" % (LOOPBACK, server.port), timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "GET"


def test_slow_handshake_is_closed_at_the_deadline(server):
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HT")
        answer = sock.recv(1000)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.8 < elapsed < 3
    server.wait_log("408")


def test_connection_token_list_is_accepted(server):
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                     b"Upgrade: UoTLV/1\r\n\r\n")
        assert sock.recv(100) == pg.UPGRADE_RESPONSE


def test_max_clients_answers_503_and_keeps_tunnels(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port, "--max-clients", "1")
    procs.append(server)
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as first:
        first.sendall(UPGRADE)
        assert first.recv(75) == pg.UPGRADE_RESPONSE
        answer = raw_exchange(server.port, UPGRADE)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 10" in answer
        first.sendall(pg.encode_frame(b"still here"))
        assert pg.FrameDecoder().feed(first.recv(100)) == [b"still here"]


# =============================================================================================
# Command line, config file, environment, exit status
# =============================================================================================


def run_cli(*args, env=None, timeout=20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGUARD_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_precedence_command_line_then_config_file_then_environment(tmp_path):
    conf = tmp_path / "client.conf"
    conf.write_text("mode = client\nto = http://file.example/\nlisten-port = 1111\n")
    env = {"PROXYGUARD_TO": "http://env.example/", "PROXYGUARD_LISTEN_PORT": "2222",
           "PROXYGUARD_FORWARD_PORT": "3333", "PROXYGUARD_IDLE_TIMEOUT": "7"}
    options = pg.parse_options(["-c", str(conf)], environ=env)
    assert options.mode == "client"
    assert options.to.host == "file.example"      # file beats environment
    assert options.listen_port == 1111
    assert options.forward_port == 3333           # environment beats default
    assert options.idle_timeout == 7.0
    options = pg.parse_options(["-c", str(conf), "--listen-port", "4444", "--to",
                                "http://cli.example/"], environ=env)
    assert (options.listen_port, options.to.host) == (4444, "cli.example")
    options = pg.parse_options(["server"], environ={"PROXYGUARD_LISTEN": "[::]:443"})
    assert options.listen == ("::", 443) and options.to == ("127.0.0.1", 51820)


def test_config_file_alone_runs_a_client(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    wireguard = WireGuardStandIn()
    listen_port = free_port(socket.SOCK_DGRAM)
    conf = tmp_path / "client.conf"
    conf.write_text("# a client\nmode = client\nto = http://%s:%d/pg\nlisten-port = %d\n"
                    "forward-port = %d\n" % (LOOPBACK, server.port, listen_port, wireguard.port))
    client = Proc(tmp_path, ["-c", str(conf)])
    procs.append(client)
    wireguard.endpoint = (LOOPBACK, listen_port)
    assert wireguard.roundtrip(b"from a config file") == b"from a config file"


def test_example_config_file_is_valid():
    options = pg.parse_options(["-c", os.path.join(HERE, "proxyguard.conf.example")], environ={})
    assert options.mode == "client" and options.to.host == "vpn.example.org"


@pytest.mark.parametrize("args,text", [
    (["client", "--to", "vpn.example.org:443"], "--to 'vpn.example.org:443' is not a URL: "
                                               "write http://vpn.example.org:443/"),
    (["client"], "--to is required"),
    ([], "--mode is required"),
    (["client", "--to", "http://x/", "--listen-port", "abc"], "--listen-port"),
    (["client", "--to", "http://x/", "--listen-port", "70000"], "--listen-port 70000"),
    (["client", "--to", "http://x/", "--peer-ips", "1.2.3.4,nope"], "'nope'"),
    (["server", "--listen", "0.0.0.0"], "--listen '0.0.0.0'"),
    (["server", "--idle-timeout", "-1"], "--idle-timeout"),
    (["server", "--tls-cert", "x.pem"], "--tls-cert and --tls-key"),
    (["sever"], "unrecognized arguments: sever"),
    (["-c", "/nonexistent.conf"], "/nonexistent.conf"),
])
def test_bad_values_exit_2_with_one_clear_line(args, text):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_value_names_the_variable():
    result = run_cli("server", env={"PROXYGUARD_IDLE_TIMEOUT": "soon"})
    assert result.returncode == 2 and "idle-timeout" in result.stderr


def test_port_taken_exits_1_and_sigterm_exits_0(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    result = run_cli("server", "--listen", "%s:%d" % (LOOPBACK, server.port))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:%d: address already in use" % server.port in result.stderr
    assert server.stop(signal.SIGTERM) == 0
    assert "stopping on SIGTERM" in server.log()


def test_sigint_exits_0_with_tunnels_closed(tunnel):
    server, client = tunnel
    assert client.wireguard.roundtrip(b"x") == b"x"
    assert client.stop(signal.SIGINT) == 0
    server.wait_log("tunnel down")
    assert server.stop(signal.SIGINT) == 0


def test_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0 and "PROXYGUARD_LISTEN_PORT" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and pg.__version__ in result.stdout


def test_runs_without_configargparse(tmp_path, echo, procs):
    """A router without pip: command-line options work; -c and env vars say what they need."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['configargparse'] = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli("server", "-c", "x.conf", env=env)
    assert result.returncode == 2 and "need the configargparse package" in result.stderr
    result = run_cli("server", env=dict(env, PROXYGUARD_LISTEN="127.0.0.1:1"))
    assert result.returncode == 2 and "PROXYGUARD_LISTEN" in result.stderr
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port))
    procs.append(client)
    server2 = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, free_port()),
                              "--to", "%s:%d" % (LOOPBACK, echo.port)], env=env)
    procs.append(server2)
    assert "configargparse" not in server2.log()
    assert client.wireguard.roundtrip(b"stdlib") == b"stdlib"


def test_code_runs_on_python_39():
    vermin = pytest.importorskip("vermin")
    result = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.argv[0] = 'vermin'; "
                             "sys.exit(vermin.main())", "--no-tips", "--violations",
                             "--target=3.9-", "--eval-annotations", SCRIPT],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Minimum required versions: 3." in result.stdout, result.stdout


def test_readme_and_example_config_document_every_option():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(HERE, "proxyguard.conf.example")) as f:
        example = f.read()
    for action in pg.build_parser()._actions:
        long_names = [name for name in action.option_strings if name.startswith("--")]
        if not long_names or long_names[0] in ("--help", "--version", "--config"):
            continue
        name = long_names[0]
        assert "| `%s`" % name in readme, name
        env = "PROXYGUARD_" + name[2:].upper().replace("-", "_")
        assert "`%s`" % env in readme, env
        assert re.search(r"^(# )?%s =" % re.escape(name[2:]), example, re.M), name


# =============================================================================================
# TLS: certificates made here with openssl; the server's own HTTPS; the client's checks
# =============================================================================================


def make_certificates(directory, name="server", hosts=("localhost", "127.0.0.1"), ca=None):
    """A test CA (unless `ca` is given) and a server certificate for `hosts`, with openssl.

    Returns a dict with the paths: ca, ca_key, cert, key.
    """
    directory = str(directory)
    run = lambda *args: subprocess.run(["openssl"] + list(args), check=True, cwd=directory,
                                       capture_output=True, timeout=60)
    if ca is None:
        ca = {"ca": os.path.join(directory, "ca.pem"), "ca_key": os.path.join(directory, "ca.key")}
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", ca["ca_key"], "-out", ca["ca"], "-days", "2",
            "-subj", "/CN=proxyguard.py test CA")
    key, cert = (os.path.join(directory, name + suffix) for suffix in (".key", ".pem"))
    san = ",".join(("IP:" if host[0].isdigit() or ":" in host else "DNS:") + host
                   for host in hosts)
    ext = os.path.join(directory, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n" % san)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", name + ".csr", "-subj", "/CN=%s" % hosts[0])
    run("x509", "-req", "-in", name + ".csr", "-CA", ca["ca"], "-CAkey", ca["ca_key"],
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-out", cert, "-days", "2",
        "-extfile", ext)
    return dict(ca, cert=cert, key=key)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(tmp_path, echo, procs, certs):
    proc = start_server(tmp_path, echo.port, "--tls-cert", certs["cert"], "--tls-key",
                        certs["key"])
    procs.append(proc)
    return proc


def test_tls_end_to_end(tmp_path, tls_server, procs, certs):
    client = start_client(tmp_path, "https://localhost:%d/pg" % tls_server.port,
                          "--ca-file", certs["ca"])
    procs.append(client)
    for i, size in enumerate([1, 1420, 8000, 65507]):
        assert client.wireguard.roundtrip(numbered(i, size)) == numbered(i, size)
    burst = [numbered(i, 1 + i * 7 % 1420) for i in range(500)]
    for datagram in burst:
        client.wireguard.send(datagram)
    assert [client.wireguard.recv() for _ in burst] == burst
    tls_server.wait_log("TLSv1.3")
    client.wait_log("TLSv1.3")


def test_check_reports_each_step(tls_server, certs):
    result = run_cli("check", "--to", "https://localhost:%d/x" % tls_server.port,
                     "--ca-file", certs["ca"])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("resolve  ok", "connect  ok", "tls      ok", "upgrade  ok", "result   ok"):
        assert step in out, out
    assert ("TLSv1.3, subject commonName=localhost, issuer commonName=proxyguard.py test CA, "
            "expires") in out
    assert "GET /x -> HTTP/1.1 101 Switching Protocols" in out
    result = run_cli("check", "--to", "https://localhost:%d/x" % tls_server.port)
    assert result.returncode == 1
    assert "tls      FAIL" in result.stdout and "--ca-file" in result.stdout


@pytest.mark.parametrize("url_host,extra,text", [
    ("localhost", [], "unable to get local issuer certificate (unknown CA"),
    ("wrong.example", ["--peer-ips", "127.0.0.1"], "Hostname mismatch"),
    ("localhost", ["PLAIN"], "WRONG_VERSION_NUMBER (not TLS: is the server plain http://?)"),
])
def test_tls_failures_say_why_and_retry_at_the_longest_wait(tmp_path, echo, procs, certs,
                                                            tls_server, url_host, extra, text):
    port = tls_server.port
    if extra == ["PLAIN"]:
        plain = start_server(tmp_path, echo.port, name="plain")
        procs.append(plain)
        port, extra = plain.port, ["--ca-file", certs["ca"]]
    elif extra:
        extra = extra + ["--ca-file", certs["ca"]]
    client = start_client(tmp_path, "https://%s:%d/" % (url_host, port), *extra)
    procs.append(client)
    client.wireguard.send(b"x")
    client.wait_log("next attempt in 10s")
    assert text in client.log()
    assert client.popen.poll() is None


def test_tls_12_only_front_end_needs_tls_min_version(tmp_path, procs, certs):
    """A front end without TLS 1.3 (Debian 12 nginx's default): one clear line, and the
    option that fixes it."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["cert"], certs["key"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    served = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(pg.UPGRADE_RESPONSE)
                    served.append(tls.version())
                    tls.recv(4096)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = run_cli("check", "--to", "https://localhost:%d/" % port, "--ca-file", certs["ca"])
        assert result.returncode == 1
        assert "TLS 1.3" in result.stdout and "--tls-min-version 1.2" in result.stdout
        result = run_cli("check", "--to", "https://localhost:%d/" % port, "--ca-file", certs["ca"],
                         "--tls-min-version", "1.2")
        assert result.returncode == 0, result.stdout
        assert served == ["TLSv1.2"]
    finally:
        listener.close()


def test_sighup_reloads_the_certificate_and_keeps_tunnels(tmp_path, echo, procs, certs):
    import ssl
    live = {"cert": str(tmp_path / "live.pem"), "key": str(tmp_path / "live.key")}
    for kind in ("cert", "key"):
        with open(certs[kind], "rb") as src, open(live[kind], "wb") as dst:
            dst.write(src.read())
    server = start_server(tmp_path, echo.port, "--tls-cert", live["cert"], "--tls-key",
                          live["key"])
    procs.append(server)
    client = start_client(tmp_path, "https://localhost:%d/" % server.port, "--ca-file", certs["ca"])
    procs.append(client)
    assert client.wireguard.roundtrip(b"before") == b"before"

    def served_serial():
        context = ssl.create_default_context(cafile=certs["ca"])
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.getpeercert()["serialNumber"]

    first = served_serial()
    renewed = make_certificates(tmp_path, name="renewed", ca=certs)
    for kind in ("cert", "key"):
        with open(renewed[kind], "rb") as src, open(live[kind] + ".new", "wb") as dst:
            dst.write(src.read())
        os.replace(live[kind] + ".new", live[kind])
    server.popen.send_signal(signal.SIGHUP)
    server.wait_log("certificate reloaded")
    assert served_serial() != first
    assert client.wireguard.roundtrip(b"after") == b"after"   # the open tunnel lives on
    assert client.log().count("tunnel up") == 1
    with open(live["key"], "w") as f:
        f.write("broken")
    server.popen.send_signal(signal.SIGHUP)
    server.wait_log("certificate reload failed, keeping the old one")
    assert served_serial() != first and server.popen.poll() is None


def test_server_certificate_that_does_not_load_exits_1(tmp_path, certs):
    result = run_cli("server", "--listen", "127.0.0.1:%d" % free_port(),
                     "--tls-cert", certs["cert"], "--tls-key", str(tmp_path / "missing.key"))
    assert result.returncode == 1 and "--tls-key" in result.stderr


# ---------------------------------------------------------------------------------------------
# Two threads on one TLS connection (tls-and-threads.md): 100 tunnels, thousands of frames
# each way at once, every byte checked. PROXYGUARD_TEST_NAIVE_TLS=1 swaps in a shared
# SSLSocket (the naive design) to show that this test catches its record corruption.
# ---------------------------------------------------------------------------------------------


class NaiveSSLSocketChannel(pg.PlainChannel):
    """The design tls-and-threads.md warns against: one SSLSocket, read and written by two
    threads at once. Only for PROXYGUARD_TEST_NAIVE_TLS=1."""

    @classmethod
    def open(cls, sock, context, server_side):
        return cls(context.wrap_socket(sock, server_side=server_side,
                                       server_hostname=None if server_side else "localhost"))


def open_tls_pair(listener, certs, naive):
    import ssl
    client_context = pg.client_tls_context(certs["ca"])
    server_context = pg.server_tls_context(certs["cert"], certs["key"])
    server_context.num_tickets = 2  # tickets are post-handshake traffic: make it harder
    raw_client = socket.create_connection(listener.getsockname())
    raw_server, _ = listener.accept()
    for sock in (raw_client, raw_server):
        sock.settimeout(30)
    result = {}

    def server_side():
        if naive:
            result["server"] = NaiveSSLSocketChannel.open(raw_server, server_context, True)
        else:
            channel = pg.TLSChannel(raw_server, server_context, server_side=True)
            channel.handshake()
            result["server"] = channel

    thread = threading.Thread(target=server_side)
    thread.start()
    if naive:
        client = NaiveSSLSocketChannel.open(raw_client, client_context, False)
    else:
        client = pg.TLSChannel(raw_client, client_context, server_side=False,
                               server_hostname="localhost")
        client.handshake()
    thread.join()
    return client, result["server"]


def pump_both_ways(channel, frames_out, expected_in, errors):
    """A writer thread sends `frames_out` while this thread reads and checks `expected_in`."""
    def write():
        try:
            for frame in frames_out:
                channel.sendall(frame)
        except Exception as exc:
            errors.append("write: %r" % exc)

    writer = threading.Thread(target=write)
    writer.start()
    decoder = pg.FrameDecoder()
    got = 0
    try:
        while got < len(expected_in):
            data = channel.recv(65536)
            if not data:
                errors.append("read: early EOF after %d frames" % got)
                break
            for datagram in decoder.feed(data):
                if datagram != expected_in[got]:
                    errors.append("read: frame %d differs" % got)
                    return
                got += 1
    except Exception as exc:
        errors.append("read: %r" % exc)
    finally:
        writer.join()


@pytest.mark.timeout(240)
def test_tls_two_threads_per_connection_never_corrupt(certs):
    import random
    naive = os.environ.get("PROXYGUARD_TEST_NAIVE_TLS") == "1"
    rng = random.Random(1)
    tunnels, frames_each_way, concurrent = 100, 2000, 10
    payload = os.urandom(1420)
    failures = []
    listener = socket.create_server((LOOPBACK, 0))
    try:
        for batch in range(tunnels // concurrent):
            threads = []
            for _ in range(concurrent):
                client, server = open_tls_pair(listener, certs, naive)
                up = [payload[:rng.randint(1, 1420)] for _ in range(frames_each_way)]
                down = [payload[:rng.randint(1, 1420)] for _ in range(frames_each_way)]
                errors = []
                for channel, out, expect in ((client, up, down), (server, down, up)):
                    frames = [pg.encode_frame(d) for d in out]
                    threads.append(threading.Thread(target=pump_both_ways,
                                                    args=(channel, frames, expect, errors)))
                threads[-1].errors = errors
                threads[-1].channels = (client, server)
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for thread in threads[1::2]:
                if thread.errors:
                    failures.append(thread.errors[0])
                for channel in thread.channels:
                    channel.shutdown()
                    channel.close()
    finally:
        listener.close()
    assert not failures, "%d of %d TLS connections failed: %s" % (
        len(failures), tunnels, sorted(set(failures))[:5])


def test_conflicting_lengths_and_control_characters_are_refused():
    good = ["Host: a", "Connection: Upgrade", "Upgrade: UoTLV/1"]
    assert refusal(request(good + ["Content-Length: 0", "Content-Length: 5"])).status == 400
    check(request(good + ["Content-Length: 0"]))
    assert refusal(b"GET /\x1b[2Jx HTTP/1.1\r\nHost: a\r\n\r\n").status == 400
    assert refusal(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n").status == 400
