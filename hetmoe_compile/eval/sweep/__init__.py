"""Sweeps: the plan, rows, tables and plots (``plan``); jobs, (placement, instance) units and the runner that
compiles each placement (``jobs``); the resumable output directory (``store``); the scheduler and local worker
processes (``workers``); Ray actors (``ray_actors``)."""
