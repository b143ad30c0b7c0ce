"""CloudWatch in the world (bakeryworld/cloudwatch.py): load balancer metrics published from the
health checker, and metric alarms that evaluate, through the CloudWatch API.

The session world publishes every second (`--metric-period 1`); alarms use AWS's smallest
period, 10 s, so a state change takes one to two periods.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from conftest import wait_for
from test_health import elbv2_client, health_of, make_target_group

PERIOD = 10

# /healthz answers 200, /boom answers 500: one target group of each kind on the same instance.
APP = """#!/bin/sh
mkdir -p /opt/app
cat > /opt/app/app.py <<'EOF'
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = {"/healthz": 200, "/boom": 500}.get(self.path, 404)
        self.send_response(code); self.end_headers(); self.wfile.write(b"x")
    def log_message(self, *a): pass
http.server.HTTPServer((os.environ["BAKERY_WORLD_IP"], 8080), H).serve_forever()
EOF
exec python3 /opt/app/app.py
"""


def dims_of(tg: dict, lb_arn: str, az: str | None = None) -> list[dict[str, str]]:
    d = [
        {"Name": "TargetGroup", "Value": tg["TargetGroupArn"].split(":")[-1]},
        {"Name": "LoadBalancer", "Value": lb_arn.split(":loadbalancer/")[1]},
    ]
    if az:
        d.append({"Name": "AvailabilityZone", "Value": az})
    return d


def stats(cw, name, dims, stat, seconds=180):
    """The statistic of the last `seconds` (one 60 s period: one value, or none)."""
    now = datetime.now(timezone.utc)
    r = cw.get_metric_statistics(
        Namespace="AWS/ApplicationELB", MetricName=name, Dimensions=dims,
        StartTime=now - timedelta(seconds=seconds), EndTime=now + timedelta(minutes=1),
        Period=60, Statistics=[stat],
    )
    return [p[stat] for p in r["Datapoints"]]


def alarm_of(cw, name):
    return cw.describe_alarms(AlarmNames=[name])["MetricAlarms"][0]


def state_of(cw, name):
    return alarm_of(cw, name)["StateValue"]


@pytest.fixture(scope="module")
def cw(world):
    return world.client("cloudwatch")


@pytest.fixture(scope="module")
def fleet(world, ec2):
    """One instance serving /healthz (200) and /boom (500), in two target groups behind ALBs."""
    elb = elbv2_client(world)
    ok = make_target_group(world, elb)
    bad = make_target_group(world, elb, path="/boom")
    inst = ec2.run_instances(
        ImageId=world.env["WORLD_BASE_AMI"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
        SubnetId=world.env["WORLD_PRIVATE_SUBNETS"].split(",")[0],
        UserData=APP,  # boto3 base64-encodes RunInstances user data itself
    )["Instances"][0]
    iid = inst["InstanceId"]
    for tg in (ok, bad):
        elb.register_targets(TargetGroupArn=tg["TargetGroupArn"], Targets=[{"Id": iid}])
    wait_for(lambda: (health_of(elb, ok["TargetGroupArn"], iid) or {}).get("State") == "healthy",
             timeout=40, what="healthy in the /healthz group")
    wait_for(lambda: (health_of(elb, bad["TargetGroupArn"], iid) or {}).get("State") == "unhealthy",
             timeout=20, what="unhealthy in the /boom group")
    yield {
        "elb": elb, "ok": ok, "bad": bad, "iid": iid, "az": inst["Placement"]["AvailabilityZone"],
        "ok_lb": ok_lb(elb, ok), "bad_lb": ok_lb(elb, bad),
    }
    ec2.terminate_instances(InstanceIds=[iid])


def ok_lb(elb, tg):
    return elb.describe_target_groups(TargetGroupArns=[tg["TargetGroupArn"]])["TargetGroups"][0]["LoadBalancerArns"][0]


# ------------------------------------------------------------------------------ the rules


def _row(text: str) -> list[bool | None]:
    """A row of the user guide's tables, oldest first, as `decide` takes it (newest first)."""
    return [{"0": False, "X": True, "-": None}[c] for c in text.split()][::-1]


