"""Fault injection with real processes: random packet loss (iptables in a network namespace the
test creates), a server stall that delivers a burst, and duplicated, reordered datagrams
(captured on lo and replayed with raw sockets).

- Loss20Test / Loss40Test: three clients under 20 % / 40 % random loss of every UDP datagram,
  102 direct and 27 channel messages, each waited for to its final status; every message must be
  shown once at each recipient (live or saved), never twice; one summary line per test.
- SelfReregistrationTest, LostProbeAfterRegistrationTest, StoreBurstTest: deterministic
  versions (iptables by port/length, SIGSTOP) of what random loss causes only now and then: a
  client registering again by itself while its user types, a new client's first probe lost, a
  save and the recipient's registration handled in one burst.
- ReplayTest: every datagram of a session replayed once or twice more, shuffled, from its
  original source; nothing may be shown twice, no table row or status may change.

Needs root: `ip netns`, iptables (statistic, length matches), AF_PACKET and raw IPv4 sockets.
When the kernel or the privileges refuse, or `ip`/`iptables` are missing, the tests skip with the
reason (scripts/deps installs iproute2 and iptables).
"""
import collections
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import unittest

from harness import BIN, DEADLINE, ChatTest, NetnsChatTest, Proc, free_port, udp_rx_queue
import wire

TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
WELCOME = ">>> [Welcome, You are registered.]"
CRASH_TEXT = ("terminate called", "Segmentation", "Aborted", "what():", "AddressSanitizer")

# Lines that end one prompt command (a direct send or a send_all), whatever happened on the way.
FINAL = re.compile(
    r"^>>> \[(Message received by [\w.-]+\."
    r"|Messages received by the server and saved"
    r"|Server not responding\.?"
    r"|Server refused the message: .*"
    r"|Error: .*"
    r"|Registration refused: .*)\]$")
# The four ways a message can be shown; the texts are unique (d-c1-017, ch-c2-004...).
LIVE_DIRECT = re.compile(r"^>>> ([\w.-]+): ((?:d|x)-\S+)$")
SAVED_DIRECT = re.compile(rf"^>>> ([\w.-]+): {TS} ((?:d|x)-\S+)$")
LIVE_CHANNEL = re.compile(r"^>>> \[Channel_Message ([\w.-]+): ((?:ch|x)-\S+)\]$")
SAVED_CHANNEL = re.compile(rf"^>>> Channel_Message ([\w.-]+): {TS} ((?:ch|x)-\S+)$")


def shown(proc):
    """Every message line of `proc`: a list of (sender, text, 'live'|'saved')."""
    out = []
    with proc.cond:
        lines = list(proc.lines)
    for line in lines:
        for rx, form in ((LIVE_DIRECT, "live"), (SAVED_DIRECT, "saved"),
                         (LIVE_CHANNEL, "live"), (SAVED_CHANNEL, "saved")):
            m = rx.match(line)
            if m:
                out.append((m.group(1), m.group(2), form))
                break
    return out


# A sender's lines between a command and its final line that show the message went on its way.
INTERMEDIATE = re.compile(r"^>>> \[(No ACK from |[\w.-]+ is offline, message sent|Client [\w.-]+ exists!!)")
# A command refused at the prompt (SelfReregistrationTest: never while the client registers again
# by itself): nothing was sent, so the script types it again once the client is back, and the
# test fails on the count of refusals.
PROMPT_REFUSAL = re.compile(r"^>>> \[Error: (you are offline|unknown client)")
BACK = r"^>>> \[(Welcome, You are registered\.|Client table updated\.)\]$"


class Script:
    """One client's part of the load: sequential commands, each waited for to its final line."""

    def __init__(self, proc, ops):
        self.proc = proc
        self.ops = ops          # [(kind, to or None, text)]
        self.results = []       # [(kind, to, text, final line, lines shown meanwhile)]
        self.refused = []       # [(text, error line)]: refused at the prompt, typed again
        self.error = None

    def run(self, deadline, per_op):
        p = self.proc
        try:
            for kind, to, text in self.ops:
                for attempt in range(8):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError(f"{p.name}: the load did not finish in time "
                                             f"({len(self.results)}/{len(self.ops)} commands)")
                    with p.cond:
                        start = p.cursor
                    p.send(f"send {to} {text}" if kind == "direct" else f"send_all {text}")
                    final = p.expect(FINAL.pattern, timeout=min(per_op, left))
                    with p.cond:
                        between = p.lines[start:p.cursor]
                    if PROMPT_REFUSAL.match(final) and not any(INTERMEDIATE.match(l) for l in between):
                        self.refused.append((text, final))
                        p.expect(BACK, timeout=min(per_op, left))
                        continue
                    break
                self.results.append((kind, to, text, final, between))
        except AssertionError as e:
            self.error = str(e)
        except Exception as e:  # a broken pipe is a crash of the client: reported, not swallowed
            self.error = f"{p.name}: {type(e).__name__}: {e}\n{p.dump()}"


