"""The alert rules and the Grafana dashboard under deploy/: promtool checks and unit tests, the
PrometheusRule's groups, and every metric and label value they name against what the daemon exports.

promtool comes from Debian's prometheus package (scripts/test takes it out of the .deb). Without
it the promtool tests skip, or fail when RELAYAUDIT_REQUIRE_PROMTOOL=1 (.ci/run sets it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relayaudit import __version__, canary
from relayaudit.config import ScheduleConfig
from relayaudit.metrics import Metrics
from relayaudit.records import FindingStatus
from relayaudit.schedule import Schedule
from relayaudit.state import DeliveryState
from relayaudit.verdict import FindingKind, VerdictStatus

yaml: Any = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "relayaudit.rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "relayaudit.rules.test.yml"
PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "prometheus-operator" / "prometheusrule.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "relayaudit.json"
CONFIGMAP = REPO / "deploy" / "kubernetes" / "configmap.yaml"

# The sweep windows of RelayauditSweepOverdue and RelayauditNoSweepCompleted (seconds).
SWEEP_WINDOW = 46800
# Labels a scrape adds to every series (Prometheus, or the Prometheus Operator's ServiceMonitor).
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
)
# Labels whose values the operator's config names (a target source's label: issue 26), so any
# value may appear; a rule may still match them, by name, on metrics that have them.
CONFIG_LABELS = frozenset({"source"})
# Series Prometheus itself writes for every scrape target (not the daemon's).
SCRAPE_SERIES = frozenset({"up"})
# The classic dashboard model's last schemaVersion: what Grafana 12 and 13 save.
GRAFANA_SCHEMA_VERSION = 42


# -- what the daemon exports -------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """Metric names the daemon's /metrics has, with each metric's labels and their values."""

    names: frozenset[str]
    labels: dict[str, dict[str, frozenset[str]]]  # metric -> label -> the values it takes


def _canary_values() -> dict[str, set[str]]:
    """The outcomes and results canary.py counts: the strings in its `counted(family, what)`
    calls, and the first argument of `_refuse(why, reply)`, which counts a connection."""
    found: dict[str, set[str]] = {"connections": set(), "messages": set()}
    tree = ast.parse(Path(canary.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if not isinstance(first, ast.Constant) or not isinstance(first.value, str):
            continue
        if name == "counted" and len(node.args) == 2:
            found[first.value] |= {
                n.value
                for n in ast.walk(node.args[1])
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            }
        elif name == "_refuse":
            found["connections"].add(first.value)
    return found


def exported() -> Exported:
    metrics = Metrics()
    text = metrics.render()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    names = set(types)
    for name, kind in types.items():  # the series a histogram or summary really has
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {f"{name}_sum", f"{name}_count"}
    counted = _canary_values()
    values: dict[str, frozenset[str]] = {
        "status": frozenset(s.value for s in VerdictStatus),  # daemon.py: verdict.status
        "kind": frozenset(k.value for k in FindingKind),
        "outcome": frozenset(counted["connections"]),
        "result": frozenset(counted["messages"]),
        "version": frozenset({__version__}),  # relayaudit_build_info
    }
    labels: dict[str, dict[str, frozenset[str]]] = {}
    for name in types:
        family = metrics.family(name)
        labels[name] = {}
        for label in family.labelnames:
            if name == "relayaudit_findings" and label == "status":
                labels[name][label] = frozenset(s.value for s in FindingStatus)
            elif name == "relayaudit_alerts" and label == "state":
                labels[name][label] = frozenset(Metrics.ALERT_STATES)
            elif label in CONFIG_LABELS:
                labels[name][label] = frozenset()  # any value: see CONFIG_LABELS
            else:
                labels[name][label] = values[label]
    return Exported(frozenset(names), labels)


def test_the_label_values_come_from_the_code_that_sets_them() -> None:
    """The value sets above are those of the code, not of this test (a new outcome shows up)."""
    counted = _canary_values()
    # the receiver's counting code and its metric's HELP list the same outcomes
    help_text = Metrics().canary_connections_total.help
    listed = re.search(r"\(([a-z-]+(?:, [a-z-]+)+)\)", help_text)
    assert listed is not None, help_text
    assert counted["connections"] == set(listed.group(1).split(", "))
    assert counted["messages"] == {"token", "unexpected-token", "no-token"}
    assert set(Metrics.ALERT_STATES) == {s.value for s in DeliveryState}
    found = exported()
    assert found.labels["relayaudit_probes_total"]["status"] >= {"error", "internal-error"}
    assert "open-relay" in found.labels["relayaudit_findings"]["kind"]


# -- PromQL: the metric selectors of an expression ----------------------------------------------

_TOKENS = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<braces>\{[^}]*\})
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d[0-9a-zA-Z.]*|\.\d+)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<open>\()
    |(?P<close>\))
    |(?P<other>\S)""",
    re.X,
)
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
# words that are not metric names when they stand alone
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan", "start", "end", "atan2"}
)
# followed by a parenthesised list of label names
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


