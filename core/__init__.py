"""Platform-neutral core: settings, command grammar, model loading and the generation engine."""
