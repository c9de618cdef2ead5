"""Two processes on the CPU (gloo, DistributedDataParallel, synchronised BN)
against one process on the same global batches."""
import faulthandler
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resfast.train import train_main
from resfast.train.checkpoint import load_checkpoint
from resfast.train.sync_bn import convert_sync_bn, global_batch_stats

ARGS = ["--model", "tiny_models:tiny_resnet", "--train-subset", "64", "--test-subset", "40",
        "--batch-size", "32",
        "--epochs", "2", "--lr", "0.1", "--workers", "0", "--progress", "off", "--seed", "5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_global_batch_stats(rank: int, world: int):
    """Unequal local batches (3 and 5 samples): forward equals the statistics of
    the concatenated batch, backward equals the single-process gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64) * 3 + 1
    a, b = (torch.randn(4, generator=gen, dtype=torch.float64),
            torch.randn(4, generator=gen, dtype=torch.float64))
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    xl = x[lo:hi].clone().requires_grad_(True)
    var, mean = torch.var_mean(xl, dim=(0, 2, 3), correction=0)
    g_mean, g_var, total = global_batch_stats(mean, var, xl.numel() // 4)
    # Every process computes the same function of the global statistics; the
    # objective is their mean (what DDP's gradient averaging optimises).
    (((g_mean * a).sum() + (g_var.sqrt() * b).sum()) / world).backward()

    xr = x.clone().requires_grad_(True)
    r_var, r_mean = torch.var_mean(xr, dim=(0, 2, 3), correction=0)
    ((r_mean * a).sum() + (r_var.sqrt() * b).sum()).backward()
    assert total == 8 * 9
    torch.testing.assert_close(g_mean, r_mean)
    torch.testing.assert_close(g_var, r_var)
    torch.testing.assert_close(xl.grad, xr.grad[lo:hi])


def _check_one_step_float64(rank: int, world: int, backend: str):
    """One SGD step in float64: DDP + synchronised BN on 2 x 8 images equals one
    process on the 16 (loss, every gradient, parameters after the step, running
    statistics) to rounding."""
    import copy

    import tiny_models

    from resfast.twin import to_torch

    torch.manual_seed(0)
    ref = tiny_models.tiny_resnet().double()
    if backend == "torch":
        ref = to_torch(ref)
    model = convert_sync_bn(copy.deepcopy(ref))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 12, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=gen)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)

    opt_ref = sgd(ref.parameters())
    loss_ref = torch.nn.functional.cross_entropy(ref(x), y)
    loss_ref.backward()
    opt_ref.step()

    opt = sgd(ddp.parameters())
    shard = slice(rank * 16 // world, (rank + 1) * 16 // world)
    loss = torch.nn.functional.cross_entropy(ddp(x[shard]), y[shard])
    loss.backward()
    opt.step()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(global_loss / world, loss_ref.detach(), **tol)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=f"grad of {name}")
        torch.testing.assert_close(p, p_ref, **tol, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, **tol, msg=name)


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    # A crash in a child shows only its signal in the parent: dump the child's
    # Python stacks on SIGABRT/SIGSEGV so a failure says where it happened.
    faulthandler.enable()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_global_batch_stats(rank, world)
        for backend in ("torch", "resfast"):
            _check_one_step_float64(rank, world, backend)
        for backend in ("torch", "resfast"):
            rc = train_main(ARGS
                            + ["--backend", backend, "--sync-bn", "--out",
                               os.path.join(out, backend)])
            assert rc == 0
        # Tear down only when both ranks are done and no DDP reducer still holds
        # the group: otherwise one rank closes its gloo pairs while the other
        # may still be finishing its last collective.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _owning_worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    faulthandler.enable()
    assert train_main(ARGS[:ARGS.index("--epochs")] + ["--epochs", "1", "--workers", "0",
                                                      "--progress", "off", "--out", out]) == 0
    assert not dist.is_initialized()  # the trainer made the group, and closed it


def test_trainer_makes_and_closes_its_process_group(tmp_path):
    """As torchrun starts it (the environment only): each process's trainer creates the
    process group, trains, waits for the other at a barrier and destroys the group."""
    mp.spawn(_owning_worker, args=(2, _free_port(), str(tmp_path / "run")), nprocs=2,
             join=True)
    assert len(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["rng"]) == 2


def _compare(one, two):
    # float32 over 4 SGD steps: the summation order differs between 1 and 2
    # processes, so agreement is to float32 noise (exactness is checked in
    # float64 by _check_one_step_float64).
    h1, h2 = one["history"], two["history"]
    assert len(h1) == len(h2) == 2
    for r1, r2 in zip(h1, h2):
        for k in ("train_loss", "train_top1_err", "test_loss", "test_top1_err", "test_top5_err",
                  "lr"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-4), k
    for k, v in one["model"].items():  # parameters after the steps, and BN running statistics
        torch.testing.assert_close(two["model"][k], v, rtol=1e-3, atol=2e-4, msg=k)
    for s1, s2 in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        # (the last step's gradients dominate these: noisier than the parameters)
        torch.testing.assert_close(s2["momentum_buffer"], s1["momentum_buffer"], rtol=1e-2,
                                   atol=1e-3)


def test_two_processes_match_one(tmp_path):
    """2 epochs x 2 steps, global batch 32 (16 per process), augmentation on."""
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    for backend in ("torch", "resfast"):
        assert train_main(ARGS
                          + ["--backend", backend, "--out", str(tmp_path / "one" / backend)]) == 0
        one = load_checkpoint(tmp_path / "one" / backend / "checkpoint.pt")
        two = load_checkpoint(tmp_path / "ddp" / backend / "checkpoint.pt")
        assert two["config"]["sync_bn"] and len(two["rng"]) == 2
        _compare(one, two)
