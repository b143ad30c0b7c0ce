"""SQS as bakery's daemon uses it (aws-sdk-sqs, JSON protocol; boto3 1.44.8 speaks it too):
receive EventBridge-delivered events by long polling. *patched* marks what failed in the world
before bakeryworld/patches_sqs.py."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from botocore.exceptions import ClientError



@pytest.fixture(scope="module")
def sqs(world):
    return world.client("sqs")


@pytest.fixture
def queue(sqs):
    url = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:10]}")["QueueUrl"]
    yield url
    sqs.delete_queue(QueueUrl=url)


def test_json_protocol_missing_queue_error(world, sqs):
    """A missing queue: `__type` com.amazonaws.sqs#QueueDoesNotExist, with the query-compatible
    `x-amzn-query-error: AWS.SimpleQueueService.NonExistentQueue;Sender` header, which boto3 (as
    aws-sdk-sqs's query-compatible error parsing) uses for the code."""
    with pytest.raises(ClientError) as ei:
        sqs.get_queue_url(QueueName=f"absent-{uuid.uuid4().hex[:6]}")
    r = ei.value.response
    assert r["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
    assert r["Error"]["QueryErrorCode"] == "QueueDoesNotExist"
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 400
    h = r["ResponseMetadata"]["HTTPHeaders"]
    assert h["x-amzn-query-error"] == "AWS.SimpleQueueService.NonExistentQueue;Sender"
    assert h["content-type"] == "application/x-amz-json-1.0"
    # the call went over the JSON protocol (X-Amz-Target: AmazonSQS.GetQueueUrl)
    calls = world.control("GET", "/_world/calls?limit=5")[1]["calls"]
    assert any(c["service"] == "sqs" and c["action"] == "GetQueueUrl" for c in calls)


def test_get_queue_url(sqs, queue):
    name = queue.rsplit("/", 1)[-1]
    assert sqs.get_queue_url(QueueName=name)["QueueUrl"] == queue


def test_long_poll_waits_when_empty(sqs, queue):
    t = time.monotonic()
    r = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)
    took = time.monotonic() - t
    assert "Messages" not in r
    assert 1.9 <= took < 3.5, took


def test_long_poll_does_not_stall_the_world_and_returns_on_arrival(world, sqs, queue):
    """*patched*: while one caller long-polls, other calls are served at once, and a message
    sent meanwhile ends the wait at once (before: the poll held the moto lock for its whole
    wait, so the EC2 calls and the SendMessage waited 10 s and the poll came back empty)."""
    out: dict = {}
    poller = world.client("sqs", access_key="AKIDPOLLER")
    started = threading.Event()

    def poll():
        out["t0"] = time.monotonic()
        started.set()
        out["r"] = poller.receive_message(QueueUrl=queue, WaitTimeSeconds=10, VisibilityTimeout=30)
        out["t1"] = time.monotonic()

    th = threading.Thread(target=poll)
    th.start()
    assert started.wait(5)
    ec2 = world.client("ec2")
    slowest = 0.0
    while time.monotonic() - out["t0"] < 2.0:  # calls during the poll's wait
        t = time.monotonic()
        ec2.describe_vpcs()
        slowest = max(slowest, time.monotonic() - t)
    t_send = time.monotonic()
    sqs.send_message(QueueUrl=queue, MessageBody="wake")
    sent = time.monotonic() - t_send
    th.join(15)
    assert not th.is_alive()
    assert [m["Body"] for m in out["r"].get("Messages", [])] == ["wake"]
    # the poll was in flight during the EC2 calls (it waited ~2 s for the message)...
    assert out["t1"] - out["t0"] >= 2.0
    # ...which were not held up by it, nor was the send, and the message ended the wait at once
    assert slowest < 1.0, slowest
    assert sent < 1.0, sent
    assert out["t1"] - t_send < 1.0, out["t1"] - t_send


def test_visibility_timeout_redelivery_during_a_long_poll(sqs, queue):
    """A received message reappears when its VisibilityTimeout ends: a long poll running at
    that moment gets it then (not at the end of its wait)."""
    sqs.send_message(QueueUrl=queue, MessageBody="m1")
    r = sqs.receive_message(QueueUrl=queue, VisibilityTimeout=2, WaitTimeSeconds=1)
    assert [m["Body"] for m in r["Messages"]] == ["m1"]
    t = time.monotonic()
    r = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=10, AttributeNames=["ApproximateReceiveCount"])
    took = time.monotonic() - t
    assert [m["Body"] for m in r["Messages"]] == ["m1"]
    assert r["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "2"
    assert 1.0 < took < 3.5, took


def test_change_visibility_and_delete(sqs, queue):
    sqs.send_message(QueueUrl=queue, MessageBody="m")
    m = sqs.receive_message(QueueUrl=queue, VisibilityTimeout=60, WaitTimeSeconds=1)["Messages"][0]
    assert "Messages" not in sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
    sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0)
    m2 = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)["Messages"][0]
    assert m2["MessageId"] == m["MessageId"]
    sqs.delete_message(QueueUrl=queue, ReceiptHandle=m2["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)
    with pytest.raises(ClientError) as ei:
        sqs.delete_message(QueueUrl=queue, ReceiptHandle="not-a-handle")
    assert ei.value.response["Error"]["Code"] == "ReceiptHandleIsInvalid"


def test_wait_time_above_20_is_refused(sqs, queue):
    with pytest.raises(ClientError) as ei:
        sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=21)
    assert ei.value.response["Error"]["Code"] == "InvalidParameterValue"


def test_queue_default_wait_time(sqs, queue):
    """ReceiveMessageWaitTimeSeconds on the queue makes a call without WaitTimeSeconds long-poll."""
    sqs.set_queue_attributes(QueueUrl=queue, Attributes={"ReceiveMessageWaitTimeSeconds": "1"})
    t = time.monotonic()
    assert "Messages" not in sqs.receive_message(QueueUrl=queue)
    assert 0.9 <= time.monotonic() - t < 2.5
