"""The providers Tollgate calls over HTTP: a client that classifies every answer
(:mod:`.client`), a circuit breaker per provider (:mod:`.breaker`), and one module per
provider saying what it is asked and what it must answer."""