# ------------------------------------------------------------------------ packet loss


class NetnsTest(NetnsChatTest):
    """A server and clients inside a network namespace of the test's own (harness.NetnsChatTest),
    where iptables drops datagrams at random (start_loss) or by rule (iptables()), all with
    TIMING."""

    TIMING = ["--ack-timeout", "60", "--retries", "25"]

    def setUp(self):
        self.server_args = self.TIMING
        super().setUp()
        # Skip, not fail, where the kernel lacks the matches the loss tests use.
        for match in (["-m", "statistic", "--mode", "random", "--probability", "0.5"],
                      ["-m", "length", "--length", "0:80"]):
            rule = ["INPUT", "-p", "udp", "--dport", "9"] + match + ["-j", "DROP"]
            r = subprocess.run(self.prefix() + ["iptables", "-A"] + rule, capture_output=True, text=True)
            if r.returncode != 0:
                raise unittest.SkipTest(f"iptables cannot drop datagrams here ({' '.join(match[:2])}): "
                                        f"{r.stderr.strip()}")
            self.iptables("-D", *rule)

    def start_loss(self, p):
        """From now on every UDP datagram arriving in the namespace is dropped with probability p."""
        self.iptables("-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random",
                      "--probability", str(p), "-j", "DROP")

    def wait_online(self, client, names, timeout=5):
        """Types `list` until exactly `names` show online (bounded); returns the rows."""
        end = time.monotonic() + timeout
        while True:
            rows = rows_of(client)
            if sorted(n for n, (_, st) in rows.items() if st == "online") == sorted(names):
                return rows
            if time.monotonic() > end:
                raise AssertionError(f"{client.name}: table never showed {names} online; last {rows}\n"
                                     f"{client.dump()}\nserver:\n{self.server.dump()}")
            time.sleep(0.05)  # polling the table, not synchronising on an event

    def start_client(self, name, port=None, extra=(), wait=True):
        return super().start_client(name, port, extra, wait, timing=self.TIMING)


class SelfReregistrationTest(NetnsTest):
    """A client the server marked offline while it runs registers again by itself; what the
    user types meanwhile must not be refused or lost. Deterministic: iptables drops by port and
    length, so each window stays open until the test closes it."""

    # Table updates and registrations retried for 5 s: the window the test works in. Probes and
    # relays still give up after one ACK timeout (100 ms).
    TIMING = ["--ack-timeout", "100", "--retries", "50"]

    def begin_reregistration(self):
        """c1 and c2 online; c2 marked offline by a lost relay, sees it, and is left registering
        again (its Register dropped) until the returned rule is deleted."""
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        for c in (c1, c2):
            self.wait_table(c, ["c1", "c2"])
        to_c2 = ["INPUT", "-p", "udp", "--dport", str(c2.port), "-j", "DROP"]
        c2_to_server = ["INPUT", "-p", "udp", "--sport", str(c2.port), "--dport", str(self.server_port), "-j", "DROP"]
        self.iptables("-A", *to_c2)
        c1.send("send_all are you there")  # the relay to c2 goes unanswered: the server marks c2 offline
        c1.expect_exact(">>> [Message received by Server.]")
        self.wait_table(c1, ["c1"])
        with c2.cond:
            c2.cursor = len(c2.lines)
        self.iptables("-A", *c2_to_server)  # c2's registration will not get through yet
        self.iptables("-D", *to_c2)         # but the table update marking it offline does
        # Printed by the same handler that starts the registration: c2 is registering from here.
        c2.expect_exact(">>> [Client table updated.]")
        return c1, c2, c2_to_server

    def test_message_typed_while_registering_again_is_not_refused(self):
        c1, c2, c2_to_server = self.begin_reregistration()
        c2.send("send c1 typed-while-registering")
        final = c2.expect(FINAL.pattern)
        self.iptables("-D", *c2_to_server)
        c2.expect_exact(WELCOME)
        self.assertNotRegex(final, PROMPT_REFUSAL, "the prompt refused a message during an automatic "
                            "re-registration:\n" + c2.dump())
        c1.expect(rf"^>>> c2: ({TS} )?typed-while-registering$")

    def test_message_typed_right_after_registering_again_is_not_refused(self):
        c1, c2, c2_to_server = self.begin_reregistration()
        # Table datagrams to c2 are held back: IP length 106 and more (28 + a 10-byte header, 27
        # bytes of table fields and at least one row of 41 or more). The challenge (28 + 11 + a
        # token of at most 64 = 103 at most) and the welcome (RegOk: 54) pass.
        tables_to_c2 = ["INPUT", "-p", "udp", "--dport", str(c2.port), "-m", "length", "--length", "104:65535",
                        "-j", "DROP"]
        self.iptables("-A", *tables_to_c2)
        self.iptables("-D", *c2_to_server)
        c2.expect_exact(WELCOME)
        c2.send("send c1 typed-right-after-welcome")
        final = c2.expect(FINAL.pattern)
        self.iptables("-D", *tables_to_c2)
        self.assertNotRegex(final, PROMPT_REFUSAL, "the prompt refused a message just after an automatic "
                            "re-registration:\n" + c2.dump())
        c1.expect(rf"^>>> c2: ({TS} )?typed-right-after-welcome$")


