"""Sessions and keep-alives (SPEC §10), with real processes: a server that lost a client, lost
its data, restarted or stalled; `reg` of one's own name; `send` to a name the local table lacks;
end of input, `quit` and signals with requests in flight; a last line without a newline.

Every wait has a deadline. The bounds that the spec sets are checked with the keep-alive
interval KA (0.5 s on server and clients) and the harness's FAST ACK options (100 ms, 5 retries,
so a reliable send gives up after RETRY = 0.6 s), plus SLACK for two shared, busy cores.
The tests in NetnsLostClientTest and NetnsLookupTest need root (ip netns, iptables) and skip
without it.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import time
import unittest

from harness import DEADLINE, FAST, ChatTest, NetnsChatTest, udp_rx_queue

KA = 0.5          # seconds between keep-alives in the fast tests
LONG_KA = 60      # a keep-alive that never comes during a test
RETRY = 0.1 * 6   # FAST: 100 ms x 6 attempts
SLACK = float(os.environ.get("CHATAPP_SLACK", "1.5"))
# What the spec allows for noticing a change by keep-alive (3 intervals), plus one reliable send.
NOTICE = 3 * KA + RETRY + SLACK
PROMPT_EXIT = 3   # seconds: a client whose work is done must be gone within this

WELCOME = ">>> [Welcome, You are registered.]"
LOST = ">>> [The server lost track of you; registering again.]"
NOT_RESPONDING = ">>> [Server not responding]"
BACK = ">>> [Server is back.]"
ALREADY = ">>> [You are already registered.]"
HAVE = ">>> [You have messages]"
SAVED = ">>> [Messages received by the server and saved]"
UPDATED = ">>> [Client table updated.]"
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
# Any status line but a live channel message (those are messages, not answers to a command).
STATUS = r"^>>> \[(?!Channel_Message )"


def ka(seconds):
    return ["--keepalive", str(seconds)]


def exact(text):
    return "^" + re.escape(text) + "$"


def skip_to_end(proc):
    """What was printed so far is not looked at by the next `expect`."""
    with proc.cond:
        proc.cursor = len(proc.lines)


def next_status(proc, timeout=DEADLINE, ignore=(UPDATED,)):
    """The next status line (table-update notes skipped): the answer to the command just typed."""
    end = time.monotonic() + timeout
    for _ in range(10_000):
        line = proc.expect(STATUS, timeout=max(0.0, end - time.monotonic()))
        if line not in ignore:
            return line
    raise AssertionError(f"{proc.name}: only {ignore} lines:\n{proc.dump()}")


def left(end):
    """Seconds to `end` (a monotonic time), never negative."""
    return max(0.0, end - time.monotonic())


class SessionBase(ChatTest):
    names = ()

    def client(self, name, **kw):
        return self.start_client(name, extra=ka(KA), **kw)

    def clients_online(self):
        """Starts `names` and waits until each one's table shows all of them online."""
        cs = [self.client(n) for n in self.names]
        for c in cs:
            self.wait_table(c, list(self.names))
        return cs

    @contextlib.contextmanager
    def server_log(self):
        """A failure inside also shows the server's last lines."""
        try:
            yield
        except AssertionError as e:
            raise AssertionError(f"{e}\nserver:\n{self.server.dump()}") from None

    def restart_server(self, wipe):
        self.server.kill()  # SIGKILL: no goodbye, no last flush
        data = os.path.join(self.dir, "data")
        if wipe:
            shutil.rmtree(data)
            self.assertFalse(os.path.exists(data))
        self.server = self.start_server()

    def chat(self, a, b, text, timeout=DEADLINE):
        a.send(f"send {b.name} {text}")
        b.expect_exact(f">>> {a.name}: {text}", timeout=timeout)
        a.expect_exact(f">>> [Message received by {b.name}.]", timeout=timeout)

    def channel(self, sender, others, text, timeout=DEADLINE):
        sender.send(f"send_all {text}")
        sender.expect_exact(">>> [Message received by Server.]", timeout=timeout)
        for o in others:
            o.expect_exact(f">>> [Channel_Message {sender.name}: {text}]", timeout=timeout)


# ------------------------------------------------------------------ keep-alives (no root needed)


