"""BatchNormArgs.of reads a BatchNorm's tensors from nn.Module's registries where that gives
what attribute access gives (a plain module: 7 us -> 2 us a layer), and by attribute access
everywhere else: parametrized tensors, instance attributes of those names, a stats_reducer
wherever it is set, and under torch.compile."""
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from resfast import functional
from resfast.functional import BatchNormArgs
from resfast.train.sync_bn import SyncBatchNorm2d


def _by_attributes(bn):
    return BatchNormArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                         bn.num_batches_tracked, bn.training or bn.running_mean is None,
                         bn.momentum, bn.eps, getattr(bn, "stats_reducer", None))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x is y or (isinstance(x, torch.Tensor) and torch.equal(x, y)), (x, y)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


class _WithReducerProperty(nn.BatchNorm2d):
    @property
    def stats_reducer(self):
        return None


class _WithClassReducer(nn.BatchNorm2d):
    def stats_reducer(self, mean, var, count):
        return mean, var, count


def _modules():
    plain = nn.BatchNorm2d(4, eps=1e-3, momentum=None).eval()
    no_affine = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    parametrized = nn.BatchNorm2d(4)
    parametrize.register_parametrization(parametrized, "weight", _Double())
    shadowed = nn.BatchNorm2d(4)
    object.__setattr__(shadowed, "running_var", torch.full((4,), 3.0))
    with_reducer = nn.BatchNorm2d(4)
    with_reducer.stats_reducer = lambda mean, var, count: (mean, var, count)
    sync = nn.BatchNorm2d(4)
    sync.__class__ = SyncBatchNorm2d  # as convert_sync_bn swaps it (class attribute None)
    reducer_property = _WithReducerProperty(4)
    switched_off = _WithClassReducer(4)
    switched_off.stats_reducer = None  # the instance's None wins over the class's reducer
    return [plain, no_affine, parametrized, shadowed, with_reducer, sync, reducer_property,
            switched_off]


def test_of_gives_what_attribute_access_gives():
    for bn in _modules():
        _same(BatchNormArgs.of(bn), _by_attributes(bn))
    # the registries are read for these (the comparison above tests that path), attributes
    # for the others
    assert [functional._plain_module(type(bn)) for bn in _modules()] == [
        True, True, False, True, True, True, False, False]
    assert BatchNormArgs.of(_modules()[7]).stats_reducer is None
    parametrized = _modules()[2]
    assert torch.equal(BatchNormArgs.of(parametrized).weight, 2 * torch.ones(4))
    shadowed = _modules()[3]
    assert torch.equal(BatchNormArgs.of(shadowed).running_var, torch.full((4,), 3.0))


def test_of_under_torch_compile():
    bn = nn.BatchNorm2d(4).eval()

    @torch.compile(fullgraph=True, backend="eager")
    def scale(bn_module, x):
        args = BatchNormArgs.of(bn_module)
        return x * args.weight + args.running_mean

    x = torch.randn(4)
    torch.testing.assert_close(scale(bn, x), x * bn.weight + bn.running_mean)
