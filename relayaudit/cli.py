"""The `relayaudit` command line: check, sweep, config check, run, findings, history, demo.

The daemon, the demo lab and the state store are imported only by the commands that use them:
a sweep process starts faster without them (benchmarks count start-up time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from relayaudit import __version__, eventloop
from relayaudit.config import Config, file_warnings, load_config, parse_config
from relayaudit.engine import (
    SweepStats,
    approval_day,
    await_confirmation,
    judge_result,
    no_source,
    probe_settings,
    sweep,
)
from relayaudit.errors import (
    ConfigError,
    ExitCode,
    RelayAuditError,
    TemporaryError,
    UsageError,
    os_reason,
)
from relayaudit.evidence import ProbeResult, endpoint
from relayaudit.files import write_text
from relayaudit.greylisting import greylisted, retry
from relayaudit.owners import OwnerTable, load_owners
from relayaudit.report import (
    FindingBrief,
    FindingBriefs,
    expiry_lines,
    render_check,
    render_summary,
    render_table,
    table,
    terminal_width,
)
from relayaudit.schedule import local_zone
from relayaudit.scope import Address, normal_address, parse_address
from relayaudit.sinks import FindingsFile, new_sweep_id
from relayaudit.sources import TargetList, family_gaps, load_targets
from relayaudit.targets import Shard
from relayaudit.text import utc_time, visible
from relayaudit.verdict import Severity, Verdict, VerdictStatus, judge

if TYPE_CHECKING:
    from relayaudit.canary import CanaryReceiver
    from relayaudit.engine import Sink
    from relayaudit.html_page import Service
    from relayaudit.settings import ProbeSettings

__all__ = ["main"]

EXIT_OK, EXIT_RELAY, EXIT_ERROR = ExitCode.OK, ExitCode.FOUND, ExitCode.USAGE
EXIT_PIPE = 128 + signal.SIGPIPE  # the reader of standard output left, as if SIGPIPE had ended us


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one clear line (the same code as other errors)."""

    def error(self, message: str) -> NoReturn:
        if any(
            message == f"the following arguments are required: {action.dest}"
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
        ):
            # a command group without its subcommand: what it offers, never argparse's
            # internal name for the missing part (config_command)
            self.print_help(sys.stderr)
            self.exit(EXIT_ERROR)
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"relayaudit: error: {message}\n")


