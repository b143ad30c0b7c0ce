"""CloudWatch in the world: load balancer metrics from the health checker, and metric alarms
that evaluate.

moto 5.2.5 stores `PutMetricAlarm` and never evaluates it: every alarm starts (and stays) `OK`
with "Unchecked: Initial alarm creation". No AWS service publishes a metric either, and
`DescribeAlarmHistory` is not implemented (a 500). On AWS:

- Elastic Load Balancing publishes, per target group and load balancer, `HealthyHostCount` and
  `UnHealthyHostCount` (namespace `AWS/ApplicationELB`, dimensions `TargetGroup` and
  `LoadBalancer`, and also per `AvailabilityZone`), and `HTTPCode_Target_5XX_Count` (also per
  `LoadBalancer` alone). Dimension values are the ARN suffixes `targetgroup/<name>/<id>` and
  `app/<name>/<id>` (ALB user guide, "CloudWatch metrics for your Application Load Balancer").
  Count metrics such as `HTTPCode_Target_5XX_Count` are reported only when non-zero.
- A metric alarm is created `INSUFFICIENT_DATA` ("When this operation creates an alarm, the
  alarm state is immediately set to INSUFFICIENT_DATA. The alarm is then evaluated"), and an
  update keeps the state ("When you update an existing alarm, its state is left unchanged").
- Each evaluation looks at the most recent `EvaluationPeriods` (N) periods of `Period` seconds:
  `DatapointsToAlarm` (M, default N) breaching datapoints put it in `ALARM`, else `OK`. Missing
  datapoints are handled as the CloudWatch user guide's "How alarm state is evaluated when data
  is missing" describes: the alarm retrieves a wider *evaluation range* (N + 2 periods, the
  guide's examples retrieve 5 datapoints for N = 3); if at least N datapoints exist the newest N
  decide; if none exists, `missing` -> `INSUFFICIENT_DATA`, `ignore` -> unchanged, `breaching`
  -> `ALARM`, `notBreaching` -> `OK`; otherwise missing datapoints are filled in with the
  `TreatMissingData` result as few times as needed (see `decide`, checked against both tables
  of the guide in test_alarms.py).
- `SetAlarmState` "lasts only until the next alarm comparison occurs".

What the world publishes, every `--metric-period` seconds (default 10; tests use 1), for each
target group that a load balancer uses, for each of its load balancers:

- `HealthyHostCount` / `UnHealthyHostCount`: the registered targets whose `DescribeTargetHealth`
  state is `healthy` / `unhealthy` at that moment (one datapoint per metric period; dimensions
  `TargetGroup`+`LoadBalancer`, and `TargetGroup`+`LoadBalancer`+`AvailabilityZone` for each of
  the load balancer's zones, where the target's instance lives).
- `HTTPCode_Target_5XX_Count`: no request passes through a world load balancer, so the world
  counts what its health checker sees instead: the health checks of the period answered with an
  HTTP status 500-599 (AWS counts the load balancer's routed requests, and not its health
  checks). Published only when non-zero, as AWS does, with dimensions `TargetGroup`+
  `LoadBalancer`, `TargetGroup`+`LoadBalancer`+`AvailabilityZone`, `LoadBalancer`, and
  `LoadBalancer`+`AvailabilityZone`.

Each datapoint is stamped with the start of its metric period. The world keeps its own
datapoints for `RETENTION_SECONDS` (3 h; AWS keeps 1-minute data for 15 days).

Alarms are evaluated when each of their periods ends (a `Period` below 10 s counts as 10 s, the
smallest AWS allows; 10 and 30 s are high-resolution periods on AWS, which the world honours
for every metric). Supported: `Statistic` Sum, Average, Minimum, Maximum, SampleCount;
`ExtendedStatistic` `pNN(.N)` (nearest-rank percentile of the raw values); the four threshold
`ComparisonOperator`s; `Unit`; `Metrics` with a single `MetricStat` query. Anomaly-detection
operators and metric math are not evaluated (such alarms keep their state).

`scripts/world alarm NAME ALARM|OK|INSUFFICIENT_DATA` (control API
`POST /_world/alarms/<name>`) forces a state that *holds*: evaluation of that alarm stops until
`scripts/world alarm NAME --clear` (`DELETE /_world/alarms/<name>`), unlike `SetAlarmState`.

Also fixed: moto's `GetMetricStatistics` matched a datapoint when the request's dimensions
were a subset of the datapoint's (the per-zone datapoints were summed into the per-group
statistic); AWS matches the exact set of dimensions ("you must specify the same dimensions that
were used when the metrics were created"). `ListMetrics` listed a metric with two or more dimensions once per datapoint. And moto's
`Dimension` ordering (used by `GetMetricData` to compare dimension sets) compared a name with a
value.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from . import health

log = logging.getLogger("bakeryworld.cloudwatch")

NAMESPACE = "AWS/ApplicationELB"
DEFAULT_METRIC_PERIOD = 10.0
MIN_ALARM_PERIOD = 10
RETENTION_SECONDS = 3 * 3600
STATES = ("OK", "ALARM", "INSUFFICIENT_DATA")
OPERATORS = {
    "GreaterThanOrEqualToThreshold": lambda v, t: v >= t,
    "GreaterThanThreshold": lambda v, t: v > t,
    "LessThanThreshold": lambda v, t: v < t,
    "LessThanOrEqualToThreshold": lambda v, t: v <= t,
}
OPERATOR_WORDS = {
    "GreaterThanOrEqualToThreshold": "greater than or equal to",
    "GreaterThanThreshold": "greater than",
    "LessThanThreshold": "less than",
    "LessThanOrEqualToThreshold": "less than or equal to",
}

# 5xx answers seen by the health checker since the last publication: (tg arn, target) -> n.
_5XX: dict[tuple[str, str], int] = {}
_5XX_LOCK = threading.Lock()
# Alarm states forced by `scripts/world alarm`: (region, alarm name) -> state.
FORCED: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------------
# Time helpers (moto keeps naive UTC datetimes)


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def epoch(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


# --------------------------------------------------------------------------------------------
# Alarm evaluation (pure)


def decide(
    values: list[bool | None], n: int, m: int, treat_missing: str | None, current: str
) -> str:
    """New state of an M-out-of-N alarm from the evaluation range, newest first: True is a
    breaching datapoint, False a non-breaching one, None a missing one (CloudWatch user guide,
    "How alarm state is evaluated when data is missing")."""
    tmd = treat_missing or "missing"
    existing = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(existing) >= n:
        breaching = sum(1 for _, v in existing[:n] if v)
        return "ALARM" if breaching >= m else "OK"
    if not existing:
        return {"missing": "INSUFFICIENT_DATA", "ignore": current, "breaching": "ALARM"}.get(tmd, "OK")
    breaching = sum(1 for _, v in existing if v)
    if tmd in ("breaching", "notBreaching"):
        if tmd == "breaching":
            breaching += n - len(existing)
        return "ALARM" if breaching >= m else "OK"
    # missing / ignore: only real datapoints count.
    if breaching >= m:
        return "ALARM"
    if any(not v for _, v in existing):
        return "OK"
    # Every real datapoint breaches, but fewer than M of them.
    if tmd == "ignore":
        return current
    # The guide: "- - - - X" stays INSUFFICIENT_DATA, "X - - - -" goes to ALARM ("the oldest
    # evaluated data point is breaching and there aren't any non-breaching data points").
    in_newest_n = any(i < n for i, _ in existing)
    return "INSUFFICIENT_DATA" if in_newest_n else "ALARM"


def statistic(values: list[float], stat: str) -> float | None:
    if not values:
        return None
    if stat == "Sum":
        return float(sum(values))
    if stat == "Average":
        return float(sum(values)) / len(values)
    if stat == "Minimum":
        return float(min(values))
    if stat == "Maximum":
        return float(max(values))
    if stat == "SampleCount":
        return float(len(values))
    if stat.startswith("p"):
        try:
            q = float(stat[1:])
        except ValueError:
            return None
        ordered = sorted(values)
        rank = max(1, math.ceil(q / 100.0 * len(ordered)))
        return float(ordered[min(rank, len(ordered)) - 1])
    return None


# --------------------------------------------------------------------------------------------
# Backends (every account and region moto has made; none is created here)


def _existing(backends: Any) -> list[tuple[str, Any]]:
    out = []
    for _account, by_region in list(dict.items(backends)):
        for region, backend in list(dict.items(by_region)):
            out.append((region, backend))
    return out


def _cloudwatch(world: Any, region: str, account: str | None = None) -> Any:
    if account and account != world.settings.account:
        from moto.backends import get_backend

        # Another account's load balancer (the second account, regions.py): its own CloudWatch.
        return get_backend("cloudwatch")[account][region]
    return world.backend("cloudwatch", region)


def dimension_value(arn: str, kind: str) -> str:
    """`targetgroup/<name>/<id>` or `app/<name>/<id>` from an ARN, as ELB's dimensions use."""
    if kind == "TargetGroup":
        return arn.split(":", 5)[-1]
    return arn.split(":loadbalancer/", 1)[-1]


