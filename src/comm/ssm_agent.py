# bakery's helper on the build instance, sent inside an SSM command (`python3 -`) when the bake has
# secrets: the secret values never travel through SSM, only where to read them. It reads them
# itself with the instance's role (the AWS CLI, `secretsmanager get-secret-value`), puts them where
# bakery left placeholders (environment values, a rendered template, the staged script), and runs
# the provisioner with its output redacted here, before the SSM agent reads it: SSM stores the
# output (GetCommandInvocation, ListCommandInvocations) and anyone allowed to list commands could
# read it. The redaction mirrors bakery's own (bakery_core::secret): plain, split across lines,
# base64 (standard, URL-safe, any alignment), hex, JSON-escaped, URL-encoded (either case, `+`).
# Python 3.6 or later, standard library only. Nothing here prints a secret value.
import base64
import json
import os
import re
import selectors
import subprocess
import sys
from array import array

MASK = b"[REDACTED]"
MIN_SECRET_LEN = 4
# Exit status when this helper (not the provisioner) fails; bakery names the cause from stderr.
HELPER_FAILED = 97


def fail(message):
    sys.stderr.write("bakery: " + message + "\n")
    sys.stderr.flush()
    sys.exit(HELPER_FAILED)


# ----------------------------------------------------------------------------- reading secrets
def read_secret(region, secret_id, stage):
    cmd = ["aws", "secretsmanager", "get-secret-value", "--secret-id", secret_id, "--output", "json"]
    if region:
        cmd += ["--region", region]
    if stage:
        cmd += ["--version-stage", stage]
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        fail("cannot run the AWS CLI (%s): over SSM the instance reads the bake's secrets itself; "
             "install the AWS CLI on the source image (Amazon Linux has it) or use the ssh communicator" % e)
    out, err = p.communicate()
    if p.returncode != 0:
        why = err.decode("utf-8", "replace").strip().splitlines()
        fail("the instance cannot read secret %s with its role: %s (the instance profile's role needs "
             "secretsmanager:GetSecretValue on it; `bakery audit --secret` checks)"
             % (secret_id, why[-1] if why else "exit status %d" % p.returncode))
    try:
        value = json.loads(out.decode("utf-8"))["SecretString"]
    except (ValueError, KeyError, TypeError):
        fail("secret %s holds no string value as the instance reads it" % secret_id)
    return value


def select_key(secret_id, whole, key):
    if key is None:
        return whole
    try:
        obj = json.loads(whole)
        value = obj[key]
    except (ValueError, KeyError, TypeError):
        fail("secret %s as the instance reads it has no key `%s`" % (secret_id, key))
    if isinstance(value, str):
        return value
    # As bakery (serde_json) writes a non-string value: compact, keys sorted.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def read_all(region, sources):
    """placeholder -> value, reading each (secret, stage) once; and every value to hide."""
    wholes = {}
    values = {}
    hidden = []
    for ph, src in sorted(sources.items()):
        k = (src["id"], src.get("stage"))
        if k not in wholes:
            wholes[k] = read_secret(region, src["id"], src.get("stage"))
            whole = wholes[k]
            hidden.append(whole)
            try:
                obj = json.loads(whole)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                for v in obj.values():
                    hidden.append(v if isinstance(v, str)
                                  else json.dumps(v, separators=(",", ":"), ensure_ascii=False, sort_keys=True))
        values[ph] = select_key(src["id"], wholes[k], src.get("key"))
        hidden.append(values[ph])
    return values, hidden


def fill(data, values):
    for ph, v in values.items():
        data = data.replace(ph.encode(), v.encode("utf-8"))
    return data


# ----------------------------------------------------------------------------- redaction
def base64_forms(b):
    out = []
    for off in range(3):
        enc = base64.b64encode(b"\0" * off + b).rstrip(b"=")
        start = (off * 8 + 5) // 6
        end = ((off + len(b)) * 8) // 6
        if end > start + MIN_SECRET_LEN:
            core = enc[start:end]
            out.append(core)
            out.append(core.replace(b"+", b"-").replace(b"/", b"_"))
    return out


def canonical(b):
    return b.replace(b"\r", b"").replace(b"\n", b"")


def hex_digit_class(d):
    return ("[%s%s]" % (d.upper(), d.lower())).encode() if d.isalpha() else d.encode()


def url_pattern(b):
    """The value URL-encoded any usual way: each byte as itself or %XX (either case), a space or
    a `+` as either or as `+`; line breaks as themselves (not in the stream view) or %0A/%0D."""
    parts = []
    for ch in b:
        if ch in (0x0A, 0x0D):
            parts.append(b"(?:%0" + hex_digit_class("%X" % (ch & 15)) + b")?")
            continue
        alts = set()
        for x in ((0x20, 0x2B) if ch in (0x20, 0x2B) else (ch,)):
            alts.add(re.escape(bytes([x])))
            h = "%02X" % x
            alts.add(b"%" + hex_digit_class(h[0]) + hex_digit_class(h[1]))
        parts.append(b"(?:" + b"|".join(sorted(alts)) + b")")
    return b"".join(parts)