class _Version(argparse.Action):
    """--version: asks git only when given, so no other command starts a process for it."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings,
            dest=dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show the version (and the commit, run from a git checkout) and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """`relayaudit VERSION`; run from a git checkout, the commit too: `(git 0123456789ab)`,
    with `, modified` when tracked files differ from it (an installed wheel has no commit)."""
    import subprocess

    plain = f"relayaudit {__version__}"
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return plain
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or git will not read this tree
        return plain
    return f"{plain} (git {head}{', modified' if changed else ''})"


_REPORT_HELP = (
    "also write this run's report to PATH (format from its suffix: .html, .md, .csv, .json)"
)


_EXIT_CODES = (
    "Exit codes: 0 nothing found at or above --fail-on, 1 found, 2 usage error, "
    "70 internal error (a bug), 75 temporary failure (no verdict: a network error, a port in "
    "use), 78 configuration error."
)
_FAIL_ON = ["never", "relay", *(s.value for s in Severity)]


def _fail_on_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fail-on",
        choices=_FAIL_ON,
        default="relay",
        help="exit 1 when this was found: a relay (the default), any finding of this severity "
        "or worse, or never",
    )


def _found(fail_on: str, *, relays: int, severities: Iterable[str]) -> bool:
    """Whether what a run found meets `--fail-on`."""
    if fail_on == "never":
        return False
    if fail_on == "relay":
        return relays > 0
    worst = Severity(fail_on).rank
    return any(Severity(s).rank <= worst for s in severities)


def _shard_arg(text: str | None) -> Shard | None:
    if text is None:
        return None
    try:
        return Shard.parse(text, source="--shard")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _store_options(parser: argparse.ArgumentParser) -> None:
    """--config / --state: the state store(s) a read-only command reads (see _state_paths)."""
    parser.add_argument("--config", type=Path, help="read the state file named in this config")
    parser.add_argument(
        "--state", type=Path, action="append", help="state file (repeatable: several shards)"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="relayaudit", description="Find open mail relays and unapproved SMTP services."
    )
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser(
        "check",
        help="test one host, like swaks or nmap's smtp-open-relay",
        description="Test one host. " + _EXIT_CODES,
    )
    c.add_argument("host", help="IP address or host name")
    c.add_argument(
        "--port",
        type=int,
        action="append",
        help="port to test (repeatable; default: the config's ports, else 25)",
    )
    c.add_argument(
        "--config", type=Path, help="configuration file (scope, identity, test addresses)"
    )
    c.add_argument("--source", help="local address to connect from (the vantage point)")
    c.add_argument(
        "--confirm",
        action="store_true",
        help="confirmation mode: send a canary message and wait for it",
    )
    c.add_argument(
        "--retry-greylisted",
        action="store_true",
        help="when the server defers the tests as greylisting does, wait until "
        "relay.greylist_retry_after (default 5m) has passed and try once more with the same "
        "addresses",
    )
    c.add_argument("--json", action="store_true", help="print the evidence and verdict as JSON")
    _fail_on_option(c)
    c.add_argument("--no-transcript", action="store_true", help="leave the SMTP transcript out")
    c.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="wait this long for the greeting and for each reply (default: the config's "
        "timeouts.greeting and timeouts.command, else 30 and 15); the session limit grows to "
        "fit (at least 8 times SECONDS)",
    )

    s = sub.add_parser(
        "sweep", help="sweep the configured ranges once", description="Sweep once. " + _EXIT_CODES
    )
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--shard", help="i/n: sweep only shard i of n (0-based)")
    s.add_argument(
        "--processes", type=int, help="split the sweep over N processes (default: limits.processes)"
    )
    s.add_argument(
        "--all",
        action="store_true",
        help="list every finding at the end (unapproved services too), not only the relays",
    )
    s.add_argument("--report", type=Path, metavar="PATH", help=_REPORT_HELP)
    s.add_argument(
        "--targets-file",
        action="append",
        default=[],
        metavar="PATH",
        help="also sweep the addresses and CIDR networks listed in PATH, one per line "
        "(- reads standard input; repeatable); each must lie inside the config's scope",
    )
    _fail_on_option(s)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    cc = cfg_sub.add_parser("check", help="validate a config and print the target counts")
    cc.add_argument("file", type=Path)
    cfg_sub.add_parser(
        "example",
        help="print the commented example configuration: every key, its default, when to "
        "change it (relayaudit config example > relayaudit.toml)",
    )

    ca = sub.add_parser("canary", help="confirmation mode's canary receiver")
    ca_sub = ca.add_subparsers(dest="canary_command", required=True, parser_class=_Parser)
    ck = ca_sub.add_parser(
        "check",
        help="does the canary domain's MX lead to canary.listen on this host, on port 25?",
        description="Check that mail for canary.domain reaches canary.listen: the domain's MX "
        "and their addresses, that the listen address is on this host, and port 25. "
        "Exit codes: 0 ready, 1 a check failed, 2 usage, 75 temporary, 78 config error.",
    )
    ck.add_argument("--config", type=Path, required=True)
    ck.add_argument(
        "--nameserver",
        metavar="ADDR[:PORT]",
        help="ask this DNS server instead of the system's resolvers",
    )
    ck.add_argument(
        "--redirected",
        action="store_true",
        help="a port redirect on this host sends port 25 to canary.listen's port",
    )

    dp = sub.add_parser("deploy", help="deployment tools")
    dp_sub = dp.add_subparsers(dest="deploy_command", required=True, parser_class=_Parser)
    dr = dp_sub.add_parser(
        "render",
        help="print the kernel's allow list for the config: a systemd drop-in or a NetworkPolicy",
        description="Print, from the config's scope, alert hooks and [deploy] section, a systemd "
        "drop-in (IPAddressDeny=any, IPAddressAllow=...) or a Kubernetes NetworkPolicy.",
    )
    dr.add_argument("--config", type=Path, required=True)
    dr.add_argument("--for", dest="target", choices=["systemd", "kubernetes"], required=True)

    r = sub.add_parser("run", help="the daemon: scheduled sweeps, state, alerts, metrics")
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("--shard", help="i/n: this process sweeps shard i of n (0-based)")

    f = sub.add_parser("findings", help="list the findings in the state store(s)")
    _store_options(f)
    f.add_argument("--status", choices=["new", "ongoing", "resolved", "reopened", "open"])
    f.add_argument("--json", action="store_true")

    h = sub.add_parser("history", help="what was seen at one address, sweep by sweep")
    h.add_argument("address")
    _store_options(h)
    h.add_argument("--json", action="store_true")

    o = sub.add_parser(
        "outbox",
        help="alert deliveries: counts and dead letters; `list` shows every delivery; "
        "--replay sends dead letters again",
    )
    o.add_argument(
        "action",
        nargs="?",
        choices=["list"],
        help="list every delivery: finding, transition, hook, attempts, next try, last error",
    )
    _store_options(o)
    o.add_argument(
        "--replay",
        type=int,
        nargs="*",
        metavar="ID",
        help="requeue dead letters (these delivery ids, or all): the daemon sends them again",
    )
    o.add_argument(
        "--status", choices=["pending", "sent", "dead"], help="with `list`: only these deliveries"
    )
    o.add_argument("--json", action="store_true")

    sh = sub.add_parser("show", help="one finding whole: tests, replies, transcript, changes")
    sh.add_argument("finding_id", metavar="FINDING_ID", help="a finding's id (ra-…)")
    _store_options(sh)
    sh.add_argument("--json", action="store_true")

    rp = sub.add_parser(
        "report",
        help="the findings of the state store(s) and what changed: an HTML page (the default), "
        "Markdown, CSV or JSON",
    )
    _store_options(rp)
    rp.add_argument(
        "--format",
        choices=["html", "md", "csv", "json"],
        default="html",
        help="html (default): one self-contained page with filters, evidence and charts",
    )
    rp.add_argument("--output", type=Path, metavar="PATH", help="write here (default: stdout)")
    who = rp.add_mutually_exclusive_group()
    who.add_argument(
        "--owner", metavar="NAME", help="only the findings of this owner (docs/owners.md)"
    )
    who.add_argument("--unowned", action="store_true", help="only the findings nobody owns")
    rp.add_argument(
        "--since",
        default="7d",
        metavar="DURATION",
        help="'what changed' covers this long back (default 7d; e.g. 12h, 30d)",
    )

    lab = sub.add_parser(
        "lab",
        help="start the demo's loopback lab of SMTP servers and leave it running",
        description="Start the demo's loopback lab (127.0.10.1-13) for check, sweep and run to "
        "try; exit 0 on Ctrl-C, SIGTERM or the end of --for, 75 when an address is taken.",
    )
    lab.add_argument(
        "--for", dest="duration", type=_seconds, metavar="SECONDS", help="stop after SECONDS"
    )
    d = sub.add_parser("demo", help="start a loopback lab of SMTP servers and sweep it")
    where = d.add_mutually_exclusive_group()
    where.add_argument(
        "--output-dir",
        type=Path,
        default=Path("relayaudit-demo"),
        metavar="DIR",
        help="write each run into DIR/<UTC time>/ (findings, report, state store) and keep the "
        "5 newest runs there (default: ./relayaudit-demo)",
    )
    where.add_argument(
        "--output", type=Path, help="findings file instead (its state store beside it; no run dir)"
    )
    d.add_argument("--report", type=Path, metavar="PATH", help=_REPORT_HELP)
    d.add_argument(
        "--hooks",
        action="store_true",
        help="also send the alerts to loopback stand-ins of Jira, TheHive, ServiceNow and a chat, "
        "with the templates relayaudit ships, and show the tickets they opened",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that left shows here, inside the handler
    except BrokenPipeError:
        # The reader of standard output went away (`| head`): stop quietly, as a command that
        # SIGPIPE ended does. Standard output now goes to /dev/null, so the flush at exit cannot
        # fail again (the note on SIGPIPE in Python's `signal` documentation).
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: return the code, not raise it
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        if args.command == "check":
            return eventloop.run(_check(args))
        if args.command == "sweep":
            return _sweep_main(args)
        if args.command == "config":
            if args.config_command == "example":
                return _config_example()
            return _config_check(args.file)
        if args.command == "canary":
            return _canary_check(args)
        if args.command == "deploy":
            from relayaudit.deploy import render

            sys.stdout.write(render(load_config(args.config), args.target))
            return EXIT_OK
        if args.command == "run":
            from relayaudit.daemon import Daemon

            shard = _shard_arg(args.shard)
            return eventloop.run(
                Daemon(args.config, shard=shard).run(), _event_loop_of(args.config)
            )
        if args.command == "findings":
            return _findings(args)
        if args.command == "history":
            return _history(args)
        if args.command == "outbox":
            return _outbox(args)
        if args.command == "show":
            return _show(args)
        if args.command == "report":
            return _report(args)
        if args.command == "lab":
            from relayaudit.demo import run_lab

            return eventloop.run(run_lab(args.duration))
        if args.command == "demo":
            from relayaudit.demo import run_demo

            report_format(args.report)  # a bad suffix is an error before the lab starts
            return eventloop.run(
                run_demo(
                    args.output, report=args.report, hooks=args.hooks, output_dir=args.output_dir
                )
            )
    except RelayAuditError as exc:
        # one problem a line (a config error names them all), each line standing on its own
        for line in str(exc).splitlines() or [""]:
            print(f"relayaudit: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("relayaudit: interrupted", file=sys.stderr)
        return 130
    except (BrokenPipeError, SystemExit):
        raise
    except Exception:  # a bug: never an exit code that reads as "ran, found nothing/something"
        return _internal_error()
    raise AssertionError(args.command)


def _internal_error() -> int:
    """Print the traceback of the exception being handled, say it is a bug, exit 70."""
    traceback.print_exc()
    print(
        f"relayaudit {__version__}: internal error (a bug; exit {ExitCode.SOFTWARE.value}); "
        "the traceback above says where",
        file=sys.stderr,
    )
    return ExitCode.SOFTWARE


# -- config check --------------------------------------------------------------------------


def _config_check(path: Path) -> int:
    from relayaudit.alerts import check_templates

    config = load_config(path)
    check_templates(config.alerts)
    targets = load_targets(config)  # a source that cannot be read is an error here
    space = targets.space(config)
    print(f"{path}: valid")
    print(f"  {'target range':40} {'addresses':>12}")
    for net, count in space.count_per_range():
        if net in config.targets:
            print(f"  {net!s:40} {count:>12}")
    if targets.sources:
        print(f"  {'targets_from source':40} {'addresses':>12} {'out of scope':>12} {'bad lines':>9}")
        for one in targets.sources:
            print(f"  {one.label:40} {one.count:>12} {one.out_of_scope:>12} {one.bad:>9}")
    probes = len(space) * len(config.ports)
    print(f"  {'total (after exclusions)':40} {len(space):>12}")
    print(f"  ports {', '.join(map(str, config.ports))}: {probes} address:port probes per sweep")
    if config.approved:
        print(f"  approved services: {len(config.approved)}")
        today = approval_day(datetime.now(UTC), local_zone())
        for line in expiry_lines(config, today):
            print(f"    {line}")
    owners = load_owners(config)  # an unreadable owners_file or a bad row: exit 78
    if owners.rows:
        print(
            f"  owners: {len(owners.owners)} ({len(owners.rows)} ranges; "
            f"table {owners.digest})"
        )
    for warning in owners.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    for warning in (*config.warnings, *file_warnings(path)):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    for one in targets.sources:
        for problem in one.problems:
            print(f"{path}: warning: {problem}", file=sys.stderr)
    for gap in family_gaps(config, space, targets):
        print(f"{path}: warning: {gap}", file=sys.stderr)
    host, port = config.canary.listen
    if ipaddress.ip_address(host).is_unspecified:
        print(
            f"{path}: warning: canary.listen {endpoint(host, port)} is every address of this "
            "host: the receiver answers on all of them, also where no MX points (and to every "
            "network that reaches one); listen on the address the canary domain's MX names",
            file=sys.stderr,
        )
    return EXIT_OK


# -- config example --------------------------------------------------------------------------

EXAMPLE_CONFIG = "relayaudit.example.toml"  # package data; config/relayaudit.example.toml links to it


def _config_example() -> int:
    from importlib import resources

    sys.stdout.write(resources.files("relayaudit").joinpath(EXAMPLE_CONFIG).read_text("utf-8"))
    return EXIT_OK


# -- canary check --------------------------------------------------------------------------


def _canary_check(args: argparse.Namespace) -> int:
    from relayaudit.canary_route import check_route, parse_nameserver

    config = load_config(args.config)
    nameserver = None
    if args.nameserver is not None:
        try:
            nameserver = parse_nameserver(args.nameserver)
        except ValueError:
            raise UsageError(
                f"--nameserver: {args.nameserver!r} is not ADDRESS or ADDRESS:PORT"
            ) from None
    checks = check_route(
        config.canary.domain,
        config.canary.listen,
        nameserver=nameserver,
        redirected=args.redirected,
    )
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.text}")
    failed = sum(not c.ok for c in checks)
    if failed:
        print(f"canary check: {failed} problem(s): canaries would not reach this receiver")
        return EXIT_RELAY  # a check failed: 1, as `check` does for a relay; errors raise
    print(f"canary check: mail for {config.canary.domain} reaches this receiver")
    return EXIT_OK


# -- state queries -------------------------------------------------------------------------


def _state_paths(args: argparse.Namespace) -> list[Path]:
    if args.state:
        paths: list[Path] = list(args.state)
    elif args.config is not None:
        paths = [load_config(args.config).state.path]
    else:
        raise UsageError("give --state FILE (repeatable) or --config FILE to name the state store")
    for path in paths:
        if not path.exists():
            if args.state:
                raise UsageError(f"--state: {str(path)!r} does not exist")
            raise ConfigError(f"{args.config}: state.path: {str(path)!r} does not exist")
    return paths


def report_format(path: Path | None) -> None:
    """Refuse a `--report PATH` whose suffix names no format, before any work starts."""
    if path is not None:
        from relayaudit.export import format_of

        format_of(path)


def _write_text(path: Path | None, text: str, *, what: str) -> None:
    """To `path` (replaced atomically by a file of mode 0640), or to standard output."""
    if path is None:
        sys.stdout.write(text)
        return
    try:
        write_text(path, text)
    except OSError as exc:
        raise UsageError(f"{what}: cannot write {str(path)!r}: {exc.strerror}") from None
    print(f"report written to {path}", file=sys.stderr)


def _show(args: argparse.Namespace) -> int:
    from relayaudit.export import find, render_shown

    shown = find(_state_paths(args), args.finding_id)
    if shown is None:
        raise UsageError(f"show: no finding {args.finding_id!r} in the state store")
    text = shown.model_dump_json(indent=2) + "\n" if args.json else render_shown(shown)
    sys.stdout.write(text)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from relayaudit.config import parse_duration
    from relayaudit.export import for_owner, from_stores, render

    try:
        since = timedelta(seconds=parse_duration(args.since))
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    paths = _state_paths(args)
    config = load_config(args.config) if args.config is not None else None
    if args.owner is not None:
        _check_owner_name(args.owner, paths, config, args.config)
    if args.format == "html":
        from relayaudit.html_page import page_from_stores
        from relayaudit.html_report import render_html

        page = page_from_stores(
            paths, since=since, config=config, owner=args.owner, unowned=args.unowned
        )
        text = render_html(page)
    else:
        report = from_stores(paths, since=since)
        text = render(for_owner(report, name=args.owner, unowned=args.unowned), args.format)
    _write_text(args.output, text, what="--output")
    return EXIT_OK


def _check_owner_name(
    name: str, paths: Sequence[Path], config: Config | None, config_path: Path | None
) -> None:
    """`report --owner NAME`: a name no stored finding and no owner of the config knows is
    a typo until shown otherwise; a department with no findings (yet) is named in the table."""
    from difflib import get_close_matches

    from relayaudit.owners import load_owners
    from relayaudit.state import read_owner_names

    known = read_owner_names(paths)  # the owner column: the findings are read once, after
    where = "the state store"
    if config is not None:
        known.update(o.name for o in load_owners(config).owners)
        known.update(a.owner for a in config.approved if a.owner is not None)
        where = f"the state store or the owners of {config_path}"
    if name in known:
        return
    close = get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    names = ", ".join(repr(n) for n in sorted(known)) or "none"
    raise UsageError(f"--owner {name!r}: no owner of that name in {where} (known: {names}){hint}")


def sweep_report(
    path: Path,
    findings_file: Path,
    sweep_id: str,
    *,
    config: Config,
    run: _Run,
) -> None:
    """`sweep --report`: the report of this run, from the lines it wrote to the findings file
    (and, for the HTML page, the run's counts and the SMTP services it saw)."""
    from relayaudit.export import format_of, from_sweep, render
    from relayaudit.records import FindingRecord

    records = []
    with findings_file.open(encoding="utf-8") as lines:
        for line in lines:
            if f'"sweep_id":"{sweep_id}"' in line:
                records.append(FindingRecord.model_validate_json(line))
    fmt = format_of(path)
    if fmt == "html":
        from relayaudit.html_page import page_from_sweep
        from relayaudit.html_report import render_html

        assert run.stats is not None
        text = render_html(
            page_from_sweep(
                records,
                sweep_id=sweep_id,
                stats=run.stats,
                config=config,
                services=run.services,
                shard=run.shard,
            )
        )
    else:
        text = render(from_sweep(records, sweep_id=sweep_id), fmt)
    _write_text(path, text, what="--report")


@dataclass
class _Run:
    """What `sweep --report` needs of the run besides its findings lines."""

    shard: str
    stats: SweepStats | None = None
    services: list[Service] = field(default_factory=list)


def _findings(args: argparse.Namespace) -> int:
    from relayaudit.state import read_findings

    rows = read_findings(_state_paths(args))
    if args.status == "open":
        rows = [r for r in rows if r.status.open]
    elif args.status:
        rows = [r for r in rows if r.status.value == args.status]
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return EXIT_OK
    print(
        f"{'id':20} {'kind':24} {'severity':9} {'status':9} {'address:port':22} {'first seen':23} "
        f"{'last seen':23} owner"
    )
    for r in rows:
        owner = r.finding.owner
        print(
            f"{r.id:20} {r.kind.value:24} {r.severity.value:9} {r.status.value:9} "
            f"{endpoint(r.address, r.port):22} {utc_time(r.first_seen)} {utc_time(r.last_seen)} "
            f"{visible(owner.name) if owner is not None else '-'}"
        )
    print(f"{len(rows)} finding(s)")
    return EXIT_OK


def _outbox(args: argparse.Namespace) -> int:
    from relayaudit.state import StateStore

    if args.action == "list":
        if args.replay is not None:
            raise UsageError("--replay: not with `outbox list`; replay first, then list")
        return _outbox_list(args)
    if args.status is not None:
        raise UsageError("--status: only with `outbox list`")
    parts = []
    for path in _state_paths(args):
        store = StateStore(path)
        store.open(readonly=args.replay is None)
        try:
            replayed = store.replay_dead(args.replay) if args.replay is not None else None
            parts.append((path, store.outbox_counts(), replayed, store.dead_letters()))
        finally:
            store.close()
    if args.json:
        doc = [
            {
                "state": str(path),
                "counts": counts,
                "replayed": replayed,
                "dead": [
                    {
                        "id": item.id,
                        "channel": item.channel,
                        "alert": item.alert.key,
                        "attempts": item.attempts,
                        "last_error": item.last_error,
                    }
                    for item in dead
                ],
            }
            for path, counts, replayed, dead in parts
        ]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    from relayaudit.text import visible  # a hook's error may quote what its server answered

    for path, counts, replayed, dead in parts:
        print(f"{path}: {counts['pending']} pending, {counts['sent']} sent, {counts['dead']} dead")
        if replayed is not None:
            print(f"  {replayed} dead letter(s) requeued")
        for item in dead:
            print(
                f"  dead #{item.id} {item.channel} {item.alert.key} after {item.attempts} "
                f"attempt(s): {visible(str(item.last_error))}"
            )
    return EXIT_OK


def _outbox_list(args: argparse.Namespace) -> int:
    from relayaudit.state import DeliveryState, StateStore

    listed = []
    for path in _state_paths(args):
        store = StateStore(path)
        store.open(readonly=True)
        try:
            listed.append((path, store.deliveries(args.status)))
        finally:
            store.close()
    if args.json:
        doc = [
            {"store": str(path), **d.model_dump(mode="json")}
            for path, deliveries in listed
            for d in deliveries
        ]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    width = terminal_width()
    for path, deliveries in listed:
        which = f"{args.status} " if args.status else ""
        print(f"{path}: {len(deliveries)} {which}deliver{'y' if len(deliveries) == 1 else 'ies'}")
        if not deliveries:
            continue
        header = ("id", "state", "finding id", "transition", "hook", "attempts", "next try")
        rows = [
            (
                str(d.id),
                d.state.value,
                d.finding_id,
                d.transition.value,
                d.channel,
                str(d.attempts),
                utc_time(d.next_attempt) if d.state is DeliveryState.PENDING else "-",
                d.last_error or "-",
            )
            for d in deliveries
        ]
        print("\n".join(table((*header, "last error"), rows, width=width)))
    return EXIT_OK


def _history(args: argparse.Namespace) -> int:
    from relayaudit.state import read_history

    try:
        address = str(ipaddress.ip_address(args.address))
    except ValueError:
        raise UsageError(f"address: {args.address!r} is not an IP address") from None
    rows = read_history(_state_paths(args), address)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return EXIT_OK
    if not rows:
        print(f"nothing recorded for {address}")
        return EXIT_OK
    lines = table(
        ("observed", "sweep", "shard", "port", "status", "findings"),
        [
            (
                utc_time(r.observed),
                r.sweep_id,
                r.shard or "-",
                str(r.port),
                r.status.value,
                ", ".join(k.value for k in r.kinds) or "-",
            )
            for r in rows
        ],
        width=terminal_width(),
    )
    print("\n".join(lines))
    return EXIT_OK


# -- check ---------------------------------------------------------------------------------


async def _resolve(host: str, *, source: str) -> list[str]:
    """The addresses to check, as relayaudit connects to them (::ffff:192.0.2.1 is 192.0.2.1).

    Zone ids and space no campus host can hold are refused here, before any connection.
    """
    try:
        found = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            message = f"{source}: {host!r} does not resolve: {exc.strerror}"
            if exc.errno == socket.EAI_AGAIN:  # the resolver failed for now: try again later
                raise TemporaryError(message) from None
            raise UsageError(message) from None
        found = [ipaddress.ip_address(info[4][0]) for info in infos]
    try:
        return list(dict.fromkeys(str(normal_address(a)) for a in found))
    except ConfigError as exc:
        raise UsageError(f"{source} {host!r}: {exc}") from None


def _check_config(args: argparse.Namespace, addresses: list[str]) -> Config:
    if args.config is not None:
        config = load_config(args.config)
    else:
        nets = [str(ipaddress.ip_network(a)) for a in addresses]
        config = parse_config({"scope": nets, "targets": nets}, source="(no config)")
    for address in addresses:
        if not config.in_scope(ipaddress.ip_address(address)):
            raise UsageError(
                f"host {args.host!r}: {address} is outside scope "
                f"({', '.join(map(str, config.scope))}) of {config.source}"
            )
    if args.source is not None:
        try:
            source = parse_address(args.source)
        except ConfigError as exc:
            raise UsageError(f"--source: {exc}") from None
        version = source.version
        if all(ipaddress.ip_address(a).version != version for a in addresses):
            raise UsageError(
                f"--source: {args.source!r} is IPv{version} but host {args.host!r} "
                f"has no IPv{version} address"
            )
        _source_is_local(args.source, source)
        config = config.model_copy(update={"source_address": (source,)})
    return config


def _source_is_local(text: str, source: Address) -> None:
    """--source must be an address of this host: a bind to it (no packet is sent) tells."""
    family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        try:
            probe_socket.bind((str(source), 0))
        except OSError as exc:
            raise UsageError(
                f"--source: {text!r} is not an address of this host: {os_reason(exc)}"
            ) from None


def _seconds(text: str) -> float:
    from relayaudit.config import parse_duration

    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _with_timeout(config: Config, seconds: float | None) -> Config:
    """`check --timeout`: the greeting and command waits, and a session limit that fits them."""
    if seconds is None:
        return config
    timeouts = config.timeouts.model_copy(
        update={
            "greeting": seconds,
            "command": seconds,
            "session": max(config.timeouts.session, 8 * seconds),
        }
    )
    return config.model_copy(update={"timeouts": timeouts})


class _WaitLine:
    """`check` on a terminal: what the probe waits for, on standard error, updated at most once
    a second and only for waits of a second or more; cleared when the probe ends."""

    def __init__(self) -> None:
        from relayaudit.session import Waiting  # the SMTP client loads only when a probe runs

        self.waiting = Waiting()
        self.waiting.idle = self.clear
        self.shown = False
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, args: argparse.Namespace) -> _WaitLine | None:
        from relayaudit.session import WAITING

        if args.json or not sys.stderr.isatty():
            return None
        line = cls()
        WAITING.set(line.waiting)
        line.task = asyncio.get_running_loop().create_task(line._show())
        return line

    async def _show(self) -> None:
        last = 0.0
        while True:
            waiting = self.waiting
            text = waiting.line()
            now = time.monotonic()
            if text is not None and now - waiting.since >= 1.0 and now - last >= 1.0:
                sys.stderr.write("\r\x1b[K" + text)
                sys.stderr.flush()
                self.shown, last = True, now
            await asyncio.sleep(0.25)

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False

    async def stop(self) -> None:
        from relayaudit.session import WAITING

        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.clear()
        WAITING.set(None)


