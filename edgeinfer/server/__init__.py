"""``edgeinfer serve``: a local HTTP server speaking the OpenAI and the Ollama APIs.

* :mod:`~edgeinfer.server.app`: the Starlette app (routes, API key, body limits, error shapes);
* :mod:`~edgeinfer.server.openai_api` and :mod:`~edgeinfer.server.ollama_api`: each API's
  request fields -> one :class:`~edgeinfer.server.request.GenRequest`, and events -> its responses;
* :mod:`~edgeinfer.server.pool`: lazily loaded engines, a memory budget, LRU unload, keep-alive,
  and a fair bounded queue in front of each engine's ``--parallel`` slots;
* :mod:`~edgeinfer.server.engines`: one engine per model whose sequences decode together
  (llama.cpp's multi-sequence runner, the torch engine's batched decode);
* :mod:`~edgeinfer.server.grammar`: ``response_format`` / ``format`` -> GBNF, and grammar-constrained
  sampling for the torch engine through llama.cpp's grammar sampler.
"""
