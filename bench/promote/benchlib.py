"""Helpers of scripts/bench-promote: the checks, cleanup and report that differ from
scripts/bench-build's (whose runner, settle, inventory and prefix-clash are reused from
bench/build/benchlib.py).

Run with the world's virtualenv python (boto3) and the world's env file exported
(AWS_ENDPOINT_URL, WORLD_*). Every address used is inside 127.0.0.0/8.

    benchlib.py check-recipes RECIPE PACKER_JSON
    benchlib.py cleanup BASELINE.json       (every region of WORLD_REGIONS)
    benchlib.py copy-floor RUNS.jsonl OUT.json  (the baked images' snapshot size; one CopyImage
                                                 per region, timed, for information)
    benchlib.py report RUNS.jsonl FLOOR.json LEFTOVERS.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
import tomllib
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("buildlib", HERE.parent / "build" / "benchlib.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)  # type: ignore[union-attr]

COPY_REGIONS = ["eu-west-1", "ap-northeast-2"]
PREFIX = "bench-promote-"


def die(msg: str, code: int = 1):
    print(f"bench-promote: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def ec2(region: str):
    import boto3

    return boto3.client(
        "ec2",
        endpoint_url=build.endpoint(),
        region_name=region,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )


def regions() -> list[str]:
    return os.environ.get("WORLD_REGIONS", "us-east-1").split(",")


def check_recipes(recipe: str, packer: str) -> None:
    """Both tools must do the same: the same command, the same regions, the same account."""
    r = tomllib.loads(Path(recipe).read_text())
    p = json.loads(Path(packer).read_text())
    r_shell = [x["inline"] for x in r.get("provisioner", []) if x.get("type") == "shell"]
    p_shell = [x["inline"] for x in p.get("provisioners", []) if x.get("type") == "shell"]
    if r_shell != p_shell or len(r_shell) != 1:
        die(f"{recipe} and {packer} must run the same shell command")
    b = p["builders"][0]
    d = r.get("distribute", {})
    if sorted(d.get("regions", [])) != sorted(b.get("ami_regions", [])) or sorted(d["regions"]) != sorted(COPY_REGIONS):
        die(f"{recipe} and {packer} must copy to {COPY_REGIONS}")
    if d.get("accounts") != ["{{var.account}}"] or b.get("ami_users") != ["{{user `account`}}"] \
            or b.get("snapshot_users") != ["{{user `account`}}"]:
        die(f"{recipe} and {packer} must share with the same account (launch and volume permission)")


def cleanup(baseline: dict) -> None:
    """Deregisters every benchmark AMI (and its snapshots) in every region."""
    known = set(baseline["images"])
    n = 0
    for region in regions():
        c = ec2(region)
        for img in c.describe_images(Owners=["self"])["Images"]:
            if img["ImageId"] in known or not img.get("Name", "").startswith(PREFIX):
                continue
            if img.get("DeregistrationProtection", "disabled") != "disabled":
                c.disable_image_deregistration_protection(ImageId=img["ImageId"])
            c.deregister_image(ImageId=img["ImageId"])
            for bdm in img.get("BlockDeviceMappings", []):
                snap = bdm.get("Ebs", {}).get("SnapshotId")
                if snap:
                    try:
                        c.delete_snapshot(SnapshotId=snap)
                    except Exception:  # noqa: BLE001  (already gone)
                        pass
            n += 1
    print(f"bench-promote: deregistered {n} benchmark AMI(s) and their snapshots in {len(regions())} regions",
          file=sys.stderr)


def copy_floor(runs_path: str) -> dict:
    """The size of the baked images' snapshot (read before the cleanup removes them), and, for
    information, one CopyImage of a baked image to each copy region at once, polled every
    10 ms until available: what the world's copies take when nobody waits longer."""
    manifest = None
    for ln in Path(runs_path).read_text().splitlines():
        r = json.loads(ln)
        if r["tool"] == "bakery" and r["ok"]:
            try:
                manifest = json.loads(Path(r["manifest"]).read_text())
                break
            except (OSError, ValueError):
                continue
    if manifest is None:
        die("no bakery run left a manifest to measure")
    home = manifest["region"]
    gib = ec2(home).describe_snapshots(SnapshotIds=manifest["snapshot_ids"][:1])["Snapshots"][0]["VolumeSize"]
    t0 = time.perf_counter()
    made = {}
    for region in COPY_REGIONS:
        made[region] = ec2(region).copy_image(SourceImageId=manifest["ami_id"], SourceRegion=home,
                                              Name=f"{PREFIX}floor-{os.getpid()}")["ImageId"]
    done: dict[str, float] = {}
    while len(done) < len(made):
        for region, image in made.items():
            if region in done:
                continue
            if ec2(region).describe_images(ImageIds=[image])["Images"][0]["State"] == "available":
                done[region] = time.perf_counter() - t0
        if time.perf_counter() - t0 > 120:
            die("the floor copies never became available")
        time.sleep(0.01)
    return {"copy_s": max(done.values()), "per_region_s": done, "baked_gib": gib}


