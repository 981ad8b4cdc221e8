"""The checkpoint store: a local directory and a Hub dataset repo (the real huggingface_hub
client against a local fake Hub), the background writer that keeps changes while the store
fails, and the rendezvous record workers read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import distllm
from fakehub import FakeHub


def test_local_store_reads_writes_appends_and_deletes(tmp_path):
    store = distllm.open_store(str(tmp_path / "s"))
    assert store.read("a/b.json") is None
    store.write("a/b.json", b"one")
    store.write("a/b.json", b"two")
    store.append("a/r.jsonl", b"1\n")
    store.append("a/r.jsonl", b"2\n")
    store.write("c", b"x")
    store.delete("c")
    store.delete("never-there")
    assert store.read("a/b.json") == b"two"
    assert store.read("a/r.jsonl") == b"1\n2\n"
    assert store.keys() == ["a/b.json", "a/r.jsonl"]
    assert store.keys("a/r") == ["a/r.jsonl"]
    assert not [n for n in os.listdir(tmp_path / "s" / "a") if n.startswith(".tmp-")]  # no temp files left


def test_a_new_host_sweeps_the_temp_files_a_killed_writer_left(tmp_path):
    store = distllm.open_store(str(tmp_path / "s"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names a process that no longer exists
    os.makedirs(tmp_path / "s" / "sessions")
    orphan = tmp_path / "s" / "sessions" / f".tmp-{dead.pid}-1"
    live = tmp_path / "s" / "sessions" / f".tmp-{os.getpid()}-1"  # a writer still at work: kept
    orphan.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    old = tmp_path / "s" / f".tmp-{os.getpid()}-2"  # a shared folder's writer that never came back
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert store.sweep() == 2
    assert os.listdir(tmp_path / "s" / "sessions") == [live.name] and not old.exists()
    live.unlink()

    cluster = distllm.host("tiny", quant="none", bind="127.0.0.1", store=str(tmp_path / "s"))
    try:  # a host claiming the store sweeps it
        orphan.write_bytes(b"x")
        cluster.close()
        cluster = distllm.host("tiny", quant="none", bind="127.0.0.1", store=str(tmp_path / "s"))
        assert not orphan.exists()
    finally:
        cluster.close()


def test_a_new_host_retires_checkpoints_of_streams_whose_clients_never_came_back(tmp_path):
    """A streamed request's checkpoint stays while its client may resume it (`Last-Event-ID`); one untouched
    for `resume_window_s` is retired when a host takes the store over. Unreadable ones are kept."""
    import json
    import time

    folder = tmp_path / "s" / "requests"
    folder.mkdir(parents=True)
    record = {"prompt_sha": "0" * 64, "prompt_len": 3, "params": {}, "generated": [5, 6]}
    (folder / "cmpl-old.json").write_text(json.dumps({**record, "updated": time.time() - 7200}))
    (folder / "cmpl-new.json").write_text(json.dumps({**record, "updated": time.time() - 60}))
    (folder / "cmpl-bad.json").write_text("{not json")
    answers = tmp_path / "s" / "answers"  # answers kept for retries with an Idempotency-Key: the same horizon
    answers.mkdir()
    (answers / "a.json").write_text(json.dumps({"request": "0" * 64, "response": {}, "updated": time.time() - 7200}))
    (answers / "b.json").write_text(json.dumps({"request": "0" * 64, "response": {}, "updated": time.time() - 60}))
    cluster = distllm.host("tiny", quant="none", bind="127.0.0.1", store=str(tmp_path / "s"))
    try:
        assert cluster.checkpoint(30)
        assert sorted(os.listdir(folder)) == ["cmpl-bad.json", "cmpl-new.json"]
        assert os.listdir(answers) == ["b.json"]
    finally:
        cluster.close()


@pytest.mark.parametrize("key", ["", "../x", "/etc/passwd", "a//b", "a/./b", "a/../../b", ".tmp-1"])
def test_store_refuses_keys_that_leave_its_directory(tmp_path, key):
    with pytest.raises(distllm.StoreError, match="bad store key"):
        distllm.open_store(str(tmp_path)).write(key, b"x")


@pytest.mark.parametrize("uri", ["s3://bucket/x", "hf://just-a-name", "hf://a/b/c", ""])
def test_bad_store_uri_is_refused_with_the_forms_that_work(uri):
    with pytest.raises(distllm.StoreError, match="hf://user/repo"):
        distllm.open_store(uri)


def test_checkpointer_keeps_changes_while_the_store_fails_and_writes_them_later(tmp_path):
    store = distllm.open_store(str(tmp_path))
    (tmp_path / "jobs").write_text("a file where a folder must be")  # every write under jobs/ now fails
    ckpt = distllm._Checkpointer(store, owner="me", push_s=60)
    try:
        ckpt.write("jobs/a/job.json", b"v1")
        ckpt.append("jobs/a/results.jsonl", b"r0\n")
        assert not ckpt.flush(1.0)
        assert "NotADirectoryError" in ckpt.status and "kept in memory" in ckpt.status
        ckpt.write("jobs/a/job.json", b"v2")  # newer version while failing: it wins
        ckpt.append("jobs/a/results.jsonl", b"r1\n")  # appends keep their order
        (tmp_path / "jobs").unlink()
        assert ckpt.flush(30.0), ckpt.status
        assert ckpt.status == f"store {store.uri}: ok"
        assert store.read("jobs/a/job.json") == b"v2"
        assert store.read("jobs/a/results.jsonl") == b"r0\nr1\n"
        assert ckpt.stats["errors"] >= 1
    finally:
        ckpt.close(5.0)


def test_full_disk_loses_nothing(tmp_path):
    """A real write failure: the file-size limit (EFBIG, as a full disk gives ENOSPC) in a child process."""
    script = textwrap.dedent(f"""
        import json, resource, signal, distllm
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        store = distllm.open_store({str(tmp_path)!r})
        ckpt = distllm._Checkpointer(store, owner="me", push_s=60)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        ckpt.write("small.json", b"ok")
        ckpt.write("big.json", b"x" * 10000)
        ckpt.append("results.jsonl", b"line 1\\n")
        flushed_while_full = ckpt.flush(1.0)
        status_while_full = ckpt.status
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        flushed = ckpt.flush(30.0)
        ckpt.close(5.0)
        print(json.dumps([flushed_while_full, status_while_full, flushed, ckpt.status]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    full_flushed, full_status, flushed, status = json.loads(out.stdout.splitlines()[-1])
    assert not full_flushed and "File too large" in full_status and "kept in memory" in full_status
    assert flushed and status.endswith(": ok")
    assert (tmp_path / "big.json").read_bytes() == b"x" * 10000
    assert (tmp_path / "results.jsonl").read_bytes() == b"line 1\n"
    assert (tmp_path / "small.json").read_bytes() == b"ok"


def test_another_host_claiming_a_local_store_stops_this_ones_checkpoints(tmp_path):
    store = distllm.open_store(str(tmp_path))
    ckpt = distllm._Checkpointer(store, owner="host-a", push_s=60)
    try:
        ckpt.write(distllm.RENDEZVOUS, json.dumps({"host": "host-a"}).encode())
        assert ckpt.flush(5.0)
        store.write(distllm.RENDEZVOUS, json.dumps({"host": "host-b"}).encode())  # a second host took over
        ckpt.write("x.json", b"1")
        ckpt._last_owner_check = 0.0  # check now instead of in 2 s
        ckpt.write("y.json", b"2")
        deadline = __import__("time").monotonic() + 10
        while "stopped" not in ckpt.status and __import__("time").monotonic() < deadline:
            ckpt.flush(0.2)
        assert "another host (host-b) took over" in ckpt.status
        ckpt.write("z.json", b"3")
        assert not ckpt.flush(0.5)
        assert store.read("z.json") is None
    finally:
        ckpt.close(1.0)


# -- the Hub ------------------------------------------------------------------------


def _hub_store(hub, cache):
    return distllm.HubStore("me/state", endpoint=hub.endpoint, token="hf_test", cache_dir=str(cache))


def test_hub_store_commits_in_batches_and_a_new_host_pulls_it(tmp_path):
    with FakeHub() as hub:
        store = _hub_store(hub, tmp_path / "a")
        ckpt = distllm._Checkpointer(store, owner="h1", push_s=3600)
        try:
            ckpt.write(distllm.RENDEZVOUS, b'{"host": "h1"}', urgent=True)
            assert ckpt.flush(10.0), ckpt.status
            commits = len(hub.commit_bytes)
            for i in range(100):  # a hundred token checkpoints ...
                ckpt.write("sessions/s.json", json.dumps({"generated": list(range(i))}).encode())
            ckpt.append("jobs/j/results.jsonl", b'{"index": 0}\n')
            ckpt.write("gone.json", b"x")
            ckpt.delete("gone.json")
            assert ckpt.flush(10.0), ckpt.status
            assert len(hub.commit_bytes) == commits + 1  # ... are one commit, not a hundred
            files = hub.files("me/state")
            assert json.loads(files["sessions/s.json"]) == {"generated": list(range(99))}
            assert files["jobs/j/results.jsonl"] == b'{"index": 0}\n'
            assert "gone.json" not in files
        finally:
            ckpt.close(5.0)
        other = _hub_store(hub, tmp_path / "b")  # another machine: an empty mirror
        assert other.keys() == ["jobs/j/results.jsonl", "rendezvous.json", "sessions/s.json"]
        assert other.read("jobs/j/results.jsonl") == b'{"index": 0}\n'


def test_rejected_commit_is_retried_and_changes_kept(tmp_path):
    with FakeHub() as hub:
        ckpt = distllm._Checkpointer(_hub_store(hub, tmp_path), owner="h1", push_s=3600)
        try:
            hub.fail_commits = [429, 500]  # rate-limited, then a server error
            ckpt.write("a.json", b"1", urgent=True)
            ckpt.write("b.json", b"2")
            assert ckpt.flush(30.0), ckpt.status
            assert ckpt.stats["errors"] == 2 and ckpt.stats["pushes"] == 1
            assert hub.files("me/state") == {"a.json": b"1", "b.json": b"2"}
            assert not hub.fail_commits
        finally:
            ckpt.close(5.0)


def test_changes_a_killed_host_never_pushed_are_pushed_by_the_next(tmp_path):
    with FakeHub() as hub:
        first = _hub_store(hub, tmp_path)
        first.write("sessions/s.json", b"unpushed")  # in the mirror only: the host died before its push
        assert "sessions/s.json" not in hub.files("me/state")
        second = _hub_store(hub, tmp_path)  # restarted on the same machine
        second.push()
        assert hub.files("me/state")["sessions/s.json"] == b"unpushed"


def test_a_host_whose_hub_store_was_taken_over_stops_pushing(tmp_path):
    with FakeHub() as hub:
        ckpt = distllm._Checkpointer(_hub_store(hub, tmp_path), owner="h1", push_s=3600)
        try:
            ckpt.write(distllm.RENDEZVOUS, b'{"host": "h1"}', urgent=True)
            assert ckpt.flush(10.0)
            hub.commit("me/state", {distllm.RENDEZVOUS: b'{"host": "h2"}'})  # a restarted host claimed it
            ckpt.write("late.json", b"x", urgent=True)
            assert not ckpt.flush(5.0)
            assert "another host (h2) took over hf://me/state" in ckpt.status
            assert "late.json" not in hub.files("me/state")
        finally:
            ckpt.close(1.0)


def test_unreachable_hub_keeps_the_host_going_on_its_local_copy(tmp_path, caplog):
    store = distllm.HubStore("me/state", endpoint="http://127.0.0.1:9", token="x", cache_dir=str(tmp_path))
    assert "unreachable" in caplog.text
    ckpt = distllm._Checkpointer(store, owner="h1", push_s=3600)
    try:
        ckpt.write("a.json", b"1", urgent=True)
        assert not ckpt.flush(1.0)
        assert "kept in memory" in ckpt.status or "changes to push" in ckpt.status
        assert store.read("a.json") == b"1"  # written locally all the same
    finally:
        ckpt.close(0.5)


def test_workers_read_the_rendezvous_from_a_directory_or_the_hub(tmp_path):
    join_string = distllm.JoinInfo("tcp://10.0.0.1:5555", None, None, None).encode()
    record = json.dumps({"host": "h", "epoch": 3, "join_string": join_string}).encode()
    assert distllm.read_rendezvous(str(tmp_path)) is None
    (tmp_path / distllm.RENDEZVOUS).write_bytes(record)
    assert distllm.read_rendezvous(str(tmp_path))["join_string"] == join_string
    (tmp_path / distllm.RENDEZVOUS).write_bytes(b'{"join_string": "not a join string"}')
    assert distllm.read_rendezvous(str(tmp_path)) is None  # unreadable: wait for a good one
    with FakeHub() as hub:
        assert distllm.read_rendezvous("hf://me/state", endpoint=hub.endpoint) is None  # no repo yet
        _hub_store(hub, tmp_path / "m")  # creates the repo
        assert distllm.read_rendezvous("hf://me/state", endpoint=hub.endpoint) is None  # no record yet
        hub.commit("me/state", {distllm.RENDEZVOUS: record})
        assert distllm.read_rendezvous("hf://me/state", endpoint=hub.endpoint)["epoch"] == 3


def test_worker_follows_a_restarted_host_through_a_hub_store_keeping_its_layers():
    with FakeHub() as hub:
        hub_options = {"store": "hf://me/state", "hub_endpoint": hub.endpoint, "token": "hf_test"}
        first = distllm.host("tiny", quant="none", bind="127.0.0.1", **hub_options)
        worker = None
        try:
            assert first.checkpoint(30.0)  # the rendezvous record is on the Hub
            worker = distllm.join(name="w", background=True, **hub_options)  # no join string: found in the store
            first.wait_ready(60)
            want = first.generate("hello", max_new_tokens=8)
            loads = worker._shard
        finally:
            first.close()  # the host goes; a worker with a store waits for the next one
        second = distllm.host("tiny", quant="none", bind="127.0.0.1", **hub_options)
        try:
            second.wait_ready(60)
            assert second.generate("hello", max_new_tokens=8) == want
            assert worker._shard is loads  # same layers, not loaded again
            assert worker.join_string == second.join_string != first.join_string
        finally:
            second.close()
            worker.leave(10)
        assert worker.wait(0), "a leaving worker whose host is gone stops at once"
