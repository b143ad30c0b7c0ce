"""Benchmark of several `bakery daemon`s sharing groups through a lease table (issue #14 part 7),
run by `scripts/bench-daemon --daemons N ...` against a running world with its stack.

Makes GROUPS x SIZE instances with benchlib.prep (the groups bench-daemon-NN, each with its own
target group; waves that do not fit in memory or do not get healthy end the scale-up, and the run
goes on with what was made, saying so), a lease table (`bakery init --lease-table`), and starts N
daemons sharing every group, each with its own access key and port. Measures:

  - convergence: time until every group has exactly one owner (the daemons' /metrics);
  - per daemon over --loops rounds: groups owned, API calls per round (Δ bakery_api_calls_total /
    Δ bakery_loops_total, lease calls excluded: DynamoDB goes around the daemon's call policy,
    counted separately from the world's call log), RSS (VmRSS, max), the effective interval;
  - detection: one app killed in a group of each daemon, from the kill to its "marked unhealthy"
    log line; target interval x threshold + the probe's timeout;
  - kill -9 of the daemon owning the most groups: time until its groups are owned again (goal
    TTL + 1 interval), and instances marked by more than one daemon (goal none);
  - a cut-off daemon (`/_world/partitions`) for 2 x TTL: mutating calls of its access key served
    after its lease ran out (goal none).

Prints a JSON line per phase and a summary; the fleet is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchlib as bl  # noqa: E402

MARKED = bl.MARKED


def say(msg: str) -> None:
    print(f"bench-daemon --daemons: {msg}", file=sys.stderr, flush=True)


def owned(m: dict | None) -> set[str]:
    return set() if not m else {g for g, v in m["groups"].items() if v.get("owned") == 1.0}


def world_call(method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(bl.endpoint() + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if raw.strip() else {}


class D:
    def __init__(self, i: int, bakery: str, scratch: Path, table: str, names: list[str], a) -> None:
        self.i = i
        self.name = f"d{i}"
        self.key = f"bench-share-{self.name}-{os.getpid()}"
        self.listen = f"127.0.0.1:{a.port0 + i}"
        cfg = scratch / f"{self.name}.toml"
        lines = [f'interval = "{a.interval}s"', f"unhealthy_threshold = {a.threshold}", f'listen = "{self.listen}"',
                 "[api]", f"rate = {a.api_rate}", f"burst = {int(a.api_rate * 2)}",
                 "[lease]", f'table = "{table}"', f'ttl = "{a.ttl}s"']
        for n in names:
            lines += ["[[group]]", f'name = "{n}"',
                      'probe = { type = "http", port = 8080, path = "/healthz", timeout = "1s" }']
        cfg.write_text("\n".join(lines) + "\n")
        self.log = scratch / f"{self.name}.log"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.key)
        self.p = subprocess.Popen([bakery, "daemon", "--log-format", "json", "--config", str(cfg)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        self.tail = bl.LogTail(self.log)
        self.rss_max = 0

    def m(self) -> dict | None:
        if self.p.poll() is not None:
            return None
        r = bl.scrape(self.listen)
        rss = bl.proc_status(self.p.pid, "VmRSS")
        if rss:
            self.rss_max = max(self.rss_max, rss)
        return r

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()


def wait(what: str, timeout: float, probe, every: float = 0.1):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = probe()
        if r:
            return r
        time.sleep(every)
    say(f"timed out after {timeout:.0f}s waiting for {what}")
    return None


def partitioned_ok(ds: list[D], names: list[str]):
    ms = [d.m() for d in ds]
    sets = [owned(m) for m in ms]
    allg = [g for s in sets for g in s]
    return (sets, ms) if sorted(allg) == sorted(names) else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemons", type=int, default=3)
    ap.add_argument("--groups", type=int, default=40)
    ap.add_argument("--size", type=int, default=25)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--threshold", type=int, default=2)
    ap.add_argument("--ttl", type=int, default=15)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--wave", type=int, default=5)
    ap.add_argument("--wave-timeout", type=float, default=300)
    ap.add_argument("--grace", type=int, default=10)
    ap.add_argument("--api-rate", type=float, default=20)
    ap.add_argument("--min-free-mb", type=int, default=3000)
    ap.add_argument("--port0", type=int, default=19700)
    ap.add_argument("--bakery", default=os.environ.get("BAKERY", "target/debug/bakery"))
    ap.add_argument("--reuse", help="the state.json of an earlier run whose fleet is still up: skip the scale-up")
    ap.add_argument("--keep", action="store_true",
                    help="leave the fleet up at the end (for --reuse; its state.json path is printed)")
    a = ap.parse_args()
    bakery = os.path.abspath(a.bakery)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-share-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    state_path = str(scratch / "state.json")
    out: dict = {"args": vars(a)}
    ds: list[D] = []
    try:
        say(f"fleet: {a.groups} groups x {a.size}")
        if a.reuse:
            state_path = a.reuse
        else:
            bl.prep(state_path, a.groups, a.size, a.wave, 5, False, a.grace, 1, a.wave_timeout, a.min_free_mb)
        st = bl.load_state(state_path)
        names = [g["name"] for g in st["groups"]]
        out["fleet"] = {"groups": len(names), "instances": len(names) * a.size, "limit": st.get("limit"),
                        "waves": st.get("waves")}
        say(f"fleet ready: {len(names)} groups, {len(names) * a.size} instances; limit: {st.get('limit')}")
        table = f"bench-share-{os.getpid()}"
        subprocess.run([bakery, "init", "--lease-table", table], check=True, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        ds = [D(i, bakery, scratch, table, names, a) for i in range(a.daemons)]
        r = wait("one owner per group", 300, lambda: partitioned_ok(ds, names)
                 if all((d.m() or {}).get("bakery_members_live") == a.daemons for d in ds) else None)
        out["converged_s"] = round(time.monotonic() - t0, 2) if r else None
        say(f"converged after {out['converged_s']}s")
        # Rounds: warm-up of 3, then --loops.
        base = [d.m() for d in ds]
        wait("warm-up", 600, lambda: all((d.m() or {}).get("bakery_loops_total", 0) >= (b or {}).get("bakery_loops_total", 0) + 3
                                         for d, b in zip(ds, base)), 0.5)
        before = [d.m() for d in ds]
        calls_before = [bl.calls_of_key(d.key) for d in ds]
        wait("measured rounds", 900, lambda: all((d.m() or {}).get("bakery_loops_total", 0) >= b["bakery_loops_total"] + a.loops
                                                 for d, b in zip(ds, before)), 0.5)
        after = [d.m() for d in ds]
        calls_after = [bl.calls_of_key(d.key) for d in ds]
        per = []
        for d, b, e, cb, ce in zip(ds, before, after, calls_before, calls_after):
            loops = e["bakery_loops_total"] - b["bakery_loops_total"]
            calls = sum(e["calls"].values()) - sum(b["calls"].values())
            ddb = sum(v for k, v in ce["counts"].items() if k.startswith("dynamodb:")) - \
                sum(v for k, v in cb["counts"].items() if k.startswith("dynamodb:"))
            per.append({"daemon": d.name, "groups_owned": int(e.get("bakery_groups_owned", 0)),
                        "instances_owned": int(sum(v.get("instances", 0) for v in e["groups"].values())),
                        "calls_per_round": round(calls / loops, 2) if loops else None,
                        "dynamodb_calls_per_round": round(ddb / loops, 2) if loops else None,
                        "effective_interval_s": e.get("bakery_effective_interval_seconds"),
                        "rss_mb": round(d.rss_max / 1024, 1)})
        out["per_daemon"] = per
        for p in per:
            say(json.dumps(p))
        # Detection: one kill in a group of each daemon.
        asg = bl.client("autoscaling")
        det = []
        for d, e in zip(ds, after):
            mine = sorted(owned(e))
            if not mine:
                continue
            g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[mine[0]])["AutoScalingGroups"][0]
            iid = [i["InstanceId"] for i in g["Instances"] if i["LifecycleState"] == "InService"][0]
            t_kill = time.time()
            bl.world_post(f"/_world/instances/{iid}/kill")
            def marked(d=d, iid=iid):
                d.tail.poll()
                return next((x for x in d.tail.lines if x.get("message") == MARKED and x.get("instance") == iid), None)
            line = wait(f"{d.name} to mark {iid}", 60, marked, 0.2)
            lat = round(bl.epoch(line["timestamp"]) - t_kill, 2) if line else None
            det.append({"daemon": d.name, "group": mine[0], "instance": iid, "latency_s": lat})
            say(f"detection {d.name}: {lat}s")
        out["detection"] = det
        out["detection_target_s"] = a.interval * a.threshold + 1.0
        # kill -9 the daemon owning the most groups.
        now = [d.m() for d in ds]
        victim = max(range(len(ds)), key=lambda k: len(owned(now[k])))
        vgroups = owned(now[victim])
        ds[victim].p.kill()
        ds[victim].p.wait()
        t_kill = time.monotonic()
        live = [d for k, d in enumerate(ds) if k != victim]
        r = wait("the killed daemon's groups owned again", 120, lambda: partitioned_ok(live, names), 0.1)
        took = round(time.monotonic() - t_kill, 2) if r else None
        out["kill9"] = {"daemon": ds[victim].name, "groups": len(vgroups), "owned_again_s": took,
                        "goal_s": a.ttl + a.interval}
        say(f"kill -9 {ds[victim].name} ({len(vgroups)} groups): owned again after {took}s (goal {a.ttl + a.interval}s)")
        # A cut-off for 2 x TTL, of the surviving daemon owning the most groups.
        if len(live) >= 2:
            now = [d.m() for d in live]
            k = max(range(len(live)), key=lambda j: len(owned(now[j])))
            cut = live[k]
            world_call("POST", "/_world/partitions", {"access_key": cut.key})
            t_cut = time.time()
            margin = min(a.ttl / 5, 5)
            time.sleep(2 * a.ttl)
            others = [d for d in live if d is not cut]
            all_owned = partitioned_ok(others, names) is not None
            world_call("DELETE", f"/_world/partitions/{cut.key}")
            t_heal = time.time()
            # Its lease ran out on its own clock at the latest TTL - margin after its last renewal,
            # which was before the cut.
            expired_at = t_cut + a.ttl - margin
            q = f"/_world/calls?access_key={cut.key}&since={expired_at}&mutating=true&served=true&limit=100000"
            served = [c for c in bl.world_get(q)["calls"] if c["t"] < t_heal]
            tried = bl.world_get(f"/_world/calls?access_key={cut.key}&since={t_cut}&served=false&limit=100000")["calls"]
            out["cutoff"] = {"daemon": cut.name, "seconds": 2 * a.ttl, "others_own_all": all_owned,
                             "mutating_served_after_expiry": len(served), "calls_refused_while_cut": len(tried)}
            say(json.dumps(out["cutoff"]))
        wait("the stack healthy again", 120, lambda: all(
            len([i for i in g["Instances"] if i["LifecycleState"] == "InService"]) >= a.size
            for g in asg.describe_auto_scaling_groups(AutoScalingGroupNames=names[:50])["AutoScalingGroups"]), 1.0)
        counts: dict[str, int] = {}
        for d in ds:
            d.tail.poll()
            for x in d.tail.lines:
                if x.get("message") == MARKED:
                    counts[x["instance"]] = counts.get(x["instance"], 0) + 1
        out["replaced_twice"] = sorted(i for i, n in counts.items() if n > 1)
        out["rss_mb_max"] = max(round(d.rss_max / 1024, 1) for d in ds)
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for d in ds:
            d.stop()
        if a.keep:
            say(f"fleet kept (--keep): rerun with --reuse {state_path}; a run without --keep deletes it")
        else:
            say("deleting the fleet")
            try:
                bl.delete_fleet(bl.load_state(state_path) if Path(state_path).exists() else {}, 300)
            except Exception as e:  # noqa: BLE001
                say(f"cleanup failed: {e}")


def _stop(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # TERM and INT (ignored by default in a background job) end the run through its cleanup.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(main())
