"""Registry backends behind components.register.registry.Registry."""