class KeepaliveTest(SessionBase):
    server_args = FAST + ka(KA)
    names = ("alice", "bob", "carol")

    # Test 2: SIGKILL, data directory deleted, restart on the same port: each of three
    # clients shows the lost-track line, then the welcome, without anything typed; then
    # direct chat and the channel work.
    def test_server_lost_its_data_every_client_registers_again_by_itself(self):
        alice, bob, carol = cs = self.clients_online()
        marks = {c.name: c.mark() for c in cs}
        with self.server_log():
            self.restart_server(wipe=True)
            end = time.monotonic() + NOTICE
            for c in cs:
                i = c.wait_seen(exact(LOST), since=marks[c.name], timeout=left(end))
                c.wait_seen(exact(WELCOME), since=i + 1, timeout=left(end) + RETRY)
            for c in cs:
                self.wait_table(c, list(self.names))
            for c in cs:
                self.assertEqual(c.count(exact(LOST), since=marks[c.name]), 1, c.dump())
                self.assertEqual(c.count(exact(WELCOME), since=marks[c.name]), 1, c.dump())
            for c in cs:
                skip_to_end(c)
            self.chat(alice, bob, "after-the-wipe")
            self.channel(carol, (alice, bob), "channel-after-the-wipe")

    # Test 3: SIGKILL and restart with the data directory kept: more than 3 intervals
    # later everyone is still (or again) online everywhere, with nothing typed; direct chat,
    # the channel and a newcomer work.
    def test_server_restarted_with_its_data_clients_keep_working(self):
        alice, bob, carol = cs = self.clients_online()
        with self.server_log():
            self.restart_server(wipe=False)
            time.sleep(4 * KA)  # idle past the restarted server's keep-alive timeout
            for c in cs:
                self.wait_table(c, list(self.names), timeout=NOTICE)
            for c in cs:
                skip_to_end(c)
            self.chat(bob, alice, "after-the-restart")
            self.chat(alice, bob, "and-back")
            self.channel(carol, (alice, bob), "channel-after-the-restart")
            dave = self.client("dave")
            self.wait_table(dave, list(self.names) + ["dave"])
            for c in cs:
                self.wait_table(c, list(self.names) + ["dave"])
            self.chat(dave, carol, "newcomer")

    # Test 4: the server SIGSTOPped for 6 intervals: each client shows 'Server not
    # responding' once (within 3 intervals), keeps running, and after SIGCONT 'Server is
    # back.'; then both are online everywhere and chat works.
    def test_server_stopped_client_says_not_responding_once_then_back(self):
        alice, bob = cs = [self.client("alice"), self.client("bob")]
        for c in cs:
            self.wait_table(c, ["alice", "bob"])
        marks = {c.name: c.mark() for c in cs}
        self.addCleanup(self.server.resume)
        with self.server_log():
            try:
                self.server.pause()
                end = time.monotonic() + NOTICE
                seen = {c.name: c.wait_seen(exact(NOT_RESPONDING), since=marks[c.name], timeout=left(end))
                        for c in cs}
                time.sleep(3 * KA)  # the stall goes on: the line must not come again
                for c in cs:
                    self.assertIsNone(c.proc.poll(), f"{c.name} exited while the server was stopped:\n{c.dump()}")
                    self.assertEqual(c.count(exact(NOT_RESPONDING), since=marks[c.name]), 1, c.dump())
            finally:
                self.server.resume()
            end = time.monotonic() + NOTICE
            for c in cs:
                c.wait_seen(exact(BACK), since=seen[c.name] + 1, timeout=left(end))
            for c in cs:
                self.wait_table(c, ["alice", "bob"], timeout=NOTICE)
            for c in cs:
                self.assertEqual(c.count(exact(NOT_RESPONDING), since=marks[c.name]), 1, c.dump())
                self.assertEqual(c.count(exact(BACK), since=marks[c.name]), 1, c.dump())
                self.assertEqual(c.count(r"^>>> \[Exiting\]$", since=marks[c.name]), 0, c.dump())
                skip_to_end(c)
            self.chat(alice, bob, "after-the-stall")
            self.channel(bob, (alice,), "channel-after-the-stall")

    # Test 10: idle for 6 intervals nobody changes (keep-alives keep live clients online);
    # bob SIGKILLed, then with nothing sent the others' tables show bob offline within 3
    # intervals + margin.
    def test_server_marks_silent_client_offline_after_three_intervals(self):
        alice, bob, carol = cs = self.clients_online()
        marks = {c.name: c.mark() for c in cs}
        with self.server_log():
            time.sleep(6 * KA)  # idle: only keep-alives go back and forth
            for c in cs:
                self.wait_table(c, list(self.names), timeout=1)
                for line in (UPDATED, LOST, NOT_RESPONDING):
                    self.assertEqual(c.count(exact(line), since=marks[c.name]), 0,
                                     f"{c.name} showed {line!r} while everyone was idle and alive:\n{c.dump()}")
            bob.kill()
            end = time.monotonic() + 3 * KA + SLACK
            self.wait_table(alice, ["alice", "carol"], timeout=left(end))
            self.wait_table(carol, ["alice", "carol"], timeout=left(end))


