"""Several servers sharing one PostgreSQL (SPEC §13), with real processes.

Each test gets a fresh database in the throwaway cluster the ctest fixture started
(scripts/pg, CHATAPP_PG_DIR); the database-restart test starts a cluster of its own, so that
restarting it cannot disturb tests running beside it."""
import hashlib
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import unittest
import urllib.request

from harness import BIN, DEADLINE, FAST, Proc, free_port, free_tcp_port, restore_env, wait_table

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PG = os.path.join(ROOT, "scripts", "pg")
WELCOME = ">>> [Welcome, You are registered.]"
SAVED = ">>> [Messages received by the server and saved]"
REFUSED = ">>> [Server refused the message: the server could not save the message]"
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
# Clients tell their server they are there every 2 s: one that stops answering is given up
# on after 6 s (short enough for the tests, long enough that a busy machine's slow answer is
# not taken for a dead server). The same interval for the servers' sessions.
KEEPALIVE = ["--keepalive", "2"]


def pg(*args):
    r = subprocess.run([PG] + list(args), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"scripts/pg {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


class Servers(unittest.TestCase):
    """Starts servers on one fresh database; clients name their server and the others as fallbacks."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chatapp-servers-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        xdg = os.path.join(self.dir, "xdg-data")
        os.makedirs(xdg, mode=0o700)
        old = os.environ.get("XDG_DATA_HOME")
        os.environ["XDG_DATA_HOME"] = xdg
        self.addCleanup(restore_env, "XDG_DATA_HOME", old)
        self.procs = []
        self.addCleanup(self._kill_all)
        self.uri = self.database()
        self.ports = []

    def database(self):
        cluster = os.environ.get("CHATAPP_PG_DIR")
        if not cluster:
            self.fail("CHATAPP_PG_DIR is not set: run this test through ctest (its pg fixture starts the cluster)")
        return pg("newdb", cluster)

    def _kill_all(self):
        for p in self.procs:
            p.close()

    def start_server(self, i, uri=None):
        """Server `i` (0-based) on its own port, on the shared database."""
        while len(self.ports) <= i:
            self.ports.append(free_port())
        s = Proc(["-s", str(self.ports[i]), "--store", uri or self.uri] + FAST + KEEPALIVE,
                 name=f"server{i}", merge_stderr=True)
        self.procs.append(s)
        s.expect("server listening")
        return s

    def start_client(self, name, home, wait=True, env=None, extra=()):
        """A client of server `home` with every other server as a fallback, in order."""
        fallbacks = []
        for i, port in enumerate(self.ports):
            if i != home:
                fallbacks += ["--fallback", f"127.0.0.1:{port}"]
        c = Proc(["-c", name, "127.0.0.1", str(self.ports[home]), str(free_port())] + FAST + KEEPALIVE + fallbacks
                 + list(extra), name=name, env=env)
        self.procs.append(c)
        if wait:
            c.expect_exact(WELCOME)
        return c

    def wait_table(self, client, names_online, timeout=DEADLINE):
        return wait_table(client, names_online, timeout)

    def sql(self, query):
        """One value from the shared database (psql, from Debian's postgresql-client)."""
        r = subprocess.run(["psql", self.uri, "-Atc", query], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"psql failed: {r.stderr}")
        return r.stdout.strip()

    def wait_count(self, proc, pattern, n, timeout=DEADLINE):
        """Waits until `n` lines so far match `pattern` (bounded)."""
        i = 0
        for _ in range(n):
            i = proc.wait_seen(pattern, since=i, timeout=timeout) + 1


class ServersTest(Servers):

    def test_clients_of_two_servers_see_each_other_and_chat_directly(self):
        self.start_server(0)
        self.start_server(1)
        alice = self.start_client("alice", 0)
        bob = self.start_client("bob", 1)
        self.wait_table(alice, ["alice", "bob"])
        self.wait_table(bob, ["alice", "bob"])
        alice.send("send bob hello from server 0")
        alice.expect_exact(">>> [Message received by bob.]")
        bob.expect_exact(">>> alice: hello from server 0")
        bob.send("send alice hello from server 1")
        bob.expect_exact(">>> [Message received by alice.]")
        alice.expect_exact(">>> bob: hello from server 1")

    def test_send_all_reaches_the_clients_of_every_server_once(self):
        for i in range(3):
            self.start_server(i)
        alice = self.start_client("alice", 0)
        bob = self.start_client("bob", 1)
        carol = self.start_client("carol", 2)
        for c in (alice, bob, carol):
            self.wait_table(c, ["alice", "bob", "carol"])
        alice.send("send_all hello every server")
        alice.expect_exact(">>> [Message received by Server.]")
        bob.expect_exact(">>> [Channel_Message alice: hello every server]")
        carol.expect_exact(">>> [Channel_Message alice: hello every server]")
        # A later message from the same sender arrives after any late copy of the first would.
        alice.send("send_all second")
        bob.expect_exact(">>> [Channel_Message alice: second]")
        carol.expect_exact(">>> [Channel_Message alice: second]")
        for c in (bob, carol):
            self.assertEqual(c.count(r"^>>> \[Channel_Message alice: hello every server\]$"), 1, c.dump())
        self.assertEqual(alice.count(r"Channel_Message alice"), 0, alice.dump())

    def test_message_saved_on_one_server_is_delivered_once_on_another(self):
        self.start_server(0)
        self.start_server(1)
        alice = self.start_client("alice", 0)
        bob = self.start_client("bob", 1)
        self.wait_table(alice, ["alice", "bob"])
        bob.send("dereg bob")
        bob.expect_exact(">>> [You are Offline. Bye.]")
        bob.send("quit")
        self.assertEqual(bob.wait_exit(), 0)
        self.wait_table(alice, ["alice"])  # server 1's change reached server 0 and alice
        alice.send("send bob saved on server 0")
        alice.expect_exact(">>> [bob is offline, message sent to server.]")
        alice.expect_exact(SAVED)
        again = self.start_client("bob", 0, wait=False)
        again.expect_exact(WELCOME)
        again.expect_exact(">>> [You have messages]")
        again.expect(rf"^>>> alice: {TS} saved on server 0$")
        # Nothing comes twice: a fresh message is the next one shown.
        self.wait_table(alice, ["alice", "bob"])
        alice.send("send bob fresh")
        again.expect_exact(">>> alice: fresh")
        self.assertEqual(again.count(r"saved on server 0"), 1, again.dump())

    def test_a_file_kept_on_one_server_for_an_offline_client_is_downloaded_from_another(self):
        self.start_server(0)
        self.start_server(1)
        downloads = os.path.join(self.dir, "downloads-bob")
        alice = self.start_client("alice", 0, extra=["--download-dir", os.path.join(self.dir, "downloads-alice")])
        bob = self.start_client("bob", 1, extra=["--download-dir", downloads])
        self.wait_table(alice, ["alice", "bob"])
        bob.send("dereg bob")
        bob.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(alice, ["alice"])
        path = os.path.join(self.dir, "kept.bin")
        data = os.urandom(3 * 1024 * 1024)
        with open(path, "wb") as f:
            f.write(data)
        alice.send(f"sendfile bob {path}")
        alice.expect_exact(">>> [bob is offline; sending kept.bin (3.0 MiB) to the server for bob.]")
        alice.expect_exact(">>> [kept.bin saved by the server for bob.]", timeout=60)
        # Kept in the shared database (sealed: 3 MiB and a tag per chunk), not in server 0.
        self.assertEqual(self.sql("SELECT count(*) FROM files WHERE recipient = 'bob' AND sender = 'alice'"), "1")
        self.assertGreater(int(self.sql("SELECT octet_length(data) FROM files WHERE recipient = 'bob'")), len(data))
        bob.send("reg bob")  # with server 1, which never saw the upload
        bob.expect_exact(WELCOME)
        bob.expect_exact(">>> [alice offers kept.bin (3.0 MiB); type accept alice or decline alice]")
        bob.send("accept alice")
        saved_to = os.path.join(downloads, "kept.bin")
        bob.expect_exact(f">>> [File kept.bin from alice saved to {saved_to}.]", timeout=60)
        with open(saved_to, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(data).hexdigest())
        # Downloaded and checked, it is deleted from the database (after bob's FileDone).
        end = time.monotonic() + DEADLINE
        while self.sql("SELECT count(*) FROM files") != "0" and time.monotonic() < end:
            time.sleep(0.1)  # polling the database
        self.assertEqual(self.sql("SELECT count(*) FROM files"), "0")

    def test_server_killed_its_client_moves_and_gets_every_saved_message_once(self):
        self.start_server(0)
        doomed = self.start_server(1)
        alice = self.start_client("alice", 0)
        bob = self.start_client("bob", 1)
        self.wait_table(alice, ["alice", "bob"])
        alice.send("send bob before")
        bob.expect_exact(">>> alice: before")
        doomed.kill()  # SIGKILL
        # bob is unreachable for a while as well: alice's messages go to her server and are saved.
        bob.pause()
        self.addCleanup(bob.resume)
        for i in range(5):
            alice.send(f"send bob saved {i}")
        # All five went directly at once, so each gets its own "no ACK" before bob is marked offline.
        self.wait_count(alice, r"^>>> \[No ACK from bob, message sent to server\.\]$", 5)
        self.wait_count(alice, "^" + re.escape(SAVED) + "$", 5)
        self.assertEqual(self.sql("SELECT count(*) FROM messages WHERE recipient = 'bob'"), "5")
        bob.resume()
        moved = f">>> [Server 127.0.0.1:{self.ports[1]} not responding, now using 127.0.0.1:{self.ports[0]}.]"
        bob.expect_exact(moved, timeout=DEADLINE + 10)
        bob.expect_exact(WELCOME)
        bob.expect_exact(">>> [You have messages]")
        # Online again once the saved messages are delivered (and deleted).
        self.wait_table(alice, ["alice", "bob"])
        self.assertEqual(self.sql("SELECT count(*) FROM messages WHERE recipient = 'bob'"), "0")
        alice.send("send bob after the move")
        bob.expect_exact(">>> alice: after the move")
        # Each shown once: as a saved message, or directly if bob's socket still held alice's
        # direct try when he resumed (its saved copy is then known and not shown again).
        for i in range(5):
            self.assertEqual(bob.count(rf"^>>> alice: ({TS} )?saved {i}$"), 1, bob.dump())
        self.assertEqual(bob.count(re.escape(moved)), 1, bob.dump())

    def test_two_clients_racing_for_a_new_name_on_two_servers_one_wins(self):
        self.start_server(0)
        self.start_server(1)
        # Two people, two identities (each its own XDG_DATA_HOME), one name, at the same time.
        envs = []
        for who in ("first", "second"):
            xdg = os.path.join(self.dir, f"xdg-{who}")
            os.makedirs(xdg, mode=0o700)
            envs.append(dict(os.environ, XDG_DATA_HOME=xdg))
        a = self.start_client("dave", 0, wait=False, env=envs[0])
        b = self.start_client("dave", 1, wait=False, env=envs[1])
        refused = ">>> [Registration refused: the name dave belongs to another identity]"
        codes = []
        for c in (a, b):
            line = c.expect("^(" + re.escape(WELCOME) + "|" + re.escape(refused) + ")$")
            codes.append(line)
        self.assertEqual(sorted(codes), sorted([WELCOME, refused]), a.dump() + "\n" + b.dump())
        loser = a if codes[0] == refused else b
        self.assertEqual(loser.wait_exit(), 1)
        winner = b if loser is a else a
        self.assertIsNone(winner.proc.poll())


    def test_release_name_and_metrics_on_the_shared_store(self):
        metrics_port = free_tcp_port()
        self.ports.append(free_port())
        s = Proc(["-s", str(self.ports[0]), "--store", self.uri, "--metrics", str(metrics_port), "--bind", "127.0.0.1"]
                 + FAST + KEEPALIVE, name="server0", merge_stderr=True)
        self.procs.append(s)
        s.expect("server listening")
        alice = self.start_client("alice", 0)
        # The lease is held: the gauge a shared store adds (within the metrics' 1 s refresh).
        end = time.monotonic() + DEADLINE
        text = ""
        while time.monotonic() < end:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            if "\nchatapp_lease_held 1\n" in text and "\nchatapp_registrations_total 1\n" in text:
                break
            time.sleep(0.1)  # polling the scrape
        self.assertIn("\nchatapp_lease_held 1\n", text)
        self.assertIn("\nchatapp_registrations_total 1\n", text)
        alice.send("quit")
        self.assertEqual(alice.wait_exit(), 0)
        # A file kept for alice (as a server keeps one: the bytes are opaque to the store) goes too.
        self.sql("INSERT INTO files (recipient, transfer, sender, sender_key, ts_us, size, offer, data) "
                 "VALUES ('alice', 1, 'bob', '\\x00', 0, 1, '\\x01', '\\x02')")
        r = subprocess.run([BIN, "--store", self.uri, "--release-name", "alice"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"^released alice: removed its binding \(identity( \d{5}){6}\) and 0 saved messages "
                                   r"sealed for it, and 1 kept file\n$")
        self.assertEqual(self.sql("SELECT count(*) FROM files"), "0")
        r = subprocess.run([BIN, "--store", self.uri, "--release-name", "alice"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, f"released nothing: alice is not registered in {self.uri}\n")
        # The server ran throughout: it heard the release, and another identity takes the name.
        s.expect(re.escape("alice was released by the operator: its binding is gone"))
        xdg = os.path.join(self.dir, "xdg-new-alice")
        os.makedirs(xdg, mode=0o700)
        new_alice = self.start_client("alice", 0, env=dict(os.environ, XDG_DATA_HOME=xdg))
        new_alice.send("quit")
        self.assertEqual(new_alice.wait_exit(), 0)

    def test_unreachable_database_is_one_line_and_the_password_is_not_shown(self):
        r = subprocess.run([BIN, "-s", str(free_port()), "--store",
                            "postgresql://postgres:secret@127.0.0.1:1/x?password=secret2"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith(
            "ChatApp: cannot open the store postgresql://postgres:***@127.0.0.1:1/x?password=***: "), r.stderr)
        self.assertNotIn("secret", r.stderr + r.stdout)


class DatabaseRestartTest(Servers):
    """A cluster of its own, restarted while a client saves messages."""

    def database(self):
        self.cluster = os.path.join(self.dir, "pg")
        self.addCleanup(subprocess.run, [PG, "stop", self.cluster], capture_output=True, timeout=120)
        pg("start", self.cluster)
        return pg("newdb", self.cluster)

    def test_database_restarted_under_load_loses_no_acknowledged_save(self):
        self.start_server(0)
        alice = self.start_client("alice", 0)
        bob = self.start_client("bob", 0)
        self.wait_table(alice, ["alice", "bob"])
        bob.send("quit")
        self.assertEqual(bob.wait_exit(), 0)
        self.wait_table(alice, ["alice"])
        total = 40
        for i in range(total // 2):
            alice.send(f"send bob m{i}")
        pg("restart", self.cluster)
        for i in range(total // 2, total):
            alice.send(f"send bob m{i}")
        # Every message ends with one line: saved, or refused because the database was away.
        outcome = "^(" + re.escape(SAVED) + "|" + re.escape(REFUSED) + ")$"
        outcomes = [alice.expect(outcome, timeout=DEADLINE + 30) for _ in range(total)]
        saved = sum(1 for o in outcomes if o == SAVED)
        self.assertGreater(saved, 0, alice.dump())
        # Once the database is back (it may still be starting: refused meanwhile), saves go
        # through again: one at a time, so this one's line is its own.
        end = time.monotonic() + DEADLINE + 30
        tries = 0
        while True:
            tries += 1
            alice.send(f"send bob after {tries}")
            line = alice.expect(outcome, timeout=DEADLINE)
            if line == SAVED:
                break
            if time.monotonic() > end:
                self.fail("no save went through after the restart:\n" + alice.dump())
            time.sleep(0.2)  # the database is starting up: try again shortly
        last = f"after {tries}"
        again = self.start_client("bob", 0)
        again.expect(rf"^>>> alice: {TS} {last}$", timeout=DEADLINE + 30)
        texts = [l.rsplit(" ", 1)[1] for l in again.seen(rf"^>>> alice: {TS} m\d+$")]
        # Each ACKed save was delivered, once (a message the server said it could not save may
        # have been committed anyway, by a commit whose answer the restart cut: shown at most once).
        self.assertEqual(len(texts), len(set(texts)), again.dump())
        self.assertGreaterEqual(len(texts), saved, again.dump())
        self.assertEqual(again.count(rf" {last}$"), 1, again.dump())


if __name__ == "__main__":
    unittest.main()
