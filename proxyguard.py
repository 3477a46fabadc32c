#!/usr/bin/env python3
"""proxyguard.py: carry WireGuard's UDP over one HTTP(S) connection (ProxyGuard, UoTLV/1).

One file, standard library plus `configargparse` (optional: without it, command-line options
still work). Interoperates byte for byte with the original Go ProxyGuard. Modes: client,
server, check, up (an eduVPN profile in, a VPN up); `main(argv)` runs them.

Wire format (README; the ProxyGuard technical document):
    client -> server   GET <path> HTTP/1.1 / Host / Connection: Upgrade / Upgrade: UoTLV/1
    server -> client   HTTP/1.1 101 Switching Protocols / Connection: Upgrade / Upgrade: UoTLV/1
    then, both ways    frames of [2-byte big-endian length][one UDP datagram]
or, through fronts that pass only WebSocket (ws://, wss://; one server listener takes both):
RFC 6455 with the subprotocol `proxyguard-uotlv` (each binary message carries whole UoTLV/1
frames: a batch of datagrams) or `proxyguard-udp` (one binary message per datagram).

Threads: blocking sockets. A tunnel is a Channel (TCP, plain or TLS) and a UDP endpoint joined
by two pumps, one daemon thread each; the first to stop closes the tunnel, and the thread that
ran it joins the other before anything is closed. The server has one accept thread and a
thread per connection (handshake, then the TCP->UDP pump); the client one connector thread per
peer. Signals are taken by one thread (sigwait); metrics and systemd have one thread each.

Sections, in order (each banner says what lives there and what it may use):
    constants; errors; pure protocol (frames, HTTP heads, addresses, WebSocket, profiles; no
    I/O); policies (Deadline, IdleClock, Backoff, ServerChoice, RouteTable...; no I/O, a fake
    clock in tests); sockets and error text; TLS; channels; UDP endpoints; tunnel pumps
    (framing objects, Tunnel); server; client (and up: ClientGroup, WgQuick); metrics; service
    runtime (signals, systemd); CLI; main(argv).
Classes take their sockets and policies as arguments (`Server.open`, `Client.open` make them
from the options), so tests run Server, Client and Tunnel in-process over socketpairs.
"""

import argparse
import base64
import collections
import contextlib
import contextvars
import errno
import functools
import ipaddress
import itertools
import logging
import mmap
import os
import platform
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus

try:  # optional: config files and environment variables (see build_parser)
    import configargparse
except ImportError:  # a router without pip: command-line options still work
    configargparse = None

# Python's ssl module, imported at the first TLS use (see tls()): OpenWrt ships it apart
# (python3-openssl), and a plain http:// router must run without it.
ssl = None

try:  # POSIX only: the open-files limit (_raise_open_files_limit)
    import resource
except ImportError:
    resource = None

__version__ = "0.1.0"

log = logging.getLogger("proxyguard")


# =============================================================================================
# Constants
# Protocol words, sizes, timeouts and defaults, each with why it has its value. Plain
# values only (no code runs here), so every section below may use them.
# =============================================================================================

PROTOCOL = "UoTLV/1"

# The second transport: RFC 6455 WebSocket, for the fronts that
# pass no other Upgrade (cloud load balancers, CDNs, Apache's upgrade=websocket). The client
# offers two subprotocols and the server echoes the one it takes, so a client can tell a
# proxyguard server from any other WebSocket endpoint:
#     proxyguard-uotlv  each binary message carries one or more whole UoTLV/1 frames: the
#                       datagrams one pump read at once, so one header and one masking XOR
#                       serve them all (preferred: UoTLV/1's cost per datagram);
#     proxyguard-udp    one binary message per datagram (proxyguard.py's first WebSocket
#                       version, and any WebSocket peer that offers it or nothing).
WEBSOCKET = "websocket"
WEBSOCKET_SUBPROTOCOL = "proxyguard-udp"
WEBSOCKET_BATCH_SUBPROTOCOL = "proxyguard-uotlv"
WEBSOCKET_SUBPROTOCOLS = (WEBSOCKET_BATCH_SUBPROTOCOL, WEBSOCKET_SUBPROTOCOL)  # preferred first
WEBSOCKET_VERSION = "13"

# Fronts cut upgraded connections that stay quiet (AWS ALB 60 s, Heroku 55 s, Cloudflare 100 s,
# nginx's proxy_read_timeout 60 s): the client pings after this long without traffic.
DEFAULT_KEEPALIVE = 25.0
TRANSPORTS = (PROTOCOL, WEBSOCKET)
TRANSPORT_LABELS = {PROTOCOL: "uotlv", WEBSOCKET: "websocket"}  # the metrics' label values
DEFAULT_ROUTE = "default"  # the route name of the server's --to beside --route (no path: no clash)

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

# The client's TCP_USER_TIMEOUT (failover; a cut path): a tunnel whose sent
# data stays unacknowledged this long is dead (a server silently gone, a path cut), and the
# client connects afresh (to its next server, if it has one) instead of waiting for TCP's own
# retransmissions, which back off to minutes. WireGuard always sends under traffic (data,
# keepalives, handshakes), so its own datagrams are the probe: UoTLV/1 needs no ping, and an
# idle tunnel has nothing to lose. It is PATH_DOWN_RTOS times the connection's retransmission
# timeout (RTO, from TCP_INFO once connected), at least PATH_DOWN_SECONDS: a segment's
# retransmissions on the timer go at 1, 3 and 7 RTOs, so by 8 RTOs a segment and its three
# retransmissions must all have been lost before the client gives up: 1e-8 at 1 % random loss
# (at a fixed 2 s, a 100 ms path, RTO 300 ms, would lose its third retransmission's chance:
# 1e-6, a false reconnect every few hours of bulk traffic); under bulk traffic SACK/RACK
# recovery resends within about a round trip, more tries still. On a LAN or a path up to about
# 50 ms (RTO 200-250 ms) that is 2 s, 2.4 s at 100 ms: failover within 3 s of the fault.
PATH_DOWN_SECONDS = 2.0
PATH_DOWN_RTOS = 8

# A connect that gets no answer (SYNs lost: a path cut, a server gone) is not waited for alone:
# a fresh attempt starts every CONNECT_STAGGER seconds (round robin over the addresses) beside
# the older ones, at most CONNECT_ATTEMPTS at once (the oldest is dropped), all within
# --connect-timeout. A path that comes back is then found within CONNECT_STAGGER, not at the
# kernel's next SYN retry of one socket (1, 3, 7, 15 s after its start).
CONNECT_STAGGER = 0.5
CONNECT_ATTEMPTS = 4

# A dial that failed because this machine has no network to the server (no route, the
# interface down: the Wi-Fi gone) loaded no server: the next comes at most this long after,
# whatever the back-off says, so a network that comes back is used within a second.
NO_ROUTE_WAIT = 1.0
NO_ROUTE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL)

# A 503's Retry-After is honoured up to this many seconds: a front end that asks for an hour
# must not keep a VPN down that long (RFC 9110 10.2.3 lets the client decide).
MAX_RETRY_AFTER = 300

# The server's error answer gets this long to leave, after the handshake deadline if need be.
REFUSAL_SEND_SECONDS = 1.0

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

# Our server's 426 carries this header, so a client tells it from the original's 426 (which
# speaks UoTLV/1 only): ours takes WebSocket too, so a WebSocket request it answers with 426
# lost its Upgrade header on the way.
SERVER_MARK = ("ProxyGuard-Server", DEFAULT_USER_AGENT)

# How to make a front pass the Upgrade header, for the message that says it does not.
FRONT_UPGRADE_FIX = (
    "nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; "
    "proxy_set_header Connection \"upgrade\"; Apache 2.4.47+: ProxyPass ... upgrade=UoTLV/1 "
    "(or upgrade=websocket with ws:// or wss://)")

# Open tunnels a server takes by default: two threads each; beyond this a client gets 503.
DEFAULT_MAX_CLIENTS = 1000

# Connections still in their handshake beyond --max-clients tunnels: each holds a thread until
# its handshake deadline, so a flood of silent connections is refused from here on.
MAX_HANDSHAKING = 256

# Open files beyond the tunnels' (2 each: TCP and UDP) and the handshakes' (1 each): the
# listening socket, stdio, the log, the notify socket, the interpreter's own.
SPARE_FILES = 64

# Reverse proxies whose X-Forwarded-For / Forwarded headers the server believes by default.
DEFAULT_TRUSTED_PROXIES = "127.0.0.0/8,::1"

# Metrics (--metrics-listen): the Prometheus text exposition format, version 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"

# The statuses the server refuses a handshake with: their series exist from the start at 0,
# so a rate() sees the first one.
REFUSAL_STATUSES = (400, 404, 405, 408, 426, 431, 503, 505)

# Why the client connects again: its dial failed (refused: an HTTP answer other than 101 or
# 503, or the proxy's refusal; unavailable: 503; tls: the TLS handshake or the certificate;
# network: connect, timeouts, resets), or its tunnel ended (idle: our own idle timeout; ended:
# any other end).
RECONNECT_REASONS = ("refused", "unavailable", "tls", "network", "idle", "ended")

# Tunnel lifetimes, in seconds: a reconnect loop (under 1 s) up to a working day and beyond.
TUNNEL_LIFETIME_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

# When this process started (Unix time), as process exporters count it.
PROCESS_START_TIME = time.time()

# Thousands of threads (two per tunnel), set for the service by tune_threads():
# The stack of every thread but the main one. glibc's default is 8 MiB of address space each
# (80 GiB for 5,000 tunnels, refused under strict overcommit or an address-space limit); the
# pumps touch 16 KiB of theirs, TLS handshake included (measured from /proc/PID/smaps).
THREAD_STACK_BYTES = 256 * 1024

# The GIL's switch interval. Every thread waiting for the GIL wakes each interval and takes
# the GIL's mutex: when thousands of tunnels end (or go idle) at once, thousands wait, and
# their wake-ups alone took the CPU: at Python's default 5 ms, 5,000 tunnels had not gone
# after 60 s; at 0.1 s they went in 2-5 s, once in over 60 s; at 0.5 s in about 2 s. No thread
# here holds the GIL for long (every pump step is a system call, which lets it go), so the
# interval, the most a waiter waits before it asks for the GIL, costs no latency (measured:
# round trips and load as before).
SWITCH_INTERVAL = 0.5

# When thousands of tunnels end at once, each one's TCP pump (woken by the peer's close) waits
# for a teardown lane, a lock, before it closes its tunnel (and wakes its UDP pump). A thread
# waiting for a lock is off the GIL's queue, and that queue is served about in turn: without
# lanes, 10,000 pump threads wanting the GIL at once made every step of a new handshake wait
# behind all of them (5,000 tunnels closed: handshakes meanwhile p50 0.36 s, p99 1.2 s).
# Measured: one lane served the handshakes in 20-35 ms but took 5 s to tear 5,000 tunnels
# down (a lane idles while its UDP pump wakes); two: 1.4-1.6 s and p99 26 ms; four let the
# queue grow again (p99 75-120 ms). A lane not free within TEARDOWN_LANE_WAIT is skipped: a
# tunnel whose teardown hangs holds up the others of its lane no longer than that.
TEARDOWN_LANES = 2
TEARDOWN_LANE_WAIT = 10.0

# up with two or more peers keeps all its threads on one CPU (--cpu auto; CpuPlacement). The
# peers' pump threads hand Python's GIL to each other several times a datagram, and on two
# CPUs each hand-off wakes a thread on the other one (a futex wake, an interrupt, a cold
# cache): 2 or 4 peers in one process took 5-14 % more CPU a round trip than as many client
# processes. On one CPU the hand-offs stay there: the separate processes' CPU a round trip is
# 1.00-1.06x the one process's paced, 1.05-1.36x saturated, plain and TLS, and the one
# process carries more (proxyguard_bench.py --tests peers; MEASUREMENTS.md; issue 19, target
# 5). One client's two threads gain nothing (about the same CPU a datagram, 3-5 % fewer
# datagrams/s), so only a group is pinned. Every CPU_CHECK_SECONDS the group's CPU is
# compared with the others: when other work keeps it busier than the least busy one by
# CPU_MOVE_MARGIN (of one CPU's time), the threads move there; a smaller difference is noise
# (the scheduler moves the unpinned processes away by itself).
CPU_CHECK_SECONDS = 10.0
CPU_MOVE_MARGIN = 0.25

# Busy polling (--busy-poll; BusyPoll, BusyPoller). A pump done with a lone datagram (a ping,
# a request, its answer: one at a time) polls its socket for the next for up to
# DEFAULT_BUSY_POLL_US before it blocks, giving its CPU away between polls (sched_yield), as
# the original's Go runtime spins before it parks. Why: a blocked thread is woken through the
# scheduler, and a CPU that went idle first has to wake up (on a virtual machine, a halted
# vCPU: an exit to the host); four such wake-ups per round trip made most of ours. Measured
# on this project's 2-CPU VM, Go pinger and echo: with the idle CPUs polling (PM QoS, for the
# study only) ours took 65-73 us p50 against the original's 110-115 us, at half its CPU a
# round trip; without, 173-191 us against 163-171 us (MEASUREMENTS.md, issue 19, target 3).
# 100 us covers the gap between a round trip's datagrams once both pumps poll. After
# BUSY_POLL_MISSES polls in a row that found nothing, a pump blocks at once, until a blocking
# wait ends within the budget again (polling would have found it): a sparse flow (keepalives,
# a quiet SSH) costs two polls, not one per datagram. At most max(2, CPUs) pumps of a
# process poll at once (BusyPolling), so a server with many quiet tunnels cannot spin all
# its threads. A batch of several datagrams (bulk) does not poll: more is waiting anyway.
DEFAULT_BUSY_POLL_US = 100
MAX_BUSY_POLL_US = 1000
BUSY_POLL_MISSES = 2
# A poll whose give-way kept it off the CPU for CROWDED_AFTER or longer found the
# CPU crowded: other work was ready (a desktop's nice-19 CPU hogs, measured), sched_yield
# handed it the CPU, and the pump got it back only at the scheduler's next tick (4 ms at
# HZ=250): round trips' p99 2.5 ms against 0.18 ms without polling (issue 19). The pump then
# blocks for BUSY_POLL_CROWDED_SECONDS before it polls again: one such loss a second at most.
# Crowded is CROWDED_AFTER (below), not the budget (100 us): the round trip's own other tasks
# (the peer process's pump, the pinger) take the CPU for that long at a give-way, and polling
# stopped most of the time (measured: 30 polls in 10,000 round trips; then no faster than
# without polling).
BUSY_POLL_CROWDED_SECONDS = 1.0

# The scheduler slice a tunnel's pump threads ask for while its round trips go one at a time
# (--sched-slice; BusyPoller; sched_setattr(2)'s sched_runtime for SCHED_OTHER: Linux 6.12 and
# later, EEVDF; older kernels accept and ignore it). Why: on a CPU that other work keeps busy, a
# woken pump may not take the CPU from the running task before that task's protected slice (0.75
# ms x (1 + log2 CPUs)) ends, which the scheduler notices at its tick; measured 1-5 ms behind
# two nice-19 hogs, at nice -10 too (nice weighs CPU time, not wake-up latency). A woken task
# with a shorter slice than the running one's preempts it at once (the kernel's PREEMPT_SHORT):
# round trips' p99 under the hogs fell from 1.5 ms to 0.18 ms on one host (on another most of
# the delays left were the pinger's own: MEASUREMENTS.md). 100 us is the kernel's floor (it
# clamps to SCHED_SLICE_US_RANGE). The slice does not add CPU time: nice and CPUWeight= still
# share it out. Bulk traffic keeps the kernel's slice: given to every thread, the short one cost
# it 7-11 % of its rate.
DEFAULT_SCHED_SLICE_US = 100
SCHED_SLICE_US_RANGE = (100, 100000)
# A pump keeps the short slice until this many waits in a row were not one at a time
# (LoneSchedule): a ping flood's odd miss keeps it, bulk traffic gives it back within a batch.
SHORT_SLICE_KEPT_WAITS = 16

# Real-time priority while other work crowds the CPUs (--rt-priority; LoneSchedule,
# OwnSchedule). Why: behind two nice-19 CPU hogs on 2 CPUs, half the runs of 5,000 round trips
# had a p99 of 2-3.5 ms against the original's 0.2-0.4 ms. Traced (sched_switch): a pump that
# a peer it woke took the CPU from (the other process's pump, the pinger: woken on the waker's
# CPU) was often not the scheduler's next pick when that peer slept; EEVDF ran the hog, whose
# nice-19 share was owed, until the next tick (up to 4 ms at HZ=250). The short slice cannot
# help (that pump was not woken), nor could nice -10 or a cgroup's weight (the same bimodal
# runs; 8 ms in a cgroup). A SCHED_RR thread is never preempted by SCHED_OTHER work (the
# whole process under chrt -r 1: p99 0.18-0.50 ms in every run of 10). On idle CPUs it costs,
# though (a real-time wake-up goes to the thread's own CPU, often halted: p50 0.22-0.25 ms
# against a median of 0.17 ms), so a pump takes it only once its process's steps show the
# crowding (Crowding), until REALTIME_HOLD_SECONDS after the last sign: CROWDED_MIN_HELD
# steps, and CROWDED_SHARE of all, within CROWDED_WINDOW took CROWDED_AFTER or longer from a
# wait's end to the next wait (the work is 20-50 us). Measured (a process's two pumps): idle,
# about 1 step in 5,000 took that long; in the bad runs behind the hogs 1 in 50 to 1 in 100.
# Any wait that is not one at a time gives it back at once (LoneSchedule), so a real-time
# thread only ever carries one datagram at a time. Needs root, CAP_SYS_NICE or RLIMIT_RTPRIO
# (the unit's LimitRTPRIO=1); without, the pump keeps the slice.
DEFAULT_RT_PRIORITY = 1
RT_PRIORITY_RANGE = (0, 99)
CROWDED_AFTER = 0.001
CROWDED_WINDOW = 2.0
CROWDED_MIN_HELD = 4
CROWDED_SHARE = 0.002
REALTIME_HOLD_SECONDS = 10.0
# When the hold runs out and the CPUs were idle less than this share of the time since it
# began, it starts again: under real-time priority the steps no longer show the crowding, so
# under steady load it would lapse every 10 s, and each lapse be found again by at least
# CROWDED_MIN_HELD slow round trips. (Measured, five invocations of the bench behind the hogs:
# 4 runs of 45 over 1 ms with it, 6 without: within the noise.) Idle share over 1 s: the
# hogs, 0-2 %; a ping flood alone, busy polling, 9-19 %; one hog, 8-13 %.
CROWDED_IDLE_SHARE = 0.02

# sched_setattr(2)'s number on each machine that has one (platform.machine()), from the
# architectures' syscall tables: Python's os has no wrapper for it. mips is o32 (routers).
SCHED_SETATTR_SYSCALLS = {
    "x86_64": 314, "i386": 351, "i686": 351, "aarch64": 274, "armv6l": 380, "armv7l": 380,
    "armv8l": 380, "riscv64": 274, "loongarch64": 274, "ppc64le": 355, "s390x": 345,
    "mips": 4349,
}

# Where wireguard-go keeps an interface's control socket (NAME.sock).
WIREGUARD_RUN_DIR = "/var/run/wireguard"

# Linux socket option numbers that the socket module may lack on old Pythons.
SO_MARK = getattr(socket, "SO_MARK", 36)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)

# struct sock_extended_err (linux/errqueue.h): ee_errno, origin, type, code, pad, info, data.
EXTENDED_ERROR = struct.Struct("=IBBBBII")

# UDP GSO (Linux 4.18+): one sendmsg carries a run of equal-sized datagrams, with their size
# in a control message; the kernel cuts them apart. Numbers the socket module may lack.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
SEGMENT_SIZE = struct.Struct("=H")
GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS before Linux 6.1
GSO_BYTES = 65507  # all the segments together fit one IPv4 UDP datagram


# rtnetlink (linux/rtnetlink.h): ask the kernel which interface it routes an address through,
# as `ip route get` does, policy rules (wg-quick's `not fwmark 51820 table 51820`) included.
NETLINK_ROUTE, RTM_NEWROUTE, RTM_GETROUTE, NLM_F_REQUEST = 0, 24, 26, 1
RTA_DST, RTA_OIF, RTA_MARK = 1, 4, 16
NETLINK_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
ROUTE_MESSAGE = struct.Struct("=BBBBBBBBI")  # struct rtmsg
ROUTE_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr


# =============================================================================================
# Errors
# The exceptions, one class per way to fail; the data an error carries (a status, a retry
# wait, a certificate's names) are fields of its class. Uses only the constants.
# =============================================================================================


class ProxyGuardError(Exception):
    """Base of every error this program raises on purpose."""


class UsageError(ProxyGuardError):
    """A bad option or config value: one line for the user, exit status 2. `option`: the
    option it is about (--to), if one; _name_source adds the config line it came from.
    `warnings`: parse_options's warnings so far, which main still shows."""

    def __init__(self, message, option=None):
        super().__init__(message)
        self.option = option
        self.warnings = []


class FatalError(ProxyGuardError):
    """A local error that makes running impossible (port taken, no permission): exit status 1.
    `option`: the option it is about, if one (as UsageError's)."""

    def __init__(self, message, option=None):
        super().__init__(message)
        self.option = option


class HandshakeError(ProxyGuardError):
    """A request the server refuses: `status` is the HTTP answer, the message its body."""

    def __init__(self, status, message, extra_headers=(), routine=False):
        super().__init__(message)
        self.status = status
        self.extra_headers = tuple(extra_headers)
        self.routine = routine  # a plain GET (health check, browser): logged at debug only


class ClosedEarly(ConnectionError):
    """The peer closed before the end of its HTTP head; `received` bytes came."""

    def __init__(self, received):
        super().__init__("closed before the end of the HTTP head (%s)" % plural(received, "byte"))
        self.received = received


class UpgradeRefused(ProxyGuardError):
    """The server answered, but not with a UoTLV/1 upgrade (wrong path, portal, not ProxyGuard).

    The client retries these at the longest wait: they rarely heal in a second.
    """


class UpgradeDropped(UpgradeRefused):
    """A ProxyGuard server answered 426: the request reached it without its Upgrade header, so
    a front in the way drops it. `transport` is the one the request asked for."""

    def __init__(self, message, transport):
        super().__init__(message)
        self.transport = transport


class ConnectFailed(ConnectionError):
    """No TCP connection to any of the server's (or proxy's) addresses. `no_route`: every
    address failed for want of a route (the client then waits at most NO_ROUTE_WAIT)."""

    def __init__(self, message, no_route=False):
        super().__init__(message)
        self.no_route = no_route


class TLSFailed(OSError):
    """The client's TLS handshake failed (`cause`: the ssl.SSLError), with what describe_error
    needs to name the cause: the --ca-file tried (`ca_file`: then "a private CA needs
    --ca-file" is wrong advice), the names the certificate holds (`certificate_names`, check
    only) and the scheme a plain port wants (`plain_scheme`: ws for wss://, else http)."""

    def __init__(self, cause, ca_file=None, certificate_names=None, plain_scheme="http"):
        super().__init__(*cause.args)
        self.cause = cause
        self.ca_file = ca_file
        self.certificate_names = certificate_names
        self.plain_scheme = plain_scheme

    def __str__(self):
        return str(self.cause)


class ServerUnavailable(UpgradeRefused):
    """A 502/503/504: a reverse proxy cannot reach the proxyguard server behind it (restarting,
    down) or the server is full. Retried at the normal back-off, or after `retry_after` seconds
    when the answer carried a Retry-After header: it often heals in a second."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


# =============================================================================================
# Pure protocol: frames, HTTP heads, WebSocket, addresses, profiles. No I/O here: bytes and
# text in, values or errors out, so tests need no socket. Uses the constants and errors only.
# =============================================================================================

# --- UoTLV/1 frames and a peer's text in our lines -------------------------------------------

def _frame_header(datagram):
    """The 2-byte length prefix of `datagram`; ValueError past 65535 bytes."""
    if len(datagram) > MAX_FRAME_PAYLOAD:
        raise ValueError("datagram of %d bytes does not fit a frame" % len(datagram))
    return FRAME_HEADER.pack(len(datagram))


def cut_frames(view, end):
    """Cut the whole frames out of `view[:end]` (a memoryview of bytes): return the list of
    their datagrams, as memoryview slices of `view`, and where the first incomplete frame
    begins. The one frame-cutting loop (the tunnel's TCP->UDP pump; the tests' FrameDecoder)."""
    datagrams = []
    pos = 0
    while end - pos >= 2:
        stop = pos + 2 + ((view[pos] << 8) | view[pos + 1])
        if stop > end:
            break
        datagrams.append(view[pos + 2:stop])
        pos = stop
    return datagrams, pos


def encode_frames(datagrams):
    """Return the frames of all `datagrams` as one bytes object (one TCP write); ValueError
    for a datagram over 65535 bytes."""
    parts = []
    for datagram in datagrams:
        parts.append(_frame_header(datagram))
        parts.append(datagram)
    return b"".join(parts)


def plural(count, word):
    """'1 datagram', '2 datagrams', '0 days': the one place log lines count things."""
    return "%d %s%s" % (count, word, "" if count == 1 else "s")


# How much of one piece of a peer's text a log line or check's output shows.
SHOWN_LIMIT = 200


def _escaped(char):
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return ("\\x%02x" if code < 0x100 else "\\u%04x" if code < 0x10000 else "\\U%08x") % code


def shown(text, limit=SHOWN_LIMIT):
    """Text a peer controls (a reason phrase, a header value, a body, a close reason, a request
    path, a certificate's name; str, or bytes read as latin-1), fit for a log line or the
    terminal: what is not printable (escape sequences, BEL, a bare CR, C1 controls, line and
    bidi marks) and the backslash written as Python escapes (\\x1b), on one line, at most
    `limit` characters of it (a server's `403 Forb\\x1b]0;pwned\\x07` set the
    terminal's title). The one place such text is made safe: use it at every route."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("latin-1")
    text = str(text)
    more = len(text) - limit
    text = "".join(char if char.isprintable() and char != "\\" else _escaped(char)
                   for char in text[:limit])
    return text + ("... (%d more)" % more if more > 0 else "")


# --- HTTP heads: the upgrade request, its answers and refusals, health checks ----------------
UPGRADE_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: UoTLV/1\r\n\r\n")

# The first byte of a TLS handshake record (0x16) and of a TLS alert record (0x15).
TLS_RECORD_STARTS = (b"\x16", b"\x15")
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


class HeadReader:
    """Collect the bytes of an HTTP head as they arrive; no I/O.

    `feed(data)` returns None while the head is incomplete, then (head, bytes after it). It
    raises HandshakeError(431) once more than `limit` bytes came without a complete head. A
    first byte in `sniff` (0x16, a TLS record: a TLS client on a plain port) is returned at
    once as the head, so the parser says so now rather than at the deadline while the TLS
    peer waits. The client sniffs a TLS alert (0x15) too: a TLS port's answer to plain HTTP.
    """

    def __init__(self, limit=MAX_HEAD_BYTES, sniff=(b"\x16",)):
        self.limit = limit
        self.sniff = sniff
        self._buffer = bytearray()

    @property
    def received(self):
        return len(self._buffer)

    def feed(self, data):
        buffer = self._buffer
        start = max(0, len(buffer) - 3)  # the blank line may straddle the old and new bytes
        buffer += data
        if buffer[:1] in self.sniff:
            return bytes(buffer), b""
        parts = split_head(memoryview(buffer)[start:])
        if parts is not None:
            head = bytes(buffer[:start]) + parts[0]
            if len(head) <= self.limit:
                return head, parts[1]
        if len(buffer) > self.limit:
            raise HandshakeError(431, "the request head is larger than %d bytes" % self.limit)
        return None


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
    """Return the transport `request` asks for, PROTOCOL (UoTLV/1) or WEBSOCKET; raise
    HandshakeError unless it is a valid upgrade to one of them.

    Any Host is accepted, as the original does (the path: see check_path). Connection may be a
    token list (`keep-alive, Upgrade`, as some proxies send; RFC 9110 7.6.1): the original
    rejects that.
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
    upgrade_headers = [("Connection", "Upgrade"), ("Upgrade", PROTOCOL), SERVER_MARK]
    if "upgrade" not in request.tokens("connection"):
        raise HandshakeError(
            426, "the 'Connection' header is not 'Upgrade', got: '%s'"
            % shown(", ".join(request.get_all("connection"))), upgrade_headers,
            routine=not request.get_all("upgrade"))
    upgrades = request.tokens("upgrade")
    if WEBSOCKET in upgrades:
        _check_websocket_request(request)
        return WEBSOCKET
    if PROTOCOL.lower() not in upgrades:
        raise HandshakeError(
            426, "the 'Upgrade' header is not '%s' or '%s', got: '%s'"
            % (PROTOCOL, WEBSOCKET, shown(", ".join(request.get_all("upgrade")))),
            upgrade_headers)
    return PROTOCOL


def _check_websocket_request(request):
    """Raise HandshakeError unless `request` is a valid opening handshake (RFC 6455 4.2.1)."""
    if request.start[2] != "HTTP/1.1":
        raise HandshakeError(400, "a WebSocket handshake needs HTTP/1.1 (RFC 6455 4.1)")
    versions = request.get_all("sec-websocket-version")
    if versions != [WEBSOCKET_VERSION]:
        raise HandshakeError(426, "WebSocket version %s is not supported; %s is"
                             % (shown(", ".join(versions)) or "(none)", WEBSOCKET_VERSION),
                             [("Connection", "Upgrade"), ("Upgrade", WEBSOCKET),
                              ("Sec-WebSocket-Version", WEBSOCKET_VERSION)])
    keys = request.get_all("sec-websocket-key")
    try:
        valid = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except ValueError:  # binascii.Error
        valid = False
    if not valid:
        raise HandshakeError(400, "Sec-WebSocket-Key must be one base64 value of 16 bytes "
                                  "(RFC 6455 4.1)")


def choose_subprotocol(request):
    """The subprotocol the server takes of those a WebSocket request offers: the first of
    WEBSOCKET_SUBPROTOCOLS offered, or None (a generic client that offers none of them gets
    one message per datagram)."""
    offered = request.tokens("sec-websocket-protocol")
    return next((name for name in WEBSOCKET_SUBPROTOCOLS if name in offered), None)


def websocket_response(request, subprotocol):
    """The 101 that accepts a checked WebSocket request, echoing `subprotocol` (None: none;
    see choose_subprotocol)."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Accept: " + websocket_accept(request.get("sec-websocket-key"))]
    if subprotocol is not None:
        lines.append("Sec-WebSocket-Protocol: " + subprotocol)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _asks_upgrade(request):
    """True if `request` tries an upgrade (an Upgrade header, Connection: upgrade, a WebSocket
    key): a refusal of it is worth a log line, a scanner's plain GET is not."""
    return bool(request.get_all("upgrade") or "upgrade" in request.tokens("connection")
                or request.get_all("sec-websocket-key"))


def _is_trusted(address, networks):
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
    if not _is_trusted(peer_ip, trusted):
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
        if not _is_trusted(address, trusted):
            return address
    return chain[0] if chain else None


def build_response(status, message="", extra_headers=()):
    """Return a complete HTTP/1.1 error response with a one-line text body; it closes."""
    body = (message + "\n").encode("utf-8") if message else b""
    lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase)]
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


def health_answer(open_tunnels, max_clients, stopping=False):
    """The answer to a load balancer's check at --health-path: 200 while this server takes
    another tunnel; 503 when --max-clients are open or it is stopping, so the balancer sends
    new clients to another server instead of each getting a 503 here. Open tunnels are not
    affected either way (a balancer keeps established connections)."""
    if stopping:
        return build_response(503, "stopping")
    if max_clients and open_tunnels >= max_clients:
        return build_response(503, "full: %s open" % plural(open_tunnels, "tunnel"),
                              [("Retry-After", "10")])
    return build_response(200, "ok: %s open" % plural(open_tunnels, "tunnel"))


def build_upgrade_request(host, path, user_agent=DEFAULT_USER_AGENT, websocket_key=None):
    """Return the client's upgrade request: UoTLV/1 (the original's bytes, less
    Accept-Encoding: gzip) or, given a `websocket_key`, an RFC 6455 opening handshake that
    offers our subprotocols, the preferred first."""
    if websocket_key is None:
        upgrade = "Upgrade: %s\r\n" % PROTOCOL
    else:
        upgrade = ("Upgrade: websocket\r\nSec-WebSocket-Version: %s\r\nSec-WebSocket-Key: %s"
                   "\r\nSec-WebSocket-Protocol: %s\r\n"
                   % (WEBSOCKET_VERSION, websocket_key, ", ".join(WEBSOCKET_SUBPROTOCOLS)))
    return ("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: Upgrade\r\n%s\r\n"
            % (path, host, user_agent, upgrade)).encode("latin-1")


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


# A refusal's body the client reads (within its connect deadline) to show the server's words.
MAX_BODY_SHOWN = 512

# What a TLS port says to a plain HTTP request in its 400: nginx ("The plain HTTP request was
# sent to HTTPS port"), Go's net/http ("Client sent an HTTP request to an HTTPS server."),
# proxyguard.py's own server.
_PLAIN_TO_TLS_PORT = re.compile(rb"HTTPS (port|server)|speaks HTTPS")
USE_HTTPS_HINT = "is the server https://? (use https:// in --to)"

# The 426 body of a ProxyGuard server (the original's words, and ours) that got no upgrade.
_UPGRADE_NOT_RECEIVED = re.compile(rb"the '(Connection|Upgrade)' header is not")


def _body_line(response, body):
    """The server's own reason in a one-line text/plain body (ours: 'the server is full ...'),
    or None: an HTML error page says nothing a log line could show."""
    content_type = response.get("content-type", "text/plain").lower()
    if not content_type.startswith("text/plain"):
        return None
    text = body.decode("utf-8", "replace").strip()
    lines = text.splitlines()
    if len(lines) != 1 or any(ord(ch) < 32 or ord(ch) == 127 for ch in lines[0]):
        return None
    return lines[0][:200]


def check_upgrade_response(response, body=b"", websocket_key=None):
    """Raise UpgradeRefused, naming the likely cause, unless `response` accepts UoTLV/1 (or,
    given the `websocket_key` of the request, the WebSocket: then return the subprotocol the
    server took). `body` is the start of a refusal's body (at most MAX_BODY_SHOWN bytes), if
    any came."""
    status = response.start[1]
    got = "HTTP %d %s" % (status, shown(response.start[2], 100))
    if websocket_key is not None:
        subprotocol = _check_websocket_response(response, websocket_key)
        if subprotocol is not None:
            return subprotocol
    if status == 101:
        _check_switched(response, PROTOCOL)
        return None
    if status in (200, 204) or 300 <= status < 400:
        location = response.get("location")
        cause = ("a captive portal (log in with a browser) or a web page, not ProxyGuard, at "
                 "this URL" + (" (redirects to %s)" % shown(location) if location else ""))
    elif status == 404:
        cause = "wrong path in the URL, or the reverse proxy does not forward it"
    elif status == 426 and WEBSOCKET in response.tokens("upgrade"):
        cause = "the front passes WebSocket only: use ws:// or wss:// in --to"
    elif status == 426 and (PROTOCOL.lower() in response.tokens("upgrade")
                            or _UPGRADE_NOT_RECEIVED.search(body) or _is_ours(response)):
        # A ProxyGuard server that got no Upgrade: Apache without upgrade=UoTLV/1, Squid,
        # a cloud load balancer strip it, and the answer's
        # Upgrade header too (hop-by-hop), but not the server's words in the body.
        if websocket_key is not None:  # not ours (_check_websocket_response saw to that)
            raise UpgradeRefused(UOTLV_ONLY)
        raise UpgradeDropped(
            "got %s instead of 101 Switching Protocols: a ProxyGuard server got the request "
            "without its Upgrade header: a front in the way drops it (one that passes "
            "WebSocket only? use ws:// or wss://)" % got, PROTOCOL)
    elif status == 426:
        cause = "the server wants another upgrade protocol: not a ProxyGuard UoTLV/1 server?"
    elif status in (401, 403, 407):
        cause = "access denied by the server or a proxy"
    elif status in (502, 503, 504):
        retry_after = parse_retry_after(response.get("retry-after"))
        reason = _body_line(response, body) if status == 503 else None
        if reason is not None:  # a full server says so itself
            cause = "the server says %r" % reason
        else:
            cause = ("the reverse proxy cannot reach the proxyguard server behind it, or the "
                     "server is full")
        if retry_after is not None:
            cause += "; it asks to retry after %gs" % retry_after
        raise ServerUnavailable("got %s instead of 101 Switching Protocols: %s" % (got, cause),
                                retry_after=retry_after)
    elif status == 400 and _PLAIN_TO_TLS_PORT.search(body):
        cause = "the port speaks HTTPS: " + USE_HTTPS_HINT
    elif status == 400:
        cause = "the server or a reverse proxy rejected the request (does it pass Upgrade on?)"
    else:
        cause = "not a ProxyGuard server, or a proxy in the way"
    raise UpgradeRefused("got %s instead of 101 Switching Protocols: %s" % (got, cause))


UOTLV_ONLY = ("got HTTP 426: the server speaks %s only, not WebSocket (the original "
              "ProxyGuard?): use http:// or https:// in --to" % PROTOCOL)


def _is_ours(response):
    """True for an answer of a proxyguard.py server (SERVER_MARK), not of the original."""
    return response.get(SERVER_MARK[0].lower(), "").startswith(SERVER_MARK[1].partition("/")[0])


def _dropped_websocket_cause():
    return ("a proxyguard.py server, which takes WebSocket, got the request without its "
            "Upgrade header: the reverse proxy drops the Upgrade header; make it pass it ("
            + FRONT_UPGRADE_FIX + ")")


def _check_switched(response, protocol):
    """Raise UpgradeRefused unless the 101 `response` switched to `protocol`, with
    Connection: Upgrade."""
    if response.tokens("upgrade") != [protocol.lower()]:
        raise UpgradeRefused("the server switched to '%s' instead of %s: not a ProxyGuard server"
                             % (shown(response.get("upgrade", "")), protocol))
    if "upgrade" not in response.tokens("connection"):
        raise UpgradeRefused("the 101 answer lacks 'Connection: Upgrade': a broken proxy?")


