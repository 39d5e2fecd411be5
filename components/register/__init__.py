"""Register step: put an evaluated, gate-passing model into a registry, and read registries back.

- ``core.run(...)``: the step itself (gate check, lineage, model card, registration).
- ``model_card``: README.md with YAML front matter; ``cli``: ``vlmtune register`` and ``vlmtune registry``.
- ``component``: the KFP component, whose body only calls ``core.run``.

The registry itself (the ``Registry`` interface, ``open_registry``, ``resolve_reference``, ``current_champion``
and the local/Vertex/Kubeflow backends) is in :mod:`components.common.registry`, since evaluate, predict and
the pipeline read it too.

    vlmtune register --model M --evaluation E --registry gs://bucket/registry --name chart-vlm
    vlmtune predict --model gs://bucket/registry::chart-vlm@champion ...
"""
