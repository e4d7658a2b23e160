"""Loopback stand-ins for the ticket APIs the shipped alert templates call: Jira, TheHive, ServiceNow, chat."""

# Each plays the few calls of its API that config/templates/ make, on 127.0.0.1, and checks what
# a template decides: the method and path, the Authorization header, the Content-Type and the
# body's fields (docs/alerts.md, "Ticket systems", lists them with the documentation they come
# from). A request the real API would refuse gets the real API's status (400, 404, 415, ...) with
# the reason in the body, so a broken template fails its test instead of passing against a
# receiver that takes anything. Stricter than the real APIs in one way: a field the template is
# not documented to send is refused (ServiceNow, for one, would drop it silently), so a misspelt
# field shows. Every request is kept with its answer, and the tickets with their comments and
# status, for the tests' assertions and `relayaudit demo --hooks`. Not a live system: a template
# that passes here has been checked against these stand-ins and the documentation, no more.

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import itertools
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Self

from pydantic import ValidationError

from relayaudit.alert_doc import AlertV1, AlertV2

__all__ = [
    "HIVE_KEY",
    "JIRA_TOKEN",
    "JIRA_USER",
    "SNOW_PASSWORD",
    "SNOW_USER",
    "ChatStandIn",
    "GenericStandIn",
    "JiraStandIn",
    "Refused",
    "Request",
    "ServiceNowStandIn",
    "StandIn",
    "TheHiveStandIn",
    "Ticket",
    "basic_auth",
    "chat_hook",
    "hooks_for",
    "jira_hook",
    "servicenow_hook",
    "start_all",
    "thehive_hook",
]

HOST: Final = "127.0.0.1"
_LINE_LIMIT: Final = 16 * 1024  # bytes of the request line or one header line
_MAX_HEADERS: Final = 100
_MAX_BODY: Final = 1024 * 1024
_DEADLINE: Final = 10.0  # seconds for one connection, first byte to answer
_NONE: Final[Mapping[str, Check]] = MappingProxyType({})


def basic_auth(user: str, password: str) -> str:
    """The Authorization header value of HTTP Basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass
class Request:
    """One request as a stand-in read it, and what it answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # by lower-case name
    body: bytes
    status: int = 0
    reason: str = ""  # why it was refused

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Ticket:
    """A Jira issue, TheHive alert or ServiceNow incident, as its stand-in keeps it."""

    id: str  # the reference its create call's answer gives (Jira's key, TheHive's _id, sys_id)
    fields: dict[str, Any]  # as created, then updated
    status: str
    comments: list[str] = field(default_factory=list)  # comments, work notes
    history: list[str] = field(default_factory=list)  # what was done to it, in order


