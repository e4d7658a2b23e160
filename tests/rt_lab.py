"""A real Request Tracker 5 on loopback for the alert hooks' tests: own database, config and port."""

from __future__ import annotations

import ctypes
import json
import mailbox
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "RTNAME",
    "RT_ROOT_PASSWORD",
    "RT_ROOT_USER",
    "MailgateResult",
    "RtLabError",
    "RtServer",
    "rt_available",
    "start_rt",
]

# Debian's request-tracker5, rt5-db-sqlite, rt5-standalone and rt5-clients (scripts/test).
RT_LIB = Path("/usr/share/request-tracker5/lib")
RT_SERVER = Path("/usr/share/request-tracker5/libexec/rt-server")
RT_SETUP_DATABASE = Path("/usr/sbin/rt-setup-database-5")
RT_MAILGATE = Path("/usr/bin/rt-mailgate-5")

RTNAME = "rt.example.test"  # RT's name: the subject tag is "[rt.example.test #ID]"
RT_ROOT_USER = "root"
RT_ROOT_PASSWORD = "relayaudit-rt-root"  # a throw-away RT on loopback
QUEUE = "General"
LOOPBACK = "127.0.0.1"
WORKERS = 2  # Starlet's default is 10; tests send one request at a time

SETUP_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
MAILGATE_TIMEOUT_S = 60.0

# Everything RT reads is in this one file: RT_SITE_CONFIG names it and RT_SITE_CONFIG_DIR names an
# empty directory, so /etc/request-tracker5 (root-only, and the machine's own database) is never
# read. RT's var, Mason cache and session directories are package variables, set here too, so
# nothing is written under /var either.
_SITE_CONFIG = """\
Set($rtname, {rtname});
Set($Organization, 'example.test');
Set($CorrespondAddress, {correspond});
Set($CommentAddress, {comment});
Set($Timezone, 'UTC');
Set($DatabaseType, 'SQLite');
Set($DatabaseName, {database});        # for SQLite: the file's path
Set($WebDomain, {host});
Set($WebPort, {port});
Set($WebPath, '');                      # Debian's /rt would break every _url REST2 returns
Set($WebBaseURL, {base_url});
Set($MailCommand, 'mbox');              # RT's own mail: one mbox per worker in $RT::VarPath
Set($BcryptCost, 4);                    # default 12: about 0.4 s per authenticated request
Set($LogToSyslog, undef);
Set($LogToFile, undef);
Set($LogToSTDERR, 'warning');           # the server's log file
$RT::VarPath = {var};
$RT::MasonDataDir = {mason};
$RT::MasonSessionDir = {sessions};
1;
"""

# Run once on the new database: root's password, the rights an alert mail needs, a REST2 token.
_SETUP_SCRIPT = """\
use strict;
use warnings;
use lib {lib};
use RT;
RT::LoadConfig();
RT::Init();
my ($user, $password, $queue_name) = @ARGV;
my $root = RT::User->new(RT->SystemUser);
$root->Load($user) or die "no user $user\\n";
my ($ok, $msg) = $root->SetPassword($password);
$ok or die "password: $msg\\n";
my $queue = RT::Queue->new(RT->SystemUser);
$queue->Load($queue_name) or die "no queue $queue_name\\n";
my $everyone = RT::Group->new(RT->SystemUser);
$everyone->LoadSystemInternalGroup('Everyone');
# a fresh RT lets nobody mail in; rt-mailgate still exits 0 when RT refuses
for my $right (qw(CreateTicket ReplyToTicket)) {{
    ($ok, $msg) = $everyone->PrincipalObj->GrantRight(Right => $right, Object => $queue);
    $ok or die "grant $right: $msg\\n";
}}
my ($id, $text, $token) = RT::AuthToken->new(RT::CurrentUser->new($root))
    ->Create(Owner => $root->id, Description => 'relayaudit tests');
$id or die "token: $text\\n";
print "$token\\n";
"""

