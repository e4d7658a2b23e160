"""The log shipping examples under deploy/siem/ (Filebeat, Splunk, Vector): each file parsed, its
keys against its shipper's documented options, and its fields, time formats and regular
expressions against lines that relayaudit's logging writes.

Debian packages none of these shippers, so none of them runs here; deploy/siem/README.md says so.
Each allow-list below names the documentation page it was taken from.
"""

from __future__ import annotations

import configparser
import json
import logging
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog

from relayaudit.config import LoggingConfig
from relayaudit.logs import configure_logging

yaml: Any = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")

REPO = Path(__file__).resolve().parent.parent
SIEM = REPO / "deploy" / "siem"
EXAMPLE = REPO / "config" / "relayaudit.example.toml"
LOG_FILE = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["logging"]["file"]

Form = Literal["json", "ecs"]

# -- documented options ------------------------------------------------------------------------

# https://www.elastic.co/docs/reference/beats/filebeat/filebeat-input-filestream
FILESTREAM_OPTIONS = frozenset(
    {
        "type", "id", "enabled", "paths", "parsers", "processors", "fields", "fields_under_root",
        "tags", "pipeline", "index", "keep_null", "encoding", "exclude_lines", "include_lines",
        "buffer_size", "message_max_bytes", "ignore_older", "ignore_inactive",
        "close.on_state_change.inactive", "close.on_state_change.renamed",
        "close.on_state_change.removed", "close.reader.on_eof", "close.reader.after_interval",
        "clean_inactive", "clean_removed", "harvester_limit", "file_identity.native",
        "file_identity.path", "file_identity.fingerprint", "prospector.scanner.check_interval",
        "prospector.scanner.exclude_files", "prospector.scanner.include_files",
        "prospector.scanner.fingerprint.enabled", "prospector.scanner.fingerprint.offset",
        "prospector.scanner.fingerprint.length", "take_over",
    }
)  # fmt: skip
# https://www.elastic.co/docs/reference/beats/filebeat/filebeat-input-filestream#_parsers
# (the `ndjson` parser; filebeat/docs/inputs/input-filestream-reader-options.asciidoc)
NDJSON_OPTIONS = frozenset(
    {
        "target", "overwrite_keys", "expand_keys", "add_error_key", "message_key",
        "document_id", "ignore_decoding_error",
    }
)  # fmt: skip
# https://www.elastic.co/docs/reference/beats/filebeat/processor-timestamp
TIMESTAMP_PROCESSOR_OPTIONS = frozenset(
    {"field", "target_field", "layouts", "timezone", "ignore_missing", "ignore_failure", "test",
     "id"}
)  # fmt: skip

# https://help.splunk.com/en/data-management/splunk-enterprise-admin-manual/10.0/10.0.0-configuration-file-reference/props.conf
PROPS_SETTINGS = frozenset(
    {
        "SHOULD_LINEMERGE", "LINE_BREAKER", "LINE_BREAKER_LOOKBEHIND", "TRUNCATE",
        "TIME_PREFIX", "TIME_FORMAT", "MAX_TIMESTAMP_LOOKAHEAD", "TZ", "DATETIME_CONFIG",
        "MAX_DAYS_AGO", "MAX_DAYS_HENCE", "KV_MODE", "AUTO_KV_JSON", "INDEXED_EXTRACTIONS",
        "TIMESTAMP_FIELDS", "CHARSET", "NO_BINARY_CHECK", "EVENT_BREAKER_ENABLE",
        "EVENT_BREAKER", "ANNOTATE_PUNCT", "category", "description", "pulldown_type",
    }
)  # fmt: skip
PROPS_CLASSES = ("TRANSFORMS-", "REPORT-", "EXTRACT-", "FIELDALIAS-", "EVAL-")
# https://help.splunk.com/en/data-management/splunk-enterprise-admin-manual/10.0/10.0.0-configuration-file-reference/transforms.conf
TRANSFORMS_SETTINGS = frozenset(
    {
        "REGEX", "FORMAT", "DEST_KEY", "SOURCE_KEY", "WRITE_META", "LOOKAHEAD", "MATCH_LIMIT",
        "DEPTH_LIMIT", "DEFAULT_VALUE", "INGEST_EVAL", "CLEAN_KEYS", "KEEP_EMPTY_VALS",
        "CAN_OPTIMIZE",
    }
)  # fmt: skip
# https://help.splunk.com/en/data-management/splunk-enterprise-admin-manual/10.0/10.0.0-configuration-file-reference/inputs.conf
# (the settings of a [monitor://...] stanza, and those every input takes)
MONITOR_SETTINGS = frozenset(
    {
        "sourcetype", "index", "disabled", "host", "source", "crcSalt", "initCrcLength",
        "ignoreOlderThan", "followTail", "whitelist", "blacklist", "recursive",
        "time_before_close", "_TCP_ROUTING",
    }
)  # fmt: skip

