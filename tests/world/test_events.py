"""EC2 interruption events (bakeryworld/events.py): `scripts/world interrupt` and
`POST /_world/instances/<id>/interrupt` put the event on the queues EventBridge rules route it
to, shaped as EventBridge delivers it, and the instance ends after its notice."""

from __future__ import annotations

import email.utils
import json
import re
import time
import uuid

import pytest

from conftest import wait_for


@pytest.fixture(scope="module")
def sqs(world):
    return world.client("sqs")


@pytest.fixture
def queue(sqs):
    url = sqs.create_queue(QueueName=f"ev-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    yield url
    sqs.delete_queue(QueueUrl=url)


def interrupt(world, iid: str, **body):
    code, res = world.control("POST", f"/_world/instances/{iid}/interrupt", body)
    assert code == 200, res
    return res


def receive_event(sqs, url: str, event_id: str, count: int = 1, timeout: float = 10) -> list[dict]:
    """The `count` messages carrying event `event_id` (deleted from the queue), parsed."""
    got: list[dict] = []
    deadline = time.time() + timeout
    while len(got) < count and time.time() < deadline:
        r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for m in r.get("Messages", []):
            ev = json.loads(m["Body"])
            if ev.get("id") == event_id:
                got.append(ev)
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert len(got) == count, f"{len(got)} of {count} message(s) of event {event_id} in {timeout}s"
    return got


def instance(ec2, iid: str) -> dict:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def wait_state(ec2, iid: str, state: str, timeout: float = 20) -> float:
    """Poll until the instance is in `state`; returns the time it was first seen so."""
    wait_for(lambda: instance(ec2, iid)["State"]["Name"] == state, timeout=timeout, interval=0.05,
             what=f"{iid} {state}")
    return time.time()


def running(ec2, launch):
    b = launch()
    wait_state(ec2, b.id, "running")
    return b


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_spot_event_via_the_world_rule_then_terminated_after_notice(world, ec2, sqs, launch):
    b = running(ec2, launch)
    t0 = time.time()
    res = interrupt(world, b.id, kind="spot", notice=3)
    assert res["kind"] == "spot" and res["end_action"] == "terminate"
    assert res["notice_s"] == 3 and abs(res["ends_at"] - (t0 + 3)) < 1.0
    # delivered by the world's EventBridge rule to the world's queue
    assert {"queue": "bakery-world-events", "rule": world.env["WORLD_EVENTS_RULE"]}.items() <= res["delivered_to"][0].items()
    ev = receive_event(sqs, world.env["WORLD_EVENTS_QUEUE_URL"], res["event_id"])[0]
    assert list(ev) == ["version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"]
    assert ev["version"] == "0" and ev["source"] == "aws.ec2"
    assert ev["detail-type"] == "EC2 Spot Instance Interruption Warning"
    assert ev["account"] == "123456789012" and ev["region"] == "us-east-1"
    assert ISO.match(ev["time"]), ev["time"]
    assert ev["resources"] == [f"arn:aws:ec2:us-east-1:123456789012:instance/{b.id}"]
    assert ev["detail"] == {"instance-id": b.id, "instance-action": "terminate"}
    # running during the notice, terminated by the Spot service after it
    assert instance(ec2, b.id)["State"]["Name"] == "running"
    ended = wait_state(ec2, b.id, "terminated", timeout=15)
    assert ended >= res["ends_at"] - 0.05, (ended, res["ends_at"])
    assert ended <= res["ends_at"] + 3.0
    i = instance(ec2, b.id)
    assert i["StateReason"]["Code"] == "Server.SpotInstanceTermination"
    # and its body is gone
    wait_for(lambda: world.control("GET", f"/_world/instances/{b.id}")[1].get("body") is None,
             timeout=10, what="the body to go")
    rec = [r for r in world.control("GET", "/_world/events")[1]["events"] if r["event_id"] == res["event_id"]][0]
    assert rec["outcome"] == "terminated"


def test_interrupt_factor_scales_the_two_minute_notice(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    code, cfg = world.control("POST", "/_world/events/config", {"interrupt_factor": 0.02})
    assert code == 200 and cfg["spot_notice_s"] == pytest.approx(2.4)
    try:
        res = interrupt(world, b.id, kind="spot", queue=queue)
    finally:
        world.control("POST", "/_world/events/config", {"interrupt_factor": float(world.env["WORLD_INTERRUPT_FACTOR"])})
    assert res["notice_s"] == pytest.approx(2.4)
    assert res["delivered_to"] == [{"queue": queue.rsplit("/", 1)[-1], "rule": None, "message_ids": res["delivered_to"][0]["message_ids"]}]
    receive_event(sqs, queue, res["event_id"])
    ended = wait_state(ec2, b.id, "terminated", timeout=15)
    assert res["ends_at"] - 0.05 <= ended <= res["ends_at"] + 3.0


def test_spot_stop_action(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    res = interrupt(world, b.id, kind="spot", action="stop", notice=1, queue=queue)
    ev = receive_event(sqs, queue, res["event_id"])[0]
    assert ev["detail"]["instance-action"] == "stop"
    wait_state(ec2, b.id, "stopped", timeout=15)
    assert instance(ec2, b.id)["StateReason"]["Code"] == "Server.SpotInstanceShutdown"


def test_rebalance_recommendation_does_not_end_the_instance(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    res = interrupt(world, b.id, kind="rebalance", queue=queue)
    assert res["ends_at"] is None and res["end_action"] is None and res["outcome"] == "no end"
    ev = receive_event(sqs, queue, res["event_id"])[0]
    assert ev["source"] == "aws.ec2" and ev["detail-type"] == "EC2 Instance Rebalance Recommendation"
    assert ev["detail"] == {"instance-id": b.id}
    assert ev["resources"] == [f"arn:aws:ec2:us-east-1:123456789012:instance/{b.id}"]
    # with a notice, it is followed by the interruption
    res = interrupt(world, b.id, kind="rebalance", queue=queue, notice=1)
    assert res["end_action"] == "terminate"
    wait_state(ec2, b.id, "terminated", timeout=15)


def test_scheduled_retirement_stops_at_start_time(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    res = interrupt(world, b.id, kind="scheduled", notice=2, queue=queue)
    assert res["end_action"] == "stop"
    ev = receive_event(sqs, queue, res["event_id"])[0]
    assert ev["source"] == "aws.health" and ev["detail-type"] == "AWS Health Event"
    assert ev["resources"] == [b.id]
    d = ev["detail"]
    assert d["service"] == "EC2" and d["eventTypeCategory"] == "scheduledChange"
    assert d["eventTypeCode"] == "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED"
    assert d["affectedEntities"] == [{"entityValue": b.id}]
    assert d["eventArn"].startswith("arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/")
    start = email.utils.parsedate_to_datetime(d["startTime"])  # "Sat, 05 Jun 2021 15:10:09 GMT"
    assert d["startTime"].endswith(" GMT")
    assert abs(start.timestamp() - res["ends_at"]) < 1.0
    assert d["eventDescription"][0]["language"] == "en_US"
    assert instance(ec2, b.id)["State"]["Name"] == "running"
    ended = wait_state(ec2, b.id, "stopped", timeout=15)
    assert ended >= res["ends_at"] - 0.05
    assert instance(ec2, b.id)["StateReason"]["Code"] == "Server.ScheduledStop"


def test_duplicate_delivery_ends_once(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    res = interrupt(world, b.id, kind="spot", notice=1, queue=queue, repeat=3)
    assert len(res["delivered_to"][0]["message_ids"]) == 3
    evs = receive_event(sqs, queue, res["event_id"], count=3)
    assert evs[0] == evs[1] == evs[2]  # the same event (same id) three times
    wait_state(ec2, b.id, "terminated", timeout=15)
    rec = wait_for(lambda: [r for r in world.control("GET", "/_world/events")[1]["events"]
                            if r["event_id"] == res["event_id"] and r["outcome"]], timeout=5)
    assert rec[0]["outcome"] == "terminated"


def test_rules_route_like_eventbridge(world, ec2, sqs, queue, launch):
    """A rule of the caller's own (pattern on the instance id) gets the event; a rule whose
    pattern does not match and a disabled rule do not."""
    b = running(ec2, launch)
    events = world.client("events")
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    other = sqs.create_queue(QueueName=f"ev-other-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    names = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        events.put_rule(Name=names[0], EventPattern=json.dumps(
            {"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"], "detail": {"instance-id": [b.id]}}))
        events.put_targets(Rule=names[0], Targets=[{"Id": "mine", "Arn": arn}])
        events.put_rule(Name=names[1], EventPattern=json.dumps({"source": ["aws.health"]}))
        events.put_targets(Rule=names[1], Targets=[{"Id": "other", "Arn": other_arn}])
        events.put_rule(Name=names[2], EventPattern=json.dumps({"source": ["aws.ec2"]}), State="DISABLED")
        events.put_targets(Rule=names[2], Targets=[{"Id": "off", "Arn": other_arn}])
        res = interrupt(world, b.id, kind="spot", notice=30)
        rules = {d["rule"] for d in res["delivered_to"]}
        assert rules == {names[0], world.env["WORLD_EVENTS_RULE"]}
        receive_event(sqs, queue, res["event_id"])
        receive_event(sqs, world.env["WORLD_EVENTS_QUEUE_URL"], res["event_id"])
        assert "Messages" not in sqs.receive_message(QueueUrl=other, WaitTimeSeconds=0)
    finally:
        for n in names:
            ids = [t["Id"] for t in events.list_targets_by_rule(Rule=n)["Targets"]]
            if ids:
                events.remove_targets(Rule=n, Ids=ids)
            events.delete_rule(Name=n)
        sqs.delete_queue(QueueUrl=other)


def test_bad_requests(world, ec2, launch):
    b = running(ec2, launch)
    code, res = world.control("POST", "/_world/instances/i-0123456789abcdef0/interrupt", {"kind": "spot"})
    assert code == 404
    for body, field in (({"kind": "meteor"}, "kind"), ({"kind": "spot", "notice": -1}, "notice"),
                        ({"kind": "spot", "repeat": 0}, "repeat"), ({"kind": "rebalance", "action": "stop"}, "action"),
                        ({"kind": "spot", "queue": "no-such-queue"}, "queue"), ({"kind": "spot", "colour": 1}, "colour")):
        code, res = world.control("POST", f"/_world/instances/{b.id}/interrupt", body)
        assert code == 400 and field in res["error"], (body, res)
    # the other instance verbs still work beside the interrupt route
    assert world.control("POST", "/_world/instances/i-0123456789abcdef0/kill")[0] == 404
    ec2.terminate_instances(InstanceIds=[b.id])
    wait_state(ec2, b.id, "terminated")
    assert world.control("POST", f"/_world/instances/{b.id}/interrupt", {"kind": "spot"})[0] == 409


def test_cli_interrupt(world, ec2, sqs, queue, launch):
    b = running(ec2, launch)
    p = world.cli("interrupt", b.id, "--kind", "rebalance", "--queue", queue, "--repeat", "2", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert len(receive_event(sqs, queue, res["event_id"], count=2)) == 2
    p = world.cli("interrupt", b.id, "--kind", "spot", "--notice", "1", "--queue", queue.rsplit("/", 1)[-1])
    assert p.returncode == 0, p.stderr
    assert "spot event" in p.stdout and "terminate at" in p.stdout
    wait_state(ec2, b.id, "terminated", timeout=15)
    p = world.cli("interrupt", "i-0123456789abcdef0")
    assert p.returncode == 2 and "no instance" in p.stderr
