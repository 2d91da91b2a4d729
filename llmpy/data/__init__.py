"""Text -> token ids -> shard files -> (x, y) batches.

    tokenizer.py  GPT-2 BPE (tiktoken), vocabulary loaded offline and hash-checked
    shards.py     llm.c token shard files; the rank-aware, resumable DataLoader
    prepare.py    corpora -> shards (`llmpy prepare NAME`)
    text.py       your own files (.txt .md .jsonl .parquet, folders, globs) -> shards (`llmpy prepare PATH ...`)
"""
from .shards import DataLoader, read_shard, write_shard
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "write_shard", "read_shard", "DataLoader"]
