"""Model directories (diffusers layout) and the architectures bf can create."""
