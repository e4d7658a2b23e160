"""Real Postfix instances on loopback, one per relay policy, delivering only to a loopback sink."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from loopback import read_banner

__all__ = [
    "LAB_HOSTS",
    "POLICIES",
    "POLICY_PORTS",
    "POLICY_SERVICE",
    "POSTFIX_LAB_PORT",
    "POSTFIX_SINK_HOST",
    "POSTFIX_SINK_PORT",
    "SCANNER_SOURCE",
    "SUBMISSION_PORT",
    "PostfixInstance",
    "SinkHandler",
    "SinkMessage",
    "lab_host",
    "make_lab_directory",
    "postfix_available",
    "start_lab",
    "stop_lab",
    "stop_stale_labs",
]

# Several test processes may run on one machine at once (developers side by side, xdist
# workers). Each claims a lab slot for its lifetime with an flock; slot k uses 127.0.<k>.1-4
# on port 2525 for the instances and 127.0.0.1:<2626 + index> for the sink. The first slot is
# 127.0.3.x with the sink on 2626. 127.0.10.x is skipped: relayaudit's demo lab lives there.
_SLOT_OCTETS = (3, 4, 5, 6, 7, 8, 9, *range(30, 60))
_SINK_BASE_PORT = 2626
POSTFIX_LAB_PORT = 2525
SUBMISSION_PORT = 587  # the submission policy's instance listens where submission servers do
# the greylist policy's instance asks a policy server (postgrey, tests/postgrey_lab.py) on
# 127.0.<slot>.10:10023; each test starts its own there, with a fresh database
POLICY_SERVICE_PORT = 10023
_POLICY_OCTET = 10


def _slot_in_use(octet: int, sink_port: int) -> bool:
    addresses = [(f"127.0.{octet}.{n}", POSTFIX_LAB_PORT) for n in (1, 2, 3, 4, 6, 7, 8, 9)]
    addresses.append((f"127.0.{octet}.5", SUBMISSION_PORT))
    addresses.append((f"127.0.{octet}.{_POLICY_OCTET}", POLICY_SERVICE_PORT))
    for address in [*addresses, ("127.0.0.1", sink_port)]:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(address) == 0:
                return True
    return False


def _claim_slot() -> tuple[int, int, TextIO | None]:
    """Pick a slot no other live process holds (flock dies with its holder, even on kill -9)."""
    for index, octet in enumerate(_SLOT_OCTETS):
        sink_port = _SINK_BASE_PORT + index
        lock_path = Path(tempfile.gettempdir()) / f"relayaudit-postfix-slot-{octet}.lock"
        try:
            lock = lock_path.open("a", encoding="ascii")
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        # A listener without a lock holder: a lab left by a killed run, or something foreign.
        # Labs whose owner died are cleaned by stop_stale_labs(); meanwhile take another slot.
        if _slot_in_use(octet, sink_port):
            lock.close()
            continue
        return octet, sink_port, lock
    return _SLOT_OCTETS[0], _SINK_BASE_PORT, None  # all taken: start() reports the clash


_SLOT_OCTET, POSTFIX_SINK_PORT, _SLOT_LOCK = _claim_slot()
POLICY_SERVICE = (f"127.0.{_SLOT_OCTET}.{_POLICY_OCTET}", POLICY_SERVICE_PORT)


def lab_host(n: int) -> str:
    """An address of this process's slot beyond the shared lab's (.1-.10): 127.0.<slot>.<n>,
    for instances a test starts on its own (a policy's variant, a fix applied to it)."""
    if not 11 <= n <= 254:
        raise ValueError(f"lab_host({n}): 11-254 only; .1-.10 belong to the shared lab")
    return f"127.0.{_SLOT_OCTET}.{n}"
# One SMTP receiver address for everything the instances deliver (relayed and local mail).
POSTFIX_SINK_HOST = "127.0.0.1"
# The scanner's vantage point: on loopback, but outside every instance's mynetworks except `open`.
SCANNER_SOURCE = "127.0.0.50"

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0

_SBIN_PATHS = "/usr/sbin:/sbin:/usr/local/sbin"
_MAIL_OWNER = "postfix"
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_SASL_PLAIN_PLUGINS = ("/usr/lib/*/sasl2/libplain.so*", "/usr/lib/sasl2/libplain.so*")

# Relay settings per policy; "{sender_access}" and "{sasl_config}" become the instance's paths.
_POLICY_SETTINGS: Mapping[str, Mapping[str, str]] = {
    "closed": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
        ),
    },
    "open": {
        "mynetworks": "0.0.0.0/0",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
        ),
    },
    "campus-sender": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, check_sender_access hash:{sender_access}, reject_unauth_destination"
        ),
    },
    # AUTH is advertised (Cyrus SASL, sasldb with no users: no daemon needed) but nobody can
    # authenticate: a third-party recipient is refused with 530 at RCPT, local ones accepted.
    "auth-required": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": "{sasl_config}",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, permit_auth_destination,"
            " check_recipient_access static:{530 5.7.0 Authentication required}, reject"
        ),
    },
    # a submission port as Debian's master.cf comments it: TLS required before MAIL
    # (smtpd_tls_security_level=encrypt), AUTH offered only inside TLS (smtpd_tls_auth_only),
    # third-party recipients refused with 530 to anyone who has not authenticated
    "submission": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_tls_security_level": "encrypt",
        "smtpd_tls_cert_file": "{tls_dir}/cert.pem",
        "smtpd_tls_key_file": "{tls_dir}/key.pem",
        "smtpd_tls_auth_only": "yes",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": "{sasl_config}",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, permit_auth_destination,"
            " check_recipient_access static:{530 5.7.0 Authentication required}, reject"
        ),
    },
    # closed, behind postscreen with its deep protocol tests on (postscreen(8)): a new client's
    # first session is postscreen's own SMTP engine, which hides PIPELINING to catch clients
    # that pipeline unasked, logs NON-SMTP COMMAND and BARE NEWLINE, and answers RCPT with
    # 450 4.3.2; a client that passed reconnects and is handed to the real smtpd
    "postscreen": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
        ),
        "postscreen_access_list": "permit_mynetworks",
        "postscreen_dnsbl_sites": "",
        "postscreen_greet_wait": "1s",
        "postscreen_pipelining_enable": "yes",
        "postscreen_non_smtp_command_enable": "yes",
        "postscreen_bare_newline_enable": "yes",
    },
    # closed, but an admin "whitelisted" campus HELO names before the relay check (issue 27):
    # any client that says EHLO <anything>.campus.test relays
    "helo-map": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, check_helo_access hash:{helo_access}, reject_unauth_destination"
        ),
    },
    # closed, but XCLIENT (meant for a front-end proxy) authorised for all of loopback, the
    # scanner's source included; mynetworks holds 127.0.0.1 only (issue 27)
    "xclient": {
        "mynetworks": "127.0.0.1/32",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
        ),
    },
    # an open relay behind a real greylisting policy server (postgrey on POLICY_SERVICE, which
    # each test starts with a fresh database): every new client/sender/recipient triplet is
    # deferred with 450 4.2.0 until the triplet comes back after postgrey's delay (issue 27)
    "greylist": {
        "mynetworks": "0.0.0.0/0",
        "smtpd_relay_restrictions": (
            "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
        ),
        "smtpd_recipient_restrictions": "check_policy_service inet:{policy_service}",
        "smtpd_policy_service_timeout": "10s",
    },
}
# the port of a policy's instance, where it is not POSTFIX_LAB_PORT
POLICY_PORTS: Mapping[str, int] = {"submission": SUBMISSION_PORT}

