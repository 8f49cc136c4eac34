"""Local learning rules as pure tensor maths: functions of a batch and a layer's weights (and, for
some, its output) that return an update and mutate nothing; the layers apply them.

Their signatures follow each rule's paper rather than one shape: the Hebbian rules are objects
`(x, y, w, state) -> (dw, state)` (`hebbian.py`); Krotov & Hopfield's rule is
`(v, w, p, k, delta) -> (dS, winners)` (`krotov.py`); SoftHebb's is `(x, u, w, temperature) -> dW`,
u being the layer's currents (`softhebb.py`).
"""
