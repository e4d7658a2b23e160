"""Runs the Dockerfile's steps outside Docker (wheels, venv, install, run, healthcheck); fails on drift."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cli_runner import wait_until
from loopback import free_port

from relayaudit.config import MetricsConfig
from relayaudit.daemon import STOP_GRACE
from relayaudit.lab import Behaviour, Lab, ServerSpec

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"

# Every absolute path the Dockerfile names must be one of these (or below one): the test maps
# each into a per-stage directory. A new path in the Dockerfile fails the test until it is taught.
IMAGE_PATHS = ("/src", "/wheels", "/opt/relayaudit", "/etc/relayaudit", "/var/lib/relayaudit")
SYSTEM_PATHS = ("/usr/sbin/nologin",)  # named by useradd, which the test does not run

LAB_HOST_RELAY, LAB_HOST_CLOSED = "127.0.61.1", "127.0.61.2"
LAB_NET = "127.0.61.0/29"
LAB_PORT = 2761

# What pip says when it cannot reach a package index: only then may the build steps skip.
_OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"Max retries exceeded|ConnectionError|Could not fetch URL"
)


# -- a small Dockerfile reader ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: dict[str, str]  # --name=value options before the arguments
    value: str  # the arguments, continuation lines joined
    line: int

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD/ENTRYPOINT/VOLUME; the shell form is an error here."""
        assert self.value.startswith("["), f"line {self.line}: {self.keyword} must use JSON form"
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
        return [str(a) for a in parsed]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {len(found)}"
        return found[0]


_FLAG = re.compile(r"--([a-z-]+)=(\S+)\s*")


