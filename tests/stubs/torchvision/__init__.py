"""A stand-in for torchvision, for tests only: see tests/stubs/README.md."""
