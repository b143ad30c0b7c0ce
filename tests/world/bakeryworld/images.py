"""Image layers: CreateImage captures the source body's upper layer as the new AMI's top
layer, stacked over the source image's layers. Base (moto built-in) AMIs have no layer.

Layers live on a tmpfs mounted at <state_dir>/images inside the world's mount namespace:
overlayfs refuses a lower layer that lies inside another lower layer of the same
filesystem ("overlapping lowerdir path"), and the host's `/` is always the bottom layer, so
image layers must sit on a different filesystem. The tmpfs disappears with the server, as
does moto's in-memory state that names the AMIs.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path


class ImageStore:
    def __init__(self, world) -> None:
        self.world = world
        self.dir: Path = world.settings.state_dir / "images"
        self._layers: dict[str, list[str]] = {}
        self._meta: dict[str, dict] = {}
        self._timers: list[threading.Timer] = []
        self._lock = threading.RLock()

    def base_layer(self) -> str:
        """The stock image's own files, under every body, above the host's `/`: a root
        account whose shell start-up files are a cloud image's, not this host's (the host's
        /root/.bashrc initialises pyenv and costs 0.2 s per SSH command, which no AMI does)."""
        base = self.dir / "_base"
        if not (base / "root" / ".bashrc").exists():
            (base / "root").mkdir(parents=True, exist_ok=True)
            for name in (".bashrc", ".bash_profile", ".profile"):
                (base / "root" / name).write_text("# stock image: nothing to initialise\n")
        return str(base)

    def layers_for(self, ami_id: str | None) -> list[str]:
        with self._lock:
            return list(self._layers.get(ami_id or "", []))

    def describe(self) -> dict:
        with self._lock:
            return {k: dict(v, layers=list(self._layers.get(k, []))) for k, v in self._meta.items()}

    def on_create_image(self, ami, instance, no_reboot: bool) -> None:
        """Called from the patched CreateImage, before the response is sent, so with the moto
        lock held; the body's halt and layer copy run with it released (`Body.capture_upper`)."""
        instance_id, source_image = instance.id, instance.image_id
        body = self.world.bodies.get(instance_id)
        started = time.time()
        ami.state = "pending"
        if body is not None:
            dest = self.dir / ami.id
            body.capture_upper(dest, reboot=not no_reboot)
            layers = [str(dest), *body.layers]
        else:
            layers = self.layers_for(source_image)
        with self._lock:
            self._layers[ami.id] = layers
            self._meta[ami.id] = {
                "source_instance": instance_id,
                "source_image": source_image,
                "no_reboot": no_reboot,
                "captured_in_s": round(time.time() - started, 3),
                "state": "pending",
            }
        self.world.log(f"{ami.id}: captured from {instance_id} ({len(layers)} layer(s)), pending")
        self._later(ami, self.world.settings.snapshot_delay)

    def on_copy_image(self, new_ami, source_ami_id: str, delay: float | None = None, fail: bool = False,
                      on_done=None) -> None:
        """Called from the patched CopyImage with the moto lock held. The copy is `pending` for
        `delay` (amis.py: copy delay x the source's GiB; default the snapshot delay); meanwhile
        the source's layers are copied (hard links: layers are never written once made) into
        <images>/<new id>/<n>/, outside the lock, so the copy keeps its content whatever happens
        to the source. Until that copy is done the new image names the source's layers (same
        content). `fail`: the copy ends `failed` (amis.py: a KMS key the destination Region
        lacks) and gets no layers. `on_done(ami, state)` runs under the moto lock at the end."""
        source_layers = self.layers_for(source_ami_id)
        with self._lock:
            self._layers[new_ami.id] = [] if fail else source_layers
            self._meta[new_ami.id] = {"copied_from": source_ami_id, "state": "pending"}
        new_ami.state = "pending"
        delay = self.world.settings.snapshot_delay if delay is None else delay
        copied = threading.Event()

        def copy_layers():
            try:
                dest = self.dir / new_ami.id
                made = []
                for n, layer in enumerate(source_layers):
                    d = dest / str(n)
                    d.mkdir(parents=True, exist_ok=True)
                    p = subprocess.run(["cp", "-a", "--link", f"{layer}/.", f"{d}/"], stdin=subprocess.DEVNULL,
                                       capture_output=True, timeout=600)
                    if p.returncode != 0:
                        raise RuntimeError(p.stderr.decode(errors="replace").strip())
                    made.append(str(d))
                with self._lock:
                    self._layers[new_ami.id] = made
                    self._meta[new_ami.id]["layers_copied"] = len(made)
            except Exception as e:  # the image keeps naming the source's layers
                self.world.log(f"{new_ami.id}: layer copy failed ({e}); sharing the source's layers")
            finally:
                copied.set()

        if fail or not source_layers:
            copied.set()
        else:
            threading.Thread(target=copy_layers, name=f"copy-{new_ami.id}", daemon=True).start()
        self._later(new_ami, delay, end_state="failed" if fail else "available", ready=copied, on_done=on_done)

    def _later(self, ami, delay: float, end_state: str = "available", ready: threading.Event | None = None,
               on_done=None) -> None:
        def done():
            if ready is not None:
                ready.wait(600)  # the layer copy (outside the moto lock)
            # A timer thread: moto's image object is touched under the moto lock only.
            with self.world.lock:
                if ami.state == "pending":
                    ami.state = end_state
                    if on_done is not None:
                        on_done(ami, end_state)
                state = ami.state
            with self._lock:
                if ami.id in self._meta:
                    self._meta[ami.id]["state"] = state
            self.world.log(f"{ami.id}: {state}")

        t = threading.Timer(max(0.0, delay), done)
        t.daemon = True
        t.start()
        self._timers.append(t)

    def shutdown(self) -> None:
        for t in self._timers:
            t.cancel()
        # the tmpfs itself is unmounted by the server (and vanishes with its namespace)
        for p in list(self.dir.glob("ami-*")) if self.dir.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)
