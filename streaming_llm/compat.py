"""Everything that depends on the installed transformers version, in one place.

Tested with transformers 5.24 (pyproject pins >=5.24,<5.25). In that line the forward takes the cache as `cache=`
(formerly `past_key_values=`), positions default to `cache.get_seq_length()`, and masks are sized by
`CacheLayerMixin.get_mask_sizes(query_length)`: the contract `cache.StreamingLayer` implements.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TESTED = (Version("5.24.0"), Version("5.25.0"))
CACHE_KWARG = "cache"


def check_transformers() -> None:
    """Refuse a transformers version whose Cache API this package was not tested against."""
    installed = Version(transformers.__version__)
    if not TESTED[0] <= installed < TESTED[1]:
        raise RuntimeError(
            f"transformers {installed} is installed; streaming_llm's cache was tested with >={TESTED[0]},<{TESTED[1]}"
            " (the Cache API changes between minor versions): pip install 'transformers>=5.24,<5.25'"
        )


def cache_kwargs(cache) -> dict:
    """The keyword arguments that hand `cache` to a model's forward."""
    return {CACHE_KWARG: cache, "use_cache": True}
