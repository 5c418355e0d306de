"""albor: build a small, fast, local Python code-completion model end to end.

Every step is a stage with a `plan` (validate and estimate, no side effects) and an `apply`
(do it, resumably); `albor pipeline apply` runs the whole ladder from one YAML manifest.
"""

__version__ = "0.1.0"