# --------------------------------------------------------------------------------------------
# Publishing


def on_probe(tg_arn: str, target_id: str, code: int | None) -> None:
    """Health checker listener (health.PROBE_LISTENERS): counts 5xx answers."""
    if code is not None and 500 <= code <= 599:
        with _5XX_LOCK:
            _5XX[(tg_arn, target_id)] = _5XX.get((tg_arn, target_id), 0) + 1


def _datum(name: str, value: float, dims: list[tuple[str, str]], ts: datetime) -> Any:
    from moto.cloudwatch.models import MetricDatum

    d = MetricDatum(NAMESPACE, name, float(value), [{"Name": k, "Value": v} for k, v in dims], ts, "Count")
    d._bakeryworld = True  # type: ignore[attr-defined]
    return d


def publish(world: Any, bucket_start: float) -> int:
    """One metric period's datapoints for every target group a load balancer uses. Called with
    the moto lock held. Returns how many datapoints were published."""
    from moto.elbv2.models import elbv2_backends

    ts = utc(bucket_start)
    with _5XX_LOCK:
        errors = dict(_5XX)
        _5XX.clear()
    n = 0
    for region, elbv2 in _existing(elbv2_backends):
        out: list[Any] = []
        for tg in list(elbv2.target_groups.values()):
            if not tg.load_balancer_arns:
                continue
            healthy: dict[str, int] = {}
            unhealthy: dict[str, int] = {}
            fives: dict[str, int] = {}
            for t in list(tg.targets.values()):
                tid = t["Id"]
                az = _zone_of(elbv2, tg, tid)
                status = tg.health_for({"Id": tid, "Port": t.get("Port")}, elbv2.ec2_backend).status
                if status == "healthy":
                    healthy[az] = healthy.get(az, 0) + 1
                elif status == "unhealthy":
                    unhealthy[az] = unhealthy.get(az, 0) + 1
            for (arn, tid), count in errors.items():
                if arn == tg.arn:
                    az = _zone_of(elbv2, tg, tid)
                    fives[az] = fives.get(az, 0) + count
            tg_dim = ("TargetGroup", dimension_value(tg.arn, "TargetGroup"))
            for lb_arn in list(tg.load_balancer_arns):
                lb = elbv2.load_balancers.get(lb_arn)
                if lb is None:
                    continue
                lb_dim = ("LoadBalancer", dimension_value(lb_arn, "LoadBalancer"))
                zones = sorted({s.availability_zone for s in (lb.subnets or [])})
                out.append(_datum("HealthyHostCount", sum(healthy.values()), [tg_dim, lb_dim], ts))
                out.append(_datum("UnHealthyHostCount", sum(unhealthy.values()), [tg_dim, lb_dim], ts))
                for az in zones:
                    z = ("AvailabilityZone", az)
                    out.append(_datum("HealthyHostCount", healthy.get(az, 0), [tg_dim, lb_dim, z], ts))
                    out.append(_datum("UnHealthyHostCount", unhealthy.get(az, 0), [tg_dim, lb_dim, z], ts))
                total = sum(fives.values())
                if total:
                    out.append(_datum("HTTPCode_Target_5XX_Count", total, [tg_dim, lb_dim], ts))
                    out.append(_datum("HTTPCode_Target_5XX_Count", total, [lb_dim], ts))
                    for az, count in fives.items():
                        if az:
                            z = ("AvailabilityZone", az)
                            out.append(_datum("HTTPCode_Target_5XX_Count", count, [tg_dim, lb_dim, z], ts))
                            out.append(_datum("HTTPCode_Target_5XX_Count", count, [lb_dim, z], ts))
        if out:
            _cloudwatch(world, region, getattr(elbv2, "account_id", None)).metric_data.extend(out)
            n += len(out)
    return n


