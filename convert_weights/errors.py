"""The one error type of the converter: a message meant for the person running it."""


class ConversionError(ValueError):
    """The input cannot be converted as asked; the message says which keys or files and what to do.

    A `ValueError`, so code that guards a conversion (or a `verify_checksums` call) against bad input with
    `except ValueError` catches it too."""


__all__ = ["ConversionError"]
