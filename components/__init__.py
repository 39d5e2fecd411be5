"""vlmtune pipeline steps: one sub-package per step, plus `common` for what they share.

Each step is a pure core (`core.run(config, ...)`), a thin CLI (`cli.main(argv)`) and a thin KFP
component (`component.py`) whose body only calls the core.
"""
