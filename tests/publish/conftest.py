"""The publish tests' shared fixture: the miniature ladder workdir of `publish_workdir`."""

from publish_workdir import workdir

__all__ = ["workdir"]
