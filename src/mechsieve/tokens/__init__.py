"""Token-level masks: which response tokens to leave out of the loss (XTF), and why; the pipeline
that masks a pool and writes it as a tokenized training set."""

from mechsieve.tokens.base import (
           EL,
           KN,
           MASKERS,
           REASON_BITS,
           RI,
           TR,
           TokenMasker,
           TokenMasks,
           TokenScores,
)
from mechsieve.tokens.excess_loss import ExcessLoss, ExcessLossConfig
from mechsieve.tokens.otsu import multi_otsu
from mechsieve.tokens.pipeline import (
           MaskRun,
           mask_examples,
           mask_examples_sharded,
           run_masker,
           write_masked,
)
from mechsieve.tokens.xtf import (
           Xtf,
           XtfConfig,
           bundled_words,
           context_free_embeddings,
           parse_word_list,
)

__all__ = ["EL", "KN", "MASKERS", "REASON_BITS", "RI", "TR", "ExcessLoss", "ExcessLossConfig", "MaskRun", "TokenMasker", "TokenMasks", "TokenScores",
           "Xtf", "XtfConfig", "bundled_words", "context_free_embeddings", "mask_examples", "mask_examples_sharded",
           "multi_otsu", "parse_word_list", "run_masker", "write_masked"]