def _check_websocket_response(response, key):
    """The subprotocol if `response` accepts the WebSocket handshake sent with `key`; raise
    UpgradeRefused for a 101 that does not (RFC 6455 4.1), or a refusal that says only UoTLV/1
    is spoken; None for the other refusals, for check_upgrade_response to name."""
    status = response.start[1]
    if status == 426 and _is_ours(response):
        raise UpgradeDropped("got HTTP %d %s: %s" % (status, shown(response.start[2], 100),
                                                     _dropped_websocket_cause()), WEBSOCKET)
    if status == 426 and PROTOCOL.lower() in response.tokens("upgrade"):
        raise UpgradeRefused(UOTLV_ONLY)
    if status == 426 and response.get("sec-websocket-version"):
        raise UpgradeRefused("got HTTP 426: the server wants WebSocket version %s, not %s"
                             % (shown(response.get("sec-websocket-version")), WEBSOCKET_VERSION))
    if status != 101:
        return None
    _check_switched(response, WEBSOCKET)
    if response.get_all("sec-websocket-accept") != [websocket_accept(key)]:
        raise UpgradeRefused("the 101 answer's Sec-WebSocket-Accept does not match our key "
                             "(RFC 6455 4.1): a broken proxy?")
    taken = response.get_all("sec-websocket-protocol")
    if len(taken) != 1 or taken[0] not in WEBSOCKET_SUBPROTOCOLS:
        raise UpgradeRefused("the WebSocket server did not take the %s subprotocol: not a "
                             "proxyguard.py server" % " or ".join(WEBSOCKET_SUBPROTOCOLS))
    return taken[0]


def parse_retry_after(value):
    """Seconds from a Retry-After header (delay-seconds or an HTTP date, RFC 9110 10.2.3), at
    most MAX_RETRY_AFTER; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = int(value)
    else:
        import email.utils  # only here: a date form is rare, and the import costs start-up
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(0.0, float(seconds)), MAX_RETRY_AFTER)


def _build_connect_request(authority, credentials=None, user_agent=DEFAULT_USER_AGENT):
    """The CONNECT request for an HTTP proxy; `credentials` is 'user:pass' for Basic auth."""
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority,
             "User-Agent: %s" % user_agent]
    if credentials is not None:
        token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
        lines.append("Proxy-Authorization: Basic %s" % token)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _check_connect_response(response, sent_credentials=False):
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
    raise ConnectionError("the HTTP proxy answered %d %s to CONNECT"
                          % (status, shown(response.start[2], 100)))


# --- Addresses, URLs and paths: the values options and requests carry ------------------------

def path_is_under(path, prefix):
    """`path` (without its query) is `prefix` or below it: `/pg` takes /pg, /pg/ and /pg/x,
    not /pgx; `/` takes every path."""
    base = prefix.rstrip("/")
    return path == base or path.startswith(base + "/")


def check_path(target, prefix):
    """Raise HandshakeError(404) unless the request target's path is `prefix` or below it
    (see path_is_under); no prefix takes every path, as the original.
    """
    if prefix and not path_is_under(target.partition("?")[0], prefix):
        raise HandshakeError(404, "no tunnel at this path", routine=True)


def _is_url_path(text):
    """A path --path or --route can take: from a /, visible ASCII, no query."""
    return text.startswith("/") and bool(_TARGET.match(text)) and "?" not in text


def parse_host_port(text, option, default_host=None):
    """Parse `host:port` or `[v6]:port` into (host, port); raise UsageError naming `option`."""
    text = text.strip()
    if "://" in text:
        raise UsageError("%s %r: expected HOST:PORT, not a URL" % (option, text), option=option)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError("%s %r: write an IPv6 address as [address]:port" % (option, text),
                             option=option)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise UsageError("%s %r: expected HOST:PORT, for example 127.0.0.1:51820"
                             % (option, text), option=option)
        if ":" in host:
            raise UsageError("%s %r: write an IPv6 address as [address]:port" % (option, text),
                             option=option)
    if not host:
        if default_host is None:
            raise UsageError("%s %r: the host is missing" % (option, text), option=option)
        host = default_host
    return host, _parse_port(port, option)


def _parse_port(text, option, allow_zero=False):
    """Return `text` as a port number; raise UsageError naming `option`."""
    try:
        port = int(str(text).strip())
    except ValueError:
        port = -1
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError("%s %r: not a port number (%d-65535)"
                         % (option, text, 0 if allow_zero else 1), option=option)
    return port


def parse_networks(text, option):
    """A comma list of IP networks (`10.0.0.0/8,::1`); raises UsageError naming `option`."""
    networks = []
    for item in text.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise UsageError("%s: %r is not an IP address or network" % (option, item),
                                 option=option)
    return networks


def _encode_target(text):
    """`text` (a URL's path and query) as a valid request target: what HTTP does not allow
    in one (spaces, controls, non-ASCII as UTF-8, `"<>\\^`{|}`, a `%` without two hex digits)
    is percent-encoded; %XX escapes and reserved characters stay as written."""
    text = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", text)
    return urllib.parse.quote(text, safe="/?:@!$&'()*+,;=[]%")


def _bracketed_urls(text, netloc):
    """The URLs `text` (whose host:port part `netloc` has an IPv6 address without brackets)
    may mean: the last part a port ([::1]:40871), or all of it the address ([::1:8080])."""
    scheme, _, rest = text.partition("://")
    rest = rest[len(netloc):]
    host, _, port = netloc.rpartition(":")
    urls = []
    for address, suffix in ((host, ":" + port), (netloc, "")):
        try:
            if ipaddress.ip_address(address).version == 6 and (not suffix or port.isdigit()):
                urls.append("%s://[%s]%s%s" % (scheme, address, suffix, rest))
        except ValueError:
            pass
    return urls or ["%s://[ADDRESS]:PORT%s" % (scheme, rest)]


class ServerURL:
    """The client's `--to` URL: scheme, host, port, the Host header and the request target.
    http:// and https:// speak UoTLV/1; ws:// and wss:// speak WebSocket (`websocket`)."""

    def __init__(self, text):
        text = text.strip()
        if "://" not in text:
            raise UsageError("--to %r is not a URL: write http://%s/ (or https://)"
                             % (text, text.strip("/")), option='--to')
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            # urlsplit would drop tabs and line breaks without a word
            raise UsageError("--to %r: control characters are not allowed in a URL" % text,
                             option='--to')
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as exc:
            netloc = urllib.parse.urlsplit(text).netloc if "[" not in text else ""
            if netloc.count(":") >= 2:  # http://::1:40871/: 'Port could not be cast ...'
                raise UsageError("--to %r: write an IPv6 address in brackets: %s"
                                 % (text, " or ".join(_bracketed_urls(text, netloc))),
                                 option='--to')
            raise UsageError("--to %r is not a valid URL: %s" % (text, exc), option='--to')
        if parts.scheme not in ("http", "https", "ws", "wss"):
            raise UsageError("--to %r: the scheme must be http:// or https:// (UoTLV/1), or "
                             "ws:// or wss:// (WebSocket), not %s://" % (text, parts.scheme),
                             option='--to')
        if not parts.hostname:
            raise UsageError("--to %r: the host is missing" % text, option='--to')
        if parts.username is not None:
            raise UsageError("--to %r: user names in the URL are not supported" % text,
                             option='--to')
        if port == 0:
            raise UsageError("--to %r: port 0 is not a port to connect to (1-65535)" % text,
                             option='--to')
        host = parts.hostname
        # The Host header is the URL's host as written, with its port if one was written.
        host_header = parts.netloc
        if not host_header.isascii():  # an international name: its IDNA (xn--) form
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise UsageError("--to %r: not a valid host name: %s" % (text, exc), option='--to')
            host_header = host + (":%d" % port if port is not None else "")
        if " " in host_header:
            raise UsageError("--to %r: a space in the host" % text, option='--to')
        self.text = text
        self.scheme = parts.scheme
        self.tls = parts.scheme in ("https", "wss")
        self.websocket = parts.scheme in ("ws", "wss")
        self.transport = WEBSOCKET if self.websocket else PROTOCOL
        self.host = host
        self.port = port or (443 if self.tls else 80)
        self.host_header = host_header
        self.target = _encode_target((parts.path or "/")
                                    + ("?" + parts.query if parts.query else ""))

    def websocket_twin(self):
        """This URL with ws:// for http://, wss:// for https://."""
        return ServerURL(("wss" if self.tls else "ws") + self.text[len(self.scheme):])

    def __str__(self):
        return self.text


class ProxyURL:
    """An HTTP proxy for CONNECT: `http://[user:pass@]host:port`."""

    def __init__(self, text, option="--proxy"):
        parts = urllib.parse.urlsplit(text.strip() if "://" in text else "http://" + text.strip())
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError("%s %r: %s" % (option, text, exc), option=option)
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError("%s %r: expected http://[user:pass@]host:port" % (option, text),
                             option=option)
        if port == 0:
            raise UsageError("%s %r: port 0 is not a port to connect to (1-65535)"
                             % (option, text), option=option)
        self.option = option  # where it came from: --proxy, or HTTPS_PROXY / HTTP_PROXY
        self.host = parts.hostname
        self.port = port or 3128
        self.credentials = None
        if parts.username is not None:
            self.credentials = "%s:%s" % (urllib.parse.unquote(parts.username),
                                          urllib.parse.unquote(parts.password or ""))
        self.text = "http://%s" % format_address((self.host, self.port))

    def __str__(self):
        return self.text


def format_address(address):
    """`host:port`, with IPv6 hosts in brackets."""
    host, port = address[0], address[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# --- WebSocket (RFC 6455): the handshake's keys, frames, masking -----------------------------
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)

# Close codes (RFC 6455 7.4.1) this program sends or names.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 5.5

# The longest frame header: 2 bytes, 8 of extended length, 4 of masking key (RFC 6455 5.2).
MAX_WEBSOCKET_HEADER = 14
_LENGTH_64 = struct.Struct("!BBQ")
_LENGTH_16 = struct.Struct("!BBH")
_LENGTH_7 = struct.Struct("!BB")
# proxyguard-uotlv: a pump gathers datagrams into one message until it holds this much, so a
# message is at most MAX_BATCH_MESSAGE (the batch, and the frame that crossed the mark). The
# reader cuts frames out of whole messages only: half of UoTLV/1's batch keeps what it holds
# back small (64 KiB: half a millisecond of a gigabit), and 45 datagrams of 1420 bytes share
# one header and one XOR.
WEBSOCKET_BATCH_BYTES = 64 * 1024
MAX_BATCH_MESSAGE = WEBSOCKET_BATCH_BYTES + 2 + MAX_FRAME_PAYLOAD


def websocket_key():
    """A fresh Sec-WebSocket-Key: 16 random bytes in base64 (RFC 6455 4.1)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def websocket_accept(key):
    """The Sec-WebSocket-Accept that answers `key` (RFC 6455 4.2.2)."""
    import hashlib  # only here: 4 ms of every start (OpenSSL's _hashlib), for WebSocket only
    digest = hashlib.sha1(key.encode("latin-1") + _WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


# Ints with a 1 in every 32-bit word, by word count, for mask_payload: WireGuard sends a few
# sizes only, so a small cache serves nearly every datagram. A batch (proxyguard-uotlv) may be
# of any size up to MAX_BATCH_MESSAGE: its ones are the next power of two's, cached, shifted
# down (a shift costs half of making them anew, which costs as much as the XOR's conversions).
_WORD_ONES = {}
_WORD_ONES_CACHED = 512  # words, 2 KiB: at most about 0.5 MiB for all the cached ints


def _word_ones(words):
    ones = _WORD_ONES.get(words)
    if ones is None:
        if words <= _WORD_ONES_CACHED:
            ones = _WORD_ONES[words] = int.from_bytes(b"\x01\x00\x00\x00" * words, "little")
        else:  # the powers of two up to MAX_BATCH_MESSAGE: at most 256 KiB in all
            power = 1 << (words - 1).bit_length()
            ones = _WORD_ONES.get(power)
            if ones is None:
                ones = _WORD_ONES[power] = int.from_bytes(b"\x01\x00\x00\x00" * power,
                                                          "little")
            ones >>= 32 * (power - words)
    return ones


def mask_payload(data, key):
    """`data` XOR the 4-byte masking `key` repeated (RFC 6455 5.3), as bytes; `key` is the
    key's bytes as a little-endian int. Masking and unmasking are the same operation.

    One XOR of two big ints: the standard library has no faster XOR (bytes.translate cannot
    follow a 4-byte period; strided slices measured slower). `key * ones` repeats the key in
    every word without building its bytes."""
    size = len(data)
    words = (size + 3) >> 2
    masked = int.from_bytes(data, "little") ^ (key * _word_ones(words))
    return masked.to_bytes(words << 2, "little")[:size]


def _frame_head(first, size, masked):
    """A frame's first bytes (RFC 6455 5.2): `first` (FIN, opcode), then the mask bit and
    `size` in the fewest bytes."""
    second = 0x80 if masked else 0
    if size < 126:
        return bytes((first, second | size))
    if size <= 0xFFFF:
        return _LENGTH_16.pack(first, second | 126, size)
    return _LENGTH_64.pack(first, second | 127, size)


def _mask_spans(data, spans, start):
    """`data[start:stop]`, stop the end of the last span, with each span (start, stop, 4-byte
    key; in order, from `start` on) XORed with its key repeated (RFC 6455 5.3; masking and
    unmasking are the one XOR), as bytes: all in one big-int XOR, where what lies between the
    spans (frame headers) meets a mask of zeros. One conversion to and from a big int for a
    whole batch, where mask_payload per frame costs a call and a bytes object each."""
    masks = []
    pos = start
    for first, last, key in spans:
        size = last - first
        masks.append(bytes(first - pos))
        masks.append((bytes(key) * ((size >> 2) + 1))[:size])
        pos = last
    return (int.from_bytes(data[start:pos], "little")
            ^ int.from_bytes(b"".join(masks), "little")).to_bytes(pos - start, "little")


def _mask_in_place(view, spans, xor=None):
    """XOR each span (start, stop, 4-byte key; in order) of the writable `view` with its key
    repeated, in place (RFC 6455 5.3: masking and unmasking are the one XOR). `xor` is the
    accelerator (mask_accelerator), one C call per span; without it, one big-int XOR for all
    (mask_payload for a lone span: its multiply beats building a mask's bytes)."""
    if xor is not None:
        for start, stop, key in spans:
            view[start:stop] = xor(view[start:stop], key)
        return
    first, last = spans[0][0], spans[-1][1]
    if len(spans) == 1:
        view[first:last] = mask_payload(view[first:last], int.from_bytes(spans[0][2], "little"))
    else:
        view[first:last] = _mask_spans(view, spans, first)


# The optional accelerator: websockets' C apply_mask(data, key) -> bytes (pip install
# websockets, or the `fast` extra). None: not looked for yet; False: not importable.
_MASK_XOR = None


def mask_accelerator():
    """websockets' C apply_mask if the package is installed, else None (the standard library's
    big-int XOR does the work, at about 4 times the CPU per masked datagram). Looked for once, at the
    first WebSocket tunnel, never at start. The extension module is loaded from the package's
    folder without the package itself: `import websockets` takes 60 ms (importlib.metadata),
    its C module 1 ms, and it needs nothing from the package."""
    global _MASK_XOR
    if _MASK_XOR is None:
        xor = False
        try:
            import importlib.machinery
            import importlib.util
            spec = importlib.util.find_spec("websockets")
            for folder in (spec.submodule_search_locations or ()) if spec else ():
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    path = os.path.join(folder, "speedups" + suffix)
                    if os.path.isfile(path):
                        module_spec = importlib.util.spec_from_file_location(
                            "websockets.speedups", path)
                        module = importlib.util.module_from_spec(module_spec)
                        module_spec.loader.exec_module(module)
                        xor = module.apply_mask
                        break
                if xor:
                    break
        except Exception as exc:  # a broken install must not take the tunnel down
            log.debug("WebSocket masking: websockets' speedups not usable: %s", exc)
        _MASK_XOR = xor
        log.debug("WebSocket masking: %s", "websockets' C apply_mask" if xor else
                  "the standard library's XOR (pip install websockets: less CPU)")
    return _MASK_XOR or None


def _masked(data, key, xor=None):
    """`data` masked (or unmasked) with the 4-byte `key`, as a new bytes: by `xor`, the
    accelerator (mask_accelerator), if given, else by mask_payload."""
    if xor is not None:
        return xor(data, key)
    return mask_payload(data, int.from_bytes(key, "little"))


def websocket_frame(opcode, payload=b"", mask=False):
    """One final frame of `opcode` carrying `payload`; masked with a fresh random key when
    `mask` (the client's frames, RFC 6455 5.1)."""
    header = _frame_head(0x80 | opcode, len(payload), mask)
    if not mask:
        return header + bytes(payload)
    key = os.urandom(4)
    return header + key + mask_payload(payload, int.from_bytes(key, "little"))


def close_payload(code, reason=""):
    """The body of a close frame: the code, then a UTF-8 reason within a control frame."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]


def websocket_frames(datagrams, mask):
    """One binary message per datagram, joined for one TCP write. The client's are masked,
    each with a fresh key (RFC 6455 5.3): keys for several at once, then one XOR for all
    (_mask_spans)."""
    final_binary = 0x80 | OP_BINARY
    if not mask:
        parts = []
        for datagram in datagrams:
            parts.append(_frame_head(final_binary, len(datagram), False))
            parts.append(datagram)
        return b"".join(parts)
    if len(datagrams) == 1:  # a lone one (no load): mask_payload beats a mask's bytes, 1 us
        return websocket_frame(OP_BINARY, datagrams[0], True)
    keys = os.urandom(4 * len(datagrams))
    parts, spans = [], []
    pos = 0
    for index, datagram in enumerate(datagrams):
        size = len(datagram)
        key = keys[4 * index:4 * index + 4]
        head = _frame_head(final_binary, size, True) + key
        parts.append(head)
        parts.append(datagram)
        pos += len(head)
        spans.append((pos, pos + size, key))
        pos += size
    return _mask_spans(b"".join(parts), spans, 0) if spans else b""


def websocket_batches(datagrams, mask):
    """proxyguard-uotlv: the `datagrams` as UoTLV/1 frames in binary messages, a new one
    begun once one holds WEBSOCKET_BATCH_BYTES (as the pump's batches), joined for one TCP
    write; the client's masked (websocket_frame draws a fresh key for each)."""
    messages, frames, size = [], [], 0
    for datagram in datagrams:
        frames.append(datagram)
        size += 2 + len(datagram)
        if size >= WEBSOCKET_BATCH_BYTES:
            messages.append(websocket_frame(OP_BINARY, encode_frames(frames), mask))
            frames, size = [], 0
    if frames:
        messages.append(websocket_frame(OP_BINARY, encode_frames(frames), mask))
    return b"".join(messages)


class WebSocketClosed(ProxyGuardError):
    """The WebSocket ended: the peer's close frame (`by_peer`), or a protocol error of the
    peer. `code` is the close code to answer with (None: an empty close answers a close
    without a code, RFC 6455 5.5.1)."""

    def __init__(self, code, message, by_peer=False):
        super().__init__(message)
        self.code = code
        self.by_peer = by_peer

    def reason(self):
        """The tunnel-down log's reason."""
        if self.by_peer:
            return "closed by peer: %s" % self
        return "WebSocket protocol error of the peer: %s (closed with %d)" % (self, self.code)


class WebSocketDecoder:
    """Cut RFC 6455 frames out of a byte stream: the datagrams of whole binary messages, and
    what the peer asked for on the way. No I/O.

    `cut(view, end)` works as cut_frames: it returns the datagrams of the messages completed in
    `view[:end]` and where the first incomplete frame begins. The datagrams of whole messages
    are slices of `view`, unmasked in place (`view` must be writable): all of a cut's in one
    XOR (_mask_spans); those of fragmented messages are bytes, and so are masked ones when
    `xor` (mask_accelerator) unmasks them. Then `pong` holds the
    payload of the last ping not yet answered (None: none; RFC 6455 5.5.3 allows answering the
    last only), and `closed` a WebSocketClosed once the peer closed or broke the protocol
    (nothing is read after it).

    `masked`: the peer must mask its frames (the server's side) or must not (the client's).
    `batched` (proxyguard-uotlv): a message carries whole UoTLV/1 frames, cut apart here
    (unmasked first: into a new bytes); one that ends inside a frame is refused (1007).
    Every check that needs only a frame's header is made before its payload is waited for,
    so a peer can make it hold at most one message of `limit` bytes (MAX_FRAME_PAYLOAD, or
    MAX_BATCH_MESSAGE batched), whatever it sends: a frame of a larger message is refused
    (1009) from its header.
    """

    def __init__(self, masked, xor=None, batched=False):
        self.masked = masked
        self.xor = xor  # the masking accelerator (_mask_in_place), or None
        self.batched = batched
        self.limit = MAX_BATCH_MESSAGE if batched else MAX_FRAME_PAYLOAD
        self.pong = None
        self.closed = None
        self._message = None  # the fragments of a message so far (bytearray), or None

    def cut(self, view, end):
        datagrams = []
        spans = []  # (start, stop, key) of the masked datagrams, unmasked together at the end
        xor = self.xor
        batched, limit = self.batched, self.limit
        pos = 0
        while self.closed is None and end - pos >= 2:
            first, second = view[pos], view[pos + 1]
            size = second & 0x7F
            header = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = (view[pos + 2] << 8) | view[pos + 3]
                header = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(view[pos + 2:pos + 10], "big")
                header = 10
            # A whole binary message, masked as it must be, outside a fragmented one, within
            # the limit: nothing to check (the usual frame, so no call for it).
            if not (first == 0x82 and (second >= 0x80) == self.masked
                    and size <= limit and self._message is None):
                problem = self._check(first, second & 0x80, size)
                if problem is not None:
                    self.closed = problem
                    break
            if second & 0x80:
                header += 4
            stop = pos + header + size
            if stop > end:
                break
            start = pos + header
            pos = stop
            opcode = first & 0x0F
            if opcode == OP_BINARY and first & 0x80:  # the usual case: a whole message
                if not size:
                    continue
                if batched:
                    payload = view[start:stop]
                    if second & 0x80:
                        payload = _masked(payload, view[start - 4:start], xor)
                    if not self._cut_batch(payload, datagrams):
                        break
                    continue
                if not second & 0x80:
                    datagrams.append(view[start:stop])
                elif xor is not None:  # unmasked by C into a new bytes: no copy back
                    datagrams.append(xor(view[start:stop], view[start - 4:start]))
                else:
                    datagrams.append(view[start:stop])
                    spans.append((start, stop, view[start - 4:start]))
                continue
            payload = view[start:stop]
            if second & 0x80:
                payload = _masked(payload, view[start - 4:start], xor)
            if opcode in (OP_BINARY, OP_CONTINUATION):
                self._message = (bytearray() if opcode == OP_BINARY else self._message)
                self._message += payload
                if first & 0x80:
                    message, self._message = bytes(self._message), None
                    if batched and message and not self._cut_batch(message, datagrams):
                        break
                    if message and not batched:
                        datagrams.append(message)
            else:
                self._control(opcode, bytes(payload))
        if spans:  # masked datagrams without the accelerator
            _mask_in_place(view, spans)
        return datagrams, pos

    def _cut_batch(self, payload, datagrams):
        """A proxyguard-uotlv message's datagrams onto `datagrams`; False (and `closed`) if
        it ends inside a frame."""
        frames, used = cut_frames(memoryview(payload), len(payload))
        if used != len(payload):
            self.closed = WebSocketClosed(CLOSE_INVALID_PAYLOAD, "a %s message that ends "
                                          "inside a UoTLV/1 frame" % WEBSOCKET_BATCH_SUBPROTOCOL)
            return False
        datagrams += frames
        return True

    def _check(self, first, masked, size):
        """The WebSocketClosed a frame's header earns, or None if it may be read."""
        opcode = first & 0x0F
        if first & 0x70:
            return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension "
                                                         "was agreed)")
        if opcode not in _KNOWN_OPCODES:
            return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "unknown opcode %#x" % opcode)
        if bool(masked) != self.masked:
            return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "an unmasked frame from the client "
                                   "(RFC 6455 5.1)" if self.masked else
                                   "a masked frame from the server (RFC 6455 5.1)")
        if opcode >= OP_CLOSE:
            if not first & 0x80 or size > MAX_CONTROL_PAYLOAD:
                return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "a fragmented or oversized "
                                                             "control frame")
            return None
        if opcode == OP_TEXT:
            return WebSocketClosed(CLOSE_UNSUPPORTED_DATA, "a text message; datagrams go in "
                                                           "binary messages")
        if (opcode == OP_CONTINUATION) != (self._message is not None):
            return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "a continuation frame without a "
                                   "message" if opcode == OP_CONTINUATION else
                                   "a new message inside a fragmented one")
        if size + (len(self._message) if self._message is not None else 0) > self.limit:
            return WebSocketClosed(CLOSE_TOO_BIG, "a message over %d bytes, larger than %s"
                                   % (self.limit, "a batch" if self.batched else
                                      "any UDP datagram"))
        return None

    def _control(self, opcode, payload):
        if opcode == OP_PING:
            self.pong = payload
        elif opcode == OP_CLOSE:
            self.closed = _parse_close(payload)


        # A pong needs nothing: the keepalive only wants traffic.


def _parse_close(payload):
    """The WebSocketClosed for a close frame's body (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return WebSocketClosed(None, "WebSocket close without a code", by_peer=True)
    if len(payload) == 1:
        return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "a close frame of 1 byte")
    code = struct.unpack("!H", payload[:2])[0]
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011)
            or 3000 <= code <= 4999):
        return WebSocketClosed(CLOSE_PROTOCOL_ERROR, "a close frame with code %d, which may "
                                                     "not be sent" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return WebSocketClosed(CLOSE_INVALID_PAYLOAD, "a close reason that is not UTF-8")
    text = "WebSocket close %d" % code
    if reason:
        text += " '%s'" % shown(reason)
    return WebSocketClosed(code, text, by_peer=True)


# --- WireGuard profiles (up): the eduVPN portal's wg-quick file, with ProxyEndpoint lines ----
# wg-quick's own test of an interface name taken from a file name (its CONFIG_FILE pattern in
# wg-quick(8)): 1 to 15 of these characters, the file named NAME.conf.
WG_INTERFACE_NAME = re.compile(r"^[a-zA-Z0-9_=+.-]{1,15}$")
_PROFILE_SECTION = re.compile(r"^\[\s*([A-Za-z]+)\s*\]$")
_PROFILE_SETTING = re.compile(r"^([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*)$")

# The MTU a rewritten profile without one gets: WireGuard's own default for a 1500-byte path
# (see the README's "The MTU question"). Left to wg-quick, it would be the MTU of the route to
# the Endpoint, 127.0.0.1: loopback's 65536 less 80, and the VPN server's packets to a
# 1500-byte network would then rest on path MTU discovery.
PROFILE_DEFAULT_MTU = 1420


class ProfileLine:
    """One line of a profile: its `text` as written; `section`, the index of its section in
    WireGuardProfile.sections (-1 before the first); `header`, whether it is the section's
    [Name] line; and its setting, `key` in lower case (wg and wg-quick read keys in any case)
    and `value`, or None for a header, a comment or a blank line."""

    __slots__ = ("text", "section", "header", "key", "value")

    def __init__(self, text, section, header=False, key=None, value=None):
        self.text, self.section, self.header = text, section, header
        self.key, self.value = key, value


class WireGuardProfile:
    """A wg-quick configuration, as the eduVPN portal writes it (see parse_profile): `lines`
    (ProfileLine) in order, so that comments and settings pass through a rewrite as written;
    `sections`, each section's name in lower case; `interface`, the index of [Interface];
    `proxy_peers`, [(section index, ServerURL)] of each [Peer] with a ProxyEndpoint."""

    def __init__(self, lines, sections, interface, proxy_peers):
        self.lines, self.sections = lines, sections
        self.interface, self.proxy_peers = interface, proxy_peers

    def values(self, section, key):
        """The values of `key` (lower case) in section number `section`, in order."""
        return [line.value for line in self.lines if line.section == section and line.key == key]

    def setting(self, key):
        """The [Interface]'s last value for `key` (lower case), or None."""
        values = self.values(self.interface, key)
        return values[-1] if values else None


def parse_profile(text, where):
    """Read a WireGuard profile (wg-quick's format plus eduVPN's ProxyEndpoint, a URL per
    [Peer]) into a WireGuardProfile. Raises UsageError naming `where` and the line: a line
    that is no setting, an unknown section, not one [Interface], two ProxyEndpoints in a peer,
    a ProxyEndpoint that is no server URL, or none at all (nothing for up to do)."""
    lines, sections = [], []
    for number, text_line in enumerate(text.splitlines(), 1):
        at = "%s, line %d" % (where, number)
        content = text_line.split("#", 1)[0].strip()  # wg and wg-quick: '#' to the line's end
        header = _PROFILE_SECTION.match(content)
        setting = _PROFILE_SETTING.match(content)
        if not content:
            lines.append(ProfileLine(text_line, len(sections) - 1))
        elif header:
            name = header.group(1).lower()
            if name not in ("interface", "peer"):
                raise UsageError("%s: unknown section [%s]: a WireGuard profile has [Interface] "
                                 "and [Peer] sections" % (at, header.group(1)))
            sections.append(name)
            lines.append(ProfileLine(text_line, len(sections) - 1, header=True))
        elif setting and sections:
            lines.append(ProfileLine(text_line, len(sections) - 1, key=setting.group(1).lower(),
                                     value=setting.group(2).strip()))
        elif setting:
            raise UsageError("%s: %r comes before the [Interface] section" % (at, content[:80]))
        else:
            raise UsageError("%s: %r is neither a [Section] nor 'Key = Value'"
                             % (at, content[:80]))
    if sections.count("interface") != 1:
        raise UsageError("%s: a WireGuard profile has one [Interface] section, this one %d"
                         % (where, sections.count("interface")))
    profile = WireGuardProfile(lines, sections, sections.index("interface"), [])
    for index, name in enumerate(sections):
        urls = profile.values(index, "proxyendpoint") if name == "peer" else []
        if len(urls) > 1:
            raise UsageError("%s: a [Peer] with %d ProxyEndpoint lines: one per peer"
                             % (where, len(urls)))
        if urls:
            try:
                url = ServerURL(urls[0])
            except UsageError as exc:  # ServerURL words its errors for --to
                raise UsageError("%s: ProxyEndpoint%s" % (where, str(exc)[len("--to"):]))
            profile.proxy_peers.append((index, url))
    if not profile.proxy_peers:
        raise UsageError("%s: no [Peer] has a ProxyEndpoint line, so there is no tunnel to run "
                         "(a plain WireGuard profile goes up with wg-quick alone)" % where)
    return profile


def rewrite_profile(profile, ports, listen_port, fwmark):
    """The profile as wg-quick (or NetworkManager, systemd-networkd) takes it: in each [Peer]
    of `ports` ({section index: the UDP port of its tunnel on 127.0.0.1}), the ProxyEndpoint
    line becomes `Endpoint = 127.0.0.1:PORT` and the portal's placeholder Endpoint goes;
    [Interface] gets `ListenPort` (where the tunnels send WireGuard's datagrams) and `FwMark`
    (the mark of the tunnels' TCP sockets: wg-quick's policy routing for AllowedIPs 0.0.0.0/0
    keeps marked packets out of the VPN) in place of its own, and PROFILE_DEFAULT_MTU unless it
    has an MTU. Every other line as written, comments, DNS, MTU and PersistentKeepalive too,
    and peers without a ProxyEndpoint."""
    out = []
    for line in profile.lines:
        if line.section == profile.interface and line.key in ("listenport", "fwmark"):
            continue
        if line.section in ports and line.key == "endpoint":
            continue
        if line.section in ports and line.key == "proxyendpoint":
            out.append("Endpoint = 127.0.0.1:%d" % ports[line.section])
            continue
        out.append(line.text)
        if line.header and line.section == profile.interface:
            out += ["ListenPort = %d" % listen_port, "FwMark = %d" % fwmark]
            if profile.setting("mtu") is None:
                out.append("MTU = %d" % PROFILE_DEFAULT_MTU)
    return "\n".join(out) + "\n"


# =============================================================================================
# Policies: deadlines, clocks, back-off, server choice, routes by path, refusal logs. No I/O:
# small objects that decide on time and state; tests drive them with a fake clock, and the
# socket code only carries out what they decide. Uses the sections above.
# =============================================================================================

# The policies:
#     Deadline    one moment for a whole handshake: every socket call of it (TCP connect, proxy
#                 CONNECT, TLS, the HTTP head) is armed with the time left, so a peer that
#                 trickles bytes cannot stretch it;
#     IdleClock   the time of the last data either way: both pumps touch it; the TCP->UDP pump
#                 waits in recv with the kernel's SO_RCVTIMEO and, woken early, waits again for
#                 what is left, so a tunnel closes --idle-timeout after its last data;
#     Backoff     the client's reconnect waits; ServerChoice, which of its servers is next;
#     RouteTable  which WireGuard a request's path goes to (--route, else --to);
#     CpuPlacement  which CPU up's threads share (--cpu), from /proc/stat's figures.
#     BusyPoll    whether a pump polls for its next datagram before it blocks (--busy-poll);
#     RoundTrips  whether a tunnel's datagrams go one at a time (a pump may poll only then);
#     LoneSchedule  how a pump's thread is scheduled: the kernel's way, the short slice while its
#                 round trips go one at a time (--sched-slice), real-time instead while its
#                 steps show the CPUs crowded (--rt-priority).
#     judge_leftovers  what up does with the runtime directories of earlier ups that were
#                 killed (WireGuard still up) or still run, before its own.