# ------------------------------------------------------------------ reg and send lookups


class RegTest(SessionBase):
    # Test 5, first half: `reg <own name>` while registered: exactly 'already registered'.
    def test_reg_own_name_while_registered_is_already_registered(self):
        alice = self.start_client("alice")
        self.wait_table(alice, ["alice"])
        mark = alice.mark()
        skip_to_end(alice)
        alice.send("reg alice")
        self.assertEqual(next_status(alice), ALREADY)
        self.assertEqual(alice.count(exact(WELCOME), since=mark), 0, alice.dump())
        bob = self.start_client("bob")
        self.wait_table(alice, ["alice", "bob"])
        self.chat(bob, alice, "still-registered")

    # `reg <own name>` always asks the server: with the server stopped, the request reaches
    # its socket and 'already registered' waits for the server's answer.
    def test_reg_own_name_asks_the_server(self):
        slow = ["--ack-timeout", "1000", "--retries", "5"]  # the answer may take a while: SIGCONT first
        alice = self.start_client("alice", timing=slow, extra=ka(LONG_KA))
        self.wait_table(alice, ["alice"])
        self.addCleanup(self.server.resume)
        mark = alice.mark()
        skip_to_end(alice)
        try:
            self.server.pause()
            base = udp_rx_queue(self.server_port)
            alice.send("reg alice")
            end = time.monotonic() + DEADLINE
            for _ in range(int(DEADLINE / 0.01)):
                if udp_rx_queue(self.server_port) != base:
                    break
                if alice.count(exact(ALREADY), since=mark):
                    self.fail("'already registered' while the server was stopped: nobody confirmed it\n"
                              + alice.dump())
                if time.monotonic() > end:
                    break
                time.sleep(0.01)  # polling the server's socket queue, not synchronising on output
            if udp_rx_queue(self.server_port) == base:
                self.fail("`reg alice` sent nothing to the server\n" + alice.dump())
            self.assertEqual(alice.count(exact(ALREADY), since=mark), 0, alice.dump())
        finally:
            self.server.resume()
        self.assertEqual(next_status(alice), ALREADY)

    # Test 5, second half: the server restarted with a wiped data directory; `reg <own name>`
    # typed before the next keep-alive registers again ('Welcome', not 'already registered').
    def test_reg_after_server_lost_its_data_registers_again(self):
        alice = self.start_client("alice", extra=ka(LONG_KA))
        self.wait_table(alice, ["alice"])
        with self.server_log():
            self.restart_server(wipe=True)
            mark = alice.mark()
            skip_to_end(alice)
            alice.send("reg alice")
            # Learning from the server that it has no session, it may say so first.
            self.assertEqual(next_status(alice, ignore=(UPDATED, LOST)), WELCOME)
            self.assertEqual(alice.count(exact(ALREADY), since=mark), 0, alice.dump())
            bob = self.start_client("bob", extra=ka(LONG_KA))
            self.wait_table(bob, ["alice", "bob"])
            self.wait_table(alice, ["alice", "bob"])
            self.chat(bob, alice, "you-are-back")
            self.chat(alice, bob, "yes")

    # Test 9 as a race: carol registers right after alice's welcome and alice types
    # `send carol hello` at once: 'Message received by carol.', never 'unknown client'.
    # (NetnsLookupTest makes the missing row certain; here the table update may win.)
    def test_send_right_after_the_peer_registered_reaches_it(self):
        self.start_client("bob")
        alice = self.start_client("alice", extra=ka(LONG_KA))
        carol = self.start_client("carol")
        alice.send("send carol hello")
        self.assertEqual(next_status(alice), ">>> [Message received by carol.]")
        carol.expect_exact(">>> alice: hello")

    # Test 9, second half: a name neither the table nor the server knows: exactly the error.
    def test_send_to_a_name_nobody_knows_is_an_error(self):
        alice = self.start_client("alice")
        bob = self.start_client("bob")
        self.wait_table(alice, ["alice", "bob"])
        skip_to_end(alice)
        alice.send("send nobody x")
        self.assertEqual(next_status(alice), ">>> [Error: unknown client nobody; type list to see the table]")
        self.chat(alice, bob, "after-the-error")


# ------------------------------------------------------------------ end of input, quit, signals


