"""Stage graph: ``torch.export`` capture and tagging (``capture``), the KV-cached capture graph (``kv_cache``), and
the FX passes, one file each (``passes``)."""
