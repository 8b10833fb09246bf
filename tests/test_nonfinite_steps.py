"""A non-finite gradient skips the optimiser step instead of poisoning Adam's moments and every weight."""

import logging

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss

from imsct.training import SkipNonFiniteSteps, drop_nonfinite_gradients


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 1, 1))


def _batches(nan_at):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        x = torch.randn(1, 1, 8, 8, 8, generator=gen)
        if i in nan_at:
            x[0, 0, 3, 3, 3] = float("nan")
        out.append({"image": x, "label": (x > 0.5).float().nan_to_num(0.0)})
    return out


def _train(batches, guard):
    net = _net()
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=net,
                                optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), loss_function=DiceLoss(sigmoid=True))
    if guard is not None:
        guard.attach(trainer)
    trainer.run()
    return net, trainer


def test_drop_nonfinite_gradients_leaves_weights_untouched():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    net(_batches({0})[0]["image"]).sum().backward()
    assert not all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert drop_nonfinite_gradients(net.parameters())
    assert all(p.grad is None for p in net.parameters())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    net(_batches(set())[0]["image"]).sum().backward()  # finite: gradients kept
    assert not drop_nonfinite_gradients(net.parameters())
    assert all(p.grad is not None for p in net.parameters())


def test_trainer_skips_the_bad_step_and_keeps_learning(caplog):
    poisoned, _ = _train(_batches({1}), None)  # without the guard one NaN batch ruins the weights
    assert not all(torch.isfinite(p).all() for p in poisoned.parameters())
    guard = SkipNonFiniteSteps()
    with caplog.at_level(logging.WARNING, logger="imsct.training"):
        net, trainer = _train(_batches({1}), guard)
    assert trainer.state.iteration == 4 and guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert "iteration 2: non-finite gradient" in caplog.text
    clean, _ = _train(_batches(set()), None)  # the other three steps still moved the weights
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), _net().parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), clean.parameters()))


def test_persistently_nonfinite_gradients_stop_training():
    with pytest.raises(RuntimeError, match="non-finite on 3 consecutive iterations"):
        _train(_batches({0, 1, 2, 3}), SkipNonFiniteSteps(max_consecutive=3))
