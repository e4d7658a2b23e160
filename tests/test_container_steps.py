"""Runs the Dockerfile's steps outside Docker (wheel, venvs, install, SBOM, run, healthcheck); fails on drift."""

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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lockfile
import pytest
from cli_runner import wait_until
from loopback import free_port

from relayaudit.config import MetricsConfig
from relayaudit.daemon import STOP_GRACE
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.verdict import FindingKind

REPO = Path(__file__).resolve().parent.parent
RELAY_KINDS = {k.value for k in FindingKind if k.is_relay}
DOCKERFILE = REPO / "Dockerfile"

# Every absolute path the Dockerfile names must be one of these (or below one): the test maps
# each into a per-stage directory. A new path in the Dockerfile fails the test until it is taught.
IMAGE_PATHS = (
    "/src",
    "/wheels",
    "/opt/tools",
    "/opt/relayaudit",
    "/usr/share/doc/relayaudit",
    "/etc/relayaudit",
    "/var/lib/relayaudit",
)
SBOM = "/usr/share/doc/relayaudit/sbom.cdx.json"  # where the image keeps its SBOM (README)
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
    builder: StageRoot  # moved aside once built: the runtime cannot use what it did not copy
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
            elif ins.keyword == "COPY" and ins.flags:
                assert set(ins.flags) == {"from"}, f"{where}: COPY {ins.flags}: teach the test"
                *sources, dest = shlex.split(ins.value)
                other = roots[ins.flags["from"]]
                for source in sources:
                    _copy_between_stages(other, source, root, dest, where)
            elif ins.keyword == "COPY":
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
    # Each earlier stage is moved aside: a path of it that the runtime still named (rather than
    # copied) breaks now, as it would in the image.
    *earlier, _ = roots.values()
    for left in earlier:
        left.root.rename(left.root.with_name(left.root.name + "-gone"))
    builder = StageRoot(earlier[0].root.with_name(earlier[0].root.name + "-gone"))
    return Built(
        runtime=root, builder=builder, env=env, workdir=workdir, users=users, owners=owners
    )


def _copy_between_stages(
    source_stage: StageRoot, source: str, stage: StageRoot, dest: str, where: str
) -> None:
    """COPY --from: the tree, with the source stage's root in its text files (the venv's script
    headers and activate scripts) turned into this stage's. In the image both stages see the
    same absolute path; here each stage has a directory of its own."""
    src, target = source_stage.path(source), stage.path(dest)
    assert src.exists(), f"{where}: {source} was not built by that stage"
    if src.is_dir():
        shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        copied = [p for p in target.rglob("*") if p.is_file() and not p.is_symlink()]
    else:
        target.mkdir(parents=True, exist_ok=True)
        copied = [Path(shutil.copy2(src, target / src.name))]
    old, new = str(source_stage.root).encode(), str(stage.root).encode()
    for path in copied:
        data = path.read_bytes()
        if old in data and b"\0" not in data:  # compiled files keep the old name in tracebacks
            path.write_bytes(data.replace(old, new))


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
    # made without pip in the builder, copied whole to the same path
    builder = stages[0]
    assert any(f"python -m venv --without-pip {venv}" in r.value for r in builder.all("RUN"))
    copies = [(c.flags, c.value) for c in runtime.all("COPY")]
    assert ({"from": "builder"}, f"{venv} {venv}") in copies, copies
    assert ({"from": "builder"}, f"{Path(SBOM).parent} {Path(SBOM).parent}") in copies, copies

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


def _pip_commands(stage: Stage) -> list[list[str]]:
    """Every pip command of the stage's RUN instructions, its verb (`install`, `wheel`) first,
    then pip's general options (`--python`) and the verb's."""
    found = []
    for ins in stage.all("RUN"):
        for piece in ins.value.split("&&"):
            argv = shlex.split(piece)
            if argv[0].endswith("/pip") or argv[:3] == ["python", "-m", "pip"]:
                verb = next(i for i, word in enumerate(argv) if word in {"install", "wheel"})
                start = 3 if argv[0] == "python" else 1
                found.append([argv[verb], *argv[start:verb], *argv[verb + 1 :]])
    return found


