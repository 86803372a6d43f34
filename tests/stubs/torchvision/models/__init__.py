"""A stand-in for torchvision.models, for tests only: see tests/stubs/README.md."""
