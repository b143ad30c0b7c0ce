"""SSM Run Command that really runs, in the instance's body.

moto 5.2.5 answers `SendCommand` with a fake `Success`, empty output, and (with no `Targets`)
an invocation on every instance in the region; it has no `ListCommandInvocations`,
`CancelCommand` or `DescribeInstanceInformation`. bakery's SSM communicator needs all of them to
behave as on AWS, so for the document `AWS-RunShellScript` the world:

- targets exactly the `InstanceIds` given, or the managed instances matching `Targets`
  (`InstanceIds`, `tag:<key>`, `tag-key`); an instance id that is not a running instance with an
  IAM instance profile is rejected with `InvalidInstanceId`, as AWS rejects an instance that is
  not a managed node;
- runs each invocation asynchronously via `Body.exec`: `Pending` until the body has booted (or
  `TimedOut` / `DeliveryTimedOut` once `TimeoutSeconds` of `SendCommand` pass first),
  `InProgress`, then `Success` (exit 0), `Failed` (its exit code is the `ResponseCode`),
  `TimedOut` (`executionTimeout`, default 3600 s) or `Cancelled` (`CancelCommand`);
- answers `GetCommandInvocation` with the real output, truncated at 24,000 characters as the API
  does, and `ListCommandInvocations` (`Details=true`: plugin `Output`, 2,500 characters, stdout
  then `----------ERROR-------` and stderr, as the console shows), `ListCommands` with the
  command's aggregate status and counts;
- lists in `DescribeInstanceInformation` every running instance that has an IAM instance profile
  association (on AWS the agent cannot register without one) and whose body has booted:
  `PingStatus` `Online` while the body is alive, `ConnectionLost` after it died;
- gives commands what the instance profile gives them on EC2, AWS access with the instance's
  role: the AWS CLI (`aws`, see `awscli.py`) on `PATH`, and the world's endpoint with
  credentials attributed to the role (`AWS_ACCESS_KEY_ID=role-<instance id>`) in the
  environment, since bodies have no instance metadata service.

Other documents keep moto's behaviour (with the targeting fix).
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from . import health

log = logging.getLogger("bakeryworld.ssm")

RUN_SHELL = "AWS-RunShellScript"
PLUGIN = "aws:runShellScript"
# GetCommandInvocation's StandardOutputContent / StandardErrorContent limit.
INLINE_LIMIT = 24000
# ListCommandInvocations' CommandPlugins[].Output limit.
PLUGIN_OUTPUT_LIMIT = 2500
DEFAULT_EXECUTION_TIMEOUT = 3600
DELIVERY_POLL_SECONDS = 0.25
AGENT_VERSION = "3.3.1142.0"

TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if t else ""


@dataclass
class Invocation:
    command_id: str
    instance_id: str
    requested: datetime.datetime
    status: str = "Pending"
    details: str = "Pending"
    response_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: datetime.datetime | None = None
    ended: datetime.datetime | None = None
    cancelled: bool = False
    proc: Any = None  # the running process (subprocess.Popen), leader of its process group
    body: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class RunSpec:
    commands: list[str]
    working_directory: str | None
    execution_timeout: int
    delivery_deadline: float  # monotonic


# command id -> instance id -> Invocation, for AWS-RunShellScript commands only
RUNS: dict[str, dict[str, Invocation]] = {}
_RUNS_LOCK = threading.Lock()
WORLD: Any = None
# The folder holding `aws` for commands (made by install(); on the host's root filesystem, which
# bodies see through their lowest layer).
AGENT_BIN: str = ""


# --------------------------------------------------------------------------------------------
# Which instances are managed nodes


def _instance_profile_of(ec2: Any, instance_id: str) -> Any:
    assoc = ec2.iam_instance_profile_associations.get(instance_id)
    return assoc.iam_instance_profile if assoc is not None else None


def _managed(ec2: Any, instance: Any) -> bool:
    return instance.state == "running" and _instance_profile_of(ec2, instance.id) is not None


def _ping_status(instance_id: str) -> str | None:
    """`Online`, `ConnectionLost`, or None when the agent never registered (not booted)."""
    body = WORLD.bodies.get(instance_id) if WORLD is not None else None
    if body is None:
        return None
    if body.alive():
        return "Online"
    status_check = getattr(body, "status_check", None)
    if status_check is not None and status_check() == "impaired":
        return "ConnectionLost"  # it was up once and died
    return None


def _all_instances(ec2: Any) -> list[Any]:
    return [i for r in ec2.reservations.values() for i in r.instances]


def _resolve_targets(ec2: Any, targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    chosen = [i for i in _all_instances(ec2) if _managed(ec2, i)]
    for t in targets:
        key, values = t.get("Key", ""), list(t.get("Values") or [])
        if key == "InstanceIds":
            chosen = [i for i in chosen if i.id in values]
        elif key.startswith("tag:"):
            name = key[4:]
            chosen = [i for i in chosen if _tags(i).get(name) in values]
        elif key == "tag-key":
            chosen = [i for i in chosen if any(v in _tags(i) for v in values)]
        else:
            raise _invalid_target(key)
    return [i.id for i in chosen]


def _tags(instance: Any) -> dict[str, str]:
    return {t["key"]: t["value"] for t in instance.get_tags()}


def _invalid_target(key: str) -> Exception:
    from moto.ssm.exceptions import ValidationException

    return ValidationException(f"Target key {key} is not supported by the local world")


def _invalid_instances(ids: list[str], account_id: str) -> Exception:
    from moto.ssm.exceptions import SSMException

    return SSMException(
        "InvalidInstanceId",
        f"Instances [[{', '.join(ids)}]] not in a valid state for account {account_id}",
    )


# --------------------------------------------------------------------------------------------
# Running one invocation


def _script(inv: Invocation, spec: RunSpec) -> str:
    base = f"/var/lib/amazon/ssm/{inv.instance_id}/document/orchestration/{inv.command_id}/awsrunShellScript/0"
    eof = "BAKERY_SSM_" + secrets.token_hex(8)
    body = "\n".join(spec.commands)
    workdir = spec.working_directory or base
    script = (
        f"mkdir -p {shlex.quote(base)} || exit 1\n"
        f"cat > {shlex.quote(base)}/_script.sh <<'{eof}'\n{body}\n{eof}\n"
        f"cd {shlex.quote(workdir)} || exit 1\n"
        # `timeout` (exec'd: the pid Body.exec started) leads the invocation's process group,
        # so a cancel or a timeout ends every child.
        f"exec timeout -k 2 {int(spec.execution_timeout)} /bin/sh {shlex.quote(base)}/_script.sh\n"
    )
    return script


def _run(inv: Invocation, spec: RunSpec) -> None:
    try:
        _run_inner(inv, spec)
    except Exception as e:  # the world must never leave an invocation InProgress forever
        log.exception("ssm invocation %s/%s crashed", inv.command_id, inv.instance_id)
        with inv.lock:
            if inv.status not in TERMINAL:
                inv.status, inv.details = "Failed", "Failed"
                inv.stderr = f"local world: {e}"
                inv.ended = _now()


def _run_inner(inv: Invocation, spec: RunSpec) -> None:
    while True:
        with inv.lock:
            if inv.cancelled:
                return
        body = WORLD.bodies.get(inv.instance_id) if WORLD is not None else None
        if body is not None and body.booted() and body.alive():
            break
        if time.monotonic() >= spec.delivery_deadline:
            with inv.lock:
                inv.status, inv.details = "TimedOut", "DeliveryTimedOut"
                inv.ended = _now()
            return
        time.sleep(DELIVERY_POLL_SECONDS)

    script = _script(inv, spec)
    with inv.lock:
        if inv.cancelled:
            return
        inv.status, inv.details = "InProgress", "InProgress"
        inv.started = _now()
        inv.body = body

    def started(proc: Any) -> None:
        with inv.lock:
            inv.proc = proc
            cancelled = inv.cancelled
        if cancelled:  # CancelCommand came after InProgress but before the process existed
            _terminate(proc)

    t0 = time.monotonic()
    env = {"BAKERY_WORLD_IP": body.ip, **_role_env(inv.instance_id)}
    rc, out, err = body.exec(script, env=env, timeout=spec.execution_timeout + 10, on_start=started)
    elapsed = time.monotonic() - t0
    with inv.lock:
        inv.ended = _now()
        inv.stdout = out.decode("utf-8", "replace") if isinstance(out, bytes) else str(out or "")
        inv.stderr = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err or "")
        if inv.cancelled:
            inv.status, inv.details = "Cancelled", "Cancelled"
            inv.response_code = -1
        elif rc in (124, 137, -9) and elapsed >= spec.execution_timeout:
            inv.status, inv.details = "TimedOut", "ExecutionTimedOut"
            inv.response_code = -1
            inv.stderr = _append_line(inv.stderr, "failed to run commands: exit status 124")
        else:
            inv.response_code = int(rc)
            if rc == 0:
                inv.status, inv.details = "Success", "Success"
            else:
                inv.status, inv.details = "Failed", "Failed"
                inv.stderr = _append_line(inv.stderr, f"failed to run commands: exit status {rc}")


def _role_env(instance_id: str) -> dict[str, str]:
    """What the instance profile gives a command on EC2: AWS access with the instance's role."""
    settings = WORLD.settings if WORLD is not None else None
    if settings is None or not AGENT_BIN:
        return {}
    from .bodies import BASE_PATH

    return {
        "PATH": f"{AGENT_BIN}:{BASE_PATH}",
        "AWS_ENDPOINT_URL": f"http://{settings.host}:{settings.port}",
        "AWS_REGION": settings.region,
        "AWS_DEFAULT_REGION": settings.region,
        "AWS_ACCESS_KEY_ID": f"role-{instance_id}",
        "AWS_SECRET_ACCESS_KEY": "world-instance-role",
    }


