"""Synchronised BatchNorm (resfast/train/sync_bn.py) on one process: the classes
convert_sync_bn gives the torch twin, and the fused ops handing every BN's batch
statistics to the reducer. Two processes: test_ddp.py."""
import tiny_models
import torch

from resfast.train.sync_bn import SyncBatchNorm2d, convert_sync_bn
from resfast.twin import to_torch


def test_convert_sync_bn_classes():
    ref = convert_sync_bn(to_torch(tiny_models.tiny_resnet()))
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.stats_reducer is not None for m in bns)
    assert all(isinstance(m, SyncBatchNorm2d) for m in bns
               if type(m).__name__ != "Torch_resfast_nn_BatchNormAddReLU")
    # outside a process group the reducer is the identity: the same function
    x = torch.randn(4, 3, 32, 32)
    plain = to_torch(tiny_models.tiny_resnet())
    plain.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ref(x), plain(x), rtol=1e-5, atol=1e-6)


def test_fused_layers_call_the_stats_reducer():
    """The fused ops hand every training-mode BN's batch statistics to the
    reducer (once per BN, before scale/shift): what --sync-bn relies on."""
    model = convert_sync_bn(tiny_models.tiny_resnet())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    calls = []

    def reducer(mean, var, count):
        calls.append(mean.shape[0])
        return mean, var, count

    for m in bns:
        m.stats_reducer = reducer
    x = torch.randn(4, 3, 32, 32)
    plain = tiny_models.tiny_resnet()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))
    assert sorted(calls) == sorted(m.num_features for m in bns)
    model.eval()
    model(x)
    assert len(calls) == len(bns)  # eval mode: running statistics, no reduction
