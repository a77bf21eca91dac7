"""Errors raised for bad user input: one clear line, caught by the CLI and flows."""


class LossforgeError(Exception):
    """Base class for every user-facing error (bad params, missing data, invalid loss JSON, ...)."""
