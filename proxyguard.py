#!/usr/bin/env python3
"""proxyguard.py: carry WireGuard's UDP over one HTTP(S) connection (ProxyGuard, UoTLV/1).

One file, standard library plus `configargparse` (optional: without it, command-line options
still work). Interoperates byte for byte with the original Go ProxyGuard.

Wire protocol (see README and the ProxyGuard technical document):
    client -> server   GET <path> HTTP/1.1 / Host / Connection: Upgrade / Upgrade: UoTLV/1
    server -> client   HTTP/1.1 101 Switching Protocols / Connection: Upgrade / Upgrade: UoTLV/1
    then, both ways    frames of [2-byte big-endian length][one UDP datagram]

Design
------
Blocking sockets and threads. Every tunnel is a `Tunnel`: a byte `Channel` (plain TCP or TLS)
and a UDP endpoint, joined by two pumps that run in two daemon threads:

    relay_udp_to_tcp   waits for UDP datagrams, drains all that are waiting, and sends them as
                       length-prefixed frames in one TCP write;
    relay_tcp_to_udp   reads the TCP stream in large chunks, cuts whole frames out with a
                       `FrameDecoder`, and sends each as one UDP datagram.

The first pump to stop closes the tunnel: `Tunnel.close()` shuts the TCP socket down (waking a
blocked recv or sendall) and wakes the UDP endpoint (a shutdown of the server's own connected
UDP socket; a wake pipe beside the client's shared one). The thread that ran the tunnel joins
the other pump before anything is closed, so no thread or socket outlives its tunnel, and no
stale reader steals datagrams from the next tunnel (the original loses 1-4 datagrams after
every reconnect that way).

Idle timeout: tunnel sockets stay blocking, with the kernel's SO_RCVTIMEO/SO_SNDTIMEO (a Python
timeout would poll before every call) and TCP_USER_TIMEOUT. A tunnel closes when no data
crossed either way for --idle-timeout, where data sent counts only once acknowledged.

Server: one accept thread; per connection, a thread does the handshake (bounded by a deadline
and a header-size limit) and then becomes the tunnel's TCP->UDP pump. Each tunnel has its own
connected UDP socket to WireGuard, so WireGuard sees one source port per client.

Client: one UDP socket on 127.0.0.1:<listen-port> for the whole run. A connector thread waits
until a datagram is waiting (lazy connect), connects, upgrades, runs one tunnel to its end,
and reconnects with back-off (1, 2, 4, 8, 10, 10 ... s; never gives up). Datagrams that the
UDP pump had read when its tunnel died wait in a small bounded queue for the next tunnel;
datagrams that arrive while no tunnel is up wait in the UDP socket's receive buffer.

TLS: `TLSChannel` keeps OpenSSL single-threaded per connection: an `SSLObject` over two
`MemoryBIO`s, a lock held only for CPU work, and a second lock that keeps ciphertext in order
on the wire (OpenSSL does not allow SSL_read and SSL_write on one SSL object from two threads;
a shared `SSLSocket` corrupts records under load: openssl issues 20446/20622, cpython 137583).

Sections, in order: constants, errors, pure protocol (no I/O), channels (plain and TLS),
tunnel pumps, server, client, CLI, main(argv).
"""

import argparse
import base64
import collections
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

try:  # optional: config files and environment variables (see build_parser)
    import configargparse
except ImportError:  # a router without pip: command-line options still work
    configargparse = None

__version__ = "0.1.0"

log = logging.getLogger("proxyguard")

# =============================================================================================
# Constants
# =============================================================================================

PROTOCOL = "UoTLV/1"

# The frame header: the datagram length as an unsigned 16-bit big-endian integer.
FRAME_HEADER = struct.Struct("!H")
MAX_FRAME_PAYLOAD = 0xFFFF

# Few, large TCP reads: 64 KiB holds about 45 WireGuard-sized frames. Not larger: a bytes
# object over glibc's 128 KiB mmap threshold costs an mmap/munmap pair on every read
# (measured with strace under load), which slows both throughput and round trips.
TCP_READ_SIZE = 64 * 1024

# How much the UDP pump gathers into one TCP write before sending. Batching many datagrams into
# one write is the main speed-up over one write per datagram; the cap bounds latency and memory.
UDP_BATCH_BYTES = 128 * 1024

# Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max). WireGuard bursts
# handshake plus data; the default ~200 KiB UDP receive buffer drops datagrams in a burst.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

# The request head a server accepts. The upgrade request is about 150 bytes; reverse proxies
# add a few headers (X-Forwarded-*, Via). Beyond this limit: 431.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 100

# A client has this long to send its request head (slow-loris defence). Also the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0

# Reconnect waits of the client after a failure, in seconds; the last one repeats forever.
RETRY_WAITS = (1, 2, 4, 8, 10)
# A tunnel that lived this long was healthy: the next failure starts the waits over.
STABLE_TUNNEL_SECONDS = 10.0

# Datagrams read by a dying tunnel's UDP pump that wait for the next tunnel. WireGuard resends
# handshakes itself; this only has to bridge one reconnect without loss.
PENDING_DATAGRAMS = 256

DEFAULT_SERVER_LISTEN = "127.0.0.1:51821"
DEFAULT_SERVER_TO = "127.0.0.1:51820"
DEFAULT_LISTEN_PORT = 51821
DEFAULT_FORWARD_PORT = 51820
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_USER_AGENT = "proxyguard.py/" + __version__
# Open tunnels a server takes by default: two threads each; beyond this a client gets 503.
DEFAULT_MAX_CLIENTS = 1000
# Connections still in their handshake beyond --max-clients tunnels: each holds a thread until
# its handshake deadline, so a flood of silent connections is refused from here on.
MAX_HANDSHAKING = 256
# Reverse proxies whose X-Forwarded-For / Forwarded headers the server believes by default.
DEFAULT_TRUSTED_PROXIES = "127.0.0.0/8,::1"

# Linux socket option numbers that the socket module may lack on old Pythons.
SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
# tcpi_state after the kernel gave up on a connection (include/net/tcp_states.h)
TCP_STATE_CLOSE = 7

# =============================================================================================
# Errors
# =============================================================================================


class ProxyGuardError(Exception):
    """Base of every error this program raises on purpose."""


class UsageError(ProxyGuardError):
    """A bad option or config value: one line for the user, exit status 2."""


class FatalError(ProxyGuardError):
    """A local error that makes running impossible (port taken, no permission): exit status 1."""


class HandshakeError(ProxyGuardError):
    """A request the server refuses: `status` is the HTTP answer, the message its body."""

    def __init__(self, status, message, extra_headers=(), routine=False):
        super().__init__(message)
        self.status = status
        self.extra_headers = tuple(extra_headers)
        self.routine = routine  # a plain GET (health check, browser): logged at debug only


class UpgradeRefused(ProxyGuardError):
    """The server answered, but not with a UoTLV/1 upgrade (wrong path, portal, not ProxyGuard).

    The client retries these at the longest wait: they rarely heal in a second.
    """


class ServerUnavailable(UpgradeRefused):
    """A 502/503/504: a reverse proxy cannot reach the proxyguard server behind it (restarting,
    down) or the server is full. Retried at the normal back-off: it often heals in a second."""


# =============================================================================================
# Pure protocol: frames, requests and responses. No I/O here, so tests need no socket.
# =============================================================================================


def encode_frame(datagram):
    """Return one UoTLV/1 frame for `datagram` (at most 65535 bytes)."""
    if len(datagram) > MAX_FRAME_PAYLOAD:
        raise ValueError("datagram of %d bytes does not fit a frame" % len(datagram))
    return FRAME_HEADER.pack(len(datagram)) + bytes(datagram)


class FrameDecoder:
    """Cut UoTLV/1 frames out of a TCP byte stream that may split them anywhere.

    `feed(data)` returns the list of whole datagrams completed by `data`, in order; a partial
    frame is kept for the next call. `pending` tells how many bytes are buffered.
    """

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
        view = memoryview(data)
        size = len(view)
        datagrams = []
        pos = 0
        while size - pos >= 2:
            end = pos + 2 + ((view[pos] << 8) | view[pos + 1])
            if end > size:
                break
            datagrams.append(view[pos + 2:end].tobytes())
            pos = end
        view.release()
        if data is buffer:
            del buffer[:pos]
        else:
            buffer += data[pos:]
        return datagrams


def encode_frames(datagrams):
    """Return the frames of all `datagrams` as one bytes object (one TCP write)."""
    pack = FRAME_HEADER.pack
    parts = []
    for datagram in datagrams:
        parts.append(pack(len(datagram)))
        parts.append(datagram)
    return b"".join(parts)


