"""Data: the packed SFT dataset and HH loader (from-scratch core); recipe loaders live in submodules
(:mod:`alignkit.data.io`, :mod:`alignkit.data.preference`, :mod:`alignkit.data.sft_rows`, :mod:`alignkit.data.check`)."""
from alignkit.data.hh import hh_files, load_hh
from alignkit.data.sft import PackedSFTDataset, iterate_batches, tokenizer_fingerprint

__all__ = ["PackedSFTDataset", "hh_files", "iterate_batches", "load_hh", "tokenizer_fingerprint"]
