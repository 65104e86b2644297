"""`flower-supernode`, its message loop fixed: a stopped run's message is not run, and no reply is kept.

    python -m client.supernode <flower-supernode options>     (what `fedvlsm site start` runs)

Why: Flower 1.42's SuperNode loop pairs one pull with one push. After pulling a
message it waits for *a* reply and sends every reply then in the state; when a
pull finds nothing it sleeps and pulls again, and never looks at the state. A
stale reply therefore shifts the pairing by one for ever, and the SuperNode can
hang with a finished reply in hand. This happens after a SuperLink restart
(seen in this project's CI and reproduced here): a message of the crashed run
was being pulled when the SuperLink died; on reconnection the rest of its
receive is refused (the run was stopped), Flower logs "Ignoring message" but leaves the
message in the node's state, so the ClientApp still runs it. The first message
of the resumed run is then pulled, the push that follows sends the crashed
run's reply (dropped: "Ignoring reply message"), and the resumed run's reply
stays in the state while the server waits for it: the round never ends (its
timeout, default an hour, is the only way out).

Two changes, nothing else:
- when a pull brings nothing but the state holds a reply nobody has taken,
  the loop goes on to its push step at once (which sends it): no reply is
  ever kept;
- when Flower's receive gives up on a message because its run is no longer
  running (its objects or its confirmation refused), the message is dropped
  from the node's state if no ClientApp has taken it yet (what Flower does
  for any other failed receive), so the site does not train for a stopped
  run. One a ClientApp already holds still runs; its reply is dropped by
  the SuperLink, and the first change keeps the loop's pairing right.
A Flower version without the parts this relies on runs unpatched with a
warning (pyproject pins flwr to 1.42.x, whose loop this is written against).
"""

from __future__ import annotations

import sys
from typing import Any

_PATCHED = "_fedvlsm_pushes_pending_replies"


def pending_reply(state: Any) -> bool:
    """Whether the node's state holds a reply that no push has taken yet (it stays untaken)."""
    with state.lock_msg_store:
        return any(not entry.is_retrieved and entry.message.metadata.reply_to_message_id
                   for entry in state.msg_store.values())


def drop_untaken_message(state: Any, object_store: Any, message_id: str) -> bool:
    """Remove a received message from the node's state unless a ClientApp has taken it (True if removed)."""
    with state.lock_msg_store:  # the ClientApp takes messages under this lock too
        entry = state.msg_store.get(message_id)
        if entry is None or entry.is_retrieved:
            return False
        state.delete_messages(message_ids=[message_id])
    object_store.delete(message_id)
    return True


def install_fix() -> bool:
    """Patch the SuperNode loop of this process (idempotent). False (and nothing changed) if the Flower
    installed lacks what the fix relies on."""
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    pull = getattr(loop, "_pull_and_store_message", None)
    if pull is None or not hasattr(loop, "_push_messages"):
        return False
    if getattr(pull, _PATCHED, False):
        return True
    probe = InMemoryNodeState.__init__.__code__.co_names
    if "msg_store" not in probe or "lock_msg_store" not in probe:
        return False

    def pull_or_push_pending(**kwargs: Any) -> int | None:
        receive = kwargs["receive"]
        received: list[str] = []

        def receive_and_note() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0].metadata.message_id)
            return got

        run_id = pull(**{**kwargs, "receive": receive_and_note})
        if run_id is None and received:
            # A message came in but Flower's receive gave up on it. Its only give-up that keeps the message
            # (the others delete it, or fail before storing it) is a run no longer running: drop it unless a
            # ClientApp already has it.
            drop_untaken_message(kwargs["state"], kwargs["object_store"], received[-1])
        if run_id is None and pending_reply(kwargs["state"]):
            # Any run id makes the loop push; the push step sends every untaken reply, whatever its run.
            return 0
        return run_id

    setattr(pull_or_push_pending, _PATCHED, True)
    loop._pull_and_store_message = pull_or_push_pending
    return True


def main() -> None:
    if not install_fix():
        print("[fedvlsm] WARNING: this Flower's SuperNode loop is not the one client/supernode.py fixes "
              "(flwr 1.42.x); running it unpatched", file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # its argparse names itself in usage and errors
    flower_supernode()


if __name__ == "__main__":
    main()