_HTTP_REASONS = {
    101: "Switching Protocols",
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

UPGRADE_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n")

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
# A request target is visible ASCII (RFC 9112 3.2); this also keeps the logged path clean.
_TARGET = re.compile(r"^[\x21-\x7e]+$")


def split_head(buffer):
    """Split `buffer` after the blank line that ends an HTTP head.

    Returns (head, rest) or None when the head is not complete yet. A bare LF is accepted
    as a line end, as RFC 9112 section 2.2 allows.
    """
    match = _HEAD_END.search(buffer)
    if match is None:
        return None
    return bytes(buffer[:match.end()]), bytes(buffer[match.end():])


class HttpHead:
    """A parsed request or response head: the start line's three parts and the headers.

    Header names are kept lower-case; repeated headers keep every value in order.
    """

    def __init__(self, start, headers):
        self.start = start  # (method, target, version) or (version, status, reason)
        self.headers = headers  # list of (lower-case name, value)

    def get_all(self, name):
        return [value for key, value in self.headers if key == name]

    def get(self, name, default=None):
        values = self.get_all(name)
        return values[0] if values else default

    def tokens(self, name):
        """The comma-separated tokens of all `name` headers, lower-cased (RFC 9110 5.6.1)."""
        result = []
        for value in self.get_all(name):
            result.extend(token.strip().lower() for token in value.split(",") if token.strip())
        return result


def _parse_head_lines(head, what):
    """Split a head into its start line and a header list; raise HandshakeError(400)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes every byte; kept for clarity
        raise HandshakeError(400, "%s is not text" % what)
    lines = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0]:
        raise HandshakeError(400, "empty %s" % what)
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HandshakeError(431, "more than %d header lines" % MAX_HEADER_LINES)
    headers = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HandshakeError(400, "folded header line (obsolete line folding)")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise HandshakeError(400, "malformed header line %r" % line[:60])
        if any(ord(ch) < 32 and ch != "\t" or ord(ch) == 127 for ch in value):
            raise HandshakeError(400, "control character in header %s" % name)
        headers.append((name.lower(), value.strip(" \t")))
    return lines[0], headers


def parse_request(head):
    """Parse a request head (bytes through the blank line) into an HttpHead.

    Raises HandshakeError with 400 (malformed) or 505 (not HTTP/1.x).
    """
    if head[:1] == b"\x16":
        raise HandshakeError(400, "this looks like a TLS handshake, but this server speaks plain "
                                  "HTTP (use http://, or give the server --tls-cert/--tls-key)")
    if head.startswith(b"PRI * HTTP/2.0"):
        raise HandshakeError(505, "HTTP/2 cannot carry an Upgrade; use HTTP/1.1")
    start, headers = _parse_head_lines(head, "request")
    parts = start.split(" ")
    if len(parts) != 3 or not all(parts) or not _TOKEN.match(parts[0]):
        raise HandshakeError(400, "malformed request line %r" % start[:80])
    method, target, version = parts
    if not _TARGET.match(target):
        raise HandshakeError(400, "malformed request target %r" % target[:80])
    match = _VERSION.match(version)
    if not match:
        raise HandshakeError(400, "malformed HTTP version %r" % version[:20])
    if match.group(1) != "1":
        raise HandshakeError(505, "HTTP version %s is not supported; use HTTP/1.1" % version)
    return HttpHead((method, target, version), headers)


def check_upgrade_request(request):
    """Raise HandshakeError unless `request` asks for a UoTLV/1 upgrade; return None if it does.

    Any path and any Host are accepted, as the original does. Connection may be a token list
    (`keep-alive, Upgrade`, as some proxies send; RFC 9110 7.6.1): the original rejects that.
    """
    method, _target, version = request.start
    hosts = request.get_all("host")
    if version == "HTTP/1.1" and len(hosts) != 1:
        raise HandshakeError(400, "an HTTP/1.1 request needs exactly one Host header")
    if method != "GET":
        raise HandshakeError(405, "method %s is not allowed; a UoTLV/1 upgrade is a GET" % method,
                             [("Allow", "GET")])
    if request.get("transfer-encoding") is not None or any(
            length != "0" for length in request.get_all("content-length")):
        raise HandshakeError(400, "an upgrade request cannot have a body")
    upgrade_headers = [("Connection", "Upgrade"), ("Upgrade", PROTOCOL)]
    if "upgrade" not in request.tokens("connection"):
        raise HandshakeError(
            426, "the 'Connection' header is not 'Upgrade', got: '%s'"
            % ", ".join(request.get_all("connection")), upgrade_headers,
            routine=not request.get_all("upgrade"))
    if PROTOCOL.lower() not in request.tokens("upgrade"):
        raise HandshakeError(
            426, "the 'Upgrade' header is not '%s', got: '%s'"
            % (PROTOCOL, ", ".join(request.get_all("upgrade"))), upgrade_headers)


def parse_networks(text, option):
    """A comma list of IP networks (`10.0.0.0/8,::1`); raises UsageError naming `option`."""
    networks = []
    for item in text.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise UsageError("%s: %r is not an IP address or network" % (option, item))
    return networks


def is_trusted(address, networks):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # "unknown", an obfuscated node name (RFC 7239 6.3)
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _forwarded_node(value):
    """The address of an RFC 7239 `for=` node or an X-Forwarded-For item, without its port."""
    value = value.strip().strip('"')
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


def forwarded_client(request, peer_ip, trusted):
    """The real client behind trusted reverse proxies, or None if `peer_ip` is not trusted.

    Walks `Forwarded: for=` (or, without it, `X-Forwarded-For`) from the right, past every
    trusted proxy: the first untrusted address is the client (a client can forge the left part).
    """
    if not is_trusted(peer_ip, trusted):
        return None
    chain = []
    for value in request.get_all("forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                key, _, node = pair.strip().partition("=")
                if key.lower() == "for" and node:
                    chain.append(_forwarded_node(node))
    if not chain:
        for value in request.get_all("x-forwarded-for"):
            chain.extend(_forwarded_node(item) for item in value.split(",") if item.strip())
    for address in reversed(chain):
        if not is_trusted(address, trusted):
            return address
    return chain[0] if chain else None


def build_response(status, message="", extra_headers=()):
    """Return a complete HTTP/1.1 error response with a one-line text body; it closes."""
    body = (message + "\n").encode("utf-8") if message else b""
    lines = ["HTTP/1.1 %d %s" % (status, _HTTP_REASONS.get(status, "Error"))]
    connection = "close"
    for name, value in extra_headers:
        if name == "Connection":
            connection = value + ", close"
        else:
            lines.append("%s: %s" % (name, value))
    lines.append("Connection: " + connection)
    lines.append("Content-Type: text/plain; charset=utf-8")
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def build_upgrade_request(host, path, user_agent=DEFAULT_USER_AGENT):
    """Return the client's upgrade request (the original's bytes, less Accept-Encoding: gzip)."""
    return ("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: Upgrade\r\n"
            "Upgrade: %s\r\n\r\n" % (path, host, user_agent, PROTOCOL)).encode("latin-1")


def parse_response(head):
    """Parse a response head into an HttpHead; raise UpgradeRefused if it is not HTTP."""
    try:
        start, headers = _parse_head_lines(head, "response")
    except HandshakeError as exc:
        raise UpgradeRefused("the server's answer is not valid HTTP (%s): not a web server?" % exc)
    version, _, rest = start.partition(" ")
    status, _, reason = rest.partition(" ")
    if not _VERSION.match(version) or not (len(status) == 3 and status.isdigit()):
        raise UpgradeRefused("the server's answer is not HTTP (%r): not a web server?"
                             % start[:60])
    return HttpHead((version, int(status), reason), headers)


def check_upgrade_response(response):
    """Raise UpgradeRefused, naming the likely cause, unless `response` accepts UoTLV/1."""
    status = response.start[1]
    got = "HTTP %d %s" % (status, response.start[2])
    if status == 101:
        if response.tokens("upgrade") != [PROTOCOL.lower()]:
            raise UpgradeRefused("the server switched to %r instead of %s: not a ProxyGuard server"
                                 % (response.get("upgrade", ""), PROTOCOL))
        if "upgrade" not in response.tokens("connection"):
            raise UpgradeRefused("the 101 answer lacks 'Connection: Upgrade': a broken proxy?")
        return
    if status in (200, 204) or 300 <= status < 400:
        location = response.get("location")
        cause = ("a captive portal (log in with a browser) or a web page, not ProxyGuard, at "
                 "this URL" + (" (redirects to %s)" % location if location else ""))
    elif status == 404:
        cause = "wrong path in the URL, or the reverse proxy does not forward it"
    elif status == 426:
        cause = "the server wants another upgrade protocol: not a ProxyGuard UoTLV/1 server?"
    elif status in (401, 403, 407):
        cause = "access denied by the server or a proxy"
    elif status in (502, 503, 504):
        raise ServerUnavailable("got %s instead of 101 Switching Protocols: the reverse proxy "
                                "cannot reach the proxyguard server behind it, or the server "
                                "is full" % got)
    elif status == 400:
        cause = "the server or a reverse proxy rejected the request (does it pass Upgrade on?)"
    else:
        cause = "not a ProxyGuard server, or a proxy in the way"
    raise UpgradeRefused("got %s instead of 101 Switching Protocols: %s" % (got, cause))


def parse_host_port(text, option, default_host=None):
    """Parse `host:port` or `[v6]:port` into (host, port); raise UsageError naming `option`."""
    text = text.strip()
    if "://" in text:
        raise UsageError("%s %r: expected HOST:PORT, not a URL" % (option, text))
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError("%s %r: write an IPv6 address as [address]:port" % (option, text))
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise UsageError("%s %r: expected HOST:PORT, for example 127.0.0.1:51820"
                             % (option, text))
        if ":" in host:
            raise UsageError("%s %r: write an IPv6 address as [address]:port" % (option, text))
    if not host:
        if default_host is None:
            raise UsageError("%s %r: the host is missing" % (option, text))
        host = default_host
    return host, parse_port(port, option)


def parse_port(text, option, allow_zero=False):
    """Return `text` as a port number; raise UsageError naming `option`."""
    try:
        port = int(str(text).strip())
    except ValueError:
        port = -1
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError("%s %r: not a port number (%d-65535)"
                         % (option, text, 0 if allow_zero else 1))
    return port


def encode_target(text):
    """`text` (a URL's path and query) as a valid request target: what HTTP does not allow
    in one (spaces, controls, non-ASCII as UTF-8, `"<>\\^`{|}`, a `%` without two hex digits)
    is percent-encoded; %XX escapes and reserved characters stay as written."""
    text = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", text)
    return urllib.parse.quote(text, safe="/?:@!$&'()*+,;=[]%")


class ServerURL:
    """The client's `--to` URL: scheme, host, port, the Host header and the request target."""

    def __init__(self, text):
        text = text.strip()
        if "://" not in text:
            raise UsageError("--to %r is not a URL: write http://%s/ (or https://)"
                             % (text, text.strip("/")))
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            # urlsplit would drop tabs and line breaks without a word
            raise UsageError("--to %r: control characters are not allowed in a URL" % text)
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise UsageError("--to %r is not a valid URL: %s" % (text, exc))
        if parts.scheme not in ("http", "https"):
            raise UsageError("--to %r: the scheme must be http:// or https://, not %s://"
                             % (text, parts.scheme))
        if not parts.hostname:
            raise UsageError("--to %r: the host is missing" % text)
        if parts.username is not None:
            raise UsageError("--to %r: user names in the URL are not supported" % text)
        if port == 0:
            raise UsageError("--to %r: port 0 is not a port to connect to (1-65535)" % text)
        host = parts.hostname
        # The Host header is the URL's host as written, with its port if one was written.
        host_header = parts.netloc
        if not host_header.isascii():  # an international name: its IDNA (xn--) form
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise UsageError("--to %r: not a valid host name: %s" % (text, exc))
            host_header = host + (":%d" % port if port is not None else "")
        if " " in host_header:
            raise UsageError("--to %r: a space in the host" % text)
        self.text = text
        self.scheme = parts.scheme
        self.tls = parts.scheme == "https"
        self.host = host
        self.port = port or (443 if self.tls else 80)
        self.host_header = host_header
        self.target = encode_target((parts.path or "/")
                                    + ("?" + parts.query if parts.query else ""))

    def __str__(self):
        return self.text


def format_address(address):
    """`host:port`, with IPv6 hosts in brackets."""
    host, port = address[0], address[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# =============================================================================================
# Channels: a connected TCP stream, plain or TLS, safe for one reader and one writer thread.
# =============================================================================================


class PlainChannel:
    """A plain TCP connection as a byte stream.

    Contract (shared by TLSChannel): one thread may block in `recv` while another blocks in
    `sendall`; `recv` returns b"" at end of stream; `shutdown()` may be called from any thread,
    any number of times, and wakes both; `close()` only once no thread uses the channel.
    """

    tls_version = None

    def __init__(self, sock):
        self.sock = sock

    def recv(self, size):
        return self.sock.recv(size)

    def sendall(self, data):
        self.sock.sendall(data)

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already shut down, or the peer reset it
            pass

    def close(self):
        self.sock.close()


class TLSChannel(PlainChannel):
    """TLS over a blocking TCP socket, safe for one reader and one writer thread.

    An `SSLObject` over two MemoryBIOs; `_tls_lock` guards the SSLObject and both BIOs and is
    held only for CPU work, never across a blocking socket call; `_send_lock` keeps ciphertext
    in order on the wire (tls-and-threads.md). The plain socket's timeout applies.
    """

    def __init__(self, sock, context, server_side, server_hostname=None):
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def handshake(self):
        """Run the TLS handshake in the calling thread; raises ssl.SSLError or OSError."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._drain_outgoing()
                self._receive_ciphertext()
            except ssl.SSLError:
                self._drain_outgoing()  # the alert tells the peer why
                raise
        self._drain_outgoing()

    @property
    def tls_version(self):
        return self._tls.version()

    def peer_certificate(self):
        return self._tls.getpeercert()

    def _receive_ciphertext(self):
        data = self.sock.recv(TCP_READ_SIZE)
        with self._tls_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def _drain_outgoing(self):
        """Send all ciphertext waiting in the outgoing BIO; caller holds `_send_lock` or is
        the only thread (handshake)."""
        while True:
            with self._tls_lock:
                data = self._outgoing.read()
            if not data:
                return
            self.sock.sendall(data)

    def _flush(self):
        """Send what the outgoing BIO holds, waiting for the send lock (the writer's path)."""
        while True:
            with self._send_lock:
                self._drain_outgoing()
            # A reader that found the send lock taken left its bytes for us: look once more.
            with self._tls_lock:
                if not self._outgoing.pending:
                    return

    def _flush_without_waiting(self):
        """The reader's path: send what a read produced (KeyUpdate answer, alert) unless a
        writer holds the send lock, in which case that writer sends it after its own bytes."""
        while self._send_lock.acquire(blocking=False):
            try:
                self._drain_outgoing()
            finally:
                self._send_lock.release()
            with self._tls_lock:
                if not self._outgoing.pending:
                    return

    def recv(self, size):
        while True:
            with self._tls_lock:
                try:
                    data = self._tls.read(size)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                produced = self._outgoing.pending
            if produced:
                self._flush_without_waiting()
            if data is not None:
                return data
            self._receive_ciphertext()

    def sendall(self, data):
        view = memoryview(data)
        with self._tls_lock:
            while view:
                written = self._tls.write(view)
                view = view[written:]
        self._flush()


# =============================================================================================
# Tunnel pumps
# =============================================================================================


def set_socket_buffers(sock):
    """Ask for large send and receive buffers; the kernel may give less, which is fine."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def prepare_tcp_socket(sock):
    """TCP_NODELAY: WireGuard carries TCP inside, and Nagle would add tens of milliseconds."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_socket_buffers(sock)


def wait_readable(files, timeout=None):
    """Wait until one of `files` (objects with fileno(), or fds) is readable; return those.

    poll, not select: select fails for descriptor numbers of 1024 and more.
    """
    poller = select.poll()
    by_fd = {}
    for item in files:
        fd = item if isinstance(item, int) else item.fileno()
        by_fd[fd] = item
        poller.register(fd, select.POLLIN)
    events = poller.poll(None if timeout is None else timeout * 1000)
    return [by_fd[fd] for fd, _ in events]


def receive_waiting_datagrams(sock, first, limit=UDP_BATCH_BYTES):
    """Return `first` plus every datagram already waiting on `sock`, up to `limit` bytes.

    Returns a list of (datagram, source address).
    """
    batch = [first]
    size = len(first[0])
    while size < limit:
        try:
            item = sock.recvfrom(MAX_FRAME_PAYLOAD + 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except ConnectionRefusedError:  # ICMP from an earlier send: WireGuard not up yet
            continue
        batch.append(item)
        size += len(item[0])
    return batch


class UdpEndpoint:
    """WireGuard's side of a tunnel: a UDP socket and where datagrams for WireGuard go.

    Server (`shared` false): a socket of its own per tunnel, connected to WireGuard. `receive()`
    blocks in recv; `wake()` shuts the socket down, which makes a blocked recv return at once
    (defined for connected UDP sockets), and `close()` closes it.

    Client (`shared` true): the one socket on 127.0.0.1:<listen-port>, used by one tunnel after
    another, so it must not be shut down. Datagrams go to `send_to` (WireGuard's ListenPort);
    a datagram from another port is warned about once. `receive()` waits in select on the
    socket and a wake pipe; `wake()` writes the pipe; `rearm()` empties it for the next tunnel.

    `receive()` returns the non-empty datagrams waiting (perhaps none, after a wake or an empty
    datagram, which the original drops too); the caller checks why it was woken.
    """

    def __init__(self, sock, send_to=None, shared=False):
        self.sock = sock
        self.send_to = send_to
        self.shared = shared
        self.warned_source = None
        self._wake_read = self._wake_write = None
        if shared:
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_read, False)
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
            self._poller.register(self._wake_read, select.POLLIN)

    @classmethod
    def connected(cls, address, family):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            set_socket_buffers(sock)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def fileno(self):
        return self.sock.fileno()

    def receive(self):
        try:
            if self.shared:
                if any(fd == self._wake_read for fd, _ in self._poller.poll()):
                    return []
                first = self.sock.recvfrom(MAX_FRAME_PAYLOAD + 1, socket.MSG_DONTWAIT)
            else:
                first = self.sock.recvfrom(MAX_FRAME_PAYLOAD + 1)
        except (BlockingIOError, InterruptedError, ConnectionRefusedError):
            # ConnectionRefused: ICMP after an earlier send, WireGuard restarting; go on.
            return []
        batch = receive_waiting_datagrams(self.sock, first)
        if self.send_to is not None:
            self._check_sources(batch)
        return [data for data, _ in batch if data]

    def _check_sources(self, batch):
        for _, source in batch:
            if source[1] != self.send_to[1] and source != self.warned_source:
                self.warned_source = source
                log.warning("datagrams arrive from %s, but replies go to %s: set ListenPort = "
                            "%d in WireGuard's [Interface] (or --forward-port to its port)",
                            format_address(source), format_address(self.send_to),
                            self.send_to[1])

    def send(self, datagram):
        try:
            if self.send_to is None:
                self.sock.send(datagram)
            else:
                self.sock.sendto(datagram, self.send_to)
        except ConnectionRefusedError:  # ICMP port unreachable: WireGuard restarting
            pass

    def wake(self):
        """Make a blocked (or the next) `receive()` return; any thread."""
        try:
            if self.shared:
                os.write(self._wake_write, b"x")
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def rearm(self):
        """Forget earlier wakes before the next tunnel uses the shared socket."""
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def close(self):
        """Close a tunnel's own socket; the shared socket lives as long as the client."""
        if not self.shared:
            self.sock.close()


class Tunnel:
    """One UoTLV/1 tunnel: a channel and a UDP endpoint joined by two pumps.

    `run()` starts relay_udp_to_tcp in a new daemon thread, runs relay_tcp_to_udp in the calling
    thread, and returns the reason once both have stopped. The first pump to stop calls
    `close()`, which shuts the channel down and wakes the endpoint, so the other returns too.
    `run()` then closes the channel and the endpoint (a shared one stays open, see UdpEndpoint).

    `greeting` (the server's 101) is sent before either pump starts. `unsent` receives
    datagrams the UDP pump had read but could not send (the client queues them for the next
    tunnel); None drops them.
    """

    def __init__(self, channel, endpoint, peer, idle_timeout, first_bytes=b"", unsent=None,
                 greeting=b""):
        self.channel = channel
        self.endpoint = endpoint
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.first_bytes = first_bytes
        self.greeting = greeting
        self.unsent = unsent
        self.close_reason = None
        self.went_idle = False  # closed by our own idle timeout: a normal end, not a failure
        self.last_sent = self.started = time.monotonic()  # last datagram towards the peer
        # Counters: each is written by one pump thread only.
        self.to_udp_datagrams = self.to_udp_bytes = 0
        self.to_tcp_datagrams = self.to_tcp_bytes = 0
        self.oversized = 0
        self._close_lock = threading.Lock()

    def close(self, reason):
        """Stop both pumps (idempotent, any thread); the first reason given is kept."""
        with self._close_lock:
            if self.close_reason is not None:
                return
            self.close_reason = reason
        self.channel.shutdown()
        self.endpoint.wake()

    def run(self):
        udp_thread = None
        try:
            set_idle_timeout(self.channel.sock, self.idle_timeout)
            if self.idle_timeout:
                # Data sent counts as activity only once the peer acknowledged it: into a
                # dead path, sends still succeed into the kernel's buffer, and without this
                # both sides would wait for the kernel's retransmissions (about 15 minutes).
                try:
                    self.channel.sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT,
                                                 int(self.idle_timeout * 1000))
                except OSError:  # not Linux: the peer's silence still ends the tunnel
                    pass
            if self.greeting:  # the server's 101 goes out before any frame
                self.channel.sendall(self.greeting)
            thread = threading.Thread(target=self._pump, args=(self.relay_udp_to_tcp,),
                                      name="udp->tcp %s" % self.peer, daemon=True)
            thread.start()
            udp_thread = thread
            self._pump(self.relay_tcp_to_udp)
        finally:
            if udp_thread is not None:
                udp_thread.join()
            self.channel.close()
            self.endpoint.close()
        return self.close_reason

    @property
    def duration(self):
        return time.monotonic() - self.started

    def summary(self):
        """One line of figures for the tunnel-down log."""
        text = ("%.1fs, %d datagrams/%d bytes to WireGuard, %d datagrams/%d bytes from WireGuard"
                % (self.duration, self.to_udp_datagrams, self.to_udp_bytes,
                   self.to_tcp_datagrams, self.to_tcp_bytes))
        if self.oversized:
            text += ", %d oversized frames dropped" % self.oversized
        return text

    def _pump(self, relay):
        """Error boundary of one pump thread: every way out closes the tunnel with a reason."""
        try:
            reason = relay()
        except (OSError, ssl.SSLError) as exc:
            if is_socket_timeout(exc):
                self.went_idle = True
                reason = "idle for %gs" % self.idle_timeout
            elif exc.errno == errno.ETIMEDOUT:
                reason = self._path_down()
            else:
                reason = describe_error(exc)
        except Exception as exc:  # a bug must still close the tunnel and not kill the process
            log.exception("tunnel %s: unexpected error", self.peer)
            reason = "internal error: %r" % exc
        self.close(reason)

    def _path_down(self):
        return "path down: data unacknowledged for %gs" % self.idle_timeout

    def relay_tcp_to_udp(self):
        """Read frames from the channel and send each as one UDP datagram, until EOF."""
        decoder = FrameDecoder()
        send = self.endpoint.send
        data = self.first_bytes
        while True:
            for datagram in decoder.feed(data):
                try:
                    send(datagram)
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    # Too big for one UDP datagram (65508-65535 over IPv4): drop it, go on.
                    # The original stalls or spins at 100 % CPU here.
                    if not self.oversized:
                        log.warning("tunnel %s: dropped a %d-byte frame: too big for one UDP "
                                    "datagram", self.peer, len(datagram))
                    self.oversized += 1
                    continue
                self.to_udp_datagrams += 1
                self.to_udp_bytes += len(datagram)
            if self.close_reason is not None:
                return self.close_reason
            try:
                data = self.channel.recv(TCP_READ_SIZE)
            except OSError as exc:
                # Idle means no data either way. Traffic towards the peer keeps the tunnel:
                # with PersistentKeepalive on the client only, the server never answers, and
                # a peer-only rule would reconnect (and change WireGuard's endpoint) each time.
                if is_socket_timeout(exc) and (
                        time.monotonic() - self.last_sent < self.idle_timeout):
                    data = b""
                    continue
                raise
            if not data:
                if self.close_reason is None and tcp_gave_up(self.channel.sock):
                    # The other pump took the socket's ETIMEDOUT; this one sees only the end.
                    return self._path_down()
                return "closed by peer" if self.close_reason is None else self.close_reason

    def relay_udp_to_tcp(self):
        """Wait for datagrams, and send all that are waiting as frames in one channel write."""
        receive = self.endpoint.receive
        while self.close_reason is None:
            datagrams = receive()
            if not datagrams:
                continue
            try:
                self.channel.sendall(encode_frames(datagrams))
            except BaseException as exc:
                if self.unsent is not None:
                    self.unsent(datagrams)
                if is_socket_timeout(exc):
                    return "the peer read nothing for %gs" % self.idle_timeout
                raise
            self.last_sent = time.monotonic()
            self.to_tcp_datagrams += len(datagrams)
            self.to_tcp_bytes += sum(map(len, datagrams))
        return self.close_reason


# What a failed TLS handshake most likely means, for the one-line error (issue: "says why").
_CERTIFICATE_HINTS = (
    ("expired", " (renew the server's certificate, or check this machine's clock)"),
    ("not yet valid", " (check this machine's clock)"),
    ("local issuer", " (unknown CA: a private CA needs --ca-file; a captive portal's "
                     "certificate fails until you log in)"),
    ("self-signed", " (unknown CA: a private CA needs --ca-file)"),
    ("hostname mismatch", " (the URL's host is not in the certificate)"),
    ("ip address mismatch", " (the URL's address is not in the certificate)"),
)
_TLS_HINTS = {
    "TLSV1_ALERT_PROTOCOL_VERSION": " (the server does not offer TLS 1.3: enable it, for nginx "
                                    "add TLSv1.3 to ssl_protocols, or use --tls-min-version 1.2)",
    "UNSUPPORTED_PROTOCOL": " (the server offers only old TLS versions: --tls-min-version 1.2?)",
    "WRONG_VERSION_NUMBER": " (not TLS: is the server plain http://?)",
    "HTTP_REQUEST": " (plain HTTP sent to a TLS port: use https://)",
    "NO_APPLICATION_PROTOCOL": " (the server does not offer HTTP/1.1 over ALPN)",
    "UNEXPECTED_EOF_WHILE_READING": " (the server closed the connection during TLS)",
}


def set_idle_timeout(sock, seconds):
    """Make recv and send on the blocking `sock` fail after `seconds` of waiting (0: never).

    The kernel's SO_RCVTIMEO/SO_SNDTIMEO, not settimeout(): a Python socket with a timeout
    polls before every recv and send, one more system call and GIL hand-off per frame batch
    (measured: part of the round trip). Falls back to settimeout where the options fail.
    """
    sock.settimeout(None)
    if not seconds:
        return
    whole = int(seconds)
    micro = int((seconds - whole) * 1000000)
    # struct timeval is two native longs, or two 64-bit fields on 32-bit systems with a
    # 64-bit time_t: the kernel refuses the wrong size, so try both.
    for layout in ("ll", "qq"):
        try:
            value = struct.pack(layout, whole, micro)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            return
        except (OSError, struct.error):
            continue
    sock.settimeout(seconds)


def is_socket_timeout(exc):
    """True for a timeout of our own (set_idle_timeout), not the kernel's ETIMEDOUT: a blocking
    socket's SO_RCVTIMEO gives EAGAIN; settimeout gives TimeoutError without errno (since
    Python 3.10 the kernel's ETIMEDOUT is a TimeoutError too, with its errno)."""
    if isinstance(exc, BlockingIOError):
        return True
    return isinstance(exc, socket.timeout) and exc.errno is None


def tcp_gave_up(sock):
    """True if the kernel aborted the connection (TCP_USER_TIMEOUT, retransmissions), which a
    reader sees as a plain end of stream once another thread took the error."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_STATE_CLOSE
    except OSError:
        return False


def describe_error(exc):
    """A short reason for a log line: 'connection reset by peer', 'certificate verify failed';
    any other exception (ours, for one) by its message."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc.reason)
        hint = next((hint for key, hint in _CERTIFICATE_HINTS if key in message.lower()), "")
        return "TLS certificate not accepted: %s%s" % (message, hint)
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return "TLS handshake failed: %s%s" % (reason, _TLS_HINTS.get(reason, ""))
    if isinstance(exc, socket.timeout):
        return "timed out"
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return strerror[:1].lower() + strerror[1:]
    return str(exc) or exc.__class__.__name__


# =============================================================================================
# Server
# =============================================================================================


def read_head(channel, deadline, limit=MAX_HEAD_BYTES):
    """Read from `channel` until a whole HTTP head arrived; return (head, bytes after it).

    Raises HandshakeError(431) past `limit` bytes, HandshakeError(408) past `deadline`
    (monotonic time), and ConnectionError when the peer closes first.
    """
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeError(408, "the HTTP head did not arrive in time")
        channel.sock.settimeout(remaining)
        try:
            data = channel.recv(4096)
        except socket.timeout:
            continue
        if not data:
            raise ConnectionError("closed before the end of the HTTP head (%d bytes)"
                                  % len(buffer))
        # Search only the new bytes plus 3 before them for the blank line.
        start = max(0, len(buffer) - 3)
        buffer += data
        if buffer[:1] == b"\x16":
            # A TLS record never starts an HTTP head: hand it to the parser now, which says
            # so, rather than wait for the deadline while the TLS peer waits for us.
            return bytes(buffer), b""
        parts = split_head(memoryview(buffer)[start:])
        if parts is not None:
            head = bytes(buffer[:start]) + parts[0]
            if len(head) <= limit:
                return head, parts[1]
        if len(buffer) > limit:
            raise HandshakeError(431, "the request head is larger than %d bytes" % limit)


class Server:
    """The ProxyGuard server: accepts upgrades on `listen` and tunnels them to WireGuard.

    `serve_forever()` accepts in the calling thread until `stop()`; each connection gets a
    thread that does the handshake and then runs the tunnel (see Tunnel). `stop()` closes the
    listening socket and every tunnel, and waits for their threads.
    """

    def __init__(self, listen, wireguard, idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 handshake_timeout=HANDSHAKE_TIMEOUT, tls_context_factory=None,
                 trusted_proxies=(), max_clients=DEFAULT_MAX_CLIENTS):
        self.wireguard_address, self.wireguard_family = resolve_udp(wireguard, "--to")
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.trusted_proxies = list(trusted_proxies)
        self.max_clients = max_clients
        self.tunnels_open = 0
        self.tls_context_factory = tls_context_factory
        self.tls_context = tls_context_factory() if tls_context_factory else None
        self.listener = open_listener(listen)
        self.address = self.listener.getsockname()
        self._stopping = False
        self._lock = threading.Lock()
        self._connections = {}  # thread -> function that stops it, for stop()

    def reload_tls(self):
        """Load the certificate again for new connections (SIGHUP); open tunnels go on."""
        if self.tls_context_factory is None:
            return
        try:
            self.tls_context = self.tls_context_factory()
        except (OSError, ssl.SSLError, ProxyGuardError) as exc:
            log.error("certificate reload failed, keeping the old one: %s", exc)
            return
        log.info("certificate reloaded for new connections")

    def serve_forever(self):
        log.info("server listening on %s (%s), forwarding to WireGuard at %s",
                 format_address(self.address), "https" if self.tls_context else "http",
                 format_address(self.wireguard_address))
        while not self._stopping:
            try:
                sock, peer = self.listener.accept()
            except OSError as exc:
                if self._stopping:
                    break
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing new connections for 1s", exc.strerror)
                    time.sleep(1)
                continue
            self._start_connection(sock, peer)

    def _start_connection(self, sock, peer):
        """Give the connection its thread, unless too many are open or no thread can start:
        a flood of silent connections must not take the server down (a thread limit such as
        systemd's TasksMax makes Thread.start raise)."""
        thread = threading.Thread(target=self._handle, args=(sock, peer), daemon=True,
                                  name="tunnel %s" % format_address(peer))
        with self._lock:
            full = (self.max_clients
                    and len(self._connections) >= self.max_clients + MAX_HANDSHAKING)
            if not full:
                self._connections[thread] = PlainChannel(sock).shutdown
        if full:
            log.warning("connection %s refused: %d connections open already",
                        format_address(peer), len(self._connections))
            refuse_without_waiting(sock, 503, "the server is full; try again later")
            return
        try:
            thread.start()
        except RuntimeError as exc:
            with self._lock:
                self._connections.pop(thread, None)
            log.error("connection %s refused: cannot start a thread (%s)",
                      format_address(peer), exc)
            refuse_without_waiting(sock, 503, "the server is out of resources; try again later")

    def stop(self):
        self._stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            connections = dict(self._connections)
        for stop_connection in connections.values():
            stop_connection()
        deadline = time.monotonic() + 5
        for thread in connections:
            if thread.is_alive():  # one registered but not started yet cannot be joined
                thread.join(max(0.0, deadline - time.monotonic()))

    def _handle(self, sock, peer):
        """Error boundary of one connection: handshake, then tunnel; always closes `sock`."""
        peer_text = format_address(peer)
        tunnel = None
        try:
            prepare_tcp_socket(sock)
            deadline = time.monotonic() + self.handshake_timeout
            channel = self._open_channel(sock, peer_text, deadline)
            if channel is None:
                return
            parts = self._read_upgrade(channel, peer_text, deadline)
            if parts is None:
                return
            request, first_bytes = parts
            path = request.start[1]
            client = forwarded_client(request, peer[0], self.trusted_proxies)
            if client is not None:
                peer_text = "%s (via %s)" % (client, peer_text)
            if not self._admit(channel, peer_text):
                return
            try:
                endpoint = UdpEndpoint.connected(self.wireguard_address, self.wireguard_family)
                tunnel = Tunnel(channel, endpoint, peer_text, self.idle_timeout, first_bytes,
                                greeting=UPGRADE_RESPONSE)
                with self._lock:
                    if self._stopping:
                        tunnel.close("server shutting down")
                    self._connections[threading.current_thread()] = (
                        lambda: tunnel.close("server shutting down"))
                log.info("tunnel up: %s, path %s%s", peer_text, path,
                         ", " + channel.tls_version if channel.tls_version else "")
                reason = tunnel.run()
                log.info("tunnel down: %s after %s (%s)", peer_text, tunnel.summary(), reason)
            finally:
                with self._lock:
                    self.tunnels_open -= 1
        except (OSError, ssl.SSLError) as exc:
            log.info("connection %s: %s", peer_text, describe_error(exc))
        except Exception:
            log.exception("connection %s: unexpected error", peer_text)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)
            if tunnel is None:
                sock.close()

    def _admit(self, channel, peer_text):
        """Count a new tunnel in, or answer 503 when --max-clients are open already."""
        with self._lock:
            if not self.max_clients or self.tunnels_open < self.max_clients:
                self.tunnels_open += 1
                return True
        self._refuse(channel, peer_text, HandshakeError(
            503, "the server is full (%d tunnels open); try again later" % self.max_clients,
            [("Retry-After", "10")]))
        return False

    def _refuse(self, channel, peer_text, error):
        """The one error-answer path: log why, send the HTTP answer, and let the caller close."""
        log.log(logging.DEBUG if error.routine else logging.INFO,
                "handshake failed from %s: %d %s", peer_text, error.status, error)
        try:
            channel.sock.settimeout(1)
            channel.sendall(build_response(error.status, str(error), error.extra_headers))
        except (OSError, ssl.SSLError):
            pass

    def _open_channel(self, sock, peer_text, deadline):
        """The channel for `sock`: TLS handshake done if the server speaks HTTPS; or None."""
        context = self.tls_context
        if context is None:
            return PlainChannel(sock)
        channel = TLSChannel(sock, context, server_side=True)
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            channel.handshake()
        except socket.timeout:
            log.info("handshake failed from %s: TLS handshake timed out", peer_text)
            return None
        except (OSError, ssl.SSLError) as exc:
            log.info("handshake failed from %s: %s", peer_text, describe_error(exc))
            return None
        return channel

    def _read_upgrade(self, channel, peer_text, deadline):
        """Read and check the upgrade request; answer errors. Returns (request, rest) or None."""
        try:
            head, rest = read_head(channel, deadline)
            request = parse_request(head)
            check_upgrade_request(request)
            return request, rest
        except HandshakeError as exc:
            self._refuse(channel, peer_text, exc)
            return None
        except ConnectionError as exc:
            log.info("handshake failed from %s: %s", peer_text, exc)
            return None


def refuse_without_waiting(sock, status, message):
    """Answer `status` if the socket takes it at once, and close: for the accept thread, which
    must never block on one client."""
    try:
        sock.setblocking(False)
        sock.send(build_response(status, message, [("Retry-After", "10")]))
    except OSError:
        pass
    sock.close()


def open_listener(listen):
    """A listening TCP socket for (host, port); IPv6 `::` also takes IPv4. Raises FatalError."""
    host, port = listen
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family, backlog=512,
                                    dualstack_ipv6=(family == socket.AF_INET6
                                                    and address[0] == "::"))
    except OSError as exc:
        raise FatalError("cannot listen on %s: %s"
                         % (format_address(listen), describe_error(exc)))


def resolve_udp(address, option):
    """Resolve (host, port) for UDP once; return (sockaddr, family). Raises FatalError."""
    try:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise FatalError("%s %s: cannot resolve: %s" % (option, format_address(address), exc))
    family, _, _, _, sockaddr = infos[0]
    return sockaddr, family


# =============================================================================================
# Client
# =============================================================================================


# The most a certificate, key or CA file may hold (the system CA bundle is about 200 KiB).
MAX_PEM_FILE_BYTES = 10 * 1024 * 1024
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_ANY_CERTIFICATE = re.compile(rb"-----BEGIN (TRUSTED |X509 )?CERTIFICATE-----")
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9]+ )?PRIVATE KEY-----")
_PEM_ENCRYPTED_KEY = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED")


def load_tls_files(context, error, cert_file=None, key_file=None, ca_file=None):
    """Load `cert_file` and `key_file` (the key may be in `cert_file`), or the CA certificates
    in `ca_file`, into `context`. Checks step by step, so that a failure raises `error`
    (UsageError or FatalError) with one line naming the option, the file and the problem,
    not OpenSSL's 'PEM lib'."""
    cert_option = "--tls-cert %r" % cert_file
    key_option = "--tls-key %r" % key_file if key_file else cert_option

    def read(option, path):
        try:
            with open(path, "rb") as stream:
                data = stream.read(MAX_PEM_FILE_BYTES + 1)
        except OSError as exc:
            raise error("%s: %s" % (option, describe_error(exc)))
        if len(data) > MAX_PEM_FILE_BYTES:
            raise error("%s: over %d MiB, not a PEM file"
                        % (option, MAX_PEM_FILE_BYTES // (1024 * 1024)))
        return data

    def no_certificate(option, data, what="certificate"):
        if _PEM_ANY_CERTIFICATE.search(data):
            return damaged(option)
        hint = " (it looks like DER: convert it with openssl x509 -inform der)" if (
            data[:1] == b"\x30") else ""
        return error("%s: no PEM %s in the file%s" % (option, what, hint))

    def damaged(option):  # OpenSSL only says 'PEM lib' or 'no start line'
        return error("%s: a certificate in the file is damaged (cut short, or not valid "
                     "base64 or DER)" % option)

    def words(exc):  # '[X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3926)'
        return re.sub(r"^\[[^]]*\] | \(_ssl\.c:\d+\)$", "", str(exc))

    if ca_file:
        option = "--ca-file %r" % ca_file
        data = read(option, ca_file)
        if not _PEM_ANY_CERTIFICATE.search(data):
            raise no_certificate(option, data, "CA certificate")
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            raise damaged(option)
        except OSError as exc:  # the file went away under us
            raise error("%s: %s" % (option, describe_error(exc)))
    if not cert_file:
        return
    data = read(cert_option, cert_file)
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise no_certificate(cert_option, data)
    try:  # a throwaway store, to tell a damaged certificate from a damaged key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=b"\n".join(blocks).decode("ascii"))
    except (ssl.SSLError, ValueError):
        raise damaged(cert_option)
    key_data = read(key_option, key_file) if key_file else data
    if not _PEM_PRIVATE_KEY.search(key_data):
        raise error("%s: no private key in the file%s" % (key_option, "" if key_file else
                    " (give the key with --tls-key)"))
    encrypted = error("%s: the private key is encrypted; give it without a passphrase "
                      "(openssl pkey -in KEY -out PLAIN_KEY)" % key_option)
    if _PEM_ENCRYPTED_KEY.search(key_data):
        raise encrypted

    def no_passphrase():  # never let OpenSSL ask on the terminal (SIGHUP in a service)
        raise encrypted

    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise error("%s does not match the certificate in %s" % (key_option, cert_option))
        if exc.reason in ("EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"):
            raise error("%s: OpenSSL refuses it as too weak (%s): use RSA 2048 or more, or "
                        "EC, signed with SHA-256" % (cert_option, words(exc)))
        raise error("%s: cannot load the private key (%s)" % (key_option, words(exc) if (
            exc.reason) else "damaged, or in a format OpenSSL cannot read"))
    except OSError as exc:  # a file went away under us
        raise error("%s / %s: %s" % (cert_option, key_option, describe_error(exc)))


def client_tls_context(ca_file=None, min_version="1.3"):
    """Verify certificate and host name against the system store (plus `ca_file`); ALPN
    http/1.1 only, since HTTP/2 has no Upgrade. Raises UsageError for a bad CA file."""
    context = ssl.create_default_context()
    load_tls_files(context, UsageError, ca_file=ca_file)
    context.minimum_version = TLS_VERSIONS[min_version]
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_tls_context(cert_file, key_file):
    """The server's context; `num_tickets = 0` spares the post-handshake ticket traffic.
    Raises FatalError, naming the file and the problem, when the files cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_tls_files(context, FatalError, cert_file=cert_file, key_file=key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.num_tickets = 0
    return context


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class Dialer:
    """Opens a UoTLV/1 channel to the server: resolve, connect (perhaps through an HTTP
    proxy's CONNECT), TLS for https://, then the upgrade. Used by the client for every tunnel
    and by `check`, which passes `report(step, ok, detail, seconds)` to print each step.

    Addresses are resolved once and kept (--peer-ips in order, or DNS), so a reconnect works
    while the VPN carries DNS. `abort()` from another thread wakes a dial in progress.
    """

    def __init__(self, url, proxy=None, peer_ips=(), fwmark=-1, tcp_port=0,
                 user_agent=DEFAULT_USER_AGENT, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 tls_context=None, report=None):
        self.url = url
        self.proxy = proxy
        self.peer_ips = list(peer_ips)
        self.fwmark = fwmark
        self.tcp_port = tcp_port
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.tls_context = tls_context
        self.report = report
        self._addresses = None
        self._lock = threading.Lock()
        self._sock = None
        self._aborted = False

    def abort(self):
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                PlainChannel(self._sock).shutdown()

    @contextlib.contextmanager
    def _step(self, name):
        """Time one step and tell `report` how it went; `detail` is the step's to fill in."""
        started = time.monotonic()
        detail = []
        try:
            yield detail
        except BaseException as exc:
            if self.report:
                self.report(name, False, "; ".join(detail + [describe_error(exc)]),
                            time.monotonic() - started)
            raise
        if self.report:
            self.report(name, True, "; ".join(detail), time.monotonic() - started)

    def resolve(self):
        """[(family, sockaddr)] to connect to: the proxy's, or the server's. Raises OSError."""
        if self._addresses is None:
            host, port = (self.proxy.host, self.proxy.port) if self.proxy else (
                self.url.host, self.url.port)
            with self._step("resolve") as detail:
                if self.peer_ips and not self.proxy:
                    addresses = [resolve_tcp(ip, port, numeric=True)[0] for ip in self.peer_ips]
                    detail.append("--peer-ips, DNS skipped")
                else:
                    addresses = resolve_tcp(host, port)
                detail.append("%s -> %s" % (host, ", ".join(
                    format_address(address) for _, address in addresses)))
            self._addresses = addresses
        return self._addresses

    def dial(self):
        """Return (channel, bytes after the 101, peer text); raises OSError, ssl.SSLError,
        UpgradeRefused or ConnectionError. The channel is open and upgraded."""
        sock, address = self._connect(self.resolve())
        try:
            deadline = time.monotonic() + self.connect_timeout
            peer = self.url.host_header
            if peer != format_address(address):  # a name: say which address answered
                peer += " (%s)" % format_address(address)
            if self.proxy:
                self._proxy_connect(sock, deadline)
                peer = "%s (via proxy %s)" % (self.url.host_header, format_address(address))
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            channel = self._tls(sock) if self.tls_context else PlainChannel(sock)
            return channel, self._upgrade(channel, deadline), peer
        except BaseException:
            sock.close()
            raise
        finally:
            with self._lock:
                self._sock = None

    def _connect(self, addresses):
        """A TCP connection to the first of `addresses` that answers: (socket, address)."""
        errors = []
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            with self._lock:
                if self._aborted:
                    sock.close()
                    raise ConnectionError("stopped")
                self._sock = sock
            try:
                with self._step("connect") as detail:
                    detail.append(("proxy " if self.proxy else "") + format_address(address))
                    if self.fwmark >= 0:
                        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
                    if self.tcp_port:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0",
                                   self.tcp_port))
                    prepare_tcp_socket(sock)
                    sock.settimeout(self.connect_timeout)
                    sock.connect(address)
                return sock, address
            except OSError as exc:
                sock.close()
                errors.append("%s: %s" % (format_address(address), describe_error(exc)))
        raise ConnectionError("; ".join(errors))

    def _proxy_connect(self, sock, deadline):
        """Ask the HTTP proxy for a tunnel to the server with CONNECT (RFC 9110 9.3.6)."""
        host = self.peer_ips[0] if self.peer_ips else self.url.host
        authority = format_address((host, self.url.port))
        with self._step("proxy") as detail:
            channel = PlainChannel(sock)
            channel.sendall(build_connect_request(authority, self.proxy.credentials,
                                                  self.user_agent))
            head, rest = read_response_head(channel, deadline)
            response = parse_response(head)
            detail.append("CONNECT %s -> HTTP %d %s" % (authority, response.start[1],
                                                        response.start[2]))
            check_connect_response(response, self.proxy.credentials is not None)
            if rest:
                raise UpgradeRefused("the proxy sent data after its 200 answer")

    def _tls(self, sock):
        with self._step("tls") as detail:
            channel = TLSChannel(sock, self.tls_context, server_side=False,
                                 server_hostname=self.url.host)
            channel.handshake()
            detail.append(describe_tls(channel))
        return channel

    def _upgrade(self, channel, deadline):
        with self._step("upgrade") as detail:
            channel.sendall(build_upgrade_request(self.url.host_header, self.url.target,
                                                  self.user_agent))
            head, rest = read_response_head(channel, deadline)
            response = parse_response(head)
            detail.append("GET %s -> %s %d %s" % ((self.url.target,) + response.start))
            detail.extend("%s: %s" % header for header in response.headers)
            check_upgrade_response(response)
        return rest


def read_response_head(channel, deadline):
    """read_head for the client side: a missing answer is a connection error, not a 408."""
    try:
        return read_head(channel, deadline)
    except HandshakeError as exc:
        raise ConnectionError("no valid answer: %s" % exc)


def describe_tls(channel):
    """'TLSv1.3, CN=vpn.example.org, issuer CN=..., expires ... (in N days)' for check."""
    cert = channel.peer_certificate() or {}
    def name(field):
        return ", ".join("%s=%s" % pair for rdn in cert.get(field, ()) for pair in rdn)
    text = "%s, subject %s, issuer %s" % (channel.tls_version, name("subject"), name("issuer"))
    if "notAfter" in cert:
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
        text += ", expires %s (in %d days)" % (cert["notAfter"], (expires - time.time()) // 86400)
    return text


class ProxyURL:
    """An HTTP proxy for CONNECT: `http://[user:pass@]host:port`."""

    def __init__(self, text, option="--proxy"):
        parts = urllib.parse.urlsplit(text.strip() if "://" in text else "http://" + text.strip())
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError("%s %r: %s" % (option, text, exc))
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError("%s %r: expected http://[user:pass@]host:port" % (option, text))
        if port == 0:
            raise UsageError("%s %r: port 0 is not a port to connect to (1-65535)"
                             % (option, text))
        self.host = parts.hostname
        self.port = port or 3128
        self.credentials = None
        if parts.username is not None:
            self.credentials = "%s:%s" % (urllib.parse.unquote(parts.username),
                                          urllib.parse.unquote(parts.password or ""))
        self.text = "http://%s" % format_address((self.host, self.port))

    def __str__(self):
        return self.text


def build_connect_request(authority, credentials=None, user_agent=DEFAULT_USER_AGENT):
    """The CONNECT request for an HTTP proxy; `credentials` is 'user:pass' for Basic auth."""
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority,
             "User-Agent: %s" % user_agent]
    if credentials is not None:
        token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
        lines.append("Proxy-Authorization: Basic %s" % token)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_connect_response(response, sent_credentials=False):
    """Raise unless the proxy's answer to CONNECT is 2xx; name the cause."""
    status = response.start[1]
    if 200 <= status < 300:
        return
    if status in (401, 407):  # tinyproxy 1.11 answers a wrong password with 401 (its issue 532)
        if sent_credentials:
            raise UpgradeRefused("the HTTP proxy refused the user name or password (%d)" % status)
        raise UpgradeRefused("the HTTP proxy wants authentication (%d): give "
                             "http://user:password@host:port in --proxy or HTTPS_PROXY" % status)
    if status == 403:
        raise UpgradeRefused("the HTTP proxy refuses CONNECT to this host or port (403)")
    raise ConnectionError("the HTTP proxy answered %d %s to CONNECT" % response.start[1:])


def proxy_from_environment(url):
    """The proxy the environment names for `url` (HTTPS_PROXY or HTTP_PROXY, by scheme, and
    NO_PROXY), as a ProxyURL, or None. urllib.request implements the conventions."""
    import urllib.request  # only here: it is slow to import, and only the client needs it
    proxies = urllib.request.getproxies()
    text = proxies.get(url.scheme)
    if not text or urllib.request.proxy_bypass(url.host):
        return None
    return ProxyURL(text, option="%s_PROXY" % url.scheme.upper())


class Client:
    """The ProxyGuard client: WireGuard's endpoint on 127.0.0.1, tunnelling to the server.

    `serve_forever()` runs the connector in the calling thread until `stop()`: wait for a
    datagram, dial, run a Tunnel to its end, wait, and again (module docstring). Datagrams
    the tunnel could not send wait in `pending` and go out first on the next tunnel.
    """

    def __init__(self, dialer, listen_port=DEFAULT_LISTEN_PORT,
                 forward_port=DEFAULT_FORWARD_PORT, idle_timeout=DEFAULT_IDLE_TIMEOUT):
        self.dialer = dialer
        self.url = dialer.url
        self.idle_timeout = idle_timeout
        self.pending = collections.deque(maxlen=PENDING_DATAGRAMS)
        self._stopping = False
        self._lock = threading.Lock()
        self._tunnel = None
        if dialer.fwmark >= 0:
            check_fwmark(dialer.fwmark)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            set_socket_buffers(sock)
            sock.bind(("127.0.0.1", listen_port))
        except OSError as exc:
            sock.close()
            raise FatalError("cannot listen on 127.0.0.1:%d (UDP): %s"
                             % (listen_port, describe_error(exc)))
        self.address = sock.getsockname()
        self.endpoint = UdpEndpoint(sock, ("127.0.0.1", forward_port), shared=True)
        self._wake_read, self._wake_write = os.pipe()
        try:
            dialer.resolve()
        except OSError as exc:
            log.error("cannot resolve %s: %s (trying again at each connect)",
                      dialer.proxy.host if dialer.proxy else self.url.host,
                      describe_error(exc))

    def serve_forever(self):
        log.info("client listening on %s (UDP), tunnelling to %s%s, replies to WireGuard at %s",
                 format_address(self.address), self.url,
                 " via proxy %s" % self.dialer.proxy if self.dialer.proxy else "",
                 format_address(self.endpoint.send_to))
        failures = 0
        while self._wait(None if not self.pending else 0) and not self._stopping:
            try:
                tunnel = self._open_tunnel()
            except ServerUnavailable as exc:
                log.warning("cannot connect to %s: %s", self.url, exc)
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
            except UpgradeRefused as exc:
                log.error("upgrade refused by %s: %s", self.url, exc)
                wait = RETRY_WAITS[-1]
            except ssl.SSLError as exc:  # a captive portal's certificate fails until login
                log.error("cannot connect to %s: %s", self.url, describe_error(exc))
                wait = RETRY_WAITS[-1]
            except (OSError, ProxyGuardError) as exc:
                log.warning("cannot connect to %s: %s", self.url, describe_error(exc))
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
            else:
                reason = tunnel.run()
                with self._lock:
                    self._tunnel = None
                log.info("tunnel down: %s after %s (%s)", tunnel.peer, tunnel.summary(), reason)
                if tunnel.went_idle or tunnel.duration >= STABLE_TUNNEL_SECONDS:
                    failures = 0
                    continue
                wait = RETRY_WAITS[min(failures, len(RETRY_WAITS) - 1)]
            failures += 1
            if self._stopping:
                break
            log.info("next attempt in %ds, when WireGuard sends", wait)
            self._sleep(wait)

    def stop(self):
        with self._lock:
            self._stopping = True
            if self._tunnel is not None:
                self._tunnel.close("client shutting down")
        self.dialer.abort()
        os.write(self._wake_write, b"x")

    def _wait(self, timeout):
        """Wait until a datagram waits on the UDP socket (lazy connect); False on stop()."""
        return self._wake_read not in wait_readable([self.endpoint, self._wake_read], timeout)

    def _sleep(self, seconds):
        wait_readable([self._wake_read], seconds)

    def _open_tunnel(self):
        """Dial and send the pending datagrams; return the Tunnel, ready to run."""
        channel, first_bytes, peer = self.dialer.dial()
        try:
            if self.pending:
                channel.sendall(encode_frames(self.pending))
                self.pending.clear()
        except BaseException:
            channel.close()
            raise
        self.endpoint.rearm()
        tunnel = Tunnel(channel, self.endpoint, peer, self.idle_timeout, first_bytes,
                        unsent=self.pending.extend)
        with self._lock:
            self._tunnel = tunnel
            if self._stopping:
                tunnel.close("client shutting down")
        log.info("tunnel up: %s, %s%s", peer, self.url,
                 ", " + channel.tls_version if channel.tls_version else "")
        return tunnel


def run_check(dialer, out=sys.stdout):
    """`proxyguard.py check`: dial once, print every step with its timing; 0 if upgraded."""
    def report(step, ok, detail, seconds):
        print("%-8s %-4s %7.1f ms  %s" % (step, "ok" if ok else "FAIL", seconds * 1000, detail),
              file=out, flush=True)

    dialer.report = report
    print("check    %s%s" % (dialer.url, " via proxy %s" % dialer.proxy if dialer.proxy else ""),
          file=out)
    try:
        channel, _, peer = dialer.dial()
    except (OSError, ssl.SSLError, ProxyGuardError) as exc:
        print("result   FAIL: %s" % describe_error(exc), file=out)
        return 1
    channel.shutdown()
    channel.close()
    print("result   ok: %s accepts %s upgrades" % (peer, PROTOCOL), file=out)
    return 0


def resolve_tcp(host, port, numeric=False):
    """[(family, sockaddr)] for a TCP connection to host:port; raises OSError (gaierror)."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def check_fwmark(mark):
    """Fail at start, not at the first connect, when SO_MARK is not allowed."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise FatalError("--fwmark %d: %s (it needs Linux and CAP_NET_ADMIN)"
                         % (mark, describe_error(exc)))
    finally:
        probe.close()