class EndOfInputTest(SessionBase):
    def piped_client(self, name, data):
        """A client whose stdin is exactly `data` (bytes), closed right after, as `printf ... |`."""
        c = self.start_client(name, wait=False)
        c.send_raw(data)
        c.close_stdin()
        return c

    # Test 6: stdin is `send bob hi` with no newline, then closed: bob shows it, alice shows
    # 'Message received by bob.' and exits 0.
    def test_last_line_without_newline_is_sent(self):
        bob = self.start_client("bob")
        self.wait_table(bob, ["bob"])
        alice = self.piped_client("alice", b"send bob hi")
        alice.expect_exact(WELCOME)
        bob.expect_exact(">>> alice: hi")
        alice.expect_exact(">>> [Message received by bob.]")
        self.assertEqual(alice.wait_exit(timeout=PROMPT_EXIT), 0, alice.dump())
        self.assertEqual(bob.count(r"^>>> alice: hi$"), 1, bob.dump())

    # Test 7: `printf 'send bob hi\n' | ChatApp -c dave ...` from a dave bob has never
    # seen: bob shows it, dave shows 'Message received by bob.' and exits 0.
    def test_piped_line_from_a_newcomer_is_sent_before_exit(self):
        bob = self.start_client("bob")
        self.wait_table(bob, ["bob"])
        dave = self.piped_client("dave", b"send bob hi\n")
        dave.expect_exact(WELCOME)
        bob.expect_exact(">>> dave: hi")
        dave.expect_exact(">>> [Message received by bob.]")
        self.assertEqual(dave.wait_exit(timeout=PROMPT_EXIT), 0, dave.dump())

    def finish_fallback_then_exit(self, text, end_input):
        """alice sends `text` to bob, who left silently (his row is still online), and at once
        ends her input with `end_input(alice)`: she still shows 'No ACK', then 'saved', then
        exits 0; bob, started again, gets the message."""
        alice = self.start_client("alice")
        bob = self.start_client("bob")
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob"])
        bob.signal(signal.SIGINT)
        self.assertEqual(bob.wait_exit(timeout=PROMPT_EXIT), 0, bob.dump())
        self.wait_table(alice, ["alice", "bob"])  # a silent leave: bob's row is still online
        skip_to_end(alice)
        alice.send("send bob " + text)
        end_input(alice)
        with self.server_log():
            alice.expect_exact(">>> [No ACK from bob, message sent to server.]")
            alice.expect_exact(SAVED)
            self.assertEqual(alice.wait_exit(timeout=PROMPT_EXIT), 0, alice.dump())
            again = self.start_client("bob")
            again.expect_exact(HAVE)
            again.expect(rf"^>>> alice: {TS} {re.escape(text)}$")

    # Test 8: stdin closed right after the send.
    def test_end_of_input_finishes_the_fallback_to_the_server(self):
        self.finish_fallback_then_exit("are-you-there", lambda alice: alice.close_stdin())

    # `quit` right after the send (stdin stays open).
    def test_quit_finishes_the_fallback_to_the_server(self):
        self.finish_fallback_then_exit("before-quit", lambda alice: alice.send("quit"))

    def leave_with_request_in_flight(self, sig):
        """A peer that never answers (a bare socket on bob's port, bob gone silently); alice's
        send to it is on the wire when `sig` comes: alice exits 0 at once, no fallback shown."""
        slow = ["--ack-timeout", "2000", "--retries", "5"]  # the request stays in flight for 12 s
        alice = self.start_client("alice", timing=slow)
        bob = self.start_client("bob")
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob"])
        bob.signal(signal.SIGINT)
        self.assertEqual(bob.wait_exit(timeout=PROMPT_EXIT), 0, bob.dump())
        mute = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(mute.close)
        mute.bind(("127.0.0.1", bob.port))
        mute.settimeout(DEADLINE)
        alice.send("send bob into-the-void")
        mute.recvfrom(4096)  # the direct message is on its way: a request in flight
        t0 = time.monotonic()
        alice.signal(sig)
        self.assertEqual(alice.wait_exit(timeout=PROMPT_EXIT), 0, alice.dump())
        self.assertLess(time.monotonic() - t0, 1.5, "did not leave at once")
        self.assertEqual(alice.seen(r"No ACK from|sent to server|received by"), [], alice.dump())

    def test_sigint_leaves_at_once_with_a_request_in_flight(self):
        self.leave_with_request_in_flight(signal.SIGINT)

    def test_sighup_leaves_at_once_with_a_request_in_flight(self):
        self.leave_with_request_in_flight(signal.SIGHUP)


# ------------------------------------------------------------------ in a network namespace (root)


