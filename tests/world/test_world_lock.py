"""The moto lock (world.py): one re-entrant lock around every moto action, released while a
moto action waits for slow work. In-process: no world server needed."""

from __future__ import annotations

import threading
import time


def make_world(tmp_path):
    from bakeryworld.world import Settings, World

    return World(Settings(state_dir=tmp_path))


def test_install_moto_lock_wraps_call_action_once(tmp_path):
    from moto.core.responses import BaseResponse

    w1, w2 = make_world(tmp_path / "a"), make_world(tmp_path / "b")
    lock = w1.install_moto_lock()
    wrapped = BaseResponse.call_action
    assert wrapped._bakeryworld_lock is lock is w1.lock
    # a second world (or a second install) adopts the same lock and does not wrap again
    assert w2.install_moto_lock() is lock and w2.lock is lock
    assert w1.install_moto_lock() is lock and BaseResponse.call_action is wrapped
    from bakeryworld import health

    assert health.moto_lock(w2) is lock


def test_wait_unlocked_releases_a_recursively_held_lock(tmp_path):
    w = make_world(tmp_path)
    ev = threading.Event()
    took: list[float] = []

    def other():
        t = time.monotonic()
        with w.lock:  # must get the lock while the owner waits
            took.append(time.monotonic() - t)
            ev.set()

    with w.lock, w.lock:
        th = threading.Thread(target=other)
        th.start()
        assert w.wait_unlocked(ev, 5)
        assert w.lock._is_owned()  # held again afterwards, at its former depth
    th.join(5)
    assert took and took[0] < 1.0
    assert not w.lock._is_owned()
    # not holding the lock: a plain wait
    assert w.wait_unlocked(threading.Event(), 0.05) is False


def test_background_threads_wait_for_the_moto_lock(tmp_path):
    """The body reconciler and the image timer touch moto's models only under the lock."""
    from types import SimpleNamespace

    w = make_world(tmp_path)
    w.ec2()  # moto's backend exists before the race below
    ami = SimpleNamespace(id="ami-0123456789abcdef0", state="pending")
    w.lock.acquire()
    try:
        rec = threading.Thread(target=w.bodies.reconcile_once)
        rec.start()
        w.images._later(ami, 0.0)
        time.sleep(0.3)
        assert rec.is_alive(), "the reconciler read moto's instances without the moto lock"
        assert ami.state == "pending", "the image timer changed moto's image without the moto lock"
    finally:
        w.lock.release()
    rec.join(5)
    assert not rec.is_alive()
    deadline = time.time() + 5
    while ami.state != "available" and time.time() < deadline:
        time.sleep(0.02)
    assert ami.state == "available"