def _split_flags(rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while match := _FLAG.match(rest):
        flags[match.group(1)] = match.group(2)
        rest = rest[match.end() :]
    return flags, rest.strip()


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions: comments dropped, `\\` continuations joined."""
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside a continuation) and blank lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "Dockerfile ends inside a continuation"
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags, value = _split_flags(rest)
        if keyword == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
            continue
        assert stages, f"line {number}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, flags, value, number))
    return stages


def dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _env_assignments(value: str) -> list[tuple[str, str]]:
    pairs = []
    for word in shlex.split(value):
        key, eq, val = word.partition("=")
        assert eq, f"ENV {value!r}: use KEY=VALUE"
        pairs.append((key, val))
    return pairs


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


# instructions that only set what the image is; the checks use them, nothing to run
_SETTINGS = frozenset({"USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"})

# -- the image's file system, as directories on this machine ------------------------------------

_PATH_RE = re.compile(
    r"(?<![\w./-])(" + "|".join(re.escape(p) for p in IMAGE_PATHS) + r")(?![\w.-])"
)


@dataclass
class StageRoot:
    """One stage's file system: image path /x lives at root/x."""

    root: Path

    def path(self, image_path: str) -> Path:
        assert image_path.startswith("/"), image_path
        return self.root / image_path.lstrip("/")

    def text(self, value: str) -> str:
        return _PATH_RE.sub(lambda m: str(self.path(m.group(1))), value)


@dataclass
class Built:
    """What running the Dockerfile left behind: the runtime stage and its final settings."""

    runtime: StageRoot
    env: dict[str, str]
    workdir: Path
    users: dict[str, int]  # uid/gid from groupadd/useradd, which the test cannot run
    owners: dict[str, str]  # image directory -> owner from `install -o`, stripped when run


def _base_env(tmp: Path) -> dict[str, str]:
    """The base image's environment: its `python` (this interpreter) first on PATH.

    The package index settings of this machine (PIP_*, proxies) are passed through, as a build
    on a CI runner would pass them with --build-arg or a pip.conf.
    """
    base_bin = tmp / "base-bin"
    base_bin.mkdir()
    (base_bin / "python").symlink_to(sys.executable)
    (tmp / "home").mkdir()
    env = {"PATH": f"{base_bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env["HOME"] = str(tmp / "home")
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key.lower() in {
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "ssl_cert_file",
        }:
            env[key] = value
    return env


def _run_step(cmd: str, *, env: dict[str, str], cwd: Path, where: str, timeout: float) -> None:
    proc = subprocess.run(
        ["/bin/sh", "-c", cmd],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    tail = "\n".join(output.splitlines()[-15:])
    if _OFFLINE.search(output):
        pytest.skip(f"{where}: pip cannot reach a package index here:\n{tail}")
    raise AssertionError(f"{where}: `{cmd}` exited {proc.returncode}:\n{tail}")


def run_dockerfile(stages: list[Stage], tmp: Path) -> Built:
    """Execute every instruction of every stage the way the test can outside Docker."""
    base_env = _base_env(tmp)
    roots = {
        s.name or str(i): StageRoot(tmp / f"stage-{s.name or i}") for i, s in enumerate(stages)
    }
    users: dict[str, int] = {}
    owners: dict[str, str] = {}
    env: dict[str, str] = {}
    workdir = tmp
    root = StageRoot(tmp)
    for i, stage in enumerate(stages):
        root = roots[stage.name or str(i)]
        root.root.mkdir()
        env = dict(base_env)
        workdir = root.root
        for ins in stage.instructions:
            where = f"Dockerfile:{ins.line} {ins.keyword}"
            if ins.keyword == "WORKDIR":
                workdir = root.path(ins.value)
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                assert not ins.flags, f"{where}: COPY --from/--chown: teach the test"
                *sources, dest = shlex.split(ins.value)
                target = root.path(dest) if dest.startswith("/") else workdir / dest
                for source in sources:
                    src = REPO / source
                    if src.is_dir():
                        shutil.copytree(
                            src,
                            target,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                        )
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, target / src.name)
            elif ins.keyword == "ENV":
                for key, value in _env_assignments(ins.value):
                    env[key] = _expand(root.text(value), env)
            elif ins.keyword == "RUN":
                _run(ins, root, roots, env, workdir, users, owners, where)
            elif ins.keyword == "VOLUME":
                for volume in ins.exec_form():
                    root.path(volume).mkdir(parents=True, exist_ok=True)
            elif ins.keyword in _SETTINGS:
                pass  # settings of the image; the tests below use them
            else:
                raise AssertionError(f"{where}: the test does not know how to run {ins.keyword}")
    return Built(runtime=root, env=env, workdir=workdir, users=users, owners=owners)


def _run(
    ins: Instruction,
    root: StageRoot,
    roots: dict[str, StageRoot],
    env: dict[str, str],
    workdir: Path,
    users: dict[str, int],
    owners: dict[str, str],
    where: str,
) -> None:
    mounts: list[Path] = []
    for name, flag in ins.flags.items():
        assert name == "mount", f"{where}: RUN --{name}: teach the test"
        opts = dict(kv.split("=", 1) for kv in flag.split(","))
        assert opts.get("type") == "bind" and opts.get("from") in roots, f"{where}: {flag}"
        source = roots[opts["from"]].path(opts.get("source", "/"))
        target = root.path(opts["target"])
        assert source.exists(), f"{where}: {source} was not built by stage {opts['from']}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
        mounts.append(target)
    keep: list[str] = []
    for raw in ins.value.split("&&"):
        piece = raw.strip()
        argv = shlex.split(piece)
        if argv[0] in {"groupadd", "useradd"}:
            # users are made in the image only; the daemon below runs as this machine's user
            for opt in ("--uid", "--gid"):
                if opt in argv:
                    users[f"{argv[0]} {opt}"] = int(argv[argv.index(opt) + 1])
            continue
        if argv[0] == "install":
            stripped: list[str] = []
            owner = group = ""
            it = iter(argv)
            for word in it:
                if word == "-o":
                    owner = next(it)
                elif word == "-g":
                    group = next(it)
                else:
                    stripped.append(word)
            if owner or group:
                owners[stripped[-1]] = f"{owner}:{group}"
            piece = shlex.join(stripped)
        keep.append(root.text(piece))
    try:
        if keep:
            _run_step(" && ".join(keep), env=env, cwd=workdir, where=where, timeout=100)
    finally:
        for target in mounts:
            target.unlink()  # a bind mount lasts for its RUN only


# -- checks on the file alone ------------------------------------------------------------------


def test_dockerfile_names_only_paths_the_test_maps() -> None:
    text = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    named = set(re.findall(r"(?<![\w.:/$-])/[\w./*-]+", text))
    unknown = sorted(
        p
        for p in named
        if not any(p == k or p.startswith(k + "/") for k in IMAGE_PATHS + SYSTEM_PATHS)
    )
    assert not unknown, f"teach tests/test_container_steps.py about {unknown}"


def test_dockerfile_settings_match_the_code() -> None:
    stages = dockerfile()
    assert [s.name for s in stages] == ["builder", "runtime"]
    assert {s.base for s in stages} == {"python:3.11-slim"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    runtime = stages[-1]

    # ENTRYPOINT is the console script the wheel installs into the venv first on PATH
    assert runtime.one("ENTRYPOINT").exec_form() == ["relayaudit"]
    assert "relayaudit" in pyproject["project"]["scripts"]
    env = dict(_env_assignments(" ".join(i.value for i in runtime.all("ENV"))))
    venv = env["PATH"].split(":")[0].removesuffix("/bin")
    assert any(f"python -m venv {venv}" in r.value for r in runtime.all("RUN"))

    cmd = runtime.one("CMD").exec_form()
    assert cmd == ["run", "--config", "/etc/relayaudit/relayaudit.toml"]
    volumes = runtime.one("VOLUME").exec_form()
    assert volumes == ["/etc/relayaudit", "/var/lib/relayaudit"]
    assert Path(cmd[2]).parent == Path(volumes[0])

    # a fixed, numeric, non-root uid (Kubernetes' runAsNonRoot can check only a number) that
    # owns the state volume
    user = runtime.one("USER").value
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:"), user
    uid, gid = user.split(":")
    run_text = " ".join(r.value for r in runtime.all("RUN"))
    assert f"--uid {uid}" in run_text and f"--gid {gid}" in run_text
    assert f"install -d -o {uid} -g {gid} -m 0750 /var/lib/relayaudit" in run_text

    # HEALTHCHECK: exec form, stdlib only, asking the URL whose default is metrics.listen's
    health = runtime.one("HEALTHCHECK")
    assert health.value.startswith("CMD [")
    argv = json.loads(health.value.removeprefix("CMD").strip())
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2]
    host, port = MetricsConfig().listen
    assert env["RELAYAUDIT_HEALTHZ_URL"] == f"http://{host}:{port}/healthz"
    assert runtime.one("EXPOSE").value == str(port)
    # the stop signal the daemon handles, within its bound
    assert runtime.one("STOPSIGNAL").value == "SIGTERM"
    assert STOP_GRACE <= 10, "the Dockerfile's comment promises a 10 s stop bound"


# -- the steps, run --------------------------------------------------------------------------


def _config(metrics_port: int) -> str:
    """A config as an operator would mount it: image paths, loopback lab targets."""
    return f"""
scope = ["127.0.61.0/24"]
targets = ["{LAB_NET}"]
ports = [{LAB_PORT}]
[relay]
campus_domains = ["campus.test"]
[timeouts]
connect = "1s"
command = "3s"
session = "20s"
[limits]
concurrency = 8
rate = 500
subnet_rate = 500
[schedule]
interval = "1h"
[state]
path = "/var/lib/relayaudit/state.sqlite"
[output]
findings = "/var/lib/relayaudit/findings.jsonl"
[logging]
stdout = true
[metrics]
listen = "127.0.0.1:{metrics_port}"
"""


_NO_CAPS = ("--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs")


def _snapshot(root: Path, skip: list[Path]) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not any(p == s or s in p.parents for s in skip)
    }


def _capabilities(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(Cap\w+):\s*(\w+)$", status, re.MULTILINE))


def _healthcheck(argv: list[str], env: dict[str, str], url: str) -> int:
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe is not None, f"HEALTHCHECK: {argv[0]} not on the image's PATH"
    proc = subprocess.run(
        [exe, *argv[1:]],
        env={**env, "RELAYAUDIT_HEALTHZ_URL": url},
        capture_output=True,
        timeout=15,
        check=False,
    )
    return proc.returncode


async def test_image_steps_run_outside_docker(tmp_path: Path) -> None:
    stages = dockerfile()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if stages[-1].base != f"python:{py}-slim":
        pytest.skip(f"the image's base is {stages[-1].base}; this interpreter is Python {py}")
    started = time.monotonic()
    built = await asyncio.to_thread(run_dockerfile, stages, tmp_path)
    runtime, image = built.runtime, stages[-1]
    assert not runtime.path("/wheels").exists(), "the bind mount must not outlive its RUN"
    assert built.users == {"groupadd --gid": 10001, "useradd --uid": 10001, "useradd --gid": 10001}
    assert built.owners == {"/var/lib/relayaudit": "10001:10001"}

    metrics_port = free_port()
    cfg_path = image.one("CMD").exec_form()[2]
    runtime.path(cfg_path).write_text(runtime.text(_config(metrics_port)))
    volumes = [runtime.path(v) for v in image.one("VOLUME").exec_form()]
    before = _snapshot(runtime.root, volumes)

    argv = [
        runtime.text(a) for a in image.one("ENTRYPOINT").exec_form() + image.one("CMD").exec_form()
    ]
    exe = shutil.which(argv[0], path=built.env["PATH"])
    assert exe is not None and exe.startswith(str(runtime.path("/opt/relayaudit"))), exe
    # no capabilities: as root, drop every one (bounding, inheritable, ambient) before exec
    dropped = os.geteuid() == 0 and shutil.which("setpriv") is not None
    wrapper = ["setpriv", *_NO_CAPS, "--"] if dropped else []
    log_path = tmp_path / "stdout.jsonl"
    health_argv = json.loads(image.one("HEALTHCHECK").value.removeprefix("CMD").strip())
    url = f"http://127.0.0.1:{metrics_port}/healthz"
    specs = [
        ServerSpec(host=LAB_HOST_RELAY, port=LAB_PORT, behaviour=Behaviour.OPEN_RELAY),
        ServerSpec(host=LAB_HOST_CLOSED, port=LAB_PORT, behaviour=Behaviour.CLOSED),
    ]
    findings_path = runtime.path("/var/lib/relayaudit/findings.jsonl")

    def events(name: str) -> list[dict[str, Any]]:
        if not log_path.exists():
            return []
        rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        return [r for r in rows if r.get("event") == name]

    def relay_found() -> bool:
        if not findings_path.exists():
            return False
        rows = [json.loads(x) for x in findings_path.read_text().splitlines() if x.strip()]
        return any(r["address"] == LAB_HOST_RELAY and r["kind"] == "open-relay" for r in rows)

    async with Lab(specs):
        with log_path.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *wrapper,
                exe,
                *argv[1:],
                env=built.env,
                cwd=built.workdir,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            await wait_until(
                lambda: _healthcheck(health_argv, built.env, url) == 0, 30, "HEALTHCHECK", proc
            )
            if dropped:
                caps = _capabilities(proc.pid)
                assert {caps[k] for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {
                    "0000000000000000"
                }, caps
            await wait_until(relay_found, 60, "the open relay's finding", proc)
            await wait_until(lambda: bool(events("sweep.summary")), 30, "sweep.summary", proc)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), STOP_GRACE * 2)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 0, log_path.read_text()[-2000:]
    assert await asyncio.to_thread(_healthcheck, health_argv, built.env, url) != 0
    assert events("daemon.stop")
    summary = events("sweep.summary")[0]
    assert summary["hosts"] == 8 and summary["relays"] == 1, summary
    # the daemon wrote only into the volumes (so a read-only root file system is fine)
    assert runtime.path("/var/lib/relayaudit/state.sqlite").exists()
    assert _snapshot(runtime.root, volumes) == before
    assert time.monotonic() - started < 120
