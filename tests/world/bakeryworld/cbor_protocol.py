"""CloudWatch over the Smithy RPC v2 CBOR protocol, translated to the query protocol moto speaks.

The CloudWatch API model (botocore 1.44's `cloudwatch` service-2.json: `protocols`
`["smithy-rpc-v2-cbor", "json", "query"]`, `awsQueryCompatible`) offers three protocols; the
current AWS SDK for Rust (aws-sdk-cloudwatch) speaks RPC v2 CBOR: `POST
/service/GraniteServiceVersion20100801/operation/<Operation>` with `smithy-protocol:
rpc-v2-cbor`, `Content-Type: application/cbor`, `Accept: application/cbor` and a CBOR body.
moto 5.2.5 serves CloudWatch over query and JSON only (the CBOR path is an HTML 404 there).

The front door (`frontdoor.py`) routes such requests here. `Translator` decodes the CBOR input
against the operation's input shape, serializes it to the query protocol with botocore's own
serializer, sends it to moto (so every world patch of CloudWatch applies alike: alarms that
evaluate, forced states, history), parses moto's XML with botocore's query parser into the output
shape, and encodes that as CBOR. The CBOR codec is botocore's own (`RpcV2CBORParser` decodes,
`RpcV2CBORSerializer` encodes); no other package is needed.

What an RPC v2 CBOR caller sees, as the Smithy "RPC v2 CBOR protocol" specification describes it
(from memory of smithy.io; the search tool was not available):

- the answer carries `smithy-protocol: rpc-v2-cbor` and `Content-Type: application/cbor`; its
  body is a CBOR map of the output members (absent members omitted); an operation without output
  answers an empty body;
- timestamps are CBOR tag 1 (epoch seconds) around a double; blobs are byte strings;
- an error is HTTP 4xx/5xx with a CBOR map `{"__type": <shape id>, "message": ...}`. CloudWatch
  is `awsQueryCompatible`: a modeled error's `__type` is its absolute shape id
  (`com.amazonaws.cloudwatch#ResourceNotFound`) and the answer also carries
  `x-amzn-query-error: <query error code>;Sender|Receiver` (the awsQueryCompatible trait), the
  code a query caller would see (`InvalidParameterValue` for `InvalidParameterValueException`),
  which the SDKs report as the error code. Unmodeled codes (`Throttling`, `InternalFailure`) are
  sent as bare names. HTTP status: the error shape's `httpStatusCode`, else moto's.
- Request errors made here, before moto: a body that is not CBOR, or a member of the wrong CBOR
  type: `SerializationException`, 400; a missing required member: `ValidationError` (the
  `ValidationException` shape), 400, with AWS's validation message ("1 validation error detected:
  Value null at 'alarmName' failed to satisfy constraint: Member must not be null"); members the
  model does not know are ignored (as Smithy servers do for forward compatibility); an operation
  CloudWatch does not have: `UnknownOperationException`, 404 (what Smithy's reference server
  routers answer; the world's choice where AWS does not document it); a method other than POST:
  405. An operation moto 5.2.5 does not implement (moto raises): `InternalFailure`, 500, the
  message naming moto's exception (a query caller gets moto's HTML 500 there).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import io
import re
import threading
import uuid
from typing import Any
from urllib.parse import urlencode

SERVICE_SHAPE = "GraniteServiceVersion20100801"  # CloudWatch's Smithy service shape (targetPrefix)
NAMESPACE = "com.amazonaws.cloudwatch"
PATH_RE = re.compile(r"^/service/([A-Za-z0-9_.]+)/operation/([A-Za-z0-9_]+)/?$")
SMITHY_PROTOCOL = "rpc-v2-cbor"

_lock = threading.Lock()
_cache: dict[str, Any] = {}


def match(environ: dict) -> str | None:
    """The CloudWatch operation named by an RPC v2 CBOR request's path, else None."""
    m = PATH_RE.match(environ.get("PATH_INFO", ""))
    if not m or m.group(1) != SERVICE_SHAPE:
        return None
    return m.group(2)


