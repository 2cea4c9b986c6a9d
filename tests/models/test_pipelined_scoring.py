"""The device forward loop of Scorer.score (models/scoring.py): chunk k+1 prepared and copied while chunk k runs,
scores kept on the device and copied back once, scattered to input order. Covered on CPU: a fake transfer stands
in for the CUDA streams (same calls, recorded), and CudaTransfer itself runs against a fake torch.cuda."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.packing import PackedInputs
from models.scoring import CudaTransfer, input_tensors, move_inputs
from tests.tiny_models import DOCS, QUERIES

PAIRS = [(q, d * (1 + i % 3)) for i, (q, d) in enumerate((q, d) for q in QUERIES for d in DOCS)]


class RecordingTransfer:
    """What the loop asks of a transfer, in order; inputs stay on the CPU (identity moves)."""

    def __init__(self, log):
        self.log, self.uploads = log, 0

    def upload(self, host):
        self.log.append(("upload", self.uploads))
        self.uploads += 1
        return host, self.uploads - 1

    def ready(self, pending):
        self.log.append(("ready", pending[1]))
        return pending[0]

    def to_host(self, scores):
        self.log.append(("to_host", tuple(scores.shape)))
        return scores.numpy()


@pytest.mark.parametrize("execution", ["padded", "packed"])
@pytest.mark.parametrize("variant", ["modular", "bert", "xlmr"])
def test_pipelined_loop_order_one_copy_back_and_input_order(tiny, variant, execution):
    from models import load_scorer

    scorer = load_scorer(str(tiny[variant]), dtype="float32", device="cpu", token_budget=96, execution=execution)
    batch = scorer.encoder.encode(PAIRS)
    chunks = scorer.chunks(batch.lengths)
    assert len(chunks) >= 4 and not np.array_equal(np.concatenate(chunks), np.arange(len(PAIRS)))  # reordered
    want = scorer.score(batch)  # the CPU loop: per chunk, scores straight to host memory

    log = []
    prepare, run = scorer._prepare, scorer._run
    scorer._prepare = lambda b, index: log.append(("prepare", len(index))) or prepare(b, index)
    scorer._run = lambda inputs: log.append(("run",)) or run(inputs)
    scorer.transfer = RecordingTransfer(log)
    got = scorer.score(batch)

    assert np.array_equal(got, want)  # same chunks, same math, scattered back to input order
    expected = [("prepare", len(chunks[0])), ("upload", 0)]
    for k in range(len(chunks)):
        expected += [("ready", k), ("run",)]
        if k + 1 < len(chunks):  # the next chunk is packed and copied only once this forward is queued
            expected += [("prepare", len(chunks[k + 1])), ("upload", k + 1)]
    expected.append(("to_host", (len(PAIRS),)))  # one device-to-host copy for the whole call
    assert log == expected


def test_one_chunk_and_empty_batch(scorers):
    scorer = scorers("modular")
    batch = scorer.encoder.encode(PAIRS[:3])
    want = scorer.score(batch)
    log = []
    scorer.transfer = RecordingTransfer(log)
    try:
        assert np.array_equal(scorer.score(batch), want)
        assert [e[0] for e in log] == ["upload", "ready", "to_host"]
        assert scorer.score(batch.select([])).shape == (0,)
    finally:
        scorer.transfer = None


class FakeStream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)


class FakeEvent:
    def __init__(self):
        self.recorded_on = None

    def record(self, stream):
        self.recorded_on = stream


class FakeTensor:
    """A host tensor whose copy records the stream it was issued on; a device one records record_stream."""

    def __init__(self, cuda, device=None):
        self.cuda, self.device, self.copy = cuda, device, None
        self.streams = []

    def to(self, device, non_blocking=False):
        moved = FakeTensor(self.cuda, device)
        moved.copy = (self.cuda.active.name, non_blocking)
        return moved

    def record_stream(self, stream):
        self.streams.append(stream)


class FakeCuda:
    """The parts of torch.cuda that CudaTransfer calls."""

    def __init__(self):
        self.compute = FakeStream("compute")
        self.active = self.compute
        self.Event = FakeEvent

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        assert device.type == "cuda"
        return FakeStream("copy")

    def current_stream(self, device):
        return self.compute

    def stream(self, s):
        cuda = self

        class _Context:
            def __enter__(self):
                self.previous, cuda.active = cuda.active, s

            def __exit__(self, *exc):
                cuda.active = self.previous

        return _Context()


@pytest.mark.parametrize("kind", ["padded", "padded_no_types", "packed"])
def test_cuda_transfer_copies_on_the_side_stream_and_orders_the_compute_stream(kind):
    cuda = FakeCuda()
    transfer = CudaTransfer("cuda:0", cuda=cuda)
    t = lambda: FakeTensor(cuda)  # noqa: E731
    if kind == "packed":
        host = PackedInputs(input_ids=t(), position_ids=t(), cu_seq_lens=t(), max_length=7)
    else:
        host = (t(), t(), t() if kind == "padded" else None)
    pending = transfer.upload(host)
    moved, event = pending
    tensors = input_tensors(moved)
    assert len(tensors) == (3 if kind != "padded_no_types" else 2)
    # Every copy was issued on the copy stream, non-blocking, and the event recorded after them there.
    assert all(x.copy == ("copy", True) and x.device == torch.device("cuda:0") for x in tensors)
    assert event.recorded_on is transfer.copy_stream and cuda.active is cuda.compute
    assert cuda.compute.waited == []  # nothing waits before the chunk is needed
    assert transfer.ready(pending) is moved
    assert cuda.compute.waited == [event]  # the compute stream waits on the device, the host does not
    assert all(x.streams == [cuda.compute] for x in tensors)  # memory kept until the forward is done
    if kind == "packed":
        assert moved.max_length == 7 and moved.token_type_ids is None


def test_move_inputs_keeps_none_and_fields():
    ids = torch.arange(3)
    assert move_inputs((ids, None, ids), lambda x: x + 1)[1] is None
    packed = PackedInputs(input_ids=ids, position_ids=ids, cu_seq_lens=ids, max_length=3, lengths=np.array([3]))
    moved = move_inputs(packed, lambda x: x * 2)
    assert moved.input_ids.tolist() == [0, 2, 4] and moved.lengths.tolist() == [3] and moved.max_length == 3