def _zone_of(elbv2: Any, tg: Any, target_id: str) -> str:
    if target_id.startswith("i-"):
        inst = elbv2.ec2_backend.get_instance_by_id(target_id)
        if inst is not None:
            return inst.placement.zone if hasattr(inst, "placement") else ""
        return ""
    try:  # an `ip` target: the zone of the subnet holding the address
        import ipaddress

        ip = ipaddress.ip_address(target_id)
        for subnet in elbv2.ec2_backend.describe_subnets():
            if ip in ipaddress.ip_network(subnet.cidr_block):
                return subnet.availability_zone
    except (ValueError, AttributeError):
        pass
    return ""


def trim(world: Any, now: float) -> None:
    """Drop the world's own datapoints older than the retention."""
    from moto.cloudwatch.models import cloudwatch_backends

    cutoff = utc(now - RETENTION_SECONDS)
    for _region, cw in _existing(cloudwatch_backends):
        if any(getattr(d, "_bakeryworld", False) and d.timestamp < cutoff for d in cw.metric_data[:1000]):
            cw.metric_data = [
                d for d in cw.metric_data if not (getattr(d, "_bakeryworld", False) and d.timestamp < cutoff)
            ]


# --------------------------------------------------------------------------------------------
# Evaluating


def _history(cw: Any) -> dict[str, list[dict[str, Any]]]:
    h = getattr(cw, "_bakeryworld_history", None)
    if h is None:
        h = cw._bakeryworld_history = {}
    return h


