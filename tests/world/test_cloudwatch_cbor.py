"""CloudWatch over the Smithy RPC v2 CBOR protocol (bakeryworld/cbor_protocol.py), as the AWS SDK
for Rust speaks it: requests built with botocore's own `smithy-rpc-v2-cbor` serializer, signed
with SigV4, answers read with botocore's `smithy-rpc-v2-cbor` parser. moto 5.2.5 alone answers
these paths with an HTML 404.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.error
import urllib.request
import uuid

import pytest

CBOR_PATH = "/service/GraniteServiceVersion20100801/operation/"


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class CborCloudWatch:
    """A minimal RPC v2 CBOR client of CloudWatch made of botocore's parts."""

    def __init__(self, world):
        import botocore.parsers
        import botocore.serialize
        import botocore.session
        from botocore.credentials import Credentials

        self.endpoint = world.env["AWS_ENDPOINT_URL"].rstrip("/")
        self.region = world.env["AWS_REGION"]
        self.creds = Credentials(world.env["AWS_ACCESS_KEY_ID"], world.env["AWS_SECRET_ACCESS_KEY"])
        self.model = botocore.session.get_session().get_service_model("cloudwatch")
        self.serializer = botocore.serialize.create_serializer("smithy-rpc-v2-cbor")
        self.parser = botocore.parsers.create_parser("smithy-rpc-v2-cbor")
        self.encoder = botocore.serialize.create_serializer("smithy-rpc-v2-cbor", include_validation=False)

    def raw(self, path: str, body: bytes, headers: dict | None = None, method: str = "POST"):
        """Send a signed request; (status, lower-cased headers, body)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        h = {"smithy-protocol": "rpc-v2-cbor", "Content-Type": "application/cbor", "Accept": "application/cbor"}
        h.update(headers or {})
        req = AWSRequest(method=method, url=self.endpoint + path, data=body, headers=h)
        SigV4Auth(self.creds, "monitoring", self.region).add_auth(req)
        prepared = req.prepare()
        r = urllib.request.Request(prepared.url, data=body if method == "POST" else None,
                                   headers=dict(prepared.headers.items()), method=method)
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only
            with opener.open(r, timeout=30) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def call(self, operation: str, **params):
        """(status, headers, parsed) of a CBOR call; parsed as botocore parses it (errors too)."""
        op = self.model.operation_model(operation)
        req = self.serializer.serialize_to_request(params, op)
        assert req["url_path"] == CBOR_PATH + operation
        status, headers, body = self.raw(req["url_path"], req["body"], req["headers"])
        parsed = self.parser.parse({"status_code": status, "headers": headers, "body": body}, op.output_shape)
        return status, headers, parsed

    def ok(self, operation: str, **params):
        status, headers, parsed = self.call(operation, **params)
        assert status == 200, (status, parsed)
        assert headers.get("smithy-protocol") == "rpc-v2-cbor"
        assert headers.get("content-type") == "application/cbor"
        return parsed


@pytest.fixture(scope="module")
def cbor(world):
    return CborCloudWatch(world)


@pytest.fixture(scope="module")
def cw(world):
    return world.client("cloudwatch")


def alarm_params(name: str, **kw) -> dict:
    p = dict(
        AlarmName=name, Namespace="World/Cbor", MetricName="Errors", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold",
        TreatMissingData="missing", Dimensions=[{"Name": "Service", "Value": name}],
    )
    p.update(kw)
    return p


def test_put_and_describe_alarm_over_cbor(cbor, cw):
    name = f"cbor-{uuid.uuid4().hex[:8]}"
    assert cbor.ok("PutMetricAlarm", **alarm_params(name))
    got = cbor.ok("DescribeAlarms", AlarmNames=[name])
    [alarm] = got["MetricAlarms"]
    assert alarm["AlarmName"] == name
    assert alarm["AlarmArn"].endswith(f":alarm:{name}")
    # "When this operation creates an alarm, the alarm state is immediately set to INSUFFICIENT_DATA"
    assert alarm["StateValue"] == "INSUFFICIENT_DATA"
    assert alarm["Threshold"] == 1.0 and alarm["Period"] == 60 and alarm["EvaluationPeriods"] == 1
    assert alarm["Dimensions"] == [{"Name": "Service", "Value": name}]
    # timestamps arrive as CBOR tag 1 epoch seconds (botocore turns them into datetimes)
    assert isinstance(alarm["StateUpdatedTimestamp"], dt.datetime)
    assert abs(alarm["StateUpdatedTimestamp"].timestamp() - time.time()) < 120
    # one world behind both protocols: the JSON client (boto3's) sees the same alarm
    assert cw.describe_alarms(AlarmNames=[name])["MetricAlarms"][0]["AlarmArn"] == alarm["AlarmArn"]


def test_forced_alarm_state_seen_over_cbor(world, cbor):
    name = f"cbor-forced-{uuid.uuid4().hex[:8]}"
    cbor.ok("PutMetricAlarm", **alarm_params(name))
    p = world.cli("alarm", name, "ALARM")
    assert p.returncode == 0, p.stderr
    try:
        alarm = cbor.ok("DescribeAlarms", AlarmNames=[name])["MetricAlarms"][0]
        assert alarm["StateValue"] == "ALARM"
        assert cbor.ok("DescribeAlarms", StateValue="ALARM", AlarmNamePrefix="cbor-forced-")["MetricAlarms"]
    finally:
        world.cli("alarm", name, "--clear")


def test_set_alarm_state_and_delete_over_cbor(cbor, cw):
    name = f"cbor-set-{uuid.uuid4().hex[:8]}"
    # Period 3600: no evaluation comes before the check ("lasts only until the next alarm
    # comparison occurs")
    cbor.ok("PutMetricAlarm", **alarm_params(name, Period=3600))
    status, headers, parsed = cbor.call("SetAlarmState", AlarmName=name, StateValue="ALARM", StateReason="test")
    assert status == 200 and headers["smithy-protocol"] == "rpc-v2-cbor"
    assert cw.describe_alarms(AlarmNames=[name])["MetricAlarms"][0]["StateValue"] == "ALARM"
    status, headers, body = cbor.raw(CBOR_PATH + "DeleteAlarms",
                                     cbor.serializer.serialize_to_request(
                                         {"AlarmNames": [name]}, cbor.model.operation_model("DeleteAlarms"))["body"])
    assert status == 200 and body == b""  # no output shape: empty body
    assert cbor.ok("DescribeAlarms", AlarmNames=[name])["MetricAlarms"] == []


def test_metric_data_round_trip_over_cbor(cbor):
    ns, dims = "World/Cbor", [{"Name": "Case", "Value": uuid.uuid4().hex[:8]}]
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    t0 = now - dt.timedelta(minutes=2)
    cbor.ok("PutMetricData", Namespace=ns, MetricData=[
        {"MetricName": "Latency", "Dimensions": dims, "Timestamp": t0, "Value": 5.5, "Unit": "Milliseconds"},
        {"MetricName": "Latency", "Dimensions": dims, "Timestamp": t0, "Value": 2.5, "Unit": "Milliseconds"},
    ])
    stats = cbor.ok("GetMetricStatistics", Namespace=ns, MetricName="Latency", Dimensions=dims,
                    StartTime=now - dt.timedelta(minutes=10), EndTime=now + dt.timedelta(minutes=1),
                    Period=600, Statistics=["Sum", "Maximum", "SampleCount"])
    [point] = stats["Datapoints"]
    assert point["Sum"] == 8.0 and point["Maximum"] == 5.5 and point["SampleCount"] == 2.0
    assert isinstance(point["Timestamp"], dt.datetime)
    data = cbor.ok("GetMetricData", StartTime=now - dt.timedelta(minutes=10), EndTime=now + dt.timedelta(minutes=1),
                   MetricDataQueries=[{"Id": "m1", "MetricStat": {
                       "Metric": {"Namespace": ns, "MetricName": "Latency", "Dimensions": dims},
                       "Period": 600, "Stat": "Sum"}}])
    [res] = data["MetricDataResults"]
    assert res["Id"] == "m1" and res["Values"] == [8.0]
    assert all(isinstance(t, dt.datetime) for t in res["Timestamps"])


def test_gzip_put_metric_data_over_cbor(cbor):
    """PutMetricData's `requestCompression` trait: a large body comes gzipped
    (`Content-Encoding: gzip`), as the SDKs send it from 10 KiB up."""
    import gzip

    ns, dims = "World/CborGzip", [{"Name": "Case", "Value": uuid.uuid4().hex[:8]}]
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    data = [{"MetricName": "Big", "Dimensions": dims, "Timestamp": now - dt.timedelta(seconds=i), "Value": 1.0}
            for i in range(400)]
    op = cbor.model.operation_model("PutMetricData")
    req = cbor.serializer.serialize_to_request({"Namespace": ns, "MetricData": data}, op)
    assert len(req["body"]) > 10240
    status, headers, body = cbor.raw(req["url_path"], gzip.compress(req["body"]),
                                     dict(req["headers"], **{"Content-Encoding": "gzip"}))
    assert status == 200, body
    stats = cbor.ok("GetMetricStatistics", Namespace=ns, MetricName="Big", Dimensions=dims,
                    StartTime=now - dt.timedelta(minutes=20), EndTime=now + dt.timedelta(minutes=1),
                    Period=3600, Statistics=["SampleCount"])
    assert sum(p["SampleCount"] for p in stats["Datapoints"]) == 400.0


def _error(status, headers, body, cbor):
    parsed = cbor.parser.parse({"status_code": status, "headers": headers, "body": body}, None)
    raw = cbor.parser.parse_data_item(cbor.parser.get_peekable_stream_from_bytes(body))
    return parsed["Error"], raw


def test_resource_not_found_is_a_cbor_error(cbor):
    status, headers, parsed = cbor.call("SetAlarmState", AlarmName=f"missing-{uuid.uuid4().hex[:6]}",
                                        StateValue="ALARM", StateReason="x")
    assert status == 404
    assert headers["smithy-protocol"] == "rpc-v2-cbor" and headers["content-type"] == "application/cbor"
    assert parsed["Error"]["Code"] == "ResourceNotFound"
    assert headers["x-amzn-query-error"] == "ResourceNotFound;Sender"


def test_unknown_operation_and_bad_parameters(cbor):
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeEverything", b"\xa0")
    err, raw = _error(status, headers, body, cbor)
    assert status == 404 and raw["__type"] == "UnknownOperationException"
    assert headers["smithy-protocol"] == "rpc-v2-cbor"

    # a member of the wrong CBOR type (AlarmNames as a text string, not an array)
    enc = cbor.encoder
    bad = bytearray()
    enc._serialize_type_structure(bad, {"AlarmNames": "x"}, _loose(cbor, {"AlarmNames": "string"}), None)
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeAlarms", bytes(bad))
    err, raw = _error(status, headers, body, cbor)
    assert status == 400 and raw["__type"] == "SerializationException", raw
    assert err["Code"] == "SerializationException"

    # not CBOR at all
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeAlarms", b"\xff\x00garbage")
    err, raw = _error(status, headers, body, cbor)
    assert status == 400 and raw["__type"] == "SerializationException"

    # a required member missing: AWS's validation error
    op = cbor.model.operation_model("PutMetricAlarm")
    body = bytearray()
    enc._serialize_data_item(body, {"EvaluationPeriods": 1, "ComparisonOperator": "GreaterThanThreshold"},
                             op.input_shape)
    status, headers, body = cbor.raw(CBOR_PATH + "PutMetricAlarm", bytes(body))
    err, raw = _error(status, headers, body, cbor)
    assert status == 400
    assert raw["__type"] == "com.amazonaws.cloudwatch#ValidationException"
    assert err["Code"] == "ValidationError"
    assert "Value null at 'alarmName' failed to satisfy constraint: Member must not be null" in raw["message"]

    # members the model does not know are ignored
    body = bytearray()
    enc._serialize_type_structure(body, {"NoSuchMember": "x"}, _loose(cbor, {"NoSuchMember": "string"}), None)
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeAlarms", bytes(body))
    assert status == 200, body

    # an operation moto 5.2.5 does not implement: a CBOR InternalFailure, not an HTML page
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeAnomalyDetectors", b"\xbf\xff")
    err, raw = _error(status, headers, body, cbor)
    assert status == 500 and raw["__type"] == "InternalFailure" and "moto" in raw["message"]
    assert headers["x-amzn-query-error"] == "InternalFailure;Receiver"

    # RPC v2 is POST only
    status, headers, body = cbor.raw(CBOR_PATH + "DescribeAlarms", b"", method="GET")
    assert status == 405


def _loose(cbor, members: dict):
    """A structure shape with the given members (to build requests the real model forbids)."""
    from botocore.model import ShapeResolver, StructureShape

    shapes = {"S": {"type": "structure", "members": {k: {"shape": v} for k, v in members.items()}},
              "string": {"type": "string"}}
    return StructureShape("S", shapes["S"], ShapeResolver(shapes))


def test_faults_and_call_log_in_cbor(world, cbor):
    world.control("POST", "/_world/calls/reset")
    world.control("POST", "/_world/faults", {"seed": 1, "rules": [{"action": "monitoring:ListMetrics", "throttle": 1}]})
    try:
        status, headers, parsed = cbor.call("ListMetrics", Namespace="World/Cbor")
        assert status == 400 and parsed["Error"]["Code"] == "Throttling"
        assert headers["smithy-protocol"] == "rpc-v2-cbor"
    finally:
        world.control("DELETE", "/_world/faults")
    cbor.ok("ListMetrics", Namespace="World/Cbor")
    calls = world.control("GET", "/_world/calls?limit=10")[1]
    log = [(c["service"], c["action"], c["status"], c["fault"], c["mutating"]) for c in calls["calls"]]
    assert ("monitoring", "ListMetrics", 400, "throttle", False) in log
    assert ("monitoring", "ListMetrics", 200, None, False) in log


def _text(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 256
    return (bytes([0x60 | len(b)]) if len(b) < 24 else bytes([0x78, len(b)])) + b


def test_rust_sdk_encoding_indefinite_maps(cbor):
    """The AWS SDK for Rust writes every structure as an indefinite-length map (0xbf ... 0xff),
    lists with their length, timestamps as tag 1 around a float64, doubles as float64."""
    import struct

    name = f"cbor-rust-{uuid.uuid4().hex[:8]}"
    body = (b"\xbf" + _text("AlarmName") + _text(name) + _text("Namespace") + _text("World/Cbor")
            + _text("MetricName") + _text("Errors") + _text("Statistic") + _text("Sum")
            + _text("Period") + b"\x18\x3c" + _text("EvaluationPeriods") + b"\x01"
            + _text("Threshold") + b"\xfb" + struct.pack(">d", 2.5)
            + _text("ComparisonOperator") + _text("GreaterThanThreshold") + b"\xff")
    status, headers, out = cbor.raw(CBOR_PATH + "PutMetricAlarm", body)
    assert status == 200, out
    status, headers, out = cbor.raw(CBOR_PATH + "DescribeAlarms",
                                    b"\xbf" + _text("AlarmNames") + b"\x81" + _text(name) + b"\xff")
    assert status == 200
    raw = cbor.parser.parse_data_item(cbor.parser.get_peekable_stream_from_bytes(out))
    [alarm] = raw["MetricAlarms"]
    assert alarm["Threshold"] == 2.5 and alarm["Period"] == 60
    assert out.count(b"\xc1\xfb") >= 2  # timestamps: tag 1 + float64, as the Rust decoder reads them
    status, headers, out = cbor.raw(CBOR_PATH + "DescribeAlarms", b"\xbf\xff")  # no input members
    assert status == 200 and out[:1] in (b"\xa1", b"\xa2", b"\xa0")
