"""Comparison helpers shared by the tests.

Tolerance rule (after flash-attention): for low precision, resfast's error
against a float64 reference must be at most ~2x the error of PyTorch's own
computation in the same precision, plus a small floor. For float32/float64 we
compare against the float64 reference with a fixed relative-norm bound:
different summation orders give ~1e-7 (float32) and ~1e-15 (float64).
"""
import contextlib
import functools
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

from resfast.twin import recording_resfast_ops

# relative-norm floors per precision
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# Low-precision gradients through a ReLU differ from the float64 reference
# mostly by mask flips where the pre-activation rounds across zero. One flip in
# a test-sized tensor moves the relative error of a gradient by 1-3% in bf16
# (measured on 4x63x7x7 -> 16 channels: 0.3% with no flip, 1.5-5.6% with 1-5
# flips, for resfast and torch alike), so the ratio to torch's own error is
# noise there. bf16/fp16 tests use 4x the batch (the index logic is covered by
# the float32/float64 cases at the small sizes); gradients are allowed 3x
# torch's error, and never less than GRAD_FLOOR, a few flips' worth. A broken
# low-precision path (a bf16 accumulator, a missing term) errs by far more.
GRAD_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}
LOW_PRECISION = (torch.bfloat16, torch.float16)
GRAD_FACTOR = 3.0

# the cuda cases are marked gpu: skipped with the reason without a GPU (tests/conftest.py),
# and `pytest -m gpu` runs only them (scripts/gpu_run.sh)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# glibc's malloc (mallopt: resfast.cpu_memory)
GLIBC = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None


