"""EC2 interruption events, delivered as EventBridge delivers them to SQS (plug-in).

`scripts/world interrupt i-… --kind spot|rebalance|scheduled` and
`POST /_world/instances/<id>/interrupt` put the event AWS would emit on the queues that
EventBridge rules route it to, then end the instance after its notice, as AWS does:

| kind | event (`source`, `detail-type`) | then |
|---|---|---|
| `spot` | `aws.ec2`, `EC2 Spot Instance Interruption Warning`, detail `{"instance-id", "instance-action": "terminate"\|"stop"\|"hibernate"}` | two minutes later ("a two-minute warning before Amazon EC2 stops or terminates your Spot Instance", EC2 user guide, *Spot Instance interruption notices*; scaled by the interrupt factor) the instance is terminated (`StateReason` `Server.SpotInstanceTermination`) or stopped (`Server.SpotInstanceShutdown`), also when API termination/stop is disabled: the Spot service does it |
| `rebalance` | `aws.ec2`, `EC2 Instance Rebalance Recommendation`, detail `{"instance-id"}` | nothing (a recommendation: "not ... a guarantee that the instance will be interrupted"), unless a notice is given: then terminated as a Spot interruption |
| `scheduled` | `aws.health`, `AWS Health Event`, detail `service: EC2`, `eventTypeCategory: scheduledChange`, `eventTypeCode` (default `AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED`), `startTime` (RFC 1123, as AWS Health writes it), `affectedEntities: [{"entityValue": "i-…"}]` | at `startTime`: retirement and stop events stop the instance ("if your instance root device is an Amazon EBS volume, the instance is stopped", EC2 user guide, *Instance retirement*; `StateReason` `Server.ScheduledStop`), reboot maintenance reboots it |

Delivery: like EventBridge, the event goes to the targets of every ENABLED rule of the region's
default event bus whose pattern matches it (moto's own pattern matching), one SQS message per
target whose body is the event JSON (no input transformation). `up` makes the world's own rule
(`bakery-world-ec2-events`: `source` `aws.ec2` or `aws.health`) and queue
(`bakery-world-events`, `WORLD_EVENTS_QUEUE_URL`). With `queue` (a URL or name) the event goes
to that queue only. `repeat` N delivers the same event (same `id`) N times: EventBridge delivers
at least once, so consumers must tolerate duplicates. The instance still ends once.

Notice: spot 120 s, scheduled 14 days (AWS Health gives EC2 retirement notice about two weeks
ahead; a test passes `notice`), each times the world's interrupt factor (`up --interrupt-factor`,
default 1; `POST /_world/events/config`); `notice` (seconds, unscaled) overrides.
"""

from __future__ import annotations

import datetime
import heapq
import json
import threading
import time
import uuid
from typing import Any

EVENTS_QUEUE = "bakery-world-events"
EVENTS_RULE = "bakery-world-ec2-events"
RULE_PATTERN = {"source": ["aws.ec2", "aws.health"]}

KINDS = ("spot", "rebalance", "scheduled")
SPOT_NOTICE = 120.0
SCHEDULED_NOTICE = 14 * 24 * 3600.0
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
# AWS Health EC2 scheduled-change event type codes the world emits, and what happens at the
# event's start time.
SCHEDULED_CODES = {
    "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED": "stop",
    "AWS_EC2_INSTANCE_STOP_SCHEDULED": "stop",
    "AWS_EC2_INSTANCE_REBOOT_MAINTENANCE_SCHEDULED": "reboot",
    "AWS_EC2_SYSTEM_REBOOT_MAINTENANCE_SCHEDULED": "reboot",
}
SCHEDULED_DESCRIPTIONS = {
    "stop": "EC2 has detected degradation of the underlying hardware hosting your Amazon EC2 "
            "instance {iid} in the {region} region. Due to this degradation your instance could "
            "already be unreachable. Your instance will be stopped after {start}.",
    "reboot": "EC2 has scheduled maintenance for your Amazon EC2 instance {iid} in the {region} "
              "region. Your instance will be rebooted after {start}.",
}
STATE_REASONS = {
    "spot-terminate": ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination"),
    "spot-stop": ("Server.SpotInstanceShutdown", "Server.SpotInstanceShutdown: Spot instance shutdown"),
    "scheduled-stop": ("Server.ScheduledStop", "Server.ScheduledStop: Stopped due to scheduled retirement"),
}

WORLD: Any = None
_INSTALLED = False