def selectors(expr: str) -> Iterator[Selector]:
    """The metric selectors of a PromQL expression (functions, keywords, label lists skipped)."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKENS.finditer(expr)]
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in _LABEL_LISTS and following[0] == "open":
            depth = 0
            for j in range(i + 1, len(tokens)):  # skip the label list
                depth += {"open": 1, "close": -1}.get(tokens[j][0] or "", 0)
                if depth == 0:
                    break
            i = j + 1
            continue
        if kind == "ident" and (following[0] == "open" or following[1] in ("by", "without")):
            i += 1  # a function, or an aggregation (`sum by (label) (...)`)
            continue
        if kind == "ident" and text not in _KEYWORDS:
            braces = following[1] if following[0] == "braces" else "{}"
            yield Selector(text, _matchers(braces))
            i += 2 if following[0] == "braces" else 1
            continue
        if kind == "braces":  # {__name__="..."} without a name in front
            found = _matchers(text)
            names = [v for label, op, v in found if label == "__name__" and op == "="]
            assert names, f"a selector without a metric name in {expr!r}"
            yield Selector(names[0], found)
        i += 1


def _matchers(braces: str) -> tuple[tuple[str, str, str], ...]:
    inner = braces[1:-1]
    found = []
    pos = 0
    while pos < len(inner) and inner[pos:].strip():
        match = _MATCHER.match(inner, pos)
        assert match is not None, f"cannot read the label matchers {braces!r}"
        found.append((match.group(1), match.group(2), match.group(3)))
        pos = match.end()
    return tuple(found)


def test_selectors_reads_metrics_and_matchers_but_not_functions_or_label_lists() -> None:
    expr = (
        'sum without (status) (rate(a_total{status=~"x|y", job="j"}[5m])) / on (instance) '
        "group_left () sum by (kind) (b) > bool 0 and c offset 1h or absent(d) unless "
        '{__name__="e"} * vector(1) and label_replace(f, "dst", "$1", "src", "(.*)")'
    )
    found = list(selectors(expr))
    assert [s.metric for s in found] == ["a_total", "b", "c", "d", "e", "f"]
    assert found[0].matchers == (("status", "=~", "x|y"), ("job", "=", "j"))


def problems_of(expr: str, where: str, known: Exported, recorded: frozenset[str]) -> list[str]:
    """Why EXPR names a metric or a label value that the daemon does not export."""
    problems = []
    for sel in selectors(expr):
        if sel.metric in known.names:
            own = known.labels.get(sel.metric, {})
        elif sel.metric in recorded or sel.metric in SCRAPE_SERIES:
            own = {}
        else:
            problems.append(f"{where}: {sel.metric} is not a metric relayaudit exports")
            continue
        for label, op, value in sel.matchers:
            if label == "__name__" or label in TARGET_LABELS:
                continue
            if label not in own:
                problems.append(f"{where}: {sel.metric} has no label {label!r}")
                continue
            if "$" in value or label in CONFIG_LABELS:  # a Grafana variable, a config's name
                continue
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for alt in alternatives:
                if not re.fullmatch(r"[A-Za-z0-9_-]+", alt):
                    problems.append(
                        f"{where}: {sel.metric}{{{label}{op}{value!r}}}: not a plain list"
                    )
                elif alt not in own[label]:
                    problems.append(
                        f"{where}: {sel.metric}{{{label}={alt!r}}}: no such value "
                        f"(known: {', '.join(sorted(own[label]))})"
                    )
    return problems


# -- the files ---------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = _yaml(RULES)["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def recorded() -> frozenset[str]:
    return frozenset(r["record"] for r in rules() if "record" in r)


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels() -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard()["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # the panels of a collapsed row
    return flat


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable."""
    found = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in panels()
        for t in p.get("targets", [])
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert match, f"variable {var['name']}: {var['query']!r} is not label_values(...)"
            assert match.group(2) in TARGET_LABELS, var["query"]
            found.append((f"variable {var['name']}", match.group(1)))
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus sees it once Grafana filled its variables in."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


# -- promtool ----------------------------------------------------------------------------------