async def _check(args: argparse.Namespace) -> int:
    addresses = await _resolve(args.host, source="host")
    config = _with_timeout(_check_config(args, addresses), args.timeout)
    ports: list[int] = args.port or (list(config.ports) if args.config else [25])
    approvals = args.config is not None  # without a config there is no approved list
    # the config's owner table, read before any probe (an unreadable owners_file: exit 78)
    owners = load_owners(config) if _has_owners(config) else None
    for port in ports:
        if not 0 < port < 65536:
            raise UsageError(f"--port: {port} is outside 1-65535")
    if args.confirm and (
        config.canary.domain == "invalid" or config.canary.domain.endswith(".invalid")
    ):
        raise ConfigError(
            f"--confirm: canary.domain {config.canary.domain!r} cannot receive mail; give a "
            "--config whose [canary] domain has its MX at canary.listen"
        )
    from relayaudit.probe import probe, settled

    settings = probe_settings(config, confirm=args.confirm)
    canary: CanaryReceiver | None = None
    if args.confirm:
        from relayaudit.canary import start_canary

        canary = await start_canary(config)
    outcomes: list[tuple[ProbeResult, Verdict]] = []
    wait_line = _WaitLine.start(args)
    try:
        for address in addresses:
            version = ipaddress.ip_address(address).version
            source = config.source_for(version)
            own = replace(settings, source_address=str(source) if source is not None else None)
            for port in ports:
                if config.unsourced_family(version):  # one clear line, no connection
                    result = settled(address, port, no_source(config, version), vantage="none")
                    outcomes.append((result, _check_verdict(config, result, approvals, owners)))
                    continue
                result = await probe(
                    address,
                    port,
                    own,
                    implicit_tls=port in config.implicit_tls_ports,
                    expect_token=canary.expect if canary is not None else None,
                )
                if args.retry_greylisted and greylisted(result):
                    result = await _retry_greylisted(args, config, result, own, canary)
                if result.confirmation is not None and result.confirmation.sent and not args.json:
                    print(
                        f"waiting up to {config.canary.wait:g}s for canary {result.confirmation.token}...",
                        file=sys.stderr,
                    )
                result = await await_confirmation(result, canary, config.canary.wait)
                outcomes.append((result, _check_verdict(config, result, approvals, owners)))
    finally:
        if wait_line is not None:
            await wait_line.stop()
        if canary is not None:
            await canary.stop()
    if args.json:
        doc = [
            {"result": r.model_dump(mode="json"), "verdict": v.model_dump(mode="json")}
            for r, v in outcomes
        ]
        print(json.dumps(doc if len(doc) > 1 else doc[0], indent=2))
    else:
        width = terminal_width()
        rendered = (
            render_check(
                r,
                v,
                transcript=not args.no_transcript,
                approved_note=_approved_note(config, r),
                approvals=approvals,
                width=width,
            )
            for r, v in outcomes
        )
        print("\n\n".join(rendered))
    if any(v.status is VerdictStatus.INTERNAL_ERROR for _, v in outcomes):
        return ExitCode.SOFTWARE  # the probe logged the traceback
    severities = [f.severity.value for _, v in outcomes for f in v.findings]
    if _found(args.fail_on, relays=sum(v.relay for _, v in outcomes), severities=severities):
        return EXIT_RELAY
    if any(v.status is VerdictStatus.ERROR for _, v in outcomes):
        return ExitCode.TEMPFAIL  # a network error left no verdict: try again
    return EXIT_OK


