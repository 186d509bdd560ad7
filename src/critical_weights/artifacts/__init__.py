"""The on-disk contracts between stages, torch-free so that later stages start fast: the prepared
texts and their tokenizer (prepared_texts), the sensitivity shards (shards), and the ranked
critical set (ranked_file). Each module owns one format: its schema, its writer, and a reader
that checks it and says what to rerun when it is missing or corrupt.
"""
