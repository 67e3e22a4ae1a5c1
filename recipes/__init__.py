"""The packaged recipes (YAML files; this folder ships inside the wheel as ``covr_lightning.recipes``)."""