async def _retry_greylisted(
    args: argparse.Namespace,
    config: Config,
    first: ProbeResult,
    settings: ProbeSettings,
    canary: CanaryReceiver | None,
) -> ProbeResult:
    """`check --retry-greylisted`: the same tests once more, relay.greylist_retry_after after
    the first try (greylisting lets a client through that comes back with the same addresses)."""
    from relayaudit.probe import probe

    after = config.relay.greylist_retry_after
    if not args.json:
        print(
            f"{endpoint(first.address, first.port)} deferred the tests (greylisting?): trying "
            f"again {after:g}s after the first try (relay.greylist_retry_after)...",
            file=sys.stderr,
        )

    async def again(control: str | None) -> ProbeResult:
        return await probe(
            first.address,
            first.port,
            settings,
            implicit_tls=first.port in config.implicit_tls_ports,
            expect_token=canary.expect if canary is not None else None,
            control_recipient=control,
        )

    return await retry(first, again, after=after)


def _sweep_exit(stats: SweepStats, fail_on: str) -> int:
    """A sweep's exit code: 70 when a probe hit a bug, else 1 when --fail-on is met, else 0."""
    if stats.statuses.get(VerdictStatus.INTERNAL_ERROR):
        print(
            f"relayaudit: {stats.statuses[VerdictStatus.INTERNAL_ERROR]} probe(s) ended in an "
            f"internal error (a bug; exit {ExitCode.SOFTWARE.value}): see probe.internal_error "
            "in the log",
            file=sys.stderr,
        )
        return ExitCode.SOFTWARE
    severities = [s for s, n in stats.severities.items() if n]
    return EXIT_RELAY if _found(fail_on, relays=stats.relays, severities=severities) else EXIT_OK


