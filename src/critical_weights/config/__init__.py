"""params.yaml, read strictly and checked in full before any work: the typed, frozen params of
every stage (params), the rules that check each value and collect every problem at once
(rules), and the YAML reader that rejects duplicate keys and names the line (strict_yaml).
Torch-free.
"""