# CloudWatch user guide, "How alarm state is evaluated when data is missing": Evaluation
# Periods 3, the 5 most recent datapoints; columns MISSING, IGNORE, BREACHING, NOT BREACHING.
GUIDE = [
    (3, "0 - X - X", "OK", "OK", "OK", "OK"),
    (3, "0 - - - -", "OK", "OK", "OK", "OK"),
    (3, "- - - - -", "INSUFFICIENT_DATA", "keep", "ALARM", "OK"),
    (3, "0 X X - X", "ALARM", "ALARM", "ALARM", "ALARM"),
    (3, "- - - - X", "INSUFFICIENT_DATA", "keep", "ALARM", "OK"),
    (3, "X - - - -", "ALARM", "keep", "ALARM", "OK"),
    (2, "0 - X - X", "ALARM", "ALARM", "ALARM", "ALARM"),
    (2, "0 0 X 0 X", "ALARM", "ALARM", "ALARM", "ALARM"),
    (2, "0 - X - -", "OK", "OK", "ALARM", "OK"),
    (2, "- - - - 0", "OK", "OK", "ALARM", "OK"),
    (2, "- - - - X", "INSUFFICIENT_DATA", "keep", "ALARM", "OK"),
]


@pytest.mark.parametrize("m,points,missing,ignore,breaching,not_breaching", GUIDE)
def test_evaluation_follows_the_user_guide_tables(m, points, missing, ignore, breaching, not_breaching):
    from bakeryworld.cloudwatch import decide

    for tmd, want in (("missing", missing), ("ignore", ignore), ("breaching", breaching), ("notBreaching", not_breaching)):
        got = decide(_row(points), 3, m, tmd, "keep")
        assert got == want, (points, m, tmd)


# ------------------------------------------------------------------------------ metrics


def test_target_group_host_counts_are_published_per_group_and_zone(world, cw, fleet):
    ok, bad, az = fleet["ok"], fleet["bad"], fleet["az"]
    # Published every second: the healthy target shows up within a metric period or two.
    wait_for(lambda: max(stats(cw, "HealthyHostCount", dims_of(ok, fleet["ok_lb"]), "Maximum") or [0]) == 1.0,
             timeout=10, what="HealthyHostCount 1")

    def now_is(name, dims, value):  # every datapoint of the last 3 s
        return wait_for(lambda: stats(cw, name, dims, "Minimum", seconds=3) == [value]
                        and stats(cw, name, dims, "Maximum", seconds=3) == [value],
                        timeout=6, what=f"{name} {value}")

    # Now: the /healthz group has no unhealthy host (its checks failed before the app was up),
    # the /boom group has one.
    now_is("UnHealthyHostCount", dims_of(ok, fleet["ok_lb"]), 0.0)
    now_is("UnHealthyHostCount", dims_of(bad, fleet["bad_lb"]), 1.0)
    # Per zone: the instance's zone counts it, the load balancer's other zone does not.
    zones = {s["AvailabilityZone"] for s in world.client("ec2").describe_subnets(
        SubnetIds=world.env["WORLD_PUBLIC_SUBNETS"].split(","))["Subnets"]}
    assert az in zones and len(zones) == 2
    now_is("HealthyHostCount", dims_of(ok, fleet["ok_lb"], az), 1.0)
    (other,) = zones - {az}
    assert stats(cw, "HealthyHostCount", dims_of(ok, fleet["ok_lb"], other), "Maximum") == [0.0]
    # AWS matches the exact dimension set: nothing is published for TargetGroup alone.
    assert stats(cw, "HealthyHostCount", dims_of(ok, fleet["ok_lb"])[:1], "Maximum") == []
    # ListMetrics: each metric once (the group's, and one per zone of its load balancer).
    listed = cw.list_metrics(Namespace="AWS/ApplicationELB", MetricName="HealthyHostCount",
                             Dimensions=[dims_of(ok, fleet["ok_lb"])[0]])["Metrics"]
    assert sorted(len(m["Dimensions"]) for m in listed) == [2, 3, 3]