# https://vector.dev/docs/reference/configuration/sources/file/
VECTOR_FILE_OPTIONS = frozenset(
    {
        "type", "acknowledgements", "data_dir", "encoding", "exclude", "file_discovery_mode",
        "file_key", "fingerprint", "glob_minimum_cooldown_ms", "host_key", "idle_timeout_secs",
        "ignore_checkpoints", "ignore_not_found", "ignore_older_secs", "include",
        "internal_metrics", "line_delimiter", "max_line_bytes", "max_read_bytes", "multiline",
        "offset_key", "oldest_first", "read_from", "reconcile_interval_secs",
        "remove_after_secs", "rotate_wait_secs",
    }
)  # fmt: skip
# https://vector.dev/docs/reference/configuration/transforms/remap/
VECTOR_REMAP_OPTIONS = frozenset(
    {
        "type", "inputs", "source", "file", "files", "drop_on_error", "drop_on_abort",
        "reroute_dropped", "timezone", "metric_tag_values",
    }
)  # fmt: skip
# https://vector.dev/docs/reference/configuration/sinks/elasticsearch/ (one level of nesting)
VECTOR_ELASTICSEARCH_OPTIONS: dict[str, frozenset[str] | None] = {
    "type": None, "inputs": None, "acknowledgements": None, "api_version": None,
    "auth": frozenset({"strategy", "user", "password", "access_key_id", "secret_access_key",
                       "assume_role", "credentials_file", "profile", "region"}),
    "aws": None, "batch": None,
    "bulk": frozenset({"action", "index", "template_fallback_index", "version",
                       "version_type"}),
    "buffer": None, "compression": None,
    "data_stream": frozenset({"type", "dataset", "namespace", "auto_routing", "sync_fields"}),
    "distribution": None, "doc_type": None, "encoding": None, "endpoints": None,
    "healthcheck": None, "id_key": None, "metrics": None,
    "mode": None, "opensearch_service_type": None, "pipeline": None, "query": None,
    "request": None, "request_retry_partial": None, "tls": None,
}  # fmt: skip


# -- the lines relayaudit writes ---------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """The log lines of each form: as written (text), and as read back (documents)."""

    text: dict[Form, list[str]]

    def docs(self, form: Form) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text[form]]

    def name(self, form: Form, doc: dict[str, Any]) -> str:
        """The event's name in either form."""
        return str(doc["event"]["action"] if form == "ecs" else doc["event"])


def _emit() -> None:
    """Events as the daemon's call sites log them (relayaudit/daemon.py), and a library's warning."""
    log = structlog.get_logger("relayaudit")
    log.info("sweep.start", resumed=False, start=0, total=15)
    log.info(
        "probe",
        address="192.0.2.7",
        port=25,
        port_state="open",
        status="open-relay",
        findings=["open-relay", "unapproved-smtp"],
        sessions=2,
        duration_ms=812.4,
        vantage="default",
        error=None,
    )
    log.info(
        "probe",
        address="192.0.2.8",
        port=25,
        port_state="closed",
        status="closed",
        findings=[],
        sessions=0,
        duration_ms=0.0,
        vantage="default",
        error="connection refused",
    )
    for transition in ("new", "resolved"):
        log.info(
            "finding.transition",
            transition=transition,
            finding_id="ra-0123456789abcdef",
            kind="open-relay",
            severity="critical",
            address="192.0.2.7",
            port=25,
            key=f"ra-0123456789abcdef/{transition}/1",
        )
    log.info(
        "sweep.summary",
        hosts=15,
        probes=30,
        relays=1,
        relay_findings=["ra-0123456789abcdef"],
        statuses={"open-relay": 1, "closed": 29},
        findings={"open-relay": 1},
        transitions={"new": 1},
        duration_s=3.38,
    )
    log.warning("config.warning", config="/etc/relayaudit/relayaudit.toml", warning="a warning")
    logging.getLogger("asyncio").warning("a library's warning")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Written]:
    tmp = tmp_path_factory.mktemp("siem")
    text: dict[Form, list[str]] = {}
    forms: tuple[Form, ...] = ("json", "ecs")
    for form in forms:
        path = tmp / f"{form}.jsonl"
        config = LoggingConfig(file=path, stdout=False, level="info", format=form)
        handle = configure_logging(config, bind={"shard": "0/1"})
        try:
            handle.bind(sweep_id="6f3eb4e16837")
            _emit()
        finally:
            handle.close()
        text[form] = path.read_text(encoding="utf-8").splitlines()
        assert len(text[form]) == 8, text[form]
    structlog.reset_defaults()
    yield Written(text)


