"""The adapter packed into one Array on the deployment wire (common/packed.py, client/wire.py, server/messaging.py).

- packing is lossless for every wire dtype (fp32, fp16, int8 + fp32 scales), keeps order, names, shapes;
- bad manifests/buffers raise PackError (and become failed replies on the server, never a crash);
- a whole federation over a grid that *is* Flower's deployment grid (HttpGrid, push/pull overridden to
  deliver in-process) packs every adapter message both ways, and ends with exactly the adapter of the
  unpacked in-process run;
- the ClientApp packs its reply only when the message it got was packed;
- client/arrays.py's fast numpy <-> Array gives Flower's own bytes and arrays, and Flower's errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.superlink.grid import HttpGrid

from common.data import synthesize
from common.federation_config import FederationConfig
from client.arrays import to_array, to_numpy, to_record
from client.wire import PackError, is_packed, pack_content, unpack_content
from common.packed import MANIFEST_RECORD, PACKED
from fed_harness import InProcessGrid
from server import messaging
from server.server_app import run_federation


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _content(arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": 3}), "config": ConfigRecord({"x": 1})})


def test_packing_is_lossless_for_every_wire_dtype_and_keeps_names_order_and_shapes():
    rng = np.random.default_rng(0)
    arrays = {"b.weight": rng.standard_normal((3, 4)).astype(np.float16),
              "a.bias": rng.standard_normal(5).astype(np.float32),
              "c.q": rng.integers(-127, 128, (2, 2, 2)).astype(np.int8), "c.q@scale": np.float32([0.5]),
              "empty": np.zeros((0, 3), np.float32)}
    packed = pack_content(_content(arrays))
    assert is_packed(packed) and list(packed["arrays"].keys()) == [PACKED]
    assert set(packed.keys()) == {"arrays", "metrics", "config", MANIFEST_RECORD}
    back = unpack_content(packed)
    got = {k: a.numpy() for k, a in back["arrays"].items()}
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a), k
    assert back["metrics"]["num-examples"] == 3 and not is_packed(back)
    # one Array carries exactly the tensors' bytes
    assert packed["arrays"][PACKED].numpy().nbytes == sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("manifest, size, match", [
    ([["a", "float32", [2]]], 4, "larger than its buffer"),
    ([["a", "float32", [1]]], 8, "larger than its manifest"),
    ([["a", "float32", [1]], ["a", "float32", [1]]], 8, "twice"),
    ([["a", "object", [1]]], 8, "malformed"),
    ([["a", "float32", [-1]]], 4, "malformed"),
    # dims whose int64 product wraps to 0 bytes: passed the size checks, then a bare ValueError
    ([["a", "float32", [2**32, 2**32]]], 0, "larger than its buffer"),
    ([["a", "float32", [True]]], 4, "malformed"),  # JSON true is no dimension (a bare TypeError before)
    ({"a": 1}, 4, "list"),
])
def test_a_bad_manifest_is_refused(manifest, size, match):
    content = RecordDict({"arrays": ArrayRecord({PACKED: Array(np.zeros(size, np.uint8))}),
                          MANIFEST_RECORD: ConfigRecord({"manifest": json.dumps(manifest)})})
    with pytest.raises(PackError, match=match):
        unpack_content(content)
    content = RecordDict({"arrays": ArrayRecord({PACKED: Array(np.zeros(4, np.float32))}),
                          MANIFEST_RECORD: ConfigRecord({"manifest": "[]"})})
    with pytest.raises(PackError, match="uint8"):
        unpack_content(content)


def test_the_server_turns_an_unreadable_packed_reply_into_a_failed_reply():
    bad = Message(RecordDict({"arrays": ArrayRecord({PACKED: Array(np.zeros(3, np.uint8))}),
                              MANIFEST_RECORD: ConfigRecord({"manifest": "not json"}),
                              "site": ConfigRecord({"name": "hospital-x"})}), dst_node_id=5, message_type="train")
    messaging._unpack([bad])
    assert bad.content["status"]["error"].startswith("malformed reply: packed payload unreadable")
    assert bad.content["site"]["name"] == "hospital-x" and "arrays" not in bad.content


class PackingDeploymentGrid(HttpGrid):
    """Flower's deployment grid class (so the server packs), delivering in this process."""

    def __init__(self, inner: InProcessGrid) -> None:  # noqa: D107 - no SuperLink connection
        self.inner, self.pending, self.seen_packed, self.replies_packed = inner, {}, 0, 0

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.seen_packed += "arrays" in m.content and is_packed(m.content)
            mid = f"m{len(self.pending)}-{id(m)}"
            m.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            reply = self.inner.send_and_receive([self.pending.pop(mid)])[0]
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies_packed += reply.has_content() and is_packed(reply.content)
            out.append(reply)
        return out


