"""DynamoDB fidelity patches (plug-in: `install(world)`).

What bakery relies on for leases with fencing tokens (the DynamoDB Lock Client's design), probed
on moto 5.2.5 (`tests/world/test_dynamodb.py` asserts each, as a boto3 caller sees it):

kept as moto serves it (it already behaves as AWS documents):
- conditional PutItem / UpdateItem / DeleteItem (`attribute_not_exists(pk)`, `#v = :v`,
  `#exp < :now`, `#owner = :me`) fail with `ConditionalCheckFailedException` (HTTP 400);
  `ReturnValuesOnConditionCheckFailure=ALL_OLD` puts the item as it was in the error's `Item`
  (absent when not asked, or when there was no item), as AWS does since June 2023;
- `ReturnValues=ALL_NEW` / `UPDATED_NEW`, `ADD` on a number (a monotonic counter: the fencing
  token), `GetItem` (always consistent here, which `ConsistentRead=true` asks for), `Query` /
  `Scan` with `FilterExpression`;
- TTL: moto never deletes expired items. AWS deletes them lazily ("typically within a few days
  of their expiration"; "items that have expired, but haven't yet been deleted by TTL, still
  appear in reads, queries, and scans": DynamoDB developer guide, *Working with TTL*), so
  keeping them is the faithful choice: bakery must compare expiry times itself;
- atomicity: every moto action runs under the world's moto lock (`World.install_moto_lock`),
  so two conditional writes on one key never interleave: exactly one of two racing
  `attribute_not_exists` puts wins.

patched here, each to documented AWS behaviour:
- `CreateTable` is asynchronous: "DynamoDB immediately returns a response with a TableStatus of
  CREATING. After the table is created, DynamoDB sets the TableStatus to ACTIVE. You can
  perform read and write operations only on an ACTIVE table" (API reference, CreateTable).
  moto answered `ACTIVE` at once. The world keeps a new table `CREATING` for the table delay
  (`Settings.table_delay`, `up --table-delay`, default 1 s). Meanwhile item reads and writes
  fail with `ResourceNotFoundException` ("the resource might not be specified correctly, or its
  status might not be ACTIVE", API reference, Common errors of GetItem/PutItem/...), and
  `DeleteTable`, `UpdateTable`, `UpdateTimeToLive` with `ResourceInUseException` (the API
  reference's example for it: "tried to delete a table currently in the CREATING state"; for
  UpdateTable / UpdateTimeToLive the exact code AWS picks is not documented as clearly: the
  world's choice).
- `UpdateTimeToLive`: "It can take up to one hour for the change to fully process. Any
  additional UpdateTimeToLive calls for the same table during this one hour duration result in
  a ValidationException" (API reference, UpdateTimeToLive). moto accepted every call. Enabling
  TTL that is already enabled (or disabling it when disabled) is a `ValidationException`
  (`TimeToLive is already enabled`) as AWS answers, so an idempotent set-up must read
  `DescribeTimeToLive` first.
"""

from __future__ import annotations

import time
from typing import Any

TTL_CHANGE_WINDOW = 3600.0  # "up to one hour" (UpdateTimeToLive)
DEFAULT_TABLE_DELAY = 1.0

# Item-level actions: on a table that is not ACTIVE they fail with ResourceNotFoundException.
DATA_ACTIONS = (
    "get_item", "put_item", "update_item", "delete_item", "query", "scan",
    "batch_get_item", "batch_write_item", "transact_get_items", "transact_write_items",
)
# Table-level changes: on a CREATING table they fail with ResourceInUseException.
CHANGE_ACTIONS = ("delete_table", "update_table", "update_time_to_live")

_INSTALLED = False
WORLD: Any = None


def table_delay() -> float:
    s = getattr(WORLD, "settings", None)
    v = getattr(s, "table_delay", None)
    return DEFAULT_TABLE_DELAY if v is None else float(v)


def table_status(table: Any) -> str:
    """`CREATING` until the table delay has passed since CreateTable, then moto's own."""
    until = getattr(table, "_world_active_at", None)
    if until is not None and time.time() < until:
        return "CREATING"
    return "ACTIVE"