class LostProbeAfterRegistrationTest(NetnsTest):
    """A new client whose first probe from the server is lost (under loss: 3 tries inside one
    ACK timeout, lost with p = 0.36^3 = 5 % at 20 % loss, 0.64^3 = 26 % at 40 %) must still end up
    in everyone's table. Deterministic: every datagram to the client of IP length 41 is dropped:
    20 + 8 + a v2 Probe for "c2", which is the 10-byte header and the recipient's name (1 + 2);
    nothing else sent to a client is 13 bytes (the challenge, the welcome, the table and the
    answers are all longer)."""

    TIMING = ["--ack-timeout", "100", "--retries", "5"]

    def test_client_whose_first_probe_is_lost_still_gets_the_table(self):
        PROBE_FOR_C2 = len(wire.encode({"t": "probe", "id": 1, "recipient": "c2"}))
        c1 = self.start_client("c1")
        self.wait_table(c1, ["c1"])
        port = free_port()
        self.iptables("-A", "INPUT", "-p", "udp", "--dport", str(port), "-m", "length", "--length", str(20 + 8 + PROBE_FOR_C2), "-j", "DROP")
        c2 = self.start_client("c2", port=port)
        self.wait_online(c2, ["c1", "c2"])
        self.wait_online(c1, ["c1", "c2"])
        c2.send("send c1 hello-from-c2")
        c1.expect_exact(">>> c2: hello-from-c2")


