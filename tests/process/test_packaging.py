"""Operator packaging (packaging/): the .deb that `cpack -G DEB` makes installs a working
ChatApp on PATH, a man page that renders, and a systemd unit that systemd accepts.

Needs root (dpkg -i). Tools that are missing are installed with apt-get: dpkg-dev
(dpkg-shlibdeps for the package's Depends), man-db (man -l), systemd (systemd-analyze).
The package is built from the build tree CHATAPP_BIN lives in, installed over any
earlier chatapp, and removed again (dpkg -r chatapp) at the end.
"""
import glob
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from harness import BIN, free_port

BUILD_DIR = os.path.dirname(os.path.abspath(BIN))
PACKAGE = "chatapp"
PREFIX = "/usr"
INSTALLED_BIN = PREFIX + "/bin/ChatApp"
MAN_PAGE = PREFIX + "/share/man/man1/ChatApp.1"          # .gz when gzip was found at configure time
UNIT_NAME = "chatapp-server.service"
UNIT = PREFIX + "/lib/systemd/system/" + UNIT_NAME
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Hardening guard: `systemd-analyze security` exposure (0.0 best .. 10.0 worst) must stay at or below this.
MAX_EXPOSURE = 2.0

_apt_updated = False


def run(cmd, timeout=60, env=None, cwd=None, check=False):
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env, cwd=cwd)
    out, err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    if check and r.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {r.returncode}\nstdout:\n{out}\nstderr:\n{err}")
    return r.returncode, out, err


def installed(pkg):
    code, out, _ = run(["dpkg-query", "-W", "-f=${Status}", pkg])
    return code == 0 and out.strip().endswith("install ok installed")


def ensure_packages(pkgs):
    """apt-get install whichever of `pkgs` is missing; returns an error text or None."""
    global _apt_updated
    missing = [p for p in pkgs if not installed(p)]
    if not missing:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        code, out, err = run(["apt-get", "update", "-qq"], timeout=300, env=env)
        if code != 0:
            return f"apt-get update failed ({code}): {err.strip()[-500:]}"
        _apt_updated = True
    code, out, err = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing,
                         timeout=600, env=env)
    if code != 0:
        return f"apt-get install {' '.join(missing)} failed ({code}): {err.strip()[-500:]}"
    return None


def version_of(binary):
    code, out, err = run([binary, "--version"], timeout=10)
    m = re.fullmatch(r"ChatApp (\S+)\n", out)
    if code != 0 or m is None:
        raise AssertionError(f"{binary} --version: exit {code}, stdout {out!r}, stderr {err!r}")
    return m.group(1)