def _has_owners(config: Config) -> bool:
    return bool(config.owners) or config.owners_file is not None


def _check_verdict(
    config: Config, result: ProbeResult, approvals: bool, owners: OwnerTable | None = None
) -> Verdict:
    """judge_result, or without an approved list (`check` with no --config) no unapproved-smtp
    finding: nobody said whether the service is approved, and the output says so instead.
    Each finding names its owner from `owners` (the config's table), as a sweep's would."""
    today = approval_day(datetime.now(UTC), local_zone())  # check judges approvals now
    verdict = (
        judge_result(config, result, day=today) if approvals else judge(result, approved=True)
    )
    if owners is None or not verdict.findings:
        return verdict
    owner = owners.lookup(result.address, result.port)
    findings = tuple(f.model_copy(update={"owner": owner}) for f in verdict.findings)
    return verdict.model_copy(update={"findings": findings})


def _approved_note(config: Config, result: ProbeResult) -> str | None:
    """The note of the [[approved]] entry covering the result's address:port; None: not approved."""
    today = approval_day(datetime.now(UTC), local_zone())
    entry = config.is_approved(ipaddress.ip_address(result.address), result.port, day=today)
    return entry.note if entry is not None else None


# -- sweep ---------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and done < total):
            return
        self._last = now
        width = 30
        filled = width * done // max(total, 1)
        rate = done / max(now - self._start, 1e-6)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} hosts {rate:7.1f}/s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _event_loop_of(path: Path) -> eventloop.EventLoopChoice:
    """The daemon's loop is chosen before it starts; its own config load reports any error."""
    try:
        return load_config(path).limits.event_loop
    except RelayAuditError:
        return "auto"


