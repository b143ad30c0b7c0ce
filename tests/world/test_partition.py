"""One caller cut off (a partitioned daemon): `POST /_world/partitions` / `scripts/world
partition AKID` drop every call signed with that access key id, for every service, while
other keys work; the call log tells attempted from served calls (`served`, `fault`) and lists
them from a time on (`since=`)."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlencode

import pytest
from botocore.exceptions import ClientError


def no_answer(fn) -> str:
    """`fn()` must fail without an AWS answer (connection closed); returns the error's type."""
    with pytest.raises(Exception) as ei:
        fn()
    assert not isinstance(ei.value, ClientError), ei.value
    return type(ei.value).__name__


def calls(world, **q) -> dict:
    code, res = world.control("GET", f"/_world/calls?{urlencode(q)}")
    assert code == 200, res
    return res


@pytest.fixture
def heal(world):
    yield
    world.control("DELETE", "/_world/partitions")


def clients(world, key: str):
    return {s: world.client(s, retries=1, access_key=key) for s in ("ec2", "sqs", "dynamodb", "sts", "autoscaling")}


def test_drop_rule_for_one_key_is_a_partition_only_while_no_rule_is_more_specific(world, faults):
    """The probe: `{"action": "*", "drop": 1.0, "access_key": K}` drops every call of K in
    every service, but the most specific rule wins, so a rule naming an action (for every key)
    takes K's calls of that action out of the drop: not a complete partition. Hence
    `/_world/partitions`."""
    k = f"AKIDP{uuid.uuid4().hex[:8].upper()}"
    c = clients(world, k)
    faults({"seed": 1, "rules": [{"action": "*", "drop": 1.0, "access_key": k}]})
    for fn in (c["ec2"].describe_vpcs, c["sqs"].list_queues, c["dynamodb"].list_tables,
               c["sts"].get_caller_identity, c["autoscaling"].describe_auto_scaling_groups):
        no_answer(fn)
    faults({"seed": 1, "rules": [{"action": "*", "drop": 1.0, "access_key": k},
                                 {"action": "ec2:DescribeVpcs", "latency_ms": 1}]})
    c["ec2"].describe_vpcs()  # served: the partition leaks
    no_answer(c["ec2"].describe_subnets)


