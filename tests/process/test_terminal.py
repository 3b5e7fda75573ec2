"""The client on a real terminal (tmux): editing, history, completion, messages and file progress
above the prompt."""
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import unittest

from harness import BIN, FAST, ChatTest, DEADLINE, free_port
from test_files import MiB, digest, write_random


def ensure_tmux():
    if shutil.which("tmux"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "tmux"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("tmux") is not None


class TerminalTest(ChatTest):
    def setUp(self):
        if not ensure_tmux():
            self.skipTest("tmux is not installed and could not be installed")
        super().setUp()
        self.session = f"chatapp-{os.getpid()}-{self._testMethodName}"
        self.state = tempfile.mkdtemp(prefix="chatapp-state-")

    def tearDown(self):
        subprocess.run(["tmux", "kill-session", "-t", self.session], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.state, ignore_errors=True)
        super().tearDown()

    def start_tty_client(self, name, extra=()):
        port = free_port()
        cmd = " ".join(shlex.quote(a) for a in
                       [BIN, "-c", name, "127.0.0.1", str(self.server_port), str(port)] + FAST + list(extra))
        # The tmux server may be older than this test: its environment is not ours, so the
        # test's own XDG_DATA_HOME (identities, client state) is passed explicitly.
        env = f"XDG_STATE_HOME={self.state} XDG_DATA_HOME={self.xdg_data_home} TERM=xterm"
        # The shell stays after the client exits, to show its exit status on the screen.
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "30",
                        f"env {env} {cmd}; echo EXIT=$?; sleep 60"], check=True)
        self.screen_until(r">>> \[Client table updated\.\]")
        return port

    def keys(self, *keys):
        subprocess.run(["tmux", "send-keys", "-t", self.session] + list(keys), check=True)

    def screen(self, history=False):
        """The visible lines, or with `history` the scrollback above them too (no colours)."""
        out = subprocess.run(["tmux", "capture-pane", "-t", self.session, "-p"] + (["-S", "-"] if history else []),
                             capture_output=True, text=True, check=True).stdout
        return [l.rstrip() for l in out.split("\n")]

    def screen_until(self, pattern, timeout=DEADLINE):
        """Polls the screen until a line matches (the terminal has no event to wait on)."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.screen()
            if any(rx.search(l) for l in lines):
                return lines
            time.sleep(0.05)
        self.fail(f"screen never showed /{pattern}/:\n" + "\n".join(self.screen()))

    def last_line(self, lines):
        return [l for l in lines if l][-1]

    def prompt_shows(self, text, timeout=DEADLINE):
        """Polls until the last non-empty screen line (the prompt) is exactly `text`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.last_line(self.screen()) == text:
                return
            time.sleep(0.05)
        self.fail(f"the prompt never showed {text!r}:\n" + "\n".join(self.screen()))

    def test_message_arrives_above_half_typed_line(self):
        self.start_tty_client("alice")
        bob = self.start_client("bob")
        self.wait_table(bob, ["alice", "bob"])
        self.keys("send bob half a li")
        self.screen_until(r"^>>> send bob half a li$")
        bob.send("send alice hello while you type")
        lines = self.screen_until(r"^>>> bob: hello while you type$")
        # The message sits above a prompt whose half-typed text is intact, cursor still there.
        self.assertEqual(self.last_line(lines), ">>> send bob half a li", "\n".join(lines))
        msg = lines.index(">>> bob: hello while you type")
        self.assertLess(msg, lines.index(">>> send bob half a li"))
        self.keys("ne", "Enter")
        bob.expect_exact(">>> alice: half a line")
        print("\n--- tmux screen: a message arriving mid-typing ---\n" +
              "\n".join(l for l in lines if l) + "\n---")

    def test_file_progress_is_redrawn_above_the_half_typed_line(self):
        """SPEC §12 on a tty: one status line redrawn in place just above the prompt (no ">>> ["
        and no line per 10 %, which are for pipes), gone when the transfer ends; the half-typed
        line survives it all and the file arrives byte-identical."""
        downloads = os.path.join(self.dir, "downloads-alice")
        self.start_tty_client("alice", extra=["--download-dir", downloads])
        bob = self.start_client("bob", extra=["--download-dir", os.path.join(self.dir, "downloads-bob")])
        self.wait_table(bob, ["alice", "bob"])
        path = os.path.join(self.dir, "big.bin")
        want = write_random(path, 30 * MiB)
        bob.send(f"sendfile alice {path}")
        bob.expect_exact(">>> [Offering big.bin (30.0 MiB) to alice.]")
        self.screen_until(r"^>>> \[bob offers big\.bin \(30\.0 MiB\); type accept bob or decline bob\]$")
        self.keys("accept bob", "Enter")
        self.screen_until(r"^>>> \[Receiving big\.bin \(30\.0 MiB\) from bob\.\]$")
        half = ">>> send bob half a li"
        self.keys("send bob half a li")
        saved_to = os.path.join(downloads, "big.bin")
        saved = f">>> [File big.bin from bob saved to {saved_to}.]"
        # The tty's status line is Transfers::progress_line() as it is; a pipe's line per 10 % is
        # the same text in ">>> [...]".
        status_rx = re.compile(r"^big\.bin  \d{1,3}%  \d+\.\d/30\.0 MiB"
                               r"(  \d+(\.\d)? (B|KiB|MiB|GiB)/s  \d+:\d\d left)?$")
        pipe_rx = re.compile(r"big\.bin  \d+%")

        def check(lines):
            """What holds on every screen: no pipe-style line, at most one status line, well formed."""
            text = "\n".join(lines)
            self.assertFalse([l for l in lines if l.startswith(">>> ") and pipe_rx.search(l)], text)
            shown = [l for l in lines if pipe_rx.search(l)]
            self.assertLessEqual(len(shown), 1, text)
            for l in shown:
                self.assertRegex(l, status_rx, text)
            return shown

        # During the transfer (it may be over before the first look: nothing here waits on it).
        redrawn = set()
        end = time.monotonic() + 120
        while True:
            lines = self.screen()
            shown = check(lines)
            filled = [l for l in lines if l]
            if shown and filled[-2:] == [shown[0], half]:
                redrawn.add(shown[0])  # the status line just above the intact half line
            if saved in lines:
                break
            if time.monotonic() > end:
                self.fail("the file was never saved:\n" + "\n".join(lines))
            time.sleep(0.02)
        # At the end: the status line is gone, the saved line sits just above the half line.
        end = time.monotonic() + DEADLINE
        while [l for l in self.screen() if l][-2:] != [saved, half] and time.monotonic() < end:
            time.sleep(0.05)
        everything = self.screen(history=True)
        self.assertEqual([l for l in everything if l][-2:], [saved, half], "\n".join(everything))
        self.assertEqual(check(everything), [], "\n".join(everything))
        self.assertEqual(everything.count(saved), 1, "\n".join(everything))
        bob.expect_exact(">>> [File big.bin sent to alice.]")
        self.assertEqual(digest(saved_to), want)
        self.assertEqual(sorted(os.listdir(downloads)), ["big.bin"])
        # The typed text was kept by the line editor, not only drawn: it finishes and goes.
        self.keys("ne", "Enter")
        bob.expect_exact(">>> alice: half a line")
        print(f"\n--- {len(redrawn)} distinct status lines seen above the half-typed line: "
              + " / ".join(sorted(redrawn)) + " ---")

    def test_tab_completes_a_name_and_up_recalls_history(self):
        self.start_tty_client("alice")
        bob = self.start_client("bobby_tables")
        self.screen_until(r"^>>> \[Client table updated\.\]$")
        self.wait_table(bob, ["alice", "bobby_tables"])
        # alice's table has the name once her screen showed the second update.
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and sum(l == ">>> [Client table updated.]" for l in self.screen()) < 2:
            time.sleep(0.05)
        self.keys("send bob", "Tab")
        self.prompt_shows(">>> send bobby_tables")
        self.keys("hi there", "Enter")
        bob.expect_exact(">>> alice: hi there")
        self.screen_until(r"^>>> \[Message received by bobby_tables\.\]$")
        self.keys("Up")
        self.prompt_shows(">>> send bobby_tables hi there")
        self.keys("C-u", "C-d")  # clear the line, then end of input: a silent leave
        self.screen_until(r"^EXIT=0$")

    def test_history_is_kept_across_runs(self):
        self.start_tty_client("alice")
        self.keys("list", "Enter")
        self.screen_until(r"^\(1 clients, 1 online\)$")
        self.keys("C-d")
        self.screen_until(r"^EXIT=0$")
        hist = os.path.join(self.state, "chatapp", "history")
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and not (os.path.exists(hist) and "list" in open(hist).read()):
            time.sleep(0.05)
        self.assertIn("list", open(hist).read())

    def test_no_escape_codes_when_stdin_is_a_pipe(self):
        a = self.start_client("alice")
        b = self.start_client("bob")
        self.wait_table(a, ["alice", "bob"])
        a.send("send bob plain")
        b.expect_exact(">>> alice: plain")
        a.expect_exact(">>> [Message received by bob.]")
        for p in (a, b):
            for line in p.lines:
                self.assertNotIn("\x1b", line, p.name)


if __name__ == "__main__":
    unittest.main()