def _model() -> dict:
    """botocore's CloudWatch model, its codecs and the query-code -> error shape index (once)."""
    with _lock:
        if not _cache:
            import botocore.parsers
            import botocore.serialize
            import botocore.session

            sm = botocore.session.get_session().get_service_model("cloudwatch")

            class _Encoder(botocore.serialize.RpcV2CBORSerializer):
                # Tag 1 around a double, always: the Smithy spec's form, and what the Rust SDK's
                # decoder reads (it takes a float after tag 1).
                def _serialize_type_timestamp(self, serialized, value, shape, key):
                    if isinstance(value, _dt.datetime):
                        if value.tzinfo is None:
                            value = value.replace(tzinfo=_dt.timezone.utc)
                        secs = value.timestamp()
                    else:
                        secs = float(value)
                    serialized.extend(self._get_initial_byte(self.TAG_MAJOR_TYPE, 1))
                    self._serialize_type_double(serialized, float(secs), shape, key)

                def _serialize_type_double(self, serialized, value, shape, key):
                    super()._serialize_type_double(serialized, float(value), shape, key)

                def _serialize_type_float(self, serialized, value, shape, key):
                    super()._serialize_type_float(serialized, float(value), shape, key)

            codes: dict[str, Any] = {}
            for s in sm.error_shapes:
                codes.setdefault(s.error_code, []).append(s)
            _cache.update(
                service=sm,
                query_serializer=botocore.serialize.create_serializer("query", include_validation=False),
                query_parser=botocore.parsers.create_parser("query"),
                cbor_decoder=botocore.parsers.create_parser("smithy-rpc-v2-cbor"),
                cbor_encoder=_Encoder(),
                codes=codes,
            )
        return _cache


class RequestError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


# ---------------------------------------------------------------- CBOR encoding of answers
def encode_value(value: Any, shape: Any) -> bytes:
    out = bytearray()
    _model()["cbor_encoder"]._serialize_data_item(out, value, shape)
    return bytes(out)


def _encode_generic(value: Any) -> bytes:
    """A CBOR map of strings (error bodies), with botocore's encoder primitives."""
    enc = _model()["cbor_encoder"]
    out = bytearray()
    items = {k: v for k, v in value.items() if v is not None}
    out.extend(enc._get_initial_byte(enc.MAP_MAJOR_TYPE, len(items)))  # (few items: < 24)
    for k, v in items.items():
        enc._serialize_type_string(out, k, None, None)
        enc._serialize_type_string(out, str(v), None, None)
    return bytes(out)


def _headers(body: bytes, request_id: str, extra: list | None = None) -> list:
    h = [
        ("smithy-protocol", SMITHY_PROTOCOL),
        ("Content-Type", "application/cbor"),
        ("x-amzn-RequestId", request_id),
    ]
    h += extra or []
    h.append(("Content-Length", str(len(body))))
    return h


def error_answer(code: str, message: str, status: int | None = None, operation: str | None = None,
                 request_id: str | None = None, sender: bool | None = None) -> tuple[int, list, bytes]:
    """(status, headers, body) of an RPC v2 CBOR error for query error `code` (see module doc)."""
    shape = None
    cands = _model()["codes"].get(code, [])
    if operation and len(cands) > 1:
        try:
            op_errors = {s.name for s in _model()["service"].operation_model(operation).error_shapes}
        except Exception:
            op_errors = set()
        cands = [s for s in cands if s.name in op_errors] or cands
    if cands:
        shape = sorted(cands, key=lambda s: s.name != code)[0]
    if shape is not None:
        err = shape.metadata.get("error") or {}
        typ = f"{NAMESPACE}#{shape.name}"
        status = err.get("httpStatusCode") or status or 400
        if sender is None:
            sender = bool(err.get("senderFault", status < 500))
    else:
        typ = code
        status = status or 400
        if sender is None:
            sender = status < 500
    body = _encode_generic({"__type": typ, "message": message})
    rid = request_id or str(uuid.uuid4())
    extra = [("x-amzn-query-error", f"{code};{'Sender' if sender else 'Receiver'}")]
    if code in ("Throttling", "ThrottlingException"):
        extra.append(("x-amzn-ErrorType", f"{code}:"))
    return status, _headers(body, rid, extra), body


