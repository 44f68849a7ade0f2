"""Checkpoint readers: a model's tensors by their Hugging Face names, each read as the slice a rank holds.

- ``safetensors``: a safetensors folder (one file or several with an index); a GPTQ/AWQ one's 4-bit
  tensors repacked into our format at load (the layouts: ``gptq``).
- ``gguf``: a GGUF file served as it is, its blocks repacked into our formats (the file itself:
  ``gguf_file``, which the offline converter ``tgi_zmq.convert`` shares without importing the readers).

Each reader is a ``tgi_zmq.layers.WeightSource`` (declared beside ``LinearMethod``: the layers consume
both, and readers and methods import the layers, never the other way) and answers which linear method
serves each layer, from how it stores the layer's parts (``base``). This package imports nothing here so
that the converter's import of ``gguf_file`` stays free of torch.
"""
