"""The bundled demo system hopwatch watches in `hopwatch demo`: a shop API (and its helpers)."""
