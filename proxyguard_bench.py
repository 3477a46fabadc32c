#!/usr/bin/env python3
"""proxyguard_bench.py: measure proxyguard.py on loopback (standard library only, Linux).

Starts, on free 127.0.0.1 ports, a UDP echo (its own process, standing in for WireGuard behind
the server), `proxyguard.py server` and `proxyguard.py client`, and plays WireGuard in front of
the client itself:

    bench socket --UDP--> client --HTTP(S) UoTLV/1--> server --UDP--> echo
                 <-------        <--------------------        <------

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
               trips; then the server's RSS and threads, and the CPU (and scheduler wake-ups)
               of server and client while everything sits idle for IDLE seconds: ~0 means no
               polling.

Examples:
    python3 proxyguard_bench.py                         # plain, 1420 bytes, about 10 s
    python3 proxyguard_bench.py --both --size 1420,100  # plain and TLS, two sizes
    python3 proxyguard_bench.py --tls --runs 3          # medians of 3 runs
    python3 proxyguard_bench.py --tunnels 500           # tunnel count: RSS and idle CPU
    python3 proxyguard_bench.py --json > bench.json

Numbers on loopback are indicative: all four processes (bench, client, server, echo) share the
machine's cores, so a 2-core box measures contention as much as proxyguard. The `gen` CPU
column tells whether the bench itself was the bottleneck.
"""

import argparse
import contextlib
import ctypes
import json
import os
import platform
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

    def __init__(self, procs):
        self.popen = procs.spawn("echo", [sys.executable, os.path.abspath(__file__), "_echo"],
                                 stdout=subprocess.PIPE)
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


def _die_with_parent():
    """preexec_fn: the child gets SIGTERM if the bench dies (even by SIGKILL). Linux only."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the bench stops us in order


class Processes:
    """The child processes; `stop_all()` ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.children = []

    def spawn(self, name, argv, stdout=None):
        log_path = os.path.join(self.workdir, "%s-%d.log" % (name, len(self.children)))
        log_file = open(log_path, "w")
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                 stdout=stdout if stdout is not None else log_file,
                                 stderr=log_file, preexec_fn=_die_with_parent)
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
        if popen.stdout is not None:
            popen.stdout.close()
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


class Setup:
    """echo <- server <- client <- bench socket, running for one transport (plain or TLS)."""

    def __init__(self, procs, echo, script, tls, workdir, server_args=(), client_args=()):
        self.procs = procs
        self.echo = echo
        self.tls = tls
        self.ca_file = None
        server_extra, client_extra = list(server_args), list(client_args)
        if tls:
            self.ca_file, cert, key = make_certificates(workdir)
            server_extra += ["--tls-cert", cert, "--tls-key", key]
            client_extra += ["--ca-file", self.ca_file]
        # The bench's socket is WireGuard: bound to the client's --forward-port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        self.sock.bind((LOOPBACK, 0))
        forward_port = self.sock.getsockname()[1]
        for attempt in range(3):  # a free port can be taken between probe and bind
            self.server_port = free_port(socket.SOCK_STREAM)
            self.server = procs.spawn("server", [
                sys.executable, script, "server", "--listen",
                "%s:%d" % (LOOPBACK, self.server_port),
                "--to", "%s:%d" % (LOOPBACK, echo.port)] + server_extra)
            try:
                procs.wait_log(self.server, "listening on")
                break
            except RuntimeError:
                procs.stop(self.server)
                if attempt == 2:
                    raise
        self.url = "%s://%s:%d/bench" % ("https" if tls else "http", LOOPBACK, self.server_port)
        for attempt in range(3):
            self.listen_port = free_port(socket.SOCK_DGRAM)
            self.client = procs.spawn("client", [
                sys.executable, script, "client", "--to", self.url,
                "--listen-port", str(self.listen_port),
                "--forward-port", str(forward_port)] + client_extra)
            try:
                procs.wait_log(self.client, "listening on")
                break
            except RuntimeError:
                procs.stop(self.client)
                if attempt == 2:
                    raise
        self.sock.connect((LOOPBACK, self.listen_port))
        self.direct = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.direct.connect((LOOPBACK, echo.port))
        self.wait_tunnel()

    @property
    def transport(self):
        return "tls" if self.tls else "plain"

    def wait_tunnel(self, timeout=15):
        """Ping until one comes back: the client connects lazily, on the first datagram."""
        deadline = time.monotonic() + timeout
        payload = bytearray(64)
        seq = 1 << 62
        while time.monotonic() < deadline:
            seq += 1
            SEQ.pack_into(payload, 0, seq)
            try:
                self.sock.send(payload)
            except ConnectionRefusedError:
                pass
            if wait_reply(self.sock, seq, 0.5) is not None:
                drain(self.sock)
                return
        raise RuntimeError("no reply through the tunnel within %ds; client log:\n%s"
                           % (timeout, open(self.client.log_path).read()))

    def stop(self):
        self.procs.stop(self.client)
        self.procs.stop(self.server)
        self.sock.close()
        self.direct.close()


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