def _record(cw: Any, alarm: Any, item_type: str, summary: str, data: dict[str, Any]) -> None:
    items = _history(cw).setdefault(alarm.name, [])
    items.append(
        {
            "AlarmName": alarm.name,
            "AlarmType": "CompositeAlarm" if getattr(alarm, "rule", None) else "MetricAlarm",
            "Timestamp": utc(time.time()),
            "HistoryItemType": item_type,
            "HistorySummary": summary,
            "HistoryData": json.dumps(data),
        }
    )
    cutoff = utc(time.time() - 14 * 86400)  # "CloudWatch preserves alarm history for two weeks"
    while items and items[0]["Timestamp"] < cutoff:
        items.pop(0)


def set_state(cw: Any, alarm: Any, state: str, reason: str, reason_data: dict[str, Any] | None) -> None:
    """A state transition, as AWS records it (StateReason, StateReasonData, timestamp, history)."""
    old_state, old_reason = alarm.state_value, alarm.state_reason
    data_text = json.dumps(reason_data) if reason_data is not None else None
    alarm.update_state(reason, data_text, state)
    new = {"stateValue": state, "stateReason": reason}
    if reason_data is not None:
        new["stateReasonData"] = reason_data
    _record(
        cw,
        alarm,
        "StateUpdate",
        f"Alarm updated from {old_state} to {state}",
        {"version": "1.0", "oldState": {"stateValue": old_state, "stateReason": old_reason}, "newState": new},
    )
    log.info("alarm %s: %s -> %s (%s)", alarm.name, old_state, state, reason)


