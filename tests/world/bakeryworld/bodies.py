"""Bodies: the live side of every running instance whose private IP is loopback.

A body is an overlayfs root (image layers + host `/`, upper = the body's own dir), a
chrooted sshd on <ip>:22 with its own host key, the services enabled in the image, and
the instance's user data at first boot. See tests/world/README.md.

All mounts live in the world server's private mount namespace (the server runs under
`unshare --mount --propagation private`), so the host's mount table never changes and the
kernel drops every mount if the server and its bodies die.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .world import is_loopback

CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
SSHD = "/usr/sbin/sshd"
WANTS = "etc/systemd/system/multi-user.target.wants"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ----------------------------------------------------------------------------- helpers
def run(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}"
        )
    return p


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def proc_root(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pids_in_root(root: str) -> list[int]:
    """Every process whose root directory is `root` (or below it)."""
    me = os.getpid()
    out = []
    for pid in all_pids():
        if pid == me:
            continue
        r = proc_root(pid)
        if r is not None and (r == root or r.startswith(root + "/")):
            out.append(pid)
    return out


def descendants(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        pp = proc_ppid(pid)
        if pp is not None:
            children.setdefault(pp, []).append(pid)
    out: set[int] = set()
    stack = list(pids)
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def signal_pids(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path` in this process's mount namespace, deepest first."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == path or mp.startswith(path + "/"):
                    out.append(mp)
    except OSError:
        pass
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def parse_unit(text: str) -> dict[str, list[str]]:
    """Minimal systemd unit parser: keys of the [Service] section, in order."""
    out: dict[str, list[str]] = {}
    section = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        if section != "Service" or "=" not in s:
            continue
        k, v = s.split("=", 1)
        k, v = k.strip(), v.strip()
        if v == "" and k in ("ExecStart", "ExecStartPre", "Environment"):
            out[k] = []  # an empty assignment resets the list, as in systemd
            continue
        out.setdefault(k, []).append(v)
    return out


def strip_exec_prefix(cmd: str) -> str:
    return cmd.lstrip("-@:+!")


# ----------------------------------------------------------------------------- moto facts
def instance_public_key(ec2, instance) -> str:
    """The key pair's public key as moto stores it (imported or created), or ''."""
    name = getattr(instance, "key_name", None)
    if not name:
        return ""
    kp = ec2.key_pairs.get(name)
    if kp is None or not getattr(kp, "material_public", None):
        return ""
    mat = kp.material_public
    if isinstance(mat, bytes):
        mat = mat.decode()
    return mat.strip() + "\n"


def instance_user_data(instance) -> bytes | None:
    import base64

    ud = getattr(instance, "user_data", None)
    if not ud:
        return None
    if isinstance(ud, list):  # older moto kept a list
        ud = ud[0] if ud else None
        if ud is None:
            return None
    try:
        if hasattr(ud, "decode") and not isinstance(ud, (bytes, str)):
            return base64.b64decode(ud.as_bytes())
        if isinstance(ud, bytes):
            return base64.b64decode(ud)
        return base64.b64decode(str(ud))
    except Exception:
        return None


def _launched_at(instance_id: str) -> float | None:
    from .patches_ec2 import LAUNCHED_AT

    return LAUNCHED_AT.get(instance_id)


@dataclass(frozen=True)
class InstanceFacts:
    """What a body needs from moto's instance, copied under the moto lock: the body never
    touches moto's models afterwards (they are not thread-safe)."""

    id: str
    ip: str
    image_id: str
    authorized_keys: str
    user_data: bytes | None
    launched_at: float | None = None

    @classmethod
    def of(cls, ec2, instance) -> "InstanceFacts":
        """Call with the world's moto lock held."""
        return cls(
            id=instance.id,
            ip=instance.private_ip,
            image_id=instance.image_id,
            authorized_keys=instance_public_key(ec2, instance),
            user_data=instance_user_data(instance),
            launched_at=_launched_at(instance.id),
        )


