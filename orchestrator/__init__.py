"""Driver side of wrnsweep: sweep config, search space, Tuner, tracking, registry and CLI.

Submodules are imported where they are used (Ray, MLflow and torch are heavy),
so ``import orchestrator`` itself stays instant.
"""
