"""Development tooling that is not shipped (not part of the package, CI or pytest)."""