def rows_of(client):
    """Types `list` once; {name: (address, status)}."""
    client.send("list")
    client.expect("^NAME +ADDRESS")
    rows = {}
    for _ in range(100_000):
        line = client.expect(".")
        if re.match(r"^\(\d+ clients, \d+ online\)$", line):
            return rows
        f = line.split()
        rows[f[0]] = (f[1], f[2])
    raise AssertionError(f"{client.name}: `list` never ended:\n{client.dump()}")


class NetnsLostClientTest(NetnsChatTest, SessionBase):
    server_args = FAST + ka(KA)
    names = ("alice", "bob", "carol")

    # Test 1: everything from the server to bob is dropped while a channel message is
    # relayed (the server marks bob offline and saves it for him) and for longer than the
    # server's retries and 3 keep-alive intervals after that. Once the rule is gone, within
    # 3 intervals + the retry budget (+ SLACK), bob is online in every table, has the saved
    # channel message, once, and gets a direct message.
    def test_server_loses_a_client_and_gets_it_back(self):
        alice, bob, carol = self.clients_online()
        cut = ["OUTPUT", "-p", "udp", "--sport", str(self.server_port), "--dport", str(bob.port), "-j", "DROP"]
        mark = bob.mark()
        with self.server_log():
            self.iptables("-A", *cut)
            self.channel(alice, (carol,), "while-you-were-cut-off")
            self.wait_table(alice, ["alice", "carol"])  # the server lost bob
            self.wait_table(carol, ["alice", "carol"])
            time.sleep(RETRY + 3 * KA + 0.5)  # the cut goes on (its duration, not a synchronisation)
            self.assertIsNone(bob.proc.poll(), f"bob exited while cut off:\n{bob.dump()}")
            self.iptables("-D", *cut)
            end = time.monotonic() + NOTICE
            for c in (bob, alice, carol):
                self.wait_table(c, list(self.names), timeout=left(end))
            bob.wait_seen(rf"^>>> Channel_Message alice: {TS} while-you-were-cut-off$", since=mark,
                          timeout=left(end))
            skip_to_end(bob)
            alice.send("send bob welcome-back")
            bob.expect_exact(">>> alice: welcome-back", timeout=left(end))
            alice.expect_exact(">>> [Message received by bob.]", timeout=left(end))
            self.assertEqual(bob.count("while-you-were-cut-off", since=mark), 1, bob.dump())
            self.assertIsNone(bob.proc.poll(), bob.dump())


class NetnsLookupTest(NetnsChatTest, SessionBase):
    server_args = FAST + ka(LONG_KA)

    # Test 9, made certain: the table update announcing carol never reaches alice (dropped
    # until the server gave up on it), alice's next keep-alive is a minute away; `send carol
    # hello` must ask the server for carol's row: 'Message received by carol.'. And
    # `send nobody x` is exactly the unknown-client error.
    def test_send_to_a_name_missing_from_the_local_table_asks_the_server(self):
        bob = self.start_client("bob", extra=ka(LONG_KA))
        alice = self.start_client("alice", extra=ka(LONG_KA))
        for c in (alice, bob):
            self.wait_table(c, ["alice", "bob"])
        sport, dport = self.server_port, alice.port
        cut = ["OUTPUT", "-p", "udp", "--sport", str(sport), "--dport", str(dport), "-j", "DROP"]
        with self.server_log():
            self.iptables("-A", *cut)
            carol = self.start_client("carol", extra=ka(LONG_KA))
            # Until the server has given up on alice's copy of the change: dropped at least once,
            # then nothing more for 1 s (10 ACK timeouts; FAST gives up after 0.6 s).
            end = time.monotonic() + DEADLINE
            count, since = self.dropped("OUTPUT", sport, dport), time.monotonic()
            for _ in range(int(DEADLINE / 0.05)):
                if count > 0 and time.monotonic() - since >= 1.0 or time.monotonic() > end:
                    break
                time.sleep(0.05)  # polling the rule's counter, not synchronising on output
                now = self.dropped("OUTPUT", sport, dport)
                if now != count:
                    count, since = now, time.monotonic()
            if count == 0 or time.monotonic() - since < 1.0:
                self.fail(f"the server sent alice nothing, or never stopped ({count} datagrams dropped)")
            self.iptables("-D", *cut)
            rows = rows_of(alice)
            if "carol" in rows:
                self.skipTest("the server sent alice's table again by itself; no row is missing")
            skip_to_end(alice)
            alice.send("send carol hello")
            self.assertEqual(next_status(alice), ">>> [Message received by carol.]")
            carol.expect_exact(">>> alice: hello")
            alice.send("send nobody x")
            self.assertEqual(next_status(alice), ">>> [Error: unknown client nobody; type list to see the table]")


if __name__ == "__main__":
    unittest.main()
