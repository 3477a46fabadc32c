#!/usr/bin/env python3
"""proxyguard_bench.py: measure proxyguard.py on loopback (standard library only, Linux).

Starts, on free 127.0.0.1 ports, a UDP echo (its own process, standing in for WireGuard behind
the server), `proxyguard.py server` and `proxyguard.py client`, and plays WireGuard in front of
the client itself:

    bench socket --UDP--> client --HTTP(S) UoTLV/1--> server --UDP--> echo
                 <-------        <--------------------        <------

or, with --transport websocket, the same over WebSocket (ws:// or wss://; the subprotocol
proxyguard-uotlv that client and server agree on: the datagrams a pump finds waiting go as UoTLV/1
frames in one binary message, which the client masks and the server unmasks).

Measurements, one table line each:

    load       keeps WINDOW datagrams of SIZE bytes in flight for DURATION seconds. `rt/s` is
               round trips completed per second (datagrams back at the bench), `Mbit/s` is
               rt/s * SIZE * 8 (payload, each direction), `one-way/s` is datagrams the echo
               received per second (client -> server direction alone), `loss` is datagrams
               sent minus received after a short drain. CPU is user+sys from /proc/PID/stat of
               each process during the load, as % of one core, and per round trip.
    ping       one datagram at a time, ROUNDTRIPS times: round-trip p50/p99 in microseconds.
    ping direct  the same straight to the echo, without proxyguard: the baseline.
    tunnels    (--tunnels N) N more tunnels at once, opened by raw TCP (or TLS) sockets of the
               bench that do the UoTLV/1 upgrade and framing by hand, each passing a few round
               trips; then the server's RSS and threads, new handshakes timed (connect to 101)
               with the N open, and the CPU (and scheduler wake-ups) of server and client
               while everything sits idle for IDLE seconds: ~0 means no polling. Then all N
               are closed at once: "fds back in", "threads back in" are the seconds until the
               server's descriptors and threads are back to before, and meanwhile a probe
               process (`proxyguard_bench.py _probe`, away from the bench's GIL) makes new
               handshakes one at a time, one every 10 ms ("during the teardown": p50, p99).
               After the table, the worst of the runs (medians hide a slow one): every run's
               teardown, how many within 5 s, the handshakes during the teardowns pooled over
               all runs, the largest RSS with the N open.
    peers      (--tests peers, --peers N) N tunnels to one server, from one `proxyguard.py up
               PROFILE --write-config FILE` process (a profile the bench writes, a [Peer] with
               a ProxyEndpoint per tunnel: ClientGroup) and from N `client` processes,
               alternating; the bench's socket spreads the load's window over the N tunnel
               ports. Saturated, then paced at one rate for both (--peers-rate; default half
               the lower saturated rate of the first round: on 2 cores N processes use both
               and one process is bound by its GIL, so only below saturation is the CPU per
               datagram compared at the same load). Client CPU is all client processes
               summed; the ratio separate/one process of client CPU per round trip, per
               round and its median: >= 1 means one process costs no more. Needs
               CAP_NET_ADMIN (up marks its tunnels' sockets: both arrangements get the mark).

Transports (--transport): uotlv (http://, https://; the table's "via" says plain, tls) or
websocket (ws://, wss://; via ws, wss), or both, alternating in each run like the sides of
--against, then the WebSocket/UoTLV/1 ratio of one-way datagrams/s at each size, plain and TLS,
and of the ping's p50. The tunnels test speaks UoTLV/1 itself (raw sockets), so it runs over
UoTLV/1 only; the original (--against go) speaks only UoTLV/1, so over WebSocket
proxyguard.py is measured alone.

Side by side (--against): the same measurements of a second implementation, with the same echo
and bench socket, alternating between the two in each of --runs rounds (and the order between
rounds), then a table of medians with the ratio of each figure, put so that above 1 means
proxyguard.py did better:

    --against go       the original Go ProxyGuard 2.0.0, built offline from
                       ../shared/reference/proxyguard-go-2.0.0 (beside this file's folder) into a
                       cache under the temp dir that is reused while source and go are unchanged,
                       or taken from --go-bin DIR. Plain HTTP only: its server has no TLS, so TLS
                       is measured for ours alone. Its UDP sockets keep the kernel's default
                       buffers, so the load window is 64 (see AGAINST_GO_WINDOW). Without the
                       source or go, one line says so and proxyguard.py is measured alone.
    --against PYTHON   proxyguard.py run by another interpreter (vs --python): what the
                       interpreter alone changes.
    --against FILE.py  another version of proxyguard.py, by the same interpreter: what a
                       change to the code changes.

    Figures: one-way datagrams/s and loss at each --size; round trip p50/p99 (ping); CPU
    seconds (client + server, user+sys) per GB of payload relayed (both directions); TLS
    datagrams/s and TLS/plain; scheduler wake-ups and CPU of server + client with --tunnels
    tunnels idle for --idle seconds; server RSS per tunnel.

Examples:
    python3 proxyguard_bench.py                         # plain, 1420 bytes, about 10 s
    python3 proxyguard_bench.py --both --size 1420,100  # plain and TLS, two sizes
    python3 proxyguard_bench.py --tls --runs 3          # medians of 3 runs
    python3 proxyguard_bench.py --transport both --both --size 1420,100 --runs 5
                                                        # WebSocket vs UoTLV/1, plain and TLS
    python3 proxyguard_bench.py --tunnels 500           # tunnel count: RSS and idle CPU
    python3 proxyguard_bench.py --tunnels 5000 --runs 10 --idle 0.5 --nofile 1024
                                                        # teardown of 5,000, as under systemd
    python3 proxyguard_bench.py --tests peers --peers 4 --runs 5
                                                        # 4 peers: one process vs 4, ~2 min
    python3 proxyguard_bench.py --json > bench.json
    python3 proxyguard_bench.py --against go            # vs the original, 5 rounds, ~3 min
    python3 proxyguard_bench.py --against /usr/bin/python3 --python python3.11  # interpreters

Numbers on loopback are indicative: all four processes (bench, client, server, echo) share the
machine's cores, so a 2-core box measures contention as much as proxyguard. The `gen` CPU
column tells whether the bench itself was the bottleneck.
"""

import argparse
import collections
import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
BUFFER_BYTES = 4 << 20
SEQ = struct.Struct("!Q")
FRAME_HEADER = struct.Struct("!H")
UOTLV, WEBSOCKET = "uotlv", "websocket"
# The client's URL scheme for each (transport, TLS), and the table's "via" for it.
SCHEMES = {(UOTLV, False): "http", (UOTLV, True): "https",
           (WEBSOCKET, False): "ws", (WEBSOCKET, True): "wss"}
VIA = {"http": "plain", "https": "tls", "ws": "ws", "wss": "wss"}


def note(text):
    """Progress on stderr (the table or JSON goes to stdout)."""
    print("# " + text, file=sys.stderr, flush=True)


# =============================================================================================
# /proc readers
# =============================================================================================


def proc_cpu(pid):
    """User+system CPU seconds of the whole process `pid` (all threads, 1/CLK_TCK steps)."""
    with open("/proc/%d/stat" % pid) as stream:
        data = stream.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat fields 14 utime, 15 stime


def proc_status(pid):
    """VmRSS in KiB and the thread count, from /proc/PID/status."""
    result = {}
    with open("/proc/%d/status" % pid) as stream:
        for line in stream:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                result[key] = int(value.split()[0])
    return result.get("VmRSS", 0), result.get("Threads", 0)


def proc_fds(pid):
    """How many file descriptors `pid` has open (sockets included)."""
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_sched(pid):
    """(CPU ns, times scheduled) summed over the threads of `pid`, from schedstat; or None.

    Finer than /proc/PID/stat's 10 ms ticks, and the count of times scheduled shows wake-ups:
    a process that polls is scheduled every few milliseconds even when it has nothing to do.
    """
    total_ns = slices = 0
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, task)) as stream:
                fields = stream.read().split()
        except OSError:  # the thread ended meanwhile, or no schedstat in this kernel
            continue
        total_ns += int(fields[0])
        slices += int(fields[2])
    return total_ns, slices


def self_cpu():
    times = os.times()
    return times.user + times.system


# =============================================================================================
# The UDP echo (its own process: `proxyguard_bench.py _echo`)
# =============================================================================================


