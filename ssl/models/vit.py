"""Vision Transformer backbones (Dosovitskiy et al., 2021) in the compact form DINO trains: ViT-Tiny and ViT-Small.

    x (B, C, H, W) --conv k = stride = p--> patches (B, h*w, D),  h = H // p, w = W // p
    z_0 = [cls; patches] + pos                    (B, 1 + h*w, D)
    z_l = z'_l + DropPath(MLP(LN(z'_l))),  z'_l = z_{l-1} + DropPath(MHSA(LN(z_{l-1})))    (pre-norm blocks)
    out = LN(z_depth)

`forward(x)` is the CLS embedding out[:, 0] (B, D); `forward_dense(x)` the patch tokens out[:, 1:] as a
(B, D, h, w) map. Position embeddings are learned for the (image_size / patch_size)^2 grid of the configured
`image_size`; other input sizes (multi-crop local crops, evaluation at another resolution) get the patch part
resized bicubically to exactly their own grid (`F.interpolate(size=(h, w))`, no antialiasing), so one set of
weights serves every crop size. `tokens(x, masks, mask_token)` puts a mask token in place of the masked patches'
embeddings before the position embeddings are added (masked image modelling: iBOT; DINOv2's
`prepare_tokens_with_masks`).

Not DINO's convention: its vision_transformer.py interpolates by the scale factor (h + 0.1) / grid, and PyTorch then
samples with that factor rather than with h / grid (DINOv2 keeps this by default, `interpolate_offset=0.1`; with 0
it resizes to the exact size as here), so off the training grid the same weights give slightly different position
embeddings (local-crop features ~1e-2 apart). At the training grid (224 px for ViT-S/16) both
use the learned embeddings unchanged: DINO weights converted with `ssl.convert` give DINO's features there.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ssl.errors import UserError

MLP_RATIO = 4
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "depth": 12, "num_heads": 3},
    "small": {"dim": 384, "depth": 12, "num_heads": 6},
}


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d_head)) v per head, fused by `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d_head)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block; DropPath drops a sample's whole residual branch (stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A ViT backbone: `feature_dim` = `dim`, CLS embedding from `forward`, patch-token map from `forward_dense`.

    patch_size: 16 for 224 px images, 4 for 32 px (CIFAR), so both see a grid of 14x14 or 8x8 patches.
    image_size: the resolution the position embeddings are learned for (the global crops' size).
    drop_path_rate: stochastic-depth rate of the last block, rising linearly from 0 at the first.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, patch_size: int = 16, image_size: int = 224,
                 in_channels: int = 3, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"ViT width {dim} is not divisible by its {num_heads} heads")
        if image_size % patch_size:
            divisors = [str(size) for size in range(2, image_size // 2 + 1) if image_size % size == 0]
            fix = (f"backbone.kwargs.patch_size to one of {', '.join(divisors)} (4 for 32 px, 16 for 224 px)"
                   if divisors else f"data.image_size to a multiple of {patch_size}")
            raise UserError(f"ViT patch_size {patch_size} does not divide image_size {image_size}: set {fix}")
        self.feature_dim: int = dim
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*(Block(dim, num_heads, rate) for rate in rates))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, 1 + height * width, D) for a height x width patch grid."""
        if (height, width) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
        return torch.cat((cls_pos, patch_pos.flatten(2).transpose(1, 2)), dim=1)

    def tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, int, int]:
        """All output tokens (B, 1 + h*w, D), CLS first, and the patch grid (h, w) of this input.

        masks: (B, h*w) booleans, True where a patch's embedding is replaced by `mask_token` (D,). The token is the
        training method's parameter (DINO with iBOT), not the backbone's, so exports keep the same tensors.
        """
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)
        x = self.blocks(x + self.position_embedding(height, width))
        return self.norm(x), height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0][:, 0]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = self.tokens(x)
        return x[:, 1:].transpose(1, 2).reshape(len(x), self.feature_dim, height, width)


def _init_weights(module: nn.Module) -> None:
    # DINO's initialisation: small truncated-normal linear weights, zero biases, identity LayerNorms. The patch
    # convolution keeps PyTorch's default, as there.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