# ATen's x86 instruction sets
CAPABILITIES = ("default", "avx2", "avx512")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_with_capability(capability: str, script: str, out) -> dict:
    """Runs ``script`` (python -c, argv[1] = ``out``) in a fresh process whose
    ATEN_CPU_CAPABILITY is ``capability``, from the repository root, and returns what it
    saved to ``out`` with torch.save: a dict whose "isa" is ``torch.ops.resfast.cpu_isa()``.
    Skips where this CPU cannot run the set (ATen runs what the variable names, even
    instructions the CPU lacks: SIGILL) or where the build lacks it (the child runs another)."""
    supported = {"default": True, "avx2": torch.cpu._is_avx2_supported(),
                 "avx512": torch.cpu._is_avx512_supported()}
    if not supported[capability]:
        pytest.skip(f"this CPU has no {capability.upper()}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=ROOT,
                   timeout=300)
    saved = torch.load(out, weights_only=False)
    if saved["isa"] != capability.upper():
        pytest.skip(f"this build runs {saved['isa']} for ATEN_CPU_CAPABILITY={capability}")
    return saved


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> Optional[str]:
    """Why the Triton kernels cannot run on CPU tensors here, or None if they can.

    Probed, not guessed from versions: Triton 3.6's interpreter fails on every
    loop over a runtime bound when numpy is 2.4 or newer (numpy no longer turns
    a 1-element array into an int: triton-lang/triton#9171); 3.8 works.
    """
    from resfast.kernels import interpreting, triton_available
    if not triton_available():
        return "Triton is not installed"
    if not interpreting():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count_kernel(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_kernel[(1,)](out, 3)
    except Exception as e:
        return (f"the interpreter of Triton {triton.__version__} fails on a loop over a runtime "
                f"bound with numpy {numpy.__version__} ({type(e).__name__}: {e}; "
                f"triton-lang/triton#9171): use a newer Triton or numpy<2.4")
    if out.item() != 3:
        return f"the Triton {triton.__version__} interpreter counts a 3-step loop as {out.item()}"
    return None


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """||a - ref|| / ||ref||. A reference that is zero up to rounding (the grad
    of a conv bias followed by training-mode BN) is measured against ``scale``
    (the norm of the incoming gradient) instead."""
    a = a.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(a).all(), "non-finite values"
    denom = ref.norm().item()
    if denom < 1e-6 * scale:
        denom = scale
    diff = (a - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_conv_bn_step_close(layer, ref64, x, x64, y, y64, tol, grad_tol, stats_tol=1e-6):
    """A training step of a conv + BN (+ ReLU) ``layer`` (its ``conv`` and ``bn``) against
    the float64 torch.nn ``ref64`` (Sequential(conv, bn, ...)) after both ran forward and
    backward: the output within ``tol``, the input's, the conv weight's and the BN weight's
    gradients within ``grad_tol``, the running variance within ``stats_tol``, each as
    rel_err (relative to the reference's norm)."""
    for name, ours, ref, bound in (("output", y, y64, tol),
                                   ("grad of x", x.grad, x64.grad, grad_tol),
                                   ("grad of conv.weight", layer.conv.weight.grad,
                                    ref64[0].weight.grad, grad_tol),
                                   ("grad of bn.weight", layer.bn.weight.grad,
                                    ref64[1].weight.grad, grad_tol),
                                   ("bn.running_var", layer.bn.running_var, ref64[1].running_var,
                                    stats_tol)):
        err = rel_err(ours, ref)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


def assert_close(name, ours, ref64, torch_same=None, dtype=torch.float32, factor=2.0, scale=0.0,
                 floor=None):
    """ours vs the float64 reference; for low precision the bound is
    factor x torch's same-precision error (if given), never below the floor."""
    err = rel_err(ours, ref64, scale)
    bound = FLOOR[dtype] if floor is None else floor
    torch_err = None
    if torch_same is not None:
        torch_err = rel_err(torch_same, ref64, scale)
        bound = max(bound, factor * torch_err)
    if err > bound:
        diff = (ours.detach().double().cpu() - ref64.detach().double().cpu()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(
            f"{name}: relative error {err:.3g} > bound {bound:.3g} (torch's own error "
            f"{torch_err}); max abs diff {diff.max().item():.3g} at {idx}")
    return err


@contextlib.contextmanager
def no_resfast_ops(what: str = "the torch.nn reference"):
    """Fails if a resfast op runs inside: a reference (the plain torch.nn twin,
    torchvision) must stay independent of the code under test."""
    with recording_resfast_ops() as used:
        yield
    assert not used, f"{what} ran resfast ops {sorted(used)}"


def autocast_ctx(device: str, dtype: torch.dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device, dtype=dtype)
    return torch.autocast(device, enabled=False)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters and inputs stay float32 under autocast, as in mixed-precision training."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def check_module_pair(ours, ref, inputs, *, dtype, device, training, layout="nhwc", factor=2.0):
    """Run ``ours`` and the torch.nn module ``ref`` (same parameter names) on the
    same inputs; compare the output, the gradient of every input and parameter,
    and the buffers (BN running statistics) after the step against a float64
    copy of ``ref``, with torch's own same-precision error as the yardstick."""
    import copy

    pdt = param_dtype(dtype)
    ref = ref.to(device=device, dtype=pdt)
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(device=device, dtype=pdt)
    ref64 = copy.deepcopy(ref).to(torch.float64)
    same = copy.deepcopy(ref)
    for m in (ours, ref, ref64, same):
        m.train(training)

    base = [to_layout(t.to(device=device, dtype=pdt), layout) for t in inputs]

    def run(module, dt, cast):
        xs = [t.detach().to(dt).requires_grad_() for t in base]
        with cast:
            out = module(*xs)
        return out, xs

    with no_resfast_ops():
        out64, x64 = run(ref64, torch.float64, autocast_ctx(device, None))
    grad = torch.randn_like(out64)
    results = {}
    for key, module, dt, cast in (("ours", ours, pdt, autocast_ctx(device, dtype)),
                                  ("same", same, pdt, autocast_ctx(device, dtype))):
        with no_resfast_ops() if key == "same" else contextlib.nullcontext():
            out, xs = run(module, dt, cast)
            assert out.shape == out64.shape
            grads = torch.autograd.grad(out, xs + [p for p in module.parameters()],
                                        grad.to(out.dtype))
        results[key] = (out, grads)
    with no_resfast_ops():
        grads64 = torch.autograd.grad(out64, x64 + list(ref64.parameters()), grad)

    low = dtype in (torch.bfloat16, torch.float16)
    (o_out, o_grads), (s_out, s_grads) = results["ours"], results["same"]
    names = [f"grad of input {i}" for i in range(len(base))] + [f"grad of {n}" for n,
                                                                _ in ref64.named_parameters()]
    assert_close("output", o_out, out64, s_out if low else None, dtype, factor)
    scale = grad.norm().item()
    # In bfloat16 / float16 a gradient's error is mostly ReLU flips (a pre-activation within
    # rounding of 0 lands on the other side), and which tensor a flip hits is chance: torch's
    # own error on one tensor is a draw of that noise, and the mean of its errors over all
    # the gradients of the step a steadier measure of it. Measured on test_bottleneck's
    # (16, 8, 2, True) eval block over 12 inputs: resfast's and torch's mean errors per tensor
    # agree within 0.85-1.3x, single draws vary 5x (conv3.weight: ours 0.074 on a draw where
    # torch's was 0.011; torch's own went up to 0.063 on others).
    noise = (sum(rel_err(gs, g64, scale) for gs, g64 in zip(s_grads, grads64)) / len(grads64)
             if low else 0.0)
    for name, g, gs, g64 in zip(names, o_grads, s_grads, grads64):
        assert_close(name, g, g64, gs if low else None, dtype, GRAD_FACTOR * factor / 2,
                     scale=scale, floor=max(GRAD_FLOOR[dtype], GRAD_FACTOR * factor / 2 * noise))
    ours_buffers = dict(ours.named_buffers())
    same_buffers = dict(same.named_buffers())
    for name, b64 in ref64.named_buffers():
        if b64.dtype.is_floating_point:
            assert_close(f"buffer {name}", ours_buffers[name], b64,
                         same_buffers[name] if low else None, dtype, factor)
        else:
            assert torch.equal(ours_buffers[name].cpu(), b64.cpu()), f"buffer {name} differs"
    return o_out