def _install_cli(world: Any) -> None:
    """`aws` for commands: the world's Python running awscli.py."""
    global AGENT_BIN
    base = getattr(world.settings, "base_dir", None)
    if base is None:
        return
    folder = Path(base) / "ssm-agent-bin"
    folder.mkdir(parents=True, exist_ok=True)
    # Bodies see the host's `/` but have their own /tmp (and /run): a repository or virtualenv
    # under /tmp is invisible to them. So the CLI, the interpreter it runs on and the
    # virtualenv's packages are put beside the world's state (hard links where the filesystem
    # allows), and the interpreter is the virtualenv's real one, not its symlink in the venv.
    module = folder / "awscli.py"
    shutil.copy2(Path(__file__).with_name("awscli.py"), module)
    site = next(
        (p for p in sys.path if p.endswith("site-packages") and Path(p, "boto3").is_dir()), None
    )
    packages = folder / "site-packages"
    if site is not None and not packages.is_dir():
        try:
            shutil.copytree(site, packages, copy_function=os.link)
        except OSError:
            shutil.rmtree(packages, ignore_errors=True)
            shutil.copytree(site, packages)
    cli = folder / "aws"
    cli.write_text(cli_script(os.path.realpath(sys.executable), packages, module))
    cli.chmod(0o755)
    AGENT_BIN = str(folder)


