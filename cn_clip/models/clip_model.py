"""The CLIP model: an image tower, a BERT text tower, projections and a learned temperature."""

from __future__ import annotations

import math

import torch
from torch import nn

from cn_clip.models.config import CLIPCfg
from cn_clip.models.positions import check_text_length
from cn_clip.models.resnet import ModifiedResNet
from cn_clip.models.text import HFTextTower, create_bert, trim_padding
from cn_clip.models.vit import VisionTransformer

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)
PAD_ID = 0
# SigLIP (Zhai et al. 2023): a learnable bias on the logits, initialised with t' = log 10 and b = -10. The bias is
# not a reference key: checkpoints keep it under this extra top-level key, beside "state_dict".
LOGIT_BIAS_KEY = "logit_bias"
SIGLIP_LOGIT_SCALE_INIT = math.log(10)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def _matryoshka(features: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return features
    from cn_clip.models.matryoshka import check_dim, truncate

    return truncate(features, check_dim(dim, features.shape[-1]))


class CLIP(nn.Module):
    """Chinese CLIP. State-dict keys: ``text_projection``, ``logit_scale``, ``visual.*``, ``bert.*`` (reference).

    With a Hugging Face text tower (``cfg.text.kind == "hf"``): ``logit_scale``, ``visual.*``, ``text.*``
    (open_clip's layout for such towers). ``text_weights`` initialises that tower from its folder's weights.
    """

    def __init__(self, cfg: CLIPCfg, text_weights: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        is_bert = cfg.text.kind == "bert"
        # Own parameters first: they lead the reference's state dict.
        if is_bert:
            self.text_projection = nn.Parameter(torch.empty(cfg.text.text_hidden_size, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.visual: nn.Module = (
            ModifiedResNet(cfg.vision) if cfg.vision.kind == "resnet" else VisionTransformer(cfg.vision)
        )
        if is_bert:
            self.bert = create_bert(cfg.text)
        else:
            self.text = HFTextTower(cfg.text, cfg.embed_dim, load_weights=text_weights)
        self.register_parameter("logit_bias", None)  # SigLIP only, see set_logit_bias
        self.initialize_parameters()

    @property
    def text_tower(self) -> nn.Module:
        """The text encoder module: ``bert`` or the Hugging Face tower's transformer."""
        return self.bert if self.cfg.text.kind == "bert" else self.text.transformer

    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the text side, projection included."""
        if self.cfg.text.kind == "bert":
            return [*self.bert.parameters(), self.text_projection]
        return list(self.text.parameters())

    @property
    def is_vit(self) -> bool:
        return isinstance(self.visual, VisionTransformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def initialize_parameters(self) -> None:
        """Reference initialisation of the CLIP-specific parts (BERT is initialised by transformers: N(0, 0.02))."""
        with torch.no_grad():
            self.logit_scale.fill_(LOGIT_SCALE_INIT)
            if isinstance(self.visual, ModifiedResNet):
                pool = self.visual.attnpool
                std = pool.c_proj.in_features**-0.5
                for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                    nn.init.normal_(proj.weight, std=std)
                for name, param in self.visual.named_parameters():
                    if name.startswith("layer") and name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
            if self.cfg.text.kind == "bert":
                nn.init.normal_(self.text_projection, std=self.cfg.text.text_hidden_size**-0.5)

    @property
    def has_logit_bias(self) -> bool:
        return self.logit_bias is not None

    def set_logit_bias(self, value: float | torch.Tensor | None) -> None:
        """Add (or, with None, remove) the SigLIP bias; its state-dict key is ``logit_bias``."""
        if value is None:
            self.register_parameter("logit_bias", None)
            return
        ref = self.logit_scale
        tensor = torch.as_tensor(value).detach().reshape(()).to(device=ref.device, dtype=ref.dtype)
        self.register_parameter("logit_bias", nn.Parameter(tensor.clone()))

    def init_siglip(self) -> None:
        """The SigLIP paper's starting point: ``exp(logit_scale) = 10`` and ``logit_bias = -10``."""
        with torch.no_grad():
            self.logit_scale.fill_(SIGLIP_LOGIT_SCALE_INIT)
        self.set_logit_bias(SIGLIP_LOGIT_BIAS_INIT)

    def match_probability(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """SigLIP models: ``sigmoid(exp(logit_scale) · cos + logit_bias)`` [B_i, B_t], a per-pair match probability.
        CLIP models have no bias: fit a calibration (``python -m cn_clip.eval.calibrate``) instead."""
        if self.logit_bias is None:
            raise ValueError("this model has no logit_bias (not trained with --loss siglip); use cn_clip.Calibrator")
        image_features, text_features, scale = self.forward(image, text)
        return torch.sigmoid(scale * image_features @ text_features.t() + self.logit_bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        text = self.text_tower
        # transformers 5 renamed the switch (activation_*); 4.x only has gradient_*.
        if hasattr(text, "activation_checkpointing_enable"):
            if enable:
                text.activation_checkpointing_enable({"use_reentrant": False})
            else:
                text.activation_checkpointing_disable()
        elif enable:
            text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            text.gradient_checkpointing_disable()

    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, ln 100]; called after every optimizer step. A frozen one (LoRA) is left as
        loaded, so the frozen base stays bit-identical."""
        if not self.logit_scale.requires_grad:
            return
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def encode_image(
        self,
        image: torch.Tensor,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        dim: int | None = None,
    ) -> torch.Tensor:
        """Unnormalised image features [B, embed_dim]; ``mask_ratio`` > 0 applies FLIP (ViT only). ``dim=k``: the
        first k coordinates, re-normalised (Matryoshka, see :mod:`cn_clip.models.matryoshka`)."""
        return _matryoshka(self.visual(image.to(self.dtype), mask_ratio, generator), dim)

    def encode_text(self, text: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
        """Unnormalised text features [B, embed_dim] from the [CLS] hidden state; padding (id 0) is masked.
        ``dim=k``: the first k coordinates, re-normalised (Matryoshka)."""
        if self.cfg.text.kind == "hf":
            return _matryoshka(self.text(text).to(self.dtype), dim)
        text = trim_padding(text, PAD_ID)
        check_text_length(self, text.shape[1])
        mask = (text != PAD_ID).to(torch.long)
        hidden = self.bert(input_ids=text, attention_mask=mask).last_hidden_state  # [B, L, H]
        return _matryoshka(hidden[:, 0].to(self.dtype) @ self.text_projection.to(self.dtype), dim)

    def forward(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        """Like the reference: one input → its unnormalised features; both → (img_n, txt_n, exp(logit_scale))."""
        if image is None and text is None:
            raise ValueError("text and image cannot both be None!")
        if image is None:
            return self.encode_text(text)
        if text is None:
            return self.encode_image(image, mask_ratio, generator)
        image_features = self.encode_image(image, mask_ratio, generator)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return image_features, text_features, self.logit_scale.exp()

    def get_similarity(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])`` scaled by ``exp(logit_scale)``."""
        image_features, text_features, scale = self.forward(image, text)
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    @property
    def tokenizer(self):  # noqa: ANN201 - the reference exposes the tokenizer on the model
        from cn_clip.tokenizer import get_tokenizer

        return get_tokenizer(self.cfg)
