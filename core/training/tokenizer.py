"""Train a KoGPT2-style byte-level-free BPE tokenizer (metaspace, KoGPT2's special tokens) from reviews."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from core.hub import TRAINING, load_named
from core.model_loading import SPECIAL_TOKENS, tokenizer_explained

# KoGPT2's first ids, in its order, so ids 1 (</s>) and 3 (<pad>) mean the same thing here.
KOGPT2_SPECIALS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", "<d>", "</d>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # NFC keeps compatibility jamo (ㅋㅋ, ㅎㅎ) as users type them; NFKC turned them into conjoining jamo.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=KOGPT2_SPECIALS,
        min_frequency=2,
        limit_alphabet=min(1000, vocab_size // 2),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_pretrained_tokenizer(source: str) -> PreTrainedTokenizerFast:
    """transformers' tokenizer of a model directory or a hub model, with KoGPT2's special tokens: training pads,
    batches and saves with it (serving uses core/tokenizer.py's, which gives the same ids and texts)."""
    return tokenizer_explained(
        lambda: load_named(lambda name, **kw: PreTrainedTokenizerFast.from_pretrained(name, **SPECIAL_TOKENS, **kw),
                           source, TRAINING), source)
