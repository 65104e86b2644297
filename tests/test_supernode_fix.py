"""client/supernode.py: Flower 1.42's own SuperNode loop, driven with a fake SuperLink connection.

The state the CI hang left a site in (after a SuperLink restart, see the module's docstring): the
resumed run's message was pulled and answered, but the push that followed sent a stale reply of
the crashed run, so the answer sits in the node's state, and the SuperLink has nothing more to
send (its server waits for that answer). Flower's loop, unpatched, never sends it; patched, it
sends it at its next pull. And the cause: a message of the stopped run whose receive Flower gave
up on stays in the node's state for a ClientApp to run; patched, it is dropped unless a ClientApp
already has it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal as loop
from flwr.supernode.nodestate import NodeStateFactory

from client import supernode

NODE_ID = 7


class _Stop(BaseException):
    """Ends Flower's endless loop from inside (it catches only Exception and RunNotRunningException)."""


def _train_message(server_round: int) -> Message:
    """A train message of run 11 for this node, as the SuperLink stores it (its id set)."""
    meta = Metadata(run_id=11, message_id="", src_node_id=1, dst_node_id=NODE_ID, reply_to_message_id="",
                    group_id=str(server_round), created_at=time.time(), ttl=600.0, message_type="train",
                    src_task_id=1, dst_task_id=None)
    msg = Message(content=RecordDict({"c": ConfigRecord({"round": server_round})}), metadata=meta)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _pulled_and_answered(state, store) -> Message:
    """A message of the resumed run, taken by its ClientApp, whose reply is in the state untaken."""
    msg = _train_message(1)
    loop._insert_message(msg, state, store)
    assert [m.object_id for m in state.get_messages_legacy(is_reply=False)] == [msg.object_id]  # taken
    reply = Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=msg)
    loop._insert_message(reply, state, store)
    assert supernode.pending_reply(state)
    return reply


def _run_loop(monkeypatch, seconds: float) -> tuple[list[Message], int]:
    """Flower's start_client_internal until it sends a reply or `seconds` pass: the replies it sent, and
    how many pulls it made (the last one is the stop)."""
    sent: list[Message] = []
    pulls = {"n": 0}
    deadline = time.monotonic() + seconds

    def receive():
        pulls["n"] += 1
        if sent or time.monotonic() > deadline:
            raise _Stop
        return None  # the SuperLink has nothing for this node: its server waits for the reply

    def send(message, object_tree, clientapp_runtime):
        sent.append(message)
        return set(), "session"  # no object contents asked for

    def unused(*args, **kwargs):
        raise AssertionError("not called in this scenario")

    @contextmanager
    def connection(**kwargs):
        yield NODE_ID, receive, send, unused, unused, unused, unused, unused

    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    expected = _pulled_and_answered(factory.state(), factory.objectstore_factory.store())
    monkeypatch.setattr(loop, "_init_connection", connection)
    monkeypatch.setattr(loop, "register_signal_handlers", lambda **kwargs: None)  # not pytest's signals
    with pytest.raises(_Stop):
        loop.start_client_internal(state_factory=factory, server_address="127.0.0.1:1", node_config={},
                                   isolation="process")  # "process": no SuperExec is started
    assert all(m.object_id == expected.object_id for m in sent)
    return sent, pulls["n"]


def test_flowers_loop_unpatched_keeps_a_pending_reply(monkeypatch):
    """The defect, shown on the installed Flower (if this fails, Flower fixed it: drop the patch)."""
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)  # restored after
    if getattr(loop._pull_and_store_message, supernode._PATCHED, False):
        pytest.skip("this process runs the patched loop already")
    sent, pulls = _run_loop(monkeypatch, seconds=4.0)
    assert sent == [] and pulls >= 2, (sent, pulls)  # it went round (3 s sleeps) and never sent it


def test_the_patched_loop_sends_a_pending_reply_at_its_next_pull(monkeypatch):
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)  # undone after the test
    assert supernode.install_fix()
    assert supernode.install_fix()  # idempotent: not wrapped twice
    assert not getattr(getattr(loop._pull_and_store_message, "__wrapped__", None), supernode._PATCHED, False)
    sent, pulls = _run_loop(monkeypatch, seconds=20.0)
    # Sent right after the first empty pull (the second pull is the stop), not at the 20 s stop.
    assert len(sent) == 1 and pulls == 2, (sent, pulls)


def test_site_start_runs_the_patched_supernode():
    import argparse

    from client.launcher import add_site_commands, supernode_command

    parser = argparse.ArgumentParser()
    add_site_commands(parser.add_subparsers())
    args = parser.parse_args(["site", "start", "--superlink", "127.0.0.1:9092", "--data", ".", "--insecure"])
    cmd = supernode_command(args, {"site-name": "h"}, 9100)
    assert cmd[:3] == [sys.executable, "-m", "client.supernode"]
    # The module runs flower-supernode itself: its own argument parser answers.
    out = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: flower-supernode" in out.stdout and "--superlink" in out.stdout, (
        out.stdout[-1000:] + out.stderr[-1000:])


def _receive_refused(monkeypatch, taken_first: bool):
    """Flower's receive step for one message whose run was stopped while it came in (the SuperLink refuses
    its confirmation); `taken_first`: a ClientApp took it before the refusal. The node's state after it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.run import Run, RunNotRunningException

    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state, store = factory.state(), factory.objectstore_factory.store()
    state.set_node_id(NODE_ID)
    run = Run.create_empty(11)
    run.fab_hash = "f" * 64
    state.store_run(run)  # a run the node knows (no FAB to fetch)
    msg = _train_message(2)
    objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}

    def confirm(run_id, message_id):
        if taken_first:
            assert state.get_messages_legacy(run_ids=[11], is_reply=False)  # the ClientApp takes it
        raise RunNotRunningException

    run_id = loop._pull_and_store_message(
        state=state, object_store=store, node_config={}, receive=lambda: (msg, get_object_tree(msg)),
        get_run=None, get_fab=None, pull_object=lambda run_id, obj_id: objects[obj_id],
        confirm_message_received=confirm, trusted_entities=None)
    assert run_id is None  # Flower: "Run ID 11 is not in RUNNING status. Ignoring message ..."
    return state, msg


def test_flowers_receive_unpatched_leaves_a_stopped_runs_message_for_a_client_app(monkeypatch):
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    if getattr(loop._pull_and_store_message, supernode._PATCHED, False):
        pytest.skip("this process runs the patched loop already")
    state, msg = _receive_refused(monkeypatch, taken_first=False)
    assert [m.object_id for m in state.get_messages_legacy(is_reply=False)] == [msg.object_id]  # it would run


def test_the_patched_receive_drops_it_unless_a_client_app_has_it(monkeypatch):
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    assert supernode.install_fix()
    state, _ = _receive_refused(monkeypatch, taken_first=False)
    assert state.get_messages_legacy(is_reply=False) == [] and state.msg_store == {}  # no training for it
    state, msg = _receive_refused(monkeypatch, taken_first=True)
    assert msg.metadata.message_id in state.msg_store  # the ClientApp running it still has it (its reply:
    # dropped by the SuperLink; the loop's pairing is kept right by the first change)