class PackagingTest(unittest.TestCase):
    deb = None
    systemd_missing = None   # why systemd-analyze cannot be used, or None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("installing the .deb needs root (dpkg -i); run as root")
        if shutil.which("dpkg") is None or shutil.which("apt-get") is None:
            raise unittest.SkipTest("not a Debian system: no dpkg/apt-get")
        if not os.path.exists(os.path.join(BUILD_DIR, "CPackConfig.cmake")):
            raise AssertionError(f"{BUILD_DIR} has no CPackConfig.cmake: is packaging/ included and configured?")
        problem = ensure_packages(["dpkg-dev", "man-db"])
        if problem:
            raise AssertionError(problem)
        problem = ensure_packages(["systemd"])
        if problem or shutil.which("systemd-analyze") is None:
            cls.systemd_missing = problem or "systemd-analyze not found after installing systemd"
        cls.version = version_of(BIN)

        cls.out = tempfile.mkdtemp(prefix="chatapp-deb-")
        # cpack first brings the build up to date (its preinstall step); others may be
        # building the same tree at the same moment, so one retry on failure.
        for attempt in (1, 2):
            code, out, err = run(["cpack", "-G", "DEB", "-B", cls.out], cwd=BUILD_DIR, timeout=900)
            debs = glob.glob(os.path.join(cls.out, f"{PACKAGE}_*.deb"))
            if code == 0 and len(debs) == 1:
                break
            if attempt == 2:
                shutil.rmtree(cls.out, True)
                raise AssertionError(f"cpack -G DEB exited {code}, made {debs}\nstdout:\n{out}\nstderr:\n{err}")
            time.sleep(5)
        cls.deb = debs[0]
        code, out, err = run(["dpkg", "-i", cls.deb], timeout=180)
        if code != 0:
            shutil.rmtree(cls.out, True)
            raise AssertionError(f"dpkg -i {cls.deb} exited {code}\nstdout:\n{out}\nstderr:\n{err}")

    @classmethod
    def tearDownClass(cls):
        if cls.deb is not None:
            code, out, err = run(["dpkg", "-r", PACKAGE], timeout=180)
            shutil.rmtree(cls.out, True)
            if code != 0:
                raise AssertionError(f"dpkg -r {PACKAGE} exited {code}\n{out}\n{err}")
            # dpkg keeps a removed package's postrm for a purge ("rc" state): purge it too.
            # The purge leaves /var/lib/private/chatapp alone (stored messages are users' data).
            run(["dpkg", "--purge", PACKAGE], timeout=180)
            if os.path.exists(INSTALLED_BIN):
                raise AssertionError(f"{INSTALLED_BIN} is still there after dpkg -r")

    # ------------------------------------------------------------ the package itself

    def field(self, name):
        code, out, err = run(["dpkg-deb", "-f", self.deb, name], check=True)
        return out.strip()

    def test_package_metadata(self):
        self.assertEqual(self.field("Package"), PACKAGE)
        self.assertEqual(self.field("Version"), self.version, "package version is not PROJECT_VERSION")
        self.assertRegex(self.field("Maintainer"), r".+ <[^@ ]+@[^@ ]+>")
        self.assertTrue(self.field("Description"), "no Description")
        depends = self.field("Depends")
        for lib in ("libsqlite3-0", "libsodium23", "libboost-program-options1.74.0", "libspdlog1.10", "libfmt9", "libc6"):
            self.assertIn(lib, depends, f"Depends lacks {lib}: {depends}")
        code, out, err = run(["dpkg-query", "-W", "-f=${Status} ${Version}", PACKAGE], check=True)
        self.assertEqual(out, f"install ok installed {self.version}")

    def test_package_contents(self):
        code, out, err = run(["dpkg-deb", "-c", self.deb], check=True)
        paths = [line.split()[-1].lstrip(".") for line in out.splitlines() if line.strip()]
        files = [p for p in paths if not p.endswith("/")]
        self.assertIn(INSTALLED_BIN, files)
        self.assertIn(UNIT, files)
        self.assertTrue(MAN_PAGE in files or MAN_PAGE + ".gz" in files, f"no man page in {files}")
        outside = [p for p in paths if not p.startswith(PREFIX + "/")]
        self.assertEqual(outside, [], "files outside /usr (CPACK_PACKAGING_INSTALL_PREFIX)")
        # Only what packaging/ installs: no libraries, headers, tests or benchmarks.
        self.assertEqual(len(files), 3, f"unexpected files in the package: {files}")

    # ------------------------------------------------------------ the binary

    def test_binary_runs_from_path(self):
        env = dict(os.environ, PATH=SYSTEM_PATH)
        self.assertEqual(shutil.which("ChatApp", path=SYSTEM_PATH), INSTALLED_BIN)
        code, out, err = run(["ChatApp", "--version"], env=env, timeout=10)
        self.assertEqual((code, out, err), (0, f"ChatApp {self.version}\n", ""))
        code, out, err = run(["ChatApp", "--help"], env=env, timeout=10)
        self.assertEqual(code, 0, err)
        self.assertIn("ChatApp -s <port>", out)
        code, out, err = run(["ldd", INSTALLED_BIN], check=True)
        self.assertNotIn("not found", out, "a shared library the package needs is missing")
        code, out, err = run(["ChatApp", "-s", "80"], env=env, timeout=10)
        self.assertEqual(code, 2, "a bad command line must exit 2 (as the man page says)")

    # ------------------------------------------------------------ the man page

    def man_path(self):
        for p in (MAN_PAGE + ".gz", MAN_PAGE):
            if os.path.exists(p):
                return p
        self.fail(f"{MAN_PAGE}[.gz] not installed (a dpkg path-exclude for /usr/share/man?)")

    def render_man(self, args):
        env = dict(os.environ, MANWIDTH="100", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8", PATH=SYSTEM_PATH)
        env.pop("MAN_KEEP_FORMATTING", None)
        return run(["man", "--warnings"] + args, env=env, timeout=30)

    def test_man_page_renders(self):
        code, text, err = self.render_man(["-l", self.man_path()])
        self.assertEqual(code, 0, err)
        self.assertEqual(err.strip(), "", "groff warnings while rendering the man page")
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "STATUS LINES", "FILES",
                        "EXIT STATUS", "SIGNALS", "EXAMPLES", "SEE ALSO"):
            self.assertRegex(text, rf"(?m)^{section}$", f"no {section} section")
        for needle in ("send_all", "ChatApp -s port", "ChatApp -c name server-ip server-port client-port",
                       ">>> [Welcome, You are registered.]", ">>> [Messages received by the server and saved]",
                       ">>> [You have messages]", "chat.db", "select * from messages", "SIGHUP"):
            self.assertIn(needle, text)
        self.assertIn(f"ChatApp {self.version}", text, "the page's footer does not carry PROJECT_VERSION")

    def test_man_page_documents_every_option(self):
        code, help_text, err = run([INSTALLED_BIN, "--help"], timeout=10, check=True)
        options = set(re.findall(r"--[a-z][a-z-]+", help_text))
        self.assertGreaterEqual(len(options), 7, help_text)
        code, text, err = self.render_man(["-l", self.man_path()])
        for opt in sorted(options):
            self.assertIn(opt, text, f"{opt} (from --help) is not in the man page")

    def test_man_finds_page_by_name(self):
        code, out, err = self.render_man(["-w", "ChatApp"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), self.man_path())

    # ------------------------------------------------------------ the systemd unit

    def unit_settings(self):
        settings = {}
        with open(UNIT, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith(("#", ";", "[")) and "=" in line:
                    key, value = line.split("=", 1)
                    settings.setdefault(key.strip(), []).append(value.strip())
        return settings

    def need_systemd_analyze(self):
        if self.systemd_missing:
            self.skipTest(f"systemd tools cannot be installed here: {self.systemd_missing}")

    def test_unit_verifies(self):
        self.need_systemd_analyze()
        # Without a running systemd, verify still loads the unit: syntax, ExecStart's binary,
        # the Documentation= man page. It exits 0 on ignored settings, so read its output.
        code, out, err = run(["systemd-analyze", "verify", UNIT], timeout=60, env=dict(os.environ, PATH=SYSTEM_PATH))
        lines = (out + err).splitlines()
        about_unit = [l for l in lines if "chatapp" in l.lower()]
        self.assertEqual(about_unit, [], "systemd-analyze verify complains about the unit:\n" + "\n".join(lines))
        self.assertEqual(code, 0, "systemd-analyze verify failed:\n" + "\n".join(lines))

    def test_unit_is_hardened(self):
        self.need_systemd_analyze()
        code, out, err = run(["systemd-analyze", "security", "--offline=true",
                              f"--threshold={int(MAX_EXPOSURE * 10)}", UNIT], timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        self.assertIsNotNone(m, out + err)
        self.assertLessEqual(float(m.group(1)), MAX_EXPOSURE, out)
        self.assertEqual(code, 0, out + err)

    def test_unit_settings(self):
        s = self.unit_settings()
        for key, value in (("DynamicUser", "yes"), ("StateDirectory", "chatapp"), ("Restart", "on-failure"),
                           ("After", "network.target"), ("WantedBy", "multi-user.target"),
                           ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                           ("PrivateTmp", "yes")):
            self.assertIn(value, s.get(key, []), f"{UNIT_NAME}: {key}={value} expected, have {s.get(key)}")
        (exec_start,) = s["ExecStart"]
        argv = shlex.split(exec_start)
        self.assertEqual(argv[0], INSTALLED_BIN)
        self.assertTrue(os.access(argv[0], os.X_OK), f"ExecStart binary {argv[0]} is not executable")

    def test_unit_command_line_serves_and_stops_cleanly(self):
        """ExecStart's command line, run by hand on a free port and a temp data directory:
        the server comes up, opens chat.db, and SIGTERM (systemctl stop) ends it with status 0."""
        s = self.unit_settings()
        env_defaults = dict(e.split("=", 1) for v in s.get("Environment", []) for e in shlex.split(v))
        argv = []
        for a in shlex.split(s["ExecStart"][0]):
            m = re.fullmatch(r"\$\{?(\w+)\}?", a)
            argv += shlex.split(env_defaults.get(m.group(1), "")) if m else [a]
        self.assertIn("-s", argv)
        self.assertIn("--data-dir", argv)
        data = tempfile.mkdtemp(prefix="chatapp-unit-")
        self.addCleanup(shutil.rmtree, data, True)
        port = free_port()
        argv[argv.index("-s") + 1] = str(port)
        argv[argv.index("--data-dir") + 1] = os.path.join(data, "state")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=data)
        try:
            # Wait for the start-up log line (the signal handler is in place by then), never sleep to sync.
            err = b""
            deadline = time.monotonic() + 10
            while b"listening on" not in err and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stderr], [], [], 0.2)
                if ready:
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        break
                    err += chunk
            self.assertIn(f"listening on 0.0.0.0:{port}".encode(), err, f"server did not start: {err!r}")
            self.assertTrue(os.path.exists(os.path.join(data, "state", "chat.db")),
                            "the server did not create chat.db in --data-dir")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=10)
            err += proc.stderr.read()
            self.assertEqual(code, 0, f"SIGTERM must be a clean exit\n{err.decode('utf-8', 'replace')}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


if __name__ == "__main__":
    unittest.main()