# =============================================================================================
# CLI: one parser for every mode; command line > config file > environment > defaults
# =============================================================================================

MODES = ("client", "server", "check")
ENV_PREFIX = "PROXYGUARD_"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Bounds of the time options, in seconds, with their words for errors and --help. They go
# into socket timeouts: SO_RCVTIMEO/SO_SNDTIMEO (a timeval) and TCP_USER_TIMEOUT (milliseconds
# in a 32-bit int, so 24.8 days at most), and Python's own; a day and an hour stay far below.
TIMEOUT_BOUNDS = {
    "idle_timeout": (0.001, 86400.0, "0 (never) or 0.001 to 86400 seconds (1 day)"),
    "connect_timeout": (0.001, 3600.0, "0.001 to 3600 seconds (1 hour)"),
    "handshake_timeout": (0.001, 3600.0, "0.001 to 3600 seconds (1 hour)"),
}
# Two threads per tunnel: far beyond what a system's thread limit allows.
MAX_CLIENTS_BOUND = 100000
# setsockopt passes an int option as a C int: a mark must fit in 31 bits.
MAX_FWMARK = 0x7FFFFFFF

_ParserBase = configargparse.ArgumentParser if configargparse else argparse.ArgumentParser


class OptionParser(_ParserBase):
    """The parser, with argparse's two-line exit replaced by UsageError (main prints one line)."""

    def error(self, message):
        raise UsageError(message)