def fault_answer(kind: str) -> tuple[int, list, bytes]:
    """The front door's injected faults in this protocol: `throttle` -> CloudWatch's query
    throttling code `Throttling` (400, Sender), else `InternalFailure` (500, Receiver)."""
    if kind == "throttle":
        return error_answer("Throttling", "Rate exceeded", 400, sender=True)
    return error_answer("InternalFailure", "We encountered an internal error. Please try again.", 500, sender=False)


# ---------------------------------------------------------------- CBOR decoding of requests
def _expect(ok: bool, what: str, where: str) -> None:
    if not ok:
        raise RequestError("SerializationException", f"Expected {what} at '{where}'")


def _convert(value: Any, shape: Any, where: str) -> Any:
    """A decoded CBOR value checked against `shape` (unknown structure members dropped)."""
    t = shape.type_name
    if t == "structure":
        _expect(isinstance(value, dict), "a map (structure)", where)
        out = {}
        for name, mshape in shape.members.items():
            wire = mshape.serialization.get("name", name)
            if wire in value and value[wire] is not None:
                out[name] = _convert(value[wire], mshape, f"{where}.{name}" if where else name)
        return out
    if t == "list":
        _expect(isinstance(value, list), "an array (list)", where)
        return [_convert(v, shape.member, f"{where}[{i}]") for i, v in enumerate(value) if v is not None]
    if t == "map":
        _expect(isinstance(value, dict), "a map", where)
        return {_convert(k, shape.key, where): _convert(v, shape.value, f"{where}.{k}")
                for k, v in value.items() if v is not None}
    if t == "string":
        _expect(isinstance(value, str), "a text string", where)
        return value
    if t in ("integer", "long"):
        _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", where)
        return value
    if t in ("double", "float"):
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a number", where)
        return float(value)
    if t == "boolean":
        _expect(isinstance(value, bool), "a boolean", where)
        return value
    if t == "timestamp":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
        _expect(isinstance(value, _dt.datetime), "a timestamp (tag 1)", where)
        return value
    if t == "blob":
        _expect(isinstance(value, (bytes, bytearray)), "a byte string", where)
        return bytes(value)
    return value


def _missing_required(params: dict, shape: Any, where: str, out: list) -> None:
    if shape.type_name == "structure":
        for req in shape.required_members:
            if req not in params:
                name = f"{where}.{req}" if where else req
                out.append(name)
        for name, v in params.items():
            m = shape.members[name]
            _missing_required(v, m, f"{where}.{name}" if where else name, out)
    elif shape.type_name == "list":
        for i, v in enumerate(params):
            _missing_required(v, shape.member, f"{where}.{i + 1}.member", out)


def _lower_first(path: str) -> str:
    return ".".join(p[:1].lower() + p[1:] for p in path.split("."))


def decode_request(operation: str, body: bytes) -> tuple[Any, dict]:
    """(operation model, params) of a CBOR request; RequestError when it is not acceptable."""
    m = _model()
    sm = m["service"]
    if operation not in sm.operation_names:
        raise RequestError("UnknownOperationException",
                           f"Operation {operation} is not found on service {SERVICE_SHAPE}", 404)
    op = sm.operation_model(operation)
    shape = op.input_shape
    raw: Any = {}
    if body:
        dec = m["cbor_decoder"]
        try:
            stream = dec.get_peekable_stream_from_bytes(body)
            raw = dec.parse_data_item(stream)
            if stream.read(1):
                raise ValueError("trailing bytes after the CBOR data item")
        except Exception as e:  # botocore's ResponseParserError, struct errors, bad UTF-8...
            raise RequestError("SerializationException", f"Malformed CBOR request body: {e}") from None
    if shape is None:
        return op, {}
    if raw is None:
        raw = {}
    params = _convert(raw, shape, "")
    missing: list = []
    _missing_required(params, shape, "", missing)
    if missing:
        n = len(missing)
        detail = "; ".join(
            f"Value null at '{_lower_first(p)}' failed to satisfy constraint: Member must not be null"
            for p in missing)
        raise RequestError("ValidationError", f"{n} validation error{'s' if n > 1 else ''} detected: {detail}")
    return op, params