def _sweep_main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    shard = _shard_arg(args.shard)
    processes = args.processes if args.processes is not None else config.limits.processes
    if processes < 1:
        raise UsageError(f"--processes: {processes} must be at least 1")
    report_format(args.report)  # a bad suffix is an error before the sweep starts
    if config.allow_large_scope:
        print(f"relayaudit: a large scope, allowed: {config.allow_large_scope}", file=sys.stderr)
    targets = _sweep_targets(config, args.targets_file)
    sweep_id = new_sweep_id()  # one sweep, however many processes write its lines
    run = _Run(shard=str(shard or Shard(0, 1))) if args.report is not None else None
    if processes == 1:
        listed = FindingBriefs(everything=args.all)
        stats, written = eventloop.run(
            _sweep(
                config,
                shard,
                progress=_Progress(),
                listed=listed,
                sweep_id=sweep_id,
                run=run,
                targets=targets,
            ),
            config.limits.event_loop,
            young=_sweep_young(config),
        )
        print(render_summary(stats))
        print(f"\n{written} findings written to {config.output.findings}")
        _print_findings_table(listed.briefs, everything=args.all, owners=_has_owners(config))
        if args.report is not None and run is not None:
            run.stats = stats
            sweep_report(args.report, config.output.findings, sweep_id, config=config, run=run)
        return _sweep_exit(stats, args.fail_on)
    if config.canary.enabled:
        raise UsageError(
            f"--processes: {processes}: confirmation mode (canary.enabled) needs the canary "
            "receiver in the sweeping process; use one process"
        )
    code = _sweep_processes(
        config,
        shard,
        processes,
        everything=args.all,
        sweep_id=sweep_id,
        run=run,
        fail_on=args.fail_on,
        targets=targets,
    )
    if args.report is not None and run is not None:
        sweep_report(args.report, config.output.findings, sweep_id, config=config, run=run)
    return code


