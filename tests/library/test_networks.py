import pytest
import torch

from imsct.networks import ModifiedUNet3D, localiser, tumor_network


@pytest.mark.parametrize(
    "factory,cin,cout,shape",
    [(localiser, 1, 1, (64, 32, 16)), (tumor_network, 2, 4, (32, 32, 32)), (tumor_network, 2, 4, (48, 16, 32))],
)
def test_output_shapes(factory, cin, cout, shape):
    net = factory().eval()
    with torch.no_grad():
        y = net(torch.randn(2, cin, *shape))
    assert y.shape == (2, cout, *shape)
    assert torch.isfinite(y).all()


def test_paper_filters_and_levels():
    loc, seg = localiser(), tumor_network()
    assert loc.stem.out_channels == 8 and seg.net.stem.out_channels == 16
    strided = [m for m in seg.modules() if isinstance(m, torch.nn.Conv3d) and m.stride == (2, 2, 2)]
    assert len(strided) == 4  # 4 downsamplings, 5 levels
    assert sum(isinstance(m, torch.nn.Dropout3d) for m in seg.modules()) == 5
    assert all(not m.affine for m in seg.modules() if isinstance(m, torch.nn.InstanceNorm3d))


def test_deep_supervision_heads_contribute():
    net = ModifiedUNet3D(1, 1, 4).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        y0 = net(x)
        net.head2.bias.add_(1.0)  # a coarse head's bias reaches the final output
        y1 = net(x)
    assert torch.allclose(y1 - y0, torch.ones_like(y0), atol=1e-5)


def test_patch_normalisation_makes_intensity_scale_irrelevant():
    torch.manual_seed(0)
    net = tumor_network().eval()
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        a = net(x)
        b = net(x * torch.tensor([900.0, 35.0]).view(1, 2, 1, 1, 1) + 17.0)
    assert torch.allclose(a, b, atol=1e-3)