def echo_main():
    """Echo every datagram to its source; count them. Prints `PORT CONTROL_PORT` when ready.

    A datagram `stats` on the control port is answered with `COUNT BYTES`.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
    sock.bind((LOOPBACK, 0))
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.bind((LOOPBACK, 0))
    counts = [0, 0]

    def answer():
        while True:
            request, source = control.recvfrom(100)
            if request == b"stats":
                control.sendto(b"%d %d" % (counts[0], counts[1]), source)

    threading.Thread(target=answer, daemon=True).start()
    print(sock.getsockname()[1], control.getsockname()[1], flush=True)
    buffer = bytearray(70000)
    view = memoryview(buffer)
    recvfrom_into, sendto = sock.recvfrom_into, sock.sendto
    while True:
        try:
            size, source = recvfrom_into(buffer)
            counts[0] += 1
            counts[1] += size
            sendto(view[:size], source)
        except OSError:
            continue


class Echo:
    """Handle on the echo process."""

    def __init__(self, procs, pinger=None, blocking=False):
        argv = ([pinger, "echo-blocking" if blocking else "echo"] if pinger else
                [sys.executable, os.path.abspath(__file__), "_echo"])
        self.popen = procs.spawn("echo", argv, stdout=subprocess.PIPE)
        line = self.popen.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError("the echo process did not start")
        self.port, control_port = int(line[0]), int(line[1])
        self.pid = self.popen.pid
        self.control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control.connect((LOOPBACK, control_port))
        self.control.settimeout(2)

    def stats(self):
        """(datagrams, bytes) the echo has received so far."""
        self.control.send(b"stats")
        count, size = self.control.recv(100).split()
        return int(count), int(size)


# =============================================================================================
# Processes
# =============================================================================================


def _prepare_child(nofile=None):
    """preexec_fn: the child gets SIGTERM if the bench dies (even by SIGKILL; Linux only), and
    starts with the soft open-files limit `nofile` if given (as systemd's 1024)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the bench stops us in order
    if nofile:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class Processes:
    """The child processes; `stop_all()` ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.children = []

    def spawn(self, name, argv, stdout=None, stdin=subprocess.DEVNULL, nofile=None):
        """Start `argv`, its stderr (and stdout unless given) to a log; `nofile`: its soft
        open-files limit."""
        log_path = os.path.join(self.workdir, "%s-%d.log" % (name, len(self.children)))
        log_file = open(log_path, "w")
        popen = subprocess.Popen(argv, stdin=stdin,
                                 stdout=stdout if stdout is not None else log_file,
                                 stderr=log_file,
                                 preexec_fn=functools.partial(_prepare_child, nofile))
        popen.log_path = log_path
        popen.log_file = log_file
        popen.name = name
        self.children.append(popen)
        return popen

    def wait_log(self, popen, text, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(popen.log_path) as stream:
                log = stream.read()
            if text in log:
                return
            if popen.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("%s did not log %r (exit status %r); its log:\n%s"
                           % (popen.name, text, popen.poll(), log))

    def stop(self, popen):
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        popen.log_file.close()
        for stream in (popen.stdin, popen.stdout):
            if stream is not None:
                stream.close()
        if popen in self.children:
            self.children.remove(popen)

    def stop_all(self):
        for popen in reversed(list(self.children)):
            try:
                self.stop(popen)
            except Exception:
                pass


def free_port(kind=socket.SOCK_STREAM):
    """A port free on 127.0.0.1 for both TCP and UDP right now (the tests use it too)."""
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


def make_certificates(workdir):
    """A throw-away CA and a server certificate for 127.0.0.1, made with `openssl`.

    Returns (ca_file, cert_file, key_file). The extensions satisfy strict verification
    (VERIFY_X509_STRICT, the default from Python 3.13 on).
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("--tls needs the openssl command")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    with open(os.path.join(workdir, "server.ext"), "w") as stream:
        stream.write("subjectAltName = IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n"
                     "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
                     "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")
    commands = [
        ["openssl", "req", "-x509"] + ec + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=proxyguard_bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-new"] + ec + ["-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext"],
    ]
    for command in commands:
        result = subprocess.run(command, cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if result.returncode:
            raise RuntimeError("%s failed:\n%s" % (" ".join(command),
                                                   result.stdout.decode(errors="replace")))
    return tuple(os.path.join(workdir, name) for name in ("ca.pem", "server.pem", "server.key"))


def spawn_on_free_port(procs, name, argv_of, ready, kind, nofile=None):
    """Start `argv_of(port)` on a free port of `kind` until it logs `ready`; (port, popen).
    `nofile`: its soft open-files limit (Processes.spawn).

    A free port can be taken between probe and bind: three attempts."""
    for attempt in range(3):
        port = free_port(kind)
        popen = procs.spawn(name, argv_of(port), nofile=nofile)
        try:
            procs.wait_log(popen, ready)
            return port, popen
        except RuntimeError:
            procs.stop(popen)
            if attempt == 2:
                raise


# The peers test's arrangements of N tunnels to one server: N client processes, or one
# `up --write-config` process with a peer for each (ClientGroup).
SEPARATE, ONE_PROCESS = "separate", "one process"
# Both arrangements mark their tunnels' TCP sockets alike: up marks them with its FwMark
# (wg-quick's 51820 by default), which needs CAP_NET_ADMIN, so the separate clients get the
# same --fwmark and only the arrangement differs.
PEERS_FWMARK = 51820
# A placeholder WireGuard key for the bench's profile: up passes keys through unread.
PEER_KEY = "cHJveHlndWFyZF9iZW5jaCBwbGFjZWhvbGRlciBrZXk="


def peers_profile(urls):
    """A WireGuard profile for `up`: an [Interface] and one [Peer] per URL (its
    ProxyEndpoint), each with AllowedIPs of its own, as eduVPN's portal writes them."""
    return "[Interface]\nPrivateKey = %s\nAddress = 10.49.0.2/24\n" % PEER_KEY + "".join(
        "\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.%d.%d.0/24\nProxyEndpoint = %s\n"
        % (PEER_KEY, 50 + index // 256, index % 256, url) for index, url in enumerate(urls))


def endpoint_ports(config_text):
    """The tunnels' ports in the configuration up writes: its `Endpoint = 127.0.0.1:PORT`
    lines, in the order of the peers."""
    return [int(port) for port in re.findall(r"^Endpoint = 127\.0\.0\.1:(\d+)$", config_text,
                                             re.MULTILINE)]


def round_robin_sender(sock, addresses):
    """send(payload) through the unconnected `sock` to each of `addresses` in turn."""
    sendto, turns = sock.sendto, itertools.cycle(addresses)

    def send(payload):
        return sendto(payload, next(turns))

    return send


class Setup:
    """echo <- server <- client(s) <- bench socket, running for one implementation, protocol
    (UOTLV or WEBSOCKET) and TLS or not.

    The clients: one (`peers` 0), the bench's socket connected to its port; or `peers`
    tunnels to the same server (paths /peer0, /peer1...), each on a UDP port of its own, the
    bench's socket sending to them in turn (`send`) and receiving from all: `peers` client
    processes (`arrangement` SEPARATE) or one `up --write-config` process (ONE_PROCESS, with
    `up_args`).
    `server_of`: another Setup whose server this one uses (and leaves running at stop)."""

    def __init__(self, procs, echo, impl, tls, workdir, server_args=(), client_args=(),
                 protocol=UOTLV, nofile=None, peers=0, arrangement=SEPARATE, server_of=None,
                 up_args=()):
        self.procs = procs
        self.echo = echo
        self.impl = impl
        self.tls = tls
        self.protocol = protocol
        self.arrangement = arrangement if peers else None
        self.ca_file = None
        server_extra, client_extra = list(server_args), list(client_args)
        if tls:
            if not impl.tls:
                raise RuntimeError("%s has no TLS server" % impl.label)
            if server_of is None:
                self.ca_file, cert, key = make_certificates(workdir)
                server_extra += ["--tls-cert", cert, "--tls-key", key]
            else:
                self.ca_file = server_of.ca_file
            client_extra += ["--ca-file", self.ca_file]
        # The bench's socket is WireGuard: bound to the clients' --forward-port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        self.sock.bind((LOOPBACK, 0))
        forward_port = self.sock.getsockname()[1]
        self.owns_server = server_of is None
        if server_of is None:
            self.server_port, self.server = spawn_on_free_port(
                procs, impl.key + "-server", lambda port: impl.server_argv(
                    "%s:%d" % (LOOPBACK, port), "%s:%d" % (LOOPBACK, echo.port)) + server_extra,
                impl.server_ready, socket.SOCK_STREAM, nofile)
        else:
            self.server_port, self.server = server_of.server_port, server_of.server
        base = "%s://%s:%d/" % (SCHEMES[protocol, tls], LOOPBACK, self.server_port)
        self.url = base + "bench"
        if not peers:
            port, client = spawn_on_free_port(
                procs, impl.key + "-client",
                lambda port: impl.client_argv(self.url, port, forward_port) + client_extra,
                impl.client_ready, socket.SOCK_DGRAM, nofile)
            ports, self.clients = [port], [client]
        elif arrangement == ONE_PROCESS:
            ports, self.clients = self._start_up_process(
                workdir, [base + "peer%d" % index for index in range(peers)], forward_port,
                client_extra + list(up_args))
        else:
            ports, self.clients = zip(*[spawn_on_free_port(
                procs, "%s-client%d" % (impl.key, index),
                lambda port, index=index: impl.client_argv(
                    base + "peer%d" % index, port, forward_port)
                + ["--fwmark", str(PEERS_FWMARK)] + client_extra,
                impl.client_ready, socket.SOCK_DGRAM, nofile) for index in range(peers)])
        self.client = self.clients[0]
        self.client_pids = [client.pid for client in self.clients]
        self.targets = [(LOOPBACK, port) for port in ports]
        if peers:
            self.send = round_robin_sender(self.sock, self.targets)
        else:
            self.sock.connect(self.targets[0])
            self.send = self.sock.send
        self.direct = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.direct.connect((LOOPBACK, echo.port))
        self.wait_tunnel()

    def _start_up_process(self, workdir, urls, forward_port, client_extra):
        """`up PROFILE --write-config FILE` with a peer for each of `urls`; (its tunnels'
        ports, [its process])."""
        profile = os.path.join(workdir, "pgbench%d.conf" % len(self.procs.children))
        written = profile[:-len(".conf")] + "-wg.conf"
        with open(profile, "w") as stream:
            stream.write(peers_profile(urls))
        popen = self.procs.spawn(self.impl.key + "-up", self.impl.up_argv(
            profile, written, forward_port, PEERS_FWMARK) + client_extra)
        self.procs.wait_log(popen, "written to")
        with open(written) as stream:
            ports = endpoint_ports(stream.read())
        if len(ports) != len(urls):
            raise RuntimeError("up wrote %d endpoints for %d peers in %s"
                               % (len(ports), len(urls), written))
        return ports, [popen]

    @property
    def transport(self):
        """The table's "via": plain, tls (UoTLV/1), ws, wss (WebSocket)."""
        return VIA[SCHEMES[self.protocol, self.tls]]

    def wait_tunnel(self, timeout=15):
        """Ping each tunnel until one comes back: clients connect lazily, on the first
        datagram."""
        deadline = time.monotonic() + timeout
        payload = bytearray(64)
        seq = 1 << 62
        for target in self.targets:
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "no reply through the tunnel at %s within %ds; client logs:\n%s"
                        % ("%s:%d" % target, timeout, "".join(
                            open(client.log_path).read() for client in self.clients)))
                seq += 1
                SEQ.pack_into(payload, 0, seq)
                try:
                    self.sock.sendto(payload, target)
                except ConnectionRefusedError:
                    pass
                if wait_reply(self.sock, seq, 0.5) is not None:
                    break
        drain(self.sock)

    def stop(self):
        for client in self.clients:
            self.procs.stop(client)
        if self.owns_server:
            self.procs.stop(self.server)
        self.sock.close()
        self.direct.close()


# =============================================================================================
# The implementations under test: proxyguard.py, and the original for --against
# =============================================================================================

REFERENCE = os.path.join(HERE, "..", "shared", "reference", "proxyguard-go-2.0.0")
GO_PROGRAMS = ("proxyguard-server", "proxyguard-client")

# Run by the interpreter under test: what it is, and whether libpython is a shared library in
# it. Debian's python3 says Py_ENABLE_SHARED=1 (it ships a libpython) yet its executable links
# the interpreter in statically, which is faster: the mapping tells the truth.
INTERPRETER_PROBE = """\
import json, platform, sys, sysconfig
with open('/proc/self/maps') as stream:
    mapped = 'libpython' in stream.read()
print(json.dumps({'executable': sys.executable, 'version': platform.python_version(),
                  'implementation': platform.python_implementation(),
                  'enable_shared': sysconfig.get_config_var('Py_ENABLE_SHARED'),
                  'libpython_shared': mapped}))
"""


class NoReference(Exception):
    """The original cannot be run here (no source, no go, or the build failed)."""


def run_text(argv, **kwargs):
    """stdout of `argv` as text; RuntimeError with its output if it fails."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=600, **kwargs)
    text = result.stdout.decode(errors="replace").strip()
    if result.returncode:
        raise RuntimeError("%s failed (status %d): %s" % (" ".join(argv), result.returncode, text))
    return text


class PythonSide:
    """proxyguard.py at `script`, run by the interpreter `python`."""

    tls = True
    protocols = (UOTLV, WEBSOCKET)
    server_ready = client_ready = "listening on"

    def __init__(self, script, python, key="py", label="proxyguard.py", short="py"):
        self.script, self.python, self.key = script, python, key
        self.label, self.short = label, short  # short: in the ratio's name, "py/Go"
        self.info = json.loads(run_text([python, "-c", INTERPRETER_PROBE]))

    def interpreter(self):
        """Short name of the interpreter: 'Python 3.11.2 static' or '... shared'."""
        return "Python %s %s" % (self.info["version"],
                                 "shared" if self.info["libpython_shared"] else "static")

    def describe(self):
        info = self.info
        return "%s: %s, %s %s, Py_ENABLE_SHARED=%s, libpython %s" % (
            self.label, info["executable"], info["implementation"], info["version"],
            info["enable_shared"],
            "shared (mapped from a .so)" if info["libpython_shared"] else "linked statically")

    def server_argv(self, listen, to):
        return [self.python, self.script, "server", "--listen", listen, "--to", to]

    def client_argv(self, url, listen_port, forward_port):
        return [self.python, self.script, "client", "--to", url,
                "--listen-port", str(listen_port), "--forward-port", str(forward_port)]

    def up_argv(self, profile, write_config, forward_port, fwmark):
        """Several peers in one process: the profile's tunnels alone, their WireGuard
        configuration written to `write_config` (no wg-quick)."""
        return [self.python, self.script, "up", profile, "--write-config", write_config,
                "--forward-port", str(forward_port), "--fwmark", str(fwmark)]


class GoSide:
    """The original ProxyGuard: proxyguard-server and proxyguard-client in `bindir`.

    Its server has no TLS (a plain http.Server on a TCP listener), and it leaves its UDP
    sockets at the kernel's default buffer sizes.
    """

    key = "go"
    short = "Go"
    tls = False
    protocols = (UOTLV,)
    server_ready = "listening on"
    client_ready = "waiting for traffic"

    def __init__(self, bindir, go_version):
        self.bindir, self.go_version = bindir, go_version
        version = run_text([os.path.join(bindir, "proxyguard-server"), "-version"])
        self.version = version.split()[-1] if version else "?"
        self.label = "Go %s" % self.version

    def describe(self):
        return "%s: %s, built with %s" % (self.label, self.bindir, self.go_version)

    def server_argv(self, listen, to):
        return [os.path.join(self.bindir, "proxyguard-server"), "-listen", listen, "-to", to]

    def client_argv(self, url, listen_port, forward_port):
        return [os.path.join(self.bindir, "proxyguard-client"), "-to", url,
                "-listen-port", str(listen_port), "-forward-port", str(forward_port)]


def go_version_of(binary):
    """The Go release a binary was built with (`go version FILE`), or 'go ?'."""
    if shutil.which("go") is None:
        return "go ?"
    try:
        return run_text(["go", "version", binary]).split()[-1]
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return "go ?"


def go_build_cached(what, sources, targets, build):
    """Build Go code into a cache under the temp dir; return (its bin dir, go's version).

    `sources` are (relative path, bytes) in a fixed order: the cache's name is a hash of them
    and `go version`, so a second run reuses the build and a changed source or toolchain
    builds afresh. `build(staging, env)` runs go build into the folder `staging`, which then
    becomes the bin dir once it holds `targets`. Offline: GOPROXY=off keeps go from looking
    for any dependency."""
    if shutil.which("go") is None:
        raise NoReference("no go command to build %s" % what)
    go_version = run_text(["go", "version"])
    digest = hashlib.sha256(go_version.encode())
    for name, data in sources:
        digest.update(name.encode() + b"\0")
        digest.update(data)
    cache = os.path.join(tempfile.gettempdir(), "proxyguard_bench-go-" + digest.hexdigest()[:16])
    bindir = os.path.join(cache, "bin")
    if all(os.access(os.path.join(bindir, name), os.X_OK) for name in targets):
        return bindir, go_version.split()[2]
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="bin-", dir=cache)
    note("building %s into %s" % (what, cache))
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOTOOLCHAIN="local",
               GOCACHE=os.path.join(cache, "gocache"), CGO_ENABLED="0")
    try:
        build(staging, env)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise NoReference("building %s failed: %s" % (what, exc))
    try:
        os.rename(staging, bindir)  # atomic: a concurrent bench sees all or nothing
    except OSError:  # another bench was quicker
        shutil.rmtree(staging, ignore_errors=True)
    return bindir, go_version.split()[2]


def build_go(source):
    """Build the original from `source` (go_build_cached); return (the bin dir, go version).
    The module has no dependencies."""
    if not os.path.isfile(os.path.join(source, "go.mod")):
        raise NoReference("no reference source at %s" % os.path.normpath(source))
    sources = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                sources.append((os.path.relpath(path, source), stream.read()))

    def build(staging, env):
        run_text(["go", "build", "-o", staging + os.sep, "./cmd/..."], cwd=source, env=env)

    return go_build_cached("the original from %s" % os.path.normpath(source), sources,
                           GO_PROGRAMS, build)


# --pinger go: the ping and the echo compiled, so that what the round trip measures is the
# proxies, not an interpreter at both ends. `pinger echo` works as echo_main (prints
# `PORT CONTROL_PORT`, answers `stats`); `pinger ping FD SIZE COUNT TIMEOUT_MS` pings through
# the connected UDP socket it inherits as FD (the bench's, bound to the client's forward
# port) and prints {"lost": N, "rtts_ns": [...]}: the percentiles are the bench's own.
# `ping-blocking` and `echo-blocking` wait in blocking system calls instead of Go's poller
# (--pinger go-blocking), as C programs would: the Go runtime spins a while before it sleeps.
GO_PINGER = r"""package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func arg(i int) int {
	v, err := strconv.Atoi(os.Args[i])
	must(err)
	return v
}

func echo(blocking bool) {
	loopback := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}
	control, err := net.ListenUDP("udp4", loopback)
	must(err)
	var count, size int64
	go func() {
		buf := make([]byte, 100)
		for {
			n, src, err := control.ReadFromUDPAddrPort(buf)
			if err == nil && string(buf[:n]) == "stats" {
				answer := fmt.Sprintf("%d %d", atomic.LoadInt64(&count), atomic.LoadInt64(&size))
				control.WriteToUDPAddrPort([]byte(answer), src)
			}
		}
	}()
	buf := make([]byte, 70000)
	if blocking {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
		must(err)
		must(syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<20))
		must(syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4<<20))
		must(syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
		name, err := syscall.Getsockname(fd)
		must(err)
		fmt.Printf("%d %d\n", name.(*syscall.SockaddrInet4).Port,
			control.LocalAddr().(*net.UDPAddr).Port)
		for {
			n, src, err := syscall.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			atomic.AddInt64(&count, 1)
			atomic.AddInt64(&size, int64(n))
			syscall.Sendto(fd, buf[:n], 0, src)
		}
	}
	conn, err := net.ListenUDP("udp4", loopback)
	must(err)
	must(conn.SetReadBuffer(4 << 20))
	must(conn.SetWriteBuffer(4 << 20))
	fmt.Printf("%d %d\n", conn.LocalAddr().(*net.UDPAddr).Port,
		control.LocalAddr().(*net.UDPAddr).Port)
	for {
		n, src, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			continue
		}
		atomic.AddInt64(&count, 1)
		atomic.AddInt64(&size, int64(n))
		conn.WriteToUDPAddrPort(buf[:n], src)
	}
}

// blockingConn waits in the kernel (blocking read, SO_RCVTIMEO) as a C program would,
// without the Go runtime's poller and its spinning threads.
type blockingConn struct{ fd int }

func (c blockingConn) Write(b []byte) (int, error) { return syscall.Write(c.fd, b) }
func (c blockingConn) Read(b []byte) (int, error)  { return syscall.Read(c.fd, b) }
func (c blockingConn) SetReadDeadline(t time.Time) error {
	tv := syscall.NsecToTimeval(time.Until(t).Nanoseconds())
	return syscall.SetsockoptTimeval(c.fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
}

type pingConn interface {
	Write([]byte) (int, error)
	Read([]byte) (int, error)
	SetReadDeadline(time.Time) error
}

func timedOut(err error) bool {
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return true
	}
	return err == syscall.EAGAIN
}

func ping(blocking bool) {
	var conn pingConn
	if blocking {
		must(syscall.SetNonblock(arg(2), false))
		conn = blockingConn{arg(2)}
	} else {
		packet, err := net.FilePacketConn(os.NewFile(uintptr(arg(2)), "ping socket"))
		must(err)
		conn = packet.(*net.UDPConn)
	}
	size, count, timeout := arg(3), arg(4), time.Duration(arg(5))*time.Millisecond
	payload := make([]byte, size)
	buf := make([]byte, 70000)
	base := uint64(time.Now().UnixMilli()) << 20
	rtts := make([]int64, 0, count)
	lost := 0
	for i := 0; i < count; i++ {
		seq := base + uint64(i)
		binary.BigEndian.PutUint64(payload, seq)
		start := time.Now()
		conn.Write(payload)
		must(conn.SetReadDeadline(start.Add(timeout)))
		for {
			n, err := conn.Read(buf)
			if err != nil {
				if timedOut(err) {
					lost++
					break
				}
				continue // an ICMP from earlier
			}
			if n >= 8 && binary.BigEndian.Uint64(buf) == seq {
				rtts = append(rtts, time.Since(start).Nanoseconds())
				break
			}
		}
	}
	out, err := json.Marshal(map[string]interface{}{"lost": lost, "rtts_ns": rtts})
	must(err)
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) == 2 && (os.Args[1] == "echo" || os.Args[1] == "echo-blocking") {
		echo(os.Args[1] == "echo-blocking")
	} else if len(os.Args) == 6 && (os.Args[1] == "ping" || os.Args[1] == "ping-blocking") {
		ping(os.Args[1] == "ping-blocking")
	} else {
		fmt.Fprintln(os.Stderr, "usage: pinger echo[-blocking] | "+
			"pinger ping[-blocking] FD SIZE COUNT TIMEOUT_MS")
		os.Exit(2)
	}
}
"""


def build_pinger():
    """The compiled pinger and echo (GO_PINGER), built offline and cached; its path."""
    sources = [("go.mod", b"module pinger\n\ngo 1.18\n"), ("main.go", GO_PINGER.encode())]

    def build(staging, env):
        workdir = tempfile.mkdtemp(prefix="src-", dir=os.path.dirname(staging))
        try:
            for name, data in sources:
                with open(os.path.join(workdir, name), "wb") as stream:
                    stream.write(data)
            run_text(["go", "build", "-o", os.path.join(staging, "pinger"), "."], cwd=workdir,
                     env=env)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    bindir, _ = go_build_cached("the Go pinger", sources, ["pinger"], build)
    return os.path.join(bindir, "pinger")


def go_ping(pinger, blocking, sock, size, count, timeout=1.0):
    """ping_pong by the compiled pinger (`blocking`: its ping-blocking), through `sock` (lent
    to it): the same result dict."""
    drain(sock)
    sock_timeout = sock.gettimeout()
    try:
        command = "ping-blocking" if blocking else "ping"
        out = subprocess.run([pinger, command, str(sock.fileno()), str(size), str(count),
                              str(int(timeout * 1000))], pass_fds=(sock.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=True,
                             timeout=count * timeout + 60).stdout
    finally:
        sock.settimeout(sock_timeout)  # Go may have changed the shared file description
    result = json.loads(out)
    rtts = sorted(value / 1000.0 for value in result["rtts_ns"])
    return {"roundtrips": count, "lost": result["lost"],
            "p50_us": percentile(rtts, 0.50), "p99_us": percentile(rtts, 0.99),
            "min_us": rtts[0] if rtts else None,
            "mean_us": statistics.fmean(rtts) if rtts else None}


def against_side(options):
    """The implementation named by --against: GoSide, or PythonSide for an interpreter path."""
    if options.against.endswith(".py"):  # another proxyguard.py, the same interpreter
        return PythonSide(options.against, options.python, key="py2")
    if options.against != "go":
        return PythonSide(options.proxyguard, options.against, key="py2")
    if options.go_bin:
        for name in GO_PROGRAMS:
            if not os.access(os.path.join(options.go_bin, name), os.X_OK):
                raise NoReference("no %s in %s" % (name, options.go_bin))
        bindir = options.go_bin
        go_version = go_version_of(os.path.join(bindir, "proxyguard-server"))
    else:
        bindir, go_version = build_go(REFERENCE)
    return GoSide(bindir, go_version)


# =============================================================================================
# Measurements
# =============================================================================================


def drain(sock, quiet=0.1, limit=2.0):
    """Read and drop datagrams until none came for `quiet` seconds; return how many."""
    count = 0
    deadline = time.monotonic() + limit
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(quiet * 1000):
            break
        while True:
            try:
                sock.recv(70000, socket.MSG_DONTWAIT)
            except (BlockingIOError, ConnectionRefusedError):
                break
            count += 1
    return count


def wait_reply(sock, seq, timeout):
    """Wait for the datagram that starts with `seq`; return its arrival (perf_counter_ns)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    buffer = bytearray(70000)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return None
        try:
            size = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, ConnectionRefusedError):
            continue
        if size >= 8 and SEQ.unpack_from(buffer)[0] == seq:
            return time.perf_counter_ns()


