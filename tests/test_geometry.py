import torch

from space.geometry import boxes_to_pixels, crop_glimpses, paste_glimpses, z_where_to_boxes


def test_crop_then_paste_returns_the_glimpse_region():
    image = torch.rand(1, 3, 128, 128)
    # a 32 x 64 px box whose edges fall on pixel borders: centre x = (tx + 1) * 64 = 32,
    # centre y = (ty + 1) * 64 = 80; so columns 16..47 and rows 48..111
    z_where = torch.tensor([[0.25, 0.5, -0.5, 0.25]])
    glimpse = crop_glimpses(image, z_where, 32)
    assert glimpse.shape == (1, 3, 32, 32)
    # horizontally the glimpse samples exactly one image pixel per glimpse pixel
    pasted = paste_glimpses(glimpse, z_where, 128)
    assert pasted.shape == (1, 3, 128, 128)
    region = (slice(None), slice(None), slice(48, 112), slice(16, 48))
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[47:113, 16:48] = False  # vertical upsampling by 2 blends one row beyond each edge
    assert pasted[:, :, outside].abs().max() == 0
    assert pasted[:, :, 48:112, 16:48].abs().min() > 0
    # the vertical axis is sampled at 2 px per glimpse pixel: compare with a smooth image
    smooth = torch.linspace(0, 1, 128).view(1, 1, 128, 1).expand(1, 3, 128, 128).contiguous()
    back = paste_glimpses(crop_glimpses(smooth, z_where, 32), z_where, 128)
    assert torch.allclose(back[region][..., 1:-1, :], smooth[region][..., 1:-1, :], atol=1e-6)


def test_crop_is_exact_for_a_pixel_aligned_square():
    image = torch.rand(2, 1, 128, 128)
    z_where = torch.tensor([[0.25, 0.25, 0.0, 0.0]]).expand(2, 4)  # columns and rows 48..79
    glimpse = crop_glimpses(image, z_where, 32)
    assert torch.allclose(glimpse, image[:, :, 48:80, 48:80], atol=1e-6)
    back = paste_glimpses(glimpse, z_where, 128)
    assert torch.allclose(back[:, :, 48:80, 48:80], image[:, :, 48:80, 48:80], atol=1e-6)


def test_z_where_to_boxes_by_hand():
    z_where = torch.tensor([[0.25, 0.5, 0.0, -0.5]])
    # centre x = (0 + 1) / 2 = 0.5, centre y = (-0.5 + 1) / 2 = 0.25
    # [y_min, y_max, x_min, x_max] = [0.25 - 0.25, 0.25 + 0.25, 0.5 - 0.125, 0.5 + 0.125]
    boxes = z_where_to_boxes(z_where)
    assert torch.allclose(boxes, torch.tensor([[0.0, 0.5, 0.375, 0.625]]))
    assert torch.allclose(boxes_to_pixels(boxes, 128, 128), torch.tensor([[48.0, 0.0, 80.0, 64.0]]))
