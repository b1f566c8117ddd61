import pytest
import torch

from space.config import ModelConfig
from space.fg import BOUNDARY_VALUE, SpaceFg, boundary_kernel
from space.schedules import priors_at


def test_boundary_kernel_by_hand():
    kernel = boundary_kernel(32, 6)
    # a ring 6 px wide: rows/columns 0-5 and 26-31 are 1/1024, the inner 20 x 20 block is 0
    assert kernel[0, 0] == kernel[5, 17] == kernel[31, 26] == BOUNDARY_VALUE == 1 / 1024
    assert kernel[6:26, 6:26].abs().sum() == 0
    assert kernel[6, 5] == 1 / 1024 and kernel[6, 6] == 0
    assert (kernel > 0).sum() == 32 * 32 - 20 * 20  # 624 ring pixels


def test_boundary_width_sets_the_ring_and_defaults_to_the_originals_share():
    assert torch.equal(SpaceFg(ModelConfig(glimpse_size=16)).boundary_kernel, boundary_kernel(16, 3))  # round(6 * 16 / 32)
    narrow = SpaceFg(ModelConfig(glimpse_size=16, boundary_width=1)).boundary_kernel
    assert (narrow > 0).sum() == 16 * 16 - 14 * 14 and narrow[1:15, 1:15].abs().sum() == 0
    with pytest.raises(ValueError, match="model.boundary_width"):
        ModelConfig(glimpse_size=16, boundary_width=8)


def test_legacy_boundary_filter_is_frozen_with_the_originals_values():
    fg = SpaceFg(ModelConfig())
    weight = fg.boundary_filter.weight
    assert not weight.requires_grad and weight.shape == (1, 1, 32, 32)
    assert weight[0, 0, 6, 6] == 1 / 1024 and weight[0, 0, 25, 25] == 1 / 1024
    assert weight[0, 0, 5, 6] == -1 / 1024 and weight[0, 0, 26, 26] == -1 / 1024
    # it is the last of the fg parameters, as its index matters for optimiser state (SPEC 13.2)
    assert list(fg.parameters())[-1] is weight and len(list(fg.parameters())) == 119


def test_offset_buffer_is_column_then_row():
    fg = SpaceFg(ModelConfig(G=4, image_size=128))
    offset = fg.img_encoder.offset
    assert offset.shape == (2, 4, 4)
    assert offset[0, 1, 3] == 3 and offset[1, 1, 3] == 1  # (x = column, y = row)


@pytest.mark.parametrize("shift_range,reach", [(1.0, 1.0), (0.5, 0.5)])
def test_shift_range_bounds_how_far_a_box_centre_leaves_its_cell(shift_range, reach):
    """Box centres lie within shift_range cell widths of their cell's centre (SPEC 4.3 at 1.0)."""
    torch.manual_seed(0)
    G, size = 4, 64
    fg = SpaceFg(ModelConfig(G=G, image_size=size, glimpse_size=16, fg_width=0.25, shift_range=shift_range))
    with torch.no_grad():  # push the shift heads' means far out so that tanh saturates
        fg.img_encoder.z_shift_net.bias[:2] = 30.0
        fg.img_encoder.z_shift_net.weight.zero_()
        out = fg(torch.rand(2, 3, size, size), priors_at(ModelConfig(), 0), deterministic=True)
    centre_cells = (out.z_where[..., 2:] + 1) / 2 * G  # in cell widths from the image's edge
    offset = fg.img_encoder.offset.permute(1, 2, 0).reshape(G * G, 2)
    assert torch.allclose(centre_cells - (offset + 0.5), torch.full_like(centre_cells, reach), atol=1e-5)
    with pytest.raises(ValueError, match="model.shift_range"):
        ModelConfig(shift_range=1.5)
