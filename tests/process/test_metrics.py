"""`--metrics <port>` (SPEC §13): Prometheus text metrics over HTTP at /metrics, scraped from a
real server while a real client registers; a metrics port in use; bad values of the option.

The server publishes its counters to the metrics endpoint once a second, so a change shows up
within about a second: every wait for one polls the endpoint until a deadline.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.request

from harness import BIN, DEADLINE, FAST, ChatTest, free_port, free_tcp_port, isolated_env

TIMEOUT = 5  # seconds for a command line that must be refused (or fail) at once
STOP_WITHIN = 1.5  # seconds from SIGTERM to exit: less than civetweb's 2 s poll, with room for a busy machine

USAGE_FIRST = "usage: ChatApp -s <port> [options]"

# Every family a server with an embedded store exports, with its type.
FAMILIES = {
    "chatapp_datagrams_received_total": "counter",
    "chatapp_datagrams_sent_total": "counter",
    "chatapp_bytes_received_total": "counter",
    "chatapp_bytes_sent_total": "counter",
    "chatapp_datagrams_refused_total": "counter",
    "chatapp_duplicates_total": "counter",
    "chatapp_retransmits_total": "counter",
    "chatapp_clients_registered": "gauge",
    "chatapp_clients_online": "gauge",
    "chatapp_registrations_total": "counter",
    "chatapp_saves_total": "counter",
    "chatapp_commit_seconds": "histogram",
    "chatapp_deliveries_total": "counter",
    "chatapp_relays_total": "counter",
    "chatapp_table_updates_total": "counter",
    "chatapp_store_errors_total": "counter",
    "chatapp_remote_changes_total": "counter",
}

REFUSED_REASONS = ["empty", "too_large", "old_version", "bad_version", "unknown_type", "truncated",
                   "trailing", "bad_name", "text_too_long", "invalid_utf8", "bad_value",
                   "rate_limited", "not_sent_unproven", "in_flight_refused"]


def scrape(port):
    """(content type, body) of GET http://127.0.0.1:<port>/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        if r.status != 200:
            raise AssertionError(f"GET /metrics: HTTP {r.status}")
        return r.headers.get("Content-Type", ""), r.read().decode("utf-8")


def sample(text, name):
    """The value of the unlabelled sample `name` in a scrape (None if absent)."""
    m = re.search(r"(?m)^" + re.escape(name) + r" (\S+)$", text)
    return float(m.group(1)) if m else None


def lines(text):
    return text.splitlines()