class Deadline:
    """One moment by which a whole multi-step operation must end (a handshake: TCP connect,
    proxy CONNECT, TLS, the HTTP upgrade).

    Every blocking socket call of the operation is armed with `timeout()`, the time left, so
    the operation ends at the deadline however the peer trickles its bytes (a per-call timeout
    restarts at every byte: a ClientHello sent a byte at a time then lasts for hours).
    """

    def __init__(self, seconds, clock=time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.at = clock() + seconds

    def remaining(self):
        return self.at - self.clock()

    def timeout(self):
        """The time left, for settimeout(); raises socket.timeout once it has passed."""
        left = self.remaining()
        if left <= 0:
            raise socket.timeout("timed out after %gs" % self.seconds)
        return left


class RefusalLog:
    """Which refused upgrade requests get an info line (a wrong path or a front that
    drops the Upgrade was logged at debug only): the first from a source address, then at most
    one per `interval`, which says how many were held back since the last. `admit(source)`
    returns None to hold this one back, or that count. Memory stays bounded: past
    `max_sources` addresses the one heard from longest ago is forgotten."""

    def __init__(self, interval=60.0, clock=time.monotonic, max_sources=1024):
        self.interval = interval
        self.clock = clock
        self.max_sources = max_sources
        self._sources = collections.OrderedDict()  # source: [time of its last line, held]
        self._lock = threading.Lock()  # handshake threads refuse at once

    def admit(self, source):
        now = self.clock()
        with self._lock:
            entry = self._sources.get(source)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return None
            held = entry[1] if entry is not None else 0
            self._sources[source] = [now, 0]
            self._sources.move_to_end(source)
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
            return held


class IdleClock:
    """When a tunnel has been idle for `timeout` seconds (0: never): no data either way.

    The pumps tell it when data crosses: `received()` from the peer, `sent()` to it (sent data
    counts once acknowledged, through TCP_USER_TIMEOUT). The reader waits at most `remaining()`
    and, woken early, waits again for what is left, so the tunnel closes `timeout` after the last data, not
    anywhere up to twice that (a fixed receive timeout restarts at every wait).
    """

    def __init__(self, timeout, clock=time.monotonic):
        self.timeout = timeout
        self.clock = clock
        # Each written by one pump: data from the peer (towards WireGuard), data to the peer.
        self.last_received = self.last_sent = clock()

    def received(self):
        self.last_received = self.clock()

    def sent(self):
        self.last_sent = self.clock()

    @property
    def last(self):
        """The time of the last data either way."""
        return max(self.last_received, self.last_sent)

    def remaining(self):
        """Seconds until idle (<= 0: idle now); None when there is no idle timeout."""
        if not self.timeout:
            return None
        return self.last + self.timeout - self.clock()

    def expired(self):
        remaining = self.remaining()
        return remaining is not None and remaining <= 0


class Keepalive:
    """When the client's next WebSocket ping is due: `interval` seconds (0: never) after the
    last traffic either way, data (the tunnel's IdleClock `idle`) or a ping of its own. Pings
    keep a front's idle timer awake; they are not data, so the IdleClock never hears of them.
    """

    def __init__(self, interval, idle):
        self.interval = interval
        self.idle = idle
        self.pinged = idle.clock()

    def ping_sent(self):
        self.pinged = self.idle.clock()

    def remaining(self):
        """Seconds until the next ping (<= 0: due now); None without keepalive."""
        if not self.interval:
            return None
        return max(self.idle.last, self.pinged) + self.interval - self.idle.clock()


def next_wake(*remaining):
    """The shortest of the waits that apply (None: does not), at least a microsecond, or 0
    (no wake: the socket waits for ever) when none does."""
    waits = [wait for wait in remaining if wait is not None]
    return max(min(waits), 0.000001) if waits else 0


class Backoff:
    """The client's reconnect waits: 1, 2, 4, 8, 10, 10 ... s after consecutive failures.

    `failed()` returns the next wait (or the server's Retry-After, when it sent one);
    `refused()` the longest wait, for what rarely heals in a second (a portal, a wrong URL, a
    certificate); `tunnel_ended(lived, idle)` starts over after a tunnel that was healthy
    (lived `stable` seconds, or ended by our own idle timeout) and returns 0, else counts a
    failure.
    """

    def __init__(self, waits=RETRY_WAITS, stable=STABLE_TUNNEL_SECONDS):
        self.waits = tuple(waits)
        self.stable = stable
        self.failures = 0

    def failed(self, retry_after=None):
        wait = self.waits[min(self.failures, len(self.waits) - 1)]
        self.failures += 1
        return wait if retry_after is None else retry_after

    def refused(self):
        self.failures += 1
        return self.waits[-1]

    def tunnel_ended(self, lived, went_idle=False):
        if went_idle or lived >= self.stable:
            self.failures = 0
            return 0
        return self.failed()


class ServerChoice:
    """Which of a peer's servers (several --to) the client tries next, and when.

    Each server has its own Backoff (`backoffs`) and the moment it may be tried again. A
    (re)connect tries them in order, starting with `current`, the one that carried the last
    tunnel, and skips those still waiting out their back-off; when all are, it waits for the
    first one due. A wait counts from the start of the attempt that failed: an attempt that
    spent its whole --connect-timeout without an answer (a path down) has waited already, so
    the next starts at once, and the path is found soon after it comes back.
    With one server this is the one Backoff of before.
    """

    def __init__(self, backoffs, clock=time.monotonic):
        self.backoffs = list(backoffs)
        self.clock = clock
        self.due = [clock()] * len(self.backoffs)
        self.current = 0

    def next(self):
        """(index, seconds to wait first): the server to try next."""
        now = self.clock()
        order = [(self.current + step) % len(self.due) for step in range(len(self.due))]
        index = next((index for index in order if self.due[index] <= now), None)
        if index is None:  # all wait: the first one due (in order among equals)
            index = min(order, key=lambda index: self.due[index])
        return index, max(0.0, self.due[index] - now)

    def failed(self, index, started, wait):
        """Server `index`'s attempt that began at `started` failed; its Backoff said `wait`."""
        self.due[index] = started + wait

    def carried(self, index):
        """Server `index` carries a tunnel: the next reconnect tries it first."""
        self.current = index

    def tunnel_ended(self, index, wait):
        """The tunnel through server `index` ended; its Backoff said `wait`, from now."""
        self.due[index] = self.clock() + wait


def path_down_timeout(rto):
    """The client's TCP_USER_TIMEOUT in seconds for a connection whose retransmission
    timeout is `rto` seconds (None: unknown): see PATH_DOWN_SECONDS."""
    return max(PATH_DOWN_SECONDS, PATH_DOWN_RTOS * (rto or 0))


def _parse_route(text):
    """--route PATH=HOST:PORT into (PATH without a trailing /, (host, port)); raises
    UsageError naming the value. HOST:PORT has no `=`, so the last one splits."""
    path, sep, address = text.strip().rpartition("=")
    if not sep or not _is_url_path(path):
        raise UsageError("--route %r: expected PATH=HOST:PORT with PATH a URL path from a / "
                         "(visible ASCII, no query), for example /proxyguard/node1=127.0.0.1:51820"
                         % text, option='--route')
    return path.rstrip("/") or "/", parse_host_port(address, "--route %s" % path)


class RouteTable:
    """Which WireGuard a request goes to, by its path (--route PATH=HOST:PORT, repeatable): a
    route takes its PATH and below it (the rules of check_path), the longest PATH first, so
    /pg/node1 wins over /pg for /pg/node1/x. A path no route takes goes to `fallback` (the
    server's --to) if there is one, at `fallback_path` (--path) and below only, else 404.
    Targets are whatever the caller gives (the server: resolved addresses); pure, no I/O.
    """

    def __init__(self, routes=(), fallback=None, fallback_path=None):
        self.routes = sorted(routes, key=lambda route: len(route[0].rstrip("/")), reverse=True)
        self.fallback = fallback
        self.fallback_path = fallback_path

    def find(self, target):
        """(route name, target) for a request target; raises HandshakeError(404). The route's
        name is its PATH, or DEFAULT_ROUTE for the fallback."""
        path = target.partition("?")[0]
        for prefix, wireguard in self.routes:
            if path_is_under(path, prefix):
                return prefix, wireguard
        if self.fallback is None:
            raise HandshakeError(404, "no tunnel at this path", routine=True)
        check_path(target, self.fallback_path)
        return DEFAULT_ROUTE, self.fallback

    def names(self):
        """Every route's name, the fallback's last (the metrics' label values)."""
        return list(self.entries())

    def entries(self):
        """{route name: (target, path limit)}, in names() order: a route's limit is its name,
        the fallback's is `fallback_path` (None: every path)."""
        entries = {path: (target, path) for path, target in self.routes}
        if self.fallback is not None:
            entries[DEFAULT_ROUTE] = (self.fallback, self.fallback_path)
        return entries

    def changes(self, new):
        """What the table `new` changes from this one (a SIGHUP's): the names of the routes
        (added, removed, changed), a changed one going to another target or path limit."""
        old, now = self.entries(), new.entries()
        return ([name for name in now if name not in old],
                [name for name in old if name not in now],
                [name for name in now if name in old and now[name] != old[name]])


class BusyPoll:
    """Whether one pump polls for its next data before it blocks, and for how long (see
    DEFAULT_BUSY_POLL_US). `budget` is in seconds; 0 never polls.

    `poll_for(lone, now)` before each wait: the seconds to poll (0: block at once); `lone` says
    the last batch was one datagram. Then `polled(found)` when the poll ended (`lost_cpu(now)`
    first if it ended crowded), or, after a blocking wait while `backed_off`, `blocked(waited)`
    with how long it took.
    """

    def __init__(self, budget):
        self.budget = budget
        self.misses = 0  # polls in a row that found nothing
        self.found = self.missed = self.crowded = 0  # polls in all, by their end (for tests)
        self.resume_at = None  # after a crowded poll: no poll before this time

    @property
    def backed_off(self):
        return self.misses >= BUSY_POLL_MISSES

    def poll_for(self, lone, now):
        if not lone or self.backed_off:
            return 0
        if self.resume_at is not None:
            if now < self.resume_at:
                return 0
            self.resume_at = None
        return self.budget

    def lost_cpu(self, now):
        """The poll just ended because a give-way kept it off the CPU for
        CROWDED_AFTER or longer: no poll for BUSY_POLL_CROWDED_SECONDS. Call it
        before `polled(False)`."""
        self.resume_at = now + BUSY_POLL_CROWDED_SECONDS
        self.crowded += 1

    def polled(self, found):
        if found:
            self.misses = 0
            self.found += 1
        else:
            self.misses += 1
            self.missed += 1

    def blocked(self, waited):
        if waited <= self.budget:  # a poll would have found it: try polling again
            self.misses = 0


# The two pumps of a tunnel, by where their data comes from (RoundTrips' sides).
FROM_PEER, FROM_WIREGUARD = 0, 1


class RoundTrips:
    """Whether a tunnel carries round trips one at a time, from what its two pumps report: a
    pump busy polls (BusyPoll) only then, when its last batch was one datagram, the other
    pump's too, and the other waits for data now. Beside a busy other pump (a window of
    datagrams in flight, a download and its lone ACKs) a poll would only take turns for the
    GIL from that pump. Each pump writes its own side only.

    `waits(side, lone)` just before `side`'s pump waits (`lone`: its last batch was one
    datagram) returns whether it may poll; `busy(side)` once its wait returned with data.
    """

    def __init__(self):
        self.lone = [False, False]
        self.waiting = [False, False]

    def waits(self, side, lone):
        self.lone[side] = lone
        self.waiting[side] = True
        other = 1 - side
        return lone and self.lone[other] and self.waiting[other]

    def busy(self, side):
        self.waiting[side] = False


# How a pump's thread is scheduled (LoneSchedule's levels, OwnSchedule carries them out).
KERNELS, SHORT_SLICE, REALTIME = "the kernel's", "the short slice", "real-time"


class Crowding:
    """Whether other work crowds the CPUs, as one process's pumps see it in their steps (from
    a wait's return to the next wait, while their round trips go one at a time), and so until
    when they take real-time priority (see DEFAULT_RT_PRIORITY): from the step that makes
    CROWDED_MIN_HELD, and CROWDED_SHARE of all, within CROWDED_WINDOW that were held off the
    CPU (CROWDED_AFTER or longer), for REALTIME_HOLD_SECONDS, and for as long again each time
    the hold runs out while `read_cpu` (None: not asked) says the CPUs were idle less than
    CROWDED_IDLE_SHARE of the time since it began; `read_cpu()` gives the (busy, idle) seconds
    of all CPUs so far, or None. One for the process (BusyPolling's), as the CPUs are: a pump
    whose own steps show little follows the others (measured: one pump in four saw enough on
    its own). Pumps call it in turn, a round trip's steps one after the other; two at once may
    lose a count, no more.

    At most `limit` pumps are real-time at once (`take_realtime()`, `give_realtime()`): a
    server whose 5,000 tunnels' handshakes crowded its own CPUs had 9,093 of its 10,004
    threads real-time, all woken at once by the teardown. (Two taking the last turn at once
    may both have it.)

    `stepped(held_off, now)` for each step; `now_crowded(now)`.
    """

    def __init__(self, read_cpu=None, limit=2):
        self._read_cpu = read_cpu
        self.limit = limit
        self.realtime_pumps = 0
        self.until = None
        self.cpu_mark = None  # read_cpu() when the hold began
        self.window = None  # when the steps counted began
        self.steps = self.held = 0
        self.found = self.kept = 0  # holds begun by steps, and again by busy CPUs (for tests)

    def stepped(self, held_off, now):
        if self.window is None or now - self.window >= CROWDED_WINDOW:
            self.window, self.steps, self.held = now, 0, 0
        self.steps += 1
        if held_off:
            self.held += 1
            if self.held >= CROWDED_MIN_HELD and self.held >= CROWDED_SHARE * self.steps:
                self._hold(now)
                self.found += 1
                self.window = None

    def _hold(self, now):
        self.until = now + REALTIME_HOLD_SECONDS
        self.cpu_mark = self._read_cpu() if self._read_cpu is not None else None

    def take_realtime(self):
        if self.realtime_pumps >= self.limit:
            return False
        self.realtime_pumps += 1
        return True

    def give_realtime(self):
        self.realtime_pumps -= 1

    def now_crowded(self, now):
        if self.until is None:
            return False
        if now < self.until:
            return True
        mark, self.until = self.cpu_mark, None
        if mark is not None:
            cpu = self._read_cpu()
            if cpu is not None:
                busy, idle = cpu[0] - mark[0], cpu[1] - mark[1]
                if busy + idle > 0 and idle < CROWDED_IDLE_SHARE * (busy + idle):
                    self._hold(now)
                    self.kept += 1
                    return True
        return False


class LoneSchedule:
    """How a pump's thread is scheduled, from its tunnel's round trips: KERNELS (at first, and
    for bulk); SHORT_SLICE from the first wait that RoundTrips calls one at a time (see
    DEFAULT_SCHED_SLICE_US) until SHORT_SLICE_KEPT_WAITS waits in a row are not; and REALTIME
    in SHORT_SLICE's place while the process's `crowding` (a Crowding; None: never real-time)
    says the CPUs are crowded (see DEFAULT_RT_PRIORITY), and then only at waits that
    RoundTrips calls one at a time: a miss falls back to the slice at once.

    Why the hold on the slice: a fast pinger's next request often comes while the other pump
    is still on its way back to its wait, and RoundTrips then says no for that one wait;
    without the hold a pump changed its slice about 900 times in 5,000 round trips behind two
    CPU hogs, a system call each, and woke behind the hogs after each drop. Why none on
    real-time: held as the slice is, a bulk flow's lone moments (its own traffic crowding the
    CPUs) kept the bench's loads real-time for 16 waits at a time, and cost TLS bulk 8 %.

    `wants(lone, now)` before each wait, with RoundTrips' verdict: the level the thread must
    take now, or None when it keeps its own; a pump that cannot have a real-time turn (the
    Crowding's limit) keeps the slice and asks again at its next wait. `leave()` at its end.
    """

    def __init__(self, crowding=None):
        self.crowding = crowding
        self.level = KERNELS
        self.not_lone = 0  # waits in a row that RoundTrips did not call one at a time

    def wants(self, lone, now):
        if lone:
            self.not_lone = 0
            level = self._lone_level(now)
        else:
            self.not_lone += 1
            level = self.level
            if level != KERNELS:
                level = (KERNELS if self.not_lone >= SHORT_SLICE_KEPT_WAITS
                         else SHORT_SLICE)
        return self._change(level)

    def leave(self):
        """The pump ends: KERNELS when its thread must get that back (None: it has it), its
        real-time turn given back to the Crowding."""
        return self._change(KERNELS)

    def _change(self, level):
        if level == self.level:
            return None
        if self.level == REALTIME:
            self.crowding.give_realtime()
        self.level = level
        return level

    def _lone_level(self, now):
        crowding = self.crowding
        if crowding is not None and crowding.now_crowded(now) and (
                self.level == REALTIME or crowding.take_realtime()):
            return REALTIME
        return SHORT_SLICE


def cpu_times(text, ticks):
    """Each CPU's cumulative (busy, idle) seconds from the text of /proc/stat (proc(5): the
    `cpuN` lines, in `ticks` a second): busy is the time tasks ran (user, nice, system; guest
    is counted in user already) or the hypervisor took (steal); idle is idle and iowait.
    Interrupt time (irq, softirq) counts as neither: much of it is our own traffic's, which
    follows the threads to any CPU (a kernel with CONFIG_IRQ_TIME_ACCOUNTING shows it there,
    not in our process's time), so counted as other work it would move them back and forth."""
    times = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        user, nice, system, idle, iowait, _, _, steal = [int(field)
                                                         for field in rest.split()[:8]]
        times[int(name[3:])] = ((user + nice + system + steal) / ticks, (idle + iowait) / ticks)
    return times


class CpuPlacement:
    """Which one CPU a ClientGroup's threads share (--cpu; see CPU_CHECK_SECONDS): `fixed` if
    given, for good; else first the highest-numbered of `cpus` (those the process may use: the
    first CPUs take most interrupts), then, after each `measured()`, the one where other work
    leaves the most room, when it leaves CPU_MOVE_MARGIN more than the current one.

    `measured(times, own)`: `times` each CPU's cumulative (busy, idle) seconds (cpu_times),
    `own` this process's cumulative CPU seconds, all spent on the current CPU. Compares with
    the previous call; returns the CPU to move to, or None to stay. `others` holds the last
    figures: each CPU's share of time busy with other work than this process's.
    """

    def __init__(self, cpus, fixed=None, margin=CPU_MOVE_MARGIN):
        self.cpus = sorted(cpus)
        self.fixed = fixed
        self.margin = margin
        self.current = fixed if fixed is not None else self.cpus[-1]
        self.others = {}
        self._last = None

    def measured(self, times, own):
        last, self._last = self._last, (times, own)
        if last is None or self.fixed is not None:
            return None
        before, own_before = last
        others = {}
        for cpu in self.cpus:
            if cpu not in times or cpu not in before:  # offline now or then
                continue
            busy = times[cpu][0] - before[cpu][0]
            total = busy + times[cpu][1] - before[cpu][1]
            if total <= 0:
                continue
            if cpu == self.current:
                busy -= own - own_before
            others[cpu] = min(1.0, max(0.0, busy / total))
        self.others = others
        if not others:
            return None
        best = min(others, key=lambda cpu: (others[cpu], -cpu))
        if self.current in others and others[self.current] - others[best] < self.margin:
            return None
        if best == self.current:
            return None
        self.current = best
        return best


# --- up after a crash: whose runtime directory is left, and what the next up does with it ----
# up's runtime directory (WgQuick) holds INTERFACE.conf (with the private key) and `owner`,
# which names the up that made it. An up killed hard (SIGKILL, the OOM killer, a crash) leaves
# the directory, and WireGuard up with wg-quick's routes, rules and DNS; then the next up of the
# profile would fail with wg-quick's "`eduvpn' already exists", and `wg-quick down eduvpn`
# looks in /etc/wireguard. So before its own, up judges what earlier ups left (judge_leftovers).

def process_start_time(stat_text):
    """A process's start, in clock ticks after boot, from the text of its /proc/PID/stat
    (proc(5), field 22), or None if it has ended and only waits to be reaped (state Z or X).
    The fields are counted after the last ')': the command name (field 2) may hold spaces and
    parentheses."""
    fields = stat_text.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class RuntimeOwner(collections.namedtuple("RuntimeOwner", "interface pid start netns")):
    """Who made an up's runtime directory, as its file `owner` says: the interface, the process
    (its pid, and its start in clock ticks after boot, process_start_time: a pid is reused, the
    pair is not) and its network namespace (the inode of /proc/PID/ns/net: the interface lives
    there, and every namespace of `ip netns exec` shares /run)."""

    __slots__ = ()

    def text(self):
        return "interface=%s pid=%d start=%d netns=%d\n" % self

    @classmethod
    def parse(cls, text):
        """The owner the file's `text` names, or None if it names none."""
        fields = dict(word.partition("=")[::2] for word in text.split())
        try:
            owner = cls(fields["interface"], int(fields["pid"]), int(fields["start"]),
                        int(fields["netns"]))
        except (KeyError, ValueError):
            return None
        return owner if WG_INTERFACE_NAME.match(owner.interface) else None


# A runtime directory an earlier up left: its owner, and whether the owner's process still runs.
Leftover = collections.namedtuple("Leftover", "directory owner alive")


def judge_leftovers(leftovers, interface, netns, interface_exists):
    """What up of `interface` in network namespace `netns` does, before wg-quick up, with the
    runtime directories of earlier ups (`leftovers`, Leftovers); `interface_exists(name)` says
    whether the namespace has that interface. Returns [(action, Leftover)]:
        'down'    an earlier up of this interface is gone and its WireGuard still up: wg-quick
                  down on its file (that undoes the routes, rules and DNS as wg-quick set
                  them), then remove its directory;
        'remove'  an earlier up is gone and so is its interface: remove its directory (the
                  private key);
        'keep'    an earlier up of another interface is gone, its WireGuard still up: its file
                  is what takes that down (the next up of its profile does), so it stays.
    Running ups of other interfaces, and directories of other namespaces (whose interfaces
    cannot be seen from here) are left alone. Raises FatalError (one line, what to do) if
    `interface` is up by a running up, or by anything but an earlier up."""
    actions = []
    taking_down = False  # one wg-quick down takes the interface away: later ones only remove
    for leftover in leftovers:
        owner = leftover.owner
        if owner.netns != netns:
            continue
        ours = owner.interface == interface
        if leftover.alive:
            if ours:
                raise FatalError("%s is up already, by proxyguard.py up (pid %d), which still "
                                 "runs: stop that one first (kill %d)"
                                 % (interface, owner.pid, owner.pid))
            continue
        if not interface_exists(owner.interface) or (ours and taking_down):
            actions.append(("remove", leftover))
        elif not ours:
            actions.append(("keep", leftover))
        else:
            actions.append(("down", leftover))
            taking_down = True
    if interface_exists(interface) and not taking_down:
        raise FatalError("interface %s exists already, and no proxyguard.py up of this profile "
                         "brought it up: take it down first (ip link del %s; wg-quick down "
                         "FILE if wg-quick brought it up from FILE), or copy the profile to "
                         "another name (the interface is named after the file)"
                         % (interface, interface))
    return actions


# =============================================================================================
# Sockets and error text: socket options, names, listeners, routes; one line per OS error
# Thin helpers over the socket module (and rtnetlink) that the channels, endpoints, server and
# client share, and describe_error, the one place an OSError becomes a line. Uses the above.
# =============================================================================================


def set_socket_buffers(sock):
    """Ask for large send and receive buffers; the kernel may give less, which is fine."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def _buffer_sizes(sock):
    """'receive 425984, send 425984': the socket's buffers as the kernel granted them."""
    return "receive %d, send %d" % (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def _prepare_tcp_socket(sock):
    """TCP_NODELAY: WireGuard carries TCP inside, and Nagle would add tens of milliseconds.
    (A socketpair in the tests is no TCP socket: it takes the buffers only.)"""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_socket_buffers(sock)


def retransmission_timeout(sock):
    """The kernel's retransmission timeout of a connected TCP socket in seconds (TCP_INFO's
    tcpi_rto, microseconds, after 8 bytes of state); None where it cannot say (not Linux, not
    TCP: a socketpair in the tests)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
        return struct.unpack_from("=I", info, 8)[0] / 1e6
    except (OSError, struct.error):
        return None


def _set_socket_timeout(sock, option, seconds):
    """Make recv (SO_RCVTIMEO) or send (SO_SNDTIMEO) on the blocking `sock` fail with EAGAIN
    after `seconds` of waiting (0: never).

    The kernel's options, not settimeout(): a Python socket with a timeout polls before every
    recv and send, one more system call and GIL hand-off per frame batch (measured: part of
    the round trip). Falls back to settimeout where the options fail (not Linux).
    """
    whole = int(seconds)
    micro = int((seconds - whole) * 1000000)
    if seconds and not (whole or micro):
        micro = 1  # a zero timeval means "never": round a tiny remainder up, not down
    # struct timeval is two native longs, or two 64-bit fields on 32-bit systems with a
    # 64-bit time_t: the kernel refuses the wrong size, so try both.
    for layout in ("ll", "qq"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack(layout, whole, micro))
            return
        except (OSError, struct.error):
            continue
    sock.settimeout(seconds or None)


def _is_socket_timeout(exc):
    """True for a timeout of our own (_set_socket_timeout), not the kernel's ETIMEDOUT: a
    blocking socket's SO_RCVTIMEO gives EAGAIN; settimeout gives TimeoutError without errno
    (since Python 3.10 the kernel's ETIMEDOUT is a TimeoutError too, with its errno)."""
    if isinstance(exc, BlockingIOError):
        return True
    return isinstance(exc, socket.timeout) and exc.errno is None


def _ascii_host(host):
    """`host` as bytes for getaddrinfo, which passes a str through the 'idna' codec: that
    needs unicodedata, which OpenWrt ships apart (python3-codecs), so a router without it
    cannot even resolve 127.0.0.1 ('unknown encoding: idna'). ServerURL has made an
    international name ASCII (its xn-- form) already."""
    return host.encode("ascii") if host is not None and host.isascii() else host


def _resolve_tcp(host, port, numeric=False):
    """[(family, sockaddr)] for a TCP connection to host:port; raises OSError (gaierror)."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    infos = socket.getaddrinfo(_ascii_host(host), port, type=socket.SOCK_STREAM, flags=flags)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _resolve_udp(address, option):
    """Resolve (host, port) for UDP once; return (sockaddr, family). Raises FatalError."""
    try:
        infos = socket.getaddrinfo(_ascii_host(address[0]), address[1], type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise FatalError("%s %s: cannot resolve: %s" % (option, format_address(address), exc))
    family, _, _, _, sockaddr = infos[0]
    return sockaddr, family


def _udp_port_taken(port):
    """True if a UDP socket holds 127.0.0.1:`port` (a bind of ours fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def open_listener(listen):
    """A listening TCP socket for (host, port); IPv6 `::` also takes IPv4. Raises FatalError."""
    host, port = listen
    try:
        infos = socket.getaddrinfo(_ascii_host(host), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family, backlog=512,
                                    dualstack_ipv6=(family == socket.AF_INET6
                                                    and address[0] == "::"))
    except OSError as exc:
        raise FatalError("cannot listen on %s: %s"
                         % (format_address(listen), describe_bind_error(exc, port, "tcp")))


def _listen_scope(sock):
    """What a wildcard address that `sock` is bound to takes, '' for any other: `--listen
    :443` binds every interface without a word otherwise."""
    host = sock.getsockname()[0]
    if host == "0.0.0.0":
        return "all interfaces, IPv4 only"
    if host == "::":
        if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            return "all interfaces, IPv6 only"
        return "all interfaces, IPv6 and IPv4"
    return ""


def _accept_until_stopped(accept, stopping, handle, prefix=""):
    """Give each connection `accept()` returns to `handle(sock, peer)` until `stopping()`
    (the owner's stop() closes the socket, which wakes a blocked accept). Out of descriptors
    or memory for now: log it, pause new connections for a second, and go on."""
    while not stopping():
        try:
            sock, peer = accept()
        except OSError as exc:
            if stopping():
                break
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("%saccept: %s; pausing new connections for 1s", prefix, exc.strerror)
                time.sleep(1)
            continue
        handle(sock, peer)


def _refuse_without_waiting(sock, status, message):
    """Answer `status` if the socket takes it at once, and close: for the accept thread, which
    must never block on one client."""
    try:
        sock.setblocking(False)
        sock.send(build_response(status, message, [("Retry-After", "10")]))
    except OSError:
        pass
    sock.close()


def describe_bind_error(exc, port, protocol):
    """Why a bind failed, with what to do, in one line: the port taken (and how to find who
    has it), a privileged port, an address this machine lacks. socket.create_server's own
    text ('... (while attempting to bind on address ...)') repeats the address."""
    if exc.errno == errno.EADDRINUSE:
        return ("the port is taken by another process (find it with: ss -l%snp 'sport = :%d')"
                % ("t" if protocol == "tcp" else "u", port))
    if exc.errno == errno.EACCES and port < 1024:
        return ("permission denied: a port below 1024 needs root or CAP_NET_BIND_SERVICE "
                "(proxyguard@.service: AmbientCapabilities=CAP_NET_BIND_SERVICE), or use a "
                "port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has this address"
    if exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)[:1].lower() + os.strerror(exc.errno)[1:]
    return describe_error(exc)


def describe_error(exc):
    """A short reason for a log line: 'connection reset by peer', 'certificate verify failed';
    any other exception (ours, for one) by its message."""
    if isinstance(exc, TLSFailed):
        return _describe_tls_error(exc.cause, exc.ca_file, exc.certificate_names,
                                  exc.plain_scheme)
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return _describe_tls_error(exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return strerror[:1].lower() + strerror[1:]
    return str(exc) or exc.__class__.__name__


# --- Routing loops: which interface the kernel routes the server through (as `ip route get`) ---
def route_interface(ip, mark=None):
    """The name of the interface the kernel sends packets to `ip` out of (with SO_MARK
    `mark`), or None where it cannot say (not Linux, no route, not an address)."""
    try:
        packed = ipaddress.ip_address(ip).packed
        family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
        attributes = ROUTE_ATTRIBUTE.pack(4 + len(packed), RTA_DST) + packed
        if mark is not None:
            attributes += ROUTE_ATTRIBUTE.pack(8, RTA_MARK) + struct.pack("=I", mark)
        body = ROUTE_MESSAGE.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + attributes
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
            sock.settimeout(1)
            sock.send(NETLINK_HEADER.pack(NETLINK_HEADER.size + len(body), RTM_GETROUTE,
                                          NLM_F_REQUEST, 1, 0) + body)
            reply = sock.recv(65536)
        length, kind = NETLINK_HEADER.unpack_from(reply)[:2]
        position = NETLINK_HEADER.size + ROUTE_MESSAGE.size
        while kind == RTM_NEWROUTE and position + ROUTE_ATTRIBUTE.size <= min(length, len(reply)):
            size, attribute = ROUTE_ATTRIBUTE.unpack_from(reply, position)
            if attribute == RTA_OIF:
                return socket.if_indextoname(struct.unpack_from("=I", reply, position + 4)[0])
            if size < ROUTE_ATTRIBUTE.size:
                break
            position += (size + 3) & ~3
    except (OSError, ValueError, AttributeError, struct.error):
        pass
    return None


def tunnel_interface_kind(name, sys_net="/sys/class/net", wireguard_run=WIREGUARD_RUN_DIR):
    """'a WireGuard interface' (the kernel's, or wireguard-go's), 'a tunnel interface' (TUN:
    another VPN), or None for any other interface."""
    try:
        with open(os.path.join(sys_net, name, "uevent")) as stream:
            if "DEVTYPE=wireguard" in stream.read().split():
                return "a WireGuard interface"
    except OSError:
        pass
    if os.path.exists(os.path.join(wireguard_run, name + ".sock")):
        return "a WireGuard interface"
    if os.path.exists(os.path.join(sys_net, name, "tun_flags")):
        return "a tunnel interface (a VPN?)"
    return None


def routing_loop_hint(ip, lookup=route_interface, kind=tunnel_interface_kind):
    """What to do when the route to the server's `ip` goes into a WireGuard (or other
    tunnel) interface: the tunnel's own connection would go into the tunnel (with
    AllowedIPs = 0.0.0.0/0 and no --fwmark, a plain 'timed out'). None when it does not."""
    name = lookup(ip)
    what = kind(name) if name else None
    if what is None:
        return None
    return ("the route to %s goes through %s, %s: the tunnel's own connection would loop "
            "into the tunnel; add --fwmark 51820 (wg-quick's FwMark; or --peer-ips with a host "
            "route to the server outside the tunnel)" % (ip, shown(name, 40), what))


def _check_fwmark(mark):
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
# TLS: the ssl module (imported at first use), contexts, certificate files, handshake errors
# Everything that knows OpenSSL but the channel: contexts from the options, PEM checks, and
# what a failed handshake most likely means. Uses errors and sockets' error text.
# =============================================================================================


def tls():
    """Python's ssl module, imported now if it was not: every TLS path starts here (a
    context, a TLSChannel). Raises UsageError when this Python has none."""
    global ssl
    if ssl is None:
        try:
            import ssl as module
        except ImportError as exc:
            raise UsageError("https://, wss:// and --tls-cert need Python's ssl module, which "
                             "this Python lacks (%s): on OpenWrt, opkg install python3-openssl"
                             % exc)
        ssl = module
    return ssl


# The most a certificate, key or CA file may hold (the system CA bundle is about 200 KiB).
MAX_PEM_FILE_BYTES = 10 * 1024 * 1024
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_ANY_CERTIFICATE = re.compile(rb"-----BEGIN (TRUSTED |X509 )?CERTIFICATE-----")
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9]+ )?PRIVATE KEY-----")
_PEM_ENCRYPTED_KEY = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED")


def _load_tls_files(context, error, cert_file=None, key_file=None, ca_file=None):
    """Load `cert_file` and `key_file` (the key may be in `cert_file`), or the CA certificates
    in `ca_file`, into `context`. Checks step by step, so that a failure raises `error`
    (UsageError or FatalError) with one line naming the option, the file and the problem,
    not OpenSSL's 'PEM lib'."""
    cert_option = "--tls-cert %r" % cert_file
    key_option = "--tls-key %r" % key_file if key_file else cert_option
    ca_option = "--ca-file %r" % ca_file
    names = {cert_option: "--tls-cert", key_option: "--tls-key" if key_file else "--tls-cert",
             ca_option: "--ca-file"}

    def fail(option, message):  # the error, with the option's name for _name_source
        return error(message, option=names[option])

    def read(option, path):
        try:
            with open(path, "rb") as stream:
                data = stream.read(MAX_PEM_FILE_BYTES + 1)
        except OSError as exc:
            raise fail(option, "%s: %s" % (option, describe_error(exc)))
        if len(data) > MAX_PEM_FILE_BYTES:
            raise fail(option, "%s: over %d MiB, not a PEM file"
                        % (option, MAX_PEM_FILE_BYTES // (1024 * 1024)))
        return data

    def no_certificate(option, data, what="certificate"):
        if _PEM_ANY_CERTIFICATE.search(data):
            return damaged(option)
        hint = " (it looks like DER: convert it with openssl x509 -inform der)" if (
            data[:1] == b"\x30") else ""
        return fail(option, "%s: no PEM %s in the file%s" % (option, what, hint))

    def damaged(option):  # OpenSSL only says 'PEM lib' or 'no start line'
        return fail(option, "%s: a certificate in the file is damaged (cut short, or not valid "
                     "base64 or DER)" % option)

    def words(exc):  # '[X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3926)'
        return re.sub(r"^\[[^]]*\] | \(_ssl\.c:\d+\)$", "", str(exc))

    if ca_file:
        option = ca_option
        data = read(option, ca_file)
        if not _PEM_ANY_CERTIFICATE.search(data):
            raise no_certificate(option, data, "CA certificate")
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            raise damaged(option)
        except OSError as exc:  # the file went away under us
            raise fail(option, "%s: %s" % (option, describe_error(exc)))
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
        raise fail(key_option, "%s: no private key in the file%s" % (
            key_option, "" if key_file else " (give the key with --tls-key)"))
    encrypted = fail(key_option, "%s: the private key is encrypted; give it without a "
                     "passphrase (openssl pkey -in KEY -out PLAIN_KEY)" % key_option)
    if _PEM_ENCRYPTED_KEY.search(key_data):
        raise encrypted

    def no_passphrase():  # never let OpenSSL ask on the terminal (SIGHUP in a service)
        raise encrypted

    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise fail(key_option,
                       "%s does not match the certificate in %s" % (key_option, cert_option))
        if exc.reason in ("EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK"):
            raise fail(cert_option, "%s: OpenSSL refuses it as too weak (%s): use RSA 2048 or "
                       "more, or EC, signed with SHA-256" % (cert_option, words(exc)))
        raise fail(key_option, "%s: cannot load the private key (%s)" % (key_option, words(exc)
                   if exc.reason else "damaged, or in a format OpenSSL cannot read"))
    except OSError as exc:  # a file went away under us
        raise fail(cert_option, "%s / %s: %s" % (cert_option, key_option, describe_error(exc)))


def client_tls_context(ca_file=None, min_version="1.3"):
    """Verify certificate and host name against the system store (plus `ca_file`); ALPN
    http/1.1 only, since HTTP/2 has no Upgrade. Raises UsageError for a bad CA file."""
    context = tls().create_default_context()
    _load_tls_files(context, UsageError, ca_file=ca_file)
    context.minimum_version = getattr(ssl.TLSVersion, TLS_VERSIONS[min_version])
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_tls_context(cert_file, key_file):
    """The server's context; `num_tickets = 0` spares the post-handshake ticket traffic.
    Raises FatalError, naming the file and the problem, when the files cannot be loaded."""
    context = tls().SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_tls_files(context, FatalError, cert_file=cert_file, key_file=key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.num_tickets = 0
    return context


TLS_VERSIONS = {"1.2": "TLSv1_2", "1.3": "TLSv1_3"}  # --tls-min-version: ssl.TLSVersion's

# OpenSSL's verify codes of a certificate whose names do not include the URL's host.
X509_HOSTNAME_MISMATCH = 62
X509_IP_ADDRESS_MISMATCH = 64


def certificate_names(cert):
    """'localhost, 127.0.0.1': the DNS names and IP addresses of a decoded certificate's
    subjectAltName (what a host name is checked against)."""
    names = [value for kind, value in (cert or {}).get("subjectAltName", ())
             if kind in ("DNS", "IP Address")]
    return ", ".join(shown(name, 100) for name in names) if names else "no DNS or IP names"


# What a failed TLS handshake most likely means, for the one-line error.
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


def _describe_tls_error(exc, ca_file=None, certificate_names=None, plain_scheme="http"):
    """describe_error's line for an ssl.SSLError, with the Dialer's knowledge (see TLSFailed)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc.reason)
        key, hint = next(((key, hint) for key, hint in _CERTIFICATE_HINTS
                          if key in message.lower()), (None, ""))
        if ca_file and key in ("local issuer", "self-signed"):
            hint = (" (the certificate is not signed by a CA in --ca-file %s nor the system "
                    "store)" % ca_file)
        if certificate_names and key in ("hostname mismatch", "ip address mismatch"):
            hint = hint[:-1] + ", which names: %s)" % certificate_names
        return "TLS certificate not accepted: %s%s" % (message, hint)
    reason = exc.reason or str(exc)
    hint = _TLS_HINTS.get(reason, "").replace("http://", "%s://" % plain_scheme)
    return "TLS handshake failed: %s%s" % (reason, hint)  # wss:// to a plain port: ws://


def describe_tls(channel):
    """'TLSv1.3, CN=vpn.example.org, issuer CN=..., expires ... (in N days)' for check."""
    cert = channel.peer_certificate() or {}
    def name(field):
        return ", ".join("%s=%s" % (key, shown(value, 100))
                         for rdn in cert.get(field, ()) for key, value in rdn)
    text = "%s, subject %s, issuer %s" % (channel.tls_version, name("subject"), name("issuer"))
    if "notAfter" in cert:
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
        text += ", expires %s (in %s)" % (cert["notAfter"],
                                          plural((expires - time.time()) // 86400, "day"))
    return text


# =============================================================================================
# Channels: a connected TCP stream, plain or TLS, safe for one reader and one writer thread
# PlainChannel and TLSChannel (OpenSSL kept single-threaded per connection), and the readers
# of an HTTP head or body from a channel. Uses sockets, TLS and the pure protocol.
# =============================================================================================

# TLS with two threads on one connection: OpenSSL does not allow SSL_read and SSL_write on one
# SSL object from two threads at once (openssl issues 20446, 20622: "by design"), TLS 1.3 makes
# reads write and writes read (session tickets, KeyUpdate), and CPython does not serialize them
# (a lock added in 3.13.6 deadlocked and was removed: cpython issues 137583, 143756). A shared
# SSLSocket, read by one pump and written by the other, corrupted records here (5 of 30
# connections died with DECRYPTION_FAILED_OR_BAD_RECORD_MAC; a test shows it with
# PROXYGUARD_TEST_NAIVE_TLS=1). So `TLSChannel` keeps OpenSSL single-threaded per connection: an
# SSLObject over two MemoryBIOs (as urllib3's SSLTransport and trio's SSLStream), the handshake
# done before the pumps start, a lock held only for CPU work (never across recv or sendall),
# and a second lock that keeps ciphertext in order on the wire; a reader that must write (a
# KeyUpdate answer) never blocks behind a writer stuck in sendall. Teardown: never close a
# socket another thread is blocked on: shut it down, join, then close.


class PlainChannel:
    """A plain TCP connection as a byte stream.

    Contract (shared by TLSChannel): one thread may block in `recv` while another blocks in
    `sendall`; `recv` returns b"" at end of stream; `shutdown()` may be called from any thread,
    any number of times, and wakes both; `close()` only once no thread uses the channel.

    While `deadline` (a Deadline) is set, during a handshake, every socket call is armed with
    the time left and raises socket.timeout once it has passed. A tunnel clears it.
    """

    tls_version = None

    def __init__(self, sock, deadline=None):
        self.sock = sock
        self.deadline = deadline

    def recv(self, size):
        if self.deadline is not None:
            self.sock.settimeout(self.deadline.timeout())
        return self.sock.recv(size)

    def recv_into(self, view):
        """As recv, into the writable `view`; returns the byte count (0 at end of stream)."""
        if self.deadline is not None:
            self.sock.settimeout(self.deadline.timeout())
        return self.sock.recv_into(view)

    def sendall(self, data):
        if self.deadline is not None:
            self.sock.settimeout(self.deadline.timeout())
        self.sock.sendall(data)

    def send_without_waiting(self, data):
        """Send what the socket takes of `data` now, never blocking (a WebSocket close frame
        just before shutdown: better whole or nothing, but never a wait)."""
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass

    def buffered(self):
        """Whether a read would find data without the socket (never, in plain TCP)."""
        return False

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
    in order on the wire (see this section's opening). The deadline arms every socket call, the TLS
    handshake's included, as in PlainChannel.
    """

    def __init__(self, sock, context, server_side, server_hostname=None, deadline=None):
        super().__init__(sock, deadline)
        self._incoming = tls().MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # As bytes: ssl passes a str through the 'idna' codec, which a router may lack.
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=_ascii_host(server_hostname))
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def handshake(self):
        """Run the TLS handshake in the calling thread; raises OSError (ssl.SSLError,
        socket.timeout at the deadline)."""
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
        data = PlainChannel.recv(self, TCP_READ_SIZE)
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
            PlainChannel.sendall(self, data)

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
        return self._read(size, None, b"")

    def recv_into(self, view):
        return self._read(len(view), view, 0)

    def _read(self, size, view, end_of_stream):
        while True:
            with self._tls_lock:
                try:
                    data = self._tls.read(size, view)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = end_of_stream
                produced = self._outgoing.pending
            if produced:
                self._flush_without_waiting()
            if data is not None:
                return data
            self._receive_ciphertext()

    def buffered(self):
        """Whether plaintext, or ciphertext not yet decrypted, waits in the TLS object."""
        with self._tls_lock:
            return bool(self._tls.pending() or self._incoming.pending)

    def sendall(self, data):
        view = memoryview(data)
        with self._tls_lock:
            while view:
                written = self._tls.write(view)
                view = view[written:]
        self._flush()

    def send_without_waiting(self, data):
        if not self._send_lock.acquire(blocking=False):  # a writer is sending: no wait
            return
        try:
            with self._tls_lock:
                self._tls.write(data)
                ciphertext = self._outgoing.read()
            PlainChannel.send_without_waiting(self, ciphertext)
        except (OSError, ValueError):  # ssl.SSLError; ValueError once the socket is closed
            pass
        finally:
            self._send_lock.release()


def _read_head(channel, limit=MAX_HEAD_BYTES, sniff=(b"\x16",)):
    """Read from `channel` until a whole HTTP head arrived; return (head, bytes after it).

    The channel's deadline bounds the whole read. Raises HandshakeError(431) past `limit`
    bytes, HandshakeError(408) at the deadline, and ClosedEarly when the peer closes first.
    `sniff`: see HeadReader.
    """
    reader = HeadReader(limit, sniff)
    while True:
        try:
            data = channel.recv(4096)
        except socket.timeout:
            raise HandshakeError(408, "the HTTP head did not arrive in time (%d bytes came)"
                                 % reader.received)
        if not data:
            raise ClosedEarly(reader.received)
        parts = reader.feed(data)
        if parts is not None:
            return parts


def _read_response_head(channel):
    """_read_head for the client side: a missing answer is a connection error, not a 408; a
    TLS alert comes back at once as the head."""
    try:
        return _read_head(channel, sniff=TLS_RECORD_STARTS)
    except HandshakeError as exc:
        raise ConnectionError("no valid answer: %s" % exc)


def _head_line(head):
    """An HTTP head on one log line: 'GET / HTTP/1.1 | Host: x | ...', each line shown."""
    lines = head.decode("latin-1").strip().split("\n")  # a bare CR stays in its line, shown
    return " | ".join(shown(line.rstrip("\r")) for line in lines)


def _read_body(channel, response, rest, limit=MAX_BODY_SHOWN):
    """The start of a refusal's body, at most `limit` bytes of its Content-Length, within the
    channel's deadline; what came when the peer closes or the time is up. Never raises: the
    status says what matters, the body only adds the server's words."""
    length = response.get("content-length", "")
    if not length.isdigit() or response.get("transfer-encoding") is not None:
        return b""
    wanted = min(int(length), limit)
    body = bytearray(rest[:wanted])
    while len(body) < wanted:
        try:
            data = channel.recv(wanted - len(body))
        except OSError:
            break
        if not data:
            break
        body += data
    return bytes(body)


# =============================================================================================
# UDP endpoints: the tunnel's side towards WireGuard
# TunnelUdpEndpoint (the server's, one connected socket per tunnel) and SharedUdpEndpoint (the
# client's, one socket for the whole run): receive in batches, send in GSO runs, count datagrams.
# =============================================================================================

# After a drain of the UDP socket that found nothing, this many receives skip the drain.
SKIP_DRAINS = 4


class UdpEndpoint:
    """WireGuard's side of a tunnel: a UDP socket, and where datagrams for WireGuard go.

    Contract for Tunnel: `receive_frames(view)` blocks until datagrams wait or `wake()` is
    called (any thread), writes the non-empty datagrams waiting into `view` as frames, and
    returns (bytes written, frame count); (0, 0) after a wake, or for an empty datagram, which
    the original drops too; the caller checks why it was woken (a wake may be stale: one meant
    for an earlier tunnel). `send(datagram)` sends one;
    `send_segments(datagrams)` sends several of one size in one system call if it can;
    `release()` is called once the tunnel is done with it.
    An ICMP port unreachable (WireGuard down or restarting) is no error either way: it is
    warned about once (`refused_message()`), and again only after WireGuard answered, never
    per datagram.
    Subclasses say how to wait for the first datagram, where replies go, and how to wake;
    their receives return None for a wake.
    """

    def __init__(self, sock):
        self.sock = sock
        self.refused = False  # warned that nothing listens; cleared when WireGuard answers
        self.gso = None  # UDP GSO: None until the first send_segments asks the kernel
        self._skip_drains = 0

    def fileno(self):
        return self.sock.fileno()

    def receive_frames(self, view, limit=UDP_BATCH_BYTES, framing=None):
        """Wait for a datagram, then take the ones already waiting too, while fewer than
        `limit` bytes are written: each goes into `view` as a frame, in place (no bytes object
        per datagram, no join): UoTLV/1's [length][datagram], or, given a `framing` with a
        `head` (WebSocketFraming), each datagram lands `framing.room` bytes on and
        `framing.head(view, pos, size)` writes its frame's header and returns where the frame
        ends. `view` holds `limit` bytes plus one largest frame."""
        head = framing.head if framing is not None else None
        room = framing.room if head is not None else 2
        try:
            size = self._receive_first_into(view[room:])
        except (BlockingIOError, InterruptedError):
            return 0, 0
        except ConnectionRefusedError:
            self._refused()
            return 0, 0
        if size is None:
            return 0, 0
        end = count = 0
        if size:
            if head is None:
                FRAME_HEADER.pack_into(view, 0, size)
                end = size + 2
            else:
                end = head(view, 0, size)
            count = 1
        # A drain that finds nothing (one datagram at a time: a ping, an interactive flow)
        # costs a system call and a BlockingIOError: after one, the next few receives skip it.
        if self._skip_drains:
            self._skip_drains -= 1
            return end, count
        receive = self._receive_waiting_into
        found = False
        while end < limit:
            try:
                size = receive(view[end + room:])
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:  # ICMP from an earlier send: WireGuard not up yet
                self._refused()
                continue
            found = True
            if size is None:  # a wake: the datagrams behind it are perhaps the next tunnel's
                break
            if size:
                if head is None:
                    FRAME_HEADER.pack_into(view, end, size)
                    end += size + 2
                else:
                    end = head(view, end, size)
                count += 1
        if not found:
            self._skip_drains = SKIP_DRAINS
        return end, count

    def send(self, datagram):
        self._send_past_refusal(self._send, datagram)

    def _send_past_refusal(self, send, *args):
        """`send(*args)`, and once more if it raises ConnectionRefusedError: that error is an
        earlier datagram's ICMP port unreachable (WireGuard down or restarting), which Linux
        reports on the next send instead of sending it, and clears (sock_error() in
        sock_alloc_send_pskb). Without the second try the first datagram after WireGuard comes
        back would be lost; while it is still down, the datagram draws its own ICMP."""
        try:
            send(*args)
        except ConnectionRefusedError:
            self._refused()
            try:
                send(*args)
            except ConnectionRefusedError:
                pass

    def _refused(self):
        """A receive or send raised ConnectionRefusedError: an ICMP port unreachable."""
        self._nothing_listens()

    def _nothing_listens(self):
        # The server swallowed these without a word.
        if not self.refused:
            self.refused = True
            log.warning("%s", self.refused_message())

    def send_datagrams(self, datagrams):
        """Send each datagram to WireGuard; a run of one size goes in one system call (GSO).
        Returns (datagrams sent, their bytes, the sizes of those dropped as too big for one
        UDP datagram, or None): the tunnel adds them up."""
        count = len(datagrams)
        sent = sent_bytes = 0
        too_big = None
        i = 0
        while i < count:
            datagram = datagrams[i]
            size = len(datagram)
            if count - i > 1 and size and self.gso is not False:
                # The run: datagrams of this size, then perhaps one shorter (GSO allows it).
                j = i + 1
                total = size
                stop = min(count, i + GSO_SEGMENTS)
                while j < stop and len(datagrams[j]) == size and total + size <= GSO_BYTES:
                    total += size
                    j += 1
                if j < stop and 0 < len(datagrams[j]) < size and (
                        total + len(datagrams[j]) <= GSO_BYTES):
                    total += len(datagrams[j])
                    j += 1
                if j - i > 1 and self.send_segments(datagrams[i:j]):
                    sent += j - i
                    sent_bytes += total
                    i = j
                    continue
            i += 1
            try:
                self.send(datagram)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                too_big = (too_big or []) + [size]  # dropped; the next goes on
                continue
            sent += 1
            sent_bytes += size
        return sent, sent_bytes, too_big

    def send_segments(self, datagrams):
        """Send `datagrams`, all of one size but the last, which may be shorter (at most
        GSO_SEGMENTS of them, GSO_BYTES in all), in one system call: UDP GSO, and the kernel
        cuts them apart again. Returns False, having sent nothing, where the kernel cannot
        (before Linux 4.18, or a route it refuses): the caller sends them one by one, and this
        endpoint stops trying."""
        if self.gso is None:
            # Ask first: a kernel without GSO ignores the control message, and would send
            # all the datagrams as one.
            try:
                self.sock.getsockopt(SOL_UDP, UDP_SEGMENT)
                self.gso = True
            except OSError:
                self.gso = False
        if not self.gso:
            return False
        try:
            self._send_past_refusal(
                self._send_segments, datagrams,
                [(SOL_UDP, UDP_SEGMENT, SEGMENT_SIZE.pack(len(datagrams[0])))])
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EMSGSIZE):
                raise
            self.gso = False
            return False
        return True


class TunnelUdpEndpoint(UdpEndpoint):
    """The server's UDP socket for one tunnel, connected to WireGuard (so WireGuard sees one
    source port per client). `wake()` shuts it down, which makes a blocked recv return at once
    (defined for connected UDP sockets); `release()` closes it. `label` names the tunnel in
    its warning that nothing listens on `destination`."""

    def __init__(self, sock, destination=None, label="a tunnel"):
        super().__init__(sock)
        self.destination = destination  # WireGuard's address, for the warning
        self.label = label

    @classmethod
    def connected(cls, address, family, label="a tunnel"):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            set_socket_buffers(sock)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return cls(sock, address, label)

    def refused_message(self):
        return ("%s: nothing listens on %s (--to): is WireGuard up?"
                % (self.label, format_address(self.destination)))

    def _receive_first_into(self, view):
        size = self.sock.recv_into(view, MAX_FRAME_PAYLOAD)
        self.refused = False  # WireGuard answered: warn again if it goes away
        return size

    def _receive_waiting_into(self, view):
        return self.sock.recv_into(view, MAX_FRAME_PAYLOAD, socket.MSG_DONTWAIT)

    def _send(self, datagram):
        self.sock.send(datagram)

    def _send_segments(self, datagrams, control):
        self.sock.sendmsg(datagrams, control)

    def wake(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def release(self):
        self.sock.close()


class SharedUdpEndpoint(UdpEndpoint):
    """The client's one UDP socket on 127.0.0.1:<listen-port>, used by one tunnel after
    another for the whole run, so it is never shut down (that would end it for good).

    Replies go to `send_to` (WireGuard's ListenPort); a datagram from another port is warned
    about once. `wait()` serves the client's connector (lazy connect, back-off sleeps): it
    polls beside a wake pipe. The tunnel's UDP pump blocks in recvfrom; `wake()` writes the
    pipe and sends the socket an empty datagram from itself, the wake datagram (WAKE
    DATAGRAMS below). `rearm()` forgets earlier wakes; `close()` at the end of the client.
    """

    # WAKE DATAGRAMS. The UDP pump waits in recvfrom itself, not in poll beside the pipe and
    # then recvfrom: one system call per wake-up instead of two, each of which hands the GIL
    # over. A wake datagram is empty and comes from the socket's own address (no datagram
    # from WireGuard or anyone else can): receives take it for a wake (None), so it never
    # reaches WireGuard, counts nowhere and draws no "datagrams arrive from" warning. Not a
    # second socket: its ephemeral port could be WireGuard's ListenPort (51820 is in Linux's
    # range). One left unread (its tunnel's pump had stopped already) is stale: the next
    # tunnel's pump reads it while its own close_reason is None (Tunnel.close sets that before
    # it wakes) and goes on; it ends a drain, so the datagrams behind it wait for the next
    # receive; and the connector's wait() takes one off the head of the queue without
    # connecting. Dropped for a full receive buffer, it is not needed: the pump has datagrams
    # to read and checks close_reason after them (its channel is shut down already).

    def __init__(self, sock, send_to):
        super().__init__(sock)
        self.send_to = send_to
        self.warned_source = None
        self._own_address = sock.getsockname()  # where wake datagrams come from
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._close_lock = threading.Lock()  # a late wake() must not write to a reused fd
        # poll, not select: select fails for descriptor numbers of 1024 and more.
        self._wake_poller = select.poll()
        self._wake_poller.register(self._wake_read, select.POLLIN)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)

    @classmethod
    def bind(cls, listen_port, forward_port):
        """The socket on 127.0.0.1:listen_port; raises FatalError (port taken)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            set_socket_buffers(sock)
            sock.bind(("127.0.0.1", listen_port))
            # Linux tells an unconnected UDP socket of an ICMP port unreachable only with
            # IP_RECVERR (udp(7)): how the client learns that nothing listens on
            # --forward-port. The errors then wait in a queue that wait() drains, or
            # _refused() when a receive or send raises ECONNREFUSED.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        except OSError as exc:
            sock.close()
            swapped = ""
            if exc.errno == errno.EADDRINUSE and not _udp_port_taken(forward_port):
                # WireGuard holds its ListenPort, and nothing holds --forward-port.
                swapped = ("; if WireGuard listens there, --listen-port %d and --forward-port "
                           "%d are swapped: --listen-port is the port WireGuard's Endpoint "
                           "names, --forward-port its ListenPort" % (listen_port, forward_port))
            raise FatalError("cannot listen on 127.0.0.1:%d (UDP): %s%s"
                             % (listen_port, describe_bind_error(exc, listen_port, "udp"),
                                swapped))
        return cls(sock, ("127.0.0.1", forward_port))

    @property
    def address(self):
        return self.sock.getsockname()

    def wait(self, timeout=None, for_datagram=True):
        """Wait until a datagram waits (True) or a wake or `timeout` (seconds) comes (False).
        With `for_datagram` false, only a wake or the timeout ends the wait (a sleep)."""
        poller = self._poller if for_datagram else self._wake_poller
        deadline = None if timeout is None else Deadline(timeout)
        while True:
            events = poller.poll(None if deadline is None
                                 else max(0.0, deadline.remaining()) * 1000)
            if not events or any(fd == self._wake_read for fd, _ in events):
                return False
            # A queued error polls true until read, so it is read first, also beside a
            # datagram: left for later, an ICMP from before WireGuard came back would be
            # taken for a new outage after its first answer (a second warning). Nothing
            # queued (a pending error only) is for the caller's recvfrom to raise.
            errors = any(mask & select.POLLERR for _, mask in events) and self._read_errors()
            readable = any(mask & select.POLLIN for _, mask in events)
            if readable and self._took_stale_wake():
                continue
            if not errors or readable:
                return True

    def _took_stale_wake(self):
        """Whether the datagram at the head of the queue was a wake datagram, now read: one
        that a tunnel's pump left (wait() runs between tunnels), no reason to connect."""
        try:
            _, source = self.sock.recvfrom(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if source != self._own_address:
                return False
            self.sock.recvfrom(1, socket.MSG_DONTWAIT)
        except OSError:  # gone meanwhile, or an error: the caller's receive sees what is there
            return False
        return True

    def _refused(self):
        # The ICMP also waits in the error queue: read it now, as no poll will see it for us.
        self._nothing_listens()
        self._read_errors()

    def _read_errors(self):
        """Drain the socket's error queue (IP_RECVERR); a port unreachable there means that
        nothing listens on --forward-port. Returns whether there was anything to read."""
        read = False
        while True:
            try:
                _, ancillary, _, _ = self.sock.recvmsg(1, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except OSError:  # empty (EAGAIN), or no error queue on this system
                return read
            read = True
            for _, _, data in ancillary:
                if (len(data) >= EXTENDED_ERROR.size
                        and EXTENDED_ERROR.unpack_from(data)[0] == errno.ECONNREFUSED):
                    self._nothing_listens()

    def _receive_first_into(self, view):
        return self._receive_into(view, 0)

    def _receive_waiting_into(self, view):
        return self._receive_into(view, socket.MSG_DONTWAIT)

    def _receive_into(self, view, flags):
        """One datagram into `view`: its size, or None for a wake datagram."""
        size, source = self.sock.recvfrom_into(view, MAX_FRAME_PAYLOAD, flags)
        if source[1] == self.send_to[1]:
            self.refused = False  # WireGuard answered from its ListenPort
        elif source == self._own_address:
            return None
        else:
            self._warn_source(source)
        return size

    def _send(self, datagram):
        self.sock.sendto(datagram, self.send_to)

    def refused_message(self):
        return ("nothing listens on %s (--forward-port): is WireGuard up, with ListenPort = %d?"
                % (format_address(self.send_to), self.send_to[1]))

    def _send_segments(self, datagrams, control):
        self.sock.sendmsg(datagrams, control, 0, self.send_to)

    def _warn_source(self, source):
        """Once per source: WireGuard sends from a port other than --forward-port."""
        if source != self.warned_source:
            self.warned_source = source
            log.warning("datagrams arrive from %s, but replies go to %s: set ListenPort = "
                        "%d in WireGuard's [Interface] (or --forward-port to its port)",
                        format_address(source), format_address(self.send_to),
                        self.send_to[1])

    def wake(self):
        with self._close_lock:
            if self._wake_write is None:  # closed: nobody waits any more
                return
            try:
                os.write(self._wake_write, b"x")
            except BlockingIOError:  # the pipe is full of wakes: woken either way
                pass
            # The pump's wake (see WAKE DATAGRAMS); a pending ICMP error would fail the send
            # and be cleared by it, so it is read and the send tried again.
            with contextlib.suppress(OSError):
                self._send_past_refusal(self.sock.sendto, b"", self._own_address)

    def rearm(self):
        """Forget earlier wakes before the next wait or tunnel."""
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def release(self):
        """The next tunnel uses the socket: nothing to close."""

    def close(self):
        with self._close_lock:
            self.sock.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_write = None


# =============================================================================================
# Tunnel pumps: framing objects and the Tunnel, two threads between a channel and an endpoint
# The framing (UoTLV/1 or WebSocket) cuts and encodes; the Tunnel runs the two pumps, its
# keepalive and idle clock, and closes once. Uses channels, endpoints and policies.
# =============================================================================================

# The pumps see either transport through a framing object (UoTLVFraming, WebSocketFraming):
# `cut` for the reader, `encode` for the writer, `answer` for what the reader must send back; the
# UoTLV/1 reader never writes, the WebSocket reader answers pings and closes.
#
# Every tunnel is a `Tunnel`: a byte `Channel` (plain TCP or TLS) and a UDP endpoint, joined by
# two pumps that run in two daemon threads:
#     relay_udp_to_tcp   waits for UDP datagrams, drains all that are waiting, and sends them as
#                        frames (written in place in one buffer) in one TCP write;
#     relay_tcp_to_udp   reads the TCP stream in large chunks into one buffer, cuts whole frames
#                        out (`cut_frames`), and has the endpoint send them (a run of
#                        equal-sized ones in one system call: UDP GSO).
# The first pump to stop closes the tunnel: `Tunnel.close()` shuts the TCP socket down (waking a
# blocked recv or sendall) and wakes the UDP endpoint (a shutdown of the server's own connected
# UDP socket; an empty datagram from itself to the client's shared one). The thread that ran
# the tunnel joins the other pump before anything is closed, so no thread or socket outlives
# its tunnel, and no stale reader steals datagrams from the next tunnel (the original loses
# 1-4 datagrams after every reconnect that way). Tunnel sockets stay blocking (a Python timeout
# would poll before every call); sent data counts only once acknowledged (TCP_USER_TIMEOUT =
# idle timeout), and only the kernel's ETIMEDOUT means "path down".

# A pump buffer that a burst filled beyond this gives its pages back at the next small batch,
# at most once per TRIM_INTERVAL seconds.
TRIM_ABOVE = 32 * 1024
TRIM_INTERVAL = 1.0


class PumpBuffer:
    """One pump's buffer for the tunnel's life, `view` its memoryview.

    An anonymous mmap, not a bytearray: its pages take memory only once written, so a tunnel
    that carries little holds a page, not 128-192 KiB. Written pages stay, though, and a
    tunnel may sit quiet for hours after a download: `used(end)` after each batch (which used
    the buffer up to `end`) gives back all pages past the first once a burst used more than
    TRIM_ABOVE and a batch within the first page follows; at most once per TRIM_INTERVAL, so
    a load that mixes batch sizes barely pays for it.
    """

    def __init__(self, size):
        # mmap(-1) is a shared anonymous mapping (shmem): MADV_REMOVE frees its pages, where
        # MADV_DONTNEED would not. (A private one measured a page more per idle tunnel.)
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)
        self.high = 0
        self.trimmed = -TRIM_INTERVAL

    def used(self, end):
        if end > self.high:
            self.high = end
        elif end <= mmap.PAGESIZE < TRIM_ABOVE < self.high:
            now = time.monotonic()
            if now - self.trimmed >= TRIM_INTERVAL and hasattr(mmap, "MADV_REMOVE"):
                self.trimmed = now
                self.high = end
                self.map.madvise(mmap.MADV_REMOVE, mmap.PAGESIZE,
                                 len(self.map) - mmap.PAGESIZE)


class BusyPolling:
    """How a process's pumps wait while their tunnel's round trips go one at a time: busy
    polling (--busy-poll), `budget` seconds (0: off), with at most `spinners` pumps polling at
    once (the service runtime's busy_polling() gives one a CPU, and at least two: one tunnel's
    pumps); and `schedule` (own_schedule()'s OwnSchedule; None: off), which gives a pump's
    thread the short scheduler slice meanwhile (--sched-slice), or real-time priority while
    the CPUs are crowded (--rt-priority; `read_cpu`: Crowding's). `poller(fd, turns, side)`
    gives a pump its BusyPoller."""

    def __init__(self, budget, spinners=2, schedule=None, read_cpu=None):
        self.budget = budget
        self.schedule = schedule
        self.crowding = None  # the process's Crowding, if its pumps may go real-time
        if schedule is not None and schedule.realtime:
            self.crowding = Crowding(read_cpu, limit=spinners)  # one a CPU, as for polls
        self._slots = threading.BoundedSemaphore(spinners)

    def poller(self, fd, turns=None, side=None):
        return BusyPoller(fd, BusyPoll(self.budget), self._slots, self.schedule, turns, side,
                          crowding=self.crowding)


# sched_yield(2) where the system has it (every Linux); elsewhere a poll just spins.
_give_way = getattr(os, "sched_yield", lambda: None)


class BusyPoller:
    """Carries out one pump's BusyPoll and LoneSchedule on the descriptor it receives from.
    The pump calls `before_wait(lone)` just before its blocking receive, in its own thread
    (`lone`: its last batch was one datagram), and then `after_wait()` once it returned with
    data; both only while `engaged` or `lone` (a bulk pump skips them: its waits are many, and
    nothing in them is for it). With `turns` (the tunnel's RoundTrips) the poller reports its
    `side` there, and polls only when RoundTrips says round trips go one at a time; without,
    `lone` is taken for that word (tests).

    A poll is poll(2) with no timeout, then sched_yield: any thread that is ready takes the CPU
    at once. The GIL is free in both calls but taken for a moment between them, which another
    thread of the process may keep losing until the poll ends: hence a Tunnel polls only
    while its round trips go one at a time (RoundTrips: nothing else of its own needs the GIL
    then), and at most one pump per CPU polls. A shutdown or a wake makes the descriptor
    readable, so a poll never delays a close.

    With `schedule` (OwnSchedule), the pump's thread takes the level its LoneSchedule names:
    the short slice while round trips go one at a time, so that a woken pump takes a busy CPU
    at once (DEFAULT_SCHED_SLICE_US), and bulk traffic, whose wake-ups are many and wait
    anyway, keeps the kernel's batching (measured: 7-11 % more throughput than with the short
    slice for every thread); real-time instead while the process's steps (after_wait to
    before_wait) show them kept off crowded CPUs (Crowding, DEFAULT_RT_PRIORITY). A real-time pump
    does not poll: its give-way would not let the SCHED_OTHER peers it serves run. A thread
    that is not SCHED_OTHER when it would first change (a unit's CPUSchedulingPolicy=) is
    left as it is."""

    def __init__(self, fd, policy, slots, schedule=None, turns=None, side=None,
                 clock=time.monotonic, crowding=None):
        self._crowding = crowding
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self.policy = policy
        self._slots = slots
        self._schedule = schedule
        self.lone_schedule = LoneSchedule(crowding)
        self._turns = turns
        self._side = side
        self._clock = clock
        self._blocked_at = None
        self._woke_at = None  # when the wait before this step returned (with a Crowding)
        # Whether the calls have work even after a batch of several datagrams: RoundTrips
        # has this side lone, a level to give back, or a backed-off wait to time.
        self.engaged = False

    def before_wait(self, lone):
        now = self._clock()
        lone_schedule = self.lone_schedule
        if self._woke_at is not None:
            self._crowding.stepped(now - self._woke_at >= CROWDED_AFTER, now)
            self._woke_at = None
        self._blocked_at = None
        one_at_a_time = lone
        if self._turns is not None:
            one_at_a_time = self._turns.waits(self._side, lone)
        if self._schedule is not None:
            was = lone_schedule.level
            level = lone_schedule.wants(one_at_a_time, now)
            if level is not None:
                if was == KERNELS and not self._schedule.applies():
                    self._schedule = None  # the unit's policy: not ours to change
                    lone_schedule.leave()  # its level too, and a real-time turn it took
                else:
                    self._schedule.set(level)
        budget = 0
        if lone_schedule.level != REALTIME:
            budget = self.policy.poll_for(one_at_a_time, now)
        if budget and self._slots.acquire(False):
            try:
                found = self._poll(budget)
            finally:
                self._slots.release()
            self.policy.polled(found)
        elif self.policy.backed_off:
            self._blocked_at = self._clock()
        self.engaged = (lone or lone_schedule.level != KERNELS
                        or self._blocked_at is not None)

    def after_wait(self):
        if self._turns is not None:
            self._turns.busy(self._side)
        scheduled = self.lone_schedule.level != KERNELS
        if self._blocked_at is None and not scheduled:
            return
        now = self._clock()
        if self._blocked_at is not None:
            self.policy.blocked(now - self._blocked_at)
            self._blocked_at = None
        if scheduled and self._crowding is not None:
            self._woke_at = now

    def finish(self):
        """The pump ends (in its own thread, which may serve on: a client's next tunnel): a
        real-time turn goes back to the process, and a real-time thread to SCHED_OTHER. (Not
        the slice: a teardown of 5,000 tunnels would make 10,000 system calls for threads that
        end, and the slice does not take CPU from others.)"""
        realtime = self.lone_schedule.level == REALTIME
        self.lone_schedule.leave()
        if realtime and self._schedule is not None:
            self._schedule.set(KERNELS)

    def _poll(self, budget):
        poll, clock, give_way = self._poller.poll, self._clock, _give_way
        deadline = clock() + budget
        while not poll(0):
            now = clock()
            if now >= deadline:
                return False
            give_way()
            if clock() - now >= CROWDED_AFTER:  # other work had the CPU
                self.policy.lost_cpu(clock())
                return False
        return True


class UoTLVFraming:
    """How datagrams look on the wire: UoTLV/1, [2-byte length][datagram]. The contract the
    Tunnel's pumps rely on (WebSocketFraming keeps it too):

    cut(view, end)            the reader: the datagrams complete in view[:end], and where
                              the incomplete rest begins (as cut_frames);
    encode(view, end)         the writer: the batch the UDP endpoint wrote in place, as
                              UoTLV frames in view[:end], in this framing, ready to send;
    encode_datagrams(list)    the client's queued datagrams, for a new tunnel;
    payload_bytes(end, count) the datagrams' bytes in the batch encode just took;
    datagrams(view, end)      the batch as bytes again (the failure path: kept for the next);
    control                   whether the reader may have frames of its own to send after a
                              cut: False here, so the UoTLV/1 reader never writes; if True:
    answer()                  after a cut: None (nothing to do: the usual case, cheap), or
                              (reply, close, reason): a frame to send back now (a pong) or
                              None, and if the tunnel ends, the close frame to send and why
                              it ends (else None, None);
    ping()                    the keepalive's frame, every `keepalive` seconds;
    close_frame(code)         the frame that ends the tunnel in order (a close code, or None);
    keepalive                 seconds between the client's pings (0: none);
    offset                    where in the writer's buffer the UDP endpoint begins a batch
                              (room for a header before it: encode writes it there);
    batch_limit               the bytes the writer gathers before it sends (receive_frames);
    largest                   the longest frame the reader must hold whole (its buffer).
    The Tunnel sees neither a decoder nor an opcode: what to answer, and when it ends, comes
    from here (as websockets' and h11's protocol objects say it).
    """

    name = label = PROTOCOL  # label: the tunnel-up line's
    control = False
    answer = None  # the UoTLV/1 reader never has anything to answer (control is False)
    keepalive = 0
    head = None  # UdpEndpoint.receive_frames writes UoTLV/1's header itself
    offset = 0
    batch_limit = UDP_BATCH_BYTES
    largest = 2 + MAX_FRAME_PAYLOAD
    cut = staticmethod(cut_frames)
    encode_datagrams = staticmethod(encode_frames)

    @staticmethod
    def encode(view, end):
        return view[:end]  # already on the wire's form: no copy

    @staticmethod
    def payload_bytes(end, count):
        """The datagrams' bytes in a batch of `count` frames that ends at `end`."""
        return end - 2 * count

    @staticmethod
    def datagrams(view, end):
        """The datagrams of the batch in view[:end], as bytes (the client keeps those it
        could not send for the next tunnel)."""
        return [datagram.tobytes() for datagram in cut_frames(view, end)[0]]


UOTLV_FRAMING = UoTLVFraming()


class WebSocketFraming:
    """RFC 6455 framing for one tunnel: one binary message per datagram. The client's side
    (`client_side`) masks what it sends and must receive unmasked frames; the server's side
    the other way round. `decoder` (a WebSocketDecoder) tells the reader what the peer asked
    for; the frames to answer come from here. See UoTLVFraming for the contract."""

    name = label = WEBSOCKET
    control = True
    batched = False
    offset = 0
    batch_limit = UDP_BATCH_BYTES
    largest = MAX_WEBSOCKET_HEADER + MAX_FRAME_PAYLOAD

    def __init__(self, client_side, keepalive=0):
        self.mask = client_side
        self.keepalive = keepalive
        self.xor = mask_accelerator()
        self.decoder = WebSocketDecoder(masked=not client_side, xor=self.xor,
                                        batched=self.batched)
        self.cut = self.decoder.cut
        # The UDP pump's frames are built in place (UdpEndpoint.receive_frames): each datagram
        # lands `room` bytes on, the longest header this side sends for one (a 16-bit length,
        # and the client's masking key), and head() writes its header; a datagram under 126
        # bytes has 2 bytes less of it, and moves back to close the gap (a copy of under 126
        # bytes). What encode and payload_bytes need of a batch is kept until they take it (a
        # batch that head() began is always encoded, and counted once sent, or the tunnel ends).
        self.room = 8 if client_side else 4
        self.head = self._masked_head if client_side else self._head
        self._spans = []  # (start, stop) of the batch's datagrams, masked by encode
        self._short = 0  # the batch's frames with the 2 bytes shorter header
        if client_side and self.xor is None:
            # Masking with the standard library's big-int XOR: its conversions cost the same
            # in place, and a lone small datagram 0.3 µs more (header written apart, then
            # moved), so the encoder of before stays (the UDP endpoint writes UoTLV/1 frames,
            # websocket_frames re-frames and masks them): a router without pip is not slowed.
            self.head = None
            self.encode = self._encode_joined
            self.payload_bytes = UoTLVFraming.payload_bytes
            self.datagrams = UoTLVFraming.datagrams

    def _head(self, view, pos, size):
        if size >= 126:
            _LENGTH_16.pack_into(view, pos, 0x82, 126, size)
            return pos + 4 + size
        _LENGTH_7.pack_into(view, pos, 0x82, size)
        view[pos + 2:pos + 2 + size] = view[pos + 4:pos + 4 + size]
        self._short += 1
        return pos + 2 + size

    def _masked_head(self, view, pos, size):
        if size >= 126:
            _LENGTH_16.pack_into(view, pos, 0x82, 0x80 | 126, size)
            start = pos + 8
        else:
            _LENGTH_7.pack_into(view, pos, 0x82, 0x80 | size)
            start = pos + 6
            view[start:start + size] = view[pos + 8:pos + 8 + size]
            self._short += 1
        self._spans.append((start, start + size))
        return start + size

    def encode(self, view, end):
        """The client's frames get their keys (fresh for each, RFC 6455 5.3: one system call
        for the batch's) and are masked in place; the server's are ready as they are."""
        if self.mask:
            spans, self._spans = self._spans, []
            keys = os.urandom(4 * len(spans))
            keyed = [(start, stop, keys[4 * index:4 * index + 4])
                     for index, (start, stop) in enumerate(spans)]
            for start, _, key in keyed:
                view[start - 4:start] = key
            _mask_in_place(view, keyed, self.xor)
        return view[:end]

    def _encode_joined(self, view, end):
        return websocket_frames(cut_frames(view, end)[0], self.mask)

    def payload_bytes(self, end, count):
        short, self._short = self._short, 0
        return end - count * self.room + 2 * short

    def datagrams(self, view, end):
        copy = memoryview(bytearray(view[:end]))  # the decoder unmasks in place
        return [bytes(datagram) for datagram in
                WebSocketDecoder(masked=self.mask).cut(copy, end)[0]]

    def encode_datagrams(self, datagrams):
        return websocket_frames(datagrams, self.mask)

    def answer(self):
        """After a cut: the pong a ping asks for (the latest), and the peer's close (or the
        close our refusal of its protocol error earns) with why the tunnel ends."""
        decoder = self.decoder
        if decoder.pong is None and decoder.closed is None:
            return None  # after nearly every cut: no call nor tuple more than before
        reply = None
        if decoder.pong is not None:
            reply = websocket_frame(OP_PONG, decoder.pong, self.mask)
            decoder.pong = None
        closed = decoder.closed
        if closed is None:
            return reply, None, None
        return reply, self.close_frame(closed.code), closed.reason()

    def ping(self):
        return websocket_frame(OP_PING, b"", self.mask)

    def close_frame(self, code):
        """The close frame for `code` (None: an empty one)."""
        return websocket_frame(OP_CLOSE, b"" if code is None else close_payload(code), self.mask)


class WebSocketBatchFraming(WebSocketFraming):
    """proxyguard-uotlv: each binary message carries the UoTLV/1 frames of one batch, so the
    UDP endpoint writes UoTLV/1 frames (head None) `offset` bytes into the writer's buffer,
    and encode puts one message header before them: the client's masked with one key and one
    XOR for the batch (websockets' C one if installed, else one big-int XOR). Keys come from a
    pool of os.urandom bytes, fresh for every message (RFC 6455 5.3), one system call for
    KEY_POOL_BYTES / 4 of them. The reader cuts the frames out of whole messages (the
    decoder, batched). What is kept for the next tunnel is the batch as it was: the masked
    copy goes to the channel, the buffer stays as received."""

    batched = True
    offset = MAX_WEBSOCKET_HEADER
    batch_limit = WEBSOCKET_BATCH_BYTES
    largest = MAX_WEBSOCKET_HEADER + MAX_BATCH_MESSAGE
    KEY_POOL_BYTES = 4096
    payload_bytes = staticmethod(UoTLVFraming.payload_bytes)

    def __init__(self, client_side, keepalive=0):
        super().__init__(client_side, keepalive)
        self.head = None  # the per-datagram framing's choices do not apply
        self.encode = self._encode_batch
        self.datagrams = self._batch_datagrams
        self._keys, self._key_at = b"", 0

    def _next_key(self):
        at = self._key_at
        if at >= len(self._keys):
            self._keys, at = os.urandom(self.KEY_POOL_BYTES), 0
        self._key_at = at + 4
        return self._keys[at:at + 4]

    def _encode_batch(self, view, end):
        offset = self.offset
        if not self.mask:
            head = _frame_head(0x82, end, False)
            start = offset - len(head)
            view[start:offset] = head
            return view[start:offset + end]
        key = self._next_key()
        return (_frame_head(0x82, end, True) + key
                + _masked(view[offset:offset + end], key, self.xor))

    def _batch_datagrams(self, view, end):
        return UoTLVFraming.datagrams(view[self.offset:], end)

    def encode_datagrams(self, datagrams):
        return websocket_batches(datagrams, self.mask)


def websocket_framing(subprotocol, client_side, keepalive=0):
    """The framing for the WebSocket `subprotocol` the server took (choose_subprotocol)."""
    framing = (WebSocketBatchFraming if subprotocol == WEBSOCKET_BATCH_SUBPROTOCOL else
               WebSocketFraming)(client_side, keepalive)
    if subprotocol is not None:
        framing.label = "%s (%s)" % (WEBSOCKET, subprotocol)
    return framing


class Tunnel:
    """One tunnel: a channel and a UDP endpoint joined by two pumps.

    `run()` starts relay_udp_to_tcp in a new daemon thread (in the calling thread's context,
    so its log lines are the caller's), runs relay_tcp_to_udp in the calling thread, and
    returns the reason once both have stopped. The first pump to stop calls `close()`, which
    shuts the channel down and wakes the endpoint, so the other returns too; the calling
    thread's pump first takes its teardown lane (TEARDOWN_LANES), which it holds until `run()`
    has closed the channel and released the endpoint. Its reason stands meanwhile: an error of
    the UDP pump in that time is a consequence, not the tunnel's reason.

    `idle` (an IdleClock) decides when the tunnel is idle; both pumps feed it, with data only.
    `greeting` (the server's 101) is sent before either pump starts. `unsent` receives
    datagrams the UDP pump had read but could not send (the client queues them for the next
    tunnel); None drops them. `framing` is how datagrams look on the wire (UOTLV_FRAMING, or
    a WebSocketFraming, whose reader also answers pings and closes and sends the client's
    keepalive pings: its writes and the UDP pump's take turns under `_write_lock`).
    `busy_polling` (a BusyPolling, or None: off) lets each pump poll for its next datagram
    before it blocks.
    """

    def __init__(self, channel, endpoint, peer, idle, first_bytes=b"", unsent=None,
                 greeting=b"", framing=UOTLV_FRAMING, unacked_timeout=None, route=None,
                 busy_polling=None):
        self.channel = channel
        self.busy_polling = busy_polling
        self._turns = RoundTrips()  # whether a pump may poll: round trips one at a time
        self._pollers = {}  # each pump's BusyPoller, by its thread (_poller(), _relay())
        self.endpoint = endpoint
        self.peer = peer
        self.idle = idle
        self.framing = framing
        self.keepalive = Keepalive(framing.keepalive, idle)
        self.first_bytes = first_bytes
        self.greeting = greeting
        self.unsent = unsent
        self.close_reason = None
        # The reason the calling thread's pump stopped on, kept while it waits for its lane:
        # the UDP pump, still running, may meanwhile fail on the connection the peer closed
        # ("broken pipe"), and that consequence must not become the tunnel's reason.
        self._stopped_on = None
        self.route = route  # the server's: the RouteTable name of the route it took
        self.went_idle = False  # closed by our own idle timeout: a normal end, not a failure
        self.path_down = False  # the kernel gave up on unacknowledged data (TCP_USER_TIMEOUT)
        # TCP_USER_TIMEOUT: the idle timeout, or less (the client's PATH_DOWN_SECONDS).
        self.unacked_timeout = min(t for t in (idle.timeout, unacked_timeout, float("inf"))
                                   if t)
        self.started = time.monotonic()
        # Counters: each is written by one pump thread only.
        self.to_udp_datagrams = self.to_udp_bytes = 0
        self.to_tcp_datagrams = self.to_tcp_bytes = 0
        self.oversized = 0
        self._close_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._close_sent = False  # a WebSocket close frame went out (the reader's answer)
        self._teardown_lane = self._teardown_lanes[next(self._tunnel_numbers)
                                                   % TEARDOWN_LANES]

    # See TEARDOWN_LANES: the tunnels take them in turn.
    _teardown_lanes = [threading.Lock() for _ in range(TEARDOWN_LANES)]
    _tunnel_numbers = itertools.count()

    def close(self, reason, code=CLOSE_NORMAL):
        """Stop both pumps (idempotent, any thread); the first reason found is kept: the
        calling thread's pump's if it stopped before and waits for its lane, else the first
        given. Over WebSocket, a close frame with `code` goes first if it can without waiting
        (1001 when shutting down): a front then sees an orderly end."""
        with self._close_lock:
            if self.close_reason is not None:
                return
            self.close_reason = self._stopped_on or reason
        if self.framing.control and not self._close_sent and self._write_lock.acquire(False):
            try:
                self._close_sent = True
                self.channel.send_without_waiting(self.framing.close_frame(code))
            finally:
                self._write_lock.release()
        self.channel.shutdown()
        self.endpoint.wake()

    def run(self):
        udp_thread = lane = None
        try:
            sock = self.channel.sock
            self.channel.deadline = None  # the handshake is over: the idle clock rules now
            sock.settimeout(None)
            timeout = self.idle.timeout
            _set_socket_timeout(sock, socket.SO_RCVTIMEO,
                               next_wake(timeout or None, self.keepalive.remaining()))
            _set_socket_timeout(sock, socket.SO_SNDTIMEO, timeout)
            if self.unacked_timeout != float("inf"):
                # Data sent counts as activity only once the peer acknowledged it: into a
                # dead path, sends still succeed into the kernel's buffer, and without this
                # both sides would wait for the kernel's retransmissions (about 15 minutes).
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT,
                                    int(self.unacked_timeout * 1000))
                except OSError:  # not Linux, or no TCP: the peer's silence still ends it
                    pass
            if log.isEnabledFor(logging.DEBUG):  # what the kernel granted of what we asked
                log.debug("tunnel %s: socket buffers (asked %d): TCP %s; UDP %s", self.peer,
                          SOCKET_BUFFER_BYTES, _buffer_sizes(sock),
                          _buffer_sizes(self.endpoint.sock))
            if self.greeting:  # the server's 101 goes out before any frame
                self.channel.sendall(self.greeting)
            # The UDP pump runs in a copy of this thread's context (contextvars), as
            # asyncio.to_thread runs a function: what the caller set for its log lines (up's
            # PeerLogNames: the peer's URL) holds for the pump's too, and the Tunnel needs to
            # know nothing of it. Once per tunnel: nothing per packet.
            thread = threading.Thread(target=contextvars.copy_context().run,
                                      args=(self._pump, self.relay_udp_to_tcp),
                                      name="udp->tcp %s" % self.peer, daemon=True)
            thread.start()
            udp_thread = thread
            reason = self._stopped_on = self._relay(self.relay_tcp_to_udp)
            if self._teardown_lane.acquire(timeout=TEARDOWN_LANE_WAIT):
                lane = self._teardown_lane
            self.close(reason)
        finally:
            if udp_thread is not None:
                udp_thread.join()
            self.channel.close()
            self.endpoint.release()
            if lane is not None:
                lane.release()
        if self.path_down:  # whichever pump saw the kernel's ETIMEDOUT, that is the cause
            self.close_reason = "path down: data unacknowledged for %gs" % self.unacked_timeout
        return self.close_reason

    @property
    def duration(self):
        return time.monotonic() - self.started

    def summary(self):
        """One line of figures for the tunnel-down log."""
        text = ("%.1fs, %s/%s to WireGuard, %s/%s from WireGuard"
                % (self.duration, plural(self.to_udp_datagrams, "datagram"),
                   plural(self.to_udp_bytes, "byte"), plural(self.to_tcp_datagrams, "datagram"),
                   plural(self.to_tcp_bytes, "byte")))
        if self.oversized:
            text += ", %s dropped" % plural(self.oversized, "oversized frame")
        return text

    def status_line(self, show_route=False):
        """One line for SIGUSR1: the route taken (`show_route`: the server's, with --route),
        the summary and the last data each way."""
        now = self.idle.clock()
        return "%s%s; last data from the peer %.1fs ago, to the peer %.1fs ago" % (
            "route=%s, " % self.route if show_route else "", self.summary(),
            now - self.idle.last_received, now - self.idle.last_sent)

    def _pump(self, relay):
        """The UDP pump's thread: run `relay`, then close the tunnel with its reason."""
        self.close(self._relay(relay))

    def _relay(self, relay):
        """Error boundary of one pump: every way out is a reason to close the tunnel; the
        pump's BusyPoller, if it made one, finishes."""
        try:
            return relay()
        except OSError as exc:
            # ETIMEDOUT is the kernel giving up (TCP_USER_TIMEOUT); only one pump sees it, the
            # other sees a plain end of stream, so run() gives this reason precedence.
            if exc.errno == errno.ETIMEDOUT:
                self.path_down = True
            return describe_error(exc)
        except Exception as exc:  # a bug must still close the tunnel and not kill the process
            log.exception("tunnel %s: unexpected error", self.peer)
            return "internal error: %r" % exc
        finally:
            poller = self._pollers.pop(threading.get_ident(), None)
            if poller is not None:
                poller.finish()

    def relay_tcp_to_udp(self):
        """Read frames from the channel and send each as one UDP datagram, until EOF or idle."""
        # One buffer for the tunnel's life: each read lands behind the incomplete frame the
        # last one left at the start, and datagrams go out as slices of it (no bytes object
        # per read or datagram). It holds one largest frame, header and all, plus a read.
        buffer = PumpBuffer(self.framing.largest + TCP_READ_SIZE)
        view = buffer.view
        recv_into = self.channel.recv_into
        touch = self.idle.received
        send_datagrams = self.endpoint.send_datagrams
        framing = self.framing
        cut = framing.cut
        control, answer = framing.control, framing.answer
        poller = self._poller(self.channel.sock, FROM_PEER)
        held = 0
        end = len(self.first_bytes)  # what came with the 101 is read first
        view[:end] = self.first_bytes
        while True:
            lone = False
            if end:
                datagrams, pos = cut(view, end)
                if datagrams:
                    touch()  # data only: a ping is no data for the idle timeout
                    sent, sent_bytes, too_big = send_datagrams(datagrams)
                    self.to_udp_datagrams += sent
                    self.to_udp_bytes += sent_bytes
                    if too_big:
                        self._dropped_too_big(too_big)
                if control:
                    answered = answer()
                    if answered is not None:
                        reason = self._answer_peer(*answered)
                        if reason is not None:
                            return reason
                held = end - pos
                if held and pos:
                    buffer.map.move(0, pos, held)  # the incomplete frame to the start
                buffer.used(end)
                lone = (poller is not None and len(datagrams) == 1 and not held
                        and not self.channel.buffered())
            if self.close_reason is not None:
                return self.close_reason
            polled = poller is not None and (lone or poller.engaged)
            if polled:  # whether the poller sees this wait: then it hears of its end too
                poller.before_wait(lone)
            try:
                received = recv_into(view[held:held + TCP_READ_SIZE])
            except OSError as exc:
                if not _is_socket_timeout(exc):
                    raise
                end = 0
                # Woken by the receive timeout: idle only if no data crossed either way
                # meanwhile. Traffic towards the peer keeps the tunnel: with PersistentKeepalive
                # on the client only, the server never answers, and a peer-only rule (the
                # original's) would reconnect, and change WireGuard's endpoint, every time.
                if self.idle.expired():
                    self.went_idle = True
                    return "idle for %gs" % self.idle.timeout
                due = self.keepalive.remaining()
                if due is not None and due <= 0:
                    self._send_own_frame(framing.ping())
                    self.keepalive.ping_sent()
                _set_socket_timeout(self.channel.sock, socket.SO_RCVTIMEO, next_wake(
                    self.idle.remaining(), self.keepalive.remaining()))
                continue
            if not received:
                return "closed by peer" if self.close_reason is None else self.close_reason
            if polled:
                poller.after_wait()
            end = held + received

    def _answer_peer(self, reply, close, reason):
        """After a WebSocket cut, what the framing's `answer()` said: send the pong to the
        peer's ping, and the close to its close (or the one our refusal of its protocol error
        earns); returns the tunnel's end reason or None."""
        if reply is not None:
            self._send_own_frame(reply)
        if reason is None:
            return None
        with self._write_lock:
            self._close_sent = True
            with contextlib.suppress(OSError):  # gone already: the reason is the close
                self.channel.sendall(close)
        return reason

    def _dropped_too_big(self, sizes):
        """Frames too big for one UDP datagram (65508-65535 bytes over IPv4), which the
        endpoint dropped (the original stalls or spins at 100 % CPU there): warned once."""
        if not self.oversized:
            log.warning("tunnel %s: dropped a %d-byte frame: too big for one UDP datagram",
                        self.peer, sizes[0])
        self.oversized += len(sizes)

    def _poller(self, sock, side):
        """The pump's BusyPoller on `sock`'s descriptor, reporting its `side` to the tunnel's
        RoundTrips, or None without busy polling."""
        if self.busy_polling is None:
            return None
        poller = self.busy_polling.poller(sock.fileno(), self._turns, side)
        self._pollers[threading.get_ident()] = poller  # for _relay's finish
        return poller

    def _send_own_frame(self, frame):
        """The reader's own frames (pong, ping) take their turn with the UDP pump's writes."""
        with self._write_lock:
            self.channel.sendall(frame)

    def relay_udp_to_tcp(self):
        """Wait for datagrams, and send all that are waiting as frames in one channel write."""
        receive = self.endpoint.receive_frames
        touch = self.idle.sent
        encode = self.framing.encode
        write_lock = self._write_lock  # uncontended but for a WebSocket reader's answers
        # The frames are written in place, into one buffer for the tunnel's life, from the
        # framing's offset on (room for its header before them).
        buffer = PumpBuffer(UDP_BATCH_BYTES + MAX_WEBSOCKET_HEADER + MAX_FRAME_PAYLOAD)
        view = buffer.view
        framing = self.framing
        batch = view[framing.offset:]
        limit = framing.batch_limit
        poller = self._poller(self.endpoint, FROM_WIREGUARD)
        count = 0
        while self.close_reason is None:
            polled = poller is not None and (count == 1 or poller.engaged)
            if polled:  # whether the poller sees this wait: then it hears of its end too
                poller.before_wait(count == 1)
            end, count = receive(batch, limit, framing)
            if not count:
                continue
            if polled:
                poller.after_wait()
            try:
                data = encode(view, end)
                with write_lock:
                    self.channel.sendall(data)
            except BaseException as exc:
                if self.unsent is not None:
                    self.unsent(framing.datagrams(view, end))
                if _is_socket_timeout(exc):
                    return "the peer read nothing for %gs" % self.idle.timeout
                raise
            touch()
            buffer.used(framing.offset + end)
            self.to_tcp_datagrams += count
            self.to_tcp_bytes += framing.payload_bytes(end, count)
        return self.close_reason


# =============================================================================================
# Server: accept, handshake, route, admit, tunnel; operations (status, metrics, reload) last
# One accept thread; per connection a thread that does the handshake under one Deadline and
# becomes the tunnel's TCP->UDP pump. Uses everything above.
# =============================================================================================

# A connection's thread does the handshake (one Deadline, a header-size limit, every refusal
# raised as HandshakeError and answered in one place, `_refuse`) and then becomes the tunnel's
# TCP->UDP pump. Each tunnel has its own connected UDP socket to WireGuard (TunnelUdpEndpoint),
# so WireGuard sees one source port per client. The load (--max-clients) is a count of admitted
# connections, kept as they are admitted and end (never summed per tunnel). A GET of
# --health-path gets `health_answer` (a load balancer's check) instead of a tunnel. With
# thousands of threads, `tune_threads()` sets their stack size and the GIL's switch interval.


class Service:
    """The contract Server, Client and ClientGroup follow (as socketserver's BaseServer does for
    its servers): what main(argv)'s runtime (_run_until_signal, SystemdNotifier, MetricsEndpoint,
    _reload_settings) calls, and nothing else. Docstrings only: each class writes its own.

    A service is built with `tunnels_changed`, a callable it calls (from any thread, cheaply)
    whenever a tunnel opens or closes; systemd's notifier then sends STATUS=."""

    def serve_forever(self):
        """Run in the calling thread until `stop()`; return once every tunnel has ended."""

    def stop(self):
        """From any thread: end serve_forever and every tunnel; idempotent."""

    def status(self):
        """One line for systemd's STATUS= (open tunnels, last error)."""

    def healthy(self):
        """True while the service can do its work: the watchdog's WATCHDOG=1 is sent only then."""

    def reload(self, options):
        """SIGHUP: take what can change while tunnels run (TLS files, the server's routes) from
        the re-read `options` for new connections; return the names of what was reloaded, for
        the log line. Raises FatalError (logged) and keeps the old settings if the new ones are
        bad."""

    def metrics(self):
        """What the service counts, as a list of Metric for render_metrics; read per scrape."""

    def dump_tunnels(self):
        """SIGUSR1: log a line per open tunnel."""


def resolve_route_table(routes, wireguard, path):
    """The server's RouteTable from its options: each --route's (PATH, (host, port)) and
    --to's (host, port) (`wireguard`, None with routes alone) resolved once, --to's taking the
    paths under `path` (--path). At start and on SIGHUP; raises FatalError naming the option."""
    fallback = _resolve_udp(wireguard, "--to") if wireguard else None
    return RouteTable([(prefix, _resolve_udp(target, "--route %s" % prefix))
                       for prefix, target in routes], fallback=fallback, fallback_path=path)


def describe_route(table, name):
    """A route of `table` in a line: "/pg/node1 to 10.0.0.1:51820", "default to ... under /pg"."""
    target, limit = table.entries()[name]
    return "%s to %s%s" % (name, format_address(target[0]),
                           " under %s" % limit if name == DEFAULT_ROUTE and limit else "")


class Connection:
    """One accepted connection on the server: its socket, its thread, and its tunnel once
    admitted. The server counts the admitted ones as its load."""

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer
        self.thread = None
        self.tunnel = None
        self.admitted = False  # counts against --max-clients from admission to the end


class Server(Service):
    """The ProxyGuard server: accepts upgrades on `listener` and tunnels them to WireGuard.

    `serve_forever()` accepts in the calling thread until `stop()`; each connection gets a
    thread that runs `handle()`: the handshake within one Deadline of `handshake_timeout`, then
    the tunnel (see Tunnel). `stop()` closes the listening socket and every connection, and
    waits for their threads. `Server.open()` makes the listening socket from the options;
    tests give a listener of their own, or call `handle()` with one end of a socketpair.
    """

    def __init__(self, listener, wireguard_address, wireguard_family=socket.AF_INET,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT, handshake_timeout=HANDSHAKE_TIMEOUT,
                 tls_context=None, trusted_proxies=(), max_clients=DEFAULT_MAX_CLIENTS,
                 path=None, routes=None, health_path=None, tunnels_changed=None,
                 busy_polling=None):
        self.listener = listener
        self.busy_polling = busy_polling  # a BusyPolling for every tunnel's pumps, or None
        self.address = listener.getsockname() if listener is not None else None
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.tls_context = tls_context  # replaced by a SIGHUP reload for new connections
        self.trusted_proxies = list(trusted_proxies)
        self.max_clients = max_clients
        # Which WireGuard each path goes to: --route's, else every path under `path` (None:
        # every path) to wireguard_address. Targets: (sockaddr, family). A SIGHUP replaces the
        # table whole (one attribute: a handshake reads the old one or the new one).
        self.routes = routes or RouteTable(fallback=(wireguard_address, wireguard_family),
                                           fallback_path=path)
        # Routes in use at some time in this process's life: the log lines, SIGUSR1's lines
        # and the metrics name the route (so a SIGHUP that removes every --route does not
        # hide the series of tunnels still open on them).
        self.routed = bool(self.routes.routes)
        self.health_path = health_path  # a GET here gets health_answer, never a tunnel
        self._stopping = False
        self._serving = False
        self._lock = threading.Lock()
        self._connections = set()
        # Metrics, under _lock: the open tunnels' counters are read live at each scrape.
        self.tunnels_opened = dict.fromkeys(TRANSPORTS, 0)
        self.route_tunnels_opened = dict.fromkeys(self.routes.names(), 0)
        self.closed_traffic = TrafficTotals()
        self.lifetimes = Histogram(TUNNEL_LIFETIME_BUCKETS)
        self.refused = dict.fromkeys(REFUSAL_STATUSES, 0)
        # Called when a tunnel opens or closes (the service contract: systemd's STATUS=).
        self.tunnels_changed = tunnels_changed or (lambda: None)
        self._admitted = 0  # connections with `admitted` set: counted, not summed (O(1))
        self.refusal_log = RefusalLog()

    @classmethod
    def open(cls, listen, wireguard, environ=os.environ, routes=(), **options):
        """Resolve WireGuard's address (`wireguard`, None with routes alone) and each route's
        ((path, (host, port)) pairs), and listen on `listen`, or take the listening socket
        systemd passed (socket activation); raises FatalError."""
        table = resolve_route_table(routes, wireguard, options.get("path"))
        listener = systemd_listener(environ)
        if listener is None:
            listener = open_listener(listen)
        else:
            log.info("listening socket %s from systemd (LISTEN_FDS); --listen is not used",
                     format_address(listener.getsockname()))
        return cls(listener, *(table.fallback or (None, None)), routes=table, **options)

    def serve_forever(self):
        scope = _listen_scope(self.listener)
        table = self.routes
        fallback = table.fallback and format_address(table.fallback[0])
        under = " under %s" % table.fallback_path if table.fallback_path else ""
        if table.routes:
            where = "routes %s%s" % (", ".join(
                "%s to WireGuard at %s" % (path, format_address(target[0]))
                for path, target in table.routes), (
                "; other paths%s to WireGuard at %s" % (under, fallback)
                if fallback else "; 404 at other paths"))
        else:
            where = "%sforwarding to WireGuard at %s" % (
                "upgrades at %s only, " % table.fallback_path if table.fallback_path else "",
                fallback)
        log.info("server listening on %s (%s%s), %s",
                 format_address(self.address), "https" if self.tls_context else "http",
                 "; " + scope if scope else "", where)
        self._serving = True  # the watchdog's sign of life (healthy)
        _accept_until_stopped(self.listener.accept, lambda: self._stopping,
                             self.start_connection)
        self._serving = False

    def start_connection(self, sock, peer):
        """Give the connection its thread, unless too many are open or no thread can start:
        a flood of silent connections must not take the server down (a thread limit such as
        systemd's TasksMax makes Thread.start raise). Never blocks: the accept thread calls it."""
        connection = Connection(sock, peer)
        connection.thread = threading.Thread(target=self.handle, args=(connection,),
                                             daemon=True, name="tunnel %s" % format_address(peer))
        with self._lock:
            full = (self.max_clients
                    and len(self._connections) >= self.max_clients + MAX_HANDSHAKING)
            if not full:
                self._connections.add(connection)
        if full:
            log.warning("connection %s refused: %s open already",
                        format_address(peer), plural(len(self._connections), "connection"))
            self._count_refusal(503)
            _refuse_without_waiting(sock, 503, "the server is full; try again later")
            return
        try:
            connection.thread.start()
        except RuntimeError as exc:
            with self._lock:
                self._connections.discard(connection)
            self._count_refusal(503)
            log.error("connection %s refused: cannot start a thread (%s)",
                      format_address(peer), exc)
            _refuse_without_waiting(sock, 503, "the server is out of resources; try again later")

    def handle(self, connection):
        """Error boundary of one connection: handshake, then tunnel; always closes the socket.

        Every refusal is a HandshakeError raised anywhere in the handshake and answered here,
        in one place; any other error of the handshake is logged with its reason.
        """
        with self._lock:
            self._connections.add(connection)  # already there when start_connection ran it
        sock, peer = connection.sock, connection.peer
        peer_text = format_address(peer)
        channel = request = client = None
        try:
            _prepare_tcp_socket(sock)
            deadline = Deadline(self.handshake_timeout)
            channel = self._open_channel(sock, deadline)
            head, first_bytes = _read_head(channel)
            request = parse_request(head)
            log.debug("request from %s: %s", peer_text, _head_line(head))
            if self._is_health_check(request):
                channel.sendall(health_answer(self.tunnels_open(), self.max_clients,
                                              self._stopping))
                return
            client = forwarded_client(request, peer[0], self.trusted_proxies)
            if client is not None:
                peer_text = "%s (via %s)" % (shown(client, 100), peer_text)
            route, wireguard = self.routes.find(request.start[1])
            transport = check_upgrade_request(request)
            self._admit(connection)
            self._run_tunnel(connection, channel, peer_text, request, transport, first_bytes,
                             route, wireguard)
        except HandshakeError as exc:  # before the channel is up, the answer goes out plain
            source = client or peer[0] if request is not None and _asks_upgrade(request) else None
            self._refuse(channel or PlainChannel(sock), peer_text, exc, source)
        except OSError as exc:
            log.info("%s %s: %s", "tunnel" if connection.tunnel else "handshake failed from",
                     peer_text, describe_error(exc))
        except Exception:
            log.exception("connection %s: unexpected error", peer_text)
        finally:
            self._retire(connection)
            sock.close()

    def _is_health_check(self, request):
        """A GET of --health-path (any query): a load balancer's check, not counted or logged
        above debug (one every second or two per balancer)."""
        method, target, _ = request.start
        return (self.health_path is not None and method == "GET"
                and target.partition("?")[0] == self.health_path)

    def _open_channel(self, sock, deadline):
        """The channel for `sock`: TLS handshake done if the server speaks HTTPS."""
        context = self.tls_context
        if context is None:
            return PlainChannel(sock, deadline)
        channel = TLSChannel(sock, context, server_side=True, deadline=deadline)
        try:
            channel.handshake()
        except socket.timeout:
            raise ConnectionError("TLS handshake timed out (%gs)" % deadline.seconds)
        except ssl.SSLError as exc:
            if exc.reason != "HTTP_REQUEST":
                raise
            # Plain HTTP to this TLS port: OpenSSL closes without a byte, which a client
            # cannot tell from a crash. Say it in plain HTTP, as nginx and Go's server do.
            raise HandshakeError(400, "plain HTTP request sent to this HTTPS port: use https://")
        return channel

    def _admit(self, connection):
        """Count a new tunnel in, or refuse with 503 when --max-clients are open already."""
        with self._lock:
            connection.admitted = not self.max_clients or self._admitted < self.max_clients
            self._admitted += connection.admitted
        if not connection.admitted:
            raise HandshakeError(
                503, "the server is full (%s open); try again later"
                % plural(self.max_clients, "tunnel"),
                [("Retry-After", "10")])
        self.tunnels_changed()

    def _run_tunnel(self, connection, channel, peer_text, request, transport, first_bytes,
                    route, wireguard):
        endpoint = TunnelUdpEndpoint.connected(*wireguard, label="tunnel %s" % peer_text)
        if transport == WEBSOCKET:
            subprotocol = choose_subprotocol(request)
            greeting = websocket_response(request, subprotocol)
            framing = websocket_framing(subprotocol, client_side=False)
        else:
            greeting, framing = UPGRADE_RESPONSE, UOTLV_FRAMING
        tunnel = Tunnel(channel, endpoint, peer_text, IdleClock(self.idle_timeout), first_bytes,
                        greeting=greeting, framing=framing, route=route,
                        busy_polling=self.busy_polling)
        route_text = ", route %s to %s" % (route, format_address(wireguard[0])) \
            if self.routed else ""
        with self._lock:
            connection.tunnel = tunnel
            self.tunnels_opened[transport] += 1
            self.route_tunnels_opened[route] += 1
            if self._stopping:
                tunnel.close("server shutting down", CLOSE_GOING_AWAY)
        log.info("tunnel up: %s, path %s%s, %s%s", peer_text, shown(request.start[1]),
                 route_text, framing.label,
                 ", " + channel.tls_version if channel.tls_version else "")
        reason = tunnel.run()
        self._retire(connection)  # first: a scrape or SIGUSR1 the line prompts sees it closed
        log.info("tunnel down: %s%s after %s (%s)", peer_text, route_text, tunnel.summary(),
                 reason)

    def _retire(self, connection):
        """The connection leaves the live set, once: a tunnel's figures go from live to closed
        at once (a scrape sees them in one or the other), and it is counted out."""
        with self._lock:
            if connection not in self._connections:
                return
            self._connections.discard(connection)
            if connection.tunnel is not None:
                self.closed_traffic.add(connection.tunnel)
                self.lifetimes.observe(connection.tunnel.duration)
            self._admitted -= connection.admitted
        if connection.admitted:
            self.tunnels_changed()

    def _refuse(self, channel, peer_text, error, upgrade_from=None):
        """The one error-answer path: log why, count it and send the HTTP answer; the caller
        closes. A refused upgrade request (`upgrade_from`: its source address) gets an info
        line as the refusal log admits; a plain request's routine refusal stays at debug."""
        level, held = logging.DEBUG if error.routine else logging.INFO, 0
        if upgrade_from is not None:
            held = self.refusal_log.admit(upgrade_from)
            level = logging.DEBUG if held is None else logging.INFO
        log.log(level, "handshake failed from %s: %d %s%s", peer_text, error.status, error,
                "; %s from this address not logged since the last line"
                % plural(held, "refusal") if held else "")
        self._count_refusal(error.status)
        try:
            channel.deadline = Deadline(REFUSAL_SEND_SECONDS)  # the handshake's may be over
            channel.sendall(build_response(error.status, str(error), error.extra_headers))
        except OSError:
            pass

    def _count_refusal(self, status):
        with self._lock:
            self.refused[status] = self.refused.get(status, 0) + 1

    def stop(self):
        self._stopping = True
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self.listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            self._stop_connection(connection)
        deadline = Deadline(5)
        for connection in connections:
            # A thread registered but not started yet cannot be joined.
            if connection.thread is not None and connection.thread.is_alive():
                connection.thread.join(max(0.0, deadline.remaining()))

    @staticmethod
    def _stop_connection(connection):
        if connection.tunnel is not None:
            connection.tunnel.close("server shutting down", CLOSE_GOING_AWAY)
        else:  # in its handshake: wake its blocked recv
            PlainChannel(connection.sock).shutdown()

    def tunnels_open(self):
        with self._lock:
            return self._admitted

    def status(self):
        """One line for systemd's STATUS=."""
        return "%s open" % plural(self.tunnels_open(), "tunnel")

    def healthy(self):
        """For the watchdog: the accept loop runs and the connection set's lock is free."""
        if not self._serving or self._stopping or self.listener.fileno() < 0:
            return False
        if not self._lock.acquire(timeout=1):
            return False
        self._lock.release()
        return True

    def reload(self, options):
        """SIGHUP, for new connections: load the certificate files again, and take the routes
        (--route, --to under --path) anew, every target resolved again. Open tunnels go on to
        the WireGuard they have (their UDP socket is connected). Returns what was reloaded;
        raises FatalError, keeping every running setting, if anything fails to load."""
        if options.mode != "server":  # the file's `mode =` changed: --route means nothing now
            raise FatalError("--mode %s: the server takes another mode on restart only"
                             % options.mode)
        context = self.tls_context and server_tls_context(options.tls_cert, options.tls_key)
        table = resolve_route_table(options.route, options.wireguard, options.path)
        done = ["certificate %s" % options.tls_cert] if context else []
        self.tls_context = context
        return done + self._take_routes(table)

    def _take_routes(self, table):
        """Route new handshakes by `table`; return what changed, as a reload names it."""
        with self._lock:
            old = self.routes
            for name in table.names():  # its series exist before a tunnel can take the route
                self.route_tunnels_opened.setdefault(name, 0)
            self.routes = table
            self.routed = self.routed or bool(table.routes)
        added, removed, changed = old.changes(table)
        words = (["added %s" % describe_route(table, name) for name in added]
                 + ["removed %s" % name for name in removed]
                 + ["changed %s" % describe_route(table, name) for name in changed])
        return ["routes (%s)" % ", ".join(words)] if words else []

    def metrics(self):
        """The server's metrics now (Metric objects), for the metrics page."""
        with self._lock:
            tunnels = [connection.tunnel for connection in self._connections
                       if connection.tunnel is not None]
            traffic = self.closed_traffic.copy()
            for tunnel in tunnels:
                traffic.add(tunnel)
            opened, lifetimes, refused = (dict(self.tunnels_opened), self.lifetimes.copy(),
                                          dict(self.refused))
            route_opened = dict(self.route_tunnels_opened)
        refusals = Metric("proxyguard_server_handshakes_refused_total", "counter",
                          "Connections refused with an HTTP error status, by status.")
        for status in sorted(refused):
            refusals.add(refused[status], status=status)
        open_now = Metric("proxyguard_server_tunnels_open", "gauge",
                          "Tunnels open now, by transport.")
        opened_total = Metric("proxyguard_server_tunnels_opened_total", "counter",
                              "Tunnels opened since the start (upgrades answered with 101), "
                              "by transport.")
        for transport in TRANSPORTS:
            label = TRANSPORT_LABELS[transport]
            open_now.add(sum(tunnel.framing.name == transport for tunnel in tunnels),
                         transport=label)
            opened_total.add(opened[transport], transport=label)
        return _process_metrics() + [open_now, opened_total, refusals,
        ] + self._route_metrics(tunnels, route_opened) + _traffic_metrics(
            "proxyguard_server_", traffic) + [
            Metric("proxyguard_server_tunnel_lifetime_seconds", "histogram",
                   "How long closed tunnels lived, in seconds.").add_histogram(lifetimes),
        ]

    def _route_metrics(self, tunnels, route_opened):
        """With --route: tunnels open and opened by route (its PATH, or `default` for --to).
        A route a SIGHUP removed keeps both series until the restart: tunnels may still be
        open on it (the gauge counts them down), and a counter that vanished and came back
        with the route would read as a reset. The names are the operator's, so few."""
        if not self.routed:
            return []
        open_now = Metric("proxyguard_server_route_tunnels_open", "gauge",
                          "Tunnels open now, by route (--route PATH, or default for --to).")
        opened_total = Metric("proxyguard_server_route_tunnels_opened_total", "counter",
                              "Tunnels opened since the start, by route.")
        for route in route_opened:
            open_now.add(sum(tunnel.route == route for tunnel in tunnels), route=route)
            opened_total.add(route_opened[route], route=route)
        return [open_now, opened_total]

    def dump_tunnels(self):
        """SIGUSR1: one log line per open tunnel."""
        with self._lock:
            tunnels = [connection.tunnel for connection in self._connections
                       if connection.tunnel is not None]
        log.info("SIGUSR1: %s open", plural(len(tunnels), "tunnel"))
        for tunnel in tunnels:
            log.info("SIGUSR1: tunnel %s: %s", tunnel.peer,
                     tunnel.status_line(show_route=self.routed))


# =============================================================================================
# Client: dial, upgrade, tunnel, reconnect; `check`; several peers (up) and wg-quick
# Dialer makes one connection (proxy, TLS, upgrade) under one Deadline; Client keeps one tunnel
# up with back-off; ClientGroup runs a Client per profile peer. Uses everything above.
# =============================================================================================

# The client has one UDP socket on 127.0.0.1:<listen-port> for the whole run
# (SharedUdpEndpoint). The connector waits until a datagram is waiting (lazy connect), connects,
# upgrades, runs one tunnel to its end, and reconnects with back-off (1, 2, 4, 8, 10, 10 ... s;
# never gives up). Datagrams that the UDP pump had read when its tunnel died wait in a small
# bounded queue for the next tunnel; those that arrive while no tunnel is up wait in the UDP
# socket's receive buffer. With several --to (one peer's servers), each reconnect tries them in
# order from the one that carried the last tunnel (ServerChoice). The client's tunnels give up on
# data unacknowledged for path_down_timeout (8 RTOs, at least 2 s) instead of the idle timeout,
# and its dials start a fresh connect every CONNECT_STAGGER seconds without an answer, so a
# server silently gone or a path that comes back is noticed within seconds.


class Dialer:
    """Opens a channel to the server: resolve, connect (perhaps through an HTTP proxy's
    CONNECT), TLS for https:// and wss://, then the upgrade to the URL's transport. Used by the client for every tunnel
    and by `check`, which passes `report(step, ok, detail, seconds)` to print each step.

    Addresses are resolved once and kept (--peer-ips in order, or DNS), so a reconnect works
    while the VPN carries DNS. `abort()` from another thread wakes a dial in progress.
    """

    def __init__(self, url, proxy=None, peer_ips=(), fwmark=-1, tcp_port=0,
                 user_agent=DEFAULT_USER_AGENT, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 tls_context=None, report=None, ca_file=None):
        self.url = url
        self.ca_file = ca_file  # the --ca-file of tls_context, for the error that names it
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
        self._connecting = set()  # sockets of connects in progress, for abort()
        self._aborted = False

    def for_url(self, url):
        """A Dialer like this one for another URL of the same server (check's WebSocket try)."""
        dialer = Dialer(url, self.proxy, self.peer_ips, self.fwmark, self.tcp_port,
                        self.user_agent, self.connect_timeout, self.tls_context, self.report)
        dialer._addresses = self._addresses
        return dialer

    def abort(self):
        with self._lock:
            self._aborted = True
            # A connect in progress wakes too: shutdown of a connecting socket resets it.
            for sock in [self._sock] + list(self._connecting):
                if sock is not None:
                    PlainChannel(sock).shutdown()

    @contextlib.contextmanager
    def _step(self, name):
        """Time one step and tell `report` how it went; `detail` is the step's to fill in."""
        started = time.monotonic()
        detail = []
        try:
            yield detail
        except BaseException as exc:
            self._reported(name, False, "; ".join(detail + [describe_error(exc)]), started)
            raise
        self._reported(name, True, "; ".join(detail), started)

    def _reported(self, name, ok, detail, started):
        seconds = time.monotonic() - started
        if self.report:
            self.report(name, ok, detail, seconds)
        # The client's steps at debug level, one line each: every address tried, TLS, the
        # upgrade's answer (debug added almost nothing).
        log.debug("%s %s in %.1f ms: %s", name, "ok" if ok else "failed", seconds * 1000, detail)

    def resolve(self):
        """[(family, sockaddr)] to connect to: the proxy's, or the server's. Raises OSError."""
        if self._addresses is None:
            host, port = (self.proxy.host, self.proxy.port) if self.proxy else (
                self.url.host, self.url.port)
            with self._step("resolve") as detail:
                if self.peer_ips and not self.proxy:
                    addresses = [_resolve_tcp(ip, port, numeric=True)[0] for ip in self.peer_ips]
                    detail.append("--peer-ips, DNS skipped")
                else:
                    try:
                        addresses = _resolve_tcp(host, port)
                    except socket.gaierror as exc:
                        if self.proxy:
                            raise
                        raise ConnectionError("%s (--peer-ips IP,IP gives the server's "
                                              "addresses without DNS)" % describe_error(exc))
                detail.append("%s -> %s" % (host, ", ".join(
                    format_address(address) for _, address in addresses)))
            self._addresses = addresses
        return self._addresses

    def dial(self):
        """Return (channel, bytes after the 101, peer text, the WebSocket subprotocol the
        server took or None); raises OSError (ssl.SSLError, ConnectionError, socket.timeout)
        or UpgradeRefused. The channel is open and upgraded.

        One Deadline of `connect_timeout` bounds the whole: the TCP connects (the time left
        is shared among the addresses still to try), the proxy's CONNECT, TLS, the upgrade.
        """
        deadline = Deadline(self.connect_timeout)
        sock, address = self._connect(self.resolve(), deadline)
        try:
            peer = self.url.host_header
            if peer != format_address(address):  # a name: say which address answered
                peer += " (%s)" % format_address(address)
            if self.proxy:
                self._proxy_connect(sock, deadline)
                peer = "%s (via proxy %s)" % (self.url.host_header, format_address(address))
            if self.tls_context:
                channel = self._tls(sock, deadline, (sock.family, address))
            else:
                channel = PlainChannel(sock, deadline)
            rest, subprotocol = self._upgrade(channel)
            return channel, rest, peer, subprotocol
        except BaseException:
            sock.close()
            raise
        finally:
            with self._lock:
                self._sock = None

    def _connect(self, addresses, deadline):
        """A TCP connection to one of `addresses`: (socket, address), or ConnectionError.

        The first address is tried at once; every CONNECT_STAGGER seconds without an answer
        another attempt starts beside the waiting ones (the next address, round robin), at most
        CONNECT_ATTEMPTS at once (the oldest is dropped: a stuck attempt gives way to a fresh
        one), and the first to connect wins. An address that refuses is not tried again in this
        dial; a silent one is, with a fresh socket: a path that comes back (its SYNs lost in a
        cut, the kernel's next retry of the old socket seconds away) is found within
        CONNECT_STAGGER. All within `deadline` (--connect-timeout).
        """
        errors = {}  # address text: its last error
        no_route = []  # the addresses that failed for want of a route
        waiting = []  # [socket, address, started], oldest first
        poller = select.poll()
        answering = list(range(len(addresses)))  # not refused in this dial
        most = 1 if self.tcp_port else CONNECT_ATTEMPTS  # one source port: one at a time
        turn = 0
        next_start = time.monotonic()

        def give_up(attempt, error, retry=True, code=None, final=True):
            sock, address, started = attempt
            if final and self.fwmark < 0:
                hint = routing_loop_hint(address[0])
                if hint is not None:
                    error = "%s; %s" % (error, hint)
            waiting.remove(attempt)
            poller.unregister(sock)
            with self._lock:
                self._connecting.discard(sock)
            sock.close()
            text = ("proxy " if self.proxy else "") + format_address(address)
            self._reported("connect", False, "%s; %s" % (text, error), started)
            errors[format_address(address)] = error
            if code in NO_ROUTE_ERRNOS:
                no_route.append(address)
            if not retry:
                answering[:] = [i for i in answering if addresses[i][1] != address]

        try:
            while True:
                now = time.monotonic()
                left = deadline.remaining()
                if left <= 0 or not (waiting or answering):
                    for attempt in list(waiting):
                        give_up(attempt, "timed out")
                    message = "; ".join("%s: %s" % item for item in errors.items()) or "timed out"
                    if self.proxy:  # the server may be fine: say whose address this is
                        message = "cannot reach the HTTP proxy %s (from %s): %s%s" % (
                            self.proxy, self.proxy.option, message, "" if self.proxy.option
                            == "--proxy" else "; --proxy none ignores %s" % self.proxy.option)
                    raise ConnectFailed(message, no_route=set(no_route) == {
                        address for _, address in addresses})  # see NO_ROUTE_WAIT
                if answering and (not waiting or now >= next_start):
                    family, address = addresses[answering[turn % len(answering)]]
                    turn += 1
                    next_start = now + CONNECT_STAGGER
                    if len(waiting) >= most:
                        give_up(waiting[0], "no answer: a fresh attempt instead", final=False)
                    attempt = [self._start_connect(family, address), address, now]
                    waiting.append(attempt)
                    poller.register(attempt[0], select.POLLOUT)
                    error = attempt[0].connect_ex(address)
                    if error == 0:
                        return self._connected(attempt, waiting)
                    if error not in (errno.EINPROGRESS, errno.EAGAIN):
                        give_up(attempt, describe_error(OSError(error, os.strerror(error))),
                                retry=False, code=error)
                    continue
                if answering:
                    left = min(left, max(0.0, next_start - now))
                for fd, _ in poller.poll(left * 1000):
                    attempt = next(a for a in waiting if a[0].fileno() == fd)
                    with self._lock:
                        if self._aborted:
                            raise ConnectionError("stopped")
                    error = attempt[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error == 0:
                        return self._connected(attempt, waiting)
                    give_up(attempt, describe_error(OSError(error, os.strerror(error))),
                            retry=False, code=error)
        finally:
            for sock, _, _ in waiting:
                sock.close()
            with self._lock:
                self._connecting.clear()

    def _start_connect(self, family, address):
        """A non-blocking TCP socket for `address`, marked and bound as the options say."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._aborted:
                    raise ConnectionError("stopped")
                self._connecting.add(sock)
            if self.fwmark >= 0:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
            if self.tcp_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", self.tcp_port))
            _prepare_tcp_socket(sock)
            sock.setblocking(False)
        except BaseException:
            with self._lock:
                self._connecting.discard(sock)
            sock.close()
            raise
        return sock

    def _connected(self, attempt, waiting):
        """The winner of _connect: out of `waiting` (the rest are closed), armed with the
        deadline's rule again (the channel sets each call's timeout)."""
        sock, address, started = attempt
        waiting.remove(attempt)
        with self._lock:
            self._connecting.discard(sock)
            self._sock = sock
        sock.setblocking(True)
        self._reported("connect", True, ("proxy " if self.proxy else "") +
                       format_address(address), started)
        return sock, address

    def _proxy_connect(self, sock, deadline):
        """Ask the HTTP proxy for a tunnel to the server with CONNECT (RFC 9110 9.3.6)."""
        host = self.peer_ips[0] if self.peer_ips else self.url.host
        authority = format_address((host, self.url.port))
        with self._step("proxy") as detail:
            channel = PlainChannel(sock, deadline)
            channel.sendall(_build_connect_request(authority, self.proxy.credentials,
                                                  self.user_agent))
            head, rest = _read_response_head(channel)
            response = parse_response(head)
            detail.append("CONNECT %s -> HTTP %d %s" % (authority, response.start[1],
                                                        shown(response.start[2], 100)))
            _check_connect_response(response, self.proxy.credentials is not None)
            if rest:
                raise UpgradeRefused("the proxy sent data after its 200 answer")

    def _tls(self, sock, deadline, address):
        with self._step("tls") as detail:
            channel = TLSChannel(sock, self.tls_context, server_side=False,
                                 server_hostname=self.url.host, deadline=deadline)
            try:
                channel.handshake()
            except ssl.SSLError as exc:
                # What describe_error needs to name the cause: the --ca-file that was tried,
                # and (check only: it costs a second connection) the names the certificate
                # holds, which a failed handshake does not give away.
                names = None
                if self.report and getattr(exc, "verify_code", None) in (
                        X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH):
                    names = self._certificate_names(address, deadline)
                raise TLSFailed(exc, self.ca_file, names,
                                "ws" if self.url.websocket else "http") from exc
            detail.append(describe_tls(channel))
        return channel

    def _certificate_names(self, address, deadline):
        """The names (subjectAltName) in the server's certificate, read over a second
        connection to `address` that checks the chain but not the host name; None if that
        fails. For `check` only, to show what a name mismatch is a mismatch with."""
        context = client_tls_context(self.ca_file)
        context.minimum_version = self.tls_context.minimum_version
        context.check_hostname = False
        report, self.report = self.report, None  # not a step of its own in check's output
        sock = None
        try:
            sock, _ = self._connect([address], deadline)
            if self.proxy:
                self._proxy_connect(sock, deadline)
            channel = TLSChannel(sock, context, server_side=False,
                                 server_hostname=self.url.host, deadline=deadline)
            channel.handshake()
            return certificate_names(channel.peer_certificate())
        except (OSError, ProxyGuardError):
            return None
        finally:
            self.report = report
            if sock is not None:
                sock.close()

    def _upgrade(self, channel):
        plain = not channel.tls_version
        with self._step("upgrade") as detail:
            key = websocket_key() if self.url.websocket else None
            request = build_upgrade_request(self.url.host_header, self.url.target,
                                            self.user_agent, key)
            log.debug("upgrade request: %s", _head_line(request))
            channel.sendall(request)
            try:
                head, rest = _read_response_head(channel)
            except ClosedEarly as exc:
                # A TLS port may close on a plain request without a byte (OpenSSL's
                # HTTP_REQUEST; HAProxy, a Python server): the likeliest cause over http://.
                if plain and exc.received == 0:
                    raise ConnectionError("closed without an answer (0 bytes): " + USE_HTTPS_HINT)
                raise
            if plain and head[:1] in TLS_RECORD_STARTS:  # a TLS alert or handshake record
                raise UpgradeRefused("the server answered in TLS, not HTTP: " + USE_HTTPS_HINT)
            response = parse_response(head)
            log.debug("upgrade response: %s", _head_line(head))
            version, status, reason = response.start
            detail.append("GET %s -> %s %d %s" % (self.url.target, version, status,
                                                  shown(reason, 100)))
            detail.extend("%s: %s" % (name, shown(value)) for name, value in response.headers)
            body = b"" if response.start[1] == 101 else _read_body(channel, response, rest)
            subprotocol = check_upgrade_response(response, body, key)
        return rest, subprotocol


def _proxy_from_environment(url):
    """The proxy the environment names for `url` (HTTPS_PROXY or HTTP_PROXY, by scheme, and
    NO_PROXY), as a ProxyURL, or None. urllib.request implements the conventions."""
    import urllib.request  # only here: it is slow to import, and only the client needs it
    proxies = urllib.request.getproxies()
    text = proxies.get("https" if url.tls else "http")  # ws:// goes as http:// does
    if not text or urllib.request.proxy_bypass(url.host):
        return None
    return ProxyURL(text, option="%s_PROXY" % url.scheme.upper())


class Client(Service):
    """The ProxyGuard client: WireGuard's endpoint on 127.0.0.1, tunnelling to the server.

    `serve_forever()` runs the connector in the calling thread until `stop()`: wait for a
    datagram, dial, run a Tunnel to its end, wait as `backoff` says, and again (module
    docstring). Datagrams the tunnel could not send wait in `pending` and go out first on the
    next tunnel. `Client.open()` binds the UDP socket from the options; tests give their own
    SharedUdpEndpoint. The endpoint is closed when serve_forever returns.
    """

    def __init__(self, dialer, endpoint, idle_timeout=DEFAULT_IDLE_TIMEOUT, backoff=None,
                 keepalive=DEFAULT_KEEPALIVE, fallbacks=(), tunnels_changed=None,
                 busy_polling=None):
        self.busy_polling = busy_polling  # a BusyPolling for the tunnels' pumps, or None
        # The peer's servers (several --to): `dialer` first, then `fallbacks`, each
        # with its own back-off; `servers` decides which is tried when. `dialer` and
        # `backoff` are the server of the current (or last) attempt, `server_index` its place
        # in `dialers`; `url` names the peer.
        self.dialers = [dialer] + list(fallbacks)
        self.servers = ServerChoice([backoff or Backoff()] + [Backoff() for _ in fallbacks])
        self.dialer = dialer
        self.backoff = self.servers.backoffs[0]
        self.server_index = 0
        self.url = dialer.url
        self.endpoint = endpoint
        self.address = endpoint.address
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive  # WebSocket pings (ws://, wss://), seconds; 0: none
        self.pending = collections.deque(maxlen=PENDING_DATAGRAMS)
        self._stopping = False
        self._serving = False
        self._lock = threading.Lock()
        self._tunnel = None
        # Metrics. Written by the connector thread, but `dropped` by the tunnel's UDP pump;
        # the closed tunnels' figures under _lock, as `_tunnel` is.
        self.reconnects = dict.fromkeys(RECONNECT_REASONS, 0)
        self.last_error = None  # the text of the last failed dial
        self.dropped = 0  # datagrams the full reconnect queue pushed out
        self.closed_traffic = TrafficTotals()
        # Each server's (by its index in `dialers`): tunnels opened through it, failed dials,
        # and failed dials since it last opened a tunnel.
        self.tunnels_opened = [0] * len(self.dialers)
        self.dial_failures = [0] * len(self.dialers)
        self.failures_in_a_row = [0] * len(self.dialers)
        # When the last datagram went to WireGuard and came from it (monotonic), if one did.
        self._last_to_wireguard = self._last_from_wireguard = None
        # Called when the tunnel comes up or goes (the service contract: systemd's STATUS=).
        self.tunnels_changed = tunnels_changed or (lambda: None)

    @classmethod
    def open(cls, dialer, listen_port=DEFAULT_LISTEN_PORT, forward_port=DEFAULT_FORWARD_PORT,
             idle_timeout=DEFAULT_IDLE_TIMEOUT, keepalive=DEFAULT_KEEPALIVE, fallbacks=(),
             environ=os.environ, tunnels_changed=None, busy_polling=None):
        """Check --fwmark, bind the UDP socket, resolve each server once; raises FatalError."""
        unused = unused_listen_fds(environ)
        if unused:  # a socket unit pointed at a client instance: say so, not silently
            log.warning("%s", unused)
        if dialer.fwmark >= 0:
            _check_fwmark(dialer.fwmark)
        if keepalive != DEFAULT_KEEPALIVE and not dialer.url.websocket:
            log.warning("--keepalive %g does nothing over %s:// (UoTLV/1 has no ping): it is "
                        "for ws:// and wss://", keepalive, dialer.url.scheme)
        endpoint = SharedUdpEndpoint.bind(listen_port, forward_port)
        for each in [dialer] + list(fallbacks):
            try:
                addresses = each.resolve()
            except OSError as exc:
                log.error("cannot resolve %s: %s (trying again at each connect)",
                          each.proxy.host if each.proxy else each.url.host,
                          describe_error(exc))
                continue
            # WireGuard may be up already (a restart): the loop shows before the first dial.
            hint = next(filter(None, (routing_loop_hint(address[0]) for _, address in addresses
                                      if each.fwmark < 0)), None)
            if hint is not None:
                log.warning("%s", hint)
        return cls(dialer, endpoint, idle_timeout, keepalive=keepalive, fallbacks=fallbacks,
                   tunnels_changed=tunnels_changed, busy_polling=busy_polling)

    def serve_forever(self):
        log.info("client listening on %s (UDP), tunnelling to %s%s, replies to WireGuard at %s",
                 format_address(self.address), " or ".join(str(d.url) for d in self.dialers),
                 " via proxy %s" % self.dialer.proxy if self.dialer.proxy else "",
                 format_address(self.endpoint.send_to))
        self._serving = True  # the watchdog's sign of life (healthy)
        try:
            while True:
                self.endpoint.rearm()  # forget the last tunnel's wakes; stop() wakes after this
                if self._stopping or not (self.pending or self.endpoint.wait()):
                    break
                self._connect_and_run(self.servers.next()[0])
                self.endpoint.rearm()  # the tunnel's own wake must not cut the wait short
                if self._stopping:  # stop() sets this before it wakes: no wake is lost
                    break
                wait = self.servers.next()[1]
                if wait:
                    log.info("next attempt in %gs, when WireGuard sends", round(wait, 1))
                    self.endpoint.wait(wait, for_datagram=False)
        finally:
            self._serving = False
            self.endpoint.close()

    def _connect_and_run(self, index):
        """One attempt through server `index`: dial, run the tunnel to its end; tell
        `servers` how it went."""
        self.dialer, self.backoff = self.dialers[index], self.servers.backoffs[index]
        self.server_index = index
        log.debug("connecting to %s%s", self.dialer.url, " (after %s in a row)"
                  % plural(self.backoff.failures, "failure") if self.backoff.failures else "")
        started = self.servers.clock()
        try:
            tunnel = self._open_tunnel()
        except (OSError, ProxyGuardError) as exc:
            self.servers.failed(index, started, self._dial_failed(exc))
            return
        self.servers.carried(index)
        reason = tunnel.run()
        with self._lock:
            self._tunnel = None
            self.closed_traffic.add(tunnel)
            self._last_to_wireguard, self._last_from_wireguard = self._last_datagrams(tunnel)
        if not self._stopping:
            self.reconnects["idle" if tunnel.went_idle else "ended"] += 1
        self.tunnels_changed()
        # Last, as on the server: a scrape or SIGUSR1 the line prompts sees the tunnel closed.
        log.info("tunnel down: %s after %s (%s)", tunnel.peer, tunnel.summary(), reason)
        wait = self.backoff.tunnel_ended(tunnel.duration, tunnel.went_idle)
        if tunnel.path_down and not wait:
            # The server or the path to it went silent: a failure, even after a tunnel that
            # lived (its back-off starts small again), so the next server goes first.
            wait = self.backoff.failed()
        self.servers.tunnel_ended(index, wait)

    def _open_tunnel(self):
        """Dial and send the pending datagrams; return the Tunnel, ready to run."""
        channel, first_bytes, peer, subprotocol = self.dialer.dial()
        url = self.dialer.url
        framing = (websocket_framing(subprotocol, client_side=True, keepalive=self.keepalive)
                   if url.websocket else UOTLV_FRAMING)
        try:
            if self.pending:
                channel.sendall(framing.encode_datagrams(self.pending))
                self.pending.clear()
        except BaseException:
            channel.close()
            raise
        tunnel = Tunnel(channel, self.endpoint, peer, IdleClock(self.idle_timeout), first_bytes,
                        unsent=self._keep_unsent, framing=framing,
                        unacked_timeout=path_down_timeout(
                            retransmission_timeout(channel.sock)),
                        busy_polling=self.busy_polling)
        with self._lock:  # a scrape sees the tunnel and its server's counts together
            self._tunnel = tunnel
            self.tunnels_opened[self.server_index] += 1
            self.failures_in_a_row[self.server_index] = 0
            if self._stopping:
                tunnel.close("client shutting down", CLOSE_GOING_AWAY)
        self.tunnels_changed()
        log.info("tunnel up: %s, %s, %s%s", peer, self._server_text(), framing.label,
                 ", " + channel.tls_version if channel.tls_version else "")
        return tunnel

    def _server_text(self):
        """The URL of the server of the current (or last) attempt, and with several --to
        which one it is: for the tunnel-up and SIGUSR1 lines."""
        if len(self.dialers) == 1:
            return str(self.dialer.url)
        return "%s (server %d of %d)" % (self.dialer.url, self.server_index + 1,
                                         len(self.dialers))

    def _last_datagrams(self, tunnel):
        """When the last datagram went to WireGuard and came from it, `tunnel` included."""
        to_wireguard, from_wireguard = self._last_to_wireguard, self._last_from_wireguard
        if tunnel is not None:
            if tunnel.to_udp_datagrams:
                to_wireguard = tunnel.idle.last_received
            if tunnel.to_tcp_datagrams:
                from_wireguard = tunnel.idle.last_sent
        return to_wireguard, from_wireguard

    def _keep_unsent(self, datagrams):
        """The tunnel's UDP pump could not send `datagrams`: they wait for the next tunnel;
        what the full queue pushes out (the oldest) is counted as dropped."""
        self.dropped += max(0, len(self.pending) + len(datagrams) - PENDING_DATAGRAMS)
        self.pending.extend(datagrams)

    def _dial_failed(self, exc):
        """Log why a dial failed, once; return the wait before the next."""
        if self._stopping:
            # stop() aborted the dial: no failure to warn about (a SIGTERM during a connect
            # logged "cannot connect to ...: stopped").
            log.debug("connecting to %s ended by stop: %s", self.dialer.url, describe_error(exc))
            return 0
        if isinstance(exc, ServerUnavailable):
            self._count_failure("unavailable", str(exc))
            log.warning("cannot connect to %s: %s", self.dialer.url, exc)
            return self.backoff.failed(exc.retry_after)
        if isinstance(exc, UpgradeRefused):
            self._count_failure("refused", str(exc))
            log.error("upgrade refused by %s: %s", self.dialer.url, exc)
            return self.backoff.refused()
        if isinstance(exc, TLSFailed):  # a portal's certificate fails
            self._count_failure("tls", describe_error(exc))
            log.error("cannot connect to %s: %s", self.dialer.url, describe_error(exc))
            return self.backoff.refused()
        self._count_failure("network", describe_error(exc))
        log.warning("cannot connect to %s: %s", self.dialer.url, describe_error(exc))
        wait = self.backoff.failed()
        return min(wait, NO_ROUTE_WAIT) if isinstance(exc, ConnectFailed) and exc.no_route \
            else wait

    def _count_failure(self, reason, text):
        self.reconnects[reason] += 1
        self.dial_failures[self.server_index] += 1
        self.failures_in_a_row[self.server_index] += 1
        self.last_error = text

    def stop(self):
        with self._lock:
            self._stopping = True
            if self._tunnel is not None:
                self._tunnel.close("client shutting down", CLOSE_GOING_AWAY)
        for dialer in self.dialers:
            dialer.abort()
        self.endpoint.wake()

    def status(self):
        """One line for systemd's STATUS=."""
        with self._lock:
            up = self._tunnel is not None
        return "tunnel up to %s" % self.dialer.url if up else "no tunnel open to %s" % (
            ", ".join(str(dialer.url) for dialer in self.dialers))

    def healthy(self):
        """For the watchdog: the connector runs and the tunnel's lock is free."""
        if not self._serving or self._stopping or not self._lock.acquire(timeout=1):
            return False
        self._lock.release()
        return True

    def reload(self, options):
        """SIGHUP: load the TLS settings (--ca-file) again for the next connection."""
        if not any(dialer.url.tls for dialer in self.dialers):
            return []
        context = client_tls_context(options.ca_file, options.tls_min_version)
        for dialer in self.dialers:
            if dialer.url.tls:
                dialer.tls_context, dialer.ca_file = context, options.ca_file
        return ["TLS settings" + (" (--ca-file %s)" % options.ca_file if options.ca_file
                                  else "")]

    def metrics(self):
        """The client's metrics now (Metric objects), for the metrics page."""
        with self._lock:
            tunnel = self._tunnel
            traffic = self.closed_traffic.copy()
            if tunnel is not None:
                traffic.add(tunnel)
            last = self._last_datagrams(tunnel)
            carrying = self.server_index if tunnel is not None else None
            per_server = list(zip([str(dialer.url) for dialer in self.dialers],
                                  self.tunnels_opened, self.dial_failures,
                                  self.failures_in_a_row))
        now = time.monotonic()
        ages = Metric("proxyguard_client_last_datagram_age_seconds", "gauge",
                      "Seconds since the last datagram went to WireGuard (to_wireguard) or "
                      "came from it (from_wireguard); absent before the first.")
        for direction, at in zip(("to_wireguard", "from_wireguard"), last):
            if at is not None:
                ages.add(round(now - at, 3), direction=direction)
        reconnects = Metric("proxyguard_client_reconnects_total", "counter",
                            "Times the client had to connect again, by reason: its dial "
                            "failed (refused, unavailable, tls, network) or its tunnel "
                            "ended (idle, ended).")
        for reason in RECONNECT_REASONS:
            reconnects.add(self.reconnects[reason], reason=reason)
        error = Metric("proxyguard_client_last_handshake_error", "gauge",
                       "The last failed connection attempt, in its reason label; 1. Absent "
                       "until one fails.")
        if self.last_error is not None:
            error.add(1, reason=self.last_error)
        return _process_metrics() + [
            Metric("proxyguard_client_tunnel_up", "gauge",
                   "1 while a tunnel to the server is open, else 0.").add(int(tunnel is not None)),
            reconnects, ages, error,
            Metric("proxyguard_client_pending_datagrams", "gauge",
                   "Datagrams waiting in the reconnect queue for the next tunnel.")
            .add(len(self.pending)),
            Metric("proxyguard_client_dropped_datagrams_total", "counter",
                   "Datagrams dropped because the reconnect queue was full.").add(self.dropped),
        ] + _traffic_metrics("proxyguard_client_", traffic) + self._server_metrics(
            carrying, per_server)

    @staticmethod
    def _server_metrics(carrying, per_server):
        """The series of each server (its --to URL in the `server` label, every one from the
        start): which carries the tunnel, and how each has done. `carrying`: the index of the
        server whose tunnel is open, or None; `per_server`: (URL, tunnels opened, failed
        dials, failed dials in a row) in the order of --to."""
        families = [
            Metric("proxyguard_client_server_carrying", "gauge",
                   "1 for the server (--to URL) whose tunnel is open now, 0 for the others; "
                   "all 0 while no tunnel is open."),
            Metric("proxyguard_client_server_tunnels_opened_total", "counter",
                   "Tunnels opened through each server: a rise on another server than before "
                   "is a failover, seen even between two scrapes."),
            Metric("proxyguard_client_server_dial_failures_total", "counter",
                   "Failed connection attempts to each server, for any reason "
                   "(proxyguard_client_reconnects_total gives the reasons of all)."),
            Metric("proxyguard_client_server_failures_in_a_row", "gauge",
                   "Failed connection attempts to each server since it last opened a tunnel: "
                   "above 0, its last attempt failed (it stays so until it is tried again)."),
        ]
        for index, (server, opened, failed, in_a_row) in enumerate(per_server):
            for family, value in zip(families, (int(index == carrying), opened, failed,
                                                in_a_row)):
                family.add(value, server=server)
        return families

    def dump_tunnels(self):
        """SIGUSR1: one log line for the open tunnel, if any, naming its server."""
        with self._lock:  # the tunnel and its server's name together
            tunnel, server = self._tunnel, self._server_text()
        log.info("SIGUSR1: %s open, %s waiting", plural(int(tunnel is not None), "tunnel"),
                 plural(len(self.pending), "datagram"))
        if tunnel is not None:
            log.info("SIGUSR1: tunnel %s, %s: %s", tunnel.peer, server, tunnel.status_line())


def run_check(dialer, out=sys.stdout):
    """`proxyguard.py check`: dial once, print every step with its timing; 0 if upgraded."""
    def report(step, ok, detail, seconds):
        print("%-8s %-4s %7.1f ms  %s" % (step, "ok" if ok else "FAIL", seconds * 1000, detail),
              file=out, flush=True)

    dialer.report = report
    print("check    %s%s" % (dialer.url, " via proxy %s" % dialer.proxy if dialer.proxy else ""),
          file=out)
    try:
        peer = _dial_and_close(dialer)
    except (OSError, ProxyGuardError) as exc:
        print("result   FAIL: %s" % describe_error(exc), file=out)
        # Refused as a WebSocket-only front refuses UoTLV/1 (it strips or blocks the
        # Upgrade: 426, 400, 403...): try WebSocket on the same URL and say so if it works.
        if dialer.url.websocket or not isinstance(exc, UpgradeRefused) or isinstance(
                exc, ServerUnavailable):
            return 1
        url = dialer.url.websocket_twin()
        print("check    %s: WebSocket on the same URL" % url, file=out)
        try:
            peer = _dial_and_close(dialer.for_url(url))
        except (OSError, ProxyGuardError) as second:
            if isinstance(exc, UpgradeDropped) and isinstance(second, UpgradeDropped):
                print("result   FAIL: the reverse proxy drops the Upgrade header, for UoTLV/1 "
                      "and WebSocket alike: make it pass it (%s)" % FRONT_UPGRADE_FIX, file=out)
                return 1
            print("result   FAIL: not over WebSocket either: %s" % describe_error(second),
                  file=out)
            return 1
        print("result   FAIL over %s, ok over WebSocket: use --to %s" % (PROTOCOL, url),
              file=out)
        return 1
    print("result   ok: %s accepts %s upgrades" % (peer, dialer.url.transport), file=out)
    return 0


def _dial_and_close(dialer):
    """Dial once (check), close at once (over WebSocket with a close frame, so the server and
    any front see an orderly end), and return the peer's text."""
    channel, _, peer, _ = dialer.dial()
    if dialer.url.websocket:
        channel.send_without_waiting(WebSocketFraming(client_side=True).close_frame(CLOSE_NORMAL))
    channel.shutdown()
    channel.close()
    return peer


# --- Several peers in one process (up): a Client per ProxyEndpoint peer, and wg-quick --------
# up (`proxyguard.py up PROFILE.conf`): the profile is read (parse_profile, pure); each [Peer]
# with a ProxyEndpoint gets a Client of its own on a free UDP port, its server resolved once at
# start; a ClientGroup runs them all as one service, its peers named by their URLs in logs
# (PeerLogNames), metrics, SIGUSR1 and STATUS. The profile, rewritten for those ports
# (rewrite_profile: Endpoint, ListenPort, FwMark = the tunnels' socket mark), goes to wg-quick
# from a private runtime file (WgQuick), or to --write-config for NetworkManager or
# systemd-networkd; wg-quick down at the stop.

class PeerLogNames(logging.Filter):
    """Puts 'peer URL: ' before the log lines of the threads that speak for a peer (each
    client's connector, which runs its tunnels' TCP->UDP pump too, and the UDP->TCP pump that
    Tunnel.run starts in the connector's context), so that with several peers in one process
    every line says whose it is. A filter on `log`, added by ClientGroup.

    The name is a context variable, not a table of threads: a thread started with a copy of
    the speaking thread's context (Tunnel.run's UDP pump) speaks for the same peer, and any
    other thread for none. A filter runs in the thread that logs, once per line."""

    _speaking_for = contextvars.ContextVar("proxyguard_peer", default=None)

    @contextlib.contextmanager
    def speaking_for(self, name):
        """Lines this thread logs inside the block, and the threads it starts there in its
        context, name peer `name`."""
        token = self._speaking_for.set(str(name))
        try:
            yield
        finally:
            self._speaking_for.reset(token)

    def filter(self, record):
        name = self._speaking_for.get()
        if name is not None:
            # The message is formatted with its arguments later: a % in the URL stays one.
            record.msg = "peer %s: %s" % (name.replace("%", "%%") if record.args else name,
                                          record.msg)
        return True


class ClientGroup(Service):
    """Several Clients in one process, one per peer of a profile (up): each has its own UDP
    port, tunnel and back-off, and runs its connector in a thread of its own. To main(argv)'s
    runtime (_run_until_signal, SystemdNotifier, MetricsEndpoint) the group is one service;
    its log lines (PeerLogNames), SIGUSR1 lines, metrics (a `peer` label) and STATUS name each
    peer by its URL."""

    def __init__(self, clients, pinning=None):
        self.clients = list(clients)
        self.names = PeerLogNames()
        self.pinning = pinning
        self._serving = False

    def serve_forever(self):
        """Run every client until `stop()`; returns once all have ended. Meanwhile this
        thread carries out `pinning` (a CpuPinning or None): its start before the clients'
        threads, its check every `interval` seconds."""
        log.addFilter(self.names)
        threads = [threading.Thread(target=self._serve, args=(client,),
                                    name="peer %s" % client.url, daemon=True)
                   for client in self.clients]
        pinning = self.pinning
        try:
            if pinning is not None:
                pinning.start()
            for thread in threads:
                thread.start()
            self._serving = True
            for thread in threads:
                while thread.is_alive():
                    thread.join(pinning.interval if pinning is not None else None)
                    if pinning is not None and pinning.interval is not None:
                        pinning.check()
        finally:
            self._serving = False
            log.removeFilter(self.names)

    def _serve(self, client):
        with self.names.speaking_for(client.url):
            try:
                client.serve_forever()
            except Exception:  # a bug: this peer stops, the others go on, healthy() says so
                log.exception("the tunnel stopped on an unexpected error")

    def stop(self):
        for client in self.clients:
            client.stop()

    def status(self):
        """One line for systemd's STATUS=: each peer's, by its URL."""
        return "; ".join(client.status() for client in self.clients)

    def healthy(self):
        return self._serving and all(client.healthy() for client in self.clients)

    def reload(self, options):
        done = []
        for client in self.clients:
            done += [what for what in client.reload(options) if what not in done]
        return done

    def metrics(self):
        """Every client's metrics, one family each, its samples labelled peer=URL."""
        shared = [metric.name for metric in _process_metrics()]
        families = collections.OrderedDict()
        for client in self.clients:
            for metric in client.metrics():
                if metric.name in shared:
                    continue
                family = families.setdefault(metric.name,
                                             Metric(metric.name, metric.kind, metric.help))
                family.samples += [(suffix, (("peer", str(client.url)),) + labels, value)
                                   for suffix, labels, value in metric.samples]
        return _process_metrics() + list(families.values())

    def dump_tunnels(self):
        """SIGUSR1: each client's lines, named by its peer; then where the threads run."""
        for client in self.clients:
            with self.names.speaking_for(client.url):
                client.dump_tunnels()
        if self.pinning is not None:
            log.info("SIGUSR1: %s", self.pinning.status())


def check_can_bring_up(profile, euid=None, which=None):
    """up without --write-config runs wg-quick: raise FatalError (one line, what to install or
    do) if it cannot: wg-quick missing, a DNS line without resolvconf, not root."""
    if which is None:
        import shutil  # only here: its imports cost every mode's start-up
        which = shutil.which
    missing = [tool for tool in ("wg-quick", "wg") if which(tool) is None]
    if missing:
        raise FatalError("%s not found: up brings WireGuard up with wg-quick; install the "
                         "package wireguard-tools (apt-get install wireguard-tools), or run "
                         "only the tunnels with --write-config" % " and ".join(missing))
    if profile.setting("dns") and which("resolvconf") is None:
        raise FatalError("the profile's DNS line needs resolvconf, which wg-quick calls to set "
                         "the name servers: install the package openresolv (or resolvconf), "
                         "or remove the DNS line")
    if (os.geteuid() if euid is None else euid) != 0:
        raise FatalError("up needs root: wg-quick creates the interface and its routes and "
                         "rules (run it with sudo), or run only the tunnels with --write-config")


class WgQuick:
    """up's WireGuard: `up(text)` writes the configuration to a private runtime file, a
    directory of its own (0700, under `runtime`: /run, else the temporary directory) holding
    INTERFACE.conf (0600: it holds the private key) and `owner` (RuntimeOwner: this process),
    and runs `wg-quick up` on it by absolute path (a bare name would be a file in
    /etc/wireguard); `down()` runs `wg-quick down`, waits for a userspace WireGuard
    (wireguard-go, wg-quick's fallback without the kernel module) to end, and removes the
    directory. `clear_leftovers()`, before, deals with what earlier ups left (judge_leftovers).
    Raises FatalError with wg-quick's last line."""

    # wireguard-go's control socket, there while it runs (for every network namespace).
    CONTROL_SOCKET = "/var/run/wireguard/%s.sock"
    # After `wg-quick down` deleted the interface, wireguard-go ends within milliseconds.
    USERSPACE_END_SECONDS = 5.0
    PREFIX = "proxyguard-"
    OWNER_FILE = "owner"

    def __init__(self, interface, runtime=None):
        import tempfile  # only here: client and server never write files
        self.interface = interface
        if runtime is None:
            runtime = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
        self.runtime = runtime
        self.directory = self.path = None

    def up(self, text):
        import tempfile
        self.directory = tempfile.mkdtemp(prefix=self.PREFIX, dir=self.runtime)
        self.path = os.path.join(self.directory, self.interface + ".conf")
        try:
            try:  # the owner first: a directory with a configuration always says whose it is
                self._write(self.OWNER_FILE, own_runtime_owner(self.interface).text())
                self._write(self.interface + ".conf", text)
            except OSError as exc:
                raise FatalError("cannot write the runtime file %s: %s"
                                 % (self.path, describe_error(exc)))
            self._run("up", self.path)
        except FatalError:
            remove_runtime_directory(self.directory)
            raise
        log.info("WireGuard up: wg-quick up %s", self.path)

    def down(self):
        """Returns whether the interface went down. If wg-quick down fails, the runtime
        directory stays: its file is what undoes wg-quick's routes, rules and DNS, and the next
        up tries again with it (clear_leftovers), or removes it if the interface is gone."""
        try:
            self._take_down(self.path)
        except FatalError as exc:
            log.error("%s: check with 'ip link show %s'; %s stays for the next up to take it "
                      "down (or wg-quick down %s)", exc, self.interface, self.path, self.path)
            return False
        remove_runtime_directory(self.directory)
        log.info("WireGuard down: wg-quick down %s", self.path)
        return True

    def clear_leftovers(self):
        """Carry out judge_leftovers on the runtime directories under `runtime`, a line
        each. Raises FatalError."""
        found = self._find_leftovers()
        for action, leftover in judge_leftovers(found, self.interface, network_namespace(),
                                                interface_exists):
            owner = leftover.owner
            path = os.path.join(leftover.directory, owner.interface + ".conf")
            if action == "keep":
                log.warning("%s of an earlier up of %s (pid %d, gone) stays: it is what takes "
                            "%s down, which the next up of that profile does (or wg-quick down "
                            "%s)", leftover.directory, owner.interface, owner.pid,
                            owner.interface, path)
                continue
            if action == "down":
                try:
                    self._take_down(path)
                except FatalError as exc:
                    raise FatalError("%s, left up by an earlier up (pid %d, gone), cannot be "
                                     "taken down: %s; check with 'ip link show %s'" % (
                                         owner.interface, owner.pid, exc, owner.interface))
            remove_runtime_directory(leftover.directory)
            if action == "down":
                log.warning("%s was left up by an earlier up (pid %d) that ended without taking "
                            "it down: taken down (wg-quick down %s), its runtime directory "
                            "removed", owner.interface, owner.pid, path)
            else:
                log.warning("removed %s, left by an earlier up of %s (pid %d) that ended "
                            "without removing it (its interface is gone)", leftover.directory,
                            owner.interface, owner.pid)

    def _find_leftovers(self):
        """The Leftovers under `runtime`: directories named PREFIX... that an `owner` file
        names the owner of. Only this user's, private ones: another user's file could name any
        program for wg-quick down to run as root (PreDown, PostDown)."""
        import stat
        try:
            names = sorted(os.listdir(self.runtime))
        except OSError:
            return []
        found = []
        for name in names:
            directory = os.path.join(self.runtime, name)
            if not name.startswith(self.PREFIX):
                continue
            try:
                info = os.lstat(directory)
                if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
                        or info.st_mode & 0o077):
                    continue
                with open(os.path.join(directory, self.OWNER_FILE)) as stream:
                    owner = RuntimeOwner.parse(stream.read())
            except (OSError, UnicodeDecodeError):  # being made or removed; not ours
                continue
            if owner is not None:
                found.append(Leftover(directory, owner, process_runs(owner.pid, owner.start)))
        return found

    def _write(self, name, text):
        descriptor = os.open(os.path.join(self.directory, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)

    def _take_down(self, path):
        """wg-quick down `path`, then wait for the interface's wireguard-go (if any) to end."""
        self._run("down", path)
        interface = os.path.basename(path)[:-len(".conf")]
        deadline = Deadline(self.USERSPACE_END_SECONDS)
        while os.path.exists(self.CONTROL_SOCKET % interface):
            if deadline.remaining() <= 0:
                log.warning("wireguard-go of %s still runs after wg-quick down", interface)
                break
            time.sleep(0.01)  # polling for the process's end, with a deadline

    @staticmethod
    def _run(action, path):
        import subprocess
        import tempfile
        # Its output into a file, not a pipe: wireguard-go, which wg-quick starts in the
        # background, keeps wg-quick's stdout and stderr open for as long as it runs.
        with tempfile.TemporaryFile() as output:
            try:
                status = subprocess.run(["wg-quick", action, path],
                                        stdin=subprocess.DEVNULL, stdout=output,
                                        stderr=subprocess.STDOUT).returncode
            except OSError as exc:
                raise FatalError("cannot run wg-quick: %s" % describe_error(exc))
            output.seek(0)
            lines = output.read().decode("utf-8", "replace").splitlines()
        for line in lines:
            log.debug("wg-quick %s: %s", action, line)
        if status != 0:
            raise FatalError("wg-quick %s %s failed (exit %d): %s" % (
                action, path, status, lines[-1][:200] if lines else "no output"))


def own_runtime_owner(interface):
    """This process as the RuntimeOwner of an up of `interface`."""
    pid = os.getpid()
    return RuntimeOwner(interface, pid, _started(pid), network_namespace())


def network_namespace():
    """This process's network namespace: its inode (as `ip netns identify` compares them)."""
    return os.stat("/proc/self/ns/net").st_ino


def _started(pid):
    """When process `pid` started (process_start_time, from its /proc/PID/stat), or None if it
    is gone."""
    try:
        with open("/proc/%d/stat" % pid) as stream:
            return process_start_time(stream.read())
    except OSError:
        return None


def process_runs(pid, start):
    """Whether process `pid` runs and is the one that started at `start` (process_start_time),
    not a later one given the same pid."""
    return start is not None and _started(pid) == start


def interface_exists(name):
    """Whether this network namespace has an interface `name`."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def remove_runtime_directory(directory):
    """Remove an up's runtime directory and its files (they are ours: see _find_leftovers)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


# =============================================================================================
# Metrics: the Prometheus text (pure) and the --metrics-listen endpoint that serves it
# Histogram, Metric and render_metrics write the text exposition format 0.0.4 with no I/O;
# MetricsEndpoint serves a service's metrics() over http.server. Uses sockets and the above.
# =============================================================================================

# The Server and the Client each say what they count in `metrics()`, read when the page is
# asked for: the open tunnels' own counters live (each written by one pump thread, never locked
# on the hot path), plus what closed tunnels left in `TrafficTotals`. `MetricsEndpoint` is
# started and stopped by main(argv) with the service.


class Histogram:
    """Observations counted into `buckets` (upper bounds), for a Prometheus histogram. Not
    thread-safe: its owner observes under its own lock."""

    def __init__(self, buckets):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        index = 0
        while index < len(self.buckets) and value > self.buckets[index]:
            index += 1
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def copy(self):
        other = Histogram(self.buckets)
        other.counts, other.sum, other.count = list(self.counts), self.sum, self.count
        return other


class Metric:
    """One metric family of the Prometheus text format: its name, type (counter, gauge,
    histogram), help text and samples. `add()` appends a sample; `render_metrics` writes them."""

    def __init__(self, name, kind, help_text):
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples = []  # (name suffix, ((label, value), ...), number)

    def add(self, value, suffix="", **labels):
        self.samples.append((suffix, tuple(labels.items()), value))
        return self

    def add_histogram(self, histogram, **labels):
        """The _bucket (cumulative, le="+Inf" last), _sum and _count samples of `histogram`."""
        total = 0
        for bound, count in zip(histogram.buckets + (float("inf"),), histogram.counts):
            total += count
            self.add(total, "_bucket", **dict(labels, le=_format_metric_value(float(bound))))
        self.add(histogram.sum, "_sum", **labels)
        return self.add(histogram.count, "_count", **labels)


def _format_metric_value(value):
    """A sample value as the text format writes it: integers plainly, +Inf, -Inf, NaN."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label_value(text):
    """A label value between double quotes: backslash, double quote and line feed escaped."""
    return str(text).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text):
    """A HELP text: backslash and line feed escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render_metrics(metrics):
    """The Prometheus text exposition format (0.0.4) of `metrics` (Metric objects): a HELP
    and a TYPE line per family, then its samples; ends with a line feed. Returns bytes."""
    lines = []
    for metric in metrics:
        lines.append("# HELP %s %s" % (metric.name, _escape_help(metric.help)))
        lines.append("# TYPE %s %s" % (metric.name, metric.kind))
        for suffix, labels, value in metric.samples:
            label_text = ""
            if labels:
                label_text = "{%s}" % ",".join('%s="%s"' % (name, _escape_label_value(text))
                                               for name, text in labels)
            lines.append("%s%s%s %s" % (metric.name, suffix, label_text,
                                        _format_metric_value(value)))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _process_metrics():
    """The metrics of every mode: process start time and build information."""
    return [
        Metric("proxyguard_process_start_time_seconds", "gauge",
               "Start time of the process since the Unix epoch, in seconds.")
        .add(PROCESS_START_TIME),
        Metric("proxyguard_build_info", "gauge",
               "proxyguard.py's version and the Python running it; the value is always 1.")
        .add(1, version=__version__, python="%d.%d.%d" % tuple(sys.version_info[:3])),
    ]


def _traffic_metrics(prefix, totals):
    """Bytes and datagrams each way, and oversized frames dropped, from `totals` (a
    TrafficTotals of closed tunnels plus the open ones' live counters)."""
    ways = (("to_wireguard", totals.to_udp_bytes, totals.to_udp_datagrams),
            ("from_wireguard", totals.to_tcp_bytes, totals.to_tcp_datagrams))
    size = Metric(prefix + "bytes_total", "counter",
                  "UDP payload bytes carried, by direction: to_wireguard (from the tunnel to "
                  "the local WireGuard) or from_wireguard.")
    count = Metric(prefix + "datagrams_total", "counter",
                   "Datagrams carried, by direction (see bytes_total).")
    for direction, size_value, count_value in ways:
        size.add(size_value, direction=direction)
        count.add(count_value, direction=direction)
    oversized = Metric(prefix + "oversized_frames_dropped_total", "counter",
                       "Frames dropped because they cannot go out as one UDP datagram.")
    return [size, count, oversized.add(totals.oversized)]


class TrafficTotals:
    """Sums of the Tunnel counters (see Tunnel): of closed tunnels, plus live ones at a
    scrape. Its owner adds under its own lock."""

    FIELDS = ("to_udp_datagrams", "to_udp_bytes", "to_tcp_datagrams", "to_tcp_bytes",
              "oversized")

    def __init__(self):
        for field in self.FIELDS:
            setattr(self, field, 0)

    def add(self, tunnel):
        for field in self.FIELDS:
            setattr(self, field, getattr(self, field) + getattr(tunnel, field))
        return self

    def copy(self):
        return TrafficTotals().add(self)


@functools.lru_cache(maxsize=None)
def _metrics_handler():
    """The request handler class of the metrics page, made on first use: importing http.server
    costs about 40 ms of start-up (python3 -X importtime), which a router would pay at every
    start even without --metrics-listen."""
    import http.server

    class MetricsHandler(http.server.BaseHTTPRequestHandler):
        """GET /metrics: the service's metrics now (`collect()`, which MetricsEndpoint.start
        gives a subclass of its own); 404 for any other path. A request is logged at debug only
        (Prometheus asks every few seconds)."""

        collect = staticmethod(list)  # no service yet: an empty page
        server_version = "proxyguard.py/" + __version__
        timeout = HANDSHAKE_TIMEOUT  # a silent connection holds its thread no longer

        def do_GET(self):
            if self.path.split("?", 1)[0] != METRICS_PATH:
                self._answer(404, "text/plain; charset=utf-8",
                             b"not found: the metrics are at %s\n" % METRICS_PATH.encode())
                return
            try:
                body = render_metrics(self.collect())
            except Exception:  # a bug: the scrape fails, the service goes on
                log.exception("metrics page: unexpected error")
                self._answer(500, "text/plain; charset=utf-8", b"internal error\n")
                return
            self._answer(200, METRICS_CONTENT_TYPE, body)

        def _answer(self, status, content_type, body):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            log.debug("metrics: %s %s", self.address_string(), shown(format % args))

    return MetricsHandler


# The metrics page serves this many requests at once; the next gets 503 at once (800 idle
# connections held 800 threads for 10 s each).
METRICS_CONNECTIONS = 8

# Connections that have sent nothing yet wait in the accept thread's poll, without a thread,
# for HANDSHAKE_TIMEOUT; past this many the oldest is closed, so a flood of idle connections
# costs descriptors, never threads, and a scrape (which sends at once) still gets through.
METRICS_WAITING = 128


class MetricsEndpoint:
    """The metrics page on its own listening socket: one accept thread, which holds new
    connections in a poll until they send (at most METRICS_WAITING, each for HANDSHAKE_TIMEOUT),
    then a daemon thread per request, at most METRICS_CONNECTIONS at once (http.server's
    request handling). `open()` binds (raises FatalError), `start()` serves what `collect()`
    returns, `stop()` closes the socket and ends the accept thread."""

    def __init__(self, listener):
        self.address = listener.getsockname()
        import http.server  # see _metrics_handler
        self.httpd = http.server.ThreadingHTTPServer(self.address[:2], _metrics_handler(),
                                                     bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = listener
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self._thread = None
        self._stopping = False
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)

    @classmethod
    def open(cls, listen):
        try:
            return cls(open_listener(listen))
        except FatalError as exc:
            raise FatalError("--metrics-listen: %s" % exc)

    def start(self, collect):
        self.httpd.RequestHandlerClass = type("MetricsHandler", (_metrics_handler(),),
                                              {"collect": staticmethod(collect)})
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s%s", format_address(self.address), METRICS_PATH)

    def _serve(self):
        """Accept, and hand each connection that has sent something to _answer. The poll
        waits without a timer until a connection waits; stop() wakes it (a shutdown of the
        listening socket)."""
        listener = self.httpd.socket
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        waiting = collections.OrderedDict()  # fd: (socket, peer, Deadline), oldest first
        try:
            while not self._stopping:
                first = next(iter(waiting.values()), None)
                timeout = None if first is None else max(0, first[2].remaining()) * 1000
                for fd, _ in poller.poll(timeout):
                    if fd != listener.fileno():
                        sock, peer, _ = waiting.pop(fd)
                        poller.unregister(fd)
                        self._answer(sock, peer)
                    elif not self._stopping:
                        self._accept(listener, poller, waiting)
                while waiting and next(iter(waiting.values()))[2].remaining() <= 0 or len(
                        waiting) > METRICS_WAITING:
                    fd, (sock, _, _) = waiting.popitem(last=False)
                    poller.unregister(fd)
                    sock.close()
        finally:
            for sock, _, _ in waiting.values():
                sock.close()

    def _accept(self, listener, poller, waiting):
        try:
            sock, peer = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("metrics: accept: %s; pausing new connections for 1s", exc.strerror)
                time.sleep(1)
            return
        waiting[sock.fileno()] = (sock, peer, Deadline(HANDSHAKE_TIMEOUT))
        poller.register(sock, select.POLLIN)

    def _answer(self, request, peer):
        """Serve the request in a thread of its own if a slot is free; 503 at once if not."""
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: %s refused: %d requests in progress", format_address(peer),
                      METRICS_CONNECTIONS)
            _refuse_without_waiting(request, 503, "busy: %d metrics requests in progress"
                                   % METRICS_CONNECTIONS)
            return
        try:
            threading.Thread(target=self._serve_request, args=(request, peer), daemon=True,
                             name="metrics %s" % format_address(peer)).start()
        except Exception as exc:  # no thread to be had: this scrape fails
            self._slots.release()
            log.error("metrics: cannot answer %s: %s", format_address(peer), exc)
            self.httpd.shutdown_request(request)

    def _serve_request(self, request, peer):
        try:
            request.setblocking(True)
            self.httpd.finish_request(request, peer)
        except Exception:  # as http.server's own thread: the page fails, the service goes on
            self.httpd.handle_error(request, peer)
        finally:
            self.httpd.shutdown_request(request)
            self._slots.release()

    def stop(self):
        self._stopping = True
        try:
            self.httpd.socket.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


# =============================================================================================
# Service runtime: signals, systemd (notify, watchdog, socket activation), limits, logging
# What runs a built service in a process: signals taken by one thread, sd_notify, LISTEN_FDS,
# the open-files limit and the threads' stacks. Uses the services through their contract.
# =============================================================================================

# Signals: SIGINT, SIGTERM and SIGHUP are blocked from before the service starts, in every
# thread, and one thread takes them with sigwait: a signal caught by any other thread would only
# be flagged for a main thread asleep in a lock, and never acted on. SIGHUP reads the options
# again and reloads the log level, TLS files and the server's routes; tunnels go on. SIGUSR1
# logs a line per open tunnel (`dump_tunnels`).
# systemd (all optional, standard library): under Type=notify a `SystemdNotifier` (decisions on
# a clock; only its send touches NOTIFY_SOCKET) says READY=1 once the service's socket is bound,
# STATUS= when its tunnels change (the service calls the `tunnels_changed` it was built with),
# RELOADING=1, STOPPING=1, and WATCHDOG=1 from one thread while `service.healthy()`. The server
# takes its listening socket from systemd when LISTEN_FDS passes one (socket activation). At
# start the soft open-files limit is raised to the hard one.

# SIGINT and SIGTERM stop the service; SIGHUP reloads what can change while tunnels run;
# SIGUSR1 logs a line per open tunnel.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANDLED_SIGNALS = STOP_SIGNALS + tuple(getattr(signal, name) for name in ("SIGHUP", "SIGUSR1")
                                       if hasattr(signal, name))


class SystemdNotifier:
    """What the service tells systemd over NOTIFY_SOCKET (sd_notify(3), Type=notify), and
    when: READY=1 with a first STATUS=, STATUS= again only when it changes, RELOADING=1,
    STOPPING=1, and WATCHDOG=1 every half WATCHDOG_USEC while the service is healthy.

    The decisions read `clock` (tests drive it); only `send` touches a socket: one datagram
    per message to `address`, a path or an abstract name ('@' for its leading NUL byte).
    """

    def __init__(self, address, watchdog_usec=0, clock=time.monotonic):
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.interval = watchdog_usec / 2e6 if watchdog_usec > 0 else None
        self.clock = clock
        self.last_status = None
        self.next_watchdog = clock()  # the first ping goes out at once
        self._send_failed = False

    @classmethod
    def from_environment(cls, environ=os.environ, pid=None, clock=time.monotonic):
        """The notifier NOTIFY_SOCKET asks for, None without it. The watchdog is ours when
        WATCHDOG_USEC is set and WATCHDOG_PID names this process (or is unset)."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address or not hasattr(socket, "AF_UNIX"):
            return None
        me = str(os.getpid() if pid is None else pid)
        usec = 0
        if environ.get("WATCHDOG_PID", me) == me:
            try:
                usec = int(environ.get("WATCHDOG_USEC", "0"))
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings",
                            environ["WATCHDOG_USEC"])
        return cls(address, usec, clock)

    def ready(self, status):
        self.last_status = status
        self.send("READY=1\nSTATUS=%s" % status)

    def status(self, text):
        if text != self.last_status:
            self.last_status = text
            self.send("STATUS=%s" % text)

    def reloading(self):
        # MONOTONIC_USEC: systemd 253's Type=notify-reload wants it; older ones ignore it.
        self.send("RELOADING=1\nMONOTONIC_USEC=%d" % int(time.monotonic() * 1e6))

    def stopping(self):
        self.last_status = "stopping"
        self.send("STOPPING=1\nSTATUS=stopping")

    def wait(self):
        """Seconds until the watchdog wants to hear from us; None without a watchdog."""
        if self.interval is None:
            return None
        return max(0.0, self.next_watchdog - self.clock())

    def watchdog(self, healthy):
        """Send WATCHDOG=1 if it is due and `healthy()` says so; True if sent. An unhealthy
        service is asked again soon and, still unhealthy, lets systemd's timer run out."""
        if self.interval is None:
            return False
        now = self.clock()
        if now < self.next_watchdog:
            return False
        if not healthy():
            self.next_watchdog = now + min(self.interval, 1.0)
            return False
        self.next_watchdog = now + self.interval
        self.send("WATCHDOG=1")
        return True

    def send(self, message):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._send_failed:  # once: a missing socket would say it every ping
                self._send_failed = True
                log.warning("cannot notify systemd at NOTIFY_SOCKET %s: %s",
                            self.address.replace("\0", "@"), describe_error(exc))
        finally:
            sock.close()


def _start_notifying(notifier, service, wake=None):
    """A thread that keeps systemd informed while `service` runs: STATUS= when its tunnels
    change (`wake`, the Event the service sets through its `tunnels_changed`), WATCHDOG=1
    while `service.healthy()`. Returns the function that ends the thread."""
    wake = wake or threading.Event()
    done = []

    def run():
        while True:
            wake.wait(notifier.wait())
            wake.clear()
            if done:
                return
            notifier.status(service.status())
            notifier.watchdog(service.healthy)

    thread = threading.Thread(target=run, name="systemd", daemon=True)
    thread.start()

    def end():
        done.append(True)
        wake.set()
        thread.join()
    return end


def systemd_listener(environ=os.environ, pid=None):
    """The listening socket systemd passed (socket activation, sd_listen_fds(3)): LISTEN_FDS
    sockets from fd 3, for this process if LISTEN_PID says so; None when there are none.
    The variables are removed so that nothing started later takes the socket for its own.
    Raises FatalError for anything but one listening TCP socket."""
    if "LISTEN_FDS" not in environ:
        return None
    me = str(os.getpid() if pid is None else pid)
    if environ.get("LISTEN_PID", me) != me:
        return None  # meant for another process (a parent that did not unset it)
    count, names = environ.get("LISTEN_FDS"), environ.get("LISTEN_FDNAMES", "")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if count == "0":
        return None
    if count != "1":
        raise FatalError("LISTEN_FDS=%s: systemd must pass exactly one listening socket (one "
                         "ListenStream= in the .socket unit)" % count)
    what = "the socket systemd passed (LISTEN_FDS, fd 3%s)" % (
        ", named " + names if names else "")
    try:
        sock = socket.socket(fileno=3)
    except OSError as exc:
        raise FatalError("%s: %s" % (what, describe_error(exc)))
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if (sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM
            or not listening):
        kind = "%s %s%s" % (getattr(sock.family, "name", sock.family),
                            getattr(sock.type, "name", sock.type),
                            "" if listening else ", not listening")
        sock.detach()  # not ours to close
        raise FatalError("%s is not a listening TCP socket (%s): use ListenStream= with "
                         "Accept=no" % (what, kind))
    sock.set_inheritable(False)
    sock.setblocking(True)
    return sock


def unused_listen_fds(environ=os.environ, pid=None):
    """The warning for a client that systemd passed sockets (LISTEN_FDS, meant for this
    process): only the server takes one (socket activation); None when none were passed."""
    count = environ.get("LISTEN_FDS")
    me = str(os.getpid() if pid is None else pid)
    if count in (None, "", "0") or environ.get("LISTEN_PID", me) != me:
        return None
    return ("LISTEN_FDS=%s: the client does not use sockets from systemd: socket activation "
            "is for the server (proxyguard-server.socket starts proxyguard@server); the client "
            "binds its own UDP port (--listen-port)" % count)


def _raise_open_files_limit():
    """Raise the soft open-files limit to the hard one, as Go programs do since 1.19: systemd
    starts services with a soft limit of 1024, about 500 tunnels. Returns the soft limit in
    force (resource.RLIM_INFINITY for none), None where unknown (not POSIX)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:  # an infinite hard limit above fs.nr_open
            log.debug("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def open_files_warning(max_clients, limit):
    """The start-up warning when --max-clients tunnels cannot fit in `limit` open files (each
    tunnel: a TCP and a UDP socket; each handshake: one), None when they fit."""
    if not max_clients or limit is None or limit == getattr(resource, "RLIM_INFINITY", -1):
        return None
    needed = 2 * max_clients + MAX_HANDSHAKING + SPARE_FILES
    if needed <= limit:
        return None
    return ("--max-clients %d needs about %d open files, but the limit is %d (about %s fit): "
            "raise LimitNOFILE= in the unit or ulimit -n, or lower --max-clients"
            % (max_clients, needed, limit,
               plural(max(0, (limit - MAX_HANDSHAKING - SPARE_FILES) // 2), "tunnel")))


# up's CPU (--cpu; CpuPlacement decides, CpuPinning carries it out): Linux only. Elsewhere
# (no sched_setaffinity) --cpu auto does nothing and a CPU number is refused.

def allowed_cpus():
    """The CPUs this process may run on (a cgroup or taskset may narrow them), sorted; None
    where the system can neither say nor pin (not Linux)."""
    if not (hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")):
        return None
    return sorted(os.sched_getaffinity(0))


def pin_threads(cpus):
    """Every thread of this process onto the set `cpus`, and the threads they start later: on
    Linux affinity is a thread's own (sched_setaffinity(2)), and a new thread inherits its
    starter's."""
    os.sched_setaffinity(0, cpus)
    for name in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.sched_setaffinity(int(name), cpus)


class OwnSchedule:
    """How a pump's thread changes its own scheduling to a LoneSchedule level, through
    sched_setattr(2) (`syscall`, its `number`), always at the thread's own nice: `set(level)`
    gives the calling thread KERNELS (SCHED_OTHER, the kernel's slice), SHORT_SLICE
    (SCHED_OTHER with a `slice_us` slice; 0: the kernel's) or REALTIME (SCHED_RR at
    `rt_priority`; `realtime` says whether it is wanted and permitted); errors are let be (the
    probe in own_schedule() found none). `applies()`: whether the calling thread is ours to
    change (SCHED_OTHER: a unit's CPUSchedulingPolicy= stays)."""

    def __init__(self, syscall, number, slice_us, rt_priority):
        self._syscall, self._number = syscall, number
        self.slice_us, self.rt_priority = slice_us, rt_priority
        self.realtime = rt_priority > 0
        self.refused = None  # own_schedule()'s line when real-time priority was refused

    def setattr(self, policy, priority=0, slice_ns=0):
        """sched_setattr on the calling thread (tid 0): 0 or the errno."""
        nice = os.getpriority(os.PRIO_PROCESS, 0)  # the calling thread's own on Linux
        # struct sched_attr as first published (48 bytes, SCHED_ATTR_SIZE_VER0): size,
        # policy, flags, nice, priority, then runtime (the slice; 0: the kernel's), deadline,
        # period in ns.
        attr = struct.pack("=IIQiIQQQ", 48, policy, 0, nice, priority, slice_ns, 0, 0)
        if self._syscall(self._number, 0, attr, 0) == 0:
            return 0
        import ctypes  # own_schedule() found it
        return ctypes.get_errno()

    def applies(self):
        return os.sched_getscheduler(0) == os.SCHED_OTHER

    def set(self, level):
        if level == REALTIME and self.realtime:
            self.setattr(os.SCHED_RR, self.rt_priority)
        else:
            self.setattr(os.SCHED_OTHER, slice_ns=self.slice_us * 1000 if level == SHORT_SLICE
                         else 0)


def _errno_text(error):
    return describe_error(OSError(error, os.strerror(error)))


def own_schedule(slice_us, rt_priority, machine=None):
    """`(schedule, None)`: the OwnSchedule for --sched-slice `slice_us` and --rt-priority
    `rt_priority` (0: off); or `(None, warning)` when neither can be had (warning None when
    both are 0): not Linux, a machine without a known sched_setattr(2) number (`machine`,
    default platform.machine()), no ctypes (a router's trimmed Python), or the call's error,
    found by giving the calling thread the kernel's slice (which it has: a no-op). Real-time
    priority is tried on a thread of its own that ends at once; refused (not root, no
    CAP_SYS_NICE, no RLIMIT_RTPRIO), the pumps keep the slice, and the schedule's `refused`
    says why (the caller decides how loud: a default is not a wish)."""
    if not slice_us and not rt_priority:
        return None, None
    asked = " ".join(option for option in (
        slice_us and "--sched-slice %d" % slice_us,
        rt_priority and "--rt-priority %d" % rt_priority) if option)
    if not (sys.platform.startswith("linux") and hasattr(os, "sched_getscheduler")):
        return None, "%s: not set: needs Linux" % asked
    machine = machine or platform.machine()
    number = SCHED_SETATTR_SYSCALLS.get(machine)
    if number is None:
        return None, "%s: not set: sched_setattr's number on %s is not known" % (asked,
                                                                                  machine)
    try:
        import ctypes  # not at import time: a trimmed Python may lack it
    except ImportError:
        return None, "%s: not set: this Python has no ctypes" % asked
    schedule = OwnSchedule(ctypes.CDLL(None, use_errno=True).syscall, number, slice_us,
                           rt_priority)
    if os.sched_getscheduler(0) == os.SCHED_OTHER:
        error = schedule.setattr(os.SCHED_OTHER)
        if error:
            return None, "%s: not set: %s" % (asked, _errno_text(error))
    if rt_priority:
        errors = []
        probe = threading.Thread(target=lambda: errors.append(
            schedule.setattr(os.SCHED_RR, rt_priority)), name="rt-probe")
        probe.start()
        probe.join()
        if errors != [0]:
            schedule.realtime = False
            schedule.refused = (
                "--rt-priority %d: not permitted (%s): needs root, CAP_SYS_NICE or the "
                "unit's LimitRTPRIO=%d; round trips on crowded CPUs keep the slice"
                % (rt_priority, _errno_text(errors[0]) if errors else "no answer",
                   rt_priority))
    return schedule, None


def _read_cpu_times(path="/proc/stat"):
    with open(path) as stream:
        return cpu_times(stream.read(), os.sysconf("SC_CLK_TCK"))


def _own_cpu_seconds():
    times = os.times()
    return times.user + times.system


class CpuPinning:
    """Carries out a CpuPlacement for this process (up's --cpu `choice`). `start()` pins every
    thread to its CPU, before the tunnels' threads start (they inherit it); `check()`, every
    `interval` seconds (None: never, a fixed CPU), reads the CPUs' figures, moves the threads
    if the placement says so, and pins them all again (a thread started during a move may have
    missed it). An OSError ends the pinning with one warning: from then on the scheduler
    places the threads. The readings and the pinning are arguments, for tests."""

    def __init__(self, placement, choice, read_times=_read_cpu_times,
                 own_seconds=_own_cpu_seconds, pin=pin_threads):
        self.placement = placement
        self.choice = choice
        self.read_times = read_times
        self.own_seconds = own_seconds
        self.pin = pin
        self.interval = None if placement.fixed is not None else CPU_CHECK_SECONDS

    def start(self):
        try:
            self.pin({self.placement.current})
            if self.interval is not None:
                self.placement.measured(self.read_times(), self.own_seconds())  # the baseline
        except OSError as exc:
            self._give_up(exc)
            return
        log.info("up: the tunnels' threads run on CPU %d (--cpu %s%s)", self.placement.current,
                 self.choice, "" if self.interval is None else
                 ": several peers' threads cost less CPU on one; checked every %gs"
                 % self.interval)

    def status(self):
        """Where the threads run, and the last check's figures, in a line (SIGUSR1)."""
        placement = self.placement
        if self.interval is None and placement.fixed is None:
            return "the tunnels' threads: anywhere (pinning ended on an error)"
        return "the tunnels' threads on CPU %d (--cpu %s)%s" % (
            placement.current, self.choice, "; other work at the last check: %s" % ", ".join(
                "CPU %d %d%%" % (cpu, 100 * share) for cpu, share in
                sorted(placement.others.items())) if placement.others else "")

    def check(self):
        placement = self.placement
        before = placement.current
        try:
            moved = placement.measured(self.read_times(), self.own_seconds())
            self.pin({placement.current})
        except OSError as exc:
            self._give_up(exc)
            return
        if moved is not None:
            log.info("the tunnels' threads moved to CPU %d: other work kept CPU %d %s busy, "
                     "CPU %d %d%%", moved, before, "%d%%" % (100 * placement.others[before])
                     if before in placement.others else "(offline)",
                     moved, 100 * placement.others[moved])

    def _give_up(self, exc):
        log.warning("cannot keep the tunnels' threads on CPU %d (--cpu %s): %s; the scheduler "
                    "places them", self.placement.current, self.choice, describe_error(exc))
        self.interval = None
        with contextlib.suppress(OSError):
            self.pin(set(self.placement.cpus))


def all_cpu_times():
    """The (busy, idle) seconds of all CPUs so far (cpu_times()), or None where /proc/stat
    cannot be read."""
    try:
        times = _read_cpu_times().values()
    except (OSError, ValueError):
        return None
    return sum(busy for busy, _ in times), sum(idle for _, idle in times)


def busy_polling(microseconds, cpus, schedule=None):
    """--busy-poll, and --sched-slice and --rt-priority's `schedule` (own_schedule()'s), as a
    BusyPolling (None when neither): as many pumps may poll at once as the process may use
    CPUs (`cpus`, None where unknown: os.cpu_count()), and at least two; its real-time hold
    kept while the CPUs stay busy (all_cpu_times)."""
    if not microseconds and schedule is None:
        return None
    return BusyPolling(microseconds / 1e6, max(2, len(cpus) if cpus else os.cpu_count() or 1),
                       schedule, read_cpu=all_cpu_times)


def cpu_pinning(choice, peers, cpus):
    """up's CpuPinning for --cpu `choice` ("auto", "any" or a CPU number) and `peers` tunnels
    on `cpus` (allowed_cpus(): None where the system cannot pin), or None, not pinned: "any",
    or "auto" with fewer than two peers or CPUs, or where the system cannot pin. Raises
    UsageError for a CPU number the process may not use."""
    if choice == "any" or (choice == "auto" and (peers < 2 or not cpus or len(cpus) < 2)):
        return None
    if choice == "auto":
        return CpuPinning(CpuPlacement(cpus), choice)
    if cpus is None:
        raise UsageError("--cpu %d: needs Linux (sched_setaffinity)" % choice, option="--cpu")
    if choice not in cpus:
        raise UsageError("--cpu %d: this process may run on CPU %s only"
                         % (choice, ", ".join(map(str, cpus))), option="--cpu")
    return CpuPinning(CpuPlacement(cpus, fixed=choice), choice)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT, SIGTERM, SIGHUP and SIGUSR1 pending, in this thread and every thread it starts,
    until `_run_until_signal` takes them with sigwait; restore the mask at the end.

    Why: a process-directed signal goes to any thread that does not block it. Caught by a
    tunnel thread, Python only flags it for the main thread, which sleeps on in a lock wait
    and never runs the handler (the "SIGTERM ignored at start" bug). Held from before the
    service starts, a signal however early waits for sigwait instead of being lost.
    """
    if (not hasattr(signal, "pthread_sigmask")  # not POSIX: Python's handlers do the work
            or threading.current_thread() is not threading.main_thread()):  # a test's thread
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        # A signal still pending (a second SIGTERM, or a SIGUSR1, during shutdown) must not
        # kill the process once unblocked: ignore it while the mask is restored.
        previous = [(signum, signal.signal(signum, signal.SIG_IGN)) for signum in HANDLED_SIGNALS]
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for signum, handler in previous:
            signal.signal(signum, handler)


def tune_threads():
    """Set THREAD_STACK_BYTES and SWITCH_INTERVAL for the threads started from now on."""
    threading.stack_size(THREAD_STACK_BYTES)
    sys.setswitchinterval(SWITCH_INTERVAL)


def _run_until_signal(service, reload=None, notifier=None, tunnels_changed=None):
    """Run `service.serve_forever()` in this thread until SIGINT/SIGTERM; call `reload()` on
    SIGHUP and `service.dump_tunnels()` on SIGUSR1. Call it inside `_signals_held()`; a daemon
    thread waits for the signals. With a SystemdNotifier, systemd hears of readiness, reloads,
    the tunnel count (when `tunnels_changed`, the Event the service was built to set, is set)
    and the stop.

    Returns 0 after a stop signal (clean stop), 1 if the service ended by itself (a bug).
    """
    signalled = []

    def wait_for_signals():
        while True:
            signum = signal.sigwait(HANDLED_SIGNALS)
            if signum in STOP_SIGNALS:
                signalled.append(signum)
                log.info("stopping on %s", signal.Signals(signum).name)
                if notifier is not None:
                    notifier.stopping()
                service.stop()
                return
            if signum == getattr(signal, "SIGUSR1", None):
                try:
                    service.dump_tunnels()
                except Exception:  # a bug must not end the signal thread
                    log.exception("SIGUSR1: unexpected error")
            elif reload is not None:
                if notifier is not None:
                    notifier.reloading()
                reload()
                if notifier is not None:
                    notifier.ready(service.status())

    waiter = threading.Thread(target=wait_for_signals, name="signals", daemon=True)
    waiter.start()
    end_notifying = None
    if notifier is not None:  # the socket is bound (and listening): new clients queue
        notifier.ready(service.status())
        end_notifying = _start_notifying(notifier, service, tunnels_changed)
    try:
        service.serve_forever()
    except Exception:
        log.exception("the service stopped on an unexpected error")
    if end_notifying is not None:
        end_notifying()
    if not signalled:
        return 1
    waiter.join()  # stop() ends when every tunnel has closed and logged its end
    return 0


def _reload_settings(service, argv, program=None):
    """SIGHUP: read the options again (the config file may have changed) and apply what can
    change under running tunnels: the log level, the TLS files and the server's routes. Logs
    one line; on any error the running settings stay."""
    try:
        options = parse_options(argv, program=program)
        done = service.reload(options)
    except ProxyGuardError as exc:
        log.error("SIGHUP: reload failed, the running settings stay: %s", exc)
        return
    level = getattr(logging, options.log_level.upper())
    if level != log.getEffectiveLevel():
        logging.getLogger().setLevel(level)
        done.append("log level %s" % options.log_level)
    log.info("SIGHUP: reloaded %s; other options change on restart",
             ", ".join(done) if done else "nothing that changed")


def _logging_to_journal(stream=sys.stderr, environ=os.environ):
    """True when `stream` is systemd's journal: JOURNAL_STREAM names its device and inode
    (systemd.exec(5)), and the journal stamps each line itself."""
    try:
        if stream.isatty():
            return False
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file (a test's StringIO)
        return False
    return environ.get("JOURNAL_STREAM", "") == "%d:%d" % (status.st_dev, status.st_ino)


def _configure_logging(level):
    # Under systemd, a timestamp of our own doubles the journal's on every line.
    stamp = "" if _logging_to_journal() else "%(asctime)s "
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format=stamp + "%(levelname)s %(message)s")


# =============================================================================================
# CLI: one parser for every mode; command line > config file > environment > defaults
# Options in, checked options and built services out (_build_service); usage errors name the
# option. Uses every section above; nothing above uses it.
# =============================================================================================

MODES = ("client", "server", "check", "up")
ENV_PREFIX = "PROXYGUARD_"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Which mode each option is for, by its long name; an option not listed is for every mode.
# `check` tries the client's connection, so it takes the client's options: a client's config
# file can be checked as it is. parse_options refuses an option of another mode given on the
# command line, and one set in a config file or the environment unless it holds its default
# (the shipped example file sets both modes' defaults). --help's "client:" words come from here.
OPTION_MODES = {
    "listen": ("server",), "tls-cert": ("server",), "tls-key": ("server",),
    "max-clients": ("server",), "trusted-proxies": ("server",),
    "handshake-timeout": ("server",), "path": ("server",), "route": ("server",),
    "health-path": ("server",),
    "listen-port": ("client",), "forward-port": ("client",), "peer-ips": ("client",),
    "fwmark": ("client",), "tcp-port": ("client",), "user-agent": ("client",),
    "connect-timeout": ("client",), "proxy": ("client",), "ca-file": ("client",),
    "tls-min-version": ("client",), "keepalive": ("client",),
    "idle-timeout": ("client", "server"), "metrics-listen": ("client", "server"),
    "busy-poll": ("client", "server"), "sched-slice": ("client", "server"),
    "rt-priority": ("client", "server"),
    "profile": ("up",), "write-config": ("up",), "cpu": ("up",),
}

# A mode that takes another mode's options (OPTION_MODES names only client and server).
MODE_TAKES_OPTIONS_OF = {"check": "client", "up": "client"}

# What each mode does, for --help (the list of modes, and the top of MODE --help).
MODE_DESCRIPTIONS = {
    "client": "carry WireGuard's UDP from 127.0.0.1 to the server at --to, over one "
              "HTTP(S) connection (UoTLV/1) or a WebSocket",
    "server": "take tunnels on --listen, UoTLV/1 and WebSocket alike, and relay each "
              "one's datagrams to WireGuard at --to",
    "check": "try one connection to --to as the client would, print each step, and say "
             "what fails (exit status 0 when the upgrade works)",
    "up": "bring a VPN up from a WireGuard profile with ProxyEndpoint lines (eduVPN's): a "
          "tunnel per such peer, then wg-quick up; wg-quick down at the end",
}
MODE_EXAMPLES = {
    "client": "proxyguard.py client --to https://vpn.example.org/proxyguard --fwmark 51820",
    "server": "proxyguard.py server --listen 127.0.0.1:51821 --to 127.0.0.1:51820",
    "check": "proxyguard.py check --to https://vpn.example.org/proxyguard",
    "up": "proxyguard.py up /etc/proxyguard/eduvpn.conf",
}

# --help groups each mode's options under these titles, in this order, by OPTION_GROUPS: a
# new option is one line there (an option missing from it shows under "operations"; a test
# asks for every option to be listed).
HELP_GROUPS = ("connection", "TLS", "proxy", "limits and tuning", "operations")
OPTION_GROUPS = {
    "to": "connection",
    "listen": "connection",
    "path": "connection",
    "listen-port": "connection",
    "forward-port": "connection",
    "peer-ips": "connection",
    "fwmark": "connection",
    "tcp-port": "connection",
    "user-agent": "connection",
    "tls-cert": "TLS",
    "tls-key": "TLS",
    "ca-file": "TLS",
    "tls-min-version": "TLS",
    "proxy": "proxy",
    "trusted-proxies": "proxy",
    "connect-timeout": "limits and tuning",
    "handshake-timeout": "limits and tuning",
    "idle-timeout": "limits and tuning",
    "keepalive": "limits and tuning",
    "max-clients": "limits and tuning",
    "help": "operations",
    "config": "operations",
    "mode": "operations",
    "metrics-listen": "operations",
    "log-level": "operations",
    "version": "operations",
    "profile": "connection",
    "write-config": "operations",
    "cpu": "limits and tuning",
    "busy-poll": "limits and tuning", "sched-slice": "limits and tuning",
    "rt-priority": "limits and tuning",
    "route": "connection",
    "health-path": "operations",
}

# What the user likely meant when an option is in the wrong mode.
MODE_HINTS = {
    ("listen", "client"): "the client's UDP port is --listen-port",
    ("listen-port", "server"): "the server listens on --listen HOST:PORT",
    ("listen-port", "up"): "up gives each peer's tunnel a free port of its own",
    ("peer-ips", "up"): "up resolves each ProxyEndpoint's host once, at start",
    ("to", "up"): "up takes the servers' URLs from the profile's ProxyEndpoint lines",
}

# up runs a client per ProxyEndpoint peer of its profile: like check, it takes the client's
# options, but not these, which name one server or one port.
NOT_UP_OPTIONS = ("to", "listen-port", "peer-ips", "tcp-port")

# up's FwMark, for WireGuard and the tunnels' TCP sockets, when neither --fwmark nor the profile
# gives one: wg-quick's own first choice.
DEFAULT_UP_FWMARK = 51820

# PROXYGUARD_* variables that are not options: read by proxyguard's own test and bench tools,
# never warned about.
NOT_OPTION_VARIABLES = ("PROXYGUARD_TEST_", "PROXYGUARD_SCRIPT")
INSTALL_CONFIGARGPARSE = ("apt install python3-configargparse (Debian, Ubuntu), or pip install "
                          "configargparse in a venv")

# Bounds of the time options, in seconds, with their words for errors and --help. They go
# into socket timeouts: SO_RCVTIMEO/SO_SNDTIMEO (a timeval) and TCP_USER_TIMEOUT (milliseconds
# in a 32-bit int, so 24.8 days at most), and Python's own; a day and an hour stay far below.
TIMEOUT_BOUNDS = {
    "idle_timeout": (0.001, 86400.0, "0 (never) or 0.001 to 86400 seconds (1 day)"),
    "connect_timeout": (0.001, 3600.0, "0.001 to 3600 seconds (1 hour)"),
    "handshake_timeout": (0.001, 3600.0, "0.001 to 3600 seconds (1 hour)"),
    "keepalive": (0.001, 86400.0, "0 (off) or 0.001 to 86400 seconds (1 day)"),
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


class CommandLineParser(argparse.ArgumentParser):
    """The same options, command line only, no defaults: which options the command line gives."""

    def error(self, message):
        raise UsageError(message)


def _fwmark_value(text):
    """--fwmark: decimal, or hexadecimal as `wg` shows it (0xca6c)."""
    text = text.strip()
    for base in (10, 0):
        try:
            return int(text, base)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError("%r: not a number (decimal, or hex as 0xca6c)" % text)


def _cpu_value(text):
    """--cpu: auto, any, or a CPU's number."""
    word = text.strip().lower()
    if word in ("auto", "any"):
        return word
    if word.isdigit():
        return int(word)
    raise argparse.ArgumentTypeError("%r: auto, any, or a CPU's number (0, 1, ...)" % text)


def _choice_in(choices):
    """A choice in any case (--log-level DEBUG, mode = Client); anything else as written, for
    argparse's 'invalid choice'."""
    def choice(text):
        word = text.strip().lower()
        return word if word in choices else text
    return choice


def _close_match(word, candidates):
    """The candidate `word` most likely misspells, or None."""
    import difflib  # only for a mistake's hint
    found = difflib.get_close_matches(word, list(candidates), n=1)
    return found[0] if found else None


def program_name(argv0=None):
    """The name the program was started by, for the usage line and the error lines: `proxyguard`
    (as pipx and pip install it), proxyguard.py, or a name of the original's that gives the mode
    (PROGRAM_MODES); anything else shows as proxyguard.py."""
    name = os.path.basename(sys.argv[0] if argv0 is None and sys.argv else argv0 or "")
    known = name in ("proxyguard", "proxyguard.py") or _program_mode(name) is not None
    return name if known else "proxyguard.py"


def _options_mode(mode):
    """The mode whose options `mode` takes (check: the client's)."""
    return MODE_TAKES_OPTIONS_OF.get(mode, mode)


def takes_option(mode, key):
    """Whether `mode` takes the option `key` (its long name without the dashes): its own, and
    those of the mode whose options it takes."""
    if mode == "up" and key in NOT_UP_OPTIONS:
        return False
    modes = OPTION_MODES.get(key)
    return not modes or mode in modes or _options_mode(mode) in modes


def help_text(help_mode):
    """--help's usage, description and epilog: without a mode, the list of modes; with one,
    what that mode does. The epilog says where options come from, in parse_options' order."""
    import shutil  # only for --help
    import textwrap
    fill = functools.partial(textwrap.fill, width=min(shutil.get_terminal_size().columns,
                                                      100) - 2)
    if help_mode is None:
        usage = "%%(prog)s {%s} [options]\n       %%(prog)s -c FILE [options]" % ",".join(MODES)
        description = [fill("Carry WireGuard's UDP over one HTTP(S) connection (ProxyGuard "
                            "UoTLV/1, or a WebSocket)."), "",
                       "modes (proxyguard.py MODE --help lists that mode's options alone):"]
        description += [fill(MODE_DESCRIPTIONS.get(mode, ""), initial_indent="  %-8s" % mode,
                             subsequent_indent=" " * 10) for mode in MODES]
        example = MODE_EXAMPLES["client"]
    else:
        if help_mode == _program_mode(program_name()):  # proxyguard-client: its name says it
            usage = "%(prog)s [options]\n       %(prog)s -c FILE [options]"
        else:
            usage = ("%%(prog)s %s [options]\n       %%(prog)s -c FILE [options]  (the file "
                     "says mode = %s)" % (help_mode, help_mode))
        description = [fill("%s: %s." % (help_mode, MODE_DESCRIPTIONS.get(help_mode, "")))]
        if help_mode != _options_mode(help_mode):
            description.append(fill("It takes the %s's options, so a %s's config file works "
                                    "as it is." % ((_options_mode(help_mode),) * 2)))
        example = MODE_EXAMPLES.get(help_mode, MODE_EXAMPLES["client"])
    epilog = [fill("Precedence: command line > config file > environment > defaults. A "
                   "config file (-c FILE) holds 'option = value' lines (see "
                   "proxyguard.conf.example); the environment, %s<OPTION> variables "
                   "(--log-level is %sLOG_LEVEL). An option of another mode is refused."
                   % (ENV_PREFIX, ENV_PREFIX)),
              "Example: " + example]
    return usage, "\n".join(description), "\n".join(epilog)


def build_parser(command_line_only=False, help_mode=None):
    """The parser of every option. command_line_only: plain argparse, no --help, --version,
    config file or environment, and no defaults (parse_options' first pass). help_mode: a
    mode whose --help shows its options alone (the others are still parsed, unseen)."""
    usage, description, epilog = help_text(help_mode) if not command_line_only else (
        None, None, None)
    extra = {}
    if configargparse and not command_line_only:
        extra = dict(auto_env_var_prefix=ENV_PREFIX, add_env_var_help=False,
                     add_config_file_help=False,
                     config_file_parser_class=configargparse.DefaultConfigFileParser)
    parser_class = CommandLineParser if command_line_only else OptionParser
    parser = parser_class(
        prog=program_name(), usage=usage, add_help=False, description=description,
        epilog=epilog, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30), **extra)
    groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}

    def add(*names, **kwargs):
        """One option, in its --help group; its help (and metavar) by mode when
        `help_by_mode` (and `metavar_by_mode`) is given."""
        key = names[-1][2:]
        modes = OPTION_MODES.get(key)
        by_mode, metavars = kwargs.pop("help_by_mode", None), kwargs.pop("metavar_by_mode", {})
        if by_mode:
            kwargs["help"] = "; ".join("%s: %s" % item for item in by_mode.items())
        if help_mode is not None:
            if not takes_option(help_mode, key) or key == "mode":
                kwargs["help"] = argparse.SUPPRESS
            elif by_mode:
                kwargs["help"] = by_mode[_options_mode(help_mode)]
                kwargs["metavar"] = metavars.get(_options_mode(help_mode), kwargs.get("metavar"))
        elif modes:
            kwargs["help"] = "%s: %s" % (", ".join(modes), kwargs["help"])
        return groups[OPTION_GROUPS.get(key, "operations")].add_argument(*names, **kwargs)

    if not command_line_only:
        add("-h", "--help", action="help", help="show this help and exit (proxyguard.py "
            "MODE --help: that mode's options)" if help_mode is None else
            "show this help and exit")
    if configargparse and not command_line_only:
        add("-c", "--config", is_config_file=True, metavar="FILE",
            help="config file of 'option = value' lines (see proxyguard.conf.example)")
    else:
        add("-c", "--config", metavar="FILE",
            help="config file (needs configargparse: %s)" % INSTALL_CONFIGARGPARSE)
    add("--mode", type=_choice_in(MODES), choices=MODES, help="client, server, or check (try one "
        "connection to --to and print each step; takes the client's options), or up (a VPN "
        "from a WireGuard profile, see --profile); required. "
        "'proxyguard.py client ...' is short for '--mode client ...'")
    add("--profile", metavar="FILE", help="the WireGuard profile with ProxyEndpoint lines "
        "(eduVPN's; 'up FILE' for short); its name without .conf names the interface")
    add("--write-config", metavar="PATH", help="run only the profile's tunnels and write "
        "WireGuard's configuration to PATH (- prints it), for NetworkManager or "
        "systemd-networkd; without it, up runs wg-quick up and, at the end, wg-quick down")
    add("--cpu", type=_cpu_value, default="auto", metavar="auto|any|CPU",
        help="auto (default): two or more peers' threads on one CPU, moved if other work "
             "keeps it busy; any: anywhere; a number: that CPU (Linux)")
    add("--to", action="append", metavar="TARGET", metavar_by_mode={"client": "URL", "server": "HOST:PORT"},
        help_by_mode={
            "client": "the server's URL (required), http(s)://host[:port][/path] for UoTLV/1, "
                      "ws(s)://... for WebSocket (through fronts that pass nothing else); "
                      "again for another server of the same peer, tried in order when one "
                      "fails (config file: to = [URL1, URL2])",
            "server": "WireGuard's HOST:PORT (default %s)" % DEFAULT_SERVER_TO})
    add("--listen", metavar="HOST:PORT", default=DEFAULT_SERVER_LISTEN,
        help="where to accept connections, [::]:443 for all (default %(default)s)")
    add("--listen-port", type=int, default=DEFAULT_LISTEN_PORT, metavar="PORT",
        help="UDP port on 127.0.0.1 that WireGuard's Endpoint names (default %(default)s)")
    add("--forward-port", type=int, default=DEFAULT_FORWARD_PORT, metavar="PORT",
        help="WireGuard's ListenPort on 127.0.0.1, where replies go (default %(default)s)")
    add("--peer-ips", default="", metavar="IP,IP",
        help="the server's IP addresses, tried in order; skips DNS")
    add("--fwmark", type=_fwmark_value, default=-1, metavar="MARK",
        help="Linux SO_MARK on the TCP socket, so it bypasses the VPN route, 0 to "
             "0x7fffffff, decimal or hex; needs CAP_NET_ADMIN (default -1, off)")
    add("--tcp-port", type=int, default=0, metavar="PORT",
        help="TCP source port (default 0, any)")
    add("--user-agent", default=DEFAULT_USER_AGENT, help="User-Agent header "
        "(default %(default)s)")
    add("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
        help="TCP connect plus TLS and upgrade, at most 3600 (default %(default)g)")
    add("--proxy", metavar="URL", help="reach the server through this HTTP proxy "
        "with CONNECT, http://[user:pass@]host:port; 'none' ignores HTTPS_PROXY/HTTP_PROXY "
        "(default: those variables, honouring NO_PROXY)")
    add("--ca-file", metavar="PEM", help="also trust the CAs in this file for https://")
    add("--tls-min-version", type=_choice_in(TLS_VERSIONS), choices=sorted(TLS_VERSIONS),
        default="1.3", metavar="VERSION", help="oldest TLS version accepted, %s (default "
        "%%(default)s, as the original)" % " or ".join(sorted(TLS_VERSIONS)))
    add("--tls-cert", metavar="PEM", help="speak HTTPS with this certificate chain "
        "(reloaded on SIGHUP)")
    add("--tls-key", metavar="PEM", help="the private key for --tls-cert")
    add("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
        help="close a tunnel with no data either way for this long, at most 86400; "
             "0 = never (default %(default)g)")
    add("--busy-poll", type=int, default=DEFAULT_BUSY_POLL_US, metavar="MICROSECONDS",
        help="poll this long after a lone datagram before sleeping; 0 = off (default "
             "%(default)s)")
    add("--sched-slice", type=int, default=DEFAULT_SCHED_SLICE_US, metavar="MICROSECONDS",
        help="round trips' scheduler slice (Linux 6.12+), to be woken sooner; 0 = "
             "off (default %(default)s)")
    add("--rt-priority", type=int, default=DEFAULT_RT_PRIORITY, metavar="N",
        help="SCHED_RR priority of round trips on busy CPUs (root or LimitRTPRIO=); 0 = "
             "off (default %(default)s)")
    add("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
        help="open tunnels at most (up to %d); the next client gets 503 (default "
             "%%(default)s, 0 = no limit)" % MAX_CLIENTS_BOUND)
    add("--trusted-proxies", default=DEFAULT_TRUSTED_PROXIES, metavar="NETS",
        help="reverse proxies whose X-Forwarded-For/Forwarded name the real client in "
             "logs (default %(default)s; '' trusts none)")
    add("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT, metavar="SECONDS",
        help="time a new connection has for TLS and its request head, at most 3600 "
             "(default %(default)g)")
    add("--keepalive", type=float, default=DEFAULT_KEEPALIVE, metavar="SECONDS",
        help="ws:// and wss:// only: a WebSocket ping after this long without traffic, so "
             "fronts do not cut a quiet tunnel; not data for --idle-timeout; 0 = off "
             "(default %(default)g)")
    add("--path", metavar="PREFIX", help="take upgrades only at this path and below it "
        "(/pg takes /pg and /pg/x), 404 elsewhere (default: any path)")
    add("--route", action="append", metavar="PATH=HOST:PORT",
        help="upgrades at PATH and below it go to the WireGuard at HOST:PORT (one server for "
             "several nodes); repeat it, or commas in a file or variable; the longest PATH "
             "wins; other paths get 404 unless --to is given (then --to under --path); "
             "reloaded on SIGHUP")
    add("--health-path", metavar="PATH", help="answer a GET of PATH with 200, or 503 when "
        "--max-clients are open, for a load balancer's health check, /proxyguard-health say "
        "(default: off; any path may take a tunnel, as the original)")
    add("--metrics-listen", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, 127.0.0.1:9821 say "
             "(default: off)")
    add("--log-level", type=_choice_in(LOG_LEVELS), choices=LOG_LEVELS, default="info",
        metavar="LEVEL", help="%s (default %%(default)s)" % ", ".join(LOG_LEVELS))
    if command_line_only:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    else:
        add("--version", action="version", version="proxyguard.py %s (%s; Python %d.%d.%d)"
            % ((__version__, PROTOCOL) + tuple(sys.version_info[:3])))
    return parser