class BadRequest(ValueError):
    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc1123(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


def build_event(kind: str, instance_id: str, region: str, account: str, now: float,
                action: str = "terminate", code: str = "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
                start: float | None = None) -> dict:
    """The event exactly as EventBridge delivers it to an SQS target (the message body)."""
    ev: dict[str, Any] = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "account": account,
        "time": _iso(now),
        "region": region,
    }
    arn = f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"
    if kind == "spot":
        ev.update({"detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2",
                   "resources": [arn], "detail": {"instance-id": instance_id, "instance-action": action}})
    elif kind == "rebalance":
        ev.update({"detail-type": "EC2 Instance Rebalance Recommendation", "source": "aws.ec2",
                   "resources": [arn], "detail": {"instance-id": instance_id}})
    else:
        start = now if start is None else start
        what = SCHEDULED_CODES[code]
        ev.update({
            "detail-type": "AWS Health Event", "source": "aws.health", "resources": [instance_id],
            "detail": {
                "eventArn": f"arn:aws:health:{region}::event/EC2/{code}/{code}_{uuid.uuid4().hex[:20].upper()}",
                "service": "EC2",
                "eventScopeCode": "ACCOUNT_SPECIFIC",
                "communicationId": uuid.uuid4().hex,
                "lastUpdatedTime": _rfc1123(now),
                "statusCode": "upcoming",
                "eventRegion": region,
                "eventTypeCode": code,
                "eventTypeCategory": "scheduledChange",
                "startTime": _rfc1123(start),
                "eventDescription": [{
                    "language": "en_US",
                    "latestDescription": SCHEDULED_DESCRIPTIONS[what].format(iid=instance_id, region=region, start=_rfc1123(start)),
                }],
                "affectedEntities": [{"entityValue": instance_id}],
            },
        })
    # EventBridge's own key order: version, id, detail-type, source, account, time, region,
    # resources, detail.
    order = ["version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"]
    return {k: ev[k] for k in order}