def test_5xx_answers_of_the_health_checks_are_counted(world, cw, fleet):
    bad, ok, az = fleet["bad"], fleet["ok"], fleet["az"]
    lb = fleet["bad_lb"]
    fives = wait_for(lambda: stats(cw, "HTTPCode_Target_5XX_Count", dims_of(bad, lb), "Sum"),
                     timeout=10, what="5xx datapoints")
    assert sum(fives) >= 2  # one per check, every second
    assert sum(stats(cw, "HTTPCode_Target_5XX_Count", dims_of(bad, lb, az), "Sum")) >= 2
    assert sum(stats(cw, "HTTPCode_Target_5XX_Count", [dims_of(bad, lb)[1]], "Sum")) >= 2
    # Only non-zero counts are reported, as AWS does: the 200 group has no 5xx metric at all.
    assert stats(cw, "HTTPCode_Target_5XX_Count", dims_of(ok, fleet["ok_lb"]), "Sum") == []


# ------------------------------------------------------------------------------ alarms


def put_host_alarm(cw, fleet, name, **kw):
    args = dict(
        AlarmName=name, Namespace="AWS/ApplicationELB", MetricName="HealthyHostCount",
        Dimensions=dims_of(fleet["ok"], fleet["ok_lb"]), Statistic="Minimum", Period=PERIOD,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="LessThanThreshold",
    )
    args.update(kw)
    cw.put_metric_alarm(**args)


def test_alarm_starts_insufficient_data_then_is_evaluated(world, cw, fleet):
    name = f"hosts-{uuid.uuid4().hex[:8]}"
    put_host_alarm(cw, fleet, name)
    a = alarm_of(cw, name)
    assert (a["StateValue"], a["StateReason"]) == ("INSUFFICIENT_DATA", "Unchecked: Initial alarm creation")
    ok = wait_for(lambda: (a := alarm_of(cw, name))["StateValue"] == "OK" and a, timeout=2 * PERIOD + 3, what="OK")
    assert ok["StateReason"].startswith("Threshold Crossed: 1 out of the last 1 datapoints [1.0 ("), ok["StateReason"]
    assert ok["StateUpdatedTimestamp"] > a["StateUpdatedTimestamp"]
    # An update keeps the state ("its state is left unchanged").
    put_host_alarm(cw, fleet, name, AlarmDescription="updated")
    a = alarm_of(cw, name)
    assert (a["StateValue"], a["AlarmDescription"]) == ("OK", "updated")
    # Newest first. The first evaluation may have seen the seconds before the target was
    # healthy (then it went to ALARM first, and to OK a period later).
    summaries = [h["HistorySummary"] for h in cw.describe_alarm_history(AlarmName=name)["AlarmHistoryItems"]]
    assert summaries[0] == f'Alarm "{name}" updated' and summaries[-1] == f'Alarm "{name}" created'
    assert summaries[1].endswith(" to OK") and summaries[-2].startswith("Alarm updated from INSUFFICIENT_DATA to ")
    only_states = cw.describe_alarm_history(AlarmName=name, HistoryItemType="StateUpdate")["AlarmHistoryItems"]
    assert {h["HistoryItemType"] for h in only_states} == {"StateUpdate"} and len(only_states) == len(summaries) - 2
    cw.delete_alarms(AlarmNames=[name])


