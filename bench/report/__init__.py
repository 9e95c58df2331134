"""From records to results: ``table`` (paper-style tables beside the published numbers) and
``plots`` (the figures)."""
