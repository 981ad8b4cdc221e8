"""The host's state stays bounded while workers come and go (issue 31, found by reading): a worker
written off long ago and no longer referred to is forgotten, with its link's record; kicked
identities are remembered up to a cap."""

from __future__ import annotations

import distllm
from conftest import wait_for


def test_a_worker_gone_long_ago_is_forgotten_with_its_link(monkeypatch):
    monkeypatch.setattr(distllm, "_FORGET_DEPARTED_S", 1.0)
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, heartbeat_s=0.2, liveness_s=1.0) as c:
        want = c.generate([5, 6, 7], max_new_tokens=4)
        (extra,) = c.spawn_local(1)
        wait_for(lambda: any(w["name"] == extra.name and w["state"] == "standby" for w in c.workers()),
                 what="the extra worker on standby")
        wid = next(w.wid for w in list(c._core._workers.values()) if w.name == extra.name)
        extra.kill()
        wait_for(lambda: any(w["name"] == extra.name and not w["alive"] for w in c.workers()),
                 what="the killed worker written off")
        wait_for(lambda: all(w["name"] != extra.name for w in c.workers()), what="the dead worker forgotten")
        assert wid not in c._core._members.links and wid not in c._core._workers
        assert [w["name"] for w in c.workers()] == ["local-0"]
        assert c.generate([5, 6, 7], max_new_tokens=4) == want


def test_kicked_identities_are_remembered_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(distllm, "_BANNED_KEPT", 3)
    with distllm.local("tiny", workers=1, quant="none", calibrate=False) as c:
        for i in range(5):
            c._core._ban(f"id{i}".encode())
        assert list(c._core._banned) == [b"id2", b"id3", b"id4"]
