"""Generator parameters of the synthetic dataset (``data.synthetic``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from oneref.config import options_from

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters (all of them go into the cache marker)."""

    seed: int = 0
    canvas_min: int = 64  # canvas width and height are drawn independently in [min, max]
    canvas_max: int = 96
    min_objects: int = 2
    max_objects: int = 5
    # Object side as a fraction of the canvas long side, which the letterbox maps to img_size, so
    # "small" and "big" keep their pixel sizes after the evaluation resize.
    small_size: tuple[float, float] = (0.17, 0.23)
    big_size: tuple[float, float] = (0.30, 0.38)
    num_train: int = 20000  # expressions (samples) per split
    num_val: int = 1000
    num_test: int = 1000
    expressions_per_image: int = 2
    background_noise: float = 3.0  # std of the Gaussian pixel noise
    image_format: str = "jpg"  # "jpg" (quality 95, 4:4:4) or "png"
    spm_vocab_size: int = 64  # upper bound; the vocabulary has about 25 words
    spm_model_type: str = "word"  # every word one piece; "unigram"/"bpe" give sub-words

    @classmethod
    def from_any(cls, value: SyntheticConfig | Mapping[str, Any] | None) -> SyntheticConfig:
        return options_from(cls, value, "synthetic").validated()

    def validated(self) -> SyntheticConfig:
        if not 16 <= self.canvas_min <= self.canvas_max:
            raise ValueError(f"need 16 <= canvas_min <= canvas_max, got {self.canvas_min}, {self.canvas_max}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0 < self.small_size[0] <= self.small_size[1] < self.big_size[0] <= self.big_size[1] < 1:
            raise ValueError(
                f"need 0 < small_size <= ... < big_size < 1 (fractions, small and big separated), "
                f"got {self.small_size}, {self.big_size}"
            )
        if self.expressions_per_image < 1 or min(self.num_train, self.num_val, self.num_test) < 1:
            raise ValueError("expressions_per_image and num_train/num_val/num_test must be >= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be jpg or png, got {self.image_format!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def num_samples(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]
