"""An M-CLIP-style multilingual text encoder: an XLM-R-style transformer, mean pooling over the
attention mask, and one linear projection into the CLIP embedding space.

Why this shape: it is the design of M-CLIP (`M-CLIP/XLM-Roberta-Large-Vit-B-32`: a
`transformer` plus `LinearTransformation`), the multilingual text side LAION-5B's filter used for
`multi`/`nolang` captions. The parameter names follow that release so its state dict loads here;
the transformer's own config is stored inside ours, so loading needs no second download.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, XLMRobertaConfig, XLMRobertaModel


class MCLIPConfig(PretrainedConfig):
    """`transformer_config`: the XLM-R config as a dict; `numDims`: the CLIP embedding size."""

    model_type = "M-CLIP"

    def __init__(self, transformer_config: Optional[dict] = None, transformerDimensions: int = 768,
                 numDims: int = 512, modelBase: str = "xlm-roberta-large", **kwargs: Any) -> None:
        self.transformer_config = transformer_config
        self.transformerDimensions = transformerDimensions
        self.numDims = numDims
        self.modelBase = modelBase
        super().__init__(**kwargs)


class MultilingualCLIP(PreTrainedModel):
    """Text -> CLIP space. `forward(input_ids, attention_mask)` returns unnormalised embeddings."""

    config_class = MCLIPConfig
    base_model_prefix = "mclip"
    _no_split_modules: list = []

    def __init__(self, config: MCLIPConfig) -> None:
        super().__init__(config)
        if config.transformer_config is not None:
            tcfg = XLMRobertaConfig(**config.transformer_config)
        else:  # an M-CLIP release names its base model; building it needs that config locally
            from transformers import AutoConfig

            tcfg = AutoConfig.from_pretrained(config.modelBase)
        self.transformer = XLMRobertaModel(tcfg, add_pooling_layer=False)
        self.LinearTransformation = nn.Linear(config.transformerDimensions, config.numDims)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, 0.02)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.LinearTransformation(pooled)


def build_mclip(vocab_size: int, clip_dim: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                max_positions: int = 64, pad_token_id: int = 0) -> MultilingualCLIP:
    """A small randomly initialised M-CLIP (the demo distils it from the demo CLIP's text tower)."""
    tcfg = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=hidden * 2,
                            max_position_embeddings=max_positions + 2, pad_token_id=pad_token_id,
                            type_vocab_size=1)
    cfg = MCLIPConfig(transformer_config=tcfg.to_dict(), transformerDimensions=hidden, numDims=clip_dim,
                      modelBase="local")
    return MultilingualCLIP(cfg)
