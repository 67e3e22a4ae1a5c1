"""The commands of ``covr-lightning``, one module each: ``fit``, ``sweep``, ``evaluate``,
``export``, ``compare`` and ``recipes``.

Each module has ``run(args) -> int``: it returns 0 or raises. Exit codes and the one-line error
printing live in :mod:`covr_lightning.cli` alone.
"""
