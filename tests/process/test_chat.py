"""Registration, the table, direct chat, prompt errors and leaving (SPEC §2-§4, §8), with real processes."""
import os
import re

# The longest message the protocol carries (lib/protocol/messages.hpp kMaxText).
LIMIT = 600
import signal
import socket
import time
import unittest

import wire
from harness import DEADLINE, FAST, ChatTest, Proc, free_port, isolated_env

WELCOME = ">>> [Welcome, You are registered.]"
UPDATED = ">>> [Client table updated.]"
SAVED = r"^>>> \[Messages received by the server and saved\]$"
PROMPT_EXIT = 3  # seconds: a leaving client or a stopping server must be gone within this
CRASH_TEXT = ("terminate called", "Segmentation", "Aborted", "what():", "AddressSanitizer")


def message_lines(proc, since=0):
    """Lines that show a chat message (`>>> name: ...` or a channel message), in order."""
    return [l for l in proc.lines[since:]
            if re.match(r"^>>> (\[Channel_Message |Channel_Message |[A-Za-z0-9_-][\w.-]*: )", l)]


class ChatBase(ChatTest):
    def rows(self, client):
        """Types `list` once; returns {name: (address, status)} of the rows printed."""
        client.send("list")
        client.expect("^NAME +ADDRESS")
        rows = {}
        while True:
            with client.cond:
                ok = client.cond.wait_for(lambda: client.cursor < len(client.lines) or client.eof, 5)
                if not ok or client.cursor >= len(client.lines):
                    break
                line = client.lines[client.cursor]
                m = re.match(r"^(\S+) +(\d+\.\d+\.\d+\.\d+:\d+) +(online|offline)", line)
                if not m:
                    break
                client.cursor += 1
                rows[m.group(1)] = (m.group(2), m.group(3))
        return rows

    def wait_row(self, client, name, address, status):
        """Polls `list` until `name` shows at `address` with `status` (bounded)."""
        end = time.monotonic() + DEADLINE
        rows = {}
        while time.monotonic() < end:
            rows = self.rows(client)
            if rows.get(name) == (address, status):
                return
            time.sleep(0.05)  # polling the table, not synchronising on an event
        self.fail(f"{client.name}: {name} never showed as {address} {status}; last rows {rows}\n{client.dump()}")

    def chat(self, a, b, text):
        """a sends `text` to b directly; b shows it and a gets the ACK line."""
        a.send(f"send {b.name} {text}")
        b.expect_exact(f">>> {a.name}: {text}", timeout=5)
        a.expect_exact(f">>> [Message received by {b.name}.]", timeout=5)

    def assertNoCrashText(self, proc):
        for l in proc.lines + proc.err_lines:
            for bad in CRASH_TEXT:
                self.assertNotIn(bad, l, f"{proc.name} printed crash text:\n{proc.dump()}")

    def assertServerAlive(self):
        self.assertIsNone(self.server.proc.poll(), "the server exited:\n" + self.server.dump())