class LossTest(NetnsTest):
    """Server and three clients inside a namespace whose lo drops incoming UDP at random."""

    LOSS = 0.2
    CLIENTS = ("c1", "c2", "c3")
    DIRECT_EACH = 34   # 102 direct messages in all
    CHANNEL_EACH = 9   # 27 channel messages in all
    # 60 ms x 26 attempts: a request lost 26 times in a row at 40 % loss (each attempt needs the
    # request and its answer through: 0.64 per attempt fails) is 1e-5; with 15 retries it would be
    # 8e-4 per request, and a registration or table update that fails ends a client's session.
    TIMING = ["--ack-timeout", "60", "--retries", "25"]
    LOAD_DEADLINE = 120
    SHOW_DEADLINE = 90

    def ops_for(self, name):
        others = [c for c in self.CLIENTS if c != name]
        ops = []
        ch = 0
        for i in range(self.DIRECT_EACH):
            ops.append(("direct", others[i % 2], f"d-{name}-{i:03d}"))
            if i % 4 == 3 and ch < self.CHANNEL_EACH:
                ops.append(("channel", None, f"ch-{name}-{ch:03d}"))
                ch += 1
        while ch < self.CHANNEL_EACH:
            ops.append(("channel", None, f"ch-{name}-{ch:03d}"))
            ch += 1
        return ops

    def check_loss(self):
        clients = {n: self.start_client(n) for n in self.CLIENTS}
        for c in clients.values():
            self.wait_online(c, self.CLIENTS)
        # The loss starts once everyone is online: the load is about messages (registration with
        # a lost first probe is LostProbeAfterRegistrationTest's).
        self.start_loss(self.LOSS)
        scripts = [Script(c, self.ops_for(n)) for n, c in clients.items()]
        deadline = time.monotonic() + self.LOAD_DEADLINE
        threads = [threading.Thread(target=s.run, args=(deadline, 40), daemon=True) for s in scripts]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.LOAD_DEADLINE + 45)
        load_secs = time.monotonic() - started
        errors = [s.error for s in scripts if s.error]
        self.assertEqual(errors, [], "\n".join(errors))

        # Who must show what: text -> (sender, recipients, final status line of the sender).
        expected = {}
        for s in scripts:
            for kind, to, text, final, _ in s.results:
                rcpts = [to] if kind == "direct" else [n for n in self.CLIENTS if n != s.proc.name]
                expected[text] = (s.proc.name, rcpts, final)
        anomalies, dropped = [], set()
        for s in scripts:
            for kind, to, text, final, between in s.results:
                if not (final.startswith(">>> [Error") or "refused" in final or final == ">>> [Server not responding]"):
                    continue
                anomalies.append(f"{s.proc.name}: {text}: {final}")
        not_responding = {t for t, (_, _, f) in expected.items() if f == ">>> [Server not responding.]"}
        refused = [(s.proc.name, t, line) for s in scripts for t, line in s.refused]
        excused = not_responding | dropped | {a.split(": ")[1] for a in anomalies}

        def missing():
            seen = {n: {t for _, t, _ in shown(c)} for n, c in clients.items()}
            return [(r, text) for text, (_, rcpts, _) in expected.items() if text not in excused
                    for r in rcpts if text not in seen[r]]

        db = os.path.join(self.dir, "data", "chat.db")

        def in_store(recipient, text):
            """True if the server's store still holds `text` for `recipient` (read-only look)."""
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                try:
                    return con.execute("SELECT count(*) FROM messages WHERE recipient = ? AND text = ?",
                                       (recipient, text)).fetchone()[0] > 0
                finally:
                    con.close()
            except sqlite3.Error:
                return False

        # Polls the clients' output (bounded) until everything addressed to them is shown; stops
        # early once only messages stuck in the server's store are left and nothing moved for 10 s.
        end = time.monotonic() + self.SHOW_DEADLINE
        left = missing()
        progress = time.monotonic()
        while left and time.monotonic() < end:
            if time.monotonic() - progress > 10 and all(in_store(r, t) for r, t in left):
                break
            r = clients[left[0][0]]
            with r.cond:
                r.cond.wait(0.5)  # woken by the next output line; re-checked either way
            now = missing()
            if len(now) < len(left):
                progress = time.monotonic()
            left = now

        # Tally.
        by_rcpt = {n: collections.Counter() for n in self.CLIENTS}
        forms = {n: {} for n in self.CLIENTS}
        wrong_sender = []
        for n, c in clients.items():
            for sender, text, form in shown(c):
                by_rcpt[n][text] += 1
                forms[n].setdefault(text, []).append(form)
                if text in expected and expected[text][0] != sender:
                    wrong_sender.append((n, sender, text))
        total = sum(len(r) for _, r, _ in expected.values())
        delivered = dup = lost = via_store = nr_shown = 0
        duplicates, lost_list, bad_ack, unexpected, stranded = [], [], [], [], []
        for text, (sender, rcpts, final) in expected.items():
            for r in rcpts:
                n = by_rcpt[r][text]
                if n >= 1:
                    delivered += 1
                    if forms[r][text][0] == "saved":
                        via_store += 1
                    if text in not_responding:
                        nr_shown += 1
                if n > 1:
                    dup += 1
                    duplicates.append((r, text, forms[r][text]))
                if n == 0 and text not in not_responding and text not in dropped:
                    if in_store(r, text):
                        stranded.append((r, text))  # saved but never delivered: a loss too
                    lost += 1
                    lost_list.append((r, text, final))
            m = re.match(r"^>>> \[Message received by ([\w.-]+)\.\]$", final)
            if m and m.group(1) != "Server" and forms[m.group(1)].get(text, [None])[0] != "live":
                bad_ack.append((text, final, forms[m.group(1)].get(text)))
        for n in self.CLIENTS:
            for text in by_rcpt[n]:
                if text not in expected or n not in expected[text][1]:
                    unexpected.append((n, text))
        rereg = {n: len(c.seen("^" + re.escape(WELCOME) + "$")) - 1 for n, c in clients.items()}
        lost_track = sum(len(c.seen(r"^>>> \[The server lost track of you")) for c in clients.values())
        fallbacks = sum(1 for s in scripts for *_, between in s.results
                        for l in between if re.match(r"^>>> \[(No ACK from|\S+ is offline, message sent)", l))
        print(f"\n[loss {self.LOSS:.0%}] sent {len(expected)} messages "
              f"({sum(1 for _, r, _ in expected.values() if len(r) == 1)} direct, "
              f"{sum(1 for _, r, _ in expected.values() if len(r) == 2)} channel) = {total} deliveries due; "
              f"delivered {delivered}, duplicated {dup}, lost {lost}, via the store {via_store}, "
              f"sender told 'Server not responding.' {len(not_responding)} (of those shown {nr_shown}), "
              f"direct sends that fell back to the server {fallbacks}, "
              f"self re-registrations {sum(rereg.values())} {rereg} ('lost track' notes {lost_track}), "
              f"commands refused at the prompt meanwhile and typed again {len(refused)}, "
              f"of the lost, still in the server's store {len(stranded)} {stranded}, "
              f"load {load_secs:.1f}s", flush=True)
        for name, text, line in refused:
            print(f"  refused at {name}'s prompt: {text}: {line}", flush=True)

        crashed = [p.name for p in self.procs if p.proc.poll() is not None]
        self.assertEqual(crashed, [], "processes exited:\n" + "\n".join(p.name + ":\n" + p.dump() for p in self.procs))
        self.assertEqual(anomalies, [], "commands that ended in an error:\n" + "\n".join(anomalies))
        self.assertEqual(duplicates, [], "messages shown twice")
        self.assertEqual(refused, [], "commands refused at the prompt although the user never left")
        self.assertEqual(wrong_sender, [], "messages shown under the wrong sender")
        self.assertEqual(unexpected, [], "messages shown to a client they were not for")
        self.assertEqual(bad_ack, [], "'Message received by X' although X did not show it live")
        if lost_list:
            with self.server.cond:
                log = [l for l in self.server.lines if re.search(r"registered|offline|saved|delivered|failed", l)]
            self.fail(f"messages never shown (recipient, text, sender's status): {lost_list}\n"
                      + "\n".join(c.name + ":\n" + c.dump() for c in clients.values())
                      + "\nserver (registrations, saves, deliveries):\n" + "\n".join(log[-150:]))


