# pyproj must be loaded before ecCodes: the ecCodes wheels load eckit's own PROJ into the global symbol scope,
# and a pyproj loaded afterwards binds to that PROJ instead of its own (a different version): it cannot set
# its database path and the process crashes at exit. Loaded first, each library keeps its own PROJ.
import pyproj  # noqa: F401