def patterns(secrets):
    lits = set()
    urls = set()
    span = 0
    for s in secrets:
        if len(s.encode("utf-8")) < MIN_SECRET_LEN:
            continue
        variants = [s]
        if s.rstrip() != s:
            variants.append(s.rstrip())
        for v in variants:
            b = v.encode("utf-8")
            c = canonical(b)
            forms = [c, b.hex().encode(), b.hex().upper().encode()] + base64_forms(b)
            forms.append(json.dumps(v, ensure_ascii=False)[1:-1].encode("utf-8"))
            for f in forms:
                if len(f) >= MIN_SECRET_LEN:
                    lits.add(f)
                    span = max(span, len(f))
            if len(c) >= MIN_SECRET_LEN:
                urls.add(url_pattern(b))
                span = max(span, 3 * len(b))
    compiled = [re.compile(re.escape(x)) for x in sorted(lits)] + [re.compile(u) for u in sorted(urls)]
    return compiled, span + 2


class Filter:
    """One output stream: bytes in, the same bytes out with every secret form masked, written as
    soon as no secret can still be continuing in them. The search runs over the stream without
    line breaks, over a window as long as the longest form."""

    def __init__(self, pats, span, out):
        self.pats, self.span, self.out = pats, span, out
        self.raw = bytearray()  # not yet written; raw[0] is at stream offset self.base
        self.base = 0
        self.canon = bytearray()  # recent bytes without line breaks ...
        self.offs = array("q")  # ... and their stream offsets
        self.scanned = 0  # canon[:scanned] has been searched
        self.masks = []  # [start, end) stream offsets, sorted, merged

    def feed(self, data, final=False):
        at = self.base + len(self.raw)
        self.raw += data
        for m in re.finditer(rb"[^\r\n]+", data):
            self.canon += m.group()
            self.offs.extend(range(at + m.start(), at + m.end()))
        if self.pats:
            self.search()
        self.write(final)

    def search(self):
        lo = max(0, self.scanned - self.span)
        for p in self.pats:
            pos = lo
            while True:
                m = p.search(self.canon, pos)
                if m is None or m.end() == m.start():
                    break
                self.mask(self.offs[m.start()], self.offs[m.end() - 1] + 1)
                pos = m.start() + 1
        self.scanned = len(self.canon)

    def mask(self, s, e):
        kept = []
        for ms, me in self.masks:
            if me < s or ms > e:
                kept.append((ms, me))
            else:
                s, e = min(s, ms), max(e, me)
        kept.append((s, e))
        kept.sort()
        self.masks = kept

    def write(self, final):
        end = self.base + len(self.raw)
        if final or not self.pats:
            cut = end
        else:
            undecided = len(self.canon) - self.span
            if len(self.canon) == 0:
                cut = end
            elif undecided <= 0:
                cut = self.offs[0]
            else:
                cut = self.offs[undecided]
            for s, e in self.masks:
                if s < cut < e:
                    cut = s
            if undecided > 0:
                del self.canon[:undecided]
                del self.offs[:undecided]
                self.scanned = max(0, self.scanned - undecided)
        if cut <= self.base:
            return
        out = bytearray()
        at = self.base
        rest = []
        for s, e in self.masks:
            if s >= cut:
                rest.append((s, e))
                continue
            if e > at:
                s = max(s, at)
                out += self.raw[at - self.base:s - self.base]
                # One mask per line the secret covers, as bakery shows it.
                lines = bytes(self.raw[s - self.base:min(e, cut) - self.base]).split(b"\n")
                out += b"\n".join(MASK if canonical(x) else b"" for x in lines)
                at = min(e, cut)
            if e > cut:
                rest.append((cut, e))
        out += self.raw[at - self.base:cut - self.base]
        self.masks = rest
        del self.raw[:cut - self.base]
        self.base = cut
        self.out.write(bytes(out))
        self.out.flush()


# ----------------------------------------------------------------------------- actions
def run(spec):
    values, hidden = read_all(spec.get("region"), spec["secrets"])
    pats, span = patterns(hidden)
    script = spec["script"]
    with open(script, "rb") as f:
        body = f.read()
    filled = fill(body, values)
    if filled != body:
        with open(script, "wb") as f:
            f.write(filled)
    env = dict(os.environ)
    for k, v in spec.get("env", {}).items():
        env[k] = fill(v.encode("utf-8"), values).decode("utf-8")
    try:
        p = subprocess.Popen([script], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        fail("cannot start the provisioner script: %s" % e)
    filters = {
        p.stdout.fileno(): Filter(pats, span, sys.stdout.buffer),
        p.stderr.fileno(): Filter(pats, span, sys.stderr.buffer),
    }
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    sel.register(p.stderr, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if data:
                filters[key.fd].feed(data)
            else:
                sel.unregister(key.fileobj)
                filters[key.fd].feed(b"", final=True)
    rc = p.wait()
    return 128 - rc if rc < 0 else rc


def render(spec):
    values, _ = read_all(spec.get("region"), spec["secrets"])
    source, dest, mode = spec["source"], spec["dest"], int(spec["mode"])
    with open(source, "rb") as f:
        data = fill(f.read(), values)
    tmp = dest + ".bakery-render"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    os.unlink(source)
    return 0


def main(encoded):
    spec = json.loads(base64.b64decode(encoded).decode("utf-8"))
    action = {"run": run, "render": render}[spec["action"]]
    sys.exit(action(spec))
