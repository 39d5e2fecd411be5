"""Pieces the steps share: storage URIs, artifact manifests, typed configs, chat formatting, model loading."""
