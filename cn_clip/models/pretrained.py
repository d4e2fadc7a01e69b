"""Released weights as data: where each file lives, its size and SHA-256, and its architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainedInfo:
    name: str
    architecture: str
    resolution: int
    hf_repo: str
    filename: str
    size_bytes: int
    sha256: str

    @property
    def urls(self) -> list[str]:
        """Mirrors, tried in order: Hugging Face, ModelScope, then the retired Aliyun OSS bucket."""
        return [
            f"https://huggingface.co/OFA-Sys/{self.hf_repo}/resolve/main/{self.filename}",
            f"https://www.modelscope.cn/models/AI-ModelScope/{self.hf_repo}/resolve/master/{self.filename}",
            f"https://clip-cn-beijing.oss-cn-beijing.aliyuncs.com/checkpoints/{self.filename}",
        ]

    @property
    def vision_model(self) -> str:
        return self.architecture.split("@")[0]

    @property
    def text_model(self) -> str:
        return self.architecture.split("@")[1]


_PRETRAINED = [
    PretrainedInfo(
        "ViT-B-16",
        "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
        224,
        "chinese-clip-vit-base-patch16",
        "clip_cn_vit-b-16.pt",
        753_196_934,
        "5997ef32c50de18f3ac06eb5d746c324a639053c3bed8f2986f97ebb22b2ecde",
    ),
    PretrainedInfo(
        "ViT-L-14",
        "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
        224,
        "chinese-clip-vit-large-patch14",
        "clip_cn_vit-l-14.pt",
        1_625_135_766,
        "26a0d4ac248fcea33e8c1e32c22a80def0fe9b1770b429129dfcc04bcd978d28",
    ),
    PretrainedInfo(
        "ViT-L-14-336",
        "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
        336,
        "chinese-clip-vit-large-patch14-336px",
        "clip_cn_vit-l-14-336.pt",
        1_626_446_358,
        "53b9a3141f14b2e87366b0857ce78ac1c4c99e028d4d3d832ca8107deae0775b",
    ),
    PretrainedInfo(
        "ViT-H-14",
        "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
        224,
        "chinese-clip-vit-huge-patch14",
        "clip_cn_vit-h-14.pt",
        3_830_716_726,
        "4549b1a9775db38806dfa398e8e97be4e27299b84b71250d8d2ef0472e708aee",
    ),
    PretrainedInfo(
        "RN50",
        "RN50@RBT3-chinese",
        224,
        "chinese-clip-rn50",
        "clip_cn_rn50.pt",
        308_316_425,
        "b196ee3ee528b70be1158ab1aafb1d2f1c801ad2d9ffb3bae31b0d305f82fc88",
    ),
]
PRETRAINED: dict[str, PretrainedInfo] = {info.name: info for info in _PRETRAINED}


def available_models() -> list[str]:
    """The five released model names, in the reference's order."""
    return list(PRETRAINED)
