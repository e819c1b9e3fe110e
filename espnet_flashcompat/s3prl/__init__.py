"""Importing S3PRL: a guarded import that names the real error, and a hub that imports only the upstream asked for.

- ``errors``: ``Diagnosis`` (an import failure reduced to its cause), ``S3PRLImportError``, ``one_line``.
- ``guard``: ``import_s3prl()``; hides a broken flash-attn and retries, classifies what it cannot recover.
- ``hub``: ``ResilientHub``, a lazy stand-in for ``s3prl.hub``: one broken upstream no longer takes the others down.
"""
