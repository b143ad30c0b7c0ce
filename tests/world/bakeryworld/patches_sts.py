"""STS fidelity patch (plug-in: `install(world)`): AssumeRole only of a role that exists and trusts
the caller.

moto 5.2.5 answers `AssumeRole` of any ARN: "the role does not need to exist" (its docstring),
credentials of the ARN's account come back for a role nobody made, whatever its trust policy.

AWS (STS API reference, AssumeRole; IAM user guide, "Granting a user permissions to switch
roles" and "IAM JSON policy elements: Principal"): the role's trust policy (its
`AssumeRolePolicyDocument`) must name the caller as a principal allowed `sts:AssumeRole`, and a
role that does not exist cannot trust anyone. Either way the call fails with `AccessDenied`, HTTP
403, "User: <caller ARN> is not authorized to perform: sts:AssumeRole on resource: <RoleArn>"
(the message AWS gives; it does not say which of the two it was).

What the world evaluates, per statement of the trust policy:

- `Effect` `Allow` / `Deny` (a matching `Deny` wins); `Action` / `NotAction` against
  `sts:AssumeRole` (wildcards, case-insensitive);
- `Principal`: `"*"` or `{"AWS": ...}` naming the caller's account (`"123456789012"` or
  `arn:aws:iam::123456789012:root`: any principal of that account), the caller's IAM user ARN,
  or for role-session credentials the role's ARN or the session's
  `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`, with `*`/`?` wildcards as in an ARN;
  `Service` / `Federated` principals never match an IAM caller; `NotPrincipal` statements are
  skipped;
- `Condition`: `StringEquals` / `StringNotEquals` / `StringLike` / `StringNotLike` (and their
  `IfExists` forms) on `sts:ExternalId`, `sts:RoleSessionName`, `aws:PrincipalAccount`,
  `aws:PrincipalArn`. A condition the world cannot evaluate (another key or operator) counts as
  met in an `Allow` and as not met in a `Deny`: the world never refuses because of something it
  does not evaluate.

Not evaluated: the caller's own identity policies (AWS also requires them to allow
`sts:AssumeRole` on the role for a cross-account call; moto enforces no IAM policy), permission
boundaries, SCPs, `AssumeRoleWithWebIdentity` / `AssumeRoleWithSAML` (unchanged).

The world's second account and its role `bakery-world-release` (trusting `123456789012`) are made
by `regions.ensure` at `up`, which first assumes that very role to get the second account's
credentials: so `install` creates the role in moto's IAM of that account when the server starts
(same name, trust policy and description as `regions._release_role` uses, which then finds it
and returns its ARN).
"""

from __future__ import annotations

import fnmatch
import json
import re
import uuid
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

_INSTALLED = False
WORLD: Any = None

ROLE_ARN_RE = re.compile(r"^arn:(aws[a-z-]*):iam::(\d{12}):role/(?:.*/)?([^/]+)$")
STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


