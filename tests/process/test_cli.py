"""The command line (SPEC §1): bad arguments, --help/--version, a port already in use.

No server is needed: each case runs ChatApp once with subprocess.run and a timeout.
"""
import os
import re
import shutil
import socket
import subprocess
import tempfile
import unittest

from harness import BIN, isolated_env

TIMEOUT = 5          # seconds for a command line that must be refused at once
CRASH_CODES = (134, 139)  # abort / segfault as seen through a shell


def boundary(value):
    """A regex finding `value` as a whole token (so '0' does not match inside '1024-65535')."""
    return r"(?<![A-Za-z0-9.])" + re.escape(value) + r"(?![A-Za-z0-9.])"


class CliTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chatapp-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def run_app(self, args, timeout=TIMEOUT):
        # A client that gets as far as starting makes its identity: in this test's directory.
        r = subprocess.run([BIN] + list(args), cwd=self.dir, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=timeout, env=isolated_env(self.dir))
        return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")

    def assertNoCrash(self, code, err, what):
        self.assertGreaterEqual(code, 0, f"{what}: killed by signal {-code}\n{err}")
        self.assertNotIn(code, CRASH_CODES, f"{what}: crashed\n{err}")
        for bad in ("terminate called", "Segmentation", "Aborted", "Traceback", "what():"):
            self.assertNotIn(bad, err, f"{what}: crash text on stderr")

    def assertRefused(self, args, needle):
        """Non-zero exit, nothing on stdout, an error line matching `needle` then a usage line."""
        what = "ChatApp " + " ".join(repr(a) for a in args)
        code, out, err = self.run_app(args)
        self.assertNoCrash(code, err, what)
        self.assertNotEqual(code, 0, f"{what}: accepted\nstdout={out!r}\nstderr={err!r}")
        self.assertEqual(out, "", f"{what}: wrote on stdout")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertTrue(lines, f"{what}: nothing on stderr")
        first = lines[0]
        self.assertTrue(first.startswith("ChatApp: "), f"{what}: first stderr line {first!r}")
        self.assertRegex(first, needle, f"{what}: error line does not name the bad argument")
        self.assertNotRegex(first, r"^ChatApp: usage", f"{what}: no error line before the usage")
        self.assertTrue(any(re.match(r"^\s*usage:", l) for l in lines[1:]), f"{what}: no usage line\n{err}")
        return code, err

    # A valid client command line apart from one argument (the server is never contacted).
    @staticmethod
    def client(name="alice", ip="127.0.0.1", sport="5000", cport="5001"):
        return ["-c", name, ip, sport, cport]

    # ------------------------------------------------------------ bad values

    BAD_IPS = ["1.2.3", "256.1.1.1", "abc", "1.2.3.4.5", "", "1.2.3.", "-1.2.3.4", "1.2.3.4 "]
    BAD_PORTS = ["1023", "65536", "0", "-1", "abc", "80x", "", "99999999999999999999", "5000.0", " 5000"]

    def test_bad_server_ip(self):
        for ip in self.BAD_IPS:
            with self.subTest(ip=ip):
                self.assertRefused(self.client(ip=ip), boundary(ip.strip()) if ip.strip() else r"(?i)ip|''")

    def test_bad_server_port_for_server_mode(self):
        for port in self.BAD_PORTS:
            with self.subTest(port=port):
                needle = boundary(port.strip()) if port.strip() else r"(?i)port|''"
                self.assertRefused(["-s", port, "--data-dir", "d"], needle)
                self.assertFalse(os.path.exists(os.path.join(self.dir, "d")),
                                 "a refused server command line created its data directory")

    def test_bad_server_port_for_client(self):
        for port in self.BAD_PORTS:
            with self.subTest(port=port):
                needle = boundary(port.strip()) if port.strip() else r"(?i)port|''"
                self.assertRefused(self.client(sport=port), needle)

    def test_bad_client_port(self):
        for port in self.BAD_PORTS:
            with self.subTest(port=port):
                needle = boundary(port.strip()) if port.strip() else r"(?i)port|''"
                self.assertRefused(self.client(cport=port), needle)

    def test_bad_names(self):
        names = ["", "a" * 33, ".hidden", "a/b", "a b", "../x", "/", "h\u00e9", "\u540d\u5b57", "a\tb", "a:b", "-" * 33]
        for name in names:
            with self.subTest(name=name):
                self.assertRefused(self.client(name=name), re.escape(name) if name else r"(?i)name|''")

    def test_bad_option_values(self):
        cases = [(["--ack-timeout", "0"], "0"), (["--ack-timeout", "abc"], "abc"),
                 (["--retries", "-1"], "-1"), (["--retries", "101"], "101"),
                 (["--bind", "1.2.3"], "1.2.3"), (["--bind", "256.0.0.1"], "256.0.0.1")]
        for extra, bad in cases:
            with self.subTest(extra=extra):
                self.assertRefused(["-s", "5000", "--data-dir", "d"] + extra, boundary(bad))
                self.assertRefused(self.client() + extra, boundary(bad))

    def test_nothing_is_sent_when_an_argument_is_bad(self):
        # A UDP socket plays the server; a refused command line must not send it anything.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
        for args in (self.client(sport=port, cport="80x"), self.client(name="a/b", sport=port),
                     self.client(sport=port) + ["--frobnicate"], self.client(sport=port) + ["extra"]):
            with self.subTest(args=args):
                code, _, _ = self.run_app(args)
                self.assertNotEqual(code, 0)
        s.setblocking(False)  # loopback delivery is synchronous: anything sent is queued by now
        with self.assertRaises(BlockingIOError, msg="a refused client sent a datagram"):
            s.recv(2048)

    # ------------------------------------------------------------ argument counts and modes

    def test_wrong_argument_count_for_client(self):
        full = ["alice", "127.0.0.1", "5000", "5001"]
        for n in (0, 1, 2, 3):
            with self.subTest(count=n):
                self.assertRefused(["-c"] + full[:n], r"(?i)argument|usage|-c|" + str(n))
        with self.subTest(count=5):
            self.assertRefused(["-c"] + full + ["extra"], r"(?i)extra|argument|5")

    def test_extra_argument_for_server(self):
        self.assertRefused(["-s", "5000", "extra", "--data-dir", "d"], boundary("extra"))

    def test_missing_server_port(self):
        self.assertRefused(["-s"], r"(?i)-s|server|port")

    def test_unknown_flag(self):
        self.assertRefused(["--frobnicate"], boundary("--frobnicate"))
        self.assertRefused(self.client() + ["--frobnicate"], boundary("--frobnicate"))
        self.assertRefused(["-s", "5000", "--frobnicate", "--data-dir", "d"], boundary("--frobnicate"))
        self.assertRefused(["-s", "5000", "-q", "--data-dir", "d"], boundary("-q"))

    def test_both_modes(self):
        self.assertRefused(["-s", "5000"] + self.client(sport="6000"), r"(?i)-s|-c|mode")
        self.assertRefused(self.client() + ["-s", "6000"], r"(?i)-s|-c|mode")

    def test_no_mode(self):
        self.assertRefused([], r"(?i)-s|-c|mode")
        self.assertRefused(["alice", "127.0.0.1", "5000", "5001"], r"(?i)-s|-c|mode|alice")

    # ------------------------------------------------------------ valid command lines

    def test_help(self):
        for flag in ("--help", "-h"):
            with self.subTest(flag=flag):
                code, out, err = self.run_app([flag])
                self.assertNoCrash(code, err, flag)
                self.assertEqual(code, 0, err)
                self.assertRegex(out, r"(?m)^\s*usage:")
                self.assertRegex(out, r"-s <port>", "usage for server mode missing")
                self.assertRegex(out, r"-c <name> <server-ip> <server-port> <client-port>",
                                 "usage for client mode missing")
                for opt in ("--ack-timeout", "--retries", "--data-dir"):
                    self.assertIn(opt, out)

    def test_version(self):
        code, out, err = self.run_app(["--version"])
        self.assertNoCrash(code, err, "--version")
        self.assertEqual(code, 0, err)
        self.assertRegex(out.strip(), r"^ChatApp \d+\.\d+")
        self.assertEqual(len(out.strip().splitlines()), 1)

    def test_boundary_values_are_accepted(self):
        # Accepted means it gets as far as talking to the (absent) server: not the usage exit.
        def free():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            s.close()
            return str(p)
        fast = ["--ack-timeout", "20", "--retries", "0"]
        for args in (self.client(name="a" * 32, sport="1024", cport=free()),
                     self.client(name="Z9_-.x", sport="65535", cport=free()),
                     self.client(name="a", sport=free(), cport=free())):
            with self.subTest(args=args):
                code, out, err = self.run_app(args + fast)
                self.assertNoCrash(code, err, str(args))
                self.assertNotIn("usage:", err)
                self.assertIn(">>> [Server not responding]", out)
                self.assertNotEqual(code, 0)

    # ------------------------------------------------------------ port already in use

    def assertPortInUse(self, args, port):
        code, out, err = self.run_app(args)
        self.assertNoCrash(code, err, " ".join(args))
        self.assertEqual(code, 1, f"stdout={out!r} stderr={err!r}")
        lines = [l for l in err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, f"want one clear line, got:\n{err}")
        self.assertRegex(lines[0], r"^ChatApp: ")
        self.assertRegex(lines[0], boundary(str(port)))
        self.assertRegex(lines[0], r"(?i)in use|port")
        self.assertNotIn(">>> [Welcome", out)

    def test_server_port_in_use(self):
        for host in ("0.0.0.0", "127.0.0.1"):
            with self.subTest(held_on=host):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.addCleanup(s.close)
                s.bind((host, 0))
                port = s.getsockname()[1]
                self.assertPortInUse(["-s", str(port), "--data-dir", os.path.join(self.dir, "data")], port)

    def test_client_port_in_use(self):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # plays the server: must hear nothing
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(held.close)
        held.bind(("0.0.0.0", 0))
        port = held.getsockname()[1]
        self.assertPortInUse(self.client(sport=str(server.getsockname()[1]), cport=str(port)), port)
        server.setblocking(False)
        with self.assertRaises(BlockingIOError, msg="the client registered although its port was in use"):
            server.recv(2048)


if __name__ == "__main__":
    unittest.main()
