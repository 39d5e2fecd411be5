"""The vlmtune pipeline (kfp dsl), its runners (kfp.local, Vertex AI, Kubeflow), and the `vlmtune` CLI."""