def field_paths(doc: dict[str, Any], prefix: str = "") -> set[str]:
    """A document's field names as SIEMs write them: nested objects and dotted keys alike."""
    paths = set()
    for key, value in doc.items():
        path = prefix + key
        paths.add(path)
        if isinstance(value, dict):
            paths |= field_paths(value, path + ".")
    return paths


def test_the_lines_are_what_the_examples_expect(written: Written) -> None:
    """The premises of the examples, stated once: the time comes first in both forms, as UTC
    with microseconds and a Z (Python drops an all-zero fraction); the ECS form's event name is
    event.action, its dataset relayaudit.log."""
    keys: tuple[tuple[Form, str], ...] = (("ecs", "@timestamp"), ("json", "timestamp"))
    for form, key in keys:
        for line in written.text[form]:
            assert line.startswith('{"' + key + '":"'), line
    for doc in written.docs("ecs"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", doc["@timestamp"])
        assert doc["event"]["dataset"] == "relayaudit.log"
        assert doc["ecs.version"].startswith("8.11.")
    names = [written.name("ecs", d) for d in written.docs("ecs") if "action" in d["event"]]
    assert names == [written.name("json", d) for d in written.docs("json")][:-1]


def timestamps(written: Written, form: Form) -> list[str]:
    key = "@timestamp" if form == "ecs" else "timestamp"
    found = [str(doc[key]) for doc in written.docs(form)]
    # and the form Python gives a time whose microseconds are all 0
    return [*found, re.sub(r"\.\d+Z$", "Z", found[0])]


# -- time formats as regular expressions -------------------------------------------------------


def _pattern(fmt: str, tokens: dict[str, str]) -> re.Pattern[str]:
    """A time format (its tokens given as regular expressions) as one regular expression."""
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    parts = []
    pos = 0
    for match in re.finditer(alternatives, fmt):
        parts.append(re.escape(fmt[pos : match.start()]))
        parts.append(tokens[match.group()])
        pos = match.end()
    parts.append(re.escape(fmt[pos:]))
    return re.compile("".join(parts))


# Go's reference-time layouts (Filebeat): a fraction of 9s is optional when parsing
GO_LAYOUT = {
    "2006": r"\d{4}", "01": r"\d\d", "02": r"\d\d", "15": r"\d\d", "04": r"\d\d", "05": r"\d\d",
    ".999999999": r"(?:\.\d+)?", ".999999": r"(?:\.\d+)?", ".999": r"(?:\.\d+)?",
    ".000000": r"\.\d{6}", ".000": r"\.\d{3}", "Z07:00": r"(?:Z|[+-]\d\d:\d\d)",
}  # fmt: skip
# Splunk's strptime() variables (Common time format variables), those these files use
SPLUNK_FORMAT = {
    "%Y": r"\d{4}", "%m": r"\d\d", "%d": r"\d\d", "%H": r"\d\d", "%M": r"\d\d", "%S": r"\d\d",
    "%3N": r"\d{3}", "%6N": r"\d{6}", "%9N": r"\d{9}", "%Z": r"(?:Z|[A-Z]{3,5})",
}  # fmt: skip
# chrono's strftime (VRL's parse_timestamp): %.f is an optional dot and fraction when parsing
CHRONO_FORMAT = {
    "%Y": r"\d{4}", "%m": r"\d\d", "%d": r"\d\d", "%H": r"\d\d", "%M": r"\d\d", "%S": r"\d\d",
    "%.f": r"(?:\.\d+)?",
}  # fmt: skip


def test_the_time_format_readers_read_what_they_should() -> None:
    stamp, whole = "2026-12-07T02:09:26.226569Z", "2026-12-07T02:09:27Z"
    assert _pattern("2006-01-02T15:04:05.999999Z07:00", GO_LAYOUT).fullmatch(whole)
    assert not _pattern("2006-01-02T15:04:05.000Z07:00", GO_LAYOUT).fullmatch(stamp)
    assert _pattern("%Y-%m-%dT%H:%M:%S.%6N%Z", SPLUNK_FORMAT).fullmatch(stamp)
    assert not _pattern("%Y-%m-%dT%H:%M:%S.%3N%Z", SPLUNK_FORMAT).fullmatch(stamp)
    assert _pattern("%Y-%m-%dT%H:%M:%S%.fZ", CHRONO_FORMAT).fullmatch(whole)


# -- Filebeat ----------------------------------------------------------------------------------


def _single(entry: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """A `- name: {options}` list item (a Beats parser or processor)."""
    assert isinstance(entry, dict) and len(entry) == 1, f"{where}: {entry!r}"
    ((name, options),) = entry.items()
    return str(name), dict(options or {})


def filebeat_inputs() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((SIEM / "filebeat.yml").read_text(encoding="utf-8"))
    assert set(doc) == {"filebeat.inputs"}
    inputs = {str(i["id"]): i for i in doc["filebeat.inputs"]}
    assert len(inputs) == len(doc["filebeat.inputs"]), "input ids repeat"
    return inputs


def test_filebeat_sets_only_documented_options() -> None:
    for name, spec in filebeat_inputs().items():
        assert spec["type"] == "filestream", name
        assert set(spec) <= FILESTREAM_OPTIONS, f"{name}: {set(spec) - FILESTREAM_OPTIONS}"
        assert spec["paths"] == [LOG_FILE], f"{name}: not the example config's logging.file"
        for parser in spec["parsers"]:
            kind, options = _single(parser, name)
            assert kind == "ndjson", name
            assert set(options) <= NDJSON_OPTIONS, f"{name}: {set(options) - NDJSON_OPTIONS}"
        for processor in spec.get("processors", []):
            kind, options = _single(processor, name)
            assert kind == "timestamp", name
            assert set(options) <= TIMESTAMP_PROCESSOR_OPTIONS, name


def test_filebeat_reads_the_ecs_form_to_the_root(written: Written) -> None:
    spec = filebeat_inputs()["relayaudit-ecs"]
    assert spec["enabled"] is True
    (parser,) = spec["parsers"]
    _, options = _single(parser, "relayaudit-ecs")
    assert options["target"] == "" and options["overwrite_keys"] is True
    # ECS loggers write some keys dotted at the top level; Filebeat nests them only when told
    dotted = {k for doc in written.docs("ecs") for k in doc if "." in k}
    assert dotted >= {"log.level", "ecs.version"}
    assert options["expand_keys"] is True
    # @timestamp overwrites Filebeat's only if Go parses it as RFC 3339 (jsontransform)
    rfc3339 = _pattern("2006-01-02T15:04:05Z07:00", GO_LAYOUT | {"05": r"\d\d(?:\.\d+)?"})
    for stamp in timestamps(written, "ecs"):
        assert rfc3339.fullmatch(stamp), stamp


def test_filebeat_reads_the_json_form_under_a_prefix(written: Written) -> None:
    spec = filebeat_inputs()["relayaudit-json"]
    (parser,) = spec["parsers"]
    _, options = _single(parser, "relayaudit-json")
    target = options["target"]
    assert target and not options.get("overwrite_keys")  # its `event` string stays apart
    ((_, stamp),) = (_single(p, "relayaudit-json") for p in spec["processors"])
    assert stamp["field"] == f"{target}.timestamp"
    assert all("timestamp" in doc for doc in written.docs("json"))
    layouts = [_pattern(layout, GO_LAYOUT) for layout in stamp["layouts"]]
    for value in [*timestamps(written, "json"), *stamp["test"]]:
        assert any(p.fullmatch(value) for p in layouts), value
    # the processor's own start-up test values look like relayaudit's times
    shape = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")
    assert all(shape.fullmatch(v) for v in stamp["test"])


# -- Splunk ------------------------------------------------------------------------------------


def splunk(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # Splunk's keys are case-sensitive
    parser.read_string((SIEM / "splunk" / name).read_text(encoding="utf-8"), source=name)
    return parser


def props_stanzas() -> dict[Form, dict[str, str]]:
    props = splunk("props.conf")
    assert set(props.sections()) == {"relayaudit:ecs", "relayaudit:json"}
    return {"ecs": dict(props["relayaudit:ecs"]), "json": dict(props["relayaudit:json"])}


def test_splunk_files_set_only_documented_settings() -> None:
    for form, stanza in props_stanzas().items():
        unknown = {k for k in stanza if k not in PROPS_SETTINGS and not k.startswith(PROPS_CLASSES)}
        assert not unknown, f"props.conf [relayaudit:{form}]: {unknown}"
        assert stanza["KV_MODE"] == "json" and stanza["SHOULD_LINEMERGE"] == "false"
    transforms = splunk("transforms.conf")
    for name in transforms.sections():
        assert set(transforms[name]) <= TRANSFORMS_SETTINGS, f"transforms.conf [{name}]"
    inputs = splunk("inputs.conf")
    (monitor,) = inputs.sections()
    assert monitor == f"monitor://{LOG_FILE}", "not the example config's logging.file"
    assert set(inputs[monitor]) <= MONITOR_SETTINGS
    assert inputs[monitor]["sourcetype"] == "relayaudit:ecs"  # a stanza of props.conf


@pytest.mark.parametrize("form", ["ecs", "json"])
def test_splunk_finds_each_lines_time(written: Written, form: Form) -> None:
    stanza = props_stanzas()[form]
    prefix = re.compile(stanza["TIME_PREFIX"])
    time_format = _pattern(stanza["TIME_FORMAT"], SPLUNK_FORMAT)
    lookahead = int(stanza["MAX_TIMESTAMP_LOOKAHEAD"])
    for line, doc in zip(written.text[form], written.docs(form), strict=True):
        found = prefix.search(line)
        assert found is not None, line
        ahead = line[found.end() : found.end() + lookahead]
        stamp = time_format.match(ahead)
        assert stamp is not None, f"{stanza['TIME_FORMAT']} does not read {ahead!r}"
        assert stamp.group() == doc["@timestamp" if form == "ecs" else "timestamp"]
    # one event per line, whatever a value holds
    breaker = re.compile(stanza["LINE_BREAKER"])
    events = [e for e in breaker.split("\n".join(written.text[form]) + "\n") if e.strip()]
    events = [e for e in events if not breaker.fullmatch(e)]  # the captured line ends
    assert events == written.text[form]
    assert int(stanza["TRUNCATE"]) >= max(map(len, written.text[form]))


@pytest.mark.parametrize("form", ["ecs", "json"])
def test_splunk_routes_exactly_the_finding_lines(written: Written, form: Form) -> None:
    (name,) = (v.strip() for k, v in props_stanzas()[form].items() if k.startswith("TRANSFORMS-"))
    transforms = splunk("transforms.conf")
    stanza = transforms[name]
    assert stanza["DEST_KEY"] == "_MetaData:Index" and stanza["FORMAT"]
    regex = re.compile(stanza["REGEX"])
    for line, doc in zip(written.text[form], written.docs(form), strict=True):
        finding = form == "ecs" and doc["event"].get("action") == "finding.transition"
        finding = finding or (form == "json" and doc["event"] == "finding.transition")
        assert bool(regex.search(line)) == finding, line
    other: Form = "json" if form == "ecs" else "ecs"
    assert not any(regex.search(line) for line in written.text[other])


def test_the_readmes_splunk_search_names_fields_of_a_finding_line(written: Written) -> None:
    readme = (SIEM / "README.md").read_text(encoding="utf-8")
    search = readme.split("A search for the new open relays:", 1)[1].split("```")[1]
    names = set(re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", search)) - {"finding.transition"}
    (finding,) = [
        d for d in written.docs("ecs") if d["event"].get("action") == "finding.transition"
    ][:1]
    assert names and names <= field_paths(finding), names - field_paths(finding)


# -- Vector ------------------------------------------------------------------------------------


def vector() -> dict[str, Any]:
    doc: dict[str, Any] = tomllib.loads((SIEM / "vector.toml").read_text(encoding="utf-8"))
    return doc


def test_vector_sets_only_documented_options() -> None:
    doc = vector()
    assert set(doc) == {"sources", "transforms", "sinks"}
    components = {*doc["sources"], *doc["transforms"], *doc["sinks"]}
    for name, source in doc["sources"].items():
        assert source["type"] == "file", name
        assert set(source) <= VECTOR_FILE_OPTIONS, set(source) - VECTOR_FILE_OPTIONS
        assert source["include"] == [LOG_FILE], "not the example config's logging.file"
        assert source.get("read_from", "beginning") in {"beginning", "end"}
    for name, transform in doc["transforms"].items():
        assert transform["type"] == "remap", name
        assert set(transform) <= VECTOR_REMAP_OPTIONS, set(transform) - VECTOR_REMAP_OPTIONS
    for name, sink in doc["sinks"].items():
        assert sink["type"] == "elasticsearch", name
        for key, value in sink.items():
            assert key in VECTOR_ELASTICSEARCH_OPTIONS, f"sinks.{name}.{key}"
            nested = VECTOR_ELASTICSEARCH_OPTIONS[key]
            if nested is not None:
                assert set(value) <= nested, f"sinks.{name}.{key}: {set(value) - nested}"
        assert sink["mode"] in {"bulk", "data_stream"}
        assert sink["auth"]["strategy"] in {"basic", "aws"}
    for kind in ("transforms", "sinks"):
        for name, component in doc[kind].items():
            assert set(component["inputs"]) <= components, f"{kind}.{name}: unknown input"


def test_vectors_remap_program_fits_the_ecs_lines(written: Written) -> None:
    doc = vector()
    program = doc["transforms"]["relayaudit_ecs"]["source"]
    docs = written.docs("ecs")
    # every quoted path it reads is a top-level key of every line
    read = set(re.findall(r'\.\s*"([^"]+)"', program))
    assert read and all(read <= set(d) for d in docs), read
    # and it nests every dotted top-level key the lines have
    dotted = {k for d in docs for k in d if "." in k}
    assert dotted <= read, dotted - read
    for key in dotted:
        assert f'.{key} = del(."{key}")' in program, key
    (fmt,) = re.findall(
        r'parse_timestamp!\(string!\(\."@timestamp"\), format: "([^"]+)"\)', program
    )
    pattern = _pattern(fmt, CHRONO_FORMAT)
    assert all(pattern.fullmatch(s) for s in timestamps(written, "ecs"))
    (sink,) = doc["sinks"].values()
    assert sink["mode"] == "data_stream"
    assert {d["event"]["dataset"] for d in docs} == {sink["data_stream"]["dataset"]}


def test_the_readmes_vector_program_for_the_json_form_fits_its_lines(written: Written) -> None:
    readme = (SIEM / "README.md").read_text(encoding="utf-8")
    (program,) = [block for block in readme.split("```")[1::2] if "parse_timestamp" in block]
    read = set(re.findall(r"\bline\.(\w+)", program))
    assert read == {"timestamp"} and all(read <= set(d) for d in written.docs("json"))
    (fmt,) = re.findall(r'format: "([^"]+)"', program)
    pattern = _pattern(fmt, CHRONO_FORMAT)
    assert all(pattern.fullmatch(s) for s in timestamps(written, "json"))


# -- the README --------------------------------------------------------------------------------


def test_the_readme_says_the_files_were_not_run_and_names_each() -> None:
    readme = (SIEM / "README.md").read_text(encoding="utf-8")
    assert "**These files were not run by Filebeat, Splunk or Vector.**" in readme
    shipped = {p.relative_to(SIEM).as_posix() for p in SIEM.rglob("*") if p.is_file()}
    assert shipped - {"README.md"} == {
        "filebeat.yml",
        "vector.toml",
        "splunk/props.conf",
        "splunk/transforms.conf",
        "splunk/inputs.conf",
    }
    for name in shipped - {"README.md"}:
        assert f"]({name})" in readme, f"the README does not link {name}"
