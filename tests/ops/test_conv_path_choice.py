"""resfast.ops.conv_path: the conv op's GPU path, chosen per problem by measurement.

No GPU is needed: torch.cuda's events, synchronize and device guard are replaced by a
fake GPU whose clock the fake paths advance by what each call costs (a cost that may
depend on how warm the GPU is), so the real measuring code runs and only the call
pattern and the clock are fake.
"""
import contextlib
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resfast.ops import conv_path

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


class FakeGpu:
    def __init__(self):
        self.clock = 0.0
        self.log = []  # path names as they run, "record" for each event recorded

    def event(self, enable_timing=False):
        return _FakeEvent(self)

    def install(self, patch):
        """patch(obj, name, value): monkeypatch.setattr, or setattr in a worker process."""
        patch(torch.cuda, "Event", self.event)
        patch(torch.cuda, "synchronize", lambda device=None: None)
        patch(torch.cuda, "device", lambda device: contextlib.nullcontext())
        patch(torch.cuda, "is_current_stream_capturing", lambda: False)

    def paths(self, cost):
        """Fake paths, one per conv_path.PATHS: a call logs its name and advances the clock by
        cost(name, calls of this path so far, calls of any path so far)."""
        counts = {}

        def impl(name):
            def run(*args):
                n = counts.get(name, 0)
                self.clock += cost(name, n, sum(counts.values()))
                counts[name] = n + 1
                self.log.append(name)
            return run

        return {name: impl(name) for name in conv_path.PATHS}


class _FakeEvent:
    def __init__(self, gpu):
        self.gpu, self.time = gpu, None

    def record(self, stream=None):
        self.time = self.gpu.clock
        self.gpu.log.append("record")

    def elapsed_time(self, end):
        return end.time - self.time

    def synchronize(self):
        pass


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.delenv("RESFAST_CONV_PATH", raising=False)
    conv_path.forget()
    fake = FakeGpu()
    fake.install(monkeypatch.setattr)
    yield fake
    conv_path.forget()


def _fixed(ms):
    return lambda name, n, total: ms[name]


@pytest.mark.parametrize("faster", conv_path.PATHS)
def test_auto_measures_once_and_keeps_the_faster(gpu, faster):
    impls = gpu.paths(_fixed({p: 1.0 if p == faster else 3.0 for p in conv_path.PATHS}))
    assert conv_path.choose("k", impls, (), CUDA) == faster
    runs = len(gpu.log)
    assert conv_path.choose("k", impls, (), CUDA) == faster
    assert len(gpu.log) == runs  # remembered, not measured again
    assert conv_path.chosen_paths() == {"k": faster}


def test_each_problem_is_measured_separately(gpu):
    conv_path.choose("a", gpu.paths(_fixed({"triton": 1.0, "cudnn": 2.0})), (), CUDA)
    conv_path.choose("b", gpu.paths(_fixed({"triton": 2.0, "cudnn": 1.0})), (), CUDA)
    assert conv_path.chosen_paths() == {"a": "triton", "b": "cudnn"}


def test_every_path_warms_up_then_rounds_alternate(gpu):
    """Each path runs WARMUP + 1 times before anything is timed; then ROUNDS rounds time one
    call of each, the first path of a round alternating."""
    conv_path.choose("k", gpu.paths(_fixed({"triton": 1.0, "cudnn": 1.5})), (), CUDA)
    first_record = gpu.log.index("record")
    for name in conv_path.PATHS:
        assert gpu.log[:first_record].count(name) == conv_path.WARMUP + 1, gpu.log
    timed = gpu.log[first_record:]
    # start record, path, end record, for each timed call
    assert timed[0::3] == timed[2::3] == ["record"] * (conv_path.ROUNDS * len(conv_path.PATHS))
    order = timed[1::3]
    rounds = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert rounds == [list(conv_path.PATHS), list(reversed(conv_path.PATHS))] * 2 + [
        list(conv_path.PATHS)]


def test_cold_clocks_do_not_decide(gpu):
    """Triton is the faster path (1.0 against 1.2 ms), but the GPU's first 4 calls run at a
    tenth of the speed: whichever path is timed first on a cold GPU would look slow."""
    def cost(name, n, total):
        return {"triton": 1.0, "cudnn": 1.2}[name] * (10 if total < 4 else 1)

    assert conv_path.choose("k", gpu.paths(cost), (), CUDA) == "triton"