def test_every_install_is_locked_and_hashed() -> None:
    """pip installs only exported lock files, with hashes required and no dependency resolution
    of its own, and relayaudit's wheel (built without isolation) without its dependencies."""
    stages = dockerfile()
    assert not any(_pip_commands(s) for s in stages[1:]), "the runtime stage installs nothing"
    commands = _pip_commands(stages[0])
    installs = [c for c in commands if c[0] == "install"]
    (wheel,) = [c for c in commands if c[0] == "wheel"]
    assert {"--no-build-isolation", "--no-deps"} <= set(wheel), wheel
    files = []
    for argv in installs:
        assert "--no-deps" in argv, argv
        if "-r" in argv:
            assert "--require-hashes" in argv, argv
            files.append(argv[argv.index("-r") + 1])
        else:
            assert "--no-index" in argv and argv[-1] == "/wheels/relayaudit-*.whl", argv
    assert sorted(files) == ["requirements/build.txt", "requirements/runtime.txt"]
    # the runtime venv is made without pip and gets only the runtime file and the wheel
    into_runtime = [a for a in installs if "/opt/relayaudit/bin/python" in a]
    assert [a[a.index("-r") + 1] for a in into_runtime if "-r" in a] == ["requirements/runtime.txt"]
    assert len(into_runtime) == 2


def test_the_sbom_is_made_offline_by_the_locked_tool_and_documented() -> None:
    builder = dockerfile()[0]
    sbom_runs = [r.value for r in builder.all("RUN") if "cyclonedx-py" in r.value]
    assert len(sbom_runs) == 1
    argv = shlex.split(sbom_runs[0].split("&&")[-1])
    assert argv[0] == "/opt/tools/bin/cyclonedx-py" and argv[1] == "environment"
    assert (
        argv[argv.index("--output-file") + 1] == SBOM and argv[-1] == "/opt/relayaudit/bin/python"
    )
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert SBOM in readme and SBOM in DOCKERFILE.read_text(encoding="utf-8")


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


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The Dockerfile's steps, run once for the tests below (about half a minute, mostly pip)."""
    stages = dockerfile()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if stages[-1].base != f"python:{py}-slim":
        pytest.skip(f"the image's base is {stages[-1].base}; this interpreter is Python {py}")
    started = time.monotonic()
    result = run_dockerfile(stages, tmp_path_factory.mktemp("image"))
    assert time.monotonic() - started < 180, "the Dockerfile's steps took too long"
    return result


async def test_image_steps_run_outside_docker(built: Built, tmp_path: Path) -> None:
    stages = dockerfile()
    started = time.monotonic()
    runtime, image = built.runtime, stages[-1]
    assert not runtime.path("/wheels").exists(), "the wheels stay in the builder"
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


# -- what the image holds ---------------------------------------------------------------------


def _installed(site_packages: Path) -> dict[str, str]:
    """{canonical name: version} of every distribution in a venv's site-packages."""
    found = {}
    for metadata in site_packages.glob("*.dist-info/METADATA"):
        head = metadata.read_text(encoding="utf-8").split("\n\n", 1)[0]
        fields = dict(re.findall(r"^(Name|Version): (.+)$", head, re.MULTILINE))
        found[lockfile.canonical(fields["Name"])] = fields["Version"]
    return found


def _site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3*/site-packages")
    return found


def test_the_runtime_venv_holds_the_lock_and_nothing_else(built: Built) -> None:
    """Every package of relayaudit[speed]'s lock at its version, and nothing else: no pip or
    setuptools for a scanner to flag, no SBOM tool, no build tools."""
    venv = built.runtime.path("/opt/relayaudit")
    assert _installed(_site_packages(venv)) == lockfile.runtime()
    assert not list(venv.glob("bin/pip*")) and not list(venv.glob("bin/cyclonedx*"))
    for gone in ("/opt/tools", "/wheels", "/src"):
        assert not built.runtime.path(gone).exists(), f"{gone} must stay in the builder"