def test_a_federation_over_the_deployment_grid_packs_both_ways_and_reaches_the_unpacked_result(tmp_path):
    data = tmp_path / "data"
    synthesize(data, sites=3, per_site=9, seed=0, image_size=64)
    results = {}
    for name in ("plain", "packed"):
        cfg = FederationConfig(base="arch:tiny", adapter="shallow-vlc", home=str(tmp_path / name), rounds=2,
                               compare=False, lr=0.01, run_name="r", data=str(data), payload_dtype="int8")
        inner = InProcessGrid(cfg, 3)
        grid = PackingDeploymentGrid(inner) if name == "packed" else inner
        run_federation(grid, cfg)
        from safetensors.numpy import load_file

        results[name] = load_file(str(tmp_path / name / "runs" / "r" / "final" / "adapter" /
                                      "adapter_model.safetensors"))
        rounds = [json.loads(x) for x in (tmp_path / name / "runs" / "r" / "rounds.jsonl").read_text().splitlines()]
        assert all(r["status"] == "ok" and not r["failures"] and not r["excluded"] for r in rounds)
        if name == "packed":
            assert grid.seen_packed == 2 * 2 * 3  # train + evaluate, 2 rounds, 3 sites
            assert grid.replies_packed == 2 * 3  # train replies carry the update; evaluate replies no arrays
            assert all("t-sent" in s["timeline"] and "t-received" in s["timeline"]
                       for r in rounds for s in r["sites"].values())
        # Handlers stamp their start and end (client/client_app.py), in order, in both modes.
        assert all(s[k]["t-handler-start"] <= s[k]["t-handler-end"]
                   for r in rounds for s in r["sites"].values() for k in ("timeline", "val_timeline"))
    assert results["plain"].keys() == results["packed"].keys()
    for k in results["plain"]:
        assert np.array_equal(results["plain"][k], results["packed"][k]), k


def test_the_client_app_packs_its_reply_only_when_the_message_was_packed(tmp_path):
    from client.client_app import dispatch
    from flwr.app import Context

    msg = Message(pack_content(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                                           "config": ConfigRecord({})})), dst_node_id=1, message_type="query.nonsense")
    ctx = Context(run_id=1, node_id=1, node_config={"site-name": "s", "site-dir": str(tmp_path)},
                  state=RecordDict(), run_config={})
    reply = dispatch(msg, ctx)  # unknown type: an error reply with no arrays, so nothing to pack
    assert "arrays" not in reply.content and reply.content["status"]["error"].startswith("protocol")
    assert not is_packed(msg.content) and list(msg.content["arrays"].keys()) == ["w"]  # handler saw it unpacked


def _odd_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((3, 4)).astype(np.float16), rng.standard_normal(5).astype(np.float32),
            np.array(3.5, np.float32), np.zeros((0, 3), np.int8), rng.integers(-127, 127, (7, 9)).astype(np.int8),
            np.arange(12, dtype=">f4").reshape(3, 4), np.asfortranarray(rng.standard_normal((3, 4))),
            rng.standard_normal((4, 6))[:, ::2], np.array([True, False]), np.frombuffer(b"\x01\x02\x03\x04", np.uint8)]


@pytest.mark.parametrize("x", _odd_arrays(), ids=lambda x: f"{x.dtype}{x.shape}")
def test_fast_arrays_equal_flowers_own(x):
    mine, flowers = to_array(x), Array(x)
    assert (mine.dtype, mine.shape, mine.stype, mine.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    for _ in range(2):  # the second call takes the parsed header from the cache
        got, want = to_numpy(flowers), flowers.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
    assert list(to_record({"a": x, "b": x}).keys()) == ["a", "b"]


def test_fast_arrays_give_flowers_errors_on_bad_bytes():
    good = Array(np.arange(6, dtype=np.float32))
    for bad in (Array(dtype="float32", shape=(6,), stype="numpy.ndarray", data=good.data[:-4]),  # truncated
                Array(dtype="float32", shape=(6,), stype="numpy.ndarray", data=b"not an npy file at all"),
                Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                      data=good.data.replace(b"'<f4'", b"'|O' "))):  # a pickle would be needed
        with pytest.raises(Exception) as flowers:
            bad.numpy()
        with pytest.raises(type(flowers.value)):
            to_numpy(bad)


def test_big_endian_tensors_come_back_with_their_values():
    """The manifest names the dtype without byte order: a big-endian tensor must be packed little-endian."""
    from common.packed import pack_tensors, unpack_tensors

    big = (np.arange(6, dtype=np.float32).reshape(2, 3) / 7).astype(">f4")
    assert big.dtype.byteorder == ">"
    out = unpack_tensors(*pack_tensors({"w": big}))
    assert np.array_equal(out["w"], big.astype("<f4"))


def test_unpacked_tensors_are_their_own_writable_arrays():
    """Not views of the received buffer (read-only when it comes from the wire bytes, and shared)."""
    from common.packed import pack_tensors, unpack_tensors

    buffer, manifest = pack_tensors({"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)})
    out = unpack_tensors(buffer, manifest)
    buffer[:] = 255
    assert out["a"].tolist() == [1.0, 1.0, 1.0] and out["a"].flags.writeable
