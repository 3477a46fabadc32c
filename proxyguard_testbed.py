#!/usr/bin/env python3
"""proxyguard_testbed.py: an end-to-end test bed for proxyguard.py with real userspace WireGuard.

Two network namespaces made for one run, a client host and a server host, joined by a veth
pair whose /30 exists only inside them. UDP between the two hosts is dropped by iptables, so
WireGuard can only reach its peer through proxyguard.py's TCP connection:

    client netns                                           server netns
    wireguard-go (wgc, ListenPort 51820,                   wireguard-go (wgs, ListenPort 51820)
      Endpoint 127.0.0.1:51821)                                 ^ UDP on lo
        | UDP on lo                                             |
    proxyguard.py client --listen-port 51821  ==TCP/veth==>  proxyguard.py server
      --forward-port 51820 --to http://10.213.7.2:8080/         --listen 0.0.0.0:8080
                                                                --to 127.0.0.1:51820
    tunnel address 10.214.7.1  <------- WireGuard ------->  tunnel address 10.214.7.2

With front_end="nginx" the proxyguard server listens on 127.0.0.1:8080 only, behind nginx on
10.213.7.2:8443 (TLS, certificate for that IP from a test CA made here with openssl), and the
client goes to https://10.213.7.2:8443/proxyguard with --ca-file:

    proxyguard.py client ==HTTPS/veth==> nginx --HTTP/1.1 Upgrade, lo--> proxyguard.py server

With websocket=True the client speaks WebSocket (RFC 6455) instead of UoTLV/1: its URL is
ws://10.213.7.2:8080/ (plain) or wss://10.213.7.2:8443/proxyguard (nginx, which passes the
client's `Upgrade: websocket` on as it passes `Upgrade: UoTLV/1`).

Every address is inside the two namespaces (and 127.0.0.1 inside each): nothing leaves them.
Fixed addresses and ports are fine because each run has namespaces of its own; the names that
are shared by the whole machine (namespace names, and wireguard-go's UAPI socket
/var/run/wireguard/<ifname>.sock) carry a per-run tag.

Use:
    reason = WireGuardBed.unavailable()      # None, or why the bed cannot run here
    with WireGuardBed(workdir, idle_timeout=5) as bed:   # everything up and tunnel checked
        bed.ping()                           # {"sent", "received", "rtt_ms": [...]}
        bed.wait_ping(timeout=30)            # seconds until the first reply, or None
        bed.transfer(nbytes=50 << 20)        # sha-checked bulk TCP through WireGuard
        bed.set_mtu(1280); bed.throughput(seconds=5)   # Mbit/s for an MTU study
        bed.kill_pg_server(); bed.start_pg_server()    # faults, see the methods

The traffic tools (ping, TCP source and sink) are this same file run as a program inside a
namespace: `ip netns exec NS python3 proxyguard_testbed.py ping|wait-ping|sink|source ...`, one JSON line out.

The MTU study, from a shell (as root; --tls puts nginx in front):
    python3 proxyguard_testbed.py mtu [--mtus 1280,1320,1360,1380,1400,1420] [--seconds 5]
                                      [--runs 3] [--tls]

Side by side with the original Go ProxyGuard 2.0.0 (built by proxyguard_bench.build_go; plain
HTTP; iperf3 too), in one bed whose proxyguard pair alone is swapped between runs:
    python3 proxyguard_testbed.py compare [--runs 5] [--seconds 4] [--python /usr/bin/python3]

Needs root, iproute2, iptables, wireguard-go, wireguard-tools (wg), setpriv (util-linux) and
/dev/net/tun; the nginx front end also nginx and openssl.

Nothing outlives its run: every process of the bed dies with the process that started it
(parent-death signal), and a bed starting removes the namespaces of runs that are gone
(remove_stale_beds; namespace names carry the creator's pid and start time).
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# proxyguard.py to test: $PROXYGUARD_SCRIPT, else the one beside this file.
DEFAULT_PROXYGUARD = os.environ.get("PROXYGUARD_SCRIPT") or os.path.join(HERE, "proxyguard.py")

VETH_CLIENT_IP = "10.213.7.1"
VETH_SERVER_IP = "10.213.7.2"
VETH_PREFIX = 30
WG_CLIENT_IP = "10.214.7.1"
WG_SERVER_IP = "10.214.7.2"
WG_PREFIX = 30
WG_PORT = 51820  # ListenPort of both WireGuards (each in its own namespace)
PG_CLIENT_PORT = 51821  # proxyguard client's UDP port = the client WireGuard's Endpoint
PG_SERVER_PORT = 8080  # proxyguard server's TCP port on the server host
NGINX_PORT = 8443  # front_end="nginx": its TLS port on the server host (the server: 127.0.0.1)
SINK_PORT = 5201  # TCP bulk receiver on the server's tunnel address

WG_RUN_DIR = "/var/run/wireguard"
NETNS_DIR = "/var/run/netns"
# setpriv (util-linux): every process of the bed gets --pdeathsig KILL, so it dies with the
# process that started it (a test run killed by a time limit leaves no wireguard-go behind).
TOOLS = ("ip", "iptables", "wg", "wireguard-go", "setpriv")
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"]
FRONT_END_TOOLS = {None: (), "nginx": ("nginx", "openssl")}

# front_end="nginx": TLS ends here, HTTP/1.1 with Upgrade to the proxyguard server on lo. Run in
# the foreground; every path in the bed's workdir (nothing read from or written to /etc, /var).
NGINX_CONF = """\
daemon off;
worker_processes 1;
# Workers as root: the bed's workdir may be private to root (pytest's tmp_path is).
user root root;
pid {dir}/nginx.pid;
error_log stderr info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # the client wants TLS 1.3 by default
        location /proxyguard {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;                  # 1.0 (the default) has no Upgrade
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;                # the upgraded tunnel's idle timeout
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""

_counter = itertools.count()

# proxyguard.py's log line when a tunnel ends (see Tunnel.summary).
TUNNEL_DOWN = re.compile(r"tunnel down: .* after ([\d.]+)s, (\d+) datagrams/(\d+) bytes to "
                         r"WireGuard, (\d+) datagrams/(\d+) bytes from WireGuard.*\((.*)\)$",
                         re.MULTILINE)


class BedError(Exception):
    """The bed could not be set up or a tool failed."""


# =============================================================================================
# Leftovers of dead runs
# =============================================================================================

# Namespace names: pgbed-{c,s}<pid:7><counter:2>-<start ticks of pid> (this version),
# pgbed-{c,s}<pid % 100000:5><counter:2> (older versions) and pgbed-probe<pid> (unavailable()).
_BED_NAME = re.compile(r"^pgbed-(?:[csr](?P<pid>\d{7})(?P<n>\d{2})-(?P<start>\d+)"
                       r"|[cs](?P<pid5>\d{5})(?P<n5>\d{2})|probe(?P<probe>\d+))$")


def process_start_ticks(pid):
    """Start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or None if
    there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            fields = stream.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _run_is_alive(match):
    """Whether the run that named a namespace (a _BED_NAME match) may still be running."""
    if match.group("pid") is not None:
        # Alive only if the same process: a dead run's pid may be reused by any other.
        return process_start_ticks(int(match.group("pid"))) == int(match.group("start"))
    if match.group("probe") is not None:
        return process_start_ticks(int(match.group("probe"))) is not None
    # Older names have the pid modulo 100000 only: alive if any live process could be it.
    low = int(match.group("pid5"))
    return any(int(entry) % 100000 == low and process_start_ticks(int(entry)) is not None
               for entry in os.listdir("/proc") if entry.isdigit())


def remove_stale_beds(timeout=10):
    """Remove what runs that are gone left behind (a run killed with SIGKILL cannot clean up):
    their pgbed-* namespaces, the processes still in them, their wireguard-go sockets. The veth
    pair, the TUN devices and the iptables rules exist only inside the namespaces and go with
    them. Beds of live runs (other users of this machine may be running tests right now) are
    left alone. Returns the namespaces removed."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = _BED_NAME.match(name)
        if match is None or _run_is_alive(match):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              timeout=15).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(process_start_ticks(int(pid)) is not None for pid in pids):
            if time.monotonic() > deadline:
                raise BedError("processes %s in stale namespace %s do not die" % (pids, name))
            time.sleep(0.02)  # polling for a condition (the processes are gone), with a deadline
        result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True,
                                timeout=15)
        if result.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
            continue  # another run removing the same leftovers got there first, or in use
        removed.append(name)
        tag = (match.group("pid") or match.group("pid5") or "") + (
            match.group("n") or match.group("n5") or "")
        if tag:
            for ifname in ("wgc" + tag, "wgs" + tag):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(WG_RUN_DIR, ifname + ".sock"))
    return removed


