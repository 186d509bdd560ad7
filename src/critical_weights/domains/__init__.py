"""Which weights matter for which texts (stage domains): the texts split into groups by a
field (a domain, a language), each group's own gradient and critical set, the sets' overlap
and each group's specific weights, and a cross-group damage matrix: zero one group's critical
weights, measure every group's held-out texts."""
