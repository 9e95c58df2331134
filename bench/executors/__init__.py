"""Ways to run the same stage objects: sequential (reference) and, later, distributed."""