class Interrupts:
    """The world's interruption events: delivery, and the instance's end after the notice."""

    def __init__(self, world: Any):
        self.world = world
        s = world.settings
        f = getattr(s, "interrupt_factor", None)
        self.factor = 1.0 if f is None else float(f)
        self.records: list[dict] = []
        self._heap: list[tuple[float, int, dict]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="world-interrupts", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ config
    def config(self, body: dict | None = None) -> dict:
        if body:
            bad = set(body) - {"interrupt_factor"}
            if bad:
                raise BadRequest(f"unknown field(s) {sorted(bad)}: allowed is 'interrupt_factor'")
            f = body.get("interrupt_factor")
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f <= 1000:
                raise BadRequest(f"interrupt_factor must be a number in 0..1000, got {f!r}")
            self.factor = float(f)
        return {"interrupt_factor": self.factor, "spot_notice_s": SPOT_NOTICE * self.factor,
                "scheduled_notice_s": SCHEDULED_NOTICE * self.factor}

    # ------------------------------------------------------------------ delivery
    def _backends(self, region: str):
        from moto.events.models import events_backends
        from moto.sqs.models import sqs_backends

        acct = self.world.settings.account
        return sqs_backends[acct][region], events_backends[acct][region]

    def _deliver(self, event: dict, region: str, queue: str | None, repeat: int) -> list[dict]:
        """Called under the moto lock. Returns [{queue, rule, message_ids}]."""
        sqs, evb = self._backends(region)
        targets: list[tuple[str, str | None, str | None]] = []  # (queue name, rule, group id)
        if queue:
            name = queue.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("arn:"):
                name = name.rsplit(":", 1)[-1]
            try:
                sqs.get_queue(name)
            except Exception:
                raise BadRequest(f"no SQS queue {queue!r} in {region}")
            targets.append((name, None, None))
        else:
            bus = evb.describe_event_bus("default")
            for rule in list(bus.rules.values()):
                if rule.state != "ENABLED" or rule.scheduled_expression:
                    continue
                if not rule.event_pattern.matches_event(event):
                    continue
                for t in rule.targets:
                    arn = t.get("Arn", "")
                    parts = arn.split(":")
                    if len(parts) >= 6 and parts[2] == "sqs" and parts[3] == region:
                        group = (t.get("SqsParameters") or {}).get("MessageGroupId")
                        targets.append((parts[5], rule.name, group))
        out = []
        body = json.dumps(event)
        for name, rule, group in targets:
            ids = []
            for _ in range(repeat):
                try:
                    m = sqs.send_message(queue_name=name, message_body=body, group_id=group)
                except Exception as e:  # a rule whose queue is gone: EventBridge drops it too
                    self.world.log(f"interrupt: delivery to {name} failed: {e!r}")
                    break
                ids.append(m.id)
            out.append({"queue": name, "rule": rule, "message_ids": ids})
        return out

    # ------------------------------------------------------------------ interrupt
    def interrupt(self, instance_id: str, body: dict) -> dict:
        allowed = {"kind", "notice", "repeat", "queue", "action", "code", "region"}
        bad = set(body) - allowed
        if bad:
            raise BadRequest(f"unknown field(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        kind = body.get("kind", "spot")
        if kind not in KINDS:
            raise BadRequest(f"kind must be one of {list(KINDS)}, got {kind!r}")
        notice = body.get("notice")
        if notice is not None and (not isinstance(notice, (int, float)) or isinstance(notice, bool) or notice < 0):
            raise BadRequest(f"notice must be a number of seconds >= 0, got {notice!r}")
        repeat = body.get("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 100:
            raise BadRequest(f"repeat must be an integer in 1..100, got {repeat!r}")
        action = body.get("action", "terminate")
        if action not in SPOT_ACTIONS:
            raise BadRequest(f"action must be one of {list(SPOT_ACTIONS)}, got {action!r}")
        if "action" in body and kind != "spot":
            raise BadRequest("action applies to kind spot only")
        code = body.get("code", "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED")
        if code not in SCHEDULED_CODES:
            raise BadRequest(f"code must be one of {sorted(SCHEDULED_CODES)}, got {code!r}")
        if "code" in body and kind != "scheduled":
            raise BadRequest("code applies to kind scheduled only")
        queue = body.get("queue")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise BadRequest("queue must be a queue URL or name")
        s = self.world.settings
        region = body.get("region") or s.region

        now = time.time()
        if kind == "spot":
            wait = SPOT_NOTICE * self.factor if notice is None else float(notice)
            end = "spot-terminate" if action == "terminate" else "spot-stop"
        elif kind == "rebalance":
            wait = None if notice is None else float(notice)
            end = None if notice is None else "spot-terminate"
        else:
            wait = SCHEDULED_NOTICE * self.factor if notice is None else float(notice)
            end = "scheduled-stop" if SCHEDULED_CODES[code] == "stop" else "scheduled-reboot"
        ends_at = None if wait is None else now + wait

        with self.world.lock:
            try:
                inst = self.world.ec2(region).get_instance(instance_id)
            except Exception:
                inst = None
            if inst is None:
                raise BadRequest(f"no instance {instance_id} in this world ({region})", 404)
            state = inst.state
            if state in ("shutting-down", "terminated"):
                raise BadRequest(f"instance {instance_id} is {state}", 409)
            event = build_event(kind, instance_id, region, s.account, now, action=action, code=code,
                                start=ends_at)
            delivered = self._deliver(event, region, queue, repeat)
        rec = {
            "event_id": event["id"], "kind": kind, "instance_id": instance_id, "region": region,
            "sent_at": now, "notice_s": wait, "ends_at": ends_at,
            "ends_at_iso": None if ends_at is None else _iso(ends_at),
            "end_action": None if end is None else end.split("-", 1)[1],
            "repeat": repeat, "delivered_to": delivered, "outcome": None if end else "no end",
            "event": event,
        }
        with self._cond:
            self.records.append(rec)
            if end is not None:
                self._seq += 1
                heapq.heappush(self._heap, (ends_at, self._seq, {"rec": rec, "end": end}))
                self._cond.notify_all()
        self.world.log(
            f"interrupt: {kind} event {event['id']} for {instance_id} -> "
            f"{sum(len(d['message_ids']) for d in delivered)} message(s)"
            + (f"; {rec['end_action']} in {wait:.1f}s" if end else "")
        )
        return rec

    def list(self) -> dict:
        with self._cond:
            return {"config": self.config(), "events": [dict(r) for r in self.records]}

    # ------------------------------------------------------------------ the end
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.time():
                    timeout = None if not self._heap else max(0.0, self._heap[0][0] - time.time())
                    self._cond.wait(timeout if timeout is None else min(timeout, 1.0))
                _, _, job = heapq.heappop(self._heap)
            try:
                outcome = self._end(job["rec"], job["end"])
            except Exception as e:  # report, keep the thread
                outcome = f"failed: {e!r}"
            with self._cond:
                job["rec"]["outcome"] = outcome
                job["rec"]["ended_at"] = time.time()
            self.world.log(f"interrupt: {job['rec']['instance_id']} after the notice: {outcome}")

    def _end(self, rec: dict, end: str) -> str:
        iid, region = rec["instance_id"], rec["region"]
        with self.world.lock:
            ec2 = self.world.ec2(region)
            try:
                inst = ec2.get_instance(iid)
            except Exception:
                return "skipped: instance gone"
            state = inst.state
            if end == "spot-terminate":
                if state in ("shutting-down", "terminated"):
                    return f"skipped: already {state}"
                saved = inst.disable_api_termination
                inst.disable_api_termination = False  # the Spot service, not an API caller
                try:
                    ec2.terminate_instances([iid])
                finally:
                    inst.disable_api_termination = saved
                self._reason(inst, end)
                return "terminated"
            if end in ("spot-stop", "scheduled-stop"):
                if state not in ("pending", "running"):
                    return f"skipped: {state}"
                saved = getattr(inst, "disable_api_stop", False)
                inst.disable_api_stop = False
                try:
                    ec2.stop_instances([iid])
                finally:
                    inst.disable_api_stop = saved
                self._reason(inst, end)
                return "stopped"
            if end == "scheduled-reboot":
                if state != "running":
                    return f"skipped: {state}"
                ec2.reboot_instances([iid])
                return "rebooted"
        return f"skipped: unknown end {end}"

    @staticmethod
    def _reason(inst: Any, end: str) -> None:
        from moto.ec2.models.instances import StateReason

        code, msg = STATE_REASONS[end]
        inst.state_reason = StateReason(msg, code)
        inst._reason = ""


INTERRUPTS: Interrupts | None = None


# ---------------------------------------------------------------------- control API
def _json(raw: bytes) -> dict:
    if not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}")
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def handle(method: str, path: str, raw: bytes):
    """`/_world/instances/<id>/interrupt`, `/_world/events`, `/_world/events/config`; None for
    any other path."""
    if INTERRUPTS is None:
        return None
    try:
        parts = path.rstrip("/").split("/")
        if len(parts) == 5 and parts[2] == "instances" and parts[4] == "interrupt":
            if method != "POST":
                return 405, {"error": "use POST"}
            return 200, INTERRUPTS.interrupt(parts[3], _json(raw))
        if path.rstrip("/") == "/_world/events":
            if method != "GET":
                return 405, {"error": "use GET"}
            return 200, INTERRUPTS.list()
        if path.rstrip("/") == "/_world/events/config":
            if method == "GET":
                return 200, INTERRUPTS.config()
            if method in ("POST", "PUT"):
                return 200, INTERRUPTS.config(_json(raw))
            return 405, {"error": "use GET or POST"}
    except BadRequest as e:
        return e.status, {"error": str(e)}
    return None


def _route(environ, raw):
    return handle(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""), raw)


ROUTES = [(m, p, _route) for m in ("GET", "POST", "PUT")
          for p in ("/_world/events", "/_world/instances/")]


def _status_hook(st: dict) -> None:
    if INTERRUPTS is not None:
        pending = [r for r in INTERRUPTS.records if r.get("outcome") is None]
        st["interrupts"] = {"interrupt_factor": INTERRUPTS.factor, "sent": len(INTERRUPTS.records),
                            "pending_ends": len(pending)}


def install(world: Any) -> None:
    global WORLD, INTERRUPTS, _INSTALLED
    WORLD = world
    if INTERRUPTS is None:
        INTERRUPTS = Interrupts(world)
    if not _INSTALLED:
        world.status_hooks.append(_status_hook)
        _INSTALLED = True


# ---------------------------------------------------------------------- for `up`
def ensure_route(endpoint: str, region: str) -> dict[str, str]:
    """The world's events queue and the EventBridge rule routing EC2 and AWS Health events to it
    (idempotent; run by `scripts/world up` through the API). Returns the env-file entries."""
    import boto3
    from botocore.config import Config

    kw = dict(endpoint_url=endpoint, region_name=region, aws_access_key_id="testing",
              aws_secret_access_key="testing", config=Config(retries={"mode": "standard", "max_attempts": 10}))
    sqs = boto3.client("sqs", **kw)
    events = boto3.client("events", **kw)
    url = sqs.create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rule_arn = events.put_rule(Name=EVENTS_RULE, EventPattern=json.dumps(RULE_PATTERN), State="ENABLED",
                               Description="bakery world: EC2 interruption and AWS Health events")["RuleArn"]
    # The queue policy EventBridge needs on AWS to send to the queue (moto does not check it).
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"}, "Action": "sqs:SendMessage",
        "Resource": arn, "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}}}]}
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    events.put_targets(Rule=EVENTS_RULE, Targets=[{"Id": "bakery-world-events", "Arn": arn}])
    return {"WORLD_EVENTS_QUEUE_URL": url, "WORLD_EVENTS_QUEUE_ARN": arn, "WORLD_EVENTS_RULE": EVENTS_RULE}