def _what(alarm: Any) -> tuple[str, str, list[tuple[str, str]], int, str, str | None] | None:
    """(namespace, metric, dimensions, period, statistic, unit) an alarm watches, or None."""
    queries = list(getattr(alarm, "metric_data_queries", None) or [])
    if queries:
        stats = [q for q in queries if q.metric_stat is not None]
        if len(queries) != 1 or len(stats) != 1:
            return None  # metric math: not evaluated
        ms = stats[0].metric_stat
        dims = [(d.name, d.value) for d in ms.metric.dimensions]
        return ms.metric.namespace, ms.metric.metric_name, dims, int(ms.period or 60), ms.stat, ms.unit
    if not alarm.metric_name or not alarm.namespace:
        return None
    stat = alarm.statistic or alarm.extended_statistic
    if not stat:
        return None
    dims = [(d.name, d.value) for d in alarm.dimensions]
    return alarm.namespace, alarm.metric_name, dims, int(alarm.period or 60), stat, alarm.unit


def _fmt(v: float) -> str:
    return repr(float(v))


def evaluate(cw: Any, alarm: Any, now: float) -> None:
    what = _what(alarm)
    op = OPERATORS.get(alarm.comparison_operator or "")
    if what is None or op is None:
        return
    namespace, metric, dims, period, stat, unit = what
    if alarm.threshold is None:
        return
    period = max(MIN_ALARM_PERIOD, period)
    end = math.floor(now / period) * period
    if getattr(alarm, "_bakeryworld_evaluated_end", None) == end:
        return
    alarm._bakeryworld_evaluated_end = end
    n = max(1, int(alarm.evaluation_periods or 1))
    m = int(alarm.datapoints_to_alarm or n)
    span = n + 2
    start = end - span * period
    want = sorted(dims)
    buckets: list[list[float]] = [[] for _ in range(span)]
    lo, hi = utc(start), utc(end)
    # Newest first: the world's own datapoints are appended in time order, so the scan stops at
    # the first of them older than the range (PutMetricData's, in any order, are all seen
    # until then). Keeps an evaluation cheap however long the world has run.
    stop = utc(start - 60)
    data = cw.metric_data
    for k in range(len(data) - 1, -1, -1):
        d = data[k]
        if getattr(d, "_bakeryworld", False) and d.timestamp < stop:
            break
        if d.name != metric or d.namespace != namespace or not (lo <= d.timestamp < hi):
            continue
        if unit and d.unit != unit:
            continue
        if sorted((x.name, x.value) for x in d.dimensions) != want:
            continue
        # Period i (0 = newest) holds [end - (i + 1) * period, end - i * period).
        i = math.ceil((end - epoch(d.timestamp)) / period - 1e-9) - 1
        if 0 <= i < span:
            if hasattr(d, "value"):
                buckets[i].append(float(d.value))
            else:  # a StatisticSet: its sum, count, min, max stand for the samples
                buckets[i].extend([float(d.sum) / max(1.0, float(d.sample_count))] * int(max(1, d.sample_count)))
    values = [statistic(b, stat) for b in buckets]
    threshold = float(alarm.threshold)
    breaching = [None if v is None else bool(op(v, threshold)) for v in values]
    new = decide(breaching, n, m, alarm.treat_missing_data, alarm.state_value)
    if new == alarm.state_value:
        return
    # The datapoints that decided it, newest first, as AWS's StateReason lists them.
    shown = [(i, v) for i, v in enumerate(values) if v is not None][:n]
    stamp = lambda i: time.strftime("%d/%m/%y %H:%M:%S", time.gmtime(end - (i + 1) * period))  # noqa: E731
    listed = ", ".join(f"{_fmt(v)} ({stamp(i)})" for i, v in shown)
    words = OPERATOR_WORDS[alarm.comparison_operator]
    if new == "INSUFFICIENT_DATA":
        reason = f"Insufficient Data: {n} datapoint{'s were' if n > 1 else ' was'} unknown."
    elif new == "ALARM":
        k = sum(1 for _, v in shown if op(v, threshold))
        reason = (
            f"Threshold Crossed: {k} out of the last {n} datapoints [{listed}] "
            f"{'was' if k == 1 else 'were'} {words} the threshold ({_fmt(threshold)}) "
            f"(minimum {m} datapoint{'s' if m > 1 else ''} for {alarm.state_value} -> ALARM transition)."
        )
    else:
        k = sum(1 for _, v in shown if not op(v, threshold))
        reason = (
            f"Threshold Crossed: {k} out of the last {n} datapoints [{listed}] "
            f"{'was' if k == 1 else 'were'} not {words} the threshold ({_fmt(threshold)}) "
            f"(minimum 1 datapoint for {alarm.state_value} -> OK transition)."
        )
    reason_data = {
        "version": "1.0",
        "queryDate": iso(now),
        "startDate": iso(end - n * period),
        "statistic" if stat in ("Sum", "Average", "Minimum", "Maximum", "SampleCount") else "extendedStatistic": stat,
        "period": period,
        "recentDatapoints": [round(v, 6) for _, v in shown][::-1],
        "threshold": threshold,
        "evaluatedDatapoints": [{"timestamp": iso(end - (i + 1) * period), "value": round(v, 6)} for i, v in shown],
    }
    set_state(cw, alarm, new, reason, reason_data)