def percentile(values, fraction):
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    index = min(len(values) - 1, max(0, int(round(fraction * len(values) + 0.5)) - 1))
    return values[index]


def ping_pong(sock, size, count, timeout=1.0):
    """`count` round trips, one datagram at a time. Returns a result dict (µs)."""
    drain(sock)
    payload = bytearray(size)
    rtts = []
    lost = 0
    send = sock.send
    base = int(time.time() * 1000) << 20  # unlike any earlier run's numbers
    for index in range(count):
        seq = base + index
        SEQ.pack_into(payload, 0, seq)
        start = time.perf_counter_ns()
        send(payload)
        arrived = wait_reply(sock, seq, timeout)
        if arrived is None:
            lost += 1
        else:
            rtts.append((arrived - start) / 1000.0)
    rtts.sort()
    return {"roundtrips": count, "lost": lost,
            "p50_us": percentile(rtts, 0.50), "p99_us": percentile(rtts, 0.99),
            "min_us": rtts[0] if rtts else None,
            "mean_us": statistics.fmean(rtts) if rtts else None}


def windowed_load(setup, size, window, duration, stall_timeout=0.2, rate=None):
    """Keep `window` datagrams in flight for `duration` s, sent by `setup.send` (to its
    client, or to its peers' tunnels in turn). Returns a result dict; CPU of the clients
    summed.

    `rate`: paced, at most `rate` datagrams/s sent (the window still caps those in flight),
    so that different setups can be compared at the same offered load, below saturation.
    A datagram lost would shrink the window for good, so after `stall_timeout` without any
    reply the bench counts everything in flight as lost and fills the window again (`stalls`).
    """
    sock, echo = setup.sock, setup.echo
    drain(sock)
    payload = bytes(size)
    buffer = bytearray(70000)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    send, recv_into, poll = setup.send, sock.recv_into, poller.poll
    dontwait = socket.MSG_DONTWAIT
    pids = {"client": setup.client_pids, "server": [setup.server.pid], "echo": [echo.pid]}

    def cpu_now():
        cpu = {name: sum(proc_cpu(pid) for pid in group) for name, group in pids.items()}
        cpu["gen"] = self_cpu()
        return cpu

    cpu_before = cpu_now()
    echo_before = echo.stats()
    sent = received = inflight = stalls = send_errors = 0
    start = time.perf_counter()
    end = start + duration
    now = last_progress = start
    while now < end:
        due = sent + window if rate is None else int((now - start) * rate) + 1  # sent by now
        while inflight < window and sent < due:
            try:
                send(payload)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                send_errors += 1
                break
            sent += 1
            inflight += 1
        got = 0
        while True:
            try:
                recv_into(buffer, 0, dontwait)
            except (BlockingIOError, ConnectionRefusedError):
                break
            got += 1
        now = time.perf_counter()
        if got:
            received += got
            inflight = max(0, inflight - got)
            last_progress = now
            continue
        # Nothing came: wait for a reply, paced no longer than until the next send is due.
        wait = stall_timeout - (now - last_progress)
        if rate is not None:
            wait = min(wait, start + (sent + 1) / rate - now)
        if not poll(max(0.0, wait) * 1000) and time.perf_counter() - last_progress \
                >= stall_timeout:
            if inflight:
                stalls += 1
            inflight = 0
            last_progress = time.perf_counter()
        now = time.perf_counter()
    elapsed = now - start
    echo_after = echo.stats()
    cpu_after = cpu_now()
    received_in_time = received
    # Drain what is still in flight, for the loss count.
    quiet_deadline = time.perf_counter() + 1.0
    while received < sent and time.perf_counter() < quiet_deadline:
        if poll(100):
            while True:
                try:
                    recv_into(buffer, 0, dontwait)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                received += 1
    echo_final = echo.stats()
    rt_rate = received_in_time / elapsed
    one_way = (echo_after[0] - echo_before[0]) / elapsed
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    # Payload relayed in the time measured, both directions (client -> echo and back).
    relayed = (echo_after[0] - echo_before[0] + received_in_time) * size
    result = {
        "seconds": elapsed, "sent": sent, "received": received,
        "echo_received": echo_final[0] - echo_before[0],
        "lost": max(0, sent - received),
        "lost_before_echo": max(0, sent - (echo_final[0] - echo_before[0])),
        "loss_pct": 100.0 * max(0, sent - received) / sent if sent else 0.0,
        "stalls": stalls, "send_errors": send_errors,
        "rt_per_s": rt_rate, "mbit_s": rt_rate * size * 8 / 1e6,
        "one_way_per_s": one_way, "one_way_mbit_s": one_way * size * 8 / 1e6,
        "cpu_seconds": cpu,
        "cpu_pct": {name: 100.0 * value / elapsed for name, value in cpu.items()},
        "cpu_us_per_rt": {name: (1e6 * cpu[name] / received_in_time if received_in_time
                                 else None) for name in ("client", "server")},
        "relayed_bytes": relayed,
        "cpu_s_per_gb": (cpu["client"] + cpu["server"]) / (relayed / 1e9) if relayed else None,
        "offered_per_s": rate,
    }
    return result