def test_treat_missing_data_decides_an_alarm_without_datapoints(world, cw):
    case = uuid.uuid4().hex[:8]
    names = {tmd: f"missing-{tmd}-{case}" for tmd in ("missing", "breaching", "notBreaching", "ignore")}
    for tmd, name in names.items():
        cw.put_metric_alarm(
            AlarmName=name, Namespace="World/Test", MetricName="NeverReported",
            Dimensions=[{"Name": "Case", "Value": case}], Statistic="Sum", Period=PERIOD,
            EvaluationPeriods=2, Threshold=1, ComparisonOperator="GreaterThanThreshold", TreatMissingData=tmd,
        )
    wait_for(lambda: state_of(cw, names["breaching"]) == "ALARM", timeout=5, what="breaching -> ALARM")
    wait_for(lambda: state_of(cw, names["notBreaching"]) == "OK", timeout=5, what="notBreaching -> OK")
    # Evaluated too (same tick), and left as they were: no data is INSUFFICIENT_DATA, and
    # `ignore` keeps the current state.
    assert state_of(cw, names["missing"]) == "INSUFFICIENT_DATA"
    assert state_of(cw, names["ignore"]) == "INSUFFICIENT_DATA"
    cw.delete_alarms(AlarmNames=list(names.values()))


def test_statistics_thresholds_and_m_out_of_n_over_custom_datapoints(world, cw):
    """PutMetricData into the last three complete 10 s periods, then alarms on them."""
    # Stay clear of a period boundary: the evaluation (within a second) must see the same periods.
    wait_for(lambda: PERIOD - time.time() % PERIOD > 3, timeout=PERIOD, interval=0.2, what="mid-period")
    end = math.floor(time.time() / PERIOD) * PERIOD
    case = uuid.uuid4().hex[:8]
    dims = [{"Name": "Case", "Value": case}]

    def at(i: int, value: float) -> dict:  # period i = 0 is the newest complete one
        ts = datetime.fromtimestamp(end - i * PERIOD - PERIOD / 2, timezone.utc)
        return {"MetricName": "Load", "Dimensions": dims, "Timestamp": ts, "Value": value}

    cw.put_metric_data(Namespace="World/Test", MetricData=[at(0, 2.0), at(0, 8.0), at(1, 1.0), at(2, 7.0), at(2, 7.0)])
    cases = {
        # statistic, operator, threshold, N, M -> state; periods newest first: [2,8], [1], [7,7]
        "sum": ("Sum", "GreaterThanThreshold", 9.0, 1, 1, "ALARM"),          # 10 > 9
        "avg": ("Average", "GreaterThanOrEqualToThreshold", 5.0, 1, 1, "ALARM"),  # 5 >= 5
        "min": ("Minimum", "GreaterThanThreshold", 4.0, 1, 1, "OK"),         # 2 > 4 no
        "max": ("Maximum", "LessThanThreshold", 8.0, 1, 1, "OK"),            # 8 < 8 no
        "count": ("SampleCount", "GreaterThanOrEqualToThreshold", 2.0, 1, 1, "ALARM"),
        "2of3": ("Maximum", "GreaterThanThreshold", 5.0, 3, 2, "ALARM"),     # 8, 1, 7: two breach
        "3of3": ("Maximum", "GreaterThanThreshold", 5.0, 3, 3, "OK"),
        "p50": ("p50", "LessThanOrEqualToThreshold", 2.0, 1, 1, "ALARM"),    # p50 of [2, 8] = 2
    }
    for key, (stat, op, threshold, n, m, _) in cases.items():
        kw = {"ExtendedStatistic": stat} if stat.startswith("p") else {"Statistic": stat}
        cw.put_metric_alarm(
            AlarmName=f"stat-{key}-{case}", Namespace="World/Test", MetricName="Load", Dimensions=dims,
            Period=PERIOD, EvaluationPeriods=n, DatapointsToAlarm=m, Threshold=threshold,
            ComparisonOperator=op, **kw,
        )
    names = [f"stat-{k}-{case}" for k in cases]
    wait_for(lambda: all(state_of(cw, n) != "INSUFFICIENT_DATA" for n in names), timeout=5, what="evaluated")
    got = {k: state_of(cw, f"stat-{k}-{case}") for k in cases}
    assert got == {k: v[-1] for k, v in cases.items()}
    reason = alarm_of(cw, f"stat-2of3-{case}")["StateReason"]
    assert reason.startswith("Threshold Crossed: 2 out of the last 3 datapoints [8.0 ("), reason
    assert "(minimum 2 datapoints for INSUFFICIENT_DATA -> ALARM transition)" in reason
    cw.delete_alarms(AlarmNames=names)


