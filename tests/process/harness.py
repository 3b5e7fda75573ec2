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


def free_port():
    """A UDP port that is free now on 127.0.0.1 (bound to 0 and released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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

    def close_stdin(self):
        self.proc.stdin.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class ChatTest(unittest.TestCase):
    """Starts a server on a free port with a fresh data directory; clients on request."""

    server_args = FAST

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chatapp-test-")
        self.procs = []
        self.server_port = free_port()
        self.server = self.start_server()

    def tearDown(self):
        for p in self.procs:
            p.kill()
            for stream in (p.proc.stdin, p.proc.stdout, p.proc.stderr):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def start_server(self, extra=()):
        s = Proc(["-s", str(self.server_port), "--data-dir", os.path.join(self.dir, "data")]
                 + list(self.server_args) + list(extra), name="server", merge_stderr=True)
        self.procs.append(s)
        s.expect("server listening")
        return s

    def start_client(self, name, port=None, extra=(), wait=True):
        port = port or free_port()
        c = Proc(["-c", name, "127.0.0.1", str(self.server_port), str(port)] + FAST + list(extra), name=name)
        c.port = port
        self.procs.append(c)
        if wait:
            c.expect_exact(">>> [Welcome, You are registered.]")
        return c

    def wait_table(self, client, names_online):
        """Types `list` until the table shows exactly these online names (bounded)."""
        end = time.monotonic() + DEADLINE
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
        raise AssertionError(f"{client.name}: table never showed {names_online}:\n" + client.dump())