def open_raw_tunnel(port, ssl_context, size):
    """A tunnel the bench drives itself: TCP (or TLS), then GET + Upgrade: UoTLV/1."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:
        sock = ssl_context.wrap_socket(sock, server_hostname=LOOPBACK)
    sock.sendall(b"GET /bench HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\n"
                 b"Upgrade: UoTLV/1\r\n\r\n" % (LOOPBACK.encode(), port))
    return sock


def read_upgrade_answer(sock):
    """Read the 101 answer; return the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the server closed a raw tunnel during the upgrade")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError("raw tunnel upgrade refused: %r" % head[:80])
    return rest


def tunnel_roundtrips(tunnels, buffers, size, rounds, timeout=20):
    """Send one frame on every tunnel, read one back from each; `rounds` times.

    Returns (round trips ok, set of indexes of tunnels the server closed or broke).
    """
    payload = bytes(size - 8)
    ok = 0
    dead = set()
    for round_number in range(rounds):
        waiting = {}
        for index, sock in enumerate(tunnels):
            if index in dead:
                continue
            datagram = SEQ.pack(round_number << 32 | index) + payload
            try:
                sock.sendall(FRAME_HEADER.pack(len(datagram)) + datagram)
            except OSError:
                dead.add(index)
                continue
            waiting[sock.fileno()] = (index, sock)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            ready = [sock for _, sock in waiting.values()
                     if isinstance(sock, ssl.SSLSocket) and sock.pending()]
            if not ready:
                poller = select.poll()
                for fileno in waiting:
                    poller.register(fileno, select.POLLIN)
                ready = [waiting[fileno][1] for fileno, _ in
                         poller.poll(max(0, deadline - time.monotonic()) * 1000)]
            for sock in ready:
                index, _ = waiting[sock.fileno()]
                try:
                    chunk = sock.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    dead.add(index)
                    del waiting[sock.fileno()]
                    continue
                buffer = buffers[index]
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + FRAME_HEADER.unpack_from(buffer)[0]:
                    length = FRAME_HEADER.unpack_from(buffer)[0]
                    seq = SEQ.unpack_from(buffer, 2)[0]
                    del buffer[:2 + length]
                    if seq == (round_number << 32 | index) and sock.fileno() in waiting:
                        del waiting[sock.fileno()]
                        ok += 1
    return ok, dead


# New handshakes timed while the tunnels are open (connect to 101), and how long the bench
# waits for the server to let go of them.
HANDSHAKE_SAMPLES = 200
TEARDOWN_LIMIT = 60.0
# The issue's target: every run's descriptors and threads back within this many seconds.
TEARDOWN_TARGET = 5.0
# The teardown probe starts a handshake this often (one at a time: a client reconnecting, not
# a flood).
PROBE_INTERVAL = 0.01
# While the probe runs, the server holds its tunnel in hand and may still be letting go of
# the one before: 2 descriptors (TCP, UDP) and 2 threads (the pumps) each. "Back" allows
# that much above the count before; once the probe has stopped, the exact count must come
# back too (within SETTLE_LIMIT), so a leak of even one tunnel still shows.
PROBE_SLACK = 2 * 2
SETTLE_LIMIT = 5.0


def client_tls_context(ca_file):
    """The bench's TLS context for raw tunnels to a server with `ca_file`'s certificate; None
    for plain HTTP."""
    return None if ca_file is None else ssl.create_default_context(cafile=ca_file)


def timed_handshake(port, ssl_context):
    """One new tunnel, timed from connect to the 101 answer and closed at once: the time in
    ms, or None if it failed."""
    start = time.perf_counter()
    sock = None
    try:
        sock = open_raw_tunnel(port, ssl_context, 0)
        read_upgrade_answer(sock)
        return (time.perf_counter() - start) * 1000
    except (OSError, RuntimeError):
        return None
    finally:
        if sock is not None:
            sock.close()


def handshake_figures(times, failed, keep_times=False):
    """{count, failed, p50_ms, p99_ms, max_ms} of handshake `times` (ms), and the times
    themselves if `keep_times` (to pool runs)."""
    times = sorted(times)
    figures = {"count": len(times) + failed, "failed": failed,
               "p50_ms": percentile(times, 0.50), "p99_ms": percentile(times, 0.99),
               "max_ms": times[-1] if times else None}
    if keep_times:
        figures["times_ms"] = times
    return figures


def new_handshakes(setup, count):
    """`count` new tunnels one after another, each timed (timed_handshake). Returns
    handshake_figures."""
    ssl_context = client_tls_context(setup.ca_file)
    times = [timed_handshake(setup.server_port, ssl_context) for _ in range(count)]
    return handshake_figures([t for t in times if t is not None], times.count(None))


def probe_main(port, ca_file=None):
    """`proxyguard_bench.py _probe PORT [CA_FILE]`: prints `ready`; from the line `go` on
    stdin makes a handshake (timed_handshake) every PROBE_INTERVAL, one at a time, until the
    line `stop` (or the end of stdin); then prints handshake_figures as one JSON line.

    Its own process: in the bench's, the GIL (the bench polls /proc meanwhile) would be
    timed along with the server."""
    ssl_context = client_tls_context(ca_file)
    print("ready", flush=True)
    if os.read(0, 100).strip() != b"go":
        return
    times, failed = [], 0
    next_start = time.monotonic()
    # The pacing wait is a wait for stdin: `stop` ends it at once.
    while not select.select([0], [], [], max(0.0, next_start - time.monotonic()))[0]:
        next_start = time.monotonic() + PROBE_INTERVAL
        elapsed = timed_handshake(port, ssl_context)
        if elapsed is None:
            failed += 1
        else:
            times.append(elapsed)
    print(json.dumps(handshake_figures(times, failed, keep_times=True)), flush=True)