def windowed_load(setup, size, window, duration, stall_timeout=0.2):
    """Keep `window` datagrams in flight for `duration` s. Returns a result dict.

    A datagram lost would shrink the window for good, so after `stall_timeout` without any
    reply the bench counts everything in flight as lost and fills the window again (`stalls`).
    """
    sock, echo = setup.sock, setup.echo
    drain(sock)
    payload = bytes(size)
    buffer = bytearray(70000)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    send, recv_into, poll = sock.send, sock.recv_into, poller.poll
    dontwait = socket.MSG_DONTWAIT
    timeout_ms = stall_timeout * 1000
    pids = {"client": setup.client.pid, "server": setup.server.pid, "echo": echo.pid}

    cpu_before = {name: proc_cpu(pid) for name, pid in pids.items()}
    cpu_before["gen"] = self_cpu()
    echo_before = echo.stats()
    sent = received = inflight = stalls = send_errors = 0
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        while inflight < window:
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
        if got:
            received += got
            inflight = max(0, inflight - got)
        elif not poll(timeout_ms):
            stalls += 1
            inflight = 0
        now = time.perf_counter()
    elapsed = now - start
    echo_after = echo.stats()
    cpu_after = {name: proc_cpu(pid) for name, pid in pids.items()}
    cpu_after["gen"] = self_cpu()
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


def many_tunnels(setup, count, size, rounds, idle_seconds):
    """`count` raw tunnels at once: server RSS/threads, and idle CPU of server and client."""
    server_pid, client_pid = setup.server.pid, setup.client.pid
    setup.wait_tunnel()  # the real client's tunnel is up too
    rss_before, threads_before = proc_status(server_pid)
    ssl_context = None
    if setup.tls:
        ssl_context = ssl.create_default_context(cafile=setup.ca_file)
    tunnels, buffers = [], []
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
        cpu0 = {"server": proc_cpu(server_pid), "client": proc_cpu(client_pid)}
        sched0 = {"server": proc_sched(server_pid), "client": proc_sched(client_pid)}
        time.sleep(idle_seconds)
        cpu1 = {"server": proc_cpu(server_pid), "client": proc_cpu(client_pid)}
        sched1 = {"server": proc_sched(server_pid), "client": proc_sched(client_pid)}
        rss_idle, _ = proc_status(server_pid)
    finally:
        for sock in tunnels:
            with contextlib.suppress(OSError):
                sock.close()
    # How fast the server lets go of the tunnels (threads back to where they were).
    started = time.perf_counter()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, threads_now = proc_status(server_pid)
        if threads_now <= threads_before:
            break
        time.sleep(0.02)
    teardown_seconds = time.perf_counter() - started
    rss_after, threads_after = proc_status(server_pid)
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
        "idle_seconds": idle_seconds, "idle": idle,
    }


# =============================================================================================
# Report
# =============================================================================================


