"""Register step: put an evaluated, gate-passing model into a registry (local folder / gs://, Vertex AI, Kubeflow)."""
