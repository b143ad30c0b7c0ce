"""The front door: WSGI middleware in front of moto's app.

- a call log: service, action, HTTP status, time, fault injected (if any), the caller's access
  key id (SigV4 credential scope) and whether the action is mutating;
- seeded fault injection per action: throttling with the service's real error code and
  protocol shape, HTTP 500, dropped connections, added latency, and lost responses (the call
  is served, then the connection drops before the answer: the case idempotency tokens exist
  for);
- the control API under /_world/.

Faults never apply to /_world/ or /moto-api/.
"""

from __future__ import annotations

import io
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from urllib.parse import parse_qs

RULE_KEYS = {"action", "throttle", "error500", "drop", "lose", "latency_ms", "access_key"}
ACTION_RE = re.compile(r"^(\*|[a-z0-9-]+:(\*|[A-Za-z0-9]+))$")
# SigV4 credential scope: AKID/yyyymmdd/region/service/aws4_request (the `Authorization`
# header's `Credential=`, or a presigned URL's `X-Amz-Credential`). SigV4a has no region.
SCOPE_RE = re.compile(r"^([^/\s,]+)/(\d{8})/(?:([^/\s,]+)/)?([^/\s,]+)/aws4_request$")
AUTH_CRED_RE = re.compile(r"Credential=([^\s,]+)")

# Read-only actions whose names do not start with Describe, List or Get.
READ_ONLY_ACTIONS = frozenset({
    "ec2:SearchTransitGatewayRoutes",
    "ec2:SearchLocalGatewayRoutes",
    "ec2:SearchTransitGatewayMulticastGroups",
    "sts:AssumeRole",
    "sts:AssumeRoleWithWebIdentity",
    "sts:AssumeRoleWithSAML",
    "sts:DecodeAuthorizationMessage",
    "iam:SimulatePrincipalPolicy",
    "iam:SimulateCustomPolicy",
    "secretsmanager:BatchGetSecretValue",
    "dynamodb:BatchGetItem",
    "dynamodb:Query",
    "dynamodb:Scan",
    "dynamodb:TransactGetItems",
    "logs:FilterLogEvents",
})
READ_ONLY_PREFIXES = ("Describe", "List", "Get")
READ_ONLY_METHODS = ("GET ", "HEAD ", "OPTIONS ")


def is_mutating(service: str, action: str) -> bool:
    """Whether a call of `service:action` may change state: anything not starting with
    Describe/List/Get and not in READ_ONLY_ACTIONS; REST calls (`METHOD path`) unless they are
    GET/HEAD/OPTIONS."""
    if action.startswith(READ_ONLY_METHODS):
        return False
    if " " in action:  # a REST call with another method
        return True
    if action.startswith(READ_ONLY_PREFIXES):
        return False
    return f"{service}:{action}" not in READ_ONLY_ACTIONS


def credential_scope(environ, qs: dict | None = None) -> tuple[str | None, str | None]:
    """(access key id, service) from the SigV4 credential scope, or (None, None) unsigned."""
    raw = None
    m = AUTH_CRED_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if m:
        raw = m.group(1)
    else:
        if qs is None:
            qs = parse_qs(environ.get("QUERY_STRING", ""))
        vals = qs.get("X-Amz-Credential")
        if vals:
            raw = vals[0]
    if not raw:
        return None, None
    sm = SCOPE_RE.match(raw)
    if sm:
        return sm.group(1), sm.group(4)
    # not a well-formed scope: the key id is what precedes the first '/'
    return raw.split("/", 1)[0] or None, None


class Tally:
    """Call counts since the last reset: all calls, or one access key's."""

    __slots__ = ("total", "counts", "mutating", "injected")

    def __init__(self) -> None:
        self.total = 0
        self.counts: dict[str, int] = {}
        self.mutating: dict[str, int] = {}
        self.injected: dict[str, int] = {}

    def add(self, key: str, mutating: bool, fault: str | None) -> None:
        self.total += 1
        self.counts[key] = self.counts.get(key, 0) + 1
        if mutating:
            self.mutating[key] = self.mutating.get(key, 0) + 1
        if fault:
            self.injected[fault] = self.injected.get(fault, 0) + 1

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "mutating_total": sum(self.mutating.values()),
            "mutating_counts": dict(sorted(self.mutating.items())),
            "faults_injected": dict(self.injected),
        }
QUERY_NS = {
    "autoscaling": "http://autoscaling.amazonaws.com/doc/2011-01-01/",
    "elasticloadbalancing": "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/",
    "rds": "http://rds.amazonaws.com/doc/2014-10-31/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
}


class SpecError(ValueError):
    pass