def test_one_stalled_call_does_not_decide(gpu):
    """One timed Triton call stalls for 20 ms (another process, a clock change): a median
    ignores it, a mean over a few calls would not."""
    def cost(name, n, total):
        return 1.0 + (20 if (name, n) == ("triton", 3) else 0) if name == "triton" else 1.2

    assert conv_path.choose("k", gpu.paths(cost), (), CUDA) == "triton"


def test_a_path_that_raises_is_left_out(gpu):
    """A path that cannot run the problem (here: Triton's tile does not fit a smaller GPU's
    shared memory) leaves the choice to the other, with a warning naming why."""
    impls = gpu.paths(_fixed({"triton": 1.0, "cudnn": 5.0}))

    def out_of_resources(*args):
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: "
                           "101376")

    impls["triton"] = out_of_resources
    with pytest.warns(RuntimeWarning, match="triton path cannot run.*shared memory"):
        assert conv_path.choose("k", impls, (), CUDA) == "cudnn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert conv_path.choose("k", impls, (), CUDA) == "cudnn"  # remembered, no new warning


def test_when_every_path_raises_the_error_propagates(gpu):
    def fails(*args):
        raise ValueError("no path for this")

    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no path for this"):
        conv_path.choose("k", {name: fails for name in conv_path.PATHS}, (), CUDA)
    assert not conv_path.chosen_paths()


@pytest.mark.parametrize("forced", conv_path.PATHS)
def test_environment_forces_a_path(gpu, monkeypatch, forced):
    monkeypatch.setenv("RESFAST_CONV_PATH", forced.upper())
    impls = gpu.paths(_fixed({"triton": 1.0, "cudnn": 1.0}))
    assert conv_path.choose("k", impls, (), CUDA) == forced and not gpu.log


def test_bad_environment_value(gpu, monkeypatch):
    monkeypatch.setenv("RESFAST_CONV_PATH", "fastest")
    with pytest.raises(ValueError, match="RESFAST_CONV_PATH"):
        conv_path.choose("k", {}, (), CUDA)


def test_no_measuring_off_cuda_or_during_graph_capture(gpu, monkeypatch):
    impls = gpu.paths(_fixed({"triton": 2.0, "cudnn": 1.0}))
    assert conv_path.choose("k", impls, (), torch.device("cpu")) == "triton"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert conv_path.choose("k", impls, (), CUDA) == "triton"
    assert not gpu.log and not conv_path.chosen_paths()


# ---- several processes ---------------------------------------------------------------------

# Per rank, what each path costs there: rank 0 finds Triton faster, rank 1 cuDNN.
RANK_COSTS = [{"triton": 1.0, "cudnn": 2.0}, {"triton": 4.0, "cudnn": 3.0}]


def _rank_worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        os.environ.pop("RESFAST_CONV_PATH", None)
        gpu = FakeGpu()
        gpu.install(setattr)
        choices = [conv_path.choose(("k", torch.device("cuda", rank)),
                                    gpu.paths(_fixed(RANK_COSTS[rank])), (), CUDA)]
        if rank == 0:  # a problem only this rank meets (say, evaluation on rank 0): no waiting
            choices.append(conv_path.choose("alone", gpu.paths(_fixed(RANK_COSTS[1])), (), CUDA))
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(" ".join(choices))
        dist.barrier()  # neither rank tears the group down while the other still sets it up
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_of_a_distributed_job_choose_alike(tmp_path):
    """Two processes (gloo) measure the same problem (each on its own cuda:N) on GPUs that
    disagree: both take the path of whichever finished measuring first. A problem that only
    one rank meets is chosen there without waiting for the other."""
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = ((tmp_path / f"rank{r}").read_text().split() for r in range(2))
    assert rank0[0] == rank1[0] and rank0[0] in conv_path.PATHS
    assert rank0[1] == "cudnn"


@pytest.mark.gpu
def test_measures_real_paths_on_the_gpu():
    """On a GPU: the op's first call of a shape records a choice, later calls reuse it."""
    from resfast.ops.conv2d_bn import conv2d_bn

    conv_path.forget()
    x = torch.randn(8, 16, 14, 14, device="cuda",
                    dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.bfloat16)
    y1, *_ = conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    assert len(conv_path.chosen_paths()) == 1
    y2, *_ = conv2d_bn(x, w, None, None, None, False, 1, 1, True, False)
    assert len(conv_path.chosen_paths()) == 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    conv_path.forget()
