"""The tokenizer algorithms behind `ember.models.tokenizer.Tokenizer`, one module each:
`spm` (SentencePiece-style score merging) and `bpe` (byte-level BPE with pre-tokenizer regexes)."""