def settable_options(parser):
    """{long name without dashes: action} of the options a config file or variable can set."""
    return {action.option_strings[-1][2:]: action for action in parser._actions
            if action.option_strings and action.option_strings[-1].startswith("--")
            and action.dest not in ("help", "version", "config")}


def _env_name(key):
    return ENV_PREFIX + key.upper().replace("-", "_")


class Source:
    """Where a value that is not on the command line came from, for error messages."""

    def __init__(self, where, key, value):
        self.where, self.key, self.value = where, key, value

    def __str__(self):
        return self.where


# The original's programs and flags, so its packages' units and sysconfig files run unchanged:
# `proxyguard-server -listen ${LISTEN} -to ${TO}`. Go's flag package takes -name and --name,
# `-name value` and `-name=value`. Its flags mean what ours of the same long name mean (-tcp-port
# is the client's TCP source port in both, cmd/proxyguard-client/main.go); they are
# translated before parsing, so --help shows only ours.
ORIGINAL_FLAGS = ("listen", "to", "listen-port", "forward-port", "peer-ips", "fwmark",
                  "tcp-port", "version")
# Go's flag package answers -h and -help (one dash or two, with any =value: flag.go's parseOne)
# with the usage and exit status 0: ours is --help, that mode's (the program name's) help.
ORIGINAL_HELP_FLAGS = ("h", "help")

