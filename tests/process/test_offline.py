"""Offline store, dereg/reg and the channel (SPEC §4-§7), with real processes."""
import re
import signal
import unittest

from harness import ChatTest, DEADLINE

SAVED = r"^>>> \[Messages received by the server and saved\]$"
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def message_lines(proc):
    """Lines that show a chat message (direct, channel, saved), in order."""
    return [l for l in proc.lines if re.match(r"^>>> (\[Channel_Message |Channel_Message |\w[\w.-]*: )", l)]


class OfflineTest(ChatTest):
    def leave_silently(self, client):
        client.signal(signal.SIGINT)
        self.assertEqual(client.wait_exit(), 0)

    def test_worked_example_of_spec_section_7(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        c3 = self.start_client("c3")
        for c in (c1, c2, c3):
            self.wait_table(c, ["c1", "c2", "c3"])
        self.leave_silently(c1)

        c2.send("send_all Welcome to Channel")
        c2.expect_exact(">>> [Message received by Server.]")
        c3.expect_exact(">>> [Channel_Message c2: Welcome to Channel]")
        # SPEC §7 allows "No ACK from c1" or "c1 is offline", depending on whether the table
        # change (the relay found c1 silent) arrived before the send. Waiting for it makes the
        # line certain; the "No ACK" path is test_saved_message_survives_server_sigkill's.
        self.wait_table(c2, ["c2", "c3"])
        c2.send("send c1 Hello")
        c2.expect_exact(">>> [c1 is offline, message sent to server.]")
        c2.expect(SAVED)
        self.wait_table(c3, ["c2", "c3"])
        c3.send("send c1 Hello!!")
        c3.expect_exact(">>> [c1 is offline, message sent to server.]")
        c3.expect(SAVED)

        again = self.start_client("c1")
        again.expect_exact(">>> [You have messages]")
        again.expect(rf"^>>> Channel_Message c2: {TS} Welcome to Channel$")
        again.expect(rf"^>>> c2: {TS} Hello$")
        again.expect(rf"^>>> c3: {TS} Hello!!$")
        self.assertEqual(len(message_lines(again)), 3, again.dump())
        self.leave_silently(again)

        # A third start gets nothing twice: the first thing shown is a fresh message.
        third = self.start_client("c1")
        self.wait_table(c2, ["c1", "c2", "c3"])
        c2.send("send c1 fresh")
        third.expect_exact(">>> c2: fresh")
        self.assertEqual(message_lines(third), [">>> c2: fresh"])
        self.assertEqual(third.seen(r"You have messages"), [])

    def test_dereg_then_saved_then_reg_delivers(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        c2.send("dereg c2")
        c2.expect_exact(">>> [You are Offline. Bye.]")
        self.wait_table(c1, ["c1"])
        c1.send("send c2 while you were away")
        c1.expect_exact(">>> [c2 is offline, message sent to server.]")
        c1.expect(SAVED)
        c2.send("send c1 not now")
        c2.expect(r"^>>> \[Error: you are offline")
        c2.send("reg c2")
        c2.expect_exact(">>> [Welcome, You are registered.]")
        c2.expect_exact(">>> [You have messages]")
        c2.expect(rf"^>>> c1: {TS} while you were away$")
        self.wait_table(c1, ["c1", "c2"])
        c1.send("send c2 back")
        c2.expect_exact(">>> c1: back")
        c1.expect_exact(">>> [Message received by c2.]")

    def test_dereg_other_name_is_an_error(self):
        c1 = self.start_client("c1")
        c1.send("dereg c2")
        c1.expect(r"^>>> \[Error: dereg takes your own name")

    def test_saved_message_survives_server_sigkill(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        self.leave_silently(c2)
        c1.send("send c2 kept across a crash")
        # Nothing has sent to c2 since it left (no relay, no probe), so nobody marked it offline:
        # c1's table still shows it online and the direct send times out (SPEC §3).
        c1.expect_exact(">>> [No ACK from c2, message sent to server.]")
        c1.expect(SAVED)
        self.server.kill()  # SIGKILL right after "saved"
        self.server = self.start_server()
        again = self.start_client("c2")
        again.expect_exact(">>> [You have messages]")
        again.expect(rf"^>>> c1: {TS} kept across a crash$")

    def test_clients_keep_table_updates_after_server_restart(self):
        c1 = self.start_client("c1")
        c2 = self.start_client("c2")
        self.wait_table(c1, ["c1", "c2"])
        self.server.kill()
        self.server = self.start_server()
        self.start_client("c3")
        rows = self.wait_table(c1, ["c1", "c2", "c3"])
        self.assertEqual(len(rows), 3)
        self.wait_table(c2, ["c1", "c2", "c3"])

    def test_server_gone_send_all_and_dereg(self):
        c1 = self.start_client("c1")
        self.server.kill()
        c1.send("send_all anyone?")
        c1.expect_exact(">>> [Server not responding.]")
        c1.send("dereg c1")
        c1.expect_exact(">>> [Server not responding]")
        c1.expect_exact(">>> [Exiting]")
        self.assertNotEqual(c1.wait_exit(), 0)

    def test_channel_reaches_online_now_and_absent_later_once(self):
        sender = self.start_client("s")
        members = [self.start_client(f"m{i:02d}") for i in range(50)]
        self.wait_table(sender, ["s"] + [m.name for m in members])
        gone, staying = members[:10], members[10:]
        for m in gone:
            self.leave_silently(m)
        sender.send("send_all hello channel")
        sender.expect_exact(">>> [Message received by Server.]")
        for m in staying:
            m.expect_exact(">>> [Channel_Message s: hello channel]")
        # The silent ones are still online to the server until their relays go unanswered; it
        # marks them offline and saves their copies in the same turn. Once the sender sees them
        # offline, the copies are saved, so each restart is told "[You have messages]" (a
        # restart before that gets its copy delivered later, without that line).
        self.wait_table(sender, ["s"] + [m.name for m in staying])
        for m in gone:
            back = self.start_client(m.name)
            back.expect_exact(">>> [You have messages]")
            back.expect(rf"^>>> Channel_Message s: {TS} hello channel$")
        # Once each: nobody shows it twice.
        for m in staying:
            self.assertEqual(len(m.seen(r"hello channel")), 1, m.dump())


if __name__ == "__main__":
    unittest.main()
