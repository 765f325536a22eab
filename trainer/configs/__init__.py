"""Training configs shipped with openrft (`demo.yaml`: the `openrft demo` run)."""
