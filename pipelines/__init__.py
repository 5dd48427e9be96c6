"""The edges: command line, DVC stages, Ray Train/Tune drivers, MLflow tracking. Thin wrappers over `vgg`."""
