import sys
import warnings

# pyproj must be loaded before ecCodes: the ecCodes wheels load eckit's own PROJ into the global symbol scope,
# and a pyproj loaded afterwards binds to that PROJ instead of its own (another version): it cannot set its
# database path and the process aborts at exit. Loaded first, each library keeps its own PROJ.
if "gribapi" in sys.modules and "pyproj" not in sys.modules:
    warnings.warn(
        "ecCodes was imported before reformatters: projected grids (pyproj) may crash this process at exit; "
        "import reformatters (or pyproj) before eccodes or cfgrib",
        RuntimeWarning,
        stacklevel=2,
    )
import pyproj  # noqa: F401
