import pytest
import torch
import torch.nn.functional as F

import ssl
from ssl.errors import UserError
from ssl.models import build_backbone, save_export
from ssl.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def vit_tiny() -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=4, image_size=32).eval()


def test_variants_have_the_paper_widths():
    small = build_backbone("vit_small", patch_size=16, image_size=224)
    assert small.feature_dim == 384 and len(small.blocks) == 12 and small.blocks[0].attn.num_heads == 6
    assert small.pos_embed.shape == (1, 1 + 14 * 14, 384)


def test_output_shapes(vit_tiny):
    images = torch.randn(2, 3, 32, 32)
    assert vit_tiny.feature_dim == 192
    assert vit_tiny(images).shape == (2, 192)
    assert vit_tiny.forward_dense(images).shape == (2, 192, 8, 8)


def test_smaller_crop_gets_bicubically_resized_position_embeddings(vit_tiny):
    crop = torch.randn(3, 3, 16, 16)
    assert vit_tiny(crop).shape == (3, 192)
    assert vit_tiny.forward_dense(crop).shape == (3, 192, 4, 4)
    grid = vit_tiny.pos_embed[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    resized = vit_tiny.position_embedding(4, 4)
    torch.testing.assert_close(resized[:, 1:], expected)
    torch.testing.assert_close(resized[:, :1], vit_tiny.pos_embed[:, :1])
    assert vit_tiny.position_embedding(8, 8) is vit_tiny.pos_embed


def test_dense_tokens_follow_non_square_inputs():
    vit = VisionTransformer(dim=32, depth=1, num_heads=2, patch_size=4, image_size=16, in_channels=1)
    assert vit.forward_dense(torch.randn(1, 1, 24, 8)).shape == (1, 32, 6, 2)


def test_bad_patch_size_is_a_user_error():
    with pytest.raises(UserError, match="patch_size"):
        build_backbone("vit_tiny", patch_size=5, image_size=32)


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    vit = VisionTransformer(dim=32, depth=2, num_heads=2, patch_size=4, image_size=16, drop_path_rate=0.5)
    images = torch.randn(8, 3, 16, 16)
    assert not torch.equal(vit.train()(images), vit(images))
    assert torch.equal(vit.eval()(images), vit(images))


def test_export_round_trip_gives_identical_outputs(vit_tiny, tmp_path):
    path = save_export(tmp_path / "teacher.pt", vit_tiny, input_size=32, channels=3, mean=[0.5] * 3, std=[0.25] * 3,
                       dataset="cifar10", num_classes=10, method="dino", role="teacher", epoch=0)
    loaded = ssl.load_backbone(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), vit_tiny(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_dense(images), vit_tiny.forward_dense(images), rtol=0, atol=0)
