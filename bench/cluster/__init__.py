"""The main job at its true size: a sweep's plan and price (``plan``), workers that share a
results folder (``claims``), and its runs as SLURM or local jobs through submitit
(``launchers``)."""
