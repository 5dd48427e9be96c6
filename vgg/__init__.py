"""VGG (Simonyan & Zisserman, ICLR 2015): the library. Pure PyTorch; knows nothing of Ray, MLflow, DVC or the CLI."""
