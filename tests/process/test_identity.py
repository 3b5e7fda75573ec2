"""Identity and encryption (SPEC §11), with real processes: a name bound to its key (takeover
refused, online or offline; the operator's --release-name), what the server stores (ciphertext
only), forged channel messages, fingerprints, block/unblock, key-change warnings and the
identity file's permissions.

Every status line is matched whole (expect_exact). Every wait has a deadline; where something
must *not* be shown, a later message on the same path is the marker that everything before it
has been handled.
"""
import os
import re
import signal
import stat
import subprocess
import time
import unittest

import wire
from harness import BIN, DEADLINE, FAST, ChatTest
from test_torture import Pool, Sim, new_id

KA = 0.5  # seconds between keep-alives: a client that quit is marked offline within ~3 of them
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
WELCOME = ">>> [Welcome, You are registered.]"
UPDATED = ">>> [Client table updated.]"
SAVED = ">>> [Messages received by the server and saved]"
HAVE = ">>> [You have messages]"
FINGERPRINT = r"\d{5} \d{5} \d{5} \d{5} \d{5} \d{5}"
STATUS = r"^>>> \[(?!Channel_Message )"


def ka(seconds=KA):
    return ["--keepalive", str(seconds)]


def exact(text):
    return "^" + re.escape(text) + "$"


def skip_to_end(proc):
    """What was printed so far is not looked at by the next `expect`."""
    with proc.cond:
        proc.cursor = len(proc.lines)


def next_status(proc, timeout=DEADLINE, ignore=(UPDATED,)):
    """The next status line, table-update notes skipped: the answer to the command just typed."""
    end = time.monotonic() + timeout
    for _ in range(10_000):
        line = proc.expect(STATUS, timeout=max(0.0, end - time.monotonic()))
        if line not in ignore:
            return line
    raise AssertionError(f"{proc.name}: only {ignore} lines:\n{proc.dump()}")


def all_output(proc, until, timeout=DEADLINE):
    """stdout and stderr lines of `proc`, once `until(lines)` holds (or at the deadline)."""
    with proc.cond:
        proc.cond.wait_for(lambda: until(proc.lines + proc.err_lines), timeout)
        return proc.lines + proc.err_lines


def wait_eof(proc, timeout=DEADLINE):
    """Waits until the process's stdout has ended (every line it printed has been read)."""
    with proc.cond:
        if not proc.cond.wait_for(lambda: proc.eof, timeout):
            raise AssertionError(f"{proc.name}: output never ended:\n{proc.dump()}")