class RegistrationTest(ChatBase):
    def test_three_clients_see_each_other_online(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        c3 = self.start_client("c3")
        for c in (c1, c2, c3):
            rows = self.wait_table(c, ["c1", "c2", "c3"])
            self.assertEqual(len(rows), 3, rows)
        # The address recorded is the one the registration came from.
        rows = self.rows(c1)
        for c in (c1, c2, c3):
            self.assertEqual(rows[c.name], (f"127.0.0.1:{c.port}", "online"), rows)

    def test_table_update_shown_at_each_online_client(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        for c in (c1, c2):
            self.wait_table(c, ["c1", "c2"])
        marks = {c.name: len(c.lines) for c in (c1, c2)}
        for c in (c1, c2):
            c.cursor = marks[c.name]  # only what comes after c3 starts counts
        c3 = self.start_client("c3")
        for c in (c1, c2):
            c.expect_exact(UPDATED, timeout=5)
            self.wait_table(c, ["c1", "c2", "c3"])
            # Once per update applied: one registration, one line.
            self.assertEqual(c.lines[marks[c.name]:].count(UPDATED), 1, c.dump())
        self.wait_table(c3, ["c1", "c2", "c3"])

    def test_duplicate_online_name_refused(self):
        """The same name started on another machine (its own XDG_DATA_HOME, so its own state
        file) with the same identity: the server refuses it while the holder answers."""
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c2, ["c1", "c2"])
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.makedirs(elsewhere, mode=0o700)
        port = free_port()
        dup = Proc(["-c", "c1", "127.0.0.1", str(self.server_port), str(port), "--identity",
                    self.identity_file("c1")] + FAST, name="c1-elsewhere", env=isolated_env(elsewhere))
        dup.port = port
        self.procs.append(dup)
        dup.expect_exact(">>> [Registration refused: the name c1 is in use by an online client]", timeout=5)
        code = dup.wait_exit(timeout=PROMPT_EXIT)
        self.assertNotEqual(code, 0, dup.dump())
        self.assertGreater(code, 0, "killed by a signal:\n" + dup.dump())
        self.assertEqual(dup.seen(re.escape(WELCOME)), [], dup.dump())
        self.assertNoCrashText(dup)
        # The holder keeps its name and address: messages still reach it.
        self.wait_row(c2, "c1", f"127.0.0.1:{c1.port}", "online")
        self.chat(c2, c1, "still yours")

    def test_same_name_twice_on_one_machine_stops_the_second_at_start(self):
        """The same name started again with the same XDG_DATA_HOME: its state file is locked by
        the first (docs/SECURITY.md), so the second says so in one line and exits 1 before it
        sends anything; the first keeps its name."""
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c2, ["c1", "c2"])
        dup = self.start_client("c1", wait=False)
        code = dup.wait_exit(timeout=PROMPT_EXIT)
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and not (dup.eof and dup.err_lines):
            time.sleep(0.01)  # the output threads draining the pipes of a process that has exited
        self.assertEqual(code, 1, dup.dump())
        self.assertEqual([l for l in dup.lines if l.strip()], [], dup.dump())
        self.assertEqual(len(dup.err_lines), 1, dup.dump())
        self.assertEqual(dup.err_lines[0],
                         f"ChatApp: peer state: {self.peers_db('c1')} is in use by another ChatApp process "
                         "(this name is running already); quit it first")
        self.assertNoCrashText(dup)
        self.wait_row(c2, "c1", f"127.0.0.1:{c1.port}", "online")
        self.chat(c2, c1, "still yours")
        self.chat(c1, c2, "and mine")

    def test_silently_left_name_comes_back_from_another_port(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c2, ["c1", "c2"])
        c1.signal(signal.SIGINT)
        self.assertEqual(c1.wait_exit(timeout=PROMPT_EXIT), 0, c1.dump())
        # The server still thinks c1 is online at the old port; it probes, gets no answer, welcomes.
        again = self.start_client("c1", port=free_port())
        self.assertNotEqual(again.port, c1.port)
        self.wait_row(c2, "c1", f"127.0.0.1:{again.port}", "online")
        self.chat(c2, again, "welcome back")
        self.chat(again, c2, "thanks")

    def test_silently_left_name_comes_back_on_the_same_port(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c2, ["c1", "c2"])
        c1.close_stdin()
        self.assertEqual(c1.wait_exit(timeout=PROMPT_EXIT), 0, c1.dump())
        again = self.start_client("c1", port=c1.port)
        self.wait_table(again, ["c1", "c2"])
        self.chat(c2, again, "same place")
        self.chat(again, c2, "same me")

    def test_names_at_the_edges_register_and_chat(self):
        long_name = "A" * 30 + ".-"  # 32 characters, every allowed punctuation
        a = self.start_client(long_name)
        b = self.start_client("x.y_z-9")
        self.wait_table(a, [long_name, "x.y_z-9"])
        self.wait_table(b, [long_name, "x.y_z-9"])
        self.chat(a, b, "hello")
        self.chat(b, a, "back")

    def test_server_unreachable_at_start(self):
        # No server on this port (the one from setUp is elsewhere).
        c = Proc(["-c", "c1", "127.0.0.1", str(free_port()), str(free_port()), "--ack-timeout", "50",
                  "--retries", "5"], name="lonely")
        self.procs.append(c)
        c.expect_exact(">>> [Server not responding]", timeout=5)
        c.expect_exact(">>> [Exiting]", timeout=2)
        code = c.wait_exit(timeout=PROMPT_EXIT)
        self.assertGreater(code, 0, c.dump())
        self.assertEqual(c.seen(re.escape(WELCOME)), [])
        self.assertNoCrashText(c)