class Loss20Test(LossTest):
    LOSS = 0.2

    def test_messages_arrive_once_with_20_percent_loss(self):
        self.check_loss()


class Loss40Test(LossTest):
    LOSS = 0.4

    def test_messages_arrive_once_with_40_percent_loss(self):
        self.check_loss()


# ------------------------------------------------------------------------ a burst after a stall


class StoreBurstTest(ChatTest):
    """The server stalls (SIGSTOP) while a save for an offline client and that client's
    registration queue up; both arrive in one burst, as after any hiccup of the server's host."""

    def wait_queue_change(self, old, what):
        end = time.monotonic() + DEADLINE
        while udp_rx_queue(self.server_port) == old:
            if time.monotonic() > end:
                self.fail(f"the {what} never reached the stopped server's socket")
            time.sleep(0.01)  # polling the socket's queue, not synchronising on an event
        return udp_rx_queue(self.server_port)

    def test_save_and_registration_in_one_burst_deliver_the_message(self):
        port = free_port()
        c1 = Proc(["-c", "c1", "127.0.0.1", str(self.server_port), str(port), "--ack-timeout", "5000"], name="c1")
        c1.port = port
        self.procs.append(c1)
        c1.expect_exact(WELCOME)
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        c2.send("dereg c2")
        c2.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(c1, ["c1"])
        self.server.signal(signal.SIGSTOP)
        try:
            base = udp_rx_queue(self.server_port)
            c1.send("send c2 sent-during-the-stall")
            c1.expect_exact(">>> [c2 is offline, message sent to server.]")
            queued = self.wait_queue_change(base, "save request")
            c2.send("reg c2")
            self.wait_queue_change(queued, "registration")
        finally:
            self.server.signal(signal.SIGCONT)
        c1.expect_exact(">>> [Messages received by the server and saved]")
        c2.expect_exact(WELCOME)
        c2.expect(rf"^>>> c1: {TS} sent-during-the-stall$", timeout=5)


