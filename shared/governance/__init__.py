"""Consortium governance as pure functions: the charter's content rules, what is signed."""
