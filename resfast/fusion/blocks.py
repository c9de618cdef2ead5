"""Recognising residual blocks by what their forward computes, not by names.

A block's forward is traced with ``torch.fx`` (every child module a leaf, so
the graph shows which children it calls, on what, and every other operation),
in training and in eval mode. It is a residual block when it ends in
``[relu](a + b)`` and calls a conv. It can be fused when one side of the add
is a chain of conv -> BN (-> ReLU) steps from the input (identity children
such as timm's disabled drop-block and anti-aliasing skipped; a Sequential
child whose fusion plan fuses all of it counts as steps) and the other side is
the input, one child module applied to it, or another such chain; and when
nothing else is computed. Anything else in the branch (squeeze-excitation, drop
path, anti-aliasing, attention, another norm, a grouped conv) keeps the block
as it was, and :class:`NotFusable` says which child or operation is why.

Behaviour is then checked: a CPU copy of the block with random weights and BN
statistics against the fused block built from it, in eval and training mode
(whatever device the model is on, meta included).
"""
import copy
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..nn.fusable import (
    bn_channels,
    conv_problem,
    has_hooks,
    is_frozen_bn,
    is_fusable_bn,
    is_identity,
)
from ..nn.residual import (
    ConvBN,
    FusedResidualBlock,
    ResidualPlan,
    SequentialStep,
    chain_kernel_sizes,
)
from ..nn.sequential import FusedSequential, fusion_plan

__all__ = ["NotFusable", "match_residual_block", "block_kind", "check_behaviour"]

_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# The check tells structure apart (a different function is off by O(1)), not
# rounding: float32 agrees to ~1e-6 here and runs 3x faster than float64.
_CHECK_DTYPE = torch.float32
_CHECK_TOL = 1e-4


class NotFusable(Exception):
    """A residual block resfast cannot fuse; the message says why."""


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(block: nn.Module) -> Tuple[Optional[fx.Graph], Optional[fx.Graph]]:
    """The graphs of ``block``'s forward in training and in eval mode."""
    was = block.training
    graphs = []
    try:
        for mode in (True, False):
            block.training = mode  # the block's own flag only: its children are leaves
            graphs.append(_LeafTracer().trace(block))
    finally:
        block.training = was
    return graphs[0], graphs[1]


