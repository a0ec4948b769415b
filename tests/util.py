"""What many test files compare with."""


def max_rel_err(a, b):
    """The largest absolute difference, relative to the largest magnitude of the reference b."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
