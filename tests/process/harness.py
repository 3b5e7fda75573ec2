"""Drives real ChatApp processes through stdin/stdout: start, type, wait for a line with a deadline."""
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

BIN = os.environ.get("CHATAPP_BIN", os.path.join(os.path.dirname(__file__), "../../build/ChatApp"))
DEADLINE = float(os.environ.get("CHATAPP_DEADLINE", "15"))
# Short ACK timeouts keep the scenarios fast; the logic is the same as with the 500 ms default.
FAST = ["--ack-timeout", "100", "--retries", "5"]


def free_port(kind=socket.SOCK_DGRAM):
    """A port (UDP, or TCP with socket.SOCK_STREAM) that is free now on 127.0.0.1 (bound to 0 and released)."""
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_tcp_port():
    return free_port(socket.SOCK_STREAM)


def wait_table(client, names_online, timeout=DEADLINE):
    """Types `list` until `client`'s table shows exactly these online names (bounded by `timeout`)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        client.send("list")
        client.expect("^NAME +ADDRESS")
        rows = []
        while True:
            line = client.expect(".")
            if re.match(r"^\(\d+ clients, \d+ online\)$", line):
                break
            rows.append(line)
        online = sorted(r.split()[0] for r in rows if r.split()[2] == "online")
        if online == sorted(names_online):
            return rows
        time.sleep(0.05)  # polling the table, not synchronising on an event
    raise AssertionError(f"{client.name}: table never showed {names_online} within {timeout:.1f}s:\n"
                         + client.dump())


class Proc:
    """One ChatApp process; every output line is kept, `expect` consumes them in order."""

    def __init__(self, args, name="proc", merge_stderr=False, env=None, prefix=()):
        """`prefix` goes before the binary (e.g. `ip netns exec <ns>`)."""
        self.name = name
        self.args = list(prefix) + [BIN] + args
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=env, bufsize=0)
        self.lines = []
        self.cursor = 0
        self.cond = threading.Condition()
        self.err_lines = []
        self.eof = False
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        if not merge_stderr:
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err_lines, False), daemon=True).start()

    def _pump(self, stream, sink, main):
        try:
            for raw in iter(stream.readline, b""):
                with self.cond:
                    sink.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self.cond.notify_all()
        except (ValueError, OSError):  # closed by tearDown
            pass
        with self.cond:
            if main:
                self.eof = True
            self.cond.notify_all()

    def send(self, line):
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def send_raw(self, data):
        """Writes `data` (bytes) to stdin as is: no newline is added."""
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def expect(self, pattern, timeout=DEADLINE):
        """Waits for the next line matching `pattern` (regex); earlier lines are skipped."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                while self.cursor < len(self.lines):
                    line = self.lines[self.cursor]
                    self.cursor += 1
                    if rx.search(line):
                        return line
                if self.eof:
                    raise AssertionError(f"{self.name}: output ended before /{pattern}/; got:\n" + self.dump())
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no line /{pattern}/ within {timeout}s; got:\n" + self.dump())
                self.cond.wait(left)

    def expect_exact(self, text, timeout=DEADLINE):
        return self.expect("^" + re.escape(text) + "$", timeout)

    def seen(self, pattern):
        """All lines so far (consumed or not) matching `pattern`."""
        rx = re.compile(pattern)
        with self.cond:
            return [l for l in self.lines if rx.search(l)]

    def mark(self):
        """The index the next output line will have (for wait_seen/count `since`)."""
        with self.cond:
            return len(self.lines)

    def wait_seen(self, pattern, since=0, timeout=DEADLINE):
        """Waits until a line at index >= `since` matches `pattern`; returns its index.
        Unlike `expect` it neither needs nor moves the cursor, so lines that `expect` (or
        ChatTest.wait_table) skipped meanwhile still count."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            i = since
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        return i
                    i += 1
                if self.eof:
                    raise AssertionError(f"{self.name}: output ended before /{pattern}/; got:\n" + self.dump())
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no line /{pattern}/ within {timeout:.1f}s; got:\n"
                                         + self.dump())
                self.cond.wait(left)

    def count(self, pattern, since=0):
        """How many lines at index >= `since` match `pattern` (consumed or not)."""
        rx = re.compile(pattern)
        with self.cond:
            return sum(1 for l in self.lines[since:] if rx.search(l))

    def rest(self):
        """Lines not yet consumed."""
        with self.cond:
            return list(self.lines[self.cursor:])

    def dump(self):
        return "\n".join(f"  | {l}" for l in self.lines[-40:]) + (
            "\n  stderr:\n" + "\n".join(f"  ! {l}" for l in self.err_lines[-20:]) if self.err_lines else "")

    def wait_exit(self, timeout=DEADLINE):
        return self.proc.wait(timeout=timeout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def pause(self, timeout=DEADLINE):
        """SIGSTOP, then waits (bounded) until the kernel shows the process stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        end = time.monotonic() + timeout
        state = "?"
        for _ in range(int(timeout / 0.005) + 1):
            with open(f"/proc/{self.proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("T", "t") or time.monotonic() > end:
                break
            time.sleep(0.005)  # polling the process state, not synchronising on output
        if state not in ("T", "t"):
            raise AssertionError(f"{self.name} is not stopped {timeout}s after SIGSTOP (state {state})")

    def resume(self):
        """SIGCONT if the process is still there (safe in a cleanup, any number of times)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def close_stdin(self):
        self.proc.stdin.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        """Kills the process and closes its pipes (a test's cleanup)."""
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass


def restore_env(key, value):
    """Sets os.environ[key] back to `value` (None: unset)."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def isolated_env(directory, **extra):
    """os.environ with XDG_DATA_HOME inside `directory` (made 0700), for ChatApp processes
    started outside ChatTest: their identities and client state stay in the test's own place."""
    xdg = os.path.join(directory, "xdg-data")
    os.makedirs(xdg, mode=0o700, exist_ok=True)
    return dict(os.environ, XDG_DATA_HOME=xdg, **extra)


class ChatTest(unittest.TestCase):
    """Starts a server on a free port with a fresh data directory; clients on request."""

    server_args = FAST

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chatapp-test-")
        self.data_dir = os.path.join(self.dir, "data")
        # Each test has its own identities and client state (SPEC §11: keys, pins, blocks,
        # seen messages live under $XDG_DATA_HOME/chatapp): never the real home, never shared.
        # Every process started from here on inherits it (Proc passes os.environ on).
        self.xdg_data_home = os.path.join(self.dir, "xdg-data")
        os.makedirs(self.xdg_data_home, mode=0o700)
        self._old_xdg_data_home = os.environ.get("XDG_DATA_HOME")
        os.environ["XDG_DATA_HOME"] = self.xdg_data_home
        self.procs = []
        self.server_port = free_port()
        self.server = self.start_server()

    def tearDown(self):
        for p in self.procs:
            p.close()
        restore_env("XDG_DATA_HOME", self._old_xdg_data_home)
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, result=None):
        # tearDown does not run when setUp fails: put XDG_DATA_HOME back whatever happens.
        old = os.environ.get("XDG_DATA_HOME")
        try:
            return super().run(result)
        finally:
            restore_env("XDG_DATA_HOME", old)

    def identity_file(self, name):
        """The identity file a client named `name` uses by default (SPEC §11)."""
        return os.path.join(self.xdg_data_home, "chatapp", "identities", name + ".key")

    def peers_db(self, name):
        """The client state database of `name` (pins, verified marks, blocks, seen messages)."""
        return os.path.join(self.xdg_data_home, "chatapp", "peers", name + ".db")

    def db_files(self):
        """The server's chat.db and its -wal and -shm in --data-dir, those that exist now."""
        base = os.path.join(self.data_dir, "chat.db")
        return [p for p in (base, base + "-wal", base + "-shm") if os.path.exists(p)]

    def start_server(self, extra=()):
        s = Proc(["-s", str(self.server_port), "--data-dir", self.data_dir]
                 + list(self.server_args) + list(extra), name="server", merge_stderr=True)
        self.procs.append(s)
        s.expect("server listening")
        return s

    def start_client(self, name, port=None, extra=(), wait=True, timing=FAST):
        """`timing` replaces the FAST ack options (each option may be given once only)."""
        port = port or free_port()
        c = Proc(["-c", name, "127.0.0.1", str(self.server_port), str(port)] + list(timing) + list(extra),
                 name=name)
        c.port = port
        self.procs.append(c)
        if wait:
            c.expect_exact(">>> [Welcome, You are registered.]")
        return c

    def wait_table(self, client, names_online, timeout=DEADLINE):
        return wait_table(client, names_online, timeout)


def udp_rx_queue(port):
    """Bytes queued on the UDP socket bound to `port` in this network namespace (None: no socket)."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port:
                return int(parts[4].split(":")[1], 16)
    return None


class NetnsChatTest(ChatTest):
    """ChatTest with the server and the clients inside a network namespace of the test's own
    (only lo, up), where `iptables()` adds and deletes rules. Skips when not root or when
    `ip netns` or iptables cannot be used here. The processes are killed and the namespace is
    deleted whatever happens, setUp failing included."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (ip netns, iptables)")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        self.ns = f"chatapp-{os.getpid()}-{type(self).__name__[:20]}"
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # a leftover of a killed run
        r = subprocess.run(["ip", "netns", "add", self.ns], capture_output=True, text=True)
        if r.returncode != 0:
            raise unittest.SkipTest(f"cannot create a network namespace (ip netns add): {r.stderr.strip()}")
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns], capture_output=True)
        r = subprocess.run(self.prefix() + ["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
        if r.returncode != 0:
            raise unittest.SkipTest(f"cannot bring lo up in the namespace: {r.stderr.strip()}")
        rule = ["OUTPUT", "-p", "udp", "--sport", "9", "--dport", "9", "-j", "DROP"]
        r = subprocess.run(self.prefix() + ["iptables", "-A"] + rule, capture_output=True, text=True)
        if r.returncode != 0:
            raise unittest.SkipTest(f"iptables cannot drop datagrams here: {r.stderr.strip()}")
        self.iptables("-D", *rule)
        self.procs = []
        # Runs before the namespace is deleted (cleanups are LIFO), and also when setUp fails below.
        self.addCleanup(self._kill_all)
        super().setUp()

    def _kill_all(self):
        for p in getattr(self, "procs", []):
            p.kill()
        if getattr(self, "dir", None):
            shutil.rmtree(self.dir, ignore_errors=True)

    def prefix(self):
        return ["ip", "netns", "exec", self.ns]

    def iptables(self, *args):
        subprocess.run(self.prefix() + ["iptables"] + list(args), check=True, capture_output=True)

    def dropped(self, chain, sport, dport):
        """Datagrams the DROP rule `-p udp --sport <sport> --dport <dport>` in `chain` has dropped."""
        out = subprocess.run(self.prefix() + ["iptables", "-v", "-x", "-n", "-L", chain], check=True,
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) > 2 and f[2] == "DROP" and f"spt:{sport}" in f and f"dpt:{dport}" in f:
                return int(f[0])
        raise AssertionError(f"no rule udp spt:{sport} dpt:{dport} in {chain}:\n{out}")

    def start_server(self, extra=()):
        s = Proc(["-s", str(self.server_port), "--data-dir", self.data_dir]
                 + list(self.server_args) + list(extra), name="server", merge_stderr=True, prefix=self.prefix())
        self.procs.append(s)
        s.expect("server listening", timeout=30)
        return s

    def start_client(self, name, port=None, extra=(), wait=True, timing=FAST):
        port = port or free_port()  # any port is free in the fresh namespace
        c = Proc(["-c", name, "127.0.0.1", str(self.server_port), str(port)] + list(timing) + list(extra),
                 name=name, prefix=self.prefix())
        c.port = port
        self.procs.append(c)
        if wait:
            c.expect_exact(">>> [Welcome, You are registered.]", timeout=30)
        return c
