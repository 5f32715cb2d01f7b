"""How the fake services count tokens: like the services' own tokenizers, on the high side, for
English and for other scripts alike. Written apart from pyembed's estimate
(pyembed.text.estimate_tokens), which a service's count must never run far above."""

from __future__ import annotations

import math

_PER_CHARACTER = {1: 0.25, 2: 0.5, 3: 1.0, 4: 2.0}
"""Tokens per character by its UTF-8 length: English about 4 characters a token; Cyrillic,
Greek and the like about 2; a CJK character, kana or Hangul syllable about 1 (a rare one more);
an emoji about 2 (byte-level BPE tokenizers, e.g. cl100k, on such text)."""


def service_tokens(text: str) -> int:
    """The tokens a service counts in `text`: 1.3 a word or its characters' rates, whichever
    is more, rounded up."""
    words = math.ceil(len(text.split()) * 1.3)
    chars = sum(_PER_CHARACTER[len(c.encode("utf-8", "surrogatepass"))] for c in text)
    return max(words, math.ceil(chars))