def test_set_alarm_state_lasts_until_the_next_evaluation(world, cw, fleet):
    name = f"set-{uuid.uuid4().hex[:8]}"
    put_host_alarm(cw, fleet, name)
    wait_for(lambda: state_of(cw, name) == "OK", timeout=2 * PERIOD + 3, what="OK")
    cw.set_alarm_state(AlarmName=name, StateValue="ALARM", StateReason="testing the page")
    a = alarm_of(cw, name)
    assert (a["StateValue"], a["StateReason"]) == ("ALARM", "testing the page")
    wait_for(lambda: state_of(cw, name) == "OK", timeout=PERIOD + 3, what="back to OK at the next evaluation")
    with pytest.raises(ClientError) as e:
        cw.set_alarm_state(AlarmName=f"no-such-{name}", StateValue="ALARM", StateReason="x")
    assert e.value.response["Error"]["Code"] == "ResourceNotFound"
    cw.delete_alarms(AlarmNames=[name])


def test_world_alarm_forces_a_state_that_holds_until_cleared(world, cw, fleet):
    name = f"forced-{uuid.uuid4().hex[:8]}"
    put_host_alarm(cw, fleet, name)
    wait_for(lambda: state_of(cw, name) == "OK", timeout=2 * PERIOD + 3, what="OK")
    p = world.cli("alarm", name, "ALARM")
    assert p.returncode == 0, p.stderr
    assert state_of(cw, name) == "ALARM"
    # It holds across evaluations (the metric says OK all along) ...
    deadline = time.time() + PERIOD + 2
    while time.time() < deadline:
        assert state_of(cw, name) == "ALARM"
        time.sleep(0.5)
    assert "forced" in world.cli("alarm").stdout
    # ... until cleared: then the next evaluation decides again.
    p = world.cli("alarm", name, "--clear")
    assert p.returncode == 0, p.stderr
    wait_for(lambda: state_of(cw, name) == "OK", timeout=PERIOD + 3, what="evaluated again")
    bad = world.cli("alarm", f"no-such-{name}", "OK")
    assert bad.returncode != 0 and "no alarm" in bad.stderr
    cw.delete_alarms(AlarmNames=[name])


def test_alarm_goes_to_alarm_when_the_fleet_loses_its_healthy_host(world, cw, fleet):
    """Last in the module: it kills the fleet's app."""
    name = f"down-{uuid.uuid4().hex[:8]}"
    put_host_alarm(cw, fleet, name)
    wait_for(lambda: state_of(cw, name) == "OK", timeout=2 * PERIOD + 3, what="OK")
    assert world.cli("kill", fleet["iid"]).returncode == 0
    wait_for(lambda: (health_of(fleet["elb"], fleet["ok"]["TargetGroupArn"], fleet["iid"]) or {}).get("State") == "unhealthy",
             timeout=10, what="target unhealthy")
    a = wait_for(lambda: (a := alarm_of(cw, name))["StateValue"] == "ALARM" and a, timeout=2 * PERIOD + 3, what="ALARM")
    assert a["StateReason"].startswith("Threshold Crossed: 1 out of the last 1 datapoints [0.0 ("), a["StateReason"]
    assert "was less than the threshold (1.0)" in a["StateReason"]
    summaries = [h["HistorySummary"] for h in cw.describe_alarm_history(AlarmName=name, ScanBy="TimestampAscending")["AlarmHistoryItems"]]
    assert summaries[0] == f'Alarm "{name}" created' and summaries[-1] == "Alarm updated from OK to ALARM"
    cw.delete_alarms(AlarmNames=[name])