class MetricsTest(ChatTest):
    def setUp(self):
        self.metrics_port = free_tcp_port()
        self.server_args = FAST + ["--bind", "127.0.0.1", "--metrics", str(self.metrics_port)]
        super().setUp()

    def scrape_until(self, what, ok, timeout=DEADLINE):
        """Scrapes until ok(text) holds (the snapshot is at most ~1 s old); returns the text."""
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            _, text = scrape(self.metrics_port)
            if ok(text):
                return text
            time.sleep(0.05)  # polling the endpoint, not synchronising on an event
        raise AssertionError(f"metrics never showed {what} within {timeout:.1f}s; last scrape:\n{text}"
                             + "\nserver:\n" + self.server.dump())

    def test_families_at_start_and_counters_that_move_when_a_client_registers(self):
        ctype, text = scrape(self.metrics_port)
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        for name, kind in FAMILIES.items():
            with self.subTest(family=name):
                self.assertIn(f"# TYPE {name} {kind}", lines(text))
                self.assertTrue(any(l.startswith(f"# HELP {name} ") and len(l) > len(f"# HELP {name} ")
                                    for l in lines(text)), f"{name} has no HELP text")
        for reason in REFUSED_REASONS:
            self.assertIn(f'chatapp_datagrams_refused_total{{reason="{reason}"}} 0', lines(text))
        self.assertIn("chatapp_clients_registered 0", lines(text))
        self.assertIn("chatapp_clients_online 0", lines(text))
        self.assertIn('chatapp_commit_seconds_bucket{le="+Inf"} 0', lines(text))
        self.assertIn('chatapp_commit_seconds_bucket{le="0.00025"} 0', lines(text))
        self.assertNotIn("chatapp_lease_held", text, "an embedded store has no lease")
        received = sample(text, "chatapp_datagrams_received_total")
        sent = sample(text, "chatapp_datagrams_sent_total")
        self.assertIsNotNone(received)

        self.start_client("alice")
        text = self.scrape_until(
            "alice registered and the datagram counters grown",
            lambda t: sample(t, "chatapp_clients_registered") == 1
            and sample(t, "chatapp_datagrams_received_total") > received
            and sample(t, "chatapp_datagrams_sent_total") > sent)
        self.assertIn("chatapp_clients_registered 1", lines(text))
        self.assertIn("chatapp_clients_online 1", lines(text))
        self.assertRegex(text, r"(?m)^chatapp_datagrams_received_total [1-9][0-9]*$")
        self.assertGreater(sample(text, "chatapp_bytes_received_total"), 0)

    def test_bad_datagrams_are_counted_by_reason(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.sendto(b"", ("127.0.0.1", self.server_port))
        s.sendto(b'{"type": "register"}', ("127.0.0.1", self.server_port))
        self.scrape_until(
            "the empty and the version-1 datagram refused",
            lambda t: 'chatapp_datagrams_refused_total{reason="empty"} 1' in lines(t)
            and 'chatapp_datagrams_refused_total{reason="old_version"} 1' in lines(t))

    def test_the_server_stops_promptly_and_frees_the_metrics_port(self):
        # civetweb looks at its stop flag only every 2 s unless woken: the exporter wakes it.
        start = time.monotonic()
        self.server.signal(signal.SIGTERM)
        self.assertEqual(self.server.wait_exit(), 0)
        took = time.monotonic() - start
        self.assertLess(took, STOP_WITHIN, f"the server took {took:.2f}s to exit")
        again = self.start_server()  # the same UDP and metrics ports, at once
        _, text = scrape(self.metrics_port)
        self.assertIn("chatapp_clients_registered 0", lines(text))
        again.signal(signal.SIGTERM)
        self.assertEqual(again.wait_exit(), 0)


class MetricsCliTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chatapp-metrics-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def run_app(self, args):
        r = subprocess.run([BIN] + list(args), cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=TIMEOUT, env=isolated_env(self.dir))
        return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")

    def server(self, *extra):
        return ["-s", str(free_port()), "--bind", "127.0.0.1", "--data-dir", os.path.join(self.dir, "data")] + list(extra)

    def test_a_metrics_port_in_use_exits_1_with_one_line(self):
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = self.run_app(self.server("--metrics", str(port)))
        self.assertEqual(code, 1, f"stdout={out!r} stderr={err!r}")
        self.assertEqual(out, "")
        self.assertEqual(err.splitlines(), [f"ChatApp: cannot serve metrics on port {port}: Address already in use"])

    def test_bad_metrics_ports_are_usage_errors(self):
        for bad in ("0", "abc", "65536", "-1", "", "80x"):
            with self.subTest(port=bad):
                code, out, err = self.run_app(self.server("--metrics", bad))
                self.assertEqual(code, 2, f"stdout={out!r} stderr={err!r}")
                self.assertEqual(out, "")
                self.assertEqual(err.splitlines()[:2],
                                 [f"ChatApp: invalid --metrics '{bad}': must be an integer in 1-65535", USAGE_FIRST])
                self.assertFalse(os.path.exists(os.path.join(self.dir, "data")),
                                 "a refused command line created its data directory")

    def test_metrics_is_a_server_option(self):
        code, out, err = self.run_app(["-c", "alice", "127.0.0.1", "5000", "5001", "--metrics", "9100"])
        self.assertEqual(code, 2, f"stdout={out!r} stderr={err!r}")
        self.assertEqual(err.splitlines()[:2], ["ChatApp: --metrics is a server option (-s)", USAGE_FIRST])

    def test_help_lists_it(self):
        code, out, _ = self.run_app(["--help"])
        self.assertEqual(code, 0)
        self.assertRegex(out, r"(?m)^\s*--metrics port\s+server: serve Prometheus text metrics")


if __name__ == "__main__":
    unittest.main()
