"""Token-level masks: which response tokens to leave out of the loss (XTF), and why."""

from mechsieve.tokens.base import (
           KN,
           MASKERS,
           REASON_BITS,
           RI,
           TR,
           TokenMasker,
           TokenMasks,
           TokenScores,
)
from mechsieve.tokens.otsu import multi_otsu
from mechsieve.tokens.xtf import (
           Xtf,
           XtfConfig,
           bundled_words,
           context_free_embeddings,
           parse_word_list,
)

__all__ = ["KN", "MASKERS", "REASON_BITS", "RI", "TR", "TokenMasker", "TokenMasks", "TokenScores",
           "Xtf", "XtfConfig", "bundled_words", "context_free_embeddings", "multi_otsu", "parse_word_list"]
