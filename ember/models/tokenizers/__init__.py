"""The tokenizer algorithms behind `ember.models.tokenizer.Tokenizer`, one module each:
`spm` (SentencePiece-style score merging), `bpe` (byte-level BPE with pre-tokenizer regexes),
and `gguf_metadata` (a fast reader of a GGUF file's key/value metadata)."""
