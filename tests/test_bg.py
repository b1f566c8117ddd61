import torch

from space.bg import SpatialBroadcast, stick_breaking


def test_stick_breaking_by_hand():
    pis = [torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.7])]
    masks = stick_breaking(pis)
    # m1 = 0.5; rest 0.5; m2 = 0.5 * 0.5 = 0.25; rest 0.25; m3 = the rest, its own 0.7 unused
    assert [m.item() for m in masks] == [0.5, 0.25, 0.25]
    assert torch.allclose(sum(stick_breaking([torch.rand(5) for _ in range(4)])), torch.ones(5))
    assert stick_breaking([torch.tensor([0.3])])[0].item() == 1.0  # K = 1: one full mask


def test_spatial_broadcast_coordinates():
    out = SpatialBroadcast()(torch.arange(2.0).view(1, 2), 5)
    assert out.shape == (1, 4, 5, 5)
    assert torch.equal(out[0, 2, 3], torch.linspace(-1, 1, 5))  # x varies along columns
    assert torch.equal(out[0, 3, :, 1], torch.linspace(-1, 1, 5))  # y varies along rows
    assert (out[0, 1] == 1).all()
