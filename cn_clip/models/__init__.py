"""Model definitions, registry and factory. Import submodules directly; nothing heavy is imported here."""