# The original's program names (our console scripts, or a link to proxyguard.py) give the mode.
PROGRAM_MODES = {"proxyguard-client": "client", "proxyguard-server": "server"}


def translate_original_flags(argv):
    """The original's single-dash flags in `argv` as ours (-to X: --to X, -to=X: --to=X,
    -version=true: --version), its help flags as --help (-help, --h, -h=1); anything else,
    and all after `--`, as given."""
    translated = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return translated + list(argv[index:])
        name, sep, value = arg[1:].partition("=")
        if arg.startswith("-") and name.lstrip("-") in ORIGINAL_HELP_FLAGS:
            arg = "--help"
        elif arg.startswith("-") and not arg.startswith("--") and name in ORIGINAL_FLAGS:
            if name == "version" and sep:  # Go's bool flag: -version=true or =false
                if value.lower() in ("false", "0", "f"):
                    continue
                arg = "-version"
            arg = "-" + arg
        translated.append(arg)
    return translated


def _program_mode(program):
    """The mode the program's name gives (proxyguard-server: server), or None."""
    name = os.path.basename(program or "")
    return PROGRAM_MODES.get(name[:-3] if name.endswith(".py") else name)


def _check_program_mode(options, program):
    """Take the mode from the program's name unless one is given; refuse one that contradicts
    it (proxyguard-client also runs check, the client's connection test)."""
    implied = _program_mode(program)
    if implied is None:
        return
    if options.mode is None:
        options.mode = implied
    elif options.mode != implied and not (implied == "client" and options.mode == "check"):
        source = options.sources.get("mode")
        named = [name for name, mode in sorted(PROGRAM_MODES.items()) if mode == options.mode]
        raise UsageError("%s%s runs the %s: mode %r contradicts its name (run %sproxyguard.py "
                         "%s)" % ("%s: " % source if source else "", os.path.basename(program),
                                  implied, options.mode, "".join(name + " or " for name in named),
                                  options.mode))


