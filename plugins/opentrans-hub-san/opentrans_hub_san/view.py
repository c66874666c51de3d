"""SAN's split ViT seen as one open_clip tower (imported on first use: declaring the plugin needs no torch)."""

from torch import nn


class SanTowerView(nn.Module):
    """SAN's two halves seen as one tower with open_clip's names (same parameter objects, no copies)."""

    def __init__(self, extractor: nn.Module, rec_head: nn.Module):
        super().__init__()
        self.conv1 = extractor.conv1
        self.class_embedding = extractor.class_embedding
        self.positional_embedding = extractor.positional_embedding
        self.ln_pre = extractor.ln_pre
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([*extractor.resblocks, *rec_head.resblocks])
        self.ln_post = rec_head.ln_post
        self.proj = rec_head.proj
