"""Flower's grid in this process, for the ServerApp's round loop against real ClientApp handlers."""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto

from client.client_app import app as client_app
from common.federation_config import FederationConfig


class InProcessGrid:
    """Flower's grid, in this process: what Flower does to a message on the way, without Ray.

    - every message and reply is round-tripped through Flower's own protobuf
      serialisation (as on the wire), never shared as Python objects;
    - a handler that raises is turned into an error reply exactly as Flower's
      simulation does (`Message(Error(code, "<type>:<'text'>"), reply_to=...)`),
      so partial rounds and what an error reply carries are really tested;
    - each site's Context holds the *launch's* run_config (pyproject defaults
      unless given), as Flower gives it, not the server's config.
    """

    fedvlsm_simulation = True  # the server treats it like Flower's simulation grid

    def __init__(self, cfg: FederationConfig, num_sites: int, node_configs: list[dict] | None = None,
                 launch_run_config: dict | None = None) -> None:
        launch = launch_run_config if launch_run_config is not None else FederationConfig().to_run_config()
        node_configs = node_configs or [{"partition-id": k, "num-partitions": num_sites} for k in range(num_sites)]
        self.contexts = {
            100 + k: Context(run_id=1, node_id=100 + k, node_config=nc, state=RecordDict(), run_config=dict(launch))
            for k, nc in enumerate(node_configs)
        }
        self.replies: list[Message] = []  # everything the server received
        self.wire_replies: list[bytes] = []  # ...and its serialised bytes

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.metadata.message_id or f"m{len(self.replies)}"
            delivered = message_from_proto(message_to_proto(
                Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)))
            try:
                reply = client_app(delivered, self.contexts[m.metadata.dst_node_id])
            except Exception as ex:  # what Flower's simulation runtime does (vce_api.py)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=delivered)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            wire = message_to_proto(reply)
            self.wire_replies.append(wire.SerializeToString())
            reply = message_from_proto(wire)
            self.replies.append(reply)
            out.append(reply)
        return out