class IdentityTest(ChatTest):
    server_args = FAST + ka()

    def client(self, name, extra=(), **kw):
        return self.start_client(name, extra=ka() + list(extra), **kw)

    def quit(self, c):
        c.send("quit")
        self.assertEqual(c.wait_exit(), 0, c.dump())

    def chat(self, a, b, text):
        a.send(f"send {b.name} {text}")
        b.expect_exact(f">>> {a.name}: {text}")
        a.expect_exact(f">>> [Message received by {b.name}.]")

    # ------------------------------------------------------------------ takeover

    def test_takeover_refused_while_the_owner_is_offline(self):
        """alice quits; bob writes to her and is told the server saved it. Someone else starts
        `ChatApp -c alice` with another identity file: they see `[Registration refused: the
        name alice belongs to another identity]`, the program ends with status 1 and they
        never see bob's message. The real alice starts again: `[You have messages]` and bob's
        message with its timestamp, once; started once more, she gets nothing again."""
        alice = self.client("alice")
        bob = self.client("bob")
        self.wait_table(bob, ["alice", "bob"])
        self.quit(alice)
        self.wait_table(bob, ["bob"])  # the server found her gone and told bob
        secret = "secret: the password is hunter2"
        bob.send(f"send alice {secret}")
        bob.expect_exact(">>> [alice is offline, message sent to server.]")
        bob.expect_exact(SAVED)

        other = os.path.join(self.dir, "impostor.key")
        self.assertFalse(os.path.exists(other))
        impostor = self.client("alice", extra=["--identity", other], wait=False)
        impostor.name = "impostor"
        impostor.expect_exact(">>> [Registration refused: the name alice belongs to another identity]")
        self.assertEqual(impostor.wait_exit(), 1, impostor.dump())
        wait_eof(impostor)
        self.assertEqual(impostor.seen("hunter2"), [], impostor.dump())
        self.assertEqual(impostor.seen(exact(WELCOME)), [], impostor.dump())
        self.assertEqual(impostor.seen(exact(HAVE)), [], impostor.dump())

        again = self.client("alice")  # the same XDG_DATA_HOME: her own key file
        again.expect_exact(HAVE)
        again.expect(rf"^>>> bob: {TS} {re.escape(secret)}$")
        # bob's next message, direct, is the marker: nothing saved can still be on its way.
        self.wait_table(bob, ["alice", "bob"])
        self.chat(bob, again, "marker-one")
        self.assertEqual(again.count("hunter2"), 1, again.dump())
        self.quit(again)
        self.wait_table(bob, ["bob"])

        third = self.client("alice")
        self.wait_table(bob, ["alice", "bob"])
        self.chat(bob, third, "marker-two")
        self.assertEqual(third.seen("hunter2"), [], third.dump())
        self.assertEqual(third.seen(exact(HAVE)), [], third.dump())
        self.assertEqual(again.count("hunter2") + third.count("hunter2"), 1)

    # ------------------------------------------------------------------ what the server stores

    def test_server_database_never_holds_the_text_of_a_saved_message(self):
        """bob writes to alice while she is offline and sees the server saved it. The server's
        database files (chat.db, its -wal and -shm) hold only ciphertext: the text is in none
        of their bytes, while the server runs and after it stopped. alice then gets the message."""
        alice = self.client("alice")
        bob = self.client("bob")
        self.wait_table(bob, ["alice", "bob"])
        alice.send("dereg alice")
        alice.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(bob, ["bob"])
        text = "the vault code is 8472-zebra-quartz"
        bob.send(f"send alice {text}")
        bob.expect_exact(">>> [alice is offline, message sent to server.]")
        bob.expect_exact(SAVED)

        needles = [text.encode(), b"8472-zebra-quartz", text.encode("utf-16-le")]

        def check(when):
            files = self.db_files()
            self.assertIn(os.path.join(self.data_dir, "chat.db"), files, f"{when}: no chat.db")
            every = [os.path.join(root, f) for root, _, fs in os.walk(self.data_dir) for f in fs]
            for path in sorted(set(files + every)):
                with open(path, "rb") as f:
                    raw = f.read()
                for n in needles:
                    self.assertNotIn(n, raw, f"{when}: {path} holds the text of a saved message")

        check("server running")
        self.server.signal(signal.SIGTERM)
        self.assertEqual(self.server.wait_exit(), 0, self.server.dump())
        check("server stopped")

        self.server = self.start_server()
        alice.send("reg alice")
        alice.expect_exact(WELCOME)
        alice.expect_exact(HAVE)
        alice.expect(rf"^>>> bob: {TS} {re.escape(text)}$")

    # ------------------------------------------------------------------ forged channel messages

    def test_forged_channel_message_is_never_shown(self):
        """mallory, a registered client, sends channel messages whose signature does not hold
        (signed with another key; a byte of the text changed after signing). alice and bob
        never show them; mallory's next, correctly signed, message is shown by both."""
        alice = self.client("alice")
        bob = self.client("bob")
        mallory = Sim("mallory", ("127.0.0.1", self.server_port))
        pool = Pool([mallory]).start()
        self.addCleanup(pool.stop)
        reply = mallory.register()
        self.assertEqual(reply and reply["t"], "reg_ok", reply)
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob", "mallory"])  # they hold mallory's key

        other = wire.Identity()
        mid1 = new_id()
        wrong_key = wire.sign_channel(other, "mallory", mid1, "forged-by-another-key")
        mid2 = new_id()
        flipped = bytearray(wire.sign_channel(mallory.identity, "mallory", mid2, "forged-after-signing"))
        flipped[-1] ^= 0x01  # "forged-after-signinf": the signature no longer holds
        for mid, body in ((mid1, wrong_key), (mid2, bytes(flipped))):
            # The server may relay it (recipients verify) or drop it: only what users see counts.
            mallory.request({"t": "channel", "id": mid, "from": "mallory", "body": body}, deadline=2)

        mid3 = new_id()
        good = wire.sign_channel(mallory.identity, "mallory", mid3, "genuine")
        ack = mallory.request({"t": "channel", "id": mid3, "from": "mallory", "body": good})
        self.assertEqual(ack and ack["t"], "ack", ack)
        for c in (alice, bob):
            c.expect_exact(">>> [Channel_Message mallory: genuine]")
        for c in (alice, bob):
            self.assertEqual(c.seen("forged"), [], c.dump())
            self.assertEqual(c.count(r"^>>> \[Channel_Message mallory: "), 1, c.dump())

    # ------------------------------------------------------------------ fingerprints

    def test_fingerprint_is_the_same_on_both_machines(self):
        """alice types `fingerprint` and reads six groups of five digits; bob types
        `fingerprint alice` and reads the same digits. After `verify alice` bob sees
        `[You marked alice's fingerprint verified.]`, and `fingerprint alice` ends in `(verified)`."""
        alice = self.client("alice")
        bob = self.client("bob")
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob"])
        skip_to_end(alice)
        alice.send("fingerprint")
        line = next_status(alice)
        m = re.fullmatch(rf">>> \[Your fingerprint: ({FINGERPRINT})\]", line)
        self.assertIsNotNone(m, line)
        digits = m.group(1)

        skip_to_end(bob)
        bob.send("fingerprint alice")
        self.assertEqual(next_status(bob), f">>> [Fingerprint of alice: {digits}]")
        bob.send("fingerprint")
        mine = re.fullmatch(rf">>> \[Your fingerprint: ({FINGERPRINT})\]", next_status(bob))
        self.assertIsNotNone(mine, bob.dump())
        self.assertNotEqual(mine.group(1), digits, "two identities with one fingerprint")
        alice.send("fingerprint bob")
        self.assertEqual(next_status(alice), f">>> [Fingerprint of bob: {mine.group(1)}]")

        bob.send("verify alice")
        self.assertEqual(next_status(bob), ">>> [You marked alice's fingerprint verified.]")
        bob.send("fingerprint alice")
        self.assertEqual(next_status(bob), f">>> [Fingerprint of alice: {digits} (verified)]")
        alice.send("fingerprint")
        self.assertEqual(next_status(alice), f">>> [Your fingerprint: {digits}]")

    # ------------------------------------------------------------------ block / unblock

    def test_block_and_unblock(self):
        """bob blocks alice: `[alice is blocked.]`, `blocked` lists her. What she sends him,
        direct or to the channel, is not shown (carol's later messages are); bob sending to
        her is refused with how to undo it. After `unblock alice` her messages show again and
        `blocked` says nobody is."""
        alice = self.client("alice")
        bob = self.client("bob")
        carol = self.client("carol")
        for c in (alice, bob, carol):
            self.wait_table(c, ["alice", "bob", "carol"])
        skip_to_end(bob)
        bob.send("block alice")
        self.assertEqual(next_status(bob), ">>> [alice is blocked.]")
        bob.send("blocked")
        self.assertEqual(next_status(bob), ">>> [Blocked: alice]")

        skip_to_end(alice)
        alice.send("send bob hi")
        next_status(alice)  # whatever she is told, her send is over (bob's answer is not the point)
        self.chat(carol, bob, "marker-direct")
        alice.send("send_all blocked-channel")
        alice.expect_exact(">>> [Message received by Server.]")
        carol.expect_exact(">>> [Channel_Message alice: blocked-channel]")
        carol.send("send_all marker-channel")
        bob.expect_exact(">>> [Channel_Message carol: marker-channel]")
        carol.expect_exact(">>> [Message received by Server.]")

        skip_to_end(bob)
        bob.send("send alice x")
        self.assertEqual(next_status(bob), ">>> [Error: you blocked alice; type unblock alice to send to them]")
        before_unblock = bob.mark()
        bob.send("unblock alice")
        self.assertEqual(next_status(bob), ">>> [alice is unblocked.]")
        self.assertEqual([l for l in bob.lines[:before_unblock] if re.match(r"^>>> alice: ", l)], [], bob.dump())
        self.assertEqual([l for l in bob.lines[:before_unblock] if "blocked-channel" in l], [], bob.dump())

        skip_to_end(alice)
        alice.send("send bob hello again")
        bob.expect_exact(">>> alice: hello again")
        alice.expect_exact(">>> [Message received by bob.]")
        bob.send("blocked")
        self.assertEqual(next_status(bob), ">>> [Nobody is blocked.]")
        self.assertEqual(alice.seen(r"^>>> bob: x$"), [], alice.dump())

    # ------------------------------------------------------------------ key change

    def test_key_change_warns_and_waits_for_trust(self):
        """alice and bob have chatted. alice leaves; the operator releases her name
        (`ChatApp --data-dir <dir> --release-name alice`, server stopped) and a new alice
        with a new key registers. bob sees `[Warning: the identity of alice changed. Compare
        fingerprints, then type trust alice]`; sending to her is refused with the same line
        until `trust alice` (`[You now trust the new identity of alice.]`); then it arrives."""
        alice = self.client("alice")
        bob = self.client("bob")
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob"])
        self.chat(bob, alice, "hello")  # bob has pinned alice's first key
        self.quit(alice)

        self.server.signal(signal.SIGTERM)
        self.assertEqual(self.server.wait_exit(), 0, self.server.dump())
        r = subprocess.run([BIN, "--data-dir", self.data_dir, "--release-name", "alice"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
        out = (r.stdout + r.stderr).decode("utf-8", "replace")
        self.assertEqual(r.returncode, 0, out)
        self.assertTrue([l for l in out.splitlines() if re.search(r"\balice\b", l)], out)
        self.server = self.start_server()

        warning = ">>> [Warning: the identity of alice changed. Compare fingerprints, then type trust alice]"
        mark = bob.mark()
        new_key = os.path.join(self.dir, "alice-new.key")
        alice2 = self.client("alice", extra=["--identity", new_key])
        self.assertNotEqual(wire.Identity.load(new_key).pk, wire.Identity.load(self.identity_file("alice")).pk)
        bob.wait_seen(exact(warning), since=mark)
        skip_to_end(bob)
        bob.send("send alice hi")
        self.assertEqual(next_status(bob), warning)
        self.assertEqual(alice2.seen(r"^>>> bob: "), [], alice2.dump())
        bob.send("trust alice")
        self.assertEqual(next_status(bob), ">>> [You now trust the new identity of alice.]")
        bob.send("send alice hi")
        self.assertEqual(next_status(bob), ">>> [Message received by alice.]")
        alice2.expect_exact(">>> bob: hi")
        self.assertEqual(alice2.count(r"^>>> bob: hi$"), 1, alice2.dump())
        bob.send("trust alice")
        self.assertEqual(next_status(bob), ">>> [The identity of alice has not changed.]")

    # ------------------------------------------------------------------ the identity file

    def test_identity_file_readable_by_others_is_refused(self):
        """carol's key file made readable by others (chmod 0644): ChatApp will not use it. It
        prints a line with the file's path and `chmod 600`, exits non-zero, and nothing is
        registered (carol stays offline in dave's table)."""
        carol = self.client("carol")
        path = self.identity_file("carol")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        carol.send("dereg carol")
        carol.expect_exact(">>> [You are Offline. Bye.]")
        self.quit(carol)

        os.chmod(path, 0o644)
        again = self.client("carol", wait=False)
        code = again.wait_exit()
        self.assertGreater(code, 0, again.dump())

        def told(lines):
            return any(path in l and "chmod 600" in l for l in lines)

        lines = all_output(again, told)
        self.assertTrue(told(lines), f"no line with {path} and 'chmod 600':\n" + "\n".join(lines))
        self.assertEqual(again.seen(exact(WELCOME)), [], again.dump())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644, "the file was changed behind the user")
        dave = self.client("dave")
        rows = self.wait_table(dave, ["dave"])
        self.assertEqual([r.split()[2] for r in rows if r.split()[0] == "carol"], ["offline"], rows)


if __name__ == "__main__":
    unittest.main()