def _mode_word_first(argv):
    """'client ...' is '--mode client ...'; a misspelt first word gets a suggestion."""
    if not argv or argv[0].startswith("-"):
        return argv
    word = argv[0].lower()
    if word == "up" and len(argv) > 1 and not argv[1].startswith("-"):
        return ["--mode", word, "--profile"] + argv[1:]
    if word in MODES:
        return ["--mode", word] + argv[1:]
    guess = _close_match(word, MODES)
    raise UsageError("unknown mode %r: %s" % (argv[0], "did you mean %r?" % guess if guess else
                                              "the first word is client, server, check or up"))


def _config_file_settings(path, names):
    """{dest: Source} of the file's lines. Keys as on the command line without the dashes, in
    any case, '_' for '-'. Raises UsageError naming the file and the line."""
    try:
        with open(path) as stream:
            lines = stream.readlines()
    except OSError as exc:
        raise UsageError("-c %r: cannot read the config file: %s"
                         % (path, describe_error(exc)))
    except UnicodeDecodeError as exc:
        raise UsageError("-c %r: cannot read the config file: not UTF-8 text (%s)" % (path, exc))
    settings = {}
    syntax = configargparse.DefaultConfigFileParser()
    for number, line in enumerate(lines, 1):
        where = "config file %s, line %d" % (path, number)
        if re.match(r"\s*\[[^]]*\]\s*$", line):  # configargparse would skip it silently
            raise UsageError("%s: %r: sections are not read: one file holds one mode's options "
                             "(mode = client or server, then that mode's options); use a file "
                             "per mode" % (where, line.strip()))
        try:  # one line at a time, for its number
            items = syntax.parse([line])
        except configargparse.ConfigFileParserException:
            raise UsageError("%s: %r is not 'option = value'" % (where, line.strip()))
        for written, value in items.items():
            key = written.lstrip("-").replace("_", "-").lower()
            if key not in names:
                guess = _close_match(key, names)
                raise UsageError("%s: unknown option %r%s" % (where, written, (
                    " (did you mean '%s'?)" % guess) if guess else ""))
            if isinstance(value, list) and isinstance(names[key], argparse._AppendAction):
                import json  # only here: a list for a repeatable option (to = [URL1, URL2])
                value = json.dumps([str(part) for part in value])
            elif isinstance(value, list):  # 'key = [a, b]'
                value = ",".join(str(part) for part in value)
            settings[names[key].dest] = Source(where, key, value)
    return settings