_BIND_FAILED = "couldn't start up a web server"
_DIRECTORY_PREFIX = "relayaudit-rt-"
_OWNER_FILE = "owner.pid"  # the test process; RT dies with it (PR_SET_PDEATHSIG)
_PR_SET_PDEATHSIG = 1
_GATEWAY_ANSWER = re.compile(r"^(ok|not ok\b.*|temporary failure\b.*)$", re.MULTILINE)


class RtLabError(RuntimeError):
    """RT could not be set up, started or queried; the message says where its log is."""


def rt_available() -> str | None:
    """Return None when an RT lab can run here, else the reason it cannot."""
    for path, package in (
        (RT_SERVER, "request-tracker5"),
        (RT_SETUP_DATABASE, "request-tracker5"),
        (RT_MAILGATE, "rt5-clients"),
    ):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install {package} (scripts/test does, as root)"
    for module, package in (("DBD::SQLite", "rt5-db-sqlite"), ("Starlet", "rt5-standalone")):
        try:
            found = subprocess.run(
                ["perl", f"-M{module}", "-e1"], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot run perl to look for {module}: {exc}"
        if found.returncode != 0:
            return f"Perl module {module} not found: install {package} (scripts/test does, as root)"
    return None


@dataclass(frozen=True)
class MailgateResult:
    """What rt-mailgate-5 did: its exit status and RT's one-line answer ("ok", "not ok - ...")."""

    returncode: int
    answer: str  # "" when RT never answered (the gateway exits 75 then)
    stderr: str

    @property
    def accepted(self) -> bool:
        # The gateway exits 0 for "not ok" too: only RT's answer tells a refusal apart.
        return self.returncode == 0 and self.answer == "ok"


def _perl_string(value: object) -> str:
    """A single-quoted Perl literal (a temporary directory's name may hold any character)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by kill -9 (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class RtServer:
    """One RT 5 (SQLite, Starlet) on 127.0.0.1, in a directory of its own; see start_rt()."""

    def __init__(self, directory: Path, *, workers: int = WORKERS) -> None:
        self.directory = directory
        self.workers = workers
        self.rtname = RTNAME
        self.queue = QUEUE
        self.username = RT_ROOT_USER
        self.password = RT_ROOT_PASSWORD
        self.token = ""
        self.port = 0
        self.database = directory / "rt.db"
        self.pristine = directory / "rt.pristine.db"  # the database as start_rt() left it
        self.mail_dir = directory / "var"  # RT's outgoing mail, one mbox file per worker
        self.log_path = directory / "rt-server.log"
        self.site_config = directory / "RT_SiteConfig.pm"
        self.timings: dict[str, float] = {}  # seconds per set-up step, for reports
        self._process: subprocess.Popen[bytes] | None = None
        # urllib would honour http_proxy; RT is on loopback, always reached directly
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def rest2_url(self) -> str:
        return f"{self.base_url}/REST/2.0"

    @property
    def credentials(self) -> tuple[str, str]:
        """User and password for HTTP basic auth (REST2 takes both basic auth and the token)."""
        return self.username, self.password

    # -- set-up ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RT_SITE_CONFIG"] = str(self.site_config)
        env["RT_SITE_CONFIG_DIR"] = str(self.directory / "RT_SiteConfig.d")
        return env

    def _write_config(self) -> None:
        self.site_config.write_text(
            _SITE_CONFIG.format(
                rtname=_perl_string(self.rtname),
                correspond=_perl_string(f"rt@{self.rtname}"),
                comment=_perl_string(f"rt-comment@{self.rtname}"),
                database=_perl_string(self.database),
                host=_perl_string(LOOPBACK),
                port=self.port,
                base_url=_perl_string(self.base_url),
                var=_perl_string(self.mail_dir),
                mason=_perl_string(self.directory / "mason"),
                sessions=_perl_string(self.directory / "sessions"),
            ),
            encoding="utf-8",
        )

    def _run(self, what: str, argv: list[str]) -> str:
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv,
                cwd=self.directory,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SETUP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RtLabError(f"{what} took more than {SETUP_TIMEOUT_S} s") from exc
        self.timings[what] = time.monotonic() - started
        if done.returncode != 0:
            raise RtLabError(
                f"{what} exited {done.returncode}:\n{done.stdout.decode(errors='replace')}"
                f"{done.stderr.decode(errors='replace')}"
            )
        return done.stdout.decode()

    def prepare(self) -> None:
        """Make the pristine database: RT's initial data, root's password, mail rights, a token."""
        for sub in ("RT_SiteConfig.d", "var", "mason", "sessions"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self._write_config()
        self._run("rt-setup-database", [str(RT_SETUP_DATABASE), "--action", "init"])
        script = self.directory / "setup.pl"
        script.write_text(_SETUP_SCRIPT.format(lib=_perl_string(RT_LIB)), encoding="utf-8")
        output = self._run(
            "rights and token", ["perl", str(script), self.username, self.password, self.queue]
        )
        self.token = output.strip().splitlines()[-1]
        shutil.copyfile(self.database, self.pristine)

    # -- the server -----------------------------------------------------------------------

    def start(self) -> None:
        """Start rt-server on this port (a new free one if it is taken) and wait until it serves.

        Only from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked the
        server exits (prctl(2)), so a server started from asyncio.to_thread died with the
        event loop's executor at the end of that test, and the next test met a reset connection.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RtLabError(
                "start rt-server from the main thread: it gets SIGTERM when the thread that "
                f"started it exits (this is {threading.current_thread().name})"
            )
        started = time.monotonic()
        for _attempt in range(5):
            self._write_config()
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [
                        str(RT_SERVER),
                        "--host",
                        LOOPBACK,
                        "--port",
                        str(self.port),
                        "--max-workers",
                        str(self.workers),
                    ],
                    cwd=self.directory,
                    env=self._environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # its own process group: Ctrl-C in pytest's terminal must not reach it
                    # (Debian's rt-server answers SIGINT by chowning /var/lib/request-tracker5)
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl, no locks taken
                )
            if self._wait_ready():
                self.timings.setdefault("server start", time.monotonic() - started)  # the first
                return
            if _BIND_FAILED not in self._log_tail():
                break
            self.port = _free_port()  # taken between _free_port() and rt-server's bind
        raise RtLabError(f"rt-server did not start; its log, {self.log_path}:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        """True once our RT answers an authenticated REST2 call (not just anything on the port)."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                status, _ = self.request("GET", f"/queue/{self.queue}", timeout=5.0)
            except (OSError, RtLabError):
                status = 0
            if status == 200:
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop rt-server and its workers: SIGTERM to its process group, SIGKILL if that hangs."""
        process, self._process = self._process, None
        if process is None:
            return
        # The group is ours as long as its leader is not reaped, i.e. until wait() returns.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def reset(self, *, restart: bool = False) -> None:
        """Bring RT back to the pristine database: no tickets, ids from 1, same token and rights.

        The database is restored under the running server (sqlite's backup API takes the locks
        RT's workers respect; RT flushes its record and ACL caches after every request). If RT
        still shows a ticket afterwards, or is not running, or restart=True, it is restarted on
        the pristine copy instead. A test that changes queues, custom fields or configuration
        should ask for restart=True.
        """
        started = time.monotonic()
        for mbox in self.mail_dir.glob("*.mbox"):
            mbox.unlink()
        if not restart and self.running:
            self._restore()
            try:
                if not self.tickets():
                    self.timings["last reset"] = time.monotonic() - started
                    return
            except (RtLabError, OSError):  # OSError: the server went away; start it again
                pass
        self.stop()
        shutil.copyfile(self.pristine, self.database)
        self.start()
        self.timings["last reset"] = time.monotonic() - started

    def _restore(self) -> None:
        source = sqlite3.connect(f"file:{self.pristine}?mode=ro", uri=True)
        try:
            target = sqlite3.connect(self.database, timeout=REQUEST_TIMEOUT_S)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()

    # -- talking to it --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        auth: Literal["token", "basic", "none"] = "token",
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, Any]:
        """One REST2 call (path relative to rest2_url): the HTTP status and the decoded JSON body.

        An error status is returned, not raised; only a broken connection raises (OSError).
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"  # else RT answers 415
        if auth == "token":
            headers["Authorization"] = f"token {self.token}"
        elif auth == "basic":
            pair = f"{self.username}:{self.password}".encode()
            headers["Authorization"] = f"Basic {b64encode(pair).decode()}"
        url = self.rest2_url + path
        http = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(http, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError as exc:
            raise RtLabError(f"{method} {url}: {status} with a body that is not JSON") from exc

    def _get_all(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            query = urllib.parse.urlencode({**params, "per_page": "100", "page": str(page)})
            status, body = self.request("GET", f"{path}?{query}")
            if status != 200:
                raise RtLabError(f"GET {path}: {status} {body}")
            items.extend(body["items"])
            if page >= int(body.get("pages") or 0):
                return items
            page += 1

    def tickets(self) -> list[tuple[int, str, str]]:
        """Every ticket as (id, subject, status), by id."""
        found = self._get_all(
            "/tickets", {"query": "id > 0", "fields": "Subject,Status", "orderby": "id"}
        )
        return [(int(t["id"]), t["Subject"], t["Status"]) for t in found]

    def history(self, ticket_id: int) -> list[str]:
        """The ticket's transaction types in order, e.g. ["Create", "EmailRecord", "Comment"]."""
        found = self._get_all(f"/ticket/{ticket_id}/history", {"fields": "Type"})
        return [t["Type"] for t in found]

    def mailgate(
        self, message: bytes, action: str = "correspond", *, queue: str | None = None
    ) -> MailgateResult:
        """Hand a message to RT the way an MTA alias does: rt-mailgate-5 --action ACTION.

        Check .accepted (RT's own answer) or the tickets: the gateway exits 0 on a refusal.
        """
        argv = [
            str(RT_MAILGATE),
            "--url",
            self.base_url,  # the gateway appends /REST/1.0/NoAuth/mail-gateway
            "--queue",
            queue or self.queue,
            "--action",
            action,
            "--timeout",
            str(int(MAILGATE_TIMEOUT_S)),
            "--debug",  # prints RT's answer, the only sign of a refusal
        ]
        try:
            done = subprocess.run(
                argv,
                input=message,
                capture_output=True,
                timeout=MAILGATE_TIMEOUT_S + 10,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RtLabError(f"rt-mailgate-5 took more than {MAILGATE_TIMEOUT_S} s") from exc
        stderr = done.stderr.decode(errors="replace")
        answer = _GATEWAY_ANSWER.search(stderr)
        return MailgateResult(done.returncode, answer.group(1) if answer else "", stderr)

    def sent_mail(self) -> list[Message]:
        """The mail RT sent (autoreplies, notifications) since the last reset, per worker file."""
        messages: list[Message] = []
        for path in sorted(self.mail_dir.glob("*.mbox")):
            box = mailbox.mbox(path, create=False)
            try:
                messages.extend(box)
            finally:
                box.close()
        return messages


def _remove_orphaned_directories() -> None:
    """Remove the directories of labs whose test process was killed (their RT died with it)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{_DIRECTORY_PREFIX}*"):
        try:
            owner = int((directory / _OWNER_FILE).read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue  # a lab being made right now
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def start_rt(*, workers: int = WORKERS) -> RtServer:
    """A running RT in a new temporary directory; RtServer.stop() and remove .directory after.

    Nothing of the machine's RT install is read or written (config, database, /var).
    """
    started = time.monotonic()
    _remove_orphaned_directories()
    directory = Path(tempfile.mkdtemp(prefix=_DIRECTORY_PREFIX))
    (directory / _OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")
    server = RtServer(directory, workers=workers)
    try:
        server.prepare()
        server.start()
    except BaseException:
        server.stop()
        raise
    server.timings["start_rt"] = time.monotonic() - started
    return server