def median_result(results):
    """Field-wise median of result dicts (nested dicts too); non-numbers from the first."""
    first = results[0]
    if len(results) == 1:
        return first
    merged = {}
    for key, value in first.items():
        values = [result.get(key) for result in results]
        if isinstance(value, dict):
            merged[key] = median_result(values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and \
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

        text = ("server RSS %.1f -> %.1f MiB (%+.0f KiB/tunnel), %d threads  "
                "idle %gs: server %s, client %s  "
                "open %.0f/s, %d/%d round trips ok, closed in %.2fs"
                % (result["server_rss_kib_before"] / 1024, result["server_rss_kib_up"] / 1024,
                   result["server_rss_kib_per_tunnel"], result["server_threads_up"],
                   result["idle_seconds"], idle_text(server), idle_text(client),
                   result["tunnels_per_s"], result["roundtrips_ok"], result["roundtrips"],
                   result["teardown_seconds"]))
        if result.get("tunnels_closed_by_server"):
            text += "  (%d TUNNELS CLOSED BY THE SERVER: see its log, --keep)" % (
                result["tunnels_closed_by_server"])
    return prefix + text


HEADER = "%-8s %-6s %5s %5s  %s" % ("test", "via", "size", "W/N", "result")


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
    add("--size", type=parse_sizes, default=[1420], metavar="BYTES[,BYTES]",
        help="datagram sizes for the load (default 1420; e.g. 1420,100)")
    add("--window", type=int, default=256,
        help="datagrams in flight (default %(default)s: below it, the rate on a 2-core box is "
             "bound by the round-trip latency, not by proxyguard's CPU)")
    add("--duration", type=float, default=5.0, metavar="SECONDS",
        help="seconds of load per size (default %(default)g)")
    add("--warmup", type=float, default=0.5, metavar="SECONDS",
        help="unmeasured load before each measured one (default %(default)g)")
    add("--roundtrips", type=int, default=2000, metavar="N",
        help="ping round trips (default %(default)s)")
    add("--ping-size", type=int, default=None, metavar="BYTES",
        help="ping datagram size (default: the first --size)")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--tls", action="store_true", help="over TLS only (https://)")
    transport.add_argument("--both", action="store_true", help="plain, then TLS")
    add("--tunnels", type=int, default=0, metavar="N",
        help="open N tunnels at once (raw sockets): server RSS and idle CPU; runs only "
             "this test unless --tests says otherwise")
    add("--tunnel-roundtrips", type=int, default=3, metavar="R",
        help="round trips per raw tunnel (default %(default)s)")
    add("--idle", type=float, default=3.0, metavar="SECONDS",
        help="idle time measured with the tunnels up (default %(default)g)")
    add("--tests", default=None, metavar="LIST",
        help="comma list of ping,load,tunnels (default ping,load; tunnels with --tunnels)")
    add("--runs", type=int, default=1, metavar="K", help="repeat K times, print medians")
    add("--json", action="store_true", help="print JSON (every run and the medians)")
    add("--keep", action="store_true", help="keep the temp dir with the process logs")
    return parser


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["_echo"]:
        return echo_main()
    options = build_parser().parse_args(argv)
    if options.tests is None:
        options.tests = "tunnels" if options.tunnels else "ping,load"
    tests = [test.strip() for test in options.tests.split(",") if test.strip()]
    unknown = set(tests) - {"ping", "load", "tunnels"}
    if unknown:
        print("proxyguard_bench.py: unknown test(s): %s" % ", ".join(sorted(unknown)),
              file=sys.stderr)
        return 2
    if "tunnels" in tests and options.tunnels <= 0:
        options.tunnels = 500
    if not os.path.exists(options.proxyguard):
        print("proxyguard_bench.py: %s not found (use --proxyguard PATH)" % options.proxyguard,
              file=sys.stderr)
        return 2
    transports = [False, True] if options.both else [options.tls]
    ping_size = options.ping_size or options.size[0]

    # Many tunnels need many descriptors: raise the soft limit (the children inherit it).
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 8 * options.tunnels + 1024
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                wanted if hard == resource.RLIM_INFINITY else min(hard, wanted), hard))
    except (ImportError, ValueError, OSError):
        pass

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = tempfile.mkdtemp(prefix="proxyguard_bench-")
    procs = Processes(workdir)
    entries = []  # every run: {test, transport, size, window, run, result}
    status = 0
    try:
        echo = Echo(procs)
        for tls in transports:
            note("starting server and client (%s)" % ("tls" if tls else "plain"))
            setup = Setup(procs, echo, options.proxyguard, tls, workdir)
            for run in range(options.runs):
                tag = "run %d/%d %s" % (run + 1, options.runs, setup.transport)
                if "ping" in tests:
                    note("%s: ping %d x %d bytes" % (tag, options.roundtrips, ping_size))
                    entries.append(dict(test="ping", transport=setup.transport,
                                        size=ping_size, window=1, run=run,
                                        result=ping_pong(setup.sock, ping_size,
                                                         options.roundtrips)))
                    if tls == transports[0]:
                        entries.append(dict(test="ping", transport="direct", size=ping_size,
                                            window=1, run=run,
                                            result=ping_pong(setup.direct, ping_size,
                                                             options.roundtrips)))
                if "load" in tests:
                    for size in options.size:
                        note("%s: load %d bytes, window %d, %gs"
                             % (tag, size, options.window, options.duration))
                        if options.warmup > 0:
                            windowed_load(setup, size, options.window, options.warmup)
                        entries.append(dict(test="load", transport=setup.transport, size=size,
                                            window=options.window, run=run,
                                            result=windowed_load(setup, size, options.window,
                                                                 options.duration)))
                if "tunnels" in tests:
                    note("%s: %d tunnels" % (tag, options.tunnels))
                    entries.append(dict(test="tunnels", transport=setup.transport,
                                        size=options.size[0], window=options.tunnels, run=run,
                                        result=many_tunnels(setup, options.tunnels,
                                                            options.size[0],
                                                            options.tunnel_roundtrips,
                                                            options.idle)))
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
        key = (entry["test"], entry["transport"], entry["size"], entry["window"])
        groups.setdefault(key, []).append(entry)
    summary = [dict(test=key[0], transport=key[1], size=key[2], window=key[3],
                    runs=len(items), result=median_result([item["result"] for item in items]))
               for key, items in groups.items()]
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "kernel": platform.release(),
            "proxyguard": os.path.abspath(options.proxyguard), "runs": options.runs}
    if options.json:
        json.dump({"info": info, "medians": summary, "runs": entries}, sys.stdout, indent=1)
        print()
    elif summary:
        print("proxyguard_bench: Python %s, %s, %d CPUs, %s%s"
              % (info["python"], info["machine"], info["cpus"], info["kernel"],
                 ", medians of %d runs" % options.runs if options.runs > 1 else ""))
        print(HEADER)
        for entry in summary:
            print(format_line(entry))
    return status


if __name__ == "__main__":
    sys.exit(main())
