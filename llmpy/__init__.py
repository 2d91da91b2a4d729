"""llmpy: GPT-2 and Llama 3 training in plain Python (NumPy) and hand-written CUDA.

    import llmpy
    model = llmpy.GPT(llmpy.GPTConfig(n_layer=2, n_head=2, n_embd=128))
    logits, loss = model.forward(ids, targets)
    model.backward()
    llama = llmpy.load("Llama-3.2-1B")      # a Hugging Face directory: a GPT or a Llama, by its config.json
"""
import os
import sys

if "numpy" not in sys.modules:
    # OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call
    # before they sleep, and on a machine with as many threads as cores they
    # then take cores from the NumPy ops that llmpy runs on its own thread
    # pool between the matmuls (the classifier, AdamW, attention): measured
    # on 2 cores, 2^12 cycles makes a d4 step 12% faster and changes no
    # result (bench/RESULTS.md). Read once when NumPy loads OpenBLAS, so only
    # if llmpy is imported first (the CLI); a value the user set is kept.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from . import families  # noqa: E402
from .config import GPTConfig, preset  # noqa: E402
from .errors import LlmpyError  # noqa: E402
from .llama import Llama  # noqa: E402
from .model import GPT  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Llama", "LlmpyError", "Tokenizer", "load", "preset"]


def load(path, device: str = "cpu") -> GPT | Llama:
    """Load a model: a Hugging Face directory (config.json + model.safetensors,
    a sharded checkpoint, or pytorch_model.bin with torch installed), a GPT
    or a Llama by config.json's model_type; an llm.c .bin model file (a GPT);
    or a Hugging Face hub name such as "gpt2" or "meta-llama/Llama-3.2-1B"
    (downloaded when online). See families.load."""
    return families.load(path, device=device)


def __getattr__(name):
    # The tokenizer pulls in tiktoken and reads the vocabulary: only on demand.
    if name == "Tokenizer":
        from .data.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llmpy' has no attribute {name!r}")