def _describe(block: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(block.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return f"{node.target} (read directly)"
    return node.name


def _norm_problem(m: nn.Module, name: str) -> str:
    if isinstance(m, nn.BatchNorm2d) or is_frozen_bn(m) or type(m).__name__ == "FrozenBatchNorm2d":
        if has_hooks(m):
            return f"{name} has hooks"
        return f"{name} is a {type(m).__name__} with a forward of its own"
    return (f"{name} is a {type(m).__name__} (resfast fuses nn.BatchNorm2d and torchvision's "
            "FrozenBatchNorm2d)")


class _Graph:
    """One traced block: the chain, shortcut and add matchers over its graph."""

    def __init__(self, block: nn.Module, graph: fx.Graph):
        self.block = block
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.x = placeholders[0] if placeholders else None
        self.placeholders = placeholders
        out = [n for n in self.nodes if n.op == "output"]
        self.out = out[0].args[0] if out and isinstance(out[0].args[0], fx.Node) else None

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        if node.op != "call_module":
            return None
        return self.block.get_submodule(node.target)

    def one_input(self, node: fx.Node) -> Optional[fx.Node]:
        """The single tensor argument of a call with no other arguments."""
        if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None

    def relu_input(self, node: fx.Node) -> Optional[fx.Node]:
        m = self.module(node)
        if m is not None:
            return self.one_input(node) if type(m) is nn.ReLU and not has_hooks(m) else None
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
            extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "inplace"]
            if (node.args and isinstance(node.args[0], fx.Node) and set(node.kwargs) <= {"inplace"}
                    and all(isinstance(v, bool) for v in extra) and len(node.args) <= 2):
                return node.args[0]
        if node.op == "call_method" and node.target in ("relu", "relu_"):
            return self.one_input(node)
        return None

    def add_operands(self, node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
        if ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
                or (node.op == "call_method" and node.target in ("add", "add_"))):
            if (len(node.args) == 2 and not node.kwargs
                    and all(isinstance(a, fx.Node) for a in node.args)):
                return node.args[0], node.args[1]
        return None

    def skip_identity(self, node: fx.Node, seen: List[fx.Node], check: bool = True) -> fx.Node:
        while True:
            m = self.module(node)
            if m is None or not is_identity(m) or self.one_input(node) is None:
                return node
            if check:
                self.single_use(node)
            seen.append(node)
            node = node.args[0]

    def single_use(self, node: fx.Node) -> None:
        if node is not self.x and len(node.users) != 1:
            raise NotFusable(f"the output of {_describe(self.block, node)} is used more than "
                             "once")

    def depends_on_x(self, node: fx.Node, memo: Dict[fx.Node, bool]) -> bool:
        if node not in memo:
            memo[node] = node is self.x or any(self.depends_on_x(a, memo)
                                               for a in node.all_input_nodes)
        return memo[node]

    def chain(self, node: fx.Node) -> Tuple[List, List[fx.Node]]:
        """The conv -> BN (-> ReLU) steps from the input to ``node``, and the nodes
        they cover; NotFusable says what breaks the chain."""
        steps, seen = [], []
        relu_after = False
        while True:
            node = self.skip_identity(node, seen)
            if node is self.x:
                break
            self.single_use(node)
            inp = self.relu_input(node)
            if inp is not None:
                seen.append(node)
                node, relu_after = inp, True
                continue
            m = self.module(node)
            if m is None or self.one_input(node) is None:
                raise NotFusable(f"{_describe(self.block, node)} in the residual branch computes "
                                 "something besides conv, BN and ReLU")
            if is_fusable_bn(m):
                conv_node = self.skip_identity(node.args[0], seen)
                conv = self.module(conv_node)
                if not isinstance(conv, nn.Conv2d) or self.one_input(conv_node) is None:
                    raise NotFusable(f"{node.target} normalizes "
                                     f"{_describe(self.block, conv_node)}, not a conv")
                self.single_use(conv_node)
                problem = conv_problem(conv, conv_node.target)
                if problem:
                    raise NotFusable(problem)
                if not is_fusable_bn(m, conv.out_channels):
                    raise NotFusable(f"{node.target} does not have the {conv.out_channels} "
                                     f"channels of {conv_node.target}")
                steps.append(ConvBN(conv_node.target, node.target, relu_after))
                seen += [node, conv_node]
                node, relu_after = conv_node.args[0], False
                continue
            if type(m) in (nn.Sequential, FusedSequential) and not has_hooks(m):
                problem = _sequential_problem(m, node.target)
                if problem:
                    raise NotFusable(problem)
                steps.append(SequentialStep(node.target, relu_after))
                seen.append(node)
                node, relu_after = node.args[0], False
                continue
            if isinstance(m, nn.Conv2d):
                problem = conv_problem(m, node.target)
                raise NotFusable(problem or f"{node.target} is not followed by a BatchNorm")
            if isinstance(m, nn.modules.batchnorm._NormBase) or "Norm" in type(m).__name__:
                raise NotFusable(_norm_problem(m, node.target))
            raise NotFusable(f"{_describe(self.block, node)} in the residual branch computes "
                             "something besides conv, BN and ReLU")
        if relu_after:
            raise NotFusable("the residual branch starts with a ReLU of the block's input "
                             "(pre-activation)")
        if not steps:
            raise NotFusable("no conv -> BN on one side of the add")
        return steps[::-1], seen

    def shortcut(self, node: fx.Node, check: bool = True
                 ) -> Optional[Tuple[Optional[str], List[fx.Node]]]:
        """(None, nodes) for the identity, (path, nodes) for one child applied to
        the input; None when ``node`` is neither."""
        seen: List[fx.Node] = []
        node = self.skip_identity(node, seen, check)
        if node is self.x:
            return None, seen
        inp = self.one_input(node)
        if (self.module(node) is not None and inp is not None
                and self.skip_identity(inp, seen, check) is self.x and len(node.users) == 1):
            return node.target, seen + [node]
        return None


def _sequential_problem(seq: nn.Module, name: str) -> Optional[str]:
    """Why a Sequential in a residual branch is more than fused conv / BN / ReLU steps."""
    covered = {i for step in fusion_plan(seq) if step.kind != "module" for i in step.index}
    for i, m in enumerate(seq):
        if i not in covered and not is_identity(m):
            problem = conv_problem(m, f"{name}.{i}") if isinstance(m, nn.Conv2d) else None
            return problem or (f"{name}.{i} ({type(m).__name__}) in the residual branch is not "
                               "part of a fused conv / BN / ReLU run")
    return None


def _n_convs(block: nn.Module, steps) -> int:
    return len(chain_kernel_sizes(block, tuple(steps)))


def _holds_conv_and_bn(m: nn.Module) -> bool:
    children = list(m.children())
    return (any(isinstance(c, nn.Conv2d) for c in children)
            and any(is_fusable_bn(c) or isinstance(c, nn.BatchNorm2d) for c in children))


def _is_residual(g: _Graph) -> bool:
    """Whether the graph is shaped like a residual block: it ends in an add (and a
    ReLU) of two values that both depend on the input, or it adds the input (or one
    child applied to it) to something else anywhere."""
    if g.x is None:
        return False
    memo: Dict[fx.Node, bool] = {}
    end = g.skip_identity(g.out, [], check=False) if g.out is not None else None
    if end is not None and g.relu_input(end) is not None:
        end = g.skip_identity(g.relu_input(end), [], check=False)
    ops = g.add_operands(end) if end is not None else None
    if ops and all(g.depends_on_x(a, memo) for a in ops):
        return True
    for n in g.nodes:
        ops = g.add_operands(n)
        if ops and all(g.depends_on_x(a, memo) for a in ops) and any(
                g.shortcut(a, check=False) is not None for a in ops):
            return True
    return False


def _calls_a_conv(g: _Graph) -> bool:
    for n in g.nodes:
        m = g.module(n)
        if m is not None and any(isinstance(c, nn.Conv2d) for c in m.modules()):
            return True
    return False


def match_residual_block(block: nn.Module) -> Optional[ResidualPlan]:
    """The :class:`ResidualPlan` of ``block``; None when it is no residual block (a
    model, a container, a layer: nothing to say about it); NotFusable when it is
    one that resfast cannot fuse, with why."""
    try:
        train_graph, eval_graph = _trace(block)
    except Exception as e:  # noqa: BLE001  (whatever the forward does that fx cannot follow)
        if _holds_conv_and_bn(block):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise NotFusable(f"its forward cannot be traced by torch.fx ({type(e).__name__}: "
                             f"{first[:120]})") from None
        return None
    g = _Graph(block, eval_graph)
    g_train = _Graph(block, train_graph)
    residual = [x for x in (g, g_train) if _is_residual(x) and _calls_a_conv(x)]
    if not residual:
        return None
    if str(train_graph) != str(eval_graph):
        raise NotFusable("its forward computes something else in training than in eval mode")
    if len(g.placeholders) != 1:
        raise NotFusable(f"its forward takes {len(g.placeholders)} arguments, not one tensor")
    if has_hooks(block):
        raise NotFusable("it has hooks")
    if g.out is None:
        raise NotFusable("it does not return one tensor")
    seen: List[fx.Node] = []
    end = g.skip_identity(g.out, seen)
    relu_in = g.relu_input(end)
    final_relu = relu_in is not None
    if final_relu:
        seen.append(end)
        end = g.skip_identity(relu_in, seen)
    operands = g.add_operands(end)
    if operands is None:
        raise NotFusable(f"it ends in {_describe(block, end)}, not in the residual add "
                         "(and a ReLU)")
    g.single_use(end)
    seen.append(end)
    plan, covered = _assign(g, *operands)
    leftover = [n for n in g.nodes if n.op not in ("placeholder", "output")
                and n not in set(seen) | set(covered)]
    if leftover:
        raise NotFusable(f"{_describe(block, leftover[0])} computes something besides the residual"
                         " branch, the shortcut and the add")
    return ResidualPlan(tuple(plan[0]), plan[1], final_relu)


def _assign(g: _Graph, a: fx.Node, b: fx.Node):
    """Which side of the add is the branch and which the shortcut: the longer chain
    is the branch; a shortcut that is the input or a child module is preferred
    over a second chain."""
    options, errors = [], {}
    for p, q in ((a, b), (b, a)):
        try:
            branch, seen_p = g.chain(p)
        except NotFusable as e:
            errors[p] = e
            continue
        sc = g.shortcut(q)
        if sc is not None:
            options.append((_n_convs(g.block, branch), 1, (branch, sc[0]), seen_p + sc[1]))
            continue
        try:
            other, seen_q = g.chain(q)
        except NotFusable:
            continue
        options.append((_n_convs(g.block, branch), 0, (branch, tuple(other)), seen_p + seen_q))
    if options:
        best = max(options, key=lambda o: (o[0], o[1]))  # max keeps the first of equals
        return best[2], best[3]
    if g.shortcut(b) is not None and a in errors:
        raise errors[a]
    if g.shortcut(a) is not None and b in errors:
        raise errors[b]
    raise errors.get(a) or errors.get(b) or NotFusable("neither side of the add is a conv -> BN "
                                                       "chain")


def block_kind(block: nn.Module, plan: ResidualPlan) -> str:
    """``BasicBlock`` (3x3, 3x3), ``Bottleneck`` (1x1, 3x3, 1x1) or
    ``residual block (kxk, ...)``, noting a missing ReLU after the add."""
    sizes = chain_kernel_sizes(block, plan.branch)
    kind = {(3, 3): "BasicBlock", (1, 3, 1): "Bottleneck"}.get(
        sizes, "residual block (" + ", ".join(f"{k}x{k}" for k in sizes) + ")")
    return kind if plan.relu else f"{kind} without a ReLU after the add"


# ---- behaviour ---------------------------------------------------------------------

def _random_twin(block: nn.Module, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A copy of ``block`` on the CPU in ``dtype`` with random weights (He-uniform), BN
    affine and statistics, and zero integer buffers; ``block``'s own tensors are
    never read (it may be on a GPU or the meta device)."""
    memo = {}
    for t in list(block.parameters()) + list(block.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    twin = copy.deepcopy(block, memo).to_empty(device="cpu").to(dtype)
    ranges = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.5, 0.5),
              "running_var": (0.5, 2.0)}
    with torch.no_grad():
        for m in twin.modules():
            norm = is_fusable_bn(m) or isinstance(m, nn.modules.batchnorm._NormBase)
            tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            for name, t in tensors:
                if not t.dtype.is_floating_point:
                    t.zero_()
                elif norm and name in ranges:
                    t.uniform_(*ranges[name], generator=gen)
                else:
                    a = (3.0 / max(t[0].numel(), 1)) ** 0.5 if t.dim() > 1 else 0.1
                    t.uniform_(-a, a, generator=gen)
    return twin


def _input_channels(block: nn.Module, plan: ResidualPlan) -> int:
    step = plan.branch[0]
    if isinstance(step, ConvBN):
        return block.get_submodule(step.conv).in_channels
    for m in block.get_submodule(step.path):
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if is_fusable_bn(m):
            return bn_channels(m)
    raise NotFusable(f"cannot tell the input channels of {step.path}")


def check_behaviour(block: nn.Module, plan: ResidualPlan, kind: str) -> Optional[str]:
    """None when the fused block computes what ``block`` does (a float32 CPU copy
    with random weights, eval then training mode, the same random stream for
    both); otherwise why not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (5-10x on a busy machine)
    try:
        return _check_behaviour(block, plan, kind)
    finally:
        torch.set_num_threads(threads)


def _check_behaviour(block: nn.Module, plan: ResidualPlan, kind: str) -> Optional[str]:
    gen = torch.Generator().manual_seed(0)
    twin = _random_twin(block, _CHECK_DTYPE, gen)
    fused = FusedResidualBlock.from_block(twin, plan, kind)
    x = torch.randn((2, _input_channels(twin, plan), 6, 6), generator=gen,
                    dtype=_CHECK_DTYPE)
    for training in (False, True):
        twin.train(training)
        fused.train(training)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                want = twin(x.clone())
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                got = fused(x.clone())
        except Exception as e:  # noqa: BLE001  (the plan does not run: not the same function)
            return (f"its fused form fails on a random input ({type(e).__name__}: "
                    f"{str(e).strip()[:120]})")
        mode = "training" if training else "eval"
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return f"its fused form gives another shape in {mode} mode"
        err = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
        if not err <= _CHECK_TOL:
            return (f"its fused form computes another function in {mode} mode (relative "
                    f"difference {err:.1e} on a random input)")
    return None

