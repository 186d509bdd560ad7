"""The evaluation texts: reading a source (.jsonl, .txt, .parquet or a folder), choosing with the
seed, tokenising and truncating, the held-out texts validate measures on, and the in-sample
share later stages draw (sources); and the `prepare` stage that writes them (stage).
"""
