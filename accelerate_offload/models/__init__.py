"""Family-specific code, one module per model family, imported only when that family is used."""