def promtool_or_skip() -> str:
    """The promtool to run; a skip when there is none, or a failure under
    RELAYAUDIT_REQUIRE_PROMTOOL=1 (CI), so a broken install can never pass as skipped tests."""
    found = shutil.which("promtool")
    if found is None:
        reason = (
            "promtool is not installed (scripts/test takes it from Debian's prometheus package)"
        )
        if os.environ.get("RELAYAUDIT_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"RELAYAUDIT_REQUIRE_PROMTOOL=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return promtool_or_skip()


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> str:
    """promtool's output; an assertion naming the command and its output when it fails."""
    done = subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"promtool {' '.join(map(str, args))}: exit {done.returncode}\n{output}"
    )
    return output


def test_missing_promtool_skips_or_fails_as_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("RELAYAUDIT_REQUIRE_PROMTOOL", "1")
    with pytest.raises(pytest.fail.Exception, match="RELAYAUDIT_REQUIRE_PROMTOOL=1 but promtool"):
        promtool_or_skip()
    monkeypatch.delenv("RELAYAUDIT_REQUIRE_PROMTOOL")
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        promtool_or_skip()


def test_promtool_lints_the_daemons_metrics(promtool: str) -> None:
    """`promtool check metrics`: names, HELP and TYPE as Prometheus' conventions want them, on
    a registry with a sample in every family."""
    metrics = Metrics()
    metrics.probe("open-relay")
    metrics.set_findings({("open-relay", "new"): 1})
    metrics.alert_dead()
    metrics.sweep_completed(duration=1.5, finished_at=1_800_000_000.0)
    metrics.canary("connections", "accepted")
    metrics.canary("messages", "token")
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.render(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


def test_promtool_checks_the_plain_rules_file(promtool: str) -> None:
    version = run_promtool(promtool, "--version").splitlines()[0]
    output = run_promtool(promtool, "check", "rules", RULES)
    assert f"SUCCESS: {len(rules())} rules found" in output, f"{version}\n{output}"


def test_promtool_checks_the_prometheusrules_groups(promtool: str, tmp_path: Path) -> None:
    spec = _yaml(PROMETHEUS_RULE)["spec"]
    extracted = tmp_path / "prometheusrule.rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": spec["groups"]}), encoding="utf-8")
    output = run_promtool(promtool, "check", "rules", extracted)
    assert f"SUCCESS: {len(rules())} rules found" in output, output


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    # rule_files in the test file are relative to the test file, not to the working directory
    output = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output, output


def test_the_unit_tests_fail_on_a_changed_threshold(promtool: str, tmp_path: Path) -> None:
    """The unit tests have teeth: a rule that fires an hour late, or for the wrong kinds, fails."""
    mutations = {
        "> 46800": "> 50400",
        'status=~"new|ongoing|reopened"': 'status=~".+"',
        "  and relayaudit_last_completed_sweep_timestamp_seconds > 0\n": "\n",
        '{outcome="refused-busy"}': '{outcome=~"refused-busy|evicted"}',
        "> 0.05": "> 0.1",
    }
    original = RULES.read_text(encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    for old, new in mutations.items():
        assert original.count(old) == 1, old
        (tmp_path / RULES.name).write_text(original.replace(old, new), encoding="utf-8")
        done = subprocess.run(
            [promtool, "test", "rules", RULE_TESTS.name],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 1, f"the unit tests pass with {old!r} -> {new!r}"
        assert "FAILED" in done.stdout + done.stderr


def test_promtool_parses_every_dashboard_expression(promtool: str, tmp_path: Path) -> None:
    """Grafana is not installed here: each expression, with its variables filled in as Grafana
    would, goes through Prometheus' parser as a recording rule."""
    exprs = dashboard_exprs()
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(as_rules), encoding="utf-8")
    output = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(exprs)} rules found" in output, output


# -- the rules without promtool ----------------------------------------------------------------


def test_the_prometheusrule_holds_the_plain_files_groups() -> None:
    """kubernetes-validate has no schema for custom resources: the PrometheusRule by hand."""
    doc = _yaml(PROMETHEUS_RULE)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"]["name"] == "relayaudit"
    assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "relayaudit"
    assert set(doc["spec"]) == {"groups"}
    assert doc["spec"]["groups"] == rule_groups(), (
        "deploy/kubernetes/prometheus-operator/prometheusrule.yaml's spec.groups differs from "
        "deploy/prometheus/relayaudit.rules.yml: change both together"
    )


def test_every_alert_is_named_labelled_and_explained() -> None:
    found = alerts()
    assert set(found) == {
        "RelayauditSweepOverdue",
        "RelayauditNoSweepCompleted",
        "RelayauditMetricsAbsent",
        "RelayauditTargetDown",
        "RelayauditAlertsDeadLettered",
        "RelayauditOpenRelay",
        "RelayauditProbeErrors",
        "RelayauditProbeInternalErrors",
        "RelayauditCanaryRefusing",
    }
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    assert found["RelayauditOpenRelay"]["labels"]["severity"] == "critical"
    docs = (REPO / "docs" / "monitoring.md").read_text(encoding="utf-8")
    missing = [name for name in found if f"`{name}`" not in docs]
    assert not missing, f"docs/monitoring.md does not explain {missing}"