# ------------------------------------------------------------------------ duplicates, reordering

ETH_P_ALL = 0x0003
PACKET_HOST = 0
PACKET_OUTGOING = 4


class Capture:
    """Every IPv4/UDP datagram on lo, once each (the outgoing copy), while running."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.frames = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                break
            if addr[2] in (PACKET_HOST, PACKET_OUTGOING):
                self.frames.append((addr[2], data))

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()

    def datagrams(self, ports):
        """(src ip, src port, dst ip, dst port, payload) between `ports`, each datagram once."""
        out = {PACKET_HOST: [], PACKET_OUTGOING: []}
        for kind, f in self.frames:
            if len(f) < 14 + 20 + 8 or f[12:14] != b"\x08\x00":
                continue
            ip = f[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP or struct.unpack("!H", ip[6:8])[0] & 0x3FFF:
                continue  # not IPv4/UDP, or a fragment
            total = struct.unpack("!H", ip[2:4])[0]
            udp = ip[ihl:total]
            sport, dport, ulen = struct.unpack("!HHH", udp[:6])
            if sport in ports and dport in ports:
                out[kind].append((socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport,
                                  bytes(udp[8:ulen])))
        # On lo each datagram shows twice (leaving and arriving): keep one side.
        return out[PACKET_OUTGOING] or out[PACKET_HOST]


def ipv4_udp(src, sport, dst, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.randrange(1, 65536), 0, 64,
                      socket.IPPROTO_UDP, 0, socket.inet_aton(src), socket.inet_aton(dst))
    # The kernel fills in the header checksum for IP_HDRINCL sockets.
    return hdr + udp


def rows_of(client):
    """Types `list` once; {name: (address, status)}."""
    client.send("list")
    client.expect("^NAME +ADDRESS")
    rows = {}
    while True:
        line = client.expect(".")
        if re.match(r"^\(\d+ clients, \d+ online\)$", line):
            return rows
        f = line.split()
        rows[f[0]] = (f[1], f[2])


STATUS = re.compile(r"^>>> \[(?!Channel_Message )")


class ReplayTest(ChatTest):
    """Every datagram of a session sent again, once or twice more, in shuffled order."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("replaying datagrams needs root (AF_PACKET and raw sockets)")
        try:
            self.capture = Capture()
        except (PermissionError, OSError) as e:
            raise unittest.SkipTest(f"cannot capture on lo with an AF_PACKET socket: {e}")
        self.addCleanup(self.capture.stop)
        try:
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        except (PermissionError, OSError) as e:
            raise unittest.SkipTest(f"cannot open a raw IPv4 socket: {e}")
        self.addCleanup(self.raw.close)
        super().setUp()

    def test_duplicated_and_reordered_datagrams_change_nothing(self):
        c1, c2, c3 = (self.start_client(n) for n in ("c1", "c2", "c3"))
        clients = (c1, c2, c3)
        for c in clients:
            self.wait_table(c, ["c1", "c2", "c3"])

        def direct(a, b, text):
            a.send(f"send {b.name} {text}")
            b.expect_exact(f">>> {a.name}: {text}")
            a.expect_exact(f">>> [Message received by {b.name}.]")

        def channel(a, text):
            a.send(f"send_all {text}")
            a.expect_exact(">>> [Message received by Server.]")
            for o in clients:
                if o is not a:
                    o.expect_exact(f">>> [Channel_Message {a.name}: {text}]")

        direct(c1, c2, "d-1")
        direct(c2, c3, "d-2")
        direct(c3, c1, "d-3")
        channel(c1, "ch-1")
        c3.send("dereg c3")
        c3.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(c1, ["c1", "c2"])
        self.wait_table(c2, ["c1", "c2"])
        c1.send("send c3 d-4")
        c1.expect_exact(">>> [c3 is offline, message sent to server.]")
        c1.expect_exact(">>> [Messages received by the server and saved]")
        c2.send("send_all ch-2")
        c2.expect_exact(">>> [Message received by Server.]")
        c1.expect_exact(">>> [Channel_Message c2: ch-2]")
        c3.send("reg c3")
        c3.expect_exact(WELCOME)
        c3.expect_exact(">>> [You have messages]")
        c3.expect(rf"^>>> c1: {TS} d-4$")
        c3.expect(rf"^>>> Channel_Message c2: {TS} ch-2$")
        for c in clients:
            self.wait_table(c, ["c1", "c2", "c3"])
        direct(c2, c1, "d-5")
        direct(c1, c3, "d-6")
        channel(c3, "ch-3")

        before_rows = {c.name: rows_of(c) for c in clients}
        for c in clients:
            want = {o.name: (f"127.0.0.1:{o.port}", "online") for o in clients}
            self.assertEqual(before_rows[c.name], want, c.dump())
        before_lines = {c.name: len(c.lines) for c in clients}
        before_server = len(self.server.lines)

        self.capture.stop()
        ports = {self.server_port} | {c.port for c in clients}
        grams = self.capture.datagrams(ports)
        self.assertGreater(len(grams), 40, "too few datagrams captured to mean anything")
        replay = []
        for g in grams:
            replay += [g] * random.choice((1, 2))
        random.shuffle(replay)
        for src, sport, dst, dport, payload in replay:
            self.raw.sendto(ipv4_udp(src, sport, dst, dport, payload), (dst, 0))
        kinds = collections.Counter((g[1] == self.server_port, g[3] == self.server_port) for g in grams)
        print(f"\n[replay] captured {len(grams)} datagrams (client->server {kinds[(False, True)]}, "
              f"server->client {kinds[(True, False)]}, client->client {kinds[(False, False)]}); "
              f"replayed {len(replay)} in shuffled order", flush=True)

        barrier_lines = {
            "c1": sorted([">>> [Message received by Server.]", ">>> c2: x-barrier-2"]),
            "c2": sorted([">>> [Channel_Message c1: x-barrier-1]", ">>> [Message received by c1.]"]),
            "c3": [">>> [Channel_Message c1: x-barrier-1]"],
        }
        # Barriers: every process handles what was queued to it before these.
        channel(c1, "x-barrier-1")   # through the server to c2 and c3
        direct(c2, c1, "x-barrier-2")  # to c1

        for p in self.procs:
            self.assertIsNone(p.proc.poll(), f"{p.name} exited:\n{p.dump()}")
            for l in p.lines + p.err_lines:
                for bad in CRASH_TEXT:
                    self.assertNotIn(bad, l, f"{p.name} printed crash text:\n{p.dump()}")
        for c in clients:
            counts = collections.Counter((s, t) for s, t, _ in shown(c))
            self.assertEqual([k for k, n in counts.items() if n > 1], [], f"{c.name} showed a message twice:\n{c.dump()}")
            # Exactly the barriers' own lines: no status, message or table line came from a replay.
            new = sorted(l for l in c.lines[before_lines[c.name]:] if l.startswith(">>> "))
            self.assertEqual(new, barrier_lines[c.name], f"{c.name} printed something else after the replay:\n{c.dump()}")
            self.assertEqual(rows_of(c), before_rows[c.name], f"{c.name}'s table changed:\n{c.dump()}")
        # The replays did reach the server: it counted them (and answered repeats from its cache).
        to_server = sum(1 for g in grams if g[3] == self.server_port)
        replayed_to_server = sum(1 for g in replay if g[3] == self.server_port)
        self.server.signal(signal.SIGINT)
        stats = self.server.expect(r"server stopped: \d+ datagrams received")
        received, _, duplicates = map(int, re.findall(r"\d+", stats.split("server stopped:")[1])[:3])
        print(f"[replay] server: {stats.split('info ')[-1]}", flush=True)
        self.assertGreaterEqual(received, to_server + replayed_to_server, stats)
        self.assertGreater(duplicates, 0, stats)
        # The server saw no change of anyone's state either.
        changed = [l for l in self.server.lines[before_server:]
                   if re.search(r"registered |left \(dereg\)|is offline|saved a|delivered", l)]
        self.assertEqual(changed, [], "the server acted on replayed datagrams:\n" + self.server.dump())


if __name__ == "__main__":
    unittest.main()
