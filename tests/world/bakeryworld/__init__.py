"""bakeryworld: the local AWS world for bakery's tests and demo (see tests/world/README.md)."""