def test_the_sbom_lists_exactly_the_runtime_lock(built: Built) -> None:
    """The SBOM the builder wrote, read as a scanner would: relayaudit as the main component,
    every locked runtime package present at its version with its purl, nothing unlocked."""
    sbom = json.loads(built.runtime.path(SBOM).read_text(encoding="utf-8"))
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    locked = lockfile.runtime()
    main = sbom["metadata"]["component"]
    assert (main["name"], main["version"], main["type"]) == (
        "relayaudit",
        locked.pop("relayaudit"),
        "application",
    )
    listed = {lockfile.canonical(c["name"]): c["version"] for c in sbom["components"]}
    assert len(listed) == len(sbom["components"]), "a package listed twice"
    missing = {n: v for n, v in locked.items() if listed.get(n) != v}
    unlocked = {n: v for n, v in listed.items() if locked.get(n) != v}
    assert not missing and not unlocked, f"missing: {missing}; not in the lock: {unlocked}"
    for component in sbom["components"]:
        name = lockfile.canonical(component["name"])
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}", component
    # the tool that wrote it stays in the builder (some wheels carry SBOMs of their own,
    # dist-info/sboms/*.cyclonedx.json: those are data, not the tool)
    tool = {"cyclonedx", "cyclonedx_py", "cyclonedx-py"}
    assert not [p for p in built.runtime.root.rglob("*") if p.name in tool]


def test_the_wheel_holds_every_file_of_the_package(built: Built) -> None:
    """Package data included: every file the builder copied under relayaudit/ is in the wheel
    (a template, style sheet or example config missing from package-data fails here)."""
    (wheel,) = built.builder.path("/wheels").glob("relayaudit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = {n for n in archive.namelist() if n.startswith("relayaudit/")}
    source = built.builder.path("/src")
    copied = {
        str(p.relative_to(source))
        for p in (source / "relayaudit").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert inside == copied, f"not in the wheel: {sorted(copied - inside)}"


def _from_the_image(
    built: Built, *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`relayaudit ARGS` from the runtime venv, outside the source tree, in the image's env."""
    exe = shutil.which("relayaudit", path=built.env["PATH"])
    assert exe is not None and exe.startswith(str(built.runtime.path("/opt/relayaudit"))), exe
    return subprocess.run(
        [exe, *args],
        env=built.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_installed_wheel_runs_on_its_own(built: Built, tmp_path: Path) -> None:
    """From the runtime venv, with no source tree: the version, the example config (printed
    from package data, then checked as a copy), the demo with the shipped hook templates and
    its HTML report (package style and script), and every report format of its state store."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    outside = tmp_path / "operator"
    outside.mkdir()

    def ok(*args: str, timeout: float = 60) -> str:
        done = _from_the_image(built, *args, cwd=outside, timeout=timeout)
        assert done.returncode == 0, f"relayaudit {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    assert ok("--version") == f"relayaudit {version}\n"  # no checkout, so no commit

    example = ok("config", "example")
    assert example == (REPO / "relayaudit" / "relayaudit.example.toml").read_text("utf-8")
    (outside / "relayaudit.toml").write_text(example, encoding="utf-8")
    assert ok("config", "check", "relayaudit.toml").startswith("relayaudit.toml: valid\n")

    demo = outside / "demo"
    out = ok(
        "demo",
        "--hooks",
        "--output",
        str(demo / "findings.jsonl"),
        "--report",
        str(demo / "report.html"),
        timeout=120,
    )
    assert f"report: {demo / 'report.html'}" in out
    sent = re.search(r"alert hooks \(--hooks\): (\d+) deliveries sent, 0 pending, 0 dead", out)
    assert sent and int(sent.group(1)) > 0, out
    page = (demo / "report.html").read_text(encoding="utf-8")
    for asset in ("html_report.css", "html_report.js"):
        assert (REPO / "relayaudit" / asset).read_text(encoding="utf-8") in page, asset
    lines = [json.loads(x) for x in (demo / "findings.jsonl").read_text().splitlines() if x]
    assert lines and {x["tool_version"] for x in lines} == {version}
    # the remediation data is package data: every relay names an entry of it (issue 30)
    relays = [x for x in lines if x["kind"] in RELAY_KINDS]
    assert relays and all(x["remediation"]["id"].count("/") == 1 for x in relays), relays

    store = str(demo / "demo-state.sqlite")
    for fmt in ("html", "md", "csv", "json"):
        ok("report", "--state", store, "--format", fmt, "--output", str(outside / f"r.{fmt}"))
        assert (outside / f"r.{fmt}").stat().st_size > 0, fmt
    # ... and its texts are read from the installed wheel for the Markdown report
    markdown = (outside / "r.md").read_text(encoding="utf-8")
    assert "## How to fix the relays" in markdown and "Documentation: <https://" in markdown
    report = json.loads((outside / "r.json").read_text(encoding="utf-8"))
    assert report["tool_version"] == version and report["findings"]