def _sweep_young(config: Config) -> int | None:
    """A one-shot sweep that only probes gets the larger first generation (eventloop.py); with
    the canary receiver, whose peers may be hostile and build cycles, the common one."""
    return None if config.canary.enabled else eventloop.SWEEP_YOUNG


def _sweep_targets(config: Config, files: Sequence[str]) -> TargetList | None:
    """The lists of targets_from and --targets-file, read once (before any fork), with their
    problems (a bad or out-of-scope line: FILE:LINE) on standard error."""
    if not config.targets_from and not files:
        if not config.targets:
            raise UsageError(
                f"{config.source}: nothing to sweep: targets is empty and neither targets_from "
                "nor --targets-file names a list"
            )
        return None
    if files.count("-") > 1:
        raise UsageError("--targets-file: - (standard input) can be given once")
    targets = load_targets(config, files=files, stdin=sys.stdin.buffer)
    for one in targets.sources:
        for problem in one.problems:
            print(f"relayaudit: warning: {problem}", file=sys.stderr)
        print(
            f"relayaudit: {one.label}: {one.count} addresses, {one.out_of_scope} out of scope, "
            f"{one.bad} bad lines (sha256 {one.digest})",
            file=sys.stderr,
        )
    space = targets.space(config)
    for gap in family_gaps(config, space, targets):
        print(f"relayaudit: warning: {gap}", file=sys.stderr)
    if not len(space):
        raise UsageError(f"{config.source}: nothing to sweep: the target lists hold no address")
    return targets


_GRAVITY = (ExitCode.SOFTWARE, ExitCode.CONFIG, ExitCode.USAGE, ExitCode.TEMPFAIL)


def _gravest(codes: Sequence[int]) -> int:
    """The code the parent of failed sweep processes exits with: a bug first, then the config's."""
    if any(c not in _GRAVITY for c in codes):
        return ExitCode.SOFTWARE  # killed by a signal, or exited 0 without its report
    return min(codes, key=lambda c: _GRAVITY.index(ExitCode(c)))


