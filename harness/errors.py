"""The one exception type for bad input: the CLI prints its message and exits with code 2."""


class HarnessError(Exception):
    """Bad input or a missing/corrupt file the user can fix; the message says what and how."""


def choose(kind: str, value: str, valid) -> None:
    """Raise a HarnessError naming the valid choices when `value` is not one of them."""
    valid = sorted(valid)
    if value not in valid:
        raise HarnessError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")
