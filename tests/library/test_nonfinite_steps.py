"""A non-finite gradient is computed again in float32, or the step is skipped, instead of poisoning
Adam's moments and every weight."""

import logging

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss

from imsct.training import AutocastInferer, NonFiniteGradientGuard, drop_gradients, gradients_finite


@pytest.fixture(autouse=True)
def _autocast_as_asked(monkeypatch):
    """These tests need autocast on when they ask for it, also where IMSCT_PRECISION forces float32."""
    monkeypatch.delenv("IMSCT_PRECISION", raising=False)


class _NaNGradientUnderAutocast(torch.autograd.Function):
    """Identity whose gradient is NaN when the forward ran under autocast: the fault seen in
    bfloat16 convolution weight gradients on CPU, made deterministic."""

    @staticmethod
    def forward(ctx, x):
        ctx.poison = torch.is_autocast_enabled("cpu")
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan") if ctx.poison else grad


class _Net(torch.nn.Module):
    def __init__(self, poison_under_autocast=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 1, 1)
        self.poison = poison_under_autocast

    def forward(self, x):
        h = self.a(x)
        if self.poison:
            h = _NaNGradientUnderAutocast.apply(h)
        return self.b(torch.nn.functional.leaky_relu(h, 0.01))


def _batches(nan_at=()):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        x = torch.randn(1, 1, 8, 8, 8, generator=gen)
        if i in nan_at:
            x[0, 0, 3, 3, 3] = float("nan")
        out.append({"image": x, "label": (x > 0.5).float().nan_to_num(0.0)})
    return out


def _train(batches, guard, net=None, amp=False):
    net = net or _Net()
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=net,
                                optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), loss_function=DiceLoss(sigmoid=True),
                                inferer=AutocastInferer(enabled=amp))
    if guard is not None:
        guard.attach(trainer)
    trainer.run()
    return net, trainer


def _finite(net):
    return all(torch.isfinite(p).all() for p in net.parameters())


def test_drop_gradients_leaves_weights_untouched():
    net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    net(_batches({0})[0]["image"]).sum().backward()
    assert not gradients_finite(net.parameters())
    drop_gradients(net.parameters())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    net(_batches()[0]["image"]).sum().backward()
    assert gradients_finite(net.parameters())


def test_autocast_fault_is_computed_again_in_float32(caplog):
    poisoned, _ = _train(_batches(), None, _Net(poison_under_autocast=True), amp=True)
    assert not _finite(poisoned)  # without the guard the first step ruins the weights
    guard = NonFiniteGradientGuard()
    with caplog.at_level(logging.WARNING, logger="imsct.training"):
        net, trainer = _train(_batches(), guard, _Net(poison_under_autocast=True), amp=True)
    assert (guard.retried, guard.skipped, trainer.state.iteration) == (4, 0, 4)
    assert "iteration 1: non-finite gradient under autocast, step computed again in float32" in caplog.text
    reference, _ = _train(_batches(), None, _Net(), amp=False)  # every step redone in float32 = a float32 run
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.parameters(), reference.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), _Net().parameters()))


def test_nan_that_float32_does_not_cure_skips_the_step(caplog):
    guard = NonFiniteGradientGuard()
    with caplog.at_level(logging.WARNING, logger="imsct.training"):
        net, trainer = _train(_batches({1}), guard)
    assert (guard.retried, guard.skipped, trainer.state.iteration) == (0, 1, 4)
    assert _finite(net) and "iteration 2: non-finite gradient also in float32, optimiser step skipped" in caplog.text
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), _Net().parameters()))  # the other steps still learned


def test_persistently_nonfinite_gradients_stop_training():
    with pytest.raises(RuntimeError, match="non-finite on 3 consecutive iterations"):
        _train(_batches({0, 1, 2, 3}), NonFiniteGradientGuard(max_consecutive=3))
