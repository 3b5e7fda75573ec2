"""File transfer between two real clients (SPEC §12): offer, accept, progress on a pipe, the
check and the saved file, decline, cancel and resume, chat during a transfer, and the same at
20 % loss inside a network namespace of the test's own."""
import hashlib
import os
import re
import subprocess
import time
import unittest

from harness import DEADLINE, ChatTest, NetnsChatTest, udp_rx_queue

MiB = 1024 * 1024
WELCOME = ">>> [Welcome, You are registered.]"
# A progress line on a pipe: "report.pdf  40%  8.0/20.0 MiB  12.3 MiB/s  0:01 left" in brackets
# (the rate and the time left once something moved).
PROGRESS = r"^>>> \[{name}  {pct}%  \d+\.\d/{total}(  \d+(\.\d)? (B|KiB|MiB|GiB)/s  \d+:\d\d left)?\]$"


def write_random(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Files:
    """What both test classes share: two clients, each with its own download directory."""

    def pair(self, timeout=15):
        self.downloads = os.path.join(self.dir, "downloads-bob")
        self.alice = self.start_client("alice", extra=["--download-dir", os.path.join(self.dir, "downloads-alice")])
        self.bob = self.start_client("bob", extra=["--download-dir", self.downloads])
        self.wait_table(self.alice, ["alice", "bob"], timeout)
        self.wait_table(self.bob, ["alice", "bob"], timeout)

    def offer(self, name, size, line_size):
        path = os.path.join(self.dir, name)
        want = write_random(path, size)
        self.alice.send(f"sendfile bob {path}")
        self.alice.expect_exact(f">>> [Offering {name} ({line_size}) to bob.]")
        self.bob.expect_exact(f">>> [alice offers {name} ({line_size}); type accept alice or decline alice]")
        return path, want

    def saved(self, name, timeout):
        saved_to = os.path.join(self.downloads, name)
        self.bob.expect_exact(f">>> [File {name} from alice saved to {saved_to}.]", timeout=timeout)
        self.alice.expect_exact(f">>> [File {name} sent to bob.]", timeout=timeout)
        return saved_to


class FilesTest(Files, ChatTest):
    def test_a_20_mib_file_arrives_byte_identical_with_progress_and_chat_stays_prompt(self):
        self.pair()
        _, want = self.offer("big.bin", 20 * MiB, "20.0 MiB")
        self.bob.send("accept alice")
        self.bob.expect_exact(">>> [Receiving big.bin (20.0 MiB) from alice.]")
        # Messages both ways while the chunks flow: each is received (its receipt back) promptly.
        self.bob.expect(PROGRESS.format(name=re.escape("big.bin"), pct=10, total=re.escape("20.0 MiB")), timeout=30)
        a0, b0 = self.alice.mark(), self.bob.mark()
        t0 = time.monotonic()
        self.alice.send("send bob during the transfer")
        self.bob.send("send alice also during it")
        self.alice.wait_seen(r"^>>> \[Message received by bob\.\]$", since=a0)
        self.bob.wait_seen(r"^>>> \[Message received by alice\.\]$", since=b0)
        chat_s = time.monotonic() - t0
        self.bob.wait_seen(r"^>>> alice: during the transfer$", since=b0)
        self.alice.wait_seen(r"^>>> bob: also during it$", since=a0)
        saved_to = self.saved("big.bin", timeout=120)
        self.assertEqual(digest(saved_to), want)
        self.assertLess(chat_s, 5.0, "a chat message took this long to be received during the transfer")
        # On a pipe: one line per 10 % on both sides, 100 % last, in order.
        for p in (self.alice, self.bob):
            pcts = [int(m.group(1)) for m in (re.match(r"^>>> \[big\.bin  (\d+)%  ", l) for l in p.lines) if m]
            self.assertEqual(pcts, sorted(pcts), p.dump())
            self.assertEqual(pcts[-1], 100, p.dump())
            self.assertGreaterEqual(len(pcts), 10, p.dump())
            self.assertLessEqual(len(pcts), 10, p.dump())
        self.assertEqual(sorted(os.listdir(self.downloads)), ["big.bin"])  # no part or sidecar left

    def test_decline_tells_the_sender_and_nothing_is_written(self):
        self.pair()
        self.offer("report.pdf", 300_000, "293.0 KiB")
        self.bob.send("decline alice")
        self.bob.expect_exact(">>> [Declined report.pdf from alice.]")
        self.alice.expect_exact(">>> [bob declined report.pdf.]")
        self.bob.send("transfers")
        self.bob.expect_exact("[No file transfers.]")
        self.assertFalse(os.path.exists(self.downloads) and os.listdir(self.downloads))

    def test_cancel_midway_then_the_same_file_offered_again_resumes(self):
        self.pair()
        path, want = self.offer("video.mp4", 20 * MiB, "20.0 MiB")
        self.bob.send("accept alice")
        self.bob.expect(PROGRESS.format(name=re.escape("video.mp4"), pct=30, total=re.escape("20.0 MiB")), timeout=60)
        self.bob.send("cancel 1")
        self.bob.expect_exact(">>> [Cancelled video.mp4 from alice; what arrived is kept, and an offer of it again resumes.]")
        self.alice.expect_exact(">>> [bob cancelled video.mp4.]")
        self.alice.send(f"sendfile bob {path}")
        self.bob.expect_exact(">>> [alice offers video.mp4 (20.0 MiB); type accept alice or decline alice]")
        self.bob.send("accept alice")
        line = self.bob.expect(r"^>>> \[Receiving video\.mp4 \(20\.0 MiB\) from alice, resuming with (\d+\.\d) MiB already here\.\]$")
        kept = float(re.search(r"with (\d+\.\d) MiB", line).group(1))
        self.assertGreaterEqual(kept, 6.0, line)  # at least the 30 % seen before the cancel
        saved_to = self.saved("video.mp4", timeout=120)
        self.assertEqual(digest(saved_to), want)

    def test_sendfile_refusals_each_have_a_line(self):
        self.pair()
        self.alice.send(f"sendfile bob {self.dir}")
        self.alice.expect_exact(f">>> [Error: refusing to use {self.dir}: it is not a regular file]")
        missing = os.path.join(self.dir, "nope.txt")
        self.alice.send(f"sendfile bob {missing}")
        self.alice.expect(r"^>>> \[Error: cannot open " + re.escape(missing) + r": No such file or directory\]$")
        self.alice.send("sendfile carol " + missing)
        self.alice.expect_exact(">>> [Error: unknown client carol; type list to see the table]")
        self.alice.send("sendfile alice " + missing)
        self.alice.expect_exact(">>> [Error: you cannot send a file to yourself]")
        self.bob.send("accept alice")
        self.bob.expect_exact(">>> [Error: alice offers no file]")


class Kept(Files):
    """bob offline, alice sending him files through the server."""

    def bob_away(self):
        self.pair()
        self.bob.send("dereg bob")
        self.bob.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(self.alice, ["alice"])

    def upload(self, name, size, line_size):
        path = os.path.join(self.dir, name)
        want = write_random(path, size)
        self.alice.send(f"sendfile bob {path}")
        self.alice.expect_exact(f">>> [bob is offline; sending {name} ({line_size}) to the server for bob.]")
        return want

    def take(self, name, line_size, want):
        """bob is offered `name`, kept by the server, accepts it, and it arrives byte-identical."""
        self.bob.expect_exact(f">>> [alice offers {name} ({line_size}); type accept alice or decline alice]")
        self.bob.send("accept alice")
        self.bob.expect_exact(f">>> [Receiving {name} ({line_size}) from alice.]")
        saved_to = os.path.join(self.downloads, name)
        self.bob.expect_exact(f">>> [File {name} from alice saved to {saved_to}.]", timeout=30)
        self.assertEqual(digest(saved_to), want)


class KeptFilesTest(Kept, ChatTest):
    """Files the server keeps for an offline recipient (SPEC §12), with small limits."""

    server_args = ChatTest.server_args + ["--max-file-size", "1M", "--file-quota", "1M"]

    def test_an_offline_recipient_gets_the_file_from_the_server_after_reg(self):
        self.bob_away()
        want = self.upload("kept.bin", 600 * 1024, "600.0 KiB")
        self.alice.expect_exact(">>> [kept.bin saved by the server for bob.]", timeout=30)
        self.bob.send("reg bob")
        self.bob.expect_exact(WELCOME)
        self.take("kept.bin", "600.0 KiB", want)
        # Downloaded and checked, it is deleted: the next registration offers nothing, and a
        # file as large fits the quota again.
        self.bob.send("dereg bob")
        self.bob.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(self.alice, ["alice"])
        self.upload("again.bin", 600 * 1024, "600.0 KiB")
        self.alice.expect_exact(">>> [again.bin saved by the server for bob.]", timeout=30)
        mark = self.bob.mark()
        self.bob.send("reg bob")
        self.bob.expect_exact(">>> [alice offers again.bin (600.0 KiB); type accept alice or decline alice]")
        self.bob.send("decline alice")
        self.bob.expect_exact(">>> [Declined again.bin from alice.]")
        self.assertEqual([l for l in self.bob.lines[mark:] if "offers kept.bin" in l], [], self.bob.dump())

    def test_a_file_larger_than_the_limit_is_refused_with_the_line(self):
        self.bob_away()
        self.upload("big.bin", 2 * MiB, "2.0 MiB")
        self.alice.expect_exact(
            ">>> [The server did not take big.bin for bob: the file is larger than the server's limit of 1 MiB.]")

    def test_the_quota_full_is_refused_with_the_line(self):
        self.bob_away()
        self.upload("one.bin", 600 * 1024, "600.0 KiB")
        self.alice.expect_exact(">>> [one.bin saved by the server for bob.]", timeout=30)
        self.upload("two.bin", 600 * 1024, "600.0 KiB")
        self.alice.expect_exact(
            ">>> [The server did not take two.bin for bob: the space the server keeps for bob is full (1 MiB).]")

    def test_a_peer_online_but_not_answering_gets_the_file_through_the_server(self):
        self.pair()
        # bob is online in alice's table but answers nothing (a suspended laptop): the offer's
        # Direct gets no receipt within the retry span (--ack-timeout 100 x 6 tries: 0.6 s).
        self.bob.pause()
        self.addCleanup(self.bob.resume)
        path = os.path.join(self.dir, "memo.bin")
        want = write_random(path, 300 * 1024)
        self.alice.send(f"sendfile bob {path}")
        self.alice.expect_exact(">>> [Offering memo.bin (300.0 KiB) to bob.]")
        self.alice.expect_exact(">>> [bob did not answer; sending memo.bin to the server for bob.]")
        self.alice.expect_exact(">>> [memo.bin saved by the server for bob.]", timeout=30)
        # The server offers it to bob now (he is online there), a little after its answer to
        # alice: bob wakes once that offer waits in his socket, behind alice's (nothing else is
        # sent to him meanwhile), as it would after a longer sleep.
        queued = udp_rx_queue(self.bob.port)
        end = time.monotonic() + DEADLINE
        while udp_rx_queue(self.bob.port) <= queued:
            self.assertLess(time.monotonic(), end, "the server's offer never reached bob's socket")
            time.sleep(0.01)  # polling the socket's queue, not synchronising on output
        self.bob.resume()
        self.take("memo.bin", "300.0 KiB", want)
        # bob read alice's offer late, then the server's offer of the same file: one offer shown,
        # and accepting it asked the server, not alice (who would have cancelled it).
        self.assertEqual(self.bob.count(r"^>>> \[alice offers memo\.bin "), 1, self.bob.dump())
        self.assertEqual(self.bob.count(r"cancelled memo\.bin"), 0, self.bob.dump())


class KeptUploadStallTest(Kept, ChatTest):
    # 100 datagrams a second from one address (a second's worth at once): a 1 MiB upload, 730
    # chunks, takes several seconds, so the server can be stopped in the middle of it.
    server_args = ChatTest.server_args + ["--rate-limit", "100"]

    def test_an_upload_to_a_server_that_stops_answering_stops_with_the_line(self):
        self.bob_away()
        self.upload("slow.bin", MiB, "1.0 MiB")
        self.alice.expect(PROGRESS.format(name=re.escape("slow.bin"), pct=20, total=re.escape("1.0 MiB")), timeout=30)
        self.server.pause()
        self.addCleanup(self.server.resume)
        stopped = time.monotonic()
        # No chunk acknowledged for the sender's stall limit (files::SenderOptions::stall_limit,
        # 15 s): the upload ends, and the file is not kept.
        self.alice.expect_exact(">>> [The transfer of slow.bin to the server stopped: no answer.]", timeout=45)
        self.assertGreater(time.monotonic() - stopped, 10, self.alice.dump())
        self.assertEqual(self.alice.seen(r"saved by the server"), [], self.alice.dump())
        self.alice.send("transfers")
        self.alice.expect_exact("[No file transfers.]")


class KeptFileExpiryTest(Kept, ChatTest):
    # Files kept for 0.0001 days (8.64 s, kept as 9 s), checked as often.
    KEEP_S = 9
    server_args = ChatTest.server_args + ["--file-days", "0.0001"]

    def test_a_file_nobody_takes_within_file_days_is_deleted_and_never_offered(self):
        self.bob_away()
        self.upload("old.bin", 3000, "2.9 KiB")
        self.alice.expect_exact(">>> [old.bin saved by the server for bob.]", timeout=30)
        kept = time.monotonic()
        after_kept = self.alice.mark()
        # The server's check (every 9 s) deletes it once it is older than 9 s: within 18 s.
        self.server.expect(r"deleted 1 files nobody downloaded in time$", timeout=2 * self.KEEP_S + DEADLINE)
        self.assertGreater(time.monotonic() - kept, self.KEEP_S - 1, self.server.dump())
        # A file kept after it is offered at bob's registration, the deleted one is not: the
        # server offers what it keeps in one go, oldest first.
        self.upload("new.bin", 3000, "2.9 KiB")
        self.alice.expect_exact(">>> [new.bin saved by the server for bob.]", timeout=30)
        self.bob.send("reg bob")
        self.bob.expect_exact(WELCOME)
        self.bob.expect_exact(">>> [alice offers new.bin (2.9 KiB); type accept alice or decline alice]")
        self.assertEqual(self.bob.seen(r"old\.bin"), [], self.bob.dump())
        # alice is not told of the deletion (SPEC §12 says nothing of it; README: she is not told).
        self.assertEqual(self.alice.count(r"old\.bin", since=after_kept), 0, self.alice.dump())

class LossyFilesTest(Files, NetnsChatTest):
    def test_a_20_mib_file_arrives_intact_at_20_percent_loss(self):
        self.pair(timeout=30)
        # From now on one datagram in five is dropped on the namespace's loopback, both ways. Each
        # datagram alone: the sender's UDP GSO runs are cut up before loopback (gso_max_segs 1) and
        # the rule is on INPUT, which sees the pieces (OUTPUT would drop a whole run at a time).
        subprocess.run(self.prefix() + ["ip", "link", "set", "lo", "gso_max_segs", "1"], check=True)
        self.iptables("-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random",
                      "--probability", "0.2", "-j", "DROP")
        _, want = self.offer("lossy.bin", 20 * MiB, "20.0 MiB")
        self.bob.send("accept alice")
        saved_to = self.saved("lossy.bin", timeout=240)
        self.assertEqual(digest(saved_to), want)


if __name__ == "__main__":
    unittest.main()
