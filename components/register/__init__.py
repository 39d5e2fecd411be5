"""Register step: put an evaluated, gate-passing model into a registry, and read registries back.

- ``registry``: the ``Registry`` interface, ``open_registry(target)``, ``resolve_reference("[REGISTRY::]NAME@REF")``.
- ``backends/``: ``local`` (folder or gs:// prefix), ``vertex`` (Vertex AI Model Registry), ``kubeflow``
  (Kubeflow Model Registry).
- ``core.run(...)``: the step itself; ``core.current_champion(...)`` for evaluation.
- ``model_card``: README.md with YAML front matter; ``cli``: ``vlmtune register`` and ``vlmtune registry``.

    vlmtune register --model M --evaluation E --registry gs://bucket/registry --name chart-vlm
    vlmtune predict --model gs://bucket/registry::chart-vlm@champion ...
"""
