"""Models travel peer to peer: manifests, slices, the sparse fetch cache and the fetch loop.

- :mod:`.manifest` ``Manifest`` (files and sha256-checked pieces of a model), ``build_manifest``
- :mod:`.slices`   ``Need`` (layers, embedding, head) and ``pieces_for``: what a slice reads
- :mod:`.store`    ``FetchCache`` / ``CacheEntry``: sparse copies of a model's files under the
  state dir, with a journal of the verified pieces (resumable, atomic)
- :mod:`.fetch`    ``Source``, ``fetch_pieces``, ``agree_manifest``: fetch pieces from peers with
  a window of requests in flight, dropping sources that fail or send corrupt bytes

Torch-free (the daemon and ``p2pllm ctl`` import it); the wire messages that carry manifests and
pieces are :mod:`p2pllm.wire`'s and the daemon's (:mod:`p2pllm.daemon.weights`).
"""