def validate_spec(spec) -> dict:
    """Validate a fault spec; raise SpecError naming the offending field."""
    if not isinstance(spec, dict):
        raise SpecError("fault spec must be a JSON object with 'rules' (and optional 'seed')")
    unknown = set(spec) - {"seed", "rules"}
    if unknown:
        raise SpecError(f"unknown field(s) {sorted(unknown)}: allowed are 'seed' and 'rules'")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError("'seed' must be an integer")
    rules = spec.get("rules", [])
    if not isinstance(rules, list):
        raise SpecError("'rules' must be a list")
    out = []
    for i, r in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise SpecError(f"{where} must be an object")
        bad = set(r) - RULE_KEYS
        if bad:
            raise SpecError(f"{where}: unknown field(s) {sorted(bad)}; allowed: {sorted(RULE_KEYS)}")
        act = r.get("action")
        if not isinstance(act, str) or not ACTION_RE.match(act):
            raise SpecError(
                f"{where}.action must be '*', 'service:*' or 'service:Action' (e.g. 'ec2:RunInstances'), got {act!r}"
            )
        rule = {"action": act}
        for k in ("throttle", "error500", "drop", "lose"):
            v = r.get(k, 0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise SpecError(f"{where}.{k} must be a probability between 0 and 1, got {v!r}")
            rule[k] = float(v)
        if rule["throttle"] + rule["error500"] + rule["drop"] + rule["lose"] > 1.0 + 1e-9:
            raise SpecError(f"{where}: throttle + error500 + drop + lose must not exceed 1")
        lat = r.get("latency_ms", 0)
        if not isinstance(lat, (int, float)) or isinstance(lat, bool) or not 0 <= lat <= 60000:
            raise SpecError(f"{where}.latency_ms must be a number of milliseconds in 0..60000, got {lat!r}")
        rule["latency_ms"] = lat
        ak = r.get("access_key")
        if ak is not None and (not isinstance(ak, str) or not ak):
            raise SpecError(f"{where}.access_key must be a non-empty string (the caller's access key id), got {ak!r}")
        # Only calls signed with this access key id get this rule's faults (one test's client).
        rule["access_key"] = ak
        out.append(rule)
    return {"seed": seed, "rules": out}


class DropConnection(ConnectionResetError):
    pass


class FrontDoor:
    def __init__(self, app, world, max_log: int = 200_000) -> None:
        self.app = app
        self.world = world
        self.lock = threading.Lock()
        self.log: deque = deque(maxlen=max_log)
        self.tally = Tally()  # every call since the last reset
        self.by_key: dict[str, Tally] = {}  # per caller access key id
        self.spec = {"seed": world.settings.seed, "rules": []}
        self.fault_counters: dict[str, int] = {}
        self.control_routes = []  # plug-ins may add (method, path-prefix, fn(environ, body) -> (status, obj))
        # Partitioned callers: access key id -> since when. Every call signed with such a key is
        # dropped (connection closed, no answer), for every service, whatever the fault rules.
        self.partitions: dict[str, float] = {}
        # Calls received and not answered yet (waiting out a latency fault, or being served),
        # by a number of their own: what a caller that gave up on its answer may still cause.
        self.in_flight: dict[int, dict] = {}
        self._next_call = 0

    # -------------------------------------------------------------- accessors
    def total_calls(self) -> int:
        return self.tally.total

    # kept for callers of the first version (counts of every call since the last reset)
    @property
    def total(self) -> int:
        return self.tally.total

    @property
    def counts(self) -> dict[str, int]:
        return self.tally.counts

    @property
    def injected(self) -> dict[str, int]:
        return self.tally.injected

    def reset_calls(self) -> None:
        with self.lock:
            self.log.clear()
            self.tally = Tally()
            self.by_key = {}

    def calls_report(self, limit: int = 1000, access_key: str | None = None,
                     mutating: bool | None = None, since: float | None = None,
                     served: bool | None = None) -> dict:
        """The `GET /_world/calls` answer: counts since the last reset (all calls, or
        `access_key`'s only) and the last `limit` log entries matching the filters
        (`mutating`, `since` (entries with `t >= since`) and `served` filter the list only)."""
        with self.lock:
            if access_key is None:
                out = self.tally.as_dict()
                out["access_keys"] = {k: t.total for k, t in sorted(self.by_key.items())}
            else:
                out = self.by_key.get(access_key, Tally()).as_dict()
            out["access_key"] = access_key
            calls: list = []
            if limit > 0:
                for c in reversed(self.log):
                    if access_key is not None and c["access_key"] != access_key:
                        continue
                    if mutating is not None and c["mutating"] != mutating:
                        continue
                    if since is not None and c["t"] < since:
                        continue  # (entries are logged when answered, so not sorted by `t`)
                    if served is not None and c.get("served") != served:
                        continue
                    calls.append(c)
                    if len(calls) >= limit:
                        break
                calls.reverse()
            out["calls"] = calls
            out["in_flight"] = [
                c for c in self.in_flight.values()
                if access_key is None or c["access_key"] == access_key
            ]
        return out

    # -------------------------------------------------------------- partitions
    def partition(self, access_key: str) -> dict:
        """Cut one caller off: every call signed with `access_key` is dropped from now on."""
        if not isinstance(access_key, str) or not access_key or "/" in access_key:
            raise SpecError(f"access_key must be an access key id, got {access_key!r}")
        with self.lock:
            self.partitions.setdefault(access_key, round(time.time(), 3))
        return self.partitions_report()

    def heal(self, access_key: str | None = None) -> dict:
        """End the partition of `access_key` (of every key when None)."""
        with self.lock:
            if access_key is None:
                self.partitions.clear()
            else:
                self.partitions.pop(access_key, None)
        return self.partitions_report()

    def partitions_report(self) -> dict:
        with self.lock:
            return {"partitions": dict(sorted(self.partitions.items()))}

    def faults_spec(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.spec))

    def set_faults(self, spec) -> dict:
        spec = validate_spec(spec)
        with self.lock:
            self.spec = spec
            self.fault_counters = {}
        return spec

    # -------------------------------------------------------------- request classification
    @staticmethod
    def classify(environ, body: bytes) -> tuple[str, str, str]:
        """(service, action, protocol) where protocol is ec2 | query | json | rest | cbor."""
        qs = parse_qs(environ.get("QUERY_STRING", ""))
        service = credential_scope(environ, qs)[1] or ""
        from . import cbor_protocol

        cbor_op = cbor_protocol.match(environ)
        if cbor_op:  # CloudWatch over Smithy RPC v2 CBOR (POST /service/<svc>/operation/<Op>)
            return service or "monitoring", cbor_op, "cbor"
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target:
            action = target.rsplit(".", 1)[-1]
            if not service:
                service = target.split("_")[0].split(".")[0].lower()
            return service or "unknown", action, "json"
        action = ""
        if "Action" in qs:
            action = qs["Action"][0]
        ctype = environ.get("CONTENT_TYPE", "")
        if not action and body and "x-www-form-urlencoded" in ctype:
            try:
                form = parse_qs(body.decode("utf-8", "replace"))
                action = form.get("Action", [""])[0]
            except Exception:
                action = ""
        if not service:
            host = environ.get("HTTP_HOST", "")
            service = host.split(".")[0] if "amazonaws" in host else "unknown"
        if action:
            return service, action, "ec2" if service == "ec2" else "query"
        path = environ.get("PATH_INFO", "/")
        return service, f"{environ.get('REQUEST_METHOD', 'GET')} {path}", "rest"

    @staticmethod
    def dry_run(environ, body: bytes) -> bool:
        """EC2's `DryRun=true` (query string or form body)."""
        qs_raw = environ.get("QUERY_STRING", "")
        for raw in (qs_raw, body.decode("utf-8", "replace") if b"DryRun" in body else ""):
            if "DryRun" in raw:
                vals = parse_qs(raw).get("DryRun")
                if vals and vals[0].lower() == "true":
                    return True
        return False

    # -------------------------------------------------------------- faults
    def _rule_for(self, key: str, service: str, access_key: str | None = None) -> dict | None:
        rules = self.spec["rules"]
        for want in (key, f"{service}:*", "*"):
            for r in rules:
                if r["action"] == want and r.get("access_key") in (None, access_key):
                    return r
        return None

    def _decide(self, key: str, service: str, access_key: str | None = None):
        with self.lock:
            rule = self._rule_for(key, service, access_key)
            if rule is None:
                return None, 0
            n = self.fault_counters.get(key, 0)
            self.fault_counters[key] = n + 1
            seed = self.spec["seed"]
        u = random.Random(f"{seed}:{key}:{n}").random()
        fault = None
        if u < rule["drop"]:
            fault = "drop"
        elif u < rule["drop"] + rule["throttle"]:
            fault = "throttle"
        elif u < rule["drop"] + rule["throttle"] + rule["error500"]:
            fault = "error500"
        elif u < rule["drop"] + rule["throttle"] + rule["error500"] + rule["lose"]:
            fault = "lose"
        return fault, rule["latency_ms"]

    @staticmethod
    def error_response(kind: str, protocol: str, service: str, action: str):
        if protocol == "cbor":
            from . import cbor_protocol

            status, headers, payload = cbor_protocol.fault_answer(kind)
            return status, [h for h in headers if h[0] != "Content-Length"], payload
        rid = str(uuid.uuid4())
        if kind == "throttle":
            if protocol == "ec2":
                code, status, msg = "RequestLimitExceeded", 503, "Request limit exceeded."
            elif protocol == "query":
                code, status, msg = "Throttling", 400, "Rate exceeded"
            else:
                code, status, msg = "ThrottlingException", 400, "Rate exceeded"
        else:
            status = 500
            msg = "We encountered an internal error. Please try again."
            code = {"ec2": "InternalError", "query": "InternalFailure"}.get(protocol, "InternalServerError")
        if protocol == "ec2":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{code}</Code><Message>{msg}</Message></Error></Errors>"
                f"<RequestID>{rid}</RequestID></Response>"
            )
            headers = [("Content-Type", "text/xml;charset=UTF-8")]
        elif protocol == "query":
            ns = QUERY_NS.get(service, f"http://{service}.amazonaws.com/doc/")
            typ = "Sender" if kind == "throttle" else "Receiver"
            body = (
                f'<ErrorResponse xmlns="{ns}"><Error><Type>{typ}</Type><Code>{code}</Code>'
                f"<Message>{msg}</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>"
            )
            headers = [("Content-Type", "text/xml")]
        else:
            body = json.dumps({"__type": code, "message": msg})
            headers = [("Content-Type", "application/x-amz-json-1.1")]
        headers.append(("x-amzn-RequestId", rid))
        if kind == "throttle":
            headers.append(("x-amzn-ErrorType", f"{code}:"))
        return status, headers, body.encode()

    # -------------------------------------------------------------- WSGI
    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_world/") or path == "/_world":
            from .control import handle_control

            return handle_control(self, environ, start_response)
        if path.startswith("/moto-api"):
            # moto's own API (reset, state) does not go through call_action: serialise it too.
            with self.world.lock:
                return self.app(environ, start_response)

        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        service, action, protocol = self.classify(environ, body)
        key = f"{service}:{action}"
        access_key = credential_scope(environ)[0]
        dry_run = protocol == "ec2" and self.dry_run(environ, body)
        # An EC2 DryRun request only checks permissions (it fails with DryRunOperation).
        mutating = is_mutating(service, action) and not dry_run
        t0 = time.time()
        if access_key is not None and access_key in self.partitions:
            # A partitioned caller: dropped before any rule is looked at (and without advancing
            # the rules' counters, so the other callers' faults replay as before).
            fault, latency = "partition", 0
        else:
            fault, latency = self._decide(key, service, access_key)
        with self.lock:
            self._next_call += 1
            number = self._next_call
            self.in_flight[number] = {"t": round(t0, 3), "service": service, "action": action,
                                      "access_key": access_key, "mutating": mutating}
        if latency:
            time.sleep(latency / 1000.0)

        def record(status: int | str) -> None:
            with self.lock:
                self.in_flight.pop(number, None)
                self.tally.add(key, mutating, fault)
                if access_key is not None:
                    tally = self.by_key.get(access_key)
                    if tally is None:
                        tally = self.by_key[access_key] = Tally()
                    tally.add(key, mutating, fault)
                self.log.append(
                    {
                        "t": round(t0, 3),
                        "service": service,
                        "action": action,
                        "status": status,
                        "ms": round((time.time() - t0) * 1000, 1),
                        "fault": fault,
                        "access_key": access_key,
                        "mutating": mutating,
                        "dry_run": dry_run,
                        # whether the call reached moto (took effect): not when dropped,
                        # throttled or failed by a fault; yes when only its answer was lost
                        "served": fault in (None, "lose"),
                    }
                )

        def drop_connection(what: str):
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                import socket as _s

                try:
                    sock.shutdown(_s.SHUT_RDWR)
                except OSError:
                    pass
            raise DropConnection(f"world: {what} by fault injection")

        app = self.app
        if protocol == "cbor":  # translated to moto's query protocol and back (cbor_protocol.py)
            from .cbor_protocol import Translator

            app = Translator(self.app)
        if fault in ("drop", "partition"):
            record("dropped")
            drop_connection("connection dropped" if fault == "drop" else "caller partitioned")
        if fault == "lose":
            # Serve the call for real (its effects happen), then lose the answer: the caller
            # sees a broken connection and cannot tell whether the call took effect.
            served = {}

            def keep(status, headers, exc_info=None):
                served["status"] = status
                return lambda _data: None

            try:
                for _chunk in app(environ, keep):
                    pass
            except Exception:
                record(500)
                raise
            record(f"lost {str(served.get('status', '0')).split()[0]}")
            drop_connection("answer lost after the call was served")
        if fault in ("throttle", "error500"):
            status, headers, payload = self.error_response(fault, protocol, service, action)
            headers.append(("Content-Length", str(len(payload))))
            start_response(f"{status} {'Service Unavailable' if status == 503 else 'Bad Request' if status == 400 else 'Internal Server Error'}", headers)
            record(status)
            return [payload]

        captured = {}

        def sr(status, headers, exc_info=None):
            captured["status"] = status
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            result = app(environ, sr)
        except Exception:
            record(500)
            raise
        try:
            code = int(str(captured.get("status", "0")).split()[0])
        except ValueError:
            code = 0
        record(code)
        return result
