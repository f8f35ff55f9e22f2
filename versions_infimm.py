"""The transformers releases this code supports, checked when the code is imported.

InfiMM's first release stopped working when transformers moved on, deep inside `generate`. This module makes the
supported range explicit: the package (setup.cfg) and the remote code copied into every saved folder declare the
same range, every minor release in it is tested, and an import under a transformers outside it fails at once with
a message naming both versions, instead of an error from some renamed internal later on.

It is the first thing each remote-code module imports, so it imports nothing from transformers but its version.
"""

import os

from packaging.version import Version


# Keep equal to setup.cfg's `transformers` requirement (a test compares them).
TRANSFORMERS_REQUIREMENT = ">=5.17,<6"
TRANSFORMERS_MINIMUM = Version("5.17")
TRANSFORMERS_BELOW = Version("6")
# Set to 1 to import anyway (at your own risk) under a transformers outside the range.
SKIP_CHECK_VARIABLE = "INFIMM_SKIP_TRANSFORMERS_CHECK"


def unsupported_transformers_message(version: str) -> str | None:
    """Why `version` of transformers cannot run this code, or None when it is in the supported range."""
    release = Version(Version(version).base_version)  # 5.26.0.dev0 counts as 5.26, 6.0.0rc1 as 6.0
    if TRANSFORMERS_MINIMUM <= release < TRANSFORMERS_BELOW:
        return None
    return (
        f"InfiMM's model code supports transformers {TRANSFORMERS_REQUIREMENT} (every minor release in that range is "
        f"tested); this environment has transformers {version}. Install a supported release: "
        f"pip install 'transformers{TRANSFORMERS_REQUIREMENT}'. To try anyway, set {SKIP_CHECK_VARIABLE}=1."
    )


def check_transformers_version() -> None:
    """Raises ImportError when the installed transformers is outside the supported range (see module docstring)."""
    import transformers

    message = unsupported_transformers_message(transformers.__version__)
    if message is None:
        return
    if os.environ.get(SKIP_CHECK_VARIABLE) == "1":
        import warnings

        warnings.warn(message, stacklevel=2)
        return
    raise ImportError(message)


check_transformers_version()


__all__ = ["TRANSFORMERS_REQUIREMENT", "check_transformers_version", "unsupported_transformers_message"]