# ----------------------------------------------------------------------------- body
class Body:
    def __init__(self, mgr: "BodyManager", facts: InstanceFacts) -> None:
        self.mgr = mgr
        self.world = mgr.world
        st = self.world.settings
        self.instance_id: str = facts.id
        self.ip: str = facts.ip
        self.image_id: str = facts.image_id
        self.hostname = "ip-" + self.ip.replace(".", "-")
        self.layers: list[str] = self.world.images.layers_for(self.image_id)
        self.dir = st.base_dir / "bodies" / self.instance_id
        self.upper = self.dir / "upper"
        self.workdir = self.dir / "work"
        self.root: str = str(self.dir / "root")
        self.logdir = st.state_dir / "bodies" / self.instance_id
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.authorized_keys = facts.authorized_keys
        self.user_data = facts.user_data
        self.created_at = time.time()
        # A first boot counts from RunInstances; a restart from StartInstances (see _boot).
        self.boot_started_at = min(facts.launched_at or self.created_at, self.created_at)
        self.booted_at: float | None = None
        self.state = "new"  # new booting running dead stopped terminated
        self.desired = "running"
        self.boots = 0
        self.cond = threading.Condition()
        self.lock = threading.RLock()
        self._jobs: list = []
        self.sshd: subprocess.Popen | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self.service_errors: dict[str, str] = {}
        self.user_data_rc: int | None = None
        self.fingerprint_line: str | None = None
        self.hostkey_line: str | None = None
        self.mounted = False
        self.thread = threading.Thread(target=self._worker, name=f"body-{self.instance_id}", daemon=True)

    # --------------------------------------------------------------- public API
    def booted(self) -> bool:
        """Boot delay passed and sshd is up."""
        return (
            self.state == "running"
            and self.sshd is not None
            and self.sshd.poll() is None
        )

    def alive(self) -> bool:
        return self.booted() and self.state == "running"

    def status_check(self) -> str:
        """EC2 instance status: initializing | ok | impaired."""
        if self.state == "dead":
            return "impaired"
        if self.state == "running":
            return "ok"
        return "initializing"

    def base_env(self) -> dict[str, str]:
        return {
            "PATH": BASE_PATH,
            "HOME": "/root",
            "USER": "root",
            "LOGNAME": "root",
            "LANG": "C.UTF-8",
            "HOSTNAME": self.hostname,
            "BAKERY_WORLD_IP": self.ip,
            "BAKERY_WORLD_INSTANCE_ID": self.instance_id,
        }

    def exec(self, script: str, env: dict | None = None, timeout: float = 60,
             on_start=None) -> tuple[int, bytes, bytes]:
        """Run `/bin/sh -c script` chrooted in the body as root. On timeout the whole
        process group is killed and (124, out, err) is returned. `on_start(popen)` is called
        as soon as the process exists (it leads its own process group, `popen.pid`), e.g. to
        be able to signal it while this call waits."""
        if not self.mounted:
            return 127, b"", f"world: body {self.instance_id} is not mounted ({self.state})\n".encode()
        e = self.base_env()
        if env:
            e.update({str(k): str(v) for k, v in env.items()})
        p = subprocess.Popen(
            [CHROOT, self.root, "/bin/sh", "-c", "cd / && " + script],
            env=e,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if on_start is not None:
            try:
                on_start(p)
            except Exception as e:  # the process runs regardless: wait for it below
                self.world.log(f"{self.instance_id}: exec on_start failed: {e!r}")
        try:
            out, err = p.communicate(timeout=timeout)
            return p.returncode, out, err
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            return 124, out, err + f"\nworld: timed out after {timeout}s\n".encode()

    def kill_services(self) -> None:
        """An app crash: every process of the body except sshd and its sessions dies;
        the instance stays running and its status checks stay ok."""
        with self.lock:
            keep: set[int] = set()
            if self.sshd is not None and self.sshd.poll() is None:
                keep = {self.sshd.pid} | descendants({self.sshd.pid})
            for _ in range(5):
                victims = [p for p in pids_in_root(self.root) if p not in keep]
                victims += [s.pid for s in self.services.values() if s.poll() is None]
                if not victims:
                    break
                signal_pids(set(victims), signal.SIGKILL)
                time.sleep(0.05)
            for p in self.services.values():
                self._reap(p)
            self.world.log(f"{self.instance_id}: services killed")

    def crash(self) -> None:
        """The whole body dies (kernel panic): status checks go impaired."""
        with self.lock:
            self._kill_all(graceful=False)
            if self.state in ("running", "booting"):
                self.state = "dead"
            self.world.log(f"{self.instance_id}: crashed")
        with self.cond:
            self.cond.notify_all()

    def console_output(self) -> str | None:
        if self.booted_at is None or not self.fingerprint_line:
            return None
        return (
            f"[    0.000000] Linux version (bakery world body {self.instance_id})\n"
            f"Cloud-init v. world running 'modules:final' at {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(self.booted_at))}\n"
            "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
            f"{self.fingerprint_line}\n"
            "-----END SSH HOST KEY FINGERPRINTS-----\n"
            "-----BEGIN SSH HOST KEY KEYS-----\n"
            f"{self.hostkey_line}\n"
            "-----END SSH HOST KEY KEYS-----\n"
            f"Cloud-init v. world finished. Up {self.booted_at - self.boot_started_at:.2f} seconds\n"
        )

    def describe(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "ip": self.ip,
            "image_id": self.image_id,
            "state": self.state,
            "desired": self.desired,
            "booted": self.booted(),
            "alive": self.alive(),
            "status_check": self.status_check(),
            "root": self.root,
            "layers": list(self.layers),
            "sshd_pid": self.sshd.pid if self.sshd and self.sshd.poll() is None else None,
            "services": {
                n: ("running" if p.poll() is None else f"exited {p.returncode}")
                for n, p in self.services.items()
            },
            "service_errors": dict(self.service_errors),
            "user_data_rc": self.user_data_rc,
            "boots": self.boots,
            "logdir": str(self.logdir),
        }

    # --------------------------------------------------------------- control from the manager
    def want(self, desired: str) -> None:
        with self.cond:
            if self.desired != desired and self.desired != "terminated":
                self.desired = desired
                self.cond.notify_all()

    def submit(self, fn) -> threading.Event:
        ev = threading.Event()
        with self.cond:
            self._jobs.append((fn, ev))
            self.cond.notify_all()
        return ev

    def request_reboot(self) -> None:
        def job():
            with self.lock:
                if self.state in ("running", "dead", "booting"):
                    self._halt(unmount=True)
                    self.state = "stopped"
        self.submit(job)

    def capture_upper(self, dest: Path, reboot: bool) -> None:
        """Copy the upper layer to `dest` (CreateImage). With reboot, the body is shut
        down around the copy and boots again afterwards, as CreateImage does on AWS."""
        err: list[BaseException] = []

        def job():
            try:
                with self.lock:
                    live = self.state in ("running", "booting", "dead")
                    if reboot and live:
                        self._halt(unmount=True)
                        self.state = "stopped"
                    else:
                        os.sync()
                    dest.mkdir(parents=True, exist_ok=True)
                    if self.upper.is_dir():
                        run(["cp", "-a", "--reflink=auto", f"{self.upper}/.", f"{dest}/"], timeout=600)
            except BaseException as e:  # reported to the caller
                err.append(e)

        if self.thread.is_alive():
            ev = self.submit(job)
        else:
            ev = threading.Event()

            def inline():
                try:
                    job()
                finally:
                    ev.set()

            threading.Thread(target=inline, name=f"capture-{self.instance_id}", daemon=True).start()
        # Called from CreateImage, i.e. inside a moto action: the moto lock is released while the
        # body halts and its layer is copied, so other calls are not stalled by the copy.
        if not self.world.wait_unlocked(ev, 900):
            raise RuntimeError(f"capture of {self.instance_id} did not finish within 900 s")
        if err:
            raise err[0]

    # --------------------------------------------------------------- worker
    def _needs_work(self) -> bool:
        if self._jobs:
            return True
        d, s = self.desired, self.state
        if d == "terminated":
            return s != "terminated"
        if d == "stopped":
            return s not in ("stopped",)
        return s in ("new", "stopped", "booting")

    def _worker(self) -> None:
        while True:
            with self.cond:
                while not self._needs_work():
                    self.cond.wait(0.5)
                job = self._jobs.pop(0) if self._jobs else None
                desired = self.desired
            try:
                if job is not None:
                    fn, ev = job
                    try:
                        fn()
                    finally:
                        ev.set()
                    continue
                if desired == "terminated":
                    with self.lock:
                        self._halt(unmount=True)
                        self._remove()
                        self.state = "terminated"
                    self.world.log(f"{self.instance_id}: terminated")
                    return
                if desired == "stopped":
                    with self.lock:
                        self._halt(unmount=True)
                        self.state = "stopped"
                    self.world.log(f"{self.instance_id}: stopped")
                    continue
                self._boot()
            except Exception as e:
                self.world.log(f"{self.instance_id}: worker error: {e!r}")
                with self.cond:
                    self.cond.wait(1.0)

    def _boot(self) -> None:
        with self.lock:
            if self.state in ("new", "stopped"):
                if self.state == "stopped":
                    self.boot_started_at = time.time()
                self.state = "booting"
                self.booted_at = None
                self._mount()
                self._ensure_hostkey()
        deadline = self.boot_started_at + self.world.settings.boot_delay
        with self.cond:
            while True:
                if self.desired != "running" or self._jobs or self.state != "booting":
                    return
                rem = deadline - time.time()
                if rem <= 0:
                    break
                self.cond.wait(rem)
        # moto frees a terminated instance's IP at once; wait until a body that still
        # holds this address has finished dying (AWS does not reuse it that early).
        until = time.time() + 30
        while time.time() < until and any(
            b is not self and b.ip == self.ip and b.state in ("booting", "running", "dead")
            and b.desired == "terminated" for b in self.mgr.all()
        ):
            time.sleep(0.05)
        with self.lock:
            if self.state != "booting":
                return
            self._start_sshd()
            self._start_services()
            self.state = "running"
            self.booted_at = time.time()
            self.boots += 1
            self.world.log(
                f"{self.instance_id}: booted at {self.ip} in {self.booted_at - self.boot_started_at:.2f}s"
            )
        self._start_user_data()

    # --------------------------------------------------------------- pieces
    def _mount(self) -> None:
        if self.mounted:
            return
        for d in (self.upper, self.workdir, Path(self.root)):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.dir, Path(self.root)):
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        lower = ":".join([*self.layers, self.world.images.base_layer(), "/"])
        run(
            [
                "mount", "-t", "overlay", "overlay",
                "-o", f"lowerdir={lower},upperdir={self.upper},workdir={self.workdir}",
                self.root,
            ]
        )
        self.mounted = True
        try:
            run(["mount", "-t", "proc", "proc", f"{self.root}/proc"])
            run(["mount", "--rbind", "/dev", f"{self.root}/dev"])
            run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", f"{self.root}/run"])
            run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=2g", "tmpfs", f"{self.root}/tmp"])
            os.makedirs(f"{self.root}/run/sshd", exist_ok=True)
        except Exception:
            self._unmount()
            raise

    def _unmount(self) -> None:
        mps = mounts_under(self.root)
        if mps:
            p = run(["umount", "-R", self.root], check=False)
            if p.returncode != 0 and mounts_under(self.root):
                run(["umount", "-R", "-l", self.root], check=False)
        self.mounted = False

    def _remove(self) -> None:
        if mounts_under(self.root):
            self._unmount()
        if mounts_under(self.root):
            raise RuntimeError(f"{self.root} still mounted, not removing")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ensure_hostkey(self) -> None:
        key = self.logdir / "ssh_host_ed25519_key"
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.hostname}", "-f", str(key)])
        pub = (self.logdir / "ssh_host_ed25519_key.pub").read_text().strip()
        fp = run(["ssh-keygen", "-l", "-f", str(key) + ".pub"]).stdout.decode().strip()
        self.hostkey_line = pub
        self.fingerprint_line = fp
        (self.logdir / "authorized_keys").write_text(self.authorized_keys)

    def _start_sshd(self) -> None:
        cfg = self.logdir / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.ip}:22",
                    f"HostKey {self.logdir}/ssh_host_ed25519_key",
                    "PidFile none",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    f"AuthorizedKeysFile {self.logdir}/authorized_keys",
                    f"ChrootDirectory {self.root}",
                    "Subsystem sftp internal-sftp",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "MaxStartups 100:30:200",
                    "MaxSessions 64",
                    f"SetEnv BAKERY_WORLD_IP={self.ip} BAKERY_WORLD_INSTANCE_ID={self.instance_id}",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        log = open(self.logdir / "sshd.log", "ab")
        self.sshd = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.sshd.poll() is not None:
                tail = (self.logdir / "sshd.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"sshd for {self.instance_id} exited: {tail}")
            try:
                with socket.create_connection((self.ip, 22), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.03)
        raise RuntimeError(f"sshd for {self.instance_id} did not listen on {self.ip}:22")

    def _layer_dirs(self) -> list[str]:
        return [str(self.upper), *self.layers]

    def enabled_units(self) -> list[str]:
        """Services enabled in the image layers or the body's own upper layer (never
        the host's own /etc/systemd/system/multi-user.target.wants entries)."""
        merged = os.path.join(self.root, WANTS)
        try:
            names = sorted(os.listdir(merged))
        except OSError:
            return []
        out = []
        for name in names:
            if not name.endswith(".service"):
                continue
            for layer in self._layer_dirs():
                p = os.path.join(layer, WANTS, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:
                    break  # whiteout: removed in this layer
                out.append(name)
                break
        return out

    def _resolve_in_root(self, path: str) -> str | None:
        """Follow symlinks of `path` (absolute inside the body) without leaving the body."""
        cur = path
        for _ in range(20):
            host = self.root + cur
            if os.path.islink(host):
                tgt = os.readlink(host)
                cur = tgt if tgt.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(cur), tgt))
                continue
            return host if os.path.exists(host) else None
        return None

    def _read_unit(self, name: str) -> str | None:
        for cand in (f"/{WANTS}/{name}", f"/etc/systemd/system/{name}", f"/usr/lib/systemd/system/{name}", f"/lib/systemd/system/{name}"):
            host = self._resolve_in_root(cand)
            if host and os.path.isfile(host):
                try:
                    return Path(host).read_text(errors="replace")
                except OSError:
                    continue
        return None

    def _unit_env(self, unit: dict[str, list[str]]) -> dict[str, str]:
        env: dict[str, str] = {}
        for f in unit.get("EnvironmentFile", []):
            optional = f.startswith("-")
            host = self._resolve_in_root(f.lstrip("-"))
            if not host:
                if not optional:
                    raise RuntimeError(f"EnvironmentFile {f} not found")
                continue
            for line in Path(host).read_text(errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    env[k.strip()] = v.strip().strip('"').strip("'")
        for val in unit.get("Environment", []):
            for item in shlex.split(val):
                if "=" in item:
                    k, v = item.split("=", 1)
                    env[k] = v
        return env

    def _start_services(self) -> None:
        self.services.clear()
        self.service_errors.clear()
        logdir = self.logdir / "services"
        logdir.mkdir(exist_ok=True)
        for name in self.enabled_units():
            try:
                text = self._read_unit(name)
                if text is None:
                    raise RuntimeError("unit file not found")
                unit = parse_unit(text)
                starts = [strip_exec_prefix(c) for c in unit.get("ExecStart", []) if c]
                if not starts:
                    raise RuntimeError("no ExecStart")
                pre = [strip_exec_prefix(c) for c in unit.get("ExecStartPre", []) if c]
                env = self.base_env()
                env.update(self._unit_env(unit))
                wd = (unit.get("WorkingDirectory") or ["/"])[-1].lstrip("-")
                if wd.startswith("~"):
                    wd = "/root"
                script = f"cd {shlex.quote(wd)} 2>/dev/null || cd /\n"
                for c in pre + starts[:-1]:
                    script += c + "\n"
                script += "exec " + starts[-1] + "\n"
                cmd = [CHROOT]
                user = (unit.get("User") or ["root"])[-1]
                if user not in ("root", "0", ""):
                    group = (unit.get("Group") or [""])[-1]
                    cmd += ["--userspec", f"{user}:{group}" if group else user]
                cmd += [self.root, "/bin/sh", "-c", script]
                log = open(logdir / f"{name}.log", "ab")
                p = subprocess.Popen(
                    cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
                log.close()
                self.services[name] = p
                self.world.log(f"{self.instance_id}: started {name} (pid {p.pid})")
            except Exception as e:
                self.service_errors[name] = str(e)
                self.world.log(f"{self.instance_id}: service {name} not started: {e}")

    def _start_user_data(self) -> None:
        done = self.logdir / "user-data.done"
        if not self.user_data or not self.user_data.startswith(b"#!") or done.exists():
            return
        done.write_text(str(time.time()))  # once per instance, as cloud-init's per-instance semaphore
        d = Path(self.root) / "run" / "cloud-init"
        d.mkdir(parents=True, exist_ok=True)
        script = d / "user-data"
        script.write_bytes(self.user_data)
        script.chmod(0o700)

        def go():
            logp = self.logdir / "user-data.log"
            with open(logp, "ab") as log:
                p = subprocess.Popen(
                    [CHROOT, self.root, "/run/cloud-init/user-data"],
                    env=self.base_env(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, cwd="/",
                )
                rc = p.wait()
            self.user_data_rc = rc
            (self.logdir / "user-data.rc").write_text(str(rc))
            try:
                dst = Path(self.root) / "var/log/cloud-init-output.log"
                with open(dst, "ab") as f:
                    f.write(logp.read_bytes())
            except OSError:
                pass
            self.world.log(f"{self.instance_id}: user data exited {rc}")

        threading.Thread(target=go, name=f"userdata-{self.instance_id}", daemon=True).start()

    @staticmethod
    def _reap(p: subprocess.Popen | None) -> None:
        if p is None:
            return
        try:
            p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass

    def _body_pids(self) -> set[int]:
        pids = set(pids_in_root(self.root)) if self.mounted else set()
        roots = {s.pid for s in self.services.values() if s.poll() is None}
        if self.sshd is not None and self.sshd.poll() is None:
            roots.add(self.sshd.pid)
        return pids | roots | descendants(roots)

    def _kill_all(self, graceful: bool) -> None:
        pids = self._body_pids()
        if graceful and pids:
            signal_pids(pids, signal.SIGTERM)
            deadline = time.time() + 1.5
            while time.time() < deadline:
                for p in [self.sshd, *self.services.values()]:
                    if p is not None:
                        p.poll()
                if not any(os.path.exists(f"/proc/{p}") and proc_ppid(p) is not None for p in pids):
                    break
                time.sleep(0.05)
        for _ in range(50):
            pids = self._body_pids()
            if not pids:
                break
            signal_pids(pids, signal.SIGKILL)
            time.sleep(0.05)
        for p in [self.sshd, *self.services.values()]:
            self._reap(p)

    def _halt(self, unmount: bool) -> None:
        self._kill_all(graceful=self.state == "running")
        self.sshd = None
        self.services.clear()
        self.booted_at = None
        if unmount:
            self._unmount()


class BodyManager:
    def __init__(self, world) -> None:
        self.world = world
        self._bodies: dict[str, Body] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval = 0.2

    def get(self, instance_id: str) -> Body | None:
        with self._lock:
            b = self._bodies.get(instance_id)
        return b if b is not None and b.state != "terminated" else None

    def all(self) -> list[Body]:
        with self._lock:
            return [b for b in self._bodies.values() if b.state != "terminated"]

    def start(self) -> None:
        base = self.world.settings.base_dir
        for d in (base.parent, base, base / "bodies"):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception as e:
                self.world.log(f"reconcile error: {e!r}")
            self._stop.wait(self.interval)

    def reconcile_once(self) -> None:
        # 1. A snapshot of moto's instances, taken under the moto lock (moto is not
        #    thread-safe); the facts a new body needs are copied there too.
        with self._lock:
            known = set(self._bodies)
        snapshot: list[tuple[str, str, InstanceFacts | None]] = []
        with self.world.lock:
            # Every account and region moto has a backend for (regions.py): world VPCs of
            # other regions and of the second account have their own 127.N ranges.
            for ec2 in self.world.ec2_backends():
                for inst in list(ec2.all_instances()):
                    if not is_loopback(inst.private_ip):
                        continue
                    state = inst.state
                    facts = None
                    if inst.id not in known and state == "running":
                        facts = InstanceFacts.of(ec2, inst)
                    snapshot.append((inst.id, state, facts))
        # 2. Bodies follow, outside the lock (their workers boot, halt and copy on their own).
        seen = set()
        for iid, state, facts in snapshot:
            seen.add(iid)
            with self._lock:
                body = self._bodies.get(iid)
                if body is None:
                    if facts is None:
                        continue
                    body = Body(self, facts)
                    self._bodies[iid] = body
                    body.thread.start()
                    self.world.log(f"{iid}: body created for {facts.ip} (image {facts.image_id})")
            if state in ("running", "pending"):
                body.want("running")
            elif state in ("stopping", "stopped"):
                body.want("stopped")
            elif state in ("shutting-down", "terminated"):
                body.want("terminated")
        with self._lock:
            for iid, body in list(self._bodies.items()):
                if iid not in seen:
                    body.want("terminated")
                if body.state == "terminated":
                    del self._bodies[iid]

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        with self._lock:
            bodies = list(self._bodies.values())
        threads = []
        for b in bodies:
            def down(b=b):
                with b.cond:
                    b.desired = "terminated"
                    b._jobs.clear()
                    b.cond.notify_all()
                with b.lock:
                    b._halt(unmount=True)
                    try:
                        b._remove()
                    except Exception as e:
                        self.world.log(f"{b.instance_id}: {e}")
                    b.state = "terminated"
            t = threading.Thread(target=down, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(30)
