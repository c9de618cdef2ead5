"""The torch.nn side of every comparison.

The eager baseline of a resfast module or network is its plain torch.nn twin,
:func:`resfast.twin.torch_twin` (the one reference training and the tests use
too): torchvision's forward over copies of the module's own children, the same
weights and BN settings, no resfast op. ``torch.compile`` of that twin is the
third provider. For the ImageNet networks torchvision has, the benchmark uses
``torchvision.models.<name>`` itself when torchvision is installed
(:func:`torchvision_twin`: same state_dict, loaded from the resfast model);
each result row names the baseline it used. For the training conv + BN + ReLU
ops, :class:`CudnnFEConvBNReLU` is the cuDNN frontend peer (provider
``cudnn_fe``, optional: ``pip install nvidia-cudnn-frontend``).
"""
import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as rnn

__all__ = ["CudnnFEConvBNReLU", "torchvision_twin", "cudnn_fe_twin", "cudnn_fe_skip_reason",
           "check_against_eager"]


def torchvision_twin(name: str, module: nn.Module) -> Optional[nn.Module]:
    """The torchvision network registered as the twin of resfast's ``name``
    (``resfast.models.registry``), with ``module``'s weights (its state_dict is
    torchvision's, key for key), or None when torchvision is not installed or
    has no such network."""
    from ..models.registry import model_info

    tv_name = model_info(name).torchvision
    if tv_name is None:
        return None
    try:
        import torchvision
    except ImportError:
        return None
    builder = getattr(torchvision.models, tv_name)
    ref = module.state_dict()
    first = next(iter(ref.values()))
    num_classes = (module.fc.out_features if hasattr(module, "fc")
                   else module.classifier[-1].out_features)
    with torch.device("meta"):
        tv = builder(weights=None, num_classes=num_classes)
    tv = tv.to_empty(device=first.device)
    tv.load_state_dict(ref, strict=True)
    return tv.train(module.training)


# ---- the cuDNN frontend peer (provider "cudnn_fe")
# ------------------------------------------------

CUDNN_FE_INSTALL = "cudnn frontend not installed (pip install nvidia-cudnn-frontend)"
CUDNN_FE_DTYPES = (torch.bfloat16, torch.float16)


def cudnn_fe_skip_reason(device, dtype: torch.dtype, layout: str) -> Optional[str]:
    """Why the cuDNN FE peer cannot run here, or None: the ``cudnn`` package
    (nvidia-cudnn-frontend) must import, the device must be a CUDA GPU, the
    dtype bf16/fp16 and the layout channels_last (cuDNN's fused conv+genstats
    engines are NHWC, half precision)."""
    try:
        import cudnn  # noqa: F401
    except Exception as e:  # ImportError, or the bundled library failing to load
        return (f"{CUDNN_FE_INSTALL}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"[:300])
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "cudnn_fe needs a CUDA GPU"
    if dtype not in CUDNN_FE_DTYPES:
        return ("cudnn_fe runs bf16/fp16 only (cuDNN FE fused conv+genstats), not "
                f"{str(dtype).replace('torch.', '')}")
    if layout != "channels_last":
        return "cudnn_fe needs channels_last (NHWC) tensors"
    return None


def _cudnn_dtype(cudnn, dtype: torch.dtype):
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
            torch.float32: cudnn.data_type.FLOAT}[dtype]


