"""llmpy: GPT-2 training in plain Python (NumPy) and hand-written CUDA.

    import llmpy
    model = llmpy.GPT(llmpy.GPTConfig(n_layer=2, n_head=2, n_embd=128))
    logits, loss = model.forward(ids, targets)
    model.backward()
"""
from . import families
from .config import GPTConfig, preset
from .errors import LlmpyError
from .model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "LlmpyError", "Tokenizer", "load", "preset"]


def load(path, device: str = "cpu") -> GPT:
    """Load a GPT-2 model: a Hugging Face directory (config.json + model.safetensors,
    or pytorch_model.bin with torch installed), an llm.c .bin model file, or a
    Hugging Face hub name such as "gpt2" (downloaded when online)."""
    return families.load(path, device=device)


def __getattr__(name):
    # The tokenizer pulls in tiktoken and reads the vocabulary: only on demand.
    if name == "Tokenizer":
        from .data.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llmpy' has no attribute {name!r}")
