"""``make bench``: ``benchmark`` (step time against a plain loop and against BP) and
``speedup`` (real model parallelism on ranks against one process)."""