POLICIES: tuple[str, ...] = tuple(_POLICY_SETTINGS)
# Which loopback address each policy's instance uses in the shared lab.
LAB_HOSTS: Mapping[str, str] = {
    policy: f"127.0.{_SLOT_OCTET}.{index}" for index, policy in enumerate(POLICIES, start=1)
}

# All services chroot-free (column 5 = n): the queue directory is a throw-away path in /tmp
# and a chroot there would lack /etc files. Only the smtpd listener differs per instance.
_MASTER_CF_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def _find_command(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=f"{path}:{_SBIN_PATHS}" if path else _SBIN_PATHS)


CANARY_DOMAIN = "canary.test"  # the canary receiver at the relayhost takes mail for this domain


def require_postfix() -> None:
    """Skip the calling test or fixture when Postfix instances cannot run here; fail instead
    under RELAYAUDIT_REQUIRE_POSTFIX=1 (set by scripts/test, hence CI), so a broken install can
    never turn into a green run of skipped tests."""
    import pytest  # noqa: PLC0415 - only the tests need it, not the lab's other users

    reason = postfix_available()
    if reason is not None:
        if os.environ.get("RELAYAUDIT_REQUIRE_POSTFIX") == "1":
            pytest.fail(f"RELAYAUDIT_REQUIRE_POSTFIX=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def postfix_available() -> str | None:
    """Return None when lab instances can run here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return f"Postfix lab needs Linux (all of 127.0.0.0/8 on loopback), not {sys.platform}"
    for command in ("postfix", "postmap", "postconf"):
        if _find_command(command) is None:
            return f"`{command}` not found: install Postfix (scripts/test does, as root)"
    if not any(glob.glob(pattern) for pattern in _SASL_PLAIN_PLUGINS):
        return "no Cyrus SASL PLAIN plugin (Debian: libsasl2-modules): auth-required needs it"
    if os.geteuid() != 0:
        return "Postfix lab instances must be started as root (master binds and drops privileges)"
    try:
        pwd.getpwnam(_MAIL_OWNER)
    except KeyError:
        return f"no `{_MAIL_OWNER}` user: the Postfix package is not installed properly"
    return None


def _require_loopback(what: str, address: str) -> None:
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise ValueError(f"{what} must be an IPv4 loopback address, got {address!r}") from exc
    if parsed not in _LOOPBACK:
        raise ValueError(f"{what} must be inside 127.0.0.0/8, got {address}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PostfixInstance:
    """One Postfix master with its own config, queue, data directory and maillog under DIR.

    Layout: DIR/etc (main.cf, master.cf, maps), DIR/queue, DIR/data, DIR/maillog. The config
    lives in its own subdirectory because `postfix check` warns about every file under the
    config directory that is not owned by root, which the queue and data directories are not.
    """

    policy: str
    host: str
    port: int
    directory: Path
    sink: tuple[str, int] = field(default=(POSTFIX_SINK_HOST, POSTFIX_SINK_PORT))
    # main.cf settings over the policy's ("{maps}" becomes the config directory), and extra
    # access maps (file name -> text, postmap'd): a variant of a policy, or a fix applied to it
    overrides: dict[str, str] = field(default_factory=dict)
    maps: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in _POLICY_SETTINGS:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        _require_loopback("host", self.host)
        _require_loopback("sink host", self.sink[0])
        self.directory = Path(self.directory).absolute()

    @property
    def config_directory(self) -> Path:
        return self.directory / "etc"

    @property
    def myhostname(self) -> str:
        return self.overrides.get("myhostname", f"mx-{self.policy}.campus.test")

    @property
    def maillog_path(self) -> Path:
        return self.directory / "maillog"

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def main_cf(self) -> str:
        """The full main.cf text for this instance."""
        sink_host, sink_port = self.sink
        # Every transport and the relayhost name the sink: nothing can leave loopback.
        sink_nexthop = f"[{sink_host}]:{sink_port}"
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.directory / "queue"),
            "data_directory": str(self.directory / "data"),
            "maillog_file": str(self.maillog_path),
            # Without this, postlogd refuses a maillog outside /var and start fails silently.
            "maillog_file_prefixes": str(self.directory),
            "myhostname": self.myhostname,
            "mydomain": "campus.test",
            "myorigin": "campus.test",
            "mydestination": "campus.test",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            # Deliveries leave from the instance's own address: the sink sees who delivered.
            "smtp_bind_address": self.host,
            "relayhost": sink_nexthop,
            "default_transport": f"smtp:{sink_nexthop}",
            "relay_transport": f"relay:{sink_nexthop}",
            "local_transport": f"smtp:{sink_nexthop}",
            "virtual_transport": f"smtp:{sink_nexthop}",
            "transport_maps": "",
            "smtp_fallback_relay": "",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "inline:{ postmaster=ok, alice=ok }",
            "biff": "no",
            "append_dot_mydomain": "no",
            # A sink that comes up late still gets the mail within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "2s",
        }
        paths = {
            "{sender_access}": str(self.config_directory / "sender_access"),
            "{sasl_config}": str(self.config_directory / "sasl"),
            "{tls_dir}": str(self.config_directory / "tls"),
            "{helo_access}": str(self.config_directory / "helo_access"),
            "{policy_service}": f"{POLICY_SERVICE[0]}:{POLICY_SERVICE[1]}",
        }
        for name, template in _POLICY_SETTINGS[self.policy].items():
            value = template
            for placeholder, path in paths.items():
                value = value.replace(placeholder, path)
            settings[name] = value
        for name, value in self.overrides.items():
            settings[name] = value.replace("{maps}", str(self.config_directory))
        lines = [f"# relayaudit test lab: policy {self.policy}, generated by tests/postfix_lab.py"]
        lines += [f"{name} = {value}".rstrip() for name, value in settings.items()]
        return "\n".join(lines) + "\n"

    def master_cf(self) -> str:
        """The full master.cf text: the shared services plus this instance's smtpd listener."""
        if self.policy == "postscreen":
            listener = (
                f"{self.host}:{self.port} inet  n       -       n       -       1       postscreen\n"
                "smtpd      pass  -       -       n       -       -       smtpd\n"
                "dnsblog    unix  -       -       n       -       0       dnsblog\n"
                "tlsproxy   unix  -       -       n       -       0       tlsproxy\n"
            )
        else:
            listener = (
                f"{self.host}:{self.port} inet  n       -       n       -       -       smtpd\n"
            )
        return listener + _MASTER_CF_SERVICES

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        postfix = _find_command("postfix")
        if postfix is None:
            raise RuntimeError("`postfix` not found")
        return subprocess.run(
            [postfix, "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )

    def _fail(self, message: str, output: str = "") -> RuntimeError:
        tail = "\n".join(self.maillog().splitlines()[-30:])
        details = f"\n--- command output ---\n{output.strip()}" if output.strip() else ""
        return RuntimeError(
            f"Postfix {self.policy} on {self.host}:{self.port}: {message}{details}"
            f"\n--- tail of {self.maillog_path} ---\n{tail}"
        )

    def _write_files(self) -> None:
        mail_owner = pwd.getpwnam(_MAIL_OWNER)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        # master opens DIR/data/master.lock as the postfix user, so every directory above DIR
        # must be searchable by others (tempfile.mkdtemp and pytest's tmp_path are mode 0700).
        for ancestor in self.directory.parents:
            if not ancestor.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{ancestor} is not searchable by the {_MAIL_OWNER} user (needs o+x);"
                    " put lab instances under a directory with mode 0755"
                )
        self.config_directory.mkdir(mode=0o755, exist_ok=True)
        (self.directory / "queue").mkdir(mode=0o755, exist_ok=True)
        data = self.directory / "data"
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, mail_owner.pw_uid, mail_owner.pw_gid)
        (self.config_directory / "main.cf").write_text(self.main_cf(), encoding="utf-8")
        (self.config_directory / "master.cf").write_text(self.master_cf(), encoding="utf-8")
        if self.policy == "submission":
            _write_tls_files(self.config_directory / "tls", self.myhostname)
        if self.policy in ("auth-required", "submission"):
            # Needs the PLAIN and LOGIN plugins (Debian: libsasl2-modules); sasldb2 never exists,
            # so every AUTH fails with 535.
            sasl = self.config_directory / "sasl"
            sasl.mkdir(mode=0o755, exist_ok=True)
            (sasl / "smtpd.conf").write_text(
                "pwcheck_method: auxprop\n"
                "auxprop_plugin: sasldb\n"
                f"sasldb_path: {self.config_directory / 'sasldb2'}\n"
                "mech_list: PLAIN LOGIN\n",
                encoding="utf-8",
            )
        access_maps = {"campus-sender": "sender_access", "helo-map": "helo_access"}
        # campus.test and, by parent_domain_matches_subdomains, every name under it
        texts = {access_maps[self.policy]: "campus.test OK\n"} if self.policy in access_maps else {}
        for name, text in {**texts, **self.maps}.items():
            access = self.config_directory / name
            access.write_text(text, encoding="utf-8")
            postmap = _find_command("postmap")
            if postmap is None:
                raise RuntimeError("`postmap` not found")
            result = subprocess.run(
                [postmap, "-c", str(self.config_directory), f"hash:{access}"],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                raise self._fail("postmap failed", result.stdout + result.stderr)

    def start(self) -> None:
        """Write the configuration, start the master and wait until it greets with 220."""
        if reason := postfix_available():
            raise RuntimeError(reason)
        if read_banner(self.host, self.port, timeout=1.0) is not None:
            raise RuntimeError(
                f"something already listens on {self.host}:{self.port}: another test session's"
                " lab? (`ss -ltnp` shows its pid; a lab stops with `postfix -c DIR/etc stop`)"
            )
        self._write_files()
        check = self._postfix("check")
        if check.returncode != 0:
            raise self._fail("`postfix check` failed", check.stdout + check.stderr)
        started = self._postfix("start")
        if started.returncode != 0:
            raise self._fail("`postfix start` failed", started.stdout + started.stderr)
        # `postfix start` returns before the listener is up: poll, bounded.
        deadline = time.monotonic() + START_TIMEOUT_S
        last: str | None = None
        while time.monotonic() < deadline:
            last = read_banner(self.host, self.port, timeout=1.0)
            if last is not None and last.startswith("220 "):
                if self.myhostname not in last:
                    raise self._fail(f"a different server answered: {last!r}")
                return
            time.sleep(0.1)
        raise self._fail(f"no 220 banner within {START_TIMEOUT_S:.0f} s (last: {last!r})")

    def restart(self) -> None:
        """Stop, rewrite the configuration (overrides and maps as they are now), start again."""
        self.stop()
        self.start()

    def master_pid(self) -> int | None:
        return _master_pid(self.directory)

    def stop(self) -> None:
        """Stop the master and its children; bounded, and safe to call on a stopped instance."""
        _stop_directory(self.directory)


def _write_tls_files(directory: Path, hostname: str) -> None:
    """A self-signed certificate and its key for HOSTNAME (smtpd reads them as root)."""
    directory.mkdir(mode=0o755, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _master_pid(directory: Path) -> int | None:
    try:
        text = (directory / "queue" / "pid" / "master.pid").read_text(encoding="ascii")
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _stop_directory(directory: Path) -> None:
    """Stop the Postfix whose configuration is DIRECTORY/etc, if one runs."""
    config = directory / "etc"
    postfix = _find_command("postfix")
    if postfix is None or not (config / "main.cf").exists():
        return
    pid = _master_pid(directory)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [postfix, "-c", str(config), "stop"],
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    if pid is None:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        # The pid comes from this instance's own queue directory: it is our master.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_LAB_PREFIX = "relayaudit-postfix-"
_OWNER_FILE = "owner.pid"


def make_lab_directory() -> Path:
    """A fresh base directory for one test session's instances, marked with its owner's pid."""
    base = Path(tempfile.mkdtemp(prefix=_LAB_PREFIX))
    base.chmod(0o755)  # the postfix user must reach DIR/data below it
    (base / _OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")
    return base


def stop_stale_labs(root: Path | None = None) -> list[Path]:
    """Stop and remove labs whose owning test process is gone (killed runs leave masters up).

    A lab whose owner still runs is left alone: that is a concurrent test session.
    """
    removed: list[Path] = []
    for owner_file in Path(root or tempfile.gettempdir()).glob(f"{_LAB_PREFIX}*/{_OWNER_FILE}"):
        try:
            owner = int(owner_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        base = owner_file.parent
        directories = [main_cf.parent.parent for main_cf in base.glob("*/etc/main.cf")]
        with ThreadPoolExecutor(max_workers=len(directories) or 1) as pool:
            list(pool.map(_stop_directory, directories))
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


def start_lab(
    base: Path,
    *,
    policies: tuple[str, ...] = POLICIES,
    port: int = POSTFIX_LAB_PORT,
    sink: tuple[str, int] = (POSTFIX_SINK_HOST, POSTFIX_SINK_PORT),
) -> dict[str, PostfixInstance]:
    """Start one instance per policy under BASE/<policy>, in parallel; all or none are left up."""
    stop_stale_labs(base.parent)
    instances = {
        policy: PostfixInstance(
            policy, LAB_HOSTS[policy], POLICY_PORTS.get(policy, port), base / policy, sink=sink
        )
        for policy in policies
    }
    with ThreadPoolExecutor(max_workers=len(instances) or 1) as pool:
        futures = [pool.submit(instance.start) for instance in instances.values()]
        errors = [exc for future in futures if (exc := future.exception()) is not None]
    if errors:
        stop_lab(instances)
        messages = "\n\n".join(str(error) for error in errors)
        raise RuntimeError(f"{len(errors)} Postfix lab instance(s) failed to start:\n{messages}")
    return instances


def stop_lab(instances: Mapping[str, PostfixInstance]) -> None:
    """Stop every instance, in parallel, whatever state each one is in."""
    with ThreadPoolExecutor(max_workers=len(instances) or 1) as pool:
        for future in [pool.submit(instance.stop) for instance in instances.values()]:
            future.result()


@dataclass(frozen=True)
class SinkMessage:
    """One message as the sink received it: who delivered it, its envelope and its bytes."""

    peer: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


class SinkHandler:
    """aiosmtpd handler that keeps every message; tests wait on it from their own thread."""

    def __init__(self) -> None:
        self._messages: list[SinkMessage] = []
        self._arrived = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        message = SinkMessage(
            peer=str(session.peer[0]) if session.peer else "",
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(str(rcpt) for rcpt in envelope.rcpt_tos),
            content=bytes(content),
        )
        with self._arrived:
            self._messages.append(message)
            self._arrived.notify_all()
        return "250 2.0.0 Ok: kept by the relayaudit test sink"

    @property
    def messages(self) -> list[SinkMessage]:
        with self._arrived:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[SinkMessage], bool], timeout: float
    ) -> SinkMessage | None:
        """The first message matching PREDICATE, waiting at most TIMEOUT seconds for it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for message in self._messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._arrived.wait(remaining)