def _tables_named(body: dict) -> list[str]:
    names = []
    if isinstance(body.get("TableName"), str):
        names.append(body["TableName"])
    req = body.get("RequestItems")
    if isinstance(req, dict):
        names.extend(req)
    for item in body.get("TransactItems") or []:
        if isinstance(item, dict):
            for op in item.values():
                if isinstance(op, dict) and isinstance(op.get("TableName"), str):
                    names.append(op["TableName"])
    return names


def _creating(handler: Any, names: list[str]) -> str | None:
    backend = handler.dynamodb_backend
    for n in names:
        try:
            t = backend.get_table(n)
        except Exception:
            continue  # moto answers a missing table itself
        if table_status(t) == "CREATING":
            return t.name
    return None


def _patch() -> None:
    from moto.dynamodb.exceptions import (
        MockValidationException,
        ResourceInUseException,
        ResourceNotFoundException,
    )
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.table import Table
    from moto.dynamodb.responses import DynamoHandler

    # --- CreateTable: CREATING for the table delay -----------------------------------------
    orig_create = DynamoDBBackend.create_table

    def create_table(self, name, *a, **kw):
        table = orig_create(self, name, *a, **kw)
        delay = table_delay()
        if delay > 0:
            table._world_active_at = time.time() + delay
        return table

    DynamoDBBackend.create_table = create_table  # type: ignore[method-assign]

    orig_describe = Table.describe

    def describe(self, base_key: str = "TableDescription"):
        out = orig_describe(self, base_key)
        d = out.get(base_key)
        if isinstance(d, dict) and "TableStatus" in d:
            d["TableStatus"] = table_status(self)
        return out

    Table.describe = describe  # type: ignore[method-assign]

    def gate(name: str, data: bool):
        orig = getattr(DynamoHandler, name)

        def action(self):
            t = _creating(self, _tables_named(self.body or {}))
            if t is not None:
                if data:
                    # "The resource might not be specified correctly, or its status might not
                    # be ACTIVE."
                    raise ResourceNotFoundException()
                raise ResourceInUseException(
                    f"Attempt to change a resource which is still in use: Table is being created: {t}"
                )
            return orig(self)

        action.__name__ = name
        action.__wrapped__ = orig  # type: ignore[attr-defined]
        setattr(DynamoHandler, name, action)

    for n in DATA_ACTIONS:
        gate(n, data=True)
    for n in CHANGE_ACTIONS:
        gate(n, data=False)

    # --- UpdateTimeToLive: one change per hour, no no-op changes ---------------------------
    orig_ttl = DynamoDBBackend.update_time_to_live

    def update_time_to_live(self, table_name: str, ttl_spec: dict):
        table = self.get_table(table_name)
        cur = getattr(table, "ttl", {}) or {}
        enabled = cur.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")
        want = ttl_spec.get("Enabled")
        if isinstance(want, str):
            want = want.lower() == "true"
        attr = ttl_spec.get("AttributeName")
        if want and enabled:
            if cur.get("AttributeName") not in (None, attr):
                raise MockValidationException(
                    f"TimeToLive is active on a different AttributeName: current AttributeName is {cur.get('AttributeName')}"
                )
            raise MockValidationException("TimeToLive is already enabled")
        if want is False and not enabled:
            raise MockValidationException("TimeToLive is already disabled")
        last = getattr(table, "_world_ttl_changed_at", None)
        if last is not None and time.time() - last < TTL_CHANGE_WINDOW:
            raise MockValidationException(
                "Time to live has been modified multiple times within a fixed interval"
            )
        res = orig_ttl(self, table_name, ttl_spec)
        table._world_ttl_changed_at = time.time()
        return res

    DynamoDBBackend.update_time_to_live = update_time_to_live  # type: ignore[method-assign]


def install(world: Any) -> None:
    global _INSTALLED, WORLD
    WORLD = world
    world.install_moto_lock()  # conditional writes are atomic under it
    if not _INSTALLED:
        _patch()
        world.status_hooks.append(lambda st: st.__setitem__("table_delay", table_delay()))
        _INSTALLED = True