class _CudnnFEGraphs:
    """The two cuDNN FE graphs for one input geometry:
    (1) conv_fprop -> Y, genstats(Y) -> per-channel SUM, SQ_SUM (fp32), one kernel;
    (2) relu(Y * scale + shift) (scale/bias/relu pointwise ops), one kernel.
    The finalize between them (scale, shift from the sums) is done on C-length
    vectors in torch: cudnn-frontend's Python graph API has no bn_finalize node."""

    def __init__(self, x: Tensor, w: Tensor, stride: int, padding: int, relu: bool):
        import cudnn

        self.cudnn = cudnn
        dev = x.device
        self.handle = cudnn.create_handle()
        io = _cudnn_dtype(cudnn, x.dtype)
        fp32 = cudnn.data_type.FLOAT
        n, k = x.shape[0], w.shape[0]
        ho = (x.shape[2] + 2 * padding - w.shape[2]) // stride + 1
        wo = (x.shape[3] + 2 * padding - w.shape[3]) // stride + 1
        self.y_shape = (n, k, ho, wo)
        y_like = torch.empty(self.y_shape, device=dev,
                             dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        self.y_stride = y_like.stride()

        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=fp32, compute_data_type=fp32,
                          handle=self.handle)
        self.X = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=io)
        self.W = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=io)
        self.Y = g.conv_fprop(image=self.X, weight=self.W, padding=[padding, padding],
                              stride=[stride, stride], dilation=[1, 1], name="conv")
        self.Y.set_output(True).set_data_type(io)
        self.SUM, self.SQ = g.genstats(input=self.Y, name="genstats")
        self.SUM.set_output(True).set_data_type(fp32)
        self.SQ.set_output(True).set_data_type(fp32)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.g1 = g

        # scale/shift in fp32 where the pointwise engine takes it, else in the io dtype
        last = None
        for sdt in (torch.float32, x.dtype):
            try:
                g = cudnn.pygraph(io_data_type=io, intermediate_data_type=fp32,
                                  compute_data_type=fp32, handle=self.handle)
                self.YI = g.tensor(name="Y", dim=list(self.y_shape), stride=list(self.y_stride),
                                   data_type=io)
                cshape, cstride = [1, k, 1, 1], [k, 1, k, k]
                self.S = g.tensor(name="scale", dim=cshape, stride=cstride,
                                  data_type=_cudnn_dtype(cudnn, sdt))
                self.B = g.tensor(name="shift", dim=cshape, stride=cstride,
                                  data_type=_cudnn_dtype(cudnn, sdt))
                t = g.bias(input=g.scale(input=self.YI, scale=self.S, name="bn_scale"), bias=self.B,
                           name="bn_shift")
                self.OUT = g.relu(input=t, name="relu") if relu else t
                self.OUT.set_output(True).set_data_type(io)
                g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
                self.g2, self.param_dtype = g, sdt
                break
            except Exception as e:  # not supported with fp32 scale/shift: try the io dtype
                last = e
        else:
            raise last
        size = max(self.g1.get_workspace_size(), self.g2.get_workspace_size(), 1)
        self.workspace = torch.empty(size, device=dev, dtype=torch.uint8)

    def _stream(self):
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)

    def conv_stats(self, x: Tensor, w: Tensor):
        self._stream()
        k = self.y_shape[1]
        y = torch.empty(self.y_shape, device=x.device,
                        dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        s = torch.empty((1, k, 1, 1), device=x.device, dtype=torch.float32)
        sq = torch.empty_like(s)
        self.g1.execute({self.X: x, self.W: w, self.Y: y, self.SUM: s, self.SQ: sq}, self.workspace,
                        handle=self.handle)
        return y, s.view(k), sq.view(k)

    def apply(self, y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        self._stream()
        out = torch.empty_like(y)
        k = self.y_shape[1]
        cl = torch.channels_last
        sc = scale.to(self.param_dtype).view(1, k, 1, 1).contiguous(memory_format=cl)
        sh = shift.to(self.param_dtype).view(1, k, 1, 1).contiguous(memory_format=cl)
        self.g2.execute({self.YI: y, self.S: sc, self.B: sh, self.OUT: out}, self.workspace,
                        handle=self.handle)
        return out


class _FEConvBNReLUFn(torch.autograd.Function):
    """Training conv + BN (batch statistics) + ReLU: the forward through the
    peer's kernels (cuDNN FE graphs, or torch for the CPU tests), the backward
    through the aten kernels eager's autograd runs (threshold_backward,
    native_batch_norm_backward, convolution_backward: cuDNN on a GPU)."""

    @staticmethod
    def forward(ctx, x, w, gamma, beta, mod):
        y, s, sq = mod._conv_stats(x, w)
        count = y.numel() // y.shape[1]
        mean = s / count
        var = (sq / count - mean * mean).clamp_min_(0)
        invstd = torch.rsqrt(var + mod.bn.eps)
        scale = gamma.to(mean.dtype) * invstd
        shift = beta.to(mean.dtype) - mean * scale
        out = mod._apply_bn(y, scale, shift)
        mod._update_running_stats(mean, var, count)
        ctx.save_for_backward(x, w, y, out, gamma, mean, invstd)
        ctx.mod = mod
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, y, out, gamma, mean, invstd = ctx.saved_tensors
        mod = ctx.mod
        dz = torch.ops.aten.threshold_backward(dout, out, 0) if mod.use_relu else dout
        dy, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dz, y, gamma, None, None, mean, invstd, True, mod.bn.eps, [True, True, True])
        conv = mod.conv
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, list(conv.stride), list(conv.padding), list(conv.dilation), False,
            [0, 0], conv.groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return dx, dw, dgamma, dbeta, None


class CudnnFEConvBNReLU(nn.Module):
    """The cuDNN frontend peer of a training conv + BN + ReLU (``relu=False``:
    conv + BN): forward = a cuDNN FE graph of conv_fprop with genstats (the
    per-channel sum and sum of squares in the conv's kernel), the finalize on
    C-length vectors (mean, variance, scale, shift; running statistics updated
    as ``nn.BatchNorm2d`` does), then a second graph applying scale, shift and
    ReLU; backward = the aten kernels eager runs. Over the given (copied)
    conv and BN, so it holds the same weights as the other providers.

    ``backend="torch"`` replaces the two graphs by torch ops (the CPU tests of
    the finalize and backward); the benchmark always uses ``"cudnn"``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True,
                 backend: str = "cudnn"):
        super().__init__()
        if (conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.bias is not None
            or not bn.affine):
            raise ValueError("cudnn_fe covers an ungrouped, undilated, bias-free conv and an "
                             "affine BN")
        if (len(set(conv.padding)) != 1 or len(set(conv.stride)) != 1
            or not isinstance(conv.padding[0], int)):
            raise ValueError("cudnn_fe covers square stride and padding")
        self.conv, self.bn, self.use_relu, self.backend = conv, bn, relu, backend
        self._graphs = {}
        self._last: Optional[_CudnnFEGraphs] = None

    def extra_repr(self) -> str:
        return f"backend={self.backend}, relu={self.use_relu}"

    def __deepcopy__(self, memo):  # the copy builds its own graphs (cuDNN handles do not copy)
        graphs, last = self._graphs, self._last
        self._graphs, self._last = {}, None
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v, memo)
        finally:
            self._graphs, self._last = graphs, last
        return new

    def _graph(self, x: Tensor, w: Tensor) -> _CudnnFEGraphs:
        key = (tuple(x.shape), tuple(x.stride()), tuple(w.shape), tuple(w.stride()), x.dtype,
               x.device)
        if key not in self._graphs:
            self._graphs[key] = _CudnnFEGraphs(x, w, self.conv.stride[0], self.conv.padding[0],
                                               self.use_relu)
        return self._graphs[key]

    def _conv_stats(self, x: Tensor, w: Tensor):
        if self.backend == "cudnn":
            self._last = self._graph(x, w)
            return self._last.conv_stats(x, w)
        y = nn.functional.conv2d(x, w, None, self.conv.stride, self.conv.padding)
        yf = y.float() if y.dtype != torch.float64 else y
        return y, yf.sum((0, 2, 3)), (yf * yf).sum((0, 2, 3))

    def _apply_bn(self, y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if self.backend == "cudnn":
            return self._last.apply(y, scale, shift)  # the graphs _conv_stats just ran
        k = y.shape[1]
        z = (y * scale.view(1, k, 1, 1) + shift.view(1, k, 1, 1)).to(y.dtype)
        return torch.relu(z) if self.use_relu else z

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        bn = self.bn
        if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
            return
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var * (count / max(1, count - 1))).to(bn.running_var.dtype), m)

    def forward(self, x: Tensor) -> Tensor:
        if not self.bn.training:
            raise RuntimeError("cudnn_fe is the training-mode peer (batch statistics)")
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        w = self.conv.weight.to(dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, enabled=False):
            return _FEConvBNReLUFn.apply(x, w, self.bn.weight, self.bn.bias, self)


def cudnn_fe_twin(eager: nn.Module, backend: str = "cudnn") -> CudnnFEConvBNReLU:
    """The cuDNN FE peer over deep copies of the children of a conv + BN (+ ReLU)
    (a :class:`resfast.nn.Conv2dBNReLU`, or its twin)."""
    if not isinstance(eager, rnn.Conv2dBNReLU):
        raise TypeError(f"no cudnn_fe peer for {type(eager).__name__}")
    m = copy.deepcopy(eager)
    return CudnnFEConvBNReLU(m.conv, m.bn, m.relu, backend).train(eager.training)


def check_against_eager(peer: nn.Module, eager: nn.Module, x: Tensor, backward: bool = True,
                        dtype: torch.dtype = torch.float32,
                        tol: Optional[float] = None) -> Optional[str]:
    """Run ``peer`` and ``eager`` (each a deep copy: the timed modules keep
    their state) on the same input under the same autocast, and compare the
    output and, with ``backward``, the input and weight gradients of the same
    random output gradient; norm-relative
    error at most ``tol`` (bf16/fp16: 3e-2, fp32: 1e-4). None when they agree,
    else what disagrees."""
    tol = tol if tol is not None else (1e-4 if dtype in (torch.float32, torch.float64) else 3e-2)
    peer, eager = copy.deepcopy(peer), copy.deepcopy(eager)
    dev = x.device.type
    results = []
    grad = None
    for m in (eager, peer):
        xi = x.detach().clone().requires_grad_(backward)
        ctx = (torch.autocast(dev, dtype=dtype) if dtype in CUDNN_FE_DTYPES
               else torch.autocast(dev, enabled=False))
        with ctx:
            out = m(xi)
        got = {"output": out.detach().double()}
        if backward:
            if grad is None:
                gen = torch.Generator(device=x.device).manual_seed(1)
                grad = torch.randn(out.shape, device=x.device, generator=gen).to(out.dtype)
            out.backward(grad)
            got["input grad"] = xi.grad.detach().double()
            got["weight grad"] = m.conv.weight.grad.detach().double()
        results.append(got)
    bad = []
    for name, b in results[0].items():
        a = results[1][name]
        if a.shape != b.shape:
            bad.append(f"{name} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if not torch.isfinite(a).all():
            bad.append(f"{name} not finite")
            continue
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not err <= tol:
            bad.append(f"{name} rel. error {err:.3g} > {tol:g}")
    return ("disagrees with torch.nn: " + "; ".join(bad)) if bad else None
