"""Local learning rules: `(x, y, w, state) -> (dw, state)`, pure tensor maths, nothing mutated."""