class HandshakeProbe:
    """The probe process (probe_main) against `setup`'s server: `start()`, then `stop()`
    returns its figures."""

    def __init__(self, procs, setup):
        self.procs = procs
        argv = [sys.executable, os.path.abspath(__file__), "_probe", str(setup.server_port)]
        if setup.ca_file:
            argv.append(setup.ca_file)
        self.popen = procs.spawn("probe", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.popen.stdout.readline().strip() != b"ready":
            procs.stop(self.popen)
            raise RuntimeError("the handshake probe did not start; its log: %s"
                               % self.popen.log_path)

    def start(self):
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.flush()

    def stop(self):
        try:
            self.popen.stdin.write(b"stop\n")
            self.popen.stdin.flush()
            line = self.popen.stdout.readline()
        finally:
            self.procs.stop(self.popen)
        if not line:
            raise RuntimeError("the handshake probe gave no figures; its log: %s"
                               % self.popen.log_path)
        return json.loads(line)


def wait_teardown(pid, fds_before, threads_before, slack, limit=TEARDOWN_LIMIT):
    """Poll until `pid`'s descriptors, and its threads, are back to at most `slack` above
    the counts before (descriptors: a measure for any server; threads: for a thread per
    tunnel). Returns (fds_back, threads_back): seconds, None if not back within `limit`.

    Listing /proc/PID/fd with 10,000 entries costs milliseconds of the CPU the server needs:
    the threads are looked at every 20 ms, the descriptors every 100 ms until the threads
    are back."""
    started = time.perf_counter()
    fds_back = threads_back = None
    polls = 0
    while time.perf_counter() - started < limit:
        now = time.perf_counter() - started
        if threads_back is None and proc_status(pid)[1] <= threads_before + slack:
            threads_back = now
        if fds_back is None and (polls % 5 == 0 or threads_back is not None) \
                and proc_fds(pid) <= fds_before + slack:
            fds_back = now
        if fds_back is not None and threads_back is not None:
            break
        polls += 1
        time.sleep(0.02)
    return fds_back, threads_back


def many_tunnels(setup, count, size, rounds, idle_seconds):
    """`count` raw tunnels at once: server RSS/threads, and idle CPU of server and client."""
    server_pid, client_pid = setup.server.pid, setup.client.pid
    setup.wait_tunnel()  # the real client's tunnel is up too
    rss_before, threads_before = proc_status(server_pid)
    fds_before = proc_fds(server_pid)
    handshakes_before = new_handshakes(setup, HANDSHAKE_SAMPLES // 4)
    ssl_context = client_tls_context(setup.ca_file)
    tunnels, buffers = [], []
    probe = None
    started = time.perf_counter()
    try:
        batch = 50  # below the server's listen backlog (512)
        for first in range(0, count, batch):
            new = [open_raw_tunnel(setup.server_port, ssl_context, size)
                   for _ in range(min(batch, count - first))]
            for sock in new:
                buffers.append(bytearray(read_upgrade_answer(sock)))
            tunnels.extend(new)
        setup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        ok, dead = tunnel_roundtrips(tunnels, buffers, size, rounds)
        traffic_seconds = time.perf_counter() - started
        time.sleep(0.5)  # let the server settle after the burst
        rss_up, threads_up = proc_status(server_pid)
        fds_up = proc_fds(server_pid)
        # New handshakes while the N are open: does the server still answer at once?
        handshakes = new_handshakes(setup, HANDSHAKE_SAMPLES)
        time.sleep(0.2)  # their own teardown is not the idle load's
        cpu0 = {"server": proc_cpu(server_pid), "client": proc_cpu(client_pid)}
        sched0 = {"server": proc_sched(server_pid), "client": proc_sched(client_pid)}
        time.sleep(idle_seconds)
        cpu1 = {"server": proc_cpu(server_pid), "client": proc_cpu(client_pid)}
        sched1 = {"server": proc_sched(server_pid), "client": proc_sched(client_pid)}
        rss_idle, _ = proc_status(server_pid)
        probe = HandshakeProbe(setup.procs, setup)
        probe.start()  # new tunnels while the server lets go of the N
    finally:
        for sock in tunnels:
            with contextlib.suppress(OSError):
                sock.close()
    try:
        fds_back, threads_back = wait_teardown(server_pid, fds_before, threads_before,
                                               PROBE_SLACK)
    finally:
        handshakes_teardown = probe.stop() if probe is not None else None
    # The probe's last tunnels gone too: exactly as before, or some are leaked.
    settled = wait_teardown(server_pid, fds_before, threads_before, 0, SETTLE_LIMIT)
    teardown_seconds = (None if fds_back is None or threads_back is None
                        else max(fds_back, threads_back))
    rss_after, threads_after = proc_status(server_pid)
    fds_after = proc_fds(server_pid)
    idle = {}
    for name in ("server", "client"):
        entry = {"cpu_seconds": cpu1[name] - cpu0[name],
                 "cpu_pct": 100.0 * (cpu1[name] - cpu0[name]) / idle_seconds}
        if sched0[name] and sched1[name]:
            entry["sched_cpu_ms"] = (sched1[name][0] - sched0[name][0]) / 1e6
            entry["wakeups"] = sched1[name][1] - sched0[name][1]
        idle[name] = entry
    return {
        "tunnels": count, "roundtrips_ok": ok, "roundtrips": count * rounds,
        "tunnels_closed_by_server": len(dead),
        "setup_seconds": setup_seconds, "tunnels_per_s": count / setup_seconds,
        "traffic_seconds": traffic_seconds,
        "server_rss_kib_before": rss_before, "server_rss_kib_up": rss_up,
        "server_rss_kib_idle": rss_idle, "server_rss_kib_after_close": rss_after,
        "server_rss_kib_per_tunnel": (rss_up - rss_before) / count,
        "server_threads_before": threads_before, "server_threads_up": threads_up,
        "server_threads_after_close": threads_after, "teardown_seconds": teardown_seconds,
        "server_fds_before": fds_before, "server_fds_up": fds_up,
        "server_fds_after_close": fds_after,
        "fds_back_seconds": fds_back, "threads_back_seconds": threads_back,
        "handshake_before": handshakes_before, "handshake_up": handshakes,
        "handshake_teardown": handshakes_teardown, "settled": None not in settled,
        "idle_seconds": idle_seconds, "idle": idle,
    }


# =============================================================================================
# Report
# =============================================================================================


def median_result(results):
    """Field-wise median of result dicts (nested dicts too); flags (bools) true only if true in
    every run; other non-numbers from the first; lists (one run's samples) left out."""
    first = results[0]
    merged = {}
    for key, value in first.items():
        values = [result.get(key) for result in results]
        if isinstance(value, list):
            continue
        if isinstance(value, dict) and all(isinstance(v, dict) for v in values):
            merged[key] = median_result(values)
        elif isinstance(value, bool):
            merged[key] = all(v is True for v in values)
        elif isinstance(value, (int, float)) and \
                all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged[key] = value
    return merged


def fmt_rate(value):
    if value is None:
        return "-"
    return "%.1fk" % (value / 1000) if value >= 10000 else "%.0f" % value


def fmt_us(value):
    return "-" if value is None else "%.0f" % value


def format_line(entry):
    """One table line: test, via, size, window/N, then the figures."""
    result = entry["result"]
    test, via = entry["test"], entry["transport"]
    size, width = entry["size"], entry.get("window", 1)
    prefix = "%-8s %-6s %5d %5d  " % (test, via, size, width)
    if test == "load":
        cpu = result["cpu_pct"]
        per = result["cpu_us_per_rt"]
        text = ("%7s rt/s %7.1f Mbit/s  one-way %7s/s  loss %5.2f%%  "
                "CPU %% client %3.0f server %3.0f echo %3.0f gen %3.0f  "
                "µs/rt client %s server %s"
                % (fmt_rate(result["rt_per_s"]), result["mbit_s"],
                   fmt_rate(result["one_way_per_s"]), result["loss_pct"],
                   cpu["client"], cpu["server"], cpu["echo"], cpu["gen"],
                   fmt_us(per["client"]), fmt_us(per["server"])))
        if result["stalls"]:
            text += "  (%d stalls)" % result["stalls"]
    elif test == "ping":
        text = ("p50 %5s µs  p99 %5s µs  min %5s µs  (%d round trips, %d lost)"
                % (fmt_us(result["p50_us"]), fmt_us(result["p99_us"]),
                   fmt_us(result["min_us"]), result["roundtrips"], result["lost"]))
    else:  # tunnels
        server, client = result["idle"]["server"], result["idle"]["client"]

        def idle_text(entry_):
            text_ = "%.2f%%" % entry_["cpu_pct"]
            if "wakeups" in entry_:
                text_ += " (%.1f ms, %d wake-ups)" % (entry_["sched_cpu_ms"], entry_["wakeups"])
            return text_

        def seconds(value):
            return "> %gs" % TEARDOWN_LIMIT if value is None else "%.2fs" % value

        def handshake_text(entry_):
            if not entry_ or entry_.get("p50_ms") is None:
                return "-"
            return "p50 %.1f p99 %.1f ms%s" % (
                entry_["p50_ms"], entry_["p99_ms"],
                " (%d FAILED)" % entry_["failed"] if entry_.get("failed") else "")

        text = ("server RSS %.1f -> %.1f MiB (%+.0f KiB/tunnel), threads %d -> %d, "
                "fds %d -> %d  idle %gs: server %s, client %s  "
                "open %.0f/s, %d/%d round trips ok  new handshakes: before %s, "
                "with %d open %s, during the teardown %s  after close: fds back in %s, "
                "threads back in %s"
                % (result["server_rss_kib_before"] / 1024, result["server_rss_kib_up"] / 1024,
                   result["server_rss_kib_per_tunnel"], result["server_threads_before"],
                   result["server_threads_up"], result.get("server_fds_before", 0),
                   result.get("server_fds_up", 0),
                   result["idle_seconds"], idle_text(server), idle_text(client),
                   result["tunnels_per_s"], result["roundtrips_ok"], result["roundtrips"],
                   handshake_text(result.get("handshake_before")), result["tunnels"],
                   handshake_text(result.get("handshake_up")),
                   handshake_text(result.get("handshake_teardown")),
                   seconds(result.get("fds_back_seconds", result["teardown_seconds"])),
                   seconds(result.get("threads_back_seconds"))))
        if result.get("settled") is False:
            text += "  (NOT BACK TO THE COUNTS BEFORE %gs AFTER THE PROBE: a leak?)" % (
                SETTLE_LIMIT)
        if result.get("tunnels_closed_by_server"):
            text += "  (%d TUNNELS CLOSED BY THE SERVER: see its log, --keep)" % (
                result["tunnels_closed_by_server"])
    return prefix + text


HEADER = "%-8s %-6s %5s %5s  %s" % ("test", "via", "size", "W/N", "result")


def tunnels_worst(entries):
    """The tunnels test's worst over its runs, per (side, via): medians hide a teardown that
    is slow in one run of ten. Teardown seconds of every run (None: not back within
    TEARDOWN_LIMIT), how many within TEARDOWN_TARGET, the handshakes during the teardown
    pooled over all runs, the largest RSS with the tunnels open, runs not settled."""
    groups = {}
    for entry in entries:
        if entry["test"] == "tunnels":
            groups.setdefault((entry["side"], entry["transport"]), []).append(entry["result"])
    worst = []
    for (side, via), results in groups.items():
        seconds = [result["teardown_seconds"] for result in results]
        times, failed = [], 0
        for result in results:
            probe = result.get("handshake_teardown") or {}
            times += probe.get("times_ms", [])
            failed += probe.get("failed", 0)
        worst.append({
            "side": side, "transport": via, "tunnels": results[0]["tunnels"],
            "runs": len(results), "teardown_seconds": seconds,
            "teardown_max_seconds": None if None in seconds else max(seconds),
            "within_target": sum(1 for value in seconds
                                 if value is not None and value <= TEARDOWN_TARGET),
            "target_seconds": TEARDOWN_TARGET,
            "handshake_teardown": handshake_figures(times, failed),
            "handshake_teardown_p99_ms": [(result.get("handshake_teardown") or {}).get("p99_ms")
                                          for result in results],
            "server_rss_mib_open_max": max(max(result["server_rss_kib_up"],
                                               result["server_rss_kib_idle"])
                                           for result in results) / 1024,
            "not_settled": sum(1 for result in results if result.get("settled") is False),
        })
    return worst


def format_worst(worst):
    """The line of tunnels_worst, and every run's teardown seconds."""
    handshakes = worst["handshake_teardown"]
    text = ("teardown over %d runs (%s, %d tunnels): fds/threads back max %s, %d of %d within "
            "%gs; handshakes during teardown p99 (all runs pooled) %s ms, max %s, failed %d "
            "of %d; RSS with %d open max %.0f MiB"
            % (worst["runs"], worst["transport"], worst["tunnels"],
               "> %gs" % TEARDOWN_LIMIT if worst["teardown_max_seconds"] is None
               else "%.2f s" % worst["teardown_max_seconds"],
               worst["within_target"], worst["runs"], worst["target_seconds"],
               "-" if handshakes["p99_ms"] is None else "%.1f" % handshakes["p99_ms"],
               "-" if handshakes["max_ms"] is None else "%.1f" % handshakes["max_ms"],
               handshakes["failed"], handshakes["count"], worst["tunnels"],
               worst["server_rss_mib_open_max"]))
    if worst["not_settled"]:
        text += "; NOT BACK TO THE COUNTS BEFORE in %d runs" % worst["not_settled"]
    runs = "  per run: teardown %s s; handshake p99 during it %s ms" % (
        " ".join("-" if value is None else "%.2f" % value
                 for value in worst["teardown_seconds"]),
        " ".join("-" if value is None else "%.1f" % value
                 for value in worst["handshake_teardown_p99_ms"]))
    return [text, runs]


def medians_picker(summary):
    """pick(side, test, via, size, *keys): a median from `summary`, or None if not measured."""
    medians = {(entry["side"], entry["test"], entry["transport"], entry["size"]):
               entry["result"] for entry in summary}

    def pick(side, test, via, size, *path):
        value = medians.get((side.key, test, via, size))
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return pick


def compare_transports(sides, summary, options, ping_size):
    """WebSocket against UoTLV/1 for each side that speaks both, plain and TLS: rows of
    {side, figure, uotlv, websocket, ratio}, ratio = WebSocket/UoTLV/1 (for the round trip,
    UoTLV/1's over WebSocket's), so that above 1 means WebSocket did better."""
    pick = medians_picker(summary)
    rows = []
    for side in sides:
        for tls in (False, True):
            uotlv, websocket = VIA[SCHEMES[UOTLV, tls]], VIA[SCHEMES[WEBSOCKET, tls]]
            figures = [("%s one-way %d B, dgram/s" % (uotlv, size), "load", size,
                        "one_way_per_s", False) for size in options.size]
            figures.append(("%s rtt p50 %d B, µs" % (uotlv, ping_size), "ping", ping_size,
                            "p50_us", True))
            for figure, test, size, key, lower in figures:
                a = pick(side, test, uotlv, size, key)
                b = pick(side, test, websocket, size, key)
                if a is None or b is None:
                    continue
                num, den = (a, b) if lower else (b, a)
                rows.append({"side": side.key, "figure": figure, UOTLV: a, WEBSOCKET: b,
                             "ratio": num / den if den else None})
    return rows


def format_transport_comparison(rows, sides):
    labels = {side.key: side.label for side in sides}
    named = len({entry["side"] for entry in rows}) > 1
    figures = [entry["figure"] + (" (%s)" % labels[entry["side"]] if named else "")
               for entry in rows]
    width = max([30] + [len(figure) for figure in figures])
    lines = ["%-*s %10s %10s  %6s" % (width, "WebSocket vs UoTLV/1", "UoTLV/1", "WebSocket",
                                      "ratio")]
    for figure, entry in zip(figures, rows):
        unit = "k" if "dgram/s" in entry["figure"] else "µs"
        lines.append("%-*s %10s %10s  %6s" % (
            width, figure, fmt_value(entry[UOTLV], unit, None),
            fmt_value(entry[WEBSOCKET], unit, None),
            "%5.2f×" % entry["ratio"] if entry["ratio"] is not None else "     -"))
    lines.append("ratio: WebSocket/UoTLV/1 (rtt: UoTLV/1/WebSocket); > 1: WebSocket did better")
    return lines


def compare(sides, summary, options, ping_size, protocol=UOTLV):
    """The --against figures over `protocol`, side by side: a list of rows (dicts, medians of
    the runs).

    Each row has the figure's value for each side (None where not measured), whether higher or
    lower is better, and `ratio`: ours/theirs when higher is better, theirs/ours when lower
    is, so that a ratio above 1 always means proxyguard.py (the first side) did better.
    """
    ours, theirs = sides[0], sides[1]
    pick = medians_picker(summary)
    plain, tls = (VIA[SCHEMES[protocol, False]], VIA[SCHEMES[protocol, True]])

    def idle_sum(side, key):
        idle = pick(side, "tunnels", plain, options.size[0], "idle")
        if not idle or any(key not in idle[name] for name in ("server", "client")):
            return None
        return idle["server"][key] + idle["client"][key]

    def tls_share(side):
        plain_rate = pick(side, "load", plain, options.size[0], "one_way_per_s")
        tls_rate = pick(side, "load", tls, options.size[0], "one_way_per_s")
        return tls_rate / plain_rate if plain_rate and tls_rate is not None else None

    rows = []

    def row(figure, unit, better, value_of, note_=""):
        values = {side.key: value_of(side) for side in sides}
        a, b = values[ours.key], values[theirs.key]
        ratio = None
        if a is not None and b is not None and better:
            num, den = (a, b) if better == "higher" else (b, a)
            ratio = num / den if den else (1.0 if num == den else None)  # 0 and 0: a tie
        rows.append({"figure": figure, "unit": unit, "better": better, "values": values,
                     "ratio": ratio, "note": note_,
                     "ratio_of": ("%s/%s" % (ours.short, theirs.short)
                                  if better == "higher" else
                                  "%s/%s" % (theirs.short, ours.short))})

    sizes = options.size
    for size in sizes:
        row("one-way %d B, dgram/s" % size, "k", "higher",
            lambda side, size=size: pick(side, "load", plain, size, "one_way_per_s"))
    for size in sizes:
        row("  loss %d B" % size, "%", None,
            lambda side, size=size: pick(side, "load", plain, size, "loss_pct"))
    row("rtt p50 %d B" % ping_size, "µs", "lower",
        lambda side: pick(side, "ping", plain, ping_size, "p50_us"))
    row("rtt p99 %d B" % ping_size, "µs", "lower",
        lambda side: pick(side, "ping", plain, ping_size, "p99_us"))
    row("rtt min %d B" % ping_size, "µs", "lower",
        lambda side: pick(side, "ping", plain, ping_size, "min_us"),
        "the least disturbed by other load")
    for size in sizes:
        row("CPU s per GB, %d B" % size, "s", "lower",
            lambda side, size=size: pick(side, "load", plain, size, "cpu_s_per_gb"),
            "client+server, user+sys")
    row("TLS one-way %d B, dgram/s" % sizes[0], "k", "higher",
        lambda side: pick(side, "load", tls, sizes[0], "one_way_per_s"))
    row("TLS / plain, one-way %d B" % sizes[0], "x", "higher", tls_share, "target >= 0.75")
    row("idle %gs, %d tunnels: wake-ups" % (options.idle, options.tunnels), "n", "lower",
        lambda side: idle_sum(side, "wakeups"), "server+client")
    row("idle %gs: CPU ms" % options.idle, "ms", "lower",
        lambda side: idle_sum(side, "sched_cpu_ms"), "server+client")
    # Shown, not compared: a garbage-collected heap (Go's) may absorb the tunnels in memory
    # it already holds from the load, so its RSS growth swings between runs.
    row("server RSS per tunnel, KiB", "KiB", None,
        lambda side: pick(side, "tunnels", plain, options.size[0],
                          "server_rss_kib_per_tunnel"), "not compared: GC heaps swing")
    # A figure neither side has (a test left out by --tests) is no row.
    return [entry for entry in rows if any(v is not None for v in entry["values"].values())]


def compare_peers(entries):
    """The peers test's two arrangements side by side: one row per (via, size, load: None =
    saturated, else the paced rate), with the median of each arrangement's figures, each
    round's ratio separate/one process of client CPU per round trip (and of server CPU), and
    their medians: >= 1 means one process costs no more per datagram than separate ones."""
    rows = collections.OrderedDict()
    for entry in entries:
        if entry["test"] != "peers":
            continue
        key = (entry["transport"], entry["size"], entry["rate"])
        row = rows.setdefault(key, {"transport": key[0], "size": key[1], "rate": key[2],
                                    "peers": entry["peers"], "window": entry["window"],
                                    "rounds": collections.OrderedDict()})
        row["rounds"].setdefault(entry["run"], {})[entry["arrangement"]] = entry["result"]
    figures = (("rt_per_s",), ("loss_pct",), ("cpu_us_per_rt", "client"),
               ("cpu_us_per_rt", "server"), ("cpu_pct", "client"), ("cpu_pct", "server"),
               ("cpu_pct", "gen"))

    def figure(result, path):
        for key in path:
            result = result[key]
        return result

    for row in rows.values():
        rounds = [pair for pair in row["rounds"].values() if len(pair) == 2]
        for arrangement in (ONE_PROCESS, SEPARATE):
            row[arrangement] = {".".join(path): statistics.median(
                figure(pair[arrangement], path) for pair in rounds) for path in figures}
        for name in ("client", "server"):
            ratios = [pair[SEPARATE]["cpu_us_per_rt"][name] / pair[ONE_PROCESS]
                      ["cpu_us_per_rt"][name] for pair in rounds
                      if pair[ONE_PROCESS]["cpu_us_per_rt"][name]]
            row["%s_ratio_per_round" % name] = ratios
            row["%s_ratio" % name] = statistics.median(ratios) if ratios else None
        del row["rounds"]
    return list(rows.values())


def format_peers(rows, options):
    """The peers test's table: each arrangement's medians, then the ratio of client CPU per
    round trip, separate/one process, per round and its median."""
    lines = ["peers: %d tunnels to one server, window %d spread over them, %gs per load, "
             "medians of %d rounds alternating the arrangements; up --cpu %s"
             % (rows[0]["peers"], rows[0]["window"], options.duration, options.runs,
                options.peers_cpu or "auto (its default)"),
             "%-6s %5s %-15s %-12s %9s %6s  %-23s %s" % (
                 "via", "size", "load", "arrangement", "rt/s", "loss",
                 "CPU µs/rt client server", "CPU % client server gen")]
    for row in rows:
        load = "saturated" if row["rate"] is None else "paced %s/s" % fmt_rate(row["rate"])
        for arrangement in (ONE_PROCESS, SEPARATE):
            values = row[arrangement]
            lines.append("%-6s %5d %-15s %-12s %9s %5.2f%%  %13.1f %6.1f   %9.0f %6.0f %3.0f" % (
                row["transport"], row["size"], load, arrangement, fmt_rate(values["rt_per_s"]),
                values["loss_pct"], values["cpu_us_per_rt.client"],
                values["cpu_us_per_rt.server"], values["cpu_pct.client"],
                values["cpu_pct.server"], values["cpu_pct.gen"]))
        for name in ("client", "server"):
            ratios = row["%s_ratio_per_round" % name]
            lines.append("%-6s %5d %-15s %s CPU per round trip, separate/one process: %s "
                         "(rounds: %s)" % (
                             row["transport"], row["size"], load, name,
                             "-" if row["%s_ratio" % name] is None else
                             "%.2f×" % row["%s_ratio" % name],
                             " ".join("%.2f" % ratio for ratio in ratios)))
    lines.append("ratio >= 1: one process costs no more CPU per datagram than separate ones "
                 "(target 5 of issue 19, client CPU)")
    return lines


# How the comparison table writes a figure of each unit ("k": thousands).
UNIT_FORMATS = {"µs": "%.0f µs", "s": "%.1f s", "%": "%.2f %%", "x": "%.2f", "n": "%.0f",
                "ms": "%.1f ms"}


def fmt_value(value, unit, side):
    if value is None:
        return "no TLS" if not side.tls else "-"
    if unit == "k":
        return "%.1f k" % (value / 1000)
    if unit in UNIT_FORMATS:
        return UNIT_FORMATS[unit] % value
    return "%.0f %s" % (value, unit)


def format_comparison(rows, sides):
    """The side-by-side table: figure, each side, ratio, and which way is better."""
    width = max(14, *(len(side.label) for side in sides))
    lines = ["%-30s %*s %*s  %6s  %s" % ("figure", width, sides[0].label, width, sides[1].label,
                                         "ratio", "(ratio; better)")]
    for entry in rows:
        ratio = "%5.2f×" % entry["ratio"] if entry["ratio"] is not None else "     -"
        if entry["better"] is None:  # loss, RSS: shown, not compared
            how = "lower is better"
        elif None in entry["values"].values():
            how = "%s is better" % entry["better"]
        else:
            how = "%s; %s is better" % (entry["ratio_of"], entry["better"])
        if entry["note"]:
            how += "; " + entry["note"]
        lines.append("%-30s %*s %*s  %6s  %s" % (
            entry["figure"], width, fmt_value(entry["values"][sides[0].key], entry["unit"],
                                              sides[0]),
            width, fmt_value(entry["values"][sides[1].key], entry["unit"], sides[1]),
            ratio, how))
    lines.append("ratio > 1: %s did better" % sides[0].label)
    return lines


# =============================================================================================
# main
# =============================================================================================


def parse_sizes(text):
    sizes = []
    for item in text.split(","):
        size = int(item)
        if not 8 <= size <= 65507:
            raise argparse.ArgumentTypeError("sizes are 8 to 65507 bytes, not %d" % size)
        sizes.append(size)
    return sizes


def build_parser():
    parser = argparse.ArgumentParser(
        prog="proxyguard_bench.py",
        description="Benchmark proxyguard.py on loopback: throughput, latency, CPU, tunnels.",
        epilog="Table: rt/s = round trips per second, Mbit/s = rt/s * size * 8, one-way/s = "
               "datagrams reaching the echo per second, CPU %% of one core, µs/rt = CPU "
               "microseconds per round trip, gen = this benchmark (the load generator).")
    add = parser.add_argument
    add("--proxyguard", default=os.path.join(HERE, "proxyguard.py"), metavar="PATH",
        help="proxyguard.py to run (default: the one beside this file)")
    add("--size", type=parse_sizes, default=None, metavar="BYTES[,BYTES]",
        help="datagram sizes for the load (default 1420; 1420,100 with --against)")
    add("--python", default=sys.executable, metavar="PATH",
        help="the interpreter that runs proxyguard.py (default: the one running this, %s)"
             % sys.executable)
    add("--against", default=None, metavar="go|PYTHON|FILE.py",
        help="compare side by side, alternating runs: 'go' = the original Go ProxyGuard (built "
             "from %s, or --go-bin), the path of another Python interpreter running "
             "proxyguard.py, or another proxyguard.py (a .py file: another version of it); "
             "prints both, and their ratio" % os.path.normpath(REFERENCE))
    add("--go-bin", default=None, metavar="DIR",
        help="with --against go: use proxyguard-server and proxyguard-client from DIR "
             "instead of building them")
    add("--window", type=int, default=None,
        help="datagrams in flight (default 256: below it, the rate on a 2-core box is bound by "
             "the round-trip latency, not by proxyguard's CPU; %d with --against go, which "
             "the original's UDP sockets, at the kernel's default buffer size, hold without "
             "loss)" % AGAINST_GO_WINDOW)
    add("--duration", type=float, default=None, metavar="SECONDS",
        help="seconds of load per size (default 5; %g with --against)" % AGAINST["duration"])
    add("--warmup", type=float, default=0.5, metavar="SECONDS",
        help="unmeasured load before each measured one (default %(default)g)")
    add("--roundtrips", type=int, default=2000, metavar="N",
        help="ping round trips (default %(default)s)")
    add("--ping-size", type=int, default=None, metavar="BYTES",
        help="ping datagram size (default: the first --size)")
    add("--hogs", type=int, default=0, metavar="N",
        help="run N CPU hogs at `nice -n 19` meanwhile (busy loops): how a desktop's "
             "low-priority load delays the tunnel (see the round trip's p99)")
    add("--pinger", choices=("python", "go", "go-blocking"), default="python",
        help="who pings and echoes: this script (default), or a small compiled Go program "
             "(built offline with go and cached like the original), so that the round trip "
             "measures the proxies rather than an interpreter at both ends); go-blocking: the "
             "same pinger waiting in blocking system calls, not in Go's poller")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--tls", action="store_true", help="over TLS only (https://)")
    transport.add_argument("--both", action="store_true", help="plain, then TLS")
    add("--transport", choices=(UOTLV, WEBSOCKET, "both"), default=UOTLV,
        help="the tunnel's protocol: uotlv = UoTLV/1 (http://, https://; default), websocket "
             "(ws://, wss://), or both, alternating, with the WebSocket/UoTLV/1 ratios; the "
             "tunnels test and the original (--against go) are UoTLV/1 only")
    add("--tunnels", type=int, default=None, metavar="N",
        help="open N tunnels at once (raw sockets): server RSS and idle CPU, then close them "
             "all at once: seconds until the server's descriptors and threads are back, and "
             "new handshakes meanwhile; with --runs, the worst run too; runs only this test "
             "unless --tests says otherwise")
    add("--tunnel-roundtrips", type=int, default=3, metavar="R",
        help="round trips per raw tunnel (default %(default)s)")
    add("--nofile", type=int, default=None, metavar="SOFT",
        help="start the servers and clients under test with this soft open-files limit "
             "(RLIMIT_NOFILE; the hard one stays), as systemd starts services with 1024; "
             "proxyguard.py raises its own to the hard one (the bench raises its own "
             "regardless)")
    add("--idle", type=float, default=None, metavar="SECONDS",
        help="idle time measured with the tunnels up (default 3; %g with --against)"
             % AGAINST["idle"])
    add("--tests", default=None, metavar="LIST",
        help="comma list of ping,load,tunnels,peers (default ping,load; tunnels with "
             "--tunnels; ping,load,tunnels with --against, %d tunnels, on plain HTTP; peers "
             "only when named)" % AGAINST["tunnels"])
    add("--peers", type=int, default=4, metavar="N",
        help="the peers test: N tunnels to one server, from one `up --write-config` process "
             "and from N client processes, alternating (default %(default)s; needs "
             "CAP_NET_ADMIN: up marks its tunnels' sockets)")
    add("--peers-rate", type=float, default=None, metavar="DGRAMS/S",
        help="the peers test's paced load, datagrams/s offered to either arrangement (default "
             "%g of the lower saturated rate of the first round; 0: saturated only)"
             % PEERS_PACED_SHARE)
    add("--peers-cpu", default=None, metavar="auto|any|CPU",
        help="the peers test: up's --cpu (default: up's own, auto: its threads on one CPU); "
             "any shows what the pinning saves")
    add("--runs", type=int, default=None, metavar="K",
        help="repeat K times, print medians (default 1; %d with --against)" % AGAINST["runs"])
    add("--json", action="store_true",
        help="print JSON (every run, the medians, and the tunnels test's worst run)")
    add("--keep", action="store_true", help="keep the temp dir with the process logs")
    return parser


# Defaults of the options left unset; --against changes some of them (AGAINST).
DEFAULTS = {"size": [1420], "window": 256, "duration": 5.0, "idle": 3.0, "runs": 1,
            "tunnels": 0, "tests": None}
AGAINST = {"size": [1420, 100], "duration": 2.0, "idle": 5.0, "runs": 5, "tunnels": 100,
           "tests": "ping,load,tunnels"}
# The original leaves its UDP sockets at the kernel's default buffers (net.core.rmem_default,
# 208 KiB here: about 90 datagrams of 1420 bytes at the kernel's per-datagram overhead). With
# all the window queued in front of one of them, more than that is dropped, and each loss
# costs the load a stall: 64 in flight fits, and both sides are measured with the same window.
AGAINST_GO_WINDOW = 64


def measure(setup, options, tests, run, tag, ping_size, direct=True, tunnels=True, sizes=None):
    """One run of `tests` on one setup; returns the entries (and the direct ping if `direct`).

    The load runs at `sizes` (default: all of --size).
    """
    entries = []

    def add(test, transport, size, window, result, side=setup.impl.key):
        entries.append(dict(side=side, test=test, transport=transport, size=size,
                            window=window, run=run, result=result))

    setup.wait_tunnel()  # up again if the client had to reconnect meanwhile
    if "ping" in tests:
        note("%s: ping %d x %d bytes" % (tag, options.roundtrips, ping_size))
        if options.pinger_path:
            ping = functools.partial(go_ping, options.pinger_path,
                                     options.pinger == "go-blocking")
        else:
            ping = ping_pong
        add("ping", setup.transport, ping_size, 1, ping(setup.sock, ping_size, options.roundtrips))
        if direct:
            add("ping", "direct", ping_size, 1,
                ping(setup.direct, ping_size, options.roundtrips), side="direct")
    if "load" in tests:
        for size in sizes or options.size:
            note("%s: load %d bytes, window %d, %gs"
                 % (tag, size, options.window, options.duration))
            if options.warmup > 0:
                windowed_load(setup, size, options.window, options.warmup)
            add("load", setup.transport, size, options.window,
                windowed_load(setup, size, options.window, options.duration))
    if "tunnels" in tests and tunnels:
        note("%s: %d tunnels" % (tag, options.tunnels))
        add("tunnels", setup.transport, options.size[0], options.tunnels,
            many_tunnels(setup, options.tunnels, options.size[0], options.tunnel_roundtrips,
                         options.idle))
    return entries


# The peers test's paced load, unless --peers-rate says: this share of the lower of the two
# arrangements' saturated rates in the first round, so that both run below saturation (where a
# process bound by one core and N processes on two cores would not be compared fairly).
PEERS_PACED_SHARE = 0.5


def start_peers(procs, echo, side, tls, protocol, workdir, peers, cpu=None):
    """The peers test's two arrangements of `peers` tunnels to one server: [one `up`
    process with them all (its --cpu `cpu`, if given), `peers` client processes]."""
    one = Setup(procs, echo, side, tls, workdir, protocol=protocol, peers=peers,
                arrangement=ONE_PROCESS, up_args=["--cpu", cpu] if cpu else [])
    return [one, Setup(procs, echo, side, tls, workdir, protocol=protocol, peers=peers,
                       arrangement=SEPARATE, server_of=one)]


def measure_peers(arrangements, options, run, rate):
    """One round of the peers test: saturated, then paced at `rate` (datagrams/s; None: not
    yet known, then half the lower saturated rate, PEERS_PACED_SHARE), on each arrangement in
    turn, the order alternating between rounds. Returns (entries, the paced rate)."""
    entries = []
    order = arrangements if run % 2 == 0 else arrangements[::-1]
    size = options.size[0]

    def load(paced_rate):
        for setup in order:
            setup.wait_tunnel()  # up again if a client had to reconnect meanwhile
            note("run %d/%d peers: %d tunnels, %s, %s, %d bytes, window %d, %gs"
                 % (run + 1, options.runs, options.peers, setup.arrangement, "saturated"
                    if paced_rate is None else "paced %.0f/s" % paced_rate, size,
                    options.window, options.duration))
            if options.warmup > 0:
                windowed_load(setup, size, options.window, options.warmup, rate=paced_rate)
            entries.append(dict(side=setup.impl.key, test="peers", transport=setup.transport,
                                size=size, window=options.window, run=run,
                                arrangement=setup.arrangement, peers=options.peers,
                                rate=paced_rate, result=windowed_load(
                                    setup, size, options.window, options.duration,
                                    rate=paced_rate)))

    load(None)
    if rate is None:
        rate = round(PEERS_PACED_SHARE * min(entry["result"]["rt_per_s"] for entry in entries),
                     -2) or 100.0
    if rate > 0:
        load(rate)
    return entries, rate


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["_echo"]:
        return echo_main()
    if argv is None and sys.argv[1:2] == ["_probe"]:
        return probe_main(int(sys.argv[2]), *sys.argv[3:4])
    options = build_parser().parse_args(argv)
    if not os.path.exists(options.proxyguard):
        print("proxyguard_bench.py: %s not found (use --proxyguard PATH)" % options.proxyguard,
              file=sys.stderr)
        return 2
    options.pinger_path = None
    if options.pinger != "python":
        try:
            options.pinger_path = build_pinger()
        except NoReference as exc:
            print("proxyguard_bench.py: --pinger go: %s" % exc, file=sys.stderr)
            return 2
    try:
        sides = [PythonSide(options.proxyguard, options.python)]
        if options.against:
            other = against_side(options)
            if isinstance(other, PythonSide) and other.script != sides[0].script:
                sides[0].label, other.label = options.proxyguard, options.against
                sides[0].short, other.short = "1st", "2nd"
            elif isinstance(other, PythonSide):  # two interpreters: name them
                sides[0].label, other.label = sides[0].interpreter(), other.interpreter()
                sides[0].short, other.short = sides[0].info["version"], other.info["version"]
                if sides[0].label == other.label:
                    sides[0].label += " (1st)"
                    other.label += " (2nd)"
                if sides[0].short == other.short:
                    sides[0].short, other.short = "1st", "2nd"
            sides.append(other)
    except NoReference as exc:
        note("no comparison: %s; measuring proxyguard.py alone" % exc)
        options.against = None
    except (RuntimeError, OSError, ValueError) as exc:
        print("proxyguard_bench.py: %s" % exc, file=sys.stderr)
        return 2
    defaults = dict(DEFAULTS, **AGAINST) if options.against else DEFAULTS
    if options.against == "go":
        defaults = dict(defaults, window=AGAINST_GO_WINDOW)
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    if options.tests is None:
        options.tests = defaults["tests"] or ("tunnels" if options.tunnels else "ping,load")
    tests = [test.strip() for test in options.tests.split(",") if test.strip()]
    pair_tests = [test for test in tests if test != "peers"]  # on a server-client pair
    unknown = set(tests) - {"ping", "load", "tunnels", "peers"}
    if unknown:
        print("proxyguard_bench.py: unknown test(s): %s" % ", ".join(sorted(unknown)),
              file=sys.stderr)
        return 2
    if "tunnels" in tests and options.tunnels <= 0:
        options.tunnels = 500
    if "peers" in tests and options.peers < 2:
        print("proxyguard_bench.py: --peers %d: the peers test needs 2 or more" % options.peers,
              file=sys.stderr)
        return 2
    if "peers" in tests and options.against:
        note("the peers test measures proxyguard.py alone (--against is for the other tests)")
    if options.against:
        transports = [False, True]  # TLS for whichever side has it
    else:
        transports = [False, True] if options.both else [options.tls]
    protocols = [UOTLV, WEBSOCKET] if options.transport == "both" else [options.transport]
    for side in sides:
        for protocol in protocols:
            if protocol not in side.protocols:
                note("%s speaks only UoTLV/1: not measured over WebSocket" % side.label)
    if "tunnels" in tests and WEBSOCKET in protocols:
        note("the tunnels test drives UoTLV/1 tunnels by hand: it runs over UoTLV/1 only")
    ping_size = options.ping_size or options.size[0]

    # Many tunnels need many descriptors: the server two per tunnel, the bench one. Raise the
    # soft limit to the hard one here; the children (server, client, echo) inherit it.
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else max(8 * options.tunnels + 1024,
                                                                 soft)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        if "tunnels" in tests and 3 * options.tunnels + 1024 > wanted:
            note("open-files limit %d (hard %s): %d tunnels may not fit"
                 % (wanted, hard, options.tunnels))
    except (ImportError, ValueError, OSError):
        pass

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = tempfile.mkdtemp(prefix="proxyguard_bench-")
    procs = Processes(workdir)
    entries = []  # every run: {side, test, transport, size, window, run, result}
    status = 0
    try:
        echo = Echo(procs, options.pinger_path, options.pinger == "go-blocking")
        for index in range(options.hogs):  # low-priority CPU load, as a desktop's
            procs.spawn("hog", ["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
        # All up at once, so that runs can alternate between them; the sides, and the
        # protocols, next to each other for plain and for TLS, so that what is compared is
        # measured close in time.
        setups, peer_pairs = [], []
        for tls in transports:
            for protocol in protocols:
                for side in sides:
                    if not pair_tests or (tls and not side.tls) or protocol not in side.protocols:
                        continue
                    note("starting %s server and client (%s)"
                         % (side.label, SCHEMES[protocol, tls]))
                    server_args = []
                    if "tunnels" in tests and isinstance(side, PythonSide):
                        # Room for the N tunnels, the real client's and the timed handshakes.
                        server_args = ["--max-clients", str(max(
                            1000, options.tunnels + HANDSHAKE_SAMPLES + 16))]
                    setups.append(Setup(procs, echo, side, tls, workdir,
                                        server_args=server_args, protocol=protocol,
                                        nofile=options.nofile))
                if "peers" in tests:
                    note("starting a server and %d tunnels to it twice: %d client processes, "
                         "one up process (%s)" % (options.peers, options.peers,
                                                  SCHEMES[protocol, tls]))
                    peer_pairs.append(start_peers(procs, echo, sides[0], tls, protocol,
                                                  workdir, options.peers, options.peers_cpu))
        peers_rate = options.peers_rate
        for run in range(options.runs):
            # Test by test (load: size by size), each on every setup in turn, so that what is compared is measured
            # seconds apart; the order alternates, so neither side always goes first.
            order = setups if run % 2 == 0 else setups[::-1]
            steps = [(test, [size]) for test in pair_tests
                     for size in (options.size if test == "load" else [None])]
            for test, sizes in steps:
                for index, setup in enumerate(order):
                    tag = "run %d/%d %s %s" % (run + 1, options.runs, setup.impl.label,
                                               setup.transport)
                    entries += measure(setup, options, [test], run, tag, ping_size,
                                       direct=index == 0, sizes=sizes,
                                       tunnels=not (options.against and setup.tls)
                                       and setup.protocol == UOTLV)
            for pair in peer_pairs:
                measured, peers_rate = measure_peers(pair, options, run, peers_rate)
                entries += measured
        for setup in setups + [setup for pair in peer_pairs for setup in pair[::-1]]:
            setup.stop()
    except KeyboardInterrupt:
        note("interrupted")
        status = 130
    except RuntimeError as exc:
        print("proxyguard_bench.py: %s" % exc, file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
        if options.keep:
            note("logs kept in %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # Medians over runs, in the order first measured.
    groups = {}
    for entry in entries:
        key = (entry["side"], entry["test"], entry["transport"], entry["size"], entry["window"],
               entry.get("arrangement"), entry.get("rate"))
        groups.setdefault(key, []).append(entry)
    summary = [dict(side=key[0], test=key[1], transport=key[2], size=key[3], window=key[4],
                    runs=len(items), result=median_result([item["result"] for item in items]),
                    **({"arrangement": key[5], "peers": items[0]["peers"], "rate": key[6]}
                       if key[1] == "peers" else {}))
               for key, items in groups.items()]
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "kernel": platform.release(),
            "proxyguard": os.path.abspath(options.proxyguard), "runs": options.runs,
            "transports": protocols,
            "window": options.window, "duration": options.duration,
            "sides": [dict(key=side.key, label=side.label, about=side.describe(),
                           **({"interpreter": side.info} if isinstance(side, PythonSide) else
                              {"bindir": side.bindir, "go_version": side.go_version}))
                      for side in sides]}
    # --against: one side-by-side table per protocol that both sides speak.
    comparisons = {protocol: compare(sides, summary, options, ping_size, protocol)
                   for protocol in protocols
                   if len(sides) > 1 and all(protocol in side.protocols for side in sides)}
    by_transport = compare_transports(sides, summary, options, ping_size) \
        if len(protocols) > 1 and pair_tests else None
    worst = tunnels_worst(entries)
    peers = compare_peers(entries) if "peers" in tests else None
    if options.json:
        json.dump({"info": info, "comparison": comparisons.get(UOTLV),
                   "comparison_websocket": comparisons.get(WEBSOCKET),
                   "websocket_vs_uotlv": by_transport, "tunnels_worst": worst, "peers": peers,
                   "medians": summary,
                   "runs": entries}, sys.stdout, indent=1)
        print()
    elif summary:
        pair_summary = [entry for entry in summary if entry["test"] != "peers"]
        print("proxyguard_bench: %s, %d CPUs, Linux %s%s"
              % (info["machine"], info["cpus"], info["kernel"],
                 ", medians of %d runs" % options.runs if options.runs > 1 else ""))
        for side in sides:
            print("  " + side.describe())
        if options.hogs:
            print("  meanwhile %d CPU hogs at nice 19" % options.hogs)
        if comparisons or by_transport:
            print("  %d rounds alternating the %s; load: window %d, %gs per size; "
                  "ping: %d round trips (%s pinger and echo)"
                  % (options.runs, "sides" if comparisons else "transports", options.window,
                     options.duration, options.roundtrips, options.pinger.capitalize()))
        for protocol, comparison in comparisons.items():
            print()
            if len(comparisons) > 1:
                print("over %s:" % ("UoTLV/1" if protocol == UOTLV else "WebSocket"))
            for line in format_comparison(comparison, sides):
                print(line)
        if by_transport:
            print()
            for line in format_transport_comparison(by_transport, sides):
                print(line)
        if comparisons or by_transport:
            print()
        if peers:
            for line in format_peers(peers, options):
                print(line)
            print()
        labels = dict({side.key: side.label for side in sides}, direct="no proxy")
        width = max(len(label) for label in labels.values())
        if pair_summary:
            print(HEADER if len(sides) == 1 else "%-*s %s" % (width, "side", HEADER))
        for entry in pair_summary:
            line = format_line(entry)
            if len(sides) > 1:
                line = "%-*s %s" % (width, labels[entry["side"]], line)
            print(line)
        for item in worst:
            for line in format_worst(item):
                print(line if len(sides) == 1 else "%s: %s" % (labels[item["side"]], line))
    return status

if __name__ == "__main__":
    sys.exit(main())