class DirectChatTest(ChatBase):
    def setUp(self):
        super().setUp()
        self.c1 = self.start_client("c1")
        self.c2 = self.start_client("c2")
        for c in (self.c1, self.c2):
            self.wait_table(c, ["c1", "c2"])

    def test_utf8_spaces_and_punctuation_arrive_byte_exact(self):
        c1, c2 = self.c1, self.c2
        texts = [
            "h\u00e9llo   w\u00f6rld  !!  \u00bf\u00a1 \u4f60\u597d \U0001F600 \u2014 \"quotes\" 'single' \\back\\slash",
            "a  b   c    d",
            "{\"t\":\"json\",\"v\":1} [1,2] <tag> & ; : , . ? * % $ # @ ~ ` ^ | = + -",
            "trailing spaces   ",
            "send c1 not a command",
        ]
        for text in texts:
            with self.subTest(text=text):
                since = len(c2.lines)
                c1.send(f"send c2 {text}")
                line = c2.expect(r"^>>> c1: ", timeout=5)
                self.assertEqual(line.encode("utf-8"), f">>> c1: {text}".encode("utf-8"))
                c1.expect_exact(">>> [Message received by c2.]", timeout=5)
                self.assertEqual(message_lines(c2, since), [f">>> c1: {text}"], "shown once, exactly")

    def test_message_of_exactly_the_limit_arrives(self):
        text = "\u00e9" * 299 + "xy"  # 598 + 2 = 600 bytes
        self.assertEqual(len(text.encode("utf-8")), LIMIT)
        self.chat(self.c1, self.c2, text)

    def test_printable_message_within_the_limit_with_quotes_arrives(self):
        # The limit holds whatever the text: quotes and backslashes (doubled on the wire) too.
        for text in (('say "hi" ' * 67)[:LIMIT], '"' * LIMIT, 'C:\\Users\\me\\' * 50):
            with self.subTest(size=len(text)):
                self.assertLessEqual(len(text.encode("utf-8")), LIMIT)
                self.chat(self.c1, self.c2, text)

    def test_send_to_self(self):
        c1 = self.c1
        c1.send("send c1 hi me")
        c1.expect_exact(">>> c1: hi me", timeout=5)
        c1.expect_exact(">>> [Message received by c1.]", timeout=5)
        self.assertEqual(message_lines(c1), [">>> c1: hi me"])
        self.assertEqual(message_lines(self.c2), [])

    def test_unknown_name_is_an_error_and_nothing_is_sent(self):
        c1, c2 = self.c1, self.c2
        c3 = self.start_client("c3")
        self.wait_table(c1, ["c1", "c2", "c3"])
        server_lines = len(self.server.lines)
        c1.send("send nobody are you there")
        line = c1.expect(r"^>>> ", timeout=5)
        self.assertEqual(line, ">>> [Error: unknown client nobody; type list to see the table]")
        # The next thing anyone shows is the marker, not the message to nobody.
        c1.send("send c2 marker")
        c2.expect_exact(">>> c1: marker", timeout=5)
        c1.expect_exact(">>> [Message received by c2.]", timeout=5)
        c1.send("send c3 marker")
        c3.expect_exact(">>> c1: marker", timeout=5)
        c1.expect_exact(">>> [Message received by c3.]", timeout=5)
        for c in (c1, c2, c3):
            self.assertEqual([l for l in c.lines if "are you there" in l], [], c.dump())
        self.assertEqual(message_lines(c2), [">>> c1: marker"])
        self.assertEqual(message_lines(c3), [">>> c1: marker"])
        self.assertEqual([l for l in self.server.lines[server_lines:] if "nobody" in l], [],
                         self.server.dump())

    def test_missing_arguments_give_one_line_usage(self):
        c1 = self.c1
        c1.cursor = len(c1.lines)
        start = c1.cursor
        cases = [("send", "send"), ("send c2", "send"), ("send c2 ", "send"), ("send_all", "send_all"),
                 ("dereg", "dereg"), ("reg", "reg")]
        for line, _ in cases:
            c1.send(line)
        c1.send("frobnicate now")
        c1.send("list")  # a marker: everything before its header answers the lines above
        c1.expect("^NAME +ADDRESS", timeout=5)
        header = c1.cursor - 1
        got = [l for l in c1.lines[start:header] if l != UPDATED]
        self.assertEqual(len(got), len(cases) + 1, "one line per bad command:\n" + "\n".join(got))
        for (typed, cmd), shown in zip(cases, got):
            self.assertRegex(shown, r"usage:", f"{typed!r} -> {shown!r}")
            self.assertRegex(shown, r"usage: \[?" + re.escape(cmd) + r"\b", f"{typed!r} -> {shown!r}")
        self.assertEqual(got[-1], ">>> [unknown command 'frobnicate' (type help)]")
        # Nothing went anywhere: c2 saw no message, c1 is still online and working.
        self.assertEqual(message_lines(self.c2), [])
        self.chat(c1, self.c2, "after the errors")

    def test_message_over_the_limit_refused_at_prompt(self):
        c1, c2 = self.c1, self.c2
        for text in ("x" * (LIMIT + 1), "\u00e9" * (LIMIT // 2) + "x", "y" * 5000):
            size = len(text.encode("utf-8"))
            with self.subTest(size=size):
                since = len(c2.lines)
                c1.send(f"send c2 {text}")
                line = c1.expect(r"^>>> ", timeout=5)
                self.assertEqual(line, f">>> [Error: message too long: {size} bytes, the limit is {LIMIT} bytes]")
                c1.send("send c2 short one")
                c2.expect(r"^>>> c1: ", timeout=5)
                self.assertEqual(message_lines(c2, since), [">>> c1: short one"],
                                 "something of the long message arrived")
                c1.expect_exact(">>> [Message received by c2.]", timeout=5)
        self.assertEqual(c1.seen(r"received by the server|sent to server"), [])

    def test_peer_left_silently_send_goes_to_server(self):
        c1, c2 = self.c1, self.c2
        c2.signal(signal.SIGINT)
        self.assertEqual(c2.wait_exit(timeout=PROMPT_EXIT), 0)
        c1.send("send c2 are you there?")
        # Nothing has sent to c2 since it left (no relay, no probe), so nobody marked it offline:
        # c1's table still shows it online and the direct send times out (SPEC §3).
        c1.expect_exact(">>> [No ACK from c2, message sent to server.]", timeout=5)
        c1.expect(SAVED, timeout=5)
        self.assertEqual(c1.seen(r"Message received by c2"), [])
        # The server found c2 silent and marked it offline.
        self.wait_row(c1, "c2", f"127.0.0.1:{c2.port}", "offline")
        # Now the local table says offline: straight to the server.
        c1.send("send c2 second")
        c1.expect_exact(">>> [c2 is offline, message sent to server.]", timeout=5)
        c1.expect(SAVED, timeout=5)
        self.assertServerAlive()


class LeavingTest(ChatBase):
    def leave_and_check_service(self, how):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        victim = self.start_client("c3")
        for c in (c1, c2, victim):
            self.wait_table(c, ["c1", "c2", "c3"])
        how(victim)
        t0 = time.monotonic()
        self.assertEqual(victim.wait_exit(timeout=PROMPT_EXIT), 0, victim.dump())
        self.assertLess(time.monotonic() - t0, PROMPT_EXIT)
        self.assertNoCrashText(victim)
        # The others keep chatting directly and the server keeps serving.
        self.chat(c1, c2, "still here?")
        self.chat(c2, c1, "yes")
        self.assertServerAlive()
        c4 = self.start_client("c4")
        self.chat(c4, c1, "new here")
        self.assertServerAlive()
        self.assertNoCrashText(self.server)

    def test_sigint_ends_client(self):
        self.leave_and_check_service(lambda p: p.signal(signal.SIGINT))

    def test_sighup_ends_client(self):
        self.leave_and_check_service(lambda p: p.signal(signal.SIGHUP))

    def test_stdin_eof_ends_client(self):
        self.leave_and_check_service(lambda p: p.close_stdin())

    def test_sigint_before_registration_completes(self):
        # A client told to leave while it is still waiting for the server's answer leaves at once too.
        # A bare UDP socket plays a server that never answers; its first datagram shows the client runs.
        mute = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(mute.close)
        mute.bind(("127.0.0.1", 0))
        mute.settimeout(5)
        c = Proc(["-c", "c1", "127.0.0.1", str(mute.getsockname()[1]), str(free_port()),
                  "--ack-timeout", "1000", "--retries", "10"], name="early")
        self.procs.append(c)
        mute.recvfrom(4096)  # the registration request has been sent
        c.signal(signal.SIGINT)
        self.assertEqual(c.wait_exit(timeout=PROMPT_EXIT), 0, c.dump())
        self.assertEqual(c.seen(re.escape(WELCOME)), [])
        self.assertNoCrashText(c)

    def server_stops_cleanly(self, sig):
        c1 = self.start_client("c1")
        self.wait_table(c1, ["c1"])
        self.server.signal(sig)
        self.assertEqual(self.server.wait_exit(timeout=PROMPT_EXIT), 0, self.server.dump())
        self.assertNoCrashText(self.server)

    def test_server_exits_cleanly_on_sigint(self):
        self.server_stops_cleanly(signal.SIGINT)

    def test_server_exits_cleanly_on_sigterm(self):
        self.server_stops_cleanly(signal.SIGTERM)


class BadDatagramTest(ChatBase):
    """SPEC 8: junk is dropped and counted (seen with -v), spoofed state changes are ignored."""

    server_args = FAST + ["-v"]

    K = bytes(range(32))
    REG = {"t": "register", "id": 3, "name": "x3", "key": K}
    # At most 20: the server logs at most 20 drops a second (a flood is summarised instead).
    JUNK = [
        b"",
        b"\x00" * 16,                                   # version 0
        b"not json at all",                              # not a version byte
        b"{}",                                           # version 1 (JSON), not even a request
        b"[1,2,3]",
        wire.encode(dict(REG, id=1, v=99)),              # a version from the future
        wire.header(12, 2),                              # an unknown type code
        wire.encode(REG)[:20],                           # truncated inside the key
        wire.encode(REG) + b"\x00",                      # one byte past the last field
        wire.encode(dict(REG, id=4, name="../evil"), strict=False),
        wire.encode(dict(REG, id=5, name="a/b"), strict=False),
        wire.encode(dict(REG, id=6, name=b"\xff\xfe"), strict=False),
        wire.encode(dict(REG, id=7, name="y" * 255), strict=False),
        wire.encode({"t": "save", "id": 8, "from": "x", "to": "../../evil", "mid": 1, "force": True,
                     "body": b"t"}, strict=False),
        wire.encode({"t": "save", "id": 9, "from": "x", "to": "y", "mid": 1, "force": 2, "body": b"t"},
                    strict=False),                       # a bool that is 2
        wire.encode({"t": "channel", "id": 10, "from": "x", "body": b"b" * 1400}, strict=False),  # body > 1024
        b"\x02" + b"[" * 4999,
        wire.encode(REG) + b"\x00" * 1500,               # over the largest datagram
        b"z" * 60000,
    ]

    def udp(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        return s

    def test_junk_to_server_is_dropped_and_logged(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        s = self.udp()
        me = s.getsockname()[1]
        for junk in self.JUNK:
            with self.subTest(junk=junk[:60]):
                s.sendto(junk, ("127.0.0.1", self.server_port))
                self.server.expect(rf"(?i)dropped .*127\.0\.0\.1:{me}\b", timeout=5)
                self.assertServerAlive()
        self.assertNoCrashText(self.server)
        # Nothing escaped the data directory, and the server still serves.
        for root, dirs, files in os.walk(os.path.dirname(self.dir)):
            self.assertFalse([f for f in files + dirs if "evil" in f], root)
            break
        for root, dirs, files in os.walk(self.dir):
            self.assertFalse([f for f in files + dirs if "evil" in f], (root, files, dirs))
        c3 = self.start_client("c3")
        self.wait_table(c3, ["c1", "c2", "c3"])
        self.chat(c1, c2, "after the junk")

    def test_junk_to_client_changes_nothing(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        s = self.udp()
        for junk in self.JUNK:
            s.sendto(junk, ("127.0.0.1", c1.port))
        # A spoofed table (not from the server's address) claiming c2 moved must not be applied.
        eve = wire.Identity()
        s.sendto(wire.encode({"t": "table", "id": 9, "recipient": "c1", "epoch": 1, "from": 0, "to": 99, "more": False, "entries": [
            {"name": "c2", "ip": "127.0.0.1", "port": 9, "online": True, "key": eve.pk},
            {"name": "mallory", "ip": "127.0.0.1", "port": 9, "online": True, "key": eve.pk}]}),
            ("127.0.0.1", c1.port))
        # Well-formed direct messages from this socket, sealed for c1 by a key of the forger's,
        # claim names whose table address is not this one (or that are not in the table at
        # all): dropped unanswered, never shown.
        c1_key = wire.Identity.load(self.identity_file("c1")).pk
        for mid, sender, text in ((10, "eve", "ping"), (11, "c2", "forged")):
            s.sendto(wire.encode({"t": "direct", "id": mid, "from": sender,
                                  "body": wire.seal_direct(eve, c1_key, mid, "c1", text)}),
                     ("127.0.0.1", c1.port))
        # The real c2, sent after the junk: once it is shown, everything above was handled.
        self.chat(c2, c1, "real")
        s.settimeout(0.2)
        with self.assertRaises(socket.timeout):
            s.recvfrom(4096)  # nothing was acknowledged to the forger
        rows = self.rows(c1)
        self.assertEqual(rows.get("c2"), (f"127.0.0.1:{c2.port}", "online"), rows)
        self.assertNotIn("mallory", rows)
        self.assertEqual(message_lines(c1), [">>> c2: real"])
        self.chat(c1, c2, "still direct")
        self.chat(c2, c1, "and back")
        self.assertIsNone(c1.proc.poll())

    def test_spoofed_dereg_from_another_address_is_ignored(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c2, ["c1", "c2"])
        s = self.udp()
        s.sendto(wire.encode({"t": "dereg", "id": 77, "name": "c1"}), ("127.0.0.1", self.server_port))
        reply, _ = s.recvfrom(4096)  # the server has handled it once it answers
        self.assertNotEqual(wire.decode(reply)["t"], "ack", reply)
        # A fresh client gets the server's table: c1 is still online at its own address.
        c3 = self.start_client("c3")
        rows = self.wait_table(c3, ["c1", "c2", "c3"])
        self.assertIn(f"127.0.0.1:{c1.port}", [r.split()[1] for r in rows if r.startswith("c1 ")])
        self.assertEqual(c1.seen(r"Offline"), [])
        self.chat(c2, c1, "you are still on")

    def test_version_1_register_gets_a_refusal_an_old_client_can_show(self):
        """A ChatApp 1.x client registering with this server shows the server's reason, which
        tells its user to upgrade: the answer is a version-1 JSON reg_err for its request."""
        s = self.udp()
        # As 1.x sent it: padded to 1200 bytes (the answer is never longer than the request).
        reg = {"t": "register", "id": 4242, "name": "oldie", "every": 15000}
        reg["pad"] = " " * (1200 - len(wire.v1_json(dict(reg, pad=""))))
        self.assertEqual(len(wire.v1_json(reg)), 1200)
        s.sendto(wire.v1_json(reg), ("127.0.0.1", self.server_port))
        reply, _ = s.recvfrom(4096)
        m = wire.decode_v1(reply)
        self.assertEqual((m.get("t"), m.get("re")), ("reg_err", 4242), reply)
        self.assertIn("upgrade ChatApp", m.get("reason", ""), reply)
        self.assertServerAlive()
        # Nothing was registered: a new client's table has no oldie.
        c1 = self.start_client("c1")
        rows = self.wait_table(c1, ["c1"])
        self.assertEqual([r for r in rows if r.split()[0] == "oldie"], [], rows)


if __name__ == "__main__":
    unittest.main()