def _print_findings_table(
    briefs: Sequence[FindingBrief], *, everything: bool, owners: bool
) -> None:
    """The end of a sweep: the findings that name their hosts, most severe first (with an
    owner column when the config has an owner table)."""
    what = "findings" if everything else "relay findings"
    if not briefs:
        print(f"\nno {what}" + ("" if everything else " (--all lists every finding)"))
        return
    print(f"\n{len(briefs)} {what}, most severe first:")
    print("\n".join(render_table(briefs, width=terminal_width(), owners=owners)))


async def _sweep(
    config: Config,
    shard: Shard | None,
    *,
    progress: _Progress | None,
    sweep_id: str | None = None,
    label: Shard | None = None,
    listed: FindingBriefs,
    run: _Run | None = None,
    targets: TargetList | None = None,
) -> tuple[SweepStats, int]:
    """One process's sweep; `sweep_id` and `label` (the shard a user asked for) name its lines."""
    sink = FindingsFile(
        config.output.findings, sweep_id=sweep_id, shard=str(label or shard or Shard(0, 1))
    )
    try:
        sink.open()
    except OSError as exc:
        raise ConfigError(
            f"output.findings: cannot write {str(config.output.findings)!r}: {exc.strerror}"
        ) from None
    canary: CanaryReceiver | None = None
    if config.canary.enabled:
        from relayaudit.canary import start_canary

        canary = await start_canary(config)
    try:
        sinks: list[Sink] = [sink, listed]
        if run is not None:  # `--report`: the SMTP services it saw, for the HTML page
            from relayaudit.html_page import ServicesSeen

            seen = ServicesSeen()
            sinks.append(seen)
        stats = await sweep(
            config, sinks=sinks, shard=shard, canary=canary, progress=progress, targets=targets
        )
        if run is not None:
            run.services += seen.services
    finally:
        sink.close()
        if canary is not None:
            await canary.stop()
    return stats, sink.written


def _load_probing(event_loop: eventloop.EventLoopChoice) -> None:
    """Load, before the fork, what each child would load at its first open port: the SMTP
    client, the schemas of the result, the verdict and the findings line, and the event loop
    (uvloop). Forked children share it, instead of each paying for it (about 50 ms of CPU per
    process)."""
    eventloop.loop_factory(event_loop)  # imports uvloop where it is chosen
    from relayaudit import probe  # noqa: F401 - imported for its side effect
    from relayaudit.evidence import ProbeResult, SessionFacts
    from relayaudit.records import FindingRecord
    from relayaudit.verdict import Finding, Verdict

    for model in (ProbeResult, SessionFacts, Finding, Verdict, FindingRecord):
        model.model_rebuild()


def _sweep_processes(
    config: Config,
    shard: Shard | None,
    processes: int,
    *,
    everything: bool,
    sweep_id: str,
    run: _Run | None = None,
    fail_on: str = "relay",
    targets: TargetList | None = None,
) -> int:
    """Fork `processes` children after the config is loaded (no second interpreter start-up).

    Shard i/n is split into the sub-shards of Shard.split, whose union is exactly i/n whatever
    the number of processes; each child gets 1/P of the rate limits and of the concurrency, so
    together they keep the configured politeness and connections in flight. Each child reports
    its figures and the findings for the table to the parent as JSON over a pipe.
    """
    outer = shard or Shard(0, 1)
    subs = outer.split(processes)
    limits = config.limits.model_copy(
        update={
            "rate": config.limits.rate / processes,
            "subnet_rate": config.limits.subnet_rate / processes,
            "concurrency": max(1, config.limits.concurrency // processes),
        }
    )
    child_config = config.model_copy(update={"limits": limits})
    _load_probing(config.limits.event_loop)
    children: list[tuple[int, int]] = []
    for p in range(processes):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: sweep one sub-shard, report its figures, never return
            code: int = ExitCode.SOFTWARE
            try:
                os.close(read_end)
                listed = FindingBriefs(everything=everything)
                stats, written = eventloop.run(
                    _sweep(
                        child_config,
                        subs[p],
                        progress=None,
                        sweep_id=sweep_id,
                        label=outer,
                        listed=listed,
                        run=run,
                        targets=targets,
                    ),
                    config.limits.event_loop,
                    young=_sweep_young(config),
                )
                report = {
                    **stats.to_json(),
                    "written": written,
                    "listed": [b.to_json() for b in listed.briefs],
                    "services": [
                        [s.address, s.port, s.status.value] for s in (run.services if run else [])
                    ],
                }
                out = memoryview(json.dumps(report).encode())
                while out:  # the parent reads each child to the end in turn: this may block
                    out = out[os.write(write_end, out) :]
                code = EXIT_OK
            except RelayAuditError as exc:
                print(f"relayaudit: {exc}", file=sys.stderr)
                code = exc.exit_code
            except BaseException:
                code = _internal_error()  # os._exit below would otherwise swallow the traceback
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    parts, failed = [], []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not data:
            failed.append(code)
        else:
            parts.append(json.loads(data))
    if failed:
        # the parent exits with the gravest of its children's codes (a signal counts as a bug)
        worst = _gravest(failed)
        print(
            f"relayaudit: {len(failed)} of {processes} sweep processes failed (exit "
            f"{', '.join(map(str, failed))}); see above",
            file=sys.stderr,
        )
        return worst
    stats = SweepStats.merge([SweepStats.from_json(part) for part in parts])
    if run is not None:
        from relayaudit.html_page import Service

        run.stats = stats
        run.services = [
            Service(a, p, VerdictStatus(s)) for part in parts for a, p, s in part["services"]
        ]
    print(render_summary(stats))
    print(
        f"\n{sum(part['written'] for part in parts)} findings written to "
        f"{config.output.findings} by {processes} processes"
    )
    briefs = [FindingBrief.from_json(b) for part in parts for b in part["listed"]]
    _print_findings_table(briefs, everything=everything, owners=_has_owners(config))
    return EXIT_RELAY if stats.relays else EXIT_OK
