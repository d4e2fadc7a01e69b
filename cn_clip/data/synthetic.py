"""Random image–text pairs with the LMDB dataset's item format, so the trainer runs (and is tested) with no data."""

from __future__ import annotations

from typing import Any

CLS_ID, SEP_ID = 101, 102
_FIRST_WORD_ID = 670  # past [PAD]/[unused*]/specials/ASCII, into the CJK part of vocab.txt


class SyntheticDataset:
    """``num_samples`` deterministic random pairs: item i → (image [3,R,R], ids [context_length], eos_index).

    Each item depends only on ``(seed, i)``, so workers and reruns agree. Texts are ``[CLS] w… [SEP]`` with 2 to
    ``context_length − 2`` random word ids below ``vocab_size``; images are standard-normal noise (already
    "normalised"). ``num_classes`` > 0 ties each image to one of that many fixed patterns named by one fixed word, so
    a model can actually learn the pairing.
    """

    def __init__(
        self,
        num_samples: int = 64,
        image_size: int = 224,
        context_length: int = 52,
        vocab_size: int = 21128,
        seed: int = 0,
        num_classes: int = 0,
        tokenizer: Any = None,
    ) -> None:
        if context_length < 3:
            raise ValueError("context_length must be at least 3 ([CLS] word [SEP])")
        self.num_samples = num_samples
        self.dataset_len = num_samples
        self.image_size = image_size
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_classes = num_classes
        self.tokenizer = tokenizer  # given (a Hugging Face tower's): word ids become words "w<id>" it tokenizes

    def __len__(self) -> int:
        return self.dataset_len

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        import torch

        index %= self.num_samples
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = self.image_size
        image = torch.randn(3, size, size, generator=gen)
        ids = torch.zeros(self.context_length, dtype=torch.long)
        high = min(self.vocab_size, 21128)
        if self.num_classes > 0:
            label = index % self.num_classes
            pattern = torch.randn(3, size, size, generator=torch.Generator().manual_seed(self.seed + 7919 * label))
            image = pattern + 0.5 * image
            words = torch.tensor([_FIRST_WORD_ID + label % (high - _FIRST_WORD_ID)])
        else:
            length = int(torch.randint(1, self.context_length - 1, (1,), generator=gen))
            words = torch.randint(_FIRST_WORD_ID, high, (length,), generator=gen)
        if self.tokenizer is not None:
            ids = self.tokenizer([" ".join(f"w{int(w)}" for w in words)], self.context_length)[0]
            return image, ids, int((ids != self.tokenizer.pad_id).nonzero()[-1, 0])
        ids[0] = CLS_ID
        ids[1 : 1 + len(words)] = words
        eos_index = 1 + len(words)
        ids[eos_index] = SEP_ID
        return image, ids, eos_index