def cli_script(python: str, packages: Path, module: Path) -> str:
    """The `aws` shim: the world's interpreter where the body sees it, else the body's own
    `python3` (an interpreter on a mount of its own, such as a read-only bind mount of
    ~/.pyenv, is not in a body's overlay of `/`; the packages the CLI needs are pure Python)."""
    return (
        "#!/bin/sh\n"
        f"py={shlex.quote(python)}\n"
        '[ -x "$py" ] || py=$(command -v python3) || { echo "aws: no python3" >&2; exit 127; }\n'
        f'PYTHONPATH={shlex.quote(str(packages))} exec "$py" {shlex.quote(str(module))} "$@"\n'
    )


def _append_line(text: str, line: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + line


def _cancel(inv: Invocation) -> None:
    with inv.lock:
        if inv.status in TERMINAL:
            return
        inv.cancelled = True
        proc = inv.proc
        if inv.status == "Pending":
            inv.status, inv.details = "Cancelled", "Cancelled"
            inv.ended = _now()
            return
    # In progress: end the process group the world started for it. If the process does not
    # exist yet, `started` (in _run_inner) ends it as soon as it does.
    if proc is not None:
        _terminate(proc)


def _terminate(proc: Any) -> None:
    """SIGTERM to the invocation's process group (its leader is `proc`), unless it is over."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    except (OSError, ValueError):
        log.debug("cancel: process already gone", exc_info=True)


# --------------------------------------------------------------------------------------------
# API views


def _elapsed(inv: Invocation) -> str:
    if not inv.started:
        return ""
    end = inv.ended or _now()
    return f"PT{(end - inv.started).total_seconds():.3f}S"


def _invocation_view(cmd: Any, inv: Invocation) -> dict[str, Any]:
    with inv.lock:
        return {
            "CommandId": cmd.command_id,
            "InstanceId": inv.instance_id,
            "Comment": cmd.comment,
            "DocumentName": cmd.document_name,
            "DocumentVersion": "$DEFAULT",
            "PluginName": PLUGIN,
            "ResponseCode": inv.response_code,
            "ExecutionStartDateTime": _iso(inv.started),
            "ExecutionElapsedTime": _elapsed(inv),
            "ExecutionEndDateTime": _iso(inv.ended),
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputContent": inv.stdout[:INLINE_LIMIT],
            "StandardOutputUrl": "",
            "StandardErrorContent": inv.stderr[:INLINE_LIMIT],
            "StandardErrorUrl": "",
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }


def _list_view(cmd: Any, inv: Invocation, details: bool) -> dict[str, Any]:
    with inv.lock:
        out: dict[str, Any] = {
            "CommandId": cmd.command_id,
            "InstanceId": inv.instance_id,
            "InstanceName": "",
            "Comment": cmd.comment,
            "DocumentName": cmd.document_name,
            "DocumentVersion": "$DEFAULT",
            "RequestedDateTime": inv.requested,
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputUrl": "",
            "StandardErrorUrl": "",
            "CommandPlugins": [],
            "ServiceRole": cmd.service_role_arn,
            "NotificationConfig": {},
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }
        if details:
            text = inv.stdout
            if inv.stderr:
                text += "\n\n----------ERROR-------\n" + inv.stderr
            plugin: dict[str, Any] = {
                "Name": PLUGIN,
                "Status": inv.status,
                "StatusDetails": inv.details,
                "ResponseCode": inv.response_code,
                "Output": text[:PLUGIN_OUTPUT_LIMIT],
                "StandardOutputUrl": "",
                "StandardErrorUrl": "",
                "OutputS3Region": cmd.output_s3_region or "",
                "OutputS3BucketName": cmd.output_s3_bucket_name or "",
                "OutputS3KeyPrefix": cmd.output_s3_key_prefix or "",
            }
            if inv.started:
                plugin["ResponseStartDateTime"] = inv.started
            if inv.ended:
                plugin["ResponseFinishDateTime"] = inv.ended
            out["CommandPlugins"] = [plugin]
        return out


def _aggregate(invs: list[Invocation]) -> tuple[str, str, dict[str, int]]:
    statuses = [(i.status, i.details) for i in invs]
    counts = {
        "CompletedCount": sum(1 for s, _ in statuses if s in TERMINAL),
        "ErrorCount": sum(1 for s, d in statuses if s == "Failed" or (s == "TimedOut" and d != "DeliveryTimedOut")),
        "DeliveryTimedOutCount": sum(1 for _, d in statuses if d == "DeliveryTimedOut"),
    }
    if not invs:
        return "Success", "Success", counts
    if any(s not in TERMINAL for s, _ in statuses):
        if all(s == "Pending" for s, _ in statuses):
            return "Pending", "Pending", counts
        return "InProgress", "InProgress", counts
    kinds = {s for s, _ in statuses}
    if kinds == {"Success"}:
        return "Success", "Success", counts
    if "Cancelled" in kinds and kinds <= {"Cancelled", "Success"}:
        return "Cancelled", "Cancelled", counts
    if "Failed" in kinds:
        return "Failed", "Failed", counts
    if "TimedOut" in kinds:
        if counts["DeliveryTimedOutCount"] == len(invs):
            return "TimedOut", "DeliveryTimedOut", counts
        return "TimedOut", "TimedOut", counts
    return "Failed", "Failed", counts


# --------------------------------------------------------------------------------------------
# moto patches


def _param(params: dict[str, Any], name: str) -> list[str]:
    v = params.get(name)
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def _patch_moto() -> None:
    from moto.ssm import models as ssm_models
    from moto.ssm.models import Command, SimpleSystemManagerBackend
    from moto.ssm.responses import SimpleSystemManagerResponse
    from moto.core.responses import ActionResult, EmptyResult
    from moto.ec2 import ec2_backends

    if getattr(Command, "_bakeryworld_ssm", False):
        return
    Command._bakeryworld_ssm = True  # type: ignore[attr-defined]

    def _get_instance_ids_from_targets(self: Any) -> list[str]:
        ec2 = ec2_backends[self.account_id][self.backend_region]
        return _resolve_targets(ec2, self.targets)

    orig_send = SimpleSystemManagerBackend.send_command
    orig_response_object = Command.response_object
    orig_get_invocation = Command.get_invocation

    def send_command(self: Any, **kwargs: Any) -> Any:
        ec2 = ec2_backends[self.account_id][self.region_name]
        ids = list(kwargs.get("instance_ids") or [])
        if ids:
            bad = []
            for iid in ids:
                inst = ec2.get_instance_by_id(iid) if iid.startswith("i-") else None
                if inst is None or not _managed(ec2, inst):
                    bad.append(iid)
            if bad:
                raise _invalid_instances(bad, self.account_id)
        if not ids and not kwargs.get("targets"):
            from moto.ssm.exceptions import ValidationException

            raise ValidationException("Either InstanceIds or Targets must be specified")
        cmd = orig_send(self, **kwargs)
        if cmd.document_name != RUN_SHELL:
            return cmd
        params = cmd.parameters or {}
        commands = _param(params, "commands")
        workdir = (_param(params, "workingDirectory") or [None])[0] or None
        try:
            exec_timeout = int((_param(params, "executionTimeout") or [DEFAULT_EXECUTION_TIMEOUT])[0])
        except ValueError:
            from moto.ssm.exceptions import ValidationException

            raise ValidationException("executionTimeout must be a number of seconds")
        delivery = float(kwargs.get("timeout_seconds") or 3600)
        spec = RunSpec(commands, workdir, exec_timeout, time.monotonic() + delivery)
        invs = {iid: Invocation(cmd.command_id, iid, cmd.requested_date_time) for iid in cmd.instance_ids}
        with _RUNS_LOCK:
            RUNS[cmd.command_id] = invs
        cmd.target_count = len(invs)
        cmd._bakeryworld_fresh = True  # the SendCommand response itself says Pending, counts 0
        for inv in invs.values():
            threading.Thread(
                target=_run, args=(inv, spec), name=f"world-ssm-{inv.instance_id}", daemon=True
            ).start()
        return cmd

    def response_object(self: Any) -> dict[str, Any]:
        out = orig_response_object(self)
        invs = RUNS.get(self.command_id)
        if invs is None:
            return out
        if getattr(self, "_bakeryworld_fresh", False):
            self._bakeryworld_fresh = False
            out.update({"Status": "Pending", "StatusDetails": "Pending", "CompletedCount": 0,
                        "ErrorCount": 0, "DeliveryTimedOutCount": 0, "TargetCount": len(invs),
                        "DocumentVersion": "$DEFAULT"})
            return out
        status, details, counts = _aggregate(list(invs.values()))
        out.update(counts)
        out["Status"], out["StatusDetails"] = status, details
        out["TargetCount"] = len(invs)
        out["DocumentVersion"] = "$DEFAULT"
        return out

    def get_invocation(self: Any, instance_id: str, plugin_name: str | None) -> dict[str, Any]:
        invs = RUNS.get(self.command_id)
        if invs is None:
            return orig_get_invocation(self, instance_id, plugin_name)
        inv = invs.get(instance_id)
        if inv is None or (plugin_name is not None and plugin_name != PLUGIN):
            raise ssm_models.RESTError(
                "InvocationDoesNotExist",
                "An error occurred (InvocationDoesNotExist) when calling the GetCommandInvocation operation",
            )
        return _invocation_view(self, inv)

    Command._get_instance_ids_from_targets = _get_instance_ids_from_targets  # type: ignore[method-assign]
    Command.response_object = response_object  # type: ignore[method-assign]
    Command.get_invocation = get_invocation  # type: ignore[method-assign]
    SimpleSystemManagerBackend.send_command = send_command  # type: ignore[method-assign]

    # ---- actions moto lacks ----

    def list_command_invocations(self: Any) -> Any:
        command_id = self._get_param("CommandId")
        instance_id = self._get_param("InstanceId")
        details = bool(self._get_param("Details", False))
        cmds = self.ssm_backend.list_commands(command_id, instance_id)
        out = []
        for cmd in cmds:
            invs = RUNS.get(cmd.command_id)
            if invs is not None:
                for inv in invs.values():
                    if instance_id and inv.instance_id != instance_id:
                        continue
                    out.append(_list_view(cmd, inv, details))
            else:
                for raw in cmd.invocations:
                    if instance_id and raw["InstanceId"] != instance_id:
                        continue
                    fake = Invocation(cmd.command_id, raw["InstanceId"], cmd.requested_date_time,
                                      status=raw["Status"], details=raw["StatusDetails"], response_code=0)
                    out.append(_list_view(cmd, fake, details))
        return ActionResult({"CommandInvocations": out})

    def cancel_command(self: Any) -> Any:
        command_id = self._get_param("CommandId")
        instance_ids = self._get_param("InstanceIds") or []
        cmd = self.ssm_backend.get_command_by_id(command_id)
        invs = RUNS.get(cmd.command_id) or {}
        for iid, inv in invs.items():
            if not instance_ids or iid in instance_ids:
                _cancel(inv)
        return EmptyResult()

    def describe_instance_information(self: Any) -> Any:
        ec2 = ec2_backends[self.current_account][self.region]
        filters: dict[str, list[str]] = {}
        for f in self._get_param("InstanceInformationFilterList") or []:
            filters.setdefault(_FILTER_KEYS.get(f.get("key"), f.get("key")), []).extend(f.get("valueSet") or [])
        for f in self._get_param("Filters") or []:
            filters.setdefault(f.get("Key"), []).extend(f.get("Values") or [])
        out = []
        for inst in _all_instances(ec2):
            if not _managed(ec2, inst):
                continue
            ping = _ping_status(inst.id)
            if ping is None:
                continue
            if not _filters_match(filters, inst.id, ping, _tags(inst)):
                continue
            profile = _instance_profile_of(ec2, inst.id)
            role = ""
            roles = getattr(profile, "roles", None) or []
            if roles:
                role = getattr(roles[0], "name", "") or ""
            ip = inst.private_ip or ""
            out.append(
                {
                    "InstanceId": inst.id,
                    "PingStatus": ping,
                    "LastPingDateTime": _now(),
                    "AgentVersion": AGENT_VERSION,
                    "IsLatestVersion": True,
                    "PlatformType": "Linux",
                    "PlatformName": "Linux",
                    "PlatformVersion": "",
                    "IamRole": role,
                    "ResourceType": "EC2Instance",
                    "IPAddress": ip,
                    "ComputerName": "ip-" + ip.replace(".", "-") + ".ec2.internal",
                    "SourceId": inst.id,
                    "SourceType": "AWS::EC2::Instance",
                }
            )
        return ActionResult({"InstanceInformationList": out})

    SimpleSystemManagerResponse.list_command_invocations = list_command_invocations  # type: ignore[attr-defined]
    SimpleSystemManagerResponse.cancel_command = cancel_command  # type: ignore[attr-defined]
    SimpleSystemManagerResponse.describe_instance_information = describe_instance_information  # type: ignore[attr-defined]


_FILTER_KEYS = {
    "InstanceIds": "InstanceIds",
    "PingStatus": "PingStatus",
    "PlatformTypes": "PlatformTypes",
    "ResourceType": "ResourceType",
}


def _filters_match(filters: dict[str, list[str]], iid: str, ping: str, tags: dict[str, str]) -> bool:
    for key, values in filters.items():
        if key == "InstanceIds" and iid not in values:
            return False
        if key == "PingStatus" and ping not in values:
            return False
        if key in ("PlatformTypes", "PlatformType") and "Linux" not in values:
            return False
        if key == "ResourceType" and "EC2Instance" not in values:
            return False
        if key.startswith("tag:") and tags.get(key[4:]) not in values:
            return False
        if key == "tag-key" and not any(v in tags for v in values):
            return False
    return True


def install(world: Any) -> None:
    global WORLD
    WORLD = world
    health.moto_lock(world)
    _install_cli(world)
    _patch_moto()