def test_every_alert_has_unit_tests_that_fire_and_that_stay_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in _yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == set(alerts()), f"no firing case for {set(alerts()) - fired}"
    assert silent == set(alerts()), f"no silent case for {set(alerts()) - silent}"


def test_the_sweep_window_is_the_daemons_default_health_window() -> None:
    """13h: what /healthz allows by default (daemon._health: twice the schedule's gap plus an
    hour, for the default 6h interval), what the Kubernetes ConfigMap sets, and what the
    annotations, the `for` of RelayauditNoSweepCompleted and the dashboard say."""
    assert 2 * Schedule(ScheduleConfig()).expected_gap() + 3600 == SWEEP_WINDOW
    configmap = _yaml(CONFIGMAP)
    schedule = tomllib.loads(configmap["data"]["relayaudit.toml"])["schedule"]
    assert ScheduleConfig.model_validate(schedule).healthy_within == SWEEP_WINDOW
    found = alerts()
    overdue, never = found["RelayauditSweepOverdue"], found["RelayauditNoSweepCompleted"]
    assert overdue["expr"].strip().endswith(f"> {SWEEP_WINDOW}")
    assert never["for"] == overdue["annotations"]["threshold"] == never["annotations"]["threshold"]
    assert ScheduleConfig.model_validate({"healthy_within": never["for"]}).healthy_within == (
        SWEEP_WINDOW
    )
    assert f"{SWEEP_WINDOW} s (13h)" in RULES.read_text(encoding="utf-8")
    (stat,) = [p for p in panels() if p["title"] == "Since the last completed sweep"]
    steps = stat["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, SWEEP_WINDOW]


def test_every_metric_and_label_value_named_is_one_the_daemon_exports() -> None:
    known = exported()
    mine = recorded()
    problems: list[str] = []
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        problems += problems_of(rule["expr"], f"rule {name}", known, mine)
    for case in _yaml(RULE_TESTS)["tests"]:
        for series in case.get("input_series", []):
            # input series must be what a scrape of the daemon (or Prometheus' `up`) yields
            problems += problems_of(series["series"], f"test {case['name']!r}", known, frozenset())
        for check in case.get("promql_expr_test", []):
            where = f"test {case['name']!r}"
            problems += problems_of(check["expr"], where, known, mine)
            for sample in check.get("exp_samples", []):
                problems += problems_of(sample["labels"], where, known, mine)
    for where, expr in dashboard_exprs():
        problems += problems_of(expr, f"dashboard {where}", known, mine)
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_unknown_metric_label_and_value() -> None:
    known = exported()
    expr = (
        'relayaudit_probes_total{status="eror"} + relayaudit_findings{kind=~"open-relay|open_relay"}'
        ' + relayaudit_alerts{colour="red"} + relayaudit_sweeps_total + up{job="relayaudit"}'
    )
    assert problems_of(expr, "x", known, frozenset()) == [
        "x: relayaudit_probes_total{status='eror'}: no such value (known: "
        + ", ".join(sorted(known.labels["relayaudit_probes_total"]["status"]))
        + ")",
        "x: relayaudit_findings{kind='open_relay'}: no such value (known: "
        + ", ".join(sorted(k.value for k in FindingKind))
        + ")",
        "x: relayaudit_alerts has no label 'colour'",
        "x: relayaudit_sweeps_total is not a metric relayaudit exports",
    ]


# -- the dashboard -----------------------------------------------------------------------------


def test_the_dashboard_is_a_current_grafana_dashboard_on_a_prometheus_variable() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] == GRAFANA_SCHEMA_VERSION
    assert doc["uid"] == "relayaudit" and doc["title"] == "relayaudit"
    assert "id" not in doc  # Grafana assigns it on import
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == source, var["name"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = {p["title"] for p in panels()}
    assert {"Sweep progress", "Probes by status", "Findings by kind and status"} <= titles
    assert {"Alert deliveries by state", "Connections by outcome", "Messages by result"} <= titles
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "table"}, panel["title"]
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source and target["expr"].strip(), panel["title"]
            assert re.search(r'instance=~"\$instance"', target["expr"]), (
                f"{panel['title']}: every query follows the shard variable"
            )


def test_the_dashboards_panels_fit_the_grid_without_overlapping() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]
