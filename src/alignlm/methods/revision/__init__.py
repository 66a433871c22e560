"""ReAlign and ReVision (docs/methods.md, ReAlign and ReVision): unpaired text as pseudo-images.

``shards`` reads and writes embedding shards, ``embed`` turns images and captions into them with a dual encoder,
``realign`` moves text embeddings into the image-embedding distribution, ``dual_encoder`` is the offline
LiT-style encoder used when no CLIP weights can be had, and ``commands`` wires them into the ``alignlm`` CLI.
"""
