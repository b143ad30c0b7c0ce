"""DynamoDB as bakery's leases use it (the DynamoDB Lock Client's design: a lease item per
key, conditional writes, an ADD counter as the fencing token, an expiry the caller compares
itself). Each test asserts what a boto3 caller sees, as AWS documents it; those marked
*patched* failed on moto 5.2.5 alone (see bakeryworld/patches_dynamodb.py)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import err_of, wait_for


@pytest.fixture(scope="module")
def ddb(world):
    return world.client("dynamodb")


def make_table(ddb, wait: bool = True) -> str:
    name = f"leases-{uuid.uuid4().hex[:10]}"
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    if wait:
        wait_for(lambda: ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE",
                 timeout=30, what=f"{name} ACTIVE")
    return name


@pytest.fixture
def table(ddb):
    name = make_table(ddb)
    yield name
    ddb.delete_table(TableName=name)


def S(v):
    return {"S": v}


def N(v):
    return {"N": str(v)}


def ccf(fn):
    """The ConditionalCheckFailedException's response, or fail."""
    with pytest.raises(ClientError) as ei:
        fn()
    r = ei.value.response
    assert r["Error"]["Code"] == "ConditionalCheckFailedException", r
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 400
    return r


# ---------------------------------------------------------------------------- table set-up
def test_create_table_is_creating_then_active(ddb):
    """*patched*: CreateTable answers CREATING; item calls fail with ResourceNotFoundException
    until the table is ACTIVE (moto: ACTIVE at once)."""
    name = f"leases-{uuid.uuid4().hex[:10]}"
    r = ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    try:
        assert r["TableDescription"]["TableStatus"] == "CREATING"
        t = ddb.describe_table(TableName=name)["Table"]
        assert t["TableStatus"] == "CREATING"
        assert t["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
        assert t["AttributeDefinitions"] == [{"AttributeName": "pk", "AttributeType": "S"}]
        assert t["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert err_of(lambda: ddb.put_item(TableName=name, Item={"pk": S("a")})) == ("ResourceNotFoundException", 400)
        assert err_of(lambda: ddb.get_item(TableName=name, Key={"pk": S("a")})) == ("ResourceNotFoundException", 400)
        assert err_of(lambda: ddb.update_time_to_live(
            TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": "exp"}
        )) == ("ResourceInUseException", 400)
        # boto3's own waiter (DescribeTable until ACTIVE) is what a caller uses
        ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        assert ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE"
        ddb.put_item(TableName=name, Item={"pk": S("a")})
        assert ddb.get_item(TableName=name, Key={"pk": S("a")})["Item"] == {"pk": S("a")}
        assert err_of(lambda: ddb.create_table(
            TableName=name, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
        )) == ("ResourceInUseException", 400)
    finally:
        wait_for(lambda: ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE", timeout=30)
        ddb.delete_table(TableName=name)


def test_ttl_enable_describe_and_once_per_hour(ddb, table):
    """UpdateTimeToLive/DescribeTimeToLive; *patched*: a second change within the hour, or enabling
    what is enabled, is a ValidationException (moto accepted both)."""
    assert ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]["TimeToLiveStatus"] == "DISABLED"
    r = ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "exp"})
    assert r["TimeToLiveSpecification"] == {"Enabled": True, "AttributeName": "exp"}
    d = ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert d == {"TimeToLiveStatus": "ENABLED", "AttributeName": "exp"}
    e = err_of(lambda: ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "exp"}))
    assert e == ("ValidationException", 400)
    e = err_of(lambda: ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": False, "AttributeName": "exp"}))
    assert e == ("ValidationException", 400)
    with pytest.raises(ClientError) as ei:
        ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": False, "AttributeName": "exp"})
    assert "multiple times" in ei.value.response["Error"]["Message"]
    assert ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]["TimeToLiveStatus"] == "ENABLED"