def fwmark_value(text):
    """--fwmark: decimal, or hexadecimal as `wg` shows it (0xca6c)."""
    text = text.strip()
    for base in (10, 0):
        try:
            return int(text, base)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError("%r: not a number (decimal, or hex as 0xca6c)" % text)


def build_parser():
    extra = {}
    if configargparse:
        extra = dict(auto_env_var_prefix=ENV_PREFIX, add_env_var_help=True,
                     add_config_file_help=False,
                     config_file_parser_class=configargparse.DefaultConfigFileParser)
    parser = OptionParser(
        prog="proxyguard.py", description="Carry WireGuard's UDP over one HTTP(S) connection "
        "(ProxyGuard UoTLV/1). Options also come from a config file (-c, 'key = value') and "
        "from %s<OPTION> environment variables; the command line wins over the config file, "
        "which wins over the environment." % ENV_PREFIX,
        epilog="Examples: proxyguard.py server --listen [::]:443 --to 127.0.0.1:51820 | "
               "proxyguard.py client --to https://vpn.example.org/proxyguard | "
               "proxyguard.py -c /etc/proxyguard/client.conf", **extra)
    add = parser.add_argument
    if configargparse:
        add("-c", "--config", is_config_file=True, metavar="FILE",
            help="config file of 'option = value' lines (see proxyguard.conf.example)")
    else:
        add("-c", "--config", metavar="FILE", help="config file (needs configargparse)")
    add("--mode", choices=MODES, help="client, server, or check (try one connection to --to "
        "and print each step); required. 'proxyguard.py client ...' is short for "
        "'--mode client ...'")
    add("--to", help="client: the server's URL, http(s)://host[:port][/path] (required); "
        "server: WireGuard's HOST:PORT (default %s)" % DEFAULT_SERVER_TO)
    add("--listen", metavar="HOST:PORT", default=DEFAULT_SERVER_LISTEN,
        help="server: where to accept connections, [::]:443 for all (default %(default)s)")
    add("--listen-port", type=int, default=DEFAULT_LISTEN_PORT, metavar="PORT",
        help="client: UDP port on 127.0.0.1 that WireGuard's Endpoint names "
             "(default %(default)s)")
    add("--forward-port", type=int, default=DEFAULT_FORWARD_PORT, metavar="PORT",
        help="client: WireGuard's ListenPort on 127.0.0.1, where replies go "
             "(default %(default)s)")
    add("--peer-ips", default="", metavar="IP,IP",
        help="client: the server's IP addresses, tried in order; skips DNS")
    add("--fwmark", type=fwmark_value, default=-1, metavar="MARK",
        help="client: Linux SO_MARK on the TCP socket, so it bypasses the VPN route, 0 to "
             "0x7fffffff, decimal or hex; needs CAP_NET_ADMIN (default -1, off)")
    add("--tcp-port", type=int, default=0, metavar="PORT",
        help="client: TCP source port (default 0, any)")
    add("--user-agent", default=DEFAULT_USER_AGENT, help="client: User-Agent header "
        "(default %(default)s)")
    add("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
        help="client: TCP connect plus TLS and upgrade, at most 3600 (default %(default)g)")
    add("--proxy", metavar="URL", help="client: reach the server through this HTTP proxy "
        "with CONNECT, http://[user:pass@]host:port; 'none' ignores HTTPS_PROXY/HTTP_PROXY "
        "(default: those variables, honouring NO_PROXY)")
    add("--ca-file", metavar="PEM", help="client: also trust the CAs in this file for https://")
    add("--tls-min-version", choices=sorted(TLS_VERSIONS), default="1.3",
        help="client: oldest TLS version accepted (default %(default)s, as the original)")
    add("--tls-cert", metavar="PEM", help="server: speak HTTPS with this certificate chain "
        "(reloaded on SIGHUP)")
    add("--tls-key", metavar="PEM", help="server: the private key for --tls-cert")
    add("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
        help="close a tunnel after this long without data either way, at most 86400; "
             "0 = never (default %(default)g)")
    add("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
        help="server: open tunnels at most (up to %d); the next client gets 503 (default "
             "%%(default)s, 0 = no limit)" % MAX_CLIENTS_BOUND)
    add("--trusted-proxies", default=DEFAULT_TRUSTED_PROXIES, metavar="NETS",
        help="server: reverse proxies whose X-Forwarded-For/Forwarded name the real client in "
             "logs (default %(default)s; '' trusts none)")
    add("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT, metavar="SECONDS",
        help="server: time a new connection has for TLS and its request head, at most 3600 "
             "(default %(default)g)")
    add("--log-level", choices=LOG_LEVELS, default="info", help="(default %(default)s)")
    add("--version", action="version", version="proxyguard.py %s (%s)"
        % (__version__, PROTOCOL))
    return parser