# ---------------------------------------------------------------- the translation
def _strip(d: dict) -> dict:
    d.pop("ResponseMetadata", None)
    return d


class Translator:
    """WSGI app: an RPC v2 CBOR CloudWatch request in, moto (query) behind, CBOR out."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        status, headers, body = self.handle(environ)
        start_response(f"{status} {_reason(status)}", headers)
        return [body]

    def handle(self, environ) -> tuple[int, list, bytes]:
        operation = match(environ) or ""
        if environ.get("REQUEST_METHOD", "POST") != "POST":
            body = b""
            return 405, [("smithy-protocol", SMITHY_PROTOCOL), ("Allow", "POST"),
                         ("Content-Length", "0")], body
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw_body = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            # PutMetricData has the `requestCompression` trait (gzip): the SDKs compress bodies
            # of 10 KiB and more (their default minimum) and send `Content-Encoding: gzip`.
            if "gzip" in [e.strip().lower() for e in environ.get("HTTP_CONTENT_ENCODING", "").split(",")]:
                try:
                    raw_body = gzip.decompress(raw_body)
                except (OSError, EOFError) as e:
                    raise RequestError("SerializationException", f"Malformed gzip request body: {e}") from None
            op, params = decode_request(operation, raw_body)
        except RequestError as e:
            return error_answer(e.code, e.message, e.status, operation)
        m = _model()
        req = m["query_serializer"].serialize_to_request(params, op)
        form = urlencode(req["body"], doseq=True).encode() if isinstance(req["body"], dict) else (req["body"] or b"")
        env = dict(environ)
        for k in ("HTTP_SMITHY_PROTOCOL", "HTTP_ACCEPT", "HTTP_X_AMZN_QUERY_MODE", "HTTP_CONTENT_TYPE",
                  "HTTP_CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_ENCODING"):
            env.pop(k, None)
        env.update({
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/",
            "QUERY_STRING": "",
            "CONTENT_TYPE": "application/x-www-form-urlencoded; charset=utf-8",
            "CONTENT_LENGTH": str(len(form)),
            "wsgi.input": io.BytesIO(form),
        })
        captured: dict = {}

        def sr(status, hdrs, exc_info=None):
            captured["status"], captured["headers"] = status, hdrs
            return lambda _data: None

        try:
            result = self.app(env, sr)
            try:
                xml = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()
        except Exception as e:  # moto raised (e.g. an operation it does not implement)
            return error_answer("InternalFailure", f"world: moto failed on {operation}: {type(e).__name__}: {e}",
                                500, operation, sender=False)
        try:
            code = int(str(captured.get("status", "500")).split()[0])
        except ValueError:
            code = 500
        hdrs = {k.lower(): v for k, v in captured.get("headers", [])}
        response = {"status_code": code, "headers": hdrs, "body": xml}
        try:
            parsed = m["query_parser"].parse(response, op.output_shape)
        except Exception as e:
            return error_answer("InternalFailure", f"world: moto's answer to {operation} was not understood: {e}",
                                500, operation, sender=False)
        rid = (parsed.get("ResponseMetadata") or {}).get("RequestId") or hdrs.get("x-amzn-requestid") \
            or str(uuid.uuid4())
        if code >= 300:
            err = parsed.get("Error") or {}
            ecode = err.get("Code") or str(code)
            msg = err.get("Message") or xml.decode("utf-8", "replace")[:500]
            sender = {"Sender": True, "Receiver": False}.get(err.get("Type") or "")
            return error_answer(ecode, msg, code, operation, rid, sender)
        if op.output_shape is None:
            body = b""
        else:
            body = encode_value(_strip(parsed), op.output_shape)
        return 200, _headers(body, rid), body


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
