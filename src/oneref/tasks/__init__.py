"""Training tasks: losses, metrics and the LightningModules."""