def evaluate_all(world: Any, now: float) -> None:
    from moto.cloudwatch.models import cloudwatch_backends

    for region, cw in _existing(cloudwatch_backends):
        for alarm in list(cw.alarms.values()):
            if getattr(alarm, "rule", None):
                continue  # composite alarms: not evaluated
            try:
                forced = FORCED.get((region, alarm.name))
                if forced is not None:
                    if alarm.state_value != forced:
                        set_state(
                            cw, alarm, forced,
                            "Alarm state forced by the local world (scripts/world alarm); "
                            "evaluation stops until cleared", None,
                        )
                    alarm._bakeryworld_evaluated_end = None
                    continue
                evaluate(cw, alarm, now)
            except Exception:
                log.exception("alarm %s: evaluation failed", alarm.name)


# --------------------------------------------------------------------------------------------
# moto patches


def _patch_moto() -> None:
    from moto.cloudwatch import models as cwm
    from moto.cloudwatch.responses import CloudWatchResponse
    from moto.core.responses import ActionResult

    if getattr(cwm.CloudWatchBackend, "_bakeryworld_cloudwatch", False):
        return
    cwm.CloudWatchBackend._bakeryworld_cloudwatch = True  # type: ignore[attr-defined]

    orig_put = cwm.CloudWatchBackend.put_metric_alarm
    orig_set = cwm.CloudWatchBackend.set_alarm_state
    orig_stats = cwm.CloudWatchBackend.get_metric_statistics

    def put_metric_alarm(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = kwargs.get("name", args[0] if args else None)
        old = self.alarms.get(name)
        alarm = orig_put(self, *args, **kwargs)
        if old is None:
            # "the alarm state is immediately set to INSUFFICIENT_DATA"
            alarm.state_value = "INSUFFICIENT_DATA"
            alarm.state_reason = "Unchecked: Initial alarm creation"
            alarm.state_reason_data = None
            _record(self, alarm, "ConfigurationUpdate", f'Alarm "{name}" created', {"type": "Create", "version": "1.0"})
        else:
            # "When you update an existing alarm, its state is left unchanged"
            alarm.state_value = old.state_value
            alarm.state_reason = old.state_reason
            alarm.state_reason_data = old.state_reason_data
            alarm.state_updated_timestamp = old.state_updated_timestamp
            alarm.history = old.history
            _record(self, alarm, "ConfigurationUpdate", f'Alarm "{name}" updated', {"type": "Update", "version": "1.0"})
        return alarm

    def set_alarm_state(self: Any, alarm_name: str, reason: str, reason_data: str, state_value: str) -> None:
        old = self.alarms.get(alarm_name)
        old_state, old_reason = (old.state_value, old.state_reason) if old is not None else (None, None)
        orig_set(self, alarm_name, reason, reason_data, state_value)
        alarm = self.alarms[alarm_name]
        new: dict[str, Any] = {"stateValue": state_value, "stateReason": reason}
        if reason_data:
            try:
                new["stateReasonData"] = json.loads(reason_data)
            except ValueError:
                pass
        _record(
            self, alarm, "StateUpdate", f"Alarm updated from {old_state} to {state_value}",
            {"version": "1.0", "oldState": {"stateValue": old_state, "stateReason": old_reason}, "newState": new},
        )

    def get_metric_statistics(self: Any, namespace: str, metric_name: str, start_time: Any, end_time: Any,
                              period: int, stats: list[str], dimensions: list[dict[str, str]],
                              unit: str | None = None) -> Any:
        # AWS matches the exact dimension set; moto matched any datapoint having these
        # dimensions among others. Narrow the data moto looks at to the exact matches.
        want = sorted((d["Name"], d.get("Value")) for d in (dimensions or []))
        real = self.get_all_metrics

        def exact() -> list[Any]:
            return [
                md for md in real()
                if md.namespace != namespace or md.name != metric_name
                or sorted((x.name, x.value) for x in md.dimensions) == want
            ]

        self.get_all_metrics = exact
        try:
            return orig_stats(self, namespace, metric_name, start_time, end_time, period, stats, dimensions, unit)
        finally:
            del self.get_all_metrics

    def get_filtered_metrics(self: Any, metric_name: str, namespace: str, dimensions: list[dict[str, str]]) -> Any:
        # ListMetrics lists each metric (namespace, name, dimension set) once; moto's duplicate
        # check compared every dimension with every other, so a metric with two dimensions was
        # listed once per datapoint (and the check was quadratic).
        seen: set[Any] = set()
        out = []
        for md in self.get_all_metrics():
            if not md.filter(namespace=namespace, name=metric_name, dimensions=dimensions):
                continue
            key = (md.namespace, md.name, frozenset((d.name, d.value) for d in md.dimensions))
            if key not in seen:
                seen.add(key)
                out.append(md)
        return out

    def dimension_lt(self: Any, other: Any) -> bool:
        return (self.name or "", self.value or "") < (other.name or "", other.value or "")

    cwm.CloudWatchBackend.put_metric_alarm = put_metric_alarm  # type: ignore[method-assign]
    cwm.CloudWatchBackend.set_alarm_state = set_alarm_state  # type: ignore[method-assign]
    cwm.CloudWatchBackend.get_metric_statistics = get_metric_statistics  # type: ignore[method-assign]
    cwm.CloudWatchBackend.get_filtered_metrics = get_filtered_metrics  # type: ignore[method-assign]
    cwm.Dimension.__lt__ = dimension_lt  # type: ignore[method-assign]

    def describe_alarm_history(self: Any) -> Any:
        """DescribeAlarmHistory (moto: not implemented): state changes and configuration
        updates, newest first unless ScanBy=TimestampAscending."""
        name = self._get_param("AlarmName")
        types = self._get_param("AlarmTypes", []) or ["MetricAlarm", "CompositeAlarm"]
        item_type = self._get_param("HistoryItemType")
        start = self._get_param("StartDate")
        end = self._get_param("EndDate")
        scan = self._get_param("ScanBy") or "TimestampDescending"
        max_records = int(self._get_param("MaxRecords") or 100)
        token = self._get_param("NextToken")
        items: list[dict[str, Any]] = []
        for alarm_name, hist in _history(self.cloudwatch_backend).items():
            if name and alarm_name != name:
                continue
            items.extend(hist)
        items = [
            i for i in items
            if i["AlarmType"] in types
            and (not item_type or i["HistoryItemType"] == item_type)
            and (start is None or i["Timestamp"] >= _naive(start))
            and (end is None or i["Timestamp"] <= _naive(end))
        ]
        items.sort(key=lambda i: i["Timestamp"], reverse=(scan != "TimestampAscending"))
        offset = int(token) if token and str(token).isdigit() else 0
        page = items[offset: offset + max_records]
        result: dict[str, Any] = {"AlarmHistoryItems": page}
        if offset + max_records < len(items):
            result["NextToken"] = str(offset + max_records)
        return ActionResult(result)

    CloudWatchResponse.describe_alarm_history = describe_alarm_history  # type: ignore[attr-defined]


def _naive(dt: Any) -> datetime:
    if isinstance(dt, datetime):
        return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt
    return utc(float(dt))


# --------------------------------------------------------------------------------------------
# The loop and the control API


class CloudWatchWorld:
    def __init__(self, world: Any, metric_period: float) -> None:
        self.world = world
        self.lock = health.moto_lock(world)
        self.period = max(0.2, float(metric_period))
        self.stop = threading.Event()
        self.published = 0
        self.thread = threading.Thread(target=self._run, name="world-cloudwatch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def _routes(self) -> None:
        # The server adds plug-ins' ROUTES to the front door; make sure ours are there even if
        # this world's server predates that (idempotent, cheap).
        fd = getattr(self.world, "frontdoor", None)
        if fd is not None:
            for r in ROUTES:
                if r not in fd.control_routes:
                    fd.control_routes.append(r)

    def _run(self) -> None:
        step = min(1.0, self.period)
        next_publish = math.floor(time.time() / self.period) * self.period + self.period
        last_trim = time.time()
        while True:
            now = time.time()
            wake = min(next_publish, math.floor(now / step) * step + step)
            if self.stop.wait(max(0.0, wake - now)):
                return
            now = time.time()
            self._routes()
            try:
                with self.lock:
                    while now >= next_publish:
                        self.published += publish(self.world, next_publish - self.period)
                        next_publish += self.period
                    evaluate_all(self.world, now)
                    if now - last_trim > 60:
                        trim(self.world, now)
                        last_trim = now
            except Exception:
                log.exception("cloudwatch tick failed")

    def status(self, st: dict[str, Any]) -> None:
        st["cloudwatch"] = {
            "metric_period": self.period,
            "datapoints_published": self.published,
            "forced_alarms": [{"region": r, "alarm": a, "state": s} for (r, a), s in sorted(FORCED.items())],
        }


def _alarm_route(world: Any) -> Any:
    def route(environ: dict[str, Any], raw: bytes) -> tuple[int, Any]:
        method = environ.get("REQUEST_METHOD", "GET")
        name = unquote(environ.get("PATH_INFO", "")[len("/_world/alarms/"):].rstrip("/"))
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            return 400, {"error": f"request body is not valid JSON: {e}"}
        region = (body.get("region") if isinstance(body, dict) else None) or world.settings.region
        if not name:
            return 200, {"forced": [{"region": r, "alarm": a, "state": s} for (r, a), s in sorted(FORCED.items())]}
        with world.lock:
            from moto.cloudwatch.models import cloudwatch_backends

            cw = dict.get(dict.get(cloudwatch_backends, world.settings.account, {}) or {}, region)
            alarm = cw.alarms.get(name) if cw is not None else None
            if method == "DELETE":
                was = FORCED.pop((region, name), None)
                if alarm is not None:
                    alarm._bakeryworld_evaluated_end = None  # evaluated again at the next tick
                return 200, {"alarm": name, "region": region, "cleared": was is not None}
            if method not in ("POST", "PUT"):
                return 405, {"error": f"{method} not allowed on /_world/alarms/<name>"}
            state = body.get("state") if isinstance(body, dict) else None
            if state not in STATES:
                return 400, {"error": f"state must be one of {', '.join(STATES)}"}
            if alarm is None:
                return 404, {"error": f"no alarm {name!r} in {region}"}
            FORCED[(region, name)] = state
            if alarm.state_value != state:
                set_state(
                    cw, alarm, state,
                    "Alarm state forced by the local world (scripts/world alarm); evaluation stops until cleared",
                    None,
                )
            return 200, {"alarm": name, "region": region, "state": state, "forced": True}

    return route


WORLD_CW: CloudWatchWorld | None = None
ROUTES: list[tuple[str, str, Any]] = []


def install(world: Any) -> CloudWatchWorld:
    global WORLD_CW
    health.moto_lock(world)
    _patch_moto()
    if on_probe not in health.PROBE_LISTENERS:
        health.PROBE_LISTENERS.append(on_probe)
    if WORLD_CW is None:
        period = getattr(world.settings, "metric_period", None) or getattr(world, "metric_period", None)
        WORLD_CW = CloudWatchWorld(world, float(period or DEFAULT_METRIC_PERIOD))
        WORLD_CW.start()
        world.status_hooks.append(WORLD_CW.status)
        route = _alarm_route(world)
        for method in ("GET", "POST", "PUT", "DELETE"):
            ROUTES.append((method, "/_world/alarms", route))
    return WORLD_CW
