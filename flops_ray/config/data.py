"""Where the samples come from: the ``data:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are read: the ``data:`` section."""

    dataset: str = "digits"
    """``digits`` (built in), the path of a Parquet file with image bytes and labels, or a text dataset for a causal
    LM: a ``.jsonl`` or Parquet file with ``prompt``, ``completion`` and optional ``choices`` columns."""
    test_dataset: str = ""
    """File of the test split (Parquet, or JSONL for text). Empty: the training file's name with ``train`` replaced by
    ``test`` (``cifar100_train.parquet`` -> ``cifar100_test.parquet``) if that file exists, else no test set."""
    num_classes: int = 10
    """Classes of the dataset (sets the model head; text datasets do not use it)."""
    img_size: int = 8
    """Image side the model sees."""
    image_column: str = "image"
    """Parquet column of encoded images."""
    label_column: str = "label"
    """Parquet column of integer labels."""
    in_chans: int = 0
    """Image channels (1 or 3); 0 reads them from the model's first convolution."""
    cache_dir: str = ""
    """Directory for memory-mapped decoded images (Parquet datasets larger than memory); empty: in memory."""
    limit: int = 0
    """Use only the first this many samples of each split (0: all)."""

    def validate(self) -> None:
        require(bool(self.dataset), "data.dataset", "must be 'digits' or a Parquet or JSONL path")
        require(self.num_classes >= 2, "data.num_classes", f"must be >= 2, got {self.num_classes}")
        require(self.img_size >= 1, "data.img_size", f"must be >= 1, got {self.img_size}")
        require(self.in_chans in (0, 1, 3), "data.in_chans", f"must be 0 (from the model), 1 or 3, got {self.in_chans}")
        require(self.limit >= 0, "data.limit", f"must be >= 0, got {self.limit}")
