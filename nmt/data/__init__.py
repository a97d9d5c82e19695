"""Data pipeline: reading corpora (``sources``), SentencePiece (``tokenizer``), filtering and encoded
Arrow caches (``corpus``), token-budget batches (``batching``), the Multi30k download (``download``).
Import from the modules themselves."""