def config_file_keys(argv):
    """The option names a -c/--config file sets, so the environment cannot override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return set()
    try:
        with open(path) as stream:
            items = configargparse.DefaultConfigFileParser().parse(stream)
    except OSError as exc:
        raise UsageError("-c %r: cannot read the config file: %s"
                         % (path, describe_error(exc)))
    except configargparse.ConfigFileParserException as exc:
        raise UsageError("-c %r: %s" % (path, exc))
    return {key.replace("_", "-").lower() for key in items}


def parse_options(argv, environ=None):
    """Parse and check every option; return the argparse namespace. Raises UsageError."""
    environ = os.environ if environ is None else environ
    argv = list(argv)
    if argv and argv[0] in MODES:
        argv = ["--mode"] + argv
    parser = build_parser()
    if configargparse is None:
        used = [name for name in environ if name.startswith(ENV_PREFIX)]
        if used or any(arg in ("-c", "--config") or arg.startswith("--config=")
                       for arg in argv):
            raise UsageError("config files and %s* environment variables (%s) need the "
                             "configargparse package: pip install configargparse, or give "
                             "every option on the command line"
                             % (ENV_PREFIX, ", ".join(used) or "-c"))
        options = parser.parse_args(argv)
    else:
        # configargparse ranks the environment above config files; we rank the file higher.
        in_file = config_file_keys(argv)
        env = {name: value for name, value in environ.items() if name.startswith(ENV_PREFIX)
               and name[len(ENV_PREFIX):].replace("_", "-").lower() not in in_file}
        options = parser.parse_args(argv, env_vars=env)
    check_options(options)
    return options


def check_options(options):
    """Mode-dependent checks and conversions; raises UsageError naming the option."""
    if options.mode is None:
        raise UsageError("--mode is required: client, server or check (or 'mode = client' in "
                         "the config file)")
    for name, (low, high, words) in TIMEOUT_BOUNDS.items():
        value = getattr(options, name)  # inf and nan fail both comparisons
        if not (low <= value <= high or (value == 0 and name == "idle_timeout")):
            shown = repr(value)[:-2] if repr(value).endswith(".0") else repr(value)
            raise UsageError("--%s %s: must be %s" % (name.replace("_", "-"), shown, words))
    if options.mode == "server":
        options.listen = parse_host_port(options.listen, "--listen", default_host="0.0.0.0")
        to = options.to or DEFAULT_SERVER_TO
        if "://" in to:
            raise UsageError("--to %r: the server's --to is WireGuard's HOST:PORT, for example "
                             "%s, not a URL (a URL is the client's --to)" % (to, DEFAULT_SERVER_TO))
        options.to = parse_host_port(to, "--to")
        options.trusted_proxies = parse_networks(options.trusted_proxies, "--trusted-proxies")
        if not 0 <= options.max_clients <= MAX_CLIENTS_BOUND:
            raise UsageError("--max-clients %r: must be 0 (no limit) or up to %d"
                             % (options.max_clients, MAX_CLIENTS_BOUND))
        if bool(options.tls_cert) != bool(options.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        return
    if not options.to:
        raise UsageError("--to is required for the %s: the server's URL, for example "
                         "https://vpn.example.org/proxyguard" % options.mode)
    options.to = ServerURL(options.to)
    options.listen_port = parse_port(options.listen_port, "--listen-port")
    options.forward_port = parse_port(options.forward_port, "--forward-port")
    options.tcp_port = parse_port(options.tcp_port, "--tcp-port", allow_zero=True)
    if options.mode == "client" and options.listen_port == options.forward_port:
        raise UsageError("--listen-port %d and --forward-port %d are one port: the client would "
                         "send WireGuard's traffic back to itself (--listen-port is WireGuard's "
                         "Endpoint, --forward-port its ListenPort)"
                         % (options.listen_port, options.forward_port))
    if not (options.fwmark == -1 or 0 <= options.fwmark <= MAX_FWMARK):
        raise UsageError("--fwmark %r: must be -1 (off) or 0 to %d (0x%x)"
                         % (options.fwmark, MAX_FWMARK, MAX_FWMARK))
    check_header_value(options.user_agent, "--user-agent")
    ips = [ip.strip() for ip in options.peer_ips.split(",") if ip.strip()]
    for ip in ips:
        try:  # strict: getaddrinfo would read 1.2.3 as 1.2.0.3
            ipaddress.ip_address(ip)
        except ValueError:
            raise UsageError("--peer-ips: %r is not an IP address" % ip)
    options.peer_ips = ips


def check_header_value(text, option):
    """Refuse what cannot go into an HTTP header as written: control characters (a line
    break would inject headers) and characters beyond latin-1. Raises UsageError."""
    bad = next((ch for ch in text if ord(ch) < 32 or 127 <= ord(ch) < 160), None)
    if bad is not None:
        raise UsageError("%s %r: control character %r not allowed in an HTTP header"
                         % (option, text, bad))
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise UsageError("%s %r: only ASCII or latin-1 characters can go into an HTTP header"
                         % (option, text))


def build_service(options):
    """The Server or Client the options describe. Raises UsageError or FatalError."""
    if options.mode == "server":
        factory = None
        if options.tls_cert:  # a factory, so that SIGHUP can load the files again
            factory = functools.partial(server_tls_context, options.tls_cert, options.tls_key)
        return Server(options.listen, options.to, idle_timeout=options.idle_timeout,
                      handshake_timeout=options.handshake_timeout, tls_context_factory=factory,
                      trusted_proxies=options.trusted_proxies, max_clients=options.max_clients)
    return Client(build_dialer(options), listen_port=options.listen_port,
                  forward_port=options.forward_port, idle_timeout=options.idle_timeout)


def build_dialer(options):
    """The client's (or check's) Dialer. Raises UsageError."""
    tls_context = None
    if options.to.tls:
        tls_context = client_tls_context(options.ca_file, options.tls_min_version)
    if options.proxy is None:
        proxy = proxy_from_environment(options.to)
    elif options.proxy.lower() in ("", "none", "direct"):
        proxy = None
    else:
        proxy = ProxyURL(options.proxy)
    return Dialer(options.to, proxy=proxy, peer_ips=options.peer_ips, fwmark=options.fwmark,
                  tcp_port=options.tcp_port, user_agent=options.user_agent,
                  connect_timeout=options.connect_timeout, tls_context=tls_context)


# =============================================================================================
# main
# =============================================================================================


def run_until_signal(service):
    """Run `service.serve_forever()` in a thread until SIGINT/SIGTERM; SIGHUP reloads TLS.

    Returns 0 after a signal (clean stop), 1 if the service ended by itself (a bug).
    """
    stop = threading.Event()
    signalled = []

    def on_stop(signum, _frame):
        signalled.append(signum)
        stop.set()

    def serve():
        try:
            service.serve_forever()
        except Exception:
            log.exception("the service stopped on an unexpected error")
        finally:
            stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)
        if hasattr(service, "reload_tls") and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda _signum, _frame: service.reload_tls())
    thread = threading.Thread(target=serve, name="service", daemon=True)
    thread.start()
    stop.wait()
    if signalled:
        log.info("stopping on %s", signal.Signals(signalled[0]).name)
    service.stop()
    thread.join(5)
    return 0 if signalled else 1


def configure_logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


def main(argv=None):
    """Run proxyguard.py with `argv` (default sys.argv[1:]); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_options(argv)
    except UsageError as exc:
        print("proxyguard.py: error: %s (see --help)" % exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else 0
    configure_logging(options.log_level)
    try:
        if options.mode == "check":
            return run_check(build_dialer(options))
        service = build_service(options)
    except UsageError as exc:
        print("proxyguard.py: error: %s" % exc, file=sys.stderr)
        return 2
    except FatalError as exc:
        log.error("%s", exc)
        return 1
    return run_until_signal(service)


if __name__ == "__main__":
    sys.exit(main())
