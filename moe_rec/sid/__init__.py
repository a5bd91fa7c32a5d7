"""Semantic IDs: every item of every service written as a few tokens of one shared codebook.

Data flow, one module per step::

    item_text.py        catalogue row -> one text
    embed.py            texts -> embeddings (N, D), any sentence-transformers model, cached on disk
    residual_kmeans.py  embeddings -> codes (N, L), the default quantiser
    rqvae.py            the same with an RQ-VAE (quantizer.py: the interface both share)
    dedup.py            one more code so every (service, ID) is unique
    table.py            (service, item_id) <-> codes, both ways, save / load
    trie.py             tensor trie of valid IDs for constrained decoding
    stats.py            codebook use, collisions, category coherence
    build.py            all of the above for a catalogue -> files + stats.json
    io.py               atomic, checksummed files of this stage
"""
