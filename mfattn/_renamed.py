"""Keyword aliases for renamed arguments (private)."""

import functools
import warnings


def renamed_kwargs(**old_to_new):
    """Accept each old keyword name as an alias of its new name, with a
    `DeprecationWarning`; passing both is an error."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"pass `{new}` only (`{old}` is its old name)")
                    warnings.warn(
                        f"`{old}=` is deprecated; use `{new}=`", DeprecationWarning, stacklevel=2
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorator
