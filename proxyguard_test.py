"""Tests of proxyguard.py: pure protocol tests first, then real processes on loopback.

Run: python3 -m pytest -q proxyguard_test.py  (every test has a time bound: pytest-timeout)
The quick part, under a minute: python3 -m pytest -q -m "not slow" proxyguard_test.py

The process tests start `python3 proxyguard.py` as subprocesses, with a UDP echo thread standing
in for WireGuard behind the server and a UDP socket standing in for WireGuard in front of the
client. Only loopback addresses are used.
"""

import base64
import collections
import concurrent.futures
import contextlib
import contextvars
import ctypes
import errno
import io
import json
import logging
import mmap
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import quote

import pytest
import websockets.frames
import websockets.sync.client
import websockets.sync.server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, Pong,
                            Request)

import proxyguard as pg
# What the tests, the bed and the bench share (free ports, the original's Go build) lives in
# the bench: it runs on its own, so it cannot import the tests, and one more module would be one
# more file to ship beside the three (the bed imports it too).
import proxyguard_bench
from proxyguard_bench import NoReference, build_go, endpoint_ports, free_port
from proxyguard_testbed import (NETNS_DIR, VETH_CLIENT_IP, WG_PORT, WG_RUN_DIR, WireGuardBed,
                                 process_start_ticks, remove_stale_beds)
from proxyguard_testbed import VETH_SERVER_IP

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "proxyguard.py")
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.timeout(60)

# What a time bound allows beyond what the code promises (thread wake-ups and scheduling on a
# loaded 2-core machine), in seconds: one figure for every test that bounds a duration, as
# `promise + TIME_TOLERANCE` or, for "at once", `< TIME_TOLERANCE`.
TIME_TOLERANCE = 1.5

# The `slow` marker (registered in pyproject.toml): real servers, the corpus, floods and other
# long tests. `python3 -m pytest -q -m "not slow" proxyguard_test.py` runs the rest in under a
# minute; without -m everything runs.


def _end_session_on_sigterm(signum, frame):
    """SIGTERM (`timeout 150 pytest ...`, a cancelled CI job) ends the session as Ctrl-C does:
    pytest then runs the fixtures' finalisers, which take down the WireGuard bed's namespaces
    and processes, the front ends and the proxyguard processes. A second SIGTERM while that
    runs is ignored (SIGKILL still works; the bed's processes die with it, see the bed)."""
    if not _end_session_on_sigterm.received:
        _end_session_on_sigterm.received = True
        pytest.exit("stopped by SIGTERM: cleaning up", returncode=128 + signal.SIGTERM)


_end_session_on_sigterm.received = False
if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
    signal.signal(signal.SIGTERM, _end_session_on_sigterm)


# =============================================================================================
# Helpers: ports, a UDP echo, proxyguard processes, a WireGuard stand-in, UoTLV/1 frames
# =============================================================================================


def encode_frame(datagram):
    """One UoTLV/1 frame for `datagram` (at most 65535 bytes; ValueError beyond): the tests'
    peers write frames one by one (the product writes them in place, in batches)."""
    return pg.encode_frames([datagram])


class FrameDecoder:
    """Cut UoTLV/1 frames out of a TCP byte stream that may split them anywhere, as the tests'
    peers read them: `feed(data)` returns the whole datagrams completed by `data`, in order; a
    partial frame is kept for the next call; `pending` is how many bytes are held."""

    def __init__(self):
        self._buffer = bytearray()

    @property
    def pending(self):
        return len(self._buffer)

    def feed(self, data):
        buffer = self._buffer
        if buffer:
            buffer += data
            data = buffer
        with memoryview(data) as view:
            slices, pos = pg.cut_frames(view, len(view))
            datagrams = [datagram.tobytes() for datagram in slices]
            del slices  # the slices pin `buffer`, which must stay resizable
        if data is buffer:
            del buffer[:pos]
        else:
            buffer += data[pos:]
        return datagrams


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
                self.count += 1
                self.record(data, source)
                self.sock.sendto(data, source)
            except OSError:
                return

    def record(self, data, source):
        self.sources.add(source)

    def close(self):
        self.sock.close()


class Proc:
    """A `python3 proxyguard.py ...` subprocess whose log goes to a file we can search."""

    def __init__(self, tmp_path, args, ready="listening on", name="pg", env=None, wait=True,
                 prefix=(), preexec_fn=None, command=None):
        self.log_path = tmp_path / ("%s-%d.log" % (name, time.monotonic_ns()))
        self.log_file = open(self.log_path, "w")
        self.args = list(args)
        full_env = dict(os.environ)
        full_env.update(env or {})
        # `prefix`: a program that starts ours (systemd-socket-activate); `command`: ours
        # under another name (a console script).
        self.popen = subprocess.Popen(list(prefix) + list(command or [sys.executable, SCRIPT])
                                      + self.args,
                                      stdin=subprocess.DEVNULL, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, env=full_env,
                                      preexec_fn=preexec_fn)
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


def start_server(tmp_path, wireguard_port, *extra, port=None, name="server", prefix=()):
    port = port or free_port()
    proc = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, port),
                           "--to", "%s:%d" % (LOOPBACK, wireguard_port)] + list(extra),
                name=name, prefix=prefix)
    proc.port = port
    return proc


PROXY_ENV_NAMES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


def no_proxy_env():
    """Environment entries that hide any proxy of the machine running the tests (CI behind a
    corporate proxy would otherwise send our loopback tunnels to it). Empty counts as unset."""
    env = {}
    for name in PROXY_ENV_NAMES:
        env[name] = env[name.lower()] = ""
    return env


def skip_or_fail(reason):
    """Skip a test whose server or tool is missing, saying which; under CI (CI=true, set by
    the CI runner) fail instead: CI installs everything, so a skip there is a defect."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI must run this test: " + reason)
    pytest.skip(reason)


def which_or_skip(program, package):
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        skip_or_fail("%s is not installed (apt-get install %s)" % (program, package))
    return path


def start_client(tmp_path, url, *extra, name="client", env=None):
    """A client whose WireGuard is a WireGuardStandIn; proxy variables cleared unless `env`
    sets them."""
    listen_port = free_port(socket.SOCK_DGRAM)
    wireguard = WireGuardStandIn()
    full_env = no_proxy_env()
    full_env.update(env or {})
    proc = Proc(tmp_path, ["client", "--to", url, "--listen-port", str(listen_port),
                           "--forward-port", str(wireguard.port)] + list(extra), name=name,
                env=full_env)
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


UPGRADE = pg.build_upgrade_request("example", "/")

HANDSHAKE_TIMEOUT = 2.0
# Generous: 2 cores, shared with other engineers' test runs.
MARGIN = 4.0
CASE_LIMIT = HANDSHAKE_TIMEOUT + MARGIN

def wait_until(predicate, timeout, what, interval=0.02):
    """Poll `predicate` until it returns something true, and return that; AssertionError naming
    `what` after `timeout` seconds. For conditions no event announces (a counter, a socket
    state): tests wait on what happens, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %gs" % (what, timeout))
        time.sleep(interval)


def dump_until(proc, tunnels, good, what, timeout=10):
    """Send SIGUSR1 to `proc` until its dump's `tunnels` tunnel lines satisfy `good(lines)`;
    returns how many dumps it took. A pump counts a datagram once its send returned, so the
    answer may reach the test before the count (seen in CI): then it asks again."""
    dumps = []

    def dump():
        before = proc.log().count("SIGUSR1: tunnel ")
        dumps.append(before)
        proc.popen.send_signal(signal.SIGUSR1)
        proc.wait_log("SIGUSR1: tunnel ", count=before + tunnels)
        lines = [line for line in proc.log().splitlines() if "SIGUSR1: tunnel " in line]
        return good(lines[before:before + tunnels])

    wait_until(dump, timeout, what)
    return len(dumps)


def proc_stats(pid):
    """Threads, open fds and RSS (KiB) of process `pid`, from /proc."""
    with open("/proc/%d/status" % pid) as stream:
        status = stream.read()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return {"threads": threads, "fds": fds, "rss_kib": rss}


def udp_drops(address):
    """Datagrams the kernel dropped on the IPv4 UDP socket bound to `address` (ip, port) since
    it was made (its receive buffer was full): the last column of /proc/net/udp."""
    ip, port = address
    local = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(ip))[0], port)
    with open("/proc/net/udp") as stream:
        for line in stream.readlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[-1])
    raise AssertionError("no UDP socket bound to %s:%d" % address)


def wait_for_stats(pid, threads, fds, timeout=20.0):
    """Wait until the process is back to `threads` threads and at most `fds` fds; return stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = proc_stats(pid)
        if stats["threads"] <= threads and stats["fds"] <= fds:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def status_of(data):
    """The status code of an HTTP response, or None."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    return int(match.group(1)) if match else None


def set_rst_on_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class RawTunnel:
    """A UoTLV/1 tunnel done by hand: upgrade on a raw socket, then frames both ways."""

    def __init__(self, port, timeout=5.0, request=UPGRADE):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        buffer = b""
        deadline = time.monotonic() + timeout
        while True:
            parts = pg.split_head(buffer)
            if parts is not None:
                break
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(4096)
            if not chunk:
                self.sock.close()
                raise ConnectionError("closed before the upgrade answer: %r" % buffer[:200])
            buffer += chunk
        head, rest = parts
        if status_of(head) != 101:
            self.sock.close()
            raise ConnectionError("not upgraded: %r" % head[:200])
        self.decoder = FrameDecoder()
        self.queue = collections.deque(self.decoder.feed(rest))

    def send(self, datagram):
        self.sock.sendall(encode_frame(datagram))

    def recv(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not self.queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no datagram in %gs" % timeout)
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(256 * 1024)
            if not chunk:
                raise ConnectionError("tunnel closed by the server")
            self.queue.extend(self.decoder.feed(chunk))
        return self.queue.popleft()

    def roundtrip(self, datagram, timeout=5.0):
        self.send(datagram)
        return self.recv(timeout)

    def check(self, tag=0, sizes=(1, 100, 1420)):
        """Send a few datagrams through and assert each comes back unchanged."""
        for i, size in enumerate(sizes):
            datagram = numbered(tag * 16 + i, size)
            assert self.roundtrip(datagram) == datagram

    def close(self, abort=False):
        if abort:
            set_rst_on_close(self.sock)
        self.sock.close()


def server_is_healthy(server):
    assert server.popen.poll() is None, "server exited %r:\n%s" % (server.popen.poll(),
                                                                    server.log()[-4000:])
    bad = [line for line in server.log().splitlines()
           if "Traceback" in line or "unexpected error" in line or "internal error" in line]
    assert not bad, "\n".join(bad[:20])


@pytest.fixture
def good_tunnel(server):
    """One good tunnel through `server`, checked now and again at teardown."""
    tunnel = RawTunnel(server.port, request=pg.build_upgrade_request("example", server.good_path))
    tunnel.check(tag=1)
    yield tunnel
    tunnel.check(tag=2)
    tunnel.close()


def read_answer(sock, deadline):
    """Read until close; return (bytes, how it ended: 'eof', 'reset' or 'hung')."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), "hung"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


def exchange(port, data, timeout=CASE_LIMIT):
    """Send `data` on a new connection and return the answer until close (or `timeout`)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(data)
        answer, _ = read_answer(sock, time.monotonic() + timeout)
        return answer


# =============================================================================================
# Pure protocol: frames
# =============================================================================================

FRAME_SIZES = [0, 1, 1420, 65507, 65535]


def test_encode_frame_prefixes_big_endian_length():
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00"
    assert encode_frame(b"x" * 65535)[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        encode_frame(b"x" * 65536)
    assert pg.encode_frames([b"a", b"", b"bc"]) == b"\x00\x01a\x00\x00\x00\x02bc"


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_decoder_every_split_point_of_one_frame(size):
    datagram = numbered(7, size)
    stream = encode_frame(datagram)
    points = range(len(stream) + 1) if size < 2000 else list(range(0, 5)) + list(
        range(len(stream) - 4, len(stream) + 1)) + [len(stream) // 2, 1000, 40000]
    for split in points:
        decoder = FrameDecoder()
        got = decoder.feed(stream[:split]) + decoder.feed(stream[split:])
        assert got == [datagram], split
        assert decoder.pending == 0


def test_decoder_several_frames_per_read_and_byte_by_byte():
    datagrams = [numbered(i, size) for i, size in enumerate(FRAME_SIZES * 2)]
    stream = b"".join(encode_frame(d) for d in datagrams)
    assert FrameDecoder().feed(stream) == datagrams
    decoder = FrameDecoder()
    small = [numbered(i, i % 50) for i in range(40)]
    small_stream = b"".join(encode_frame(d) for d in small)
    got = []
    for i in range(len(small_stream)):
        got += decoder.feed(small_stream[i:i + 1])
    assert got == small


def test_decoder_every_split_point_of_mixed_stream():
    datagrams = [numbered(i, size) for i, size in enumerate([0, 1, 3, 0, 100, 2])]
    stream = b"".join(encode_frame(d) for d in datagrams)
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = FrameDecoder()
            got = (decoder.feed(stream[:first]) + decoder.feed(stream[first:second])
                   + decoder.feed(stream[second:]))
            assert got == datagrams


def test_decoder_keeps_partial_frame_pending():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x05ab") == []
    assert decoder.pending == 4
    assert decoder.feed(bytearray(b"cde\x00")) == [b"abcde"]
    assert decoder.pending == 1


def test_cut_frames_gives_slices_and_where_the_incomplete_frame_begins():
    stream = bytearray(pg.encode_frames([b"ab", b"", b"cde"]) + b"\x00\x04xy")
    datagrams, pos = pg.cut_frames(memoryview(stream), len(stream))
    assert [bytes(d) for d in datagrams] == [b"ab", b"", b"cde"]
    assert pos == len(stream) - 4
    stream[2] = ord("z")  # slices, not copies
    assert bytes(datagrams[0]) == b"zb"
    assert pg.cut_frames(memoryview(stream), 1) == ([], 0)


def resident_pages(buffer):
    """How many pages of a PumpBuffer are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = len(buffer.map)
    pages = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer.map))
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), pages) == 0
    return sum(page & 1 for page in pages)


def test_pump_buffer_takes_memory_as_written_and_gives_a_burst_back():
    buffer = pg.PumpBuffer(pg.UDP_BATCH_BYTES + 2 + pg.MAX_FRAME_PAYLOAD)
    assert resident_pages(buffer) == 0  # nothing written, nothing held
    buffer.view[:100] = b"x" * 100
    buffer.used(100)
    assert resident_pages(buffer) == 1
    burst = 100 * 1024
    buffer.view[:burst] = b"y" * burst
    buffer.used(burst)
    assert resident_pages(buffer) >= burst // mmap.PAGESIZE
    buffer.used(200)  # light traffic again: the burst's pages go back, the first page stays
    assert resident_pages(buffer) == 1
    assert bytes(buffer.view[:200]) == b"y" * 200
    buffer.view[:burst] = b"z" * burst  # a second burst within TRIM_INTERVAL: kept
    buffer.used(burst)
    buffer.used(200)
    assert resident_pages(buffer) >= burst // mmap.PAGESIZE


# In-process tunnels over a socketpair: the pumps' own paths (frames built in place, runs of
# equal-sized datagrams in one system call, datagrams left unsent by a dying tunnel).

def pump_tunnel(endpoint_class=pg.TunnelUdpEndpoint, channel_class=pg.PlainChannel,
                unsent=None, busy_polling=None):
    """A Tunnel between a socketpair (its far end returned as `ours`) and a UDP socket
    standing in for WireGuard; not yet running."""
    ours, theirs = socket.socketpair()
    wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wireguard.bind((LOOPBACK, 0))
    pg.set_socket_buffers(wireguard)
    endpoint = endpoint_class.connected(wireguard.getsockname(), socket.AF_INET)
    tunnel = pg.Tunnel(channel_class(theirs), endpoint, "test", pg.IdleClock(30), unsent=unsent,
                       busy_polling=busy_polling)
    return tunnel, ours, wireguard


def run_in_thread(tunnel):
    result = []
    thread = threading.Thread(target=lambda: result.append(tunnel.run()), daemon=True)
    thread.start()
    return thread, result


@contextlib.contextmanager
def running_pump_tunnel(endpoint_class=pg.TunnelUdpEndpoint, busy_polling=None):
    """A pump_tunnel running in a thread: yields (tunnel, ours, wireguard). After the test's
    block our end stops sending, and the tunnel must end "closed by peer"; both sockets close."""
    tunnel, ours, wireguard = pump_tunnel(endpoint_class, busy_polling=busy_polling)
    thread, result = run_in_thread(tunnel)
    try:
        yield tunnel, ours, wireguard
        ours.shutdown(socket.SHUT_WR)
        thread.join(5)
        assert result == ["closed by peer"]
    finally:
        ours.close()
        wireguard.close()


class RefusingGsoEndpoint(pg.TunnelUdpEndpoint):
    """A kernel that takes the GSO option but refuses the send (EIO: no checksum offload)."""

    gso_refusals = 0  # not `refused`: that is UdpEndpoint's "nothing listens" flag

    def _send_segments(self, datagrams, control):
        self.gso_refusals += 1
        raise OSError(errno.EIO, "refused")


@pytest.mark.parametrize("endpoint_class", [pg.TunnelUdpEndpoint, RefusingGsoEndpoint])
def test_tunnel_sends_runs_of_frames_as_separate_datagrams_in_order(endpoint_class):
    """Runs of one size (sent with UDP GSO where the kernel can), a shorter last one, empty
    frames, sizes that change: every frame comes out as its own datagram, in order, counted;
    a refused GSO send falls back to one send per datagram, and is not tried again."""
    sizes = [1420] * 50 + [700, 0, 0, 100, 100, 100, 1420, 1, 65507, 3, 3] + [1000] * 70
    datagrams = [numbered(i, size) for i, size in enumerate(sizes)]
    with running_pump_tunnel(endpoint_class) as (tunnel, ours, wireguard):
        ours.sendall(pg.encode_frames(datagrams))
        wireguard.settimeout(5)
        got = [wireguard.recv(65536) for _ in datagrams]
        assert got == datagrams
        # The pump counts a send after it returns: the datagrams may arrive first (seen in CI).
        wait_until(lambda: (tunnel.to_udp_datagrams, tunnel.to_udp_bytes)
                   == (len(sizes), sum(sizes)), 5, "the sends counted")
        if endpoint_class is RefusingGsoEndpoint:
            assert tunnel.endpoint.gso_refusals == 1 and tunnel.endpoint.gso is False


def udp_endpoint_to(port, shared):
    """The client's shared UDP endpoint (IP_RECVERR) replying to LOOPBACK:port, or a server
    tunnel's endpoint connected to it; and the function that closes it."""
    if shared:
        endpoint = pg.SharedUdpEndpoint.bind(0, port)
        return endpoint, endpoint.close
    endpoint = pg.TunnelUdpEndpoint.connected((LOOPBACK, port), socket.AF_INET)
    return endpoint, endpoint.release


def wait_for_icmp(sock):
    """Until `sock` polls POLLERR: an earlier send's ICMP port unreachable came back."""
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    wait_until(lambda: poller.poll(0), 5, "the ICMP port unreachable")


@pytest.mark.parametrize("shared", [False, True], ids=["server", "client"])
def test_the_first_datagram_after_wireguard_comes_back_is_not_lost(shared, caplog):
    """Linux reports an earlier datagram's ICMP port unreachable on the next send, and does
    not send that one: the endpoint sends it once more, so WireGuard, back, gets it."""
    port = free_port(socket.SOCK_DGRAM)
    endpoint, close = udp_endpoint_to(port, shared)
    try:
        endpoint.send(b"to nobody")
        wait_for_icmp(endpoint.sock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
            wireguard.bind((LOOPBACK, port))
            wireguard.settimeout(5)
            endpoint.send(b"first")
            assert wireguard.recv(100) == b"first"
        assert caplog.text.count("nothing listens on") == 1
    finally:
        close()


def test_client_reads_an_old_icmp_before_the_datagram_beside_it(caplog):
    """A datagram from WireGuard, back, and the ICMP of a reply sent before it came back both
    wait when the client polls: the ICMP is read first, so the outage it reports ends with the
    datagram (one warning, and a later outage is warned about again)."""
    port = free_port(socket.SOCK_DGRAM)
    endpoint, close = udp_endpoint_to(port, shared=True)
    try:
        endpoint.send(b"to nobody")
        wait_for_icmp(endpoint.sock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
            wireguard.bind((LOOPBACK, port))
            wireguard.sendto(b"back", endpoint.address)
            assert endpoint.wait(5)
            view = memoryview(bytearray(70000))
            end, count = endpoint.receive_frames(view)
            assert count == 1 and bytes(view[2:end]) == b"back"
            assert not endpoint.wait(0.05)
        assert caplog.text.count("nothing listens on") == 1 and not endpoint.refused
    finally:
        close()


@contextlib.contextmanager
def running_client_tunnel(endpoint):
    """A Tunnel between a socketpair (our end yielded) and the client's shared `endpoint`,
    running in a thread. After the test's block our end stops sending: the tunnel must end
    "closed by peer", which only the wake of its UDP pump, blocked in recvfrom, lets happen."""
    ours, theirs = socket.socketpair()
    tunnel = pg.Tunnel(pg.PlainChannel(theirs), endpoint, "test", pg.IdleClock(30))
    thread, result = run_in_thread(tunnel)
    try:
        yield tunnel, ours
        ours.shutdown(socket.SHUT_WR)
        thread.join(5)
        assert result == ["closed by peer"]
    finally:
        ours.close()


def test_client_stale_wakes_neither_reach_wireguard_nor_warn_nor_lose_datagrams(caplog):
    """Wake datagrams (SharedUdpEndpoint: the tunnel's UDP pump blocks in recvfrom) left in
    the queue by tunnels that had ended: one before a real datagram at the next tunnel's
    start, one amid its traffic, one at the connector's lazy-connect wait. None goes to the
    peer, draws the "datagrams arrive from" warning, or connects; every real datagram, also
    those queued behind a wake, goes out in order, and each tunnel ends at its own wake."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
        wireguard.bind((LOOPBACK, 0))
        endpoint = pg.SharedUdpEndpoint.bind(0, wireguard.getsockname()[1])
        try:
            endpoint.wake()  # no pump reads: stale for the next tunnel
            endpoint.rearm()
            wireguard.sendto(b"queued behind a wake", endpoint.address)
            decoder = FrameDecoder()
            with running_client_tunnel(endpoint) as (tunnel, ours):
                assert read_frames(ours, decoder, 1) == [b"queued behind a wake"]
                endpoint.wake()  # amid the traffic, with the tunnel's close_reason None
                wireguard.sendto(b"after a wake", endpoint.address)
                assert read_frames(ours, decoder, 1) == [b"after a wake"]
            assert (tunnel.to_tcp_datagrams, tunnel.to_tcp_bytes) == (2, 32)
            # Between tunnels: the wake at the head is taken, no reason to connect.
            endpoint.wake()
            endpoint.rearm()
            assert not endpoint.wait(0.05)
            wireguard.sendto(b"the next tunnel's", endpoint.address)
            assert endpoint.wait(5)
            with running_client_tunnel(endpoint) as (tunnel, ours):
                assert read_frames(ours, FrameDecoder(), 1) == [b"the next tunnel's"]
            with pytest.raises(BlockingIOError):  # nothing went to WireGuard
                wireguard.recv(100, socket.MSG_DONTWAIT)
        finally:
            endpoint.close()
    assert "arrive from" not in caplog.text and "nothing listens" not in caplog.text


def test_client_pump_reads_the_icmp_queue_and_warns_once_per_outage(caplog):
    """With nothing on --forward-port, the tunnel's datagrams to WireGuard draw ICMPs, which
    wake the UDP pump blocked in recvfrom (ECONNREFUSED): it reads the error queue (left, it
    would fill the receive buffer) and warns once; WireGuard's answer ends the outage, and a
    second outage is warned about again."""
    port = free_port(socket.SOCK_DGRAM)
    endpoint = pg.SharedUdpEndpoint.bind(0, port)
    errors = select.poll()
    errors.register(endpoint.sock, select.POLLERR)
    try:
        with running_client_tunnel(endpoint) as (tunnel, ours):
            for outage in (1, 2):
                ours.sendall(pg.encode_frames([b"to nobody"] * 3))
                wait_until(lambda: tunnel.to_udp_datagrams == 3 * outage, 5, "the sends")
                wait_until(lambda: caplog.text.count("nothing listens on") == outage, 5,
                           "the warning")
                wait_until(lambda: not errors.poll(0), 5, "the error queue read")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
                    wireguard.bind((LOOPBACK, port))
                    wireguard.sendto(b"back", endpoint.address)
                    assert read_frames(ours, FrameDecoder(), 1) == [b"back"]
                    wait_until(lambda: not endpoint.refused, 5, "the outage's end")
        assert caplog.text.count("nothing listens on") == 2
    finally:
        endpoint.close()


def test_tunnel_frames_datagrams_in_place_and_drops_empty_ones():
    """Datagrams from WireGuard, empty ones among them, bursts and single ones: the frames on
    the stream are those of the non-empty datagrams, in order, and the counters agree."""
    with running_pump_tunnel() as (tunnel, ours, wireguard):
        address = tunnel.endpoint.sock.getsockname()
        sent = []
        for burst in ([1420], [1420] * 30 + [0, 5], [0], [65507, 1, 65507], [100] * 200, [7]):
            for size in burst:
                datagram = numbered(len(sent), size)
                wireguard.sendto(datagram, address)
                if size:
                    sent.append(datagram)
            time.sleep(0.01)  # scenario: bursts apart, so single-datagram receives happen too
        assert read_frames(ours, FrameDecoder(), len(sent)) == sent
        wait_until(lambda: (tunnel.to_tcp_datagrams, tunnel.to_tcp_bytes)
                   == (len(sent), sum(map(len, sent))), 5, "the counters")


class FailingChannel(pg.PlainChannel):
    def sendall(self, data):
        raise BrokenPipeError(errno.EPIPE, "broken pipe")


def test_datagrams_a_dying_tunnel_could_not_send_go_to_unsent_as_bytes():
    unsent = []
    tunnel, ours, wireguard = pump_tunnel(channel_class=FailingChannel, unsent=unsent.extend)
    datagrams = [b"one", b"", b"x" * 1420, b"three"]
    for datagram in datagrams:  # all waiting before the pump starts: one batch
        wireguard.sendto(datagram, tunnel.endpoint.sock.getsockname())
    thread, result = run_in_thread(tunnel)
    thread.join(5)
    try:
        assert result and "broken pipe" in result[0].lower()
        assert unsent == [b"one", b"x" * 1420, b"three"]
        assert all(type(datagram) is bytes for datagram in unsent)
        assert tunnel.to_tcp_datagrams == 0
    finally:
        ours.close()
        wireguard.close()


class WatchedLane:
    """A teardown lane (pg.TEARDOWN_LANES) that tells when a tunnel asks for it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.asked = threading.Event()

    def acquire(self, timeout=-1):
        self.asked.set()
        return self.lock.acquire(timeout=timeout)

    def release(self):
        self.lock.release()


def run_in_watched_lane(monkeypatch):
    """A pump_tunnel running in a thread, every teardown lane one WatchedLane: (lane, tunnel,
    our end, WireGuard's socket, the thread, its result list)."""
    lane = WatchedLane()
    monkeypatch.setattr(pg.Tunnel, "_teardown_lanes", [lane] * pg.TEARDOWN_LANES)
    tunnel, ours, wireguard = pump_tunnel()
    thread, result = run_in_thread(tunnel)
    return lane, tunnel, ours, wireguard, thread, result


def test_an_ended_tunnel_closes_only_in_its_teardown_lane(monkeypatch):
    """Thousands of tunnels ending at once must not all queue for the GIL: a tunnel whose peer
    closed waits for its lane (another tunnel's teardown holds it) before it wakes its UDP
    pump, which relays meanwhile, or closes a socket; then it ends and frees the lane."""
    lane, tunnel, ours, wireguard, thread, result = run_in_watched_lane(monkeypatch)
    try:
        with lane.lock:
            ours.shutdown(socket.SHUT_WR)
            assert lane.asked.wait(5)
            wireguard.sendto(b"still relayed", tunnel.endpoint.sock.getsockname())
            assert read_frames(ours, FrameDecoder(), 1) == [b"still relayed"]
            assert tunnel.close_reason is None and tunnel.endpoint.sock.fileno() != -1
        thread.join(5)
        assert result == ["closed by peer"] and tunnel.endpoint.sock.fileno() == -1
        assert not lane.lock.locked()
    finally:
        ours.close()
        wireguard.close()


def test_a_peers_close_stays_the_reason_when_the_udp_pump_errs_while_the_lane_is_busy(
        monkeypatch):
    """The peer closes; its tunnel's TCP pump, which found that, waits for its lane while a
    datagram makes the UDP pump write to the closed connection (broken pipe): the reason the
    first pump to stop found is the tunnel's, not that consequence of it."""
    lane, tunnel, ours, wireguard, thread, result = run_in_watched_lane(monkeypatch)
    try:
        with lane.lock:
            ours.close()
            assert lane.asked.wait(5)
            wireguard.sendto(b"into a closed connection", tunnel.endpoint.sock.getsockname())
            wait_until(lambda: tunnel.close_reason is not None, 5, "the UDP pump's error")
        thread.join(5)
        assert result == ["closed by peer"]
    finally:
        wireguard.close()


def test_a_tunnel_waits_for_a_busy_teardown_lane_at_most_teardown_lane_wait(monkeypatch):
    """A teardown that hangs holds up the others of its lane for TEARDOWN_LANE_WAIT only."""
    lane = WatchedLane()
    monkeypatch.setattr(pg.Tunnel, "_teardown_lanes", [lane] * pg.TEARDOWN_LANES)
    monkeypatch.setattr(pg, "TEARDOWN_LANE_WAIT", 0.1)
    with lane.lock:
        with running_pump_tunnel():  # ends "closed by peer" within 5 s, or fails
            pass
    assert lane.asked.is_set()


# =============================================================================================
# Pure protocol: requests and responses
# =============================================================================================


def request(lines, method="GET", target="/", version="HTTP/1.1", end="\r\n"):
    text = "%s %s %s%s" % (method, target, version, end) + "".join(l + end for l in lines) + end
    return text.encode("latin-1")


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
     "WebSocket version (none) is not supported; 13 is"),
    (["Host: a", "Connection: Upgrade", "Upgrade: h2c"], 426,
     "'Upgrade' header is not 'UoTLV/1' or 'websocket', got: 'h2c'"),
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
    if status == 426:  # RFC 9110 15.5.22: a 426 names the protocol(s) to upgrade to
        assert ("Upgrade", "websocket" if "WebSocket" in text else "UoTLV/1") \
            in error.extra_headers


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
    (b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n\r\n", "use ws:// or wss://"),
    (b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: h2c\r\n\r\n", "not a ProxyGuard"),
    (b"HTTP/1.1 426 Upgrade Required\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n",
     "a front in the way drops it (one that passes WebSocket only? use ws:// or wss://)"),
    (b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 51\r\n\r\n"
     b"the 'Connection' header is not 'Upgrade', got: ''\n", "a front in the way drops it"),
    (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "cannot reach"),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     "not a ProxyGuard server"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: UoTLV/1\r\n\r\n", "Connection: Upgrade"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not a web server"),
])
def test_refused_upgrades_name_the_likely_cause(head, cause):
    head, _, body = head.partition(b"\r\n\r\n")
    with pytest.raises(pg.UpgradeRefused) as info:
        pg.check_upgrade_response(pg.parse_response(head + b"\r\n\r\n"), body)
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


@pytest.mark.parametrize("url,target", [
    ("http://h/a b", "/a%20b"),
    ("http://h/%41%zz%/\u00fc?q=a b&x=\"<>`{|}\\^",
     "/%41%25zz%25/%C3%BC?q=a%20b&x=%22%3C%3E%60%7B%7C%7D%5C%5E"),
    ("http://h/a;b=c/@:!$&'()*+,;=?[]~-._", "/a;b=c/@:!$&'()*+,;=?[]~-._"),
    ("http://h?x=1", "/?x=1"),
])
def test_server_url_target_is_a_valid_request_target(url, target):
    """What a request target cannot hold is percent-encoded; %XX and reserved stay."""
    url = pg.ServerURL(url)
    assert url.target == target
    assert re.match(r"^[\x21-\x7e]+$", url.target)
    request = pg.parse_request(pg.build_upgrade_request(url.host_header, url.target))
    assert request.start == ("GET", target, "HTTP/1.1")
    pg.check_upgrade_request(request)


def test_server_url_international_host_goes_out_as_idna():
    url = pg.ServerURL("https://b\u00fccher.example:8443/pg")
    assert (url.host, url.host_header, url.port) == (
        "xn--bcher-kva.example", "xn--bcher-kva.example:8443", 8443)
    pg.parse_request(pg.build_upgrade_request(url.host_header, url.target))


@pytest.mark.parametrize("make,text", [
    (lambda: pg.ServerURL("http://127.0.0.1:0/"), "--to 'http://127.0.0.1:0/': port 0"),
    (lambda: pg.ServerURL("http://a b/"), "a space in the host"),
    (lambda: pg.ServerURL("http://h/a\tb"), "control characters"),
    (lambda: pg.ServerURL("http://h/a\r\nX: 1"), "control characters"),
    (lambda: pg.ProxyURL("http://proxy:0"), "--proxy 'http://proxy:0': port 0"),
    (lambda: pg.parse_host_port("http://0.0.0.0:443", "--listen"),
     "--listen 'http://0.0.0.0:443': expected HOST:PORT, not a URL"),
])
def test_urls_and_addresses_that_cannot_work_are_refused(make, text):
    with pytest.raises(pg.UsageError) as info:
        make()
    assert text in str(info.value)


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
# Policies with a fake clock: the deadline, the idle clock, the back-off, the head reader
# =============================================================================================


class FakeClock:
    """A monotonic clock that moves only when the test says."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_deadline_arms_each_call_with_the_time_left_and_then_times_out():
    clock = FakeClock()
    deadline = pg.Deadline(10, clock)
    for elapsed, left in [(0, 10), (3, 7), (6.5, 0.5), (0.4, 0.1)]:
        clock.advance(elapsed)
        assert deadline.timeout() == pytest.approx(left)
    clock.advance(0.1)
    with pytest.raises(socket.timeout, match="after 10s"):
        deadline.timeout()
    assert deadline.remaining() == pytest.approx(0)


def test_idle_clock_counts_from_the_last_data_either_way():
    clock = FakeClock()
    idle = pg.IdleClock(60, clock)
    steps = [  # (advance, touch, remaining after)
        (59, False, 1), (0.5, True, 60), (30, False, 30), (29.9, True, 60), (60, False, 0)]
    for advance, touch, remaining in steps:
        clock.advance(advance)
        if touch:
            idle.received()
            idle.sent()
        assert idle.remaining() == pytest.approx(remaining)
    assert idle.expired()
    never = pg.IdleClock(0, clock)
    clock.advance(10 ** 6)
    assert never.remaining() is None and not never.expired()


def test_backoff_grows_starts_over_and_honours_retry_after():
    backoff = pg.Backoff()
    assert [backoff.failed() for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]
    assert backoff.tunnel_ended(lived=10.0) == 0          # a stable tunnel: start over
    assert backoff.failed() == 1
    assert backoff.tunnel_ended(lived=0.5) == 2           # a tunnel that died at once counts
    assert backoff.refused() == 10                         # a portal, a wrong URL
    assert backoff.failed() == 8                           # ... counted as a failure too
    assert backoff.tunnel_ended(lived=0.1, went_idle=True) == 0
    assert backoff.failed(retry_after=3) == 3              # the server's Retry-After wins
    assert backoff.failed() == 2                           # ... and still counts a failure


@pytest.mark.parametrize("value, seconds", [
    (None, None), ("10", 10), (" 0 ", 0), ("86400", pg.MAX_RETRY_AFTER), ("soon", None),
    ("-5", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0)])
def test_retry_after_is_read_and_bounded(value, seconds):
    assert pg.parse_retry_after(value) == seconds


def test_a_503_with_retry_after_says_how_long_to_wait():
    response = pg.parse_response(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n\r\n")
    with pytest.raises(pg.ServerUnavailable) as caught:
        pg.check_upgrade_response(response)
    assert caught.value.retry_after == 7


@pytest.mark.parametrize("split", range(1, len(UPGRADE) + 4))
def test_head_reader_finds_the_head_split_anywhere(split):
    data = UPGRADE + b"\x00\x01x"
    reader = pg.HeadReader()
    first = reader.feed(data[:split])
    if first is None:
        assert split < len(UPGRADE)
        assert reader.feed(data[split:]) == (UPGRADE, b"\x00\x01x")
    else:  # the head ended in the first part: what followed it is handed back, not lost
        assert first == (UPGRADE, data[len(UPGRADE):split])


def test_head_reader_limits_and_tls_sniff():
    reader = pg.HeadReader(limit=100)
    assert reader.feed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 14) is None
    with pytest.raises(pg.HandshakeError) as caught:
        reader.feed(b"X: y\r\n")
    assert caught.value.status == 431
    assert pg.HeadReader().feed(b"\x16\x03\x01\x02") == (b"\x16\x03\x01\x02", b"")


# --- up's CPU (--cpu): the placement on /proc/stat's figures, and its pinning ---------------

PROC_STAT = """cpu  900 0 300 8000 100 0 0 0 0 0
cpu0 500 10 100 4000 50 20 30 5 40 0
cpu1 400 0 200 4000 50 0 0 0 0 0
intr 12345 0 1
"""


def test_cpu_times_reads_busy_and_idle_seconds_of_each_cpu_from_proc_stat():
    # busy: user nice system steal (guest is in user already); idle: idle iowait; interrupts
    # neither (mostly our own traffic's: they follow the threads)
    assert pg.cpu_times(PROC_STAT, 100) == {0: (6.15, 40.5), 1: (6.0, 40.5)}


def seconds(*pairs):
    """{cpu: (busy, idle)} cumulative seconds, CPUs numbered from 0."""
    return dict(enumerate(pairs))


def test_cpu_placement_starts_on_the_last_cpu_and_moves_only_when_other_work_crowds_it():
    placement = pg.CpuPlacement([0, 1, 2, 3])
    assert placement.current == 3  # the first CPUs take most interrupts
    assert placement.measured(seconds((0, 0), (0, 0), (0, 0), (0, 0)), own=0) is None  # baseline
    # 10 s: CPU 3 busy 6 s, 5 of them ours; the others 2-4 s: 0.1 of other work on ours
    assert placement.measured(seconds((3, 7), (4, 6), (2, 8), (6, 4)), own=5) is None
    assert placement.others == {0: 0.3, 1: 0.4, 2: 0.2, 3: 0.1}
    # Next 10 s: something else takes 4 s of CPU 3 (0.4 beside our 0.5); CPU 2 stays at 0.2:
    # 0.2 more than there, below the margin (0.25): noise, no move.
    assert placement.measured(seconds((6, 14), (8, 12), (4, 16), (15, 5)), own=10) is None
    # Then 7 s of 10 for the other work: CPU 2's 0.2 leaves 0.5 more room there.
    assert placement.measured(seconds((9, 21), (12, 18), (6, 24), (27, 3)), own=15) == 2
    assert placement.current == 2 and round(placement.others[3], 2) == 0.7
    # Our own time now counts against CPU 2, not against the CPU left behind.
    assert placement.measured(seconds((12, 28), (16, 24), (14, 26), (30, 10)), own=21) is None


def test_cpu_placement_leaves_an_offline_cpu_and_a_fixed_cpu_never_moves():
    placement = pg.CpuPlacement([0, 1])
    placement.measured(seconds((0, 0), (0, 0)), own=0)
    assert placement.measured({0: (1, 9)}, own=1) == 0  # CPU 1 gone from /proc/stat
    fixed = pg.CpuPlacement([0, 1], fixed=0)
    fixed.measured(seconds((0, 0), (0, 0)), own=0)
    assert fixed.current == 0
    assert fixed.measured(seconds((10, 0), (0, 10)), own=0) is None and fixed.current == 0


@pytest.mark.parametrize("choice, peers, cpus, pinned, interval", [
    ("auto", 2, [0, 1], 1, pg.CPU_CHECK_SECONDS),
    ("auto", 1, [0, 1], None, None),  # one client's two threads gain nothing
    ("auto", 4, [3], None, None),  # nowhere else to go
    ("auto", 4, None, None, None),  # not Linux: nothing said, nothing done
    ("any", 4, [0, 1], None, None),
    (0, 1, [0, 1], 0, None),  # a CPU number: pinned for good, even one peer
])
def test_cpu_pinning_for_the_cpu_option(choice, peers, cpus, pinned, interval):
    pinning = pg.cpu_pinning(choice, peers, cpus)
    if pinned is None:
        assert pinning is None
    else:
        assert (pinning.placement.current, pinning.interval) == (pinned, interval)


@pytest.mark.parametrize("cpus, error", [
    ([0, 1], "--cpu 5: this process may run on CPU 0, 1 only"),
    (None, "--cpu 5: needs Linux (sched_setaffinity)"),
])
def test_cpu_pinning_refuses_a_cpu_the_process_may_not_use(cpus, error):
    with pytest.raises(pg.UsageError, match=re.escape(error)):
        pg.cpu_pinning(5, 2, cpus)


def test_cpu_pinning_pins_checks_moves_and_gives_up_on_an_error_with_one_warning(caplog):
    readings = [seconds((0, 0), (0, 0)), seconds((1, 9), (9, 1)), seconds((2, 18), (18, 2))]
    pins = []
    fail = []

    def read_times():
        if fail:
            raise PermissionError(errno.EACCES, "Permission denied")
        return readings.pop(0)

    pinning = pg.CpuPinning(pg.CpuPlacement([0, 1]), "auto", read_times=read_times,
                            own_seconds=lambda: 0.0, pin=pins.append)
    with caplog.at_level(logging.INFO, logger="proxyguard"):
        pinning.start()
        assert pins == [{1}] and "threads run on CPU 1 (--cpu auto" in caplog.text
        pinning.check()  # CPU 1 90 % busy with other work, CPU 0 10 %
        assert pins[-1] == {0}
        assert "moved to CPU 0: other work kept CPU 1 90% busy, CPU 0 10%" in caplog.text
        pinning.check()  # stays, and pins every thread again
        assert pins[-1] == {0} and len(pins) == 3
        assert pinning.status() == ("the tunnels' threads on CPU 0 (--cpu auto); other work "
                                    "at the last check: CPU 0 10%, CPU 1 90%")
        fail.append(True)
        pinning.check()
    assert pins[-1] == {0, 1} and pinning.interval is None  # the scheduler's from now on
    assert pinning.status() == "the tunnels' threads: anywhere (pinning ended on an error)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["cannot keep the tunnels' threads on CPU 0 (--cpu auto): permission "
                        "denied; the scheduler places them"], warnings


def test_busy_poll_polls_after_a_lone_datagram_only_and_backs_off_after_two_misses():
    policy = pg.BusyPoll(0.0001)
    assert policy.poll_for(lone=False, now=0) == 0  # a batch: more is waiting anyway
    assert policy.poll_for(lone=True, now=0) == 0.0001
    policy.polled(found=False)
    assert policy.poll_for(lone=True, now=0) == 0.0001  # one miss: poll again
    policy.polled(found=True)
    policy.polled(found=False)
    assert not policy.backed_off  # a find starts the count over
    policy.polled(found=False)
    assert policy.backed_off and policy.poll_for(lone=True, now=0) == 0  # sparse: block at once
    policy.blocked(0.5)  # a keepalive's gap: polling would not have found it
    assert policy.poll_for(lone=True, now=0) == 0
    policy.blocked(0.0001)  # a wait within the budget: polling would have found it
    assert policy.poll_for(lone=True, now=0) == 0.0001
    assert pg.BusyPoll(0).poll_for(lone=True, now=0) == 0  # --busy-poll 0


def test_busy_poll_stops_for_a_second_after_a_poll_lost_its_cpu_to_other_work():
    policy = pg.BusyPoll(0.0001)
    policy.lost_cpu(now=10.0)  # a nice-19 hog had the CPU until the next tick
    policy.polled(found=False)
    assert policy.crowded == 1 and not policy.backed_off
    assert policy.poll_for(lone=True, now=10.5) == 0  # crowded: block at once
    assert policy.poll_for(lone=True, now=10.0 + pg.BUSY_POLL_CROWDED_SECONDS) == 0.0001
    assert policy.poll_for(lone=True, now=10.1) == 0.0001  # the pause is over, not a window


def test_round_trips_let_a_pump_poll_only_while_the_other_waits_after_a_lone_datagram_too():
    turns = pg.RoundTrips()
    assert not turns.waits(pg.FROM_WIREGUARD, lone=True)  # the peer's side has said nothing
    assert turns.waits(pg.FROM_PEER, lone=True)  # a ping's answer, the other pump waits
    turns.busy(pg.FROM_WIREGUARD)  # the next ping came: that pump works
    assert not turns.waits(pg.FROM_PEER, lone=True)  # it must not lose the GIL to a poll
    assert turns.waits(pg.FROM_WIREGUARD, lone=True)
    assert not turns.waits(pg.FROM_PEER, lone=False)  # a batch: datagrams in flight
    assert not turns.waits(pg.FROM_WIREGUARD, lone=True)


class TickingClock:
    """A fake clock that moves `step` seconds at every reading."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_busy_poller_finds_waiting_data_misses_within_its_budget_and_needs_a_slot():
    reader, writer = socket.socketpair()
    with reader, writer:
        slots = threading.BoundedSemaphore(1)
        policy = pg.BusyPoll(0.005)
        poller = pg.BusyPoller(reader.fileno(), policy, slots, clock=TickingClock(0.0005))
        poller.before_wait(lone=True)  # nothing comes: the policy's reading, the deadline's,
        # then two readings a poll (before and after its give-way) until the deadline: a miss
        assert policy.misses == 1 and poller._clock.now == pytest.approx(0.0065)
        assert policy.crowded == 0  # each give-way took a tick, below CROWDED_AFTER
        writer.send(b"x")
        poller.before_wait(lone=True)  # found at the first poll
        assert policy.misses == 0 and reader.recv(1) == b"x"
        slots.acquire()  # another pump polls: this one blocks at once, its policy as it was
        before = poller._clock.now
        poller.before_wait(lone=True)
        assert poller._clock.now == pytest.approx(before + 0.0005)  # the policy's reading only
        assert policy.misses == 0
        slots.release()
        poller.before_wait(lone=True)
        poller.before_wait(lone=True)
        assert policy.backed_off
        poller.before_wait(lone=True)  # backed off: the blocking wait is timed
        poller.after_wait()  # one tick later: within the budget
        assert not policy.backed_off


def test_busy_poller_ends_a_poll_whose_give_way_lost_the_cpu_and_pauses_polling(monkeypatch):
    clock = TickingClock(0.00001)
    monkeypatch.setattr(pg, "_give_way", lambda: setattr(clock, "now", clock.now + 0.004))
    reader, writer = socket.socketpair()
    with reader, writer:
        policy = pg.BusyPoll(0.0001)
        poller = pg.BusyPoller(reader.fileno(), policy, threading.BoundedSemaphore(1),
                               clock=clock)
        poller.before_wait(lone=True)  # the first give-way took a 4 ms tick: crowded
        assert policy.crowded == 1 and policy.missed == 1
        before = clock.now
        writer.send(b"x")
        poller.before_wait(lone=True)  # within the pause: blocks at once, nothing polled
        assert policy.found == 0 and clock.now - before < 0.0001
        clock.now += pg.BUSY_POLL_CROWDED_SECONDS
        poller.before_wait(lone=True)  # the pause is over: the waiting datagram is found
        assert policy.found == 1


def test_lone_schedule_takes_the_short_slice_at_once_and_gives_it_back_after_waits_not_lone():
    policy = pg.LoneSchedule()
    assert policy.wants(False, 0) is None  # it has the kernel's already
    assert policy.wants(True, 0) == pg.SHORT_SLICE and policy.wants(True, 0) is None
    for _ in range(pg.SHORT_SLICE_KEPT_WAITS - 1):
        assert policy.wants(False, 0) is None
    assert policy.wants(True, 0) is None and policy.not_lone == 0  # the count starts again
    for _ in range(pg.SHORT_SLICE_KEPT_WAITS - 1):
        assert policy.wants(False, 0) is None
    assert policy.wants(False, 0) == pg.KERNELS and policy.level == pg.KERNELS
    assert policy.wants(False, 0) is None


def test_crowding_needs_enough_held_off_steps_and_their_share_within_a_window():
    crowding = pg.Crowding()
    now = 0.0
    steps = int(pg.CROWDED_MIN_HELD / pg.CROWDED_SHARE)  # the share's steps for the minimum
    for index in range(2 * steps):  # the minimum, and more, below the share: idle's
        now += 0.0001
        crowding.stepped(index % (steps // 2) == 0, now)
    assert crowding.held == pg.CROWDED_MIN_HELD and crowding.found == 0
    assert not crowding.now_crowded(now)
    for _ in range(pg.CROWDED_MIN_HELD - 1):  # a window starts over after CROWDED_WINDOW
        crowding.stepped(True, now)
    now += pg.CROWDED_WINDOW
    crowding.stepped(True, now)
    assert crowding.found == 0
    for _ in range(pg.CROWDED_MIN_HELD - 1):
        crowding.stepped(True, now)
    assert crowding.found == 1 and crowding.now_crowded(now)
    assert not crowding.now_crowded(now + pg.REALTIME_HOLD_SECONDS)


def test_crowding_keeps_its_hold_while_the_cpus_stay_busy_and_ends_when_they_idle():
    """Under real-time priority the steps no longer show the crowding: when the hold runs out,
    the CPUs' idle share since it began decides (read_cpu: all CPUs' busy and idle seconds)."""
    readings = [(100.0, 50.0)]
    crowding = pg.Crowding(lambda: readings[-1])
    for _ in range(pg.CROWDED_MIN_HELD):
        crowding.stepped(True, 0.0)
    assert crowding.found == 1 and crowding.cpu_mark == (100.0, 50.0)
    hold = pg.REALTIME_HOLD_SECONDS
    readings.append((119.9, 50.1))  # 0.5 % idle over the hold: the hogs still run
    assert crowding.now_crowded(hold) and crowding.kept == 1 and crowding.until == 2 * hold
    readings.append((129.9, 60.1))  # half idle: the hogs are gone
    assert not crowding.now_crowded(2 * hold) and crowding.until is None
    assert not crowding.now_crowded(2 * hold + 1) and crowding.kept == 1
    for read_cpu in (None, lambda: None):  # not asked, or /proc/stat unreadable: it ends
        crowding = pg.Crowding(read_cpu)
        for _ in range(pg.CROWDED_MIN_HELD):
            crowding.stepped(True, 0.0)
        assert crowding.now_crowded(hold - 0.001) and not crowding.now_crowded(hold)
    busy, idle = pg.all_cpu_times()  # the real /proc/stat
    assert busy > 0 and idle >= 0
    schedule = RecordingSchedule(realtime=True)
    assert pg.busy_polling(0, [0, 1], schedule).crowding._read_cpu is pg.all_cpu_times


def test_lone_schedule_is_real_time_instead_of_the_short_slice_while_crowded_never_for_bulk():
    crowding = pg.Crowding()
    policy = pg.LoneSchedule(crowding)
    assert policy.wants(True, 0) == pg.SHORT_SLICE
    crowding.until = 10.0  # a pump of the process found the CPUs crowded
    assert policy.wants(True, 5.0) == pg.REALTIME
    assert policy.wants(False, 5.0) == pg.SHORT_SLICE  # a miss: only the slice is held
    assert policy.wants(True, 5.0) == pg.REALTIME
    assert pg.LoneSchedule(crowding).wants(True, 5.0) == pg.REALTIME  # the others follow
    assert policy.wants(True, 10.0) == pg.SHORT_SLICE  # the hold is over
    crowding.until = 20.0
    assert policy.wants(True, 10.0) == pg.REALTIME
    assert policy.wants(False, 10.0) == pg.SHORT_SLICE
    for _ in range(pg.SHORT_SLICE_KEPT_WAITS - 2):
        assert policy.wants(False, 10.0) is None
    assert policy.wants(False, 10.0) == pg.KERNELS  # bulk
    assert pg.LoneSchedule().wants(True, 5.0) == pg.SHORT_SLICE  # no Crowding: --rt-priority 0


def test_lone_schedule_takes_a_real_time_turn_only_while_the_process_has_one_free():
    crowding = pg.Crowding(limit=1)
    crowding.until = 10.0
    first, second = pg.LoneSchedule(crowding), pg.LoneSchedule(crowding)
    assert first.wants(True, 0) == pg.REALTIME and crowding.realtime_pumps == 1
    assert second.wants(True, 0) == pg.SHORT_SLICE  # no turn left: the slice
    assert second.wants(True, 0) is None
    assert first.wants(False, 0) == pg.SHORT_SLICE and crowding.realtime_pumps == 0
    assert second.wants(True, 0) == pg.REALTIME  # asks again at its next wait
    assert first.wants(True, 0) is None  # the first now waits for a turn
    assert second.leave() == pg.KERNELS and crowding.realtime_pumps == 0
    assert second.leave() is None
    assert first.wants(True, 0) == pg.REALTIME
    crowding.until = None  # the hold is over
    assert first.wants(True, 1.0) == pg.SHORT_SLICE and crowding.realtime_pumps == 0


class RecordingSchedule:
    """Stands in for OwnSchedule: keeps the levels a pump's thread was given."""

    def __init__(self, realtime=False, applies=True):
        self.realtime, self._applies, self.levels = realtime, applies, []

    def applies(self):
        return self._applies

    def set(self, level):
        self.levels.append(level)


def test_busy_poller_asks_for_the_short_slice_while_round_trips_go_one_at_a_time_only():
    reader, writer = socket.socketpair()
    with reader, writer:
        schedule = RecordingSchedule()
        poller = pg.busy_polling(0, [0, 1], schedule).poller(reader.fileno())
        kept = pg.SHORT_SLICE_KEPT_WAITS
        # A miss now and then keeps the slice; `kept` in a row give it back.
        for lone in [False, True, True] + [False] * (kept - 1) + [True] + [False] * kept + [True]:
            poller.before_wait(lone)  # budget 0: never polls, nor blocks the test
        assert schedule.levels == [pg.SHORT_SLICE, pg.KERNELS, pg.SHORT_SLICE]  # once a change
        assert poller.policy.found == poller.policy.missed == 0
        schedule = RecordingSchedule(realtime=True, applies=False)  # CPUSchedulingPolicy=
        polling = pg.busy_polling(0, [0, 1], schedule)
        polling.crowding.until = 1e9  # crowded: the first lone wait would take a turn
        poller = polling.poller(reader.fileno())
        for lone in [True] + [False] * kept + [True]:
            poller.before_wait(lone)
        assert schedule.levels == [] and poller.lone_schedule.level == pg.KERNELS
        assert polling.crowding.realtime_pumps == 0  # the turn it took went back
        poller.before_wait(False)
        assert not poller.engaged  # bulk skips the poller again


def test_busy_poller_goes_real_time_after_held_off_steps_and_stops_polling_meanwhile():
    """Steps (after_wait to before_wait) that took CROWDED_AFTER: the pump's thread is kept
    off a crowded CPU. Enough of them make it real-time, and a real-time pump does not poll
    (its give-way would not let its SCHED_OTHER peers run) until the hold is over."""
    clock = TickingClock(0.00001)
    reader, writer = socket.socketpair()
    with reader, writer:
        schedule = RecordingSchedule(realtime=True)
        crowding = pg.BusyPolling(0.0001, schedule=schedule).crowding  # the process's
        poller = pg.BusyPoller(reader.fileno(), pg.BusyPoll(0.0001),
                               threading.BoundedSemaphore(1), schedule, clock=clock,
                               crowding=crowding)
        writer.send(b"x")  # each poll finds it at once
        poller.before_wait(True)
        assert schedule.levels == [pg.SHORT_SLICE] and poller.policy.found == 1
        for _ in range(pg.CROWDED_MIN_HELD):
            poller.after_wait()
            clock.now += pg.CROWDED_AFTER  # the step's thread waited behind a hog
            poller.before_wait(True)
        assert schedule.levels == [pg.SHORT_SLICE, pg.REALTIME]
        assert crowding.found == 1
        found = poller.policy.found
        poller.after_wait()
        poller.before_wait(True)
        assert poller.policy.found == found and poller.engaged  # real-time: no poll
        clock.now += pg.REALTIME_HOLD_SECONDS
        poller.after_wait()
        poller.before_wait(True)
        assert schedule.levels[-1] == pg.SHORT_SLICE and poller.policy.found == found + 1
        crowding.until = clock.now + pg.REALTIME_HOLD_SECONDS  # crowded again
        poller.after_wait()
        poller.before_wait(True)
        assert schedule.levels[-1] == pg.REALTIME and crowding.realtime_pumps == 1
        poller.finish()  # the pump ends; its thread may serve on (a client's next tunnel)
        assert schedule.levels[-1] == pg.KERNELS and crowding.realtime_pumps == 0
        assert poller.lone_schedule.level == pg.KERNELS
    assert pg.BusyPolling(0.0001, schedule=RecordingSchedule()).crowding is None


def test_busy_poller_reports_to_round_trips_and_is_engaged_only_while_it_has_work():
    """A pump calls its poller only while `engaged` or after a lone batch: bulk skips it."""
    reader, writer = socket.socketpair()
    with reader, writer:
        turns, schedule = pg.RoundTrips(), RecordingSchedule()
        poller = pg.BusyPolling(0, schedule=schedule).poller(reader.fileno(), turns,
                                                              pg.FROM_PEER)
        poller.before_wait(False)
        assert not poller.engaged and turns.waiting[pg.FROM_PEER]
        poller.after_wait()
        assert not turns.waiting[pg.FROM_PEER]
        poller.before_wait(True)  # the other side not lone: not one at a time yet
        assert poller.engaged and schedule.levels == [] and turns.lone[pg.FROM_PEER]
        turns.waits(pg.FROM_WIREGUARD, True)  # now it is, and waits
        poller.before_wait(True)
        assert schedule.levels == [pg.SHORT_SLICE]
        for _ in range(pg.SHORT_SLICE_KEPT_WAITS - 1):
            poller.before_wait(False)
            assert poller.engaged  # it holds the short slice: must hear of each wait
        poller.before_wait(False)
        assert schedule.levels == [pg.SHORT_SLICE, pg.KERNELS] and not poller.engaged


def test_busy_polling_is_off_at_zero_and_a_shut_down_socket_ends_a_poll_at_once():
    assert pg.busy_polling(0, [0, 1]) is None
    polling = pg.busy_polling(1000, [0])  # at least two pumps: one tunnel's
    assert polling.budget == 0.001 and polling._slots._value == 2
    assert pg.busy_polling(1000, [0, 1, 2, 3])._slots._value == 4
    reader, writer = socket.socketpair()
    with reader, writer:
        poller = polling.poller(reader.fileno())
        reader.shutdown(socket.SHUT_RDWR)  # Tunnel.close() wakes a polling pump so
        poller.before_wait(lone=True)
        assert poller.policy.misses == 0  # found: readable, the receive sees the end


def test_encode_frames_refuses_what_does_not_fit_as_encode_frame_does():
    assert pg.encode_frames([b"a", b""]) == b"\x00\x01a\x00\x00"
    with pytest.raises(ValueError):
        pg.encode_frames([b"a", b"x" * 65536])


# =============================================================================================
# WebSocket (RFC 6455), pure: keys, masking, frames, the decoder, the handshake's checks
# =============================================================================================

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's example key


def reference_mask(data, key_bytes):
    """RFC 6455 5.3 as written: octet i XOR key octet i mod 4."""
    return bytes(byte ^ key_bytes[i % 4] for i, byte in enumerate(data))


def ws_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    """One frame built by hand (RFC 6455 5.2), so that it can be wrong on purpose: `rsv` the
    three RSV bits (0-7), `length` the length the header claims (default: the payload's)."""
    length = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += struct.pack("!BH", mask_bit | 126, length)
    else:
        head += struct.pack("!BQ", mask_bit | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + reference_mask(payload, key)


def ws_cut(decoder, data):
    """Feed `data` to `decoder` through its cut(); (datagrams as bytes, bytes left uncut)."""
    view = memoryview(bytearray(data))
    datagrams, pos = decoder.cut(view, len(data))
    return [bytes(datagram) for datagram in datagrams], len(data) - pos


def test_websocket_accept_and_the_rfc_masking_example():
    assert pg.websocket_accept(WS_KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    key = bytes.fromhex("37fa213d")  # RFC 6455 5.7: a masked "Hello"
    assert pg.mask_payload(b"Hello", int.from_bytes(key, "little")) == bytes.fromhex("7f9f4d5158")
    assert len(base64.b64decode(pg.websocket_key())) == 16
    assert pg.websocket_key() != pg.websocket_key()


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 1420, 2047, 2049, 4097, 65535, 65537,
                                  pg.MAX_BATCH_MESSAGE])
def test_mask_payload_is_the_rfc_xor_and_its_own_inverse(size):
    data = os.urandom(size)
    key_bytes = os.urandom(4)
    key = int.from_bytes(key_bytes, "little")
    masked = pg.mask_payload(data, key)
    assert masked == reference_mask(data, key_bytes)
    assert pg.mask_payload(memoryview(masked), key) == data


def test_frames_take_the_fewest_length_bytes_and_the_client_masks_each_with_a_fresh_key():
    assert pg.websocket_frame(pg.OP_BINARY, b"x" * 125)[:2] == b"\x82\x7d"  # RFC 6455 5.2
    assert pg.websocket_frame(pg.OP_BINARY, b"x" * 256)[:4] == b"\x82\x7e\x01\x00"  # 5.7
    assert pg.websocket_frame(pg.OP_PING, b"Hello") == b"\x89\x05Hello"  # 5.7
    datagrams = [b"a" * 3, b"b" * 125, b"c" * 126, b"d" * 65535]
    server = pg.websocket_frames(datagrams, mask=False)
    assert server == b"".join(ws_frame(2, d, mask=False) for d in datagrams)
    keys = []
    for batch in (datagrams, datagrams[2:3]):  # a lone datagram takes a path of its own
        client = pg.websocket_frames(batch, mask=True)
        pos = 0
        for datagram in batch:
            header = 2 if len(datagram) < 126 else 4
            assert client[pos] == 0x82 and client[pos + 1] & 0x80  # final, binary, masked
            key = bytes(client[pos + header:pos + header + 4])
            keys.append(key)
            body = client[pos + header + 4:pos + header + 4 + len(datagram)]
            assert reference_mask(body, key) == datagram
            pos += header + 4 + len(datagram)
        assert pos == len(client)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("masked", [True, False], ids=["to-server", "to-client"])
def test_decoder_every_split_point_and_every_length_form(masked):
    """Whole binary messages of every length form, cut out of a stream split anywhere."""
    datagrams = [numbered(i, size) for i, size in enumerate((4, 125, 126, 1420, 65535))]
    stream = pg.websocket_frames(datagrams, mask=masked)
    for split in list(range(0, 12)) + [200, 1000, len(stream) - 1]:
        decoder = pg.WebSocketDecoder(masked=masked)
        first, left = ws_cut(decoder, stream[:split])
        rest, left = ws_cut(decoder, stream[split - left:])
        assert first + rest == datagrams and left == 0
        assert decoder.closed is None and decoder.pong is None


def test_decoder_reassembles_fragments_with_a_ping_between_and_drops_empty_messages():
    stream = (ws_frame(2, b"ab", fin=False) + ws_frame(9, b"are you there")
              + ws_frame(0, b"cd", fin=False) + ws_frame(0, b"ef")
              + ws_frame(2, b"") + ws_frame(10, b"pong: ignored") + ws_frame(2, b"next"))
    decoder = pg.WebSocketDecoder(masked=True)
    assert ws_cut(decoder, stream) == ([b"abcdef", b"next"], 0)
    assert decoder.pong == b"are you there" and decoder.closed is None


@pytest.mark.parametrize("frames,masked,code,text", [
    ([ws_frame(2, b"x", mask=False)], True, 1002, "unmasked frame from the client"),
    ([ws_frame(2, b"x")], False, 1002, "masked frame from the server"),
    ([ws_frame(1, b"text")], True, 1003, "text message"),
    ([ws_frame(2, length=2 ** 63)[:14]], True, 1009, "over 65535 bytes"),
    ([ws_frame(2, length=65536)[:14]], True, 1009, "over 65535 bytes"),
    ([ws_frame(2, b"x" * 65000, fin=False), ws_frame(0, length=600)[:8]], True, 1009,
     "over 65535 bytes"),
    ([ws_frame(2, b"x", rsv=4)], True, 1002, "reserved bits"),
    ([ws_frame(3, b"x")], True, 1002, "unknown opcode 0x3"),
    ([ws_frame(9, b"x", fin=False)], True, 1002, "fragmented or oversized control"),
    ([ws_frame(9, b"x" * 126)], True, 1002, "fragmented or oversized control"),
    ([ws_frame(0, b"x")], True, 1002, "continuation frame without a message"),
    ([ws_frame(2, b"x", fin=False), ws_frame(2, b"y")], True, 1002, "new message inside"),
    ([ws_frame(8, b"\x03")], True, 1002, "close frame of 1 byte"),
    ([ws_frame(8, b"\x03\xed")], True, 1002, "code 1005, which may not be sent"),
    ([ws_frame(8, b"\x03\xe8\xff")], True, 1007, "not UTF-8"),
], ids=["unmasked", "masked-to-client", "text", "2**63", "65536", "fragments-too-big", "rsv",
        "opcode", "fragmented-ping", "ping-126", "lone-continuation", "message-in-message",
        "close-1-byte", "close-1005", "close-utf8"])
def test_decoder_refuses_from_the_header_with_the_right_close_code(frames, masked, code, text):
    """Each violation ends the stream with its close code (RFC 6455 7.4.1); a too long
    message is refused from its header, never buffered; what came before is delivered."""
    good = ws_frame(2, b"before", mask=masked)
    decoder = pg.WebSocketDecoder(masked=masked)
    datagrams, _ = ws_cut(decoder, good + b"".join(frames) + b"never read")
    assert datagrams == [b"before"]
    assert decoder.closed.code == code and text in str(decoder.closed)
    assert not decoder.closed.by_peer
    assert decoder.closed.reason().startswith("WebSocket protocol error of the peer: ")


def test_decoder_a_close_of_the_peer_with_and_without_a_code():
    decoder = pg.WebSocketDecoder(masked=True)
    ws_cut(decoder, ws_frame(8, b"\x03\xe8bye") + ws_frame(2, b"after"))
    assert decoder.closed.by_peer and decoder.closed.code == 1000
    assert decoder.closed.reason() == "closed by peer: WebSocket close 1000 'bye'"
    decoder = pg.WebSocketDecoder(masked=False)
    assert ws_cut(decoder, ws_frame(8, mask=False)) == ([], 0)
    assert decoder.closed.code is None and decoder.closed.by_peer
    framing = pg.WebSocketFraming(client_side=False)
    assert framing.close_frame(None) == b"\x88\x00"  # RFC 6455 5.5.1: an empty close answers
    assert framing.close_frame(1001) == b"\x88\x02\x03\xe9"


WS_REQUEST_LINES = ["Host: a", "Connection: Upgrade", "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: " + WS_KEY]


def test_websocket_request_gets_the_rfc_answer_and_our_subprotocol_only_if_offered():
    head = request(WS_REQUEST_LINES + ["Sec-WebSocket-Protocol: chat, proxyguard-udp"])
    parsed = pg.parse_request(head)
    assert pg.check_upgrade_request(parsed) == pg.WEBSOCKET
    assert pg.choose_subprotocol(parsed) == "proxyguard-udp"
    assert pg.websocket_response(parsed, pg.choose_subprotocol(parsed)) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: proxyguard-udp\r\n\r\n")
    plain = pg.parse_request(request(WS_REQUEST_LINES))
    assert pg.choose_subprotocol(plain) is None
    assert b"Sec-WebSocket-Protocol" not in pg.websocket_response(plain, None)
    # Our client offers both: the batches are taken, whatever the order of the offer.
    for offer in ("proxyguard-uotlv, proxyguard-udp", "proxyguard-udp, chat, proxyguard-uotlv"):
        both = pg.parse_request(request(WS_REQUEST_LINES + ["Sec-WebSocket-Protocol: " + offer]))
        assert pg.choose_subprotocol(both) == "proxyguard-uotlv"
    assert pg.check_upgrade_request(pg.parse_request(request(
        ["Host: a", "Connection: keep-alive, Upgrade", "Upgrade: UoTLV/1"]))) == pg.PROTOCOL


@pytest.mark.parametrize("change,status,text", [
    (("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426, "version 8"),
    (("Sec-WebSocket-Key: " + WS_KEY, "X: y"), 400, "Sec-WebSocket-Key"),
    (("Sec-WebSocket-Key: " + WS_KEY, "Sec-WebSocket-Key: c2hvcnQ="), 400, "16 bytes"),
    (("Sec-WebSocket-Key: " + WS_KEY, "Sec-WebSocket-Key: not base64!!"), 400, "base64"),
])
def test_websocket_requests_that_break_rfc_6455_are_refused(change, status, text):
    error = refusal(request([change[1] if line == change[0] else line
                             for line in WS_REQUEST_LINES]))
    assert error.status == status and text in str(error)
    if status == 426:  # RFC 6455 4.2.2: the versions this server speaks
        assert ("Sec-WebSocket-Version", "13") in error.extra_headers
    assert refusal(request(WS_REQUEST_LINES, version="HTTP/1.0")).status == 400


def test_the_client_request_offers_our_subprotocols_the_batches_first():
    assert pg.build_upgrade_request("vpn:8443", "/pg", "ua", WS_KEY) == (
        b"GET /pg HTTP/1.1\r\nHost: vpn:8443\r\nUser-Agent: ua\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
        WS_KEY.encode() + b"\r\nSec-WebSocket-Protocol: proxyguard-uotlv, proxyguard-udp"
        b"\r\n\r\n")


GOOD_WS_ANSWER = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                  b"Sec-WebSocket-Protocol: proxyguard-udp\r\n\r\n")


@pytest.mark.parametrize("head,cause", [
    (GOOD_WS_ANSWER.replace(b"s3pP", b"AAAA"), "Sec-WebSocket-Accept does not match"),
    (GOOD_WS_ANSWER.replace(b"Sec-WebSocket-Protocol: proxyguard-udp\r\n", b""),
     "not a proxyguard.py server"),
    (GOOD_WS_ANSWER.replace(b"proxyguard-udp", b"proxyguard-uotlv, proxyguard-udp"),
     "did not take the proxyguard-uotlv or proxyguard-udp subprotocol"),
    (GOOD_WS_ANSWER.replace(b"proxyguard-udp", b"chat"), "not a proxyguard.py server"),
    (GOOD_WS_ANSWER.replace(b"Upgrade: websocket", b"Upgrade: UoTLV/1"), "instead of websocket"),
    (b"HTTP/1.1 426 Upgrade Required\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n",
     "speaks UoTLV/1 only, not WebSocket (the original ProxyGuard?): use http:// or https://"),
    (b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 14\r\n\r\n", "version 14"),
    (b"HTTP/1.1 404 Not Found\r\n\r\n", "wrong path"),
])
def test_the_client_checks_the_websocket_answer(head, cause):
    for taken in ("proxyguard-udp", "proxyguard-uotlv"):  # the one taken is returned
        answer = GOOD_WS_ANSWER.replace(b"proxyguard-udp", taken.encode())
        assert pg.check_upgrade_response(pg.parse_response(answer),
                                         websocket_key=WS_KEY) == taken
    with pytest.raises(pg.UpgradeRefused, match=re.escape(cause)):
        pg.check_upgrade_response(pg.parse_response(head), websocket_key=WS_KEY)


@pytest.mark.parametrize("target,ok", [
    ("/pg", True), ("/pg/", True), ("/pg/x?y=1", True), ("/pg?x", True), ("/pgx", False),
    ("/", False), ("/other/pg", False),
])
def test_path_prefix_takes_itself_and_below_only(target, ok):
    pg.check_path(target, None)  # no prefix: every path, as the original
    for prefix in ("/pg", "/pg/"):
        if ok:
            pg.check_path(target, prefix)
        else:
            with pytest.raises(pg.HandshakeError) as raised:
                pg.check_path(target, prefix)
            assert raised.value.status == 404


def test_ws_urls_and_their_websocket_twin():
    url = pg.ServerURL("wss://vpn.example.org/pg")
    assert (url.tls, url.websocket, url.port, url.transport) == (True, True, 443, "websocket")
    url = pg.ServerURL("ws://127.0.0.1:8080/")
    assert (url.tls, url.websocket, url.port) == (False, True, 8080)
    assert str(pg.ServerURL("https://h/pg").websocket_twin()) == "wss://h/pg"
    assert str(pg.ServerURL("HTTP://h:81/").websocket_twin()) == "ws://h:81/"
    assert pg.ServerURL("http://h/").transport == "UoTLV/1"


def test_keepalive_pings_after_quiet_either_way_and_pings_are_no_data():
    clock = FakeClock()
    idle = pg.IdleClock(60, clock)
    keepalive = pg.Keepalive(25, idle)
    clock.advance(20)
    assert keepalive.remaining() == pytest.approx(5)
    idle.sent()  # data towards the peer is traffic: the ping moves out
    clock.advance(24)
    assert keepalive.remaining() == pytest.approx(1)
    clock.advance(1)
    assert keepalive.remaining() == pytest.approx(0)
    keepalive.ping_sent()
    assert keepalive.remaining() == pytest.approx(25)
    assert idle.remaining() == pytest.approx(35)  # the ping did not feed the idle clock
    assert pg.Keepalive(0, idle).remaining() is None
    assert pg.next_wake(None, 3.0, 2.0) == 2.0 and pg.next_wake(None, None) == 0
    assert pg.next_wake(-1.0) == pytest.approx(0.000001)  # due now: wake at once, not never


# --- Frames built where the datagrams land; websockets' C masking if installed ---------------
# Every header form (2-byte length, 16-bit length), an empty datagram (dropped), the largest.
IN_PLACE_SIZES = [1420, 0, 125, 126, 1, 1420, 100, 65507, 7, 1420, 32, 148]


def fake_urandom(count):
    """Masking keys the same for every run (they come from os.urandom, one call a batch)."""
    return bytes((7 * index + 1) % 256 for index in range(count))


def frames_built_in_place(monkeypatch, client_side, accelerated, sizes,
                           framing_class=pg.WebSocketFraming):
    """The bytes a WebSocketFraming (or `framing_class`) gives the channel for `sizes`
    datagrams that a real UDP endpoint received in one batch, the framing with the C masking
    or the standard library's; and the datagrams sent."""
    monkeypatch.setattr(pg, "_MASK_XOR", None if accelerated else False)
    monkeypatch.setattr(os, "urandom", fake_urandom)
    framing = framing_class(client_side=client_side)
    assert (framing.xor is not None) == accelerated
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
        wireguard.bind((LOOPBACK, 0))
        endpoint = pg.TunnelUdpEndpoint.connected(wireguard.getsockname(), socket.AF_INET)
        try:
            datagrams = [numbered(index, size) for index, size in enumerate(sizes)]
            for datagram in datagrams:  # on loopback, queued at the endpoint when sent
                wireguard.sendto(datagram, endpoint.sock.getsockname())
            view = memoryview(bytearray(pg.UDP_BATCH_BYTES + pg.MAX_WEBSOCKET_HEADER
                                        + pg.MAX_FRAME_PAYLOAD))
            end, count = endpoint.receive_frames(view[framing.offset:], framing.batch_limit,
                                                 framing)
            sent = [datagram for datagram in datagrams if datagram]
            assert count == len(sent)
            assert framing.payload_bytes(end, count) == sum(map(len, sent))
            wire = bytes(framing.encode(view, end))
            assert framing.datagrams(view, end) == sent  # what a dying tunnel hands back
            return wire, sent
        finally:
            endpoint.release()


@pytest.mark.parametrize("client_side", [True, False], ids=["client-masks", "server"])
def test_websocket_frames_built_in_place_are_the_same_with_and_without_c_masking(
        monkeypatch, client_side):
    """The frames written where the UDP endpoint put the datagrams are those the joined
    encoder (websocket_frames) makes with the same keys, with websockets' apply_mask and with
    the standard library's XOR; the decoder gives the datagrams back either way."""
    pytest.importorskip("websockets.speedups")
    fast, sent = frames_built_in_place(monkeypatch, client_side, True, IN_PLACE_SIZES)
    slow, _ = frames_built_in_place(monkeypatch, client_side, False, IN_PLACE_SIZES)
    assert fast == slow == pg.websocket_frames(sent, client_side)
    for xor in (None, pg.mask_accelerator()):
        decoder = pg.WebSocketDecoder(masked=client_side, xor=xor)
        datagrams, pos = decoder.cut(memoryview(bytearray(fast)), len(fast))
        assert [bytes(datagram) for datagram in datagrams] == sent and pos == len(fast)
    # A lone datagram (no load) of each header form.
    for size in (1420, 60):
        fast, sent = frames_built_in_place(monkeypatch, client_side, True, [size])
        slow, _ = frames_built_in_place(monkeypatch, client_side, False, [size])
        assert fast == slow == pg.websocket_frames(sent, client_side)


def test_c_masking_is_used_when_websockets_is_installed_and_loaded_at_the_first_tunnel_only():
    """Importing proxyguard loads nothing; the first WebSocketFraming takes websockets' C
    apply_mask (without importing the websockets package, 60 ms); where websockets cannot be
    imported, the standard library's XOR does the work."""
    pytest.importorskip("websockets.speedups")
    script = ("import sys, proxyguard as pg\n"
              "assert pg._MASK_XOR is None and sys.modules.get('websockets') is None\n"
              "xor = pg.WebSocketFraming(client_side=True).xor\n"
              "print(xor and xor.__name__, xor and type(xor).__name__, pg._MASK_XOR is not None)")
    for blocked, expected in [(False, "apply_mask builtin_function_or_method True"),
                              (True, "None None True")]:
        prefix = "import sys; sys.modules['websockets'] = None\n" if blocked else ""
        out = subprocess.run([sys.executable, "-c", prefix + script], cwd=HERE,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split("\n")[0] == expected, out


def test_the_server_masks_with_c_at_its_first_websocket_tunnel(tmp_path, echo, procs):
    """A real server: its first WebSocket tunnel says (debug) which XOR unmasks the frames."""
    pytest.importorskip("websockets.speedups")
    server = start_server(tmp_path, echo.port, "--log-level", "debug")
    procs.append(server)
    assert "WebSocket masking" not in server.log()
    with ws_connect(server.port, "/") as ws:
        ws_roundtrip(ws, [numbered(1, 1420), numbered(2, 100)])
    server.wait_log("WebSocket masking: websockets' C apply_mask")
    assert server.log().count("WebSocket masking") == 1


# --- proxyguard-uotlv: the UoTLV/1 frames of a batch in one message -------------------------
# A batch that crosses WEBSOCKET_BATCH_BYTES with its last datagram, an empty one (dropped),
# every length form of the message header.
BATCH_SIZES = [1420, 0, 125, 126, 1, 1420, 100, 7, 1420, 32, 148, 61000]


@pytest.mark.parametrize("client_side", [True, False], ids=["client-masks", "server"])
def test_a_batch_goes_in_one_message_of_uotlv_frames_with_and_without_c_masking(
        monkeypatch, client_side):
    """The UDP endpoint writes UoTLV/1 frames behind room for one header; the message is what
    websocket_batches makes of the same datagrams with the same key, with websockets'
    apply_mask and with the standard library's XOR; unmasked, its payload is the UoTLV/1
    frames exactly; the batched decoder gives the datagrams back either way."""
    pytest.importorskip("websockets.speedups")
    fast, sent = frames_built_in_place(monkeypatch, client_side, True, BATCH_SIZES,
                                       pg.WebSocketBatchFraming)
    slow, _ = frames_built_in_place(monkeypatch, client_side, False, BATCH_SIZES,
                                    pg.WebSocketBatchFraming)
    assert fast == slow == pg.websocket_batches(sent, client_side)
    payload = pg.encode_frames(sent)
    assert len(payload) > 0xFFFF  # the 64-bit length form (RFC 6455 5.2)
    assert fast[:2] == bytes((0x82, (0x80 if client_side else 0) | 127))
    assert int.from_bytes(fast[2:10], "big") == len(payload)
    if client_side:
        assert fast[14:] == pg.mask_payload(payload, int.from_bytes(fast[10:14], "little"))
    else:
        assert fast[10:] == payload
    for xor in (None, pg.mask_accelerator()):
        decoder = pg.WebSocketDecoder(masked=client_side, xor=xor, batched=True)
        datagrams, pos = decoder.cut(memoryview(bytearray(fast)), len(fast))
        assert [bytes(datagram) for datagram in datagrams] == sent and pos == len(fast)
        assert decoder.closed is None
    # A lone datagram (no load): a 2-byte header, and the 16-bit length form.
    for size, head_size in ((60, 2), (1420, 4)):
        fast, sent = frames_built_in_place(monkeypatch, client_side, True, [size],
                                           pg.WebSocketBatchFraming)
        assert fast == pg.websocket_batches(sent, client_side)
        assert len(fast) == head_size + 4 * client_side + 2 + size


def test_batches_of_queued_datagrams_are_cut_at_the_batch_size_and_keys_are_fresh():
    """The client's queue for a new tunnel: 100 datagrams of 1420 bytes make three messages
    (a new one once one holds WEBSOCKET_BATCH_BYTES: 47 + 47 + 6 frames), each with a key of
    its own, and come back whole."""
    sent = [numbered(index, 1420) for index in range(100)]
    wire = pg.websocket_batches(sent, True)
    decoder = pg.WebSocketDecoder(masked=True, batched=True)
    view = memoryview(bytearray(wire))
    pos, counts, keys = 0, [], set()
    while pos < len(wire):
        header = 4 if view[pos + 1] & 0x7F == 126 else 10
        length = int.from_bytes(view[pos + 2:pos + header], "big")
        keys.add(bytes(view[pos + header:pos + header + 4]))
        stop = pos + header + 4 + length
        datagrams, used = decoder.cut(view[pos:stop], stop - pos)
        assert used == stop - pos
        counts.append(len(datagrams))
        assert all(bytes(d) == sent[sum(counts[:-1]) + i] for i, d in enumerate(datagrams))
        pos = stop
    assert counts == [47, 47, 6] and len(keys) == 3
    framing = pg.WebSocketBatchFraming(client_side=True)
    assert len({framing._next_key() for _ in range(2000)}) > 1990  # os.urandom's, fresh


def test_a_batched_message_that_ends_inside_a_frame_is_refused_and_fragments_are_joined():
    frames = pg.encode_frames([b"one", b"two" * 100])
    # Fragmented (RFC 6455 5.4), cut inside the second UoTLV/1 frame: joined first, then cut.
    wire = (ws_frame(pg.OP_BINARY, frames[:9], fin=False)
            + ws_frame(pg.OP_CONTINUATION, frames[9:]))
    decoder = pg.WebSocketDecoder(masked=True, batched=True)
    assert ws_cut(decoder, wire) == ([b"one", b"two" * 100], 0)
    # One frame and part of the next: 1007, and nothing of the message delivered.
    broken = ws_frame(pg.OP_BINARY, frames[:9])
    decoder = pg.WebSocketDecoder(masked=True, batched=True)
    assert ws_cut(decoder, broken)[0] == []
    assert decoder.closed.code == pg.CLOSE_INVALID_PAYLOAD
    assert "ends inside a UoTLV/1 frame" in str(decoder.closed)
    # A message longer than any batch is refused from its header alone (1009).
    decoder = pg.WebSocketDecoder(masked=True, batched=True)
    assert ws_cut(decoder, ws_frame(pg.OP_BINARY, length=pg.MAX_BATCH_MESSAGE + 1))[0] == []
    assert decoder.closed.code == pg.CLOSE_TOO_BIG and "a batch" in str(decoder.closed)
    decoder = pg.WebSocketDecoder(masked=True, batched=True)  # the largest is waited for
    assert ws_cut(decoder, ws_frame(pg.OP_BINARY, length=pg.MAX_BATCH_MESSAGE)) == ([], 14)
    assert decoder.closed is None
    # Without the batches, a message is one datagram, and the same frames stay one.
    assert ws_cut(pg.WebSocketDecoder(masked=True), broken) == ([frames[:9]], 0)


# =============================================================================================
# In-process: Server, Tunnel and Client over socketpairs and loopback sockets, no subprocess
# =============================================================================================


def serve_socketpair(server, peer=(LOOPBACK, 40000)):
    """Our end of a socketpair whose other end `server.handle` serves in a thread, as if
    accepted from `peer`; returns (socket, thread)."""
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.handle, args=(pg.Connection(theirs, peer),),
                              daemon=True)
    thread.start()
    return ours, thread


def read_frames(sock, decoder, count, timeout=5.0):
    """Read until `decoder` has cut `count` datagrams out of the stream; return them."""
    datagrams = []
    deadline = time.monotonic() + timeout
    while len(datagrams) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "closed after %d of %d datagrams" % (len(datagrams), count)
        datagrams.extend(decoder.feed(chunk))
    return datagrams


def test_server_handles_a_socketpair_in_process(echo):
    server = pg.Server(None, (LOOPBACK, echo.port), idle_timeout=30, handshake_timeout=5)
    sock, thread = serve_socketpair(server)
    datagrams = [numbered(i, size) for i, size in enumerate((1, 1420, 65507))]
    sock.sendall(UPGRADE + b"".join(encode_frame(d) for d in datagrams))
    reader = pg.HeadReader()
    parts = None
    while parts is None:
        sock.settimeout(5)
        parts = reader.feed(sock.recv(4096))
    assert parts[0] == pg.UPGRADE_RESPONSE
    # The echoes may come in the same read as the 101 (CI saw the first one there): the
    # frames already cut count towards the three.
    decoder = FrameDecoder()
    echoed = decoder.feed(parts[1])
    assert echoed + read_frames(sock, decoder, len(datagrams) - len(echoed)) == datagrams
    assert server.tunnels_open() == 1
    sock.close()
    thread.join(5)
    assert not thread.is_alive() and server.tunnels_open() == 0


class RecordState(logging.Handler):
    """A log handler that calls `state()` as each record whose message starts with `prefix`
    is written (in the writing thread: what anyone reading the line could see), and keeps the
    results."""

    def __init__(self, prefix, state):
        super().__init__()
        self.prefix, self.state, self.seen = prefix, state, []

    def emit(self, record):
        if record.getMessage().startswith(self.prefix):
            self.seen.append(self.state())


def test_a_closed_tunnel_is_in_the_totals_when_its_down_line_is_written(echo, caplog):
    """A scrape (or SIGUSR1, or systemd's STATUS) prompted by "tunnel down" sees the tunnel
    closed, not still open with its lifetime unobserved."""
    server = pg.Server(None, (LOOPBACK, echo.port), idle_timeout=30, handshake_timeout=5)
    handler = RecordState("tunnel down", lambda: (
        server.tunnels_open(), server.lifetimes.count, server.closed_traffic.to_udp_datagrams))
    caplog.set_level(logging.INFO, logger="proxyguard")
    pg.log.addHandler(handler)
    try:
        sock, thread = serve_socketpair(server)
        sock.sendall(UPGRADE + encode_frame(b"one"))
        wait_until(lambda: echo.count == 1, 5, "the datagram at WireGuard")
        sock.close()
        thread.join(5)
    finally:
        pg.log.removeHandler(handler)
    assert handler.seen == [(0, 1, 1)]


@pytest.mark.parametrize("data, status", [
    (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    (b"\x00\x01garbage\r\n\r\n", 400)])
def test_server_refuses_in_one_place_in_process(data, status, caplog):
    server = pg.Server(None, (LOOPBACK, 9), handshake_timeout=5)
    sock, thread = serve_socketpair(server)
    sock.sendall(data)
    answer, how = read_answer(sock, time.monotonic() + 5)
    thread.join(5)
    assert status_of(answer) == status and how == "eof" and not thread.is_alive()
    assert answer.split(b"\r\n")[0].endswith(HTTPStatus(status).phrase.encode())


def tls_client_hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# A slow-loris trickles one byte at this interval: a per-call timeout restarts at every byte,
# so without one deadline for the whole handshake the connection would last the whole trickle
# (a 517-byte ClientHello: 26 s here).
TRICKLE_INTERVAL = 0.05
DEADLINE = 0.5


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_trickled_handshake_ends_at_the_one_deadline(tls, certs):
    context = pg.server_tls_context(certs.cert, certs.key) if tls else None
    server = pg.Server(None, (LOOPBACK, 9), handshake_timeout=DEADLINE, tls_context=context)
    # A ClientHello, or a head that never ends
    data = tls_client_hello() if tls else UPGRADE[:-2] + b"X-Pad: " + b"a" * 200
    assert len(data) * TRICKLE_INTERVAL > 3 * (DEADLINE + TIME_TOLERANCE)
    started = time.monotonic()
    sock, thread = serve_socketpair(server)
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        thread.join(TRICKLE_INTERVAL)  # paces the trickle; returns at once when it ends
        if not thread.is_alive():
            break
    thread.join(10)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert DEADLINE <= elapsed < DEADLINE + TIME_TOLERANCE
    answer, _ = read_answer(sock, time.monotonic() + 2)
    if not tls:
        assert status_of(answer) == 408


# What a trickling server sends the client, a byte at a time, at each step of its handshake.
TRICKLED_ANSWERS = {
    "proxy": b"HTTP/1.1 200 Connection established\r\nX-Pad: " + b"a" * 400,
    "tls": b"\x16\x03\x03\x40\x00" + b"\x00" * 400,  # a TLS record that never completes
    "upgrade": b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: " + b"a" * 400,
}


@pytest.mark.parametrize("step", sorted(TRICKLED_ANSWERS))
def test_trickling_server_cannot_stretch_the_client_handshake(step):
    """--connect-timeout bounds the whole handshake (proxy CONNECT, TLS, upgrade) however
    slowly the other side answers."""
    listener = socket.create_server((LOOPBACK, 0))
    done = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            for byte in TRICKLED_ANSWERS[step]:
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return
                if done.wait(TRICKLE_INTERVAL):  # paces the trickle
                    return

    threading.Thread(target=trickle, daemon=True).start()
    address = "%s:%d" % listener.getsockname()
    dialer = pg.Dialer(
        pg.ServerURL("%s://%s/" % ("https" if step == "tls" else "http", address)),
        proxy=pg.ProxyURL("http://" + address) if step == "proxy" else None,
        tls_context=pg.client_tls_context() if step == "tls" else None,
        connect_timeout=DEADLINE)
    started = time.monotonic()
    try:
        with pytest.raises(OSError):
            dialer.dial()
        elapsed = time.monotonic() - started
    finally:
        done.set()
        listener.close()
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + TIME_TOLERANCE


def blackhole_listeners(count):
    """Listeners on 127.0.0.1, 127.0.0.2 ... (one port) whose accept queue is full, so a
    connect to them hangs (SYNs dropped): addresses that do not answer, on loopback."""
    listeners, fillers = [], []
    port = 0
    for index in range(count):
        listener = socket.socket()
        listener.bind(("127.0.0.%d" % (index + 1), port))
        port = listener.getsockname()[1]
        listener.listen(0)
        listeners.append(listener)
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(socket.timeout):  # the queue is full: the black hole works
        probe.connect(listeners[0].getsockname())
    probe.close()
    return port, listeners + fillers


@pytest.mark.slow  # waits out a 2 s timeout
def test_connect_timeout_bounds_all_addresses_together():
    port, sockets = blackhole_listeners(2)
    try:
        dialer = pg.Dialer(pg.ServerURL("http://vpn.example.org:%d/" % port),
                           peer_ips=["127.0.0.1", "127.0.0.2"], connect_timeout=2.0)
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            dialer.dial()
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert "127.0.0.1" in str(caught.value) and "127.0.0.2" in str(caught.value)
    # Each address got its share, not the whole 2 s each (4 s): wide of both for a slow CI.
    assert 1.9 <= elapsed < 2 + TIME_TOLERANCE


@pytest.mark.slow  # waits out a 2 s timeout
def test_tunnel_closes_at_the_idle_timeout_after_the_last_data_either_way():
    """Data only towards the peer at 1.2 s, idle timeout 2 s: closed at 3.2 s, not at 4 s
    (a receive timeout that restarts at every wait counts from the last recv instead)."""
    timeout = 2.0
    ours, theirs = socket.socketpair()
    wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wireguard.bind((LOOPBACK, 0))
    endpoint = pg.TunnelUdpEndpoint.connected(wireguard.getsockname(), socket.AF_INET)
    tunnel = pg.Tunnel(pg.PlainChannel(theirs), endpoint, "test", pg.IdleClock(timeout),
                       greeting=b"go")
    result = []
    thread = threading.Thread(target=lambda: result.append(tunnel.run()), daemon=True)
    thread.start()
    ours.settimeout(5)
    assert ours.recv(2) == b"go"  # the tunnel runs
    thread.join(0.6 * timeout)  # let part of the timeout pass with no data (scenario, no sync)
    wireguard.sendto(b"keepalive", endpoint.sock.getsockname())
    assert read_frames(ours, FrameDecoder(), 1) == [b"keepalive"]
    last_data = time.monotonic()
    assert ours.recv(100) == b""  # the tunnel closed
    closed_after = time.monotonic() - last_data
    thread.join(5)
    assert result == ["idle for 2s"]
    assert timeout - 0.2 <= closed_after < timeout + 0.6  # the bug: timeout + 0.8
    for sock in (ours, wireguard):
        sock.close()


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def running_server(wireguard_port, **options):
    """A pg.Server on a free loopback port, serving in a thread; stopped and joined at exit."""
    server = pg.Server.open((LOOPBACK, 0), (LOOPBACK, wireguard_port), **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)
        assert not thread.is_alive()


@contextlib.contextmanager
def running_client(url, **dialer_options):
    """A pg.Client for `url` in a thread, with a WireGuardStandIn in front of it; yields
    (client, wireguard); stopped and joined at exit (stopping twice is harmless)."""
    wireguard = WireGuardStandIn()
    client = pg.Client.open(pg.Dialer(pg.ServerURL(url), **dialer_options), listen_port=0,
                            forward_port=wireguard.port)
    wireguard.endpoint = client.address
    thread = threading.Thread(target=client.serve_forever, daemon=True)
    thread.start()
    try:
        yield client, wireguard
    finally:
        client.stop()
        thread.join(5)
        wireguard.sock.close()
        assert not thread.is_alive()


def test_client_and_server_in_process_close_every_socket_and_thread(echo):
    threads_before, fds_before = threading.active_count(), open_fds()
    with running_server(echo.port, idle_timeout=30) as server:
        with running_client("http://%s:%d/" % server.address) as (_, wireguard):
            for size in (1, 1420, 65507):
                datagram = numbered(size, size)
                assert wireguard.roundtrip(datagram) == datagram
            assert server.tunnels_open() == 1
    wait_until(lambda: threading.active_count() == threads_before, 5,
               "threads back to the start value")
    assert open_fds() == fds_before  # the client's UDP socket and its wake pipe too


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_client_and_server_in_process(tls, echo, certs, caplog):
    """ws:// and wss:// end to end in-process: client and server agree on proxyguard-uotlv,
    datagrams of every size come back whole, a burst too (in batches), the server counts the
    tunnel as WebSocket, and every thread and socket is gone after."""
    threads_before, fds_before = threading.active_count(), open_fds()
    server_context = pg.server_tls_context(certs.cert, certs.key) if tls else None
    with running_server(echo.port, idle_timeout=30, tls_context=server_context) as server, \
            caplog.at_level(logging.INFO, logger="proxyguard"):
        url = "%s://localhost:%d/pg" % ("wss" if tls else "ws", server.address[1])
        with running_client(url, tls_context=pg.client_tls_context(certs.ca) if tls else None
                            ) as (_, wireguard):
            for size in (1, 125, 126, 1420, 65507):
                datagram = numbered(size, size)
                assert wireguard.roundtrip(datagram) == datagram
            burst = [numbered(index, 1420) for index in range(40)]
            for datagram in burst:
                wireguard.send(datagram)
            assert [wireguard.recv() for _ in burst] == burst
            assert caplog.text.count("websocket (proxyguard-uotlv)") == 2  # both tunnel-up lines
            metrics = {(metric.name, tuple(labels)): value for metric in server.metrics()
                       for labels, value in metric_samples(metric)}
            assert metrics[("proxyguard_server_tunnels_open", (("transport", "websocket"),))] == 1
    wait_until(lambda: threading.active_count() == threads_before, 5,
               "threads back to the start value")
    assert open_fds() == fds_before


def metric_samples(metric):
    """(sorted label pairs, value) of a pg.Metric's plain samples."""
    return [(sorted(labels), value) for suffix, labels, value in metric.samples if not suffix]


def upgrade_socketpair(server, request_bytes):
    """Serve a socketpair with `server`, send `request_bytes`, return (socket, thread, the
    answer's head)."""
    sock, thread = serve_socketpair(server)
    sock.sendall(request_bytes)
    return sock, thread, read_answer_head(sock)


WS_UPGRADE = pg.build_upgrade_request("example", "/pg", websocket_key=WS_KEY)


def read_until_closed(sock, timeout=5):
    """What comes until the peer closes (read_answer), which it must do within `timeout`."""
    data, how = read_answer(sock, time.monotonic() + timeout)
    assert how == "eof", (how, data)
    return data


def test_keepalive_over_uotlv_is_warned_about_as_doing_nothing(caplog):
    for url, keepalive, warned in [("http://127.0.0.1:9/", 5, True),
                                   ("https://127.0.0.1:9/", pg.DEFAULT_KEEPALIVE, False),
                                   ("ws://127.0.0.1:9/", 5, False)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="proxyguard"):
            client = pg.Client.open(pg.Dialer(pg.ServerURL(url)), listen_port=0,
                                    forward_port=9, keepalive=keepalive)
        client.endpoint.close()
        assert ("does nothing over %s (UoTLV/1 has no ping)" % url[:url.index("/") + 2]
                in caplog.text) == warned, (url, caplog.text)


@pytest.mark.parametrize("scheme", ["http", "ws"])
def test_check_in_process_says_the_transport_and_ends_a_websocket_with_close_1000(scheme, echo,
                                                                                  caplog):
    with caplog.at_level(logging.INFO, logger="proxyguard"), \
            running_server(echo.port) as server:
        out = io.StringIO()
        url = "%s://%s:%d/" % ((scheme,) + server.address)
        assert pg.run_check(pg.Dialer(pg.ServerURL(url)), out) == 0
        assert out.getvalue().endswith("accepts %s upgrades\n" % pg.ServerURL(url).transport)
        wait_until(lambda: "tunnel down" in caplog.text, 5, "the tunnel down")
    assert ("closed by peer: WebSocket close 1000" in caplog.text) == (scheme == "ws")


def test_server_ends_a_websocket_with_close_1000_when_idle_and_1001_when_stopping(echo):
    server = pg.Server(None, (LOOPBACK, echo.port), idle_timeout=0.3, handshake_timeout=5)
    sock, thread, head = upgrade_socketpair(server, WS_UPGRADE)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert read_until_closed(sock) == b"\x88\x02\x03\xe8"  # RFC 6455 7.4.1: 1000, normal
    thread.join(5)
    server.idle_timeout = 30
    sock, thread, head = upgrade_socketpair(server, WS_UPGRADE)
    wait_until(lambda: server.tunnels_open() == 1, 5, "the tunnel up")
    server.stop()
    assert read_until_closed(sock) == b"\x88\x02\x03\xe9"  # 1001, going away
    thread.join(5)


@pytest.mark.parametrize("transport", ["uotlv", "websocket"])
@pytest.mark.parametrize("path,status", [("/pg", b"101"), ("/pg/x?y", b"101"),
                                         ("/other", b"404"), ("/pgx", b"404")])
def test_path_prefix_in_process_answers_404_elsewhere_for_both_transports(transport, path,
                                                                          status, echo):
    server = pg.Server(None, (LOOPBACK, echo.port), idle_timeout=30, handshake_timeout=5,
                       path="/pg")
    request_bytes = pg.build_upgrade_request("example", path, websocket_key=(
        WS_KEY if transport == "websocket" else None))
    sock, thread, head = upgrade_socketpair(server, request_bytes)
    assert head.startswith(b"HTTP/1.1 " + status + b" ")
    sock.close()
    thread.join(5)
    assert server.refused[404] == (status == b"404")


def test_keepalive_pings_a_quiet_tunnel_and_the_idle_timeout_still_ends_it():
    """The client's pings go out every --keepalive seconds of quiet, masked; they are no
    data, so the tunnel still ends at its idle timeout, with a close frame."""
    ours, theirs = socket.socketpair()
    wireguard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wireguard.bind((LOOPBACK, 0))
    endpoint = pg.TunnelUdpEndpoint.connected(wireguard.getsockname(), socket.AF_INET)
    framing = pg.WebSocketFraming(client_side=True, keepalive=0.1)
    tunnel = pg.Tunnel(pg.PlainChannel(theirs), endpoint, "test", pg.IdleClock(1.0),
                       framing=framing)
    started = time.monotonic()
    thread, result = run_in_thread(tunnel)
    stream = read_until_closed(ours)
    lived = time.monotonic() - started
    thread.join(5)
    assert result == ["idle for 1s"] and 0.9 <= lived < 3  # pings would keep it for ever
    pings = 0  # each: final ping, masked, empty, then its 4-byte key
    while stream[6 * pings:6 * pings + 2] == b"\x89\x80":
        pings += 1
    assert 5 <= pings <= 10
    assert stream[6 * pings:6 * pings + 2] == b"\x88\x82"  # then a masked close, its code
    assert len(stream) == 6 * pings + 8
    for sock in (ours, wireguard):
        sock.close()


def test_client_honours_retry_after_of_a_full_server(caplog):
    """A 503 with Retry-After: 3 makes the client wait 3 s (not its 1 s back-off), and
    stop() ends that wait at once."""
    listener = socket.create_server((LOOPBACK, 0))
    answered = threading.Event()

    def full_server():
        conn, _ = listener.accept()
        with conn:
            read_answer_head(conn)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\n"
                         b"Content-Length: 0\r\n\r\n")
        answered.set()

    threading.Thread(target=full_server, daemon=True).start()
    url = "http://%s:%d/" % listener.getsockname()
    with caplog.at_level(logging.INFO, logger="proxyguard"):
        with running_client(url) as (client, wireguard):
            wireguard.send(b"handshake")
            assert answered.wait(5)
            wait_until(lambda: "next attempt in 3s" in caplog.text, 5, "a 3 s wait logged")
            stopped = time.monotonic()
        assert time.monotonic() - stopped < TIME_TOLERANCE  # stop() ended the 3 s wait at once
    listener.close()


def test_client_waits_its_backoff_after_a_tunnel_that_died_at_once(caplog):
    """A tunnel the server closes at once is a failure: the next connection waits 1 s. (The
    dying tunnel's own wake of the UDP endpoint once cut that wait to nothing.)"""
    listener = socket.create_server((LOOPBACK, 0))
    accepted = []

    def short_lived_server():
        for _ in range(2):
            conn, _ = listener.accept()
            accepted.append(time.monotonic())
            with conn:
                read_answer_head(conn)
                conn.sendall(pg.UPGRADE_RESPONSE)

    threading.Thread(target=short_lived_server, daemon=True).start()
    url = "http://%s:%d/" % listener.getsockname()
    with caplog.at_level(logging.INFO, logger="proxyguard"):
        with running_client(url) as (_, wireguard):
            wireguard.send(b"first")
            wait_until(lambda: "next attempt in 1s" in caplog.text, 5, "a 1 s wait logged")
            wireguard.send(b"second")  # at once: the client must still wait out its second
            wait_until(lambda: len(accepted) == 2, 5, "the second connection")
    listener.close()
    assert accepted[1] - accepted[0] >= 0.95


def read_answer_head(sock):
    """Read an HTTP head from `sock` (5 s at most); return it."""
    reader = pg.HeadReader()
    sock.settimeout(5)
    parts = None
    while parts is None:
        parts = reader.feed(sock.recv(4096))
    return parts[0]


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


@pytest.mark.parametrize("scheme", ["http", pytest.param("ws", marks=pytest.mark.slow)])
def test_server_restart_loses_nothing_sent_after_it(scheme, tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "%s://%s:%d/" % (scheme, LOOPBACK, server.port))
    procs.append(client)
    wireguard = client.wireguard
    stop_flow = threading.Event()

    def flow():  # traffic that keeps flowing while the server dies
        i = 0
        while not stop_flow.is_set():
            wireguard.send(b"before %d" % i)
            i += 1
            time.sleep(0.002)  # pacing: a steady flow, not a flood

    assert wireguard.roundtrip(b"hello") == b"hello"
    flowing = threading.Thread(target=flow)
    flowing.start()
    wait_until(lambda: echo.count >= 1 + 50, 10, "the flow reaching WireGuard")
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
        sock.sendall(UPGRADE + encode_frame(datagrams[0]))
        reply = sock.recv(len(pg.UPGRADE_RESPONSE))
        assert reply == pg.UPGRADE_RESPONSE
        for byte in b"".join(encode_frame(d) for d in datagrams[1:]):
            sock.sendall(bytes([byte]))
        decoder = FrameDecoder()
        got = []
        # The empty datagram reaches the echo, which sends back an empty datagram that is
        # dropped as the original does; the others come back.
        while len(got) < 3:
            got += decoder.feed(sock.recv(65536))
    assert got == [datagrams[0], datagrams[2], datagrams[3]]
    assert echo.count == 4


def test_idle_timeout_closes_both_sides(tmp_path, echo, procs):
    # The server's own timeout far behind, so that a slow machine's client still closes first.
    server = start_server(tmp_path, echo.port, "--idle-timeout", "5")
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
    for i in range(5):  # nothing listens: they draw ICMP port unreachable
        client.wireguard.send(b"lost %d" % i)
    server.wait_log("tunnel up")
    server.wait_log("nothing listens on")  # the ICMP has reached the tunnel's socket
    echo = UdpEcho(wireguard_port)
    try:
        client.wireguard.send(b"back")
        # One of the five may still have been on its way to the port as the echo bound it.
        while True:
            answer = client.wireguard.recv()
            if answer == b"back":
                break
            assert answer.startswith(b"lost "), answer
    finally:
        echo.close()
    assert "tunnel down" not in server.log()
    assert client.log().count("tunnel up") == 1


def test_client_warns_once_when_wireguard_lacks_listen_port(tunnel):
    """WireGuard without ListenPort sends from a random port, but replies go to --forward-port:
    one warning that says what to set; the datagrams still go through."""
    _, client = tunnel
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
        stray.bind((LOOPBACK, 0))
        for i in range(5):
            stray.sendto(b"stray %d" % i, client.wireguard.endpoint)
            assert client.wireguard.recv() == b"stray %d" % i   # replies go to forward-port
    client.wait_log("set ListenPort = %d" % client.wireguard.port)
    assert client.log().count("set ListenPort") == 1
    assert client.wireguard.roundtrip(b"from ListenPort") == b"from ListenPort"
    assert client.log().count("set ListenPort") == 1


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
            decoder = FrameDecoder()
            got = []
            while not got:
                got += decoder.feed(conn.recv(100))
            assert got == [b"first"]
            conn.sendall(encode_frame(b"reply"))
            assert client.wireguard.recv() == b"reply"


@pytest.mark.slow
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


def readme_section(title):
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    start = text.index("## " + title)
    end = text.find("\n## ", start + 3)
    return text[start:end if end >= 0 else None]


def readme_commands(section):
    """The `python3 proxyguard.py ...` lines of a README section's sh blocks, as argument
    lists for proxyguard.py (comments dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python3", "proxyguard.py"]:
                commands.append(words[2:])
    return commands


def test_quick_start_names_the_packages_ci_installs():
    """The Quick start's list of what `bash .ci/run` installs is .ci/run's apt-get list (it
    fell behind twice: prometheus and systemd, then pipx)."""
    listed = re.search(r"installs Debian's `([^`]+)`", readme_section("Quick start"))
    with open(os.path.join(HERE, ".ci", "run")) as f:
        installed = re.search(r"apt-get install (.*?[^\\])\n", f.read(), re.S).group(1)
    assert sorted(listed.group(1).split()) == sorted(
        word for word in installed.replace("\\\n", " ").split() if not word.startswith("-"))


def test_quick_start_runs_as_written(tmp_path, procs):
    """The README's Quick start, literally: (1) starts a server with the defaults, and the
    command that proves it prints the success line the README quotes."""
    section = readme_section("Quick start")
    server_args, check_args = readme_commands(section)[:2]
    assert server_args == ["server"] and check_args[0] == "check"
    server = Proc(tmp_path, server_args, name="quick-start")
    procs.append(server)
    result = run_cli(*check_args)
    success = re.search(r"ends with `(result {3}ok: [^`]+)`", section).group(1)
    assert result.returncode == 0 and success in result.stdout, result.stdout + result.stderr
    server.wait_log("tunnel down")
    assert "tunnel up" in server.log()
    assert server.stop() == 0


def test_ci_runs_the_tests_with_debians_python_alone():
    """.ci/run makes its venv from Debian's /usr/bin/python3 and leaves no other Python on
    PATH, so a Python of the machine cannot hide what a stock Debian refuses (PEP 668)."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("checks the CI environment (CI=true bash .ci/run)")
    assert sys.prefix != sys.base_prefix, "not in a virtual environment: %s" % sys.prefix
    assert os.path.realpath(sys.base_prefix) == "/usr", sys.base_prefix
    pythons = {os.path.realpath(path) for directory in os.environ["PATH"].split(os.pathsep)
               for path in [os.path.join(directory, "python3")] if os.path.exists(path)}
    assert pythons <= {os.path.realpath(sys.executable), "/usr/bin/python3.%d"
                       % sys.version_info[1]}, pythons


# --- OpenWrt 23.05's python3-light and the packages the README names -------------------------
# The standard library modules OpenWrt's packages repository splits out of python3-light
# (lang/python/python3/files/python3-package-*.mk, and the python3-light filespec in
# lang/python/python3/Makefile), by package: what a router with python3-light alone lacks.
OPENWRT_SPLIT_PACKAGES = {
    "python3-asyncio": ["asyncio"], "python3-cgi": ["cgi"], "python3-cgitb": ["cgitb"],
    "python3-codecs": ["_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp",
                       "_codecs_kr", "_codecs_tw", "unicodedata"],
    "python3-ctypes": ["ctypes", "_ctypes"], "python3-dbm": ["dbm", "_dbm", "_gdbm"],
    "python3-decimal": ["decimal", "_decimal"], "python3-distutils": ["distutils"],
    "python3-email": ["email"], "python3-lib2to3": ["lib2to3"], "python3-logging": ["logging"],
    "python3-lzma": ["lzma", "_lzma"],
    "python3-multiprocessing": ["multiprocessing", "_multiprocessing"],
    "python3-ncurses": ["curses", "_curses", "_curses_panel"],
    "python3-openssl": ["_ssl", "_hashlib"], "python3-pydoc": ["doctest", "pydoc", "pydoc_data"],
    "python3-readline": ["readline"], "python3-sqlite3": ["sqlite3", "_sqlite3"],
    "python3-unittest": ["unittest"], "python3-urllib": ["urllib"],
    "python3-uuid": ["uuid", "_uuid"], "python3-venv": ["ensurepip", "venv"],
    "python3-webbrowser": ["webbrowser"],
    "python3-xml": ["xml", "xmlrpc", "_elementtree", "pyexpat"],
}
# Not packaged at all (python3-light's filespec drops them), and what pip would bring.
OPENWRT_ABSENT = ["idlelib", "tkinter", "_tkinter", "turtledemo", "test", "_osx_support",
                  "configargparse"]
# A package's dependencies that opkg installs with it (DEPENDS:= in its .mk).
OPENWRT_DEPENDS = {"python3-urllib": ["python3-email"], "python3-cgi": ["python3-email"],
                   "python3-distutils": ["python3-email"]}

OPENWRT_PYTHON = r'''
"""Run a script as on OpenWrt: a meta-path finder refuses every module that the packages
in PROXYGUARD_TEST_REFUSED (comma list of top-level names) hold. argv: the interpreter
(ignored), the script, its arguments."""
import os, runpy, sys
REFUSED = set(os.environ["PROXYGUARD_TEST_REFUSED"].split(","))


class Refuse:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            sys.stderr.write("openwrt: refused %s\n" % name)
            raise ModuleNotFoundError("No module named %r (not installed)" % name, name=name)
        return None


early = sorted(name for name in sys.modules if name.partition(".")[0] in REFUSED)
for name in early:  # imported by site before us: a router's python has none of them
    del sys.modules[name]
sys.meta_path.insert(0, Refuse)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def readme_opkg_lines():
    """The packages of each `opkg install` line of the README's OpenWrt section."""
    section = readme_section("On OpenWrt")
    return [line.split("opkg install", 1)[1].split() for line in section.splitlines()
            if line.strip().startswith("opkg install")]


def openwrt_refused(packages):
    """The module names a router lacks with python3-light plus `packages` (and their deps)."""
    installed = set(packages)
    for package in packages:
        installed.update(OPENWRT_DEPENDS.get(package, ()))
    return sorted(name for package, names in OPENWRT_SPLIT_PACKAGES.items()
                  if package not in installed for name in names) + OPENWRT_ABSENT


@pytest.mark.parametrize("scheme", ["http", "ws", "https"])
def test_client_and_server_run_with_openwrts_module_set(scheme, tmp_path, echo, procs, certs):
    """Issue 17 item 11: with only python3-light and the packages the README's opkg line
    names importable, a server and a client carry datagrams: plain http:// with the first
    line (no python3-openssl: ssl cannot be imported), https:// with the second."""
    plain, with_tls = readme_opkg_lines()
    tls = scheme == "https"
    packages = with_tls if tls else plain
    assert "python3-light" in packages and ("python3-openssl" in packages) == tls
    refused = openwrt_refused(packages)
    assert ("_ssl" in refused) != tls and "logging" not in refused
    wrapper = tmp_path / "openwrt_python.py"
    wrapper.write_text(OPENWRT_PYTHON)
    env = dict(no_proxy_env(), PROXYGUARD_TEST_REFUSED=",".join(refused))
    prefix = (sys.executable, str(wrapper))
    port = free_port()
    server_args = ["server", "--listen", "%s:%d" % (LOOPBACK, port),
                   "--to", "%s:%d" % (LOOPBACK, echo.port)]
    if tls:
        server_args += ["--tls-cert", certs.cert, "--tls-key", certs.key]
    metrics_port = free_port()  # http.server needs python3-email: urllib's dependency
    server_args += ["--metrics-listen", "%s:%d" % (LOOPBACK, metrics_port)]
    server = Proc(tmp_path, server_args, name="server", env=env, prefix=prefix)
    procs.append(server)
    wireguard = WireGuardStandIn()
    listen_port = free_port(socket.SOCK_DGRAM)
    client_args = ["client", "--to", "%s://localhost:%d/pg" % (scheme, port),
                   "--listen-port", str(listen_port), "--forward-port", str(wireguard.port)]
    if tls:
        client_args += ["--ca-file", certs.ca]
    client = Proc(tmp_path, client_args, name="client", env=env, prefix=prefix)
    procs.append(client)
    wireguard.endpoint = (LOOPBACK, listen_port)
    for index in range(3):
        assert wireguard.roundtrip(numbered(index, 1200), timeout=10) == numbered(index, 1200)
    status, _, body = scrape(metrics_port)
    assert status == 200 and "proxyguard_server_tunnels_open" in body
    for proc in (server, client):
        assert "refused configargparse" in proc.log()  # the finder is at work
        assert "Traceback" not in proc.log() and "ERROR" not in proc.log(), proc.log()
    # (http.client, under urllib.request and http.server, tries ssl and copes without it.)
    wireguard.sock.close()


# --- Without Python's ssl module -------------------------------------------------------------

def test_tls_without_the_tls_module_says_which_package(tmp_path):
    """On a router without python3-openssl, https:// is refused with one line naming it."""
    wrapper = tmp_path / "openwrt_python.py"
    wrapper.write_text(OPENWRT_PYTHON)
    env = dict(os.environ, **no_proxy_env())
    env["PROXYGUARD_TEST_REFUSED"] = ",".join(openwrt_refused(readme_opkg_lines()[0]))
    result = subprocess.run([sys.executable, str(wrapper), sys.executable, SCRIPT, "check",
                             "--to", "https://localhost:1/pg"], capture_output=True, text=True,
                            env=env, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert ("proxyguard.py: error: https://, wss:// and --tls-cert need Python's ssl module, "
            "which this Python lacks (No module named '_ssl' (not installed)): on OpenWrt, "
            "opkg install python3-openssl") in result.stderr, result.stderr


# --- --route PATH=HOST:PORT: the pure table, the options, real processes ---------------------

def route_table(fallback=None, fallback_path=None):
    return pg.RouteTable([("/pg", "pg"), ("/pg/node1", "node1"), ("/pg/node10", "node10")],
                         fallback=fallback, fallback_path=fallback_path)


@pytest.mark.parametrize("target,route", [
    ("/pg", "/pg"), ("/pg/", "/pg"), ("/pg/x", "/pg"), ("/pg?x=1", "/pg"),
    ("/pg/node1", "/pg/node1"), ("/pg/node1/", "/pg/node1"), ("/pg/node1?a=/b", "/pg/node1"),
    ("/pg/node1/x/y", "/pg/node1"), ("/pg/node10", "/pg/node10"), ("/pg/node100", "/pg"),
    ("/pgx", None), ("/", None), ("/other/pg", None), ("/PG", None),
])
def test_route_table_takes_a_path_and_below_it_and_the_longest_path_wins(target, route):
    """check_path's rules per route (PATH, PATH/..., PATH?...), longest first whatever the
    order given; no fallback: 404 elsewhere."""
    if route is None:
        with pytest.raises(pg.HandshakeError) as raised:
            route_table().find(target)
        assert raised.value.status == 404 and raised.value.routine
    else:
        assert route_table().find(target) == (route, route.rsplit("/", 1)[1])


def test_route_table_falls_back_to_to_under_its_path_only():
    table = route_table(fallback="wg", fallback_path="/other")
    assert table.find("/pg/node1/x") == ("/pg/node1", "node1")
    assert table.find("/other/x?y") == (pg.DEFAULT_ROUTE, "wg")
    with pytest.raises(pg.HandshakeError):
        table.find("/elsewhere")
    assert route_table(fallback="wg").find("/elsewhere") == (pg.DEFAULT_ROUTE, "wg")
    assert route_table(fallback="wg").names() == ["/pg/node10", "/pg/node1", "/pg",
                                                  pg.DEFAULT_ROUTE]
    # No --route: the server's table is --to under --path, as check_path was.
    assert pg.RouteTable(fallback="wg").find("/anything") == (pg.DEFAULT_ROUTE, "wg")


def test_route_options_from_command_line_file_and_environment(tmp_path):
    parse = pg.parse_options
    options = parse(["server", "--route", "/a/=127.0.0.1:1", "--route", "/b=[::1]:2"], {})
    assert options.route == [("/a", ("127.0.0.1", 1)), ("/b", ("::1", 2))]
    assert options.wireguard is None, "with --route, --to's default serves nothing"
    options = parse(["server", "--route", "/a=127.0.0.1:1"], {"PROXYGUARD_TO": "127.0.0.1:7"})
    assert options.wireguard == ("127.0.0.1", 7), "a --to from the environment is explicit"
    config = tmp_path / "server.conf"
    config.write_text("mode = server\nroute = [/a=127.0.0.1:1, /b=127.0.0.1:2]\n"
                      "to = 127.0.0.1:9\n")
    options = parse(["-c", str(config)], {})
    assert options.route == [("/a", ("127.0.0.1", 1)), ("/b", ("127.0.0.1", 2))]
    assert options.wireguard == ("127.0.0.1", 9)
    options = parse(["server"], {"PROXYGUARD_ROUTE": "/a=127.0.0.1:1,/b=127.0.0.1:2"})
    assert [path for path, _ in options.route] == ["/a", "/b"] and options.wireguard is None
    assert parse(["server"], {}).wireguard == ("127.0.0.1", 51820), "no --route: --to as before"


@pytest.mark.parametrize("args,words", [
    (["--route", "/x"], "--route '/x': expected PATH=HOST:PORT"),
    (["--route", "x=127.0.0.1:5"], "--route 'x=127.0.0.1:5': expected PATH=HOST:PORT"),
    (["--route", "/a?b=127.0.0.1:5"], "expected PATH=HOST:PORT"),
    (["--route", "/x=127.0.0.1"], "--route /x '127.0.0.1': expected HOST:PORT"),
    (["--route", "/x=127.0.0.1:99999"], "--route /x '99999': not a port number"),
    (["--route", "/x=http://127.0.0.1:5"], "not a URL"),
    (["--route", "/a=127.0.0.1:1", "--route", "/a/=127.0.0.1:2"],
     "the path /a has a route already"),
    (["--route", "/a=127.0.0.1:1", "--path", "/pg"], "--path '/pg': with --route and no --to"),
])
def test_bad_route_values_are_refused_naming_the_value(args, words):
    with pytest.raises(pg.UsageError) as raised:
        pg.parse_options(["server", "--listen", "127.0.0.1:1"] + args, {})
    assert words in str(raised.value)


def test_a_bad_route_stops_the_start_in_one_line_with_exit_2():
    result = subprocess.run([sys.executable, SCRIPT, "server", "--route", "/x=127.0.0.1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert result.stderr == ("proxyguard.py: error: --route /x '127.0.0.1': expected HOST:PORT, "
                             "for example 127.0.0.1:51820 (see --help)\n"), result.stderr


def raw_upgrade_status(port, path, websocket):
    """The status line's code of a real upgrade request for `path` to 127.0.0.1:port."""
    request_bytes = pg.build_upgrade_request(
        "example", path, websocket_key=WS_KEY if websocket else None)
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(request_bytes)
        return read_answer_head(sock).split(b" ")[1].decode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("explicit_to", [False, True])
def test_routes_send_each_path_to_its_wireguard_over_both_transports(tmp_path, procs,
                                                                     explicit_to):
    """Two UDP echoes stand in for two nodes' WireGuards behind one server: each client's
    datagrams reach the echo of its route, by http:// and ws://; other paths get 404, unless
    --to is given, which then takes the paths under --path. The tunnel lines and the metrics
    name the route."""
    node1, node2, other = UdpEcho(), UdpEcho(), UdpEcho()
    try:
        metrics_port = free_port()
        extra = ["--route", "/pg/node1=%s:%d" % (LOOPBACK, node1.port),
                 "--route", "/pg/node10=%s:%d" % (LOOPBACK, node2.port),
                 "--metrics-listen", "%s:%d" % (LOOPBACK, metrics_port)]
        port = free_port()
        if explicit_to:
            extra += ["--to", "%s:%d" % (LOOPBACK, other.port), "--path", "/pg"]
        server = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, port)] + extra)
        procs.append(server)
        assert "404 at other paths" in server.log() or explicit_to, server.log()
        base = "%s:%d" % (LOOPBACK, port)
        cases = [("http://%s/pg/node1" % base, node1), ("ws://%s/pg/node10/x?y=1" % base, node2),
                 ("ws://%s/pg/node1?z" % base, node1), ("http://%s/pg/node10" % base, node2)]
        if explicit_to:
            cases.append(("ws://%s/pg/node2" % base, other))
        for index, (url, echo) in enumerate(cases):
            client = start_client(tmp_path, url, name="client-%d" % index)
            procs.append(client)
            before = (node1.count, node2.count, other.count)
            ping(client, index)
            after = (node1.count, node2.count, other.count)
            assert [b - a for a, b in zip(before, after)] == [
                int(echo is node1), int(echo is node2), int(echo is other)], (url, before, after)
        for websocket in (False, True):
            for path in ("/pg/node2", "/pg", "/pg/node1x", "/other", "/"):
                want = "101" if explicit_to and pg.path_is_under(path, "/pg") else "404"
                assert raw_upgrade_status(port, path, websocket) == want, (path, websocket)
        lines = tunnel_up_lines(server)
        assert sum(", route /pg/node1 to 127.0.0.1:%d," % node1.port in line
                   for line in lines) == 2, lines
        assert sum(", route /pg/node10 to " in line for line in lines) == 2, lines
        _, _, text = scrape(metrics_port)
        samples = parse_metrics(text)
        assert samples[("proxyguard_server_route_tunnels_opened_total",
                        (("route", "/pg/node1"),))] == 2, text
        assert samples[("proxyguard_server_route_tunnels_open", (("route", "/pg/node10"),))] == 2
        assert samples.get(("proxyguard_server_route_tunnels_opened_total",
                            (("route", "default"),)), 0) == (7 if explicit_to else 0), text
    finally:
        for echo in (node1, node2, other):
            echo.close()


def test_route_table_changes_name_added_removed_and_changed_routes():
    """What a SIGHUP's new table changes: routes by name, --to's as `default`, which changes
    with its target or its --path as well."""
    old = pg.RouteTable([("/a", "wg-a"), ("/b", "wg-b"), ("/c", "wg-c")], fallback="wg")
    new = pg.RouteTable([("/c", "wg-c2"), ("/d", "wg-d"), ("/a", "wg-a")], fallback="wg",
                        fallback_path="/pg")
    assert old.changes(new) == (["/d"], ["/b"], ["/c", pg.DEFAULT_ROUTE])
    assert new.changes(new) == ([], [], [])
    assert old.changes(pg.RouteTable([("/a", "wg-a")])) == ([], ["/b", "/c", pg.DEFAULT_ROUTE],
                                                            [])
    assert new.entries()[pg.DEFAULT_ROUTE] == ("wg", "/pg")


def test_server_reload_takes_new_routes_or_keeps_the_running_ones():
    """Server.reload with re-read options (no socket: the targets are addresses): the table
    is replaced and the change named; a bad one (unresolvable, another mode) raises and the
    running table stays. A removed route keeps its metric series, a new one gets them."""
    def options(*args):
        return pg.parse_options(["server"] + list(args), {})

    table = pg.resolve_route_table([("/a", (LOOPBACK, 1)), ("/b", (LOOPBACK, 2))], None, None)
    server = pg.Server(None, None, None, routes=table)
    assert server.reload(options("--route", "/a=127.0.0.1:1", "--route", "/b=127.0.0.1:2")) == []
    assert server.reload(options("--route", "/b=127.0.0.1:3", "--route", "/c=127.0.0.1:4",
                                 "--to", "127.0.0.1:9", "--path", "/pg")) == [
        "routes (added /c to 127.0.0.1:4, added default to 127.0.0.1:9 under /pg, removed /a, "
        "changed /b to 127.0.0.1:3)"]
    assert server.routes.find("/b/x") == ("/b", (("127.0.0.1", 3), socket.AF_INET))
    assert server.routes.find("/pg/x")[0] == pg.DEFAULT_ROUTE
    with pytest.raises(pg.HandshakeError):
        server.routes.find("/a")
    running = server.routes
    for bad in (options("--route", "/b=nonexistent.invalid:3"),
                pg.parse_options(["client", "--to", "http://127.0.0.1:1/"], {})):
        with pytest.raises(pg.FatalError):
            server.reload(bad)
        assert server.routes is running
    samples = parse_metrics(pg.render_metrics(server.metrics()).decode())
    assert {dict(labels)["route"] for name, labels in samples
            if name == "proxyguard_server_route_tunnels_opened_total"} == {
        "/a", "/b", "/c", pg.DEFAULT_ROUTE}
    # Back to --to alone: new tunnels' lines and the metrics still name the route (default).
    assert server.reload(options("--to", "127.0.0.1:9")) == [
        "routes (removed /b, removed /c, changed default to 127.0.0.1:9)"]
    assert server.routed and server.routes.find("/x")[0] == pg.DEFAULT_ROUTE


def test_sighup_on_a_plain_server_takes_a_new_to():
    """Without --route, --to (and --path) is the table's fallback, and reloads the same way."""
    server = pg.Server(None, (LOOPBACK, 9))
    assert server.reload(pg.parse_options(["server", "--to", "127.0.0.1:9"], {})) == []
    assert server.reload(pg.parse_options(["server", "--to", "127.0.0.1:10"], {})) == [
        "routes (changed default to 127.0.0.1:10)"]
    assert not server.routed and server.routes.find("/")[1][0] == ("127.0.0.1", 10)


@pytest.mark.timeout(120)
def test_sighup_adds_and_removes_routes_and_open_tunnels_keep_their_wireguard(tmp_path, procs):
    """The operator adds a node and removes one in the config file, then SIGHUP: the new
    path takes tunnels, the removed one answers 404 to new handshakes while the tunnel open on
    it goes on carrying datagrams to its WireGuard; SIGUSR1 names each tunnel's route; a bad
    route (unresolvable, or no port) keeps the running table with one error line; the
    removed route's series stay on the metrics page."""
    node1, node2, node3 = UdpEcho(), UdpEcho(), UdpEcho()
    try:
        port, metrics_port = free_port(), free_port()
        config = tmp_path / "server.conf"

        def configure(*routes):
            config.write_text("mode = server\nlisten = %s:%d\nmetrics-listen = %s:%d\n"
                              "route = [%s]\n" % (LOOPBACK, port, LOOPBACK, metrics_port,
                                                  ", ".join(routes)))

        def reload(words):
            errors = server.log().count(" ERROR ")
            server.popen.send_signal(signal.SIGHUP)
            server.wait_log(words)
            return server.log().count(" ERROR ") - errors

        def route(path, echo):
            return "%s=%s:%d" % (path, LOOPBACK, echo.port)

        configure(route("/pg/node1", node1), route("/pg/node2", node2))
        server = Proc(tmp_path, ["-c", str(config)], name="server")
        procs.append(server)
        old = start_client(tmp_path, "http://%s:%d/pg/node2" % (LOOPBACK, port), name="old")
        procs.append(old)
        ping(old, 0)
        assert node2.count == 1
        configure(route("/pg/node1", node1), route("/pg/node3", node3))
        assert reload("SIGHUP: reloaded") == 0
        assert ("SIGHUP: reloaded routes (added /pg/node3 to 127.0.0.1:%d, removed /pg/node2); "
                "other options change on restart" % node3.port) in server.log()
        for websocket in (False, True):
            assert raw_upgrade_status(port, "/pg/node2", websocket) == "404"
            assert raw_upgrade_status(port, "/pg/node3", websocket) == "101"
        new = start_client(tmp_path, "ws://%s:%d/pg/node3" % (LOOPBACK, port), name="new")
        procs.append(new)
        ping(new, 1)
        ping(old, 2)
        assert (node1.count, node2.count) == (0, 2), "the open tunnel keeps its WireGuard"
        assert node3.count == 1 and old.log().count("tunnel up") == 1
        node2_line = re.compile(r"SIGUSR1: tunnel 127\.0\.0\.1:\d+: route=/pg/node2, "
                                r"\d+\.\ds, 2 datagrams/")
        dump_until(server, 2, lambda lines: (  # the lines come in no set order
            sum(map(bool, map(node2_line.search, lines))) == 1
            and sum("route=/pg/node3, " in line for line in lines) == 1),
            "SIGUSR1 naming both tunnels' routes, /pg/node2's with its two datagrams")

        for bad, words in ((route("/pg/node4", node1).replace(LOOPBACK, "nonexistent.invalid"),
                            "--route /pg/node4 nonexistent.invalid:%d: cannot resolve"
                            % node1.port),
                           ("/pg/node4=%s" % LOOPBACK, "--route /pg/node4 '127.0.0.1': "
                            "expected HOST:PORT")):
            configure(route("/pg/node1", node1), bad)
            assert reload(words) == 1, server.log()
            assert "SIGHUP: reload failed, the running settings stay: " in server.log()
            for path, status in (("/pg/node3", "101"), ("/pg/node4", "404"),
                                 ("/pg/node2", "404")):
                assert raw_upgrade_status(port, path, True) == status, (bad, path)
        assert server.log().count("SIGHUP: reloaded") == 1

        samples = parse_metrics(scrape(metrics_port)[2])
        opened, open_now = ("proxyguard_server_route_tunnels_%s" % kind
                            for kind in ("opened_total", "open"))
        assert samples[(opened, (("route", "/pg/node3"),))] == 5  # 2 + 2 raw, the new client
        assert samples[(opened, (("route", "/pg/node2"),))] == 1
        assert samples[(open_now, (("route", "/pg/node2"),))] == 1, "the old tunnel lives on"
        assert old.stop() == 0
        server.wait_log(", route /pg/node2 to 127.0.0.1:%d after " % node2.port)
        samples = parse_metrics(scrape(metrics_port)[2])
        assert samples[(open_now, (("route", "/pg/node2"),))] == 0
        assert samples[(opened, (("route", "/pg/node2"),))] == 1
        assert new.stop() == 0 and server.stop() == 0
    finally:
        for echo in (node1, node2, node3):
            echo.close()


# =============================================================================================
# The server's answers to bad requests
# =============================================================================================


@pytest.fixture
def server(request, tmp_path, echo, procs):
    """A server with a short handshake timeout and a UdpEcho behind it; checked at teardown.
    Parametrized indirectly, its parameter is more options (("--path", "/p")); `good_path` is
    then where its tunnels go up."""
    extra = tuple(getattr(request, "param", ()))
    proc = start_server(tmp_path, echo.port, "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
                        "--idle-timeout", "300", *extra)
    proc.good_path = extra[extra.index("--path") + 1] if "--path" in extra else "/"
    procs.append(proc)
    yield proc
    server_is_healthy(proc)


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
    answer = exchange(server.port, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body.endswith(b"\n") and b"Content-Length: %d" % len(body) in head
    if status == b"426":  # RFC 9110 15.5.22: a 426 names the protocol(s) to upgrade to
        assert re.search(rb"\r\nUpgrade: (UoTLV/1|websocket)\r\n", head)
    if status == b"405":
        assert b"\r\nAllow: GET\r\n" in head
    assert server.popen.poll() is None


def test_browser_and_requests_see_426(server):
    import requests  # requirements-dev.txt
    response = requests.get("http://%s:%d/anything" % (LOOPBACK, server.port), timeout=5)
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "UoTLV/1"
    assert "'Connection' header is not 'Upgrade'" in response.text
    response = requests.post("http://%s:%d/" % (LOOPBACK, server.port), timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "GET"


def test_connection_token_list_is_accepted(server):
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                     b"Upgrade: UoTLV/1\r\n\r\n")
        assert sock.recv(100) == pg.UPGRADE_RESPONSE


# --- Our 426 is marked, so a client tells it from the original's -----------------------------

def test_our_426_is_marked_and_the_originals_is_not():
    """A WebSocket request that reached our server without its Upgrade: ours says the front
    drops it (our server takes WebSocket); the original's 426 (no mark) still says the
    original speaks UoTLV/1 only."""
    key = pg.websocket_key()
    with pytest.raises(pg.HandshakeError) as caught:
        pg.check_upgrade_request(pg.parse_request(
            b"GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: %s\r\n\r\n" % key.encode()))
    answer = pg.build_response(426, str(caught.value), caught.value.extra_headers)
    assert b"\r\nProxyGuard-Server: proxyguard.py/" in answer
    head, _, body = answer.partition(b"\r\n\r\n")
    with pytest.raises(pg.UpgradeDropped) as dropped:
        pg.check_upgrade_response(pg.parse_response(head + b"\r\n\r\n"), body, key)
    assert "the reverse proxy drops the Upgrade header" in str(dropped.value)
    assert "proxy_set_header Upgrade $http_upgrade" in str(dropped.value)
    assert "upgrade=UoTLV/1" in str(dropped.value)
    original = (b"HTTP/1.1 426 Upgrade Required\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    with pytest.raises(pg.UpgradeRefused) as caught_original:
        pg.check_upgrade_response(pg.parse_response(original), b"the 'Upgrade' header is "
                                  b"not 'UoTLV/1', got: 'websocket'\n", key)
    assert not isinstance(caught_original.value, pg.UpgradeDropped)
    assert "(the original ProxyGuard?)" in str(caught_original.value)


# --- Refused upgrade requests in the log: at most one line a minute per address --------------

def test_refusal_log_admits_one_a_minute_per_source_with_the_count_held_back():
    clock = FakeClock()
    refusals = pg.RefusalLog(interval=60, clock=clock, max_sources=2)
    assert refusals.admit("a") == 0
    assert refusals.admit("a") is None and refusals.admit("a") is None
    assert refusals.admit("b") == 0
    clock.now += 59.9
    assert refusals.admit("a") is None
    clock.now += 0.1
    assert refusals.admit("a") == 3
    assert refusals.admit("c") == 0  # past max_sources: "b", the oldest, is forgotten
    assert refusals.admit("b") == 0


def test_refused_upgrades_get_an_info_line_and_scanners_stay_at_debug(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port, "--path", "/pg")
    procs.append(server)
    wrong_path = pg.build_upgrade_request("x", "/other")
    scanner = b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (scanner, wrong_path, wrong_path, wrong_path, scanner):
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
            sock.sendall(head)
            assert sock.recv(4096).startswith(b"HTTP/1.1 404 ")
    # The server logs a refusal before it answers: every line is in the log by now.
    lines = [line for line in server.log().splitlines() if "handshake failed" in line]
    assert len(lines) == 1 and "INFO handshake failed from 127.0.0.1:" in lines[0], lines
    assert lines[0].endswith("404 no tunnel at this path"), lines


# =============================================================================================
# Command line, config file, environment, exit status
# =============================================================================================


def run_cli(*args, env=None, timeout=20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGUARD_")}
    full_env.update(no_proxy_env())
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
    assert options.servers[0].host == "file.example"      # file beats environment
    assert options.listen_port == 1111
    assert options.forward_port == 3333           # environment beats default
    assert options.idle_timeout == 7.0
    options = pg.parse_options(["-c", str(conf), "--listen-port", "4444", "--to",
                                "http://cli.example/"], environ=env)
    assert (options.listen_port, options.servers[0].host) == (4444, "cli.example")
    options = pg.parse_options(["server"], environ={"PROXYGUARD_LISTEN": "[::]:443"})
    assert options.listen == ("::", 443) and options.wireguard == ("127.0.0.1", 51820)


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
    assert options.mode == "client" and options.servers[0].host == "vpn.example.org"


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
    (["sever"], "unknown mode 'sever': did you mean 'server'?"),
    (["-c", "/nonexistent.conf"], "/nonexistent.conf"),
    (["client", "--to", "http://x/", "--idle-timeout", "inf"], "--idle-timeout inf: must be"),
    (["client", "--to", "http://x/", "--user-agent", "a\r\nX-Injected: 1"],
     "--user-agent 'a\\r\\nX-Injected: 1': control character"),
    (["server", "--to", "http://127.0.0.1:5000"], "--to 'http://127.0.0.1:5000': the server's "
                                                  "--to is WireGuard's HOST:PORT"),
    (["client", "--to", "https://x/", "--ca-file", "/etc/passwd"],
     "--ca-file '/etc/passwd': no PEM CA certificate in the file"),
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


CLIENT = ["client", "--to", "http://x/"]


@pytest.mark.parametrize("args,text", [
    # timeouts: they go into socket timeouts (OverflowError at the first datagram before)
    (CLIENT + ["--idle-timeout", "inf"], "--idle-timeout inf: must be 0 (never) or 0.001 to "
                                         "86400 seconds (1 day)"),
    (CLIENT + ["--idle-timeout", "1e20"], "--idle-timeout 1e+20: must be"),
    (CLIENT + ["--idle-timeout", "nan"], "--idle-timeout nan: must be"),
    (CLIENT + ["--idle-timeout", "86401"], "--idle-timeout 86401: must be"),
    (CLIENT + ["--idle-timeout", "0.0001"], "--idle-timeout 0.0001: must be"),  # 0 ms: never
    (CLIENT + ["--connect-timeout", "inf"], "--connect-timeout inf: must be 0.001 to 3600 "
                                            "seconds (1 hour)"),
    (["check", "--to", "http://x/", "--connect-timeout", "1e10"],
     "--connect-timeout 10000000000: must"),
    (["server", "--handshake-timeout", "inf"], "--handshake-timeout inf: must be"),
    (["server", "--handshake-timeout", "3601"], "--handshake-timeout 3601: must be"),
    (["server", "--busy-poll", "1001"], "--busy-poll 1001: must be 0 (off) to 1000 "
                                        "microseconds"),
    (CLIENT + ["--busy-poll", "-1"], "--busy-poll -1: must be 0 (off) to 1000 microseconds"),
    (["server", "--sched-slice", "99"], "--sched-slice 99: must be 0 (the kernel's) or 100 to "
                                        "100000 microseconds"),
    (CLIENT + ["--sched-slice", "100001"], "--sched-slice 100001: must be 0"),
    # the client would feed its own replies back to itself
    (CLIENT + ["--listen-port", "51820"], "--listen-port 51820 and --forward-port 51820 are "
                                          "one port"),
    # header injection, or a UnicodeEncodeError at the first connect
    (CLIENT + ["--user-agent", "a\r\nX-Injected: 1"], "--user-agent 'a\\r\\nX-Injected: 1': "
                                                     "control character '\\r'"),
    (CLIENT + ["--user-agent", "a\x00b"], "control character '\\x00'"),
    (CLIENT + ["--user-agent", "a\x85b"], "control character '\\x85'"),
    (CLIENT + ["--user-agent", "\u043a\u043e\u0442"], "only ASCII or latin-1 characters"),
    (["client", "--to", "http://127.0.0.1:0/"], "--to 'http://127.0.0.1:0/': port 0"),
    # getaddrinfo reads 1.2.3 as 1.2.0.3
    (CLIENT + ["--peer-ips", "1.2.3"], "--peer-ips: '1.2.3' is not an IP address"),
    (CLIENT + ["--peer-ips", "192.0.2.1,0x7f.1"], "--peer-ips: '0x7f.1' is not an IP address"),
    # the server's --to is not a URL: no IPv6 hint
    (["server", "--to", "http://127.0.0.1:5000"], "--to 'http://127.0.0.1:5000': the server's "
                                                  "--to is WireGuard's HOST:PORT, for example "
                                                  "127.0.0.1:51820, not a URL"),
    (["server", "--listen", "https://0.0.0.0:443"], "--listen 'https://0.0.0.0:443': expected "
                                                    "HOST:PORT, not a URL"),
    (["server", "--max-clients", "100001"], "--max-clients 100001: must be 0 (no limit) or up "
                                            "to 100000"),
    # setsockopt takes a C int: 2**31 and more died with a TypeError at start
    (CLIENT + ["--fwmark", "4294967295"], "--fwmark 4294967295: must be -1 (off) or 0 to "
                                          "2147483647"),
    (CLIENT + ["--fwmark", "0x80000000"], "--fwmark 2147483648: must be"),
    (CLIENT + ["--fwmark", "mark"], "argument --fwmark: 'mark': not a number"),
])
def test_values_that_would_fail_later_are_refused_at_start(args, text):
    with pytest.raises(pg.UsageError) as info:
        pg.parse_options(args, environ={})
    assert text in str(info.value)
    assert "\n" not in str(info.value)


def test_values_at_the_edges_are_accepted():
    options = pg.parse_options(CLIENT + [
        "--idle-timeout", "0", "--connect-timeout", "3600", "--fwmark", "0xca6c",
        "--listen-port", "1", "--forward-port", "65535",
        "--peer-ips", "192.0.2.1, 2001:db8::1", "--user-agent", "Mozilla/5.0 (caf\u00e9)"],
        environ={})
    assert (options.idle_timeout, options.connect_timeout, options.fwmark) == (0, 3600, 51820)
    assert options.peer_ips == ["192.0.2.1", "2001:db8::1"]
    assert pg.parse_options(CLIENT + ["--fwmark", "2147483647"], environ={}).fwmark == 2**31 - 1
    assert pg.parse_options(["check", "--to", "http://x/", "--listen-port", "51820"],
                            environ={}).mode == "check"  # check listens on no UDP port
    options = pg.parse_options(["server", "--idle-timeout", "86400", "--handshake-timeout",
                                "0.5", "--max-clients", "100000"], environ={})
    assert (options.idle_timeout, options.handshake_timeout, options.max_clients) == (
        86400, 0.5, 100000)


def test_port_taken_exits_1_and_sigterm_exits_0(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    result = run_cli("server", "--listen", "%s:%d" % (LOOPBACK, server.port))
    assert result.returncode == 1
    assert ("cannot listen on 127.0.0.1:%d: the port is taken by another process (find it "
            "with: ss -ltnp 'sport = :%d')" % (server.port, server.port)) in result.stderr
    assert "while attempting" not in result.stderr  # the address is said once, not twice
    assert server.stop(signal.SIGTERM) == 0
    assert "stopping on SIGTERM" in server.log()


def test_sigint_exits_0_with_tunnels_closed(tunnel):
    server, client = tunnel
    assert client.wireguard.roundtrip(b"x") == b"x"
    assert client.stop(signal.SIGINT) == 0
    server.wait_log("tunnel down")
    assert server.stop(signal.SIGINT) == 0


def test_sighup_reloads_and_never_ends_a_tunnel_of_client_or_plain_server(tmp_path, echo,
                                                                         procs):
    """SIGHUP killed the client (exit 129) and a plain server ignored it without a word. Now
    both read their options again (the config file's log level here), say so, and go on."""
    config = tmp_path / "client.conf"
    config.write_text("log-level = info\n")
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port), "-c",
                          str(config))
    procs.append(client)
    assert client.wireguard.roundtrip(b"before") == b"before"
    config.write_text("log-level = debug\n")
    for proc in (client, server):
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: reloaded")
    assert "SIGHUP: reloaded log level debug" in client.log()
    assert "SIGHUP: reloaded nothing that changed" in server.log()
    assert client.wireguard.roundtrip(b"after") == b"after"
    assert client.log().count("tunnel up") == 1 and "tunnel down" not in server.log()
    config.write_text("log-level = loud\n")  # a broken config keeps the running settings
    client.popen.send_signal(signal.SIGHUP)
    client.wait_log("SIGHUP: reload failed, the running settings stay")
    assert client.wireguard.roundtrip(b"still") == b"still"
    assert client.stop() == 0 and server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "client"])
def test_sigterm_at_start_always_ends_with_status_0_within_a_second(mode, tmp_path, echo):
    """A SIGTERM that landed just as the server started listening was sometimes never acted
    on (1 to 6 of 60 tries): the signal went to a tunnel thread while the main thread slept in
    a lock. Sent as soon as the server accepts (the client: logs that it listens), 30 times."""
    slowest = 0.0
    for attempt in range(30):
        port = free_port()
        if mode == "server":
            proc = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, port), "--to",
                                   "%s:%d" % (LOOPBACK, echo.port)], wait=False)
            ready = lambda: accepts(port)
        else:
            proc = Proc(tmp_path, ["client", "--to", "http://%s:%d/" % (LOOPBACK, port),
                                   "--listen-port", str(free_port(socket.SOCK_DGRAM))],
                        env=no_proxy_env(), wait=False)
            ready = lambda: "listening on" in proc.log()
        try:
            wait_until(lambda: ready() or proc.popen.poll() is not None, 10, "ready")
            signalled = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            assert proc.popen.wait(10) == 0, proc.log()
            slowest = max(slowest, time.monotonic() - signalled)
        finally:
            proc.kill()
    assert slowest < TIME_TOLERANCE, "the slowest stop took %.2fs" % slowest


def accepts(port):
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0 and "PROXYGUARD_LOG_LEVEL" in result.stdout
    result = run_cli("--version")
    assert result.returncode == 0 and pg.__version__ in result.stdout


def test_runs_without_configargparse(tmp_path, echo, procs):
    """A router without pip: command-line options work; -c and env vars say what they need."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['configargparse'] = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli("server", "-c", "x.conf", env=env)
    assert result.returncode == 2 and "need the configargparse package" in result.stderr
    # Debian's python3 refuses 'pip install' outside a venv (PEP 668): the package first
    assert "apt install python3-configargparse (Debian, Ubuntu), or pip install " \
           "configargparse in a venv" in result.stderr
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


def test_config_file_keys_in_any_spelling_and_a_misspelt_one_named_with_its_line(tmp_path):
    """A typo'd key said 'unrecognized arguments: --listen_port=23051 --forwad-port=23052',
    naming neither the file nor the line, and refused listen_port, the variable's spelling."""
    conf = tmp_path / "client.conf"
    conf.write_text("mode = client\nto = http://x/\nlisten_port = 23051\nForward_Port: 23052\n"
                    "--tcp-port 23053\n")
    options = pg.parse_options(["-c", str(conf)], environ={})
    assert (options.listen_port, options.forward_port, options.tcp_port) == (23051, 23052, 23053)
    conf.write_text("mode = client\nto = http://x/\n# a comment\nlisten_port = 23051\n"
                    "forwad-port = 23052\n")
    with pytest.raises(pg.UsageError) as info:
        pg.parse_options(["-c", str(conf)], environ={})
    assert str(info.value) == ("config file %s, line 5: unknown option 'forwad-port' (did you "
                               "mean 'forward-port'?)" % conf)
    conf.write_text("mode = client\nwhatever = 1\n")
    with pytest.raises(pg.UsageError, match=r"line 2: unknown option 'whatever'$"):
        pg.parse_options(["-c", str(conf)], environ={})


@pytest.mark.parametrize("args,file_text,env,text", [
    # argparse's type errors named --listen-port for a value the user set elsewhere
    (CLIENT, "", {"PROXYGUARD_LISTEN_PORT": "abc"},
     "environment variable PROXYGUARD_LISTEN_PORT (--listen-port): invalid int value: 'abc'"),
    (CLIENT, "mode = client\nlisten-port = abc\n", {},
     "config file {conf}, line 2: listen-port: invalid int value: 'abc'"),
    ([], "", {"PROXYGUARD_MODE": "sevrer"},
     "environment variable PROXYGUARD_MODE (--mode): invalid choice: 'sevrer' (choose from "),
    # and so did the checks after parsing
    (CLIENT, "", {"PROXYGUARD_IDLE_TIMEOUT": "inf"},
     "environment variable PROXYGUARD_IDLE_TIMEOUT: --idle-timeout inf: must be 0 (never)"),
    (["client"], "\nto = vpn.example.org:443\n", {},
     "config file {conf}, line 2: --to 'vpn.example.org:443' is not a URL"),
    # the command line's own values keep their words
    (CLIENT + ["--listen-port", "abc"], "listen-port = 1\n", {},
     "argument --listen-port: invalid int value: 'abc'"),
])
def test_values_from_a_file_or_the_environment_name_where_they_came_from(tmp_path, args,
                                                                        file_text, env, text):
    conf = tmp_path / "c.conf"
    conf.write_text(file_text)
    with pytest.raises(pg.UsageError) as info:
        pg.parse_options(args + ["-c", str(conf)], environ=env)
    assert str(info.value).startswith(text.format(conf=conf)), str(info.value)


def test_a_file_failing_later_names_the_variable():
    """--ca-file is loaded after parsing: its error names the variable it came from."""
    result = run_cli("check", "--to", "https://x/", env={"PROXYGUARD_CA_FILE": "/etc/passwd"})
    assert result.returncode == 2
    assert ("error: environment variable PROXYGUARD_CA_FILE: --ca-file '/etc/passwd': no PEM CA "
            "certificate") in result.stderr


def test_unknown_proxyguard_variables_are_warned_about_with_a_suggestion(monkeypatch, capsys):
    """A typo'd PROXYGUARD_LISTENPORT was silently ignored; the test tools' own variables are
    not options and get no warning; an option's variable may be in any case."""
    options = pg.parse_options(["server"], environ={
        "PROXYGUARD_LISTENPORT": "1", "PROXYGUARD_Listen": "[::]:443", "PROXYGUARD_XYZZY": "",
        "PROXYGUARD_TEST_NAIVE_TLS": "1", "PROXYGUARD_SCRIPT": "/x", "HOME": "/root"})
    assert options.listen == ("::", 443)
    assert options.warnings == [
        "PROXYGUARD_LISTENPORT is not an option's variable and is ignored (did you mean "
        "PROXYGUARD_LISTEN_PORT, for --listen-port?)",
        "PROXYGUARD_XYZZY is not an option's variable and is ignored"]
    # before a usage error too, where the misspelling may be the cause
    for name in list(os.environ):
        if name.startswith("PROXYGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROXYGUARD_TOO", "http://x/")
    assert pg.main(["client"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "proxyguard.py: warning: PROXYGUARD_TOO is not an option's variable and is ignored "
        "(did you mean PROXYGUARD_TO, for --to?)",
        "proxyguard.py: error: --to is required for the client: the server's URL, for example "
        "https://vpn.example.org/proxyguard (see --help)"]


def test_mode_and_choices_in_any_case_and_misspellings_get_a_suggestion(tmp_path):
    options = pg.parse_options(["Client", "--to", "http://x/", "--log-level", "DEBUG",
                                "--tls-min-version", "1.2"], environ={})
    assert (options.mode, options.log_level, options.tls_min_version) == ("client", "debug",
                                                                          "1.2")
    assert pg.parse_options([], environ={"PROXYGUARD_MODE": "Server"}).mode == "server"
    conf = tmp_path / "c.conf"
    conf.write_text("Mode = CHECK\nto = http://x/\nlog-level = Warning\n")
    options = pg.parse_options(["-c", str(conf)], environ={})
    assert (options.mode, options.log_level) == ("check", "warning")
    for args, text in [
            (["clinet"], "unknown mode 'clinet': did you mean 'client'?"),
            (["vpn"], "unknown mode 'vpn': the first word is client, server, check or up"),
            (["--mode", "Sevrer"], "argument --mode: invalid choice: 'Sevrer' (choose from "),
            (["--mode", "Sevrer"], "; did you mean 'server'?"),
            (["server", "--log-level", "debgu"], "; did you mean 'debug'?"),
            (["--to", "http://x/", "client"], "unrecognized arguments: client (the mode goes "
                                               "first: proxyguard.py client ...)"),
            (["server", "--forwad-port", "1"], "unrecognized arguments: --forwad-port 1 "
                                               "(--forwad-port: did you mean --forward-port?)")]:
        with pytest.raises(pg.UsageError) as info:
            pg.parse_options(args, environ={})
        assert text in str(info.value), (args, str(info.value))


SHARED_DEFAULTS = ("listen = 127.0.0.1:51821\nmax-clients = 1000\nlisten-port = 51821\n"
                   "connect-timeout = 10\ntls-min-version = 1.3\nidle-timeout = 60\n")


@pytest.mark.parametrize("args,env,file_text,text", [
    (CLIENT + ["--listen", "[::]:443"], {}, "",
     "--listen is a server option: the client would ignore it (the client's UDP port is "
     "--listen-port)"),
    (CLIENT + ["--tls-cert", "c.pem"], {}, "", "--tls-cert is a server option: the client "
                                               "would ignore it"),
    (CLIENT + ["--max-clients", "1000"], {}, "", "--max-clients is a server option"),
    (["server", "--listen-port", "51821"], {}, "",
     "--listen-port is a client option: the server would ignore it (the server listens on "
     "--listen HOST:PORT)"),
    (["server", "--proxy", "none"], {}, "", "--proxy is a client option: the server would"),
    (["check", "--to", "http://x/", "--handshake-timeout", "5"], {}, "",
     "--handshake-timeout is a server option: check would ignore it (check takes the "
     "client's options)"),
    # from the environment: refused when it would change something
    (["server"], {"PROXYGUARD_PROXY": "http://proxy.example:3128"}, "",
     "environment variable PROXYGUARD_PROXY: --proxy is a client option: the server would"),
])
def test_options_of_another_mode_are_refused(tmp_path, args, env, file_text, text):
    """They were silently ignored: 'client --listen [::]:443' ran a client on 51821."""
    conf = tmp_path / "c.conf"
    conf.write_text(file_text)
    with pytest.raises(pg.UsageError) as info:
        pg.parse_options(args + ["-c", str(conf)], environ=env)
    assert str(info.value).startswith(text.format(conf=conf)), str(info.value)


def test_options_of_another_mode_at_their_defaults_pass_from_a_file_or_the_environment(
        tmp_path):
    """A file shared by both modes (as proxyguard.conf.example) may hold the other mode's
    defaults; check takes every client option, so a client's file can be checked as it is."""
    conf = tmp_path / "shared.conf"
    conf.write_text(SHARED_DEFAULTS + "forward-port = 51820\nfwmark = -1\n")
    env = {"PROXYGUARD_HANDSHAKE_TIMEOUT": "10", "PROXYGUARD_TCP_PORT": "0"}
    assert pg.parse_options(CLIENT + ["-c", str(conf)], environ=env).mode == "client"
    assert pg.parse_options(["server", "-c", str(conf)], environ=env).mode == "server"
    conf.write_text("mode = client\nto = http://x/\nlisten-port = 5000\nidle-timeout = 30\n"
                    "fwmark = 0xca6c\n")
    assert pg.parse_options(["check", "-c", str(conf)], environ={}).mode == "check"
    conf.write_text(SHARED_DEFAULTS + "max-clients = 50\n")  # that one would change something
    with pytest.raises(pg.UsageError) as info:
        pg.parse_options(CLIENT + ["-c", str(conf)], environ={})
    assert str(info.value) == ("config file %s, line 7: --max-clients is a server option: the "
                               "client would ignore it" % conf)


def test_usage_and_version_show_the_modes_and_python(capsys):
    assert pg.main(["--version"]) == 0
    assert capsys.readouterr().out == "proxyguard.py %s (UoTLV/1; Python %d.%d.%d)\n" % (
        (pg.__version__,) + tuple(sys.version_info[:3]))
    assert pg.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: proxyguard.py {client,server,check,up} [options]\n"
                          "       proxyguard.py -c FILE [options]\n")
    assert re.search(r"--max-clients N\s+server: open tunnels", out)
    assert re.search(r"--idle-timeout SECONDS\s+client, server: close a tunnel", out)


def test_readme_mode_column_is_the_option_modes_table():
    with open(os.path.join(HERE, "README.md")) as f:
        rows = re.findall(r"^\| `(--[\w-]+)`[^|]*\|[^|]*\|[^|]*\| ([^|]+?) \|", f.read(), re.M)
    documented = {name[2:]: modes for name, modes in rows}
    for key, action in pg.settable_options(pg.build_parser()).items():
        assert documented[key] == ", ".join(pg.OPTION_MODES.get(key, ("all",))), key


# =============================================================================================
# Operating it: the metrics page (--metrics-listen), promtool, a real Prometheus, SIGUSR1
# =============================================================================================

METRIC_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$')
LABEL_PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{(name, ((label, value), ...)): number} of a text-format page; the labels sorted."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, labels, value = METRIC_LINE.match(line).groups()
        pairs = tuple(sorted((key, re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1),
                                                                           m.group(1)), raw))
                             for key, raw in LABEL_PAIR.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def scrape(port, path="/metrics"):
    """(status, content type, body text) of GET http://127.0.0.1:port/path."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (LOOPBACK, port, path), timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_page_text_format_help_type_and_escaping():
    histogram = pg.Histogram((1, 10))
    for value in (0.5, 1, 3, 100):
        histogram.observe(value)
    page = pg.render_metrics([
        pg.Metric("demo_total", "counter", "A help text with a \\ and a\nline feed.")
        .add(3, kind='say "hi"\\now\n'),
        pg.Metric("demo_gauge", "gauge", "Values.").add(1.5, at="a").add(float("inf"), at="b")
        .add(float("nan"), at="c").add(2.0, at="d").add(True, at="e"),
        pg.Metric("demo_seconds", "histogram", "Lifetimes.").add_histogram(histogram),
        pg.Metric("demo_empty", "gauge", "No sample yet."),
    ]).decode()
    assert page == (
        '# HELP demo_total A help text with a \\\\ and a\\nline feed.\n'
        '# TYPE demo_total counter\n'
        'demo_total{kind="say \\"hi\\"\\\\now\\n"} 3\n'
        '# HELP demo_gauge Values.\n'
        '# TYPE demo_gauge gauge\n'
        'demo_gauge{at="a"} 1.5\n'
        'demo_gauge{at="b"} +Inf\n'
        'demo_gauge{at="c"} NaN\n'
        'demo_gauge{at="d"} 2\n'
        'demo_gauge{at="e"} 1\n'
        '# HELP demo_seconds Lifetimes.\n'
        '# TYPE demo_seconds histogram\n'
        'demo_seconds_bucket{le="1"} 2\n'  # cumulative: a bound takes what equals it
        'demo_seconds_bucket{le="10"} 3\n'
        'demo_seconds_bucket{le="+Inf"} 4\n'
        'demo_seconds_sum 104.5\n'
        'demo_seconds_count 4\n'
        '# HELP demo_empty No sample yet.\n'
        '# TYPE demo_empty gauge\n')
    assert parse_metrics(page)[("demo_total", (("kind", 'say "hi"\\now\n'),))] == 3


def test_client_counts_failed_dials_and_what_its_full_queue_drops():
    """A dial to a closed port: reconnects{reason="network"} and the error as a label; the
    reconnect queue keeps the newest PENDING_DATAGRAMS and counts what it pushed out."""
    closed = socket.create_server((LOOPBACK, 0))
    url = "http://%s:%d/" % closed.getsockname()
    closed.close()
    with running_client(url) as (client, wireguard):
        wireguard.send(b"handshake")
        wait_until(lambda: client.reconnects["network"], 5, "the failed dial counted")
        samples = parse_metrics(pg.render_metrics(client.metrics()).decode())
    assert samples[("proxyguard_client_reconnects_total", (("reason", "network"),))] == 1
    assert samples[("proxyguard_client_tunnel_up", ())] == 0
    errors = [labels for name, labels in samples
              if name == "proxyguard_client_last_handshake_error"]
    assert len(errors) == 1 and "refused" in errors[0][0][1], errors
    client._keep_unsent([b"x"] * (pg.PENDING_DATAGRAMS - 6))
    client._keep_unsent([b"y"] * 10)
    assert client.dropped == 4 and len(client.pending) == pg.PENDING_DATAGRAMS


def start_metrics_pair(tmp_path, echo, procs, *extra):
    """A server and a client on loopback, each with --metrics-listen; (server, client)."""
    server_metrics, client_metrics = free_port(), free_port()
    server = start_server(tmp_path, echo.port, "--metrics-listen",
                          "%s:%d" % (LOOPBACK, server_metrics), *extra)
    server.metrics_port = server_metrics
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/proxyguard" % (LOOPBACK, server.port),
                          "--metrics-listen", "%s:%d" % (LOOPBACK, client_metrics))
    client.metrics_port = client_metrics
    procs.append(client)
    return server, client


def test_metrics_of_a_real_server_and_client_after_traffic(tmp_path, echo, procs):
    server, client = start_metrics_pair(tmp_path, echo, procs)
    for index in range(10):
        assert client.wireguard.roundtrip(numbered(index, 100)) == numbered(index, 100)
    assert exchange(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").startswith(
        b"HTTP/1.1 426 ")
    # A second tunnel, closed: its figures stay in the totals and its lifetime is observed.
    raw = RawTunnel(server.port)
    assert raw.roundtrip(b"z" * 50) == b"z" * 50
    raw.close()
    # The tunnel's figures are in the totals before its "tunnel down" line is written.
    server.wait_log("tunnel down")
    status, content_type, text = scrape(server.metrics_port)
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_metrics(text)
    expected = {
        ("proxyguard_server_tunnels_open", (("transport", "uotlv"),)): 1,
        ("proxyguard_server_tunnels_open", (("transport", "websocket"),)): 0,
        ("proxyguard_server_tunnels_opened_total", (("transport", "uotlv"),)): 2,
        ("proxyguard_server_tunnels_opened_total", (("transport", "websocket"),)): 0,
        ("proxyguard_server_handshakes_refused_total", (("status", "426"),)): 1,
        ("proxyguard_server_handshakes_refused_total", (("status", "503"),)): 0,
        ("proxyguard_server_datagrams_total", (("direction", "to_wireguard"),)): 11,
        ("proxyguard_server_bytes_total", (("direction", "to_wireguard"),)): 1050,
        ("proxyguard_server_datagrams_total", (("direction", "from_wireguard"),)): 11,
        ("proxyguard_server_bytes_total", (("direction", "from_wireguard"),)): 1050,
        ("proxyguard_server_oversized_frames_dropped_total", ()): 0,
        ("proxyguard_server_tunnel_lifetime_seconds_count", ()): 1,
        ("proxyguard_server_tunnel_lifetime_seconds_bucket", (("le", "+Inf"),)): 1,
        ("proxyguard_build_info", (("python", "%d.%d.%d" % sys.version_info[:3]),
                                   ("version", pg.__version__))): 1,
    }
    assert {key: samples.get(key) for key in expected} == expected
    assert 0 < time.time() - samples[("proxyguard_process_start_time_seconds", ())] < 60
    assert "# TYPE proxyguard_server_tunnel_lifetime_seconds histogram" in text
    # The client's page: the tunnel is up, nothing waits or was dropped, and it saw traffic.
    status, _, text = scrape(client.metrics_port)
    samples = parse_metrics(text)
    expected = {
        ("proxyguard_client_tunnel_up", ()): 1,
        ("proxyguard_client_pending_datagrams", ()): 0,
        ("proxyguard_client_dropped_datagrams_total", ()): 0,
        ("proxyguard_client_reconnects_total", (("reason", "network"),)): 0,
        ("proxyguard_client_datagrams_total", (("direction", "from_wireguard"),)): 10,
        ("proxyguard_client_bytes_total", (("direction", "to_wireguard"),)): 1000,
    }
    assert status == 200 and {key: samples.get(key) for key in expected} == expected
    for direction in ("to_wireguard", "from_wireguard"):
        age = samples[("proxyguard_client_last_datagram_age_seconds",
                       (("direction", direction),))]
        assert 0 <= age < 30
    assert not any(name == "proxyguard_client_last_handshake_error" for name, _ in samples)
    assert scrape(client.metrics_port, "/")[0] == 404
    assert scrape(server.metrics_port, "/metrics/x")[0] == 404
    # The page stops with the service.
    assert client.stop() == 0 and server.stop() == 0
    assert not accepts(server.metrics_port) and not accepts(client.metrics_port)


def test_metrics_port_taken_exits_1_naming_the_option():
    with socket.create_server((LOOPBACK, 0)) as taken:
        address = "%s:%d" % taken.getsockname()
        result = run_cli("server", "--listen", "%s:%d" % (LOOPBACK, free_port()),
                         "--metrics-listen", address)
    assert result.returncode == 1
    assert "--metrics-listen: cannot listen on %s" % address in result.stderr


def test_promtool_accepts_the_metrics_pages(echo):
    """The pages of an in-process server and client, with traffic, a refusal and a failed
    dial (whose error text has quotes), pass `promtool check metrics` with no complaint."""
    promtool = which_or_skip("promtool", "prometheus")
    pages = []
    with running_server(echo.port) as server:
        with running_client("http://%s:%d/" % server.address) as (client, wireguard):
            assert wireguard.roundtrip(b"ping") == b"ping"
            assert exchange(server.address[1], b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
            client.last_error = 'the server answered "no" \\ twice\nand left'
            pages = [pg.render_metrics(service.metrics()) for service in (server, client)]
    for page in pages:
        result = subprocess.run([promtool, "check", "metrics"], input=page,
                                capture_output=True, timeout=30)
        assert result.returncode == 0 and not result.stdout and not result.stderr, (
            result.stdout + result.stderr).decode()


def test_readme_metrics_table_is_the_series_of_the_pages(echo):
    """Every family of the server's (with --route) and the client's pages has its row in the
    README's metrics table, and the table names no family the pages do not have."""
    with running_server(echo.port, routes=[("/pg/node1", (LOOPBACK, echo.port))]) as server:
        with running_client("http://%s:%d/" % server.address) as (client, _):
            names = {metric.name for service in (server, client)
                     for metric in service.metrics()}
    text = readme_text()
    section = text[text.index("### Metrics\n"):text.index("### SIGUSR1\n")]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    assert set(re.findall(r"`(proxyguard_\w+)", table)) == names


def test_sigusr1_logs_one_line_per_open_tunnel(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    url = "http://%s:%d/" % (LOOPBACK, server.port)
    clients = [start_client(tmp_path, url, name="client%d" % index) for index in range(2)]
    procs.extend(clients)
    for client in clients:
        assert client.wireguard.roundtrip(b"x" * 42) == b"x" * 42
    line_pattern = re.compile(
        r"SIGUSR1: tunnel 127\.0\.0\.1:\d+: \d+\.\ds, 1 datagram/42 bytes to WireGuard, 1 "
        r"datagram/42 bytes from WireGuard; last data from the peer \d+\.\ds ago, to the peer "
        r"\d+\.\ds ago$")
    dumps = dump_until(server, 2, lambda lines: all(map(line_pattern.search, lines)),
                       "a dump with both tunnels' figures")
    assert server.log().count("SIGUSR1: 2 tunnels open") == dumps
    clients[0].popen.send_signal(signal.SIGUSR1)
    clients[0].wait_log("SIGUSR1: tunnel")
    assert "SIGUSR1: 1 tunnel open, 0 datagrams waiting" in clients[0].log()
    for proc in clients + [server]:
        assert proc.popen.poll() is None  # SIGUSR1 does not end anything
        assert proc.stop() == 0


def prometheus_query(port, query):
    """The instant vector of `query` from Prometheus' HTTP API, as {labels: value}."""
    import urllib.request
    url = "http://%s:%d/api/v1/query?query=%s" % (LOOPBACK, port, quote(query))
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return {tuple(sorted((key, text) for key, text in item["metric"].items()
                         if key != "__name__")): float(item["value"][1])
            for item in answer["data"]["result"]}


@pytest.mark.slow
def test_a_real_prometheus_scrapes_server_and_client(tmp_path, echo, procs):
    """Debian's prometheus scrapes both pages every second; the values come back through
    its query API."""
    prometheus = which_or_skip("prometheus", "prometheus")
    server, client = start_metrics_pair(tmp_path, echo, procs)
    for index in range(20):
        assert client.wireguard.roundtrip(numbered(index, 200)) == numbered(index, 200)
    assert exchange(server.port, b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                    b"Upgrade: UoTLV/1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: server\n    static_configs:\n      - targets: ['%s:%d']\n"
        "  - job_name: client\n    static_configs:\n      - targets: ['%s:%d']\n"
        % (LOOPBACK, server.metrics_port, LOOPBACK, client.metrics_port))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [prometheus, "--config.file=%s" % config,
             "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
             "--web.listen-address=%s:%d" % (LOOPBACK, port), "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def value(query):
            try:
                return prometheus_query(port, query)
            except OSError:  # not listening yet
                assert process.poll() is None, log_path.read_text()
                return None

        wait_until(lambda: value('sum(up{job=~"server|client"}) == 2'), 30,
                   "prometheus scraping both targets")
        assert value('proxyguard_server_datagrams_total{direction="from_wireguard"}') == {
            (("direction", "from_wireguard"),
             ("instance", "%s:%d" % (LOOPBACK, server.metrics_port)), ("job", "server")): 20.0}
        assert list(value('proxyguard_server_handshakes_refused_total{status="405"}')
                    .values()) == [1.0]
        assert list(value("sum(proxyguard_server_tunnels_open)").values()) == [1.0]
        assert list(value("proxyguard_client_tunnel_up").values()) == [1.0]
        assert list(value('proxyguard_client_bytes_total{direction="to_wireguard"}')
                    .values()) == [4000.0]
        build = value("proxyguard_build_info")
        assert len(build) == 2 and all(dict(labels)["version"] == pg.__version__
                                       for labels in build)
        # The tunnel ends: Prometheus sees the client down and the server's lifetime counted.
        assert client.stop() == 0
        server.wait_log("tunnel down")
        wait_until(lambda: value("proxyguard_server_tunnel_lifetime_seconds_count == 1"), 15,
                   "the closed tunnel's lifetime in prometheus")
        assert list(value("sum(proxyguard_server_tunnels_open)").values()) == [0.0]
    finally:
        process.terminate()
        process.wait(20)


# --- The metrics listener's cap --------------------------------------------------------------

@pytest.mark.slow
def test_metrics_listener_serves_8_at_once_and_a_scrape_gets_through_a_flood(tmp_path, echo,
                                                                             procs):
    """Issue 17 item 10: 800 idle connections to the metrics port hold no thread and leave
    a scrape working; 8 requests in progress (slow ones) take the 8 slots, and the next
    request gets 503 at once; the threads stay bounded throughout and go back after."""
    metrics_port = free_port()
    server = start_server(tmp_path, echo.port, "--metrics-listen",
                          "%s:%d" % (LOOPBACK, metrics_port))
    procs.append(server)
    pid = server.popen.pid
    before = proc_stats(pid)
    idle = []
    try:
        for _ in range(800):
            idle.append(socket.create_connection((LOOPBACK, metrics_port), timeout=5))
        status, _, body = scrape(metrics_port)
        assert status == 200 and "proxyguard_server_tunnels_open" in body
        assert proc_stats(pid)["threads"] <= before["threads"] + 1
        slow = []
        for _ in range(pg.METRICS_CONNECTIONS):  # a request line, then nothing
            sock = socket.create_connection((LOOPBACK, metrics_port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            slow.append(sock)
        idle.extend(slow)
        wait_until(lambda: proc_stats(pid)["threads"] >= before["threads"]
                   + pg.METRICS_CONNECTIONS, 10, "8 metrics threads")
        started = time.monotonic()
        status, _, body = scrape(metrics_port)
        assert status == 503 and "busy" in body, (status, body)
        assert time.monotonic() - started < TIME_TOLERANCE  # at once, not after a slot frees
        assert proc_stats(pid)["threads"] <= before["threads"] + pg.METRICS_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    after = wait_for_stats(pid, before["threads"], before["fds"])
    assert after["threads"] <= before["threads"] and after["fds"] <= before["fds"], (before,
                                                                                    after)
    status, _, _ = scrape(metrics_port)
    assert status == 200


# =============================================================================================
# TLS: certificates made here with openssl; the server's own HTTPS; the client's checks
# =============================================================================================


class Certificates:
    """Paths: ca (for --ca-file) and ca_key; cert and key (the server's); pem (certificate, CA
    and key in one file, as HAProxy's `crt` wants)."""

    def __init__(self, **paths):
        self.__dict__.update(paths)


def make_certificates(directory, name="server", hosts=("localhost", "127.0.0.1"), ca=None):
    """A test CA (unless `ca`, a Certificates, is given) and a server certificate for `hosts`,
    made with openssl; returns a Certificates."""
    directory = str(directory)
    openssl = which_or_skip("openssl", "openssl")
    run = lambda *args: subprocess.run([openssl] + list(args), check=True, cwd=directory,
                                       capture_output=True, timeout=60)
    if ca is None:
        ca = Certificates(ca=os.path.join(directory, "ca.pem"),
                          ca_key=os.path.join(directory, "ca.key"))
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", ca.ca_key, "-out", ca.ca, "-days", "2",
            "-subj", "/CN=proxyguard.py test CA")
    key, cert, pem = (os.path.join(directory, name + suffix)
                      for suffix in (".key", ".pem", "-with-key.pem"))
    san = ",".join(("IP:" if host[0].isdigit() or ":" in host else "DNS:") + host
                   for host in hosts)
    ext = os.path.join(directory, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n" % san)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", name + ".csr", "-subj", "/CN=%s" % hosts[0])
    run("x509", "-req", "-in", name + ".csr", "-CA", ca.ca, "-CAkey", ca.ca_key,
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-out", cert, "-days", "2",
        "-extfile", ext)
    with open(pem, "w") as combined:
        for path in (cert, ca.ca, key):
            with open(path) as part:
                combined.write(part.read())
    return Certificates(ca=ca.ca, ca_key=ca.ca_key, cert=cert, key=key, pem=pem)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(tmp_path, echo, procs, certs):
    proc = start_server(tmp_path, echo.port, "--tls-cert", certs.cert, "--tls-key",
                        certs.key)
    procs.append(proc)
    proc.url = "https://localhost:%d/proxyguard" % proc.port
    return proc


def test_tls_end_to_end(tmp_path, tls_server, procs, certs):
    client = start_client(tmp_path, "https://localhost:%d/pg" % tls_server.port,
                          "--ca-file", certs.ca)
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
                     "--ca-file", certs.ca)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("resolve  ok", "connect  ok", "tls      ok", "upgrade  ok", "result   ok"):
        assert step in out, out
    assert ("TLSv1.3, subject commonName=localhost, issuer commonName=proxyguard.py test CA, "
            "expires") in out
    assert "(in 1 day)" in out  # the test certificates last 2 days: not "in 1 days"
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
        port, extra = plain.port, ["--ca-file", certs.ca]
    elif extra:
        extra = extra + ["--ca-file", certs.ca]
    client = start_client(tmp_path, "https://%s:%d/" % (url_host, port), *extra)
    procs.append(client)
    client.wireguard.send(b"x")
    client.wait_log("next attempt in 10s")
    assert text in client.log()
    assert client.popen.poll() is None


def test_tls_12_only_front_end_needs_tls_min_version(tmp_path, procs, certs):
    """A front end without TLS 1.3 (Debian 12 nginx's default): one clear line, and the
    option that fixes it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
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
                    served.append(tls.version())  # before the answer that ends the check
                    tls.sendall(pg.UPGRADE_RESPONSE)
                    tls.recv(4096)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = run_cli("check", "--to", "https://localhost:%d/" % port, "--ca-file", certs.ca)
        assert result.returncode == 1
        assert "TLS 1.3" in result.stdout and "--tls-min-version 1.2" in result.stdout
        result = run_cli("check", "--to", "https://localhost:%d/" % port, "--ca-file", certs.ca,
                         "--tls-min-version", "1.2")
        assert result.returncode == 0, result.stdout
        assert served == ["TLSv1.2"]
    finally:
        listener.close()


def test_sighup_reloads_the_certificate_and_keeps_tunnels(tmp_path, echo, procs, certs):
    live = {"cert": str(tmp_path / "live.pem"), "key": str(tmp_path / "live.key")}
    for kind in ("cert", "key"):
        with open(getattr(certs, kind), "rb") as src, open(live[kind], "wb") as dst:
            dst.write(src.read())
    server = start_server(tmp_path, echo.port, "--tls-cert", live["cert"], "--tls-key",
                          live["key"])
    procs.append(server)
    client = start_client(tmp_path, "https://localhost:%d/" % server.port, "--ca-file", certs.ca)
    procs.append(client)
    assert client.wireguard.roundtrip(b"before") == b"before"

    def served_serial():
        context = ssl.create_default_context(cafile=certs.ca)
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.getpeercert()["serialNumber"]

    first = served_serial()
    renewed = make_certificates(tmp_path, name="renewed", ca=certs)
    for kind in ("cert", "key"):
        with open(getattr(renewed, kind), "rb") as src, open(live[kind] + ".new", "wb") as dst:
            dst.write(src.read())
        os.replace(live[kind] + ".new", live[kind])
    server.popen.send_signal(signal.SIGHUP)
    server.wait_log("SIGHUP: reloaded certificate")
    assert served_serial() != first
    assert client.wireguard.roundtrip(b"after") == b"after"   # the open tunnel lives on
    assert client.log().count("tunnel up") == 1
    with open(live["key"], "w") as f:
        f.write("broken")
    server.popen.send_signal(signal.SIGHUP)
    server.wait_log("SIGHUP: reload failed, the running settings stay")
    assert served_serial() != first and server.popen.poll() is None


def tunnel_down_reasons(proc):
    return [line.rpartition("(")[2].rstrip(")") for line in proc.log().splitlines()
            if "tunnel down" in line]


def test_clean_close_of_a_tls_tunnel_is_not_logged_as_a_path_fault(tmp_path, tls_server, procs,
                                                                     certs):
    """Every clean close of a TLS tunnel (check, client SIGTERM, server SIGTERM) was logged as
    "path down: data unacknowledged for 60s" on both sides; plain HTTP said "closed by peer"."""
    server = tls_server
    result = run_cli("check", "--to", server.url, "--ca-file", certs.ca)
    assert result.returncode == 0, result.stdout + result.stderr
    server.wait_log("tunnel down", count=1)
    client = start_client(tmp_path, server.url, "--ca-file", certs.ca)
    procs.append(client)
    assert client.wireguard.roundtrip(b"x") == b"x"
    assert client.stop() == 0
    server.wait_log("tunnel down", count=2)
    client = start_client(tmp_path, server.url, "--ca-file", certs.ca)
    procs.append(client)
    assert client.wireguard.roundtrip(b"y") == b"y"
    assert server.stop() == 0
    client.wait_log("tunnel down")
    assert tunnel_down_reasons(server) == ["closed by peer", "closed by peer",
                                           "server shutting down"]
    assert tunnel_down_reasons(client) == ["closed by peer"]


def test_server_certificate_that_does_not_load_exits_1(tmp_path, certs):
    result = run_cli("server", "--listen", "127.0.0.1:%d" % free_port(),
                     "--tls-cert", certs.cert, "--tls-key", str(tmp_path / "missing.key"))
    assert result.returncode == 1 and "--tls-key" in result.stderr


@pytest.fixture(scope="session")
def bad_tls_files(tmp_path_factory, certs):
    """Files that look like certificates or keys and are not, or do not belong together."""
    directory = tmp_path_factory.mktemp("bad-tls")
    openssl = which_or_skip("openssl", "openssl")
    run = lambda *args: subprocess.run([openssl] + list(args), check=True, capture_output=True,
                                       timeout=60)
    paths = {"other": make_certificates(directory, name="other", ca=certs)}
    for name, text in [("empty", ""), ("text", "not a certificate\n")]:
        paths[name] = str(directory / name)
        with open(paths[name], "w") as f:
            f.write(text)
    with open(certs.cert) as f:
        pem = f.read()
    paths["cut"] = str(directory / "cut.pem")
    with open(paths["cut"], "w") as f:
        f.write(pem[:len(pem) // 2])
    paths["garbled"] = str(directory / "garbled.pem")
    with open(paths["garbled"], "w") as f:
        lines = pem.splitlines()
        f.write("\n".join(lines[:2] + ["!!!!" + lines[2][4:]] + lines[3:]) + "\n")
    paths["der"] = str(directory / "cert.der")
    run("x509", "-in", certs.cert, "-outform", "der", "-out", paths["der"])
    paths["encrypted"] = str(directory / "encrypted.key")
    run("pkey", "-in", certs.key, "-aes256", "-passout", "pass:secret", "-out",
        paths["encrypted"])
    return paths


@pytest.mark.parametrize("cert,key,text", [
    ("/etc/passwd", "key", "--tls-cert '/etc/passwd': no PEM certificate in the file"),
    ("empty", "key", "--tls-cert '{empty}': no PEM certificate in the file"),
    ("der", "key", "--tls-cert '{der}': no PEM certificate in the file (it looks like DER"),
    ("cut", "key", "--tls-cert '{cut}': a certificate in the file is damaged"),
    ("garbled", "key", "--tls-cert '{garbled}': a certificate in the file is damaged"),
    ("{missing}", "key", "--tls-cert '{missing}': no such file or directory"),
    ("cert", "/etc/passwd", "--tls-key '/etc/passwd': no private key in the file"),
    ("cert", "cert", "--tls-key '{cert}': no private key in the file"),
    ("cert", "{missing}", "--tls-key '{missing}': no such file or directory"),
    ("cert", "/", "--tls-key '/': is a directory"),
    ("cert", "encrypted", "--tls-key '{encrypted}': the private key is encrypted"),
    ("cert", "other_key", "--tls-key '{other_key}' does not match the certificate in "
                          "--tls-cert '{cert}'"),
])
def test_tls_files_that_do_not_load_say_which_and_why(tmp_path, certs, bad_tls_files, cert,
                                                      key, text):
    paths = dict(bad_tls_files, cert=certs.cert, key=certs.key,
                 other_key=bad_tls_files["other"].key, missing=str(tmp_path / "missing.pem"))
    name = lambda value: paths.get(value, value).format(**paths)
    with pytest.raises(pg.FatalError) as info:
        pg.server_tls_context(name(cert), name(key))
    assert str(info.value).startswith(text.format(**paths)), str(info.value)


@pytest.mark.parametrize("ca,text", [
    ("/etc/passwd", "--ca-file '/etc/passwd': no PEM CA certificate in the file"),
    ("key", "--ca-file '{key}': no PEM CA certificate in the file"),
    ("der", "--ca-file '{der}': no PEM CA certificate in the file (it looks like DER"),
    ("garbled", "--ca-file '{garbled}': a certificate in the file is damaged"),
    ("{missing}", "--ca-file '{missing}': no such file or directory"),
])
def test_ca_file_that_does_not_load_says_why(tmp_path, certs, bad_tls_files, ca, text):
    paths = dict(bad_tls_files, key=certs.key, missing=str(tmp_path / "missing.pem"))
    with pytest.raises(pg.UsageError) as info:
        pg.client_tls_context(paths.get(ca, ca).format(**paths))
    assert str(info.value).startswith(text.format(**paths)), str(info.value)


def test_tls_files_that_load(certs):
    pg.server_tls_context(certs.pem, certs.key)  # chain, CA and key in one file
    pg.client_tls_context(certs.ca)
    pg.client_tls_context(certs.pem)  # a key beside the certificates does no harm


def test_server_certificate_error_is_one_line_and_exit_1(tmp_path, certs, bad_tls_files,
                                                        caplog):
    code = pg.main(["server", "--listen", "127.0.0.1:%d" % free_port(), "--tls-cert", certs.cert,
                    "--tls-key", bad_tls_files["other"].key])
    assert code == 1
    assert [record.getMessage() for record in caplog.records] == [
        "--tls-key %r does not match the certificate in --tls-cert %r"
        % (bad_tls_files["other"].key, certs.cert)]


# ---------------------------------------------------------------------------------------------
# Two threads on one TLS connection (why TLSChannel: the Channels section of proxyguard.py):
# 100 tunnels, thousands of frames each way at once, every byte checked.
# PROXYGUARD_TEST_NAIVE_TLS=1 swaps in a shared SSLSocket (the naive design) to show that this
# test catches its record corruption.
# ---------------------------------------------------------------------------------------------


class NaiveSSLSocketChannel(pg.PlainChannel):
    """The design the Channels section of proxyguard.py warns against: one SSLSocket, read and
    written by two threads at once. Only for PROXYGUARD_TEST_NAIVE_TLS=1."""

    @classmethod
    def open(cls, sock, context, server_side):
        return cls(context.wrap_socket(sock, server_side=server_side,
                                       server_hostname=None if server_side else "localhost"))


def open_tls_pair(listener, certs, naive):
    client_context = pg.client_tls_context(certs.ca)
    server_context = pg.server_tls_context(certs.cert, certs.key)
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
    decoder = FrameDecoder()
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
@pytest.mark.slow
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
                    frames = [encode_frame(d) for d in out]
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


# =============================================================================================
# Hostile input and resource use: a corpus of bad handshakes, random streams, 1,000 tunnels,
# --max-clients, a UDP flood into a slow reader. Each against a real server, with one good
# tunnel that must keep working throughout; the server fixture checks its health at teardown.
# =============================================================================================

# =============================================================================================
# 1. A corpus of bad handshakes
# =============================================================================================

ANY = "any error"  # any 4xx/5xx answer, or a close/reset without an answer
CLOSE = frozenset(["closed", "reset"])
# Good upgrade headers, to build requests that are wrong in exactly one way.
HOST = "Host: example"
UPGRADE_HEADERS = [HOST, "Connection: Upgrade", "Upgrade: UoTLV/1"]
# The same for a WebSocket upgrade (RFC 6455 4.1), with the example key of RFC 6455 1.3.
WS_KEY, WS_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
WS_UPGRADE_HEADERS = [HOST, "Connection: Upgrade", "Upgrade: websocket",
                      "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: " + WS_KEY,
                      "Sec-WebSocket-Protocol: proxyguard-udp"]


class Case:
    """One bad handshake: what to send, how, and which outcomes are acceptable.

    how: send      send `data`, keep the write side open, read the answer until the close;
         halfclose send `data`, shut the write side (FIN), read until the close (prompt);
         flood     send `data` from a second thread while reading (the server cuts it off);
         slow      send `data` one byte every `delay` seconds until the server closes;
         close     send `data`, close at once without reading (normal FIN);
         abort     send `data`, close at once with RST.
    expect: a set of statuses and/or "closed"/"reset", or ANY.
    """

    def __init__(self, kind, name, data, expect, how="send", delay=1.0):
        self.kind = kind
        self.name = "%s/%s" % (kind, name)
        self.data = data
        self.expect = expect
        self.how = how
        self.delay = delay

    def accepts(self, outcome):
        if self.how in ("close", "abort"):
            return outcome == "sent"
        if self.expect == ANY:
            return outcome in CLOSE or (isinstance(outcome, int) and 400 <= outcome <= 599)
        return outcome in self.expect


def client_hellos():
    """Real TLS ClientHellos from this Python's OpenSSL (several shapes)."""
    hellos = []
    for sni, alpn, version in [("example.org", None, None), ("vpn.example.org", ["h2"], None),
                               ("a" * 60 + ".example", ["http/1.1"], ssl.TLSVersion.TLSv1_2),
                               (None, None, ssl.TLSVersion.TLSv1_3)]:
        context = ssl.create_default_context()
        context.check_hostname = False
        if alpn:
            context.set_alpn_protocols(alpn)
        if version:
            context.minimum_version = context.maximum_version = version
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hellos.append(outgoing.read())
    return hellos


def oracle(data):
    """The statuses proxyguard's own parser gives `data`; None if it is a valid upgrade."""
    parts = pg.split_head(data)
    if parts is None:
        return {408} if len(data) <= pg.MAX_HEAD_BYTES else {431}
    try:
        pg.check_upgrade_request(pg.parse_request(parts[0]))
    except pg.HandshakeError as exc:
        return {exc.status}
    return None


def build_corpus(seed=20261124):
    rng = random.Random(seed)
    cases = []
    add = cases.append

    def garbage(size):  # random bytes without LF, so the head end is where we put it
        return bytes(rng.randrange(256) for _ in range(size)).replace(b"\n", b"?")

    # Garbage: with a head end (parsed and refused at once), without (408), and too big (431).
    for i in range(30):
        add(Case("garbage", "terminated-%d" % i, garbage(rng.choice([1, 5, 50, 500, 4000]))
                 + b"\r\n\r\n", {400}))
    for i in range(15):
        add(Case("garbage", "unterminated-%d" % i, garbage(rng.randrange(1, 8000)), {408}))
    for i in range(8):
        add(Case("garbage", "big-%d" % i, garbage(rng.randrange(21000, 300000)),
                 {431} | CLOSE, how="flood"))
    for i, size in enumerate([1, 2, 4, 100]):
        add(Case("garbage", "binary-zeros-%d" % i, b"\x00" * size + b"\r\n\r\n", {400}))
    add(Case("garbage", "only-blank-line", b"\r\n\r\n", {400}))
    add(Case("garbage", "only-lf-lf", b"\n\n", {400}))
    for i in range(10):
        add(Case("garbage", "silent-%d" % i, b"", {408}))

    # Other protocols on the plain port.
    for i, hello in enumerate(client_hellos()):
        add(Case("tls", "client-hello-%d" % i, hello, {400}))
        add(Case("tls", "client-hello-crlf-%d" % i, hello + b"\r\n\r\n", {400}))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    add(Case("http2", "preface", preface, {505}))
    add(Case("http2", "preface-settings", preface + settings_frame, {505}))
    add(Case("http2", "preface-halfclose", preface, {505}, how="halfclose"))
    add(Case("http2", "preface-prefix", preface[:10], {408}))
    add(Case("http2", "h2c-upgrade", request([HOST, "Connection: Upgrade, HTTP2-Settings",
                                              "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"]),
             {426}))
    add(Case("other", "ssh-banner", b"SSH-2.0-OpenSSH_9.2\r\n", {408}))
    add(Case("other", "ssh-banner-terminated", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", {400}))
    add(Case("other", "socks5", b"\x05\x01\x00", {408}))
    add(Case("other", "proxy-protocol-v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
             + request(UPGRADE_HEADERS), {400}))
    add(Case("other", "wireguard-initiation", b"\x01\x00\x00\x00" + garbage(144), {408}))

    # Missing CRLFs.
    good = request(UPGRADE_HEADERS)
    add(Case("crlf", "no-blank-line", good[:-2], {408}))
    add(Case("crlf", "half-blank-line", good[:-1], {408}))
    add(Case("crlf", "cr-only", good.replace(b"\r\n", b"\r"), {408}))
    add(Case("crlf", "request-line-only", b"GET / HTTP/1.1\r\n", {408}))
    add(Case("crlf", "request-line-no-eol", b"GET / HTTP/1.1", {408}))
    add(Case("crlf", "no-line-ends", good.replace(b"\r\n", b" "), {408}))
    add(Case("crlf", "cr-only-long", good.replace(b"\r\n", b"\r") * 300, {431} | CLOSE,
             how="flood"))
    add(Case("crlf", "lf-cr-mix", b"GET / HTTP/1.1\n\rHost: a\n\r\n\r", {400}))
    add(Case("crlf", "cr-only-halfclose", good.replace(b"\r\n", b"\r"), CLOSE, how="halfclose"))
    add(Case("crlf", "no-blank-line-halfclose", good[:-2], CLOSE, how="halfclose"))

    # Header floods: many lines, huge lines (> 16 KiB), huge targets.
    for count in [101, 102, 150, 500, 1000, 3000]:
        add(Case("flood", "lines-%d" % count,
                 request(UPGRADE_HEADERS + ["X-%d: v" % i for i in range(count)]),
                 {431} | CLOSE, how="flood"))
    for count in [200, 2000]:
        add(Case("flood", "lines-unterminated-%d" % count,
                 request(UPGRADE_HEADERS + ["X: v"] * count)[:-2], {408, 431} | CLOSE,
                 how="flood"))
    for size in [16385, 17000, 20000]:
        # Larger than the limit but not a valid upgrade either: refused one way or another.
        add(Case("flood", "line-%d-no-upgrade" % size, request([HOST, "X-Pad: " + "a" * size]),
                 ANY, how="flood"))
    for size in [21000, 32768, 65536, 200000, 1 << 20]:
        add(Case("flood", "line-%d" % size, request(UPGRADE_HEADERS + ["X-Pad: " + "a" * size]),
                 {431} | CLOSE, how="flood"))
        add(Case("flood", "target-%d" % size, request(UPGRADE_HEADERS, target="/" + "b" * size),
                 {431} | CLOSE, how="flood"))
    add(Case("flood", "many-small-unterminated", b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 10000,
             {431} | CLOSE, how="flood"))
    add(Case("flood", "no-line-end-1mib", b"G" * (1 << 20), {431} | CLOSE, how="flood"))

    # Slow senders: must be cut off at the handshake deadline, however they trickle.
    add(Case("slow", "upgrade-1-byte-per-s", good, {408} | CLOSE, how="slow", delay=1.0))
    add(Case("slow", "garbage-1-byte-per-s", garbage(50), {408} | CLOSE, how="slow", delay=1.0))
    add(Case("slow", "bytes-every-20ms",
             request(UPGRADE_HEADERS + ["X-Slow-%d: v" % i for i in range(30)]),
             {408} | CLOSE, how="slow", delay=0.02))
    add(Case("slow", "blank-line-bytes-every-0.5s", b"\r\n" * 20, {400, 408} | CLOSE,
             how="slow", delay=0.5))

    # Wrong methods.
    for method in ["POST", "PUT", "HEAD", "DELETE", "OPTIONS", "TRACE", "PATCH", "get", "Get",
                   "GETT", "CONNECT", "PRI", "M-SEARCH", "X" * 200]:
        target = "example:443" if method == "CONNECT" else "/"
        add(Case("method", method[:20], request(UPGRADE_HEADERS, method=method, target=target),
                 {405}))
    for line in [b"G ET / HTTP/1.1", b"GET\t/ HTTP/1.1", b" GET / HTTP/1.1", b"GET / HTTP/1.1 ",
                 b"GET", b"GET /", b"/ HTTP/1.1", b"G\x00T / HTTP/1.1", b"G(T / HTTP/1.1",
                 b"\xff\xfe / HTTP/1.1", b"GET  / HTTP/1.1", b"GET / x HTTP/1.1"]:
        add(Case("method", "line-%r" % line[:20], line + b"\r\n"
                 + b"".join(h.encode() + b"\r\n" for h in UPGRADE_HEADERS) + b"\r\n", {400}))

    # Wrong versions.
    for version, status in [("HTTP/2.0", 505), ("HTTP/3.0", 505), ("HTTP/0.9", 505),
                            ("HTTP/9.9", 505), ("HTTP/1.10", 400), ("HTTP/1", 400),
                            ("http/1.1", 400), ("HTTP/1.1x", 400), ("HTTPS/1.1", 400),
                            ("HTTP/1.1/", 400), ("HTTP/one", 400), ("RTSP/1.0", 400),
                            ("HTTP/\xb9.1", 400)]:
        add(Case("version", version, request(UPGRADE_HEADERS, version=version), {status}))

    # Duplicate, conflicting, missing or malformed headers.
    conn, upg = "Connection: Upgrade", "Upgrade: UoTLV/1"
    for name, lines, status in [
            ("no-host", [conn, upg], 400),
            ("two-hosts", [HOST, "Host: other", conn, upg], 400),
            ("two-same-hosts", [HOST, HOST, conn, upg], 400),
            ("content-length-5", UPGRADE_HEADERS + ["Content-Length: 5"], 400),
            ("content-length-5-then-0", UPGRADE_HEADERS + ["Content-Length: 5",
                                                          "Content-Length: 0"], 400),
            ("content-length-junk", UPGRADE_HEADERS + ["Content-Length: abc"], 400),
            ("content-length-negative", UPGRADE_HEADERS + ["Content-Length: -1"], 400),
            ("chunked", UPGRADE_HEADERS + ["Transfer-Encoding: chunked"], 400),
            ("chunked-and-length", UPGRADE_HEADERS + ["Transfer-Encoding: chunked",
                                                     "Content-Length: 0"], 400),
            ("no-connection", [HOST, upg], 426),
            ("no-upgrade", [HOST, conn], 426),
            ("neither", [HOST], 426),
            ("connection-close", [HOST, "Connection: close", upg], 426),
            ("connection-keepalive", [HOST, "Connection: keep-alive", upg], 426),
            ("connection-upgrades", [HOST, "Connection: Upgrades", upg], 426),
            ("upgrade-websocket", [HOST, conn, "Upgrade: websocket"], 426),
            ("upgrade-v2", [HOST, conn, "Upgrade: UoTLV/2"], 426),
            ("upgrade-v1.0", [HOST, conn, "Upgrade: UoTLV/1.0"], 426),
            ("upgrade-empty", [HOST, conn, "Upgrade:"], 426),
            ("upgrade-prefix", [HOST, conn, "Upgrade: UoTLV"], 426),
            ("space-before-colon", [HOST, conn, "Upgrade : UoTLV/1"], 400),
            ("no-colon", UPGRADE_HEADERS + ["NoColonHere"], 400),
            ("empty-name", UPGRADE_HEADERS + [": value"], 400),
            ("bad-name", UPGRADE_HEADERS + ["X(y): 1"], 400),
            ("folded", UPGRADE_HEADERS + ["X-A: 1", " folded"], 400),
            ("folded-tab", UPGRADE_HEADERS + ["X-A: 1", "\tfolded"], 400),
            ("nul-in-value", UPGRADE_HEADERS + ["X-A: a\x00b"], 400),
            ("esc-in-value", UPGRADE_HEADERS + ["X-A: \x1b[2J"], 400),
            ("del-in-value", UPGRADE_HEADERS + ["X-A: a\x7f"], 400),
            ("cr-in-value", UPGRADE_HEADERS + ["X-A: a\rb"], 400),
            ("nul-in-upgrade", [HOST, conn, "Upgrade: UoTLV/1\x00"], 400),
            ("header-before-request-line", None, 400)]:
        data = (b"Host: a\r\n" + request(UPGRADE_HEADERS) if lines is None
                else request(lines))
        add(Case("headers", name, data, {status}))

    # Requests that close mid-way: after every few bytes of a good request, FIN or RST.
    points = sorted(set([1, 2, 3, 4, 10, 15, 16, 17, 30, 40, len(good) - 4, len(good) - 3,
                         len(good) - 2, len(good) - 1] + rng.sample(range(1, len(good)), 10)))
    for point in points:
        add(Case("midway", "fin-read-%d" % point, good[:point], CLOSE, how="halfclose"))
        add(Case("midway", "close-%d" % point, good[:point], CLOSE, how="close"))
        add(Case("midway", "rst-%d" % point, good[:point], CLOSE, how="abort"))
    add(Case("midway", "rst-after-whole-request", good, CLOSE, how="abort"))
    add(Case("midway", "close-after-whole-request", good, CLOSE, how="close"))
    add(Case("midway", "rst-after-bad-request", request([HOST]), CLOSE, how="abort"))
    add(Case("midway", "rst-after-flood", request(UPGRADE_HEADERS + ["X: v"] * 300), CLOSE,
             how="abort"))

    # Random mutations of the good request that proxyguard's own parser calls invalid.
    mutations = 0
    while mutations < 40:
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            op = rng.randrange(5)
            if op == 0:
                del data[where]
            elif op == 1:
                data.insert(where, rng.choice(b"\r\n \t:/\x00\x7f\xffGETa1"))
            elif op == 2:
                data[where] = rng.randrange(256)
            elif op == 3:
                data[where:where] = data[where:where + rng.randint(1, 30)]
            else:
                data[where] = ord(chr(data[where]).swapcase()) if chr(data[where]).isalpha() \
                    else data[where]
        expect = oracle(bytes(data))
        if expect is None:
            continue
        mutations += 1
        add(Case("mutation", "%d" % mutations, bytes(data), expect))
    return cases


def run_case(port, case):
    """Run one case; return (case, outcome, seconds, detail). Never takes much over CASE_LIMIT."""
    started = time.monotonic()
    deadline = started + CASE_LIMIT
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    sender = None
    try:
        if case.how in ("close", "abort"):
            if case.data:
                sock.sendall(case.data)
            if case.how == "abort":
                set_rst_on_close(sock)
            return case, "sent", time.monotonic() - started, b""
        if case.how == "flood":
            def send():
                try:
                    sock.sendall(case.data)
                except OSError:
                    pass  # cut off by the server: expected
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
        elif case.how == "slow":
            for i in range(len(case.data)):
                try:
                    sock.send(case.data[i:i + 1])
                except OSError:
                    break
                readable, _, _ = select.select([sock], [], [], case.delay)
                if readable or time.monotonic() > deadline:
                    break
        elif case.data:
            sock.sendall(case.data)
        if case.how == "halfclose":
            sock.shutdown(socket.SHUT_WR)
        data, ending = read_answer(sock, deadline)
        elapsed = time.monotonic() - started
        if ending == "hung":
            return case, "hung", elapsed, data[:200]
        status = status_of(data)
        if status is not None:
            head = data.partition(b"\r\n\r\n")[0].lower()
            if status != 101 and b"close" not in head:
                return case, "no Connection: close in %d" % status, elapsed, data[:200]
            return case, status, elapsed, data[:200]
        if data:
            return case, "not HTTP", elapsed, data[:200]
        return case, "closed" if ending == "eof" else "reset", elapsed, b""
    except OSError as exc:
        return case, "client error %r" % exc, time.monotonic() - started, b""
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked in sendall
        except OSError:
            pass
        sock.close()
        if sender is not None:
            sender.join(5)


def test_corpus_is_big_and_varied():
    cases = build_corpus()
    kinds = collections.Counter(case.kind for case in cases)
    assert len(cases) >= 200, kinds
    assert len({case.name for case in cases}) == len(cases)
    for kind in ["garbage", "tls", "http2", "crlf", "flood", "slow", "method", "version",
                 "headers", "midway", "mutation"]:
        assert kinds[kind] > 0, kind


@pytest.mark.timeout(150)
@pytest.mark.slow
def test_bad_handshakes_are_refused_and_the_good_tunnel_survives(server, good_tunnel):
    cases = build_corpus()
    random.Random(7).shuffle(cases)  # mix slow and fast cases in every batch
    pid = server.popen.pid
    before = wait_for_stats(pid, threads=4, fds=1 << 30, timeout=5)
    batch_size = 40
    results = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=batch_size) as pool:
        for first in range(0, len(cases), batch_size):
            batch = cases[first:first + batch_size]
            results += list(pool.map(lambda case: run_case(server.port, case), batch))
            assert server.popen.poll() is None, "server died in batch %d" % (first // batch_size)
            good_tunnel.check(tag=3 + first)
    total = time.monotonic() - started
    after = wait_for_stats(pid, before["threads"], before["fds"], timeout=CASE_LIMIT + 5)

    failures = [(case.name, outcome, round(seconds, 2), detail)
                for case, outcome, seconds, detail in results
                if not case.accepts(outcome) or seconds > CASE_LIMIT]
    by_kind = collections.defaultdict(collections.Counter)
    slowest = collections.defaultdict(float)
    for case, outcome, seconds, _ in results:
        by_kind[case.kind][outcome] += 1
        slowest[case.kind] = max(slowest[case.kind], seconds)
    print("\n%d bad handshakes in %.1fs (batches of %d); server before %s, after %s"
          % (len(results), total, batch_size, before, after))
    for kind in sorted(by_kind):
        print("  %-9s %3d cases, slowest %.2fs: %s" % (
            kind, sum(by_kind[kind].values()), slowest[kind],
            ", ".join("%s=%d" % item for item in sorted(by_kind[kind].items(), key=str))))
    assert not failures, "\n".join(map(repr, failures))
    assert after["threads"] <= before["threads"], (before, after)
    assert after["fds"] <= before["fds"], (before, after)
    server_is_healthy(server)


@pytest.mark.slow  # waits out a 2 s handshake deadline
def test_slow_senders_are_cut_off_at_the_handshake_deadline(server, good_tunnel):
    """A few trickling clients at once; each is closed within the timeout plus a margin, and
    not earlier than the timeout (the deadline is not reset by each byte)."""
    cases = [Case("slow", "1-byte-per-s-%d" % i, UPGRADE, {408} | CLOSE, how="slow", delay=1.0)
             for i in range(4)]
    cases.append(Case("slow", "every-0.1s", UPGRADE * 3, {408} | CLOSE, how="slow", delay=0.1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(lambda case: run_case(server.port, case), cases))
    for case, outcome, seconds, detail in results:
        print("%s: %s after %.2fs" % (case.name, outcome, seconds))
        assert case.accepts(outcome), (case.name, outcome, detail)
        assert HANDSHAKE_TIMEOUT - 0.2 <= seconds <= CASE_LIMIT, (case.name, seconds)


# Bugs found while writing the corpus: each is a request the server should refuse but upgrades.

@pytest.mark.parametrize("size", [16385 - 60, 16385, 17000, 19000, 20400])
def test_head_over_the_limit_is_refused_even_if_valid(server, good_tunnel, size):
    """A valid upgrade whose head is just over 16 KiB, completing in the read that crosses the
    limit, is refused with 431 (proxyguard.py up to ca634e9 accepted heads up to ~20 KiB)."""
    data = request(UPGRADE_HEADERS + ["X-Pad: " + "a" * size])
    assert len(data) > pg.MAX_HEAD_BYTES
    assert status_of(exchange(server.port, data)) == 431


def test_conflicting_content_lengths_are_refused(server, good_tunnel):
    data = request(UPGRADE_HEADERS + ["Content-Length: 0", "Content-Length: 5"])
    assert status_of(exchange(server.port, data, timeout=1.0)) == 400


def test_control_characters_in_the_target_are_refused(server, good_tunnel):
    data = request(UPGRADE_HEADERS, target="/\x1b[2J\x1b[31mpwned\x00\r")
    status = status_of(exchange(server.port, data, timeout=1.0))
    assert status == 400
    assert "\x1b" not in server.log()


def test_tls_client_hello_on_plain_port_is_answered_at_once(server, good_tunnel):
    """A real ClientHello has no blank line: the server must recognise TLS from the first byte
    and answer 400 at once, not wait for the deadline (proxyguard.py up to ca634e9 did)."""
    for hello in client_hellos():
        started = time.monotonic()
        data = exchange(server.port, hello)
        assert status_of(data) == 400 and b"TLS" in data, data[:200]
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT / 2


PATH_PREFIX = "/secret-prefix"


def path_cases():
    """Good upgrades of both transports to targets outside `--path PATH_PREFIX`: each must get
    404 and a close. Paths compare as sent: case matters and %2F is not "/" (RFC 3986 6.2.2.1,
    2.2), and the query is not part of the path (RFC 3986 3.4)."""
    cases = []
    for target in ["/", "/other", "/secret-prefixX", "/secret-prefix.bak", "/secret",
                   "/SECRET-PREFIX", "//secret-prefix", "/other/secret-prefix",
                   "/other?/secret-prefix/", "/secret-prefix%2Fx"]:
        for transport, headers in [("uotlv", UPGRADE_HEADERS), ("websocket", WS_UPGRADE_HEADERS)]:
            cases.append(Case("path", transport + target, request(headers, target=target),
                              {404}))
    return cases


@pytest.mark.parametrize("server", [("--path", PATH_PREFIX)], indirect=True, ids=["path"])
def test_path_prefix_answers_404_elsewhere_for_both_transports(server, good_tunnel):
    cases = path_cases()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: run_case(server.port, case), cases))
    failures = [(case.name, outcome, detail) for case, outcome, _, detail in results
                if not case.accepts(outcome)]
    assert not failures, "\n".join(map(repr, failures))
    # At the prefix and below it, both transports go up (`websockets` as the WebSocket client).
    for index, target in enumerate([PATH_PREFIX, PATH_PREFIX + "/", PATH_PREFIX + "/x",
                                    PATH_PREFIX + "?x=1", PATH_PREFIX + "/x/y?z=/other"]):
        tunnel = RawTunnel(server.port, request=pg.build_upgrade_request("example", target))
        tunnel.check(tag=80 + index)
        tunnel.close()
        with ws_connect(server.port, target) as ws:
            ws_roundtrip(ws, [numbered(index, 100)])
    good_tunnel.check(tag=90)


@pytest.mark.timeout(60)
def test_thread_exhaustion_does_not_kill_the_server(tmp_path, echo, procs):
    """Silent connections each hold a handshake thread until the deadline. When no more threads
    can be started, the server must refuse (close) the extra connections and stay up. The limit
    is made small with RLIMIT_AS on the server process (thread stacks are mappings of
    THREAD_STACK_BYTES)."""
    import resource
    server = start_server(tmp_path, echo.port, "--handshake-timeout", str(HANDSHAKE_TIMEOUT))
    procs.append(server)
    good = RawTunnel(server.port)
    good.check(tag=70)
    pid = server.popen.pid
    with open("/proc/%d/status" % pid) as stream:
        vm_kib = int(re.search(r"^VmSize:\s+(\d+) kB", stream.read(), re.M).group(1))
    # Room for roughly 15-20 more threads, and a little for what they allocate.
    limit = vm_kib * 1024 + 20 * pg.THREAD_STACK_BYTES + (2 << 20)
    original = resource.prlimit(pid, resource.RLIMIT_AS)
    # Only the soft limit: raising a lowered hard limit again needs CAP_SYS_RESOURCE.
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, original[1]))
    threads_before = proc_stats(pid)["threads"]
    silent = []
    try:
        for _ in range(80):
            silent.append(socket.create_connection((LOOPBACK, server.port), timeout=5))
        server.wait_log("cannot start a thread")  # the limit is reached (and the server lives)
        alive_during = server.popen.poll() is None
        for sock in silent:
            sock.close()
        silent = []
        # The handshake threads end (at once on the end of stream, at the latest at the deadline).
        wait_until(lambda: (server.popen.poll() is not None
                            or proc_stats(pid)["threads"] <= threads_before),
                   HANDSHAKE_TIMEOUT + MARGIN, "the server's handshake threads ending")
        assert alive_during and server.popen.poll() is None, server.log()[-3000:]
        good.check(tag=71)
        resource.prlimit(pid, resource.RLIMIT_AS, original)
        fresh = RawTunnel(server.port)
        fresh.check(tag=72)
        fresh.close()
    finally:
        for sock in silent:
            sock.close()
        good.close()


def test_tune_threads_sets_stack_and_switch_interval_and_tls_fits_the_stack(certs):
    """The service's threads get THREAD_STACK_BYTES stacks (thousands of tunnels: 8 MiB each
    would be 80 GiB of address space) and a SWITCH_INTERVAL GIL interval; the TLS handshake
    and both pumps' TLS calls run in threads with that stack."""
    old_stack, old_interval = threading.stack_size(), sys.getswitchinterval()
    listener = socket.create_server((LOOPBACK, 0))
    try:
        pg.tune_threads()
        assert threading.stack_size() == pg.THREAD_STACK_BYTES <= 256 * 1024
        assert sys.getswitchinterval() == pytest.approx(pg.SWITCH_INTERVAL)
        client, server = open_tls_pair(listener, certs, naive=False)  # server side: a thread
        payload = os.urandom(1420)
        up = [payload[:size] for size in (1, 100, 1420) * 50]
        down = up[::-1]
        errors = []
        threads = [threading.Thread(target=pump_both_ways,
                                    args=(channel, [encode_frame(d) for d in out], expect,
                                          errors))
                   for channel, out, expect in ((client, up, down), (server, down, up))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors and not any(thread.is_alive() for thread in threads)
        for channel in (client, server):
            channel.close()
    finally:
        threading.stack_size(old_stack)
        sys.setswitchinterval(old_interval)
        listener.close()


# =============================================================================================
# 2. Random bytes after a good upgrade; the frame decoder against a model
# =============================================================================================


def random_stream(rng, size):
    """Random bytes, sometimes shaped like frames with random (often huge) lengths."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(size)
    parts = []
    total = 0
    while total < size:
        length = rng.choice([0, 1, 2, rng.randrange(65536), 65507, 65508, 65534, 65535])
        body = rng.randbytes(min(length, size - total) if kind == 1 else length)
        parts.append(struct.pack("!H", length) + body)
        total += 2 + len(body)
    return b"".join(parts)


def hostile_stream_client(port, seed):
    """Upgrade, then send random bytes in random pieces, then leave in a random way."""
    rng = random.Random(seed)
    tunnel = RawTunnel(port)
    data = random_stream(rng, rng.choice([1, 2, 3, 100, 5000, 70000, 300000, 1 << 20]))
    view = memoryview(data)
    ending = rng.choice(["close", "abort", "read", "halfclose"])
    try:
        while view:
            piece = rng.choice([1, 7, 1000, 65536, 1 << 20])
            tunnel.sock.sendall(view[:piece])
            view = view[piece:]
        if ending == "halfclose":
            tunnel.sock.shutdown(socket.SHUT_WR)
        if ending in ("read", "halfclose"):
            read_answer(tunnel.sock, time.monotonic() + 0.5)
    except OSError:
        pass  # a server that closes the stream early is fine
    finally:
        tunnel.close(abort=(ending == "abort"))
    return len(data), ending


@pytest.mark.timeout(120)
def test_random_bytes_after_upgrade_do_not_hurt_the_server(server, good_tunnel):
    pid = server.popen.pid
    before = proc_stats(pid)
    count = 48
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda seed: hostile_stream_client(server.port, seed),
                                range(1000, 1000 + count)))
    good_tunnel.check(tag=5)
    after = wait_for_stats(pid, before["threads"], before["fds"])
    sent = sum(size for size, _ in results)
    print("\n%d hostile streams, %.1f MiB in %.1fs, endings %s; oversized frames dropped in "
          "%d tunnels; server before %s, after %s"
          % (count, sent / 2 ** 20, time.monotonic() - started,
             dict(collections.Counter(ending for _, ending in results)),
             server.log().count("oversized frames dropped"), before, after))
    assert after["threads"] <= before["threads"], (before, after)
    assert after["fds"] <= before["fds"], (before, after)
    # 256 KiB reads and 64 KiB datagrams raise the allocator's high-water mark by ~5 MiB once;
    # repeated rounds stay there (measured: 24.6 -> 30.7, 30.1, 29.5, 28.7, 29.8, 29.9 MiB).
    assert after["rss_kib"] - before["rss_kib"] < 16 * 1024, (before, after)
    assert server.log().count("tunnel up") == count + 1


def test_oversized_frames_are_dropped_and_the_tunnel_goes_on(server, good_tunnel):
    """65508-65535-byte frames cannot be one IPv4 datagram: dropped; the next frame goes on
    (the original stalls or spins at 100 % CPU here)."""
    tunnel = RawTunnel(server.port)
    for size in [65535, 65508, 65534]:
        tunnel.send(b"\xee" * size)
    datagram = numbered(99, 1000)
    assert tunnel.roundtrip(datagram) == datagram
    assert tunnel.roundtrip(b"\x01" * 65507) == b"\x01" * 65507
    tunnel.close()


def datagram_sizes():
    return st.one_of(st.integers(0, 64), st.integers(0, 65535),
                     st.sampled_from([0, 1, 2, 255, 256, 1420, 65507, 65534, 65535]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_frame_decoder_matches_a_model(data):
    """Any datagrams, encoded, split at any points, fed as bytes or bytearray: the same
    datagrams come out, each as soon as its last byte is fed, and `pending` is exactly the
    bytes of the unfinished frame."""
    sizes = data.draw(st.lists(datagram_sizes(), max_size=12), label="sizes")
    datagrams = []
    for i, size in enumerate(sizes):
        if size <= 64:
            datagrams.append(data.draw(st.binary(min_size=size, max_size=size)))
        else:
            datagrams.append(numbered(i, size))
    stream = b"".join(encode_frame(d) for d in datagrams)
    ends = []  # stream offset where each frame ends
    position = 0
    for d in datagrams:
        position += 2 + len(d)
        ends.append(position)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts"))
    decoder = FrameDecoder()
    got = []
    previous = 0
    for cut in cuts + [len(stream)]:
        piece = stream[previous:cut]
        kind = data.draw(st.sampled_from([bytes, bytearray]), label="type")
        got += decoder.feed(kind(piece))
        previous = cut
        done = sum(1 for end in ends if end <= cut)
        assert got == datagrams[:done]
        assert decoder.pending == cut - (ends[done - 1] if done else 0)
    assert got == datagrams and decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=3000), max_size=20))
def test_frame_decoder_on_arbitrary_bytes_conserves_and_bounds(chunks):
    """Any byte stream: never raises, every byte is in a datagram, a header or `pending`, and
    `pending` never exceeds one unfinished frame (2 + 65535 - 1 bytes)."""
    decoder = FrameDecoder()
    fed = out = 0
    for chunk in chunks:
        datagrams = decoder.feed(chunk)
        fed += len(chunk)
        out += sum(2 + len(d) for d in datagrams)
        assert fed == out + decoder.pending
        assert decoder.pending <= 2 + 65535 - 1


# =============================================================================================
# 3. 1,000 tunnels in a row: no thread, fd or memory leak
# =============================================================================================


def one_tunnel(port, index, mode="echo"):
    if mode == "rst-before-101":
        sock = socket.create_connection((LOOPBACK, port), timeout=5)
        sock.sendall(UPGRADE + encode_frame(numbered(index, 100)))
        set_rst_on_close(sock)
        sock.close()
        return
    tunnel = RawTunnel(port)
    if mode == "no-frame":
        tunnel.close()
        return
    datagram = numbered(index, 100)
    assert tunnel.roundtrip(datagram) == datagram
    tunnel.close(abort=(mode == "rst"))


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_thousand_tunnels_in_a_row_leak_nothing(server, good_tunnel):
    pid = server.popen.pid
    for i in range(30):  # warm up: imports, allocator arenas, thread stack cache
        one_tunnel(server.port, i)
    base = wait_for_stats(pid, threads=4, fds=1 << 30)
    before = wait_for_stats(pid, base["threads"], base["fds"], timeout=5)
    started = time.monotonic()
    for i in range(1000):
        one_tunnel(server.port, i)
    seconds = time.monotonic() - started
    after = wait_for_stats(pid, before["threads"], before["fds"])
    print("\n1000 tunnels (upgrade, frame, echo, close) in %.1fs (%.1f ms each): "
          "before %s, after %s" % (seconds, seconds, before, after))
    good_tunnel.check(tag=6)

    # Then 300 ending badly: RST after the echo, no frame at all, RST before reading the 101.
    started = time.monotonic()
    modes = ["rst", "no-frame", "rst-before-101"]
    for i in range(300):
        one_tunnel(server.port, i, modes[i % 3])
    seconds2 = time.monotonic() - started
    after2 = wait_for_stats(pid, before["threads"], before["fds"])
    print("300 tunnels ending badly (%s) in %.1fs: after %s" % ("/".join(modes), seconds2,
                                                                 after2))
    good_tunnel.check(tag=7)
    for stats in (after, after2):
        assert stats["threads"] <= before["threads"], (before, stats)
        assert stats["fds"] <= before["fds"], (before, stats)
        assert stats["rss_kib"] - before["rss_kib"] < 8 * 1024, (before, stats)


@pytest.mark.slow  # a bench run: processes, 2 rounds of 20 tunnels
def test_bench_times_the_teardown_and_handshakes_during_it():
    """The bench's tunnels test (proxyguard_bench.py --tunnels): every round's descriptors and
    threads come back (the probe's own handshakes meanwhile allowed for, and gone after it),
    the probe's handshakes during the teardown are timed and none fails, and the worst of the
    rounds is summed up; --nofile starts the server at systemd's soft limit."""
    output = subprocess.run(
        [sys.executable, os.path.join(HERE, "proxyguard_bench.py"), "--tunnels", "20",
         "--runs", "2", "--idle", "0.1", "--nofile", "1024", "--json"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, text=True)
    assert output.returncode == 0, output.stderr
    report = json.loads(output.stdout)
    rounds = [entry["result"] for entry in report["runs"] if entry["test"] == "tunnels"]
    assert len(rounds) == 2
    for result in rounds:
        assert result["teardown_seconds"] is not None and result["settled"] is True
        probe = result["handshake_teardown"]
        assert probe["count"] >= 1 and probe["failed"] == 0 and probe["max_ms"] > 0
    [worst] = report["tunnels_worst"]
    assert worst["runs"] == 2 and worst["teardown_seconds"] == [
        result["teardown_seconds"] for result in rounds]
    assert worst["handshake_teardown"]["count"] == sum(
        result["handshake_teardown"]["count"] for result in rounds)


# =============================================================================================
# 4. --max-clients N: the next client gets 503 and a close; open tunnels go on
# =============================================================================================


@pytest.fixture
def limited_server(tmp_path, echo, procs):
    proc = start_server(tmp_path, echo.port, "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
                        "--idle-timeout", "300", "--max-clients", "3")
    procs.append(proc)
    yield proc
    server_is_healthy(proc)


def refused_with_503(port):
    data = exchange(port, UPGRADE, timeout=MARGIN)
    assert status_of(data) == 503, data[:300]
    assert b"close" in data.partition(b"\r\n\r\n")[0].lower(), data[:300]


def open_when_a_slot_frees(port, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return RawTunnel(port)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.timeout(90)
def test_max_clients_refuses_the_next_client_with_503(limited_server):
    port = limited_server.port
    tunnels = [RawTunnel(port) for _ in range(3)]
    for i, tunnel in enumerate(tunnels):
        tunnel.check(tag=10 + i)
    refused_with_503(port)
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda _: refused_with_503(port), range(5)))
    for i, tunnel in enumerate(tunnels):  # the open tunnels go on
        tunnel.check(tag=20 + i)

    # A freed slot is given to the next client, and the limit holds again after that.
    tunnels.pop(0).close()
    tunnels.append(open_when_a_slot_frees(port))
    refused_with_503(port)
    for i, tunnel in enumerate(tunnels):
        tunnel.check(tag=30 + i)
    for tunnel in tunnels:
        tunnel.close(abort=True)  # abrupt ends free their slots too
    tunnels = [open_when_a_slot_frees(port) for _ in range(3)]
    refused_with_503(port)
    for i, tunnel in enumerate(tunnels):
        tunnel.check(tag=40 + i)
        tunnel.close()


@pytest.mark.timeout(90)
@pytest.mark.slow  # waits out a 2 s handshake deadline
def test_max_clients_silent_connections_do_not_keep_slots(limited_server):
    """Whether or not connections still in their handshake count towards the limit, idle ones
    are dropped at the handshake deadline and must not keep good clients out after it."""
    port = limited_server.port
    silent = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(6)]
    try:
        # The server drops each at the handshake deadline (or refuses it at once).
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + MARGIN
        for sock in silent:
            _, ended = read_answer(sock, deadline)
            assert ended != "hung", "a silent connection outlived the handshake deadline"
        tunnels = [open_when_a_slot_frees(port, timeout=MARGIN) for _ in range(3)]
        refused_with_503(port)
        for i, tunnel in enumerate(tunnels):
            tunnel.check(tag=50 + i)
            tunnel.close()
    finally:
        for sock in silent:
            sock.close()


# =============================================================================================
# 5. A UDP flood into a tunnel whose TCP peer reads slowly
# =============================================================================================


class FloodingWireGuard(UdpEcho):
    """Stands in for WireGuard behind the server: echoes every datagram, remembers where each
    tunnel's datagrams come from (by a tag the test sends), and can flood one of them."""

    def __init__(self):
        super().__init__()
        self.sources = {}
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def record(self, data, source):
        if data.startswith(b"TAG:"):
            self.sources[data[4:]] = source

    def source(self, tag, timeout=5.0):
        deadline = time.monotonic() + timeout
        while tag not in self.sources:
            assert time.monotonic() < deadline, "no datagram tagged %r arrived" % tag
            time.sleep(0.01)
        return self.sources[tag]

    def flood(self, target, count, size, seconds):
        """Send `count` datagrams of `size` bytes to `target`, spread over about `seconds`."""
        payload = b"F" * size
        started = time.monotonic()
        sent = 0
        for i in range(count):
            try:
                self.sock.sendto(payload, target)
                sent += 1
            except (BlockingIOError, OSError):
                pass
            if i % 1000 == 999:
                ahead = started + seconds * (i + 1) / count - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing: the flood is spread over `seconds`
        return sent


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_udp_flood_into_a_slow_reader_keeps_rss_bounded_and_recovers(tmp_path, procs):
    """WireGuard floods a tunnel whose TCP client reads nothing for several seconds: the server's
    send to TCP blocks, the kernel drops datagrams on the tunnel's UDP socket (as UDP may), the
    server's RSS stays flat, another tunnel keeps working, and the flooded tunnel carries
    datagrams again once its reader catches up."""
    wireguard = FloodingWireGuard()
    server = start_server(tmp_path, wireguard.port, "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
                          "--idle-timeout", "300")
    procs.append(server)
    try:
        pid = server.popen.pid
        good = RawTunnel(server.port)
        good.check(tag=60)
        slow = RawTunnel(server.port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert slow.roundtrip(b"TAG:slow") == b"TAG:slow"
        target = wireguard.source(b"slow")
        before = proc_stats(pid)

        # Flood while the slow client reads nothing; meanwhile the good tunnel round-trips.
        rss_samples = []
        good_roundtrips = []
        stop = threading.Event()

        def watch():
            i = 0
            while not stop.is_set():
                rss_samples.append(proc_stats(pid)["rss_kib"])
                t0 = time.monotonic()
                datagram = numbered(1000 + i, 200)
                assert good.roundtrip(datagram, timeout=10) == datagram
                good_roundtrips.append(time.monotonic() - t0)
                i += 1
                stop.wait(0.2)  # pacing: a round trip every 0.2 s

        errors = []
        watcher = threading.Thread(target=_catch, args=(watch, errors), daemon=True)
        watcher.start()
        flood_started = time.monotonic()
        count, size = 60000, 1400
        roundtrips_before = len(good_roundtrips)
        sent = wireguard.flood(target, count=count, size=size, seconds=3.0)
        flood_seconds = time.monotonic() - flood_started
        # The reader stays away until the kernel drops datagrams on the flooded tunnel's UDP
        # socket (the server is blocked on the TCP send) and the good tunnel has round-tripped
        # meanwhile.
        wait_until(lambda: (udp_drops(target) > 0
                            and len(good_roundtrips) >= roundtrips_before + 3 or errors),
                   30, "datagrams dropped on the flooded tunnel's UDP socket")
        peak_during_stall = max(rss_samples) if rss_samples else proc_stats(pid)["rss_kib"]

        # The reader catches up: drain until quiet for a second.
        received = 0
        drain_started = time.monotonic()
        while time.monotonic() - drain_started < 30:
            try:
                datagram = slow.recv(timeout=1.0)
            except TimeoutError:
                break
            assert datagram == b"F" * size
            received += 1
        stop.set()
        watcher.join(15)
        assert not errors, errors

        # Recovery: datagrams flow again through the flooded tunnel.
        marker = b"after the flood"
        assert slow.roundtrip(marker, timeout=10) == marker
        good.check(tag=61)
        after = proc_stats(pid)
        peak = max(rss_samples + [after["rss_kib"]])
        print("\nflood: %d x %d B sent in %.1fs while the reader stalled ~4s; %d arrived "
              "(%.0f%% dropped); RSS before %d KiB, peak %d KiB (during stall %d), after %d KiB; "
              "threads %d -> %d, fds %d -> %d; good tunnel %d round trips, slowest %.3fs"
              % (sent, size, flood_seconds, received, 100.0 * (sent - received) / max(1, sent),
                 before["rss_kib"], peak, peak_during_stall, after["rss_kib"],
                 before["threads"], after["threads"], before["fds"], after["fds"],
                 len(good_roundtrips), max(good_roundtrips or [0])))
        assert received < sent, "nothing was dropped: the flood was not big enough to test"
        assert peak - before["rss_kib"] < 20 * 1024, (before, peak)
        assert good_roundtrips, "the good tunnel was not exercised during the flood"
        assert "tunnel down" not in server.log(), server.log()[-2000:]
        slow.close()
        good.close()
        server_is_healthy(server)
    finally:
        wireguard.close()


def _catch(function, errors):
    """Run `function`; record an exception in `errors` instead of losing it in a thread."""
    try:
        function()
    except BaseException as exc:  # noqa: B902 - reported by the test thread
        errors.append(exc)


@pytest.mark.slow
def test_one_way_traffic_keeps_a_tunnel_open(tmp_path, procs):
    """Keepalives from the client only (the server's WireGuard never answers them): data
    towards the peer counts, so the client does not reconnect every idle timeout."""
    sink_port = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((LOOPBACK, sink_port))
        sink.settimeout(5)
        server = start_server(tmp_path, sink_port, "--idle-timeout", "1.5")
        procs.append(server)
        client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port),
                              "--idle-timeout", "1")
        procs.append(client)
        for i in range(12):
            client.wireguard.send(b"keepalive %d" % i)
            assert sink.recvfrom(100)[0] == b"keepalive %d" % i
            time.sleep(0.25)  # pacing: a keepalive every 0.25 s, for 3 s > the idle timeouts
    assert "tunnel down" not in client.log() + server.log()
    client.wait_log("tunnel down", timeout=5)   # silence both ways: now it closes
    assert "(idle for 1s)" in client.log()


# =============================================================================================
# Behind real reverse proxies (Apache httpd, nginx, HAProxy, Squid, Caddy) and through an HTTP
# proxy with CONNECT (tinyproxy). Each front end runs in the foreground from a config rendered into
# tmp_path, on a 127.0.0.1 port, in a process group of its own: no system service, nothing in
# /etc. TLS ends at the front end; the client trusts the test CA with --ca-file:
#     WireGuardStandIn -> client --https--> front end --http--> server -> UdpEcho, and back.
# A test skips only when its proxy is not installed (CI installs them all).
# =============================================================================================

APACHE_MODULES = "/usr/lib/apache2/modules"

# Datagram sizes sent through every front end: tiny, WireGuard-sized, larger than a TLS record
# (16 KiB), and the largest UDP payload over IPv4.
SIZES = [1, 32, 148, 576, 1280, 1420, 4096, 16384, 20000, 65507]

# The front end's idle timeout in the idle tests: short, so the test is fast.
SHORT_TIMEOUT = 3
# The client's reconnect waits are 1, 2, 4, 8, 10 s, and a refused upgrade (503) waits 10 s:
# a datagram may wait that long for its tunnel.
RECONNECT_BOUND = 30

# =============================================================================================
# Front ends: a config template, rendered and run as a foreground process group of its own
# =============================================================================================


def render(template, values):
    """Replace every @NAME@ in `template` with values[NAME]; a placeholder left over is a bug."""
    text = template
    for name, value in values.items():
        text = text.replace("@%s@" % name, str(value))
    leftover = re.findall(r"@[A-Z_]+@", text)
    assert not leftover, "unfilled placeholders %s" % leftover
    return text


class FrontEnd:
    """A proxy program run in the foreground from a rendered config in `directory`.

    `port` is where it listens; `log()` returns its output plus every *.log file it wrote in
    its directory; `stop()` ends its whole process group (workers included).
    """

    def __init__(self, name, directory, argv, port, config_path, env=None):
        self.name = name
        self.directory = directory
        self.port = port
        self.config_path = config_path
        self.output_path = directory / "output.txt"
        self._output = open(self.output_path, "w")
        self.popen = subprocess.Popen(argv, cwd=str(directory), stdin=subprocess.DEVNULL,
                                      stdout=self._output, stderr=subprocess.STDOUT,
                                      start_new_session=True,
                                      env=dict(os.environ, **(env or {})))

    def log(self):
        parts = [self.output_path.read_text(errors="replace")]
        for path in sorted(self.directory.glob("*.log")):
            parts.append("--- %s\n%s" % (path.name, path.read_text(errors="replace")))
        return "\n".join(parts)

    def wait_listening(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("%s did not listen on %s:%d (exit %r); config %s:\n%s\nlog:\n%s"
                             % (self.name, LOOPBACK, self.port, self.popen.poll(),
                                self.config_path, self.config_path.read_text(), self.log()))

    def stop(self):
        """SIGTERM the process group, SIGKILL it if it lingers; safe to call twice."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader is gone; workers of the group may not be
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        self._output.close()


@pytest.fixture
def front_ends(procs):
    """Front ends to stop at teardown, whatever happened; tests append FrontEnd objects.

    The proxyguard processes go first: with their tunnels closed, Apache's workers stop at
    once instead of after Apache's own grace period."""
    started = []
    yield started
    for proc in procs:
        proc.kill()
    for front_end in started:
        front_end.stop()


@pytest.fixture
def echoes():
    """A factory of extra UdpEcho servers, all closed at teardown."""
    made = []

    def make():
        made.append(UdpEcho())
        return made[-1]

    yield make
    for server in made:
        server.close()


def require(kind):
    """The path of PROGRAMS[kind]'s program; skip the test if it (or a module) is missing."""
    program = PROGRAMS[kind]
    binary = which_or_skip(program["binary"], program["package"])
    for path in program.get("needs", ()):
        if not os.path.exists(path):
            skip_or_fail("%s is missing (apt-get install %s)" % (path, program["package"]))
    return binary


def start_front_end(front_ends, tmp_path, kind, values):
    """Render PROGRAMS[kind]'s template with `values` (plus DIR, PORT and user lines) into a
    directory of its own under tmp_path, start it, and wait until it listens."""
    program = PROGRAMS[kind]
    binary = require(kind)
    directory = tmp_path / ("%s-%d" % (kind, time.monotonic_ns()))
    directory.mkdir()
    os.chmod(directory, 0o755)  # workers that drop root to nobody write temp files here
    port = free_port()
    full = {"DIR": directory, "PORT": port, "LOOPBACK": LOOPBACK,
            "USER": program["user"] if os.geteuid() == 0 else ""}
    full.update(values)
    config_path = directory / program["config"]
    config_path.write_text(render(program["template"], full))
    argv = [binary] + [render(arg, {"CONF": config_path, "DIR": directory})
                       for arg in program["argv"]]
    env = {name: render(value, {"DIR": directory})
           for name, value in program.get("env", {}).items()}
    front_end = FrontEnd(kind, directory, argv, port, config_path, env)
    front_ends.append(front_end)
    front_end.wait_listening()
    return front_end


# --- Apache httpd 2.4 (>= 2.4.47 for upgrade= on mod_proxy_http) -------------------------------

APACHE_TEMPLATE = """\
# proxyguard behind Apache httpd: TLS here, plain HTTP to the proxyguard server.
ServerRoot "@DIR@"
ServerName localhost
PidFile "@DIR@/apache.pid"
DefaultRuntimeDir "@DIR@"
ErrorLog "@DIR@/apache-error.log"
LogLevel warn
@USER@
LoadModule mpm_event_module @MODULES@/mod_mpm_event.so
LoadModule authz_core_module @MODULES@/mod_authz_core.so
LoadModule proxy_module @MODULES@/mod_proxy.so
LoadModule proxy_http_module @MODULES@/mod_proxy_http.so
LoadModule ssl_module @MODULES@/mod_ssl.so
LoadModule socache_shmcb_module @MODULES@/mod_socache_shmcb.so
SSLSessionCache "shmcb:@DIR@/ssl_scache(512000)"
LogFormat "%h %t \\"%r\\" %>s %D" short
CustomLog "@DIR@/apache-access.log" short

# An upgraded (101) tunnel is closed after max(Timeout, ProxyTimeout) seconds without data
# either way: both must be short for a short idle timeout. Defaults: Timeout 60 (Debian's
# apache2.conf sets 300), ProxyTimeout = Timeout.
Timeout @TIMEOUT@
ProxyTimeout @TIMEOUT@

Listen @LOOPBACK@:@PORT@
<VirtualHost @LOOPBACK@:@PORT@>
    SSLEngine on
    SSLCertificateFile "@CERT@"
    SSLCertificateKeyFile "@KEY@"
    SSLProtocol -all +TLSv1.2 +TLSv1.3
    # mod_proxy_http (>= 2.4.47) tunnels an Upgrade only for the protocols named here
    # (UoTLV/1, or websocket: the others' Upgrade header is dropped on the way).
    # X-Forwarded-For is added by default (ProxyAddHeaders On).
    ProxyPass "/proxyguard" "http://@BACKEND@/proxyguard" upgrade=@UPGRADE@
</VirtualHost>
"""

# --- nginx -----------------------------------------------------------------------------------

NGINX_TEMPLATE = """\
# proxyguard behind nginx: TLS here, plain HTTP/1.1 with Upgrade to the proxyguard server.
daemon off;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/nginx-error.log info;
@USER@
events { worker_connections 256; }
http {
    access_log @DIR@/nginx-access.log;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;

    server {
        listen @LOOPBACK@:@PORT@ ssl;
        server_name localhost;
        ssl_certificate @CERT@;
        ssl_certificate_key @KEY@;
        # Debian 12's nginx 1.22 offers only TLS 1.2 unless TLSv1.3 is named here, and the
        # proxyguard client wants TLS 1.3 by default (--tls-min-version).
        ssl_protocols TLSv1.2 TLSv1.3;

        location /proxyguard {
            proxy_pass http://@BACKEND@;
            proxy_http_version 1.1;                  # HTTP/1.0 (the default) has no Upgrade
            proxy_set_header Upgrade $http_upgrade;  # hop-by-hop: nginx drops them otherwise
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # The upgraded tunnel closes after proxy_read_timeout without data (default 60s).
            proxy_read_timeout @TIMEOUT@s;
            proxy_send_timeout @TIMEOUT@s;
        }
    }
}
"""

# --- HAProxy ---------------------------------------------------------------------------------

HAPROXY_TEMPLATE = """\
# proxyguard behind HAProxy: TLS here, HTTP mode, one or more proxyguard servers.
global
    maxconn 256
    log stderr format short local0 info

defaults
    mode http
    log global
    option httplog
    option forwardfor               # X-Forwarded-For: the real client, for the server's log
    timeout connect 5s
    timeout client 30s              # before the upgrade
    timeout server 30s
    timeout tunnel @TIMEOUT@s       # after the 101: the tunnel's idle timeout
    timeout client-fin 5s
    timeout server-fin 5s

frontend https_in
    bind @LOOPBACK@:@PORT@ ssl crt @PEM@ alpn http/1.1 ssl-min-ver TLSv1.2
@RULES@
    default_backend proxyguard

backend proxyguard
    balance @BALANCE@
    option redispatch 1             # a refused connect goes to another server
    retries 3
@HEALTH_CHECK@
@SERVERS@
"""

# HAPROXY_TEMPLATE's defaults: tunnels are long-lived, so count them, not requests; and a
# check that any proxyguard server passes (without --health-path).
HAPROXY_LEASTCONN = "leastconn"
HAPROXY_CHECK_426 = """\
    # Health check: a plain GET of the path; a live proxyguard server answers 426.
    option httpchk
    http-check send meth GET uri /proxyguard ver HTTP/1.1 hdr Host localhost
    http-check expect status 426"""

# --- Squid 5 as a reverse proxy (accel mode), WebSocket only -----------------------------------

SQUID_TEMPLATE = """\
# proxyguard behind Squid as a reverse proxy: TLS here, plain HTTP to the proxyguard server.
https_port @LOOPBACK@:@PORT@ accel defaultsite=localhost tls-cert=@CERT@ tls-key=@KEY@
cache_peer @BACKEND_HOST@ parent @BACKEND_PORT@ 0 no-query no-digest originserver name=proxyguard
acl proxyguard_path urlpath_regex ^/proxyguard(/|$|\\?)
http_access allow proxyguard_path
http_access deny all
cache_peer_access proxyguard allow proxyguard_path
# Squid 5.1+ forwards an Upgrade only for the protocols allowed here; it drops the others'
# Upgrade header, so UoTLV/1 reaches the server as a plain GET (answered 426).
http_upgrade_request_protocols websocket allow all
cache deny all
cache_mem 0 MB
@USER@
pid_filename @DIR@/squid.pid
# Squid opens its logs after leaving root, and nobody cannot reach pytest's tmp_path (under
# /tmp/pytest-of-root, mode 0700): the log goes to stderr (-d 1), no access log.
cache_log /dev/null
access_log none
cache_store_log none
coredump_dir none
netdb_filename none
pinger_enable off
digest_generation off
shutdown_lifetime 1 seconds
# The upgraded tunnel closes after read_timeout without data from the server (default 15 min).
read_timeout @TIMEOUT@ seconds
"""

# --- Caddy 2.6 (Debian 12's) -------------------------------------------------------------------

CADDY_TEMPLATE = """\
# proxyguard behind Caddy: TLS here with our own certificate (no ACME), plain HTTP behind.
{
    admin off
    auto_https disable_redirects
    storage file_system @DIR@/storage
    # HTTP/3 would take a UDP port of the same number, maybe one a test uses.
    servers {
        protocols h1 h2
    }
}
https://localhost:@PORT@ {
    bind @LOOPBACK@
    tls @CERT@ @KEY@
    # reverse_proxy passes any Upgrade (WebSocket included) and adds X-Forwarded-For. An
    # upgraded tunnel has no idle timeout here (2.6 has no stream_timeout; 2.7 adds it).
    reverse_proxy /proxyguard* @BACKEND@
}
"""

# --- tinyproxy (an HTTP proxy with CONNECT, as in a corporate network) -------------------------

TINYPROXY_TEMPLATE = """\
Port @PORT@
Listen @LOOPBACK@
Timeout 600
MaxClients 50
LogLevel Info
Allow 127.0.0.1
DisableViaHeader Yes
@USER@
@AUTH@
"""

PROGRAMS = {
    "apache": dict(binary="apache2", package="apache2", config="apache.conf",
                   template=APACHE_TEMPLATE, argv=["-f", "@CONF@", "-DFOREGROUND"],
                   user="User nobody\nGroup nogroup",
                   needs=[os.path.join(APACHE_MODULES, "mod_proxy_http.so")]),
    "nginx": dict(binary="nginx", package="nginx", config="nginx.conf",
                  template=NGINX_TEMPLATE,
                  argv=["-p", "@DIR@", "-c", "@CONF@", "-e", "@DIR@/nginx-error.log"],
                  user="user nobody nogroup;"),
    "haproxy": dict(binary="haproxy", package="haproxy", config="haproxy.cfg",
                    template=HAPROXY_TEMPLATE, argv=["-db", "-f", "@CONF@"], user=""),
    "squid": dict(binary="squid", package="squid", config="squid.conf",
                  template=SQUID_TEMPLATE, argv=["-N", "-d", "1", "-f", "@CONF@"],
                  user="cache_effective_user nobody\ncache_effective_group nogroup"),
    "caddy": dict(binary="caddy", package="caddy", config="Caddyfile",
                  template=CADDY_TEMPLATE,
                  argv=["run", "--config", "@CONF@", "--adapter", "caddyfile"], user="",
                  # Caddy autosaves its config under $XDG_CONFIG_HOME (not in $HOME here).
                  env={"XDG_CONFIG_HOME": "@DIR@", "XDG_DATA_HOME": "@DIR@"}),
    "tinyproxy": dict(binary="tinyproxy", package="tinyproxy", config="tinyproxy.conf",
                      template=TINYPROXY_TEMPLATE, argv=["-d", "-c", "@CONF@"],
                      user="User nobody\nGroup nogroup"),
}

REVERSE_PROXIES = ["apache", "nginx", "haproxy"]


def start_reverse_proxy(front_ends, tmp_path, kind, certs, backend_ports, timeout=60,
                        settings=None):
    """Start Apache, nginx, HAProxy, Squid or Caddy with TLS on a new port, in front of the
    proxyguard servers on `backend_ports` (only HAProxy takes more than one), tunnels
    idle-closed at `timeout`; `settings` replace template values (a FRONTS variant's)."""
    values = {"CERT": certs.cert, "KEY": certs.key, "PEM": certs.pem, "TIMEOUT": timeout,
              "MODULES": APACHE_MODULES, "BACKEND": "%s:%d" % (LOOPBACK, backend_ports[0]),
              "BACKEND_HOST": LOOPBACK, "BACKEND_PORT": backend_ports[0],
              "UPGRADE": "UoTLV/1", "RULES": "", "BALANCE": HAPROXY_LEASTCONN,
              "HEALTH_CHECK": HAPROXY_CHECK_426,
              "SERVERS": "\n".join(
                  "    server pg%d %s:%d check inter 500ms fall 1 rise 1" % (i, LOOPBACK, port)
                  for i, port in enumerate(backend_ports, 1))}
    values.update(settings or {})
    if kind != "haproxy":
        assert len(backend_ports) == 1, "%s is set up with one backend here" % kind
    return start_front_end(front_ends, tmp_path, kind, values)


def start_tinyproxy(front_ends, tmp_path, auth=None):
    values = {"AUTH": "BasicAuth %s %s" % auth if auth else ""}
    return start_front_end(front_ends, tmp_path, "tinyproxy", values)


# =============================================================================================
# Clients and traffic
# =============================================================================================


def front_url(front_end, scheme="https"):
    return "%s://localhost:%d/proxyguard" % (scheme, front_end.port)


def burst(first, rounds, sizes):
    """The numbered datagrams exchange_datagrams sends: `sizes` `rounds` times, from `first`."""
    return [numbered(first + i, size) for i, size in enumerate(list(sizes) * rounds)]


def exchange_datagrams(client, first=0, rounds=2, timeout=RECONNECT_BOUND, sizes=SIZES):
    """Send `sizes` `rounds` times as one burst of numbered datagrams; assert every echo comes
    back byte-identical and in order. Returns the next unused number."""
    sent = burst(first, rounds, sizes)
    for datagram in sent:
        client.wireguard.send(datagram)
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(sent):
            got.append(client.wireguard.recv(max(0.1, deadline - time.monotonic())))
    except socket.timeout:
        pass
    summary = [(d[:4].hex(), len(d)) for d in got]
    assert len(got) == len(sent), ("%d of %d datagrams came back: %s\nclient log:\n%s"
                                   % (len(got), len(sent), summary, client.log()))
    for index, (want, have) in enumerate(zip(sent, got)):
        assert have == want, ("datagram %d: got #%s (%d bytes), want #%s (%d bytes)"
                              % (index, have[:4].hex(), len(have), want[:4].hex(), len(want)))
    return first + len(sent)


def ping(client, index, timeout=RECONNECT_BOUND):
    """One small numbered datagram there and back."""
    datagram = numbered(index, 100)
    client.wireguard.send(datagram)
    assert client.wireguard.recv(timeout) == datagram


def server_behind_proxy(kind, tmp_path, certs, echo, procs, front_ends, *server_args,
                        timeout=60, with_client=True, settings=None, scheme="https"):
    """A proxyguard server behind the reverse proxy `kind` (tunnel idle timeout `timeout`,
    template `settings`) and, unless `with_client` is false, a client through it to a
    `scheme` URL: (server, front_end, client or None)."""
    require(kind)
    server = start_server(tmp_path, echo.port, *server_args)
    procs.append(server)
    front_end = start_reverse_proxy(front_ends, tmp_path, kind, certs, [server.port],
                                    timeout=timeout, settings=settings)
    client = None
    if with_client:
        client = start_client(tmp_path, front_url(front_end, scheme), "--ca-file", certs.ca)
        procs.append(client)
    return server, front_end, client


def tunnel_up_lines(server):
    return [line for line in server.log().splitlines() if "tunnel up:" in line]


# =============================================================================================
# 1 + 3: through each reverse proxy; the server logs the real client from X-Forwarded-For
# =============================================================================================


@pytest.mark.parametrize("kind", REVERSE_PROXIES)
@pytest.mark.slow
def test_tunnel_through_reverse_proxy(kind, tmp_path, certs, echo, procs, front_ends):
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends)

    exchange_datagrams(client, rounds=3)

    client.wait_log("tunnel up")
    assert "TLSv1.3" in client.log(), "the client should speak TLS 1.3 to %s:\n%s" % (
        kind, client.log())
    # The TCP peer is the proxy on loopback (trusted by default); the client it names in
    # X-Forwarded-For is shown first.
    server.wait_log("tunnel up: 127.0.0.1 (via 127.0.0.1:")
    lines = tunnel_up_lines(server)
    assert len(lines) == 1, lines
    assert re.search(r"tunnel up: 127\.0\.0\.1 \(via 127\.0\.0\.1:\d+\), path /proxyguard",
                     lines[0]), lines


@pytest.mark.parametrize("kind", REVERSE_PROXIES)
@pytest.mark.slow
def test_no_forwarded_client_when_proxy_not_trusted(kind, tmp_path, certs, echo, procs,
                                                    front_ends):
    """--trusted-proxies '' : the X-Forwarded-For header is ignored, the peer is logged as is."""
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends, "--trusted-proxies", "")
    ping(client, 1)
    server.wait_log("tunnel up:")
    lines = tunnel_up_lines(server)
    assert "(via" not in lines[0] and re.search(r"tunnel up: 127\.0\.0\.1:\d+, path", lines[0])


def run_check(url, *extra, env=None):
    """`proxyguard.py check --to URL ...`: (exit status, output)."""
    result = run_cli("check", "--to", url, *extra, env=env, timeout=60)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("kind", REVERSE_PROXIES)
@pytest.mark.slow
def test_check_mode_through_reverse_proxy(kind, tmp_path, certs, echo, procs, front_ends):
    """`check` upgrades through the proxy; with the proxyguard server down it names the cause."""
    server, front_end, _ = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends, with_client=False)
    status, output = run_check(front_url(front_end), "--ca-file", certs.ca)
    assert status == 0 and "result   ok" in output and "TLSv1.3" in output, output
    server.stop()
    if kind == "haproxy":  # its health check marks the server down (inter 500ms, fall 1)
        wait_until(lambda: "Server proxyguard/pg1 is DOWN" in front_end.log(), 10,
                   "HAProxy marking the stopped server down")
    status, output = run_check(front_url(front_end), "--ca-file", certs.ca)
    assert status == 1, output
    assert re.search(r"\b50[234]\b", output) and "cannot reach" in output, output


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", REVERSE_PROXIES)
@pytest.mark.slow
def test_server_restart_behind_reverse_proxy(kind, tmp_path, certs, echo, procs, front_ends):
    """The proxyguard server behind the proxy restarts: the client's tunnel ends, its upgrades
    get 502/503 while the server is down, and traffic resumes once it is back; datagrams
    WireGuard sent during the outage wait in the client's UDP buffer and arrive."""
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends)
    following = exchange_datagrams(client, rounds=1)

    assert server.stop() == 0
    client.wait_log("tunnel down", timeout=20)
    outage = [numbered(following + i, 200) for i in range(10)]
    for datagram in outage:
        client.wireguard.send(datagram)
    client.wait_log("cannot reach", timeout=20)  # the proxy's 502/503, named in the log
    restarted = start_server(tmp_path, echo.port, port=server.port, name="server-again")
    procs.append(restarted)

    for datagram in outage:
        assert client.wireguard.recv(RECONNECT_BOUND) == datagram
    exchange_datagrams(client, first=following + len(outage), rounds=1)
    restarted.wait_log("tunnel up: 127.0.0.1 (via 127.0.0.1:")


# =============================================================================================
# 2: a tunnel idle past the proxy's timeout: the client reconnects, nothing sent after is lost
# =============================================================================================


@pytest.mark.parametrize("kind", REVERSE_PROXIES)
@pytest.mark.slow
def test_idle_past_proxy_timeout_reconnects_without_loss(kind, tmp_path, certs, echo, procs,
                                                         front_ends):
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends, timeout=SHORT_TIMEOUT)

    following = exchange_datagrams(client, rounds=1)
    started_idle = time.monotonic()
    # The proxy closes the idle tunnel, both ways: the client sees it end...
    client.wait_log("tunnel down", timeout=SHORT_TIMEOUT + 20)
    idle = time.monotonic() - started_idle
    assert idle >= SHORT_TIMEOUT - 0.5, "closed after %.1fs, before the proxy's timeout" % idle
    # ... and so does the server (no half-open tunnel left behind the proxy).
    server.wait_log("tunnel down", timeout=10)
    # The client has nothing to send yet, so no new tunnel: it reconnects on demand only.
    assert client.log().count("tunnel up") == 1, client.log()

    # Everything sent from now on arrives, in order: the client reconnects on demand.
    following = exchange_datagrams(client, first=following, rounds=2)
    client.wait_log("tunnel up", count=2)
    server.wait_log("tunnel up:", count=2)

    # And once more, to show the new tunnel also carries on after a second idle period.
    client.wait_log("tunnel down", timeout=SHORT_TIMEOUT + 20, count=2)
    exchange_datagrams(client, first=following, rounds=1)
    client.wait_log("tunnel up", count=3)


# The WebSocket keepalive test: nginx's proxy_read_timeout, the client's ping interval, and the
# quiet period, long enough for several front-end timeouts to pass (seconds).
KEEPALIVE_FRONT_TIMEOUT = 2
KEEPALIVE_INTERVAL = 1
KEEPALIVE_QUIET = 8


def quiet_period(client, seconds):
    """Send nothing for `seconds` (the deliberate wait of a test about time passing), watching
    the client's log all along: returns the seconds into the quiet period at which the client
    first logged "tunnel down", or None if it never did."""
    started = time.monotonic()
    cut_at = None
    while True:
        elapsed = time.monotonic() - started
        if cut_at is None and "tunnel down" in client.log():
            cut_at = elapsed
        if elapsed >= seconds:
            return cut_at
        time.sleep(min(0.05, seconds - elapsed))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keepalive", [KEEPALIVE_INTERVAL, 0], ids=["keepalive", "no-keepalive"])
@pytest.mark.slow
def test_websocket_keepalive_outlasts_the_front_read_timeout(keepalive, tmp_path, certs, echo,
                                                            procs, front_ends):
    """wss:// through nginx with proxy_read_timeout 2s, the tunnel quiet for 8 s. With pings
    every second it stays up: the next datagram goes through the same tunnel. With
    --keepalive 0 nginx cuts it at about 2 s, and the datagrams sent after the cut all arrive
    over a new tunnel. The proxyguard idle timeouts are 60 s: the front is what cuts."""
    server, front_end, _ = server_behind_proxy(
        "nginx", tmp_path, certs, echo, procs, front_ends, "--idle-timeout", "60",
        timeout=KEEPALIVE_FRONT_TIMEOUT, with_client=False)
    client = start_client(tmp_path, "wss://%s:%d/proxyguard" % (LOOPBACK, front_end.port),
                          "--ca-file", certs.ca, "--keepalive", str(keepalive),
                          "--idle-timeout", "60")
    procs.append(client)

    following = exchange_datagrams(client, rounds=1)
    client.wait_log("tunnel up")
    server.wait_log("tunnel up:")
    assert re.search(r"tunnel up: .*wss://.*, websocket \(proxyguard-uotlv\), TLSv1\.[23]",
                     client.log()), client.log()
    assert re.search(r"tunnel up: 127\.0\.0\.1 \(via 127\.0\.0\.1:\d+\), path /proxyguard, "
                     r"websocket", server.log()), server.log()

    cut_at = quiet_period(client, KEEPALIVE_QUIET)

    if keepalive:
        assert cut_at is None, "tunnel down %.1fs into the quiet period despite pings:\n%s" % (
            cut_at, client.log())
        assert "tunnel down" not in server.log(), server.log()
        # The next datagrams go through the same tunnel.
        exchange_datagrams(client, first=following, rounds=1)
        assert client.log().count("tunnel up") == 1, client.log()
        assert len(tunnel_up_lines(server)) == 1, server.log()
        assert "tunnel down" not in client.log() + server.log(), client.log() + server.log()
        assert "timed out" not in front_end.log(), front_end.log()
    else:
        assert cut_at is not None, "no tunnel down in %ds of quiet without pings:\n%s" % (
            KEEPALIVE_QUIET, client.log())
        # Cut by nginx at its proxy_read_timeout (seen by polling the log: a little later),
        # not by proxyguard's own 60 s idle timeout; nginx says so in its error log.
        assert KEEPALIVE_FRONT_TIMEOUT - 0.5 <= cut_at < KEEPALIVE_QUIET - 1, cut_at
        server.wait_log("tunnel down")
        assert "upstream timed out" in front_end.log(), front_end.log()
        # Nothing to send during the quiet period: no new tunnel yet (the client is lazy).
        assert client.log().count("tunnel up") == 1, client.log()
        # Everything sent after the cut arrives, in order, over a new tunnel.
        exchange_datagrams(client, first=following, rounds=2)
        client.wait_log("tunnel up", count=2)
        server.wait_log("tunnel up:", count=2)


# =============================================================================================
# 4: HAProxy in front of two proxyguard servers: spread, and fail over on SIGKILL
# =============================================================================================


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_haproxy_spreads_tunnels_and_fails_over(tmp_path, certs, echoes, procs, front_ends):
    require("haproxy")
    echo_a, echo_b = echoes(), echoes()
    server_a = start_server(tmp_path, echo_a.port, name="server-a")
    procs.append(server_a)
    server_b = start_server(tmp_path, echo_b.port, name="server-b")
    procs.append(server_b)
    front_end = start_reverse_proxy(front_ends, tmp_path, "haproxy", certs,
                                    [server_a.port, server_b.port], timeout=120)
    clients = []
    for i in range(4):
        client = start_client(tmp_path, front_url(front_end), "--ca-file", certs.ca,
                              name="client-%d" % i)
        procs.append(client)
        clients.append(client)

    # One at a time, so leastconn sees the tunnels already up; the echo that answers tells
    # which server carries each client.
    on_a, on_b = [], []
    for index, client in enumerate(clients):
        before = echo_a.count, echo_b.count
        ping(client, index)
        client.wait_log("tunnel up")
        if echo_a.count > before[0]:
            on_a.append(client)
        else:
            assert echo_b.count > before[1]
            on_b.append(client)
    assert on_a and on_b, "leastconn put all tunnels on one server: %d on A, %d on B" % (
        len(on_a), len(on_b))
    assert len(tunnel_up_lines(server_a)) == len(on_a)
    assert len(tunnel_up_lines(server_b)) == len(on_b)
    assert all("(via 127.0.0.1:" in line
               for line in tunnel_up_lines(server_a) + tunnel_up_lines(server_b))

    server_a.popen.send_signal(signal.SIGKILL)
    server_a.popen.wait(10)
    for client in on_a:  # HAProxy closes their side when the server's side resets
        client.wait_log("tunnel down", timeout=20)

    # Traffic resumes for every client; A's clients now go to B.
    before_b = echo_b.count
    for index, client in enumerate(clients):
        exchange_datagrams(client, first=100 + 100 * index, rounds=1, timeout=RECONNECT_BOUND + 15)
    assert echo_b.count - before_b == len(clients) * len(SIZES)
    server_b.wait_log("tunnel up:", count=len(clients), timeout=5)
    for client in on_a:
        client.wait_log("tunnel up", count=2, timeout=5)
    for client in on_b:  # their tunnels were never touched
        assert client.log().count("tunnel down") == 0, client.log()
    # HAProxy's health check notices on its own schedule, perhaps after the clients moved.
    wait_until(lambda: "Server proxyguard/pg1 is DOWN" in front_end.log(), 15,
               "HAProxy's health check marking pg1 DOWN")


# =============================================================================================
# WebSocket through real fronts, TLS at each. Some admit WebSocket upgrades only, as
# CDNs and cloud load balancers do: Apache with upgrade=websocket, Squid 5 as a reverse proxy
# (http_upgrade_request_protocols), HAProxy with a rule. There UoTLV/1 (https://) is refused
# and wss:// passes. nginx, Caddy and HAProxy as configured above pass any upgrade.
# =============================================================================================

HAPROXY_WEBSOCKET_ONLY = """\
    # WebSocket only: anything else (an UoTLV/1 upgrade, a plain GET) gets 403.
    http-request deny deny_status 403 unless { req.hdr(upgrade) -m str -i websocket }"""

# A front's name (the test id) -> (program, its template settings).
WEBSOCKET_ONLY_FRONTS = {
    "apache-upgrade-websocket": ("apache", {"UPGRADE": "websocket"}),
    "squid": ("squid", {}),
    "haproxy-websocket-only": ("haproxy", {"RULES": HAPROXY_WEBSOCKET_ONLY}),
}
WEBSOCKET_FRONTS = dict(WEBSOCKET_ONLY_FRONTS, nginx=("nginx", {}), caddy=("caddy", {}),
                        haproxy=("haproxy", {}))

# The issue's sizes: both lengths of a WebSocket frame header (7-bit up to 125, 16-bit above),
# a jumbo frame, and the largest UDP payload over IPv4.
WEBSOCKET_SIZES = [1, 100, 1420, 9000, 65507]


@pytest.fixture
def recording_echo():
    server = RecordingEcho()
    yield server
    server.close()


@pytest.mark.parametrize("front", list(WEBSOCKET_FRONTS))
@pytest.mark.slow
def test_websocket_through_front(front, tmp_path, certs, recording_echo, procs, front_ends):
    """wss:// through the front: each datagram reaches WireGuard behind the server
    byte-identical and in order, and so does its echo at the client's WireGuard; the server
    logs one WebSocket tunnel from the real client; `check` passes on the wss:// URL."""
    kind, settings = WEBSOCKET_FRONTS[front]
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, recording_echo, procs, front_ends, settings=settings,
        scheme="wss")

    following = exchange_datagrams(client, sizes=WEBSOCKET_SIZES)
    assert recording_echo.received == burst(0, 2, WEBSOCKET_SIZES)

    server.wait_log("tunnel up:")
    lines = tunnel_up_lines(server)
    assert len(lines) == 1 and "websocket" in lines[0].lower(), lines
    assert re.search(r"tunnel up: 127\.0\.0\.1 \(via 127\.0\.0\.1:\d+\)", lines[0]), lines
    assert "TLSv1.3" in client.log(), client.log()
    status, output = run_check(front_url(front_end, "wss"), "--ca-file", certs.ca)
    assert status == 0 and "result   ok" in output, output
    exchange_datagrams(client, first=following, rounds=1, sizes=WEBSOCKET_SIZES)


@pytest.mark.parametrize("front", list(WEBSOCKET_ONLY_FRONTS))
@pytest.mark.slow
def test_websocket_only_front_refuses_uotlv(front, tmp_path, certs, echo, procs, front_ends):
    """https:// (UoTLV/1) through a WebSocket-only front: the client's upgrade is refused (a
    403 from HAProxy's rule; Apache and Squid drop the Upgrade header, so the server answers
    the plain GET with 426) and no tunnel comes up; `check` fails and says to use wss://."""
    kind, settings = WEBSOCKET_ONLY_FRONTS[front]
    server, front_end, client = server_behind_proxy(
        kind, tmp_path, certs, echo, procs, front_ends, settings=settings)

    client.wireguard.send(numbered(0, 100))
    client.wait_log("instead of 101 Switching Protocols", timeout=20)
    assert "tunnel up" not in client.log() + server.log()
    # The server's 426 behind a front that dropped the Upgrade says what to do.
    assert ("a front in the way drops it (one that passes WebSocket only? use ws:// or wss://)"
            in client.log()) == (kind != "haproxy"), client.log()
    status, output = run_check(front_url(front_end), "--ca-file", certs.ca)
    assert status != 0 and "result   ok: " not in output, output
    assert ("ok over WebSocket: use --to wss://localhost:%d/proxyguard" % front_end.port
            in output), output


# =============================================================================================
# 5: an HTTP proxy with CONNECT (tinyproxy), as in a corporate network
# =============================================================================================


@pytest.mark.slow
def test_tinyproxy_connect_reaches_the_server(tmp_path, echo, procs, front_ends):
    """The test rig itself, without the client's --proxy: a raw CONNECT through tinyproxy
    reaches a plain proxyguard server and upgrades; BasicAuth tinyproxy answers 407."""
    require("tinyproxy")
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    for auth, want in ((None, b" 200 "), (("user", "secret"), b" 407 ")):
        proxy = start_tinyproxy(front_ends, tmp_path, auth)
        with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
            authority = "%s:%d" % (LOOPBACK, server.port)
            sock.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n"
                          % (authority, authority)).encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert want in answer.split(b"\r\n")[0], answer
            if auth is None:
                sock.sendall(b"GET /proxyguard HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                             b"Upgrade: UoTLV/1\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize("auth", [None, ("user", "s3cret.pw-1")], ids=["open", "basic-auth"])
@pytest.mark.slow
def test_client_through_connect_proxy(auth, tmp_path, certs, tls_server, procs, front_ends):
    proxy = start_tinyproxy(front_ends, tmp_path, auth)
    credentials = ""
    if auth:
        credentials = "%s:%s@" % (quote(auth[0], safe=""), quote(auth[1], safe=""))
    client = start_client(tmp_path, tls_server.url, "--ca-file", certs.ca,
                          "--proxy", "http://%s%s:%d" % (credentials, LOOPBACK, proxy.port))
    procs.append(client)
    exchange_datagrams(client, rounds=2)
    tls_server.wait_log("tunnel up:")
    assert re.search(r"CONNECT localhost:%d" % tls_server.port, proxy.log()), proxy.log()


def wait_for_pattern(proc, pattern, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not re.search(pattern, proc.log()):
        time.sleep(0.1)
    return proc.log()


@pytest.mark.parametrize("credentials,status", [("user:wrong@", "40[17]"), ("", "407")],
                         ids=["wrong-password", "no-credentials"])
@pytest.mark.slow
def test_client_proxy_auth_failure_is_a_clear_error(credentials, status, tmp_path, certs,
                                                    tls_server, procs, front_ends):
    """A refused proxy login names the proxy and the status. Debian 12's tinyproxy 1.11.1
    answers a wrong password with 401, not 407 (tinyproxy issue 532), no credentials with 407."""
    proxy = start_tinyproxy(front_ends, tmp_path, ("user", "right"))
    client = start_client(tmp_path, tls_server.url, "--ca-file", certs.ca,
                          "--proxy", "http://%s%s:%d" % (credentials, LOOPBACK, proxy.port))
    procs.append(client)
    client.wireguard.send(numbered(1, 100))
    text = wait_for_pattern(client, r"\b%s\b" % status)
    assert re.search(r"\b%s\b" % status, text), text
    failure = [line for line in text.splitlines() if re.search(r"\b%s\b" % status, line)][0]
    assert re.search(r"\bproxy\b", failure.replace("/proxyguard", ""), re.I), failure
    assert client.popen.poll() is None, "the client should keep trying, not exit"
    assert "tunnel up:" not in tls_server.log()


@pytest.mark.parametrize("scheme", ["https", "http", "wss", "ws"])
@pytest.mark.slow
def test_client_uses_proxy_from_environment(scheme, tmp_path, certs, echo, procs, front_ends):
    """HTTPS_PROXY for an https:// or wss:// server, HTTP_PROXY for an http:// or ws:// one
    (all with CONNECT)."""
    tls = scheme in ("https", "wss")
    extra = ["--tls-cert", certs.cert, "--tls-key", certs.key] if tls else []
    server = start_server(tmp_path, echo.port, *extra)
    procs.append(server)
    proxy = start_tinyproxy(front_ends, tmp_path)
    proxy_url = "http://%s:%d" % (LOOPBACK, proxy.port)
    name = "HTTPS_PROXY" if tls else "HTTP_PROXY"
    client = start_client(tmp_path, "%s://localhost:%d/proxyguard" % (scheme, server.port),
                          "--ca-file", certs.ca, env={name: proxy_url, name.lower(): proxy_url})
    procs.append(client)
    exchange_datagrams(client, rounds=1)
    assert "CONNECT localhost:%d" % server.port in proxy.log(), proxy.log()
    server.wait_log("tunnel up:")


def test_no_proxy_bypasses_the_environment_proxy(tmp_path, certs, tls_server, procs):
    dead = "http://%s:%d" % (LOOPBACK, free_port())  # nothing listens: using it would fail
    env = {"HTTPS_PROXY": dead, "https_proxy": dead,
           "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
    client = start_client(tmp_path, tls_server.url, "--ca-file", certs.ca, env=env)
    procs.append(client)
    exchange_datagrams(client, rounds=1)
    assert "via proxy" not in client.log(), client.log()


def test_proxy_none_ignores_the_environment_proxy(tmp_path, certs, tls_server, procs):
    dead = "http://%s:%d" % (LOOPBACK, free_port())
    client = start_client(tmp_path, tls_server.url, "--ca-file", certs.ca, "--proxy", "none",
                          env={"HTTPS_PROXY": dead, "https_proxy": dead})
    procs.append(client)
    exchange_datagrams(client, rounds=1)
    assert "via proxy" not in client.log(), client.log()


# --- A front that drops the Upgrade header, named with its fix -------------------------------
NGINX_DROPPING_UPGRADE = re.sub(r"\n *proxy_(http_version 1\.1|set_header (Upgrade|Connection))"
                                r"[^\n]*", "", NGINX_TEMPLATE)


@pytest.mark.slow
def test_nginx_without_the_upgrade_lines_is_named_with_the_fix(tmp_path, certs, echo, procs,
                                                              front_ends, monkeypatch):
    """Issue 17 item 3: nginx without proxy_http_version 1.1 and the Upgrade/Connection
    lines: check says the reverse proxy drops the Upgrade header, for both transports, and
    shows the fix; the wss:// client's log says so too, not 'the original'."""
    assert "proxy_set_header Upgrade" not in NGINX_DROPPING_UPGRADE
    monkeypatch.setitem(PROGRAMS["nginx"], "template", NGINX_DROPPING_UPGRADE)
    server, front_end, _ = server_behind_proxy("nginx", tmp_path, certs, echo, procs,
                                               front_ends, with_client=False)
    status, output = run_check(front_url(front_end), "--ca-file", certs.ca)
    assert status == 1
    assert ("result   FAIL: the reverse proxy drops the Upgrade header, for UoTLV/1 and "
            "WebSocket alike: make it pass it (nginx: proxy_http_version 1.1; proxy_set_header "
            "Upgrade $http_upgrade;") in output, output
    assert "original" not in output, output
    client = start_client(tmp_path, front_url(front_end, "wss"), "--ca-file", certs.ca)
    procs.append(client)
    client.wireguard.send(b"hello")
    client.wait_log("the reverse proxy drops the Upgrade header")
    assert "original" not in client.log()


# --- Health checks (--health-path), and HAProxy's --------------------------------------------
HEALTH_PATH = "/proxyguard-health"
# The check to give HAProxy in front of servers started with --health-path (README).
HAPROXY_CHECK_HEALTH = """\
    # Health check: --health-path answers 200, or 503 when --max-clients tunnels are open.
    option httpchk
    http-check send meth GET uri %s ver HTTP/1.1 hdr Host localhost
    http-check expect status 200""" % HEALTH_PATH


def test_health_path_answers_200_or_503_when_full_and_is_no_tunnel(echo, caplog):
    """In process: a GET of --health-path gets 200 with the open tunnels, 503 with
    Retry-After when --max-clients are open; not a refusal in the metrics, not logged above
    debug; other paths still take upgrades, and a plain GET elsewhere still gets 426."""
    server = pg.Server(None, (LOOPBACK, echo.port), idle_timeout=30, handshake_timeout=5,
                       max_clients=1, health_path=HEALTH_PATH)

    def answer(target, upgrade=False):
        request_bytes = (pg.build_upgrade_request("example", target) if upgrade else
                         ("GET %s HTTP/1.1\r\nHost: lb\r\n\r\n" % target).encode())
        return upgrade_socketpair(server, request_bytes)

    with caplog.at_level(logging.INFO):
        sock, thread, head = answer(HEALTH_PATH + "?from=haproxy")
        assert head.startswith(b"HTTP/1.1 200 "), head
        thread.join(5)
        sock, thread, head = answer("/elsewhere")
        assert head.startswith(b"HTTP/1.1 426 ")
        thread.join(5)
        tunnel_sock, tunnel_thread, head = answer("/pg", upgrade=True)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock, thread, head = answer(HEALTH_PATH)
        assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 10\r\n" in head, head
        thread.join(5)
    assert server.refused.get(503, 0) == 0 and server.tunnels_opened[pg.PROTOCOL] == 1
    assert not [r for r in caplog.records if HEALTH_PATH in r.getMessage()], caplog.text
    tunnel_sock.close()
    tunnel_thread.join(5)
    assert pg.health_answer(0, 0, stopping=True).startswith(b"HTTP/1.1 503 ")
    assert pg.health_answer(2, 0).endswith(b"\r\n\r\nok: 2 tunnels open\n")
    assert pg.health_answer(2, 2).endswith(b"\r\n\r\nfull: 2 tunnels open\n")


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_haproxy_health_checks_keep_healthy_servers_up_and_take_a_full_one_out(
        tmp_path, certs, echoes, procs, front_ends):
    """Two servers with --health-path behind HAProxy (round robin, HAPROXY_CHECK_HEALTH, a
    check every 500 ms, down after one failure): both stay UP through many checks; A, with
    --max-clients 1, goes DOWN while its one tunnel is open, so the next clients all land on
    B instead of on A's 503; A is UP again once its tunnel closes."""
    require("haproxy")
    echo_a, echo_b = echoes(), echoes()
    extra = ["--health-path", HEALTH_PATH, "--log-level", "debug"]
    server_a = start_server(tmp_path, echo_a.port, "--max-clients", "1", *extra, name="server-a")
    procs.append(server_a)
    server_b = start_server(tmp_path, echo_b.port, *extra, name="server-b")
    procs.append(server_b)
    front_end = start_reverse_proxy(
        front_ends, tmp_path, "haproxy", certs, [server_a.port, server_b.port], timeout=120,
        settings={"BALANCE": "roundrobin", "HEALTH_CHECK": HAPROXY_CHECK_HEALTH})
    checks = "GET %s HTTP/1.1" % HEALTH_PATH
    for server in (server_a, server_b):
        server.wait_log(checks, count=6, timeout=20)
    assert " is DOWN" not in front_end.log(), front_end.log()

    # Round robin: within two clients one lands on A and fills it.
    clients, on_a = [], None
    while on_a is None:
        assert len(clients) < 2, "round robin never chose A"
        client = start_client(tmp_path, front_url(front_end), "--ca-file", certs.ca,
                              name="client-%d" % len(clients))
        procs.append(client)
        clients.append(client)
        before = echo_a.count
        ping(client, len(clients))
        on_a = client if echo_a.count > before else None
    wait_until(lambda: "Server proxyguard/pg1 is DOWN" in front_end.log(), 15,
               "HAProxy taking the full server A out")
    assert "Server proxyguard/pg2 is DOWN" not in front_end.log(), front_end.log()
    before_a, before_b = echo_a.count, echo_b.count
    for index in range(3):
        client = start_client(tmp_path, front_url(front_end), "--ca-file", certs.ca,
                              name="client-new-%d" % index)
        procs.append(client)
        ping(client, 100 + index)
    assert (echo_a.count - before_a, echo_b.count - before_b) == (0, 3)
    assert "503" not in "".join(client.log() for client in clients[-3:])
    on_a.kill()  # its tunnel closes: A takes tunnels again
    wait_until(lambda: "Server proxyguard/pg1 is UP" in front_end.log(), 30,
               "HAProxy taking A back once its tunnel closed")
    assert "Server proxyguard/pg2 is DOWN" not in front_end.log(), front_end.log()


# =============================================================================================
# End to end with real WireGuard (wireguard-go) in two network namespaces, UDP between them
# blocked: see proxyguard_testbed.py. Needs root; CI runs these. Figures print as "wgbed:".
# =============================================================================================

IDLE = 5  # --idle-timeout on both proxyguard sides in the fault tests: keeps them fast

# Recovery bounds asserted by the fault tests, in seconds (from the end of the fault to the first
# ping answered through WireGuard). Each is the sum of the mechanisms that must act, with slack:
BOUND_PG_SERVER_RESTART = 10  # client back-off 1-2 s + WireGuard roaming on the next keepalive
BOUND_PG_CLIENT_RESTART = 10  # new client connects at the first datagram
BOUND_PATH_RESTORED = 30  # a SYN retry (1,3,7 s) or connect timeout 10 s + back-off <= 10 s
BOUND_WG_SERVER_RESTART = 30  # WireGuard re-handshakes 15 s after unanswered data (5+10 s)

# The restart-during-transfer tests: the fault comes once the receiver has FAULT_AT bytes, and
# the transfer must carry FAULT_AT more after it; the sender stops then (at most TRANSFER_CAP).
FAULT_AT = 4 << 20
TRANSFER_CAP = 1 << 30


def reporter(capsys, prefix):
    """A function that prints one measured figure to the terminal, past pytest's capture."""

    def write(text):
        with capsys.disabled():
            print("\n%s: %s" % (prefix, text))

    return write


@pytest.fixture
def report(capsys):
    return reporter(capsys, "wgbed")


def make_bed(tmp_path, request, bed_class=WireGuardBed, **options):
    reason = WireGuardBed.unavailable()
    if reason is not None:
        skip_or_fail("the WireGuard test bed cannot run here: %s" % reason)
    bed = bed_class(tmp_path / "bed", **options)
    try:
        bed.start()
    except BaseException:
        bed.close()
        raise
    request.addfinalizer(bed.close)
    return bed


@pytest.fixture
def bed(tmp_path, request):
    """The usual bed: default idle timeout, PersistentKeepalive 1 on the client only."""
    return make_bed(tmp_path, request)


@pytest.fixture
def fault_bed(tmp_path, request):
    """--idle-timeout 5 on both proxyguards; keepalive 1 s both ways, so a healthy but idle
    tunnel carries data from each side within the idle timeout (see the xfail test below)."""
    return make_bed(tmp_path, request, idle_timeout=IDLE, server_keepalive=1)


def assert_pings(bed, count=10):
    answer = bed.ping(count=count, interval=0.1, timeout=3)
    assert answer["received"] == count, "%s\n%s" % (answer, bed.diagnose())
    return answer


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


# =============================================================================================
# 1. Works: ping and a 50 MB bulk transfer
# =============================================================================================


@pytest.mark.slow
def test_ping_and_50mb_bulk_transfer(bed, report):
    answer = assert_pings(bed, count=20)
    report("ping through WireGuard+proxyguard: 20/20 answered, rtt median %.2f ms, max %.2f ms"
           % (median(answer["rtt_ms"]), max(answer["rtt_ms"])))
    nbytes = 50 << 20
    result = bed.transfer(nbytes=nbytes, timeout=120)
    assert result["sha_ok"], "%s\n%s" % (result, bed.diagnose())
    assert result["received"]["bytes"] == nbytes
    report("50 MiB over TCP inside WireGuard: SHA-256 equal, %.1f Mbit/s (%.2f s)"
           % (result["mbit_s"], result["received"]["seconds"]))
    # The proxyguard tunnel was not torn down by the load.
    assert bed.tunnels_up("client") == 1, bed.log_text("pg-client")
    assert_pings(bed, count=5)
    client_tx = bed.wg_transfer("client")[1]
    server_rx = bed.wg_transfer("server")[0]
    drops = {"client " + key: value for key, value in bed.udp_socket_drops("client").items()}
    drops.update(("server " + key, value) for key, value in bed.udp_socket_drops("server").items())
    # proxyguard itself loses nothing: stop the client cleanly and compare the two tunnel ends.
    assert bed.kill_pg_client(signal.SIGTERM) == 0, bed.log_text("pg-client")
    bed.wait_log("pg-server", "tunnel down")
    (client_end,), (server_end,) = bed.tunnel_summaries("client"), bed.tunnel_summaries("server")
    assert client_end["from_wg_datagrams"] == server_end["to_wg_datagrams"], (client_end,
                                                                             server_end)
    assert client_end["from_wg_bytes"] == server_end["to_wg_bytes"]
    report("  proxyguard carried %d datagrams client->server, none lost (both ends agree); "
           "WireGuard: client sent %d bytes, server decrypted %d (%.1f%% short); datagrams "
           "dropped by full UDP receive buffers, per socket: %s (WireGuard's own is "
           "0.0.0.0:%d)" % (client_end["from_wg_datagrams"], client_tx, server_rx,
                            100.0 * (client_tx - server_rx) / client_tx, drops, WG_PORT))


@pytest.fixture(params=["https", "wss"])
def nginx_bed(tmp_path, request):
    """The usual bed with nginx in front of the proxyguard server: TLS from the client to
    nginx on the server host's veth address, HTTP/1.1 Upgrade from nginx to 127.0.0.1. Once
    per transport: https:// (UoTLV/1) and wss:// (WebSocket); `bed.websocket` says which."""
    reason = WireGuardBed.unavailable(front_end="nginx")
    if reason is not None:
        skip_or_fail("the WireGuard test bed with nginx cannot run here: %s" % reason)
    return make_bed(tmp_path, request, front_end="nginx", websocket=request.param == "wss")


@pytest.mark.slow
def test_ping_and_50mb_bulk_transfer_behind_nginx_tls(nginx_bed, report):
    bed = nginx_bed
    scheme, transport = (("wss", "websocket (proxyguard-uotlv)") if bed.websocket else
                         ("https", "UoTLV/1"))
    answer = assert_pings(bed, count=20)
    report("behind nginx (TLS, %s://): ping through WireGuard+proxyguard: 20/20 answered, rtt "
           "median %.2f ms, max %.2f ms" % (scheme, median(answer["rtt_ms"]),
                                            max(answer["rtt_ms"])))
    nbytes = 50 << 20
    result = bed.transfer(nbytes=nbytes, timeout=120)
    assert result["sha_ok"], "%s\n%s" % (result, bed.diagnose())
    assert result["received"]["bytes"] == nbytes
    report("  50 MiB over TCP inside WireGuard, through nginx with TLS (%s://): SHA-256 equal, "
           "%.1f Mbit/s (%.2f s)" % (scheme, result["mbit_s"], result["received"]["seconds"]))
    # One tunnel, over TLS to nginx, in the transport asked for; the server trusts nginx
    # (127.0.0.1, the default --trusted-proxies) and logs the real client from X-Forwarded-For.
    assert bed.tunnels_up("client") == 1, bed.log_text("pg-client")
    client_log = bed.log_text("pg-client")
    assert re.search(r"tunnel up: .*%s://.*, %s, TLSv1\.[23]" % (scheme, re.escape(transport)),
                     client_log), client_log
    server_log = bed.log_text("pg-server")
    assert "(via " in server_log, server_log
    assert re.search(r"tunnel up: %s \(via 127\.0\.0\.1:\d+\), path /proxyguard, %s"
                     % (re.escape(VETH_CLIENT_IP), re.escape(transport)), server_log), server_log
    assert_pings(bed, count=5)


# =============================================================================================
# 2. Faults: each heals by itself, within a bound
# =============================================================================================


def restart_during_transfer(bed, report, side, bound, seed):
    """SIGKILL proxyguard's `side` ("server" or "client") in the middle of a TCP transfer inside
    WireGuard, start it again once WireGuard has sent into the gap: ping answers within `bound`
    seconds, and the transfer (the same TCP connection inside WireGuard) goes on and completes
    with the same SHA-256. The fault comes on progress (the receiver has FAULT_AT bytes), and
    the sender goes on until told to stop, after the fault: mid-transfer at any machine speed."""
    sink = bed.start_sink(timeout=120)
    source = bed.start_source(nbytes=TRANSFER_CAP, seed=seed, timeout=120, until_stopped=True)
    bed.wait_received(FAULT_AT, timeout=30, source=source)
    assert source.poll() is None, "the source ended before the fault"
    sent_by_wireguard = bed.wg_transfer("client")[1]
    getattr(bed, "kill_pg_" + side)(signal.SIGKILL)
    at_fault = bed.received()
    # WireGuard keeps sending meanwhile: wait until it has sent into the gap.
    wait_until(lambda: bed.wg_transfer("client")[1] > sent_by_wireguard, 10,
               "the client's WireGuard sending after the fault")
    t0 = time.monotonic()
    getattr(bed, "start_pg_" + side)()
    seconds = bed.wait_ping(timeout=bound + 10)
    total = time.monotonic() - t0
    assert seconds is not None, "no ping answer %ss after the restart\n%s" % (
        bound + 10, bed.diagnose())
    report("proxyguard %s SIGKILLed mid-transfer (at %.1f MiB received), restarted once "
           "WireGuard sent into the gap: ping answered %.2f s after the restart (bound %d s)"
           % (side, at_fault / 2**20, total, bound))
    assert total <= bound, bed.diagnose()
    # The same TCP connection carries data again after the fault; then the sender stops.
    bed.wait_received(at_fault + FAULT_AT, timeout=60, source=source)
    assert source.poll() is None, "the source ended by itself: raise TRANSFER_CAP"
    sent = bed.finish(source, 130)
    received = bed.finish(sink, 130)
    result = bed._result(sent, received)
    assert result["sha_ok"], "%s\n%s" % (result, bed.diagnose())
    report("  the transfer across the restart completed intact: %.1f MiB in %.1f s"
           % (received["bytes"] / 2**20, received["seconds"]))


@pytest.mark.slow
def test_pg_server_sigkill_during_transfer_recovers(fault_bed, report):
    restart_during_transfer(fault_bed, report, "server", BOUND_PG_SERVER_RESTART, seed=2)
    assert fault_bed.tunnels_up("client") >= 2


@pytest.mark.slow
def test_path_cut_longer_than_idle_timeout_recovers(fault_bed, report):
    bed = fault_bed
    assert_pings(bed, count=3)
    bed.cut_path()
    cut_at = time.monotonic()
    # Both sides notice and close their tunnel: on silence, or (both WireGuards keep sending
    # keepalives into the cut) on data the peer never acknowledged (TCP_USER_TIMEOUT). Nothing
    # crosses a cut, so "closed by peer" would be wrong: when one pump takes the kernel's
    # ETIMEDOUT and the other sees a plain end of stream, the tunnel still says "path down".
    for side in ("pg-client", "pg-server"):
        bed.wait_log(side, "tunnel down", timeout=IDLE + 10)
        # The client gives up sooner than its idle timeout: path_down_timeout, 2 s here.
        assert re.search(r"\((idle for %gs|path down: data unacknowledged for [\d.]+s)\)"
                         % IDLE, bed.log_text(side)), bed.log_text(side)
    assert "unacknowledged" in bed.log_text("pg-client") + bed.log_text("pg-server")
    # The client (WireGuard keeps sending) dials again: the path comes back while a connection
    # attempt of its own is lost in the cut.
    wait_until(lambda: bed.cut_syns() >= 1, 15, "the client reconnecting into the cut")
    cut_seconds = time.monotonic() - cut_at
    bed.restore_path()
    seconds = bed.wait_ping(timeout=BOUND_PATH_RESTORED + 15)
    assert seconds is not None, "no ping answer after the path came back\n" + bed.diagnose()
    report("path cut (TCP port dropped) for %.1f s > idle timeout %d s: both sides closed the "
           "tunnel; ping answered %.2f s after restore (bound %d s)"
           % (cut_seconds, IDLE, seconds, BOUND_PATH_RESTORED))
    assert seconds <= BOUND_PATH_RESTORED, bed.diagnose()
    assert_pings(bed, count=5)


@pytest.mark.slow
def test_wireguard_server_restart_recovers(fault_bed, report):
    bed = fault_bed
    assert_pings(bed, count=3)
    t_kill = time.monotonic()
    bed.restart_wireguard("server")
    restarted = time.monotonic()
    seconds = bed.wait_ping(timeout=BOUND_WG_SERVER_RESTART + 15)
    assert seconds is not None, "no ping answer after WireGuard restarted\n" + bed.diagnose()
    report("WireGuard server killed, started and reconfigured (%.2f s): ping answered %.2f s "
           "after (bound %d s; WireGuard's own re-handshake timer is 15 s)"
           % (restarted - t_kill, seconds, BOUND_WG_SERVER_RESTART))
    assert seconds <= BOUND_WG_SERVER_RESTART, bed.diagnose()
    assert_pings(bed, count=5)


@pytest.mark.slow
def test_pg_client_restart_while_wireguard_sends_recovers(fault_bed, report):
    restart_during_transfer(fault_bed, report, "client", BOUND_PG_CLIENT_RESTART, seed=3)


@pytest.mark.slow
def test_pg_server_down_longer_than_backoff_recovers(fault_bed, report):
    """The server is away longer than the first back-off waits (1, 2, 4 s): the client keeps
    trying, at most 10 s apart, and the tunnel comes back without any restart of WireGuard."""
    bed = fault_bed
    assert_pings(bed, count=3)
    bed.kill_pg_server(signal.SIGKILL)
    killed = time.monotonic()
    # Refused after the waits of 1, 2 and 4 s: the client's next wait is the 8 s one.
    bed.wait_log("pg-client", "next attempt in 8s", timeout=30)
    away = time.monotonic() - killed
    refused = bed.log_text("pg-client").count("cannot connect")
    t0 = time.monotonic()
    bed.start_pg_server()
    seconds = bed.wait_ping(timeout=25)
    assert seconds is not None, bed.diagnose()
    total = time.monotonic() - t0
    report("proxyguard server away %.1f s (%d refused connects meanwhile): ping answered %.2f s "
           "after its restart (bound 12 s: longest back-off 10 s)" % (away, refused, total))
    assert refused >= 2, bed.log_text("pg-client")
    assert total <= 12, bed.diagnose()


@pytest.mark.slow
def test_pg_server_sigterm_restart_recovers(fault_bed, report):
    """A clean stop (SIGTERM) and restart, as a service manager does on upgrade."""
    bed = fault_bed
    assert_pings(bed, count=3)
    assert bed.kill_pg_server(signal.SIGTERM) == 0, bed.log_text("pg-server")
    t0 = time.monotonic()
    bed.start_pg_server()
    seconds = bed.wait_ping(timeout=BOUND_PG_SERVER_RESTART + 10)
    assert seconds is not None, bed.diagnose()
    total = time.monotonic() - t0
    report("proxyguard server SIGTERM + restart: ping answered %.2f s after the restart"
           % total)
    assert total <= BOUND_PG_SERVER_RESTART, bed.diagnose()


# =============================================================================================
# 3. The bed as a measuring tool: WireGuard MTU vs throughput
# =============================================================================================


@pytest.mark.slow
def test_mtu_throughput_method(bed, report):
    figures = bed.measure_mtu((1280, 1420, 8920), seconds=2, runs=1)
    for mtu, values in figures.items():
        assert all(value > 1 for value in values), figures
    assert_pings(bed, count=3)  # the tunnel still works at the last MTU
    report("timed 2 s TCP through WireGuard: " + ", ".join(
        "MTU %d: %.1f Mbit/s" % (mtu, values[0]) for mtu, values in sorted(figures.items())))


# =============================================================================================
# An idle tunnel with keepalives one way only and a short idle timeout
# =============================================================================================


@pytest.mark.slow
def test_idle_one_way_keepalive_tunnel_stays_up(tmp_path, request, report):
    """Only the client's WireGuard sends keepalives (the usual setup). The original counts
    only data from the peer, so its client closes such a tunnel every idle timeout and opens
    a new one (a new source port for WireGuard each time). proxyguard.py counts data either
    way: one tunnel, no back-off, traffic answers at once."""
    bed = make_bed(tmp_path, request, idle_timeout=IDLE, client_keepalive=1,
                   server_keepalive=0)
    # WireGuard idle apart from the client's keepalives (one a second, 32 bytes each), until
    # the server's WireGuard has had enough of them to span two idle timeouts (or the tunnel
    # went down: then the asserts below say so).
    keepalives = 2 * IDLE + 2
    received = bed.wg_transfer("server")[0]
    idle_from = time.monotonic()
    wait_until(lambda: (bed.wg_transfer("server")[0] >= received + 32 * keepalives
                        or "tunnel down" in bed.log_text("pg-client")),
               4 * keepalives, "%d keepalives through the tunnel" % keepalives)
    idle = time.monotonic() - idle_from
    seconds = bed.wait_ping(timeout=20, interval=0.1)
    log = bed.log_text("pg-client")
    report("idle %.1f s, --idle-timeout %d, keepalive on the client only: %d tunnel(s) opened, "
           "first ping answered after %s s" % (idle, IDLE, bed.tunnels_up("client"),
                                               "%.2f" % seconds if seconds is not None
                                               else "never"))
    assert "next attempt in" not in log, log
    assert "tunnel down" not in log, log
    assert bed.tunnels_up("client") == 1, log
    assert seconds is not None and seconds < 2.0, bed.diagnose()


# =============================================================================================
# 4. A run killed by a time limit (SIGTERM) or by SIGKILL leaves no bed behind
# =============================================================================================

# A test file for an inner pytest run: the usual `bed` fixture, held up until SIGTERM comes.
HOLD_BED_TEST = """\
import json, os, sys, threading
sys.path.insert(0, {here!r})
from proxyguard_test import bed  # noqa: F401 (the fixture; the import installs the handler)


def test_hold_the_bed(bed):
    with open({out!r} + ".tmp", "w") as stream:
        json.dump({{"namespaces": [bed.ns_client, bed.ns_server],
                    "pids": [proc.pid for proc in bed.procs.values()]}}, stream)
    os.replace({out!r} + ".tmp", {out!r})
    threading.Event().wait(120)  # until the outer test's SIGTERM
"""

# A bed in a process of its own that prints what it made, then waits to be killed.
HOLD_BED_SCRIPT = """\
import json, sys
sys.path.insert(0, {here!r})
from proxyguard_testbed import WireGuardBed
bed = WireGuardBed({workdir!r})
bed.start()
print(json.dumps({{"namespaces": [bed.ns_client, bed.ns_server], "tag": bed.tag,
                   "pids": [proc.pid for proc in bed.procs.values()]}}), flush=True)
sys.stdin.read()  # until the outer test's SIGKILL
"""


def bed_or_skip():
    reason = WireGuardBed.unavailable()
    if reason is not None:
        skip_or_fail("the WireGuard test bed cannot run here: %s" % reason)


def process_alive(pid):
    return process_start_ticks(pid) is not None  # a zombie is dead


def namespaces_left(names):
    return [name for name in names if os.path.exists(os.path.join(NETNS_DIR, name))]


@pytest.mark.slow
def test_sigterm_to_pytest_takes_the_bed_down(tmp_path):
    """`timeout 150 pytest ...` sends SIGTERM: the fixtures' finalisers still run, so the bed's
    namespaces and processes go (without the handler, pytest dies at once and leaves them)."""
    bed_or_skip()
    out = str(tmp_path / "bed.json")
    test_file = tmp_path / "test_hold.py"
    test_file.write_text(HOLD_BED_TEST.format(here=HERE, out=out))
    log_path = tmp_path / "inner.log"
    with open(log_path, "w") as log:
        inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p",
                                  "no:cacheprovider", "--timeout", "150", "--basetemp",
                                  str(tmp_path / "inner"), str(test_file)],
                                 cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
    made = {"namespaces": []}
    try:
        wait_until(lambda: os.path.exists(out) or inner.poll() is not None, 45,
                   "the inner run's bed coming up")
        assert os.path.exists(out), log_path.read_text()
        with open(out) as stream:
            made = json.load(stream)
        assert namespaces_left(made["namespaces"]) == made["namespaces"]
        inner.send_signal(signal.SIGTERM)
        status = inner.wait(30)
        output = log_path.read_text()
        assert status == 128 + signal.SIGTERM, output
        assert "stopped by SIGTERM" in output, output
        assert namespaces_left(made["namespaces"]) == [], output
        assert [pid for pid in made["pids"] if process_alive(pid)] == [], output
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait(10)
        remove_stale_beds()  # the inner run is gone: whatever it left is stale now


@pytest.mark.slow
def test_sigkill_bed_processes_die_and_the_next_bed_removes_the_rest(tmp_path):
    """SIGKILL to the process that made a bed: its processes die with it (parent-death
    signal); the namespaces cannot go then, so the next bed start removes them (and the
    wireguard-go sockets), because the run that made them is gone."""
    bed_or_skip()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_BED_SCRIPT.format(
        here=HERE, workdir=str(tmp_path / "bed"))], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    made = {"namespaces": []}
    try:
        line = holder.stdout.readline()  # the bed is up (or the holder failed)
        assert line.startswith("{"), line + holder.stdout.read()
        made = json.loads(line)
        sockets = [os.path.join(WG_RUN_DIR, "wg%s%s.sock" % (side, made["tag"]))
                   for side in "cs"]
        assert all(os.path.exists(path) for path in sockets), sockets
        holder.kill()
        holder.wait(10)
        wait_until(lambda: not any(process_alive(pid) for pid in made["pids"]), 10,
                   "the bed's processes dying with the process that started them")
        assert namespaces_left(made["namespaces"]) == made["namespaces"]
        removed = remove_stale_beds()
        assert set(made["namespaces"]) <= set(removed), removed
        assert namespaces_left(made["namespaces"]) == []
        assert not any(os.path.exists(path) for path in sockets), sockets
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        remove_stale_beds()


def test_stale_bed_namespaces_are_removed_only_for_dead_runs():
    """Namespaces named for a run that is gone (a dead pid; a live pid started at another time:
    the pid was reused; the older name format with the pid modulo 100000) are removed with the
    processes left in them; the namespaces of live runs are not touched."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("needs root and iproute2 (network namespaces)")
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    dead = finished.pid  # reaped: no process has this pid now (barring reuse within the test)
    me, started = os.getpid(), process_start_ticks(os.getpid())
    live_residues = {int(entry) % 100000 for entry in os.listdir("/proc") if entry.isdigit()}
    old_dead = next(n for n in range(10000, 100000) if n not in live_residues)
    stale = ["pgbed-c%07d%02d-%d" % (dead, 99, 12345),
             "pgbed-s%07d%02d-%d" % (me, 97, started + 1),
             "pgbed-c%05d%02d" % (old_dead, 96)]
    live = ["pgbed-s%07d%02d-%d" % (me, 98, started), "pgbed-probe%d" % me]
    made, leftover = [], None
    wg_socket = os.path.join(WG_RUN_DIR, "wgc%07d%02d.sock" % (dead, 99))
    try:
        for name in stale + live:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True,
                           timeout=15)
            made.append(name)
        os.makedirs(WG_RUN_DIR, exist_ok=True)
        open(wg_socket, "w").close()  # stands in for a killed wireguard-go's socket
        leftover = subprocess.Popen(["ip", "netns", "exec", stale[0], "sleep", "infinity"])
        wait_until(lambda: str(leftover.pid) in subprocess.run(
            ["ip", "netns", "pids", stale[0]], capture_output=True, text=True).stdout, 10,
            "the leftover process entering its namespace")
        removed = remove_stale_beds()
        assert set(stale) <= set(removed) and not set(live) & set(removed), removed
        assert namespaces_left(stale) == [] and namespaces_left(live) == live
        assert leftover.wait(10) == -signal.SIGKILL
        assert not os.path.exists(wg_socket)
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait(10)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(wg_socket)


# --- HAProxy in front of two servers: a SIGKILL of the carrier, through WireGuard ------------
HA_BACKEND_PORTS = (8081, 8082)  # inside the bed's server namespace: fixed is fine there
HA_KILL_RUNS = 3
HA_GAP_BOUND = 3.0  # seconds without a ping answered through WireGuard, at most


class HAProxyBed(WireGuardBed):
    """The bed with two proxyguard servers for its one server WireGuard, on 127.0.0.1:8081
    and :8082 in the server namespace, behind HAProxy (HAPROXY_TEMPLATE: TLS at the veth
    address and NGINX_PORT, where the bed's client goes with front_end="nginx"; round robin;
    HAPROXY_CHECK_HEALTH). The servers' processes are pg-server-1 and pg-server-2."""

    def start_pg_server(self, wait=True):
        for index in range(len(HA_BACKEND_PORTS)):
            self.start_backend(index + 1, wait)

    def start_backend(self, number, wait=True):
        argv = [self.python, self.proxyguard, "server", "--listen",
                "127.0.0.1:%d" % HA_BACKEND_PORTS[number - 1], "--to", "127.0.0.1:%d" % WG_PORT,
                "--health-path", HEALTH_PATH] + self._pg_options()
        self._start_pg("pg-server-%d" % number, self.ns_server, argv, "listening on", wait)

    def start_front_end(self):
        directory = os.path.join(self.workdir, "haproxy")
        os.makedirs(directory, exist_ok=True)
        tls = os.path.join(self.workdir, "tls")
        pem = os.path.join(directory, "server.pem")  # certificate and key in one, for `crt`
        with open(pem, "w") as out:
            for name in ("server.pem", "server.key"):
                with open(os.path.join(tls, name)) as part:
                    out.write(part.read())
        conf = os.path.join(directory, "haproxy.cfg")
        with open(conf, "w") as stream:
            stream.write(render(HAPROXY_TEMPLATE, {
                "LOOPBACK": testbed.VETH_SERVER_IP, "PORT": testbed.NGINX_PORT, "PEM": pem,
                "TIMEOUT": 3600, "RULES": "", "BALANCE": "roundrobin",
                "HEALTH_CHECK": HAPROXY_CHECK_HEALTH,
                "SERVERS": "\n".join(
                    "    server pg%d 127.0.0.1:%d check inter 500ms fall 1 rise 1" % (i, port)
                    for i, port in enumerate(HA_BACKEND_PORTS, 1))}))
        self.spawn("haproxy", self.ns_server, [require("haproxy"), "-db", "-f", conf])
        deadline = time.monotonic() + 20
        while not self._listening():
            if time.monotonic() > deadline or self.procs["haproxy"].poll() is not None:
                raise testbed.BedError("HAProxy did not start:\n" + self.log_text("haproxy"))
            time.sleep(0.05)

    def _listening(self):
        sockets = self.sh("ss", "-Htln", "src", "%s:%d" % (testbed.VETH_SERVER_IP,
                                                          testbed.NGINX_PORT), ns=self.ns_server)
        return bool(sockets.strip())

    def kill_front_end(self, sig=signal.SIGKILL, timeout=5):
        return self.send_signal("haproxy", sig, timeout=timeout)

    def carrier(self):
        """The number of the running server whose log (since its start) has a tunnel up and
        not down, or None."""
        for number in range(1, len(HA_BACKEND_PORTS) + 1):
            if self.procs["pg-server-%d" % number].poll() is not None:
                continue
            text = self.log_text("pg-server-%d" % number).split("==== ")[-1]
            if text.count("tunnel up:") > text.count("tunnel down:"):
                return number
        return None


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_haproxy_two_servers_a_sigkill_of_the_carrier_costs_wireguard_at_most_3_s(
        tmp_path, request, report):
    """Two proxyguard servers for one WireGuard behind HAProxy, in the bed: pings through
    WireGuard every 50 ms; SIGKILL the server carrying the tunnel; the client's reconnect
    goes through HAProxy to the other (a refused connect is redispatched), WireGuard roams to
    that server's new UDP source, and the largest gap between answered pings stays within
    HA_GAP_BOUND. Several runs, the killed server started again in between; HAProxy marks
    only the killed one DOWN."""
    require("haproxy")
    bed = make_bed(tmp_path, request, bed_class=HAProxyBed, front_end="nginx")
    gaps = []
    tunnel_seen = time.monotonic()  # the tunnel is up (the bed pinged through it)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for run in range(HA_KILL_RUNS):
            # A tunnel that lived STABLE_TUNNEL_SECONDS is reconnected at once when it ends
            # (Backoff); a younger one waits its back-off (1, 2, 4 s ...) first. Tunnels in
            # service are old: let this one age (the time is the product's rule, not a race).
            time.sleep(max(0.0, tunnel_seen + pg.STABLE_TUNNEL_SECONDS + 0.5 - time.monotonic()))
            carrier = bed.carrier()
            assert carrier is not None, bed.diagnose()
            other = 3 - carrier
            ups_on_other = bed.log_text("pg-server-%d" % other).count("tunnel up:")
            received = bed.wg_transfer("server")[0]
            pinging = pool.submit(bed.ping, count=160, interval=0.05, timeout=3)
            # Kill once pings flow (the server's WireGuard received some), not after a sleep.
            wait_until(lambda: bed.wg_transfer("server")[0] >= received + 10 * 84, 20,
                       "pings reaching the server's WireGuard")
            bed.send_signal("pg-server-%d" % carrier, signal.SIGKILL)
            answer = pinging.result(60)
            gaps.append(answer["largest_gap_s"])
            assert answer["largest_gap_s"] <= HA_GAP_BOUND, "%s\n%s" % (answer, bed.diagnose())
            assert bed.carrier() == other
            tunnel_seen = time.monotonic()
            assert bed.log_text("pg-server-%d" % other).count("tunnel up:") == ups_on_other + 1
            wait_until(lambda: bed.log_text("haproxy").count(
                "Server proxyguard/pg%d is DOWN" % carrier) >= 1, 15, "HAProxy marking it DOWN")
            ups = bed.log_text("haproxy").count("Server proxyguard/pg%d is UP" % carrier)
            bed.start_backend(carrier)
            wait_until(lambda: bed.log_text("haproxy").count(
                "Server proxyguard/pg%d is UP" % carrier) > ups, 15, "HAProxy marking it UP")
    downs = re.findall(r"^\[WARNING\].*/(pg\d) is DOWN", bed.log_text("haproxy"), re.M)
    assert len(downs) == HA_KILL_RUNS, bed.log_text("haproxy")  # the killed ones, once each
    report("HAProxy, two servers, SIGKILL of the carrier: largest ping gap through WireGuard "
           "%s s (runs), bound %g s" % (", ".join("%.2f" % gap for gap in gaps), HA_GAP_BOUND))


# =============================================================================================
# Interoperation with the original: ProxyGuard 2.0.0 (Go), built here from its source in
# ../shared/reference/proxyguard-go-2.0.0 (read-only: the build goes to a temp dir). Real
# processes on loopback, either pairing, over plain HTTP, behind nginx terminating TLS, and
# (Go client only) to the py server's own TLS; the Go client trusts the test CA by SSL_CERT_FILE:
#     WireGuardStandIn -> py client ==> Go server -> UdpEcho, and back
#     WireGuardStandIn -> Go client ==> py server -> UdpEcho, and back
# The original's client loses 1-4 datagrams when it reconnects (a stale reader of the old
# tunnel still owns its UDP socket): where the Go client reconnects, a few lost datagrams are
# allowed; whatever arrives must be byte-identical and in order, and traffic after recovery
# must be complete.
# =============================================================================================

GO_SOURCE = os.path.join(HERE, "..", "shared", "reference", "proxyguard-go-2.0.0")
# (client, server, transport): plain HTTP; TLS ended by nginx in front of the server; the py
# server's own TLS (--tls-cert; the original's server has none).
INTEROP_CASES = [("py", "go", "plain"), ("py", "go", "nginx"),
                 ("go", "py", "plain"), ("go", "py", "nginx"), ("go", "py", "tls")]
INTEROP_IDS = ["%s-client-%s-server-%s" % case for case in INTEROP_CASES]
# Every pairing over plain HTTP is in the quick run (`-m "not slow"`); the rest is slow.
INTEROP_PARAMS = [pytest.param(case, id=name,
                               marks=() if case[2] == "plain" else pytest.mark.slow)
                  for case, name in zip(INTEROP_CASES, INTEROP_IDS)]
# The original's client waits 1, 2, 4 ... s after a failed tunnel before it reconnects.
INTEROP_RECOVERY_BOUND = 15.0
# Datagrams the original's client may lose on one reconnect (the spec saw 1-4).
GO_RECONNECT_LOSS = 4


@pytest.fixture(scope="session")
def go_binaries():
    """{"client": path, "server": path} of the original, built from GO_SOURCE offline by the
    benchmark's build_go (kept under the temp dir by a hash of the source and the toolchain, so
    a second session reuses them), writing nothing into the source tree."""
    which_or_skip("go", "golang-go")
    try:
        bindir, _ = build_go(GO_SOURCE)
    except NoReference as exc:
        skip_or_fail("the original cannot be built here: %s" % exc)
    binaries = {side: os.path.join(bindir, "proxyguard-" + side) for side in ("client", "server")}
    for path in binaries.values():
        assert os.access(path, os.X_OK), path
    return binaries


class GoProc(Proc):
    """A process of the original (argv: its binary and flags), otherwise a Proc: a log file to
    search, wait_log, kill. (The original does not handle SIGTERM: it dies at once.)"""

    def __init__(self, tmp_path, argv, ready, name, env=None):
        self.log_path = tmp_path / ("%s-%d.log" % (name, time.monotonic_ns()))
        self.log_file = open(self.log_path, "w")
        self.args = list(argv)
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                      stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        try:
            self.wait_log(ready)
        except BaseException:
            self.kill()
            raise


class RecordingEcho(UdpEcho):
    """A UdpEcho that keeps every datagram it got, in order: what the server sent WireGuard."""

    def __init__(self):
        self.received = []
        super().__init__()

    def record(self, data, source):
        super().record(data, source)
        self.received.append(data)


def start_interop_server(impl, tmp_path, go_binaries, wireguard_port, *extra, port=None,
                         name="server"):
    """A server of either implementation; `extra` options are for the py server only."""
    if impl == "py":
        return start_server(tmp_path, wireguard_port, *extra, port=port, name=name)
    assert not extra, extra
    port = port or free_port()
    proc = GoProc(tmp_path, [go_binaries["server"], "-listen", "%s:%d" % (LOOPBACK, port),
                             "-to", "%s:%d" % (LOOPBACK, wireguard_port)],
                  ready="listening on", name="go-" + name)
    proc.port = port
    return proc


def start_interop_client(impl, tmp_path, go_binaries, url, *extra, ca=None, wireguard=None,
                         listen_port=None, name="client"):
    """A client of either implementation in front of `wireguard` (a new WireGuardStandIn unless
    given: a restarted client keeps its WireGuard and its ports). `ca`: the CA to trust;
    `extra` options are for the py client only."""
    listen_port = listen_port or free_port(socket.SOCK_DGRAM)
    wireguard = wireguard or WireGuardStandIn()
    env = no_proxy_env()
    if impl == "py":
        proc = Proc(tmp_path, ["client", "--to", url, "--listen-port", str(listen_port),
                               "--forward-port", str(wireguard.port)]
                    + (["--ca-file", ca] if ca else []) + list(extra), name=name, env=env)
    else:
        assert not extra, extra
        if ca:
            env["SSL_CERT_FILE"] = ca  # Go's crypto/x509 reads its roots from here on Linux
        proc = GoProc(tmp_path, [go_binaries["client"], "-to", url,
                                 "-listen-port", str(listen_port),
                                 "-forward-port", str(wireguard.port),
                                 "-peer-ips", LOOPBACK],
                      ready="waiting for traffic", name="go-" + name, env=env)
    wireguard.endpoint = (LOOPBACK, listen_port)
    proc.wireguard = wireguard
    proc.listen_port = listen_port
    return proc


class InteropRig:
    """client -> [nginx with TLS] -> server -> RecordingEcho, of the given implementations
    ("py" or "go"); the server and the client can be restarted in place (same ports, same
    WireGuard)."""

    def __init__(self, case, tmp_path, go_binaries, procs, front_ends, certs, server_args=(),
                 client_args=()):
        self.client_impl, self.server_impl, self.transport = case
        self.tmp_path, self.go_binaries, self.procs = tmp_path, go_binaries, procs
        self.echo = RecordingEcho()
        self.server_args, self.client_args = list(server_args), list(client_args)
        if self.transport == "tls":
            assert self.server_impl == "py", "the original's server has no TLS of its own"
            self.server_args += ["--tls-cert", certs.cert, "--tls-key", certs.key]
        self.server = self._start_server()
        if self.transport == "tls":
            self.url, self.ca = "https://localhost:%d/proxyguard" % self.server.port, certs.ca
        elif self.transport == "nginx":
            require("nginx")
            self.front_end = start_reverse_proxy(front_ends, tmp_path, "nginx", certs,
                                                 [self.server.port])
            self.url, self.ca = front_url(self.front_end), certs.ca
        else:
            self.url, self.ca = "http://%s:%d/proxyguard" % (LOOPBACK, self.server.port), None
        self.client = self._start_client()
        self.traffic = Traffic(self.client.wireguard)

    def _start_server(self, port=None, name="server"):
        server = start_interop_server(self.server_impl, self.tmp_path, self.go_binaries,
                                      self.echo.port, *self.server_args, port=port, name=name)
        self.procs.append(server)
        return server

    def _start_client(self, old=None, name="client"):
        client = start_interop_client(
            self.client_impl, self.tmp_path, self.go_binaries, self.url, *self.client_args,
            ca=self.ca,
            wireguard=old and old.wireguard, listen_port=old and old.listen_port, name=name)
        self.procs.append(client)
        return client

    def restart(self, side):
        """SIGKILL the server or the client and start it again on the same ports; returns the
        monotonic time at which the new one is ready."""
        if side == "server":
            self.server.kill()
            self.server = self._start_server(port=self.server.port, name="server-again")
        else:
            self.client.kill()
            self.client = self._start_client(old=self.client, name="client-again")
        return time.monotonic()

    def logs(self):
        parts = ["%s %s log:\n%s" % (self.client_impl, "client", self.client.log()),
                 "%s %s log:\n%s" % (self.server_impl, "server", self.server.log())]
        if self.transport == "nginx":
            parts.append("nginx log:\n" + self.front_end.log())
        return "\n".join(parts)

    def close(self):
        self.traffic.close()
        self.echo.close()


@pytest.fixture
def interop_rig(tmp_path, go_binaries, procs, front_ends, certs):
    """make((client, server, transport), server_args=(), client_args=()) -> an InteropRig,
    closed at teardown."""
    made = []

    def make(case, **options):
        made.append(InteropRig(case, tmp_path, go_binaries, procs, front_ends, certs,
                               **options))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


class Traffic:
    """Numbered datagrams sent through a client's WireGuardStandIn, each tagged with a phase;
    a thread collects every reply. check() matches the replies against what was sent: each
    reply must be a datagram sent, byte for byte, in the order sent; the ones missing are lost
    and counted per phase."""

    def __init__(self, wireguard):
        self.wireguard = wireguard
        self.sent = []  # (phase, datagram), in send order
        self.got = []
        self.phase_of = {}
        self.replies = collections.Counter()  # phase -> replies seen
        self.changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        sock = self.wireguard.sock
        sock.settimeout(0.1)
        while not self._closed:
            try:
                data = sock.recvfrom(70000)[0]
            except socket.timeout:
                continue
            except OSError:
                return
            with self.changed:
                self.got.append(data)
                self.replies[self.phase_of.get(data)] += 1
                self.changed.notify_all()

    def close(self):
        self._closed = True
        self._thread.join(5)

    def send(self, phase, size):
        with self.changed:
            datagram = numbered(len(self.sent), size)
            self.sent.append((phase, datagram))
            self.phase_of[datagram] = phase
        self.wireguard.send(datagram)
        return datagram

    def wait(self, predicate, timeout):
        """Wait until predicate() holds (called with the lock held); False on timeout."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def windowed(self, phase, sizes, window=16, window_bytes=70000, timeout=20):
        """Send a datagram of each size with at most `window` datagrams and `window_bytes`
        unanswered (one bigger datagram alone), and wait for every reply: for a phase that
        must lose nothing. The bound in bytes matters: the original leaves its UDP receive
        buffers at the kernel's default (208 KiB here, three 64 KiB datagrams)."""
        first = self.replies[phase]
        for count, size in enumerate(sizes):
            def room():
                answered = self.replies[phase] - first
                waiting = sizes[answered:count]
                return not waiting or (len(waiting) < window
                                       and sum(waiting) + size <= window_bytes)
            assert self.wait(room, timeout), self.describe(phase)
            self.send(phase, size)
        assert self.wait(lambda: self.replies[phase] - first >= len(sizes), timeout), \
            self.describe(phase)

    def check(self):
        """{phase: [indices lost]}; fails unless every reply is a datagram sent, in order."""
        position = 0
        lost = collections.defaultdict(list)
        with self.changed:
            got, sent = list(self.got), list(self.sent)
        for number, reply in enumerate(got):
            start = position
            while position < len(sent) and sent[position][1] != reply:
                position += 1
            assert position < len(sent), (
                "reply %d (#%s, %d bytes) was not sent, or came out of order or twice"
                % (number, reply[:4].hex(), len(reply)))
            for index in range(start, position):
                lost[sent[index][0]].append(index)
            position += 1
        for index in range(position, len(sent)):
            lost[sent[index][0]].append(index)
        return dict(lost)

    def describe(self, phase):
        return "phase %s: %d sent, %d replies" % (
            phase, sum(1 for p, _ in self.sent if p == phase), self.replies[phase])


@pytest.fixture
def interop_report(capsys):
    return reporter(capsys, "interop")


def interop_sizes(seed=20251203, count=24):
    """Datagram sizes from 1 to 65507 (the largest UDP payload over IPv4): the edges of
    WireGuard's packets, of TLS records (16 KiB) and of the 2-byte length, then random ones."""
    rng = random.Random(seed)
    return ([1, 2, 3, 4, 32, 92, 148, 576, 1280, 1420, 1500, 4096, 16383, 16384, 16385, 20000,
             32768, 65000, 65506, 65507] + [rng.randint(1, 65507) for _ in range(count)])


def wireguard_sized(count, seed):
    """`count` sizes as WireGuard sends them: keepalives, handshakes, MTU-sized packets."""
    rng = random.Random(seed)
    return [rng.choice([32, 92, 148, 576, 1280, 1420]) for _ in range(count)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", INTEROP_PARAMS)
def test_original_interop_every_size_both_ways(case, interop_rig):
    """Every size from 1 to 65507 bytes, one at a time, then 1,000 WireGuard-sized datagrams
    16 in flight: byte-identical and in order at WireGuard behind the server (client to
    server) and at WireGuard in front of the client (server to client)."""
    rig = interop_rig(case)
    traffic = rig.traffic
    traffic.windowed("sizes", interop_sizes(), window=1)
    traffic.windowed("burst", wireguard_sized(1000, seed=1))
    assert traffic.check() == {}, rig.logs()
    sent = [datagram for _, datagram in traffic.sent]
    assert rig.echo.received == sent  # client -> server -> WireGuard
    assert traffic.got == sent        # WireGuard -> server -> client -> WireGuard
    assert len(rig.echo.sources) == 1
    # The TLS version, as our side logs it (the original's client accepts TLS 1.3 only).
    if rig.client_impl == "py" and rig.transport != "plain":
        rig.client.wait_log("TLSv1.3")
    elif rig.transport == "tls":
        rig.server.wait_log("TLSv1.3")


def restart_under_traffic(rig, side, report):
    """Traffic flows (a 148-byte datagram every 20 ms) while `side` is SIGKILLed and started
    again; returns (seconds from the restart to the first reply to a datagram sent after it,
    {phase: lost indices})."""
    traffic = rig.traffic
    traffic.windowed("warm-up", [148, 1420, 65507, 1420, 32])
    phase = ["during"]
    stop = threading.Event()

    def flow():
        while not stop.is_set():
            traffic.send(phase[0], 148)
            stop.wait(0.02)

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        # The fault comes on progress: once the tunnel has carried part of the flow.
        assert traffic.wait(lambda: traffic.replies["during"] >= 25, 20), rig.logs()
        ready = rig.restart(side)
        phase[0] = "after"
        recovered = traffic.wait(lambda: traffic.replies["after"] >= 1, INTEROP_RECOVERY_BOUND)
        seconds = time.monotonic() - ready
        assert recovered, "no reply %.1f s after the %s restart\n%s" % (seconds, side,
                                                                         rig.logs())
        # A little more flow after recovery, then a last check with every size.
        target = traffic.replies["after"] + 25
        assert traffic.wait(lambda: traffic.replies["after"] >= target, 20), rig.logs()
    finally:
        stop.set()
        flowing.join()
    traffic.windowed("recovered", interop_sizes(seed=5, count=8) + wireguard_sized(300, seed=2))
    lost = traffic.check()
    report("%s client, %s server, %s: %s restart: first reply after %.2f s; lost: %d sent "
           "before it was ready, %d sent after, 0 of %d after recovery"
           % (rig.client_impl, rig.server_impl, rig.transport, side, seconds,
              len(lost.get("during", ())), len(lost.get("after", ())),
              sum(1 for p, _ in traffic.sent if p == "recovered")))
    assert not lost.get("warm-up") and not lost.get("recovered"), (lost, rig.logs())
    return seconds, lost


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", INTEROP_CASES, ids=INTEROP_IDS)
def test_original_interop_server_restart_under_traffic(case, interop_rig,
                                                       interop_report):
    """SIGKILL the server (the Go one under a py client, the py one under a Go client) while
    WireGuard keeps sending, and start it again at once: traffic resumes on its own. The py
    client loses nothing sent after the new server listens; the Go client may lose a few
    datagrams as it reconnects (its stale reader), never more than GO_RECONNECT_LOSS."""
    rig = interop_rig(case)
    seconds, lost = restart_under_traffic(rig, "server", interop_report)
    after = lost.get("after", [])
    if rig.client_impl == "py":
        assert after == [], (lost, rig.logs())
    else:
        assert len(after) <= GO_RECONNECT_LOSS, (lost, rig.logs())
    assert len(rig.echo.sources) == 2  # a new tunnel, a new UDP socket towards WireGuard


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", INTEROP_CASES, ids=INTEROP_IDS)
def test_original_interop_client_restart_under_traffic(case, interop_rig,
                                                       interop_report):
    """SIGKILL the client while WireGuard keeps sending, start it again on the same ports:
    the server takes the new tunnel, and a fresh client of either implementation loses
    nothing sent after it is ready."""
    rig = interop_rig(case)
    seconds, lost = restart_under_traffic(rig, "client", interop_report)
    assert lost.get("after", []) == [], (lost, rig.logs())
    assert len(rig.echo.sources) == 2


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["plain", "nginx"])
def test_original_interop_check_mode_against_the_go_server(transport, interop_rig):
    """`proxyguard.py check` upgrades at the original's server, directly and through nginx."""
    rig = interop_rig(("py", "go", transport))
    status, output = run_check(rig.url, *(["--ca-file", rig.ca] if rig.ca else []))
    assert status == 0 and "result   ok" in output, output


@pytest.mark.slow
def test_websocket_against_the_original_fails_with_one_line_that_says_so(tmp_path, echo,
                                                                          go_binaries, procs):
    """The Go original speaks UoTLV/1 only: ws:// to it is refused with one line naming
    the cause and the fix, in check and in the client's log (once: then it backs off)."""
    server = start_interop_server("go", tmp_path, go_binaries, echo.port)
    procs.append(server)
    url = "ws://%s:%d/proxyguard" % (LOOPBACK, server.port)
    cause = "speaks UoTLV/1 only, not WebSocket (the original ProxyGuard?): use http:// or https://"
    status, output = run_check(url)
    assert status == 1 and cause in output, output
    client = start_client(tmp_path, url)
    procs.append(client)
    client.wireguard.send(b"hello")
    client.wait_log("next attempt in")
    lines = [line for line in client.log().splitlines() if cause in line]
    assert len(lines) == 1 and "upgrade refused by %s: got HTTP 426" % url in lines[0], \
        client.log()


@pytest.mark.slow
@pytest.mark.parametrize("case", [("py", "go", "plain"), ("go", "py", "plain")],
                         ids=["py-client-idle-closes", "py-server-idle-closes"])
def test_original_interop_our_idle_close_then_traffic_resumes(case, interop_rig,
                                                              interop_report):
    """Our side closes an idle tunnel (--idle-timeout 1); the next datagrams open a new one.
    Our client loses nothing; the original's client notices the close, waits its 2 s and may
    lose a datagram or two to its stale reader, then carries everything again."""
    idle = ["--idle-timeout", "1"]
    rig = interop_rig(case, **({"client_args": idle} if case[0] == "py" else
                               {"server_args": idle}))
    traffic = rig.traffic
    traffic.windowed("before", [148, 1420, 65507])
    ours = rig.client if rig.client_impl == "py" else rig.server
    ours.wait_log("tunnel down", timeout=10)
    if rig.client_impl == "py":
        traffic.windowed("after", wireguard_sized(100, seed=3))
        rig.client.wait_log("tunnel up", count=2)
    else:
        start = time.monotonic()
        while not traffic.wait(lambda: traffic.replies["probe"] >= 1, 0.1):
            assert time.monotonic() < start + INTEROP_RECOVERY_BOUND, rig.logs()
            traffic.send("probe", 148)
        seconds = time.monotonic() - start
        rig.server.wait_log("tunnel up", count=2)
        traffic.windowed("after", wireguard_sized(100, seed=3))
    lost = traffic.check()
    if rig.client_impl == "go":
        interop_report("go client after the py server's idle close: a datagram every 0.1 s "
                       "got its first reply after %.2f s; %d of %d lost"
                       % (seconds, len(lost.get("probe", [])), traffic.replies["probe"]
                          + len(lost.get("probe", []))))
    assert set(lost) <= {"probe"}, (lost, rig.logs())
    assert len(lost.get("probe", [])) <= GO_RECONNECT_LOSS, (lost, rig.logs())
    assert len(rig.echo.sources) == 2


# --- A drop-in for the original's packages: its flags, its program names, its units ----------
ORIGINAL_SYSTEMD = os.path.join(GO_SOURCE, "systemd")


@pytest.mark.parametrize("argv,want", [
    (["-listen", "127.0.0.1:1", "-to", "127.0.0.1:2"], ["--listen", "127.0.0.1:1", "--to",
                                                        "127.0.0.1:2"]),
    (["-to=http://x", "-listen-port=5", "-forward-port", "6", "-peer-ips", "::1",
      "-fwmark", "-1", "-tcp-port", "0"],
     ["--to=http://x", "--listen-port=5", "--forward-port", "6", "--peer-ips", "::1",
      "--fwmark", "-1", "--tcp-port", "0"]),
    (["-version"], ["--version"]), (["-version=true"], ["--version"]), (["-version=false"], []),
    (["--to", "x", "-c", "f", "-h", "-x", "--", "-to"], ["--to", "x", "-c", "f", "--help", "-x",
                                                         "--", "-to"]),
    (["-help"], ["--help"]), (["--h"], ["--help"]), (["-h=1"], ["--help"]),
    (["-help=false"], ["--help"]), (["--help"], ["--help"]), (["-hx"], ["-hx"]),
])
def test_the_originals_single_dash_flags_are_translated_to_ours(argv, want):
    assert pg.translate_original_flags(argv) == want


def test_the_originals_flags_work_and_stay_out_of_help():
    options = pg.parse_options(["-listen", "127.0.0.1:8", "-to=127.0.0.1:9"], {},
                               program="/usr/local/bin/proxyguard-server")
    assert (options.mode, options.listen, options.wireguard) == ("server", ("127.0.0.1", 8),
                                                          ("127.0.0.1", 9))
    options = pg.parse_options(["-to", "https://vpn.example.org/proxyguard/", "-listen-port",
                                "51821", "-forward-port=51820", "-peer-ips",
                                "192.0.2.5,2001:db8::5", "-fwmark", "54321", "-tcp-port", "7"],
                               {}, program="proxyguard-client")
    assert (options.mode, options.listen_port, options.forward_port, options.peer_ips,
            options.fwmark, options.tcp_port) == ("client", 51821, 51820,
                                                  ["192.0.2.5", "2001:db8::5"], 54321, 7)
    assert pg.parse_options(["check", "-to", "http://x"], {},
                            program="proxyguard-client").mode == "check"
    help_text = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True,
                               text=True, timeout=30).stdout
    assert not re.search(r"(^|[\s,\[])-(to|listen|fwmark|version)\b", help_text), help_text


@pytest.mark.parametrize("program,args,usage,mode", [
    ("proxyguard-client", ["-help"], "proxyguard-client [options]", "client"),
    ("proxyguard-server", ["-h"], "proxyguard-server [options]", "server"),
    ("proxyguard-client", ["check", "-help"], "proxyguard-client check [options]", "check"),
    ("proxyguard.py", ["server", "-help"], "proxyguard.py server [options]", "server"),
])
def test_the_originals_help_flag_shows_that_modes_help(tmp_path, program, args, usage, mode):
    """Go's flag package answers -help and -h with the usage, exit status 0: ours shows the
    help of the mode the program name (or the mode word) gives, that mode's options alone."""
    link = tmp_path / program
    link.symlink_to(SCRIPT)
    result = subprocess.run([sys.executable, str(link)] + args, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and not result.stderr, result
    assert result.stdout.startswith("usage: %s\n" % usage), result.stdout
    assert "\n%s: %s" % (mode, pg.MODE_DESCRIPTIONS[mode][:20]) in result.stdout
    shown, hidden = ("--max-clients", "--listen-port") if mode == "server" else (
        "--listen-port", "--max-clients")
    assert shown in result.stdout and hidden not in result.stdout, result.stdout


@pytest.mark.parametrize("program,args,words", [
    ("proxyguard-server", ["client", "-to", "http://x"],
     "proxyguard-server runs the server: mode 'client' contradicts its name"),
    ("proxyguard-client", ["--mode", "server"],
     "proxyguard-client runs the client: mode 'server' contradicts its name"),
    ("proxyguard-client", ["-c", "@CONFIG@"], "line 1: proxyguard-client runs the client: mode "
                                              "'server'"),
])
def test_a_mode_that_contradicts_the_program_name_is_refused(tmp_path, program, args, words):
    """Run as a link of that name to proxyguard.py (how a router without pip gets the
    original's names), so the program name reaches main from argv[0]."""
    (tmp_path / "server.conf").write_text("mode = server\n")
    link = tmp_path / program
    link.symlink_to(SCRIPT)
    args = [str(tmp_path / "server.conf") if arg == "@CONFIG@" else arg for arg in args]
    result = subprocess.run([sys.executable, str(link)] + args, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
    assert words in result.stderr, result.stderr


def original_unit(name):
    """(environment, ExecStart line) of the original's systemd/NAME.service: its Environment=
    values, replaced by the uncommented lines of systemd/NAME.sysconfig, as a package that
    adds EnvironmentFile=/etc/sysconfig/NAME gets them."""
    environment, exec_start, section = {}, None, None
    with open(os.path.join(ORIGINAL_SYSTEMD, name + ".service")) as unit:
        for line in unit:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line.startswith("Environment="):
                for item in shlex.split(line[len("Environment="):]):
                    key, _, value = item.partition("=")
                    environment[key] = value
            elif section == "[Service]" and line.startswith("ExecStart="):
                exec_start = line[len("ExecStart="):]
    with open(os.path.join(ORIGINAL_SYSTEMD, name + ".sysconfig")) as sysconfig:
        for line in sysconfig:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert key in environment, "%s.sysconfig sets %s, which the unit lacks" % (
                    name, key)
                environment[key] = value
    return environment, exec_start


def expand_exec_start(line, environment):
    """systemd's expansion of an ExecStart line: words split as the shell would, then each
    ${NAME} in a word replaced (one word, spaces and all; the units use no bare $NAME)."""
    return [re.sub(r"\$\{(\w+)\}", lambda found: environment[found.group(1)], word)
            for word in shlex.split(line)]


def on_loopback(environment, replacements):
    """The environment with each named value replaced (the key must be there: the original's
    files name it), for loopback addresses and free ports."""
    for key, value in replacements.items():
        assert key in environment, key
        environment[key] = value
    return environment


def run_original_units(tmp_path, procs, echo, program_command, env=None):
    """Start the original's server and client units' ExecStart lines, expanded and with
    loopback addresses, each program run by `program_command(name)`; carry datagrams
    WireGuard stand-in -> client -> server -> echo and back. Returns (server, client)."""
    environment, exec_start = original_unit("proxyguard-server")
    server_port = free_port()
    environment = on_loopback(environment, {"LISTEN": "127.0.0.1:%d" % server_port,
                                            "TO": "127.0.0.1:%d" % echo.port})
    argv = expand_exec_start(exec_start, environment)
    assert argv[0] == "proxyguard-server" and "-listen" in argv, argv
    server = Proc(tmp_path, argv[1:], name="original-server", env=env,
                  command=program_command(argv[0]))
    procs.append(server)

    wireguard = WireGuardStandIn()
    listen_port = free_port(socket.SOCK_DGRAM)
    environment, exec_start = original_unit("proxyguard-client")
    # The host stays: -peer-ips takes it to 127.0.0.1 without DNS, as in the original.
    environment = on_loopback(environment, {
        "LISTEN_PORT": str(listen_port), "FORWARD_PORT": str(wireguard.port),
        "TO": "http://vpn.example.org:%d/proxyguard/" % server_port, "PEER_IPS": "127.0.0.1",
        "FWMARK": environment["FWMARK"] if os.geteuid() == 0 else "-1"})
    argv = expand_exec_start(exec_start, environment)
    assert argv[0] == "proxyguard-client" and "-forward-port" in argv, argv
    full_env = no_proxy_env()
    full_env.update(env or {})
    client = Proc(tmp_path, argv[1:], name="original-client", env=full_env,
                  command=program_command(argv[0]))
    procs.append(client)
    wireguard.endpoint = (LOOPBACK, listen_port)
    client.wireguard = wireguard
    exchange_datagrams(client, rounds=2)
    assert "path /proxyguard/" in server.log(), server.log()
    return server, client


def test_the_originals_units_run_with_a_link_named_as_its_programs(tmp_path, procs, echo):
    """The ExecStart lines of the original's units run unchanged; each program is a link
    named proxyguard-server or proxyguard-client to proxyguard.py, which takes its mode from
    that name (argv[0])."""
    links = tmp_path / "bin"
    links.mkdir()

    def program_command(name):
        (links / name).symlink_to(SCRIPT)
        return [sys.executable, str(links / name)]

    run_original_units(tmp_path, procs, echo, program_command)


def test_the_originals_tcp_port_is_the_clients_tcp_source_port(tmp_path, procs, echo):
    """-tcp-port as in cmd/proxyguard-client: the source port of the client's TCP connection,
    which the server sees."""
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    link = tmp_path / "proxyguard-client"
    link.symlink_to(SCRIPT)
    wireguard = WireGuardStandIn()
    listen_port, source_port = free_port(socket.SOCK_DGRAM), free_port()
    client = Proc(tmp_path, ["-to", "http://127.0.0.1:%d/" % server.port, "-listen-port",
                             str(listen_port), "-forward-port=%d" % wireguard.port,
                             "-tcp-port", str(source_port)], env=no_proxy_env(),
                  command=[sys.executable, str(link)])
    procs.append(client)
    wireguard.endpoint = (LOOPBACK, listen_port)
    assert wireguard.roundtrip(b"from a fixed source port") == b"from a fixed source port"
    assert "tunnel up: 127.0.0.1:%d," % source_port in server.log(), server.log()


@pytest.fixture(scope="module")
def pipx_programs(tmp_path_factory):
    """`pipx install .` of this source into a temp PIPX_HOME and PIPX_BIN_DIR: the bin dir."""
    which_or_skip("pipx", "pipx")
    root = tmp_path_factory.mktemp("pipx-programs")
    source = root / "source"  # a copy: a build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("proxyguard.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(HERE, name), str(source))
    result = subprocess.run(["pipx", "install", str(source)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PIPX_HOME=str(root / "pipx"),
                                                  PIPX_BIN_DIR=str(root / "bin")))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "bin"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_originals_units_run_with_the_pipx_installed_programs(tmp_path, procs, echo,
                                                                  pipx_programs):
    """As a unit finds them: the ExecStart's program name looked up on a PATH that holds
    PIPX_BIN_DIR (systemd's holds /usr/local/bin), the original's binaries nowhere on it."""
    search_path = "%s:/usr/bin:/bin" % pipx_programs
    for name in ("proxyguard-client", "proxyguard-server", "proxyguard"):
        assert shutil.which(name, path=search_path) == str(pipx_programs / name)

    run_original_units(
        tmp_path, procs, echo, lambda name: [shutil.which(name, path=search_path)],
        env={"PATH": search_path})
    version = subprocess.run([str(pipx_programs / "proxyguard-server"), "-version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("proxyguard.py"), version


# =============================================================================================
# Messages: what a user sees in the first ten minutes and the operator in the first hour: where
# the server listens, a port taken, http:// to a TLS port, a full server, certificates,
# WireGuard not up, debug lines, journald, plurals, a stop during a connect, a peer's text
# escaped, routing loops
# =============================================================================================


class QuietListener:
    """A TCP socket bound to a wildcard address but never listening, so nothing is exposed
    beyond loopback: enough for the server's start line. accept() waits for stop()."""

    def __init__(self, family, host, v6only=None):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if v6only is not None:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        self.sock.bind((host, 0))
        self.closed = threading.Event()

    def getsockname(self):
        return self.sock.getsockname()

    def getsockopt(self, *args):
        return self.sock.getsockopt(*args)

    def accept(self):
        self.closed.wait(10)
        raise OSError(errno.EBADF, "closed")

    def shutdown(self, how):
        self.closed.set()

    def close(self):
        self.closed.set()
        self.sock.close()


@pytest.mark.parametrize("family, host, v6only, scope", [
    (socket.AF_INET, "0.0.0.0", None, " (http; all interfaces, IPv4 only), "),
    (socket.AF_INET6, "::", 0, " (http; all interfaces, IPv6 and IPv4), "),
    (socket.AF_INET6, "::", 1, " (http; all interfaces, IPv6 only), "),
    (socket.AF_INET, LOOPBACK, None, " (http), ")])
def test_start_line_says_which_interfaces_a_wildcard_takes(family, host, v6only, scope, caplog):
    """`--listen :23041` (an empty host is 0.0.0.0) binds every interface: the start line says
    so, and what [::] takes."""
    try:
        listener = QuietListener(family, host, v6only)
    except OSError as exc:
        pytest.skip("no %s here: %s" % (host, exc))
    server = pg.Server(listener, (LOOPBACK, 9))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with caplog.at_level(logging.INFO, logger="proxyguard"):
        thread.start()
        wait_until(lambda: "server listening on" in caplog.text, 5, "the start line")
        address = pg.format_address(listener.getsockname()[:2])
        server.stop()
        thread.join(5)
    assert "server listening on %s%sforwarding" % (address, scope) in caplog.text


def test_client_udp_port_taken_says_how_to_find_the_other_process():
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind((LOOPBACK, 0))
    port = taken.getsockname()[1]
    try:
        result = run_cli("client", "--to", "http://127.0.0.1:9/", "--listen-port", str(port))
    finally:
        taken.close()
    assert result.returncode == 1
    assert ("cannot listen on 127.0.0.1:%d (UDP): the port is taken by another process (find "
            "it with: ss -lunp 'sport = :%d')" % (port, port)) in result.stderr


def test_bind_errors_say_what_to_do():
    denied = PermissionError(errno.EACCES, "Permission denied")
    text = pg.describe_bind_error(denied, 443, "tcp")
    assert "CAP_NET_BIND_SERVICE" in text and "a port above 1023" in text
    assert pg.describe_bind_error(denied, 8443, "tcp") == "permission denied"
    with pytest.raises(pg.FatalError) as caught:  # TEST-NET-1: on no machine, nothing is sent
        pg.open_listener(("192.0.2.1", 0))
    assert str(caught.value) == ("cannot listen on 192.0.2.1:0: no interface of this machine "
                                 "has this address")


def run_with_journal_stream(*args):
    """Run proxyguard.py with stderr on a pipe that JOURNAL_STREAM names, as systemd does for
    the journal; return (exit status, stderr)."""
    read_end, write_end = os.pipe()
    status = os.fstat(write_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGUARD_")}
    env["JOURNAL_STREAM"] = "%d:%d" % (status.st_dev, status.st_ino)
    proc = subprocess.Popen([sys.executable, SCRIPT] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=write_end, env=env)
    os.close(write_end)
    with os.fdopen(read_end) as stream:
        err = stream.read()
    return proc.wait(20), err


def test_no_timestamp_of_our_own_in_the_journal(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    listen = "%s:%d" % (LOOPBACK, server.port)
    status, err = run_with_journal_stream("server", "--listen", listen)
    assert status == 1 and err.startswith("ERROR cannot listen on %s: " % listen), err
    result = run_cli("server", "--listen", listen)  # not the journal: a timestamp first
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR cannot listen", result.stderr)


def serve_answer(answer):
    """A one-connection server on loopback that reads the request head, sends `answer` and
    closes; returns its URL's host:port."""
    listener = socket.create_server((LOOPBACK, 0))

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                read_answer_head(conn)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return "%s:%d" % listener.getsockname()


NGINX_PLAIN_TO_HTTPS = (
    b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\n"
    b"Content-Length: 255\r\nConnection: close\r\n\r\n<html>\r\n<head><title>400 The plain "
    b"HTTP request was sent to HTTPS port</title></head>\r\n<body>\r\n<center><h1>400 Bad "
    b"Request</h1></center>\r\n<center>The plain HTTP request was sent to HTTPS port</center>"
    b"\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize("answer, error, text", [
    (b"", ConnectionError, "closed without an answer (0 bytes): is the server https://? "
                           "(use https:// in --to)"),
    (b"\x15\x03\x03\x00\x02\x02\x46", pg.UpgradeRefused,  # a TLS alert: protocol_version
     "the server answered in TLS, not HTTP: is the server https://? (use https:// in --to)"),
    (NGINX_PLAIN_TO_HTTPS, pg.UpgradeRefused,
     "got HTTP 400 Bad Request instead of 101 Switching Protocols: the port speaks HTTPS: is "
     "the server https://? (use https:// in --to)"),
], ids=["closed", "tls-alert", "nginx-400"])
def test_http_url_to_a_tls_port_says_use_https(answer, error, text):
    dialer = pg.Dialer(pg.ServerURL("http://%s/" % serve_answer(answer)))
    with pytest.raises(error) as caught:
        dialer.dial()
    assert pg.describe_error(caught.value) == text


def test_check_with_http_to_our_tls_server_says_use_https(tls_server):
    result = run_cli("check", "--to", "http://localhost:%d/x" % tls_server.port)
    assert result.returncode == 1
    assert ("result   FAIL: got HTTP 400 Bad Request instead of 101 Switching Protocols: the "
            "port speaks HTTPS: is the server https://? (use https:// in --to)") in result.stdout
    tls_server.wait_log("400 plain HTTP request sent to this HTTPS port: use https://")


def test_a_full_server_says_so_and_how_long_to_wait(echo):
    server = pg.Server.open((LOOPBACK, 0), (LOOPBACK, echo.port), max_clients=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        first = RawTunnel(server.address[1])
        dialer = pg.Dialer(pg.ServerURL("http://%s:%d/" % server.address))
        with pytest.raises(pg.ServerUnavailable) as caught:
            dialer.dial()
        first.close()
    finally:
        server.stop()
        thread.join(5)
    assert str(caught.value) == (
        "got HTTP 503 Service Unavailable instead of 101 Switching Protocols: the server says "
        "'the server is full (1 tunnel open); try again later'; it asks to retry after 10s")
    assert caught.value.retry_after == 10


@pytest.mark.parametrize("head, body, cause", [
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\n", b"no backend\n",
     "the reverse proxy cannot reach the proxyguard server behind it, or the server is full"),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n\r\n",
     b"<html><body>503</body></html>\n",
     "the reverse proxy cannot reach the proxyguard server behind it, or the server is full"),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", b"",
     "the reverse proxy cannot reach the proxyguard server behind it, or the server is full"),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n",
     b"down for maintenance until 10:00\n", "the server says 'down for maintenance until 10:00'"),
])
def test_unavailable_shows_the_servers_one_line_only(head, body, cause):
    with pytest.raises(pg.ServerUnavailable) as caught:
        pg.check_upgrade_response(pg.parse_response(head), body)
    assert str(caught.value).endswith("instead of 101 Switching Protocols: " + cause)


def test_certificate_errors_name_the_ca_file_and_the_names_held(tls_server, certs,
                                                               tmp_path_factory):
    other = make_certificates(tmp_path_factory.mktemp("other-ca"))
    url = "https://localhost:%d/" % tls_server.port
    result = run_cli("check", "--to", url, "--ca-file", other.ca)
    assert result.returncode == 1
    assert ("unable to get local issuer certificate (the certificate is not signed by a CA in "
            "--ca-file %s nor the system store)" % other.ca) in result.stdout
    assert "needs --ca-file" not in result.stdout
    result = run_cli("check", "--to", "https://wrong.example:%d/" % tls_server.port,
                     "--peer-ips", LOOPBACK, "--ca-file", certs.ca)
    assert result.returncode == 1
    assert ("Hostname mismatch, certificate is not valid for 'wrong.example'. (the URL's host "
            "is not in the certificate, which names: localhost, 127.0.0.1)") in result.stdout
    assert result.stdout.count("connect  ok") == 1  # the second look is no step of its own


def test_wireguard_not_listening_is_warned_once_per_outage(tmp_path, procs):
    """Nothing on --to: the server says so once per tunnel, not per datagram, and again once
    WireGuard answered and went away."""
    port = free_port(socket.SOCK_DGRAM)
    server = start_server(tmp_path, port)
    procs.append(server)
    warning = "nothing listens on 127.0.0.1:%d (--to): is WireGuard up?" % port
    tunnel = RawTunnel(server.port)
    for index in range(20):
        tunnel.send(numbered(index, 100))
    server.wait_log(warning)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:  # WireGuard comes up
        wireguard.bind((LOOPBACK, port))
        tunnel.send(b"up")
        wireguard.settimeout(5)
        # Some of the 20 may still be on their way when the port opens (seen in CI): skip them.
        for _ in range(21):
            data, source = wireguard.recvfrom(100)
            if data == b"up":
                break
        wireguard.sendto(data, source)
        assert tunnel.recv() == b"up"
    assert server.log().count(warning) == 1
    tunnel.send(b"down again")
    server.wait_log(warning, count=2)
    assert "WARNING tunnel 127.0.0.1:" in server.log()
    tunnel.close()


def test_client_warns_once_when_nothing_listens_on_forward_port(tunnel, echo):
    _, client = tunnel
    wireguard = client.wireguard
    assert wireguard.roundtrip(b"hello") == b"hello"
    forward_port = wireguard.port
    wireguard.sock.close()  # WireGuard goes away; the replies find nothing on --forward-port
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind((LOOPBACK, 0))
    sent = echo.count
    for index in range(20):
        other.sendto(numbered(index, 100), wireguard.endpoint)
    warning = ("nothing listens on 127.0.0.1:%d (--forward-port): is WireGuard up, with "
               "ListenPort = %d?" % (forward_port, forward_port))
    client.wait_log(warning)
    wait_until(lambda: echo.count == sent + 20, 5, "the 20 datagrams echoed")
    back = WireGuardStandIn.__new__(WireGuardStandIn)  # WireGuard back on its port
    back.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.sock.bind((LOOPBACK, forward_port))
    back.endpoint = wireguard.endpoint
    back.send(b"back")
    # Replies of the 20 still in flight when the port came back may arrive first.
    for _ in range(21):
        if back.recv() == b"back":
            break
    else:
        pytest.fail("b'back' did not come back after the 20 late replies")
    assert client.log().count(warning) == 1
    back.sock.close()
    other.close()


def test_debug_shows_each_step_heads_and_buffers(echo, caplog):
    with caplog.at_level(logging.DEBUG, logger="proxyguard"), \
            running_server(echo.port) as server, \
            running_client("http://%s:%d/pg" % server.address) as (_, wireguard):
        assert wireguard.roundtrip(b"x") == b"x"
        wait_until(lambda: caplog.text.count("socket buffers") == 2, 5, "both buffer lines")
    text = caplog.text
    assert "connecting to http://%s:%d/pg" % server.address in text
    assert re.search(r"connect ok in [\d.]+ ms: 127\.0\.0\.1:%d" % server.address[1], text)
    assert "upgrade request: GET /pg HTTP/1.1 | Host: 127.0.0.1:%d | User-Agent: " \
        % server.address[1] in text
    assert "upgrade response: HTTP/1.1 101 Switching Protocols | Connection: Upgrade" in text
    assert "request from 127.0.0.1:" in text
    assert re.search(r"socket buffers \(asked 4194304\): TCP receive \d+, send \d+; UDP "
                     r"receive \d+, send \d+", text)


def test_counts_are_singular_for_one():
    assert [pg.plural(n, "datagram") for n in (0, 1, 2)] == [
        "0 datagrams", "1 datagram", "2 datagrams"]
    ours, theirs = socket.socketpair()
    tunnel = pg.Tunnel(pg.PlainChannel(ours), None, "test", pg.IdleClock(0))
    tunnel.to_udp_datagrams, tunnel.to_udp_bytes = 1, 1
    tunnel.to_tcp_datagrams, tunnel.to_tcp_bytes, tunnel.oversized = 2, 1420, 1
    assert tunnel.summary().endswith("s, 1 datagram/1 byte to WireGuard, 2 datagrams/1420 "
                                     "bytes from WireGuard, 1 oversized frame dropped")
    ours.close()
    theirs.close()


def test_stop_during_a_connect_logs_no_warning(caplog):
    """SIGTERM while the client waits for the server's answer: stop() aborts the dial, which is
    no failure to warn about."""
    listener = socket.create_server((LOOPBACK, 0))
    accepted = threading.Event()
    held = []

    def silent_server():
        conn, _ = listener.accept()
        held.append(conn)
        accepted.set()

    threading.Thread(target=silent_server, daemon=True).start()
    with caplog.at_level(logging.DEBUG, logger="proxyguard"):
        with running_client("http://%s:%d/" % listener.getsockname()) as (_, wireguard):
            wireguard.send(b"handshake")
            assert accepted.wait(5)
    assert "ended by stop" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for sock in held + [listener]:
        sock.close()


# --- A peer's text shown escaped and bounded: a server's, a proxy's, a certificate's ---------
EVIL = "Forb\x1b[31mRED\x07\x1b]0;pwned\x07\rforged"
EVIL_SHOWN = "Forb\\x1b[31mRED\\x07\\x1b]0;pwned\\x07\\x0dforged"
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def serve_answers(answer, stop):
    """A server on loopback that answers each connection's request head with `answer` (bytes,
    or a function of the head that returns them) and closes, until `stop` is set; returns its
    host:port."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)

    def serve():
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                with conn:
                    try:
                        head = read_answer_head(conn)
                        if callable(answer):
                            conn.sendall(answer(head))
                            continue
                        conn.sendall(answer)
                        conn.shutdown(socket.SHUT_WR)  # then wait for the client's close,
                        conn.settimeout(5)  # so that it reads all before any reset
                        while conn.recv(4096):
                            pass
                    except OSError:
                        pass

    threading.Thread(target=serve, daemon=True).start()
    return "%s:%d" % listener.getsockname()


@pytest.fixture
def answers():
    stop = threading.Event()
    yield lambda answer: serve_answers(answer, stop)
    stop.set()


def assert_no_raw_controls(text):
    lines = text.split("\n")
    bad = [line for line in lines if RAW_CONTROLS.search(line)]
    assert not bad, "raw control characters reached the output: %r" % bad[:3]


def websocket_accepting_then_closing(head):
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", head).group(1).decode()
    return (("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: proxyguard-udp\r\n\r\n"
             % pg.websocket_accept(key)).encode()
            + pg.websocket_frame(pg.OP_CLOSE, pg.close_payload(1000, EVIL)))


PEER_TEXT_ROUTES = {
    # route: (scheme, answer, what check shows, what the client logs)
    "reason-phrase": ("http", ("HTTP/1.1 403 %s\r\nContent-Length: 0\r\n\r\n" % EVIL).encode(
        "latin-1"), "got HTTP 403 " + EVIL_SHOWN, "got HTTP 403 " + EVIL_SHOWN),
    "header-value": ("http", b"HTTP/1.1 302 Found\r\nLocation: http://x/\x9b31mRED\x9b0m\r\n"
                             b"X-Note: \xc2\x9b]0;pwned\r\nContent-Length: 0\r\n\r\n",
                     "x-note: \xc2\\x9b]0;pwned",
                     "redirects to http://x/\\x9b31mRED\\x9b0m"),
    "quoted-body": ("http", b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 14\r\n\r\nfull \xc2\x9b]0;pw\n",
                    "the server says 'full \\x9b]0;pw'", "the server says 'full \\x9b]0;pw'"),
    "websocket-close-reason": ("ws", websocket_accepting_then_closing, "result   ok",
                               "WebSocket close 1000 '%s'" % EVIL_SHOWN),
}


@pytest.mark.parametrize("route", sorted(PEER_TEXT_ROUTES))
def test_peer_text_is_shown_escaped_in_check_and_the_client_log(route, answers, tmp_path, procs):
    """Issue 17 item 1: a server's escape sequences (colours, the terminal's title, a forged
    line after a bare CR) reach neither check's output nor the client's log raw: they are
    shown escaped, on one line. One real socket server per route."""
    scheme, answer, in_check, in_log = PEER_TEXT_ROUTES[route]
    url = "%s://%s/pg" % (scheme, answers(answer))
    status, output = run_check(url, "--log-level", "debug")
    assert_no_raw_controls(output)
    assert in_check in output, output
    client = start_client(tmp_path, url, "--log-level", "debug")
    procs.append(client)
    client.wireguard.send(b"hello")
    wait_until(lambda: in_log in client.log(), 10, "the escaped text in the client's log")
    assert_no_raw_controls(client.log())


def test_a_proxys_answer_and_certificate_names_are_shown_escaped(answers, tmp_path, procs):
    """The proxy's answer to CONNECT (check and client), and a certificate's names."""
    proxy = answers(("HTTP/1.1 502 %s\r\nContent-Length: 0\r\n\r\n" % EVIL).encode("latin-1"))
    status, output = run_check("http://example.invalid/pg", "--proxy", "http://" + proxy)
    assert_no_raw_controls(output)
    assert "the HTTP proxy answered 502 %s to CONNECT" % EVIL_SHOWN in output, output
    cert = {"subject": ((("commonName", "vpn\x1b]0;pwned\x07"),),), "issuer": (),
            "subjectAltName": (("DNS", "a\x1b[2Jb"), ("IP Address", "127.0.0.1"))}
    assert pg.certificate_names(cert) == "a\\x1b[2Jb, 127.0.0.1"

    class Channel:
        tls_version = "TLSv1.3"

        def peer_certificate(self):
            return cert

    assert "subject commonName=vpn\\x1b]0;pwned\\x07" in pg.describe_tls(Channel())


def test_shown_escapes_bounds_and_keeps_printable_text():
    assert pg.shown("HTTP/1.1 403 " + EVIL) == "HTTP/1.1 403 " + EVIL_SHOWN
    assert pg.shown(b"a\\b\x9b\xe9") == "a\\\\b\\x9b\xe9"
    assert pg.shown("bidi \u202e and line \u2028 end") == "bidi \\u202e and line \\u2028 end"
    assert pg.shown("x" * 250) == "x" * 200 + "... (50 more)"
    assert pg.shown("x" * 250, 10) == "x" * 10 + "... (240 more)"


def test_server_logs_peer_text_escaped(tmp_path, echo, procs):
    """The server side: a header value with C1 controls (latin-1 bytes the parser lets
    through), a forwarded client and a long path are shown escaped and bounded."""
    server = start_server(tmp_path, echo.port, "--log-level", "debug")
    procs.append(server)
    for head in (b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: \x9b31mRED\x9b]0;pwned\r\n\r\n",
                 b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n"
                 b"X-Forwarded-For: \x9b31mevil\r\n\r\n"):
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
            sock.sendall(head)
            sock.recv(4096)
    server.wait_log("tunnel up: \\x9b31mevil (via")
    server.wait_log("got: '\\x9b31mRED\\x9b]0;pwned'")
    server.wait_log("a" * 150)
    assert_no_raw_controls(server.log())
    assert "a" * 2000 not in server.log()


# --- The routing loop without --fwmark, named with the fix -----------------------------------

def test_routing_loop_hint_only_for_a_route_into_a_tunnel(tmp_path):
    wireguard = tmp_path / "run"
    sys_net = tmp_path / "net"
    for name, uevent in (("wg0", "INTERFACE=wg0\nDEVTYPE=wireguard\n"), ("eth0", ""),
                         ("wgo", ""), ("tun0", "")):
        (sys_net / name).mkdir(parents=True)
        (sys_net / name / "uevent").write_text(uevent)
    wireguard.mkdir()
    (wireguard / "wgo.sock").write_text("")
    (sys_net / "tun0" / "tun_flags").write_text("0x1001\n")

    def kind(name):
        return pg.tunnel_interface_kind(name, str(sys_net), str(wireguard))

    assert [kind(name) for name in ("wg0", "eth0", "wgo", "tun0", "missing")] == [
        "a WireGuard interface", None, "a WireGuard interface", "a tunnel interface (a VPN?)",
        None]
    assert pg.routing_loop_hint("192.0.2.1", lambda ip: "eth0", kind) is None
    assert pg.routing_loop_hint("192.0.2.1", lambda ip: None, kind) is None
    assert pg.routing_loop_hint("192.0.2.1", lambda ip: "wg0", kind) == (
        "the route to 192.0.2.1 goes through wg0, a WireGuard interface: the tunnel's own "
        "connection would loop into the tunnel; add --fwmark 51820 (wg-quick's FwMark; or "
        "--peer-ips with a host route to the server outside the tunnel)")
    assert pg.route_interface("127.0.0.1") == "lo"


@pytest.fixture
def namespace_with_wireguard_default_route(tmp_path):
    """A network namespace of our own whose default route goes into a wireguard-go interface
    (no peer: what goes in is dropped), as a client machine with AllowedIPs = 0.0.0.0/0 and
    no --fwmark; yields (namespace, interface). Nothing leaves the namespace."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        skip_or_fail("needs root and /dev/net/tun (network namespace, wireguard-go)")
    which_or_skip("wireguard-go", "wireguard-go")
    tag = "%d%04x" % (os.getpid() % 10000, random.getrandbits(16))
    namespace, interface = "pg17loop-" + tag, "wgl" + tag
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    wireguard_go = None
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        log_file = open(tmp_path / "wireguard-go.log", "w")
        wireguard_go = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "wireguard-go", "-f", interface],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error"))
        sock_path = os.path.join(WG_RUN_DIR, interface + ".sock")
        wait_until(lambda: os.path.exists(sock_path), 10, "wireguard-go's socket")
        for command in (["addr", "add", "10.217.0.2/24", "dev", interface],
                        ["link", "set", interface, "up"],
                        ["route", "add", "default", "dev", interface]):
            subprocess.run(["ip", "-n", namespace] + command, check=True)
        yield namespace, interface
    finally:
        if wireguard_go is not None:
            wireguard_go.kill()
            wireguard_go.wait(10)
        subprocess.run(["ip", "netns", "del", namespace])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(WG_RUN_DIR, interface + ".sock"))


@pytest.mark.slow
def test_a_route_into_wireguard_without_fwmark_is_named_with_the_fix(
        namespace_with_wireguard_default_route, tmp_path, procs):
    """Issue 17 item 2: the server's address routes into the WireGuard interface (its default
    route): check and the client say so and name --fwmark 51820, instead of a bare timeout."""
    namespace, interface = namespace_with_wireguard_default_route
    in_namespace = ["ip", "netns", "exec", namespace]
    url = "http://192.0.2.80:40443/pg"  # TEST-NET-1, routed into the interface, dropped there
    hint = ("the route to 192.0.2.80 goes through %s, a WireGuard interface: the tunnel's own "
            "connection would loop into the tunnel; add --fwmark 51820" % interface)
    result = subprocess.run(in_namespace + [sys.executable, SCRIPT, "check", "--to", url,
                                            "--connect-timeout", "1"],
                            capture_output=True, text=True, timeout=30, env=dict(
                                os.environ, **no_proxy_env()))
    assert result.returncode == 1
    assert re.search(r"connect +FAIL .*timed out; " + re.escape(hint), result.stdout), \
        result.stdout + result.stderr
    listen_port = free_port(socket.SOCK_DGRAM)
    client = Proc(tmp_path, ["client", "--to", url, "--connect-timeout", "1", "--listen-port",
                             str(listen_port), "--forward-port", str(free_port(socket.SOCK_DGRAM))],
                  name="client", env=no_proxy_env(), prefix=in_namespace)
    procs.append(client)
    subprocess.run(in_namespace + [sys.executable, "-c", "import socket; socket.socket(socket."
                                   "AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', %d))"
                                   % listen_port], check=True, timeout=30)
    client.wait_log("WARNING " + hint)  # at start: WireGuard is up already
    client.wait_log(hint, timeout=15, count=2)
    assert "cannot connect to %s: 192.0.2.80:40443: timed out; %s" % (url, hint) in client.log()


# --- Smaller messages that lead to the fix ---------------------------------------------------

def test_a_dead_proxy_from_the_environment_is_named_with_its_variable(tmp_path, procs):
    dead = "%s:%d" % (LOOPBACK, free_port())
    status, output = run_check("https://localhost:%d/pg" % free_port(),
                               env={"HTTPS_PROXY": "http://" + dead,
                                    "https_proxy": "http://" + dead})
    assert status == 1
    assert ("result   FAIL: cannot reach the HTTP proxy http://%s (from HTTPS_PROXY): %s: "
            "connection refused; --proxy none ignores HTTPS_PROXY" % (dead, dead)) in output, output
    status, output = run_check("http://localhost:%d/pg" % free_port(), "--proxy",
                               "http://" + dead)
    assert "cannot reach the HTTP proxy http://%s (from --proxy): %s: connection refused\n" % (
        dead, dead) in output, output


@pytest.mark.parametrize("args, text", [
    (["check", "--to", "http://::1:40871/pg"],
     "--to 'http://::1:40871/pg': write an IPv6 address in brackets: http://[::1]:40871/pg"),
    (["check", "--to", "https://fd00::1:8080/"], "--to 'https://fd00::1:8080/': write an IPv6 "
     "address in brackets: https://[fd00::1]:8080/ or https://[fd00::1:8080]/"),
    (["client", "--to", "ws://::1/x"],
     "--to 'ws://::1/x': write an IPv6 address in brackets: ws://[::1]/x (see"),
])
def test_ipv6_url_without_brackets_says_write_brackets(args, text):
    result = run_cli(*args)
    assert result.returncode == 2 and text in result.stderr, result.stderr


def test_wss_to_a_plain_server_suggests_ws(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    status, output = run_check("wss://localhost:%d/pg" % server.port)
    assert status == 1
    assert "(not TLS: is the server plain ws://?)" in output, output
    status, output = run_check("https://localhost:%d/pg" % server.port)
    assert "(not TLS: is the server plain http://?)" in output, output


def test_a_dns_failure_points_at_peer_ips():
    status, output = run_check("http://no-such-host.invalid/pg")
    assert status == 1
    assert re.search(r"resolve +FAIL .*\(--peer-ips IP,IP gives the server's addresses "
                     r"without DNS\)", output), output


@pytest.mark.parametrize("section", ["[client]", "[server]", "  [proxyguard]  "])
def test_config_file_sections_are_refused(tmp_path, section):
    config = tmp_path / "proxyguard.conf"
    config.write_text("# shared file\n%s\nmode = client\nto = http://127.0.0.1:1/\n" % section)
    result = run_cli("-c", str(config))
    assert result.returncode == 2
    assert ("error: config file %s, line 2: %r: sections are not read: one file holds one "
            "mode's options" % (config, section.strip())) in result.stderr, result.stderr


def test_swapped_listen_and_forward_ports_are_named(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
        wireguard.bind((LOOPBACK, 0))  # WireGuard's ListenPort
        listen_port = wireguard.getsockname()[1]
        forward_port = free_port(socket.SOCK_DGRAM)  # nothing there
        result = run_cli("client", "--to", "http://127.0.0.1:1/", "--listen-port",
                         str(listen_port), "--forward-port", str(forward_port))
    assert result.returncode == 1
    assert ("if WireGuard listens there, --listen-port %d and --forward-port %d are swapped: "
            "--listen-port is the port WireGuard's Endpoint names, --forward-port its ListenPort"
            % (listen_port, forward_port)) in result.stderr, result.stderr


def test_a_misspelt_variable_names_the_option_it_likely_meant():
    settings, warnings = pg.environment_settings({"PROXYGUARD_LISTENPORT": "1"},
                                                 pg.settable_options(pg.build_parser()))
    assert warnings == ["PROXYGUARD_LISTENPORT is not an option's variable and is ignored "
                        "(did you mean PROXYGUARD_LISTEN_PORT, for --listen-port?)"]


def test_usage_line_says_the_name_the_program_was_started_by():
    assert pg.program_name("/root/.local/bin/proxyguard") == "proxyguard"
    assert pg.program_name("/opt/proxyguard.py") == "proxyguard.py"
    assert pg.program_name("/usr/bin/pytest") == "proxyguard.py"
    assert pg.build_parser().prog == pg.program_name()


def test_certificate_names_are_shown_escaped_in_check_and_the_client_log(tmp_path, echo, procs):
    """A certificate whose subject and subjectAltName hold escape sequences (openssl takes
    them): check's TLS step, the name-mismatch hint and the client's debug log show them
    escaped."""
    cert, key = tmp_path / "evil.pem", tmp_path / "evil.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=vpn\x1b]0;pwned\x07",
                    "-addext", "subjectAltName=DNS:a\x1b[2Jb,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    server = start_server(tmp_path, echo.port, "--tls-cert", str(cert), "--tls-key", str(key))
    procs.append(server)
    subject = "subject commonName=vpn\\x1b]0;pwned\\x07"
    status, output = run_check("https://127.0.0.1:%d/pg" % server.port, "--ca-file", str(cert))
    assert status == 0 and subject in output, output
    assert_no_raw_controls(output)
    status, output = run_check("https://localhost:%d/pg" % server.port, "--ca-file", str(cert))
    assert status == 1 and "which names: a\\x1b[2Jb, 127.0.0.1)" in output, output
    assert_no_raw_controls(output)
    client = start_client(tmp_path, "https://127.0.0.1:%d/pg" % server.port, "--ca-file",
                          str(cert), "--log-level", "debug")
    procs.append(client)
    assert client.wireguard.roundtrip(b"hello") == b"hello"
    client.wait_log(subject)
    assert_no_raw_controls(client.log())


# =============================================================================================
# systemd: Type=notify over NOTIFY_SOCKET, socket activation, the units, open-files limit;
# and the pip-installed command
# =============================================================================================


class NotifySocket:
    """The AF_UNIX datagram socket systemd listens on for sd_notify messages, bound by the
    test: a path in `directory`, or an abstract name (NOTIFY_SOCKET '@...')."""

    def __init__(self, directory=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if directory is None:
            name = "proxyguard-test-%d-%d" % (os.getpid(), time.monotonic_ns())
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(directory / "notify.sock")
            self.sock.bind(self.address)
        self.messages = []

    def receive(self, timeout=5.0):
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.messages.append(message)
        return message

    def wait_for(self, text, timeout=10.0):
        """Read messages until one holds the line `text`; return it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("%r not notified within %gs; got %r"
                                     % (text, timeout, self.messages))
            try:
                message = self.receive(remaining)
            except socket.timeout:
                continue
            if text in message.split("\n"):
                return message

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def test_systemd_notifier_decides_by_its_clock(notify_socket):
    now = [100.0]
    notifier = pg.SystemdNotifier(notify_socket.address, watchdog_usec=2000000,
                                  clock=lambda: now[0])
    assert notifier.address.startswith("\0")
    notifier.ready("0 tunnels open")
    assert notify_socket.receive() == "READY=1\nSTATUS=0 tunnels open"
    notifier.status("0 tunnels open")  # unchanged: nothing sent
    notifier.status("1 tunnel open")
    assert notify_socket.receive() == "STATUS=1 tunnel open"
    assert notifier.wait() == 0 and notifier.watchdog(lambda: True)  # the first at once
    assert notify_socket.receive() == "WATCHDOG=1"
    assert notifier.wait() == 1.0 and not notifier.watchdog(lambda: True)  # every 1 s (half)
    now[0] += 1.0
    assert not notifier.watchdog(lambda: False)  # unhealthy: no ping, asked again soon
    assert notifier.wait() == 1.0
    now[0] += 1.0
    assert notifier.watchdog(lambda: True)
    assert notify_socket.receive() == "WATCHDOG=1"
    notifier.stopping()
    assert notify_socket.receive() == "STOPPING=1\nSTATUS=stopping"
    notifier.status("0 tunnels open")
    assert notify_socket.receive() == "STATUS=0 tunnels open"
    with pytest.raises(socket.timeout):
        notify_socket.receive(0.05)  # nothing else went out


def test_systemd_notifier_from_the_environment(tmp_path):
    assert pg.SystemdNotifier.from_environment({}) is None
    path = str(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    notifier = pg.SystemdNotifier.from_environment(env, pid=42)
    assert notifier.address == path and notifier.interval == 15.0
    env["WATCHDOG_PID"] = "42"
    assert pg.SystemdNotifier.from_environment(env, pid=42).interval == 15.0
    env["WATCHDOG_PID"] = "41"  # the watchdog is another process's
    assert pg.SystemdNotifier.from_environment(env, pid=42).interval is None
    assert pg.SystemdNotifier.from_environment({"NOTIFY_SOCKET": path}).wait() is None
    notifier.send("READY=1")  # nobody listens there: no exception, one warning


def test_server_notifies_systemd(tmp_path, echo, procs):
    """A real server process, NOTIFY_SOCKET a path the test bound: READY=1 once listening,
    STATUS= as tunnels open and close, WATCHDOG=1 every half WATCHDOG_USEC, STOPPING=1."""
    notify = NotifySocket(tmp_path)
    port = free_port()
    server = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, port),
                             "--to", "%s:%d" % (LOOPBACK, echo.port)],
                  env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"},
                  wait=False, name="server")
    procs.append(server)
    try:
        assert notify.wait_for("READY=1") == "READY=1\nSTATUS=0 tunnels open"
        RawTunnel(port).close()  # READY came after the listen: no refused connection
        first = notify.wait_for("WATCHDOG=1")
        raw = RawTunnel(port)
        raw.check()
        notify.wait_for("STATUS=1 tunnel open")
        raw.close()
        notify.wait_for("STATUS=0 tunnels open")
        notify.wait_for("WATCHDOG=1", timeout=2)  # about every 0.1 s, not once only
        assert first
        server.popen.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        assert server.stop() == 0
        notify.wait_for("STOPPING=1")
    finally:
        notify.close()
    assert "cannot notify" not in server.log()


def test_client_notifies_systemd(tmp_path, echo, procs, notify_socket):
    """A real client process, NOTIFY_SOCKET an abstract name: READY=1 once its UDP socket is
    bound, STATUS= when its tunnel comes up, STOPPING=1."""
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    client = start_client(tmp_path, "http://%s:%d/pg" % (LOOPBACK, server.port),
                          env={"NOTIFY_SOCKET": notify_socket.address})
    procs.append(client)
    assert notify_socket.wait_for("READY=1").endswith("STATUS=no tunnel open to http://%s:%d/pg"
                                                      % (LOOPBACK, server.port))
    assert client.wireguard.roundtrip(b"hello") == b"hello"
    notify_socket.wait_for("STATUS=tunnel up to http://%s:%d/pg" % (LOOPBACK, server.port))
    assert client.stop() == 0
    notify_socket.wait_for("STOPPING=1")
    assert not any(m.startswith("WATCHDOG") for m in notify_socket.messages)  # none asked


def socket_activated_server(tmp_path, wireguard_port, *extra, listen=None, flags=()):
    """`systemd-socket-activate -l 127.0.0.1:PORT python3 proxyguard.py server ...`: the tool
    listens and, without --accept, starts the server with the listening socket (fd 3) on the
    first connection."""
    tool = which_or_skip("systemd-socket-activate", "systemd")
    port = free_port()
    listens = listen or ["%s:%d" % (LOOPBACK, port)]
    prefix = [tool] + list(flags) + [arg for address in listens for arg in ("-l", address)]
    proc = Proc(tmp_path, ["server", "--to", "%s:%d" % (LOOPBACK, wireguard_port)]
                + list(extra), prefix=prefix, ready="Listening on", name="activated")
    proc.port = port
    return proc


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_socket_activation_serves_tunnels(tmp_path, echo, procs, certs, tls):
    extra = ["--tls-cert", certs.cert, "--tls-key", certs.key] if tls else []
    server = socket_activated_server(tmp_path, echo.port, *extra)
    procs.append(server)
    client = start_client(tmp_path, "%s://%s:%d/pg" % ("https" if tls else "http",
                                                       "localhost" if tls else LOOPBACK,
                                                       server.port),
                          *(["--ca-file", certs.ca] if tls else []))
    procs.append(client)
    for i, size in enumerate([1, 1420, 8000]):
        assert client.wireguard.roundtrip(numbered(i, size)) == numbered(i, size)
    server.wait_log("listening socket %s:%d from systemd (LISTEN_FDS); --listen is not used"
                    % (LOOPBACK, server.port))
    server.wait_log("server listening on %s:%d (%s)" % (LOOPBACK, server.port,
                                                        "https" if tls else "http"))
    assert client.stop() == 0
    assert server.stop() == 0


@pytest.mark.parametrize("flags, listens, text", [
    (["--datagram"], 1, "is not a listening TCP socket (AF_INET SOCK_DGRAM, not listening)"),
    ([], 2, "LISTEN_FDS=2: systemd must pass exactly one listening socket"),
], ids=["udp", "two"])
def test_socket_activation_refuses_what_it_cannot_serve(tmp_path, echo, procs, flags, listens,
                                                        text):
    listen = ["%s:%d" % (LOOPBACK, free_port(socket.SOCK_DGRAM if flags else socket.SOCK_STREAM))
              for _ in range(listens)]
    server = socket_activated_server(tmp_path, echo.port, listen=listen, flags=flags)
    procs.append(server)
    # The tool starts the server on the first datagram or connection.
    host, port = listen[0].rsplit(":", 1)
    if flags:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.sendto(b"x", (host, int(port)))
    else:
        socket.create_connection((host, int(port)), timeout=5).close()
    assert server.popen.wait(20) == 1
    server.wait_log("ERROR ")
    assert text in server.log(), server.log()


def test_systemd_listener_only_for_this_process():
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "41"}
    assert pg.systemd_listener(environ, pid=42) is None  # another process's: left alone
    assert environ == {"LISTEN_FDS": "1", "LISTEN_PID": "41"}
    environ = {"LISTEN_FDS": "0", "LISTEN_PID": "42"}
    assert pg.systemd_listener(environ, pid=42) is None and environ == {}
    assert pg.systemd_listener({}) is None


def test_units_pass_systemd_analyze_verify(tmp_path):
    """The template (as instances server and test) and the socket unit, offline: verify
    loads the units from their directory and checks every setting and the ExecStart path."""
    analyze = which_or_skip("systemd-analyze", "systemd")
    for name in ("proxyguard@server.service", "proxyguard@test.service"):
        shutil.copy(os.path.join(HERE, "proxyguard@.service"), str(tmp_path / name))
    shutil.copy(os.path.join(HERE, "proxyguard-server.socket"), str(tmp_path))
    result = subprocess.run([analyze, "verify", "--man=no",
                             str(tmp_path / "proxyguard@test.service"),
                             str(tmp_path / "proxyguard-server.socket")],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    # Any word about our units fails (a container's systemd may add its own, unrelated ones).
    assert result.returncode == 0 and "proxyguard" not in result.stderr, result.stderr
    with open(os.path.join(HERE, "proxyguard@.service")) as unit:
        text = unit.read()
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
    limit = int(re.search(r"^LimitNOFILE=(\d+)$", text, re.M).group(1))
    assert pg.open_files_warning(pg.DEFAULT_MAX_CLIENTS, limit) is None
    assert pg.open_files_warning(pg.MAX_CLIENTS_BOUND // 4, limit) is None


def test_open_files_warning():
    assert pg.open_files_warning(1000, 1024) == (
        "--max-clients 1000 needs about 2320 open files, but the limit is 1024 (about 352 "
        "tunnels fit): raise LimitNOFILE= in the unit or ulimit -n, or lower --max-clients")
    assert pg.open_files_warning(1000, 2320) is None
    assert pg.open_files_warning(0, 1024) is None  # no limit asked for: nothing to check
    assert pg.open_files_warning(1000, None) is None


def open_files_limits(pid):
    with open("/proc/%d/limits" % pid) as limits:
        soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits.read(), re.M).groups()
    return int(soft), int(hard)


def with_open_files(soft, hard):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_files_soft_limit_raised_to_the_hard_one(tmp_path, echo, procs):
    server = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, free_port()),
                             "--to", "%s:%d" % (LOOPBACK, echo.port)],
                  preexec_fn=with_open_files(1024, 4096), name="server")
    procs.append(server)
    assert open_files_limits(server.popen.pid) == (4096, 4096)
    assert "WARNING" not in server.log()  # 1000 tunnels fit in 4096
    assert server.stop() == 0


def test_open_files_warning_when_max_clients_cannot_fit(tmp_path, echo, procs):
    server = Proc(tmp_path, ["server", "--listen", "%s:%d" % (LOOPBACK, free_port()),
                             "--to", "%s:%d" % (LOOPBACK, echo.port)],
                  preexec_fn=with_open_files(1024, 1024), name="server")
    procs.append(server)
    warnings_logged = [line for line in server.log().splitlines() if " WARNING " in line]
    assert len(warnings_logged) == 1 and warnings_logged[0].endswith(
        pg.open_files_warning(pg.DEFAULT_MAX_CLIENTS, 1024)), server.log()
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["pip", "pipx"])
def test_install_gives_a_proxyguard_command(tmp_path, installer):
    """`pip install .` in a fresh venv, or `pipx install .` (Debian's pipx, which makes its own
    venv from Debian's python3): a `proxyguard` command, configargparse as its dependency, and
    proxyguard.py the only module (not the test or bench files)."""
    source = tmp_path / "source"  # a copy: a build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in os.listdir(HERE):
        if name.endswith(".py") or name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(os.path.join(HERE, name), str(source))
    if installer == "pip":
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        command = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                   "--disable-pip-version-check", str(source)]
        environ = None
        program = venv / "bin" / "proxyguard"
    else:
        command = ["pipx", "install", str(source)]
        environ = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"),
                       PIPX_BIN_DIR=str(tmp_path / "bin"))
        program = tmp_path / "bin" / "proxyguard"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environ)
    assert result.returncode == 0, result.stdout + result.stderr
    version = subprocess.run([str(program), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(
        "proxyguard.py %s " % pg.__version__), version
    with open(str(program)) as script:  # the interpreter of the environment it went into
        python = script.readline()[2:].strip()
    probe = subprocess.run(
        [python, "-c",
         "import configargparse, importlib.util as u, proxyguard; "
         "print(proxyguard.configargparse is not None, "
         "[m for m in ('proxyguard_test', 'proxyguard_bench', 'proxyguard_testbed') "
         "if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert probe.stdout.split("\n")[0] == "True []", probe


# --- The unit's priorities -------------------------------------------------------------------

def test_the_unit_runs_the_tunnel_threads_above_low_priority_load():
    """Nice=-10 (measured: two nice-19 CPU hogs delayed the sleeping pump threads by a
    scheduler slice at nice 0; MEASUREMENTS.md, "This round")."""
    with open(os.path.join(HERE, "proxyguard@.service")) as unit:
        nice = re.search(r"^Nice=(-?\d+)$", unit.read(), re.M)
    assert nice and -19 <= int(nice.group(1)) < 0, nice


# =============================================================================================
# WebSocket: independent peers (websockets, wsproto)
# =============================================================================================
# Our WebSocket transport (RFC 6455) against code that is not ours: the `websockets` library as
# a client of our server and as a server for our client, and `wsproto` (or frames built by
# hand where wsproto refuses to build something wrong) for the edge cases and hostile peers.

SUBPROTOCOL = "proxyguard-udp"
# Opcodes (RFC 6455 5.2, 11.8).
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Sizes at the edges of the frame's length encodings (RFC 6455 5.2: 7 bits, 16 bits, 64 bits)
# up to the largest IPv4 UDP datagram.
WS_SIZES = [1, 2, 125, 126, 127, 1420, 8000, 65507]


def ws_connect(port, path="/", subprotocols=(SUBPROTOCOL,), ca_file=None, **options):
    """A `websockets` client (sync API) connected to our server on `port`: ws://127.0.0.1, or
    wss://localhost checked against `ca_file`. It offers permessage-deflate as browsers do
    (our server must leave that offer alone); no proxy from the environment."""
    if ca_file:
        url, context = "wss://localhost:%d%s" % (port, path), ssl.create_default_context(
            cafile=ca_file)
    else:
        url, context = "ws://%s:%d%s" % (LOOPBACK, port, path), None
    return websockets.sync.client.connect(url, ssl=context, proxy=None,
                                          subprotocols=list(subprotocols) or None,
                                          open_timeout=CASE_LIMIT, close_timeout=CASE_LIMIT,
                                          **options)


def ws_roundtrip(ws, datagrams, timeout=5.0):
    """Send each datagram as one binary message on the `websockets` connection `ws`, then
    assert the same messages come back, identical and in order."""
    for datagram in datagrams:
        ws.send(datagram)
    got = [ws.recv(timeout=timeout) for _ in datagrams]
    assert [(d[:4].hex(), len(d)) for d in got] == [(d[:4].hex(), len(d)) for d in datagrams]
    assert got == datagrams


class WsprotoPeer:
    """A WebSocket client made of wsproto on a raw socket: wsproto does the handshake (and
    checks Sec-WebSocket-Accept and the subprotocol), builds the good frames and parses all the
    server's (which must not be masked, RFC 6455 5.1). `send_raw` writes hand-built frames."""

    def __init__(self, port, target="/", subprotocols=(SUBPROTOCOL,), timeout=5.0):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending = collections.deque()
        self.pongs = []
        self.ended = False  # the server closed the TCP connection (or reset it)
        self.send(Request(host="%s:%d" % (LOOPBACK, port), target=target,
                          subprotocols=list(subprotocols)))
        event = self.next_event(timeout)
        if not isinstance(event, AcceptConnection):
            self.sock.close()
            raise ConnectionError("not upgraded: %r" % (event,))
        self.subprotocol = event.subprotocol

    def send(self, event):
        self.sock.sendall(self.ws.send(event))

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_hostile(self, data):
        """Send `data` that should make the server close: it may do so before it has read it
        all, so a broken pipe or a reset here is no error (reading tells what it did)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def next_event(self, timeout=5.0):
        """The next wsproto event; ConnectionError once the server has closed and all it sent
        is read, TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.ended:
                raise ConnectionError("the server closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no WebSocket event in %gs" % timeout)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(256 * 1024)
            except socket.timeout:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.ended = True
                continue
            self.ws.receive_data(chunk)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    def message(self, timeout=5.0):
        """The next whole binary message (wsproto may hand one over in pieces); pongs on the
        way go to `pongs`; anything else is an AssertionError."""
        parts = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if isinstance(event, Pong):
                self.pongs.append(event.payload)
                continue
            assert isinstance(event, BytesMessage), "want a binary message, got %r" % (event,)
            parts.append(event.data)
            if event.message_finished:
                return b"".join(parts)

    def pong(self, timeout=5.0):
        """The payload of the next pong (or of one already seen while reading messages)."""
        while not self.pongs:
            event = self.next_event(timeout)
            assert isinstance(event, Pong), "want a pong, got %r" % (event,)
            self.pongs.append(event.payload)
        return self.pongs.pop(0)

    def closed_by_server(self, timeout=CASE_LIMIT, answer=True):
        """Wait for the server's close frame, answer it (RFC 6455 5.5.1) unless told not to,
        and wait for the server to end the TCP connection (RFC 6455 7.1.1: the server closes
        it first). Returns (code, reason). Messages and pongs before the close are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if isinstance(event, CloseConnection):
                break
        # wsproto reports frames it cannot parse as a CloseConnection too, without a state
        # change: that would be the server's fault, not a close frame it sent.
        assert self.ws.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED), (
            "the server's frames do not parse: %s" % event.reason)
        if answer and self.ws.state is ConnectionState.REMOTE_CLOSING:
            with contextlib.suppress(OSError):
                self.send(event.response())
        _, ending = read_answer(self.sock, deadline)
        assert ending in ("eof", "reset"), "the server kept the connection open after its close"
        self.ended = True
        return event.code, event.reason

    def close(self):
        self.sock.close()


def peak_rss_kib(pid):
    """The highest resident set size process `pid` has had (VmHWM), in KiB: what a burst of
    buffering costs even once it is freed again."""
    with open("/proc/%d/status" % pid) as stream:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", stream.read(), re.M).group(1))


# ---------------------------------------------------------------------------------------------
# 1. `websockets` as the client of our server
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websockets_client_through_our_server(tmp_path, echo, procs, certs, tls):
    extra = ["--tls-cert", certs.cert, "--tls-key", certs.key] if tls else []
    server = start_server(tmp_path, echo.port, *extra)
    procs.append(server)
    with ws_connect(server.port, "/pg/ws?x=1", ca_file=certs.ca if tls else None) as ws:
        # RFC 6455 4.2.2: the server picks one of the offered subprotocols; and no extension
        # it was not built for (9.1: it may ignore permessage-deflate, offered by default).
        assert ws.subprotocol == SUBPROTOCOL
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        burst = [numbered(i, size) for i, size in enumerate(WS_SIZES * 2)]
        ws_roundtrip(ws, burst)
        ws.send(b"")  # an empty message is no datagram: dropped
        ws_roundtrip(ws, [numbered(99, 300)])
        # websockets' own ping (RFC 6455 5.5.2): our server answers with a pong.
        assert ws.ping(b"are you there").wait(5)
    server.wait_log("WebSocket close 1000")  # websockets closes with 1000 on leaving `with`
    up = [line for line in server.log().splitlines() if "tunnel up" in line]
    assert len(up) == 1 and "websocket" in up[0].lower(), up


def test_websockets_client_offering_no_subprotocol_is_accepted(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    with ws_connect(server.port, "/", subprotocols=()) as ws:
        assert ws.subprotocol is None
        assert ws.response.headers.get("Sec-WebSocket-Protocol") is None  # RFC 6455 4.2.2
        ws_roundtrip(ws, [numbered(i, size) for i, size in enumerate(WS_SIZES)])


def test_handshake_answer_has_the_accept_of_rfc_6455_example(server):
    """The key of RFC 6455 1.3 gives its accept value; the answer is a 101 with exactly the
    headers the client needs (4.2.2)."""
    with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
        sock.sendall(request(WS_UPGRADE_HEADERS, target="/chat"))
        reader, parts = pg.HeadReader(), None
        while parts is None:
            chunk = sock.recv(4096)
            assert chunk, "closed before the end of the answer's head"
            parts = reader.feed(chunk)
    head = parts[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols", head
    fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
              for line in lines[1:] if line}
    assert fields[b"upgrade"].lower() == b"websocket"
    assert b"upgrade" in fields[b"connection"].lower()
    assert fields[b"sec-websocket-accept"] == WS_ACCEPT.encode()
    assert fields[b"sec-websocket-protocol"] == SUBPROTOCOL.encode()


# ---------------------------------------------------------------------------------------------
# 2. `websockets` as the server of our client
# ---------------------------------------------------------------------------------------------


class WebSocketsServer:
    """The `websockets` library's server (sync API, in a thread, on 127.0.0.1) playing the
    ProxyGuard server: it echoes each binary message. It keeps each connection (its request in
    `.request`) and every frame it receives: websockets logs frames at DEBUG level, and a
    logging handler hands them over. websockets itself refuses unmasked client frames (RFC 6455
    5.1, "incorrect masking") and anything else out of protocol, closing with 1002."""

    def __init__(self, ssl_context=None, subprotocols=(SUBPROTOCOL,)):
        self.connections = []
        self.frames = []  # (monotonic time, websockets.frames.Frame) received, in order
        self.changed = threading.Condition()
        logger = logging.getLogger("proxyguard_test.websockets.%d" % id(self))
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self._FrameHandler(self))
        self.server = websockets.sync.server.serve(
            self._handle, LOOPBACK, 0, ssl=ssl_context, subprotocols=list(subprotocols),
            ping_interval=None, logger=logger)
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    class _FrameHandler(logging.Handler):
        def __init__(self, owner):
            super().__init__(logging.DEBUG)
            self.owner = owner

        def emit(self, record):
            if (record.msg == "< %s" and record.args
                    and isinstance(record.args[0], websockets.frames.Frame)):
                with self.owner.changed:
                    self.owner.frames.append((time.monotonic(), record.args[0]))
                    self.owner.changed.notify_all()

    def _handle(self, connection):
        with self.changed:
            self.connections.append(connection)
            self.changed.notify_all()
        for message in connection:  # ends when the connection closes
            connection.send(message)

    def wait_for(self, predicate, what, timeout=5.0):
        """Wait until `predicate()` (called with the lock held) is true; return its value."""
        with self.changed:
            value = self.changed.wait_for(predicate, timeout)
        assert value, "%s: not within %gs" % (what, timeout)
        return value

    def pings(self):
        return [(when, frame) for when, frame in self.frames
                if frame.opcode is websockets.frames.Opcode.PING]

    def close(self):
        self.server.shutdown()
        for connection in list(self.connections):
            connection.close()
        self._thread.join(5)


@pytest.fixture
def websockets_server():
    server = WebSocketsServer()
    yield server
    server.close()


def server_tls_context(certs, alpn=("h2", "http/1.1")):
    """A TLS context for a test server with `certs`, preferring h2 if the client offers it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    context.set_alpn_protocols(list(alpn))
    return context


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_our_client_through_a_websockets_server(tmp_path, procs, certs, tls):
    peer = WebSocketsServer(server_tls_context(certs) if tls else None)
    try:
        url = "%s://%s:%d/pg/ws?x=1" % ("wss" if tls else "ws", "localhost" if tls else LOOPBACK,
                                       peer.port)
        client = start_client(tmp_path, url, *(["--ca-file", certs.ca] if tls else []))
        procs.append(client)
        burst = [numbered(i, size) for i, size in enumerate(WS_SIZES * 2)]
        for datagram in burst:
            client.wireguard.send(datagram)
        got = [client.wireguard.recv() for _ in burst]
        assert [(d[:4].hex(), len(d)) for d in got] == [(d[:4].hex(), len(d)) for d in burst]
        assert got == burst
        connection = peer.wait_for(lambda: peer.connections, "a connection")[0]
        headers = connection.request.headers
        assert connection.request.path == "/pg/ws?x=1"
        assert headers["Host"] == ("localhost:%d" if tls else "127.0.0.1:%d") % peer.port
        assert headers["Sec-WebSocket-Version"] == "13"  # RFC 6455 4.1
        # Both offered, the batches first; this server knows only the first version's.
        assert headers["Sec-WebSocket-Protocol"] == "proxyguard-uotlv, " + SUBPROTOCOL
        assert connection.subprotocol == SUBPROTOCOL
        if tls:  # it offers http/1.1 alone: this server would rather have picked h2
            assert connection.socket.selected_alpn_protocol() == "http/1.1"
        # One unfragmented binary message per datagram; websockets checked each was masked.
        data = [frame for _, frame in peer.frames if frame.opcode is not
                websockets.frames.Opcode.PING]
        assert [(frame.opcode, frame.fin) for frame in data] == [
            (websockets.frames.Opcode.BINARY, True)] * len(burst)
        client.wait_log("tunnel up")
    finally:
        peer.close()


BATCH_SUBPROTOCOL = "proxyguard-uotlv"


def uotlv_datagrams(message):
    """The datagrams of a proxyguard-uotlv message, cut by the tests' FrameDecoder, which
    must leave nothing over: a message holds whole UoTLV/1 frames."""
    decoder = FrameDecoder()
    datagrams = decoder.feed(message)
    assert decoder.pending == 0, "a message ends inside a UoTLV/1 frame"
    return datagrams


def test_our_client_batches_datagrams_for_a_websockets_server_that_takes_them(tmp_path, procs):
    """A `websockets` server that takes proxyguard-uotlv, echoing each message: a burst sent
    before the (lazy) tunnel is up leaves in fewer messages than datagrams, each masked and
    holding whole UoTLV/1 frames, and comes back to WireGuard whole and in order."""
    peer = WebSocketsServer(subprotocols=(BATCH_SUBPROTOCOL,))
    try:
        client = start_client(tmp_path, "ws://%s:%d/" % (LOOPBACK, peer.port))
        procs.append(client)
        burst = [numbered(i, size) for i, size in enumerate([1420] * 30 + WS_SIZES)]
        for datagram in burst:
            client.wireguard.send(datagram)
        got = [client.wireguard.recv() for _ in burst]
        assert [(d[:4].hex(), len(d)) for d in got] == [(d[:4].hex(), len(d)) for d in burst]
        assert got == burst
        assert peer.connections[0].subprotocol == BATCH_SUBPROTOCOL
        messages = [frame.data for _, frame in peer.frames
                    if frame.opcode is websockets.frames.Opcode.BINARY]
        assert [d for message in messages for d in uotlv_datagrams(message)] == burst
        assert len(messages) < len(burst)
        client.wait_log("websocket (proxyguard-uotlv)")  # the tunnel-up line says which
    finally:
        peer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websockets_client_sending_uotlv_batches_through_our_server(tmp_path, echo, procs,
                                                                    certs, tls):
    """A `websockets` client that offers only proxyguard-uotlv: our server takes it, cuts the
    datagrams out of each message (several in one, and the largest alone), answers in
    messages of whole UoTLV/1 frames, and refuses a message that ends inside a frame (1007)."""
    extra = ["--tls-cert", certs.cert, "--tls-key", certs.key] if tls else []
    server = start_server(tmp_path, echo.port, *extra)
    procs.append(server)
    with ws_connect(server.port, "/", subprotocols=(BATCH_SUBPROTOCOL,),
                    ca_file=certs.ca if tls else None) as ws:
        assert ws.subprotocol == BATCH_SUBPROTOCOL
        burst = [numbered(i, size) for i, size in enumerate(WS_SIZES)]
        ws.send(pg.encode_frames(burst[:-1]))
        ws.send(pg.encode_frames(burst[-1:]))
        got = []
        while len(got) < len(burst):
            got += uotlv_datagrams(ws.recv(timeout=5))
        assert got == burst
        ws.send(pg.encode_frames([b"whole"]) + b"\x00\x09half")
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1007
    server.wait_log("ends inside a UoTLV/1 frame")


def test_our_client_answers_a_websockets_ping(tmp_path, procs, websockets_server):
    client = start_client(tmp_path, "ws://%s:%d/path" % (LOOPBACK, websockets_server.port))
    procs.append(client)
    assert client.wireguard.roundtrip(numbered(1, 100)) == numbered(1, 100)  # it is lazy
    connection = websockets_server.wait_for(lambda: websockets_server.connections,
                                            "a connection")[0]
    assert connection.ping(b"proxyguard-test").wait(5)  # set when the pong comes (5.5.3)
    assert client.wireguard.roundtrip(numbered(2, 1420)) == numbered(2, 1420)


@pytest.mark.slow
def test_our_client_keepalive_pings_a_quiet_tunnel(tmp_path, procs, websockets_server):
    client = start_client(tmp_path, "ws://%s:%d/path" % (LOOPBACK, websockets_server.port),
                          "--keepalive", "1")
    procs.append(client)
    assert client.wireguard.roundtrip(numbered(1, 100)) == numbered(1, 100)
    quiet_since = time.monotonic()  # the last data either way, give or take the echo's trip
    websockets_server.wait_for(lambda: len(websockets_server.pings()) >= 2, "two keepalive pings",
                               timeout=2 + MARGIN)
    (first, _), (second, _) = websockets_server.pings()[:2]
    # A ping after a second without traffic either way, not before, and again a second later.
    assert first - quiet_since > 0.8 and second - first > 0.8, (first - quiet_since,
                                                                second - first)
    assert client.wireguard.roundtrip(numbered(2, 100)) == numbered(2, 100)


# ---------------------------------------------------------------------------------------------
# 3. wsproto and hand-built frames against our server
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("between", [None, b"between fragments"], ids=["plain", "ping-between"])
def test_fragmented_message_is_one_datagram(server, good_tunnel, echo, between):
    """RFC 6455 5.4: a message in three fragments is one datagram; a control frame may come
    between fragments and is answered at once with a pong of the same payload (5.5.3)."""
    peer = WsprotoPeer(server.port)
    assert peer.subprotocol == SUBPROTOCOL
    parts = [numbered(1, 500), numbered(2, 1000), numbered(3, 20)]
    before = echo.count
    peer.send(BytesMessage(data=parts[0], message_finished=False))
    if between is not None:
        peer.send(Ping(payload=between))
    peer.send(BytesMessage(data=parts[1], message_finished=False))
    peer.send(BytesMessage(data=parts[2], message_finished=True))
    assert peer.message() == b"".join(parts)
    if between is not None:
        assert peer.pong() == between
    assert echo.count == before + 1
    peer.send(BytesMessage(data=numbered(4, 65507)))  # the largest datagram, in one frame
    assert peer.message() == numbered(4, 65507)
    peer.close()


def test_close_1000_with_reason_is_answered_and_logged(server, good_tunnel):
    peer = WsprotoPeer(server.port)
    peer.send(BytesMessage(data=b"x" * 10))
    assert peer.message() == b"x" * 10
    peer.send(CloseConnection(code=1000, reason="bye now"))
    assert peer.closed_by_server()[0] == 1000  # RFC 6455 5.5.1: a close answers a close
    server.wait_log("WebSocket close 1000")
    line = [l for l in server.log().splitlines() if "WebSocket close 1000" in l][-1]
    assert "bye now" in line, line


# Frames that must make the server fail the connection (RFC 6455 7.1.7) with the close code of
# 7.4.1, after a good handshake: (name, bytes to send, code).
PROTOCOL_VIOLATIONS = [
    # 5.1: a client masks every frame; the server closes on an unmasked one.
    ("unmasked", ws_frame(OP_BINARY, b"not masked", mask=False), 1002),
    # 7.4.1: 1003, a type of data it cannot accept.
    ("text", ws_frame(OP_TEXT, b"hello"), 1003),
    # 7.4.1: 1009, a message too big to process (one datagram is at most 65,535 bytes).
    ("too-big-in-fragments", ws_frame(OP_BINARY, b"a" * 40000, fin=False)
     + ws_frame(OP_CONTINUATION, b"b" * 30000), 1009),
    ("too-big-in-one-frame", ws_frame(OP_BINARY, b"c" * 65536), 1009),
    # 5.2: RSV bits without a negotiated extension.
    ("rsv1", ws_frame(OP_BINARY, b"x", rsv=4), 1002),
    ("rsv2", ws_frame(OP_BINARY, b"x", rsv=2), 1002),
    ("rsv3", ws_frame(OP_BINARY, b"x", rsv=1), 1002),
    ("rsv-on-ping", ws_frame(OP_PING, b"x", rsv=4), 1002),
    # 5.2: reserved opcodes.
    ("opcode-3", ws_frame(0x3, b"x"), 1002),
    ("opcode-0xb", ws_frame(0xB, b"x"), 1002),
    # 5.5: control frames are at most 125 bytes and never fragmented.
    ("fragmented-ping", ws_frame(OP_PING, b"p", fin=False), 1002),
    ("ping-of-126-bytes", ws_frame(OP_PING, b"p" * 126), 1002),
    # 5.4: a continuation needs a message to continue; a new message waits for the last one.
    ("continuation-without-start", ws_frame(OP_CONTINUATION, b"x"), 1002),
    ("new-message-inside-fragmented", ws_frame(OP_BINARY, b"a", fin=False)
     + ws_frame(OP_BINARY, b"b"), 1002),
]


@pytest.mark.parametrize("data, code", [case[1:] for case in PROTOCOL_VIOLATIONS],
                         ids=[case[0] for case in PROTOCOL_VIOLATIONS])
def test_protocol_violations_get_the_right_close_code(server, good_tunnel, echo, data, code):
    peer = WsprotoPeer(server.port)
    before = echo.count
    peer.send_hostile(data)
    assert peer.closed_by_server()[0] == code
    assert echo.count == before  # nothing of it went to WireGuard
    server_is_healthy(server)


def wsproto_server_events(data):
    """The events wsproto, as a server after a good handshake, makes of the client's `data`."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(request(WS_UPGRADE_HEADERS))
    handshake = next(ws.events())
    ws.send(AcceptConnection(subprotocol=handshake.subprotocols[0]))
    ws.receive_data(data)
    return list(ws.events()), ws.state


@pytest.mark.parametrize("data, code", [case[1:] for case in PROTOCOL_VIOLATIONS],
                         ids=[case[0] for case in PROTOCOL_VIOLATIONS])
def test_hand_built_frames_are_what_wsproto_makes_of_them(data, code):
    """The tests' own frame builder checked by an independent parser: wsproto fails the 1002
    cases itself, and reads the others as the text or the too big message they are."""
    events, state = wsproto_server_events(data)
    if code == 1002:
        assert isinstance(events[-1], CloseConnection) and events[-1].code == 1002, events
        assert state is ConnectionState.OPEN  # a parse failure, not a close frame
    elif code == 1003:
        assert [type(event).__name__ for event in events] == ["TextMessage"]
    else:
        assert sum(len(event.data) for event in events) > 65535
    for size in WS_SIZES + [65535, 65536]:
        events, _ = wsproto_server_events(ws_frame(OP_BINARY, numbered(size, size)))
        assert b"".join(event.data for event in events) == numbered(size, size)


@pytest.mark.parametrize("length, codes", [
    (65536, {1009}),
    (2 ** 63 - 1, {1009}),
    (2 ** 63, {1002, 1009}),  # RFC 6455 5.2: the most significant bit must be 0
], ids=["64KiB", "2^63-1", "2^63"])
def test_a_length_claiming_too_much_is_refused_before_the_payload(server, good_tunnel, length,
                                                                  codes):
    """Only the frame's header is sent: the server must decide from the length alone, at once,
    and never wait for (or make room for) the payload."""
    peer = WsprotoPeer(server.port)
    started = time.monotonic()
    peer.send_raw(ws_frame(OP_BINARY, b"", length=length))
    assert peer.closed_by_server()[0] in codes
    assert time.monotonic() - started < MARGIN
    server_is_healthy(server)


# ---------------------------------------------------------------------------------------------
# 4. Handshakes an independent client could get wrong
# ---------------------------------------------------------------------------------------------


def ws_request(**changes):
    """A WebSocket upgrade (WS_UPGRADE_HEADERS) with headers replaced: name=value, or name=None
    to leave it out, or a list of values to send it several times. Names use _ for -."""
    lines = []
    for line in WS_UPGRADE_HEADERS:
        name = line.split(":")[0]
        key = name.replace("-", "_")
        if key not in changes:
            lines.append(line)
            continue
        value = changes[key]
        for item in ([] if value is None else [value] if isinstance(value, str) else value):
            lines.append("%s: %s" % (name, item))
    return request(lines)


@pytest.mark.parametrize("data, statuses", [
    # RFC 6455 4.4: a version the server does not speak gets 426 naming the one it speaks.
    (ws_request(Sec_WebSocket_Version="8"), {426}),
    (ws_request(Sec_WebSocket_Version="14"), {426}),
    (ws_request(Sec_WebSocket_Version="abc"), {426}),
    (ws_request(Sec_WebSocket_Version=None), {400, 426}),
    # 4.2.1 item 5: the key is the base64 of 16 bytes, sent once (11.3.1).
    (ws_request(Sec_WebSocket_Key=None), {400}),
    (ws_request(Sec_WebSocket_Key=""), {400}),
    (ws_request(Sec_WebSocket_Key="not base64 at all!"), {400}),
    (ws_request(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAA"), {400}),  # 15 bytes
    (ws_request(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAAAAA="), {400}),  # 17 bytes
    (ws_request(Sec_WebSocket_Key=[WS_KEY, "AAAAAAAAAAAAAAAAAAAAAA=="]), {400}),
], ids=["version-8", "version-14", "version-abc", "no-version", "no-key", "empty-key",
        "key-not-base64", "key-15-bytes", "key-17-bytes", "two-keys"])
def test_bad_websocket_handshakes_get_an_http_answer_and_a_close(server, good_tunnel, data,
                                                                 statuses):
    answer = exchange(server.port, data)
    status = status_of(answer)
    assert status in statuses, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head
    if status == 426:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in head, head


# ---------------------------------------------------------------------------------------------
# 5. Bounded memory whatever the peer sends
# ---------------------------------------------------------------------------------------------


# A flood's size, and what it may add to the server's peak RSS: a server that kept what it
# read would grow by the flood; reads of 256 KiB and 64 KiB messages raise the allocator's
# high-water mark by about 5 MiB once (see test_random_bytes_after_upgrade_do_not_hurt_...).
FLOOD_BYTES = 64 << 20
RSS_GROWTH_KIB = 16 * 1024


def flood(peer, frame, limit, stop):
    """Send `frame` over and over on the peer's socket until `limit` bytes are out, `stop` is
    set, or the server stops taking them (it closed, or it has not read for a second); the
    bytes sent."""
    sent = 0
    peer.sock.settimeout(1.0)
    try:
        while sent < limit and not stop.is_set():
            peer.sock.sendall(frame)
            sent += len(frame)
    except OSError:  # closed, reset, or the server pushes back (socket.timeout)
        pass
    return sent


@pytest.mark.timeout(90)
def test_endless_fragments_are_cut_at_65535_bytes_with_1009(server, good_tunnel):
    """A message that never ends, in small fragments: the server closes with 1009 once it
    passes 65,535 bytes (RFC 6455 7.4.1), having kept no more than that."""
    pid = server.popen.pid
    before = proc_stats(pid)
    peak_before = peak_rss_kib(pid)
    peer = WsprotoPeer(server.port)
    stop = threading.Event()
    peer.send_raw(ws_frame(OP_BINARY, b"s" * 1000, fin=False))
    fragment = ws_frame(OP_CONTINUATION, b"f" * 1000, fin=False)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        sending = pool.submit(flood, peer, fragment, FLOOD_BYTES, stop)
        try:  # no close in answer: the flooding thread owns the sending side
            code = peer.closed_by_server(timeout=30, answer=False)[0]
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked
        sent = sending.result(10)
    growth = peak_rss_kib(pid) - peak_before
    print("\nflooded %.1f MiB of fragments before the close %d; peak RSS +%d KiB"
          % (sent / 2 ** 20, code, growth))
    assert code == 1009
    assert sent < FLOOD_BYTES, "the server read all of a 64 MiB message without closing"
    assert growth < RSS_GROWTH_KIB, growth
    peer.close()
    after = wait_for_stats(pid, before["threads"], before["fds"])
    assert after["threads"] <= before["threads"] and after["fds"] <= before["fds"], (before,
                                                                                    after)


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_pings_from_a_peer_that_never_reads_keep_memory_bounded(server, good_tunnel):
    """A peer that sends pings and never reads the pongs: the server must push back (stop
    reading) or drop or close, not keep pongs without end (RFC 6455 5.5.3 allows answering only
    the latest ping)."""
    pid = server.popen.pid
    before = proc_stats(pid)
    peak_before = peak_rss_kib(pid)
    peer = WsprotoPeer(server.port)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # pongs back up at once
    sent = flood(peer, ws_frame(OP_PING, b"p" * 125), FLOOD_BYTES // 2, threading.Event())
    growth = peak_rss_kib(pid) - peak_before
    print("\nsent %.1f MiB of pings; peak RSS +%d KiB" % (sent / 2 ** 20, growth))
    assert growth < RSS_GROWTH_KIB, growth
    good_tunnel.check(tag=40)
    peer.close()
    after = wait_for_stats(pid, before["threads"], before["fds"])
    assert after["threads"] <= before["threads"] and after["fds"] <= before["fds"], (before,
                                                                                    after)


# =============================================================================================
# up: an eduVPN profile in, a VPN up: the profile's parser and
# rewriter, the command line's errors, several peers in one process (tunnels only, loopback),
# and for real: wg-quick with wireguard-go in network namespaces
# =============================================================================================

# A profile as the eduVPN portal (vpn-user-portal) writes it for "WireGuard over TCP", with a
# second peer (no ProxyEndpoint: passes through) and the settings wg-quick must still see.
PORTAL_PROFILE = """\
# Profile: Employees (employees)
# Expires: 2026-12-31T10:00:00+00:00

[Interface]
PrivateKey = {key}
Address = 10.43.43.2/24,fd43::2/64
DNS = 9.9.9.9,2620:fe::fe
MTU = 1392
ListenPort = 4444
FwMark = 0x1234

[Peer]
PublicKey = {key}
AllowedIPs = 0.0.0.0/0,::/0
PersistentKeepalive = 25
# ProxyEndpoint is a proprietary eduVPN / Let's Connect! extension
Endpoint = 127.0.0.1:51820
ProxyEndpoint = https://vpn.example.org/proxyguard/node-a.vpn.example.org

[Peer]
PublicKey = {key}
AllowedIPs = 10.99.0.0/16
Endpoint = 192.0.2.7:51820   # a plain WireGuard peer
[peer]
publickey = {key}
AllowedIPs = 10.98.0.0/16
proxyendpoint = http://node-b.example.org:8080/pg
"""
TEST_KEY = "cGxhY2Vob2xkZXJwbGFjZWhvbGRlcnBsYWNlaG9sZGU="


def test_profile_rewrite_drops_proxy_endpoint_and_keeps_the_rest_as_written():
    profile = pg.parse_profile(PORTAL_PROFILE.format(key=TEST_KEY), "--profile p.conf")
    assert [(section, str(url)) for section, url in profile.proxy_peers] == [
        (1, "https://vpn.example.org/proxyguard/node-a.vpn.example.org"),
        (3, "http://node-b.example.org:8080/pg")]
    assert profile.setting("dns") == "9.9.9.9,2620:fe::fe" and profile.setting("fwmark") == "0x1234"
    text = pg.rewrite_profile(profile, {1: 40001, 3: 40002}, listen_port=51820, fwmark=51820)
    assert text == """\
# Profile: Employees (employees)
# Expires: 2026-12-31T10:00:00+00:00

[Interface]
ListenPort = 51820
FwMark = 51820
PrivateKey = {key}
Address = 10.43.43.2/24,fd43::2/64
DNS = 9.9.9.9,2620:fe::fe
MTU = 1392

[Peer]
PublicKey = {key}
AllowedIPs = 0.0.0.0/0,::/0
PersistentKeepalive = 25
# ProxyEndpoint is a proprietary eduVPN / Let's Connect! extension
Endpoint = 127.0.0.1:40001

[Peer]
PublicKey = {key}
AllowedIPs = 10.99.0.0/16
Endpoint = 192.0.2.7:51820   # a plain WireGuard peer
[peer]
publickey = {key}
AllowedIPs = 10.98.0.0/16
Endpoint = 127.0.0.1:40002
""".format(key=TEST_KEY)
    # Without an MTU line wg-quick would take loopback's (the Endpoint's route): 65456.
    without_mtu = pg.parse_profile("[Interface]\n[Peer]\nProxyEndpoint = http://a/\n", "p")
    assert pg.rewrite_profile(without_mtu, {1: 5}, 51820, 7) == (
        "[Interface]\nListenPort = 51820\nFwMark = 7\nMTU = 1420\n[Peer]\n"
        "Endpoint = 127.0.0.1:5\n")


@pytest.mark.parametrize("text, error", [
    ("[Interface]\nPrivateKey = k\n[Peer]\nEndpoint = 192.0.2.1:51820\n",
     "--profile p.conf: no [Peer] has a ProxyEndpoint line"),
    ("[Interface]\n[Tunnel]\n", "--profile p.conf, line 2: unknown section [Tunnel]"),
    ("[Interface]\nthis is no setting\n", "--profile p.conf, line 2: 'this is no setting' is "
                                          "neither a [Section] nor 'Key = Value'"),
    ("PrivateKey = k\n[Interface]\n", "--profile p.conf, line 1: 'PrivateKey = k' comes before"),
    ("[Peer]\nProxyEndpoint = http://a/\n", "--profile p.conf: a WireGuard profile has one "
                                            "[Interface] section, this one 0"),
    ("[Interface]\n[Peer]\nProxyEndpoint = http://a/\nProxyEndpoint = http://b/\n",
     "--profile p.conf: a [Peer] with 2 ProxyEndpoint lines"),
    ("[Interface]\n[Peer]\nProxyEndpoint = vpn.example.org\n",
     "--profile p.conf: ProxyEndpoint 'vpn.example.org' is not a URL"),
    ("[Interface]\n[Peer]\nProxyEndpoint = ftp://vpn.example.org/\n",
     "--profile p.conf: ProxyEndpoint 'ftp://vpn.example.org/': the scheme must be"),
])
def test_profiles_up_cannot_use_are_refused_naming_the_line(text, error):
    with pytest.raises(pg.UsageError) as caught:
        pg.parse_profile(text, "--profile p.conf")
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def write_profile(directory, name="eduvpn.conf", url="http://127.0.0.1:1/pg", extra=""):
    path = directory / name
    path.write_text("[Interface]\nPrivateKey = %s\nAddress = 10.43.43.2/24\n%s\n[Peer]\n"
                    "PublicKey = %s\nAllowedIPs = 0.0.0.0/0\nProxyEndpoint = %s\n"
                    % (TEST_KEY, extra, TEST_KEY, url))
    return path


def test_up_file_is_mode_up_with_a_profile_and_fwmark_comes_from_the_command_line_then_the_profile(
        tmp_path):
    plain = write_profile(tmp_path)
    marked = write_profile(tmp_path, "marked.conf", extra="FwMark = 0xca6c\nListenPort = 4444")
    options = pg.parse_options(["up", str(plain)], environ={})
    assert (options.mode, options.profile, options.interface) == ("up", str(plain), "eduvpn")
    assert (options.fwmark, options.forward_port) == (51820, 51820)  # wg-quick's first choice
    options = pg.parse_options(["up", str(marked)], environ={})
    assert (options.fwmark, options.forward_port) == (0xca6c, 4444)
    off = write_profile(tmp_path, "off.conf", extra="FwMark = off")
    assert pg.parse_options(["up", str(off)], environ={}).fwmark == 51820
    options = pg.parse_options(["--mode", "up", "--profile", str(marked), "--fwmark", "7",
                                "--forward-port", "5555"], environ={})
    assert (options.fwmark, options.forward_port) == (7, 5555)


@pytest.mark.parametrize("name, args, error", [
    (None, ["up"], "up needs a profile: proxyguard.py up PROFILE.conf"),
    ("my vpn.conf", [], "'my vpn' cannot name a WireGuard interface"),
    ("a-name-too-long-for-linux.conf", [], "cannot name a WireGuard interface"),
    ("eduvpn.conf", ["--to", "http://a/"], "up takes the servers' URLs from the profile"),
    ("eduvpn.conf", ["--listen-port", "5"], "--listen-port is a client option: up would "
                                            "ignore it"),
    ("plain.conf", [], "no [Peer] has a ProxyEndpoint line"),
    ("eduvpn.conf", ["--cpu", "first"], "--cpu: 'first': auto, any, or a CPU's number"),
    ("eduvpn.conf", ["--cpu", "4096"], "--cpu 4096: this process may run on CPU 0"),
])
def test_up_command_line_errors_exit_2_with_one_line(tmp_path, name, args, error):
    argv = list(args)
    if name == "plain.conf":
        (tmp_path / name).write_text("[Interface]\nPrivateKey = k\n[Peer]\nEndpoint = "
                                     "192.0.2.1:1\n")
    elif name is not None:
        write_profile(tmp_path, name)
    if name is not None:
        argv = ["up", str(tmp_path / name)] + argv
    result = run_cli(*argv)
    assert result.returncode == 2, result.stderr
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_up_says_what_is_missing_before_running_wg_quick():
    profile = pg.parse_profile("[Interface]\nDNS = 10.0.0.1\n[Peer]\nProxyEndpoint = http://a/\n",
                               "p")
    everything = lambda tool: "/usr/bin/" + tool
    pg.check_can_bring_up(profile, euid=0, which=everything)
    cases = [(0, lambda tool: None if tool == "wg-quick" else everything(tool),
              "wg-quick not found: up brings WireGuard up with wg-quick; install the package "
              "wireguard-tools"),
             (0, lambda tool: None if tool == "resolvconf" else everything(tool),
              "the profile's DNS line needs resolvconf, which wg-quick calls to set the name "
              "servers: install the package openresolv (or resolvconf)"),
             (1000, everything, "up needs root")]
    for euid, which, error in cases:
        with pytest.raises(pg.FatalError) as caught:
            pg.check_can_bring_up(profile, euid=euid, which=which)
        assert str(caught.value).startswith(error)
    no_dns = pg.parse_profile("[Interface]\n[Peer]\nProxyEndpoint = http://a/\n", "p")
    pg.check_can_bring_up(no_dns, euid=0, which=lambda tool: None if tool == "resolvconf"
                          else everything(tool))


def test_up_without_wg_quick_resolvconf_or_root_exits_1_with_one_line(tmp_path):
    """The real process, with a PATH that lacks a tool, and as nobody."""
    import pathlib
    import tempfile
    if os.geteuid() != 0:
        pytest.skip("needs root (runs the profile as another user too)")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("wg", "wg-quick"):
        os.symlink(which_or_skip(tool, "wireguard-tools"), str(tools / tool))
    cases = [({"PATH": str(tmp_path)}, (), "wg-quick and wg not found"),
             ({"PATH": str(tools)}, (), "the profile's DNS line needs resolvconf"),
             ({}, ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
              "up needs root")]
    readable = tempfile.TemporaryDirectory(prefix="proxyguard-up-")  # pytest's is root's only
    os.chmod(readable.name, 0o755)
    profile = write_profile(pathlib.Path(readable.name), extra="DNS = 10.213.7.2")
    os.chmod(str(profile), 0o644)
    for env, prefix, error in cases:
        full_env = dict(os.environ, **env)
        result = subprocess.run(list(prefix) + [sys.executable, SCRIPT, "up", str(profile)],
                                capture_output=True, text=True, env=full_env, timeout=20,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 1, result.stderr
        assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr)
    readable.cleanup()


# --- up after a crash: the runtime directories earlier ups left --------------------------------

def test_process_start_time_counts_fields_after_the_command_name_and_none_for_a_zombie():
    fields = " ".join(str(number) for number in range(4, 23))  # fields 4..22
    assert pg.process_start_time("41 (a) b (c)) S %s 23 24\n" % fields) == 22
    assert pg.process_start_time("41 (up) Z %s\n" % fields) is None
    assert pg.process_start_time("41 (up) X %s\n" % fields) is None
    with open("/proc/self/stat") as stream:
        assert pg.process_start_time(stream.read()) > 0


def test_runtime_owner_reads_back_what_it_writes_and_nothing_else():
    owner = pg.RuntimeOwner("eduvpn", 41, 123456, 4026531840)
    assert owner.text() == "interface=eduvpn pid=41 start=123456 netns=4026531840\n"
    assert pg.RuntimeOwner.parse(owner.text()) == owner
    assert pg.RuntimeOwner.parse("interface=a=b pid=1 start=2 netns=3") == ("a=b", 1, 2, 3)
    for text in ("", "interface=eduvpn pid=41 start=123456", "pid=41 start=1 netns=3",
                 "interface=eduvpn pid=x start=1 netns=3",
                 "interface=../../etc/x pid=41 start=1 netns=3",
                 "interface=a-name-too-long-for-linux pid=41 start=1 netns=3"):
        assert pg.RuntimeOwner.parse(text) is None, text


HERE_NS, THERE_NS = 4026531840, 4026532999


def leftover(interface, alive, netns=HERE_NS, pid=41):
    return pg.Leftover("/run/proxyguard-%s%d" % (interface, pid),
                       pg.RuntimeOwner(interface, pid, 1000 + pid, netns), alive)


@pytest.mark.parametrize("leftovers, interfaces, actions", [
    ([], [], []),
    ([], ["other"], []),
    # The earlier up of this profile was killed: its WireGuard is taken down (wg-quick down).
    ([leftover("eduvpn", False)], ["eduvpn"], ["down"]),
    # ... or, gone already (ip link del), only its directory is removed.
    ([leftover("eduvpn", False)], [], ["remove"]),
    # Two killed ones (the first's clean-up killed too): one wg-quick down, both removed.
    ([leftover("eduvpn", False, pid=41), leftover("eduvpn", False, pid=42)], ["eduvpn"],
     ["down", "remove"]),
    # Other profiles' killed ups: the directory of a gone interface is removed (the private
    # key); one whose interface is still up keeps the file that takes it down.
    ([leftover("work", False), leftover("home", False, pid=42)], ["home"], ["remove", "keep"]),
    # Running ups of other interfaces, and other namespaces' directories, are not ours.
    ([leftover("work", True), leftover("eduvpn", False, THERE_NS),
      leftover("eduvpn", True, THERE_NS, pid=42)], ["work"], []),
])
def test_judge_leftovers_takes_down_removes_or_keeps(leftovers, interfaces, actions):
    found = pg.judge_leftovers(leftovers, "eduvpn", HERE_NS, interfaces.__contains__)
    assert [action for action, _ in found] == actions
    assert [item for _, item in found] == [item for item in leftovers
                                           if item.owner.netns == HERE_NS and not item.alive]


@pytest.mark.parametrize("leftovers, interfaces, error", [
    ([leftover("eduvpn", False), leftover("eduvpn", True, pid=42)], ["eduvpn"],
     "eduvpn is up already, by proxyguard.py up (pid 42), which still runs: stop that one "
     "first (kill 42)"),
    ([leftover("eduvpn", True)], [],  # wg-quick up still running, say
     "eduvpn is up already, by proxyguard.py up (pid 41), which still runs: stop that one "
     "first (kill 41)"),
    # An interface of the profile's name that no up here made (another namespace's up does not
    # count: its interface is another one).
    ([leftover("work", False), leftover("eduvpn", False, THERE_NS)], ["eduvpn", "work"],
     "interface eduvpn exists already, and no proxyguard.py up of this profile brought it up: "
     "take it down first (ip link del eduvpn; wg-quick down FILE if wg-quick brought it up "
     "from FILE), or copy the profile to another name (the interface is named after the "
     "file)"),
])
def test_judge_leftovers_refuses_a_running_up_or_a_foreign_interface(leftovers, interfaces,
                                                                     error):
    with pytest.raises(pg.FatalError) as raised:
        pg.judge_leftovers(leftovers, "eduvpn", HERE_NS, interfaces.__contains__)
    assert str(raised.value) == error


def make_runtime_directory(runtime, owner, mode=0o700):
    directory = runtime / ("proxyguard-%s-%d" % (owner.interface, owner.pid))
    directory.mkdir(mode=mode)
    (directory / "owner").write_text(owner.text())
    (directory / (owner.interface + ".conf")).write_text("[Interface]\nPrivateKey = x\n")
    return directory


def test_wg_quick_clears_what_gone_ups_left_and_refuses_a_running_one(tmp_path, caplog):
    """WgQuick.clear_leftovers on a runtime directory of its own (no wg-quick runs: the
    interfaces are gone, or lo): a gone up's directory (its pid ended, or was reused by a later
    process) is removed with a line; a gone up's whose interface (lo here) is still up stays,
    with a line; a running up of the profile's interface is refused; directories that are
    another user's or open to others, or have no owner, are none of ours."""
    with open("/proc/self/stat") as stream:
        start = pg.process_start_time(stream.read())
    netns = os.stat("/proc/self/ns/net").st_ino
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = make_runtime_directory(tmp_path, pg.RuntimeOwner("pgtgone0", ended.pid, 1, netns))
    reused = make_runtime_directory(tmp_path, pg.RuntimeOwner("pgtgone1", os.getpid(),
                                                              start - 1, netns))
    still_up = make_runtime_directory(tmp_path, pg.RuntimeOwner("lo", ended.pid, 1, netns))
    running = make_runtime_directory(tmp_path, pg.RuntimeOwner("pgtrun", os.getpid(), start,
                                                               netns))
    others = [make_runtime_directory(tmp_path, pg.RuntimeOwner("pgtopen", ended.pid, 1, netns),
                                     mode=0o755)]
    others.append(tmp_path / "proxyguard-unowned")
    others[-1].mkdir(mode=0o700)
    os.chmod(str(others[0]), 0o755)  # mkdir's mode passes the umask
    with caplog.at_level(logging.INFO, logger="proxyguard"):
        pg.WgQuick("pgtnew", runtime=str(tmp_path)).clear_leftovers()
    assert not gone.exists() and not reused.exists()
    assert still_up.exists() and running.exists() and all(other.exists() for other in others)
    lines = sorted(record.getMessage() for record in caplog.records)
    assert lines == sorted([
        "removed %s, left by an earlier up of pgtgone0 (pid %d) that ended without removing it "
        "(its interface is gone)" % (gone, ended.pid),
        "removed %s, left by an earlier up of pgtgone1 (pid %d) that ended without removing it "
        "(its interface is gone)" % (reused, os.getpid()),
        "%s of an earlier up of lo (pid %d, gone) stays: it is what takes lo down, which the "
        "next up of that profile does (or wg-quick down %s)"
        % (still_up, ended.pid, still_up / "lo.conf")]), lines
    with pytest.raises(pg.FatalError, match=r"^pgtrun is up already, by proxyguard.py up "
                       r"\(pid %d\)" % os.getpid()):
        pg.WgQuick("pgtrun", runtime=str(tmp_path)).clear_leftovers()
    if os.geteuid() == 0:  # another user's directory, though private, is none of ours
        os.chown(str(running), 65534, 65534)
        pg.WgQuick("pgtrun", runtime=str(tmp_path)).clear_leftovers()


def two_peer_profile(directory, urls):
    path = directory / "twopeers.conf"
    path.write_text("[Interface]\nPrivateKey = %s\nAddress = 10.43.43.2/24\n"
                    % TEST_KEY + "".join("\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.%d.0.0/16\n"
                                         "Endpoint = 127.0.0.1:51820\nProxyEndpoint = %s\n"
                                         % (TEST_KEY, 50 + index, url)
                                         for index, url in enumerate(urls)))
    return path


def test_two_peers_in_one_process_each_with_its_own_tunnel_port_and_backoff(
        tmp_path, echo, procs, notify_socket):
    """up --write-config (the tunnels alone, as for NetworkManager): two ProxyEndpoint peers,
    two real servers; each peer's tunnel on its own port; logs, metrics, SIGUSR1 and STATUS
    name the peer by its URL; one server gone leaves the other peer's tunnel working."""
    servers = [start_server(tmp_path, echo.port, name="server%d" % index) for index in range(2)]
    procs.extend(servers)
    urls = ["http://%s:%d/pg%d" % (LOOPBACK, server.port, index)
            for index, server in enumerate(servers)]
    wireguard = WireGuardStandIn()  # one WireGuard interface, one ListenPort, for both peers
    metrics_port = free_port()
    written = tmp_path / "wg.conf"
    env = no_proxy_env()
    env["NOTIFY_SOCKET"] = notify_socket.address
    up = Proc(tmp_path, ["up", str(two_peer_profile(tmp_path, urls)), "--write-config",
                         str(written), "--forward-port", str(wireguard.port),
                         "--metrics-listen", "%s:%d" % (LOOPBACK, metrics_port)],
              ready="written to", name="up", env=env)
    procs.append(up)
    assert oct(os.stat(str(written)).st_mode & 0o777) == "0o600"  # it holds the private key
    ports = endpoint_ports(written.read_text())
    assert len(set(ports)) == 2 and "ProxyEndpoint" not in written.read_text()
    assert "ListenPort = %d\nFwMark = 51820\n" % wireguard.port in written.read_text()
    for index, port in enumerate(ports):
        wireguard.endpoint = (LOOPBACK, port)
        assert wireguard.roundtrip(b"peer %d" % index) == b"peer %d" % index
        servers[index].wait_log("tunnel up")
        up.wait_log("peer %s: tunnel up: " % urls[index])
    notify_socket.wait_for("STATUS=tunnel up to %s; tunnel up to %s" % tuple(urls))
    page = scrape(metrics_port)[2]
    samples = parse_metrics(page)
    for url in urls:
        assert samples[("proxyguard_client_tunnel_up", (("peer", url),))] == 1
        assert samples[("proxyguard_client_datagrams_total",
                        (("direction", "to_wireguard"), ("peer", url)))] == 1
        # A peer's one server: its series carry the peer label and the server label both.
        assert [server_series(samples, name, peer=url) for name in SERVER_SERIES] == [
            {url: 1}, {url: 1}, {url: 0}, {url: 0}]
    assert page.count("# TYPE proxyguard_client_tunnel_up gauge") == 1
    assert page.count("# TYPE proxyguard_client_server_carrying gauge") == 1
    assert page.count("# TYPE proxyguard_build_info gauge") == 1
    checked = subprocess.run([which_or_skip("promtool", "prometheus"), "check", "metrics"],
                             input=page.encode(), capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked
    up.popen.send_signal(signal.SIGUSR1)
    for url in urls:
        up.wait_log("peer %s: SIGUSR1: tunnel " % url)
    assert up.log().count("SIGUSR1: 1 tunnel open, 0 datagrams waiting") == 2
    up.popen.send_signal(signal.SIGHUP)  # reads the options and the profile again
    up.wait_log("SIGHUP: reloaded nothing that changed")
    # The first server goes: its peer fails and backs off; the second peer's tunnel goes on.
    assert servers[0].stop() == 0
    up.wait_log("peer %s: tunnel down: " % urls[0])
    wireguard.endpoint = (LOOPBACK, ports[0])
    wireguard.send(b"lost")
    up.wait_log("peer %s: cannot connect to %s" % (urls[0], urls[0]))
    up.wait_log("peer %s: next attempt in 1s" % urls[0])
    samples = parse_metrics(scrape(metrics_port)[2])
    assert [server_series(samples, name, peer=urls[0]) for name in SERVER_SERIES] == [
        {urls[0]: 0}, {urls[0]: 1}, {urls[0]: 1}, {urls[0]: 1}]
    wireguard.endpoint = (LOOPBACK, ports[1])
    assert wireguard.roundtrip(b"still here") == b"still here"
    assert "peer %s: cannot connect" % urls[1] not in up.log()
    assert up.stop() == 0
    notify_socket.wait_for("STOPPING=1")


def test_every_line_of_a_peers_tunnel_names_the_peer_its_udp_pump_thread_too(tmp_path, echo,
                                                                              procs):
    """up with two peers: a peer's tunnel logs from two threads, its connector (which runs the
    TCP->UDP pump) and the UDP->TCP pump it starts; the latter's lines (here the warning that
    WireGuard sends from a port other than --forward-port) name the peer too."""
    servers = [start_server(tmp_path, echo.port, name="server%d" % index) for index in range(2)]
    procs.extend(servers)
    urls = ["http://%s:%d/pg%d" % (LOOPBACK, server.port, index)
            for index, server in enumerate(servers)]
    wireguard = WireGuardStandIn()  # --forward-port; the datagrams come from elsewhere
    written = tmp_path / "wg.conf"
    up = Proc(tmp_path, ["up", str(two_peer_profile(tmp_path, urls)), "--write-config",
                         str(written), "--forward-port", str(wireguard.port)],
              ready="written to", name="up", env=no_proxy_env())
    procs.append(up)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
        elsewhere.bind((LOOPBACK, 0))
        source = "%s:%d" % elsewhere.getsockname()
        for url, port in zip(urls, endpoint_ports(written.read_text())):
            elsewhere.sendto(b"from elsewhere", (LOOPBACK, port))
            assert wireguard.recv() == b"from elsewhere"  # echoed, to --forward-port
            up.wait_log("peer %s: datagrams arrive from %s, but replies go to " % (url, source))
    assert up.log().count("datagrams arrive from %s" % source) == 2, up.log()
    assert up.stop() == 0


def threads_cpus(pid):
    """Each thread's Cpus_allowed_list (/proc/PID/task/TID/status: "1", "0-1"...)."""
    lists = []
    for tid in os.listdir("/proc/%d/task" % pid):
        with contextlib.suppress(FileNotFoundError):  # ended meanwhile
            with open("/proc/%d/task/%s/status" % (pid, tid)) as stream:
                lists += re.findall(r"^Cpus_allowed_list:\s*(\S+)$", stream.read(), re.M)
    return lists


def start_up_tunnels(tmp_path, urls, *args, name="up"):
    """`up --write-config` (the tunnels alone) with a peer for each of `urls`; the Proc."""
    return Proc(tmp_path, ["up", str(two_peer_profile(tmp_path, urls) if len(urls) > 1 else
                                     write_profile(tmp_path, url=urls[0])),
                           "--write-config", str(tmp_path / "wg.conf")] + list(args),
                ready="written to", name=name)


def two_cpus_or_skip():
    """The CPUs this test may use, two at least (CI's machines have two)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: nowhere to pin or move to")
    return cpus


@pytest.mark.parametrize("peers, args, expected", [
    (2, [], "last"),  # auto: a group on one CPU, the last one
    (2, ["--cpu", "any"], "free"),
    (1, [], "free"),  # auto: one peer's threads gain nothing from it
    (1, ["--cpu", "0"], "0"),  # a CPU number: there, even one peer
])
def test_up_keeps_two_peers_threads_on_one_cpu_unless_told(tmp_path, echo, procs, peers, args,
                                                           expected):
    """Several peers' pump threads cost less CPU on one CPU (issue 19, target 5): every thread
    of the up process, started before and after the pin (tunnels), runs on that CPU."""
    cpus = two_cpus_or_skip()
    with open("/proc/self/status") as stream:
        free = re.search(r"^Cpus_allowed_list:\s*(\S+)$", stream.read(), re.M).group(1)
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    urls = ["http://%s:%d/pg%d" % (LOOPBACK, server.port, index) for index in range(peers)]
    wireguard = WireGuardStandIn()
    up = start_up_tunnels(tmp_path, urls, "--forward-port", str(wireguard.port), *args)
    procs.append(up)
    for index, port in enumerate(endpoint_ports((tmp_path / "wg.conf").read_text())):
        wireguard.endpoint = (LOOPBACK, port)  # the tunnels' pump threads start now
        assert wireguard.roundtrip(b"peer %d" % index) == b"peer %d" % index
    up.wait_log("tunnel up", count=peers)
    want = {"last": str(cpus[-1]), "free": free, "0": "0"}[expected]
    assert set(threads_cpus(up.popen.pid)) == {want}
    assert len(threads_cpus(up.popen.pid)) >= 2 + 2 * peers  # main, signals, connectors, pumps
    up.popen.send_signal(signal.SIGUSR1)
    up.wait_log("SIGUSR1: 1 tunnel open", count=peers)
    if expected == "free":
        assert "threads run on CPU" not in up.log() and "threads on CPU" not in up.log()
    else:
        up.wait_log("up: the tunnels' threads run on CPU %s (--cpu %s" % (
            want, "auto" if not args else want))
        up.wait_log("SIGUSR1: the tunnels' threads on CPU %s (--cpu %s)" % (
            want, "auto" if not args else want))
    assert up.stop() == 0


@pytest.mark.slow
def test_up_moves_its_threads_off_a_cpu_that_other_work_keeps_busy(tmp_path, procs):
    """A CPU-bound process pinned to up's CPU: at its next check (CPU_CHECK_SECONDS) up moves
    every thread to the CPU that other work leaves free, and says so in one line."""
    cpus = two_cpus_or_skip()
    up = start_up_tunnels(tmp_path, ["http://%s:%d/pg%d" % (LOOPBACK, free_port(), index)
                                     for index in range(2)])
    procs.append(up)
    up.wait_log("threads run on CPU %d (--cpu auto" % cpus[-1])
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpus[-1]}))
    try:
        up.wait_log("the tunnels' threads moved to CPU ", timeout=3 * pg.CPU_CHECK_SECONDS)
    finally:
        hog.kill()
        hog.wait()
    moved = int(re.search(r"moved to CPU (\d+): other work kept CPU %d (\d+)%% busy"
                          % cpus[-1], up.log()).group(1))
    assert moved != cpus[-1] and set(threads_cpus(up.popen.pid)) == {str(moved)}
    assert up.stop() == 0


class ProfileBed(WireGuardBed):
    """The bed's two hosts (namespaces, veth, UDP between them dropped), with the client host
    as an eduVPN user's: its default route through the server host, only TCP let through to
    it (so a ping can only answer through WireGuard), and no WireGuard or proxyguard of the
    bed's: the test runs `proxyguard.py up PROFILE` there (run_up), and wg-quick (forced to
    wireguard-go) sets WireGuard up. The server host runs `servers` WireGuards (wireguard-go,
    ListenPort 51820+i, tunnel address 10.214.(7+i).2/24), each behind a proxyguard.py server
    on port 8080+i. The client's interface is named after the profile file, the bed's unique
    wgc<tag> (wireguard-go's control sockets are shared by every namespace).

    ip netns exec gives each command its own mount namespace, with /etc/netns/<namespace>/*
    bound over /etc: there the bed puts a private resolv.conf, and a resolvconf.conf that
    keeps openresolv's state in the workdir, so that the profile's DNS line (an address
    inside the bed) changes nothing of the machine's; and a private hosts file, which names
    the server host (SERVER_NAME % i) in the profile's ProxyEndpoints until forget_names().
    The server host's public address (PUBLIC_IP, on its loopback) is no neighbour of the client
    host's: the client reaches it through its default route only, as on the Internet, so wg-quick's
    `suppress_prefixlength 0` rule cannot keep an unmarked connection out of the VPN."""

    SERVER_PORT = 8080
    SERVER_NAME = "vpn%d.bed.example"
    PUBLIC_IP = "10.215.7.2"

    def __init__(self, workdir, servers=1, **options):
        super().__init__(workdir, **options)
        self.servers = servers
        self.server_interfaces = ["wgs%d%s" % (index, self.tag)[:15] for index in range(servers)]
        self.etc = os.path.join("/etc/netns", self.ns_client)
        self.profile = os.path.join(self.workdir, self.wg_client + ".conf")

    @staticmethod
    def server_address(index):
        return "10.214.%d.2" % (7 + index)

    def start(self):
        remove_stale_beds()
        # The /etc/netns directories of beds whose namespace is gone (a run killed before its
        # close): a live bed makes its namespace before its directory, and removes it after.
        for name in os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else ():
            if name.startswith("pgbed-") and not os.path.exists(os.path.join(NETNS_DIR, name)):
                shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)
        self._make_network()
        ns = self.ns_client
        self.sh("ip", "route", "add", "default", "via", VETH_SERVER_IP, ns=ns)
        self.sh("ip", "addr", "add", self.PUBLIC_IP + "/32", "dev", "lo", ns=self.ns_server)
        for rule in (("OUTPUT", "-o"), ("INPUT", "-i")):
            self.sh("iptables", "-A", rule[0], rule[1], self.veth_client, "!", "-p", "tcp",
                    "-j", "DROP", ns=ns)
        os.makedirs(self.etc)
        with open(os.path.join(self.etc, "resolv.conf"), "w") as stream:
            # openresolv's own first line: it then keeps no resolv.conf.bak beside it in /etc
            stream.write("# Generated by resolvconf\nnameserver 10.213.7.2\n")
        with open(os.path.join(self.etc, "hosts"), "w") as stream:
            stream.write("127.0.0.1 localhost\n%s %s\n" % (self.PUBLIC_IP, " ".join(
                self.SERVER_NAME % index for index in range(self.servers))))
        with open(os.path.join(self.etc, "resolvconf.conf"), "w") as stream:
            stream.write("resolv_conf=/etc/resolv.conf\nstate_dir=%s\n"
                         % os.path.join(self.workdir, "resolvconf"))
        client_key = self.make_key("client")
        peers = []
        for index, ifname in enumerate(self.server_interfaces):
            key_path, public = self.make_key("server%d" % index)
            self.start_server(index)
            self.spawn("wg-server%d" % index, self.ns_server, ["wireguard-go", "-f", ifname],
                       env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
            wait_until(lambda: os.path.exists(os.path.join(WG_RUN_DIR, ifname + ".sock")), 10,
                       "wireguard-go %s" % ifname)
            self.sh("wg", "set", ifname, "listen-port", WG_PORT + index, "private-key", key_path,
                    "peer", client_key[1], "allowed-ips", "10.214.%d.1/32" % (7 + index),
                    ns=self.ns_server)
            self.sh("ip", "addr", "add", self.server_address(index) + "/24", "dev", ifname,
                    ns=self.ns_server)
            self.sh("ip", "link", "set", ifname, "up", ns=self.ns_server)
            peers.append(public)
        # As the portal writes it: the placeholder Endpoint, AllowedIPs everything for the
        # first peer (the second: its own network), DNS inside the bed.
        text = ("# Profile: Employees (employees)\n# Expires: 2026-12-31T10:00:00+00:00\n\n"
                "[Interface]\nPrivateKey = %s\nAddress = %s\nDNS = 10.214.7.2\n"
                % (open(client_key[0]).read().strip(),
                   ",".join("10.214.%d.1/24" % (7 + index) for index in range(self.servers))
                   + ",fd14:7::1/64"))
        for index, public in enumerate(peers):
            text += ("\n[Peer]\nPublicKey = %s\nAllowedIPs = %s\n# ProxyEndpoint is a "
                     "proprietary eduVPN / Let's Connect! extension\nEndpoint = 127.0.0.1:51820\n"
                     "ProxyEndpoint = %s\n" % (public, "0.0.0.0/0,::/0" if index == 0 else
                                               "10.214.%d.0/24" % (7 + index), self.url(index)))
        with open(self.profile, "w") as stream:
            stream.write(text)
        os.chmod(self.profile, 0o600)

    def url(self, index):
        return "http://%s:%d/proxyguard/node-%d.vpn.example.org" % (
            self.SERVER_NAME % index, self.SERVER_PORT + index, index)

    def start_server(self, index):
        """proxyguard.py server number `index` on the server host (again after a kill)."""
        self._start_pg("pg-server%d" % index, self.ns_server, [
            self.python, self.proxyguard, "server", "--listen",
            "0.0.0.0:%d" % (self.SERVER_PORT + index), "--to",
            "127.0.0.1:%d" % (WG_PORT + index)], "listening on", True)

    def forget_names(self):
        """The servers' names are gone from the client host's hosts file (in place: it is
        bound over /etc/hosts in every command's mount namespace)."""
        with open(os.path.join(self.etc, "hosts"), "w") as stream:
            stream.write("127.0.0.1 localhost\n")

    def make_key(self, name):
        """A WireGuard key pair: (path of the private key, public key)."""
        private = self.sh("wg", "genkey").strip()
        path = os.path.join(self.workdir, name + ".key")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as stream:
            stream.write(private + "\n")
        return path, self.sh("wg", "pubkey", input=private + "\n").strip()

    def run_up(self, name="pg-up", userspace="wireguard-go"):
        """Start `proxyguard.py up PROFILE` in the client host as process `name`, wg-quick
        forced to `userspace` (as it falls back to wireguard-go where the kernel has no
        WireGuard module)."""
        return self.spawn(name, self.ns_client, [self.python, self.proxyguard, "up",
                                                 self.profile, "--log-level", "debug"],
                          env={"WG_QUICK_USERSPACE_IMPLEMENTATION": userspace,
                               "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"})

    def wait_ping_to(self, index, timeout=20.0):
        """Seconds until a ping to server `index`'s tunnel address answered, or None."""
        t0 = time.monotonic()
        answer = self.agent(self.ns_client, "wait-ping", self.server_address(index),
                            "--timeout", timeout, "--interval", 0.1, timeout=timeout + 15)
        return time.monotonic() - t0 if answer["ok"] else None

    def resolv_conf(self):
        with open(os.path.join(self.etc, "resolv.conf")) as stream:
            return stream.read()

    def leftovers(self):
        """What WireGuard left in the client host: [] when nothing."""
        ns = self.ns_client
        found = [line for line in self.sh("ip", "-o", "link", "show", ns=ns).splitlines()
                 if ": lo:" not in line and self.veth_client not in line]
        for family in ("-4", "-6"):
            found += [line for line in self.sh("ip", family, "rule", "show", ns=ns).splitlines()
                      if not re.match(r"^(0|32766|32767):\s+from all lookup (local|main|default)"
                                      r"\s*$", line)]
            found += [line for line in self.sh("ip", family, "route", "show", "table", "all",
                                               ns=ns).splitlines() if self.wg_client in line
                      or "table 51820" in line]
        found += [line for line in self.sh("iptables-save", ns=ns).splitlines()
                  if "wg-quick" in line]
        found += ["process %s" % pid for pid in self.sh("ip", "netns", "pids", ns).split()]
        if os.path.exists(os.path.join(WG_RUN_DIR, self.wg_client + ".sock")):
            found.append("control socket of %s" % self.wg_client)
        return found

    def close(self):
        # A test that failed with up running: up takes WireGuard down and removes its runtime
        # file itself on SIGTERM (the bed's close would SIGKILL it).
        with contextlib.suppress(Exception):
            self.send_signal("pg-up", signal.SIGTERM, timeout=15)
        # wireguard-go, started by wg-quick, is no process of the bed's: kill what is left in
        # the client host before the namespaces go.
        with contextlib.suppress(Exception):
            for pid in self.sh("ip", "netns", "pids", self.ns_client).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        super().close()
        for ifname in self.server_interfaces:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(WG_RUN_DIR, ifname + ".sock"))
        shutil.rmtree(self.etc, ignore_errors=True)


def profile_bed(tmp_path, request, servers):
    reason = WireGuardBed.unavailable()
    if reason is None and (shutil.which("wg-quick") is None or shutil.which("resolvconf") is None):
        reason = "needs wg-quick (wireguard-tools) and resolvconf (openresolv)"
    if reason is not None:
        skip_or_fail("the WireGuard test bed cannot run here: %s" % reason)
    bed = ProfileBed(tmp_path / "bed", servers=servers)
    request.addfinalizer(bed.close)
    bed.start()
    return bed


def runtime_directories():
    return {name for name in os.listdir("/run") if name.startswith("proxyguard-")}


def up_runtime_file(bed):
    """The runtime file the last `up` gave wg-quick (from its log line)."""
    found = re.findall(r"WireGuard up: wg-quick up (\S+)", bed.log_text("pg-up"))
    assert found, bed.log_text("pg-up")
    return found[-1]


def assert_up_stops_cleanly(bed, runtime_file, sig=signal.SIGTERM):
    assert bed.send_signal("pg-up", sig, timeout=20) == 0, bed.log_text("pg-up")
    # up waited for wireguard-go's control socket to go; the process itself ends a moment
    # after it removed the socket.
    left = []

    def nothing_left():
        left[:] = bed.leftovers()
        return not left

    try:
        wait_until(nothing_left, 5, "nothing left of WireGuard")
    except AssertionError:
        raise AssertionError("left: %s\n%s" % (left, bed.log_text("pg-up")))
    assert not os.path.exists(runtime_file) and not os.path.exists(
        os.path.dirname(runtime_file))
    assert "10.214.7.2" not in bed.resolv_conf()
    assert "WireGuard down: wg-quick down %s" % runtime_file in bed.log_text("pg-up")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_up_profile_first_ping_within_3s_and_nothing_left_after_sigterm(tmp_path, request,
                                                                         report):
    """The portal's profile (AllowedIPs 0.0.0.0/0,::/0, DNS, the placeholder Endpoint) on a
    host whose default route goes through the server host and which lets only TCP through:
    `proxyguard.py up` brings the VPN up, the first ping through it answers within 3 s of the
    start; SIGTERM takes everything down, exit 0."""
    bed = profile_bed(tmp_path, request, servers=1)
    assert bed.leftovers() == []
    started = time.monotonic()
    bed.run_up()
    seconds = bed.wait_ping_to(0, timeout=20)
    assert seconds is not None, bed.log_text("pg-up") + bed.diagnose()
    first_ping = time.monotonic() - started
    report("up: first ping through the VPN %.2fs after starting `proxyguard.py up`"
           % first_ping)
    assert first_ping < 3, bed.log_text("pg-up")
    runtime_file = up_runtime_file(bed)
    assert oct(os.stat(runtime_file).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.dirname(runtime_file)).st_mode & 0o777) == "0o700"
    assert "ProxyEndpoint =" not in open(runtime_file).read()
    assert "mtu 1420 " in bed.sh("ip", "link", "show", bed.wg_client, ns=bed.ns_client)
    assert "nameserver 10.214.7.2" in bed.resolv_conf()  # the profile's DNS, by resolvconf
    # The tunnel's TCP connection stays outside the VPN: marked, it takes the main table.
    assert bed.sh("wg", "show", bed.wg_client, "fwmark", ns=bed.ns_client).strip() == "0xca6c"
    connections = bed.sh("ss", "-Htne", "state", "established", ns=bed.ns_client)
    assert "fwmark:0xca6c" in connections, connections  # 51820: wg-quick's table and mark
    assert_up_stops_cleanly(bed, runtime_file)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_up_two_peers_in_one_profile_both_pingable_and_reconnect_without_dns(tmp_path, request,
                                                                             report):
    """Two ProxyEndpoint peers, two servers (each a proxyguard.py server and a WireGuard):
    one process, a tunnel each, both tunnel addresses answer. The servers' names resolve
    (a hosts file) only at the start: once they are gone, the first server restarts, its
    peer reconnects to the addresses kept, and the other peer's tunnel never went down."""
    bed = profile_bed(tmp_path, request, servers=2)
    started = time.monotonic()
    bed.run_up()
    for index in range(2):
        assert bed.wait_ping_to(index, timeout=20) is not None, (
            bed.log_text("pg-up") + bed.diagnose())
    report("up, two peers: both pinged %.2fs after starting `proxyguard.py up`"
           % (time.monotonic() - started))
    for index in range(2):
        bed.wait_log("pg-up", "peer %s: tunnel up: " % bed.url(index))
        bed.wait_log("pg-server%d" % index, "tunnel up")
    bed.forget_names()
    lookup = bed.sh("getent", "hosts", bed.SERVER_NAME % 0, ns=bed.ns_client, check=False)
    assert lookup == "", lookup
    bed.send_signal("pg-server0", signal.SIGKILL)
    bed.wait_log("pg-up", "peer %s: tunnel down: " % bed.url(0))
    bed.start_server(0)
    assert bed.wait_ping_to(0, timeout=30) is not None, bed.log_text("pg-up") + bed.diagnose()
    bed.wait_log("pg-up", "peer %s: tunnel up: " % bed.url(0), count=2)
    assert "peer %s: tunnel down" % bed.url(1) not in bed.log_text("pg-up")
    assert bed.wait_ping_to(1, timeout=5) is not None
    assert_up_stops_cleanly(bed, up_runtime_file(bed), signal.SIGINT)  # Ctrl-C


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_up_refuses_an_interface_not_its_own_and_when_wg_quick_fails_leaves_no_file(
        tmp_path, request):
    """An interface of the profile's name exists already, and no up of ours made it: up says
    what to do in one line, exits 1, and writes no runtime file. Then wg-quick up itself
    fails (its userspace WireGuard cannot run): up says so in one line with wg-quick's own
    words, exits 1, and removes its runtime file."""
    bed = profile_bed(tmp_path, request, servers=1)
    bed.sh("ip", "link", "add", bed.wg_client, "type", "veth", "peer", "name",
           "wgd" + bed.tag, ns=bed.ns_client)  # this kernel has no dummy interfaces
    before = runtime_directories()
    proc = bed.run_up()
    assert proc.wait(30) == 1, bed.log_text("pg-up")
    errors = [line for line in bed.log_text("pg-up").splitlines() if " ERROR " in line]
    assert errors == [errors[0]] and errors[0].endswith(
        "interface %s exists already, and no proxyguard.py up of this profile brought it up: "
        "take it down first (ip link del %s; wg-quick down FILE if wg-quick brought it up from "
        "FILE), or copy the profile to another name (the interface is named after the file)"
        % (bed.wg_client, bed.wg_client)), errors
    assert "wg-quick up" not in bed.log_text("pg-up")
    assert runtime_directories() <= before
    bed.sh("ip", "link", "del", bed.wg_client, ns=bed.ns_client)

    proc = bed.run_up(userspace=os.path.join(bed.workdir, "no-such-wireguard"))
    assert proc.wait(30) == 1, bed.log_text("pg-up")
    errors = [line for line in bed.log_text("pg-up").splitlines() if " ERROR " in line]
    assert len(errors) == 2 and "wg-quick up /run/proxyguard-" in errors[1], errors
    runtime_file = re.search(r"wg-quick up (\S+) failed", errors[1]).group(1)
    assert not os.path.exists(os.path.dirname(runtime_file))
    assert bed.leftovers() == []


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_up_after_a_sigkill_takes_the_dead_ups_wireguard_down_and_comes_up_again(
        tmp_path, request):
    """up killed hard (SIGKILL: no wg-quick down) leaves its interface, routes, DNS and runtime
    directory. While it ran, a second up of the profile was refused in one line naming its pid;
    once it is gone, the next up says in one line that it takes the dead one's WireGuard down
    (with its runtime file), removes its directory, comes up (the ping answers again), and after
    SIGTERM nothing is left."""
    bed = profile_bed(tmp_path, request, servers=1)
    first = bed.run_up()
    assert bed.wait_ping_to(0, timeout=20) is not None, bed.log_text("pg-up") + bed.diagnose()
    runtime_file = up_runtime_file(bed)
    with open(os.path.join(os.path.dirname(runtime_file), "owner")) as stream:
        owner = pg.RuntimeOwner.parse(stream.read())
    assert (owner.interface, owner.pid) == (bed.wg_client, first.pid), owner

    second = bed.run_up("pg-up2")
    assert second.wait(30) == 1, bed.log_text("pg-up2")
    errors = [line for line in bed.log_text("pg-up2").splitlines() if " ERROR " in line]
    assert errors == [errors[0]] and errors[0].endswith(
        "%s is up already, by proxyguard.py up (pid %d), which still runs: stop that one first "
        "(kill %d)" % (bed.wg_client, first.pid, first.pid)), errors
    assert bed.wait_ping_to(0, timeout=5) is not None  # the refusal changed nothing

    bed.send_signal("pg-up", signal.SIGKILL)
    assert bed.wg_client in bed.sh("ip", "link", "show", ns=bed.ns_client)  # the crash's leftovers
    assert os.path.exists(runtime_file) and "nameserver 10.214.7.2" in bed.resolv_conf()

    bed.run_up()
    bed.wait_log("pg-up", "WireGuard up: wg-quick up", count=2, timeout=30)
    assert bed.wait_ping_to(0, timeout=20) is not None, bed.log_text("pg-up") + bed.diagnose()
    log_text = bed.log_text("pg-up")
    taken_down = ("%s was left up by an earlier up (pid %d) that ended without taking it down: "
                  "taken down (wg-quick down %s), its runtime directory removed"
                  % (bed.wg_client, first.pid, runtime_file))
    assert log_text.count(taken_down) == 1, log_text
    assert not os.path.exists(os.path.dirname(runtime_file))
    assert up_runtime_file(bed) != runtime_file
    assert_up_stops_cleanly(bed, up_runtime_file(bed))


@pytest.mark.slow
def test_up_keeps_its_runtime_file_when_wg_quick_down_fails_and_the_next_up_clears_it(
        tmp_path, request):
    """The interface deleted under a running up (ip link del): at SIGTERM wg-quick down fails;
    up says so in one line, exits 1 and keeps its runtime directory (the file that takes
    wg-quick's rules and DNS down); the next up, finding the interface gone, removes the
    directory with one line and comes up."""
    bed = profile_bed(tmp_path, request, servers=1)
    first = bed.run_up()
    assert bed.wait_ping_to(0, timeout=20) is not None, bed.log_text("pg-up") + bed.diagnose()
    runtime_file = up_runtime_file(bed)
    bed.sh("ip", "link", "del", bed.wg_client, ns=bed.ns_client)
    assert bed.send_signal("pg-up", signal.SIGTERM, timeout=20) == 1, bed.log_text("pg-up")
    errors = [line for line in bed.log_text("pg-up").splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        "%s stays for the next up to take it down (or wg-quick down %s)"
        % (runtime_file, runtime_file)), errors
    assert os.path.exists(runtime_file)

    bed.run_up()
    bed.wait_log("pg-up", "WireGuard up: wg-quick up", count=2, timeout=30)
    assert bed.wait_ping_to(0, timeout=20) is not None, bed.log_text("pg-up") + bed.diagnose()
    removed = ("removed %s, left by an earlier up of %s (pid %d) that ended without removing "
               "it (its interface is gone)" % (os.path.dirname(runtime_file), bed.wg_client,
                                               first.pid))
    assert bed.log_text("pg-up").count(removed) == 1, bed.log_text("pg-up")
    assert not os.path.exists(os.path.dirname(runtime_file))
    assert_up_stops_cleanly(bed, up_runtime_file(bed))


def test_peer_log_names_prefix_only_the_threads_speaking_for_a_peer(caplog):
    names = pg.PeerLogNames()
    pg.log.addFilter(names)
    try:
        with caplog.at_level(logging.INFO, logger="proxyguard"):
            with names.speaking_for("http://a/100%25"):
                pg.log.info("tunnel up: %s", "x")
                pg.log.info("no arguments, 100%")
                other = threading.Thread(target=pg.log.info, args=("another thread",))
                other.start()
                other.join()
                started = threading.Thread(target=contextvars.copy_context().run,
                                           args=(pg.log.info, "a thread in its context"))
                started.start()  # as Tunnel.run starts its UDP pump
                started.join()
            pg.log.info("after the block")
    finally:
        pg.log.removeFilter(names)
    assert [record.getMessage() for record in caplog.records] == [
        "peer http://a/100%25: tunnel up: x", "peer http://a/100%25: no arguments, 100%",
        "another thread", "peer http://a/100%25: a thread in its context", "after the block"]


def test_bench_peers_profile_goes_through_up_and_its_ports_come_back_in_peer_order():
    """The bench's peers test writes a profile for up (peers_profile) and reads the tunnels'
    ports from what up writes (endpoint_ports): up's own parser and rewriter in between."""
    urls = ["http://127.0.0.1:8080/peer%d" % index for index in range(300)]
    profile = pg.parse_profile(proxyguard_bench.peers_profile(urls), "bench")
    assert [str(url) for _, url in profile.proxy_peers] == urls
    allowed = [profile.values(section, "allowedips")[0] for section, _ in profile.proxy_peers]
    assert len(set(allowed)) == len(urls)  # WireGuard refuses one AllowedIPs for two peers
    ports = {section: 40000 + index for index, (section, _) in enumerate(profile.proxy_peers)}
    written = pg.rewrite_profile(profile, ports, 51821, proxyguard_bench.PEERS_FWMARK)
    assert endpoint_ports(written) == list(range(40000, 40000 + len(urls)))


def test_bench_peers_test_refuses_fewer_than_two_peers_before_starting_anything(capsys):
    assert proxyguard_bench.main(["--tests", "peers", "--peers", "1"]) == 2
    assert "--peers 1: the peers test needs 2 or more" in capsys.readouterr().err
    assert proxyguard_bench.main(["--tests", "peers,pong"]) == 2
    assert "unknown test(s): pong" in capsys.readouterr().err


# =============================================================================================
# Documentation: --help per mode, the README's paths and sections, the example configs and units
# =============================================================================================


def help_of(*args):
    """`proxyguard.py ARGS --help` at 80 columns (a terminal's usual width): its lines."""
    result = run_cli(*(list(args) + ["--help"]), env={"COLUMNS": "80"})
    assert result.returncode == 0 and not result.stderr, result
    return result.stdout.splitlines()


def shown_options(lines):
    """The long options a --help shows, each at the start of its entry."""
    return {found.group(1) for line in lines
            for found in [re.match(r"  (?:-\w(?: \S+)?, )?--([\w-]+)", line)] if found}


@pytest.mark.parametrize("mode", ["client", "server", "check", "up"])
def test_help_of_a_mode_shows_its_options_alone_grouped_in_under_70_lines(mode):
    """`client --help`, `server --help` and `check --help` printed the same 96 lines, every
    option of every mode, ungrouped (issue 17, 6)."""
    lines = help_of(mode)
    assert len(lines) < 70, "\n".join(lines)
    assert lines[0] == "usage: proxyguard.py %s [options]" % mode
    keys = set(pg.settable_options(pg.build_parser())) - {"mode"}
    assert shown_options(lines) == {key for key in keys if pg.takes_option(mode, key)} | {
        "help", "config", "version"}
    others = [key for key in keys if not pg.takes_option(mode, key)]
    named = [key for key in others if re.search(r"--%s(?![\w-])" % key, "\n".join(lines))]
    assert others and not named, named
    titles = [line[:-1] for line in lines if line[:-1] in pg.HELP_GROUPS and line[-1] == ":"]
    assert titles == list(pg.HELP_GROUPS), lines  # every group, in order
    entry = {key: group for group in titles for key in shown_options(
        lines[lines.index(group + ":"):lines.index("", lines.index(group + ":"))])}
    assert all(entry[key] == pg.OPTION_GROUPS[key] for key in entry), entry
    if mode == "server":  # --to is WireGuard's address there, not a URL
        assert "  --to HOST:PORT              WireGuard's HOST:PORT (default 127.0.0.1:51820)" \
            in lines


def test_help_without_a_mode_lists_the_modes_and_every_option():
    lines = help_of()
    text = "\n".join(lines)
    for mode in pg.MODES:
        assert re.search(r"^  %s +%s" % (mode, re.escape(pg.MODE_DESCRIPTIONS[mode][:20])),
                         text, re.M), mode
    assert shown_options(lines) == set(pg.settable_options(pg.build_parser())) | {
        "help", "config", "version"}
    assert "proxyguard.py MODE --help" in text


@pytest.mark.parametrize("mode", [None, "client", "server", "check"])
def test_help_states_the_precedence_parse_options_applies(mode, tmp_path):
    """The epilog said 'command-line values override environment variables which override
    defaults' (configargparse's words), leaving out the config file that ranks between."""
    text = " ".join(help_of(*([mode] if mode else [])))
    assert "Precedence: command line > config file > environment > defaults." in text
    assert "override" not in text
    # ... and that is the order parse_options applies (one option set by each in turn).
    conf = tmp_path / "c.conf"
    conf.write_text("mode = client\nto = http://x/\nlisten-port = 1111\nforward-port = 2221\n")
    env = {"PROXYGUARD_LISTEN_PORT": "1112", "PROXYGUARD_FORWARD_PORT": "2222",
           "PROXYGUARD_TCP_PORT": "3332"}
    options = pg.parse_options(["-c", str(conf), "--listen-port", "1110"], environ=env)
    assert (options.listen_port, options.forward_port, options.tcp_port,
            options.idle_timeout) == (1110, 2221, 3332, pg.DEFAULT_IDLE_TIMEOUT)


def test_every_option_has_a_help_group():
    """A new option is one line in OPTION_GROUPS (and its modes in OPTION_MODES)."""
    parser = pg.build_parser()
    keys = set(pg.settable_options(parser)) | {"help", "config", "version"}
    assert keys == set(pg.OPTION_GROUPS), keys ^ set(pg.OPTION_GROUPS)
    assert set(pg.OPTION_GROUPS.values()) == set(pg.HELP_GROUPS)


def test_client_says_it_does_not_use_sockets_systemd_passed(tmp_path, procs):
    """A client started with LISTEN_FDS (a socket unit pointed at a client instance) ignored
    them without a word (issue 17, 8): one warning line, and the client runs."""
    assert pg.unused_listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "41"}, pid=42) is None
    assert pg.unused_listen_fds({"LISTEN_FDS": "0"}) is None and pg.unused_listen_fds({}) is None
    port = free_port()
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, port), env={"LISTEN_FDS": "1"})
    procs.append(client)
    warnings_logged = [line for line in client.log().splitlines() if " WARNING " in line]
    assert len(warnings_logged) == 1 and warnings_logged[0].endswith(
        "LISTEN_FDS=1: the client does not use sockets from systemd: socket activation is "
        "for the server (proxyguard-server.socket starts proxyguard@server); the client binds "
        "its own UDP port (--listen-port)"), client.log()
    assert client.stop() == 0


EXAMPLE_CONFIGS = {"client": "proxyguard.conf.example", "server": "proxyguard-server.conf.example"}


def active_config_lines(name):
    """{key: value} of an example config's lines that are not comments."""
    with open(os.path.join(HERE, name)) as f:
        return dict(line.split(" = ", 1) for line in f.read().splitlines()
                    if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize("mode", sorted(EXAMPLE_CONFIGS))
def test_example_configs_set_only_defaults_beyond_mode_and_url(mode):
    """Their header says the values are the defaults unless marked 'example', but the client's
    turned metrics-listen on while its comment said off (issue 17, 8)."""
    path = os.path.join(HERE, EXAMPLE_CONFIGS[mode])
    from_file = pg.parse_options(["-c", path], environ={})
    to = ["--to", "https://vpn.example.org/proxyguard"] if mode == "client" else []
    defaults = pg.parse_options([mode] + to, environ={})
    assert from_file.mode == mode and from_file.metrics_listen is None
    names = pg.settable_options(pg.build_parser())
    for key in active_config_lines(EXAMPLE_CONFIGS[mode]):
        dest = names[key].dest
        if dest == "to" and mode == "server":  # the file's is the default: compare its meaning
            dest = "wireguard"
        assert str(getattr(from_file, dest)) == str(getattr(defaults, dest)), key


def test_server_example_config_runs_a_server(tmp_path, echo, procs):
    """The socket unit starts proxyguard@server, which reads /etc/proxyguard/server.conf; the
    only example was a client's (issue 17, 8). Here it runs as shipped, its address and
    WireGuard's given on the command line (free ports; the command line wins over the file)."""
    server = Proc(tmp_path, ["-c", os.path.join(HERE, EXAMPLE_CONFIGS["server"]),
                             "--listen", "%s:%d" % (LOOPBACK, free_port()),
                             "--to", "%s:%d" % (LOOPBACK, echo.port)], name="server")
    procs.append(server)
    server.port = int(re.search(r"server listening on [\d.]+:(\d+)", server.log()).group(1))
    client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port))
    procs.append(client)
    assert client.wireguard.roundtrip(b"server.conf") == b"server.conf"
    assert client.stop() == 0 and server.stop() == 0


def unit_lines_uncommented(text, prefixes):
    """The unit's text with its commented-out lines that start with `prefixes` switched on."""
    return re.sub(r"^#(%s)" % "|".join(map(re.escape, prefixes)), r"\1", text, flags=re.M)


def test_unit_passes_a_root_only_tls_key_with_load_credential(tmp_path):
    """A DynamicUser=yes unit cannot read a 0600 root key ('--tls-key ...: permission
    denied'): the unit shows LoadCredential= lines (issue 17, 8). Switched on, they pass
    `systemd-analyze verify`, and their variables reach the server through the shipped
    server config (which leaves tls-cert and tls-key out, or it would win over them)."""
    analyze = which_or_skip("systemd-analyze", "systemd")
    with open(os.path.join(HERE, "proxyguard@.service")) as f:
        unit = unit_lines_uncommented(f.read(), ["LoadCredential=", "Environment=PROXYGUARD_TLS"])
    credentials = dict(re.findall(r"^LoadCredential=([\w-]+):(/\S+)$", unit, re.M))
    assert sorted(credentials) == ["tls-cert", "tls-key"], unit
    (tmp_path / "proxyguard@server.service").write_text(unit)
    result = subprocess.run([analyze, "verify", "--man=no",
                             str(tmp_path / "proxyguard@server.service")],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 0 and "proxyguard" not in result.stderr, result.stderr
    variables = re.search(r"^Environment=(.*)$", unit, re.M).group(1).split()
    # %d: the service's credentials directory, where systemd puts the copies.
    environ = dict(word.replace("%d", str(tmp_path)).split("=", 1) for word in variables)
    assert environ == {"PROXYGUARD_TLS_CERT": str(tmp_path / "tls-cert"),
                       "PROXYGUARD_TLS_KEY": str(tmp_path / "tls-key")}
    options = pg.parse_options(["-c", os.path.join(HERE, EXAMPLE_CONFIGS["server"])],
                               environ=environ)
    assert (options.tls_cert, options.tls_key) == (environ["PROXYGUARD_TLS_CERT"],
                                                   environ["PROXYGUARD_TLS_KEY"])


def readme_text(name="README.md"):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def readme_blocks(text, language):
    """The ```language blocks of a Markdown text."""
    return re.findall(r"```%s\n(.*?)```" % language, text, re.S)


def test_quick_start_puts_the_users_path_first_and_ci_run_as_the_developers():
    """`bash .ci/run` was the Quick start's second command; as root it installs about twenty
    packages and stops the machine's web servers: on the VPN server behind the web server on
    port 443, the site goes down (issue 17, 4)."""
    text = readme_text()
    section = readme_section("Quick start")
    assert [words[0] for words in readme_commands(section)[:2]] == ["server", "check"]
    first_block = readme_blocks(section, "sh")[0]
    assert first_block.startswith("python3 proxyguard.py server")
    ci_line = next(line for line in section.splitlines() if line.startswith("bash .ci/run"))
    assert "developers" in ci_line
    assert section.index(ci_line) > section.index("python3 proxyguard.py check")
    assert text[:text.index(ci_line)].count("\n") < 60  # still on the first screen
    with open(os.path.join(HERE, ".ci", "run")) as f:
        stopped = re.search(r"^for service in ([\w ]+); do$", f.read(), re.M).group(1).split()
    named = re.search(r"stops the ([\w, ]+?) services", " ".join(section.split())).group(1)
    assert re.split(r", | and ", named) == stopped, named
    assert "never on a production server" in " ".join(section.split())


def test_readme_wireguard_configurations_keep_the_mtu_it_recommends():
    """The client example said `MTU = 1380  # see "The MTU question"`, whose answer is to keep
    1420 (issue 17, 5). Its Endpoint on 127.0.0.1 needs the line: wg-quick would take
    loopback's MTU (65536 - 80) without it."""
    text = readme_text()
    recommended = re.search(r"keep WireGuard's default MTU of (\d+)\.",
                            " ".join(readme_section("Reference").split())).group(1)
    configs = [block for block in readme_blocks(text, "ini") if "[Interface]" in block]
    assert len(configs) >= 2
    for block in configs:
        for mtu in re.findall(r"^MTU = (\d+)", block, re.M):
            assert mtu == recommended, block
        if re.search(r"^ProxyEndpoint = ", block, re.M):
            continue  # a profile for up, which writes MTU = PROFILE_DEFAULT_MTU (below)
        if re.search(r"^Endpoint = 127\.0\.0\.1:", block, re.M):
            assert re.search(r"^MTU = ", block, re.M), block
    assert str(pg.PROFILE_DEFAULT_MTU) == recommended
    assert "### The MTU question" in text


def test_readme_deployment_end_to_end_fits_together():
    """'Then, the real deployment' needed an nginx block 270 lines further down and showed no
    server configuration (issue 17, 12). The section now holds both WireGuard configurations,
    the commands and the nginx location, and their ports and paths agree."""
    section = readme_section("A real deployment, end to end")
    server_conf, client_conf = [block for block in readme_blocks(section, "ini")
                                if "[Interface]" in block]

    def value(block, key):
        return re.search(r"^%s = (\S+)" % key, block, re.M).group(1)

    commands = {words[0]: words for words in readme_commands(section)}
    server = pg.parse_options(commands["server"], environ={})
    client = pg.parse_options(commands["client"], environ={})
    assert int(value(server_conf, "ListenPort")) == server.wireguard[1]
    assert value(client_conf, "Endpoint") == "127.0.0.1:%d" % client.listen_port
    assert int(value(client_conf, "ListenPort")) == client.forward_port
    assert value(server_conf, "AllowedIPs") == value(client_conf, "Address")
    assert client.fwmark == int(value(client_conf, "ListenPort"))  # wg-quick's FwMark
    location, = readme_blocks(section, "nginx")
    assert re.search(r"^location %s \{" % re.escape(client.servers[0].target), location, re.M), location
    assert "proxy_pass http://%s:%d;" % server.listen in location
    assert commands["check"][1:] == ["--to", str(client.servers[0])]


def test_readme_nginx_configurations_pass_the_real_client():
    """The worked nginx example left out Host and X-Forwarded-For, so the server logged
    127.0.0.1 for every client (issue 17, 8). Every nginx block sets the headers that the
    tested configuration (NGINX_TEMPLATE, test_tunnel_through_reverse_proxy) sets."""
    wanted = {"Upgrade", "Connection", "Host", "X-Forwarded-For"}
    assert wanted <= set(re.findall(r"proxy_set_header (\S+)", NGINX_TEMPLATE))
    blocks = [block for block in readme_blocks(readme_text(), "nginx") if "proxy_pass" in block]
    assert len(blocks) >= 3
    for block in blocks:
        assert wanted <= set(re.findall(r"proxy_set_header (\S+)", block)), block


def test_readme_says_where_pipx_installs_for_a_unit():
    """As root, `pipx install .` lands in /root/.local, which the unit's ProtectHome=yes hides
    (issue 17, 8): the README installs into directories the unit sees, and points the unit
    at the command there."""
    text = " ".join(readme_text().split())
    home, bin_dir = re.search(r"PIPX_HOME=(\S+) PIPX_BIN_DIR=(\S+) pipx install \.", text).groups()
    for directory in (home, bin_dir):  # what ProtectHome=yes hides
        assert not directory.startswith(("/root", "/home", "/run/user", "~")), directory
    assert "ExecStart=%s/proxyguard -c /etc/proxyguard/%%i.conf" % bin_dir in text
    with open(os.path.join(HERE, "proxyguard@.service")) as f:
        unit = f.read()
    assert re.search(r"^ProtectHome=yes$", unit, re.M)
    assert "PIPX_HOME=%s PIPX_BIN_DIR=%s pipx install ." % (home, bin_dir) in " ".join(
        unit.split())


def test_readme_shows_the_units_load_credential_lines():
    """The README's LoadCredential= drop-in is the unit's commented-out one, which
    test_unit_passes_a_root_only_tls_key_with_load_credential verifies (issue 17, 8)."""
    with open(os.path.join(HERE, "proxyguard@.service")) as f:
        unit = unit_lines_uncommented(f.read(), ["LoadCredential=", "Environment=PROXYGUARD_TLS"])
    wanted = re.findall(r"^(?:LoadCredential|Environment)=.*$", unit, re.M)
    drop_in = next(block for block in readme_blocks(readme_text(), "ini")
                   if "LoadCredential=" in block)
    assert drop_in.splitlines() == ["[Service]"] + wanted


def test_readme_reader_path_first_and_the_measurements_in_their_own_document():
    """The README was 875 lines, about 40 % measurements (issue 17, 12): the reader's path
    first, the reference next, the measurements in MEASUREMENTS.md, summarised in one table."""
    text = readme_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    path = ["Quick start", "A real deployment, end to end",
            "The front: a web server, a CDN, or an HTTP proxy", "Operating it", "Reference",
            "Development"]
    assert [heading for heading in headings if heading in path] == path, headings
    measurements = readme_text("MEASUREMENTS.md")
    assert "proxyguard_bench: " not in text and "proxyguard_bench: " in measurements
    assert "| 1380 | 142.0" not in text and "| 1380 | 142.0" in measurements
    header = " ".join(measurements[:measurements.index("\n## ")].split())
    assert "CPython 3.11.2" in header and "2 CPUs" in header and "x86_64" in header
    performance = text[text.index("### Performance"):text.index("\n## ", text.index(
        "### Performance"))]
    assert "(MEASUREMENTS.md)" in performance
    rows = [line for line in performance.splitlines() if line.startswith("|")]
    assert len(rows) > 5 and all(line.count("|") == rows[0].count("|") for line in rows)
    assert len(re.findall(r"\n\n\|", performance)) == 1  # one table
    for figure in re.findall(r"\d+\.\d+", "\n".join(rows)):  # each figure is measured there
        assert figure in measurements, figure


@pytest.mark.slow
def test_readme_client_configuration_gets_its_mtu_from_wg_quick(tmp_path):
    """Real wg-quick (with wireguard-go) in a network namespace of its own brings up the
    README's client configuration with the MTU it writes out, 1420; without that line
    wg-quick takes loopback's MTU for an Endpoint on 127.0.0.1 (65536 - 80), which is why
    the README writes it out (issue 17, 5)."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (a network namespace, wg-quick)")
    for program, package in [("wg-quick", "wireguard-tools"), ("wireguard-go", "wireguard-go"),
                             ("ip", "iproute2")]:
        which_or_skip(program, package)
    section = readme_section("A real deployment, end to end")
    config = next(block for block in readme_blocks(section, "ini")
                  if re.search(r"^Endpoint = 127\.0\.0\.1:", block, re.M))

    def key_pair():
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
        public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        return private, public

    config = config.replace("<client private key>", key_pair()[0]).replace(
        "<server public key>", key_pair()[1])
    tag = "%d%04d" % (os.getpid() % 10000, random.randrange(10000))
    namespace, interface = "pg17mtu-" + tag, "pgm" + tag  # unique: wireguard-go's socket
    conf = tmp_path / (interface + ".conf")  # wg-quick names the interface after the file

    def up_mtu(text):
        conf.write_text(text)
        conf.chmod(0o600)
        subprocess.run(["ip", "netns", "exec", namespace, "wg-quick", "up", str(conf)],
                       check=True, capture_output=True, timeout=60)
        try:
            link = subprocess.run(["ip", "-n", namespace, "link", "show", interface],
                                  capture_output=True, text=True, check=True, timeout=10).stdout
            return int(re.search(r" mtu (\d+) ", link).group(1))
        finally:
            subprocess.run(["ip", "netns", "exec", namespace, "wg-quick", "down", str(conf)],
                           capture_output=True, timeout=60)

    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True, timeout=15)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True,
                       timeout=15)  # as on a real machine: 127.0.0.1 routes through lo
        assert up_mtu(config) == 1420
        assert up_mtu(re.sub(r"^MTU = .*\n", "", config, flags=re.M)) == 65536 - 80
    finally:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                              text=True, timeout=15).stdout.split()
        for pid in pids:  # a wireguard-go that outlived its interface
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=15)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(WG_RUN_DIR, interface + ".sock"))


def test_a_mode_that_takes_another_modes_options_keeps_its_own(monkeypatch):
    """check takes the client's options; a mode added later the same way (one line in
    MODE_TAKES_OPTIONS_OF) keeps its own options too, in --help and in the mode check."""
    assert pg.takes_option("check", "fwmark") and not pg.takes_option("check", "listen")
    assert pg.takes_option("server", "log-level") and not pg.takes_option("server", "proxy")
    monkeypatch.setitem(pg.MODE_TAKES_OPTIONS_OF, "later", "client")
    monkeypatch.setitem(pg.OPTION_MODES, "profile", ("later",))
    assert pg.takes_option("later", "profile") and pg.takes_option("later", "fwmark")
    assert not pg.takes_option("later", "listen") and not pg.takes_option("client", "profile")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_readme_deployment_runs_end_to_end(tmp_path):
    """The README's deployment as written, in two network namespaces with UDP between them
    dropped: its two WireGuard configurations under wg-quick (wireguard-go), its server,
    check and client commands, its nginx location with TLS on 443 in front. The client's
    AllowedIPs = 0.0.0.0/0 needs its --fwmark 51820; a ping crosses the VPN, and the server
    logs the client's real address from nginx's X-Forwarded-For (issue 17, 12 and 8). The only
    additions: --peer-ips and --ca-file, since vpn.example.org is not in any DNS or store."""
    import ipaddress
    import textwrap
    import proxyguard_testbed as testbed
    reason = WireGuardBed.unavailable("nginx") or (
        None if shutil.which("wg-quick") else "wg-quick is not installed (wireguard-tools)")
    if reason:
        skip_or_fail(reason)
    section = readme_section("A real deployment, end to end")
    server_conf, client_conf = [block for block in readme_blocks(section, "ini")
                                if "[Interface]" in block]
    location, = readme_blocks(section, "nginx")
    commands = {words[0]: words for words in readme_commands(section)}
    url = pg.ServerURL(commands["client"][commands["client"].index("--to") + 1])
    bed = WireGuardBed(tmp_path / "bed", front_end="nginx")
    configs = []
    try:
        remove_stale_beds()
        bed._make_network()
        # As on a real client, the server is reached through the default route, which
        # wg-quick's AllowedIPs = 0.0.0.0/0 takes over: without --fwmark, a routing loop.
        bed.sh("ip", "route", "del", ipaddress.ip_interface("%s/%d" % (
            testbed.VETH_CLIENT_IP, testbed.VETH_PREFIX)).network, "dev", bed.veth_client,
            ns=bed.ns_client)
        bed.sh("ip", "route", "add", "default", "dev", bed.veth_client, ns=bed.ns_client)
        bed._make_keys()
        tls = make_certificates(tmp_path, hosts=(url.host,))
        reach = ["--peer-ips", testbed.VETH_SERVER_IP, "--ca-file", tls.ca]
        bed.spawn("pg-server", bed.ns_server, [sys.executable, SCRIPT] + commands["server"])
        bed.wait_log("pg-server", "listening on")
        directory = os.path.join(bed.workdir, "nginx")
        os.makedirs(directory)
        nginx = testbed.NGINX_CONF.format(dir=directory, cert=tls.cert, key=tls.key,
                                          listen="%s:%d" % (testbed.VETH_SERVER_IP, url.port),
                                          backend="unused")
        nginx, count = re.subn(r"        location /proxyguard \{.*?\n        \}\n",
                               lambda _: textwrap.indent(location, " " * 8), nginx, flags=re.S)
        assert count == 1, nginx
        with open(os.path.join(directory, "nginx.conf"), "w") as stream:
            stream.write(nginx)
        bed.spawn("nginx", bed.ns_server, ["nginx", "-p", directory, "-c",
                                           os.path.join(directory, "nginx.conf"), "-e", "stderr"])
        bed.wait_log("nginx", "start worker process")
        check = bed.sh(sys.executable, SCRIPT, *(commands["check"] + reach), ns=bed.ns_client,
                       timeout=30)
        assert "result   ok" in check, check
        bed.spawn("pg-client", bed.ns_client, [sys.executable, SCRIPT] + commands["client"]
                  + reach)
        bed.wait_log("pg-client", "listening on")
        for side, ns, ifname, text, peer in [
                ("server", bed.ns_server, bed.wg_server, server_conf, "client"),
                ("client", bed.ns_client, bed.wg_client, client_conf, "server")]:
            with open(bed.keys[side][0]) as stream:
                private = stream.read().strip()
            text = re.sub(r"<\w+ private key>", private, text)
            text = re.sub(r"<\w+ public key>", bed.keys[peer][1], text)
            path = os.path.join(bed.workdir, ifname + ".conf")  # wg-quick: the interface name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(text)
            bed.sh("wg-quick", "up", path, ns=ns, timeout=60)
            configs.append((ns, path))
        server_address = re.search(r"^Address = ([\d.]+)", server_conf, re.M).group(1)
        # The bed's own ICMP echo (no ping(8) needed), from the client's namespace.
        answer = bed.agent(bed.ns_client, "wait-ping", server_address, "--timeout", 30,
                           "--interval", 0.2, timeout=45)
        assert answer["ok"], "no ping through the README's VPN: %r\n%s" % (answer,
                                                                          bed.diagnose())
        bed.wait_log("pg-server", "tunnel up: %s (via 127.0.0.1:" % VETH_CLIENT_IP)
        assert "path %s" % url.target in bed.log_text("pg-server")
    finally:
        for ns, path in reversed(configs):
            subprocess.run(["ip", "netns", "exec", ns, "wg-quick", "down", path],
                           capture_output=True, timeout=60)
        for ns in bed._namespaces:  # a wireguard-go that wg-quick left behind
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  timeout=15).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        bed.close()


def test_readme_sections_of_issue_16_say_what_the_tests_run():
    """The three sections: their commands parse, the HAProxy check is the one the tests give
    HAProxy, and the install advice names what a unit needs."""
    for title in ("One server for several nodes", "Several servers behind a load balancer"):
        commands = readme_commands(readme_section(title))
        assert commands, title
        for argv in commands:
            pg.parse_options(argv, {})
    routed = pg.parse_options(readme_commands(readme_section("One server for several nodes"))[0],
                              {})
    assert len(routed.route) == 2 and routed.to is None
    balanced = readme_section("Several servers behind a load balancer")
    for line in HAPROXY_CHECK_HEALTH.splitlines():
        assert line in balanced, line
    moving = readme_section("Moving from the original")
    for words in ("PIPX_BIN_DIR=/usr/local/bin", "ProtectHome=yes", "-tcp-port",
                  "test_the_originals_units_run_with_the_pipx_installed_programs"):
        assert words in moving, words


import proxyguard_testbed as testbed  # noqa: E402 (beside its use, as HOLD_BED_SCRIPT's)


# =============================================================================================
# Several servers for one peer, and a prompt reconnect after an outage: the server-order
# policy with a fake clock, repeatable --to, failover between two real servers (killed: reset;
# silently gone: packets dropped by iptables in a namespace made here), staggered connects
# into a path that comes back, and the WireGuard bed.
# =============================================================================================


def test_server_choice_tries_in_order_from_the_last_carrier_each_with_its_back_off():
    clock = FakeClock()
    choice = pg.ServerChoice([pg.Backoff(), pg.Backoff(), pg.Backoff()], clock=clock)
    assert choice.next() == (0, 0)                     # the first, at once
    choice.failed(0, clock.now, choice.backoffs[0].failed())
    assert choice.next() == (1, 0)                     # the next one, at once, no wait
    choice.carried(1)
    clock.now += 60
    choice.tunnel_ended(1, choice.backoffs[1].tunnel_ended(60))
    assert choice.next() == (1, 0)                     # the last carrier first again
    choice.failed(1, clock.now, choice.backoffs[1].failed())
    assert choice.next() == (2, 0)                     # ... then in order, 0 after 2
    choice.failed(2, clock.now, choice.backoffs[2].failed())
    assert choice.next() == (0, 0)                     # 0's own 1 s passed long ago
    choice.failed(0, clock.now, choice.backoffs[0].failed())   # its 2nd failure: 2 s
    index, wait = choice.next()
    assert (index, wait) == (1, 1.0)                   # all wait: the first one due
    clock.now += 1.0
    assert choice.next() == (1, 0)
    # A wait counts from the start of the attempt: one that spent 10 s without an answer
    # (a path down) has waited out a 1-8 s back-off already: the next starts at once.
    started = clock.now
    clock.now += 10
    choice.failed(1, started, choice.backoffs[1].failed())
    assert choice.next()[1] == 0


def test_path_down_timeout_is_eight_retransmission_timeouts_and_at_least_2_s():
    """A segment's 4 tries (at 0, 1, 3, 7 RTOs) all fail before the client gives up."""
    assert pg.path_down_timeout(None) == pg.path_down_timeout(0.2) == 2.0   # loopback, LAN
    assert pg.path_down_timeout(0.3) == pytest.approx(2.4)                  # a 100 ms path
    assert pg.path_down_timeout(1.0) == 8.0                                 # a satellite
    with socket.create_server((LOOPBACK, 0)) as listener:
        with socket.create_connection(listener.getsockname()) as sock:
            assert 0.2 <= pg.retransmission_timeout(sock) < 1.0   # Linux's 200 ms floor


def test_server_choice_with_one_server_is_the_back_off_of_before():
    clock = FakeClock()
    choice = pg.ServerChoice([pg.Backoff()], clock=clock)
    waits = []
    for _ in range(6):
        choice.failed(0, clock.now, choice.backoffs[0].failed())
        index, wait = choice.next()
        waits.append(wait)
        clock.now += wait
    assert waits == [1, 2, 4, 8, 10, 10]


def test_to_may_be_given_several_times_for_the_client(tmp_path):
    urls = ["http://a.example/pg", "https://b.example/pg"]
    options = pg.parse_options(["client", "--to", urls[0], "--to", urls[1]], environ={})
    assert [str(url) for url in options.servers] == urls and options.servers[0].host == "a.example"
    conf = tmp_path / "client.conf"
    conf.write_text("mode = client\nto = [%s, %s]\n" % tuple(urls))
    options = pg.parse_options(["-c", str(conf)], environ={})
    assert [str(url) for url in options.servers] == urls
    # The command line replaces the file's list; one URL stays one.
    options = pg.parse_options(["-c", str(conf), "--to", "http://c.example/"], environ={})
    assert [str(url) for url in options.servers] == ["http://c.example/"]
    options = pg.parse_options(["client"], environ={"PROXYGUARD_TO": "[%s, %s]" % tuple(urls)})
    assert [str(url) for url in options.servers] == urls
    options = pg.parse_options(["client"], environ={"PROXYGUARD_TO": urls[1]})
    assert [str(url) for url in options.servers] == urls[1:]


def test_server_refuses_a_second_to_and_peer_ips_wants_one_server():
    result = run_cli("server", "--to", "127.0.0.1:51820", "--to", "127.0.0.1:51830")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "proxyguard.py: error: --to given 2 times (127.0.0.1:51820, 127.0.0.1:51830): the "
        "server forwards to one WireGuard HOST:PORT (several nodes: --route PATH=HOST:PORT) "
        "(see --help)"]
    result = run_cli("client", "--to", "http://a.example/", "--to", "http://b.example/",
                     "--peer-ips", "192.0.2.1")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "--peer-ips names one server's addresses" in result.stderr


def test_client_refuses_a_server_named_twice_check_tries_it_twice():
    """The client's metrics label each server by its URL: the same URL twice would be one
    series twice, which Prometheus refuses (and trying one server twice in a row is no
    failover). check may (test_check_with_several_to_checks_each)."""
    result = run_cli("client", "--to", "http://a.example/", "--to", "http://b.example/",
                     "--to", "http://a.example/")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "proxyguard.py: error: --to http://a.example/ given 2 times: name each server once "
        "(the client tries them in order, and its metrics label each by its URL) (see --help)"]


def server_series(samples, name, **labels):
    """{server URL: value} of the per-server series `name` in parsed `samples` whose other
    labels are `labels`."""
    found = {}
    for (sample_name, pairs), value in samples.items():
        rest = dict(pairs)
        server = rest.pop("server", None)
        if sample_name == name and rest == labels:
            found[server] = value
    return found


SERVER_SERIES = ("proxyguard_client_server_carrying",
                 "proxyguard_client_server_tunnels_opened_total",
                 "proxyguard_client_server_dial_failures_total",
                 "proxyguard_client_server_failures_in_a_row")


def test_client_server_metrics_list_every_server_and_mark_the_carrying_one():
    urls = ["http://a.example/pg", "https://b.example/pg"]
    page = pg.render_metrics(pg.Client._server_metrics(1, [(urls[0], 0, 3, 2),
                                                           (urls[1], 4, 1, 0)])).decode()
    samples = parse_metrics(page)
    assert [server_series(samples, name) for name in SERVER_SERIES] == [
        {urls[0]: 0, urls[1]: 1}, {urls[0]: 0, urls[1]: 4}, {urls[0]: 3, urls[1]: 1},
        {urls[0]: 2, urls[1]: 0}]
    for name, kind in zip(SERVER_SERIES, ("gauge", "counter", "counter", "gauge")):
        assert "# TYPE %s %s\n" % (name, kind) in page
        assert re.search(r"# HELP %s \S.{30,}\n" % name, page), name
    # No tunnel open: every server listed, none carrying.
    samples = parse_metrics(pg.render_metrics(pg.Client._server_metrics(
        None, [(urls[0], 1, 0, 0), (urls[1], 0, 0, 0)])).decode())
    assert server_series(samples, "proxyguard_client_server_carrying") == {urls[0]: 0,
                                                                           urls[1]: 0}


def test_client_metrics_follow_the_failover_between_two_real_servers(tmp_path, echo, procs):
    """A client with two servers, the first down at the start: the page says the second
    carries and the first failed; the first comes back and the second goes: the page says the
    first carries and the second none, both had a tunnel; promtool accepts the pages; SIGUSR1
    names the carrying server."""
    promtool = which_or_skip("promtool", "prometheus")
    down_port = free_port()  # the first server's, nothing listening on it yet
    second = start_server(tmp_path, echo.port, name="second")
    procs.append(second)
    urls = ["http://%s:%d/pg" % (LOOPBACK, port) for port in (down_port, second.port)]
    metrics_port = free_port()
    client = start_client(tmp_path, urls[0], "--to", urls[1], "--metrics-listen",
                          "%s:%d" % (LOOPBACK, metrics_port))
    procs.append(client)

    def page():
        status, _, text = scrape(metrics_port)
        checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                                 capture_output=True, timeout=30)
        assert status == 200 and checked.returncode == 0 and not (
            checked.stdout + checked.stderr), checked
        samples = parse_metrics(text)
        return [server_series(samples, name) for name in SERVER_SERIES]

    # Before the first datagram: both servers listed, nothing tried yet.
    assert page() == [dict.fromkeys(urls, 0)] * 4
    assert client.wireguard.roundtrip(b"through the second") == b"through the second"
    client.wait_log("tunnel up: ")
    assert "cannot connect to %s" % urls[0] in client.log()
    assert page() == [{urls[0]: 0, urls[1]: 1}, {urls[0]: 0, urls[1]: 1},
                      {urls[0]: 1, urls[1]: 0}, {urls[0]: 1, urls[1]: 0}]
    client.popen.send_signal(signal.SIGUSR1)
    client.wait_log("SIGUSR1: tunnel ")
    assert re.search(r"SIGUSR1: tunnel 127\.0\.0\.1:%d, %s \(server 2 of 2\): \d+\.\ds, "
                     % (second.port, re.escape(urls[1])), client.log()), client.log()
    # The first comes back, the second goes: the next datagram's tunnel is the first's (the
    # second waits out the back-off of its short-lived tunnel, so it is not dialled).
    first = start_server(tmp_path, echo.port, port=down_port, name="first")
    procs.append(first)
    assert second.stop() == 0
    client.wait_log("tunnel down: ")
    assert client.wireguard.roundtrip(b"through the first") == b"through the first"
    client.wait_log("(server 1 of 2)")
    assert page() == [{urls[0]: 1, urls[1]: 0}, {urls[0]: 1, urls[1]: 1},
                      {urls[0]: 1, urls[1]: 0}, {urls[0]: 0, urls[1]: 0}]
    assert client.stop() == 0 and first.stop() == 0


def test_check_with_several_to_checks_each(tmp_path, echo, procs):
    server = start_server(tmp_path, echo.port)
    procs.append(server)
    dead = "http://%s:%d/" % (LOOPBACK, free_port())
    good = "http://%s:%d/" % (LOOPBACK, server.port)
    result = run_cli("check", "--to", good, "--to", dead)
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("check    ") == 2
    assert "result   ok:" in result.stdout and "result   FAIL:" in result.stdout
    assert run_cli("check", "--to", good, "--to", good).returncode == 0


def datagram_stream(wireguard, stop, interval=0.05):
    """Send numbered datagrams through `wireguard` (a WireGuardStandIn) every `interval` s
    until `stop` is set; returns {number: (sent at, echoed at or None)} (filled as it goes)."""
    times = {}

    def send():
        number = 0
        while not stop.is_set():
            times[number] = [time.monotonic(), None]
            try:
                wireguard.send(struct.pack("!I", number) + b"failover" * 10)
            except OSError:  # closed at the end of the test
                return
            number += 1
            stop.wait(interval)

    def receive():
        wireguard.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data = wireguard.sock.recv(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            entry = times.get(struct.unpack("!I", data[:4])[0])
            if entry is not None and entry[1] is None:
                entry[1] = time.monotonic()

    for target in (send, receive):
        threading.Thread(target=target, daemon=True).start()
    return times


def first_echo_sent_after(times, moment):
    """When the first datagram sent after `moment` came back (None: none yet)."""
    echoed = [back for sent, back in list(times.values()) if sent > moment and back]
    return min(echoed) if echoed else None


def test_client_fails_over_to_the_next_server_when_its_server_goes(echo, caplog):
    """Two servers in-process; the one carrying the tunnel stops (its connections closed, its
    port refusing): the datagram stream flows again through the other within 3 s."""
    with caplog.at_level(logging.INFO, logger="proxyguard"), \
            running_server(echo.port) as second, \
            contextlib.ExitStack() as stack:
        first = stack.enter_context(running_server(echo.port))
        wireguard = WireGuardStandIn()
        client = pg.Client.open(
            pg.Dialer(pg.ServerURL("http://%s:%d/" % first.address)), listen_port=0,
            forward_port=wireguard.port,
            fallbacks=[pg.Dialer(pg.ServerURL("http://%s:%d/" % second.address))])
        wireguard.endpoint = client.address
        thread = threading.Thread(target=client.serve_forever, daemon=True)
        thread.start()
        stop = threading.Event()
        try:
            times = datagram_stream(wireguard, stop)
            wait_until(lambda: first_echo_sent_after(times, 0), 5, "the stream through 1")
            assert "(server 1 of 2)" in caplog.text
            fault = time.monotonic()
            stack.close()  # the first server stops: tunnel closed, port closed
            back = wait_until(lambda: first_echo_sent_after(times, fault), 5,
                              "the stream through the second server")
            assert back - fault <= 3.0
            assert second.tunnels_open() == 1
            assert re.search(r"tunnel up: .*:%d/ \(server 2 of 2\)" % second.address[1],
                             caplog.text), caplog.text
        finally:
            stop.set()
            client.stop()
            thread.join(5)
            wireguard.sock.close()


@pytest.mark.slow  # the cut lasts 5.3 s
def test_a_connect_into_a_black_hole_gets_fresh_attempts_and_finds_the_path_back():
    """The server's accept queue is full (its SYNs dropped: a path cut, on loopback) and then
    has room again 5.3 s into the dial: a fresh attempt connects within CONNECT_STAGGER, not
    at the first socket's next SYN retry: 7 s after its start where the kernel has
    tcp_syn_linear_timeouts (Linux 6.5+: 1, 2, 3, 4, 5, 7 s here), 7 s before (1, 3, 7 s)."""
    port, sockets = blackhole_listeners(1)
    listener, fillers = sockets[0], sockets[1:]
    dialer = pg.Dialer(pg.ServerURL("http://%s:%d/" % (LOOPBACK, port)), connect_timeout=10)
    done = []

    def connect():
        sock, _ = dialer._connect(dialer.resolve(), pg.Deadline(10))
        done.append(time.monotonic())
        sock.close()

    thread = threading.Thread(target=connect, daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(5.3)  # the path is cut for this long: the fault itself, not a wait for it
    for filler in fillers:
        filler.close()
    listener.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()  # room in the queue again
    back = time.monotonic()
    thread.join(10)
    listener.close()
    assert done, "no connection within 10 s"
    assert done[0] - back < 1.0, ("connected %.2f s after the path came back (the dial began "
                                  "%.2f s before)" % (done[0] - back, back - started))


# Inside a namespace made for one test (its own loopback, so fixed ports are fine): a UDP echo
# (WireGuard's stand-in behind the servers) and the stream's driver (WireGuard in front of the
# client): it sends a numbered datagram every INTERVAL s, notes when each comes back, keeps
# the count in a progress file, and prints {number: [sent, echoed]} when its stdin closes.
NS_ECHO = """import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, source = s.recvfrom(70000)
    s.sendto(data, source)
"""
NS_DRIVER = """import json, os, socket, struct, sys, threading, time
port, target, interval, progress = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", port))
times, stop = {}, threading.Event()
def receive():
    sock.settimeout(0.2)
    echoed = 0
    while not stop.is_set():
        try:
            data = sock.recv(70000)
        except socket.timeout:
            continue
        entry = times.get(struct.unpack("!I", data[:4])[0])
        if entry is not None and entry[1] is None:
            entry[1] = time.monotonic()
            echoed += 1
            with open(progress + ".tmp", "w") as stream:
                stream.write("%d %f" % (echoed, entry[1]))
            os.replace(progress + ".tmp", progress)
def send():
    number = 0
    while not stop.is_set():
        times[number] = [time.monotonic(), None]
        sock.sendto(struct.pack("!I", number) + b"stream" * 20, ("127.0.0.1", target))
        number += 1
        stop.wait(interval)
threading.Thread(target=receive, daemon=True).start()
threading.Thread(target=send, daemon=True).start()
sys.stdin.read()
stop.set()
time.sleep(0.3)
print(json.dumps(times))
"""
NS_ECHO_PORT, NS_WIREGUARD_PORT, NS_CLIENT_PORT, NS_SERVER_PORTS = 51820, 51830, 51821, (8081, 8082)


class StreamNamespace:
    """A network namespace of its own with loopback only (named as the bed names its own, so
    remove_stale_beds clears it after a killed run), the UDP echo, two proxyguard servers and
    a client for both (`client_extra` options), and the stream's driver; every process dies
    with the test (setpriv --pdeathsig)."""

    def __init__(self, tmp_path, client_extra=()):
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
            skip_or_fail("needs root, iproute2 and iptables (a network namespace)")
        self.dir = tmp_path
        self.name = "pgbed-c%07d%02d-%d" % (os.getpid(), next(testbed._counter) % 100,
                                            process_start_ticks(os.getpid()))
        self.procs = {}
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True,
                       timeout=15)
        try:
            self.sh("ip", "link", "set", "lo", "up")
            self.spawn("echo", [sys.executable, "-c", NS_ECHO, str(NS_ECHO_PORT)])
            for index, port in enumerate(NS_SERVER_PORTS):
                self.start_server(index)
            self.spawn("client", [sys.executable, SCRIPT, "client"] + [
                arg for port in NS_SERVER_PORTS for arg in ("--to", "http://127.0.0.1:%d/" % port)
            ] + ["--listen-port", str(NS_CLIENT_PORT), "--forward-port",
                 str(NS_WIREGUARD_PORT)] + list(client_extra))
            self.wait_log("client", "listening on")
            self.progress = str(tmp_path / "progress")
            self.driver = subprocess.Popen(
                testbed.DIE_WITH_PARENT + ["ip", "netns", "exec", self.name, sys.executable,
                                           "-c", NS_DRIVER, str(NS_WIREGUARD_PORT),
                                           str(NS_CLIENT_PORT), "0.05", self.progress],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        except BaseException:
            self.close()
            raise

    def sh(self, *cmd):
        return subprocess.run(["ip", "netns", "exec", self.name] + list(cmd), check=True,
                              capture_output=True, text=True, timeout=15).stdout

    def spawn(self, name, argv):
        log_file = open(self.dir / (name + ".log"), "a")
        self.procs[name] = subprocess.Popen(
            testbed.DIE_WITH_PARENT + ["ip", "netns", "exec", self.name] + argv,
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=dict(os.environ, **no_proxy_env()))
        log_file.close()

    def start_server(self, index):
        self.spawn("server%d" % index, [sys.executable, SCRIPT, "server", "--listen",
                                        "127.0.0.1:%d" % NS_SERVER_PORTS[index], "--to",
                                        "127.0.0.1:%d" % NS_ECHO_PORT])
        self.wait_log("server%d" % index, "listening on")

    def log(self, name):
        return (self.dir / (name + ".log")).read_text()

    def wait_log(self, name, text, timeout=10):
        wait_until(lambda: text in self.log(name), timeout, "%r in %s's log" % (text, name))

    def echoed(self):
        """(datagrams echoed so far, when the last came back)."""
        try:
            count, at = open(self.progress).read().split()
        except (OSError, ValueError):
            return 0, None
        return int(count), float(at)

    def wait_echoed(self, more, timeout=10):
        count = self.echoed()[0]
        wait_until(lambda: self.echoed()[0] >= count + more, timeout,
                   "%d more datagrams echoed\n%s" % (more, self.log("client")))

    def drop_port(self, port):
        """Silently gone: every packet to or from `port` dropped, both ways, on loopback."""
        self.sh("iptables", "-I", "INPUT", "-p", "tcp", "-m", "multiport", "--ports", str(port),
                "-j", "DROP")

    def stream_times(self):
        """Stop the driver; [(sent, echoed or None)] of every datagram, in order."""
        out, _ = self.driver.communicate("", timeout=15)
        times = json.loads(out)
        return [tuple(times[key]) for key in sorted(times, key=int)]

    def close(self):
        if getattr(self, "driver", None) is not None and self.driver.poll() is None:
            self.driver.kill()
            self.driver.wait(5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=15)


def gap_after(times, fault):
    """Seconds from `fault` to the first echo of a datagram sent after it, and how many of the
    datagrams sent after it never came back."""
    after = [(sent, back) for sent, back in times if sent > fault]
    back = [back for _, back in after if back is not None]
    return (min(back) - fault if back else None), sum(1 for _, back in after if back is None)


@pytest.fixture
def stream_namespace(tmp_path):
    space = StreamNamespace(tmp_path)
    yield space
    space.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "silently gone"])
def test_two_servers_in_a_namespace_the_carrying_one_fails_under_traffic(
        stream_namespace, fault, capsys):
    """The server carrying the tunnel is SIGKILLed (its connections reset, its port refusing)
    or silently gone (iptables drops its packets: only the client's TCP_USER_TIMEOUT of
    path_down_timeout notices, 2 s on loopback): the stream flows again through the other
    server within 3 s."""
    space = stream_namespace
    space.wait_echoed(20)
    assert "(server 1 of 2)" in space.log("client"), space.log("client")
    if fault == "killed":
        space.procs["server0"].kill()
    else:
        space.drop_port(NS_SERVER_PORTS[0])
    fault_at = time.monotonic()  # the fault is in force (iptables takes a while to start)
    space.wait_log("client", "(server 2 of 2)", timeout=10)
    space.wait_echoed(20)
    gap, lost = gap_after(space.stream_times(), fault_at)
    with capsys.disabled():
        print("\nfailover: server %s under a datagram every 50 ms: the stream flowed again "
              "through the other server %.2f s after the fault; %d datagrams sent after the "
              "fault lost" % (fault, gap, lost))
    assert gap is not None and gap <= 3.0, space.log("client")
    if fault == "silently gone":
        assert "path down: data unacknowledged for 2s" in space.log("client")
    # What was lost went into the dead connection before the client knew: never more than
    # the datagrams sent until it gave the connection up.
    assert lost <= (pg.PATH_DOWN_SECONDS + 1.0) / 0.05, lost


# The WireGuard bed (proxyguard_testbed.py): pings through real WireGuard every 50 ms while a
# fault comes. A cut of the path lasts CUT_SECONDS (scaled down so the test is not long; the
# issue's 20 s with PROXYGUARD_TEST_CUT_SECONDS=20).
CUT_SECONDS = float(os.environ.get("PROXYGUARD_TEST_CUT_SECONDS", "8"))
PING_INTERVAL = 0.05


def pings_flowing(bed, count=10, timeout=15):
    """Wait until WireGuard on the client has received `count` more packets' worth (about 100
    bytes each: answers to the stream's pings)."""
    received = bed.wg_transfer("client")[0]
    wait_until(lambda: bed.wg_transfer("client")[0] >= received + 100 * count, timeout,
               "pings answered through WireGuard\n" + bed.diagnose())


def first_answer_after(pings, moment, sent_after=True):
    """Seconds from `moment` to the first answer (to a ping sent after it, with `sent_after`);
    None if none came."""
    answers = [answered for sent, answered in pings
               if answered is not None and answered > moment and (sent > moment or not sent_after)]
    return min(answers) - moment if answers else None


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "silently gone"])
def test_wireguard_two_servers_for_one_peer_the_carrying_one_fails_under_pings(
        tmp_path, request, fault, report):
    bed = make_bed(tmp_path, request, pg_servers=2)
    assert "(server 1 of 2)" in bed.log_text("pg-client"), bed.log_text("pg-client")
    stream = bed.start_ping_stream(interval=PING_INTERVAL)
    pings_flowing(bed)
    if fault == "killed":
        bed.kill_pg_server()
    else:
        bed.cut_path(testbed.PG_SERVER_PORT)
    fault_at = time.monotonic()
    bed.wait_log("pg-client", "(server 2 of 2)", timeout=15)
    pings_flowing(bed)
    pings = bed.finish(stream, 30)["pings"]
    gap = first_answer_after(pings, fault_at)
    lost = sum(1 for sent, answered in pings if sent > fault_at and answered is None)
    report("two servers for one peer, the carrying one %s under a ping every %g s: pings "
           "answered again through the other %.2f s after the fault (bound 3 s); %d pings "
           "sent after it unanswered" % (fault, PING_INTERVAL, gap, lost))
    assert gap is not None and gap <= 3.0, bed.diagnose()


@pytest.mark.slow
def test_wireguard_path_cut_under_pings_carries_again_within_2s_of_its_return(bed, report):
    """Cut under a ping stream for CUT_SECONDS: the client gives the dead connection up
    (path_down_timeout), dials with staggered attempts (a fresh SYN every CONNECT_STAGGER),
    never waiting out a back-off (a dial that heard nothing has waited already): the first
    answer comes within 2 s of the path's return, where TCP's own retransmissions (RTO
    doubling from 200 ms: 12.6 s, 25.4 s ...) would take seconds more."""
    stream = bed.start_ping_stream(interval=PING_INTERVAL)
    pings_flowing(bed)
    bed.cut_path()
    cut_at = time.monotonic()
    time.sleep(CUT_SECONDS)  # the fault's length, not a wait for an event
    bed.restore_path()
    back = time.monotonic()
    pings_flowing(bed, timeout=30)
    pings = bed.finish(stream, 30)["pings"]
    first = first_answer_after(pings, back, sent_after=False)
    report("path cut for %.1f s under a ping every %g s: first answer %.2f s after the path "
           "came back (bound 2 s); %s (%s)" % (
               back - cut_at, PING_INTERVAL, first,
               plural_lines(bed.log_text("pg-client"), "cannot connect"),
               plural_lines(bed.log_text("pg-client"), "tunnel up")))
    assert first is not None and first <= 2.0, bed.diagnose()
    assert "path down: data unacknowledged" in bed.log_text("pg-client")


def plural_lines(text, word):
    count = text.count(word)
    return "%d '%s' line%s" % (count, word, "" if count == 1 else "s")


@pytest.mark.slow
def test_no_route_to_the_server_waits_at_most_a_second_between_attempts(tmp_path):
    """In a namespace with loopback only, the server's address has no route (the Wi-Fi gone):
    each dial fails at once with 'network is unreachable', and the next comes within
    NO_ROUTE_WAIT instead of the growing back-off (1, 2, 4 s), so a network that comes back is
    used at once. (The address exists nowhere: nothing leaves the namespace.)"""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("needs root and iproute2 (a network namespace)")
    name = "pgbed-s%07d%02d-%d" % (os.getpid(), next(testbed._counter) % 100,
                                   process_start_ticks(os.getpid()))
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=15)
    log_path = tmp_path / "client.log"
    procs = []
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=15)
        with open(log_path, "w") as log_file:
            procs.append(subprocess.Popen(
                testbed.DIE_WITH_PARENT + ["ip", "netns", "exec", name, sys.executable, SCRIPT,
                                           "client", "--to", "http://192.0.2.1:8080/",
                                           "--listen-port", "51821", "--forward-port", "51820"],
                stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ,
                                                                     **no_proxy_env())))
        procs.append(subprocess.Popen(testbed.DIE_WITH_PARENT + [
            "ip", "netns", "exec", name, sys.executable, "-c",
            "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "while True:\n    s.sendto(b'handshake', ('127.0.0.1', 51821))\n"
            "    time.sleep(0.1)\n"]))
        wait_until(lambda: log_path.read_text().count("next attempt in") >= 4, 15,
                   "four failed dials")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
    log = log_path.read_text()
    assert "network is unreachable" in log, log
    waits = re.findall(r"next attempt in ([\d.]+)s", log)
    assert waits[:4] == ["1", "1", "1", "1"], log


# =============================================================================================
# Busy polling (--busy-poll): real processes
# =============================================================================================

class RecordingBusyPolling(pg.BusyPolling):
    """BusyPolling that keeps the BusyPollers it gives out, for their policies' counts."""

    def __init__(self, budget):
        super().__init__(budget)
        self.pollers = []

    def poller(self, fd, turns=None, side=None):
        poller = super().poller(fd, turns, side)
        self.pollers.append(poller)
        return poller


def ping_through(tunnel, ours, wireguard, roundtrips, until=lambda: False):
    """Lone round trips through a running_pump_tunnel, each checked both ways, one at a time:
    `roundtrips` of them, or fewer once `until()` says so after one."""
    address = tunnel.endpoint.sock.getsockname()
    wireguard.settimeout(5)
    decoder = FrameDecoder()
    for index in range(roundtrips):
        wireguard.sendto(numbered(index, 100), address)
        assert read_frames(ours, decoder, 1) == [numbered(index, 100)]
        ours.sendall(pg.encode_frames([numbered(index, 60)]))
        assert wireguard.recv(100) == numbered(index, 60)
        if until():
            return


def test_busy_polling_pumps_find_a_ping_floods_datagrams_by_polling_and_still_close(
        monkeypatch):
    """A flood of lone round trips through a tunnel: both pumps find most of their
    next datagrams by polling (the budget, 1 ms, is far above a loopback round trip), every
    datagram arrives once and in order, and the tunnel ends at its peer's close while both
    pumps poll."""
    # A loaded test machine may keep a give-way off the CPU for a millisecond, which would
    # pause polling for a second (tested on its own above): not here.
    monkeypatch.setattr(pg, "CROWDED_AFTER", 60.0)
    polling = RecordingBusyPolling(0.001)
    roundtrips = 500
    with running_pump_tunnel(busy_polling=polling) as (tunnel, ours, wireguard):
        ping_through(tunnel, ours, wireguard, roundtrips)
    assert len(polling.pollers) == 2  # one a pump
    for poller in polling.pollers:
        assert poller.policy.found > roundtrips / 2, vars(poller.policy)


def real_time_threads():
    """How many threads of this process run under SCHED_RR."""
    count = 0
    for name in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            count += os.sched_getscheduler(int(name)) == os.SCHED_RR
    return count


def test_pumps_go_real_time_when_their_steps_show_crowded_cpus_and_no_other_thread(
        monkeypatch):
    """Every step counted as held off (CROWDED_AFTER 0, as behind CPU hogs): both pumps of
    an in-process tunnel take SCHED_RR through the real sched_setattr once pings go one at a
    time, the rest of the process stays as it was, and the tunnel still ends at its peer's
    close."""
    if os.geteuid() != 0:
        pytest.skip("needs root (or CAP_SYS_NICE) for SCHED_RR")
    monkeypatch.setattr(pg, "CROWDED_AFTER", 0.0)
    schedule, why = pg.own_schedule(0, 1)
    assert why is None and schedule.realtime, why
    assert real_time_threads() == 0
    polling = pg.BusyPolling(0, schedule=schedule)
    with running_pump_tunnel(busy_polling=polling) as (tunnel, ours, wireguard):
        ping_through(tunnel, ours, wireguard, 500, until=lambda: real_time_threads() == 2)
        assert real_time_threads() == 2 and polling.crowding.realtime_pumps == 2
    assert real_time_threads() == 0 and os.sched_getscheduler(0) == os.SCHED_OTHER
    assert polling.crowding.realtime_pumps == 0 and tunnel._pollers == {}  # turns given back


def thread_slices(pid):
    """The scheduler slice (ns) of each thread of process `pid`, from /proc (Linux 6.12+: the
    `se.slice` line; older kernels show none, and --sched-slice does nothing there)."""
    slices = []
    for name in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/sched" % (pid, name)) as stream:
                slices += [int(line.split(":")[1]) for line in stream if
                           line.startswith("se.slice ")]
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return slices


def kernels_slice():
    """The kernel's own slice (ns), from pytest's threads; skips (fails under CI) on a kernel
    that shows none (before Linux 6.12: --sched-slice does nothing there)."""
    slices = thread_slices(os.getpid())
    if not slices:
        skip_or_fail("this kernel shows no se.slice (before Linux 6.12): nothing to set")
    return max(slices)


def test_own_schedule_gives_the_calling_thread_its_level_and_takes_it_back():
    """The slice and real-time priority, read back from /proc for that thread alone, at the
    thread's own nice throughout."""
    kernels = kernels_slice()
    schedule, why = pg.own_schedule(250, 1)
    assert why is None and schedule.refused is None and schedule.realtime, schedule.refused
    seen = []

    def in_a_thread():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 3)  # this thread's nice
        for level in (pg.SHORT_SLICE, pg.REALTIME, pg.SHORT_SLICE, pg.KERNELS):
            schedule.set(level)
            with open("/proc/self/task/%d/sched" % tid) as stream:
                slices = [int(line.split(":")[1]) for line in stream
                          if line.startswith("se.slice ")]
            seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid),
                         [ns for ns in thread_slices(os.getpid()) if ns != kernels],
                         slices if level != pg.REALTIME else None))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert seen == [(os.SCHED_OTHER, 3, [250000], [250000]),
                    (os.SCHED_RR, 3, [], None),  # that thread's only
                    (os.SCHED_OTHER, 3, [250000], [250000]),
                    (os.SCHED_OTHER, 3, [], [kernels])]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the probe's thread was its own


def test_rt_priority_refused_keeps_the_slice_and_says_so_loudly_only_when_asked_for(
        tmp_path):
    """Without CAP_SYS_NICE and with RLIMIT_RTPRIO 0 (a unit without LimitRTPRIO=), the real
    server starts anyway: a WARNING when --rt-priority was given, saying what would permit
    it; on the default a DEBUG line only (a user's run by hand: nothing to act on)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (drops CAP_SYS_NICE)")
    prefix = (which_or_skip("setpriv", "util-linux"), "--inh-caps=-sys_nice",
              "--bounding-set=-sys_nice", which_or_skip("prlimit", "util-linux"),
              "--rtprio=0")
    echo = UdpEcho()
    try:
        for extra, level in ((("--log-level", "debug"), "DEBUG"), ((), None),
                             (("--rt-priority", "1"), "WARNING")):
            server = start_server(tmp_path, echo.port, *extra, prefix=prefix)
            try:
                line = [line for line in server.log().splitlines() if "--rt-priority 1" in line]
                if level is None:
                    assert line == [], server.log()
                    continue
                assert len(line) == 1 and (" %s " % level) in line[0], server.log()
                assert "not permitted (operation not permitted)" in line[0]
                assert "LimitRTPRIO=1" in line[0]
            finally:
                assert server.stop() == 0
    finally:
        echo.close()


def test_sched_slice_goes_to_a_tunnels_pumps_while_its_round_trips_go_one_at_a_time(tmp_path):
    """Both processes' two pumps take the slice once pings go back and forth one at a time
    (RoundTrips; the pumps ask as they turn to wait, so the test pings until they have), the
    other threads keep the kernel's; with 0 no thread is given one."""
    kernels = kernels_slice()
    echo = UdpEcho()
    try:
        for value, short in (("250", 2), ("0", 0)):
            server = start_server(tmp_path, echo.port, "--sched-slice", value)
            client = start_client(tmp_path, "http://%s:%d/" % (LOOPBACK, server.port),
                                  "--sched-slice", value)
            try:
                assert set(thread_slices(server.popen.pid)) == {kernels}  # no tunnel yet
                for index in range(500):
                    datagram = numbered(index, 100)
                    assert client.wireguard.roundtrip(datagram) == datagram
                    seen = [collections.Counter(thread_slices(proc.popen.pid))
                            for proc in (server, client)]
                    if index >= 20 and all(count[250000] == short
                                           and set(count) <= {kernels, 250000}
                                           for count in seen):
                        break
                else:
                    raise AssertionError("--sched-slice %s: slices %r" % (value, seen))
                assert "--sched-slice" not in server.log() + client.log()  # no warning
            finally:
                client.stop()
                server.stop()
    finally:
        echo.close()


def test_own_schedule_says_why_it_cannot_be_had_on_an_unknown_machine_and_is_off_at_0():
    assert pg.own_schedule(100, 1, machine="vax") == (
        None, "--sched-slice 100 --rt-priority 1: not set: sched_setattr's number on vax is "
              "not known")
    assert pg.own_schedule(0, 3, machine="vax")[1].startswith("--rt-priority 3: not set")
    assert pg.own_schedule(0, 0) == (None, None)


def test_busy_poll_option_reaches_the_tunnels_and_0_turns_it_off():
    client = ["client", "--to", "http://127.0.0.1:1/", "--listen-port",
              str(free_port(socket.SOCK_DGRAM))]
    service = pg._build_service(pg.parse_options(client, {}))
    try:
        assert service.busy_polling.budget == pg.DEFAULT_BUSY_POLL_US / 1e6 == 0.0001
    finally:
        service.endpoint.close()
    service = pg._build_service(pg.parse_options(client + ["--busy-poll", "0"], {}))
    try:
        assert service.busy_polling is None
    finally:
        service.endpoint.close()