def test_expired_items_stay_readable(ddb, table):
    """AWS deletes expired items lazily (days); until then reads, queries and scans return
    them. moto never deletes them: kept, so bakery must compare expiry itself."""
    ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "exp"})
    past = int(time.time()) - 3600
    ddb.put_item(TableName=table, Item={"pk": S("lease#a"), "owner": S("old"), "exp": N(past)})
    # the item stays readable (read repeatedly for 1.5 s: no early deletion)
    deadline = time.time() + 1.5
    while time.time() < deadline:
        got = ddb.get_item(TableName=table, Key={"pk": S("lease#a")}, ConsistentRead=True)
        assert got["Item"]["exp"] == N(past)
        time.sleep(0.1)
    q = ddb.query(TableName=table, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": S("lease#a")})
    assert q["Count"] == 1
    s = ddb.scan(TableName=table, FilterExpression="#e < :now", ExpressionAttributeNames={"#e": "exp"},
                 ExpressionAttributeValues={":now": N(int(time.time()))})
    assert [i["pk"]["S"] for i in s["Items"]] == ["lease#a"]


# ---------------------------------------------------------------------------- conditional writes
def test_conditional_put_and_all_old_on_failure(ddb, table):
    item = {"pk": S("lease#g"), "owner": S("A"), "v": N(1), "exp": N(100)}
    ddb.put_item(TableName=table, Item=item, ConditionExpression="attribute_not_exists(pk)")
    # without ReturnValuesOnConditionCheckFailure: no Item in the error
    r = ccf(lambda: ddb.put_item(TableName=table, Item={"pk": S("lease#g"), "owner": S("B")},
                                 ConditionExpression="attribute_not_exists(pk)"))
    assert "Item" not in r
    assert r["Error"]["Message"] == "The conditional request failed"
    # with ALL_OLD: the item as it was
    r = ccf(lambda: ddb.put_item(TableName=table, Item={"pk": S("lease#g"), "owner": S("B")},
                                 ConditionExpression="attribute_not_exists(pk)",
                                 ReturnValuesOnConditionCheckFailure="ALL_OLD"))
    assert r["Item"] == item
    # no item at all: nothing to return
    r = ccf(lambda: ddb.put_item(TableName=table, Item={"pk": S("lease#none"), "owner": S("B")},
                                 ConditionExpression="#o = :me", ExpressionAttributeNames={"#o": "owner"},
                                 ExpressionAttributeValues={":me": S("B")},
                                 ReturnValuesOnConditionCheckFailure="ALL_OLD"))
    assert "Item" not in r
    # PutItem ReturnValues=ALL_OLD on success
    old = ddb.put_item(TableName=table, Item={"pk": S("lease#g"), "owner": S("A"), "v": N(2), "exp": N(100)},
                       ConditionExpression="#v = :v", ExpressionAttributeNames={"#v": "v"},
                       ExpressionAttributeValues={":v": N(1)}, ReturnValues="ALL_OLD")
    assert old["Attributes"] == item


def test_lease_takeover_renew_release_with_fencing(ddb, table):
    """The lock client's moves: acquire if absent or expired (ADD the fencing token), renew
    if mine, release if mine; each loser sees the holder in the error's Item."""
    def acquire(me: str, now: int, ttl: int = 10):
        return ddb.update_item(
            TableName=table, Key={"pk": S("lease#grp")},
            UpdateExpression="SET #o = :me, #e = :exp ADD #f :one",
            ConditionExpression="attribute_not_exists(pk) OR #e < :now",
            ExpressionAttributeNames={"#o": "owner", "#e": "exp", "#f": "fence"},
            ExpressionAttributeValues={":me": S(me), ":exp": N(now + ttl), ":now": N(now), ":one": N(1)},
            ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )

    r = acquire("A", now=1000)
    assert r["Attributes"]["owner"] == S("A") and r["Attributes"]["fence"] == N(1)
    # B cannot take an unexpired lease; it learns who holds it and until when
    e = ccf(lambda: acquire("B", now=1005))
    assert e["Item"]["owner"] == S("A") and e["Item"]["exp"] == N(1010) and e["Item"]["fence"] == N(1)
    # A renews (UPDATED_NEW returns only what changed)
    r = ddb.update_item(
        TableName=table, Key={"pk": S("lease#grp")}, UpdateExpression="SET #e = :exp",
        ConditionExpression="#o = :me", ExpressionAttributeNames={"#o": "owner", "#e": "exp"},
        ExpressionAttributeValues={":me": S("A"), ":exp": N(1020)}, ReturnValues="UPDATED_NEW",
    )
    assert r["Attributes"] == {"exp": N(1020)}
    # expired: B takes over, the fencing token goes up
    r = acquire("B", now=1030)
    assert r["Attributes"]["owner"] == S("B") and r["Attributes"]["fence"] == N(2)
    # A's stale renewal and release both fail
    ccf(lambda: ddb.update_item(
        TableName=table, Key={"pk": S("lease#grp")}, UpdateExpression="SET #e = :exp",
        ConditionExpression="#o = :me", ExpressionAttributeNames={"#o": "owner", "#e": "exp"},
        ExpressionAttributeValues={":me": S("A"), ":exp": N(1050)},
    ))
    e = ccf(lambda: ddb.delete_item(
        TableName=table, Key={"pk": S("lease#grp")}, ConditionExpression="#o = :me",
        ExpressionAttributeNames={"#o": "owner"}, ExpressionAttributeValues={":me": S("A")},
        ReturnValuesOnConditionCheckFailure="ALL_OLD",
    ))
    assert e["Item"]["owner"] == S("B")
    # B releases
    r = ddb.delete_item(
        TableName=table, Key={"pk": S("lease#grp")}, ConditionExpression="#o = :me",
        ExpressionAttributeNames={"#o": "owner"}, ExpressionAttributeValues={":me": S("B")}, ReturnValues="ALL_OLD",
    )
    assert r["Attributes"]["fence"] == N(2)
    assert "Item" not in ddb.get_item(TableName=table, Key={"pk": S("lease#grp")}, ConsistentRead=True)


def test_add_counter_is_monotonic(ddb, table):
    vals = []
    for _ in range(5):
        r = ddb.update_item(TableName=table, Key={"pk": S("fence")}, UpdateExpression="ADD #n :one",
                            ExpressionAttributeNames={"#n": "n"}, ExpressionAttributeValues={":one": N(1)},
                            ReturnValues="UPDATED_NEW")
        vals.append(int(r["Attributes"]["n"]["N"]))
    assert vals == [1, 2, 3, 4, 5]


def test_query_and_scan_with_filters(ddb, table):
    for i, owner in enumerate(["A", "B", "A"]):
        ddb.put_item(TableName=table, Item={"pk": S(f"lease#{i}"), "owner": S(owner), "exp": N(100 + i)})
    s = ddb.scan(TableName=table, FilterExpression="#o = :me", ExpressionAttributeNames={"#o": "owner"},
                 ExpressionAttributeValues={":me": S("A")}, ConsistentRead=True)
    assert sorted(i["pk"]["S"] for i in s["Items"]) == ["lease#0", "lease#2"]
    assert s["ScannedCount"] == 3
    q = ddb.query(TableName=table, KeyConditionExpression="pk = :p", FilterExpression="#e < :t",
                  ExpressionAttributeNames={"#e": "exp"}, ExpressionAttributeValues={":p": S("lease#1"), ":t": N(101)})
    assert q["Count"] == 0 and q["ScannedCount"] == 1


# ---------------------------------------------------------------------------- concurrency
def test_racing_conditional_puts_exactly_one_wins(world, table):
    """Two clients put the same new key with attribute_not_exists at the same moment: exactly
    one wins, every time (the world's moto lock makes each conditional write atomic)."""
    clients = [world.client("dynamodb", access_key=f"AKIDRACE{i}") for i in range(2)]
    trials = 60
    for t in range(trials):
        key = f"race#{t}"
        start = threading.Barrier(2)
        won: list[str] = []
        lost: list[str] = []

        def go(i: int):
            start.wait()
            try:
                clients[i].put_item(TableName=table, Item={"pk": S(key), "owner": S(f"c{i}")},
                                    ConditionExpression="attribute_not_exists(pk)")
                won.append(f"c{i}")
            except ClientError as e:
                assert e.response["Error"]["Code"] == "ConditionalCheckFailedException"
                lost.append(f"c{i}")

        th = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for x in th:
            x.start()
        for x in th:
            x.join()
        assert len(won) == 1 and len(lost) == 1, (t, won, lost)
        item = clients[0].get_item(TableName=table, Key={"pk": S(key)}, ConsistentRead=True)["Item"]
        assert item["owner"] == S(won[0])


def test_racing_fencing_increments_are_not_lost(world, table):
    """Eight threads ADD 1 twenty times each: the counter ends at 160 and every answer is unique."""
    seen: list[int] = []
    lock = threading.Lock()

    def go(i: int):
        c = world.client("dynamodb", access_key=f"AKIDADD{i}")
        for _ in range(20):
            r = c.update_item(TableName=table, Key={"pk": S("fence")}, UpdateExpression="ADD #n :one",
                              ExpressionAttributeNames={"#n": "n"}, ExpressionAttributeValues={":one": N(1)},
                              ReturnValues="UPDATED_NEW")
            with lock:
                seen.append(int(r["Attributes"]["n"]["N"]))

    th = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    assert sorted(seen) == list(range(1, 161))
