"""Session-scoped tiny model and demo data fixtures."""