class Refused(Exception):
    """A request the real API would refuse: the status it answers and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


Answer = tuple[int, object]  # status and body: JSON, a str (text/plain) or None (no body)
Handler = Callable[[Request, "re.Match[str]"], Answer]
Check = Callable[[Any, str], None]  # raises Refused(400) naming the field (its second argument)


# -- body checks ------------------------------------------------------------------------------


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 415 for another Content-Type, 400 for anything but an object."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise Refused(415, f"Content-Type {ctype or '(none)'}: this call takes application/json")
    try:
        doc = json.loads(request.body)
    except ValueError as exc:
        raise Refused(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Refused(400, "the body is not a JSON object")
    return doc


def check_fields(
    doc: object,
    where: str,
    required: Mapping[str, Check],
    optional: Mapping[str, Check] = _NONE,
) -> None:
    """`doc` is an object with every required field, no unknown one, and each value as checked."""
    if not isinstance(doc, dict):
        raise Refused(400, f"{where}: must be an object")
    for name in doc:
        if name not in required and name not in optional:
            raise Refused(400, f"{where}.{name}: not a field this call takes")
    for name in required:
        if name not in doc:
            raise Refused(400, f"{where}.{name}: required")
    for name, value in doc.items():
        (required.get(name) or optional[name])(value, f"{where}.{name}")


def text(limit: int = 65536, *, one_line: bool = False) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise Refused(400, f"{where}: must be a non-empty string")
        if len(value) > limit:
            raise Refused(400, f"{where}: must be at most {limit} characters (got {len(value)})")
        if one_line and ("\n" in value or "\r" in value):
            raise Refused(400, f"{where}: must be one line")

    return check


def one_of(*values: str) -> Check:
    def check(value: Any, where: str) -> None:
        if value not in values:
            raise Refused(400, f"{where}: must be one of {', '.join(values)} (got {value!r})")

    return check


def integer(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Refused(400, f"{where}: must be an integer from {low} to {high} (got {value!r})")

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise Refused(400, f"{where}: must be true or false")


def strings(*, spaces: bool = True) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise Refused(400, f"{where}: must be a list of non-empty strings")
        if not spaces and any(re.search(r"\s", s) for s in value):
            raise Refused(400, f"{where}: must hold no white space")

    return check


def obj(required: Mapping[str, Check], optional: Mapping[str, Check] = _NONE) -> Check:
    def check(value: Any, where: str) -> None:
        check_fields(value, where, required, optional)

    return check


def items(each: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or not value:
            raise Refused(400, f"{where}: must be a non-empty list")
        for i, item in enumerate(value):
            each(item, f"{where}[{i}]")

    return check


def named(*keys: str) -> Check:
    """A reference by one of `keys` ({"key": "SEC"} or {"id": "10000"})."""

    def check(value: Any, where: str) -> None:
        check_fields(value, where, {}, dict.fromkeys(keys, text(255, one_line=True)))
        if not value:
            raise Refused(400, f"{where}: must name it by {' or '.join(keys)}")

    return check


# -- the server ---------------------------------------------------------------------------------


class StandIn:
    """One API on 127.0.0.1: routes (method, path) to handlers, after the Authorization check."""

    name: ClassVar[str] = "api"

    def __init__(self, *, authorization: str | None) -> None:
        self.authorization = authorization  # the exact Authorization header value required
        self.requests: list[Request] = []
        self.tickets: dict[str, Ticket] = {}
        self.port = 0
        self._failures: list[int] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._server: asyncio.Server | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next `count` requests with `status`, whatever they are (an outage)."""
        self._failures += [status] * count

    async def start(self) -> Self:
        self._server = await asyncio.start_server(
            self._connection, HOST, self.port, limit=_LINE_LIMIT
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DEADLINE):
                    await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_DEADLINE):
                request = await _read_request(reader)
                if request is not None:
                    writer.write(_response(*self.answer(request)))
                    await writer.drain()
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a client that breaks HTTP gets no answer, as from a real server's front end
        finally:
            writer.close()

    def answer(self, request: Request) -> Answer:
        """Check and apply one request; every request is kept with its answer's status."""
        self.requests.append(request)
        try:
            if self._failures:
                raise Refused(self._failures.pop(0), "the service is unavailable (scripted)")
            if self.authorization is not None:
                given = request.headers.get("authorization")
                if given != self.authorization:
                    raise Refused(
                        401, "no Authorization header" if given is None else "bad credentials"
                    )
            status, body = self._dispatch(request)
        except Refused as exc:
            request.status, request.reason = exc.status, exc.reason
            return exc.status, self.error_body(exc)
        request.status = status
        return status, body

    def _dispatch(self, request: Request) -> Answer:
        methods = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is not None:
                if method == request.method:
                    return handler(request, match)
                methods.append(method)
        if methods:
            raise Refused(405, f"{request.method} {request.path}: takes {', '.join(methods)}")
        raise Refused(404, f"no such resource: {request.path}")

    def error_body(self, refused: Refused) -> object:
        """The document this API answers a refused request with."""
        return {"error": refused.reason}

    def ticket(self, ref: str) -> Ticket:
        if ref not in self.tickets:
            raise Refused(404, f"{ref} does not exist")
        return self.tickets[ref]


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, colon, value = raw.decode("latin-1").partition(":")
        if not colon:
            raise ValueError("not a header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError("too many header lines")
    length = int(headers.get("content-length", "0"))
    if not 0 <= length <= _MAX_BODY:
        raise ValueError("body too large")
    path, _, query = parts[1].partition("?")
    return Request(parts[0], path, query, headers, await reader.readexactly(length))


def _response(status: int, body: object) -> bytes:
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Connection: close"]
    payload = b""
    if isinstance(body, str):
        payload = body.encode()
        head.append("Content-Type: text/plain; charset=utf-8")
    elif body is not None:
        payload = json.dumps(body).encode()
        head.append("Content-Type: application/json")
    head.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


# -- Jira ---------------------------------------------------------------------------------------

_JIRA_TEXT: Final = 32767  # characters of a description or comment (Jira's default limit)
_JIRA_ISSUE: Final = obj(
    {
        "fields": obj(
            {
                "project": named("key", "id"),
                "summary": text(255, one_line=True),
                "issuetype": named("name", "id"),
            },
            {
                "description": text(_JIRA_TEXT),
                "labels": strings(spaces=False),
                "priority": named("name", "id"),
                "components": items(named("name", "id")),
            },
        )
    }
)
_JIRA_COMMENT: Final = obj({"body": text(_JIRA_TEXT)})
# "Edit issue": fields set as a whole, update's operations (here: add a comment)
_JIRA_EDIT: Final = obj(
    {},
    {
        "fields": obj({}, {"components": items(named("name", "id"))}),
        "update": obj({}, {"comment": items(obj({"add": _JIRA_COMMENT}))}),
    },
)
_JIRA_TRANSITION: Final = obj(
    {"transition": obj({"id": text(20, one_line=True)})},
    {
        "fields": obj({}, {"resolution": named("name", "id")}),
        "update": obj({}, {"comment": items(obj({"add": _JIRA_COMMENT}))}),
    },
)


class JiraStandIn(StandIn):
    """Jira REST API v2: create an issue, comment on it, edit it, apply a workflow transition."""

    name = "jira"

    def __init__(
        self,
        *,
        authorization: str | None,
        projects: Mapping[str, Mapping[str, str]] | None = None,
        issue_types: tuple[str, ...] = ("Task", "Bug"),
    ) -> None:
        super().__init__(authorization=authorization)
        # project key -> its workflow's transitions: id -> the status it leads to
        self.projects = {k: dict(v) for k, v in (projects or {"SEC": {"31": "Done"}}).items()}
        self.issue_types = issue_types
        self._ids = itertools.count(10000)
        self._keys: dict[str, str] = {}  # issue id -> key: later calls may name either
        issue = "/rest/api/2/issue"
        self.route("POST", issue, self._create)
        self.route("POST", issue + "/(?P<ref>[^/]+)/comment", self._comment)
        self.route("POST", issue + "/(?P<ref>[^/]+)/transitions", self._transition)
        self.route("PUT", issue + "/(?P<ref>[^/]+)", self._edit)

    def error_body(self, refused: Refused) -> object:
        return {"errorMessages": [refused.reason], "errors": {}}

    def ticket(self, ref: str) -> Ticket:
        if self._keys.get(ref, ref) not in self.tickets:
            raise Refused(404, "Issue does not exist or you do not have permission to see it.")
        return self.tickets[self._keys.get(ref, ref)]

    def _create(self, request: Request, _: re.Match[str]) -> Answer:
        doc = json_body(request)
        _JIRA_ISSUE(doc, "body")
        fields = doc["fields"]
        project = fields["project"].get("key")
        if project not in self.projects:
            raise Refused(400, "fields.project: valid project is required")
        if fields["issuetype"].get("name") not in self.issue_types:
            raise Refused(400, "fields.issuetype: valid issue type is required")
        key = f"{project}-{sum(t.id.startswith(project + '-') for t in self.tickets.values()) + 1}"
        issue_id = str(next(self._ids))
        self._keys[issue_id] = key
        self.tickets[key] = Ticket(key, dict(fields), "To Do", history=["create"])
        return 201, {"id": issue_id, "key": key, "self": f"{self.url}/rest/api/2/issue/{issue_id}"}

    def _comment(self, request: Request, match: re.Match[str]) -> Answer:
        issue = self.ticket(match["ref"])
        doc = json_body(request)
        _JIRA_COMMENT(doc, "body")
        issue.comments.append(doc["body"])
        issue.history.append("comment")
        return 201, {"id": str(len(issue.comments)), "body": doc["body"]}

    def _edit(self, request: Request, match: re.Match[str]) -> Answer:
        issue = self.ticket(match["ref"])
        doc = json_body(request)
        _JIRA_EDIT(doc, "body")
        if not doc:
            raise Refused(400, "Nothing to edit: give fields or update")
        issue.fields.update(doc.get("fields", {}))
        for change in doc.get("update", {}).get("comment", []):
            issue.comments.append(change["add"]["body"])
        issue.history.append("edit")
        return 204, None

    def _transition(self, request: Request, match: re.Match[str]) -> Answer:
        issue = self.ticket(match["ref"])
        doc = json_body(request)
        _JIRA_TRANSITION(doc, "body")
        workflow = self.projects[issue.id.rsplit("-", 1)[0]]
        target = workflow.get(doc["transition"]["id"])
        if target is None:
            raise Refused(
                400, f"Transition id '{doc['transition']['id']}' is not valid for this issue."
            )
        issue.fields.update(doc.get("fields", {}))
        for change in doc.get("update", {}).get("comment", []):
            issue.comments.append(change["add"]["body"])
        issue.status = target
        issue.history.append(f"transition to {target}")
        return 204, None


# -- TheHive ------------------------------------------------------------------------------------

_HIVE_UPDATE: Final[Mapping[str, Check]] = {
    "title": text(one_line=True),
    "description": text(),
    "severity": integer(1, 4),
    "tags": strings(),
    "tlp": integer(0, 4),
    "pap": integer(0, 3),
    "date": integer(0, 2**53),
    "externalLink": text(one_line=True),
    "summary": text(),
    "status": text(one_line=True),
    "follow": boolean,
}
_HIVE_CREATE: Final[Mapping[str, Check]] = {
    **{k: v for k, v in _HIVE_UPDATE.items() if k not in ("title", "description")},
    "caseTemplate": text(one_line=True),
}
_HIVE_REQUIRED: Final[Mapping[str, Check]] = {
    "type": text(one_line=True),
    "source": text(one_line=True),
    "sourceRef": text(one_line=True),
    "title": text(one_line=True),
    "description": text(),
}


class TheHiveStandIn(StandIn):
    """TheHive 5, API v1: create an alert (one per type, source and sourceRef), update it."""

    name = "thehive"
    # the predefined alert statuses and their stages, as docs/alerts.md lists them
    STATUSES: ClassVar[Mapping[str, str]] = {
        "New": "New",
        "InProgress": "InProgress",
        "Duplicated": "Closed",
        "FalsePositive": "Closed",
        "Ignored": "Closed",
        "Other": "Closed",
        "TruePositive": "Closed",
    }

    def __init__(self, *, authorization: str | None) -> None:
        super().__init__(authorization=authorization)
        self._ids = itertools.count(1)
        self.route("POST", "/api/v1/alert", self._create)
        self.route("PATCH", "/api/v1/alert/(?P<ref>[^/]+)", self._update)

    def error_body(self, refused: Refused) -> object:
        kinds = {401: "AuthenticationError", 404: "NotFoundError"}
        return {"type": kinds.get(refused.status, "BadRequest"), "message": refused.reason}

    def _create(self, request: Request, _: re.Match[str]) -> Answer:
        doc = json_body(request)
        check_fields(doc, "body", _HIVE_REQUIRED, _HIVE_CREATE)
        source = (doc["type"], doc["source"], doc["sourceRef"])
        if any(
            (t.fields["type"], t.fields["source"], t.fields["sourceRef"]) == source
            for t in self.tickets.values()
        ):
            raise Refused(400, f"an alert with type, source and sourceRef {source} already exists")
        status = doc.get("status", "New")
        if self.STATUSES.get(status) != "New":
            raise Refused(400, f"body.status: {status!r} is not a status of the New stage")
        ref = f"~{4096 * next(self._ids)}"
        self.tickets[ref] = Ticket(ref, dict(doc), status, history=["create"])
        return 201, {
            "_id": ref,
            "_type": "Alert",
            "_createdBy": "relayaudit@thehive.lab",
            "severity": 2,
            "tlp": 2,
            "pap": 2,
            **doc,
            "status": status,
            "stage": "New",
            "follow": True,
            "observableCount": 0,
        }

    def _update(self, request: Request, match: re.Match[str]) -> Answer:
        alert = self.ticket(match["ref"])
        doc = json_body(request)
        check_fields(doc, "body", {}, _HIVE_UPDATE)
        if not doc:
            raise Refused(400, "body: nothing to update")
        if "status" in doc:
            before, after = self.STATUSES[alert.status], self.STATUSES.get(doc["status"])
            if after is None:
                raise Refused(400, f"body.status: {doc['status']!r} is not an alert status")
            # a closed alert can only be reopened into the In progress stage; In progress never
            # goes back to New
            if after == "New" and before != "New":
                raise Refused(
                    400, f"body.status: a {before} alert cannot go back to {doc['status']}"
                )
            alert.status = doc["status"]
        alert.fields.update(doc)
        alert.history.append("update" + (f" to {doc['status']}" if "status" in doc else ""))
        return 204, None


# -- ServiceNow ---------------------------------------------------------------------------------

_SNOW_JOURNAL: Final = ("work_notes", "comments")  # appended to the record's journal, not stored
_SNOW_FIELDS: Final[Mapping[str, Check]] = {
    "short_description": text(160, one_line=True),
    "description": text(4000),
    "urgency": one_of("1", "2", "3"),
    "impact": one_of("1", "2", "3"),
    "category": text(40, one_line=True),
    "subcategory": text(40, one_line=True),
    "caller_id": text(255, one_line=True),
    "assignment_group": text(255, one_line=True),
    "contact_type": text(40, one_line=True),
    "correlation_id": text(100, one_line=True),
    "correlation_display": text(100, one_line=True),
    "work_notes": text(),
    "comments": text(),
    # 1 New, 2 In Progress, 3 On Hold, 6 Resolved, 7 Closed, 8 Canceled
    "state": one_of("1", "2", "3", "6", "7", "8"),
    "close_code": text(40, one_line=True),
    "close_notes": text(4000),
}


class ServiceNowStandIn(StandIn):
    """ServiceNow Table API on the incident table: create an incident, update it by sys_id."""

    name = "servicenow"

    def __init__(self, *, authorization: str | None) -> None:
        super().__init__(authorization=authorization)
        self._numbers = itertools.count(10001)
        table = "/api/now/table/incident"
        self.route("POST", table, self._create)
        self.route("PATCH", table + "/(?P<ref>[^/]+)", self._update)
        self.route("PUT", table + "/(?P<ref>[^/]+)", self._update)

    def error_body(self, refused: Refused) -> object:
        return {"error": {"message": refused.reason, "detail": ""}, "status": "failure"}

    def _create(self, request: Request, _: re.Match[str]) -> Answer:
        doc = json_body(request)
        check_fields(
            doc, "body", {"short_description": _SNOW_FIELDS["short_description"]}, _SNOW_FIELDS
        )
        sys_id = uuid.uuid4().hex
        record = {"sys_id": sys_id, "number": f"INC{next(self._numbers):07d}", "state": "1"}
        self.tickets[sys_id] = Ticket(sys_id, record, "1", history=["create"])
        return 201, {"result": self._apply(self.tickets[sys_id], doc)}

    def _update(self, request: Request, match: re.Match[str]) -> Answer:
        if match["ref"] not in self.tickets:
            raise Refused(404, "No Record found")
        doc = json_body(request)
        check_fields(doc, "body", {}, _SNOW_FIELDS)
        incident = self.tickets[match["ref"]]
        incident.history.append("update" + (f" to state {doc['state']}" if "state" in doc else ""))
        return 200, {"result": self._apply(incident, doc)}

    @staticmethod
    def _apply(incident: Ticket, doc: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**incident.fields, **{k: v for k, v in doc.items() if k not in _SNOW_JOURNAL}}
        if merged["state"] in ("6", "7") and not (
            merged.get("close_code") and merged.get("close_notes")
        ):
            # the incident form makes the resolution code and notes mandatory when resolving
            raise Refused(403, "Data Policy Exception: close_code and close_notes are mandatory")
        incident.fields = merged
        incident.status = merged["state"]
        incident.comments += [doc[k] for k in _SNOW_JOURNAL if k in doc]
        return {**merged, "work_notes": "", "comments": ""}


# -- chat and the plain webhook -----------------------------------------------------------------


class ChatStandIn(StandIn):
    """A Slack or Mattermost incoming webhook: a POST of {"text": ...} is one message."""

    name = "chat"

    def __init__(self, *, path: str = "/hooks/T0LAB/B0LAB/relayaudit-lab-secret") -> None:
        super().__init__(authorization=None)  # the URL is the credential
        self.path = path
        self.messages: list[str] = []
        self.route("POST", re.escape(path), self._post)

    def error_body(self, refused: Refused) -> object:
        return refused.reason  # text/plain, as Slack and Mattermost answer

    def _post(self, request: Request, _: re.Match[str]) -> Answer:
        try:
            doc = json_body(request)
        except Refused as exc:
            raise Refused(400, f"invalid_payload: {exc.reason}") from None
        if "text" not in doc:
            raise Refused(400, "no_text")
        optional = {k: text(255, one_line=True) for k in ("username", "icon_emoji", "icon_url")}
        # Mattermost's default post size limit; Slack's is larger
        check_fields(doc, "body", {"text": text(16383)}, optional)
        self.messages.append(doc["text"])
        return 200, "ok"


class GenericStandIn(StandIn):
    """A receiver of relayaudit's own alert (no template): each POST must be a valid alert v2
    (or v1, where `alerts.format = "v1"`)."""

    name = "generic"

    def __init__(self, *, authorization: str | None, path: str = "/hooks/relayaudit") -> None:
        super().__init__(authorization=authorization)
        self.documents: list[AlertV1] = []
        self.route("POST", re.escape(path), self._post)

    def _post(self, request: Request, _: re.Match[str]) -> Answer:
        try:
            body = json_body(request)
            v2 = isinstance(body, dict) and body.get("schema_version") == 2
            alert = (AlertV2 if v2 else AlertV1).model_validate(body)
        except ValidationError as exc:
            raise Refused(400, f"not an alert v1 or v2: {exc.errors()[0]['msg']}") from None
        self.documents.append(alert)
        return 200, {"received": alert.idempotency_key}


# -- hooks for the stand-ins: what docs/alerts.md tells an operator to write, pointed here -----

# the stand-ins' own credentials: throw-away values that exist only on loopback
JIRA_USER, JIRA_TOKEN = "relayaudit@campus.test", "jira-api-token-lab"
HIVE_KEY = "thehive-api-key-lab"
SNOW_USER, SNOW_PASSWORD = "relayaudit.integration", "snow-password-lab"


def jira_hook(api: StandIn, *, name: str = "jira", project: str = "SEC", to: str = "31") -> str:
    issue = f"{api.url}/rest/api/2/issue"
    return f"""
[[alerts.webhook]]
name = "{name}"
url = "{issue}"
username = "{JIRA_USER}"
password = "{JIRA_TOKEN}"
template = "jira-create.json.j2"
vars = {{ project = "{project}", resolve_transition = "{to}" }}
ticket_ref = "/key"
update_url = "{issue}/{{{{ ticket_ref }}}}/comment"
update_template = "jira-comment.json.j2"
resolve_url = "{issue}/{{{{ ticket_ref }}}}/transitions"
resolve_template = "jira-resolve.json.j2"
move_url = "{issue}/{{{{ ticket_ref }}}}"
move_template = "jira-move.json.j2"
"""


def thehive_hook(api: StandIn) -> str:
    return f"""
[[alerts.webhook]]
name = "thehive"
url = "{api.url}/api/v1/alert"
token = "{HIVE_KEY}"
template = "thehive-alert.json.j2"
ticket_ref = "/_id"
update_url = "{api.url}/api/v1/alert/{{{{ ticket_ref }}}}"
update_method = "PATCH"
update_template = "thehive-update.json.j2"
"""


def servicenow_hook(api: StandIn) -> str:
    table = f"{api.url}/api/now/table/incident"
    return f"""
[[alerts.webhook]]
name = "servicenow"
url = "{table}"
username = "{SNOW_USER}"
password = "{SNOW_PASSWORD}"
template = "servicenow-incident.json.j2"
vars = {{ assignment_group = "ISO" }}
ticket_ref = "/result/sys_id"
update_url = "{table}/{{{{ ticket_ref }}}}"
update_method = "PATCH"
update_template = "servicenow-update.json.j2"
"""


def chat_hook(api: StandIn) -> str:
    assert isinstance(api, ChatStandIn)
    return f"""
[[alerts.webhook]]
name = "chat"
url = "{api.url}{api.path}"
template = "chat-message.json.j2"
"""


async def start_all() -> list[StandIn]:
    """A Jira, a TheHive, a ServiceNow and a chat stand-in, started (`relayaudit demo --hooks`)."""
    apis: list[StandIn] = [
        JiraStandIn(authorization=basic_auth(JIRA_USER, JIRA_TOKEN)),
        TheHiveStandIn(authorization=f"Bearer {HIVE_KEY}"),
        ServiceNowStandIn(authorization=basic_auth(SNOW_USER, SNOW_PASSWORD)),
        ChatStandIn(),
    ]
    for api in apis:
        await api.start()
    return apis


def hooks_for(apis: list[StandIn]) -> str:
    """The [[alerts.webhook]] tables of the shipped templates, pointed at these stand-ins."""
    make = {
        "jira": jira_hook,
        "thehive": thehive_hook,
        "servicenow": servicenow_hook,
        "chat": chat_hook,
    }
    return "".join(make[api.name](api) for api in apis)