def _list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def _wild(pattern: str, value: str, case: bool = True) -> bool:
    """IAM's `*` / `?` wildcards (no character classes)."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, 0 if case else re.IGNORECASE) is not None


def _action_matches(stmt: dict) -> bool:
    if "Action" in stmt:
        return any(_wild(a, "sts:AssumeRole", case=False) for a in _list(stmt["Action"]))
    if "NotAction" in stmt:
        return not any(_wild(a, "sts:AssumeRole", case=False) for a in _list(stmt["NotAction"]))
    return False


def _principal_matches(stmt: dict, caller: dict) -> bool:
    if "Principal" not in stmt:
        return False  # (NotPrincipal statements: skipped)
    p = stmt["Principal"]
    if p == "*":
        return True
    if not isinstance(p, dict):
        return False
    for want in _list(p.get("AWS")):
        if not isinstance(want, str):
            continue
        if want == "*":
            return True
        if want == caller["account"] or want == f"arn:{caller['partition']}:iam::{caller['account']}:root":
            return True
        if any(_wild(want, arn) for arn in caller["arns"]):
            return True
    return False


CONDITION_KEYS = {"sts:externalid", "sts:rolesessionname", "aws:principalaccount", "aws:principalarn"}


def _condition_met(stmt: dict, ctx: dict, allow: bool) -> bool:
    cond = stmt.get("Condition")
    if not cond:
        return True
    if not isinstance(cond, dict):
        return allow
    for op, block in cond.items():
        base = op[:-len("IfExists")] if op.endswith("IfExists") else op
        if_exists = op.endswith("IfExists")
        if base not in ("StringEquals", "StringNotEquals", "StringLike", "StringNotLike") or not isinstance(block, dict):
            if not allow:
                return False  # not evaluated: a Deny is not applied on it
            continue  # not evaluated: an Allow holds
        for key, wanted in block.items():
            k = key.lower()
            if k not in CONDITION_KEYS:
                if not allow:
                    return False
                continue
            values = ctx.get(k) or []
            wanted = [str(w) for w in _list(wanted)]
            if not values:
                if if_exists:
                    continue
                if base.startswith("StringNot"):
                    continue  # a missing key does not equal anything
                return False
            if base == "StringEquals":
                ok = any(v in wanted for v in values)
            elif base == "StringNotEquals":
                ok = not any(v in wanted for v in values)
            elif base == "StringLike":
                ok = any(_wild(w, v) for v in values for w in wanted)
            else:
                ok = not any(_wild(w, v) for v in values for w in wanted)
            if not ok:
                return False
    return True


def trust_allows(document: Any, caller: dict, ctx: dict) -> bool:
    """Whether a role trust policy lets `caller` call sts:AssumeRole (see module doc)."""
    if isinstance(document, str):
        text = document
        try:
            doc = json.loads(text)
        except ValueError:
            try:
                doc = json.loads(unquote(text))
            except ValueError:
                return False
    else:
        doc = document
    if not isinstance(doc, dict):
        return False
    allowed = False
    for stmt in _list(doc.get("Statement")):
        if not isinstance(stmt, dict) or not _action_matches(stmt) or not _principal_matches(stmt, caller):
            continue
        effect = stmt.get("Effect")
        if effect == "Deny" and _condition_met(stmt, ctx, allow=False):
            return False
        if effect == "Allow" and _condition_met(stmt, ctx, allow=True):
            allowed = True
    return allowed


def caller_of(resp: Any) -> dict:
    """The caller of an STS request: its ARN (as moto's GetCallerIdentity reports it), account,
    and the ARNs a trust policy may name for it."""
    from moto.iam.models import iam_backends

    access_key = resp.get_access_key()
    _uid, arn, account = resp.backend.get_caller_identity(access_key, resp.region)
    partition = arn.split(":")[1] if arn.startswith("arn:") else "aws"
    arns = [arn]
    assumed = resp.backend.get_assumed_role_from_access_key(access_key)
    if assumed is not None:
        arns.append(assumed.role_arn)  # a role session is matched by its role's ARN
    else:
        try:
            user = iam_backends[account][partition].get_user_from_access_key_id(access_key)
        except Exception:
            user = None
        if user is not None:
            arns.append(user.arn)
    return {"arn": arn, "account": account, "partition": partition, "arns": arns}


def refusal(role_arn: str, resp: Any) -> str | None:
    """None when AssumeRole of `role_arn` may go ahead, else the AccessDenied message."""
    from moto.iam.models import iam_backends

    caller = caller_of(resp)
    message = (f"User: {caller['arn']} is not authorized to perform: sts:AssumeRole on resource: "
               f"{role_arn}")
    m = ROLE_ARN_RE.match(role_arn or "")
    if not m:
        return message
    partition, account = m.group(1), m.group(2)
    role = None
    if account in iam_backends:  # (an account moto never saw has no roles)
        try:
            for r in list(iam_backends[account][partition].roles.values()):
                if r.arn == role_arn:
                    role = r
                    break
        except Exception:
            role = None
    if role is None:
        return message
    ctx = {
        "sts:externalid": [v for v in [resp._get_param("ExternalId")] if v is not None],
        "sts:rolesessionname": [v for v in [resp._get_param("RoleSessionName")] if v is not None],
        "aws:principalaccount": [caller["account"]],
        "aws:principalarn": caller["arns"][1:] or caller["arns"],
    }
    if not trust_allows(role.assume_role_policy_document, caller, ctx):
        return message
    return None


def access_denied(message: str) -> tuple[str, dict]:
    rid = str(uuid.uuid4())
    body = (f'<ErrorResponse xmlns="{STS_NS}"><Error><Type>Sender</Type><Code>AccessDenied</Code>'
            f"<Message>{escape(message)}</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>")
    return body, {"status": 403, "Content-Type": "text/xml", "x-amzn-RequestId": rid}


def _patch() -> None:
    from moto.sts.responses import TokenResponse

    original = TokenResponse.assume_role

    def assume_role(self: Any) -> Any:
        why = refusal(self._get_param("RoleArn"), self)
        if why is not None:
            return access_denied(why)
        return original(self)

    assume_role.__wrapped__ = original  # type: ignore[attr-defined]
    TokenResponse.assume_role = assume_role  # type: ignore[method-assign]


def ensure_second_account_role() -> None:
    """The second account's release role, as `regions._release_role` makes it (see module doc)."""
    from moto.iam.models import iam_backends

    from .regions import RELEASE_ROLE, SECOND_ACCOUNT

    iam = iam_backends[SECOND_ACCOUNT]["aws"]
    if any(r.name == RELEASE_ROLE for r in list(iam.roles.values())):
        return
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
    }]}
    iam.create_role(
        role_name=RELEASE_ROLE, assume_role_policy_document=json.dumps(trust), path="/",
        permissions_boundary=None, description="bakery world: the second account's release role",
        tags=[], max_session_duration="3600", linked_service=None,
    )


def install(world: Any) -> None:
    global _INSTALLED, WORLD
    WORLD = world
    if not _INSTALLED:
        _patch()
        _INSTALLED = True
    lock = getattr(world, "lock", None)
    if lock is not None:
        with lock:
            ensure_second_account_role()
    else:
        ensure_second_account_role()
