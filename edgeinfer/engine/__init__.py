"""edgeinfer's own PyTorch engine: GGUF loading (memory-mapped, quantized layers swapped in by
tensor type) and device selection. The backend wrapper is :mod:`edgeinfer.backends.torch_engine`;
the model code is in :mod:`edgeinfer.models`, the kernels in :mod:`edgeinfer.kernels`.
"""
