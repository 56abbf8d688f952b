"""edgeinfer: local, offline, quantized LLM inference.

Convert Hugging Face checkpoints to GGUF (``edgeinfer convert``), run them with
llama.cpp or edgeinfer's own PyTorch engine (``edgeinfer run``), and chat in the
terminal (``edgeinfer chat``).
"""

__version__ = "0.1.0"