def test_partition_cuts_one_key_off_and_the_log_tells_served_from_attempted(world, faults, heal):
    cut = f"AKIDCUT{uuid.uuid4().hex[:8].upper()}"
    ok = f"AKIDOK{uuid.uuid4().hex[:8].upper()}"
    cc, oc = clients(world, cut), clients(world, ok)
    q = oc["sqs"].create_queue(QueueName=f"part-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    # before: the cut key works, including a mutating call
    cc["sqs"].send_message(QueueUrl=q, MessageBody="before")
    # a more specific rule (for every key) does not leak through a partition
    faults({"seed": 3, "rules": [{"action": "sqs:SendMessage", "latency_ms": 1}]})
    code, res = world.control("POST", "/_world/partitions", {"access_key": cut})
    assert code == 200 and cut in res["partitions"]
    t_cut = res["partitions"][cut]
    assert abs(t_cut - time.time()) < 5
    # every service, reads and writes: no answer
    for fn in (cc["ec2"].describe_vpcs, cc["sts"].get_caller_identity, cc["dynamodb"].list_tables,
               lambda: cc["sqs"].send_message(QueueUrl=q, MessageBody="during"),
               lambda: cc["ec2"].create_tags(Resources=[world.env["WORLD_VPC_ID"]], Tags=[{"Key": "k", "Value": "v"}]),
               lambda: cc["autoscaling"].describe_auto_scaling_groups()):
        no_answer(fn)
    # another key works meanwhile
    oc["ec2"].describe_vpcs()
    oc["sqs"].send_message(QueueUrl=q, MessageBody="other")
    # nothing the cut key sent during the partition arrived
    bodies = []
    while True:
        r = oc["sqs"].receive_message(QueueUrl=q, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        if "Messages" not in r:
            break
        for m in r["Messages"]:
            bodies.append(m["Body"])
            oc["sqs"].delete_message(QueueUrl=q, ReceiptHandle=m["ReceiptHandle"])
    assert sorted(bodies) == ["before", "other"]

    # the log: the attempts are there, attributed to the key, none served
    served = calls(world, access_key=cut, since=t_cut, served="true", limit=100000)
    assert served["calls"] == []
    served_mut = calls(world, access_key=cut, since=t_cut, mutating="true", served="true", limit=100000)
    assert served_mut["calls"] == []
    tried = calls(world, access_key=cut, since=t_cut, mutating="true", limit=100000)["calls"]
    assert {(c["service"], c["action"]) for c in tried} >= {("sqs", "SendMessage"), ("ec2", "CreateTags")}
    assert all(c["fault"] == "partition" and c["status"] == "dropped" and c["served"] is False for c in tried)
    # before the cut, the same key's SendMessage was served
    before = calls(world, access_key=cut, mutating="true", served="true", limit=100000)["calls"]
    assert [c["action"] for c in before] == ["SendMessage"] and before[0]["t"] < t_cut
    assert calls(world, access_key=cut, limit=0)["faults_injected"].get("partition", 0) >= 6
    # the other key's calls are served
    assert all(c["served"] for c in calls(world, access_key=ok, since=t_cut, limit=100000)["calls"])

    # healed: the key works again (and the fault spec was never involved)
    code, res = world.control("DELETE", f"/_world/partitions/{cut}")
    assert code == 200 and res["partitions"] == {}
    cc["sqs"].send_message(QueueUrl=q, MessageBody="after")
    assert [c["action"] for c in calls(world, access_key=cut, mutating="true", served="true",
                                        since=t_cut, limit=100)["calls"]] == ["SendMessage"]
    oc["sqs"].delete_queue(QueueUrl=q)


def test_lost_answers_count_as_served(world, faults):
    """`lose` serves the call, then drops the answer: the log says served (it took effect)."""
    k = f"AKIDLOSE{uuid.uuid4().hex[:8].upper()}"
    c = world.client("sqs", retries=1, access_key=k)
    t = time.time()
    faults({"seed": 2, "rules": [{"action": "sqs:CreateQueue", "lose": 1.0, "access_key": k}]})
    name = f"lose-{uuid.uuid4().hex[:8]}"
    no_answer(lambda: c.create_queue(QueueName=name))
    entry = calls(world, access_key=k, since=t, limit=10)["calls"]
    assert entry and {(e["action"], e["fault"], e["served"]) for e in entry} == {("CreateQueue", "lose", True)}
    world.client("sqs").delete_queue(QueueUrl=world.client("sqs").get_queue_url(QueueName=name)["QueueUrl"])


def test_calls_since_filter(world):
    k = f"AKIDSINCE{uuid.uuid4().hex[:8].upper()}"
    ec2 = world.client("ec2", access_key=k)
    ec2.describe_vpcs()
    t = time.time()
    ec2.describe_subnets()
    got = calls(world, access_key=k, since=t)["calls"]
    assert [c["action"] for c in got] == ["DescribeSubnets"]
    assert calls(world, access_key=k)["total"] == 2  # the counts are not filtered
    assert world.control("GET", "/_world/calls?since=yesterday")[0] == 400
    assert world.control("GET", "/_world/calls?served=maybe")[0] == 400


def test_cli_partition(world, heal):
    k = f"AKIDCLI{uuid.uuid4().hex[:8].upper()}"
    p = world.cli("partition", k)
    assert p.returncode == 0 and f"{k}: cut off since" in p.stdout, p.stderr
    no_answer(world.client("ec2", retries=1, access_key=k).describe_vpcs)
    p = world.cli("partition")
    assert p.returncode == 0 and k in p.stdout
    p = world.cli("calls", "--access-key", k, "--served", "false", "--since", "0", "--limit", "5")
    assert p.returncode == 0 and "fault=partition" in p.stdout, p.stdout
    p = world.cli("partition", k, "--clear")
    assert p.returncode == 0 and "no caller is partitioned" in p.stdout
    world.client("ec2", retries=1, access_key=k).describe_vpcs()
    assert world.control("POST", "/_world/partitions", {"access_key": ""})[0] == 400
