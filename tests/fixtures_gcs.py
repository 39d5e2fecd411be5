"""GCS emulator fixtures (fake-gcs-server). Filled in by the storage work."""