def environment_settings(environ, names):
    """({dest: Source} of the PROXYGUARD_<OPTION> variables, in any case, and a warning for
    each other PROXYGUARD_* variable, with the variable it likely misspells)."""
    settings, warnings = {}, []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name.startswith(NOT_OPTION_VARIABLES):
            continue
        key = name[len(ENV_PREFIX):].replace("_", "-").lower()
        if key in names:
            settings[names[key].dest] = Source("environment variable %s" % name, key,
                                               environ[name])
            continue
        guess = _close_match(key, names)
        warnings.append("%s is not an option's variable and is ignored%s" % (name, (
            " (did you mean %s, for --%s?)" % (_env_name(guess), guess)) if guess else ""))
    return settings, warnings


def _explain_parse_error(message, names, sources):
    """argparse's message, with where a value came from, and a suggestion for a misspelling."""
    found = re.match(r"argument (?:-\w/)?--([\w-]+): (.*)$", message)
    if found:
        key, rest = found.groups()
        choice = re.match(r"invalid choice: '([^']*)'", rest)
        guess = _close_match(choice.group(1).lower(), names[key].choices) \
            if choice and key in names else None
        if guess:
            message += "; did you mean '%s'?" % guess
            rest += "; did you mean '%s'?" % guess
        source = sources.get(names[key].dest) if key in names else None
        if source is None:
            return message
        if source.where.startswith("environment"):
            return "%s (--%s): %s" % (source, key, rest)
        return "%s: %s: %s" % (source, source.key, rest)
    found = re.match(r"unrecognized arguments: (.*)$", message)
    if found:
        hints = []
        for word in found.group(1).split():
            if word.lower() in MODES:
                hints.append("the mode goes first: proxyguard.py %s ..." % word.lower())
            elif word.startswith("--"):
                guess = _close_match(word[2:].split("=")[0], names)
                if guess:
                    hints.append("%s: did you mean --%s?" % (word, guess))
        if hints:
            message += " (%s)" % "; ".join(hints)
    return message


