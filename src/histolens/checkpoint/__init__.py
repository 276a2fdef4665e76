"""What a trained model is on disk: the checkpoint file and its metadata.

Owns ``io`` (save/load/resolve a checkpoint, ``read_metadata``), ``metadata``
(``CheckpointMetadata``: the contract every consumer reads) and ``parts`` (its typed sections).
May import: base modules, ``histolens.stats``, ``histolens.data``, ``histolens.stain``,
``histolens.models``.
"""