# =============================================================================================
# The bed
# =============================================================================================


class WireGuardBed:
    """Two namespaces, two wireguard-go, proxyguard client and server; see the module doc.

    `idle_timeout` goes to both proxyguard processes (None: their default). `client_keepalive`
    is the client WireGuard's PersistentKeepalive (so the tunnel heals by itself);
    `server_keepalive` the server's (0 = off, the usual server setting). `front_end="nginx"`
    puts the proxyguard server behind nginx with TLS (see the module doc). `websocket` makes the
    client use the WebSocket transport (ws:// or wss://) instead of UoTLV/1 (http(s)://).
    `log` gets progress lines.

    `pg_command` runs another implementation in place of proxyguard.py (None, the default:
    proxyguard.py run by `python`): an object with server_argv(listen, to),
    client_argv(url, listen_port, forward_port) and the log texts server_ready and client_ready
    that say each is up, e.g. proxyguard_bench.GoSide (the original Go ProxyGuard). Plain HTTP
    only, and no options passed (pg_extra and idle_timeout are proxyguard.py's). It may be
    changed between kill_pg_* and start_pg_* (see run_compare).
    """

    def __init__(self, workdir, idle_timeout=None, client_keepalive=1, server_keepalive=0,
                 mtu=None, proxyguard=DEFAULT_PROXYGUARD, python=sys.executable,
                 pg_extra=(), front_end=None, log=None, pg_command=None, websocket=False,
                 pg_servers=1, delay_line=None):
        if front_end not in FRONT_END_TOOLS:
            raise ValueError("front_end must be one of %s" % list(FRONT_END_TOOLS))
        if (front_end or websocket) and pg_command is not None:
            raise ValueError("pg_command: plain HTTP (UoTLV/1) only, no front end")
        self.websocket = websocket
        # pg_servers=2: a second proxyguard server (pg-server2, port PG_SERVER_PORT + 1, plain
        # HTTP, no front end) for the same WireGuard, the client's second --to (failover).
        self.pg_servers = pg_servers
        self.delay_line = delay_line  # (seconds, jitter): a relay namespace delays the path
        self.pg_command = pg_command
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.front_end = front_end
        # The TCP port the client connects to on the server host (the one cut_path drops).
        self.public_port = NGINX_PORT if front_end else PG_SERVER_PORT
        self.ca_file = None  # the test CA, with a front end
        self.idle_timeout = idle_timeout
        self.client_keepalive = client_keepalive
        self.server_keepalive = server_keepalive
        self.mtu = mtu
        self.proxyguard = proxyguard
        self.python = python
        self.pg_extra = list(pg_extra)
        self.log = log or (lambda text: None)
        # Fixed width, so two runs' tags never collide: the pid (7 digits: pid_max is at most
        # 2^22), 2 of a counter. The namespace names also carry the process's start time, so a
        # later run can tell the namespaces of a dead run (see remove_stale_beds).
        tag = "%07d%02d" % (os.getpid(), next(_counter) % 100)
        self.tag = tag
        owner = "%s-%d" % (tag, process_start_ticks(os.getpid()))
        self.ns_client = "pgbed-c" + owner
        self.ns_server = "pgbed-s" + owner
        self.ns_relay = "pgbed-r" + owner  # delay_line only
        self.veth_relay = ("vra" + tag, "vrb" + tag)  # its ends towards client and server
        self.veth_client = "vpc" + tag  # names at most 15 characters
        self.veth_server = "vps" + tag
        self.wg_client = "wgc" + tag
        self.wg_server = "wgs" + tag
        self.procs = {}  # name -> Popen (only processes this bed started)
        self._logs = {}  # name -> open log file
        self._namespaces = []
        self._cut = False
        self.keys = {}

    # ----------------------------------------------------------------------------- checks

    @staticmethod
    def unavailable(front_end=None):
        """None if the bed (with `front_end`) can run here, else the reason (for pytest.skip)."""
        if os.geteuid() != 0:
            return "needs root (network namespaces, iptables, wireguard-go)"
        missing = [tool for tool in TOOLS + FRONT_END_TOOLS[front_end]
                   if shutil.which(tool) is None]
        if missing:
            return ("missing tools: %s (Debian: apt-get install iproute2 iptables util-linux "
                    "wireguard-go wireguard-tools%s)" % (", ".join(missing),
                                           " nginx openssl" if front_end else ""))
        if not os.path.exists("/dev/net/tun"):
            return "no /dev/net/tun (wireguard-go needs a TUN device)"
        probe = "pgbed-probe%d" % os.getpid()
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                                timeout=10)
        if result.returncode != 0:
            return "cannot create a network namespace: %s" % result.stderr.strip()
        try:
            result = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-S"],
                                    capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                return "iptables does not work in a namespace: %s" % result.stderr.strip()
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
        return None

    # ----------------------------------------------------------------------------- helpers

    def sh(self, *cmd, ns=None, check=True, timeout=15, input=None):
        """Run a command (in namespace `ns`) and return its stdout; BedError if it fails."""
        argv = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    input=input)
        except subprocess.TimeoutExpired:
            raise BedError("timed out after %ss: %s" % (timeout, " ".join(argv)))
        if check and result.returncode != 0:
            raise BedError("%s: exit %d: %s" % (" ".join(argv), result.returncode,
                                                 (result.stderr or result.stdout).strip()))
        return result.stdout

    def spawn(self, name, ns, argv, env=None):
        """Start a long-running process in `ns`, its output in workdir/<name>.log (appended)."""
        argv = [str(arg) for arg in argv]
        if name in self.procs and self.procs[name].poll() is None:
            raise BedError("%s is already running" % name)
        path = os.path.join(self.workdir, name + ".log")
        log_file = open(path, "a")
        log_file.write("==== %s start: %s\n" % (time.strftime("%H:%M:%S"), " ".join(argv)))
        log_file.flush()
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(DIE_WITH_PARENT + ["ip", "netns", "exec", ns] + argv,
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
        old = self._logs.pop(name, None)
        if old:
            old.close()
        self.procs[name] = proc
        self._logs[name] = log_file
        return proc

    def send_signal(self, name, sig=signal.SIGKILL, timeout=10, group=False):
        """Send `sig` to our process `name` (by its PID; with `group`, to its whole process
        group, e.g. nginx and its workers) and wait for it to end."""
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            # Every process here starts a session of its own: its PID is its group's ID, and
            # cannot be reused while the process is not yet reaped.
            kill = (lambda s: os.killpg(proc.pid, s)) if group else proc.send_signal
            kill(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill(signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def log_text(self, name):
        path = os.path.join(self.workdir, name + ".log")
        try:
            with open(path) as stream:
                return stream.read()
        except OSError:
            return ""

    def wait_log(self, name, text, timeout=10, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text(name).count(text) >= count:
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BedError("%r not seen %d times in %s.log within %ss:\n%s"
                       % (text, count, name, timeout, self.log_text(name)[-3000:]))

    def agent(self, ns, *args, timeout=60):
        """Run this file as a traffic tool in `ns`; return its JSON answer."""
        out = self.sh(self.python, os.path.abspath(__file__), *args, ns=ns, timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise BedError("agent %s printed no answer: %r" % (args, out))
        return json.loads(lines[-1])

    # ----------------------------------------------------------------------------- setup

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        t0 = time.monotonic()
        for name in remove_stale_beds():
            self.log("removed %s, left behind by a run that is gone" % name)
        self._make_network()
        self._make_keys()
        # proxyguard first: WireGuard's first handshake is lost if nothing listens yet on
        # 127.0.0.1:51821, and the retry comes only 5 s later (REKEY_TIMEOUT).
        self.start_pg_server()
        if self.pg_servers == 2:
            self.start_pg_server(name="pg-server2")
        if self.front_end:
            self._make_certificates()
            self.start_front_end()
        self.start_pg_client()
        self.start_wireguard("server")
        self.start_wireguard("client")
        seconds = self.wait_ping(timeout=20)
        if seconds is None:
            raise BedError("the WireGuard tunnel did not come up in 20 s\n" + self.diagnose())
        self.log("bed %s up in %.1fs (first ping after %.2fs)"
                 % (self.tag, time.monotonic() - t0, seconds))

    def _make_network(self):
        for ns in (self.ns_client, self.ns_server):
            self.sh("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            self.sh("ip", "link", "set", "lo", "up", ns=ns)
        if self.delay_line:
            self._make_delay_line()
        else:
            self.sh("ip", "link", "add", self.veth_client, "netns", self.ns_client, "type",
                    "veth", "peer", "name", self.veth_server, "netns", self.ns_server)
        for ns, dev, ip in ((self.ns_client, self.veth_client, VETH_CLIENT_IP),
                            (self.ns_server, self.veth_server, VETH_SERVER_IP)):
            self.sh("ip", "addr", "add", "%s/%d" % (ip, VETH_PREFIX), "dev", dev, ns=ns)
            self.sh("ip", "link", "set", dev, "up", ns=ns)
            # Only TCP may cross between the hosts: WireGuard must go through proxyguard.
            self.sh("iptables", "-A", "OUTPUT", "-o", dev, "-p", "udp", "-j", "DROP", ns=ns)
            self.sh("iptables", "-A", "INPUT", "-i", dev, "-p", "udp", "-j", "DROP", ns=ns)

    def _make_delay_line(self):
        """The path through a third namespace, where this file's delay-line tool (the kernel
        here has no netem) passes each Ethernet frame on after its own delay, `delay_line`
        (seconds, jitter): uniform in seconds +- jitter, so frames overtake each other. The
        hosts' ends send finished frames (no checksum or segmentation offload), which a packet
        socket can pass on as they are."""
        self.sh("ip", "netns", "add", self.ns_relay)
        self._namespaces.append(self.ns_relay)
        for ns, dev, relay_end in ((self.ns_client, self.veth_client, self.veth_relay[0]),
                                   (self.ns_server, self.veth_server, self.veth_relay[1])):
            self.sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name",
                    relay_end, "netns", self.ns_relay)
            self.sh("ip", "link", "set", relay_end, "up", ns=self.ns_relay)
            self.sh(self.python, os.path.abspath(__file__), "offloads-off", dev, ns=ns)
        seconds, jitter = self.delay_line
        self.spawn("delay-line", self.ns_relay, [
            self.python, os.path.abspath(__file__), "delay-line", self.veth_relay[0],
            self.veth_relay[1], "--delay", seconds, "--jitter", jitter])
        self.wait_log("delay-line", "delay line up")

    def _make_keys(self):
        for side in ("client", "server"):
            private = self.sh("wg", "genkey").strip()
            public = self.sh("wg", "pubkey", input=private + "\n").strip()
            path = os.path.join(self.workdir, "%s.key" % side)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(private + "\n")
            self.keys[side] = (path, public)

    def _make_certificates(self):
        """A test CA (self.ca_file) and a certificate for the server's veth address (IP SAN):
        workdir/tls/{ca,server}.{pem,key}."""
        directory = os.path.join(self.workdir, "tls")
        os.makedirs(directory, exist_ok=True)
        path = lambda name: os.path.join(directory, name)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self.sh("openssl", "req", "-x509", *ec, "-keyout", path("ca.key"), "-out", path("ca.pem"),
                "-days", "2", "-subj", "/CN=proxyguard test bed CA", timeout=60)
        with open(path("server.ext"), "w") as stream:
            stream.write("subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n"
                         "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
                         % VETH_SERVER_IP)
        self.sh("openssl", "req", *ec, "-keyout", path("server.key"), "-out", path("server.csr"),
                "-subj", "/CN=%s" % VETH_SERVER_IP, timeout=60)
        self.sh("openssl", "x509", "-req", "-in", path("server.csr"), "-CA", path("ca.pem"),
                "-CAkey", path("ca.key"), "-set_serial", random.getrandbits(63) + 1,
                "-days", "2", "-extfile", path("server.ext"), "-out", path("server.pem"),
                timeout=60)
        self.ca_file = path("ca.pem")

    def start_front_end(self):
        """Start nginx (front_end="nginx") in the server namespace, configured from scratch in
        workdir/nginx; its output in workdir/nginx.log."""
        directory = os.path.join(self.workdir, "nginx")
        os.makedirs(directory, exist_ok=True)
        tls = os.path.join(self.workdir, "tls")
        conf = os.path.join(directory, "nginx.conf")
        with open(conf, "w") as stream:
            stream.write(NGINX_CONF.format(
                dir=directory, listen="%s:%d" % (VETH_SERVER_IP, NGINX_PORT),
                cert=os.path.join(tls, "server.pem"), key=os.path.join(tls, "server.key"),
                backend="127.0.0.1:%d" % PG_SERVER_PORT))
        starts = self.log_text("nginx").count("==== ") + 1
        self.spawn("nginx", self.ns_server, ["nginx", "-p", directory, "-c", conf, "-e", "stderr"])
        # Logged once the listening socket is bound (nginx exits if it cannot bind).
        self.wait_log("nginx", "start worker process", count=starts)

    def kill_front_end(self, sig=signal.SIGKILL, timeout=5):
        """Signal nginx's whole process group (master and workers) and wait for the master
        (SIGKILL to the group after `timeout`)."""
        return self.send_signal("nginx", sig, timeout=timeout, group=True)

    def _side(self, side):
        if side == "client":
            return self.ns_client, self.wg_client, WG_CLIENT_IP, "server"
        return self.ns_server, self.wg_server, WG_SERVER_IP, "client"

    def start_wireguard(self, side):
        """Start wireguard-go on `side` ("client"/"server") and configure it from scratch."""
        ns, ifname, ip, other = self._side(side)
        name = "wg-" + side
        with contextlib.suppress(FileNotFoundError):  # stale socket of a killed wireguard-go
            os.unlink(os.path.join(WG_RUN_DIR, ifname + ".sock"))
        env = {"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error",
               # Only old releases refuse to run on Linux without it; harmless otherwise.
               "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        self.spawn(name, ns, ["wireguard-go", "-f", ifname], env=env)
        deadline = time.monotonic() + 10
        sock_path = os.path.join(WG_RUN_DIR, ifname + ".sock")
        while not os.path.exists(sock_path):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise BedError("wireguard-go %s did not start:\n%s"
                               % (ifname, self.log_text(name)))
            time.sleep(0.05)
        key_path, _ = self.keys[side]
        peer_public = self.keys[other][1]
        peer_ip = WG_SERVER_IP if side == "client" else WG_CLIENT_IP
        args = ["wg", "set", ifname, "listen-port", WG_PORT, "private-key", key_path,
                "peer", peer_public, "allowed-ips", peer_ip + "/32"]
        keepalive = self.client_keepalive if side == "client" else self.server_keepalive
        if keepalive:
            args += ["persistent-keepalive", keepalive]
        if side == "client":
            args += ["endpoint", "127.0.0.1:%d" % PG_CLIENT_PORT]
        self.sh(*args, ns=ns)
        self.sh("ip", "addr", "add", "%s/%d" % (ip, WG_PREFIX), "dev", ifname, ns=ns)
        if self.mtu:
            self.sh("ip", "link", "set", "dev", ifname, "mtu", self.mtu, ns=ns)
        self.sh("ip", "link", "set", ifname, "up", ns=ns)

    def kill_wireguard(self, side, sig=signal.SIGKILL):
        return self.send_signal("wg-" + side, sig)

    def restart_wireguard(self, side):
        """Kill wireguard-go on `side`, start it again and reconfigure it (same keys)."""
        self.kill_wireguard(side)
        ns, ifname, _, _ = self._side(side)
        deadline = time.monotonic() + 5  # the TUN device goes with its last fd
        while ifname in self.sh("ip", "-o", "link", "show", ns=ns, check=False):
            if time.monotonic() > deadline:
                raise BedError("%s still exists after wireguard-go died" % ifname)
            time.sleep(0.05)
        self.start_wireguard(side)

    def start_pg_server(self, wait=True, name="pg-server"):
        port = PG_SERVER_PORT + (name == "pg-server2")
        listen = "%s:%d" % ("127.0.0.1" if self.front_end else "0.0.0.0", port)
        to = "127.0.0.1:%d" % WG_PORT
        if self.pg_command is not None:
            argv, ready = self.pg_command.server_argv(listen, to), self.pg_command.server_ready
        else:
            argv = [self.python, self.proxyguard, "server", "--listen", listen,
                    "--to", to] + self._pg_options()
            ready = "listening on"
        self._start_pg(name, self.ns_server, argv, ready, wait)

    def start_pg_client(self, wait=True):
        if self.pg_command is not None:
            argv = self.pg_command.client_argv("http://%s:%d/" % (VETH_SERVER_IP, PG_SERVER_PORT),
                                               PG_CLIENT_PORT, WG_PORT)
            ready = self.pg_command.client_ready
        else:
            if self.front_end:
                to = ["--to", "%s://%s:%d/proxyguard" % ("wss" if self.websocket else "https",
                                                         VETH_SERVER_IP, NGINX_PORT),
                      "--ca-file", self.ca_file]
            else:
                to = []
                for index in range(self.pg_servers):
                    to += ["--to", "%s://%s:%d/" % ("ws" if self.websocket else "http",
                                                    VETH_SERVER_IP, PG_SERVER_PORT + index)]
            argv = [self.python, self.proxyguard, "client"] + to + [
                "--listen-port", PG_CLIENT_PORT, "--forward-port", WG_PORT] + self._pg_options()
            ready = "listening on"
        self._start_pg("pg-client", self.ns_client, argv, ready, wait)

    def _start_pg(self, name, ns, argv, ready, wait):
        # One more `ready` line than before this start (the log is appended to across restarts,
        # and may hold another implementation's lines).
        before = self.log_text(name).count(ready)
        self.spawn(name, ns, argv)
        if wait:
            self.wait_log(name, ready, count=before + 1)

    def _pg_options(self):
        options = list(self.pg_extra)
        if self.idle_timeout is not None:
            options += ["--idle-timeout", self.idle_timeout]
        return options

    def kill_pg_server(self, sig=signal.SIGKILL):
        return self.send_signal("pg-server", sig)

    def kill_pg_client(self, sig=signal.SIGKILL):
        return self.send_signal("pg-client", sig)

    def _cut_rules(self, port=None):
        # Inserted in this order, each at the top: new connections' SYNs are dropped (and
        # counted, see cut_syns) by the last rule.
        port = port or self.public_port
        return [("INPUT", "-p", "tcp", "--dport", port, "-j", "DROP"),
                ("OUTPUT", "-p", "tcp", "--sport", port, "-j", "DROP"),
                ("INPUT", "-p", "tcp", "--dport", port, "--syn", "-j", "DROP")]

    def cut_syns(self):
        """Connection attempts (SYNs, retries included) dropped by the cut so far."""
        table = self.sh("iptables", "-nvxL", "INPUT", ns=self.ns_server)
        for line in table.splitlines():
            if "flags:0x17/0x02" in line and "dpt:%d" % self.public_port in line:
                return int(line.split()[0])
        raise BedError("the cut's SYN rule is missing:\n" + table)

    def cut_path(self, port=None):
        """Drop the TCP port the client connects to on the server host (proxyguard's, or
        nginx's with a front end; or `port`), both ways (a silent black hole)."""
        for chain, *rule in self._cut_rules(port):
            self.sh("iptables", "-I", chain, *rule, ns=self.ns_server)
        self._cut = True

    def restore_path(self):
        for chain, *rule in self._cut_rules():
            self.sh("iptables", "-D", chain, *rule, ns=self.ns_server)
        self._cut = False

    def set_mtu(self, mtu):
        """Set the MTU of both WireGuard interfaces (kept across WireGuard restarts)."""
        self.mtu = mtu
        for ns, ifname in ((self.ns_client, self.wg_client), (self.ns_server, self.wg_server)):
            self.sh("ip", "link", "set", "dev", ifname, "mtu", mtu, ns=ns)

    def set_veth_mtu(self, mtu):
        """Set the MTU of the path between the hosts (the TCP that carries WireGuard)."""
        for ns, dev in ((self.ns_client, self.veth_client), (self.ns_server, self.veth_server)):
            self.sh("ip", "link", "set", "dev", dev, "mtu", mtu, ns=ns)

    # ----------------------------------------------------------------------------- traffic

    def ping(self, count=5, interval=0.2, timeout=2.0):
        """ICMP echo from the client's tunnel address to the server's, through WireGuard."""
        return self.agent(self.ns_client, "ping", WG_SERVER_IP, "--count", count,
                          "--interval", interval, "--timeout", timeout,
                          timeout=count * interval + timeout + 15)

    def start_ping_stream(self, interval=0.05, timeout=300):
        """Ping the server's tunnel address every `interval` s (background) until
        finish(proc) closes its stdin; its answer: {"pings": [[sent, answered or None]]}, in
        time.monotonic() seconds (one clock for every namespace)."""
        proc = subprocess.Popen(DIE_WITH_PARENT + [
            "ip", "netns", "exec", self.ns_client, self.python, os.path.abspath(__file__),
            "ping-stream", WG_SERVER_IP, "--interval", str(interval), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.procs["ping-stream"] = proc
        return proc

    def wait_ping(self, timeout=30.0, interval=0.2):
        """Ping every `interval` s until a reply; seconds until it came (from the call), or
        None after `timeout`. The agent's start-up time is counted in."""
        t0 = time.monotonic()
        answer = self.agent(self.ns_client, "wait-ping", WG_SERVER_IP, "--timeout", timeout,
                            "--interval", interval, timeout=timeout + 15)
        return time.monotonic() - t0 if answer["ok"] else None

    def start_sink(self, port=SINK_PORT, timeout=120):
        """A TCP receiver on the server's tunnel address (background); see finish. The bytes it
        has received so far: received(port)."""
        progress = os.path.join(self.workdir, "sink-%d.progress" % port)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(progress)
        proc = subprocess.Popen(DIE_WITH_PARENT + [
            "ip", "netns", "exec", self.ns_server, self.python, os.path.abspath(__file__),
            "sink", WG_SERVER_IP, str(port), "--timeout", str(timeout), "--progress", progress],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs["sink-%d" % port] = proc
        line = proc.stdout.readline()
        if "READY" not in line:
            proc.kill()
            raise BedError("sink did not start: %r %s" % (line, proc.stderr.read()))
        return proc

    def received(self, port=SINK_PORT):
        """Bytes the sink on `port` has received so far (updated every 256 KiB)."""
        try:
            with open(os.path.join(self.workdir, "sink-%d.progress" % port)) as stream:
                return int(stream.read() or 0)
        except FileNotFoundError:
            return 0

    def wait_received(self, nbytes, timeout=30, port=SINK_PORT, source=None):
        """Wait until the sink on `port` has received at least `nbytes`; BedError after
        `timeout` seconds, or if `source` (its sender) has ended before."""
        deadline = time.monotonic() + timeout
        while self.received(port) < nbytes:
            if source is not None and source.poll() is not None:
                raise BedError("the source ended (exit %s) after %d of %d bytes received"
                               % (source.returncode, self.received(port), nbytes))
            if time.monotonic() > deadline:
                raise BedError("the sink received %d of %d bytes in %ss\n%s"
                               % (self.received(port), nbytes, timeout, self.diagnose()))
            time.sleep(0.02)  # polling the sink's count, with a deadline
        return self.received(port)

    def start_source(self, nbytes=None, seconds=None, port=SINK_PORT, seed=1, timeout=120,
                     until_stopped=False):
        """A TCP sender to the sink (background); see finish. `until_stopped`: it sends until
        finish(proc) closes its stdin (at most `nbytes` if given), so it cannot end before a
        fault however fast the machine is."""
        args = [self.python, os.path.abspath(__file__), "source", WG_SERVER_IP, str(port),
                "--seed", str(seed), "--timeout", str(timeout)]
        if nbytes is not None:
            args += ["--bytes", str(nbytes)]
        if seconds is not None:
            args += ["--seconds", str(seconds)]
        if until_stopped:
            args += ["--until-eof"]
        proc = subprocess.Popen(DIE_WITH_PARENT + ["ip", "netns", "exec", self.ns_client] + args,
                                stdin=subprocess.PIPE if until_stopped else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.procs["source-%d" % port] = proc
        return proc

    @staticmethod
    def finish(proc, timeout):
        """Wait for an agent process; its JSON answer (or {"error": ...})."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return {"error": "timed out after %ss" % timeout, "stderr": err[-2000:]}
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": "exit %s" % proc.returncode, "stderr": err[-2000:]}
        return json.loads(lines[-1])

    def transfer(self, nbytes=50 << 20, seed=1, timeout=120):
        """Send `nbytes` of seeded random data over TCP through WireGuard, client -> server.

        Returns {"sent": source answer, "received": sink answer, "mbit_s": receiver's rate,
        "sha_ok": both SHA-256 equal}.
        """
        sink = self.start_sink(timeout=timeout)
        source = self.start_source(nbytes=nbytes, seed=seed, timeout=timeout)
        sent = self.finish(source, timeout + 10)
        received = self.finish(sink, timeout + 10)
        return self._result(sent, received)

    def throughput(self, seconds=5.0, mtu=None, timeout=60):
        """Mbit/s of one TCP stream through WireGuard for `seconds` (optionally at `mtu`)."""
        if mtu is not None:
            self.set_mtu(mtu)
        sink = self.start_sink(timeout=timeout)
        source = self.start_source(seconds=seconds, timeout=timeout)
        sent = self.finish(source, timeout + 10)
        received = self.finish(sink, timeout + 10)
        result = self._result(sent, received)
        if not result["sha_ok"]:
            raise BedError("timed transfer damaged: %s" % result)
        return result["mbit_s"]

    def measure_mtu(self, mtus, seconds=3.0, runs=3):
        """{mtu: [Mbit/s of each run]} for each WireGuard MTU in `mtus` (one TCP stream,
        `seconds` each). Figures on a shared 2-core machine vary by tens of percent between
        runs: compare medians of several runs. The MTU is left at the last value."""
        figures = {}
        for mtu in mtus:
            self.set_mtu(mtu)
            figures[mtu] = [self.throughput(seconds=seconds) for _ in range(runs)]
        return figures

    @staticmethod
    def _result(sent, received):
        ok = ("error" not in sent and "error" not in received
              and sent.get("sha256") == received.get("sha256")
              and sent.get("bytes") == received.get("bytes"))
        seconds = received.get("seconds") or 0
        mbit = received.get("bytes", 0) * 8 / seconds / 1e6 if seconds else 0.0
        return {"sent": sent, "received": received, "sha_ok": ok, "mbit_s": mbit}

    # ----------------------------------------------------------------------------- reports

    def tunnels_up(self, side):
        return self.log_text("pg-" + side).count("tunnel up")

    def tunnel_summaries(self, side):
        """The figures of every 'tunnel down' line of proxyguard on `side`: a list of dicts
        with seconds, to_wg_datagrams, to_wg_bytes, from_wg_datagrams, from_wg_bytes, reason."""
        found = []
        for match in TUNNEL_DOWN.finditer(self.log_text("pg-" + side)):
            found.append(dict(seconds=float(match.group(1)),
                              to_wg_datagrams=int(match.group(2)),
                              to_wg_bytes=int(match.group(3)),
                              from_wg_datagrams=int(match.group(4)),
                              from_wg_bytes=int(match.group(5)), reason=match.group(6)))
        return found

    def udp_counters(self, side):
        """The kernel's UDP counters in `side`'s namespace (/proc/net/snmp): InDatagrams,
        RcvbufErrors (datagrams dropped because a socket's receive buffer was full), ..."""
        ns = self.ns_client if side == "client" else self.ns_server
        lines = [line.split() for line in self.sh("cat", "/proc/net/snmp", ns=ns).splitlines()
                 if line.startswith("Udp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:])))

    def udp_socket_drops(self, side):
        """{"address:port": datagrams dropped} for each UDP socket in `side`'s namespace
        (/proc/net/udp): 0.0.0.0:51820 is WireGuard's, 127.0.0.1:51821 proxyguard client's,
        127.0.0.1:<other> a proxyguard server tunnel's."""
        ns = self.ns_client if side == "client" else self.ns_server
        drops = {}
        for line in self.sh("cat", "/proc/net/udp", ns=ns).splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            ip = socket.inet_ntoa(struct.pack("<I", int(address, 16)))
            drops["%s:%d" % (ip, int(port, 16))] = int(fields[-1])
        return drops

    def wg_transfer(self, side):
        """(received bytes, sent bytes) of `side`'s WireGuard peer, as `wg show transfer`."""
        ns, ifname, _, _ = self._side(side)
        fields = self.sh("wg", "show", ifname, "transfer", ns=ns).split()
        return int(fields[1]), int(fields[2])

    def diagnose(self):
        """wg show on both sides and the tails of every log, for a failure message."""
        parts = []
        for ns, ifname in ((self.ns_client, self.wg_client), (self.ns_server, self.wg_server)):
            with contextlib.suppress(Exception):
                parts.append("== wg show %s\n%s" % (ifname, self.sh("wg", "show", ifname, ns=ns,
                                                                     check=False)))
        for name in sorted(self.procs):
            if name.startswith(("pg-", "wg-", "nginx")):
                parts.append("== %s.log (tail)\n%s" % (name, self.log_text(name)[-2500:]))
        return "\n".join(parts)

    # ----------------------------------------------------------------------------- teardown

    def close(self):
        """Kill every process this bed started (by process group: each started a session of
        its own, so nginx's workers go too), delete its namespaces and sockets."""
        if self.front_end:  # SIGTERM first: nginx's master then reaps its workers itself
            with contextlib.suppress(Exception):
                self.kill_front_end(signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:  # not reaped: its PID (= group ID) is still ours
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(5)
        for log_file in self._logs.values():
            with contextlib.suppress(OSError):
                log_file.close()
        self._logs.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        self._namespaces = []
        for ifname in (self.wg_client, self.wg_server):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(WG_RUN_DIR, ifname + ".sock"))


# =============================================================================================
# Traffic tools: this file as a program inside a namespace
# =============================================================================================


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo over a raw socket (root); replies matched by identifier and sequence."""

    def __init__(self, destination):
        self.destination = destination
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.ident = (os.getpid() ^ random.getrandbits(16)) & 0xFFFF
        self.sent = {}  # sequence -> monotonic send time

    def send(self, sequence):
        payload = struct.pack("!d", time.monotonic()) + b"proxyguard-wgbed" * 3
        header = struct.pack("!BBHHH", 8, 0, 0, self.ident, sequence & 0xFFFF)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self.ident,
                             sequence & 0xFFFF) + payload
        self.sent[sequence & 0xFFFF] = time.monotonic()
        try:
            self.sock.sendto(packet, (self.destination, 0))
        except OSError:  # no route while the interface is down: counts as lost
            pass

    def receive(self, timeout):
        """(sequence, rtt seconds) of one of our replies within `timeout`, or None."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                return None
            header_len = (data[0] & 0x0F) * 4
            icmp_type, _, _, ident, sequence = struct.unpack(
                "!BBHHH", data[header_len:header_len + 8])
            if icmp_type == 0 and ident == self.ident and sequence in self.sent:
                return sequence, time.monotonic() - self.sent[sequence]


ETH_P_ALL = 3
PACKET_OUTGOING = 4  # a packet socket's own sends, seen again: not passed on
SIOCETHTOOL = 0x8946
# Legacy ethtool set commands (linux/ethtool.h): TX checksum, TSO, GSO, GRO.
ETHTOOL_OFFLOADS = {"tx-checksum": 0x17, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}


def tool_offloads_off(args):
    """Turn checksum and segmentation offloads off on a device (what `ethtool -K DEV tx off
    tso off gso off gro off` does; no ethtool here): its frames then leave whole, with their
    checksums, and a packet socket that forwards them passes on valid frames."""
    import ctypes
    import fcntl
    done = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name, command in ETHTOOL_OFFLOADS.items():
            value = ctypes.create_string_buffer(struct.pack("II", command, 0))
            request = struct.pack("16sP", args.device.encode(), ctypes.addressof(value))
            try:
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
                done.append(name)
            except OSError:
                if name == "tx-checksum":
                    raise
    return {"device": args.device, "off": done}


def tool_delay_line(args):
    """Bridge two devices through packet sockets, every frame delayed by its own uniform
    delay in [delay - jitter, delay + jitter] (so frames are reordered, as netem with jitter
    does); runs until killed."""
    import heapq
    sockets = []
    for device in (args.a, args.b):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
        sock.bind((device, ETH_P_ALL))
        sock.setblocking(False)
        sockets.append(sock)
    other = {sockets[0].fileno(): sockets[1], sockets[1].fileno(): sockets[0]}
    by_fd = {sock.fileno(): sock for sock in sockets}
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN)
    rng = random.Random(args.seed)
    low, high = args.delay - args.jitter, args.delay + args.jitter
    queue = []  # (due, sequence, socket to send on, frame)
    sequence = itertools.count()
    print("delay line up: %s <-> %s, %g s +- %g s" % (args.a, args.b, args.delay, args.jitter),
          flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, sock, frame = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                sock.send(frame)
        wait = (queue[0][0] - now) * 1000 if queue else -1
        for fd, _ in poller.poll(max(0, wait) if queue else None):
            source, target = by_fd[fd], other[fd]
            while True:
                try:
                    frame, address = source.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                heapq.heappush(queue, (time.monotonic() + rng.uniform(low, high),
                                       next(sequence), target, frame))


def tool_ping(args):
    pinger = Pinger(args.destination)
    rtts = []
    received = set()
    # The longest time without a reply (from the start, between replies, to the last send's
    # interval end; not the wait for late replies): a fault's interruption, to an interval.
    start = last = time.monotonic()
    largest_gap = 0.0
    for sequence in range(args.count):
        pinger.send(sequence)
        deadline = time.monotonic() + (args.interval if sequence < args.count - 1
                                       else args.timeout)
        while True:
            reply = pinger.receive(max(0.0, deadline - time.monotonic()))
            if reply is None:
                break
            if reply[0] not in received:
                received.add(reply[0])
                rtts.append(reply[1] * 1000)
                now = time.monotonic()
                largest_gap, last = max(largest_gap, now - last), now
            if len(received) == args.count:
                break
    sending_ended = pinger.sent[(args.count - 1) & 0xFFFF] + args.interval
    largest_gap = max(largest_gap, sending_ended - last)
    return {"sent": args.count, "received": len(received), "rtt_ms": [round(r, 3) for r in rtts],
            "largest_gap_s": round(largest_gap, 3), "seconds": round(time.monotonic() - start, 3)}


def tool_wait_ping(args):
    pinger = Pinger(args.destination)
    t0 = time.monotonic()
    sequence = 0
    while time.monotonic() - t0 < args.timeout:
        pinger.send(sequence)
        sequence += 1
        reply = pinger.receive(min(args.interval, max(0.0, args.timeout - (time.monotonic() - t0))))
        if reply is not None:
            return {"ok": True, "seconds": round(time.monotonic() - t0, 3), "sent": sequence}
        # receive() returns early only on a reply, so each round is one interval long
    return {"ok": False, "seconds": round(time.monotonic() - t0, 3), "sent": sequence}


def tool_ping_stream(args):
    """Ping every `interval` s until stdin ends (or `timeout`); every ping's send and answer
    times, for the gaps of a fault."""
    import threading  # only here: the stdin watcher
    pinger = Pinger(args.destination)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    pings = []  # [sent, answered or None], by sequence
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < args.timeout:
        pinger.send(len(pings))
        pings.append([time.monotonic(), None])
        due = pings[-1][0] + args.interval
        while time.monotonic() < due:
            reply = pinger.receive(max(0.0, due - time.monotonic()))
            if reply is not None and reply[0] < len(pings) and pings[reply[0]][1] is None:
                pings[reply[0]][1] = time.monotonic()
    return {"pings": pings}


def _write_progress(path, total):
    """Replace the file at `path` with the byte count `total` (read by WireGuardBed.received)."""
    with open(path + ".tmp", "w") as stream:
        stream.write("%d\n" % total)
    os.replace(path + ".tmp", path)


def tool_sink(args):
    listener = socket.create_server((args.address, args.port), reuse_port=False)
    listener.settimeout(args.timeout)
    print("READY", flush=True)
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(args.timeout)
    digest = hashlib.sha256()
    total = 0
    first = None
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    reported = 0
    while True:
        n = conn.recv_into(buffer)
        if not n:
            break
        if first is None:
            first = time.monotonic()
        digest.update(view[:n])
        total += n
        if args.progress and total - reported >= 256 << 10:
            _write_progress(args.progress, total)
            reported = total
    end = time.monotonic()
    if args.progress:
        _write_progress(args.progress, total)
    conn.close()
    return {"bytes": total, "sha256": digest.hexdigest(),
            "seconds": round(end - first, 4) if first else 0}


def tool_source(args):
    rng = random.Random(args.seed)
    block = 1 << 20
    digest = hashlib.sha256()
    deadline = time.monotonic() + args.timeout
    sock = None
    while sock is None:  # the sink may still be starting
        try:
            sock = socket.create_connection((args.address, args.port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.settimeout(args.timeout)
    t0 = time.monotonic()
    total = 0
    while True:
        if args.until_eof and select.select([sys.stdin], [], [], 0)[0]:
            if not os.read(sys.stdin.fileno(), 4096):
                break  # the one who started us says: enough
        if args.bytes is not None:
            size = min(block, args.bytes - total)
            if size <= 0:
                break
        elif args.until_eof:
            size = block
        else:
            if time.monotonic() - t0 >= args.seconds:
                break
            size = block
        data = rng.randbytes(size)
        sock.sendall(data)
        digest.update(data)
        total += size
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the sink to close: everything arrived
    sock.close()
    return {"bytes": total, "sha256": digest.hexdigest(),
            "seconds": round(time.monotonic() - t0, 4)}


# =============================================================================================
# The MTU study: this file as a program, from a shell
# =============================================================================================


def run_bed_study(args, prefix, study, **bed_options):
    """Build a bed, run `study(bed, log)` on it, and tear the bed down on any exit (Ctrl-C and
    SIGTERM too); its logs are kept when the study failed. Returns the exit status."""
    # SIGTERM ends the study like Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    log = lambda text: print(text, file=sys.stderr, flush=True)
    bed = WireGuardBed(workdir, log=log, **bed_options)
    ok = False
    try:
        bed.start()
        study(bed, log)
        ok = True
    except KeyboardInterrupt:
        log("interrupted: tearing the bed down")
        return 130
    except BedError as exc:
        log("bed error: %s\n%s" % (exc, bed.diagnose()))
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bed.close()
        if ok and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            log("logs kept in %s" % workdir)
    return 0


def run_mtu_study(args):
    """Build a bed (plain, or nginx with TLS in front), measure TCP throughput through WireGuard
    at each MTU, print a table."""
    reason = WireGuardBed.unavailable(args.front_end)
    if reason:
        print("cannot run the bed here: %s" % reason, file=sys.stderr)
        return 2

    def study(bed, _log):
        print("WireGuard TCP throughput through proxyguard.py (%s), one stream, %gs a run, "
              "%d run(s) per MTU" % ("nginx with TLS in front" if args.front_end else "plain HTTP",
                                    args.seconds, args.runs), flush=True)
        print("%6s  %14s  %s" % ("MTU", "median Mbit/s", "runs (Mbit/s)"), flush=True)
        for mtu in args.mtus:
            runs = bed.measure_mtu([mtu], seconds=args.seconds, runs=args.runs)[mtu]
            print("%6d  %14.1f  %s" % (mtu, statistics.median(runs),
                                       " ".join("%.1f" % value for value in runs)), flush=True)

    return run_bed_study(args, "pgbed-mtu-", study, front_end=args.front_end)


# =============================================================================================
# Side by side with the original: this file as a program, from a shell
# =============================================================================================

IPERF_PORT = 5202  # iperf3's server on the server's tunnel address (SINK_PORT is the sink's)


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def iperf_mbit(bed, seconds, reverse=False):
    """Mbit/s of one iperf3 TCP stream through WireGuard, client -> server (`reverse`: server
    -> client, iperf3 -R), as the receiver counted it."""
    argv = ["iperf3", "-c", WG_SERVER_IP, "-p", IPERF_PORT, "-t", seconds, "-J"]
    out = bed.sh(*argv + (["-R"] if reverse else []), ns=bed.ns_client, timeout=seconds + 30)
    answer = json.loads(out)
    if "sum_received" not in answer.get("end", {}):  # an error only (e.g. no connection)
        raise BedError("iperf3 gave no figure: %s" % answer.get("error", out[-500:]))
    return answer["end"]["sum_received"]["bits_per_second"] / 1e6


def switch_pair(bed, pg_command):
    """Replace the running proxyguard client and server by `pg_command`'s (None: proxyguard.py);
    namespaces and WireGuard stay up. Returns when a ping goes through the new pair."""
    bed.kill_pg_client()
    bed.kill_pg_server()
    bed.pg_command = pg_command
    bed.start_pg_server()
    bed.start_pg_client()
    if bed.wait_ping(timeout=20) is None:
        raise BedError("no ping through the new pair in 20 s\n" + bed.diagnose())


def _udp_drops(bed):
    """{(side, "address:port"): datagrams dropped} for every UDP socket of both namespaces."""
    return {(side, address): count for side in ("client", "server")
            for address, count in bed.udp_socket_drops(side).items()}


def measure_pair(bed, seconds, pings):
    """One run's figures through the running pair, with the datagrams the kernel dropped for a
    full receive buffer meanwhile: in the pair's UDP sockets, and in the two WireGuards'."""
    before = _udp_drops(bed)
    ping = bed.ping(count=pings, interval=0.02, timeout=2.0)
    rtts = ping["rtt_ms"] or [float("nan")]
    figures = {"up": iperf_mbit(bed, seconds), "down": iperf_mbit(bed, seconds, reverse=True),
               "ping_p50": statistics.median(rtts), "ping_p90": _percentile(rtts, 0.9),
               "lost": ping["sent"] - ping["received"], "pair_drops": 0, "wg_drops": 0}
    for key, count in _udp_drops(bed).items():
        kind = "wg_drops" if key[1] == "0.0.0.0:%d" % WG_PORT else "pair_drops"
        figures[kind] += count - before.get(key, 0)
    return figures


COMPARE_ROWS = (  # key, label, unit, higher is better
    ("up", "TCP client->server", "Mbit/s", True),
    ("down", "TCP server->client (-R)", "Mbit/s", True),
    ("ping_p50", "ping median", "ms", False),
    ("ping_p90", "ping p90", "ms", False),
)


def format_compare(results, py_label, go_label):
    """The table: medians of the runs per figure, and the ratio (above 1: proxyguard.py better)."""
    lines = ["%-24s %14s %14s %8s   %s" % ("median of runs", py_label, go_label, "ratio",
                                          "runs (py | Go)")]
    for key, label, unit, higher in COMPARE_ROWS:
        py = statistics.median(run[key] for run in results["py"])
        go = statistics.median(run[key] for run in results["go"])
        ratio = py / go if higher else go / py
        lines.append("%-24s %14s %14s %8s   %s | %s" % (
            label, "%.1f %s" % (py, unit) if higher else "%.3f %s" % (py, unit),
            "%.1f %s" % (go, unit) if higher else "%.3f %s" % (go, unit),
            "%.2f" % ratio,
            " ".join(("%.0f" if higher else "%.3f") % run[key] for run in results["py"]),
            " ".join(("%.0f" if higher else "%.3f") % run[key] for run in results["go"])))
    total = lambda side, key: sum(run[key] for run in results[side])
    lines.append("ratio: py/Go for throughput, Go/py for ping; above 1 = proxyguard.py better")
    lines.append("all runs: pings lost py %d, Go %d; UDP datagrams dropped (receive buffer "
                 "full) in the pair's sockets py %d, Go %d, in WireGuard's py %d, Go %d"
                 % (total("py", "lost"), total("go", "lost"), total("py", "pair_drops"),
                    total("go", "pair_drops"), total("py", "wg_drops"), total("go", "wg_drops")))
    return "\n".join(lines)


def comparison_sides(python):
    """(proxyguard.py run by `python`, the original) as proxyguard_bench sides, for a side by
    side in the bed with iperf3; None, having said why, if the bed or the original cannot run
    here."""
    reason = WireGuardBed.unavailable() or (None if shutil.which("iperf3") else "no iperf3")
    if reason:
        print("cannot run the bed here: %s" % reason, file=sys.stderr)
        return None
    sys.path.insert(0, HERE)
    import proxyguard_bench as bench  # the Go build and its argv: one place for both tools
    try:
        bindir, go_version = bench.build_go(bench.REFERENCE)
    except bench.NoReference as exc:
        print("cannot run the original: %s" % exc, file=sys.stderr)
        return None
    return bench.PythonSide(DEFAULT_PROXYGUARD, python), bench.GoSide(bindir, go_version)


def start_iperf_server(bed):
    bed.spawn("iperf3", bed.ns_server, ["iperf3", "-s", "-B", WG_SERVER_IP, "-p", IPERF_PORT,
                                        "--forceflush"])
    bed.wait_log("iperf3", "Server listening")


def run_compare(args):
    """One bed; for each of `runs` rounds, proxyguard.py's pair then the original Go pair
    (only the proxyguard processes restarted), each measured with iperf3 both ways and a ping
    burst through WireGuard; print the table of medians and the ratios."""
    sides = comparison_sides(args.python)
    if sides is None:
        return 2
    py, go = sides

    def study(bed, log):
        start_iperf_server(bed)
        print("Real WireGuard (wireguard-go both ends) through each pair, plain HTTP, one bed; "
              "%d alternating run(s) per pair; iperf3 one TCP stream %gs each way; %d pings "
              "at 0.02 s" % (args.runs, args.seconds, args.pings), flush=True)
        print("  py: %s" % py.describe(), flush=True)
        print("  Go: %s" % go.describe(), flush=True)
        results = {"py": [], "go": []}
        for run in range(args.runs):
            for key, command in (("py", None), ("go", go)):
                switch_pair(bed, command)
                figures = measure_pair(bed, args.seconds, args.pings)
                results[key].append(figures)
                log("run %d %s: %.0f / %.0f Mbit/s, ping %.3f / %.3f ms, %d lost, drops %d "
                    "pair %d WireGuard" % (run + 1, key, figures["up"], figures["down"],
                                           figures["ping_p50"], figures["ping_p90"],
                                           figures["lost"], figures["pair_drops"],
                                           figures["wg_drops"]))
        print(format_compare(results, "proxyguard.py", go.label), flush=True)

    return run_bed_study(args, "pgbed-cmp-", study, python=args.python)


# =============================================================================================
# A bad network: loss, delay with reordering, a cut under traffic; both pairs side by side
# =============================================================================================


def _loss_rules(bed, probability):
    """iptables rules that drop `probability` of the path's TCP segments, each way."""
    match = ["-m", "statistic", "--mode", "random", "--probability", probability, "-j", "DROP"]
    return [["INPUT", "-p", "tcp", "--dport", bed.public_port] + match,
            ["OUTPUT", "-p", "tcp", "--sport", bed.public_port] + match]


def set_loss(bed, probability, on=True):
    for rule in _loss_rules(bed, probability):
        bed.sh("iptables", "-I" if on else "-D", *rule, ns=bed.ns_server)


def measure_cut(bed, cut, timeout=60.0):
    """A bulk TCP stream through WireGuard, the path cut for `cut` seconds under it, then
    restored: seconds from the path's return until a ping through WireGuard is answered, and
    until the stream's bytes move again (its TCP's own retransmission back-off counts
    there), or None if not within `timeout`; and whether the proxyguard client still runs."""
    sink = bed.start_sink(timeout=cut + timeout + 60)
    source = bed.start_source(until_stopped=True, timeout=cut + timeout + 60)
    try:
        bed.wait_received(bed.received() + (1 << 20), timeout=30, source=source)
        bed.cut_path()
        time.sleep(cut)  # scenario: the path stays away this long
        before = bed.received()
        bed.restore_path()
        restored = time.monotonic()
        ping = bed.wait_ping(timeout=timeout, interval=0.1)
        flowing = None
        while time.monotonic() - restored < timeout:
            if bed.received() > before:
                flowing = time.monotonic() - restored
                break
            time.sleep(0.05)  # polling the sink's count, with a deadline
        return {"cut_ping_s": ping, "cut_data_s": flowing,
                "client_alive": bed.procs["pg-client"].poll() is None}
    finally:
        if bed._cut:
            bed.restore_path()
        bed.finish(source, 30)  # closes its stdin: it stops
        bed.finish(sink, 30)


BADNET_ROWS = (  # condition, key, label, unit, higher is better
    ("clean", "up", "clean: TCP up", "Mbit/s", True),
    ("clean", "down", "clean: TCP down", "Mbit/s", True),
    ("clean", "ping_p50", "clean: ping p50", "ms", False),
    ("loss", "up", "loss: TCP up", "Mbit/s", True),
    ("loss", "down", "loss: TCP down", "Mbit/s", True),
    ("loss", "ping_p50", "loss: ping p50", "ms", False),
    ("delay", "up", "delay: TCP up", "Mbit/s", True),
    ("delay", "down", "delay: TCP down", "Mbit/s", True),
    ("delay", "ping_p50", "delay: ping p50", "ms", False),
    ("cut", "cut_ping_s", "cut: ping back after", "s", False),
    ("cut", "cut_data_s", "cut: data moves after", "s", False),
)


def format_badnet(results, py_label, go_label):
    """The table: per condition and figure, medians of the runs, the ratio (above 1:
    proxyguard.py better) and the runs."""
    lines = ["%-24s %13s %13s %7s   %s" % ("median of runs", py_label, go_label, "ratio",
                                         "runs (py | Go)")]
    for condition, key, label, unit, higher in BADNET_ROWS:
        runs = {side: [run[key] for run in results.get((condition, side), ())]
                for side in ("py", "go")}
        if not runs["py"] and not runs["go"]:
            continue
        medians = {}
        for side, values in runs.items():
            # A cut the pair never came back from counts as the worst (None: not in time).
            known = [value for value in values if value is not None]
            medians[side] = (statistics.median(known) if len(known) * 2 > len(values)
                             else None)
        py, go = medians["py"], medians["go"]
        ratio = "%.2f" % (py / go if higher else go / py) if py and go else "-"
        fmt = "%.1f" if unit == "Mbit/s" else "%.3f" if unit == "ms" else "%.2f"
        show = lambda value: "-" if value is None else fmt % value
        lines.append("%-24s %13s %13s %7s   %s | %s" % (
            label, show(py) + " " + unit, show(go) + " " + unit, ratio,
            " ".join(show(value) for value in runs["py"]),
            " ".join(show(value) for value in runs["go"])))
    alive = [run["client_alive"] for (condition, side), runs in results.items()
             if condition == "cut" for run in runs]
    lines.append("ratio: py/Go for throughput, Go/py for times; above 1 = proxyguard.py better")
    if alive:
        lines.append("after every cut the proxyguard client was still running: %s"
                     % ("yes" if all(alive) else "NO"))
    return "\n".join(lines)


def run_badnet(args):
    """Two beds, one after the other: the plain one (a clean path; `loss` of the path's TCP
    segments dropped each way by iptables; a `cut` under traffic), then one whose path runs
    through the delay line (`delay` +- `jitter` each way, reordered). In each, the pairs
    alternate run by run (switch_pair), measured with iperf3 both ways and pings."""
    sides = comparison_sides(args.python)
    if sides is None:
        return 2
    py, go = sides
    results = {}  # (condition, "py"|"go") -> [figures of each run]
    pings = 30

    def each_pair(bed, log, condition, measure):
        if condition not in args.conditions:
            return
        for run in range(args.runs):
            pairs = (("py", None), ("go", go)) if run % 2 == 0 else (("go", go), ("py", None))
            for key, command in pairs:
                switch_pair(bed, command)
                figures = measure()
                results.setdefault((condition, key), []).append(figures)
                log("run %d %s %s: %s" % (run + 1, key, condition, json.dumps(figures)))

    def plain_study(bed, log):
        start_iperf_server(bed)
        each_pair(bed, log, "clean", lambda: measure_pair(bed, args.seconds, pings))
        set_loss(bed, args.loss)
        try:
            each_pair(bed, log, "loss", lambda: measure_pair(bed, args.seconds, pings))
        finally:
            set_loss(bed, args.loss, on=False)
        each_pair(bed, log, "cut", lambda: measure_cut(bed, args.cut))

    def delay_study(bed, log):
        start_iperf_server(bed)
        each_pair(bed, log, "delay", lambda: measure_pair(bed, args.seconds + 3, pings))

    print("A bad path: real WireGuard (wireguard-go both ends) through each pair, plain HTTP; "
          "%d alternating run(s) per pair and condition; iperf3 one TCP stream %gs each way "
          "(%gs with the delay), %d pings at 0.02 s" % (args.runs, args.seconds,
                                                          args.seconds + 3, pings), flush=True)
    print("  loss: %g %% of the path's TCP segments dropped each way (iptables statistic)"
          % (100 * args.loss), flush=True)
    print("  delay: %g ms +- %g ms each way, reordering (a userspace delay line; the kernel "
          "has no netem)" % (1000 * args.delay, 1000 * args.jitter), flush=True)
    print("  cut: the path dropped both ways for %gs under a bulk TCP stream" % args.cut,
          flush=True)
    print("  py: %s" % py.describe(), flush=True)
    print("  Go: %s" % go.describe(), flush=True)
    status = 0
    if {"clean", "loss", "cut"} & set(args.conditions):
        status = run_bed_study(args, "pgbed-bad-", plain_study, python=args.python)
    if status == 0 and "delay" in args.conditions:
        status = run_bed_study(args, "pgbed-bad-", delay_study, python=args.python,
                               delay_line=(args.delay, args.jitter))
    print(format_badnet(results, "proxyguard.py", go.label), flush=True)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="wgbed: traffic tools (run inside a netns by the bed), the MTU study "
                    "(`mtu`) and the side by side with the original (`compare`), run as root "
                    "from a shell")
    sub = parser.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("mtu", help="TCP throughput through WireGuard+proxyguard per MTU")
    p.add_argument("--mtus", default="1280,1320,1360,1380,1400,1420",
                   type=lambda text: [int(item) for item in text.split(",") if item.strip()],
                   help="WireGuard MTUs, comma-separated (default %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of a run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="runs per MTU (default 3)")
    p.add_argument("--tls", dest="front_end", action="store_const", const="nginx",
                   help="put nginx with TLS in front of the proxyguard server")
    p.add_argument("--workdir", help="keep the bed's logs here (default: a temporary directory, "
                                     "removed after a successful run)")
    p = sub.add_parser("compare", help="real WireGuard through proxyguard.py's pair and the "
                                       "original Go pair, alternating runs")
    p.add_argument("--runs", type=int, default=5, help="runs per pair (default 5)")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="length of each iperf3 run (default 4)")
    p.add_argument("--pings", type=int, default=50, help="pings per run, 0.02 s apart "
                                                        "(default 50)")
    p.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                   else sys.executable,
                   help="the interpreter that runs proxyguard.py (default %(default)s)")
    p.add_argument("--workdir", help="keep the bed's logs here (default: a temporary directory, "
                                     "removed after a successful run)")
    p = sub.add_parser("badnet", help="real WireGuard and iperf3 through proxyguard.py's pair "
                                      "and the original's on a bad path: loss, delay with "
                                      "reordering, a cut under traffic; prints the table")
    p.add_argument("--runs", type=int, default=2, help="runs per pair and path (default 2)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="length of each iperf3 run (default 5; 3 more with the delay)")
    p.add_argument("--loss", type=float, default=0.01,
                   help="share of the path's TCP segments dropped, each way (default 0.01)")
    p.add_argument("--delay", type=float, default=0.1, help="one-way delay, s (default 0.1)")
    p.add_argument("--jitter", type=float, default=0.01, help="+- s (default 0.01)")
    p.add_argument("--cut", type=float, default=20.0, help="length of the cut, s (default 20)")
    p.add_argument("--conditions", default="clean,loss,cut,delay",
                   type=lambda text: [item.strip() for item in text.split(",")],
                   help="which paths to measure (default %(default)s)")
    p.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                   else sys.executable,
                   help="the interpreter that runs proxyguard.py (default %(default)s)")
    p.add_argument("--workdir", help="keep the beds' logs here")
    p = sub.add_parser("offloads-off")
    p.add_argument("device")
    p = sub.add_parser("delay-line")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--delay", type=float, default=0.1)
    p.add_argument("--jitter", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("ping")
    p.add_argument("destination")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("ping-stream")
    p.add_argument("destination")
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("wait-ping")
    p.add_argument("destination")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=0.2)
    for name in ("sink", "source"):
        p = sub.add_parser(name)
        p.add_argument("address")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=120.0)
        if name == "sink":
            p.add_argument("--progress", help="keep the byte count received so far in this file")
        if name == "source":
            p.add_argument("--until-eof", action="store_true",
                           help="send until stdin ends (--bytes: at most that many)")
            p.add_argument("--bytes", type=int)
            p.add_argument("--seconds", type=float, default=5.0)
            p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tool == "mtu":
        return run_mtu_study(args)
    if args.tool == "compare":
        return run_compare(args)
    if args.tool == "badnet":
        return run_badnet(args)
    if args.tool == "delay-line":
        return tool_delay_line(args)
    tool = {"ping": tool_ping, "wait-ping": tool_wait_ping, "sink": tool_sink,
            "ping-stream": tool_ping_stream, "source": tool_source,
            "offloads-off": tool_offloads_off}[args.tool]
    print(json.dumps(tool(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