def command_time(log: str) -> float | None:
    """The command's own duration, from the `BENCH_CMD 1 start end` line it prints."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None
    m = build.BENCH_RE.search(text)
    return float(m.group(3)) - float(m.group(2)) if m else None


def epoch(rfc3339: str) -> float:
    return build.epoch(rfc3339)


def promotion_tail(r: dict) -> float | None:
    """For a bakery run: from the image being available (the end of its create_image step) to
    the end of the run (copies, publication, manifest)."""
    m = r.get("manifest_data")
    if not m:
        return None
    step = next((s for s in m["steps"] if s["name"] == "create_image"), None)
    if step is None:
        return None
    return r["t0"] + r["wall_s"] - (epoch(step["started_at"]) + step["duration_s"])


def promotion_marks(r: dict) -> tuple[float, float] | None:
    """For a bakery run, from its JSON events (each log line starts with the epoch time it was
    read): (the image created -> the last CopyImage answered, minus the snapshot delay: how long
    the copies waited for the image and their own calls; the last copy available -> the command
    done: publication, manifest, exit)."""
    created = copied = available = None
    try:
        lines = Path(r["log"]).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for ln in lines:
        ts, _, rest = ln.partition(" ")
        if not rest.startswith("{"):
            continue
        try:
            e = json.loads(rest)
        except ValueError:
            continue
        t = float(ts)
        if e.get("event") == "resource_created" and e.get("kind") == "image":
            created = t
        elif e.get("event") == "resource_created" and str(e.get("kind", "")).startswith("image copy in"):
            copied = t
        elif e.get("event") == "copy_progress" and e.get("percent") == 100:
            available = t
    if None in (created, copied, available):
        return None
    snap = float(os.environ["WORLD_SNAPSHOT_DELAY"])
    return copied - created - snap, r["t0"] + r["wall_s"] - available


def snapshot_gib(r: dict) -> int | None:
    m = r.get("manifest_data")
    if not m:
        return None
    return ec2(m["region"]).describe_snapshots(SnapshotIds=m["snapshot_ids"][:1])["Snapshots"][0]["VolumeSize"]


def report(runs_path: str, floor_path: str, left_path: str) -> int:
    runs = [json.loads(ln) for ln in Path(runs_path).read_text().splitlines() if ln.strip()]
    fl = json.loads(Path(floor_path).read_text()) if Path(floor_path).exists() else {}
    left = json.loads(Path(left_path).read_text()) if Path(left_path).exists() else None
    boot = float(os.environ["WORLD_BOOT_DELAY"])
    snap = float(os.environ["WORLD_SNAPSHOT_DELAY"])
    per_gib = float(os.environ["WORLD_COPY_DELAY"])
    for r in runs:
        r["own"] = command_time(r["log"]) if r["ok"] else None
        r["manifest_data"] = None
        if r["tool"] == "bakery" and r["ok"]:
            try:
                r["manifest_data"] = json.loads(Path(r["manifest"]).read_text())
            except (OSError, ValueError):
                r["ok"], r["error"] = False, f"no readable manifest at {r['manifest']}"
            else:
                regions_made = sorted(r["manifest_data"].get("regions", {}))
                if regions_made != sorted(COPY_REGIONS + [r["manifest_data"]["region"]]):
                    r["ok"], r["error"] = False, f"the manifest names regions {regions_made}"
    bk = [r for r in runs if r["tool"] == "bakery"]
    pk = [r for r in runs if r["tool"] == "packer"]
    bk_ok = [r for r in bk if r["ok"]]
    pk_ok = [r for r in pk if r["ok"]]
    rc = 0
    med = build.med
    fmt = build.fmt

    print()
    print("== runs (wall time of the whole command, alternating) ==")
    print(f"  {'#':>2}  {'tool':<6}  {'wall':>8}  {'command':>8}  result")
    for r in runs:
        res = "ok" if r["ok"] else f"FAILED ({r.get('error') or 'exit ' + str(r['rc'])})"
        print(f"  {r['i']:>2}  {r['tool']:<6}  {fmt(r['wall_s'])}  {fmt(r['own'])}  {res}")
    for r in runs:
        if not r["ok"]:
            print(f"\n  run {r['i']} ({r['tool']}) failed; last lines of {r['log']}:")
            print(build.tail(r["log"]))
            rc = 1

    bmed = med([r["wall_s"] for r in bk_ok])
    pmed = med([r["wall_s"] for r in pk_ok])
    own = med([r["own"] for r in bk_ok])
    gib = fl.get("baked_gib")
    copy = per_gib * gib if gib is not None else None
    floor_s = boot + snap + own + copy if (own is not None and copy is not None) else None

    print()
    print("== the floor (what no tool can avoid) ==")
    print(f"  boot delay (WORLD_BOOT_DELAY)             {fmt(boot)}")
    print(f"  snapshot delay (WORLD_SNAPSHOT_DELAY)     {fmt(snap)}")
    print(f"  the command's own time                    {fmt(own)}   median over bakery runs, on the instance")
    print(f"  the slowest copy (the copies run at once) {fmt(copy)}   WORLD_COPY_DELAY {per_gib:g} s/GiB x "
          f"{gib if gib is not None else '?'} GiB (the image's snapshot)")
    print(f"  floor                                     {fmt(floor_s)}")
    if fl.get("copy_s") is not None:
        print(f"  for information, two copies of a baked image at once, CopyImage to `available` polled "
              f"every 10 ms: slowest {fl['copy_s']:.2f} s")

    if bk_ok:
        print()
        print("== bakery (medians over runs) ==")
        for name in ("connect", "create_image", "cleanup_temporaries"):
            vals = [next((s["duration_s"] for s in r["manifest_data"]["steps"] if s["name"] == name), None)
                    for r in bk_ok]
            print(f"  step {name:<30} {fmt(med(vals))}")
        tails = [promotion_tail(r) for r in bk_ok]
        print(f"  create_image done -> command done     {fmt(med(tails))}   "
              f"(copies, publication, manifest; the copy alone is {fmt(copy).strip()})")
        marks = [x for x in (promotion_marks(r) for r in bk_ok) if x]
        if marks:
            print(f"  image created + snapshot delay -> last CopyImage answered  {fmt(med([m[0] for m in marks]))}"
                  "   (the image seen available, the copies' checks and calls)")
            print(f"  last copy seen available -> command done                   {fmt(med([m[1] for m in marks]))}"
                  "   (shares, records, manifest, exit)")

    phases = [x for x in (build.packer_phases(r) for r in pk_ok) if x]
    if phases:
        print()
        print("== Packer's phases (from its progress lines; median over runs) ==")
        for k, (label, _) in enumerate(build.PACKER_MARKS):
            print(f"  {label:<44}  {fmt(med([p[k] for p in phases]))}")

    print()
    print("== result ==")
    print(f"  bakery median  {fmt(bmed)}   ({len(bk_ok)} of {len(bk)} runs ok)")
    if pk_ok:
        print(f"  packer median  {fmt(pmed)}   ({len(pk_ok)} of {len(pk)} runs ok)")
    else:
        print("  packer median        -    (Packer made no successful run; see above)")
    ratio = bmed / pmed if (bmed and pmed) else None
    overhead = bmed - floor_s if (bmed is not None and floor_s is not None) else None
    print(f"  ratio bakery/packer  {ratio:.3f}" if ratio is not None else "  ratio bakery/packer      -")
    print(f"  bakery's overhead over the floor  {fmt(overhead)}   (bakery median - floor)")
    t1 = "PASS" if ratio is not None and ratio <= 0.5 else ("MISS" if ratio is not None else "n/a ")
    t2 = "PASS" if overhead is not None and overhead < 0.5 else ("MISS" if overhead is not None else "n/a ")
    print(f"  [{t1}] bakery's median at most half of Packer's"
          + (f" ({bmed:.2f} s vs {pmed / 2:.2f} s)" if ratio is not None else ""))
    print(f"  [{t2}] bakery's overhead over the floor (boot + snapshot + command + slowest copy) under 0.5 s"
          + (f" ({overhead:.2f} s)" if overhead is not None else ""))

    print()
    print("== leftovers after all runs (boto3 against the world) ==")
    if left is None:
        print("  not checked")
        rc = 1
    else:
        n = sum(len(v) for v in left.values())
        for k, v in left.items():
            print(f"  {k:<26} {len(v)}" + (f"  {', '.join(v)}" if v else ""))
        print(f"  leftovers: {n}")
        if n:
            rc = 1
    return rc


def leftovers(baseline: dict) -> dict:
    left = build.leftovers(baseline)
    # Bodies of instances that ran before (a `--stack` world's group) are not the benchmark's.
    left["bodies"] = [b for b in left["bodies"] if b not in baseline["instances"]]
    # Copies of failed runs in the other regions (the cleanup removed the benchmark's own).
    for region in regions():
        imgs = [i["ImageId"] for i in ec2(region).describe_images(Owners=["self"])["Images"]
                if i.get("Name", "").startswith(PREFIX) and i["ImageId"] not in baseline["images"]]
        left[f"images in {region}"] = imgs
    return left


def main(argv: list[str]) -> int:
    if not argv:
        die(__doc__.strip(), 2)
    cmd, args = argv[0], argv[1:]
    if cmd == "check-recipes":
        check_recipes(*args)
    elif cmd == "cleanup":
        cleanup(json.loads(Path(args[0]).read_text()))
    elif cmd == "copy-floor":
        Path(args[1]).write_text(json.dumps(copy_floor(args[0])))
    elif cmd == "leftovers":
        Path(args[1]).write_text(json.dumps(leftovers(json.loads(Path(args[0]).read_text()))))
    elif cmd == "report":
        return report(*args)
    else:
        # The runner and the rest: bench/build/benchlib.py's.
        return build.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