def _name_source(exc, options):
    """A check's UsageError naming --option, prefixed with the config file line or variable
    the option came from, if it came from one."""
    option = exc.option.split()[0] if exc.option and exc.option.startswith("--") else None
    source = getattr(options, "sources", {}).get(option[2:].replace("-", "_")) \
        if option else None
    return "%s: %s" % (source, exc) if source else str(exc)


def _check_option_modes(options, parser, on_command_line, sources):
    """Refuse an option of another mode: on the command line always, from a config file or
    the environment unless it holds its default (a shared file's, the example file's)."""
    for key, action in settable_options(parser).items():
        modes = OPTION_MODES.get(key)
        if takes_option(options.mode, key):
            continue
        if action.dest in on_command_line:
            source = None
        elif action.dest in sources and getattr(options, action.dest) != action.default:
            source = sources[action.dest]
        else:
            continue
        hint = MODE_HINTS.get((key, options.mode))
        if options.mode == "check":
            hint = "check takes the client's options"
        owner = " and ".join(modes) if modes else _options_mode(options.mode)
        raise UsageError("%s--%s is %s %s option: %s would ignore it%s" % (
            "%s: " % source if source else "", key, "an" if owner[0] in "aeiou" else "a", owner,
            options.mode if options.mode in ("check", "up") else "the " + options.mode,
            " (%s)" % hint if hint else ""))


def parse_options(argv, environ=None, program=None):
    """Parse and check every option; return the argparse namespace, with `warnings` (lines
    for the log: unknown PROXYGUARD_* variables) and `sources` (dest: where a value that is
    not on the command line came from). `program`: the name run, which may give the mode
    (PROGRAM_MODES). Raises UsageError; its `warnings` too."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    names = settable_options(parser)
    env_settings, warnings = environment_settings(environ, names)
    sources = {}
    try:
        argv = _mode_word_first(translate_original_flags(list(argv)))
        # First the command line alone: what it gives, and its own errors as argparse words them.
        try:
            given, _ = build_parser(command_line_only=True).parse_known_args(argv)
        except UsageError as exc:
            raise UsageError(_explain_parse_error(str(exc), names, {}))
        asks = any(arg in ("-h", "--help", "--version") for arg in argv)
        help_mode = getattr(given, "mode", None) or _program_mode(program)
        if any(arg in ("-h", "--help") for arg in argv) and help_mode:
            parser = build_parser(help_mode=help_mode)  # that mode's options alone
        path = getattr(given, "config", None)
        if configargparse is None and (env_settings or path is not None):
            used = sorted(_env_name(source.key) for source in env_settings.values())
            raise UsageError("config files and %s* environment variables (%s) need the "
                             "configargparse package: %s; or give every option on the "
                             "command line" % (ENV_PREFIX, ", ".join(used) or "-c",
                                               INSTALL_CONFIGARGPARSE))
        # The file wins over the environment (configargparse ranks them the other way): both
        # go in as variables, the file's replacing the environment's; neither over the
        # command line.
        sources.update(env_settings)
        if path is not None and not asks:
            sources.update(_config_file_settings(path, names))
        for dest in vars(given):
            sources.pop(dest, None)
        try:
            if configargparse is None:
                options = parser.parse_args(argv)
            else:
                options = parser.parse_args(argv, config_file_contents="", env_vars={
                    _env_name(source.key): source.value for source in sources.values()})
        except UsageError as exc:
            raise UsageError(_explain_parse_error(str(exc), names, sources))
        options.sources, options.warnings = sources, warnings
        options.given = set(vars(given))  # the dests the command line gave
        _check_program_mode(options, program)
        if options.mode is not None:
            _check_option_modes(options, parser, options.given, sources)
        try:
            _check_options(options)
        except UsageError as exc:
            raise UsageError(_name_source(exc, options))
    except UsageError as exc:
        exc.warnings = warnings
        raise
    return options


def _check_options(options):
    """Mode-dependent checks and conversions; raises UsageError naming the option."""
    if options.mode is None:
        raise UsageError("--mode is required: client, server, check or up (or 'mode = client' "
                         "in the config file)", option='--mode')
    for name, (low, high, words) in TIMEOUT_BOUNDS.items():
        value = getattr(options, name)  # inf and nan fail both comparisons
        if not (low <= value <= high or (value == 0 and name in ("idle_timeout", "keepalive"))):
            shown = repr(value)[:-2] if repr(value).endswith(".0") else repr(value)
            raise UsageError("--%s %s: must be %s" % (name.replace("_", "-"), shown, words),
                             option="--" + name.replace('_', '-'))
    if not 0 <= options.busy_poll <= MAX_BUSY_POLL_US:
        raise UsageError("--busy-poll %d: must be 0 (off) to %d microseconds"
                         % (options.busy_poll, MAX_BUSY_POLL_US), option="--busy-poll")
    low, high = SCHED_SLICE_US_RANGE
    if options.sched_slice and not low <= options.sched_slice <= high:
        raise UsageError("--sched-slice %d: must be 0 (the kernel's) or %d to %d microseconds"
                         % (options.sched_slice, low, high), option="--sched-slice")
    low, high = RT_PRIORITY_RANGE
    if not low <= options.rt_priority <= high:
        raise UsageError("--rt-priority %d: must be 0 (off) to %d (SCHED_RR's priorities)"
                         % (options.rt_priority, high), option="--rt-priority")
    if options.metrics_listen:  # an empty host takes every interface, as --listen's does
        options.metrics_listen = parse_host_port(options.metrics_listen, "--metrics-listen",
                                                 default_host="0.0.0.0")
    else:
        options.metrics_listen = None
    if options.mode == "server":
        options.listen = parse_host_port(options.listen, "--listen", default_host="0.0.0.0")
        options.route = _check_routes(options.route or [])
        if options.to and len(options.to) > 1:
            raise UsageError("--to given %d times (%s): the server forwards to one WireGuard "
                             "HOST:PORT (several nodes: --route PATH=HOST:PORT)"
                             % (len(options.to), ", ".join(options.to)), option='--to')
        to = options.to[0] if options.to else DEFAULT_SERVER_TO
        if "://" in to:
            raise UsageError("--to %r: the server's --to is WireGuard's HOST:PORT, for example "
                             "%s, not a URL (a URL is the client's --to)"
                             % (to, DEFAULT_SERVER_TO), option='--to')
        # With --route, only a --to given (not its default) serves the other paths. --to stays
        # the strings given; `wireguard` is its parsed (host, port), or None.
        options.wireguard = parse_host_port(to, "--to") if options.to or not options.route \
            else None
        if options.route and options.wireguard is None and options.path is not None:
            raise UsageError("--path %r: with --route and no --to there is nothing for --path "
                             "to limit (give --to, or make it a --route)" % options.path,
                             option='--path')
        options.trusted_proxies = parse_networks(options.trusted_proxies, "--trusted-proxies")
        if not 0 <= options.max_clients <= MAX_CLIENTS_BOUND:
            raise UsageError("--max-clients %r: must be 0 (no limit) or up to %d"
                             % (options.max_clients, MAX_CLIENTS_BOUND), option='--max-clients')
        if bool(options.tls_cert) != bool(options.tls_key):
            raise UsageError("--tls-cert and --tls-key go together", option='--tls-cert')
        if options.health_path is not None and not _is_url_path(options.health_path):
            raise UsageError("--health-path %r: must be a URL path such as /proxyguard-health "
                             "(visible ASCII from a /, no query)" % options.health_path,
                             option='--health-path')
        if options.path is not None and not _is_url_path(options.path):
            raise UsageError("--path %r: must be a URL path such as /proxyguard (visible ASCII "
                             "from a /, no query)" % options.path, option='--path')
        return
    if options.mode == "up":
        _read_up_profile(options)
    elif not options.to:
        raise UsageError("--to is required for the %s: the server's URL, for example "
                         "https://vpn.example.org/proxyguard" % options.mode, option='--to')
    else:  # several --to: one peer's servers, in the order tried; --to stays
        options.servers = [ServerURL(url) for url in options.to]  # the strings given
        texts = [str(url) for url in options.servers]
        twice = next((text for text in texts if texts.count(text) > 1), None)
        if options.mode == "client" and twice is not None:  # check may try one twice
            raise UsageError("--to %s given %d times: name each server once (the client "
                             "tries them in order, and its metrics label each by its URL)"
                             % (twice, texts.count(twice)), option='--to')
    options.listen_port = _parse_port(options.listen_port, "--listen-port")
    options.forward_port = _parse_port(options.forward_port, "--forward-port")
    options.tcp_port = _parse_port(options.tcp_port, "--tcp-port", allow_zero=True)
    if options.mode == "client" and options.listen_port == options.forward_port:
        raise UsageError("--listen-port %d and --forward-port %d are one port: the client would "
                         "send WireGuard's traffic back to itself (--listen-port is WireGuard's "
                         "Endpoint, --forward-port its ListenPort)"
                         % (options.listen_port, options.forward_port), option='--listen-port')
    if not (options.fwmark == -1 or 0 <= options.fwmark <= MAX_FWMARK):
        raise UsageError("--fwmark %r: must be -1 (off) or 0 to %d (0x%x)"
                         % (options.fwmark, MAX_FWMARK, MAX_FWMARK), option='--fwmark')
    _check_header_value(options.user_agent, "--user-agent")
    ips = [ip.strip() for ip in options.peer_ips.split(",") if ip.strip()]
    for ip in ips:
        try:  # strict: getaddrinfo would read 1.2.3 as 1.2.0.3
            ipaddress.ip_address(ip)
        except ValueError:
            raise UsageError("--peer-ips: %r is not an IP address" % ip, option='--peer-ips')
    if ips and len(options.servers) > 1:
        raise UsageError("--peer-ips names one server's addresses: with several --to, write "
                         "each server's address in its URL", option='--peer-ips')
    options.peer_ips = ips


def _read_up_profile(options):
    """up: read --profile into options.wireguard_profile (a WireGuardProfile) and
    options.interface (its file name without .conf), and settle WireGuard's ListenPort
    (--forward-port, else the profile's, else the default) and FwMark (--fwmark, else the
    profile's, else DEFAULT_UP_FWMARK; the tunnels' TCP sockets carry the same mark). Raises
    UsageError."""
    if not options.profile:
        raise UsageError("up needs a profile: proxyguard.py up PROFILE.conf (or --profile FILE)")
    where = "--profile %s" % options.profile
    name = os.path.basename(options.profile)
    interface = name[:-len(".conf")] if name.endswith(".conf") else name
    if not WG_INTERFACE_NAME.match(interface):
        raise UsageError("%s: %r cannot name a WireGuard interface (wg-quick names it after the "
                         "file, without .conf: 1 to 15 of a-z A-Z 0-9 _ = + . -): copy the "
                         "profile to a name such as eduvpn.conf" % (where, interface))
    try:
        with open(options.profile, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("%s: cannot read the profile: %s" % (where, describe_error(exc)))
    profile = parse_profile(text, where)
    listen_port = profile.setting("listenport")
    if options.forward_port == DEFAULT_FORWARD_PORT and listen_port:
        options.forward_port = _parse_port(listen_port, "%s: ListenPort" % where)
    mark = profile.setting("fwmark")
    if options.fwmark == -1:
        options.fwmark = DEFAULT_UP_FWMARK
        if mark and mark.lower() != "off":
            try:
                value = _fwmark_value(mark)
            except argparse.ArgumentTypeError as exc:
                raise UsageError("%s: FwMark %s" % (where, exc))
            if not 0 <= value <= MAX_FWMARK:
                raise UsageError("%s: FwMark %r: must be 0 to %d (0x%x)"
                                 % (where, mark, MAX_FWMARK, MAX_FWMARK))
            options.fwmark = value or DEFAULT_UP_FWMARK  # 0 is wg's "off" too
    options.wireguard_profile, options.interface = profile, interface


def _check_routes(values):
    """--route's values (each may hold several, split by commas: a config file's list, a
    variable) as [(PATH, (host, port))]; raises UsageError for a bad one or a PATH twice."""
    routes, seen = [], {}
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            path, target = _parse_route(item)
            if path in seen:
                raise UsageError("--route %r: the path %s has a route already (%r)"
                                 % (item.strip(), path, seen[path]), option='--route')
            seen[path] = item.strip()
            routes.append((path, target))
    return routes


def _check_header_value(text, option):
    """Refuse what cannot go into an HTTP header as written: control characters (a line
    break would inject headers) and characters beyond latin-1. Raises UsageError."""
    bad = next((ch for ch in text if ord(ch) < 32 or 127 <= ord(ch) < 160), None)
    if bad is not None:
        raise UsageError("%s %r: control character %r not allowed in an HTTP header"
                         % (option, text, bad), option=option)
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise UsageError("%s %r: only ASCII or latin-1 characters can go into an HTTP header"
                         % (option, text), option=option)


def _build_service(options, tunnels_changed=None, schedule=None):
    """The Server, Client or ClientGroup the options describe, calling `tunnels_changed`
    when a tunnel opens or closes, its pumps scheduled with `schedule` (own_schedule()'s, or
    None). Raises UsageError or FatalError."""
    polling = busy_polling(options.busy_poll, allowed_cpus(), schedule)  # one for all tunnels
    if options.mode == "server":
        tls_context = None
        if options.tls_cert:
            tls_context = server_tls_context(options.tls_cert, options.tls_key)
        return Server.open(options.listen, options.wireguard, idle_timeout=options.idle_timeout,
                           handshake_timeout=options.handshake_timeout, tls_context=tls_context,
                           trusted_proxies=options.trusted_proxies,
                           max_clients=options.max_clients, path=options.path,
                           routes=options.route, health_path=options.health_path,
                           tunnels_changed=tunnels_changed,
                           busy_polling=polling)
    if options.mode == "up":
        return _build_client_group(options, tunnels_changed, polling)
    return Client.open(_build_dialer(options), listen_port=options.listen_port,
                       forward_port=options.forward_port, idle_timeout=options.idle_timeout,
                       keepalive=options.keepalive,
                       fallbacks=[_build_dialer(options, url) for url in options.servers[1:]],
                       tunnels_changed=tunnels_changed,
                       busy_polling=polling)


def _build_client_group(options, tunnels_changed=None, polling=None):
    """up: check that wg-quick can run and clear what earlier ups left (WgQuick's
    clear_leftovers; neither with --write-config), then a Client per ProxyEndpoint
    peer, each on a free UDP port of 127.0.0.1, its server resolved now, before WireGuard may
    route DNS into the VPN, and kept for every reconnect; the peers' pumps share `polling`
    (a BusyPolling, or None). Raises FatalError."""
    profile = options.wireguard_profile
    pinning = cpu_pinning(options.cpu, len(profile.proxy_peers), allowed_cpus())
    if not options.write_config:
        check_can_bring_up(profile)
        # Before the servers' names are resolved: a killed up's WireGuard may still route
        # everything, DNS included, into its dead tunnel.
        WgQuick(options.interface).clear_leftovers()
    clients = []
    for _, url in profile.proxy_peers:
        dialer = _build_dialer(options, url)
        try:
            dialer.resolve()
        except OSError as exc:
            raise FatalError("ProxyEndpoint %s: cannot resolve %s: %s" % (
                url, dialer.proxy.host if dialer.proxy else url.host, describe_error(exc)))
        clients.append(Client.open(dialer, listen_port=0, forward_port=options.forward_port,
                                   idle_timeout=options.idle_timeout,
                                   keepalive=options.keepalive,
                                   tunnels_changed=tunnels_changed, busy_polling=polling))
    return ClientGroup(clients, pinning)


def start_wireguard(options, group):
    """up: WireGuard's configuration for the group's tunnels (rewrite_profile), written to
    --write-config (- prints it; returns None), or brought up with wg-quick (returns the
    WgQuick that takes it down). Raises FatalError."""
    profile = options.wireguard_profile
    ports = {section: client.address[1]
             for (section, _), client in zip(profile.proxy_peers, group.clients)}
    text = rewrite_profile(profile, ports, options.forward_port, options.fwmark)
    log.info("up: %s: %s; WireGuard's ListenPort %d, FwMark %d",
             plural(len(group.clients), "tunnel"),
             ", ".join("%s on 127.0.0.1:%d" % (client.url, client.address[1])
                       for client in group.clients), options.forward_port, options.fwmark)
    if options.write_config == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return None
    if options.write_config:
        try:  # 0600: it holds the private key
            descriptor = os.open(options.write_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                 0o600)
            os.fchmod(descriptor, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(text)
        except OSError as exc:
            raise FatalError("--write-config %s: cannot write: %s"
                             % (options.write_config, describe_error(exc)))
        log.info("WireGuard's configuration written to %s: the tunnels run until stopped",
                 options.write_config)
        return None
    wireguard = WgQuick(options.interface)
    wireguard.up(text)
    return wireguard


def _build_dialer(options, url=None):
    """The client's (or check's) Dialer for `url` (default: the first --to). Raises
    UsageError."""
    url = url or options.servers[0]
    tls_context = None
    if url.tls:
        tls_context = client_tls_context(options.ca_file, options.tls_min_version)
    if options.proxy is None:
        proxy = _proxy_from_environment(url)
    elif options.proxy.lower() in ("", "none", "direct"):
        proxy = None
    else:
        proxy = ProxyURL(options.proxy)
    return Dialer(url, proxy=proxy, peer_ips=options.peer_ips, fwmark=options.fwmark,
                  tcp_port=options.tcp_port, user_agent=options.user_agent,
                  connect_timeout=options.connect_timeout, tls_context=tls_context,
                  ca_file=options.ca_file)


# =============================================================================================
# main(argv): options in, a service run until a signal, an exit status out
# The entry points (proxyguard.py MODE, and the original's program names). No work at import.
# =============================================================================================

def main(argv=None, program=None):
    """Run proxyguard.py with `argv` (default sys.argv[1:]); return the exit status.
    `program`: the name it runs as; proxyguard-client and proxyguard-server give the mode."""
    argv = sys.argv[1:] if argv is None else argv
    name = program_name(program)
    try:
        options = parse_options(argv, program=program)
    except UsageError as exc:
        for warning in exc.warnings:  # a misspelt variable may be the cause
            print("%s: warning: %s" % (name, warning), file=sys.stderr)
        print("%s: error: %s (see --help)" % (name, exc), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else 0
    _configure_logging(options.log_level)
    for warning in options.warnings:
        log.warning("%s", warning)
    schedule = None
    if options.mode != "check":
        limit = _raise_open_files_limit()
        schedule, warning = own_schedule(options.sched_slice, options.rt_priority)
        if warning:
            log.warning("%s", warning)
        if schedule is not None and schedule.refused:  # a warning when asked for: a user's
            # run by hand would otherwise say at every start that the default cannot apply
            asked = "rt_priority" in options.given or "rt_priority" in options.sources
            log.log(logging.WARNING if asked else logging.DEBUG, "%s", schedule.refused)
        if options.mode == "server":
            warning = open_files_warning(options.max_clients, limit)
            if warning:
                log.warning("%s", warning)
    if options.mode == "check":
        try:  # each server in turn: 1 if any fails
            return max([run_check(_build_dialer(options, url)) for url in options.servers])
        except UsageError as exc:
            print("%s: error: %s" % (name, _name_source(exc, options)), file=sys.stderr)
            return 2
    with _signals_held():
        metrics = wireguard = None
        try:
            try:
                if options.metrics_listen:
                    metrics = MetricsEndpoint.open(options.metrics_listen)
                tunnels_changed = threading.Event()  # for the systemd notifier's STATUS=
                service = _build_service(options, tunnels_changed.set, schedule)
                if options.mode == "up":
                    wireguard = start_wireguard(options, service)
            except UsageError as exc:
                print("%s: error: %s" % (name, _name_source(exc, options)), file=sys.stderr)
                return 2
            except FatalError as exc:
                log.error("%s", exc)
                return 1
            if metrics is not None:
                metrics.start(service.metrics)
            tune_threads()
            status = 1
            try:
                status = _run_until_signal(service, functools.partial(_reload_settings, service,
                                                                     argv, program),
                                          SystemdNotifier.from_environment(), tunnels_changed)
            finally:
                if wireguard is not None and not wireguard.down():
                    status = 1
            return status
        finally:
            if metrics is not None:  # the page stops with the service
                metrics.stop()


def client_main():
    """The proxyguard-client command (pyproject.toml), as the original's program."""
    return main(program="proxyguard-client")


def server_main():
    """The proxyguard-server command (pyproject.toml), as the original's program."""
    return main(program="proxyguard-server")


if __name__ == "__main__":  # as proxyguard.py, or a link named proxyguard-client/-server
    sys.exit(main(program=sys.argv[0]))
