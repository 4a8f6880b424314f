"""The networks DMD trains beside the frozen teacher: the generator is a plain PixArt; the fake score is a
PixArt with DMD2's GAN head on its middle block's output."""
from __future__ import annotations

from torch import Tensor, nn

from pixart.models import PixArt


class GanHead(nn.Module):
    """A logit per image from a block's tokens: LayerNorm, a two-layer MLP per token, the mean over tokens
    (a transformer's counterpart of DMD2's strided convolutions down to one logit)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(self.norm(tokens)).mean(dim=(1, 2))


class FakeScore(nn.Module):
    """`forward(..., gan=True)` also returns the GAN head's logits on the features after block depth // 2."""

    def __init__(self, model: PixArt, gan: bool):
        super().__init__()
        self.model = model
        self.head = GanHead(model.config.hidden_size) if gan else None
        self._features: Tensor | None = None
        self._capture = False
        if gan:
            model.blocks[len(model.blocks) // 2 - 1].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self._capture:
            self._features = output

    def forward(self, x, t, y, mask=None, data_info=None, gan: bool = False):
        if not gan:
            return self.model(x, t, y, mask=mask, data_info=data_info)
        self._capture = True
        try:
            out = self.model(x, t, y, mask=mask, data_info=data_info)
        finally:
            self._capture = False
        features, self._features = self._features, None
        return out, self.head(features)
