"""Tests of proxyguard.py: pure protocol tests first, then real processes on loopback.

Run: python3 -m pytest -q proxyguard_test.py  (every test has a time bound: pytest-timeout)

The process tests start `python3 proxyguard.py` as subprocesses, with a UDP echo thread standing
in for WireGuard behind the server and a UDP socket standing in for WireGuard in front of the
client. Only loopback addresses are used.
"""

import contextlib
import os
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
